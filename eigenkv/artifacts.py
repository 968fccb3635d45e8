"""Files eigenkv writes: always to a temporary name first, then renamed into place."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from eigenkv.errors import EigenError

PROJECTIONS_SCHEMA = 2  # 2: folded attention tensors (1 held bases)


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


@contextmanager
def staging_dir(target: Path) -> Iterator[Path]:
    """Yield a hidden temporary folder beside `target` (named `.{target.name}.*`) that is always
    removed afterwards; the block moves its finished files into place (`publish`)."""
    target = Path(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def publish(staged: Path, target: Path, replace: bool = False) -> None:
    """Move a staged file or folder to `target` (an existing folder is replaced only if `replace`)."""
    target = Path(target)
    if target.is_dir() and not target.is_symlink():
        if not replace:
            raise EigenError(f"{target} exists; pass --force to replace it")
        shutil.rmtree(target)
    os.replace(staged, target)


def write_json(path: Path, data: dict) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def read_json_object(path: Path, remedy: str) -> dict:
    """A JSON object from `path`, or a one-line EigenError ending with `remedy`."""
    try:
        data = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EigenError(f"{path} is corrupt ({e}); {remedy}") from None
    if not isinstance(data, dict):
        raise EigenError(f"{path} is corrupt (not a JSON object); {remedy}")
    return data


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


ATTENTION_TENSORS = ("q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias", "v_proj.weight", "v_proj.bias",
                     "o_proj.weight", "o_proj.bias", "key_up", "joint_basis", "joint_query_basis", "key_gram")


def save_projections(path: Path, folded, meta: dict) -> None:
    """The folded attention tensors of every layer (what `fold` and healing produced) plus
    JSON metadata (ranks, key mode, source model hash) -> one safetensors file."""
    import torch
    from safetensors.torch import save_file
    tensors = {}
    for i, layer in enumerate(folded.layers):
        state = layer.attn.state_dict()
        for name in ATTENTION_TENSORS:
            if state.get(name) is not None:
                tensors[f"layers.{i}.{name}"] = state[name].detach().to(torch.float32).contiguous()
    header = dict(meta, schema=PROJECTIONS_SCHEMA, key_ranks=folded.key_ranks, value_ranks=folded.value_ranks,
                  key_mode=folded.layers[0].attn.rope_mode.value)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"eigenkv": json.dumps(header)})


def load_projections(path: Path) -> tuple[list[dict], dict]:
    """-> (per-layer {tensor name: tensor}, metadata); one-line errors for unreadable or foreign files."""
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("eigenkv", "null"))
            if not isinstance(meta, dict) or meta.get("schema") != PROJECTIONS_SCHEMA:
                found = meta.get("schema") if isinstance(meta, dict) else None
                raise EigenError(f"{path} is not an eigenkv projections file of schema {PROJECTIONS_SCHEMA} "
                                 f"(found {found}); rerun `eigenkv compress` to make one")
            keys = set(f.keys())
            layers = [{n: f.get_tensor(f"layers.{i}.{n}") for n in ATTENTION_TENSORS if f"layers.{i}.{n}" in keys}
                      for i in range(meta["n_layers"])]
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
        raise EigenError(f"cannot read projections {path}: {e}") from None
    return layers, meta
