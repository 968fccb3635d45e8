"""Files eigenkv writes: always to a temporary name first, then renamed into place.

Temporary names are `.{NAME}.{host}-{pid}-{random}` (folders) and the same with `.tmp` (files)
beside the final NAME. A run killed before it could clean up (SIGKILL, power loss) leaves one
behind; the next run writing NAME in that folder removes it (`sweep_stale`). Published files
and folders get the mode the umask gives any new file (0644 / 0755 under umask 022), not the
0600 / 0700 of temporary files.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from eigenkv.errors import EigenError

PROJECTIONS_SCHEMA = 2  # 2: folded attention tensors (1 held bases)
LEGACY_STALE_SECONDS = 3600  # `.{NAME}.{random}` (older eigenkv) untouched this long is stale
FOREIGN_STALE_SECONDS = 86400  # a temporary of another host (shared filesystem) untouched this long


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname().split(".")[0]) or "host"


def _temp_prefix(name: str) -> str:
    return f".{name}.{_host()}-{os.getpid()}-"


def _umask() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def default_mode(directory: bool) -> int:
    """The mode a new file (0o666) or folder (0o777) gets under the current umask."""
    return (0o777 if directory else 0o666) & ~_umask()


def apply_default_modes(path: Path) -> None:
    """chmod `path` (and, for a folder, everything in it) to the umask's default modes."""
    path = Path(path)
    file_mode, dir_mode = default_mode(False), default_mode(True)
    if path.is_symlink():
        return
    if path.is_dir():
        for root, dirs, files in os.walk(path):
            os.chmod(root, dir_mode)
            for f in files:
                if not os.path.islink(os.path.join(root, f)):
                    os.chmod(os.path.join(root, f), file_mode)
    else:
        os.chmod(path, file_mode)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, another user's
        return True
    return True


def sweep_stale(folder: Path, name: str) -> list[Path]:
    """Remove temporaries of NAME in `folder` left by eigenkv runs that died: ours whose process
    (on this host) is gone, and older-style or other hosts' ones untouched for a long time.
    Returns what was removed; never raises."""
    pattern = re.compile(rf"^\.{re.escape(name)}\.(?:(?P<host>[A-Za-z0-9-]+)-(?P<pid>\d+)-)?[a-z0-9_]{{8}}(?:\.tmp)?$")
    removed = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return removed
    now, host = time.time(), _host()
    for entry in entries:
        m = pattern.match(entry.name)
        if not m:
            continue
        try:
            age = now - entry.lstat().st_mtime
        except OSError:
            continue
        if m["pid"] is not None and m["host"] == host:
            stale = not _alive(int(m["pid"]))
        else:
            stale = age > (LEGACY_STALE_SECONDS if m["pid"] is None else FOREIGN_STALE_SECONDS)
        if not stale:
            continue
        try:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
            removed.append(entry)
        except OSError:
            pass
    return removed


def _cannot_write(folder: Path, e: OSError) -> EigenError:
    return EigenError(f"cannot write in {folder}: {e.strerror or e}")


def check_writable(folder: Path) -> None:
    """Create and remove a temporary folder in `folder`: one-line EigenError if that fails (a
    read-only filesystem, /proc, missing permission), before any expensive work."""
    folder = Path(folder)
    try:
        os.rmdir(tempfile.mkdtemp(prefix=_temp_prefix("probe"), dir=folder))
    except OSError as e:
        raise _cannot_write(folder, e) from None


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it over `path` only if the block succeeds
    (with the umask's default file mode)."""
    path = Path(path)
    sweep_stale(path.parent, path.name)
    try:
        fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path.name), suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise _cannot_write(path.parent, e) from None
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, default_mode(False))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextmanager
def staging_dir(target: Path) -> Iterator[Path]:
    """Yield a hidden temporary folder beside `target` (named `.{target.name}.{host}-{pid}-*`) that
    is always removed afterwards; the block moves its finished files into place (`publish`).
    Stale temporaries of `target` from dead runs are removed first."""
    target = Path(target)
    sweep_stale(target.parent, target.name)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(target.name), dir=target.parent))
    except OSError as e:
        raise _cannot_write(target.parent, e) from None
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def publish(staged: Path, target: Path, replace: bool = False) -> None:
    """Move a staged file or folder to `target` (an existing folder is replaced only if `replace`),
    with the umask's default modes."""
    target = Path(target)
    if target.is_dir() and not target.is_symlink():
        if not replace:
            raise EigenError(f"{target} exists; pass --force to replace it")
        shutil.rmtree(target)
    apply_default_modes(Path(staged))
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
    except OSError as e:
        raise EigenError(f"cannot read {path}: {e.strerror or e}") from None
    if not isinstance(data, dict):
        raise EigenError(f"{path} is corrupt (not a JSON object); {remedy}")
    return data


def ensure_output_dir(path: Path, force: bool) -> Path:
    """Create `path` if needed; refuse an unwritable one, or existing results without force
    (checked before anything is created)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise EigenError(f"output {path} exists and is not a directory")
    if (path / "projections.safetensors").exists() and not force:
        raise EigenError(f"{path} already holds results; pass --force to overwrite")
    created = not path.exists()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise EigenError(f"cannot create output directory {path}: {e.strerror}") from None
    try:
        if not os.access(path, os.W_OK):
            raise EigenError(f"output directory {path} is not writable")
        check_writable(path)
    except EigenError:
        if created:
            path.rmdir()
        raise
    return path


ATTENTION_TENSORS = ("q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias", "v_proj.weight", "v_proj.bias",
                     "o_proj.weight", "o_proj.bias", "key_up", "joint_basis", "joint_query_basis", "key_gram",
                     "key_down")


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
