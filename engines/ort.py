"""The `ort` backend: ONNX Runtime (CPU provider) behind the `Engine` interface.

Build: ONNX Runtime optimises the exported graph once (extended level: portable fusions) and
saves it with its weights; `config.json` records the onnxruntime version and the session
options every load applies (`session_options`). Run: each layer's K and V buffers are host
(numpy) arrays wrapped as OrtValues without a copy and bound as both `past_key_values.{i}.*`
and `present.{i}.*` through one IOBinding per cache, so the graph's TensorScatter writes in
place; slot positions are bound the same way, so `KVCache.keep` (numpy, in place) is what the
next step sees. No cache buffer moves or is rebound during decode.
"""

from __future__ import annotations

import functools
import shutil
from pathlib import Path

import numpy as np

from eigenkv.engines.backend import Backend, Engine, HostKVCache
from eigenkv.engines.config import EngineConfig
from eigenkv.errors import EigenError
from eigenkv.manifest import IONames, KVLayout, Manifest

MODEL_FILE = "model.onnx"
SESSION_OPTIONS = {"graph_optimization_level": "ORT_ENABLE_ALL", "intra_op_num_threads": 0, "log_severity_level": 3}


def make_session(model: Path, session_options: dict | None = None, remedy: str = ""):
    """An ONNX Runtime CPU session for `model` with `session_options` (SessionOptions attribute
    names -> values; enum values by name; `config_entries` a dict of session config entries).
    The one place sessions are created. EigenError (ending with `remedy`) if it cannot load."""
    import onnxruntime as ort
    options = ort.SessionOptions()
    for key, value in {**SESSION_OPTIONS, **(session_options or {})}.items():
        if key == "graph_optimization_level":
            value = getattr(ort.GraphOptimizationLevel, value)
        elif key == "config_entries":
            for k, v in value.items():
                options.add_session_config_entry(k, str(v))
            continue
        if not hasattr(options, key):
            raise EigenError(f"unknown onnxruntime session option {key!r}")
        setattr(options, key, value)
    try:
        return ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise EigenError(f"{model} is corrupt or truncated ({str(e).splitlines()[0][:160]})"
                         + (f"; {remedy}" if remedy else "")) from None


class OrtKVCache(HostKVCache):
    """Host buffers plus their OrtValues (same memory) and the IOBinding that binds them in place."""

    def __init__(self, engine: "OrtEngine", batch: int, capacities: list[int]):
        import onnxruntime as ort
        super().__init__(engine.layout, batch, capacities, engine.precision)
        self.binding = engine.session.io_binding()
        self._values = [ort.OrtValue.ortvalue_from_numpy(b) for b in self.buffers]  # shares memory
        for name_in, name_out, value in zip(engine.past, engine.present, self._values):
            self.binding.bind_ortvalue_input(name_in, value)
            self.binding.bind_ortvalue_output(name_out, value)
            engine.binds += 1
        self._slots = [ort.OrtValue.ortvalue_from_numpy(p) for p in self.slot_positions]
        for name, value in zip(engine.slots, self._slots):
            self.binding.bind_ortvalue_input(name, value)


class OrtEngine(Engine):
    """An exported graph in an ONNX Runtime session; `step` runs it once over a cache's binding."""

    name = "ort"

    def __init__(self, model: Path, layout: KVLayout, io: IONames, precision: str,
                 session_options: dict | None = None, key_grams: dict | None = None, remedy: str = ""):
        self.layout, self.io, self.precision = layout, io, precision
        self.session = make_session(model, session_options, remedy)
        n = layout.n_layers
        self.past, self.present = io.past(n), io.present(n)
        self.slots = [io.slot_positions.format(i=i) for i in range(n)]
        self._key_grams = key_grams or {}
        self.binds = 0  # KV buffer bindings made (a test checks they are per cache, not per token)

    @functools.cached_property
    def vocab_size(self) -> int:
        return int(next(o.shape[-1] for o in self.session.get_outputs() if o.name == self.io.logits))

    def key_gram(self, layer: int) -> np.ndarray | None:
        return self._key_grams.get(f"layers.{layer}.key_gram")

    def new_cache(self, batch: int, capacity: int | list[int]) -> OrtKVCache:
        return OrtKVCache(self, batch, self.check_capacity(capacity))

    def step(self, cache: OrtKVCache, ids: np.ndarray, positions: np.ndarray) -> np.ndarray:
        import onnxruntime as ort
        cache.write_positions(positions)
        binding = cache.binding
        # a fresh host array per step (the caller owns it), bound in place of ORT's own output: reading
        # ORT-allocated outputs back costs a wrapper per output (61 here), binding one costs one
        logits = np.empty((*ids.shape, self.vocab_size), np.float32)
        binding.bind_ortvalue_output(self.io.logits, ort.OrtValue.ortvalue_from_numpy(logits))
        binding.bind_cpu_input(self.io.input_ids, np.ascontiguousarray(ids, dtype=np.int64))
        binding.bind_cpu_input(self.io.position_ids, np.ascontiguousarray(positions, dtype=np.int64))
        binding.bind_cpu_input(self.io.cache_lengths, np.ascontiguousarray(cache.lengths, dtype=np.int64))
        self.session.run_with_iobinding(binding)
        return logits


