"""One parity matrix over every implementation of `eigen::LowRankAttention` present here, on the
same freshly generated inputs, against the float64 reference (`plugins/reference.py`).

Implementations: the reference itself in float32, the torch custom op (eager), PyTorch's fused
attention formulation it runs (`plugins/sdpa_attention.py`, float32 and float64), the model-local
ONNX function in onnxruntime, the Triton kernel (under TRITON_INTERPRET=1 on a CPU), and the
TensorRT plugin (only where tensorrt imports). A missing one is skipped with its reason. The op
inside a built ORT engine (TensorScatter writes, slot positions, per-layer lengths) is checked
end to end against a float64 model in tests/test_cache_moves.py and tests/test_eviction.py.
Tolerance: float32 max |diff| <= 1e-5, float64 <= 1e-10 (inputs ~N(0, 1), cache garbage 1e3 past the lengths).
"""

import importlib.util
import os

import numpy as np
import pytest
import torch
from test_onnx_function import _inputs, _model, _run_ort

from eigenkv.plugins.reference import ROPE_NONE, ROPE_PRE, low_rank_attention

SCALE = 0.37  # the one test_onnx_function's one-node model bakes in
TOL = 1e-5
TOL_FP64 = 1e-10  # implementations that compute in float64 (sdpa-fp64)
WINDOW = 3  # shorter than every cache length in test_onnx_function.LENGTHS (5, 9)
OPTIONAL = ("slot_positions", "key_up", "rope_cos", "rope_sin", "alibi_slopes")


def _kwargs(x, rope_mode, dtype, window=0):
    cast = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in x.items()}
    return cast, dict(scale=SCALE, rope_mode=rope_mode, window=window, **{k: cast.get(k) for k in OPTIONAL})


def _reference32(x, rope_mode, window):
    c, kw = _kwargs(x, rope_mode, torch.float32, window)
    return low_rank_attention(c["query"], c["key_cache"], c["value_cache"], c["cache_lengths"],
                              c["query_positions"], **kw)


def _torch_op(x, rope_mode, window):
    from eigenkv.plugins.torch_op import low_rank_attention_op
    c, kw = _kwargs(x, rope_mode, torch.float32, window)
    return low_rank_attention_op(c["query"], c["key_cache"], c["value_cache"], c["cache_lengths"],
                                 c["query_positions"], **kw)


def _sdpa(dtype):
    def run(x, rope_mode, window):
        from eigenkv.plugins.sdpa_attention import sdpa_low_rank_attention
        c, kw = _kwargs(x, rope_mode, dtype, window)
        return sdpa_low_rank_attention(c["query"], c["key_cache"], c["value_cache"], c["cache_lengths"],
                                       c["query_positions"], **kw)
    return run


def _onnx_function(x, rope_mode, window):
    model = _model(set(x), rope_mode, "alibi_slopes" in x, "slot_positions" in x, np.float32, window=window)
    return torch.from_numpy(_run_ort(model, x, np.float32))


def _triton(x, rope_mode, window):
    from eigenkv.plugins.triton_attention import low_rank_attention_triton
    c, kw = _kwargs(x, rope_mode, torch.float32, window)
    return low_rank_attention_triton(c["query"], c["key_cache"], c["value_cache"], c["cache_lengths"],
                                     c["query_positions"], **kw)


def _triton_missing() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton)"
    if os.environ.get("TRITON_INTERPRET") != "1":
        return "no GPU here and TRITON_INTERPRET is not 1: the kernel cannot run on this host"
    return None


def _tensorrt_missing() -> str | None:
    try:
        import tensorrt  # noqa: F401
    except Exception as e:  # noqa: BLE001 - the bindings wheel raises various errors without its libs
        return f"tensorrt is not importable here ({type(e).__name__}); the plugin runs only where TensorRT is installed"
    return "tensorrt imports, but the plugin parity needs a GPU engine build: see tests/test_trt.py"


IMPLEMENTATIONS = {
    "reference-fp32": (_reference32, lambda: None),
    "torch-op": (_torch_op, lambda: None),
    "sdpa-fp32": (_sdpa(torch.float32), lambda: None),
    "sdpa-fp64": (_sdpa(torch.float64), lambda: None),
    "onnx-function-onnxruntime": (_onnx_function, lambda: None),
    "triton-kernel": (_triton, _triton_missing),
    "tensorrt-plugin": (None, _tensorrt_missing),
}
CASES = [(rope, alibi, slots, 0) for rope in (ROPE_NONE, ROPE_PRE) for alibi in (False, True) for slots in (False, True)]
# sliding-window layers (op version 2): the window masks by slot *positions* (shuffled slots)
CASES += [(ROPE_NONE, False, True, WINDOW), (ROPE_PRE, True, True, WINDOW), (ROPE_PRE, False, False, WINDOW)]


@pytest.mark.parametrize("name", list(IMPLEMENTATIONS))
@pytest.mark.parametrize("rope_mode, alibi, slot_positions, window", CASES)
def test_implementation_matches_float64_reference(name, rope_mode, alibi, slot_positions, window):
    run, missing = IMPLEMENTATIONS[name]
    reason = missing()
    if reason is not None:
        pytest.skip(reason)
    seed = 1000 + 10 * rope_mode + 2 * alibi + slot_positions + window  # fresh inputs per case, same for every implementation
    x = _inputs(rope_mode, alibi, slot_positions, seed)
    ref = low_rank_attention(x["query"], x["key_cache"], x["value_cache"], x["cache_lengths"], x["query_positions"],
                             **_kwargs(x, rope_mode, torch.float64, window)[1])
    out = run(x, rope_mode, window).to(torch.float64)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    assert float((out - ref).abs().max()) <= (TOL_FP64 if name.endswith("fp64") else TOL)
    if window:  # the window masks something here: without it the result differs
        unwindowed = low_rank_attention(x["query"], x["key_cache"], x["value_cache"], x["cache_lengths"],
                                        x["query_positions"], **_kwargs(x, rope_mode, torch.float64)[1])
        assert float((unwindowed - ref).abs().max()) > 100 * TOL
