"""Peer baseline: the same checkpoint built by ONNX Runtime GenAI's own model builder (fp32 or int4, CPU), run by ORT-GenAI.

    python tools/ortgenai_peer.py -o out/ortgenai-smollm2             # default model
    python tools/ortgenai_peer.py -o DIR --model ./my-llama --force
    python tools/ortgenai_peer.py -o out/ortgenai-smollm2-pruned --prune-lm-head   # batch-8 4k benches
    python tools/ortgenai_peer.py -o out/ortgenai-smollm2-int4 --precision int4 --prune-lm-head

onnxruntime-genai 0.18.0 needs onnxruntime >= 1.31 and nothing the project lacks, so it lives
in the project's environment (`pip install onnxruntime-genai==0.18.0`; pip keeps the installed
onnxruntime) and its runtime runs in-process (eigenkv.engines.peer_ortgenai), next to our engines.

1. Load the model as eigenkv does (a GGUF is de-quantized by transformers to float32) and save
   it with its tokenizer as a Hugging Face folder (safetensors) in a temporary directory: the
   builder reads only float16/float32 GGUF files, and takes its config from the hub for them.
2. `python -m onnxruntime_genai.models.builder -i HF_FOLDER -o DIR -p fp32|int4 -e cpu`, offline
   (log: DIR/builder.log), plus DIR/peer.json: kind, version, source model and hash, the builder
   command, versions and the checks below.
3. Checks (ORT-GenAI's runtime via eigenkv.engines.peer_ortgenai vs our float32 torch model, the
   reference): for each text prompt (batch 1) and one batch of two random-token prompts
   (ORT-GenAI's batch decode loop), the prefill logits (max |diff|, stated) and the greedy
   tokens, which must be identical for fp32 (otherwise nothing is written); an int4 build's
   agreement is reported, not required (its weights are rounded, as llama.cpp's Q4_1 file is)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from eigenkv.errors import EigenError

PROMPTS = ("The capital of France is", "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
           "Once upon a time, in a small village at the edge of a great forest, there lived")
BUILDER = "onnxruntime_genai.models.builder"


def save_hf_folder(model, tokenizer, generation_config, folder: Path) -> None:
    """A float32 CausalLM (GGUF-loaded ones refuse save_pretrained) -> folder with config.json,
    model.safetensors, generation_config.json and the tokenizer files."""
    import torch
    from safetensors.torch import save_file
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["architectures"] = [type(model).__name__]
    config["dtype"] = config["torch_dtype"] = "float32"
    state = {k: v.detach().to(torch.float32).contiguous() for k, v in model.state_dict().items()}
    if config.get("tie_word_embeddings") and "lm_head.weight" in state:
        del state["lm_head.weight"]  # tied: stored once, as the embedding
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config, indent=2, default=str) + "\n")
    generation_config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def _env() -> dict:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1")
    return env


def build(hf: Path, out: Path, log: Path, prune_lm_head: bool = False, precision: str = "fp32") -> list[str]:
    """Run ORT-GenAI's model builder (`precision` fp32 or int4, CPU) on the HF folder -> out; its output goes to `log`.
    prune_lm_head: the builder's extra option that computes only the last position's logits in
    prefill (a batch-8 4k prefill otherwise returns 6.4 GB of logits). Returns the command; a
    failure is a one-line EigenError."""
    cmd = [sys.executable, "-m", BUILDER, "-i", str(hf), "-o", str(out), "-p", precision, "-e", "cpu",
           "-c", str(hf.parent / "builder-cache")]
    if prune_lm_head:
        cmd += ["--extra_options", "prune_lm_head=true"]
    with open(log, "w") as fh:
        code = subprocess.call(cmd, stdout=fh, stderr=subprocess.STDOUT, env=_env(), cwd=hf.parent)
    if code != 0:
        lines = [ln for ln in log.read_text(errors="replace").strip().splitlines() if ln.strip()]
        raise EigenError(f"the ORT-GenAI model builder failed (exit {code}): {(lines or ['no output'])[-1][:200]} "
                         f"(full output: {log})")
    return cmd


def _torch_greedy(model, ids: np.ndarray, steps: int) -> tuple[np.ndarray, list[list[int]]]:
    """HF model, no cache (the whole sequence every step): prompts [B, S] -> (prefill logits
    [B, S, V], greedy tokens [B][steps])."""
    import torch
    seq = torch.from_numpy(ids)
    with torch.no_grad():
        logits = model(seq).logits.float()
        prefill = logits.numpy()
        for step in range(steps):
            seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], 1)
            if step < steps - 1:
                logits = model(seq).logits
    return prefill, seq[:, ids.shape[1]:].tolist()


def check(model, tokenizer, engine, steps: int, seed: int = 0) -> dict:
    """ORT-GenAI vs torch float32: prefill logits and greedy tokens, per case (see the module doc)."""
    from eigenkv.engines.runtime import greedy
    cases = [("text", np.array([tokenizer(p, add_special_tokens=False)["input_ids"]], dtype=np.int64))
             for p in PROMPTS]
    rng = np.random.default_rng(seed)
    cases.append(("random-batch2", rng.integers(0, engine.vocab_size - 1, size=(2, 32), dtype=np.int64)))
    results = []
    for kind, ids in cases:
        ref, ref_tokens = _torch_greedy(model, ids, steps)
        batch, seq = ids.shape
        logits = engine.step(engine.new_cache(batch, seq), ids, np.broadcast_to(np.arange(seq), ids.shape))
        if engine.last_logits_only:  # a pruned LM head: the last position's logits only
            ref = ref[:, -1:]
        tokens = greedy(engine, ids, steps).tolist()
        results.append({"case": kind, "batch": batch, "prompt_tokens": seq,
                        "prefill_positions_compared": int(logits.shape[1]),
                        "prefill_max_abs_logit_diff": float(np.abs(logits - ref).max()),
                        "torch_logit_abs_max": float(np.abs(ref).max()),
                        "greedy_tokens_equal": tokens == ref_tokens,
                        "greedy_tokens_torch": ref_tokens, "greedy_tokens_ortgenai": tokens})
    return {"greedy_steps": steps, "seed": seed, "cases": results,
            "greedy_tokens_equal": all(r["greedy_tokens_equal"] for r in results),
            "prefill_max_abs_logit_diff": max(r["prefill_max_abs_logit_diff"] for r in results)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-o", "--output", required=True, type=Path, metavar="DIR", help="folder for the ORT-GenAI model")
    p.add_argument("--model", metavar="PATH", help="HF directory or .gguf (default: the embedded SmolLM2)")
    p.add_argument("--check-steps", type=int, default=16, metavar="N", help="greedy tokens compared (default 16)")
    p.add_argument("--threads", type=int, default=0, metavar="N",
                   help="intra-op threads of the checks (default 0: ONNX Runtime's default)")
    p.add_argument("--prune-lm-head", action="store_true",
                   help="build with the builder's prune_lm_head (prefill computes the last position's "
                        "logits only; what a batch-8 4k bench needs to fit in memory)")
    p.add_argument("--precision", choices=("fp32", "int4"), default="fp32",
                   help="the builder's weight precision: fp32 (default; greedy tokens must equal torch's) or "
                        "int4 (its CPU default: block-wise 4-bit MatMulNBits; agreement reported)")
    p.add_argument("--force", action="store_true", help="replace DIR")
    args = p.parse_args(argv)
    try:
        run(args, sys.argv[1:] if argv is None else argv)
    except EigenError as e:
        print(f"ortgenai_peer: error: {e}", file=sys.stderr)
        return 2
    return 0


def run(args, argv: list[str]) -> None:
    import onnxruntime
    import torch
    import transformers

    from eigenkv.engines.peer_ortgenai import NAME, import_genai
    from eigenkv.engines.peer_ortgenai import load as load_peer
    from eigenkv.exporter.sources import load_generation_config, load_model, model_hash, resolve_model
    og = import_genai()  # before anything slow: say how to install it
    out = args.output.resolve()
    if out.exists() and not args.force:
        raise EigenError(f"{out} exists; pass --force to replace it")
    if args.check_steps < 1:
        raise EigenError("--check-steps must be >= 1")
    source = resolve_model(args.model)
    print(f"loading {source.label}", flush=True)
    model, tokenizer = load_model(source, torch.float32, progress=False)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        save_hf_folder(model, tokenizer, load_generation_config(source), work / "hf")
        print(f"building with onnxruntime-genai {og.__version__}'s model builder ({args.precision}, cpu)", flush=True)
        t0 = time.perf_counter()
        log = out.parent / f"{out.name}.builder.log"  # kept there if the build fails
        cmd = build(work / "hf", work / "genai", log, args.prune_lm_head, args.precision)
        build_s = time.perf_counter() - t0
        shutil.move(str(log), work / "genai" / "builder.log")
        engine = load_peer(work / "genai", args.threads)
        validation = check(model, tokenizer, engine, args.check_steps)
        if args.precision == "fp32" and not validation["greedy_tokens_equal"]:
            bad = next(c for c in validation["cases"] if not c["greedy_tokens_equal"])
            raise EigenError(f"greedy tokens differ ({bad['case']}): torch {bad['greedy_tokens_torch']} vs "
                             f"ORT-GenAI {bad['greedy_tokens_ortgenai']}; nothing written")
        layout = engine.layout
        info = {
            "kind": NAME, "version": og.__version__, "dtype": args.precision, "execution_provider": "cpu",
            "source_model": source.label, "source_hash": model_hash(source),
            "command": ["python", *cmd[1:4], "HF_FOLDER", "-o", "DIR", *cmd[7:11], "-c", "CACHE_DIR", *cmd[13:]],
            "prune_lm_head": bool(args.prune_lm_head),
            "tool": "python tools/ortgenai_peer.py " + " ".join(argv),
            "env": {"onnxruntime-genai": og.__version__, "onnxruntime": onnxruntime.__version__,
                    "transformers": transformers.__version__, "torch": torch.__version__},
            "io": {"n_layers": layout.n_layers, "n_kv_heads": layout.n_kv_heads, "head_dim": layout.head_dim,
                   "vocab_size": engine.vocab_size, "context_length": engine.max_positions},
            "build_seconds": round(build_s, 1), "validation": validation}
        del engine
        (work / "genai" / "peer.json").write_text(json.dumps(info, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(work / "genai", out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {out} ({', '.join(sorted(f.name for f in out.iterdir()))})")
    for c in validation["cases"]:
        print(f"{c['case']} (batch {c['batch']}, {c['prompt_tokens']} tokens): prefill max |logit diff| vs torch fp32 "
              f"{c['prefill_max_abs_logit_diff']:.2e} (logits up to {c['torch_logit_abs_max']:.1f}); "
              f"{validation['greedy_steps']} greedy tokens "
              + ("identical" if c["greedy_tokens_equal"] else "NOT identical (rounded weights)")
              + (" (last position: pruned LM head)" if c["prefill_positions_compared"] == 1 else ""))


if __name__ == "__main__":
    sys.exit(main())
