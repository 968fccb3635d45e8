"""Files eigenkv writes: always to a temporary name first, then renamed into place."""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

from eigenkv.errors import EigenError

PROJECTIONS_SCHEMA = 1


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it over `path` only if the block succeeds."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(path: Path, data: dict) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def ensure_output_dir(path: Path, force: bool) -> Path:
    """Create `path` if needed; refuse an unwritable one, or existing results without force."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise EigenError(f"output {path} exists and is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise EigenError(f"cannot create output directory {path}: {e.strerror}") from None
    if not os.access(path, os.W_OK):
        raise EigenError(f"output directory {path} is not writable")
    if (path / "projections.safetensors").exists() and not force:
        raise EigenError(f"{path} already holds results; pass --force to overwrite")
    return path


def save_projections(path: Path, bases, key_ranks, value_ranks, meta: dict) -> None:
    """bases: list of LayerBases -> one safetensors file with JSON metadata."""
    from safetensors.torch import save_file
    tensors = {}
    for i, b in enumerate(bases):
        for name in ("key", "key_sv", "value", "value_sv"):
            tensors[f"layers.{i}.{name}"] = getattr(b, name).to(torch.float32).contiguous()
    header = dict(meta, schema=PROJECTIONS_SCHEMA, key_ranks=list(key_ranks), value_ranks=list(value_ranks))
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"eigenkv": json.dumps(header)})


def load_projections(path: Path):
    """-> (list of LayerBases, metadata dict); one-line errors for unreadable or foreign files."""
    from safetensors import safe_open

    from eigenkv.exporter.decompose import LayerBases
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("eigenkv", "null"))
            if not isinstance(meta, dict) or meta.get("schema") != PROJECTIONS_SCHEMA:
                raise EigenError(f"{path} is not an eigenkv projections file (schema {PROJECTIONS_SCHEMA})")
            bases = [LayerBases(*(f.get_tensor(f"layers.{i}.{n}").double()
                                  for n in ("key", "key_sv", "value", "value_sv")))
                     for i in range(meta["n_layers"])]
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
        raise EigenError(f"cannot read projections {path}: {e}") from None
    return bases, meta
