"""The `torch` backend: the folded `EigenDecoder` in PyTorch, with static KV buffers.

For GPU hosts without TensorRT, and this project's way to measure on a GPU.

Engine directory (written by `build`, self-contained: loading reads nothing else):
  config.json         EngineConfig (layout, I/O, source, the loader's options)
  model.safetensors   every tensor of the folded decoder (embeddings, norms, MLP, the folded
                      attention of every layer, lm_head) in the export's precision; metadata
                      `eigenkv` = {rope_mode, precision}
  hf_config.json      the source checkpoint's transformers config: the module skeleton is
                      rebuilt from it (no weights are initialised) and filled from the file
`build` takes the non-attention weights from the source checkpoint (`manifest.source`, hash
checked) and the folded attention from the export's `OUT.projections.safetensors`. Only
`eigenkv run` still reads the source directory, for the tokenizer (as for every backend).

Run: `TorchEngine.step` runs the decoder's own modules (embedding, norms, projections, RoPE,
MLP, head) and, per layer, writes the step's K/V and slot positions into the cache's static
buffers at `cache.lengths`, then calls one attention implementation with the op's signature
(`plugins/reference.py`):
  reference  the op as the model calls it (`low_rank_attention_op`: the reference's result through
             PyTorch's fused attention, `plugins/sdpa_attention.py`): CPU default
  triton     the fused kernel (`plugins/triton_attention.py`): CUDA default for compressed caches
  sdpa       torch scaled_dot_product_attention over keys ready to score (uncompressed or rank-space
             caches) with a slot-position mask: CUDA default for `--no-compress` exports
On CUDA, decode steps (one token per sequence) are captured once per cache in a CUDA graph
(static ids/positions/lengths buffers, replayed every step); prefill runs eagerly. On the CPU
the cache is a `HostKVCache` whose numpy buffers the torch tensors share, so `keep` and the
runtime see one memory. An fp16 engine runs in float32 on the CPU (`check_host` says so).

Tested on the CPU only: the reference and SDPA attention, the kernel under TRITON_INTERPRET, and
the CUDA-graph bookkeeping with an eager stand-in for `CudaGraphs`. The CUDA paths themselves
(graph capture and replay, the compiled kernel, fp16 on a GPU) are what `tools/gpu_check.py`
checks on a GPU host.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from eigenkv.engines.backend import Backend, Engine, HostKVCache, KVCache, TensorKVCache
from eigenkv.engines.config import EngineConfig
from eigenkv.errors import EigenError
from eigenkv.manifest import KVLayout, Manifest, precision_of, torch_dtype
from eigenkv.plugins.spec import RopeMode

MODEL_FILE = "model.safetensors"
HF_CONFIG_FILE = "hf_config.json"
ATTENTIONS = ("auto", "reference", "triton", "sdpa")
DEVICES = ("auto", "cpu", "cuda")


# --------------------------------------------------------------------------- attention implementations

def sdpa_attention(query, key_cache, value_cache, cache_lengths, query_positions, *, scale: float,
                   rope_mode: int = 0, causal: bool = True, slot_positions=None, key_up=None, rope_cos=None,
                   rope_sin=None, alibi_slopes=None, window: int = 0) -> torch.Tensor:
    """The op through torch's scaled_dot_product_attention, for caches whose keys are ready to score
    (rope_mode 0: uncompressed rotated keys, no-RoPE or rank-space keys). Same arguments and result
    [B, Hq, S, r_v] as `reference.low_rank_attention`.

    The G = Hq / Hkv query heads of a KV head are folded into the query length ([B, Hkv, G*S, d]),
    so no key or value is repeated and a masked kernel (memory-efficient attention on CUDA) applies;
    its boolean mask [B, Hkv, G*S, Smax] keeps slot < cache_lengths and, causal, slot position <=
    query position (per KV head: eviction compacts heads differently); ALiBi turns it into a bias.
    Reads all Smax slots. ValueError for rope_mode 1 (pre-RoPE rank keys need the reference or the kernel).
    """
    import torch.nn.functional as F
    if rope_mode != 0:
        raise ValueError("sdpa attention needs keys cached ready to score (rope_mode 0), not pre-RoPE rank keys")
    batch, n_q, seq, dq = query.shape
    n_kv, n_slots = key_cache.shape[1], key_cache.shape[2]
    groups = n_q // n_kv
    slot = torch.arange(n_slots, device=query.device)
    valid = (slot[None, :] < cache_lengths.to(torch.int64)[:, None])[:, None, None, :]  # [B, 1, 1, Smax]
    q_pos = query_positions.to(torch.int64)[:, None, :, None]  # [B, 1, S, 1]
    k_pos = slot[None, None, None, :] if slot_positions is None else slot_positions.to(torch.int64)[:, :, None, :]
    if causal:
        valid = valid & (k_pos <= q_pos)  # [B, Hkv or 1, S, Smax]
    if window > 0:  # sliding window: q_pos - k_pos < window
        valid = valid & (q_pos - k_pos < window)
    valid = valid.expand(batch, n_kv, seq, n_slots)[:, :, None].expand(batch, n_kv, groups, seq, n_slots)
    mask = valid.reshape(batch, n_kv, groups * seq, n_slots)
    if alibi_slopes is not None:
        slopes = alibi_slopes.to(torch.float32).view(1, n_kv, groups, 1, 1)
        distance = (q_pos - k_pos).to(torch.float32).expand(batch, n_kv, seq, n_slots)[:, :, None]
        bias = (-slopes * distance).masked_fill(~valid, float("-inf"))
        mask = bias.reshape(batch, n_kv, groups * seq, n_slots).to(query.dtype)
    out = F.scaled_dot_product_attention(query.reshape(batch, n_kv, groups * seq, dq), key_cache.to(query.dtype),
                                         value_cache.to(query.dtype), attn_mask=mask, scale=scale)
    return out.reshape(batch, n_q, seq, value_cache.shape[3])


def _triton_attention(*args, **kwargs) -> torch.Tensor:
    from eigenkv.plugins.triton_attention import low_rank_attention_triton
    return low_rank_attention_triton(*args, **kwargs)


def _reference_attention(*args, **kwargs) -> torch.Tensor:
    from eigenkv.plugins.torch_op import low_rank_attention_op
    return low_rank_attention_op(*args, **kwargs)


ATTEND: dict[str, Callable] = {"reference": _reference_attention, "triton": _triton_attention, "sdpa": sdpa_attention}


def _triton_usable(device: torch.device) -> bool:
    """Whether the kernel can run on `device`: triton importable and a CUDA device or TRITON_INTERPRET."""
    import importlib.util

    from eigenkv.plugins.triton_attention import _interpreting
    return importlib.util.find_spec("triton") is not None and (device.type == "cuda" or _interpreting())


def uncompressed(layout: KVLayout, rope_mode: RopeMode) -> bool:
    """Whether the cache holds full-width keys ready to score (a `--no-compress` export)."""
    full = all(r == layout.head_dim for r in layout.key_ranks + layout.value_ranks)
    return rope_mode is RopeMode.ROTATED or (rope_mode is RopeMode.NONE and full)


def resolve_attention(attention: str, device: torch.device, layout: KVLayout, rope_mode: RopeMode) -> str:
    """'auto' -> reference on the CPU; on CUDA sdpa for uncompressed caches, else triton (reference,
    with a warning, when triton is missing). EigenError for an unknown name or one that cannot run."""
    if attention not in ATTENTIONS:
        raise EigenError(f"attention must be one of {', '.join(ATTENTIONS)}, got {attention!r}")
    if attention == "auto":
        if device.type != "cuda":
            return "reference"
        if uncompressed(layout, rope_mode):
            return "sdpa"
        if _triton_usable(device):
            return "triton"
        warnings.warn("triton is not installed: the torch engine runs the torch op's attention on CUDA "
                      "(pip install 'eigenkv[triton]')", stacklevel=2)
        return "reference"
    if attention == "triton" and not _triton_usable(device):
        raise EigenError("attention 'triton' needs triton and a CUDA device (or TRITON_INTERPRET=1 on the CPU)")
    if attention == "sdpa" and rope_mode is RopeMode.PRE:
        raise EigenError("attention 'sdpa' needs keys ready to score; this engine caches pre-RoPE rank keys "
                         "(use triton or reference)")
    return attention


def resolve_device(device: str | torch.device | None) -> torch.device:
    """'auto'/None -> cuda when available, else cpu. EigenError for cuda without a CUDA device."""
    name = str(device or "auto")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type not in ("cpu", "cuda"):
        raise EigenError(f"device must be one of {', '.join(DEVICES)}, got {name!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise EigenError(f"device {name!r} requested but torch sees no CUDA device")
    return dev


# --------------------------------------------------------------------------- caches

class _TensorCache:
    """What the runner needs from a cache: per layer torch (key, value, slot positions) and the
    lengths before this step as a torch tensor [L, B] on the engine's device."""

    def step_lengths(self) -> torch.Tensor:
        raise NotImplementedError

    def write_positions(self, positions: np.ndarray) -> None:
        """Only the capacity check: the step writes positions into the slot buffers with K and V
        (on the device, inside the CUDA graph), at each layer's lengths."""
        self.check_room(positions.shape[1])


