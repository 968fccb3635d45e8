"""The TensorRT backend (`engines/trt.py`) and plugin (`plugins/trt_plugin.py`).

Two groups:
  * tests that run anywhere: both modules import without tensorrt, triton or CUDA; the plugin's
    tables are the spec's; graph preparation; PTX hidden-parameter stripping; the host check's
    logic; `eigenkv build --backend trt` without TensorRT (one line, exit 2, no folder); and, with
    triton, the AOT kernel's launch arguments (= triton_attention.LAUNCH_PARAMS) and, with
    triton and a CUDA GPU, the kernel launched exactly as TensorRT's AOT launcher would
    (cuLaunchKernel with inputs, int32 sizes, output) against the reference.
  * tests that need an importable `tensorrt` (`needs_tensorrt`; skipped with the reason
    "tensorrt is not importable here: ..." elsewhere): build on a tiny export, logits against
    the ORT engine built from the same export, KV buffers updated in place, mismatched host.

Triton fixes interpreter or compiler mode when first imported and test_triton_kernel.py sets
TRITON_INTERPRET=1 for the session, so kernel compiles (and the TensorRT build, whose plugin
compiles its kernel) run in subprocesses without it, and this module never imports triton.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import textwrap
import types

import numpy as np
import pytest
from tiny_models import export_tiny

from eigenkv.cli import main
from eigenkv.errors import EigenError
from eigenkv.plugins import spec
from eigenkv.plugins import trt_plugin as tp


def _tensorrt_missing() -> str | None:
    """None when tensorrt imports here, else the skip reason."""
    try:
        import tensorrt  # noqa: F401
    except Exception as e:  # noqa: BLE001 - the bindings without their libraries raise OSError
        return f"tensorrt is not importable here: {(str(e).splitlines() or [type(e).__name__])[0]}"
    return None


TRT_MISSING = _tensorrt_missing()
needs_tensorrt = pytest.mark.skipif(TRT_MISSING is not None, reason=TRT_MISSING or "")
without_tensorrt = pytest.mark.skipif(TRT_MISSING is None, reason="tensorrt is importable here: the real build runs")
TEXT = "The quick brown fox jumps over the lazy dog. " * 80
TRITON_ENV = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None,  # never imported here (see above)
                                  reason="triton is not installed (pip install 'eigenkv[triton]')")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny llama export (pre mode, kv-ratio 0.5): (root, graph path)."""
    root = tmp_path_factory.mktemp("trt")
    (root / "calib.txt").write_text(TEXT)
    out = root / "exp" / "model.onnx"
    assert export_tiny(root, "llama", out, "--kv-ratio", "0.5", "--max-seq-len", "96", "--decode-steps", "4") == 0
    return root, out


# ----------------------------------------------------------------------------- anywhere

def test_trt_is_a_registered_backend():
    from eigenkv.engines.backend import backend_names, get_backend
    assert "trt" in backend_names()
    assert get_backend("trt").name == "trt"


def test_modules_import_without_tensorrt_triton_or_cuda():
    """Importing the plugin and the backend imports neither tensorrt nor triton, nor initialises CUDA."""
    script = ("import json, sys, torch\nimport eigenkv.plugins.trt_plugin, eigenkv.engines.trt\n"
              "print(json.dumps({'tensorrt': 'tensorrt' in sys.modules, 'triton': 'triton' in sys.modules,"
              " 'cuda': torch.cuda.is_initialized()}))")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=TRITON_ENV, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"tensorrt": False, "triton": False, "cuda": False}


