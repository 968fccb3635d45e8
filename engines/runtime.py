"""Run an engine: preallocated per-layer KV buffers bound in place, prefill, decode, generate.

The cache is one ONNX Runtime OrtValue per layer and kind, [B, Hkv, capacity, rank_i],
allocated once per `generate` call and bound as both `past_key_values.{i}.*` and
`present.{i}.*` through IOBinding, so the graph's TensorScatter writes in place: no
reallocation or copy of the cache during decode.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from eigenkv.engines.config import EngineConfig
from eigenkv.errors import EigenError

_NP = {"fp32": np.float32, "fp16": np.float16}


@dataclass(frozen=True)
class Sampling:
    """temperature 0 = greedy; otherwise softmax(logits / T) restricted to the top-p mass."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if self.temperature < 0:
            raise EigenError(f"--temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise EigenError(f"--top-p must be in (0, 1], got {self.top_p}")


def sample(logits: np.ndarray, sampling: Sampling, rng: np.random.Generator) -> np.ndarray:
    """logits [B, V] -> token ids [B]."""
    if sampling.temperature == 0:
        return logits.argmax(-1)
    z = logits.astype(np.float64) / sampling.temperature
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    out = np.empty(len(p), dtype=np.int64)
    for b, row in enumerate(p):
        order = np.argsort(-row)
        keep = np.cumsum(row[order]) - row[order] < sampling.top_p  # always keeps the top token
        kept = order[keep]
        out[b] = rng.choice(kept, p=row[kept] / row[kept].sum())
    return out


class KVBuffers:
    """The per-layer cache as OrtValues; `pointers()` lets tests check nothing moves."""

    def __init__(self, layout, batch: int, capacity: int, dtype):
        import onnxruntime as ort
        self.capacity = capacity
        self.values = [ort.OrtValue.ortvalue_from_numpy(np.zeros((batch, layout.n_kv_heads, capacity, r), dtype))
                       for pair in zip(layout.key_ranks, layout.value_ranks) for r in pair]

    def pointers(self) -> list[int]:
        return [v.data_ptr() for v in self.values]


class OrtEngine:
    """An `ort` engine directory, loaded; `step` runs the graph once over bound buffers."""

    def __init__(self, engine_dir: Path, threads: int = 0):
        import onnxruntime as ort
        self.dir = Path(engine_dir)
        self.config = EngineConfig.load(self.dir, backend="ort")
        built = self.config.runtime.get("onnxruntime")
        if built != ort.__version__:
            raise EigenError(f"{self.dir} was built with onnxruntime {built}, installed is {ort.__version__}: "
                             f"rebuild it with `eigenkv build ... -o {self.dir} --force`")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads
        options.log_severity_level = 3
        model = self.dir / self.config.model_file
        try:
            self.session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise EigenError(f"engine model {model} is corrupt or truncated ({str(e).splitlines()[0][:160]}); "
                             f"rebuild it with `eigenkv build ... -o {self.dir} --force`") from None
        self.layout = self.config.kv_layout
        self.dtype = _NP[self.config.precision]
        io = self.config.io
        n = self.layout.n_layers
        self.past = [io["inputs"][k].format(i=i) for i in range(n) for k in ("past_key", "past_value")]
        self.present = [io["outputs"][k].format(i=i) for i in range(n) for k in ("present_key", "present_value")]
        self.binds = 0  # KV buffer bindings made (a test checks they stay per call, not per token)

    @property
    def vocab_size(self) -> int:
        """From the graph's logits output [B, S, V]."""
        name = self.config.io["outputs"]["logits"]
        return int(next(o.shape[-1] for o in self.session.get_outputs() if o.name == name))

    def new_cache(self, batch: int, capacity: int) -> KVBuffers:
        if capacity > self.layout.max_seq_len:
            raise EigenError(f"{capacity} tokens exceed the engine's max_seq_len {self.layout.max_seq_len}")
        return KVBuffers(self.layout, batch, capacity, self.dtype)

    def binding(self, cache: KVBuffers):
        """One IOBinding per generate call: past and present share each KV buffer."""
        binding = self.session.io_binding()
        binding.bind_output(self.config.io["outputs"]["logits"], "cpu")  # output 0, rebound every step
        for name_in, name_out, value in zip(self.past, self.present, cache.values):
            binding.bind_ortvalue_input(name_in, value)
            binding.bind_ortvalue_output(name_out, value)
            self.binds += 1
        return binding

    def step(self, binding, ids: np.ndarray, positions: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """ids/positions [B, S], lengths [B] (valid slots before the step) -> logits [B, S, V]."""
        inputs = self.config.io["inputs"]
        binding.bind_output(self.config.io["outputs"]["logits"], "cpu")  # fresh: its shape follows S
        binding.bind_cpu_input(inputs["input_ids"], np.ascontiguousarray(ids, dtype=np.int64))
        binding.bind_cpu_input(inputs["position_ids"], np.ascontiguousarray(positions, dtype=np.int64))
        binding.bind_cpu_input(inputs["cache_lengths"], np.ascontiguousarray(lengths, dtype=np.int64))
        self.session.run_with_iobinding(binding)
        return binding.get_outputs()[0].numpy()


def generate(engine: OrtEngine, prompts: list[list[int]], max_new_tokens: int, sampling: Sampling = Sampling(),
             stop_tokens: Iterable[int] = (), on_tokens: Callable[[dict[int, int]], None] | None = None,
             on_cache: Callable[[KVBuffers], None] | None = None, prefill_chunk: int | None = None
             ) -> list[list[int]]:
    """Prompts of any lengths (right-padded into one batch) -> new tokens per prompt.

    Each sequence writes at its own cache length, so padding never reaches its attention.
    Generation stops per sequence at a stop token (kept) or after max_new_tokens.
    `prefill_chunk` bounds the tokens per prefill step (attention memory grows with it).
    """
    if prefill_chunk is not None and prefill_chunk < 1:
        raise EigenError("prefill_chunk must be >= 1")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise EigenError("every prompt needs at least one token")
    if max_new_tokens < 0:
        raise EigenError("--max-new-tokens must be >= 0")
    lengths = np.array([len(p) for p in prompts], dtype=np.int64)
    capacity = int(lengths.max()) + max_new_tokens
    if capacity > engine.layout.max_seq_len:
        raise EigenError(f"prompt ({int(lengths.max())} tokens) + --max-new-tokens ({max_new_tokens}) exceeds the "
                         f"engine's max_seq_len {engine.layout.max_seq_len}; shorten them or export with a larger "
                         "--max-seq-len")
    batch, width = len(prompts), int(lengths.max())
    ids = np.zeros((batch, width), dtype=np.int64)
    for b, p in enumerate(prompts):
        ids[b, : len(p)] = p
    cache = engine.new_cache(batch, max(capacity, width + 1))
    binding = engine.binding(cache)
    last = _prefill(engine, binding, ids, lengths, prefill_chunk or width)
    rng = np.random.default_rng(sampling.seed)
    stops, done = set(stop_tokens), np.zeros(batch, dtype=bool)
    out: list[list[int]] = [[] for _ in prompts]
    for step in range(max_new_tokens):
        tokens = sample(last, sampling, rng)
        active = np.flatnonzero(~done)
        for b in active:
            out[b].append(int(tokens[b]))
            done[b] = int(tokens[b]) in stops
        if on_tokens is not None:
            on_tokens({int(b): int(tokens[b]) for b in active})
        if done.all() or step == max_new_tokens - 1:
            break
        last = engine.step(binding, tokens[:, None], lengths[:, None], lengths)[:, 0]
        lengths = lengths + 1
        if on_cache is not None:
            on_cache(cache)
    return out


def _prefill(engine: OrtEngine, binding, ids: np.ndarray, lengths: np.ndarray, chunk: int) -> np.ndarray:
    """Right-padded prompts ids [B, W] in chunks -> logits at each prompt's last token [B, V]."""
    batch, width = ids.shape
    last = None
    for start in range(0, width, chunk):
        stop = min(start + chunk, width)
        positions = np.broadcast_to(np.arange(start, stop), (batch, stop - start))
        logits = engine.step(binding, ids[:, start:stop], positions, np.full(batch, start, np.int64))
        if last is None:
            last = np.empty((batch, logits.shape[-1]), dtype=logits.dtype)
        ends = (lengths - 1 >= start) & (lengths - 1 < stop)
        last[ends] = logits[ends, (lengths - 1 - start)[ends]]
    return last
