"""A peer baseline: llama.cpp (through llama-cpp-python's low-level C API) running a GGUF file.

    python tools/llamacpp_peer.py -o out/llamacpp-smollm2   # installs llama-cpp-python, writes the GGUFs
    eigenkv bench ENGINE --baseline ENGINE2 --peer out/llamacpp-smollm2/model-f32.gguf

What runs: one `llama_context` over the GGUF's model, created by `new_cache(B, capacity)` with
`n_seq_max = B` and a non-unified KV cache (`kv_unified = false`: each sequence its own KV
stream of `n_ctx_seq` cells, capacity rounded up to a multiple of 256 by llama.cpp, so a decode
step attends over its own sequence only). `step` puts all B x S tokens in `llama_batch`es
(sequence b -> seq id b, positions as given, every token an output), at most `N_BATCH` tokens
per `llama_decode` call (llama.cpp splits each into ubatches of at most `N_BATCH`), and copies
the logits out: [B, S, V] float32. Decode steps (S = 1) put the whole batch in one call.

Numerics: for an all-F32 model (the f32 GGUF that tools/llamacpp_peer.py de-quantizes, run
against our fp32 engines) the KV cache is F32 and flash attention is off, because llama.cpp's
flash attention casts K and V to F16 (SmolLM2 prefill logits vs float64: max |diff| 9e-5 this way,
3.5e-2 with flash attention or an F16 cache). Any other model gets llama.cpp's defaults: F16
KV cache, flash attention "auto". `load(kv_type=..., flash_attn=...)` overrides both. Threads: `n_threads` and
`n_threads_batch` = `threads`; 0 means the CPUs this process may run on (what llama.cpp's own
tools default to, roughly: they count physical cores).

Limits, each a one-line EigenError: equal-length prompts only (every sequence at the same
length, positions contiguous from 0: no padding, no per-sequence offsets); the cache cannot
evict (`keep`) nor show its keys; one live cache per engine (a second `new_cache` replaces the
first, which then refuses to step). The llama_cpp package is imported by `load` only: without it
`load` says how to get it (llama-cpp-python is a tool here, never a dependency of eigenkv).

Registry API (engines/peer.py): NAME, `accepts(path)`, `load(path, threads)`.
"""

from __future__ import annotations

import ctypes
import json
import os
from pathlib import Path

import numpy as np

from eigenkv.engines.backend import Engine, KVCache
from eigenkv.errors import EigenError
from eigenkv.manifest import KVLayout

NAME = "llama.cpp"
N_BATCH = 512  # tokens per llama_decode call (= n_batch = n_ubatch of the context)
KV_TYPES = {"f32": 0, "f16": 1}  # GGML_TYPE_F32, GGML_TYPE_F16
FLASH_ATTN = {"auto": -1, "off": 0, "on": 1}  # LLAMA_FLASH_ATTN_TYPE_*
INSTALL_HINT = ("llama-cpp-python is not installed in this interpreter; `python tools/llamacpp_peer.py -o DIR` "
                "builds a CPU-only wheel and installs it here (about 10 minutes on 2 cores)")
_PAD = 256  # llama.cpp rounds each sequence's KV cells up to a multiple of this


def accepts(path: Path) -> bool:
    """A .gguf file, or a folder whose peer.json says kind "llama.cpp" (tools/llamacpp_peer.py
    output; its `default_file` is loaded). Reads nothing but that small JSON."""
    path = Path(path)
    if path.is_file():
        return path.suffix.lower() == ".gguf"
    info = _peer_json(path / "peer.json")
    return path.is_dir() and info.get("kind") == NAME


def load(path: Path, threads: int = 0, kv_type: str | None = None, flash_attn: str | None = None) -> "LlamaCppEngine":
    """The GGUF at `path` (or a tools/llamacpp_peer.py folder's default file) in llama.cpp.

    threads: n_threads and n_threads_batch (0: the CPUs this process may use). kv_type: "f32" or
    "f16"; flash_attn: "auto", "off" or "on" (None, None: F32 and "off" for an all-F32 model, else
    F16 and "auto"). EigenError (one line) when llama_cpp is not importable here, the file is
    missing or llama.cpp cannot load it."""
    path = Path(path)
    if path.is_dir():
        info = _peer_json(path / "peer.json")
        name = info.get("default_file")
        if info.get("kind") != NAME or not isinstance(name, str):
            raise EigenError(f"{path}: not a llama.cpp peer folder (peer.json with kind \"llama.cpp\" and "
                             "default_file); pass a .gguf file")
        path = path / name
    return LlamaCppEngine(path, threads, kv_type, flash_attn)


