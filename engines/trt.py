"""The `trt` backend: TensorRT 11.x behind the `Engine` interface, attention by the AOT plugin.

Build (`build`): registers `eigen::LowRankAttention` (`plugins/trt_plugin.py`) first, fills the
op's absent optional inputs with the plugin's placeholders in an in-memory copy of the graph,
parses it into a strongly typed network (`create_network(0)`: 11.x is always strongly typed,
so fp16 comes from the graph's own types), adds two optimisation profiles (prefill: tokens
1..max_input_tokens; decode: tokens = 1; batch 1..max_batch in both; every layer's cache
capacity its own dimension, 1..max_seq_len), reuses and saves a timing cache, and writes the
serialized plan. The graph's `TensorScatter` cache writes become TensorRT KV-cache updates
whose outputs alias their cache inputs: the build checks `get_aliased_input_tensor` for every
`present.*` and refuses a plan that would copy the cache. config.json records the TensorRT
version, the GPU (name, compute capability), the profiles and the plugin (op version, sha256
of trt_plugin.py + triton_attention.py) under `runtime` / `device`.

Run (`load`): each cache's K/V buffers are torch CUDA tensors bound once with
`set_tensor_address` to both `past_key_values.*` and `present.*` (the same pointer, as
`get_aliased_input_tensor` requires); a step sets the input shapes, picks the decode profile
for one token and the prefill profile otherwise, runs `execute_async_v3` on the engine's stream
and returns host logits. Slot positions live on the device beside K/V (`TensorKVCache`): each
step's positions are scattered there and `KVCache.keep` compacts all three with torch indexing.

AOT plugins leak CUDA modules when input shapes change (NVIDIA/TensorRT#4849, 11.1-11.2): keep
cache capacities and batch sizes stable across calls.

Without an importable `tensorrt` every entry point raises one line (`TensorRT is not installed
...`); this module imports neither tensorrt nor CUDA at import time.
"""

from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

from eigenkv.engines.backend import Backend, Engine, TensorKVCache
from eigenkv.engines.config import EngineConfig
from eigenkv.errors import EigenError
from eigenkv.manifest import IONames, KVLayout, Manifest, numpy_dtype

MODEL_FILE = "model.plan"
TIMING_CACHE_FILE = "timing.cache"
PREFILL, DECODE = "prefill", "decode"
INSTALL_HINT = "pip install the full TensorRT for your CUDA, e.g. tensorrt-cu13, on a host with an NVIDIA GPU"


def _tensorrt():
    """The tensorrt module, or a one-line EigenError saying it is not installed."""
    try:
        import tensorrt
    except (ImportError, OSError) as e:  # the bindings without their libraries raise OSError
        reason = (str(e).splitlines() or [type(e).__name__])[0][:160]
        raise EigenError(f"TensorRT is not installed here: {reason} ({INSTALL_HINT})") from None
    major = int(str(tensorrt.__version__).split(".")[0])
    if major < 11 or not hasattr(tensorrt, "QuickPluginCreationRequest"):
        raise EigenError(f"TensorRT {tensorrt.__version__} is too old: the trt backend needs TensorRT 11 (strongly "
                         f"typed networks, AOT Python plugins); {INSTALL_HINT}")
    return tensorrt


def _gpu() -> dict:
    """{name, compute_capability} of CUDA device 0, or a one-line EigenError."""
    import torch
    if not torch.cuda.is_available():
        raise EigenError("no CUDA GPU is visible (torch.cuda.is_available() is False): the trt backend needs an "
                         "NVIDIA GPU and a CUDA build of torch")
    major, minor = torch.cuda.get_device_capability(0)
    return {"name": torch.cuda.get_device_name(0), "compute_capability": f"{major}.{minor}"}


def _rebuild(engine_dir) -> str:
    return f"rebuild it with `eigenkv build ... -o {engine_dir} --backend trt --force`"


# --------------------------------------------------------------------------- build

