"""A peer baseline: a Hugging Face Optimum-exported decoder (`text-generation-with-past`) in
ONNX Runtime, driven the way Optimum graphs are meant to be driven.

Graph I/O (read from the graph, not assumed): input_ids [B, S], attention_mask [B, P+S],
position_ids [B, S] (when present), past_key_values.{i}.key|value [B, Hkv, P, D] ->
logits [B, S, V], present.{i}.key|value [B, Hkv, P+S, D]. The cache grows by
concatenation inside the graph: every step allocates new presents one token longer, and
they are fed back as the next step's past (as OrtValues, so Python copies nothing). That
growth is what this baseline exists to measure against our fixed, in-place KV buffers.

It implements `Engine` (engines/backend.py), so `generate`, prefill and `bench` drive it like
our engines; its cache cannot evict and holds batches of equal-length prompts only. Sessions
come from `engines.ort.make_session` with the same options as our engines (`threads`
intra-op threads, 0 = ORT's default). `peer.json` beside the graph (written by tools/optimum_baseline.py)
is optional; when present its `source_hash` ties the graph to a checkpoint.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from eigenkv.artifacts import read_json_object
from eigenkv.engines.backend import Engine, KVCache
from eigenkv.errors import EigenError
from eigenkv.manifest import KVLayout, precision_of

_PAST = re.compile(r"past_key_values\.(\d+)\.(key|value)$")
_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


class PeerCache(KVCache):
    """The per-layer cache as OrtValues [B, Hkv, P, D], replaced (not updated) by every step."""

    def __init__(self, layout: KVLayout, values: list, batch: int):
        self.layout, self.values, self.length = layout, values, 0
        self.lengths = np.zeros((layout.n_layers, batch), np.int64)
        self.itemsize = np.dtype(_TYPES[values[0].data_type()]).itemsize

    @property
    def capacities(self) -> list[int]:
        return [self.length] * self.layout.n_layers

    @property
    def nbytes(self) -> int:
        return sum(int(np.prod(v.shape())) * self.itemsize for v in self.values)

    def pointers(self) -> list[int]:
        return [v.data_ptr() for v in self.values]

    def positions(self, layer: int) -> np.ndarray:
        batch = self.lengths.shape[1]
        return np.broadcast_to(np.arange(self.length, dtype=np.int32), (batch, self.layout.n_kv_heads, self.length))

    def keys(self, layer: int) -> np.ndarray:
        return self.values[2 * layer].numpy()

    def keep(self, layer: int, seq: int, slots: np.ndarray) -> None:
        raise EigenError("the Optimum peer's cache grows by concatenation and cannot evict; bench it without eviction")

    def write_positions(self, positions: np.ndarray) -> None:
        pass  # the peer's graph computes positions from its growing cache

    def advance(self, counts: np.ndarray) -> None:
        counts = np.asarray(counts)
        if (counts != self.length - self.lengths[0]).any():
            raise EigenError("the Optimum peer runs batches of equal-length prompts only")
        super().advance(counts)


class PeerEngine(Engine):
    """An Optimum decoder directory (model.onnx [+ external data], optional peer.json), loaded."""

    name = "optimum"
    label = "optimum"

    def __init__(self, peer_dir: Path, threads: int = 0, model_file: str = "model.onnx"):
        from eigenkv.engines.ort import make_session
        self.dir = Path(peer_dir)
        model = self.dir / model_file
        if not model.is_file():
            raise EigenError(f"{self.dir} has no {model_file}: export one with `python tools/optimum_baseline.py "
                             f"-o {self.dir}`")
        self.info = self._read_info()
        self.session = make_session(model, {"intra_op_num_threads": threads}, "re-export the peer")
        inputs = {i.name: i for i in self.session.get_inputs()}
        outputs = {o.name for o in self.session.get_outputs()}
        layers = sorted({int(m.group(1)) for m in map(_PAST.match, inputs) if m})
        if "input_ids" not in inputs or "logits" not in outputs or not layers or layers != list(range(len(layers))):
            raise EigenError(f"{model} is not an Optimum text-generation-with-past decoder (needs input_ids, "
                             f"past_key_values.{{i}}.key|value -> logits, present.{{i}}.key|value)")
        self.past = [f"past_key_values.{i}.{k}" for i in layers for k in ("key", "value")]
        self.present = [f"present.{i}.{k}" for i in layers for k in ("key", "value")]
        missing = [n for n in self.present if n not in outputs]
        if missing:
            raise EigenError(f"{model} lacks outputs {missing[:2]}...: not an Optimum decoder with past")
        first = inputs[self.past[0]]
        if first.type not in _TYPES:
            raise EigenError(f"{model}: cache type {first.type} is not supported (float32 or float16)")
        self.dtype = _TYPES[first.type]
        self.precision = precision_of(np.dtype(self.dtype))
        n, heads, head_dim = len(layers), int(first.shape[1]), int(first.shape[3])
        self.layout = KVLayout(n, heads, head_dim, [head_dim] * n, [head_dim] * n, self.max_positions or 2**62,
                               slot_positions=False)
        self.has_mask, self.has_positions = "attention_mask" in inputs, "position_ids" in inputs

    @property
    def vocab_size(self) -> int:
        return int(next(o.shape[-1] for o in self.session.get_outputs() if o.name == "logits"))

    def _read_info(self) -> dict:
        path = self.dir / "peer.json"
        if not path.is_file():
            return {}
        return read_json_object(path, "re-export with tools/optimum_baseline.py")

    @property
    def source_hash(self) -> str | None:
        return self.info.get("source_hash")

    @property
    def max_positions(self) -> int | None:
        """max_position_embeddings from the config.json Optimum writes beside the graph, if any."""
        try:
            value = json.loads((self.dir / "config.json").read_text()).get("max_position_embeddings")
        except (OSError, ValueError, AttributeError):
            return None
        return value if isinstance(value, int) else None

    def new_cache(self, batch: int, capacity: int | list[int] = 0) -> PeerCache:
        """Empty past: [B, Hkv, 0, D] per layer and kind (it grows; `capacity` is not preallocated)."""
        import onnxruntime as ort
        empty = np.zeros((batch, self.layout.n_kv_heads, 0, self.layout.head_dim), self.dtype)
        return PeerCache(self.layout, [ort.OrtValue.ortvalue_from_numpy(empty) for _ in self.past], batch)

    def step(self, cache: PeerCache, ids: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """ids [B, S] (all valid, at positions cache.length..+S-1) -> logits [B, S, V]; the cache grows."""
        import onnxruntime as ort
        batch, seq = ids.shape
        feed = {"input_ids": ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(ids, dtype=np.int64))}
        if self.has_mask:
            feed["attention_mask"] = ort.OrtValue.ortvalue_from_numpy(
                np.ones((batch, cache.length + seq), dtype=np.int64))
        if self.has_positions:
            feed["position_ids"] = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(positions, dtype=np.int64))
        feed.update(zip(self.past, cache.values))
        out = self.session.run_with_ort_values(["logits", *self.present], feed)
        cache.values, cache.length = list(out[1:]), cache.length + seq
        return out[0].numpy()


# ---- the peer registry: `eigenkv bench --peer PATH` --------------------------------------------
# One module per peer runtime, each with NAME, `accepts(path) -> bool` (a cheap look at the
# files) and `load(path, threads) -> Engine` (with `label`, `vocab_size`, `source_hash`).
# Runtimes are imported by the module's `load`, never at import: a peer needs only its own package.

NAME = "optimum"
PEER_MODULES = ("eigenkv.engines.peer_eigenkv", "eigenkv.engines.peer", "eigenkv.engines.peer_ortgenai",
                "eigenkv.engines.peer_llamacpp")  # eigenkv first: its engine folders hold a model.onnx too
PEER_KINDS = ("another eigenkv engine directory (config.json), an Optimum export folder (model.onnx), an "
              "onnxruntime-genai folder (genai_config.json) or a GGUF file")


def accepts(path: Path) -> bool:
    """An Optimum export folder: model.onnx, and not an onnxruntime-genai folder or an eigenkv engine."""
    from eigenkv.engines import peer_eigenkv
    return (path.is_dir() and (path / "model.onnx").is_file() and not (path / "genai_config.json").exists()
            and not peer_eigenkv.accepts(path))


def load(path: Path, threads: int = 0) -> PeerEngine:
    return PeerEngine(path, threads)


def peer_modules() -> list:
    """The installed peer modules, in PEER_MODULES order (a module missing from this install is skipped)."""
    import importlib
    found = []
    for name in PEER_MODULES:
        try:
            found.append(importlib.import_module(name))
        except ModuleNotFoundError as e:
            if e.name != name:
                raise
    return found


def load_peer(path: Path, threads: int = 0) -> Engine:
    """The peer engine for `path` (the first registered module that accepts it) -> Engine with
    `label`, `vocab_size` and `source_hash` (None when unknown). EigenError (one line) when no
    module accepts the path or its runtime is not installed."""
    path = Path(path)
    if not path.exists():
        raise EigenError(f"--peer {path}: no such file or folder (expected {PEER_KINDS})")
    for module in peer_modules():
        if module.accepts(path):
            return module.load(path, threads)
    raise EigenError(f"--peer {path}: not {PEER_KINDS}")