def _peer_json(path: Path) -> dict:
    """peer.json as a dict ({} when absent or unreadable: it is optional)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask), else os.cpu_count()."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _import_llama_cpp():
    try:
        import llama_cpp
        import llama_cpp._logger as llama_logger
    except ImportError as e:
        raise EigenError(f"{INSTALL_HINT} ({type(e).__name__}: {e})".splitlines()[0]) from None
    llama_logger.set_verbose(False)  # llama.cpp's load/context chatter off; its errors still print
    return llama_cpp


class LlamaCppCache(KVCache):
    """Bookkeeping for the KV cache that lives inside the engine's llama_context (not host arrays).

    `length`: tokens held per sequence (all equal); `lengths` [L, B] as every cache has;
    capacities: llama.cpp's cells per sequence (`n_ctx_seq`, >= the requested capacity)."""

    def __init__(self, engine: "LlamaCppEngine", batch: int, cells: int, epoch: int):
        self.layout, self.batch, self.engine, self.epoch = engine.layout, batch, engine, epoch
        self.cells, self.length = cells, 0
        self.lengths = np.zeros((self.layout.n_layers, batch), np.int64)
        self.itemsize = engine.kv_itemsize

    @property
    def capacities(self) -> list[int]:
        return [self.cells] * self.layout.n_layers

    @property
    def nbytes(self) -> int:
        """K and V bytes llama.cpp allocated: layers x B x n_ctx_seq cells x Hkv x head_dim x 2 (bytes)."""
        lay = self.layout
        return 2 * lay.n_layers * self.batch * self.cells * lay.n_kv_heads * lay.head_dim * self.itemsize

    def pointers(self) -> list[int]:
        return []  # the buffers are llama.cpp's, not exposed

    def positions(self, layer: int) -> np.ndarray:
        return np.broadcast_to(np.arange(self.length, dtype=np.int32),
                               (self.batch, self.layout.n_kv_heads, self.length))

    def keys(self, layer: int) -> np.ndarray:
        raise EigenError("the llama.cpp peer's keys live inside llama.cpp and are not exposed")

    def keep(self, layer: int, seq: int, slots: np.ndarray) -> None:
        raise EigenError("the llama.cpp peer's cache cannot evict; bench it without eviction")

    def write_positions(self, positions: np.ndarray) -> None:
        pass  # llama.cpp takes positions with the tokens (checked in step)

    def advance(self, counts: np.ndarray) -> None:
        counts = np.asarray(counts)
        if (counts != self.length - self.lengths[0]).any():
            raise EigenError("the llama.cpp peer runs batches of equal-length prompts only")
        super().advance(counts)


