"""`eigen::LowRankAttention` as a model-local ONNX function (standard ONNX ops only).

The function lets any ONNX runtime (onnxruntime, the checker, shape inference) run a model
holding the custom node; TensorRT instead maps the node to the plugin (`plugin_namespace`).
Its math is `reference.low_rank_attention`; its signature is `spec.py`.

The body is *specialised* for one model configuration (`rope_mode`, ALiBi on/off, slot
positions given or not): it only reads the inputs that configuration uses, so the node may
pass '' for the unused optional inputs. The node's `rope_mode` attribute must match the
`rope_mode` the function was built for (a body cannot switch inputs on an attribute), and
`version` is declared but not read. `scale`, `causal` and (in a body built with `window=True`)
`window` are read from the node through attribute references, so one function serves every
layer, local (sliding-window) and global alike. All attributes are declared without defaults:
the node must carry them all (the exporter writes them all).

Shapes (all dynamic; G = Hq / Hkv query heads per KV head):
  query [B, Hq, S, dq], key_cache [B, Hkv, Smax, r_k], value_cache [B, Hkv, Smax, r_v],
  cache_lengths int32 [B], query_positions int32 [B, S], slot_positions int32 [B, Hkv, Smax],
  key_up [1 or Hkv, r_k, head_dim], rope_cos/rope_sin [P, head_dim], alibi_slopes [Hq]
  -> attn [B, Hq, S, r_v] in the query's dtype.

GQA is done without copying K/V: the query is viewed as [B, Hkv, G, S, dq] (query head
h = kv * G + g reads KV head h // G, as `repeat_interleave` does), keys and values get a
unit group axis, and every mask broadcasts in that 5-D layout. Scores, softmax and the
value product run in float32; the result is CastLike'd back to the query.
"""

from __future__ import annotations

import onnx
from onnx import AttributeProto, TensorProto, helper

from eigenkv.plugins import spec
from eigenkv.plugins.reference import ROPE_NONE, ROPE_PRE

PREFIX = "lra/"
OUTPUT = spec.OUTPUTS[0].name
MIN_OPSET = 18  # Split(num_outputs=...); CastLike needs 15, Unsqueeze/Softmax(axis) 13

_F32 = TensorProto.FLOAT


class _Body:
    """Collects the function's nodes with deterministic `lra/<name>` node and value names."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []

    def op(self, op_type: str, inputs: list[str], name: str, n_out: int = 1, **attrs) -> str | list[str]:
        """Add one node named `lra/<name>`; returns its output name (or names if n_out > 1)."""
        node_name = PREFIX + name
        outputs = [node_name] if n_out == 1 else [f"{node_name}_{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outputs, name=node_name, **attrs))
        return outputs[0] if n_out == 1 else outputs

    def ints(self, name: str, values: list[int]) -> str:
        """int64 [len(values)] constant."""
        return self.op("Constant", [], name, value_ints=list(values))

    def scalar(self, name: str, value: float) -> str:
        """float32 [] constant."""
        return self.op("Constant", [], name, value_float=float(value))

    def attr_constant(self, name: str, value_key: str, attr_type: int, ref: str) -> str:
        """Scalar Constant whose value is the calling node's attribute `ref`."""
        node_name = PREFIX + name
        node = helper.make_node("Constant", [], [node_name], name=node_name)
        node.attribute.append(helper.make_attribute_ref(value_key, attr_type, ref_attr_name=ref))
        self.nodes.append(node)
        return node_name


def _gqa_query(b: _Body, query: str, key_cache: str) -> str:
    """query [B, Hq, S, dq] -> float32 [B, Hkv, G, S, dq]."""
    q_shape = b.op("Shape", [query], "q_shape")
    batch = b.op("Slice", [q_shape, b.ints("i0", [0]), b.ints("i1", [1])], "batch")
    s_dq = b.op("Slice", [q_shape, b.ints("i2", [2]), b.ints("i4", [4])], "s_dq")
    hkv = b.op("Shape", [key_cache], "hkv", start=1, end=2)
    shape5 = b.op("Concat", [batch, hkv, b.ints("minus1", [-1]), s_dq], "q5_shape", axis=0)
    q32 = b.op("Cast", [query], "q_f32", to=_F32)
    return b.op("Reshape", [q32, shape5], "q5")


