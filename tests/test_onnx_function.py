"""The `eigen::LowRankAttention` ONNX function (onnxruntime, CPU) vs the float64 reference.

Each case builds a one-node model (the node as the exporter writes it, with the TensorRT
parser attributes), attaches the specialised function, runs the checker with full_check,
runs it in onnxruntime on fresh random inputs (GQA, per-batch cache lengths, garbage past
them) and compares with `reference.low_rank_attention` in float64.
Tolerances: float32 max abs diff <= 1e-5, float16 <= 2e-3.
"""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from eigenkv.plugins import spec
from eigenkv.plugins.onnx_function import attach_function, build_function
from eigenkv.plugins.reference import ROPE_NONE, ROPE_PRE, low_rank_attention

B, HQ, HKV, S, SMAX, P = 2, 6, 2, 3, 10, 16
R_K, R_V, HEAD_DIM = 5, 4, 8
LENGTHS = (5, 9)
SCALE = 0.37
TOL = {np.float32: 1e-5, np.float16: 2e-3}
_ONNX_TYPE = {np.float32: TensorProto.FLOAT, np.float16: TensorProto.FLOAT16}


def _inputs(rope_mode, alibi, slot_positions, seed, lengths=LENGTHS):
    """Random op inputs as float64 / int32 torch tensors (only those the configuration uses).

    Slots past lengths[b] hold large garbage; given slot positions are a random permutation
    of 0..len-1 per (batch, KV head) so the causal mask must follow positions, not indices.
    """
    g = torch.Generator().manual_seed(seed)
    dq = HEAD_DIM if rope_mode == ROPE_PRE else R_K
    x = {
        "query": torch.randn(B, HQ, S, dq, generator=g, dtype=torch.float64),
        "key_cache": torch.randn(B, HKV, SMAX, R_K, generator=g, dtype=torch.float64),
        "value_cache": torch.randn(B, HKV, SMAX, R_V, generator=g, dtype=torch.float64),
        "cache_lengths": torch.tensor(lengths, dtype=torch.int32),
        "query_positions": torch.stack([torch.arange(n - S, n) for n in lengths]).clamp(min=0).int(),
    }
    if slot_positions:
        pos = torch.randint(0, P, (B, HKV, SMAX), generator=g)
        for b, n in enumerate(lengths):
            for h in range(HKV):
                pos[b, h, :n] = torch.randperm(n, generator=g)
        x["slot_positions"] = pos.int()
    if rope_mode == ROPE_PRE:
        groups = HKV if alibi else 1  # cover both key_up layouts [1 | Hkv, r_k, head_dim]
        x["key_up"] = torch.randn(groups, R_K, HEAD_DIM, generator=g, dtype=torch.float64) / R_K**0.5
        angles = torch.arange(P, dtype=torch.float64)[:, None] * 0.5 ** torch.arange(HEAD_DIM // 2)
        angles = torch.cat((angles, angles), -1)
        x["rope_cos"], x["rope_sin"] = angles.cos(), angles.sin()
    if alibi:
        x["alibi_slopes"] = 0.5 ** torch.arange(1, HQ + 1, dtype=torch.float64)
    _write_garbage(x, lengths, g, scale=1e3)
    return x


def _write_garbage(x, lengths, g, scale):
    """Overwrite slots past lengths[b] of key/value caches (and slot positions) in place."""
    for b, n in enumerate(lengths):
        for name in ("key_cache", "value_cache"):
            x[name][b, :, n:] = scale * torch.randn(x[name][b, :, n:].shape, generator=g, dtype=torch.float64)
        if "slot_positions" in x:
            x["slot_positions"][b, :, n:] = torch.randint(0, P, x["slot_positions"][b, :, n:].shape, generator=g).int()


def _model(names, rope_mode, alibi, slot_positions, dtype, causal=1, window=0):
    """One-node model: the op node (parser attributes included) + the specialised function
    (reading the node's `window` when it is > 0)."""
    node_inputs = [t.name if t.name in names else "" for t in spec.INPUTS]
    while node_inputs[-1] == "":
        node_inputs.pop()  # drop unused trailing optional inputs, '' for those in the middle
    node = helper.make_node(
        spec.NAME, node_inputs, [spec.OUTPUTS[0].name], name="layer0/attn", domain=spec.DOMAIN,
        scale=SCALE, rope_mode=rope_mode, causal=causal, window=window, version=spec.VERSION,
        **spec.PARSER_ATTRIBUTES)
    ftype = _ONNX_TYPE[dtype]
    graph_inputs = [helper.make_tensor_value_info(t.name, TensorProto.INT32 if t.dtype == "int32" else ftype,
                                                  t.shape.split(",")) for t in spec.INPUTS if t.name in names]
    output = helper.make_tensor_value_info(spec.OUTPUTS[0].name, ftype, spec.OUTPUTS[0].shape.split(","))
    model = helper.make_model(helper.make_graph([node], "lra_test", graph_inputs, [output]),
                              opset_imports=[helper.make_opsetid("", 24)])
    attach_function(model, build_function(rope_mode=rope_mode, alibi=alibi, slot_positions=slot_positions,
                                          window=window > 0))
    onnx.checker.check_model(model, full_check=True)
    return model


def _run_ort(model, x, dtype):
    """Run in onnxruntime CPU; float inputs cast to dtype. Returns float64 numpy [B,Hq,S,r_v]."""
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {k: v.numpy().astype(np.int32 if v.dtype == torch.int32 else dtype) for k, v in x.items()}
    (out,) = sess.run(None, feeds)
    assert out.dtype == dtype and out.shape == (B, HQ, S, R_V)
    return out.astype(np.float64)


def _reference(x, rope_mode, dtype, causal=True):
    """float64 reference on the inputs as ORT sees them (floats rounded to dtype)."""
    y = {k: (v if v.dtype == torch.int32 else torch.from_numpy(v.numpy().astype(dtype)).double()) for k, v in x.items()}
    return low_rank_attention(
        y["query"], y["key_cache"], y["value_cache"], y["cache_lengths"], y["query_positions"],
        scale=SCALE, rope_mode=rope_mode, causal=causal, slot_positions=y.get("slot_positions"),
        key_up=y.get("key_up"), rope_cos=y.get("rope_cos"), rope_sin=y.get("rope_sin"),
        alibi_slopes=y.get("alibi_slopes")).numpy()


CASES = [(r, a, sp, np.float32) for r in (ROPE_NONE, ROPE_PRE) for a in (False, True) for sp in (False, True)]
CASES.append((ROPE_PRE, True, True, np.float16))


@pytest.mark.parametrize("rope_mode,alibi,slot_positions,dtype", CASES,
                         ids=[f"rope{r}-alibi{int(a)}-slots{int(sp)}-{d.__name__}" for r, a, sp, d in CASES])
def test_function_matches_reference(rope_mode, alibi, slot_positions, dtype):
    x = _inputs(rope_mode, alibi, slot_positions, seed=10 + 4 * rope_mode + 2 * alibi + slot_positions)
    model = _model(set(x), rope_mode, alibi, slot_positions, dtype)
    out, ref = _run_ort(model, x, dtype), _reference(x, rope_mode, dtype)
    diff = np.abs(out - ref).max()
    print(f"rope_mode={rope_mode} alibi={alibi} slot_positions={slot_positions} {dtype.__name__}: max|diff|={diff:.2e}")
    assert np.abs(ref).max() > 0.1  # a meaningful comparison, not two near-zero tensors
    assert diff <= TOL[dtype]

    # garbage past cache_lengths must not reach the output (bitwise)
    _write_garbage(x, LENGTHS, torch.Generator().manual_seed(99), scale=1e4)
    np.testing.assert_array_equal(_run_ort(model, x, dtype), out)


@pytest.mark.parametrize("rope_mode", [ROPE_NONE, ROPE_PRE])
def test_causal_attribute_is_read_from_the_node(rope_mode):
    """causal=0 on the node: every valid slot is attended (function reads the attribute)."""
    x = _inputs(rope_mode, alibi=True, slot_positions=True, seed=3)
    model = _model(set(x), rope_mode, True, True, np.float32, causal=0)
    out, ref = _run_ort(model, x, np.float32), _reference(x, rope_mode, np.float32, causal=False)
    assert np.abs(out - ref).max() <= TOL[np.float32]
    assert np.abs(ref - _reference(x, rope_mode, np.float32, causal=True)).max() > 1e-2  # causal matters here


def test_rows_without_valid_slot_give_zeros():
    """cache_lengths 0 and queries before every slot position: zeros, not NaN."""
    x = _inputs(ROPE_PRE, alibi=True, slot_positions=True, seed=4, lengths=(0, 9))
    x["slot_positions"][1, :, :9] += 3  # batch 1: query position 6 sees slots at 3..6 only; none for ...
    x["query_positions"][1] = torch.tensor([1, 2, 6], dtype=torch.int32)  # ... positions 1, 2
    model = _model(set(x), ROPE_PRE, True, True, np.float32)
    out, ref = _run_ort(model, x, np.float32), _reference(x, ROPE_PRE, np.float32)
    assert not np.isnan(out).any()
    assert (out[0] == 0).all() and (out[1, :, :2] == 0).all() and np.abs(out[1, :, 2]).max() > 0
    assert np.abs(out - ref).max() <= TOL[np.float32]


def test_function_signature_and_specialisation():
    """All spec inputs/attributes declared; the body reads only what the configuration uses."""
    for rope_mode, alibi, slots in [(ROPE_NONE, False, False), (ROPE_PRE, True, True)]:
        f = build_function(rope_mode=rope_mode, alibi=alibi, slot_positions=slots)
        assert (f.domain, f.name) == (spec.DOMAIN, spec.NAME)
        assert list(f.input) == [t.name for t in spec.INPUTS] and list(f.output) == ["attn"]
        assert list(f.attribute) == [a.name for a in spec.ATTRIBUTES]
        assert {(o.domain, o.version) for o in f.opset_import} == {("", 24)}
        read = {i for n in f.node for i in n.input} & set(f.input)
        optional = {"slot_positions": slots, "key_up": rope_mode == ROPE_PRE, "rope_cos": rope_mode == ROPE_PRE,
                    "rope_sin": rope_mode == ROPE_PRE, "alibi_slopes": alibi}
        assert read == {"query", "key_cache", "value_cache", "cache_lengths", "query_positions"} | {
            k for k, used in optional.items() if used}
        refs = {a.ref_attr_name for n in f.node for a in n.attribute if a.ref_attr_name}
        assert refs == {"scale", "causal"}
        assert all(n.name.startswith("lra/") for n in f.node)


def test_attach_function_replaces_and_imports_domains():
    model = helper.make_model(helper.make_graph([], "g", [], []), opset_imports=[helper.make_opsetid("", 24)])
    attach_function(model, build_function(rope_mode=ROPE_NONE, alibi=False, slot_positions=False))
    attach_function(model, build_function(rope_mode=ROPE_PRE, alibi=False, slot_positions=False))
    assert len(model.functions) == 1 and any(n.op_type == "Gather" for n in model.functions[0].node)
    assert {(o.domain, o.version) for o in model.opset_import} == {("", 24), (spec.DOMAIN, spec.VERSION)}
    with pytest.raises(ValueError, match="opset"):  # checker rejects mismatched standard opsets
        attach_function(model, build_function(rope_mode=ROPE_NONE, alibi=False, slot_positions=False, opset=21))
