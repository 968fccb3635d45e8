"""Peer baseline: the same checkpoint exported by Hugging Face optimum-onnx, for `eigenkv bench --peer`.

    python tools/optimum_baseline.py -o engines/optimum-smollm2            # default model
    python tools/optimum_baseline.py -o DIR --model ./my-llama --force

1. In this (the project's) environment: load the model as eigenkv does (GGUF dequantised to
   float32) and save it as a Hugging Face folder (safetensors) in a temporary directory.
   transformers 5 writes RoPE settings as `rope_parameters`, which transformers 4.57 ignores
   (it would silently use rope_theta 10000), so config.json also gets `rope_theta` (and
   `rope_scaling` for non-default RoPE types).
2. Create, if missing, a separate virtual environment (default .venv-optimum in the repo
   root): optimum-onnx 0.1.0 needs transformers < 4.58. torch is installed first, pinned to
   this environment's build (a CPU one stays CPU), and held by a constraints file so nothing
   later swaps it for a CUDA build.
3. `optimum-cli export onnx --task text-generation-with-past` in that environment, offline,
   into DIR (log: DIR/optimum-export.log), plus DIR/peer.json: versions, source model and
   hash, the command, task, dtype, graph I/O and the checks below.
4. Checks (this environment, ONNX Runtime via eigenkv.engines.peer): prefill logits of the
   graph vs our float32 torch model on a random prompt (max |diff|), chunked vs one-go
   prefill, and greedy tokens through the graph's growing past_key_values vs torch's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tools/_commands.py, however this file is run
from _commands import run_logged  # noqa: E402

import numpy as np
import torch

from eigenkv.errors import EigenError

REPO = Path(__file__).resolve().parent.parent
TASK = "text-generation-with-past"
OPTIMUM_SPEC = "optimum-onnx[onnxruntime]==0.1.0"
TRANSFORMERS_SPEC = "transformers<4.58"
EXTRA_SPECS = ("accelerate",)  # optimum skips its tied-weight deduplication without it
VERSIONED = ("optimum-onnx", "optimum", "transformers", "torch", "onnx", "onnxruntime", "accelerate", "numpy")


def save_hf_folder(model, folder: Path) -> dict:
    """A float32 LlamaForCausalLM-style model -> folder with config.json + model.safetensors.

    Written by hand (state dict + config dict), since a GGUF-loaded model refuses
    save_pretrained. Returns the keys patched into config.json for transformers 4.57.
    """
    from safetensors.torch import save_file
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["architectures"] = [type(model).__name__]
    config["dtype"] = config["torch_dtype"] = "float32"
    patch = {}
    rope = config.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" in rope:
        patch["rope_theta"] = float(rope["rope_theta"])
        rope_type = rope.get("rope_type", "default")
        patch["rope_scaling"] = None if rope_type == "default" else {
            k: v for k, v in rope.items() if k != "rope_theta"}
    config.update(patch)
    state = {k: v.detach().to(torch.float32).contiguous() for k, v in model.state_dict().items()}
    if config.get("tie_word_embeddings") and "lm_head.weight" in state:
        del state["lm_head.weight"]  # tied: stored once, as the embedding
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config, indent=2, default=str) + "\n")
    return patch


def _run(cmd: list[str], log: Path | None = None, env: dict | None = None) -> str:
    """Run cmd; its output goes to `log` (or is returned). A failure is one line (EigenError)."""
    return run_logged(cmd, env, log, EigenError)


def _clean_env() -> dict:
    """This environment minus the project venv; offline for the Hugging Face hub."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1")
    return env