def test_plugin_tables_are_the_spec():
    """Plugin id, inputs, output, attributes (names, order, types) come from plugins/spec.py."""
    assert tp.PLUGIN_ID == f"{spec.DOMAIN}::{spec.NAME}" == "eigen::LowRankAttention"
    assert tp.INPUT_NAMES == tuple(t.name for t in spec.INPUTS)
    assert tp.OUTPUT_NAMES == tuple(t.name for t in spec.OUTPUTS)
    assert list(tp.ATTRIBUTE_TYPES) == [a.name for a in spec.ATTRIBUTES]
    assert all(tp.ATTRIBUTE_TYPES[a.name] is {"float": float, "int": int}[a.type] for a in spec.ATTRIBUTES)
    assert not set(tp.ATTRIBUTE_TYPES) & tp.RESERVED_ATTRIBUTE_NAMES
    assert spec.DOMAIN not in tp.RESERVED_NAMESPACES and "." not in spec.DOMAIN + spec.NAME
    assert set(spec.PARSER_ATTRIBUTES) == {"plugin_namespace", "aot"} and spec.PARSER_ATTRIBUTES["aot"] == 1
    assert not set(spec.PARSER_ATTRIBUTES) & set(tp.ATTRIBUTE_TYPES)  # the parser never passes them to the plugin
    sig = tp.register_signature("TensorDesc", "TensorDesc")
    assert list(sig.parameters) == [*tp.INPUT_NAMES, *tp.ATTRIBUTE_TYPES]
    assert [p.annotation for p in sig.parameters.values()] == ["TensorDesc"] * 10 + list(tp.ATTRIBUTE_TYPES.values())
    assert all(p.default is p.empty for p in sig.parameters.values())  # QDP refuses defaults
    io = [s.strip() for s in tp.autotune_types().split(",")]
    assert len(io) == len(spec.INPUTS) + len(spec.OUTPUTS)
    assert [t == "INT32" for t in io] == [t.dtype == "int32" for t in spec.INPUTS + spec.OUTPUTS]
    assert set(io) == {"INT32", "FP32|FP16|BF16"}


def test_placeholders_differ_from_real_inputs_by_rank():
    """Absent optional inputs are one-element placeholders of another rank; required inputs have none."""
    assert set(tp.PLACEHOLDER_SHAPES) == {t.name for t in spec.INPUTS if t.optional}
    for name, shape in tp.PLACEHOLDER_SHAPES.items():
        assert int(np.prod(shape)) == 1
        assert not tp.is_present(name, len(shape)) and tp.is_present(name, tp.SPEC_RANKS[name])


def _op_model(inputs: list[str]):
    """An onnx model with one LowRankAttention node taking `inputs` and the op's model-local function."""
    from onnx import TensorProto, helper
    node = helper.make_node(spec.NAME, inputs, ["attn"], domain=spec.DOMAIN, scale=0.25, rope_mode=0, causal=1,
                            version=1, **spec.PARSER_ATTRIBUTES)
    graph_inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in inputs if n]
    output = helper.make_tensor_value_info("attn", TensorProto.FLOAT, None)
    graph = helper.make_graph([node], "g", graph_inputs, [output])
    body = [helper.make_node("Identity", ["query"], ["attn"])]
    function = helper.make_function(spec.DOMAIN, spec.NAME, ["query"], ["attn"], body, [helper.make_opsetid("", 24)])
    return helper.make_model(graph, functions=[function], opset_imports=[helper.make_opsetid("", 24),
                                                                         helper.make_opsetid(spec.DOMAIN, 1)])


def test_fill_absent_inputs_gives_every_node_all_spec_inputs():
    """Empty and trailing-missing optional inputs become typed placeholders; the local function goes."""
    from onnx import TensorProto, numpy_helper
    model = _op_model(["q", "k", "v", "lengths", "qpos", "slots", "", "", ""])  # rank mode, no alibi
    assert tp.fill_absent_inputs(model, TensorProto.FLOAT16) == 1
    node = model.graph.node[0]
    assert list(node.input[:6]) == ["q", "k", "v", "lengths", "qpos", "slots"]
    assert list(node.input[6:]) == [tp.placeholder_name(n) for n in ("key_up", "rope_cos", "rope_sin", "alibi_slopes")]
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    assert {n: (a.shape, a.dtype.name) for n, a in inits.items()} == {
        tp.placeholder_name(n): (tp.PLACEHOLDER_SHAPES[n], "float16")
        for n in ("key_up", "rope_cos", "rope_sin", "alibi_slopes")}
    assert len(model.functions) == 0
    with pytest.raises(ValueError, match="required input 'cache_lengths'"):
        tp.fill_absent_inputs(_op_model(["q", "k", "v", "", "qpos"]), TensorProto.FLOAT)


_PTX = textwrap.dedent("""\
    .version 8.4
    .target sm_90a
    .visible .entry k(
    \t.param .u64 .ptr .global .align 1 k_param_0,
    \t.param .u32 k_param_1,
    \t.param .u64 .ptr .global .align 1 k_param_2,
    \t.param .u64 .ptr .global .align 1 k_param_3
    )
    {
    \tld.param.b64 %rd1, [k_param_0];
    \tld.param.b32 %r1, [k_param_1];
    \tret;
    }
    """)