ATTENTION_CHOICES = ("fused", "function")  # `eigenkv build --attention` (ORT backend)


def _optimize(src: Path, dst: Path, rope_mode=None, fused_attention: bool = False, plan: dict | None = None) -> dict:
    """Let ONNX Runtime optimise `src` and save the result (weights beside it) at `dst`; with
    `fused_attention`, first rewrite the engine's copy of the graph's attention into fused ONNX
    Runtime kernels (`engines/ort_fused.py`, formulations per `plan`). -> the rewrite's report ({"attention": "function"}
    when off or when no layer changed)."""
    options = {"graph_optimization_level": "ORT_ENABLE_EXTENDED", "optimized_model_filepath": str(dst),
               "config_entries": {"session.optimized_model_external_initializers_file_name": dst.name + ".data",
                                  "session.optimized_model_external_initializers_min_size_in_bytes": 1024}}
    remedy = "re-export it with `export-eigen`"
    if fused_attention:
        import tempfile

        from eigenkv.engines.ort_fused import rewrite_file
        with tempfile.TemporaryDirectory(prefix="fused-", dir=dst.parent) as tmp:
            path, report = rewrite_file(src, Path(tmp), rope_mode, remedy=remedy, plan=plan)
            if path is not None:
                try:
                    make_session(path, options, remedy=remedy)
                    return report
                except EigenError as e:  # ONNX Runtime refused the rewritten graph: keep the function
                    for stale in dst.parent.glob(dst.name + "*"):
                        stale.unlink()
                    report = {"attention": "function", "formulation": report["formulation"],
                              "fell_back": {f"rewritten graph refused: {str(e)[:200]}": 1}}
    else:
        report = {"attention": "function", "formulation": "off"}
    make_session(src, options, remedy=remedy)
    return report


