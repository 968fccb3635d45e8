"""Peer baseline: llama.cpp (llama-cpp-python) on the same checkpoint, for `eigenkv bench --peer`.

    python tools/llamacpp_peer.py -o out/llamacpp-smollm2          # default model (Q4_1 GGUF)
    python tools/llamacpp_peer.py -o DIR --model my-model.gguf --force
    python tools/llamacpp_peer.py --install-only                     # just llama-cpp-python

1. llama-cpp-python goes into the environment that runs this tool (a virtual environment;
   run the tool with another venv's python to put it there), because the peer engine
   (engines/peer_llamacpp.py) runs llama.cpp in the bench's own process. It is a tool, never
   a dependency of eigenkv. It is built once from its PyPI sdist with CPU-only flags
   (CMAKE_ARGS, printed at the end: no CUDA/HIP/Vulkan/Metal/SYCL, -march=native so the wheel
   fits this machine's CPU only, OpenMP, no BLAS, no multimodal library); the wheel,
   build.log and build.json (flags, seconds) stay in <venv>/llamacpp-build/ and are reused.
   It is installed with every package already in the environment pinned to its current
   version (a constraints file), so nothing is upgraded or downgraded; its own dependencies
   (numpy, typing-extensions, jinja2, diskcache) add only what is missing (here: diskcache).
2. The f32 GGUF (DIR/model-f32.gguf): every tensor of the source GGUF de-quantized with the
   `gguf` package's `dequantize` (the function transformers uses to load a GGUF, so these are
   exactly the float32 weights our fp32 engines are exported from; checked: transformers loads
   both files to identical tensors), written with GGUFWriter in the same layout, metadata
   copied, general.file_type = ALL_F32.
3. DIR/<source file name>: a symbolic link to the source GGUF (--copy: a copy), the quantized peer.
4. Checks, in-process: greedy tokens (--check-steps, 3 prompts, one at a time and as one
   batch of equal-length prompts) and prefill logits of both files in llama.cpp vs transformers
   (float32, de-quantized weights). The f32 file (run with an F32 KV cache, flash attention
   off: see engines/peer_llamacpp.py) must give identical greedy tokens, else nothing is
   written; the quantized file's agreement is reported (llama.cpp's defaults there: F16 KV
   cache, flash attention auto, and activations quantized to 8 bits for the Q4_1/Q8_0
   matmuls, so it is expected to differ).
5. DIR/peer.json: kind "llama.cpp", llama_cpp_python version, build flags and llama.cpp's
   system info, source model and hash, the files, the checks.
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

REPO = Path(__file__).resolve().parent.parent
LLAMA_CPP_VERSION = "0.3.36"
LLAMA_CPP_SPEC = f"llama-cpp-python=={LLAMA_CPP_VERSION}"
CMAKE_ARGS = ("-DGGML_CUDA=OFF -DGGML_HIP=OFF -DGGML_VULKAN=OFF -DGGML_METAL=OFF -DGGML_SYCL=OFF "
              "-DGGML_NATIVE=ON -DGGML_OPENMP=ON -DGGML_BLAS=OFF -DLLAVA_BUILD=OFF")
F32_FILE = "model-f32.gguf"
PROMPTS = ("The capital of France is Paris, and the capital of Germany is",
           "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
           "Once upon a time, in a small village by the sea, there lived an old fisherman who")


class PeerError(Exception):
    """A one-line failure of this tool (the CLI prints it and exits 2)."""


# ---- installing llama-cpp-python --------------------------------------------------------------

def _run(cmd: list[str], env: dict | None = None, log: Path | None = None) -> str:
    """Run cmd; return its output (also written to `log`). A failure is one line (PeerError)."""
    return run_logged(cmd, env, log, PeerError, shown=5)


def _installed() -> dict[str, str]:
    """Every distribution in this environment: normalized name -> version."""
    from importlib.metadata import distributions
    out = {}
    for d in distributions():
        name = (d.metadata["Name"] or "").lower().replace("_", "-").replace(".", "-")
        if name:
            out[name] = d.version
    return out


def build_wheel(wheel_dir: Path, force: bool) -> dict:
    """The CPU wheel of LLAMA_CPP_SPEC in wheel_dir (built unless build.json says it is there
    with these flags) -> build.json's content."""
    record = wheel_dir / "build.json"
    try:
        info = json.loads(record.read_text())
        wheel = wheel_dir / info["wheel"]
        same = info.get("spec") == LLAMA_CPP_SPEC and info.get("cmake_args") == CMAKE_ARGS
        if same and not force and wheel.is_file():
            return info
    except (OSError, ValueError, KeyError, TypeError):
        pass
    wheel_dir.mkdir(parents=True, exist_ok=True)
    for old in wheel_dir.glob("llama_cpp_python-*.whl"):
        old.unlink()
    env = dict(os.environ, CMAKE_ARGS=CMAKE_ARGS, FORCE_CMAKE="1",
               CMAKE_BUILD_PARALLEL_LEVEL=str(os.cpu_count() or 1))
    cmd = [sys.executable, "-m", "pip", "wheel", "--disable-pip-version-check", "--no-deps", "--no-cache-dir",
           "--no-binary", "llama-cpp-python", "-w", str(wheel_dir), "-v", LLAMA_CPP_SPEC]
    print(f"building {LLAMA_CPP_SPEC} from source (CPU only; about 10 minutes on 2 cores; log: "
          f"{wheel_dir / 'build.log'})", flush=True)
    t0 = time.perf_counter()
    _run(cmd, env=env, log=wheel_dir / "build.log")
    seconds = time.perf_counter() - t0
    wheels = sorted(wheel_dir.glob("llama_cpp_python-*.whl"))
    if not wheels:
        raise PeerError(f"pip built no wheel in {wheel_dir} (see {wheel_dir / 'build.log'})")
    info = {"spec": LLAMA_CPP_SPEC, "wheel": wheels[-1].name, "cmake_args": CMAKE_ARGS,
            "env": {"FORCE_CMAKE": "1", "CMAKE_BUILD_PARALLEL_LEVEL": env["CMAKE_BUILD_PARALLEL_LEVEL"]},
            "command": " ".join(["python", *cmd[1:]]), "build_seconds": round(seconds, 1)}
    record.write_text(json.dumps(info, indent=2) + "\n")
    return info