@dataclass(frozen=True)
class BuildOptions:
    """Profile ranges and builder settings (`build(..., **options)`); None: from the layout."""

    max_batch: int = 8
    opt_batch: int = 1
    max_input_tokens: int | None = None  # prefill profile's longest step (None: max_seq_len)
    opt_input_tokens: int = 128
    opt_capacity: int | None = None  # cache slots the kernels are tuned for (None: max_seq_len)
    timing_cache: str | None = None  # a timing cache file to read and update (always also saved in the engine)
    optimization_level: int = 3
    tf32: bool = False  # let fp32 matmuls round inputs to TF32 (TensorRT's default; off: fp32 graphs run fp32)

    @classmethod
    def parse(cls, options: dict) -> "BuildOptions":
        """Options from keyword arguments; EigenError naming unknown or out-of-range ones."""
        known = {f.name for f in fields(cls)}
        if set(options) - known:
            raise EigenError(f"unknown trt build options {sorted(set(options) - known)}; known: {sorted(known)}")
        built = cls(**options)
        if not 1 <= built.opt_batch <= built.max_batch:
            raise EigenError(f"trt build: need 1 <= opt_batch <= max_batch, got {built.opt_batch}, {built.max_batch}")
        return built

    def profiles(self, layout: KVLayout) -> dict:
        """{prefill, decode}: (min, opt, max) of batch, tokens and cache capacity."""
        top = layout.max_seq_len
        tokens = min(self.max_input_tokens or top, top)
        cap = min(self.opt_capacity or top, top)
        batch = (1, self.opt_batch, self.max_batch)
        return {PREFILL: {"batch": batch, "tokens": (1, min(self.opt_input_tokens, tokens), tokens),
                          "capacity": (1, cap, top)},
                DECODE: {"batch": batch, "tokens": (1, 1, 1), "capacity": (1, cap, top)}}


def input_shapes(io: IONames, layout: KVLayout, batch: int, tokens: int, capacity) -> dict:
    """Every graph input's shape for one (batch, tokens, capacity per layer or one for all)."""
    caps = [capacity] * layout.n_layers if isinstance(capacity, int) else list(capacity)
    h, n = layout.n_kv_heads, layout.n_layers
    shapes = {io.input_ids: (batch, tokens), io.position_ids: (batch, tokens), io.cache_lengths: (n, batch)}
    for i in range(n):
        shapes[io.past_key.format(i=i)] = (batch, h, caps[i], layout.key_ranks[i])
        shapes[io.past_value.format(i=i)] = (batch, h, caps[i], layout.value_ranks[i])
        if layout.slot_positions:
            shapes[io.slot_positions.format(i=i)] = (batch, h, caps[i])
    return shapes


def _prepared_graph(graph: Path, manifest: Manifest) -> bytes:
    """The graph's bytes with the plugin's placeholders for absent optional op inputs (weights stay external)."""
    import onnx

    from eigenkv.plugins.trt_plugin import fill_absent_inputs
    model = onnx.load(str(graph), load_external_data=False)
    float_type = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(numpy_dtype(manifest.precision)))
    if fill_absent_inputs(model, float_type) != manifest.layout.n_layers:
        raise EigenError(f"{graph} does not hold one eigen::LowRankAttention node per layer: re-export it")
    return model.SerializeToString()


def _parse(trt, network, logger, graph: Path, manifest: Manifest):
    """Parse the prepared graph into `network` (the parser kept alive by the caller); EigenError on failure."""
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(_prepared_graph(graph, manifest), str(graph)):
        errors = [str(parser.get_error(i)).replace("\n", " ")[:200] for i in range(parser.num_errors)]
        raise EigenError(f"TensorRT could not parse {graph}: {errors[0] if errors else 'unknown error'}")
    return parser


