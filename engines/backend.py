"""The seam every backend implements, in the spirit of Polygraphy's runner interface.

- `Engine`: a loaded engine. `new_cache(batch, capacity)` allocates a `KVCache`;
  `step(cache, ids, positions)` runs the graph once and returns host logits; `synchronize()`
  waits for queued device work. `generate`, prefill, sampling, eviction, `bench` and export
  validation are written once against it (engines/runtime.py, engines/bench.py).
- `KVCache`: owns its per-layer buffers (and their bindings), each slot's token position, and
  each layer's valid length per sequence; `keep` compacts a chosen set of slots to the front,
  in place, per (sequence, layer, KV head). `HostKVCache` is the implementation over host
  (numpy) memory that CPU backends bind without copies.
- A lazy registry of backends by name: each is one module exposing `BACKEND`, a `Backend`
  with `build(graph, manifest, out_dir)`, `check_host(config, dir)` and `load(dir, config)`.
  Adding a backend is one module plus one line in `_MODULES`.

Note on `step`: the issue sketch passed `lengths [B]` to every step; here the cache owns the
lengths [L, B], because eviction leaves layers (skipped vs evicted) at different lengths.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from eigenkv.errors import EigenError
from eigenkv.manifest import KVLayout, numpy_dtype


class KVCache(ABC):
    """Per-layer K/V buffers [B, Hkv, C_i, r] with slot positions [B, Hkv, C_i] and lengths [L, B]."""

    layout: KVLayout
    lengths: np.ndarray  # int64 [L, B]: valid slots of each layer per sequence

    buffers: list  # K, V of layer 0, K, V of layer 1, ... : [B, Hkv, C_i, r]

    @property
    def capacities(self) -> list[int]:
        """Slots per layer (tokens)."""
        return [int(b.shape[2]) for b in self.buffers[::2]]

    def _allocate(self, layout: KVLayout, batch: int, capacities: list[int], zeros) -> list:
        """Set layout, batch, zeroed K/V `buffers` and lengths; -> per-layer slot positions.
        zeros(shape, positions: bool) makes one array (int32 when `positions`)."""
        if len(capacities) != layout.n_layers:
            raise EigenError(f"need one capacity per layer ({layout.n_layers}), got {len(capacities)}")
        self.layout, self.batch = layout, batch
        h = layout.n_kv_heads
        self.buffers = [zeros((batch, h, c, r), False) for c, pair in
                        zip(capacities, zip(layout.key_ranks, layout.value_ranks)) for r in pair]
        self.lengths = np.zeros((layout.n_layers, batch), np.int64)
        return [zeros((batch, h, c), True) for c in capacities]

    @property
    @abstractmethod
    def nbytes(self) -> int:
        """Bytes of all K and V buffers (slot positions excluded)."""

    @abstractmethod
    def pointers(self) -> list[int]:
        """Addresses of every K and V buffer (tests check that decoding never moves them)."""

    @abstractmethod
    def positions(self, layer: int) -> np.ndarray:
        """int32 [B, Hkv, C_i]: the token position held in each slot (writable view on host caches)."""

    @abstractmethod
    def keys(self, layer: int) -> np.ndarray:
        """[B, Hkv, C_i, r_k] cached keys as stored (host memory; GPU backends copy)."""

    @abstractmethod
    def keep(self, layer: int, seq: int, slots: np.ndarray) -> None:
        """Keep `slots` [Hkv, k] (slot indices per KV head) of sequence `seq` in `layer`, moved in
        place to slots 0..k-1 in the given order with their positions; the layer's length for
        `seq` becomes k. EigenError if an index is outside the valid slots."""

    def check_room(self, new_tokens: int) -> None:
        """EigenError if `new_tokens` more tokens per sequence do not fit some layer's slots."""
        for i, cap in enumerate(self.capacities):
            held = int(self.lengths[i].max())
            if held + new_tokens > cap:
                raise EigenError(f"KV cache full: layer {i} holds {held} of {cap} slots, "
                                 f"{new_tokens} more tokens do not fit")

    def checked_slots(self, layer: int, seq: int, slots) -> np.ndarray:
        """`slots` as int64 [Hkv, k], each a valid slot of (layer, seq), or a one-line EigenError."""
        slots = np.asarray(slots, dtype=np.int64)
        n_valid = int(self.lengths[layer, seq])
        if slots.ndim != 2 or slots.shape[0] != self.layout.n_kv_heads:
            raise EigenError(f"keep: slots must be [{self.layout.n_kv_heads}, k], got {list(slots.shape)}")
        if slots.size and (slots.min() < 0 or slots.max() >= n_valid):
            raise EigenError(f"keep: slot indices must be in 0..{n_valid - 1} (layer {layer}, sequence {seq})")
        return slots

    def write_positions(self, positions: np.ndarray) -> None:
        """Before a step: positions [B, S] of its new tokens go to slots lengths[i, b] + 0..S-1 of every
        layer (the graph writes K and V there). EigenError if a layer would overflow."""
        seq = positions.shape[1]
        self.check_room(seq)
        for i in range(self.layout.n_layers):
            pos = self.positions(i)
            for b in range(positions.shape[0]):
                start = int(self.lengths[i, b])
                pos[b, :, start:start + seq] = positions[b]

    def advance(self, counts: np.ndarray) -> None:
        """After a step: counts [B] real (non-padding) tokens of each sequence were appended."""
        self.lengths += np.asarray(counts, dtype=np.int64)[None, :]

    def bytes_read(self, new_tokens: int = 0) -> int:
        """K and V bytes an attention pass over the valid slots plus `new_tokens` more per sequence
        reads, all layers and sequences (bytes)."""
        width = [(k + v) * self.layout.n_kv_heads for k, v in zip(self.layout.key_ranks, self.layout.value_ranks)]
        slots = self.lengths.sum(axis=1) + new_tokens * self.lengths.shape[1]
        return int(sum(int(n) * w for n, w in zip(slots, width)) * self.itemsize)

    itemsize: int = 4  # bytes per K/V element