def ensure_llama_cpp(rebuild: bool) -> dict:
    """llama-cpp-python LLAMA_CPP_VERSION importable in this interpreter (built and installed if
    not) -> {"version", "build" (build.json or None), "installed_now", "added"}."""
    import importlib
    wheel_dir = Path(sys.prefix) / "llamacpp-build"
    before = _installed()
    build = None
    if (wheel_dir / "build.json").is_file():
        try:
            build = json.loads((wheel_dir / "build.json").read_text())
        except ValueError:
            build = None
    record = wheel_dir / "installed.json"  # what the install added, kept for later runs' peer.json
    if before.get("llama-cpp-python") == LLAMA_CPP_VERSION and not rebuild:
        try:
            added = json.loads(record.read_text()).get("added")
        except (OSError, ValueError, AttributeError):
            added = None
        return {"version": LLAMA_CPP_VERSION, "build": build, "installed_now": False, "added": added}
    if sys.prefix == sys.base_prefix:
        raise PeerError(f"{sys.executable} is not a virtual environment's python: run this tool with the venv that "
                        "should get llama-cpp-python (the project's, for `eigenkv bench --peer`)")
    build = build_wheel(wheel_dir, rebuild)
    constraints = wheel_dir / "constraints.txt"  # everything here stays at its version
    constraints.write_text("".join(f"{n}=={v}\n" for n, v in sorted(before.items()) if n != "llama-cpp-python"))
    print(f"installing {build['wheel']} into {sys.prefix}", flush=True)
    _run([sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "-q", "--force-reinstall",
          "--no-deps", str(wheel_dir / build["wheel"])])
    _run([sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "-q", "-c", str(constraints),
          str(wheel_dir / build["wheel"])], log=wheel_dir / "install.log")  # its missing dependencies
    after = _installed()
    changed = {n: [v, after.get(n)] for n, v in before.items() if n != "llama-cpp-python" and after.get(n) != v}
    if changed:
        raise PeerError(f"installing llama-cpp-python changed {changed}; restore them")
    importlib.invalidate_caches()
    added = {n: v for n, v in after.items() if n not in before or n == "llama-cpp-python"}
    record.write_text(json.dumps({"installed_into": sys.prefix, "added": added,
                                  "constraints": constraints.name}, indent=2) + "\n")
    print(f"added {', '.join(f'{n} {v}' for n, v in added.items())}; nothing else changed", flush=True)
    return {"version": after.get("llama-cpp-python"), "build": build, "installed_now": True, "added": added}


