"""Another eigenkv engine as a bench peer: `eigenkv bench ENGINE --baseline BASE --peer OTHER_ENGINE_DIR`.

Any engine directory `eigenkv build` wrote (config.json + the backend's files) of the same
checkpoint: e.g. the same export built with `--weights int8` or `--attention function`, timed
interleaved with the two engines under test. Its label is `eigenkv <folder name> (<backend>,
<precision or weights format>)` from config.json.

Module API for the peer registry (engines/peer.py): `NAME`, `accepts(path)`, `load(path, threads)`.
"""

from __future__ import annotations

import json
from pathlib import Path

NAME = "eigenkv"


def accepts(path: Path) -> bool:
    """An eigenkv engine directory: a config.json with a schema_version and a backend."""
    config = Path(path) / "config.json"
    if not (Path(path).is_dir() and config.is_file()):
        return False
    try:
        data = json.loads(config.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and "schema_version" in data and "backend" in data


def load(path: Path, threads: int = 0):
    """The engine (backend's own loader) with the peer attributes the bench reads: `label`,
    `source_hash` (the checkpoint's sha256 from config.json). EigenError as `load_engine`."""
    from eigenkv.engines.backend import load_engine
    from eigenkv.engines.config import EngineConfig
    path = Path(path)
    config = EngineConfig.load(path)
    engine = load_engine(path, threads=threads)
    shown = config.precision if config.weights == "graph" else config.weights
    engine.label = f"{NAME} {path.name} ({config.backend}, {shown})"
    engine.source_hash = config.source.hash
    return engine
