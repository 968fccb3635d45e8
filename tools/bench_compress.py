"""Benchmark: wall time of each compress stage and peak memory (RSS) for one model.

    python tools/bench_compress.py [--kv-ratio 0.5 | --error-budget 0.025] [--out docs/results/bench_compress.json]

Stages: load (GGUF dequantisation + wrap), calibrate (+ the error-budget search when
chosen), decompose, rank selection and fold. No perplexity (that is `eigenkv compress`).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time
from pathlib import Path

import torch

from eigenkv.exporter.pipeline import CompressConfig, _texts, choose_ranks
from eigenkv.exporter.decoder import decoder_from_hf
from eigenkv.exporter.fold import fold
from eigenkv.exporter.sources import load_model, resolve_model


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--kv-ratio", type=float, default=None)
    g.add_argument("--error-budget", type=float, default=None)
    ap.add_argument("--rope-mode", default="pre", choices=("pre", "joint"))
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--out", default="docs/results/bench_compress.json")
    args = ap.parse_args()
    config = CompressConfig(model=args.model, kv_ratio=args.kv_ratio, error_budget=args.error_budget,
                            rope_mode=args.rope_mode, calib_samples=args.calib_samples, eval_tokens=0)
    t = {"start": time.perf_counter()}
    source = resolve_model(config.model)
    model, tokenizer = load_model(source)
    decoder = decoder_from_hf(model)
    t["load"] = time.perf_counter()
    samples, _ = _texts(config, tokenizer)
    t["text"] = time.perf_counter()
    bases, kr, vr, details = choose_ranks(config, decoder, samples)
    t["calibrate_decompose_ranks"] = time.perf_counter()
    fold(decoder, bases, kr, vr, config.rope_mode)
    t["fold"] = time.perf_counter()
    names = list(t)
    stages = {b: round(t[b] - t[a], 2) for a, b in zip(names, names[1:])}
    result = {
        "command": "python " + " ".join(sys.argv),
        "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} torch threads",
        "model": source.label, "rank_method": details["allocation"], "basis_method": details["method"], "rope_mode": config.rope_mode,
        "calibration_tokens": int(samples.numel()),
        "seconds": stages,
        "seconds_calibrate_decompose_fold": round(t["fold"] - t["text"], 2),
        "seconds_total": round(t["fold"] - t["start"], 2),
        "peak_rss_mib": round(_peak_rss_mib(), 1),
    }
    print("| stage | seconds |\n|---|---|")
    for k, v in stages.items():
        print(f"| {k} | {v} |")
    print(f"| calibrate + decompose + fold | {result['seconds_calibrate_decompose_fold']} |")
    print(f"| total | {result['seconds_total']} |\npeak RSS: {result['peak_rss_mib']} MiB")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
