"""A peer baseline: an ONNX Runtime GenAI model folder (genai_config.json + model.onnx, built by
ORT-GenAI's own model builder, tools/ortgenai_peer.py), run by ORT-GenAI's own runtime
(`og.Model`, `og.GeneratorParams`, `og.Generator`) in this process, on the CPU.

How it is driven (the ways ORT-GenAI offers to feed tokens chosen outside it):
- The cache is one `og.Generator`, created by `new_cache(batch, capacity)` with search options
  batch_size = B and max_length = capacity: ORT-GenAI then allocates its KV cache once, per
  layer [B, Hkv, capacity, D] (`past_present_share_buffer`), and writes each step in place.
- batch 1: every step is `append_tokens(ids [1, S])` (prefill chunks and decode tokens alike,
  ORT-GenAI's continuous decoding); logits come from `get_output("logits")` [1, S, V].
- batch B > 1: ORT-GenAI takes `append_tokens` once per generator, so the prompt is prefilled in
  one step (a chunked prefill is refused) and each decode step is its own decode loop:
  `generate_next_token()` (its greedy search; when the caller's token is not its greedy pick,
  `set_logits` first forces it) then `get_logits()` [B, 1, V], which runs the model on the token.
  Its search ends a sequence of a batch at an end token and feeds it padding afterwards, so the
  engine sets the end token to the last vocabulary id (overlay of `model.eos_token_id`) and
  refuses a batch decode step that feeds that id (EigenError) rather than return wrong logits.

It implements `Engine` (engines/backend.py), so `generate`, prefill and `bench` drive it like our
engines. Its cache holds batches of equal-length prompts only, cannot evict, and takes positions
contiguous from 0 (ORT-GenAI places tokens itself). `threads` sets ORT-GenAI's decoder session
option intra_op_num_threads through an `og.Config.overlay` (0 = ONNX Runtime's default), as our
engines set theirs. `peer.json` beside the model (written by tools/ortgenai_peer.py) is
optional; when present its `source_hash` ties the model to a checkpoint.

Module API for a peer registry: `NAME`, `accepts(path)`, `load(path, threads)`. onnxruntime-genai
is imported only when a model is loaded (EigenError with the install command if it is absent).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from eigenkv.artifacts import read_json_object
from eigenkv.engines.backend import Engine, KVCache
from eigenkv.errors import EigenError
from eigenkv.manifest import KVLayout, precision_of

NAME = "onnxruntime-genai"
PACKAGE_SPEC = "onnxruntime-genai==0.18.0"  # the version this adapter was written and tested against
CONFIG_FILE = "genai_config.json"
_REBUILD = "rebuild it with `python tools/ortgenai_peer.py -o DIR`"


def accepts(path: Path) -> bool:
    """True for a folder holding genai_config.json (cheap: nothing is read or imported)."""
    path = Path(path)
    return path.is_dir() and (path / CONFIG_FILE).is_file()


@dataclass(frozen=True)
class GenAIFolder:
    """What genai_config.json and the graph's signature say about an ORT-GenAI decoder folder."""

    model: Path  # the decoder graph (model.onnx)
    n_layers: int
    n_kv_heads: int
    head_dim: int
    context_length: int  # tokens
    vocab_size: int
    input_ids: str
    attention_mask: str
    past_key: str  # name patterns with %d for the layer
    past_value: str
    present_key: str
    present_value: str
    logits: str
    dtype: type  # numpy dtype of the KV cache (float32 or float16)
    last_logits_only: bool  # logits [B, 1, V]: built with prune_lm_head


