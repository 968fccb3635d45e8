"""Benchmark: wall time of each compress stage and peak memory (RSS) for one model.

    python tools/bench_compress.py [--model PATH] [--kv-ratio 0.5 | --error-budget 0.025]
        [--calib-text wiki] [--calib-samples 8] [--calib-seq-len 4096] [--out docs/results/bench_compress.json]

Stages: load (GGUF dequantisation + wrap), text (tokenize + split), calibrate (+ the
error-budget search when chosen), decompose and rank selection (+ the KL probes of the
loss allocation), fold. No perplexity (that is `eigenkv compress`). Bad options are one line
on stderr and exit 2.
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

from eigenkv.errors import EigenError
from eigenkv.exporter.decoder import decoder_from_hf
from eigenkv.exporter.fold import fold
from eigenkv.exporter.pipeline import CompressConfig, DEFAULT_CALIB_SEQ_LEN, calibration_shape, choose_ranks
from eigenkv.exporter.sources import load_model, resolve_model
from eigenkv.exporter.texts import split_texts


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _bench(config: CompressConfig) -> tuple[dict, dict]:
    """Run the stages of a resolved config -> (stage end times, result fields)."""
    t = {"start": time.perf_counter()}
    source = resolve_model(config.model)
    model, tokenizer = load_model(source, progress=config.progress)
    decoder = decoder_from_hf(model)
    t["load"] = time.perf_counter()
    texts = split_texts(config, tokenizer)
    t["text"] = time.perf_counter()
    factors, kr, vr, details = choose_ranks(config, decoder, texts)
    t["calibrate_decompose_ranks"] = time.perf_counter()
    fold(decoder, factors, kr, vr, config.rope_mode)
    t["fold"] = time.perf_counter()
    return t, {"model": source.label, "rank_method": details["allocation"], "basis_method": details["method"],
               "rope_mode": config.rope_mode.value, "calibration_tokens": int(texts.samples.numel())}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, metavar="PATH", help="HF directory or .gguf (default: the embedded model)")
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--kv-ratio", type=float, default=None, help="global target (default 0.5)")
    g.add_argument("--error-budget", type=float, default=None, help="the paper's per-layer search (method eigen)")
    ap.add_argument("--rope-mode", default="pre", choices=("pre", "joint"))
    ap.add_argument("--calib-text", default="wiki", metavar="FILE", help="built-in text name or UTF-8 file")
    ap.add_argument("--calib-samples", type=int, default=None, metavar="N",
                    help="default: 32768 tokens' worth of --calib-seq-len (as `eigenkv compress`)")
    ap.add_argument("--calib-seq-len", type=int, default=DEFAULT_CALIB_SEQ_LEN, metavar="S")
    ap.add_argument("--out", default="docs/results/bench_compress.json", metavar="PATH", help="JSON result")
    args = ap.parse_args()
    args.calib_samples = calibration_shape(args.calib_seq_len, args.calib_samples, args.calib_seq_len)[1]
    try:
        config = CompressConfig(model=args.model, kv_ratio=args.kv_ratio, error_budget=args.error_budget,
                                rope_mode=args.rope_mode, calib_text=args.calib_text, calib_samples=args.calib_samples,
                                calib_seq_len=args.calib_seq_len, eval_tokens=0).resolved()
        t, fields = _bench(config)
    except EigenError as e:
        print(f"bench_compress: error: {e}", file=sys.stderr)
        return 2
    names = list(t)
    stages = {b: round(t[b] - t[a], 2) for a, b in zip(names, names[1:])}
    result = {
        "command": "python " + " ".join(sys.argv),
        "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} torch threads",
        **fields,
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
