"""`eigenkv build OUT.onnx -o ENGINE_DIR --backend NAME`: an engine directory from an export.

Backend-independent: reads the export's manifest, lets the registered backend build its files
into a staging folder, writes `config.json` (layout, I/O names, source, the backend's runtime
and options) and publishes the folder atomically. Backends: `engines/backend.py` registry.
"""

from __future__ import annotations

from pathlib import Path

from eigenkv.engines.backend import get_backend
from eigenkv.engines.config import EngineConfig
from eigenkv.errors import EigenError
from eigenkv.manifest import read_manifest


def build(onnx_path: Path, engine_dir: Path, backend: str = "ort", force: bool = False,
          **options) -> EngineConfig:
    """Write ENGINE_DIR (config.json + the backend's files) atomically; returns its config.
    `options` go to the backend's build hook (ort: attention="fused"|"function").
    EigenError for an unknown backend, a graph without its manifest, or an existing ENGINE_DIR
    without `force`."""
    from eigenkv.artifacts import publish, staging_dir
    chosen = get_backend(backend)
    manifest = read_manifest(onnx_path)
    engine_dir = Path(engine_dir)
    if engine_dir.exists() and not force:
        raise EigenError(f"{engine_dir} exists; pass --force to replace it")
    engine_dir.parent.mkdir(parents=True, exist_ok=True)
    with staging_dir(engine_dir) as tmp:
        fields = chosen.build(Path(onnx_path), manifest, tmp, **options)
        config = EngineConfig.from_manifest(manifest, chosen.name, **fields)
        config.save(tmp / "config.json")
        publish(tmp, engine_dir, replace=True)
    return config