# ---- the f32 GGUF -----------------------------------------------------------------------------

def write_f32_gguf(src: Path, dst: Path) -> dict:
    """Every tensor of `src` de-quantized to float32 (gguf.dequantize) -> `dst`, metadata copied
    (general.file_type = ALL_F32). Returns {tensors by source type, bytes}."""
    import gguf
    import numpy as np
    reader = gguf.GGUFReader(src)
    if reader.byte_order != "I":
        raise PeerError(f"{src} is a byte-swapped (big-endian) GGUF; this tool reads native-order files only")
    arch = reader.get_field(gguf.Keys.General.ARCHITECTURE).contents()
    writer = gguf.GGUFWriter(dst, arch)
    alignment = reader.get_field(gguf.Keys.General.ALIGNMENT)
    if alignment is not None:
        writer.data_alignment = alignment.contents()
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue  # written by GGUFWriter itself
        value = field.contents()
        if field.name == gguf.Keys.General.FILE_TYPE:
            value = int(gguf.LlamaFileType.ALL_F32)
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, value, kind, sub_type=sub)
    types: dict[str, int] = {}
    for t in reader.tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
        data = np.ascontiguousarray(gguf.dequantize(t.data, t.tensor_type), dtype=np.float32)
        shape = tuple(int(d) for d in reversed(t.shape))  # GGUF lists dims fastest first
        writer.add_tensor(t.name, data.reshape(shape))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"source_tensor_types": types, "bytes": dst.stat().st_size}


# ---- checks (this environment: transformers + llama_cpp) ---------------------------------------

def _torch_greedy(model, ids: list[int], steps: int) -> tuple[list[int], "object"]:
    """(greedy tokens, prefill logits [S, V] float32) of one prompt through transformers, each
    token from a full forward pass over the sequence so far (no cache: the plain reference)."""
    import torch
    seq, tokens, first = list(ids), [], None
    with torch.no_grad():
        for _ in range(steps):
            logits = model(torch.tensor([seq]), use_cache=False).logits[0].float()
            first = logits.numpy() if first is None else first
            tokens.append(int(logits[-1].argmax()))
            seq.append(tokens[-1])
    return tokens, first