def build(graph: Path, manifest: Manifest, out_dir: Path, attention: str = "fused", weights: str = "graph",
          plan: dict | None = None) -> dict:
    """Optimise the graph into `out_dir`, its attention rewritten into fused ONNX Runtime kernels
    (`attention="fused"`, `engines/ort_fused.py`) or left as the op's ONNX function
    (`attention="function"`: `eigenkv build --attention function`), its MatMul weights as exported
    (`weights="graph"`) or quantized block-wise to "int4" / "int8" (`engines/ort_weights.py`);
    -> the backend's EngineConfig fields. `runtime["attention"]` names the ONNX Runtime op(s) that
    run attention ("GroupQueryAttention", "Attention", "function"), `runtime["attention_rewrite"]`
    the report, `runtime["weights"]` the weights' format (with the quantizer's report). `plan`
    (RopeMode -> formulation, `ort_fused.DEFAULT_PLAN` when None) picks the fused formulation
    per RoPE mode, for benchmarks of one against another (`tools/bench_pre_ragged.py`)."""
    import onnxruntime as ort

    from eigenkv.engines.ort_weights import WEIGHT_CHOICES
    if attention not in ATTENTION_CHOICES:
        raise EigenError(f"--attention must be one of {', '.join(ATTENTION_CHOICES)}, got {attention!r}")
    if weights not in WEIGHT_CHOICES:
        raise EigenError(f"--weights must be one of {', '.join(WEIGHT_CHOICES)}, got {weights!r}")
    fused = attention == "fused"
    bits = None if weights == "graph" else int(weights[3:])
    if bits and manifest.precision != "fp32":  # ORT CPU runs fp16 MatMuls through Casts of the weights
        raise EigenError(f"--weights {weights} quantizes fp32 weights, and {Path(graph).name} is a "
                         f"{manifest.precision} export: build it from an fp32 export (`export-eigen` without --dtype fp16)")
    model = Path(out_dir) / MODEL_FILE
    report = _optimize(Path(graph), model, manifest.rope_mode, fused, plan)
    quantized = None
    if bits:  # after ONNX Runtime's optimisation, so constant-folded weights (the tied lm_head's transpose) count
        from eigenkv.engines.ort_weights import quantize_in_place
        quantized = quantize_in_place(model, bits)

    def smoke_run() -> None:  # a kernel refusing some shape fails here, not in `run`
        engine = OrtEngine(model, manifest.layout, manifest.io, manifest.precision)
        cache = engine.new_cache(2, 10)
        # uneven lengths and multi-token steps over them; `pre` engines branch on how full and how
        # ragged the buffers are (`ort_fused._attention_by_step`): valid slots after each step's
        # write (3, 3) and (5, 2) run the sliced batched branch, (7, 2) the rows', (8, 3) the
        # whole-buffer one
        for start, width, real in (((0, 0), 3, (3, 0)), ((3, 0), 2, (2, 0)), ((5, 0), 2, (2, 2)), ((7, 2), 1, (1, 1))):
            engine.step(cache, np.zeros((2, width), np.int64), np.array(start)[:, None] + np.arange(width))
            cache.advance(np.array(real))

    def drop_model() -> None:
        for stale in Path(out_dir).glob(MODEL_FILE + "*"):
            stale.unlink()

    def refused(e: Exception) -> EigenError:
        drop_model()
        return EigenError(f"ONNX Runtime refused the engine with {weights} weights ({str(e).splitlines()[0][:200]}); "
                          "build it with --weights graph")

    if report["attention"] != "function" or bits:
        try:
            smoke_run()
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
            if report["attention"] == "function":  # nothing to fall back to: the quantized graph failed
                raise refused(e) from None
            drop_model()
            reason = f"engine check failed: {str(e).splitlines()[0][:200]}"
            report = {**_optimize(Path(graph), model, manifest.rope_mode, False), "fell_back": {reason: 1}}
            if bits:
                quantized = quantize_in_place(model, bits)
                try:
                    smoke_run()
                except Exception as e2:  # noqa: BLE001
                    raise refused(e2) from None
    extra = {}
    if manifest.files.key_gram:
        shutil.copyfile(Path(graph).parent / manifest.files.key_gram, Path(out_dir) / manifest.files.key_gram)
        extra["key_gram_file"] = manifest.files.key_gram
    runtime = {"onnxruntime": ort.__version__, "attention": report["attention"], "attention_rewrite": report,
               "weights": quantized or {"weights": "graph"}}
    return dict(model_file=MODEL_FILE, runtime=runtime, session_options=dict(SESSION_OPTIONS), **extra)


def check_host(config: EngineConfig, engine_dir: Path) -> None:
    """The installed onnxruntime must be the one the engine was built with."""
    import onnxruntime as ort
    built = config.runtime.get("onnxruntime")
    if built != ort.__version__:
        raise EigenError(f"{engine_dir} was built with onnxruntime {built}, installed is {ort.__version__}: "
                         f"rebuild it with `eigenkv build ... -o {engine_dir} --force`")


def load(engine_dir: Path, config: EngineConfig, threads: int | None = None) -> OrtEngine:
    """The engine of `engine_dir`; `threads` overrides the recorded intra-op thread count (0: ORT's default)."""
    options = dict(config.session_options)
    if threads is not None:
        options["intra_op_num_threads"] = threads
    grams = None
    if config.key_gram_file:
        from safetensors.numpy import load_file
        grams = load_file(str(Path(engine_dir) / config.key_gram_file))
    model = Path(engine_dir) / config.model_file
    return OrtEngine(model, config.kv_layout, config.io, config.precision, options, grams,
                     remedy=f"rebuild it with `eigenkv build ... -o {engine_dir} --force`")


BACKEND = Backend("ort", build, check_host, load, "ONNX Runtime, CPU execution provider")
