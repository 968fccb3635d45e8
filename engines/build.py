"""`eigenkv build OUT.onnx -o ENGINE_DIR --backend ort`: an engine directory from an export.

ort: ONNX Runtime optimises the graph once (extended level: portable fusions) and saves it
with its weights; `config.json` records the KV layout from `eigen.json`, the I/O names, the
onnxruntime version and the session options that run it. trt: TensorRT is not installable
on these machines; the backend is refused with a one-line reason until it lands.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from eigenkv.engines.config import BACKENDS, ENGINE_SCHEMA, EngineConfig, KVLayout
from eigenkv.errors import EigenError

MODEL_FILE = "model.onnx"
SESSION_OPTIONS = {"graph_optimization_level": "ORT_ENABLE_ALL", "intra_op_num_threads": 0}


def read_manifest(onnx_path: Path) -> dict:
    """eigen.json beside the graph, checked to describe this very graph file."""
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise EigenError(f"{onnx_path}: no such ONNX file (export one with `export-eigen`)")
    manifest_path = onnx_path.parent / "eigen.json"
    if not manifest_path.is_file():
        raise EigenError(f"no eigen.json beside {onnx_path}: engines are built from `export-eigen` output")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as e:
        raise EigenError(f"{manifest_path} is corrupt ({e})") from None
    if manifest.get("files", {}).get("graph") != onnx_path.name:
        raise EigenError(f"{manifest_path} describes {manifest.get('files', {}).get('graph')!r}, not {onnx_path.name!r}")
    return manifest


def _tokenizer_source(manifest: dict) -> dict:
    path = Path(manifest["source_model"])
    return {"path": str(path.parent), "gguf_file": path.name} if path.suffix == ".gguf" else {"path": str(path)}


def build(onnx_path: Path, engine_dir: Path, backend: str = "ort", force: bool = False) -> EngineConfig:
    """Write ENGINE_DIR (config.json + model) atomically; returns its config."""
    if backend not in BACKENDS:
        raise EigenError(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "trt":
        raise EigenError("the TensorRT backend is not available in this release (TensorRT cannot be installed "
                         "here); build with --backend ort")
    manifest = read_manifest(onnx_path)
    engine_dir = Path(engine_dir)
    if engine_dir.exists() and not force:
        raise EigenError(f"{engine_dir} exists; pass --force to replace it")
    engine_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{engine_dir.name}.", dir=engine_dir.parent))
    try:
        runtime = _optimize_ort(Path(onnx_path), tmp / MODEL_FILE)
        config = EngineConfig(
            schema_version=ENGINE_SCHEMA, backend=backend, precision=manifest["dtype"], model_file=MODEL_FILE,
            kv_layout=KVLayout(manifest["n_layers"], manifest["n_kv_heads"], manifest["head_dim"],
                               manifest["key_ranks"], manifest["value_ranks"], manifest["max_seq_len"]),
            io=manifest["io"], runtime=runtime, session_options=dict(SESSION_OPTIONS),
            source={k: manifest[k] for k in ("source_model", "source_hash", "family", "rope_mode",
                                              "kv_bytes_per_token", "perplexity")},
            tokenizer=_tokenizer_source(manifest))
        config.save(tmp / "config.json")
        if engine_dir.exists():
            shutil.rmtree(engine_dir)
        os.replace(tmp, engine_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return config


def _optimize_ort(src: Path, dst: Path) -> dict:
    """Let ONNX Runtime optimise `src` and save the result (weights beside it) at `dst`."""
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(dst)
    options.add_session_config_entry("session.optimized_model_external_initializers_file_name", dst.name + ".data")
    options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    options.log_severity_level = 3
    try:
        ort.InferenceSession(str(src), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise EigenError(f"onnxruntime cannot load {src}: {str(e).splitlines()[0]}") from None
    return {"onnxruntime": ort.__version__}
