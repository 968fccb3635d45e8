"""Basis methods vs perplexity at several KV ratios, with and without healing (issue 5's table).

One calibration serves every row. For each method the ranks for a ratio come from the
loss-based allocation (measured KL per byte); `eigen` is also shown with the energy
allocation. Healing rows distil the folded model on calibration text (wiki, first half);
perplexity is measured on text used for neither (wiki second half, c4). Prints a markdown
table and writes JSON + md.

    python tools/method_table.py --out docs/results/method_table_smollm2
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
from eigenkv.exporter import sensitivity
from eigenkv.exporter.calibrate import calibrate
from eigenkv.exporter.fold import fold
from eigenkv.exporter.heal import HealSettings, heal
from eigenkv.exporter.methods import get_method, method_factors
from eigenkv.exporter.perplexity import perplexity
from eigenkv.exporter.pipeline import CompressConfig, DEFAULT_CALIB_SEQ_LEN, calibration_shape, load_for_tables
from eigenkv.malloc import malloc_mode, tune_malloc

METHODS = "eigen,query-aware-keys,output-aware-values,loss-aware-shared,loss-aware"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="HF directory or .gguf (default: the embedded SmolLM2)")
    ap.add_argument("--ratios", default="0.75,0.6,0.5")
    ap.add_argument("--methods", default=METHODS, help=f"comma-separated (default {METHODS})")
    ap.add_argument("--joint-methods", default="loss-aware-shared",
                    help="methods also run in RoPE mode joint (shared key bases only; '' for none)")
    ap.add_argument("--heal-methods", default="eigen,loss-aware", help="methods that also get healed rows")
    ap.add_argument("--heal-steps", type=int, default=150, help="0 skips the healed rows")
    ap.add_argument("--heal-lr", type=float, default=1e-4)
    ap.add_argument("--calib-text", default="wiki", metavar="FILE|NAME", help="calibration text (default wiki)")
    ap.add_argument("--calib-samples", type=int, default=None,
                    help="default: 32768 tokens' worth of --calib-seq-len (as `eigenkv compress`)")
    ap.add_argument("--calib-seq-len", type=int, default=DEFAULT_CALIB_SEQ_LEN)
    ap.add_argument("--eval-texts", default="wiki,c4", help="comma-separated built-in names or files (default wiki,c4)")
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--eval-window", type=int, default=1024)
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--out", default="docs/results/method_table_smollm2")
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
    d = decoder.dims.head_dim
    t0 = time.perf_counter()
    rope = decoder.family.positions == "rope"
    wanted = [(n, "pre") for n in args.methods.split(",")] + [(n, "joint") for n in args.joint_methods.split(",") if n]
    stats = calibrate(decoder, texts.samples, progress=progress,
                      attention=any(get_method(n).needs_attention(m, rope) for n, m in wanted),
                      fisher=any(get_method(n).needs_fisher(m, rope) for n, m in wanted))
    calib_s = time.perf_counter() - t0
    base = {n: perplexity(decoder, t, window, progress=progress, desc=f"original {n}") for n, t in texts.evals.items()}
    ratios = [float(r) for r in args.ratios.split(",")]
    results = [{"method": "original", "allocation": "-", "healing_steps": 0, "kv_ratio": 1.0,
                **{f"ppl_{n}": round(p.value, 3) for n, p in base.items()},
                **{f"increase_{n}_pct": 0.0 for n in base}}]

    def measure(label: str, allocation: str, folded, kr, vr, heal_report=None) -> None:
        row = {"method": label, "allocation": allocation, "kv_ratio": round(rank_sel.kv_ratio(kr, vr, d), 4),
               "healing_steps": heal_report.steps if heal_report else 0,
               "healing_seconds": round(heal_report.seconds, 1) if heal_report else 0.0,
               "key_ranks": kr, "value_ranks": vr}
        for n, t in texts.evals.items():
            p = perplexity(folded, t, window, progress=progress, desc=f"{label} {row['kv_ratio']} {n}").value
            row[f"ppl_{n}"] = round(p, 3)
            row[f"increase_{n}_pct"] = round(100 * (p / base[n].value - 1), 1)
        results.append(row)
        print(json.dumps({k: v for k, v in row.items() if "ranks" not in k}), flush=True)

    seconds = {"calibrate": round(calib_s, 1)}
    runs = [(name, "pre") for name in args.methods.split(",")]
    runs += [(name, "joint") for name in args.joint_methods.split(",") if name]
    for name, mode in runs:
        t = time.perf_counter()
        factors = method_factors(get_method(name), decoder, stats, mode, config.calib_seq_len)
        sens = sensitivity.measure(decoder, factors, texts.samples[:4, :256], mode, progress=progress)
        seconds[f"factors+sensitivity {name} {mode}"] = round(time.perf_counter() - t, 1)
        allocations = {"loss": sens.predicted(factors)}
        if name == "eigen":
            allocations["energy"] = rank_sel.energy_curves(factors)
        label = name if mode == "pre" else f"{name}, joint"
        for ratio in ratios:
            for allocation, curves in allocations.items():
                kr, vr = rank_sel.allocate(*curves, ratio)
                measure(label, allocation, fold(decoder, factors, kr, vr, mode), kr, vr)
                if (args.heal_steps and allocation == "loss" and mode == "pre"
                        and name in args.heal_methods.split(",")):
                    folded = fold(decoder, factors, kr, vr, mode)
                    settings = HealSettings(steps=args.heal_steps, lr=args.heal_lr,
                                            seq_len=min(256, config.calib_seq_len))  # as the pipeline heals
                    report = heal(folded, decoder, texts.calibration, settings, progress=progress)
                    measure(name, allocation, folded, kr, vr, report)

    names = list(texts.evals)
    header = ("| method | allocation | healing | KV ratio | " + " | ".join(f"ppl {n} (rise)" for n in names) + " |")
    lines = [header, "|" + "---|" * (4 + len(names))]
    for r in results:
        cells = " | ".join(f"{r[f'ppl_{n}']:.2f} ({r[f'increase_{n}_pct']:+.1f}%)" for n in names)
        heal_cell = f"{r['healing_steps']} steps, {r['healing_seconds']:.0f} s" if r["healing_steps"] else "-"
        lines.append(f"| {r['method']} | {r['allocation']} | {heal_cell} | {r['kv_ratio']:.3f} | {cells} |")
    table = "\n".join(lines)
    print(table)
    tokens = {n: base[n].tokens for n in names}
    meta = {"command": "python " + " ".join(sys.argv),
            "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} torch threads, malloc {malloc_mode()}",
            "model": source.label,
            "calibration": f"{config.calib_text} (first half of the file), {args.calib_samples} x "
                           f"{config.calib_seq_len} tokens; healing draws 2 x {min(256, config.calib_seq_len)}-token "
                           f"windows per step from the same half",
            "evaluation": {"texts": "; ".join(f"{n}: " + ("second half of the file" if n == config.calib_text
                                                          else "from its start") for n in names),
                           "tokens_scored": tokens, "window": config.eval_window},
            "seconds": seconds, "rows": results}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
    out.with_suffix(".md").write_text(f"Command: `{meta['command']}` on {meta['machine']}.\n"
                                      f"Calibration: {meta['calibration']}. Perplexity: {tokens} tokens scored, "
                                      f"windows of {config.eval_window}, texts used for neither calibration nor "
                                      f"healing.\n\n{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