class TorchHostKVCache(_TensorCache, HostKVCache):
    """HostKVCache (numpy, CPU) whose buffers torch tensors share without copies."""

    def __init__(self, layout: KVLayout, batch: int, capacities: list[int], precision: str):
        HostKVCache.__init__(self, layout, batch, capacities, precision)
        self.tensors = [torch.from_numpy(b) for b in self.buffers]
        self.slot_tensors = [torch.from_numpy(p) for p in self.slot_positions]

    def layer_tensors(self, layer: int):
        return self.tensors[2 * layer], self.tensors[2 * layer + 1], self.slot_tensors[layer]

    def step_lengths(self) -> torch.Tensor:
        return torch.from_numpy(self.lengths)


class TorchDeviceKVCache(_TensorCache, TensorKVCache):
    """Per-layer K/V [B, Hkv, C_i, r] and slot positions [B, Hkv, C_i] (int32) on a CUDA device;
    `lengths` [L, B] stays on the host (the runtime's) and is copied into `lengths_device`, a
    static buffer the CUDA graph reads, before every step. `positions`/`keys` return host copies."""

    def __init__(self, layout: KVLayout, batch: int, capacities: list[int], dtype: torch.dtype,
                 device: torch.device):
        TensorKVCache.__init__(self, layout, batch, capacities, dtype, device)
        self.lengths_device = torch.zeros(layout.n_layers, batch, dtype=torch.int64, device=device)
        self.graph = None  # (replay, static ids, static positions, static logits) once captured
        self.eager_decode_steps = 0

    def step_lengths(self) -> torch.Tensor:
        self.lengths_device.copy_(torch.from_numpy(self.lengths))
        return self.lengths_device