def ensure_venv(venv: Path, torch_spec: str, torch_index: str | None) -> dict:
    """Create/complete the optimum venv; returns its package versions."""
    python = venv / "bin" / "python"
    marker = venv / "eigenkv-optimum.json"
    specs = {"torch": torch_spec, "optimum": OPTIMUM_SPEC, "transformers": TRANSFORMERS_SPEC,
             "extra": list(EXTRA_SPECS)}
    try:
        ready = json.loads(marker.read_text()).get("specs") == specs
    except (OSError, ValueError, AttributeError):
        ready = False
    if not ready:
        if not python.exists():
            print(f"creating {venv}", flush=True)
            _run([sys.executable, "-m", "venv", str(venv)])
        pip = [str(python), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
        print(f"installing {torch_spec} into {venv}", flush=True)
        _run(pip + ([torch_spec] if torch_index is None else ["--index-url", torch_index, torch_spec]),
             env=_clean_env())
        torch_version = _versions(python, ("torch",))["torch"]
        constraints = venv / "constraints.txt"
        constraints.write_text(f"torch=={torch_version}\n")  # later installs must keep this torch
        print(f"installing {OPTIMUM_SPEC}, {TRANSFORMERS_SPEC}, {', '.join(EXTRA_SPECS)}", flush=True)
        _run(pip + ["-c", str(constraints), OPTIMUM_SPEC, TRANSFORMERS_SPEC, *EXTRA_SPECS], env=_clean_env())
        marker.write_text(json.dumps({"specs": specs}) + "\n")
    versions = _versions(python, VERSIONED)
    cuda = _run([str(python), "-c", "import torch; print(torch.version.cuda)"], env=_clean_env()).strip()
    if cuda != "None":
        raise EigenError(f"{venv} has a CUDA torch ({versions['torch']}, CUDA {cuda}); delete {venv} and "
                         f"pass --torch-spec/--torch-index for a CPU build")
    return versions


def _versions(python: Path, packages) -> dict:
    code = ("import importlib.metadata as m, json; print(json.dumps({p: m.version(p) for p in "
            f"{list(packages)!r}}}))")
    return json.loads(_run([str(python), "-c", code], env=_clean_env()).strip().splitlines()[-1])


@torch.no_grad()
def check(model, peer, prompt_len: int, steps: int, seed: int) -> dict:
    """Graph (ORT) vs torch float32: prefill logits, chunked prefill, greedy tokens."""
    from eigenkv.engines.runtime import greedy, prefill
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, peer.vocab_size, size=(1, prompt_len), dtype=np.int64)
    ref = model(torch.from_numpy(ids)).logits.float().numpy()  # [1, S, V]
    positions = np.arange(prompt_len)[None]
    logits = peer.step(peer.new_cache(1), ids, positions)
    chunked = prefill(peer, peer.new_cache(1), ids, np.array([prompt_len]), chunk=max(1, prompt_len // 4))
    out = model(torch.from_numpy(ids), use_cache=True)
    tokens, cache = [], out.past_key_values
    for _ in range(steps):
        tokens.append(int(out.logits[0, -1].argmax()))
        out = model(torch.tensor([[tokens[-1]]]), past_key_values=cache, use_cache=True)
        cache = out.past_key_values
    graph_tokens = greedy(peer, ids, steps).tolist()[0]
    return {"prompt_tokens": prompt_len, "seed": seed,
            "prefill_max_abs_logit_diff": float(np.abs(logits - ref).max()),
            "torch_logit_abs_max": float(np.abs(ref).max()),
            "chunked_prefill_max_abs_logit_diff": float(np.abs(chunked - logits[:, -1]).max()),
            "greedy_steps": steps, "greedy_tokens_equal": graph_tokens == tokens,
            "greedy_tokens_torch": tokens, "greedy_tokens_graph": graph_tokens}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-o", "--output", required=True, type=Path, metavar="DIR", help="directory for model.onnx")
    p.add_argument("--model", metavar="PATH", help="HF directory or .gguf (default: the embedded SmolLM2)")
    p.add_argument("--venv", type=Path, default=REPO / ".venv-optimum", help="optimum environment (default %(default)s)")
    p.add_argument("--torch-spec", default=f"torch=={torch.__version__}",
                   help="torch for the venv, installed first (default: this env's build, %(default)s)")
    p.add_argument("--torch-index", metavar="URL", help="pip index for torch, e.g. the PyTorch CPU wheel index")
    p.add_argument("--check-tokens", type=int, default=64, metavar="S", help="prompt length of the checks")
    p.add_argument("--check-steps", type=int, default=16, metavar="N", help="greedy steps compared")
    p.add_argument("--force", action="store_true", help="replace DIR")
    args = p.parse_args(argv)
    try:
        run(args, sys.argv[1:] if argv is None else argv)
    except EigenError as e:
        print(f"optimum_baseline: error: {e}", file=sys.stderr)
        return 2
    return 0


def run(args, argv: list[str]) -> None:
    import onnxruntime
    import transformers

    from eigenkv.engines.peer import PeerEngine
    from eigenkv.exporter.sources import load_model, model_hash, resolve_model
    out = args.output.resolve()
    if out.exists() and not args.force:
        raise EigenError(f"{out} exists; pass --force to replace it")
    if args.check_tokens < 2 or args.check_steps < 1:
        raise EigenError("--check-tokens must be >= 2 and --check-steps >= 1")
    source = resolve_model(args.model)
    versions = ensure_venv(args.venv.resolve(), args.torch_spec, args.torch_index)
    print(f"loading {source.label}", flush=True)
    model, _ = load_model(source, torch.float32, progress=False)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        patch = save_hf_folder(model, work / "hf")
        cmd = [str(args.venv.resolve() / "bin" / "optimum-cli"), "export", "onnx", "--model", str(work / "hf"),
               "--task", TASK, "--dtype", "fp32", "--device", "cpu", str(work / "onnx")]
        print(f"exporting with optimum-onnx {versions['optimum-onnx']} (transformers {versions['transformers']})",
              flush=True)
        t0 = time.perf_counter()
        log = out.parent / f"{out.name}.optimum-export.log"  # kept there if the export fails
        _run(cmd, log=log, env=_clean_env())
        export_s = time.perf_counter() - t0
        shutil.move(str(log), work / "onnx" / "optimum-export.log")
        peer = PeerEngine(work / "onnx")
        validation = check(model, peer, args.check_tokens, args.check_steps, seed=0)
        if not validation["greedy_tokens_equal"]:
            raise EigenError(f"greedy tokens differ: torch {validation['greedy_tokens_torch']} vs graph "
                             f"{validation['greedy_tokens_graph']}; nothing written")
        info = {
            "kind": "optimum-onnx peer baseline (ONNX Runtime, KV cache grown by concatenation)",
            "task": TASK, "dtype": "fp32", "model_file": "model.onnx",
            "source_model": source.label, "source_hash": model_hash(source),
            "config_patch_for_transformers_4_57": patch,
            "command": [Path(cmd[0]).name, *cmd[1:4], "HF_FOLDER", *cmd[5:-1], "DIR"],
            "tool": "python tools/optimum_baseline.py " + " ".join(argv),
            "optimum_env": versions,
            "project_env": {"transformers": transformers.__version__, "torch": torch.__version__,
                            "onnxruntime": onnxruntime.__version__},
            "io": {"inputs": [i.name for i in peer.session.get_inputs()],
                   "outputs": [o.name for o in peer.session.get_outputs()],
                   "n_layers": peer.n_layers, "n_kv_heads": peer.n_kv_heads, "head_dim": peer.head_dim,
                   "vocab_size": peer.vocab_size},
            "export_seconds": round(export_s, 1), "validation": validation}
        del peer
        (work / "onnx" / "peer.json").write_text(json.dumps(info, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(work / "onnx", out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    v = validation
    print(f"wrote {out} ({', '.join(sorted(f.name for f in out.iterdir()))})")
    print(f"prefill max |logit diff| vs torch fp32: {v['prefill_max_abs_logit_diff']:.2e} "
          f"(logits up to {v['torch_logit_abs_max']:.1f}); chunked vs one-go prefill: "
          f"{v['chunked_prefill_max_abs_logit_diff']:.2e}")
    print(f"{v['greedy_steps']} greedy tokens through the graph's past_key_values: identical to torch "
          f"({v['greedy_tokens_graph'][:8]}...)")


if __name__ == "__main__":
    sys.exit(main())
