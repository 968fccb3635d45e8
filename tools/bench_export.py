"""Benchmark: `export-eigen` of one model end to end — stage times, peak memory, file sizes.

    python tools/bench_export.py --out-dir /tmp/bench-export --json docs/results/bench_export.json

Stages come from the manifest, `model.eigen.json` beside the graph (its `report`: compress =
load + calibrate + fold + perplexity; export = trace + save + check; validate = ONNX Runtime
vs torch). Files are written to --out-dir, never into the repository.
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
from eigenkv.exporter.export import ExportConfig, export
from eigenkv.exporter.pipeline import CompressConfig, DEFAULT_CALIB_SEQ_LEN, calibration_shape


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="HF directory or .gguf (default: the embedded SmolLM2)")
    ap.add_argument("--kv-ratio", type=float, default=0.5)
    ap.add_argument("--dtype", default="fp32", choices=("fp32", "fp16"))
    ap.add_argument("--calib-text", default="wiki", metavar="FILE|NAME", help="calibration text (default wiki)")
    ap.add_argument("--calib-samples", type=int, default=None,
                    help="default: 32768 tokens' worth of --calib-seq-len (as `eigenkv compress`)")
    ap.add_argument("--calib-seq-len", type=int, default=DEFAULT_CALIB_SEQ_LEN)
    ap.add_argument("--eval-texts", default="wiki,c4", help="comma-separated built-in names or files (default wiki,c4)")
    ap.add_argument("--eval-tokens", type=int, default=8192, help="tokens of each eval text, 0 skips perplexity")
    ap.add_argument("--eval-window", type=int, default=1024)
    ap.add_argument("--decode-steps", type=int, default=32, help="greedy steps of the validation (default 32)")
    ap.add_argument("--max-seq-len", type=int, default=None)
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--out-dir", default="/tmp/eigenkv-bench-export")
    ap.add_argument("--json", default="docs/results/bench_export.json")
    args = ap.parse_args()
    args.calib_samples = calibration_shape(args.calib_seq_len, args.calib_samples, args.calib_seq_len)[1]
    out = Path(args.out_dir) / "model.onnx"
    out.parent.mkdir(parents=True, exist_ok=True)
    compress = CompressConfig(model=args.model, kv_ratio=args.kv_ratio, calib_text=args.calib_text,
                              calib_samples=args.calib_samples, calib_seq_len=args.calib_seq_len,
                              eval_texts=tuple(args.eval_texts.split(",")), eval_tokens=args.eval_tokens,
                              eval_window=args.eval_window, progress=not args.no_progress)
    config = ExportConfig(output=out, force=True, dtype=args.dtype, max_seq_len=args.max_seq_len,
                          decode_steps=args.decode_steps, compress=compress)
    t0 = time.perf_counter()
    try:
        manifest = export(config)
    except EigenError as e:
        print(f"bench_export: error: {e}", file=sys.stderr)
        return 2
    total = time.perf_counter() - t0
    report = manifest.report
    sizes = {p.name: p.stat().st_size for p in (out, out.parent / manifest.files.data)}
    result = {
        "command": "python " + " ".join(sys.argv),
        "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} torch threads",
        "model": manifest.source.label, "kv_ratio": args.kv_ratio, "dtype": args.dtype,
        "eval_tokens_per_text": args.eval_tokens,
        "seconds": report["seconds"], "seconds_total": round(total, 1),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "file_bytes": sizes, "kv_bytes_per_token": manifest.to_json()["kv_bytes_per_token"],
        "validation": report["validation"], "perplexity": report["perplexity"],
    }
    print("| stage | seconds |\n|---|---|")
    for k, v in report["seconds"].items():
        print(f"| {k} | {v} |")
    print(f"| total | {result['seconds_total']} |")
    print(f"peak RSS {result['peak_rss_mib']} MiB; files: " + ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in sizes.items()))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