def test_strip_hidden_params_removes_only_unused_trailing_pointers():
    """Triton's two hidden scratch pointers go; a used one, a third one, or too few params is an error."""
    stripped = tp.strip_hidden_params(_PTX, "k", 2)
    assert re.findall(r"k_param_\d+", stripped.split("{")[0]) == ["k_param_0", "k_param_1"]
    assert stripped.split("{")[1] == _PTX.split("{")[1]  # body untouched
    assert tp.strip_hidden_params(_PTX, "k", 4) == _PTX
    with pytest.raises(RuntimeError, match="beyond"):
        tp.strip_hidden_params(_PTX, "k", 1)
    with pytest.raises(RuntimeError, match="fewer"):
        tp.strip_hidden_params(_PTX, "k", 5)
    used = _PTX.replace("\tret;", "\tld.param.b64 %rd2, [k_param_3];\n\tret;")
    with pytest.raises(RuntimeError, match="k_param_3 is used"):
        tp.strip_hidden_params(used, "k", 3)


def _config(runtime: dict, device: dict):
    return types.SimpleNamespace(runtime=runtime, device=device)


def test_host_mismatch_names_what_differs():
    """TensorRT version, GPU name, compute capability and plugin hash are each named when they differ."""
    from eigenkv.engines.trt import host_mismatch
    plugin = tp.plugin_fingerprint()
    host = {"tensorrt": "11.4.0.106", "device": {"name": "NVIDIA H200", "compute_capability": "9.0"}, "plugin": plugin}
    same = _config({"tensorrt": "11.4.0.106", "plugin": dict(plugin)}, dict(host["device"]))
    assert host_mismatch(same, host) is None
    assert "TensorRT 11.1.0.1" in host_mismatch(_config({**same.runtime, "tensorrt": "11.1.0.1"}, same.device), host)
    assert "GPU NVIDIA H100" in host_mismatch(_config(same.runtime, {**same.device, "name": "NVIDIA H100"}), host)
    assert "compute capability 8.0" in host_mismatch(
        _config(same.runtime, {**same.device, "compute_capability": "8.0"}), host)
    other = {**plugin, "sha256": "0" * 64}
    assert "another eigen::LowRankAttention plugin" in host_mismatch(_config({**same.runtime, "plugin": other},
                                                                             same.device), host)
    assert len(plugin["sha256"]) == 64 and plugin["version"] == spec.VERSION


LAYOUT = dict(n_layers=2, n_kv_heads=2, head_dim=8, key_ranks=(3, 5), value_ranks=(4, 2), max_seq_len=32)


def test_trt_cache_keep_matches_the_host_cache():
    """`TrtKVCache.keep` (torch indexing on the device; the CPU here) does what HostKVCache.keep does."""
    import torch

    from eigenkv.engines.backend import HostKVCache
    from eigenkv.engines.trt import TrtKVCache
    from eigenkv.manifest import KVLayout
    layout = KVLayout(**LAYOUT)
    rng = np.random.default_rng(0)
    host = HostKVCache(layout, 2, [10, 12], "fp32")
    dev = TrtKVCache(layout, 2, [10, 12], torch.float32, device="cpu")
    for h, d in zip(host.buffers, dev.buffers):
        h[...] = rng.standard_normal(h.shape)
        d.copy_(torch.from_numpy(h))
    for i in range(2):
        host.positions(i)[...] = dev.positions(i)[...] = rng.integers(0, 99, host.positions(i).shape)
    host.lengths[...] = dev.lengths[...] = [[9, 7], [12, 5]]
    slots = np.array([[4, 0, 2], [1, 3, 0]])
    for cache in (host, dev):
        cache.keep(1, 0, slots)
        cache.keep(0, 1, slots[:, :2])
    for h, d in zip(host.buffers, dev.buffers):
        np.testing.assert_array_equal(h, d.numpy())
    for i in range(2):
        np.testing.assert_array_equal(host.positions(i), dev.positions(i))
    np.testing.assert_array_equal(host.lengths, dev.lengths)
    with pytest.raises(EigenError, match="slot indices"):
        dev.keep(0, 1, np.array([[5], [0]]))