def read_folder(path: Path) -> GenAIFolder:
    """Read an ORT-GenAI folder without onnxruntime-genai (weights not loaded). EigenError (one
    line) if it has no genai_config.json, the config is not a decoder's, or the graph is missing."""
    path = Path(path)
    if not accepts(path):
        raise EigenError(f"{path} has no {CONFIG_FILE}: not an ORT-GenAI model folder; {_REBUILD}")
    config = read_json_object(path / CONFIG_FILE, _REBUILD)
    model_cfg = config.get("model") if isinstance(config.get("model"), dict) else {}
    decoder = model_cfg.get("decoder") if isinstance(model_cfg.get("decoder"), dict) else {}
    try:
        inputs, outputs = decoder["inputs"], decoder["outputs"]
        fields = dict(n_layers=int(decoder["num_hidden_layers"]), n_kv_heads=int(decoder["num_key_value_heads"]),
                      head_dim=int(decoder["head_size"]), context_length=int(model_cfg["context_length"]),
                      vocab_size=int(model_cfg["vocab_size"]), input_ids=str(inputs.get("input_ids", "input_ids")),
                      attention_mask=str(inputs.get("attention_mask", "attention_mask")),
                      past_key=str(inputs["past_key_names"]), past_value=str(inputs["past_value_names"]),
                      present_key=str(outputs["present_key_names"]), present_value=str(outputs["present_value_names"]),
                      logits=str(outputs.get("logits", "logits")))
        filename = str(decoder["filename"])
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise EigenError(f"{path / CONFIG_FILE} is not an ORT-GenAI decoder config (missing or bad "
                         f"{e}); {_REBUILD}") from None
    if not (path / filename).is_file():
        raise EigenError(f"{path} lacks {filename}, named by its {CONFIG_FILE}; {_REBUILD}")
    dtype, last_only = _graph_io(path / filename, fields["past_key"] % 0, fields["logits"])
    return GenAIFolder(model=path / filename, dtype=dtype, last_logits_only=last_only, **fields)


def load(path: Path, threads: int = 0) -> "GenAIEngine":
    """The ORT-GenAI folder `path`, loaded for the CPU with `threads` intra-op threads (0 = ONNX
    Runtime's default). EigenError (one line) if onnxruntime-genai is missing or the folder is not
    an ORT-GenAI decoder model."""
    return GenAIEngine(Path(path), threads)


def import_genai():
    """The onnxruntime_genai module, or a one-line EigenError saying how to install it."""
    try:
        import onnxruntime_genai
    except ImportError as e:
        raise EigenError(f"onnxruntime-genai is not importable ({e}); install it with `pip install "
                         f"{PACKAGE_SPEC}` (it needs onnxruntime >= 1.31)") from None
    return onnxruntime_genai


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


class GenAICache(KVCache):
    """One `og.Generator`: ORT-GenAI's KV cache, per layer [B, Hkv, capacity, D] in the model's
    precision, allocated when the generator is created and filled in place (search option
    past_present_share_buffer, on in what the builder writes; off, ORT-GenAI grows it per step).

    `length` is the tokens each sequence holds (all equal); `lengths` [L, B] follows it."""

    def __init__(self, engine: "GenAIEngine", batch: int, capacity: int):
        og = engine.og
        self.engine, self.layout, self.batch, self.capacity = engine, engine.layout, batch, capacity
        self.itemsize = np.dtype(engine.dtype).itemsize
        self.lengths = np.zeros((engine.layout.n_layers, batch), np.int64)
        self.length = 0
        self.greedy: np.ndarray | None = None  # [B] ORT-GenAI's greedy pick from the last logits
        try:
            params = og.GeneratorParams(engine.model)
            params.set_search_options(batch_size=batch, max_length=capacity)
            self.generator = og.Generator(engine.model, params)
            self.preallocated = bool(params.get_search_options().get("past_present_share_buffer", True))
        except Exception as e:  # noqa: BLE001 - ORT-GenAI raises RuntimeError for everything
            raise EigenError(f"ORT-GenAI cannot create a generator for batch {batch}, {capacity} tokens: "
                             f"{_first_line(e)}") from None

    @property
    def capacities(self) -> list[int]:
        return [self.capacity] * self.layout.n_layers

    @property
    def nbytes(self) -> int:
        """Bytes of all K and V buffers: [B, Hkv, capacity, D] per layer and kind, preallocated when the
        search option past_present_share_buffer is on (the builder's default), else [B, Hkv, length, D]."""
        lay, slots = self.layout, self.capacity if self.preallocated else self.length
        return 2 * lay.n_layers * self.batch * lay.n_kv_heads * slots * lay.head_dim * self.itemsize

    def pointers(self) -> list[int]:
        """[]: ORT-GenAI owns its buffers and exposes no addresses."""
        return []

    def positions(self, layer: int) -> np.ndarray:
        """int32 [B, Hkv, length]: slot s holds position s (read-only view)."""
        return np.broadcast_to(np.arange(self.length, dtype=np.int32),
                               (self.batch, self.layout.n_kv_heads, self.length))

    def keys(self, layer: int) -> np.ndarray:
        """[B, Hkv, length, D] cached keys of `layer` (a host copy of ORT-GenAI's present output)."""
        if self.length == 0:
            return np.zeros((self.batch, self.layout.n_kv_heads, 0, self.layout.head_dim), self.engine.dtype)
        return self.generator.get_output(self.engine.present_key % layer)[:, :, :self.length]

    def keep(self, layer: int, seq: int, slots: np.ndarray) -> None:
        raise EigenError("the ORT-GenAI peer's cache lives inside its generator and cannot evict; bench it "
                         "without eviction")

    def write_positions(self, positions: np.ndarray) -> None:
        pass  # ORT-GenAI places tokens itself; `step` checks that positions continue from `length`

    def advance(self, counts: np.ndarray) -> None:
        counts = np.asarray(counts)
        if (counts != self.length - self.lengths[0]).any():
            raise EigenError("the ORT-GenAI peer runs batches of equal-length prompts only")
        super().advance(counts)