def _rope_keys(b: _Body, key_cache: str, key_up: str, cos: str, sin: str, k_pos_idx: str) -> str:
    """Pre mode: float32 keys [B, Hkv, Smax, hd] = rope(key_cache @ key_up, k_pos_idx).

    k_pos_idx: int [B, Hkv, Smax] slot positions or int64 [Smax] slot indices.
    """
    k = b.op("MatMul", [b.op("Cast", [key_cache], "kr_f32", to=_F32),
                        b.op("Cast", [key_up], "key_up_f32", to=_F32)], "k_up")  # [B,Hkv,Smax,hd]
    c = b.op("Cast", [b.op("Gather", [cos, k_pos_idx], "cos_rows", axis=0)], "cos_f32", to=_F32)
    s = b.op("Cast", [b.op("Gather", [sin, k_pos_idx], "sin_rows", axis=0)], "sin_f32", to=_F32)
    x1, x2 = b.op("Split", [k], "k_halves", n_out=2, axis=-1, num_outputs=2)
    rot = b.op("Concat", [b.op("Neg", [x2], "k_neg_x2"), x1], "k_rot_half", axis=-1)
    return b.op("Add", [b.op("Mul", [k, c], "k_cos"), b.op("Mul", [rot, s], "k_sin")], "k_rope")


def _masks(b: _Body, key_cache: str, cache_lengths: str, q_pos: str, k_pos: str, window: bool = False) -> str:
    """bool [B, Hkv|1, 1, S, Smax]: slot < cache_lengths[b] and (not causal or k_pos <= q_pos)
    [and (window <= 0 or q_pos - k_pos < window) when built with `window`].

    q_pos int64 [B, 1, 1, S, 1]; k_pos int64 [B, Hkv, 1, 1, Smax] or [Smax].
    """
    smax = b.op("Shape", [key_cache], "smax", start=2, end=3)
    slot = b.op("Range", [b.op("Constant", [], "zero_i64", value_int=0),
                          b.op("Squeeze", [smax], "smax_scalar"),
                          b.op("Constant", [], "one_i64", value_int=1)], "slot_index")  # [Smax]
    lengths = b.op("Unsqueeze", [b.op("Cast", [cache_lengths], "lengths_i64", to=TensorProto.INT64),
                                 b.ints("axes_len", [1, 2, 3, 4])], "lengths5")  # [B,1,1,1,1]
    in_cache = b.op("Less", [slot, lengths], "in_cache")  # [B,1,1,1,Smax]
    causal = b.op("Cast", [b.attr_constant("causal", "value_int", AttributeProto.INT, "causal")],
                  "causal_bool", to=TensorProto.BOOL)
    past = b.op("LessOrEqual", [k_pos, q_pos], "not_future")  # [B,Hkv|1,1,S,Smax]
    allowed = b.op("Or", [past, b.op("Not", [causal], "not_causal")], "causal_ok")
    if window:
        size = b.attr_constant("window", "value_int", AttributeProto.INT, "window")  # int64 []
        near = b.op("Less", [b.op("Sub", [q_pos, k_pos], "window_dist"), size], "in_window")
        no_window = b.op("LessOrEqual", [size, b.op("Constant", [], "window_off", value_int=0)], "no_window")
        allowed = b.op("And", [allowed, b.op("Or", [near, no_window], "window_ok")], "causal_window_ok")
    return b.op("And", [in_cache, allowed], "valid")


def _alibi(b: _Body, scores: str, slopes: str, key_cache: str, q_pos: str, k_pos: str) -> str:
    """scores [B, Hkv, G, S, Smax] - slope[h] * (q_pos - k_pos); slopes [Hq] -> [Hkv, G, 1, 1]."""
    hkv = b.op("Shape", [key_cache], "alibi_hkv", start=1, end=2)
    shape = b.op("Concat", [hkv, b.ints("alibi_tail", [-1, 1, 1])], "alibi_shape", axis=0)
    slope = b.op("Reshape", [b.op("Cast", [slopes], "slopes_f32", to=_F32), shape], "slopes4")
    dist = b.op("Cast", [b.op("Sub", [q_pos, k_pos], "dist_i64")], "dist", to=_F32)
    return b.op("Sub", [scores, b.op("Mul", [slope, dist], "alibi_bias")], "scores_alibi")


