"""KV reduction vs perplexity for one model: original, --kv-ratio 0.75/0.6/0.5 in both RoPE
modes, the paper's error budget, and key-only / value-only rank cuts (to head_dim / 2).

One calibration serves every row (its statistics hold both RoPE modes); each row folds
and measures perplexity on held-out text. Prints a markdown table and writes JSON + md.

    python tools/ppl_table.py --out docs/results/ppl_table_smollm2
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from eigenkv.exporter import ranks as rank_sel
from eigenkv.exporter.calibrate import calibrate
from eigenkv.exporter.decompose import decompose
from eigenkv.exporter.fold import fold
from eigenkv.exporter.perplexity import perplexity
from eigenkv.exporter.pipeline import CompressConfig, DEFAULT_CALIB_SEQ_LEN, calibration_shape, load_for_tables
from eigenkv.malloc import malloc_mode, tune_malloc


class _Both:
    """Run an error-budget search per RoPE mode during the one calibration pass."""

    def __init__(self, searches):
        self.searches = searches

    def __call__(self, *args):
        for s in self.searches.values():
            s(*args)


def eval_sources(config: CompressConfig) -> str:
    """Where each evaluation text's tokens come from (texts.split_texts)."""
    return "; ".join(f"{n}: " + ("second half of the file" if n == config.calib_text else "from its start")
                     for n in config.eval_texts)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="HF directory or .gguf (default: the embedded SmolLM2)")
    ap.add_argument("--ratios", default="0.75,0.6,0.5")
    ap.add_argument("--error-budget", type=float, default=0.025)
    ap.add_argument("--calib-text", default="wiki", metavar="FILE|NAME", help="calibration text (default wiki)")
    ap.add_argument("--calib-samples", type=int, default=None,
                    help="default: 32768 tokens' worth of --calib-seq-len (as `eigenkv compress`)")
    ap.add_argument("--calib-seq-len", type=int, default=DEFAULT_CALIB_SEQ_LEN)
    ap.add_argument("--eval-texts", default="wiki,c4", help="comma-separated built-in names or files (default wiki,c4)")
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--eval-window", type=int, default=1024)
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--out", default="docs/results/ppl_table_smollm2")
    args = ap.parse_args()
    args.calib_samples = calibration_shape(args.calib_seq_len, args.calib_samples, args.calib_seq_len)[1]
    tune_malloc()  # as the eigenkv commands do (eigenkv/malloc.py); recorded with the machine
    torch.manual_seed(0)
    config = CompressConfig(model=args.model, calib_text=args.calib_text, calib_samples=args.calib_samples,
                            calib_seq_len=args.calib_seq_len, eval_texts=tuple(args.eval_texts.split(",")),
                            eval_tokens=args.eval_tokens, eval_window=args.eval_window,
                            progress=not args.no_progress)
    progress, window = config.progress, config.eval_window
    source, decoder, texts = load_for_tables(config)
    samples, evals = texts.samples, texts.evals
    d, L = decoder.dims.head_dim, decoder.dims.n_layers
    rope = decoder.family.positions == "rope"
    modes = ("pre", "joint") if rope else ("pre",)
    searches = {m: rank_sel.ErrorBudgetSearch(decoder, rank_sel.default_search(args.error_budget, rope), m)
                for m in modes}
    t0 = time.perf_counter()
    stats = calibrate(decoder, samples, on_layer=_Both(searches), progress=progress)
    calib_s = time.perf_counter() - t0
    bases = {m: decompose(stats, rope, m) for m in modes}

    rows = [("original", None, None, [d] * L, [d] * L)]
    for ratio in [float(r) for r in args.ratios.split(",")]:
        for m in modes:
            rows.append((f"kv-ratio {ratio}", m, ratio, *rank_sel.allocate_kv_ratio(bases[m], ratio, 0)))
    for m in modes:
        rows.append((f"error-budget {args.error_budget}", m, None, searches[m].key_ranks, searches[m].value_ranks))
    cut = d // 2  # 32 on the default model (head_dim 64)
    rows.append((f"keys only, rank {cut}", "pre", None, [cut] * L, [d] * L))
    rows.append((f"values only, rank {cut}", "pre", None, [d] * L, [cut] * L))

    base_ppl = {name: perplexity(decoder, t, window, progress=progress, desc=f"original {name}")
                for name, t in evals.items()}
    results = []
    for label, mode, ratio, kr, vr in rows:
        model_ = decoder if mode is None else fold(decoder, bases[mode], kr, vr, mode)
        ppl = base_ppl if mode is None else {n: perplexity(model_, t, window, progress=progress,
                                                           desc=f"{label} {mode} {n}") for n, t in evals.items()}
        row = {"setting": label, "rope_mode": mode or "-", "kv_ratio": round(rank_sel.kv_ratio(kr, vr, d), 4),
               "key_ranks": kr, "value_ranks": vr}
        for n, p in ppl.items():
            row[f"ppl_{n}"] = round(p.value, 3)
            row[f"increase_{n}_pct"] = round(100 * (p.value / base_ppl[n].value - 1), 1)
        results.append(row)
        print(json.dumps({k: v for k, v in row.items() if "ranks" not in k}), flush=True)

    names = list(evals)
    header = "| setting | RoPE mode | KV ratio | " + " | ".join(f"ppl {n} (rise)" for n in names) + " |"
    lines = [header, "|" + "---|" * (3 + len(names))]
    for r in results:
        cells = " | ".join(f"{r[f'ppl_{n}']:.2f} ({r[f'increase_{n}_pct']:+.0f}%)" for n in names)
        lines.append(f"| {r['setting']} | {r['rope_mode']} | {r['kv_ratio']:.3f} | {cells} |")
    table = "\n".join(lines)
    print(table)
    tokens = {n: base_ppl[n].tokens for n in names}
    meta = {"command": "python " + " ".join(sys.argv), "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} torch threads, malloc {malloc_mode()}",
            "model": source.label, "calibration": f"{config.calib_text} (first half of the file), "
                                                  f"{args.calib_samples} x {config.calib_seq_len} tokens",
            "evaluation": {"texts": eval_sources(config), "tokens_scored": tokens, "window": window},
            "calibration_seconds": round(calib_s, 1), "rows": results}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
    out.with_suffix(".md").write_text(f"Command: `{meta['command']}` on {meta['machine']}.\n"
                                      f"Calibration: {meta['calibration']}. Perplexity: {tokens} tokens scored, "
                                      f"windows of {window}.\n\n{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