class _StepWriter:
    """The `cache.write` protocol of `LowRankAttention` over one step of a cache's static buffers."""

    def __init__(self, cache: _TensorCache, lengths: torch.Tensor):
        self.cache, self.lengths = cache, lengths

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor):
        """k [B, Hkv, S, r_k], v [B, Hkv, S, r_v], positions [B, S] written at slots lengths[layer] +
        0..S-1 (with the positions) -> (key buffer, value buffer, lengths after [B], slot positions)."""
        keys, values, slots = self.cache.layer_tensors(layer)
        starts = self.lengths[layer]
        batch, heads, seq, _ = k.shape
        index = (starts[:, None] + torch.arange(seq, device=starts.device))[:, None, :].expand(batch, heads, seq)
        for buf, new in ((keys, k), (values, v)):
            buf.scatter_(2, index[..., None].expand(-1, -1, -1, new.shape[3]), new.to(buf.dtype))
        slots.scatter_(2, index, positions[:, None, :].expand(batch, heads, seq).to(torch.int32))
        return keys, values, starts + seq, slots

    def advance(self, seq: int) -> None:  # the runtime advances the cache's lengths itself
        pass


# --------------------------------------------------------------------------- the runner

def attention_forward(attn, x: torch.Tensor, positions: torch.Tensor, rope, writer: _StepWriter, layer: int,
                      attend: Callable) -> torch.Tensor:
    """`LowRankAttention.forward` with the attention implementation `attend`: x [B, S, hidden] -> [B, S, hidden]."""
    rope = attn.layer_rope(rope)
    q, k, v = attn.project(x, positions, rope)
    k, v, lengths, slots = writer.write(layer, k, v, positions)
    pre = attn.rope_mode is RopeMode.PRE
    out = attend(q, k, v, lengths, positions, scale=attn.scale, rope_mode=attn.rope_mode.op_code,
                 slot_positions=slots, key_up=attn.key_up if pre else None, rope_cos=rope.cos if pre else None,
                 rope_sin=rope.sin if pre else None, alibi_slopes=attn.alibi_slopes,
                 window=attn.window)  # [B, Hq, S, r_v]
    batch, seq = positions.shape
    return attn.o_proj(out.transpose(1, 2).reshape(batch, seq, -1))