class HostKVCache(KVCache):
    """A KVCache over numpy arrays (CPU backends bind them without copying)."""

    def __init__(self, layout: KVLayout, batch: int, capacities: list[int], precision: str):
        dtype = numpy_dtype(precision)
        self.itemsize = np.dtype(dtype).itemsize
        self._allocate(layout, batch, capacities, lambda shape, pos: np.zeros(shape, np.int32 if pos else dtype))
        # every layer's slot positions are one view into a single int32 arena, so that a step's
        # positions go to all layers in one scatter (`write_positions`) instead of a loop per layer
        caps = np.asarray(capacities, np.int64)
        h = layout.n_kv_heads
        sizes = batch * h * caps
        self._offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        self._caps = caps
        self._arena = np.zeros(int(sizes.sum()), np.int32)
        self.slot_positions = [self._arena[o:o + n].reshape(batch, h, int(c))
                               for o, n, c in zip(self._offsets, sizes, caps)]
        # flat index of slot 0 of every (layer, sequence, head): [L, B, H]
        self._row_starts = (self._offsets[:, None, None] + (np.arange(batch)[None, :, None] * h
                            + np.arange(h)[None, None, :]) * caps[:, None, None])

    def check_room(self, new_tokens: int) -> None:
        over = self.lengths.max(axis=1) + new_tokens > self._caps
        if over.any():
            super().check_room(new_tokens)  # the loop names the first layer that overflows

    def write_positions(self, positions: np.ndarray) -> None:
        """See KVCache.write_positions: one vectorised scatter over every layer, sequence and head."""
        seq = positions.shape[1]
        self.check_room(seq)
        # [L, B, H, S] flat slots: row start + the layer's length for the sequence + 0..S-1
        index = (self._row_starts + self.lengths[:, :, None])[..., None] + np.arange(seq)
        self._arena[index] = np.asarray(positions, np.int32)[None, :, None, :]

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.buffers)

    def pointers(self) -> list[int]:
        return [b.ctypes.data for b in self.buffers]

    def positions(self, layer: int) -> np.ndarray:
        return self.slot_positions[layer]

    def keys(self, layer: int) -> np.ndarray:
        return self.buffers[2 * layer]

    def values(self, layer: int) -> np.ndarray:
        return self.buffers[2 * layer + 1]

    def keep(self, layer: int, seq: int, slots: np.ndarray) -> None:
        slots = self.checked_slots(layer, seq, slots)
        heads, k = slots.shape
        for buf in (self.keys(layer), self.values(layer), self.positions(layer)):
            row = buf[seq]  # [Hkv, C, (r)]
            cap = row.shape[1]
            # one gather of whole slot rows from the [Hkv * C, r] view (a copy first: safe in place)
            flat = (slots + np.arange(heads)[:, None] * cap).ravel()
            row[:, :k] = row.reshape(heads * cap, -1)[flat].reshape((heads, k) + row.shape[2:])
        self.lengths[layer, seq] = k


