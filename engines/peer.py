"""A peer baseline: a Hugging Face Optimum-exported decoder (`text-generation-with-past`) in
ONNX Runtime, driven the way Optimum graphs are meant to be driven.

Graph I/O (read from the graph, not assumed): input_ids [B, S], attention_mask [B, P+S],
position_ids [B, S] (when present), past_key_values.{i}.key|value [B, Hkv, P, D] ->
logits [B, S, V], present.{i}.key|value [B, Hkv, P+S, D]. The cache grows by
concatenation inside the graph: every step allocates new presents one token longer, and
they are fed back as the next step's past (as OrtValues, so Python copies nothing). That
growth is what this baseline exists to measure against our fixed, in-place KV buffers.

Session settings match `OrtEngine`: ORT_ENABLE_ALL, `threads` intra-op threads (0 = ORT's
default), CPU provider. `peer.json` beside the graph (written by tools/optimum_baseline.py)
is optional; when present its `source_hash` ties the graph to a checkpoint.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from eigenkv.artifacts import read_json_object
from eigenkv.errors import EigenError

_PAST = re.compile(r"past_key_values\.(\d+)\.(key|value)$")
_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


class PeerCache:
    """The per-layer cache as OrtValues [B, Hkv, P, D], replaced (not updated) by every step."""

    def __init__(self, values: list, length: int):
        self.values, self.length = values, length

    @property
    def nbytes(self) -> int:
        return sum(int(np.prod(v.shape())) * np.dtype(_TYPES[v.data_type()]).itemsize for v in self.values)



class PeerEngine:
    """An Optimum decoder directory (model.onnx [+ external data], optional peer.json), loaded."""

    def __init__(self, peer_dir: Path, threads: int = 0, model_file: str = "model.onnx"):
        import onnxruntime as ort
        self.dir = Path(peer_dir)
        model = self.dir / model_file
        if not model.is_file():
            raise EigenError(f"{self.dir} has no {model_file}: export one with `python tools/optimum_baseline.py "
                             f"-o {self.dir}`")
        self.info = self._read_info()
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise EigenError(f"peer model {model} cannot be loaded ({str(e).splitlines()[0][:160]})") from None
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
        self.n_layers, self.n_kv_heads, self.head_dim = len(layers), int(first.shape[1]), int(first.shape[3])
        self.has_mask, self.has_positions = "attention_mask" in inputs, "position_ids" in inputs
        self.vocab_size = int(next(o.shape[-1] for o in self.session.get_outputs() if o.name == "logits"))

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

    def new_cache(self, batch: int) -> PeerCache:
        """Empty past: [B, Hkv, 0, D] per layer and kind."""
        import onnxruntime as ort
        empty = np.zeros((batch, self.n_kv_heads, 0, self.head_dim), self.dtype)
        return PeerCache([ort.OrtValue.ortvalue_from_numpy(empty) for _ in self.past], 0)

    def step(self, cache: PeerCache, ids: np.ndarray) -> tuple[np.ndarray, PeerCache]:
        """ids [B, S] (all valid, at positions cache.length..+S-1) -> (logits [B, S, V], the longer cache)."""
        import onnxruntime as ort
        batch, seq = ids.shape
        feed = {"input_ids": ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(ids, dtype=np.int64))}
        if self.has_mask:
            feed["attention_mask"] = ort.OrtValue.ortvalue_from_numpy(
                np.ones((batch, cache.length + seq), dtype=np.int64))
        if self.has_positions:
            positions = np.broadcast_to(np.arange(cache.length, cache.length + seq, dtype=np.int64), (batch, seq))
            feed["position_ids"] = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(positions))
        feed.update(zip(self.past, cache.values))
        out = self.session.run_with_ort_values(["logits", *self.present], feed)
        return out[0].numpy(), PeerCache(list(out[1:]), cache.length + seq)

    def prefill(self, ids: np.ndarray, chunk: int | None = None) -> tuple[np.ndarray, PeerCache]:
        """ids [B, S] in chunks of `chunk` tokens (None: one go) -> (last-token logits [B, V], cache)."""
        batch, width = ids.shape
        if width < 1:
            raise EigenError("the prompt needs at least one token")
        if chunk is not None and chunk < 1:
            raise EigenError("prefill_chunk must be >= 1")
        cache = self.new_cache(batch)
        step = chunk or width
        for start in range(0, width, step):
            logits, cache = self.step(cache, ids[:, start:start + step])
        return logits[:, -1], cache

    def greedy(self, ids: np.ndarray, new_tokens: int, chunk: int | None = None) -> np.ndarray:
        """ids [B, S] -> the next `new_tokens` greedy tokens [B, new_tokens]."""
        last, cache = self.prefill(ids, chunk)
        out = []
        for t in range(new_tokens):
            out.append(last.argmax(-1))
            if t < new_tokens - 1:
                logits, cache = self.step(cache, out[-1][:, None])
                last = logits[:, -1]
        return np.stack(out, axis=1) if out else np.zeros((len(ids), 0), np.int64)