class _FakeContext:
    """Records what the engine asks of a TensorRT execution context."""

    def __init__(self):
        self.addresses, self.shapes, self.profiles, self.runs = {}, {}, [], 0

    def set_tensor_address(self, name, ptr):
        self.addresses[name] = ptr

    def set_input_shape(self, name, shape):
        self.shapes[name] = tuple(shape)

    def set_optimization_profile_async(self, index, stream):
        self.profiles.append(index)

    def execute_async_v3(self, stream):
        self.runs += 1
        return True


def _fake_tensorrt(context, aliased=True):
    """The slice of the tensorrt module TrtEngine uses, with present.* aliased to past_key_values.*."""
    engine = types.SimpleNamespace(
        create_execution_context=lambda: context, get_tensor_shape=lambda name: (-1, -1, 50),
        get_aliased_input_tensor=lambda name: name.replace("present.", "past_key_values.") if aliased else None)
    logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, severity: None})
    return types.SimpleNamespace(Logger=logger,
                                 Runtime=lambda log: types.SimpleNamespace(deserialize_cuda_engine=lambda plan: engine))


def test_trt_engine_binds_each_cache_buffer_as_past_and_present():
    """With a fake TensorRT on the CPU: one buffer per K/V bound to both past and present, the decode profile
    for one token, input shapes per step, slot positions uploaded, bindings per cache and profile switch."""
    from eigenkv.engines.trt import BuildOptions, TrtEngine
    from eigenkv.manifest import IONames, KVLayout
    layout, io, context = KVLayout(**LAYOUT), IONames(), _FakeContext()
    fake = _fake_tensorrt(context)
    ranges = BuildOptions(max_batch=2).profiles(layout)
    profiles = {name: dict(index=i, **{k: list(v) for k, v in r.items()}) for i, (name, r) in enumerate(ranges.items())}
    engine = TrtEngine(fake, b"plan", layout, io, "fp32", profiles, device="cpu")
    cache = engine.new_cache(2, 16)
    logits = engine.step(cache, np.ones((2, 3), np.int64), np.tile(np.arange(3), (2, 1)))
    cache.advance(np.array([3, 3]))
    for step in range(2):
        engine.step(cache, np.ones((2, 1), np.int64), np.full((2, 1), 3 + step))
        cache.advance(np.array([1, 1]))
    assert logits.shape == (2, 3, 50) and context.runs == 3
    assert context.profiles == [profiles["prefill"]["index"], profiles["decode"]["index"]]
    for past, present, ptr in zip(io.past(2), io.present(2), cache.pointers()):
        assert context.addresses[past] == context.addresses[present] == ptr
    assert context.shapes[io.input_ids] == (2, 1) and context.shapes[io.cache_lengths] == (2, 2)
    assert context.shapes["past_key_values.1.key"] == (2, 2, 16, 5) and context.shapes["slot_positions.0"] == (2, 2, 16)
    assert engine.binds == 3 * 2 * layout.n_layers  # new_cache, then once per profile switch: never per token
    np.testing.assert_array_equal(cache.slot_tensors[1][:, :, :5].numpy(), np.tile(np.arange(5), (2, 2, 1)))
    with pytest.raises(EigenError, match="at most batch 2"):
        engine.step(engine.new_cache(3, 4), np.ones((3, 1), np.int64), np.zeros((3, 1), np.int64))
    with pytest.raises(EigenError, match="in place"):
        TrtEngine(_fake_tensorrt(context, aliased=False), b"plan", layout, io, "fp32", profiles, device="cpu")


@without_tensorrt
def test_entry_points_fail_in_one_line_without_tensorrt(tmp_path):
    """build, check_host and load each raise one line that says to install TensorRT."""
    from eigenkv.engines import trt
    calls = [lambda: trt.build(tmp_path / "m.onnx", None, tmp_path), lambda: trt.check_host(None, tmp_path),
             lambda: trt.load(tmp_path, None)]
    for call in calls:
        with pytest.raises(EigenError) as err:
            call()
        message = str(err.value)
        assert "\n" not in message and message.startswith("TensorRT is not installed")
        assert "pip install the full TensorRT for your CUDA" in message