def build_function(*, rope_mode: int, alibi: bool, slot_positions: bool, opset: int = 24,
                   window: bool = False) -> onnx.FunctionProto:
    """The `eigen::LowRankAttention` function for one configuration (see the module doc);
    `window`: the body reads the node's `window` attribute (a model with sliding-window layers)."""
    if rope_mode not in (ROPE_NONE, ROPE_PRE):
        raise ValueError(f"rope_mode must be {ROPE_NONE} or {ROPE_PRE}, got {rope_mode}")
    if opset < MIN_OPSET:
        raise ValueError(f"opset must be >= {MIN_OPSET}, got {opset}")
    inputs = [t.name for t in spec.INPUTS]
    (query, key_cache, value_cache, cache_lengths, query_positions, slot_pos_in,
     key_up, rope_cos, rope_sin, alibi_slopes) = inputs
    b = _Body()

    # positions: q_pos int64 [B,1,1,S,1]; k_pos int64 [B,Hkv,1,1,Smax] (given) or [Smax] (index)
    q_pos = b.op("Unsqueeze", [b.op("Cast", [query_positions], "q_pos_i64", to=TensorProto.INT64),
                               b.ints("axes_qpos", [1, 2, 4])], "q_pos5")
    if slot_positions:
        k_pos = b.op("Unsqueeze", [b.op("Cast", [slot_pos_in], "k_pos_i64", to=TensorProto.INT64),
                                   b.ints("axes_kpos", [2, 3])], "k_pos5")
        rope_index = slot_pos_in
    else:
        smax = b.op("Shape", [key_cache], "slot_count", start=2, end=3)
        k_pos = b.op("Range", [b.op("Constant", [], "pos_start", value_int=0),
                               b.op("Squeeze", [smax], "slot_count_scalar"),
                               b.op("Constant", [], "pos_step", value_int=1)], "k_pos_index")
        rope_index = k_pos

    if rope_mode == ROPE_PRE:
        keys = _rope_keys(b, key_cache, key_up, rope_cos, rope_sin, rope_index)
    else:
        keys = b.op("Cast", [key_cache], "k_f32", to=_F32)
    keys_t = b.op("Unsqueeze", [b.op("Transpose", [keys], "k_t", perm=[0, 1, 3, 2]),
                                b.ints("axes_group", [2])], "k_t5")  # [B,Hkv,1,d,Smax]

    q5 = _gqa_query(b, query, key_cache)  # [B,Hkv,G,S,d]
    scale = b.attr_constant("scale", "value_float", AttributeProto.FLOAT, "scale")
    scores = b.op("Mul", [b.op("MatMul", [q5, keys_t], "qk"), scale], "scores")  # [B,Hkv,G,S,Smax]
    if alibi:
        scores = _alibi(b, scores, alibi_slopes, key_cache, q_pos, k_pos)

    valid = _masks(b, key_cache, cache_lengths, q_pos, k_pos, window)
    masked = b.op("Where", [valid, scores, b.scalar("minus_inf", float("-inf"))], "scores_masked")
    probs = b.op("Softmax", [masked], "softmax", axis=-1)
    probs = b.op("Where", [valid, probs, b.scalar("zero_f32", 0.0)], "probs")  # all-masked rows: 0

    values = b.op("Unsqueeze", [b.op("Cast", [value_cache], "v_f32", to=_F32), b.ints("axes_v", [2])], "v5")
    attn5 = b.op("MatMul", [probs, values], "attn5")  # [B,Hkv,G,S,r_v]
    out_shape = b.op("Concat", [b.op("Shape", [query], "q_bhs", start=0, end=3),
                                b.op("Shape", [value_cache], "rv", start=3, end=4)], "out_shape", axis=0)
    attn = b.op("Reshape", [attn5, out_shape], "attn_f32")
    b.nodes.append(helper.make_node("CastLike", [attn, query], [OUTPUT], name=PREFIX + "cast_out"))

    return helper.make_function(
        spec.DOMAIN, spec.NAME, inputs, [OUTPUT], b.nodes,
        opset_imports=[helper.make_opsetid("", opset)],
        attributes=[a.name for a in spec.ATTRIBUTES],
        doc_string=f"eigen::LowRankAttention v{spec.VERSION} specialised for rope_mode={rope_mode}, "
                   f"alibi={alibi}, slot_positions={slot_positions}, window={window} (node rope_mode must match).",
    )


def attach_function(model: onnx.ModelProto, function: onnx.FunctionProto) -> None:
    """Add `function` to `model.functions` (replacing one with the same domain/name/overload)
    and import its domain at `spec.VERSION` plus the standard domain at the function's opset.

    Raises ValueError if the model already imports the standard domain at another version:
    onnxruntime runs such a model, but `onnx.checker` rejects it, so build the function at
    the model's opset instead.
    """
    std = next((o.version for o in function.opset_import if o.domain in ("", "ai.onnx")), None)
    if std is None:
        raise ValueError("function imports no standard ONNX opset")
    versions = {("" if o.domain == "ai.onnx" else o.domain): o for o in model.opset_import}
    if "" in versions and versions[""].version != std:
        raise ValueError(f"model imports opset {versions[''].version}, function {function.name} opset {std}: "
                         f"build the function with opset={versions[''].version}")

    key = (function.domain, function.name, function.overload)
    kept = [f for f in model.functions if (f.domain, f.name, f.overload) != key]
    del model.functions[:]
    model.functions.extend(kept + [function])

    if function.domain in versions:
        versions[function.domain].version = spec.VERSION
    else:
        model.opset_import.append(helper.make_opsetid(function.domain, spec.VERSION))
    if "" not in versions:
        model.opset_import.append(helper.make_opsetid("", std))