class TensorKVCache(KVCache):
    """A KVCache whose K/V buffers and slot positions are torch tensors on one device (GPU backends;
    torch is imported only here). `positions`/`keys` return host copies; `write_positions` writes
    on the device."""

    def __init__(self, layout: KVLayout, batch: int, capacities: list[int], dtype, device):
        import torch
        self.device, self.itemsize = device, torch.empty(0, dtype=dtype).element_size()
        self.slot_tensors = self._allocate(layout, batch, capacities, lambda shape, pos: torch.zeros(
            shape, dtype=torch.int32 if pos else dtype, device=device))

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers)

    def pointers(self) -> list[int]:
        return [b.data_ptr() for b in self.buffers]

    def positions(self, layer: int) -> np.ndarray:
        return self.slot_tensors[layer].cpu().numpy()

    def keys(self, layer: int) -> np.ndarray:
        import torch
        keys = self.buffers[2 * layer]
        return (keys.float() if keys.dtype == torch.bfloat16 else keys).cpu().numpy()  # numpy has no bfloat16

    def layer_tensors(self, layer: int):
        """(key buffer, value buffer, slot positions) of `layer`, as torch tensors."""
        return self.buffers[2 * layer], self.buffers[2 * layer + 1], self.slot_tensors[layer]

    def write_positions(self, positions: np.ndarray) -> None:
        import torch
        batch, seq = positions.shape
        self.check_room(seq)
        pos = torch.from_numpy(np.ascontiguousarray(positions, dtype=np.int32)).to(self.device)
        pos = pos[:, None, :].expand(batch, self.layout.n_kv_heads, seq)
        offsets = torch.arange(seq, device=self.device)
        for i, slots in enumerate(self.slot_tensors):
            starts = torch.from_numpy(self.lengths[i]).to(self.device)
            slots.scatter_(2, (starts[:, None] + offsets)[:, None, :].expand_as(pos), pos)

    def keep(self, layer: int, seq: int, slots: np.ndarray) -> None:
        import torch
        slots = self.checked_slots(layer, seq, slots)
        index = torch.from_numpy(slots).to(self.device)
        k = slots.shape[1]
        for buf in self.layer_tensors(layer):
            row = buf[seq]  # [Hkv, C(, r)]
            idx = index.view(*index.shape, *([1] * (row.dim() - 2))).expand(-1, -1, *row.shape[2:])
            row[:, :k] = row.gather(1, idx)  # gather makes a new tensor first: safe in place
        self.lengths[layer, seq] = k


class Engine(ABC):
    """A loaded engine of any backend."""

    name: str  # the backend's name
    layout: KVLayout
    precision: str
    # True when a batch of several sequences must be prefilled in one step (ORT-GenAI): callers
    # that chunk prefill pass the whole prompt at once for B > 1
    batch_prefill_in_one_step: bool = False
    # True when a multi-token step returns only its last position's logits [B, 1, V] (an
    # ORT-GenAI model built with a pruned LM head); prefill then needs equal-length prompts and
    # perplexity cannot be scored through it
    last_logits_only: bool = False

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """V of the logits [B, S, V]."""

    @property
    def max_seq_len(self) -> int:
        """Most slots any layer's cache may hold (tokens)."""
        return self.layout.max_seq_len

    def key_gram(self, layer: int) -> np.ndarray | None:
        """[G, r_k, r_k] UᵀU of layer's key up-projection (G = 1 or Hkv), or None when cached keys
        are full keys (their norm is the key norm). Key-norm eviction reads it."""
        return None

    @abstractmethod
    def new_cache(self, batch: int, capacity: int | list[int]) -> KVCache:
        """An empty cache for `batch` sequences of `capacity` slots (one int, or one per layer).
        EigenError if a capacity exceeds max_seq_len."""

    @abstractmethod
    def step(self, cache: KVCache, ids: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """ids, positions int64 [B, S] -> logits [B, S, V] (host array; [B, 1, V], the last
        position's, when `last_logits_only`). Writes the step's K/V at each layer's
        `cache.lengths` and their positions; the caller then calls `cache.advance`."""

    def synchronize(self) -> None:
        """Wait for queued device work (a no-op on synchronous CPU backends)."""

    def check_capacity(self, capacity: int | list[int]) -> list[int]:
        """One capacity per layer, each in 1..max_seq_len, or a one-line EigenError."""
        caps = [capacity] * self.layout.n_layers if isinstance(capacity, int) else list(capacity)
        if len(caps) != self.layout.n_layers or min(caps) < 1:
            raise EigenError(f"cache capacity must be >= 1 slot for each of {self.layout.n_layers} layers")
        if max(caps) > self.max_seq_len:
            raise EigenError(f"{max(caps)} tokens exceed the engine's max_seq_len {self.max_seq_len}")
        return caps


@dataclass(frozen=True)
class Backend:
    """One backend: how to build an engine directory from an export, check a host, load it."""

    name: str
    build: Callable  # (graph: Path, manifest: Manifest, out_dir: Path) -> dict of EngineConfig fields
    check_host: Callable  # (config: EngineConfig, engine_dir) -> None, or a one-line EigenError saying what to rebuild
    load: Callable  # (engine_dir: Path, config: EngineConfig, **options) -> Engine
    description: str = ""


_MODULES = {"ort": "eigenkv.engines.ort", "torch": "eigenkv.engines.torch_backend",
            "trt": "eigenkv.engines.trt"}  # name -> module exposing BACKEND (imported on first use)


def backend_names() -> list[str]:
    """Registered backend names (the `--backend` choices)."""
    return list(_MODULES)


def get_backend(name: str) -> Backend:
    """The registered backend `name`, imported now; EigenError naming the known ones."""
    if name not in _MODULES:
        raise EigenError(f"unknown backend {name!r}; known: {', '.join(_MODULES)}")
    return importlib.import_module(_MODULES[name]).BACKEND


def load_engine(engine_dir: Path, **options) -> Engine:
    """Load any engine directory: its config.json names the backend, which checks the host first."""
    from eigenkv.engines.config import EngineConfig
    config = EngineConfig.load(Path(engine_dir))
    backend = get_backend(config.backend)
    backend.check_host(config, Path(engine_dir))
    return backend.load(Path(engine_dir), config, **options)