def _add_profiles(builder, config, network, manifest: Manifest, ranges: dict) -> dict:
    """One optimisation profile per entry of `ranges`; -> {name: profile index}."""
    names = {network.get_input(i).name for i in range(network.num_inputs)}
    indices = {}
    for name, r in ranges.items():
        profile = builder.create_optimization_profile()
        low, opt, high = (input_shapes(manifest.io, manifest.layout, r["batch"][k], r["tokens"][k], r["capacity"][k])
                          for k in range(3))
        if set(low) != names:
            raise EigenError(f"graph inputs {sorted(names ^ set(low))} differ from the manifest's I/O names: re-export")
        for tensor in low:
            profile.set_shape(tensor, low[tensor], opt[tensor], high[tensor])
        indices[name] = config.add_optimization_profile(profile)
    return indices


def _timing_cache(config, path: Path | None):
    """Attach a timing cache read from `path` (a new one if None or missing); -> the ITimingCache."""
    data = path.read_bytes() if path is not None and path.is_file() else b""
    cache = config.create_timing_cache(data)
    config.set_timing_cache(cache, False)
    return cache


def _check_aliases(trt, plan: bytes, logger, io: IONames, n_layers: int) -> None:
    """EigenError unless every present.* output aliases its past_key_values.* input in the built plan."""
    engine = trt.Runtime(logger).deserialize_cuda_engine(plan)
    if engine is None:
        raise EigenError("TensorRT built a plan it cannot deserialize")
    for past, present in zip(io.past(n_layers), io.present(n_layers)):
        if engine.get_aliased_input_tensor(present) != past:
            raise EigenError(f"TensorRT did not update {past} in place ({present} is a separate buffer): the graph's "
                             "TensorScatter must become a KV-cache update; re-export with opset 24")


def build(graph: Path, manifest: Manifest, out_dir: Path, **options) -> dict:
    """Build the plan into `out_dir`; -> the backend's EngineConfig fields. EigenError (one line)
    without TensorRT or a GPU, for unknown options, or when parsing or building fails."""
    trt = _tensorrt()
    opts = BuildOptions.parse(options)
    from eigenkv.plugins import trt_plugin
    trt_plugin.register()
    device = _gpu()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = _parse(trt, network, logger, Path(graph), manifest)  # noqa: F841 - owns parsed weights until built
    config = builder.create_builder_config()
    config.builder_optimization_level = opts.optimization_level
    if not opts.tf32:
        config.clear_flag(trt.BuilderFlag.TF32)
    ranges = opts.profiles(manifest.layout)
    indices = _add_profiles(builder, config, network, manifest, ranges)
    shared = Path(opts.timing_cache) if opts.timing_cache else None
    cache = _timing_cache(config, shared)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise EigenError(f"TensorRT could not build {graph} (its log above says why; the {trt_plugin.PLUGIN_ID} "
                         "plugin compiles its kernel with triton on this host)")
    plan = bytes(plan)
    _check_aliases(trt, plan, logger, manifest.io, manifest.layout.n_layers)
    (Path(out_dir) / MODEL_FILE).write_bytes(plan)
    timing = bytes(cache.serialize())
    (Path(out_dir) / TIMING_CACHE_FILE).write_bytes(timing)
    if shared:
        shared.write_bytes(timing)
    extra = {}
    if manifest.files.key_gram:
        shutil.copyfile(Path(graph).parent / manifest.files.key_gram, Path(out_dir) / manifest.files.key_gram)
        extra["key_gram_file"] = manifest.files.key_gram
    profiles = {name: dict(index=indices[name], **{k: list(v) for k, v in r.items()}) for name, r in ranges.items()}
    runtime = {"tensorrt": trt.__version__, "plugin": trt_plugin.plugin_fingerprint(), "profiles": profiles,
               "build_options": asdict(opts)}
    return dict(model_file=MODEL_FILE, runtime=runtime, device=device, **extra)


# --------------------------------------------------------------------------- host check