def check_engine(engine, model, prompts: list[list[int]], steps: int) -> dict:
    """llama.cpp (engine) vs transformers (model): per prompt, greedy tokens and prefill logits;
    then all prompts cut to the shortest as one batch (greedy tokens)."""
    import numpy as np

    from eigenkv.engines.runtime import greedy
    rows, equal = [], True
    for ids in prompts:
        ref_tokens, ref_logits = _torch_greedy(model, ids, steps)
        cache = engine.new_cache(1, len(ids) + steps + 1)
        logits = engine.step(cache, np.array([ids]), np.arange(len(ids))[None])[0]
        tokens = greedy(engine, np.array([ids]), steps).tolist()[0]
        diff = np.abs(logits - ref_logits)
        rows.append({"prompt_tokens": len(ids), "greedy_equal": tokens == ref_tokens,
                     "first_difference": next((i for i, (a, b) in enumerate(zip(tokens, ref_tokens)) if a != b), None),
                     "tokens_llama_cpp": tokens, "tokens_transformers": ref_tokens,
                     "prefill_max_abs_logit_diff": float(diff.max()),
                     "prefill_mean_abs_logit_diff": float(diff.mean()),
                     "prefill_argmax_agreement": float((logits.argmax(-1) == ref_logits.argmax(-1)).mean())})
        equal &= tokens == ref_tokens
    short = min(len(p) for p in prompts)
    batch = np.array([p[:short] for p in prompts])
    got = greedy(engine, batch, steps).tolist()
    want = [_torch_greedy(model, list(row), steps)[0] for row in batch.tolist()]
    return {"greedy_steps": steps, "all_greedy_equal": bool(equal and got == want), "prompts": rows,
            "batch": {"batch": len(prompts), "prompt_tokens": short, "greedy_equal": got == want,
                      "tokens_llama_cpp": got, "tokens_transformers": want}}


def same_weights(a, b) -> dict:
    """Two transformers models' state dicts: identical tensors?"""
    import torch
    sa, sb = a.state_dict(), b.state_dict()
    if sa.keys() != sb.keys():
        return {"identical": False, "why": "different tensor names"}
    worst = max(float((sa[k].float() - sb[k].float()).abs().max()) for k in sa)
    return {"identical": all(torch.equal(sa[k], sb[k]) for k in sa), "tensors": len(sa), "max_abs_diff": worst}