def decoder_forward(decoder, ids: torch.Tensor, positions: torch.Tensor, writer: _StepWriter,
                    attend: Callable) -> torch.Tensor:
    """`EigenDecoder.forward` over a step writer: ids, positions [B, S] -> logits [B, S, V]
    (`EigenLayer`: x + attn_post_norm(attn(attn_norm(x))), then its MLP block)."""
    h = decoder.embed_inputs(ids, positions)
    for i, layer in enumerate(decoder.layers):
        h = h + layer.attn_post_norm(attention_forward(layer.attn, layer.attn_norm(h), positions, decoder.rope,
                                                       writer, i, attend))
        h = layer.mlp_block(h)
    return decoder.head(h)


def for_dtype(decoder, dtype: torch.dtype):
    """The decoder to run in `dtype`: float32 -> the decoder itself, cast in place; fp16 -> the fp16
    graph's mixed-precision copy (`exporter.export._cast_copy`: weights, projections, MLPs,
    attention and KV cache in fp16; residual stream, norms, RoPE tables and softmax in float32),
    so a torch engine computes what the exported fp16 graph does."""
    if dtype == torch.float32:
        return decoder.float()
    from eigenkv.exporter.export import _cast_copy
    return _cast_copy(decoder, dtype)


def layout_of(decoder, max_seq_len: int) -> KVLayout:
    """The cache geometry of an EigenDecoder (folded or not)."""
    d = decoder.dims
    return KVLayout(d.n_layers, d.n_kv_heads, d.head_dim, decoder.key_ranks, decoder.value_ranks, max_seq_len)