def host_mismatch(config: EngineConfig, installed: dict) -> str | None:
    """What differs between the build host in `config` and `installed` {tensorrt, device, plugin}, or None."""
    built = config.runtime.get("tensorrt")
    if built != installed["tensorrt"]:
        return f"was built with TensorRT {built}, installed is {installed['tensorrt']}"
    for key, what in (("name", "GPU"), ("compute_capability", "GPU compute capability")):
        if config.device.get(key) != installed["device"].get(key):
            return f"was built for {what} {config.device.get(key)}, this host has {installed['device'].get(key)}"
    plugin = config.runtime.get("plugin") or {}
    if plugin.get("version") != installed["plugin"]["version"] or plugin.get("sha256") != installed["plugin"]["sha256"]:
        return (f"was built with another eigen::LowRankAttention plugin (sha256 {str(plugin.get('sha256'))[:12]}, "
                f"this eigenkv's is {installed['plugin']['sha256'][:12]})")
    return None


def check_host(config: EngineConfig, engine_dir: Path) -> None:
    """TensorRT version, GPU name and compute capability and plugin hash must be the build's."""
    trt = _tensorrt()
    from eigenkv.plugins.trt_plugin import plugin_fingerprint
    problem = host_mismatch(config, {"tensorrt": trt.__version__, "device": _gpu(), "plugin": plugin_fingerprint()})
    if problem:
        raise EigenError(f"{engine_dir} {problem}: {_rebuild(engine_dir)}")


# --------------------------------------------------------------------------- run

def _on(stream):
    """Run torch work on `stream` (a torch.cuda.Stream), or inline when None (CPU tests)."""
    import contextlib

    import torch
    return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()


class TrtKVCache(TensorKVCache):
    """Per-layer K/V and slot positions as torch device tensors, allocated and written on the
    engine's stream (the graph reads them in place)."""

    def __init__(self, layout: KVLayout, batch: int, capacities: list[int], dtype, device: str = "cuda",
                 stream=None):
        self.stream = stream
        with _on(stream):
            super().__init__(layout, batch, capacities, dtype, device)

    def keys(self, layer: int) -> np.ndarray:
        if self.stream is not None:
            self.stream.synchronize()
        return super().keys(layer)

    def write_positions(self, positions: np.ndarray) -> None:
        with _on(self.stream):
            super().write_positions(positions)

    def keep(self, layer: int, seq: int, slots: np.ndarray) -> None:
        with _on(self.stream):
            super().keep(layer, seq, slots)