# ---- the command --------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[2:]) + f"\n\nCMAKE_ARGS: {CMAKE_ARGS}")
    p.add_argument("-o", "--output", type=Path, metavar="DIR",
                   help="folder for model-f32.gguf, the source link, peer.json")
    p.add_argument("--model", metavar="PATH", help="source .gguf (default: the embedded SmolLM2, Q4_1)")
    p.add_argument("--copy", action="store_true", help="copy the source GGUF into DIR instead of linking it")
    p.add_argument("--force", action="store_true", help="replace DIR")
    p.add_argument("--install-only", action="store_true", help="install llama-cpp-python here and stop")
    p.add_argument("--rebuild", action="store_true", help="rebuild and reinstall the llama-cpp-python wheel")
    p.add_argument("--check-steps", type=int, default=16, metavar="N",
                   help="greedy tokens compared (default %(default)s)")
    p.add_argument("--threads", type=int, default=2,
                   help="llama.cpp and torch threads for the checks (default %(default)s)")
    args = p.parse_args(argv)
    try:
        if args.output is None and not args.install_only:
            raise PeerError("pass -o DIR (or --install-only)")
        if args.check_steps < 1 or args.threads < 1:
            raise PeerError("--check-steps and --threads must be >= 1")
        install = ensure_llama_cpp(args.rebuild)
        if not args.install_only:
            run(args, install, sys.argv[1:] if argv is None else argv)
    except PeerError as e:
        print(f"llamacpp_peer: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # EigenError from the project, without importing it at module level
        if type(e).__name__ != "EigenError":
            raise
        print(f"llamacpp_peer: error: {e}", file=sys.stderr)
        return 2
    return 0


def run(args, install: dict, argv: list[str]) -> None:
    import torch
    import transformers

    from eigenkv.engines import peer_llamacpp
    from eigenkv.exporter.sources import ModelSource, load_model, load_tokenizer, model_hash, resolve_model
    source = resolve_model(args.model)
    if source.gguf_file is None:
        raise PeerError(f"--model {source.label}: the llama.cpp peer starts from a GGUF file; pass a .gguf")
    out = args.output.resolve()
    if out.exists() and not args.force:
        raise PeerError(f"{out} exists; pass --force to replace it")
    torch.set_num_threads(args.threads)
    src = source.directory / source.gguf_file
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        print(f"de-quantizing {src.name} -> {F32_FILE}", flush=True)
        t0 = time.perf_counter()
        made = write_f32_gguf(src, work / F32_FILE)
        dequant_s = time.perf_counter() - t0
        quant = work / src.name
        if args.copy:
            shutil.copy2(src, quant)
        else:
            quant.symlink_to(src)
        print(f"loading {src.name} and {F32_FILE} in transformers (float32)", flush=True)
        model, _ = load_model(source, torch.float32, progress=False)
        model_f32, _ = load_model(ModelSource(work, F32_FILE), torch.float32, progress=False)
        weights = same_weights(model, model_f32)
        del model_f32
        if not weights["identical"]:
            raise PeerError(f"transformers loads {F32_FILE} to other weights than {src.name} "
                            f"(max |diff| {weights.get('max_abs_diff')}); nothing written")
        tokenizer = load_tokenizer(source)
        prompts = [tokenizer.encode(text) for text in PROMPTS]
        checks, system_info = {}, None
        for name in (F32_FILE, src.name):
            engine = peer_llamacpp.load(work / name, threads=args.threads)
            system_info = engine.system_info()
            print(f"checking {engine.label} (KV {engine.kv_type}, flash attention {engine.flash_attn}) against "
                  "transformers", flush=True)
            checks[name] = dict(check_engine(engine, model, prompts, args.check_steps), label=engine.label,
                                kv_type=engine.kv_type, flash_attn=engine.flash_attn, weights=engine.weights)
            del engine
        f32 = checks[F32_FILE]
        if not f32["all_greedy_equal"]:
            raise PeerError(f"greedy tokens of {F32_FILE} in llama.cpp differ from transformers: "
                            f"{[r['tokens_llama_cpp'] for r in f32['prompts']]} vs "
                            f"{[r['tokens_transformers'] for r in f32['prompts']]}; nothing written")
        info = {
            "kind": peer_llamacpp.NAME,
            "llama_cpp_python": install["version"],
            "build": {**(install["build"] or {"note": "installed without this tool's build record"}),
                      "llama_cpp_system_info": system_info},
            "installed_into": sys.prefix, "added_packages": install["added"],
            "source_model": source.label, "source_hash": model_hash(source),
            "default_file": F32_FILE,
            "files": {
                F32_FILE: {"weights": "f32", "bytes": made["bytes"],
                           "made_by": "gguf.dequantize of every tensor of the source GGUF, GGUFWriter, "
                                      "general.file_type = ALL_F32",
                           "source_tensor_types": made["source_tensor_types"], "seconds": round(dequant_s, 1),
                           "transformers_weights_identical_to_source": weights},
                src.name: {"weights": checks[src.name]["weights"], "bytes": src.stat().st_size,
                           ("copy_of" if args.copy else "link_to"): str(src)}},
            "checks": {"reference": f"transformers {transformers.__version__} (torch {torch.__version__}), float32, "
                                    "eager attention, de-quantized weights of the source GGUF, a full forward pass "
                                    "per greedy token (no cache)",
                       "prompts": list(PROMPTS), "threads": args.threads, **checks},
            "tool": "python tools/llamacpp_peer.py " + " ".join(argv),
        }
        (work / "peer.json").write_text(json.dumps(info, indent=2) + "\n")
        work.chmod(0o755)  # mkdtemp made it private
        if out.exists():
            shutil.rmtree(out)
        os.replace(work, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {out} ({', '.join(sorted(f.name for f in out.iterdir()))})")
    for name, c in checks.items():
        rows = c["prompts"]
        print(f"{c['label']} (KV {c['kv_type']}, flash attention {c['flash_attn']}): greedy {args.check_steps} tokens "
              f"{sum(r['greedy_equal'] for r in rows)}/{len(rows)} prompts identical to transformers, batch of "
              f"{c['batch']['batch']} {'identical' if c['batch']['greedy_equal'] else 'differs'}; prefill max |logit "
              f"diff| {max(r['prefill_max_abs_logit_diff'] for r in rows):.2e}")


if __name__ == "__main__":
    sys.exit(main())