class LlamaCppEngine(Engine):
    """A GGUF file loaded in llama.cpp (weights mmapped, CPU only)."""

    name = NAME

    def __init__(self, path: Path, threads: int = 0, kv_type: str | None = None, flash_attn: str | None = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise EigenError(f"{self.path}: no such GGUF file")
        if threads < 0:
            raise EigenError(f"threads must be >= 0, got {threads}")
        if kv_type is not None and kv_type not in KV_TYPES:
            raise EigenError(f"kv_type must be one of {', '.join(KV_TYPES)}, got {kv_type!r}")
        if flash_attn is not None and flash_attn not in FLASH_ATTN:
            raise EigenError(f"flash_attn must be one of {', '.join(FLASH_ATTN)}, got {flash_attn!r}")
        self.lib = lib = _import_llama_cpp()
        self.threads = threads or _usable_cpus()
        lib.llama_backend_init()
        params = lib.llama_model_default_params()
        params.n_gpu_layers = 0
        self.model = lib.llama_model_load_from_file(str(self.path).encode(), params)
        if not self.model:
            raise EigenError(f"llama.cpp cannot load {self.path} (not a GGUF model it supports; "
                             "its log above says why)")
        self.ctx, self.epoch, self._ctx_key, self._cells = None, 0, None, 0
        model = self.model
        if lib.llama_model_has_encoder(model) or lib.llama_model_is_recurrent(model):
            raise EigenError(f"{self.path}: the llama.cpp peer runs decoder-only transformer models")
        self.version = getattr(lib, "__version__", "?")
        n_layers, n_head = lib.llama_model_n_layer(model), lib.llama_model_n_head(model)
        n_kv = lib.llama_model_n_head_kv(model)
        arch = self._meta("general.architecture") or "llama"
        head_dim = int(self._meta(f"{arch}.attention.key_length") or lib.llama_model_n_embd(model) // n_head)
        self._vocab = int(lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(model)))
        self.n_ctx_train = int(lib.llama_model_n_ctx_train(model))
        self.layout = KVLayout(n_layers, n_kv, head_dim, [head_dim] * n_layers, [head_dim] * n_layers,
                               self.n_ctx_train, slot_positions=False)
        ftype = int(self._meta("general.file_type") or -1)
        self.all_f32 = ftype == 0
        name = lib.llama_ftype_name(ftype) if ftype >= 0 and hasattr(lib, "llama_ftype_name") else None
        self.weights = "f32" if self.all_f32 else (name.decode() if name else f"file type {ftype}")
        self.kv_type = kv_type or ("f32" if self.all_f32 else "f16")
        self.flash_attn = flash_attn or ("off" if self.all_f32 else "auto")
        self.kv_itemsize = 4 if self.kv_type == "f32" else 2
        self.precision = "fp32" if self.all_f32 and self.kv_type == "f32" and self.flash_attn == "off" else self.weights
        self.label = f"llama.cpp {self.version} {self.weights}"
        info = _peer_json(self.path.parent / "peer.json")
        files = info.get("files") if info.get("kind") == NAME else None
        self._source_hash = info.get("source_hash") if isinstance(files, dict) and self.path.name in files else None
        # one llama_batch of N_BATCH tokens over numpy arrays we own (never llama_batch_free'd)
        self._tokens = np.zeros(N_BATCH, np.int32)
        self._pos = np.zeros(N_BATCH, np.int32)
        self._n_seq = np.ones(N_BATCH, np.int32)
        self._seq = np.zeros(N_BATCH, np.int32)
        self._seq_ptrs = self._seq.ctypes.data + 4 * np.arange(N_BATCH, dtype=np.uintp)  # &seq[i]
        self._out = np.ones(N_BATCH, np.int8)
        self._batch = lib.llama_batch()
        self._batch.token = self._tokens.ctypes.data_as(ctypes.POINTER(ctypes.c_int32))
        self._batch.embd = None
        self._batch.pos = self._pos.ctypes.data_as(ctypes.POINTER(ctypes.c_int32))
        self._batch.n_seq_id = self._n_seq.ctypes.data_as(ctypes.POINTER(ctypes.c_int32))
        self._batch.seq_id = ctypes.cast(self._seq_ptrs.ctypes.data, ctypes.POINTER(ctypes.POINTER(ctypes.c_int32)))
        self._batch.logits = self._out.ctypes.data_as(ctypes.POINTER(ctypes.c_int8))

    def _meta(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(256)
        n = self.lib.llama_model_meta_val_str(self.model, key.encode(), buf, len(buf))
        return buf.value.decode(errors="replace") if n >= 0 else None

    @property
    def vocab_size(self) -> int:
        return self._vocab

    @property
    def source_hash(self) -> str | None:
        """peer.json's source_hash when peer.json beside the file (kind llama.cpp) lists it, else None."""
        return self._source_hash

    @property
    def max_positions(self) -> int:
        """The model's training context (GGUF `<arch>.context_length`, tokens)."""
        return self.n_ctx_train

    def new_cache(self, batch: int, capacity: int | list[int] = 0) -> LlamaCppCache:
        """An empty cache of `batch` sequences x `capacity` tokens each (one int, or one per layer:
        the largest counts). Reuses the llama_context when its (B, cells) match, else makes a new one
        (n_ctx = B x cells); clears its memory either way. Earlier caches of this engine go stale."""
        caps = self.check_capacity(capacity or self.max_seq_len)
        lib = self.lib
        if not 1 <= batch <= lib.llama_max_parallel_sequences():
            raise EigenError(f"the llama.cpp peer holds 1..{lib.llama_max_parallel_sequences()} sequences, "
                             f"asked for {batch}")
        key = (batch, -(-max(caps) // _PAD) * _PAD)
        if self._ctx_key != key:
            self._free_context()
            params = lib.llama_context_default_params()
            params.n_ctx, params.n_seq_max, params.kv_unified = batch * key[1], batch, False
            params.n_batch = params.n_ubatch = N_BATCH
            params.n_threads = params.n_threads_batch = self.threads
            params.type_k = params.type_v = KV_TYPES[self.kv_type]
            params.flash_attn_type = FLASH_ATTN[self.flash_attn]
            params.embeddings, params.no_perf = False, True
            ctx = lib.llama_init_from_model(self.model, params)
            if not ctx:
                raise EigenError(f"llama.cpp could not make a context of {batch} x {key[1]} tokens (its log says why)")
            self.ctx, self._ctx_key, self._cells = ctx, key, int(lib.llama_n_ctx_seq(ctx))
        lib.llama_memory_clear(lib.llama_get_memory(self.ctx), True)
        self.epoch += 1
        return LlamaCppCache(self, batch, self._cells, self.epoch)

    def step(self, cache: LlamaCppCache, ids: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """ids, positions int [B, S] -> logits [B, S, V] float32 (every token's); llama.cpp appends
        the K/V. Positions must be cache.length + 0..S-1 in every row (equal-length sequences),
        ids in 0..V-1; otherwise, or when the cache is stale, full or llama_decode fails, a one-line
        EigenError (after a failed decode the cache is stale: make a new one)."""
        if not isinstance(cache, LlamaCppCache) or cache.engine is not self or cache.epoch != self.epoch:
            raise EigenError("this llama.cpp cache is stale: the engine made a newer one (one live cache per engine)")
        ids, positions = np.asarray(ids), np.asarray(positions)
        batch, seq = ids.shape
        if batch != cache.batch or positions.shape != ids.shape:
            raise EigenError(f"step: ids {list(ids.shape)} and positions {list(positions.shape)} must both be "
                             f"[{cache.batch}, S]")
        expected = cache.length + np.arange(seq)
        if (positions != expected[None]).any():
            raise EigenError(f"the llama.cpp peer runs equal-length sequences at contiguous positions: expected "
                             f"{cache.length}..{cache.length + seq - 1} in every row")
        if cache.length + seq > cache.cells:
            raise EigenError(f"KV cache full: {cache.length} of {cache.cells} tokens held, {seq} more do not fit")
        if ids.size and (ids.min() < 0 or ids.max() >= self._vocab):
            raise EigenError(f"token ids must be in 0..{self._vocab - 1}")
        lib, n_vocab, total = self.lib, self._vocab, batch * seq
        flat_ids, flat_pos = ids.reshape(-1), positions.reshape(-1)
        flat_seq = np.repeat(np.arange(batch, dtype=np.int32), seq)
        out = np.empty((total, n_vocab), np.float32)
        for start in range(0, total, N_BATCH):
            n = min(N_BATCH, total - start)
            self._tokens[:n] = flat_ids[start:start + n]
            self._pos[:n] = flat_pos[start:start + n]
            self._seq[:n] = flat_seq[start:start + n]
            self._batch.n_tokens = n
            code = lib.llama_decode(self.ctx, self._batch)
            if code != 0:
                self.epoch += 1  # memory may hold part of the step
                raise EigenError(f"llama_decode failed (code {code}) at tokens {start}..{start + n - 1} of the step")
            out[start:start + n] = np.ctypeslib.as_array(lib.llama_get_logits(self.ctx), shape=(n, n_vocab))
        cache.length += seq
        return out.reshape(batch, seq, n_vocab)

    def system_info(self) -> str:
        """llama.cpp's build/CPU feature line (llama_print_system_info)."""
        return self.lib.llama_print_system_info().decode(errors="replace").strip()

    def _free_context(self) -> None:
        if getattr(self, "ctx", None):
            self.lib.llama_free(self.ctx)
        self.ctx, self._ctx_key = None, None

    def __del__(self):
        try:
            self._free_context()
            if getattr(self, "model", None):
                self.lib.llama_model_free(self.model)
                self.model = None
        except Exception:  # interpreter shutdown: the library may be gone already
            pass