@without_tensorrt
def test_cli_build_without_tensorrt_is_one_line_and_leaves_nothing(exported, capsys):
    """`eigenkv build --backend trt` here: exit 2, one line on stderr, no engine folder, no staging left."""
    root, graph = exported
    engine_dir = root / "trt-engine"
    capsys.readouterr()
    assert main(["build", str(graph), "-o", str(engine_dir), "--backend", "trt"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "TensorRT is not installed" in err
    assert not engine_dir.exists()
    assert not [p for p in root.iterdir() if p.name.startswith(f".{engine_dir.name}.")]


_COMPILE = r"""
import json, re, subprocess, sys, tempfile, os
from eigenkv.plugins import trt_plugin as tp, triton_attention as ta
try:
    from triton.backends.nvidia.compiler import get_ptxas
    ptxas = {cap: get_ptxas(cap).path for cap in (80, 90)}
except Exception as exc:
    print(json.dumps({"skip": f"no ptxas to compile with: {exc!r}"})); sys.exit(0)
out = {}
for name, kwargs in json.loads(sys.argv[1]).items():
    variant = tp.Variant(**kwargs)
    kernel = tp.compile_variant(variant)
    body = re.search(r"\.entry\s+\w+\s*\((.*?)\)", kernel.ptx, re.S).group(1)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.ptx")
        open(path, "w").write(kernel.ptx)
        arch = f"sm_{variant.capability}" + ("a" if variant.capability >= 90 else "")
        run = subprocess.run([ptxas[variant.capability], f"-arch={arch}", path, "-o", path + ".cubin"],
                             capture_output=True, text=True)
    out[name] = dict(name=kernel.name, params=kernel.params, entry=re.findall(r"\.param\s+\.(\w+)", body),
                     signature=[t for t in tp.kernel_signature(variant)[0].values() if t != "constexpr"],
                     ptxas=run.returncode, ptxas_err=run.stderr[-500:])
print(json.dumps(out))
"""

VARIANTS = {  # a pre-mode llama layer without ALiBi; a rank-mode layer with ALiBi and no slot positions
    "pre-fp16-sm90": dict(scale=0.125, rope_mode=1, causal=True, dtype="float16", has_slot_positions=True,
                          has_alibi=False, r_k=13, r_v=51, head_dim=64, groups=3, key_up_per_head=True, seq_hint=1,
                          capability=90),
    "rank-bf16-sm80": dict(scale=0.125, rope_mode=0, causal=True, dtype="bfloat16", has_slot_positions=False,
                           has_alibi=True, r_k=16, r_v=24, head_dim=0, groups=4, key_up_per_head=False, seq_hint=64,
                           capability=80),
}


@needs_triton
def test_aot_launch_arguments_are_launch_params():
    """The compiled entry takes exactly LAUNCH_PARAMS (all ten inputs, the int32 sizes, the output), the
    order TensorRT passes (inputs, extra ints, outputs), with Triton's hidden pointers stripped; ptxas
    assembles the stripped PTX."""
    from eigenkv.plugins import triton_attention as ta
    proc = subprocess.run([sys.executable, "-c", _COMPILE, json.dumps(VARIANTS)], capture_output=True, text=True,
                          env=TRITON_ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if "skip" in result:
        pytest.skip(result["skip"])
    assert ta.LAUNCH_INPUTS == tp.INPUT_NAMES and ta.LAUNCH_OUTPUTS == tp.OUTPUT_NAMES
    for name, kernel in result.items():
        assert tuple(kernel["params"]) == ta.LAUNCH_PARAMS, name
        want = ["u32" if t == "i32" else "u64" for t in kernel["signature"]]
        assert kernel["entry"] == want and len(want) == len(ta.LAUNCH_PARAMS), name
        assert want == ["u64"] * 10 + ["u32"] * len(ta.LAUNCH_INTS) + ["u64"]
        assert kernel["ptxas"] == 0, kernel["ptxas_err"]


_LAUNCH = r"""
import ctypes, json, sys, torch
from eigenkv.plugins import trt_plugin as tp, triton_attention as ta
from eigenkv.plugins.reference import low_rank_attention
torch.manual_seed(0)
major, minor = torch.cuda.get_device_capability()
B, HKV, G, S, C, RK, RV, D = 2, 2, 3, 5, 70, 13, 20, 64
variant = tp.Variant(scale=D ** -0.5, rope_mode=1, causal=True, dtype="float32", has_slot_positions=True,
                     has_alibi=False, r_k=RK, r_v=RV, head_dim=D, groups=G, key_up_per_head=True, seq_hint=1,
                     capability=major * 10 + minor)
kernel = tp.compile_variant(variant)
dev = "cuda"
lengths = torch.tensor([C - 7, 40], dtype=torch.int32, device=dev)
qpos = (lengths[:, None] - S + torch.arange(S, device=dev)).to(torch.int32)
cos, sin = torch.randn(128, D, device=dev), torch.randn(128, D, device=dev)
t = dict(query=torch.randn(B, HKV * G, S, D, device=dev), key_cache=torch.randn(B, HKV, C, RK, device=dev),
         value_cache=torch.randn(B, HKV, C, RV, device=dev), cache_lengths=lengths, query_positions=qpos,
         slot_positions=torch.arange(C, dtype=torch.int32, device=dev).expand(B, HKV, C).contiguous(),
         key_up=torch.randn(HKV, RK, D, device=dev) / RK ** 0.5, rope_cos=cos, rope_sin=sin,
         alibi_slopes=torch.zeros(tp.PLACEHOLDER_SHAPES["alibi_slopes"], device=dev))  # the placeholder
attn = torch.full((B, HKV * G, S, RV), float("nan"), device=dev)
ints = dict(n_kv_heads=HKV, seq_len=S, n_slots=C, n_positions=cos.shape[0])
cuda = ctypes.CDLL("libcuda.so.1")
cuda.cuModuleLoadData.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_char_p]
cuda.cuModuleGetFunction.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p, ctypes.c_char_p]
cuda.cuFuncSetAttribute.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
cuda.cuLaunchKernel.argtypes = ([ctypes.c_void_p] + [ctypes.c_uint] * 7
                               + [ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p])
module, func = ctypes.c_void_p(), ctypes.c_void_p()
assert cuda.cuModuleLoadData(ctypes.byref(module), kernel.ptx.encode()) == 0, "cuModuleLoadData"
assert cuda.cuModuleGetFunction(ctypes.byref(func), module, kernel.name.encode()) == 0
if kernel.shared > 48 * 1024:
    assert cuda.cuFuncSetAttribute(func, 8, kernel.shared) == 0  # CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
args = [ctypes.c_void_p(t[n].data_ptr()) for n in tp.INPUT_NAMES] + [ctypes.c_int32(ints[n]) for n in ta.LAUNCH_INTS]
args.append(ctypes.c_void_p(attn.data_ptr()))  # exactly what TensorRT passes: inputs, extra ints, outputs
params = (ctypes.c_void_p * len(args))(*[ctypes.cast(ctypes.pointer(a), ctypes.c_void_p) for a in args])
stream = torch.cuda.current_stream().cuda_stream
grid = (B * HKV, -(-S // kernel.block_s), 1)
assert cuda.cuLaunchKernel(func, *grid, kernel.num_warps * 32, 1, 1, kernel.shared, stream, params, None) == 0
torch.cuda.synchronize()
ref = low_rank_attention(*(t[n].double() if t[n].is_floating_point() else t[n] for n in tp.INPUT_NAMES[:5]),
                         scale=variant.scale, rope_mode=1, slot_positions=t["slot_positions"],
                         key_up=t["key_up"].double(), rope_cos=cos.double(), rope_sin=sin.double())
print(json.dumps({"max_err": float((attn.double() - ref).abs().max()), "params": len(args)}))
"""


@needs_triton
def test_aot_kernel_matches_reference_when_launched_like_tensorrt():
    """On a CUDA GPU without TensorRT: load the plugin's PTX with the driver and launch it with exactly
    the arguments and geometry TensorRT's AOT launcher uses; the result matches the reference."""
    import torch
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU here")
    proc = subprocess.run([sys.executable, "-c", _LAUNCH], capture_output=True, text=True, env=TRITON_ENV,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["params"] == 15 and result["max_err"] < 2e-5


# ----------------------------------------------------------------------------- with TensorRT

@pytest.fixture(scope="module")
def engines(exported):
    """The tiny export built by both backends: (graph, ort engine dir, trt engine dir). The TensorRT
    build compiles the plugin's kernel with triton, so it runs in a subprocess without TRITON_INTERPRET."""
    root, graph = exported
    ort_dir, trt_dir = root / "ort-engine", root / "trt-engine-built"
    assert main(["build", str(graph), "-o", str(ort_dir), "--backend", "ort"]) == 0
    proc = subprocess.run([sys.executable, "-m", "eigenkv.cli", "build", str(graph), "-o", str(trt_dir), "--backend",
                           "trt"], capture_output=True, text=True, env=TRITON_ENV, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return graph, ort_dir, trt_dir


@needs_tensorrt
def test_trt_build_records_the_host(engines):
    """config.json: plan file, TensorRT version, GPU, profiles and the plugin's hash."""
    import tensorrt
    import torch
    _, _, trt_dir = engines
    config = json.loads((trt_dir / "config.json").read_text())
    assert config["backend"] == "trt" and (trt_dir / config["model_file"]).stat().st_size > 0
    assert config["runtime"]["tensorrt"] == tensorrt.__version__
    assert config["runtime"]["plugin"] == tp.plugin_fingerprint()
    assert set(config["runtime"]["profiles"]) == {"prefill", "decode"}
    assert config["runtime"]["profiles"]["decode"]["tokens"] == [1, 1, 1]
    major, minor = torch.cuda.get_device_capability(0)
    assert config["device"] == {"name": torch.cuda.get_device_name(0), "compute_capability": f"{major}.{minor}"}
    assert (trt_dir / "timing.cache").stat().st_size > 0


def _run_steps(engine, prompts: np.ndarray, decode: int) -> list[np.ndarray]:
    """Prefill a batch, then `decode` greedy steps; every step's logits (host arrays)."""
    batch, length = prompts.shape
    cache = engine.new_cache(batch, length + decode)
    positions = np.broadcast_to(np.arange(length), prompts.shape)
    out = [engine.step(cache, prompts, positions)]
    cache.advance(np.full(batch, length))
    for step in range(decode):
        tokens = out[-1][:, -1].argmax(-1)[:, None]
        out.append(engine.step(cache, tokens, np.full((batch, 1), length + step)))
        cache.advance(np.ones(batch, np.int64))
    return out


@needs_tensorrt
def test_trt_logits_match_the_ort_engine(engines):
    """Same export, same prompts: TensorRT (fp32, TF32 off) logits within 1e-3 of ONNX Runtime's, prefill
    and 4 decode steps (the ORT engine's greedy tokens drive both)."""
    from eigenkv.engines.backend import load_engine
    _, ort_dir, trt_dir = engines
    prompts = np.random.default_rng(0).integers(0, 256, (2, 11))
    ort_steps = _run_steps(load_engine(ort_dir), prompts, 4)
    trt_steps = _run_steps(load_engine(trt_dir), prompts, 4)
    for i, (a, b) in enumerate(zip(ort_steps, trt_steps)):
        assert a.shape == b.shape, i
        assert np.abs(a.astype(np.float64) - b).max() < 1e-3, (i, float(np.abs(a - b).max()))


@needs_tensorrt
def test_trt_kv_cache_is_updated_in_place(engines):
    """Buffers never move during decode; they are bound per cache (and profile switch), not per token."""
    from eigenkv.engines.backend import load_engine
    _, _, trt_dir = engines
    engine = load_engine(trt_dir)
    prompts = np.random.default_rng(1).integers(0, 256, (1, 7))
    cache = engine.new_cache(1, 16)
    before, binds = cache.pointers(), engine.binds
    engine.step(cache, prompts, np.arange(7)[None])
    cache.advance(np.array([7]))
    for step in range(5):
        engine.step(cache, np.array([[3]]), np.array([[7 + step]]))
        cache.advance(np.array([1]))
    assert cache.pointers() == before
    assert engine.binds - binds <= 2 * len(before)  # at most one rebind per profile switch (prefill -> decode)
    assert np.abs(cache.keys(0)[0, :, :12]).sum() > 0 and not cache.keys(0)[0, :, 12:].any()


@needs_tensorrt
def test_trt_refuses_a_mismatched_host(engines, tmp_path):
    """Another TensorRT version, GPU or plugin hash in config.json: one line naming it and how to rebuild."""
    import shutil

    from eigenkv.engines.backend import load_engine
    _, _, trt_dir = engines
    edits = {"TensorRT 0.0.0": ("runtime", "tensorrt", "0.0.0"), "GPU Imaginary": ("device", "name", "Imaginary"),
             "another eigen::LowRankAttention plugin": ("runtime", "plugin", {"version": 1, "sha256": "0" * 64})}
    for expected, (section, key, value) in edits.items():
        copy = tmp_path / key
        shutil.copytree(trt_dir, copy)
        config = json.loads((copy / "config.json").read_text())
        config[section][key] = value
        (copy / "config.json").write_text(json.dumps(config))
        with pytest.raises(EigenError) as err:
            load_engine(copy)
        assert expected in str(err.value) and "--backend trt --force" in str(err.value)
        assert "\n" not in str(err.value)