class TorchEngine(Engine):
    """A folded EigenDecoder on a device; `step` runs it once over a cache's static buffers.

    decoder: an EigenDecoder whose RoPE tables cover layout.max_seq_len positions (float32: moved
    in place; fp16: a mixed-precision copy, `for_dtype`); precision: the engine's (fp32 | fp16),
    the compute and cache dtype on CUDA; the CPU computes in float32 unless `dtype` says otherwise
    (tests). device: auto | cpu | cuda[:i]; attention: auto | reference | triton | sdpa (see the
    module docstring); cuda_graph: capture decode steps on CUDA (ignored on the CPU).
    """

    name = "torch"

    def __init__(self, decoder, layout: KVLayout, precision: str, *, device: str | torch.device | None = "auto",
                 attention: str = "auto", cuda_graph: bool = True, dtype: torch.dtype | None = None):
        self.device = resolve_device(device)
        self.built_precision = precision
        self.dtype = dtype or (torch_dtype(precision) if self.device.type == "cuda" else torch.float32)
        self.precision = precision_of(self.dtype)
        self.layout = layout
        self.rope_mode = decoder.layers[0].attn.rope_mode
        if list(layout.key_ranks) != decoder.key_ranks or list(layout.value_ranks) != decoder.value_ranks:
            raise EigenError("the decoder's ranks differ from the engine's KV layout: rebuild the engine")
        self._vocab_size = int(decoder.lm_head.weight.shape[0])
        self.decoder = for_dtype(decoder, self.dtype).to(self.device).eval().requires_grad_(False)
        self.attention = resolve_attention(attention, self.device, layout, self.rope_mode)
        self.attend = ATTEND[self.attention]
        self.cuda_graph = bool(cuda_graph) and self.device.type == "cuda"
        self.graph_captures = self.graph_replays = 0  # counters (gpu_check reports them)
        self.graphs = CudaGraphs(self.device) if self.cuda_graph else None
        self._key_grams = {i: layer.attn.key_gram.detach().float().cpu().numpy()
                           for i, layer in enumerate(self.decoder.layers) if layer.attn.key_gram is not None}

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def key_gram(self, layer: int) -> np.ndarray | None:
        return self._key_grams.get(layer)

    def new_cache(self, batch: int, capacity: int | list[int]) -> KVCache:
        caps = self.check_capacity(capacity)
        if self.device.type == "cuda":
            return TorchDeviceKVCache(self.layout, batch, caps, self.dtype, self.device)
        return TorchHostKVCache(self.layout, batch, caps, self.precision)

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _inputs(self, ids: np.ndarray, positions: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """int64 host arrays [B, S] -> tensors on the engine's device."""
        as_tensor = lambda a: torch.from_numpy(np.array(a, dtype=np.int64, copy=True)).to(self.device)  # noqa: E731
        return as_tensor(ids), as_tensor(positions)

    @torch.no_grad()
    def forward(self, cache: _TensorCache, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """One eager pass: ids, positions [B, S] (device tensors) -> logits [B, S, V] (device)."""
        return decoder_forward(self.decoder, ids, positions, _StepWriter(cache, cache.step_lengths()), self.attend)

    def step(self, cache: _TensorCache, ids: np.ndarray, positions: np.ndarray) -> np.ndarray:
        ids, positions = np.asarray(ids), np.asarray(positions)
        cache.write_positions(positions)
        if self.graphs is not None and ids.shape[1] == 1 and isinstance(cache, TorchDeviceKVCache):
            static = self._graph_step(cache, ids, positions)  # overwritten by the next replay: always copy
            return static.to("cpu", torch.float32, copy=True).numpy()
        return self.forward(cache, *self._inputs(ids, positions)).float().cpu().numpy()

    def _graph_step(self, cache: TorchDeviceKVCache, ids: np.ndarray, positions: np.ndarray) -> torch.Tensor:
        """A decode step through the cache's CUDA graph: the first decode step of a cache runs
        eagerly on the graphs' stream (Triton compiles, cuBLAS initialises), the second captures
        (capturing runs nothing), then every step copies ids/positions/lengths into the static
        buffers and replays. Returns the static logits [B, 1, V] (valid until the next replay)."""
        if cache.graph is None and cache.eager_decode_steps == 0:
            cache.eager_decode_steps += 1
            return self.graphs.run(lambda: self.forward(cache, *self._inputs(ids, positions)))
        if cache.graph is None:
            static_ids, static_pos = self._inputs(ids, positions)
            lengths = cache.step_lengths()  # the static lengths buffer the graph reads
            with torch.no_grad():
                replay, static_logits = self.graphs.capture(lambda: decoder_forward(
                    self.decoder, static_ids, static_pos, _StepWriter(cache, lengths), self.attend))
            cache.graph = (replay, static_ids, static_pos, static_logits)
            self.graph_captures += 1
        replay, static_ids, static_pos, static_logits = cache.graph
        static_ids.copy_(torch.from_numpy(np.ascontiguousarray(ids, dtype=np.int64)))
        static_pos.copy_(torch.from_numpy(np.ascontiguousarray(positions, dtype=np.int64)))
        cache.step_lengths()
        replay()
        self.graph_replays += 1
        return static_logits


class CudaGraphs:
    """Capture and replay on one CUDA device, torch's recipe: eager warm-up and capture run on a
    side stream ordered after (and before) the current stream's work; replays run on the current
    stream. `TorchEngine.graphs`; tests put an eager stand-in with the same two methods there."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device)

    def run(self, fn: Callable):
        """fn() on the side stream; its result once the current stream may use it."""
        current = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(current)
        with torch.cuda.stream(self.stream):
            out = fn()
        current.wait_stream(self.stream)
        return out

    def capture(self, fn: Callable) -> tuple[Callable[[], None], torch.Tensor]:
        """(replay, output): fn's kernels recorded in a CUDA graph, not run; each replay() runs them
        and writes `output` (memory of the graph's private pool) in place."""
        graph = torch.cuda.CUDAGraph()

        def record():
            with torch.cuda.graph(graph, stream=self.stream):
                return fn()
        output = self.run(record)
        return graph.replay, output


# --------------------------------------------------------------------------- build / check / load

def _source(manifest: Manifest):
    """The export's source checkpoint as a ModelSource; EigenError if it moved or changed."""
    from eigenkv.exporter.sources import ModelSource, model_hash
    source = ModelSource(Path(manifest.source.directory), manifest.source.gguf_file)
    if not Path(source.label).exists():
        raise EigenError(f"the export's source model {source.label} is gone: the torch backend reads its "
                         "non-attention weights from it")
    if model_hash(source) != manifest.source.hash:
        raise EigenError(f"the source model {source.label} changed since the export (hash differs): re-export it")
    return source


def _folded_decoder(graph: Path, manifest: Manifest):
    """The export's folded decoder: the source checkpoint's modules with the export's folded attention."""
    from eigenkv.artifacts import load_projections
    from eigenkv.exporter.decoder import decoder_from_hf
    from eigenkv.exporter.fold import attention_from_tensors
    from eigenkv.exporter.sources import load_model
    if not manifest.files.projections:
        raise EigenError(f"{graph.name} was exported without its folded attention tensors (no projections file in "
                         "its manifest): re-export it with this eigenkv's `export-eigen` to build a torch engine")
    path = Path(graph).parent / manifest.files.projections
    if not path.is_file():
        raise EigenError(f"{path} is missing: the torch backend needs the export's projections file")
    layers, meta = load_projections(path)
    source = _source(manifest)
    model, _ = load_model(source, progress=False)
    decoder = decoder_from_hf(model, manifest.layout.max_seq_len)
    folded = decoder.with_attention([attention_from_tensors(layer.attn, tensors, meta["key_mode"])
                                     for layer, tensors in zip(decoder.layers, layers)])
    layout = manifest.layout
    if tuple(folded.key_ranks) != layout.key_ranks or tuple(folded.value_ranks) != layout.value_ranks:
        raise EigenError(f"{path} does not match {graph.name}'s KV layout: re-export it")
    return folded, model.config


def save_weights(decoder, path: Path, precision: str, rope_mode: RopeMode) -> None:
    """Every tensor of decoder's state dict in `precision` -> safetensors at `path` (tied tensors
    are written twice: the file has no aliasing)."""
    from safetensors.torch import save_file

    from eigenkv.artifacts import atomic_path
    dtype, seen, tensors = torch_dtype(precision), set(), {}
    for name, t in decoder.state_dict().items():
        t = t.detach().to(dtype if t.is_floating_point() else t.dtype).contiguous()
        if t.untyped_storage().data_ptr() in seen:
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        tensors[name] = t
    meta = {"eigenkv": json.dumps({"rope_mode": rope_mode.value, "precision": precision})}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def _device_info() -> dict:
    """The build host's accelerator (informational: torch engines are portable)."""
    if not torch.cuda.is_available():
        return {"type": "cpu"}
    props = torch.cuda.get_device_properties(0)
    return {"type": "cuda", "name": props.name, "capability": f"{props.major}.{props.minor}"}


def build(graph: Path, manifest: Manifest, out_dir: Path) -> dict:
    """The folded decoder's weights + the source's transformers config into `out_dir`; -> the
    backend's EngineConfig fields. EigenError if the export has no projections file or its
    source checkpoint moved or changed."""
    import transformers
    folded, hf_config = _folded_decoder(Path(graph), manifest)
    save_weights(folded, Path(out_dir) / MODEL_FILE, manifest.precision, manifest.rope_mode)
    (Path(out_dir) / HF_CONFIG_FILE).write_text(hf_config.to_json_string(use_diff=False))
    return dict(model_file=MODEL_FILE, runtime={"torch": torch.__version__, "transformers": transformers.__version__},
                session_options={"hf_config_file": HF_CONFIG_FILE, "device": "auto", "attention": "auto",
                                 "cuda_graph": True},
                device=_device_info())


def _rebuild(engine_dir: Path) -> str:
    return f"rebuild it with `eigenkv build ... -o {engine_dir} --backend torch --force`"


def _read_header(path: Path, remedy: str) -> dict:
    """The safetensors file's tensor names -> shapes; EigenError if missing, corrupt or truncated."""
    from safetensors import safe_open
    if not path.is_file():
        raise EigenError(f"{path} is missing; {remedy}")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_slice(k).get_shape() for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise EigenError(f"{path} is corrupt or truncated ({str(e).splitlines()[0][:120]}); {remedy}") from None


def check_host(config: EngineConfig, engine_dir: Path) -> None:
    """The weights file must be readable; fp16 engines run in float32 on a host without CUDA (a
    warning); an engine pinned to cuda (`session_options.device`) needs a CUDA device."""
    remedy = _rebuild(engine_dir)
    _read_header(Path(engine_dir) / config.model_file, remedy)
    if not (Path(engine_dir) / config.session_options.get("hf_config_file", HF_CONFIG_FILE)).is_file():
        raise EigenError(f"{engine_dir} has no {HF_CONFIG_FILE}; {remedy}")
    device = config.session_options.get("device", "auto")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise EigenError(f"{engine_dir} is set to run on {device} (session_options.device) but torch sees no CUDA "
                         "device; set it to auto or cpu")
    if config.precision == "fp16" and not torch.cuda.is_available():
        warnings.warn(f"{engine_dir}: fp16 engine on a host without CUDA: it runs in float32 on the CPU", stacklevel=2)
    built = config.device.get("name")
    if built and torch.cuda.is_available() and torch.cuda.get_device_properties(0).name != built:
        warnings.warn(f"{engine_dir} was built on {built}, this host has {torch.cuda.get_device_properties(0).name}: "
                      "Triton compiles its kernel for this device on first use", stacklevel=2)


def _hf_config(path: Path):
    """The transformers config saved by `build` (its model_type picks the class)."""
    from transformers import AutoConfig
    data = json.loads(path.read_text())
    try:
        return AutoConfig.for_model(**data)
    except (KeyError, ValueError, TypeError) as e:
        raise EigenError(f"{path}: not a transformers config this installation knows ({e})") from None


def load_decoder(engine_dir: Path, config: EngineConfig):
    """The folded EigenDecoder of an engine directory on the CPU, in the file's precision: the module
    skeleton from hf_config.json (parameters on the meta device, never initialised), every tensor
    from model.safetensors (strict: a missing or unexpected tensor is a one-line EigenError)."""
    from accelerate import init_empty_weights
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from eigenkv.exporter.decoder import decoder_from_hf
    from eigenkv.exporter.fold import attention_from_tensors
    remedy = _rebuild(engine_dir)
    path = Path(engine_dir) / config.model_file
    _read_header(path, remedy)
    hf_config = _hf_config(Path(engine_dir) / config.session_options.get("hf_config_file", HF_CONFIG_FILE))
    with init_empty_weights():  # parameters on meta; buffers (RoPE inverse frequencies) real
        model = AutoModelForCausalLM.from_config(hf_config, attn_implementation="eager", dtype=torch.float32)
    skeleton = decoder_from_hf(model, config.kv_layout.max_seq_len)
    state = load_file(str(path))
    n = skeleton.dims.n_layers
    per_layer = [{k.removeprefix(f"layers.{i}.attn."): v for k, v in state.items()
                  if k.startswith(f"layers.{i}.attn.")} for i in range(n)]
    decoder = skeleton.with_attention([attention_from_tensors(layer.attn, tensors, config.rope_mode.value)
                                       for layer, tensors in zip(skeleton.layers, per_layer)])
    try:
        decoder.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise EigenError(f"{path} does not fit its config ({str(e).splitlines()[1].strip()[:160]}); {remedy}") from None
    meta = [name for name, t in (*decoder.named_parameters(), *decoder.named_buffers()) if t.is_meta]
    if meta:
        raise EigenError(f"{path} lacks {meta[0]} ({len(meta)} tensors); {remedy}")
    return decoder.eval()


def load(engine_dir: Path, config: EngineConfig, device: str | None = None, attention: str | None = None,
         cuda_graph: bool | None = None, threads: int | None = None) -> TorchEngine:
    """The engine of `engine_dir`; device/attention/cuda_graph override the recorded session options,
    threads > 0 sets torch's intra-op threads (0 or None: leave them)."""
    options = config.session_options
    if threads:
        torch.set_num_threads(threads)
    decoder = load_decoder(Path(engine_dir), config)
    return TorchEngine(decoder, config.kv_layout, config.precision,
                       device=device or options.get("device", "auto"),
                       attention=attention or options.get("attention", "auto"),
                       cuda_graph=options.get("cuda_graph", True) if cuda_graph is None else cuda_graph)


BACKEND = Backend("torch", build, check_host, load,
                  "PyTorch: the folded decoder; Triton kernel + CUDA graphs on CUDA, the torch op on the CPU")