class GenAIEngine(Engine):
    """An ORT-GenAI decoder folder (genai_config.json, model.onnx [+ data], optional peer.json),
    loaded by ORT-GenAI for the CPU execution provider.

    Raises EigenError (one line) when onnxruntime-genai is absent, the folder lacks a decoder
    config or model, or ORT-GenAI cannot load it."""

    name = NAME
    batch_prefill_in_one_step = True  # one append_tokens per generator at B > 1

    def __init__(self, model_dir: Path, threads: int = 0):
        self.dir = Path(model_dir)
        if not accepts(self.dir):
            raise EigenError(f"{self.dir} has no {CONFIG_FILE}: not an ORT-GenAI model folder; {_REBUILD}")
        if threads < 0:
            raise EigenError(f"threads must be >= 0 (0 = ONNX Runtime's default), got {threads}")
        self.og = import_genai()
        folder = read_folder(self.dir)
        self.context_length, self._vocab = folder.context_length, folder.vocab_size
        self.present_key, self.logits_name = folder.present_key, folder.logits
        self.dtype, self.last_logits_only = folder.dtype, folder.last_logits_only
        self.precision = precision_of(np.dtype(self.dtype))
        self.layout = KVLayout(folder.n_layers, folder.n_kv_heads, folder.head_dim, [folder.head_dim] * folder.n_layers,
                               [folder.head_dim] * folder.n_layers, self.context_length, slot_positions=False)
        self.eos_token = self._vocab - 1  # the end token set for ORT-GenAI's search (see the module doc)
        self.info = read_json_object(self.dir / "peer.json", _REBUILD) if (self.dir / "peer.json").is_file() else {}
        session = {"log_severity_level": 3}
        if threads:
            session["intra_op_num_threads"] = int(threads)
        overlay = {"model": {"eos_token_id": self.eos_token, "decoder": {"session_options": session}}}
        try:
            og_config = self.og.Config(str(self.dir))
            og_config.clear_providers()  # the CPU execution provider
            og_config.overlay(json.dumps(overlay))
            self.model = self.og.Model(og_config)
        except Exception as e:  # noqa: BLE001 - ORT-GenAI raises RuntimeError for everything
            raise EigenError(f"ORT-GenAI cannot load {self.dir}: {_first_line(e)}; {_REBUILD}") from None
        self.threads = threads

    @property
    def vocab_size(self) -> int:
        """V of the logits [B, S, V]."""
        return self._vocab

    @property
    def source_hash(self) -> str | None:
        """sha256 of the source checkpoint (peer.json), or None without one."""
        return self.info.get("source_hash")

    @property
    def label(self) -> str:
        """'onnxruntime-genai <version>' (the runtime that runs the model), with the weights'
        precision when peer.json names one other than fp32 (e.g. '... int4')."""
        dtype = self.info.get("dtype")
        return f"{NAME} {self.og.__version__}" + (f" {dtype}" if dtype and dtype != "fp32" else "")

    @property
    def max_positions(self) -> int | None:
        """The model's context_length (tokens) from genai_config.json."""
        return self.context_length

    def new_cache(self, batch: int, capacity: int | list[int]) -> GenAICache:
        """A fresh generator for `batch` sequences of up to `capacity` tokens each (one int, or one
        equal value per layer); EigenError if it exceeds context_length or layers differ."""
        caps = self.check_capacity(capacity)
        if len(set(caps)) != 1:
            raise EigenError("the ORT-GenAI peer's cache has one capacity for all layers")
        if batch < 1:
            raise EigenError(f"batch must be >= 1, got {batch}")
        return GenAICache(self, batch, caps[0])

    def step(self, cache: GenAICache, ids: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """ids, positions int64 [B, S] -> logits [B, S, V] (float32 host array, a copy; [B, 1, V],
        the last position's, for a model built with a pruned LM head: `last_logits_only`).

        Positions must be cache.length..cache.length+S-1 for every sequence. EigenError if they are
        not, if ids are outside the vocabulary, if the tokens overflow the capacity, for a second
        multi-token step at B > 1 (ORT-GenAI prefills a batch in one step), or for a B > 1 decode
        token equal to the end token set for ORT-GenAI's search (the last vocabulary id)."""
        ids = np.asarray(ids)
        if ids.ndim != 2 or ids.shape[0] != cache.batch or ids.shape[1] < 1:
            raise EigenError(f"ids must be [{cache.batch}, S>=1], got {list(ids.shape)}")
        batch, seq = ids.shape
        expected = np.arange(cache.length, cache.length + seq)
        if np.shape(positions) != ids.shape or (np.asarray(positions) != expected).any():
            raise EigenError(f"the ORT-GenAI peer takes positions contiguous from 0: this step must be at "
                             f"{cache.length}..{cache.length + seq - 1} for every sequence")
        if ids.min() < 0 or ids.max() >= self._vocab:
            raise EigenError(f"token ids must be in 0..{self._vocab - 1}")
        if cache.length + seq > cache.capacity:
            raise EigenError(f"KV cache full: the ORT-GenAI generator holds {cache.length} of {cache.capacity} "
                             f"tokens, {seq} more tokens do not fit")
        tokens = np.ascontiguousarray(ids, dtype=np.int32)
        generator = cache.generator
        try:
            if cache.length == 0 or batch == 1:
                generator.append_tokens(tokens)
                logits = generator.get_output(self.logits_name)
            elif seq == 1:
                logits = self._decode_batch(cache, tokens[:, 0])
            else:
                raise EigenError("ORT-GenAI takes a batch of several sequences in one prefill step only: "
                                 "prefill with a chunk >= the prompt length, or batch 1")
        except RuntimeError as e:
            raise EigenError(f"ORT-GenAI failed at token {cache.length}: {_first_line(e)}") from None
        cache.length += seq
        if batch > 1:  # what its greedy search picks next (batch 1 never asks it)
            cache.greedy = logits[:, -1].argmax(-1)
        return logits if logits.dtype == np.float32 else logits.astype(np.float32)

    def _decode_batch(self, cache: GenAICache, tokens: np.ndarray) -> np.ndarray:
        """One decode token per sequence [B] through ORT-GenAI's decode loop -> logits [B, 1, V]."""
        if (tokens == self.eos_token).any():
            raise EigenError(f"token {self.eos_token} is the end token set for ORT-GenAI's search, which would "
                             "feed padding after it: a batch decode step cannot take it (batch 1 can)")
        generator = cache.generator
        if cache.greedy is None or (tokens != cache.greedy).any():
            forced = np.full((cache.batch, self._vocab), -1e30, np.float32)
            forced[np.arange(cache.batch), tokens] = 0.0
            generator.set_logits(forced)  # its greedy search then picks exactly `tokens`
        generator.generate_next_token()
        chosen = generator.get_next_tokens()
        if (chosen != tokens).any():
            raise EigenError(f"ORT-GenAI's search took tokens {chosen.tolist()} instead of {tokens.tolist()}")
        return generator.get_logits()  # runs the model on `tokens`


def _graph_io(model: Path, past_name: str, logits_name: str):
    """(numpy dtype of the graph input `past_name`, whether the output `logits_name` holds one
    position [B, 1, V]: a model built with `prune_lm_head`), read from the graph, weights not
    loaded."""
    import onnx
    try:
        graph = onnx.load(str(model), load_external_data=False).graph
    except Exception as e:  # noqa: BLE001 - protobuf decode errors have no common base
        raise EigenError(f"{model} is corrupt ({_first_line(e)}); {_REBUILD}") from None
    dims = [list(v.type.tensor_type.shape.dim) for v in graph.output if v.name == logits_name]
    last_only = bool(dims) and len(dims[0]) == 3 and dims[0][1].dim_value == 1
    for value in graph.input:
        if value.name == past_name:
            elem = value.type.tensor_type.elem_type
            if elem == onnx.TensorProto.FLOAT:
                return np.float32, last_only
            if elem == onnx.TensorProto.FLOAT16:
                return np.float16, last_only
            raise EigenError(f"{model}: cache type {onnx.TensorProto.DataType.Name(elem)} is not supported "
                             "(float32 or float16)")
    raise EigenError(f"{model} has no input {past_name}: not the decoder its {CONFIG_FILE} describes; {_REBUILD}")
