"""Quality off the calibration text (issue 12's table): perplexity rise on several held-out
domains at several KV ratios for each calibration (e.g. the landed `wiki` default vs the
`mix` default), unhealed and healed (with the held-out KL curve), and zero-shot cloze accuracy
(`exporter/zero_shot.py`) of the original model, the paper's method and each calibration's
compressed model at one ratio.

Every calibration is judged on the same tokens: each evaluation text's second half (never in any
calibration or healing set: `texts.split_texts` holds it out), perplexity on its first
--eval-tokens, the cloze items from what follows. Prints markdown and writes JSON + md.

    python tools/quality_table.py --out docs/results/quality_table_smollm2
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from eigenkv.artifacts import atomic_path, write_json
from eigenkv.errors import EigenError
from eigenkv.exporter import ranks as rank_sel
from eigenkv.exporter import sensitivity
from eigenkv.exporter.calibrate import calibrate
from eigenkv.exporter.decoder import decoder_from_hf
from eigenkv.exporter.fold import fold
from eigenkv.exporter.heal import HealSettings, heal
from eigenkv.exporter.methods import get_method, method_factors
from eigenkv.exporter.perplexity import perplexity
from eigenkv.exporter.pipeline import CompressConfig, DEFAULT_CALIB_SEQ_LEN, calibration_shape, heal_window
from eigenkv.exporter.refit import refit_outputs, refittable_layers
from eigenkv.exporter.sources import load_model, read_text, resolve_model, tokenize
from eigenkv.exporter.texts import mix_label, split_texts
from eigenkv.exporter.zero_shot import cloze_accuracy, cloze_items
from eigenkv.malloc import malloc_mode, tune_malloc


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="HF directory or .gguf (default: the embedded SmolLM2)")
    ap.add_argument("--calibrations", nargs="+", default=["wiki", "mix"],
                    help="calibration specs, each `--calib-text` items joined by ',' (default: wiki mix)")
    ap.add_argument("--methods", default="loss-aware",
                    help="basis methods (`--method` names, comma-separated), each with its own KL probes "
                         "and rows (default loss-aware)")
    ap.add_argument("--ratios", default="0.75,0.6,0.5")
    ap.add_argument("--heal-ratios", default="0.5", help="ratios that also get healed rows ('' for none)")
    ap.add_argument("--heal-steps", type=int, default=300)
    ap.add_argument("--heal-lr", type=float, default=3e-4)
    ap.add_argument("--heal-batch", type=int, default=2, help="token windows per healing step (default 2)")
    ap.add_argument("--heal-seq-len", type=int, default=None,
                    help="tokens per healing window (default min(256, --calib-seq-len), as `eigenkv compress`)")
    ap.add_argument("--heal-query", action="store_true", help="healing also trains the query projections")
    ap.add_argument("--heal-eval-every", type=int, default=25, help="steps between held-out KL points")
    ap.add_argument("--refit", choices=("none", "both", "only"), default="none",
                    help="rows without the sequential W_o refit (`--output-refit`; none, the default), with it (only; "
                         "healing starts from it), or both side by side (healing starts from the refitted fold)")
    ap.add_argument("--refit-samples", type=int, default=CompressConfig.refit_samples)
    ap.add_argument("--calib-samples", type=int, default=None,
                    help="default: 32768 tokens' worth of --calib-seq-len (as `eigenkv compress`)")
    ap.add_argument("--fisher-draws", type=int, default=CompressConfig.fisher_draws,
                    help=f"sampled next-token draws of the Fisher pass (default {CompressConfig.fisher_draws})")
    ap.add_argument("--calib-seq-len", type=int, default=DEFAULT_CALIB_SEQ_LEN)
    ap.add_argument("--eval-texts", default="wiki,c4,code,tiny")
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--eval-window", type=int, default=1024)
    ap.add_argument("--cloze-texts", default="wiki,c4,tiny")
    ap.add_argument("--cloze-items", type=int, default=150)
    ap.add_argument("--cloze-ratio", type=float, default=0.5)
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--out", default="docs/results/quality_table_smollm2")
    args = ap.parse_args()
    args.calib_samples = calibration_shape(args.calib_seq_len, args.calib_samples, args.calib_seq_len)[1]
    tune_malloc()  # as the eigenkv commands do (eigenkv/malloc.py); recorded with the machine
    if args.cloze_items < 0:
        ap.error(f"--cloze-items must be >= 0 (0: no cloze), got {args.cloze_items}")
    if args.fisher_draws < 1:
        ap.error(f"--fisher-draws must be >= 1, got {args.fisher_draws}")
    if args.refit_samples < 1:
        ap.error(f"--refit-samples must be >= 1, got {args.refit_samples}")
    if args.calib_samples < 1:
        ap.error(f"--calib-samples must be >= 1, got {args.calib_samples}")
    if args.heal_batch < 1 or (args.heal_seq_len is not None and args.heal_seq_len < 2):
        ap.error("--heal-batch must be >= 1 and --heal-seq-len >= 2 tokens")
    try:
        for name in args.methods.split(","):
            get_method(name)
    except EigenError as e:
        ap.error(str(e))
    args.heal_seq_len = heal_window(CompressConfig(calib_seq_len=args.calib_seq_len, heal_seq_len=args.heal_seq_len))
    torch.manual_seed(0)
    progress, window = not args.no_progress, args.eval_window
    source = resolve_model(args.model)
    model, tokenizer = load_model(source, progress=progress)
    decoder = decoder_from_hf(model)
    rope, methods = decoder.family.positions == "rope", [get_method(m) for m in args.methods.split(",")]
    needs_attention, needs_fisher = (any(m.needs_attention("pre", rope) for m in methods),
                                     any(m.needs_fisher("pre", rope) for m in methods))
    d = decoder.dims.head_dim
    eval_names = args.eval_texts.split(",")
    held = {}
    for name in sorted(set(eval_names) | set(args.cloze_texts.split(","))):
        stream = tokenize(tokenizer, read_text(name))
        held[name] = stream[stream.numel() // 2:]
    evals = {n: held[n][: args.eval_tokens] for n in eval_names}
    clozes = {n: cloze_items(held[n][args.eval_tokens:], args.cloze_items)
              for n in args.cloze_texts.split(",")} if args.cloze_items else {}

    def ppl_row(model_) -> dict:
        return {n: perplexity(model_, t, window, progress=False).value for n, t in evals.items()}

    def cloze_row(model_) -> dict | None:
        return {n: round(cloze_accuracy(model_, items), 4) for n, items in clozes.items()} or None

    base = ppl_row(decoder)
    rows = [{"calibration": "-", "method": "original", "kv_ratio": 1.0, "healing": None,
             "ppl": {n: round(v, 3) for n, v in base.items()}, "rise_pct": dict.fromkeys(base, 0.0),
             "cloze": cloze_row(decoder)}]
    print(json.dumps(rows[-1]), flush=True)
    seconds = {}

    def add(calibration, method, folded, kr, vr, report=None, cloze=False):
        ppl = ppl_row(folded)
        row = {"calibration": calibration, "method": method, "kv_ratio": round(rank_sel.kv_ratio(kr, vr, d), 4),
               "healing": None if report is None else report.summary(),
               "ppl": {n: round(v, 3) for n, v in ppl.items()},
               "rise_pct": {n: round(100 * (ppl[n] / base[n] - 1), 1) for n in ppl},
               "cloze": cloze_row(folded) if cloze else None, "key_ranks": kr, "value_ranks": vr}
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if "ranks" not in k}), flush=True)

    ratios = [float(r) for r in args.ratios.split(",")]
    heal_ratios = [float(r) for r in args.heal_ratios.split(",") if r]
    mixes = {}
    for i, spec in enumerate(args.calibrations):
        t0 = time.perf_counter()
        config = CompressConfig(calib_text=tuple(spec.split(",")), calib_samples=args.calib_samples,
                                calib_seq_len=args.calib_seq_len, eval_texts=tuple(eval_names),
                                eval_tokens=args.eval_tokens, eval_window=window, progress=progress)
        texts = split_texts(config, tokenizer)  # eval_tokens > 0: every text's second half is held out
        label = mixes[spec] = texts.label
        span = min(256, args.calib_seq_len)  # the held-out KL curve: the last 2 windows of each text
        held_out = torch.cat([tokenize(tokenizer, read_text(n))[-2 * span:].view(2, span) for n in texts.weights])
        stats = calibrate(decoder, texts.samples, progress=progress, attention=needs_attention, fisher=needs_fisher,
                          fisher_draws=args.fisher_draws)
        seconds[f"calibrate {label}"] = round(time.perf_counter() - t0, 1)
        if i == 0:  # the paper's method (plain SVD, energy allocation) on the first calibration
            eigen = method_factors(get_method("eigen"), decoder, stats, "pre", args.calib_seq_len)
            kr, vr = rank_sel.allocate(*rank_sel.energy_curves(eigen), args.cloze_ratio)
            add(label, "eigen (paper), energy", fold(decoder, eigen, kr, vr, "pre"), kr, vr, cloze=True)
        for method in args.methods.split(","):
            t1 = time.perf_counter()
            factors = method_factors(get_method(method), decoder, stats, "pre", args.calib_seq_len)
            curves = sensitivity.measure(decoder, factors, texts.samples[:4, :256], "pre",
                                         progress=progress).predicted(factors)
            seconds[f"factors+probes {label} {method}"] = round(time.perf_counter() - t1, 1)
            for ratio in ratios:
                kr, vr = rank_sel.allocate(*curves, ratio)
                cloze = ratio == args.cloze_ratio

                def folded_model():
                    model_ = fold(decoder, factors, kr, vr, "pre")
                    if args.refit != "none":
                        t2 = time.perf_counter()
                        refit_outputs(model_, decoder, texts.samples[: args.refit_samples],
                                      layers=refittable_layers(model_, factors))
                        seconds[f"refit {label} {method} {ratio}"] = round(time.perf_counter() - t2, 1)
                    return model_
                if args.refit != "only":
                    add(label, method, fold(decoder, factors, kr, vr, "pre"), kr, vr, cloze=cloze)
                refitted = folded_model() if args.refit != "none" else None
                if refitted is not None:
                    add(label, f"{method} + W_o refit", refitted, kr, vr, cloze=cloze)
                if ratio in heal_ratios and args.heal_steps:
                    folded = refitted if refitted is not None else folded_model()  # healing trains it in place
                    settings = HealSettings(steps=args.heal_steps, lr=args.heal_lr, batch_size=args.heal_batch,
                                            seq_len=args.heal_seq_len, eval_every=args.heal_eval_every,
                                            query=args.heal_query)
                    report = heal(folded, decoder, texts.calibration, settings, progress=progress,
                                  weights=texts.weights, held_out=held_out)
                    add(label, method if args.refit == "none" else f"{method} + W_o refit", folded, kr, vr, report,
                        cloze=cloze)

    lines = ["| calibration | method | healing | KV ratio | " + " | ".join(f"ppl {n} (rise)" for n in eval_names) + " |",
             "|" + "---|" * (4 + len(eval_names))]
    for r in rows:
        h = r["healing"]
        heal_cell = f"{h['steps']} steps, {h['seconds']:.0f} s" if h else "-"
        cells = " | ".join(f"{r['ppl'][n]:.2f} ({r['rise_pct'][n]:+.1f}%)" for n in eval_names)
        lines.append(f"| {r['calibration']} | {r['method']} | {heal_cell} | {r['kv_ratio']:.3f} | {cells} |")
    cloze_names = list(clozes)
    cl = ["| calibration | method | healing | KV ratio | " + " | ".join(f"cloze {n}" for n in cloze_names) + " |",
          "|" + "---|" * (4 + len(cloze_names))]
    for r in rows:
        if r["cloze"]:
            heal_cell = f"{r['healing']['steps']} steps" if r["healing"] else "-"
            cl.append(f"| {r['calibration']} | {r['method']} | {heal_cell} | {r['kv_ratio']:.3f} | "
                      + " | ".join(f"{100 * r['cloze'][n]:.1f}%" for n in cloze_names) + " |")
    curves = ["| calibration | KV ratio | held-out KL (nats/token) at step " + " / ".join(
        str(s) for s, _ in next((r["healing"]["held_out_kl"] for r in rows if r["healing"]), [])) + " |", "|---|---|---|"]
    for r in rows:
        if r["healing"] and r["healing"].get("held_out_kl"):
            curves.append(f"| {r['calibration']} | {r['kv_ratio']:.3f} | "
                          + " / ".join(f"{k:.4f}" for _, k in r["healing"]["held_out_kl"]) + " |")
    tables = "\n".join(lines) + ("\n\n" + "\n".join(cl) if clozes else "") + ("\n\n" + "\n".join(curves) if len(curves) > 2 else "")
    print(tables)
    fisher_note = f"; Fisher pass {args.fisher_draws} draw(s) per sample" if needs_fisher else ""
    meta = {"command": "python " + " ".join(sys.argv),
            "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} torch threads, {platform.platform()}, malloc {malloc_mode()}",
            "model": source.label, "calibrations": mixes,
            "calibration": f"{args.calib_samples} x {args.calib_seq_len} tokens from the first half of each text "
                           f"(samples shared by weight{fisher_note}); healing draws {args.heal_batch} x {args.heal_seq_len}-token windows per step from the same "
                           f"halves by weight{' (query projections trained too)' if args.heal_query and args.heal_steps else ''}, lr {args.heal_lr} with warm-up and linear decay; held-out KL on "
                           f"2 x {min(256, args.calib_seq_len)} tokens from the end of each calibration text",
            "evaluation": {"texts": {n: "second half of the file" for n in eval_names},
                           "tokens_scored": {n: (t.numel() // window) * (window - 1) for n, t in evals.items()},
                           "window": window,
                           "cloze": {"items": args.cloze_items, "context_tokens": 96, "span_tokens": 4, "choices": 4,
                                     "from": "each text's second half after the perplexity tokens"}},
            "seconds": seconds, "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out.with_suffix(".json"), meta)
    with atomic_path(out.with_suffix(".md")) as tmp:
        tmp.write_text(
            f"Command: `{meta['command']}` on {meta['machine']}.\n\nCalibrations: "
            + "; ".join(f"`{k}` = {v}" for k, v in mixes.items()) + f". {meta['calibration']}.\n"
            f"Perplexity: {meta['evaluation']['tokens_scored']} tokens scored, windows of {window}, from each text's "
            f"second half (in no calibration or healing set). "
            + (f"Cloze: {args.cloze_items} items per text, 96 context tokens, 4 candidate 4-token continuations "
               "(chance 25%)." if clozes else "No cloze items.") + f"\n\n{tables}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