class TrtEngine(Engine):
    """A deserialized plan, one execution context and one CUDA stream; `step` runs it once.

    `device` is "cuda" except in tests that drive a fake TensorRT on the CPU (no stream then).
    """

    name = "trt"

    def __init__(self, trt, plan: bytes, layout: KVLayout, io: IONames, precision: str, profiles: dict,
                 key_grams: dict | None = None, remedy: str = "", device: str = "cuda"):
        import torch

        from eigenkv.manifest import torch_dtype
        self.trt, self.layout, self.io, self.precision, self.device = trt, layout, io, precision, device
        self.torch_dtype = torch_dtype(precision)
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise EigenError(f"the TensorRT plan is corrupt or truncated; {remedy}")
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream() if device == "cuda" else None
        self.profiles = {name: int(p["index"]) for name, p in profiles.items()}
        self.limits = {name: (int(p["batch"][2]), int(p["tokens"][2])) for name, p in profiles.items()}
        n = layout.n_layers
        self.past, self.present = io.past(n), io.present(n)
        self.slots = [io.slot_positions.format(i=i) for i in range(n)] if layout.slot_positions else []
        for past, present in zip(self.past, self.present):
            if self.engine.get_aliased_input_tensor(present) != past:
                raise EigenError(f"the plan does not update {past} in place; {remedy}")
        self._key_grams = key_grams or {}
        self._bound = None  # the cache whose buffers the context points at
        self._profile = None
        self.binds = 0  # K/V buffer bindings made (per cache and profile switch, never per token)

    @property
    def vocab_size(self) -> int:
        return int(self.engine.get_tensor_shape(self.io.logits)[-1])

    @property
    def stream_handle(self) -> int:
        """The raw CUDA stream TensorRT enqueues on (0: the default stream, CPU tests only)."""
        return self.stream.cuda_stream if self.stream is not None else 0

    def key_gram(self, layer: int) -> np.ndarray | None:
        return self._key_grams.get(f"layers.{layer}.key_gram")

    def new_cache(self, batch: int, capacity: int | list[int]) -> TrtKVCache:
        cache = TrtKVCache(self.layout, batch, self.check_capacity(capacity), self.torch_dtype, self.device,
                           self.stream)
        self._bind(cache)
        return cache

    def _bind(self, cache: TrtKVCache) -> None:
        """Point past and present of every layer (and the slot positions) at the cache's buffers."""
        for past, present, buf in zip(self.past, self.present, cache.buffers):
            self.context.set_tensor_address(past, buf.data_ptr())
            self.context.set_tensor_address(present, buf.data_ptr())
            self.binds += 1
        for name, dev in zip(self.slots, cache.slot_tensors):
            self.context.set_tensor_address(name, dev.data_ptr())
        self._bound = cache

    def _select_profile(self, tokens: int, batch: int) -> None:
        """Decode profile for one token, prefill otherwise; EigenError beyond the built ranges."""
        name = DECODE if tokens == 1 and DECODE in self.profiles else PREFILL
        max_batch, max_tokens = self.limits[name]
        if batch > max_batch or tokens > max_tokens:
            raise EigenError(f"this TensorRT engine takes at most batch {max_batch} and {max_tokens} tokens per "
                             f"step ({name} profile), got {batch} x {tokens}; rebuild with larger profiles")
        if self._profile != name:
            self.context.set_optimization_profile_async(self.profiles[name], self.stream_handle)
            self._profile, self._bound = name, None  # switching invalidates the bindings: bind again

    def step(self, cache: TrtKVCache, ids: np.ndarray, positions: np.ndarray) -> np.ndarray:
        import torch
        batch, tokens = ids.shape
        self._select_profile(tokens, batch)
        cache.write_positions(positions)
        if self._bound is not cache:
            self._bind(cache)
        for name, shape in input_shapes(self.io, self.layout, batch, tokens, cache.capacities).items():
            self.context.set_input_shape(name, shape)
        with _on(self.stream):
            feeds = {self.io.input_ids: ids, self.io.position_ids: positions, self.io.cache_lengths: cache.lengths}
            dev = {name: torch.from_numpy(np.ascontiguousarray(v, dtype=np.int64)).to(self.device)
                   for name, v in feeds.items()}
            # logits are float32 in every exported graph (fp16 graphs included: exporter/export.py)
            logits = torch.empty((batch, tokens, self.vocab_size), dtype=torch.float32, device=self.device)
            for name, t in [*dev.items(), (self.io.logits, logits)]:
                self.context.set_tensor_address(name, t.data_ptr())
            if not self.context.execute_async_v3(self.stream_handle):
                raise EigenError("TensorRT failed to run the engine (see its log above)")
            host = logits.cpu()  # waits for this stream
        return host.numpy()

    def synchronize(self) -> None:
        if self.stream is not None:
            self.stream.synchronize()


def load(engine_dir: Path, config: EngineConfig, threads: int | None = None) -> TrtEngine:
    """The engine of `engine_dir` (check_host has passed). `threads` (CPU backends' intra-op
    threads, passed by `eigenkv bench`) is accepted and unused."""
    trt = _tensorrt()
    from eigenkv.plugins import trt_plugin
    trt_plugin.register()  # AOT kernels live in the plan; a JIT (aot=0) plan needs the Python plugin
    grams = None
    if config.key_gram_file:
        from safetensors.numpy import load_file
        grams = load_file(str(Path(engine_dir) / config.key_gram_file))
    plan = (Path(engine_dir) / config.model_file).read_bytes()
    return TrtEngine(trt, plan, config.kv_layout, config.io, config.precision, config.runtime["profiles"], grams,
                     remedy=_rebuild(engine_dir))


BACKEND = Backend("trt", build, check_host, load, "TensorRT 11 with the eigen::LowRankAttention AOT plugin (GPU)")
