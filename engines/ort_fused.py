"""The ORT engine's attention rewrite: fused ONNX Runtime kernels in place of the op's ONNX function.

The exported graph keeps one `eigen::LowRankAttention` node per layer (TensorRT's parser maps it
to the plugin; ONNX Runtime runs its model-local function of standard ops). `eigenkv build
--backend ort` rewrites its own copy before ONNX Runtime optimises it (engines/ort.py), each
layer into the formulation of `plan[rope_mode]` (`DEFAULT_PLAN`: what measured fastest on ONNX
Runtime's CPU provider), all exact against the op's reference math:

- `gqa` (keys cached ready to score and key width == value width: the uncompressed `rotated`
  baseline, rank-space keys of equal ranks): the layer's two `TensorScatter` cache writes and its
  attention node become one com.microsoft `GroupQueryAttention` in shared-buffer mode. Its past
  inputs are the graph's past inputs, its present outputs the graph's present outputs, which the
  engine binds to the same memory: the kernel sees past == present and appends the step's keys
  and values in place at slot cache_lengths[i]. `seqlens_k` = cache_lengths[i] + S - 1 (int32),
  `total_sequence_length` = the layer's maximum over sequences + 1 (GQA sizes `present` from it:
  with eviction the layers' buffers differ, so one bound for all layers would not fit), `query_seqlens` = S for every sequence (every new
  token goes to the cache, as TensorScatter wrote them; it also lifts GQA's batch-1 limit on
  multi-token steps with a past), `scale` the op's. These three are computed once per step for
  all layers when the layer's slot count is the exporter's `Cast(cache_lengths[i] + S)`; each
  layer takes its row (one Split of the flat table). Where the queries and keys are the
  exporter's rotate-half RoPE of rows gathered at the graph input `position_ids` (`_rope_of`),
  GQA rotates them itself (`do_rotary=1`, the tables' first halves as cos/sin caches,
  `position_ids` given, so each token is rotated at its own position, not at its slot: exact
  after eviction moved slots, on right-padded and multi-token steps); otherwise `do_rotary=0`
  on the graph's rotated tensors.
  The exporter's head split (Reshape + Transpose) before and head merge after the op are
  dropped where recognised (GQA reads and writes [B, S, H*d]), and `pack_qkv` then packs the
  Q, K, V projections into one MatMul (GQA's packed input). A layer whose widths differ, or are
  not a multiple of 8 (GQA's limit), falls back to `attention`. A `pre` layer whose key_up is the
  identity (keys and values at full width: a layer `--compress-layers` left alone) is a GQA layer
  too: its cache would hold the un-rotated keys, GQA's holds them rotated at their positions, and
  the scores and every key's norm (what eviction reads) are the same.
- `attention` (keys cached ready to score, any widths: rank-space keys with r_v != r_k): the
  cache writes stay `TensorScatter` (in place) and attention is ONNX `Attention` (opset 24) over
  the whole buffers with `nonpad_kv_seqlen` = valid slots after the write and `is_causal=1`
  (bottom-right aligned: new query s sees slots 0..cache_lengths[i] + s). In `pre` mode
  (rank-r pre-RoPE keys) the keys are first rebuilt `K_r @ key_up` and rotated at their slot
  positions by ONNX `RotaryEmbedding` (opset 23: one kernel that reads the [P, hd/2] tables by
  position, instead of gathering two [Smax, hd] tables and five elementwise passes).
- `attention-rows` (`pre` mode): the same kernels inside an ONNX `Scan` over the B*Hkv (sequence,
  KV head) rows, so one row's rebuilt and rotated keys ([n, hd]) stay in cache between the
  three kernels instead of a [B, Hkv, Smax, hd] tensor streaming through memory three times. Each
  row first slices its cache to its n = cache_lengths[b] valid slots (one Slice each of keys,
  values and slot positions), so the rebuild costs n·r_k·hd multiply-adds, not Smax·r_k·hd: a buffer
  allocated for the whole generation (prompt + max new tokens) or a chunked prefill's early
  chunks no longer pay for the slots not yet written.
- `attention-valid` (`pre` mode): `attention` over the first max(cache_lengths) slots only (one
  Slice each of keys, values and slot positions first), so a buffer allocated for the whole
  generation or a chunked prefill's early chunks rebuild only the batch's longest valid length.
- `attention-by-step` (`pre` mode, the default): ONNX `If`s pick per step from the layer's valid
  slots after the write: a ragged batch (over a third of the first max(cache_lengths) slots of the
  batch unwritten; for a decode step over a buffer not nearly full, over a fifth) runs
  `attention-rows`; otherwise a nearly full buffer (longest >= 4/5 of its
  slots) runs `attention` over the whole buffers (no copies) and anything else `attention-valid`.
  Measured on the default model at kv-ratio 0.5 (2 threads, docs/results/bench_pre_valid_slices/):
  over full buffers `attention` decodes 1.24-1.5x faster than `attention-valid` (2k x 1: 69-74 vs
  92-104 ms/token; the Slices copy the cache every step), over a 3/4-full one (768 of 1024 slots
  x 8) `attention-valid` 1.04-1.08x faster; over a half-full one at batch 1 the two rounds
  disagree (49-84 vs 58-60 ms), so 4/5 lies between the points measured. At equal valid work the
  rows' Scan decodes 1.24-1.36x slower than the sliced form at batch 8 (640 of 1024 slots: 183 vs
  135-147 ms/token), within noise at batch 1 (1024 of 2048: 58.5-59.9 vs 55.9-59.0 ms), and
  prefills 1.1-1.4x slower (1k x 8: 48-60 vs 42-43 s), so rows run only for ragged batches,
  where slicing to the longest row would rebuild many unwritten slots. On ragged batches
  (`tools/bench_pre_ragged.py`, docs/results/bench_pre_ragged/: synthetic caches, batch 4 and 8,
  longest row 1k and 2k, fill = sum n_b / (B * longest), three runs) a decode step over rows took
  0.63-0.99x the whole buffers' time up to 0.6 filled (one point of 12 1.13x) and 0.97-1.05x at
  0.67, so 2/3 stays where the whole buffers run. Against the sliced form over buffers not
  nearly full (2 runs) rows were faster at 8 of 8 points at 0.67 filled (0.71-0.97x), 5 of 8 at
  0.75 (0.80-1.10x, median 0.92x), 1 of 8 at 0.85 and 1 of 12 from 0.92; end to end, ragged
  batches about 0.75 filled decoded 0.89-0.91x the ms/token of the 2/3 rule (8 x 1024..512 in
  2048 slots, 4 x 2048..1024 in 4096), so a decode step over a buffer not nearly full runs rows
  below 4/5 filled. A 256-token prefill chunk (8 x 1024, nearly full buffers) over rows took
  1.01-1.04x the batched forms' time at 0.6 filled and 1.13-1.21x from 0.74: multi-token steps
  keep 2/3.
  The previous default (rows for every multi-token step and for decode under 2/3 written) against
  this one, one bench run at 2k x 8 (256-token chunks, then 32 decode steps): prefill 108.9 vs
  92.9 s; decode, the same whole-buffer branch in both, 292 vs 305 ms/token; with key-norm
  eviction at keep 0.25 prefill 93.4 vs 85.1 s, decode 140 vs 142 ms/token.
- `function`: leave the node (ONNX Runtime inlines the op's function).

Around attention (`rewrite_file`): RMSNorms become SimplifiedLayerNormalization (`fuse_rms_norms`)
and each with its residual Add SkipSimplifiedLayerNormalization (`fuse_skip_norms`); the MatMuls
of one input by constant weights (an MLP's gate and up, a non-GQA layer's query, key and value
projections) become one packed MatMul and a Split (`pack_siblings`).

Why masking by slot index is exact: the op masks slot j for a query when pos(j) > pos(query) or
j is past the valid slots. Every cached slot holds a token of an earlier step (eviction moves
slots to the front, `KVCache.keep`, but keeps only tokens already seen), so it is in the past
of every new query, and the step's own tokens sit at slots L..L+S-1 in position order (padding
of a right-padded batch after the real tokens). A causal mask over slot indices, offset by the
cached length L, is therefore the op's positional mask. ALiBi (the bias reads positions) and
non-causal nodes keep the function.
"""

from __future__ import annotations

import os
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from eigenkv.plugins import spec
from eigenkv.plugins.spec import RopeMode

MS_DOMAIN = "com.microsoft"
FUNCTION, GQA, ATTENTION, ATTENTION_ROWS = "function", "gqa", "attention", "attention-rows"
ATTENTION_BY_STEP = "attention-by-step"
ATTENTION_VALID = "attention-valid"
FORMULATIONS = (FUNCTION, GQA, ATTENTION, ATTENTION_ROWS, ATTENTION_BY_STEP, ATTENTION_VALID)
OP_NAMES = {FUNCTION: "function", GQA: "GroupQueryAttention", ATTENTION: "Attention", ATTENTION_ROWS: "Attention",
            ATTENTION_BY_STEP: "Attention", ATTENTION_VALID: "Attention"}

# rope mode -> formulation: the fastest exact one measured on the default model (engines/ort.py build
# records what each layer got); JOINT/NONE layers with r_k != r_v fall back from gqa to attention
DEFAULT_PLAN = {RopeMode.ROTATED: GQA, RopeMode.NONE: GQA, RopeMode.JOINT: GQA, RopeMode.PRE: ATTENTION_BY_STEP}

# `attention-by-step`'s rules, as integer ratios (the graph compares int64 products), valid slots
# n_b after the step's write, Smax the buffer's slots: nearly full when NEARLY_FULL[0] * max n_b >=
# NEARLY_FULL[1] * Smax; ragged when RAGGED[0] * sum n_b < RAGGED[1] * B * max n_b, or, for a
# decode step (one token per sequence) over a buffer not nearly full, when RAGGED_DECODE[0] *
# sum n_b < RAGGED_DECODE[1] * B * max n_b (tools/bench_pre_ragged.py measured them)
RAGGED = (3, 2)
RAGGED_DECODE = (5, 4)
NEARLY_FULL = (5, 4)
# the graph applies the decode threshold on top of the general one (And): it must not be the lower
assert RAGGED_DECODE[1] * RAGGED[0] >= RAGGED[1] * RAGGED_DECODE[0], "RAGGED_DECODE must not be below RAGGED"


def by_step_branch(lengths, slots: int, new_tokens: int = 1) -> str:
    """The formulation an `attention-by-step` layer runs for one step: `lengths` [B] valid slots
    per sequence after the step's write (tokens), `slots` the buffer's slots per sequence,
    `new_tokens` the step's tokens per sequence -> "attention-rows", "attention" (whole buffers)
    or "attention-valid" (the graph's Ifs, in Python)."""
    lengths = [int(n) for n in lengths]
    longest = max(lengths)
    full = NEARLY_FULL[0] * longest >= NEARLY_FULL[1] * slots
    a, b = RAGGED_DECODE if new_tokens == 1 and not full else RAGGED
    if a * sum(lengths) < b * len(lengths) * longest:
        return ATTENTION_ROWS
    return ATTENTION if full else ATTENTION_VALID


_INPUTS = [t.name for t in spec.INPUTS]
_C = "eigenkv_fused/"  # prefix of the constants the rewrite adds (shared by all layers)


@dataclass
class _Layer:
    node: onnx.NodeProto
    inputs: dict  # spec input name -> graph value name (given inputs only)
    attrs: dict
    k_scatter: onnx.NodeProto | None
    v_scatter: onnx.NodeProto | None

    @property
    def prefix(self) -> str:
        """'/model/layers.3/attn/LowRankAttention_0' -> '/model/layers.3/attn/'."""
        return self.node.name.rsplit("/", 1)[0] + "/" if "/" in self.node.name else self.node.name + "/"

    @property
    def pre(self) -> bool:
        return int(self.attrs.get("rope_mode", spec.ROPE_NONE)) == spec.ROPE_PRE


class _Graph:
    """Static shapes, producers and consumers of a graph; constants added by the rewrite."""

    def __init__(self, model: onnx.ModelProto):
        g = model.graph
        self.model = model
        self.shapes: dict[str, list] = {}
        self.symbols: dict[str, list] = {}  # dims with their names: dim_value, dim_param or None
        self.dtypes: dict[str, int] = {}
        self.graph_inputs = {v.name for v in g.input}
        for v in list(g.input) + list(g.value_info) + list(g.output):
            if v.type.HasField("tensor_type"):
                self.dtypes[v.name] = v.type.tensor_type.elem_type
            if v.type.HasField("tensor_type") and v.type.tensor_type.HasField("shape"):
                dims = v.type.tensor_type.shape.dim
                self.shapes[v.name] = [d.dim_value if d.HasField("dim_value") else None for d in dims]
                self.symbols[v.name] = [d.dim_value if d.HasField("dim_value") else d.dim_param or None for d in dims]
        self.inits = {init.name: init for init in g.initializer}
        for name, init in self.inits.items():
            self.shapes[name] = list(init.dims)
            self.symbols[name] = list(init.dims)
        self.producer = {o: n for n in g.node for o in n.output}
        self.consumers: dict[str, list] = {}
        for n in g.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.new_inits: list[onnx.TensorProto] = []
        self.shared: dict[str, object] = {}  # per-step values the rewrite computes once for all layers
        self.dropped: set[int] = set()  # id() of exporter nodes a layer's rewrite made dead

    def dim(self, name: str, axis: int) -> int | None:
        shape = self.shapes.get(name)
        return shape[axis] if shape is not None and len(shape) > axis else None

    def const(self, name: str, values, dtype=np.int64) -> str:
        """An initializer `eigenkv_fused/<name>` (added once)."""
        name = _C + name
        if name not in self.inits:
            tensor = numpy_helper.from_array(np.asarray(values, dtype=dtype), name)
            self.inits[name] = tensor
            self.new_inits.append(tensor)
        return name


def _node(nodes: list, op: str, inputs: list, name: str, outputs: list | None = None, domain: str = "", **attrs) -> str:
    """Append one node named `name` (its output is `name` unless `outputs`); -> its first output."""
    outputs = outputs or [name]
    nodes.append(helper.make_node(op, inputs, outputs, name=name, domain=domain, **attrs))
    return outputs[0]


def _layers(g: _Graph) -> list[_Layer]:
    out = []
    for node in g.model.graph.node:
        if node.domain != spec.DOMAIN or node.op_type != spec.NAME:
            continue
        inputs = {name: value for name, value in zip(_INPUTS, node.input) if value}
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        scatters = [g.producer.get(inputs.get(k, "")) for k in ("key_cache", "value_cache")]
        scatters = [s if s is not None and s.op_type == "TensorScatter" else None for s in scatters]
        out.append(_Layer(node, inputs, attrs, *scatters))
    return out


def _scatters_ok(g: _Graph, layer: _Layer) -> bool:
    """Both cache writes are TensorScatter(past, update, index) along the slot axis in linear
    mode, at the same index, their outputs read by this node only (and the graph's outputs)."""
    for s in (layer.k_scatter, layer.v_scatter):
        if s is None:
            return False
        attrs = {a.name: helper.get_attribute_value(a) for a in s.attribute}
        mode = attrs.get("mode", b"linear")
        if attrs.get("axis", -2) not in (-2, 2) or (mode.decode() if isinstance(mode, bytes) else mode) != "linear":
            return False
        if any(c is not layer.node for c in g.consumers.get(s.output[0], [])):
            return False
    return layer.k_scatter.input[2] == layer.v_scatter.input[2]


def _half_tables(g: _Graph, layer: _Layer) -> bool:
    """The op's RoPE tables [P, hd] repeat their first half (rotate_half RoPE), so ONNX
    RotaryEmbedding's [P, hd/2] caches are their first halves: checked on the data."""
    for name in (layer.inputs.get("rope_cos"), layer.inputs.get("rope_sin")):
        init = g.inits.get(name or "")
        if init is None or len(init.dims) != 2 or init.dims[1] % 2 or init.data_location == TensorProto.EXTERNAL:
            return False
        table = numpy_helper.to_array(init)
        half = table.shape[1] // 2
        if not np.array_equal(table[:, :half], table[:, half:]):
            return False
    return True


def _choose(g: _Graph, layer: _Layer, wanted: str) -> tuple[str, str]:
    """-> (formulation for this layer, why it is not `wanted`, or '')."""
    if wanted == FUNCTION:
        return FUNCTION, ""
    if layer.inputs.get("alibi_slopes"):
        return FUNCTION, "ALiBi bias"
    if int(layer.attrs.get("causal", 1)) != 1:
        return FUNCTION, "non-causal node"
    if int(layer.attrs.get("window", 0)) > 0:
        return FUNCTION, "sliding window (the function masks by slot position)"
    if not _scatters_ok(g, layer):
        return FUNCTION, "cache writes are not the exporter's TensorScatter pair"
    q, k, v = layer.inputs["query"], layer.inputs["key_cache"], layer.inputs["value_cache"]
    hq, hkv, rk, rv, dq = g.dim(q, 1), g.dim(k, 1), g.dim(k, 3), g.dim(v, 3), g.dim(q, 3)
    if None in (hq, hkv, rk, rv, dq) or hq % hkv:
        return FUNCTION, "head counts or widths not static"
    if g.dtypes.get(q) != TensorProto.FLOAT or g.dtypes.get(k) != TensorProto.FLOAT:
        return FUNCTION, "not a float32 graph"  # the op scores in float32; fused fp16 kernels would not
    if layer.pre:
        if layer.inputs.get("key_up") is None or g.dim(layer.inputs["key_up"], 0) not in (1, hkv):
            return FUNCTION, "key_up shape"
        if rk == rv == dq and rk % 8 == 0 and _identity_keys(g, layer):
            # full-width keys (a layer left uncompressed, `--compress-layers`): GQA rotates them as it writes them
            rope = _rope_of(g, q)
            if rope is not None and _tables_ok(g, rope[1:3], dq) and _same_tables(g, rope[1:3], layer):
                return GQA, ""
        if not _half_tables(g, layer):
            return FUNCTION, "RoPE tables are not repeated halves (or not loaded)"
        if not layer.inputs.get("slot_positions"):
            return FUNCTION, "no slot positions"
        if wanted == GQA:  # GQA reads its cache as keys: pre-RoPE rank-r keys are not
            return ATTENTION_BY_STEP, "pre-RoPE keys"
        return wanted, ""
    if wanted in (ATTENTION_ROWS, ATTENTION_BY_STEP, ATTENTION_VALID):
        return ATTENTION, ""  # rows and slices only pay for rebuilt keys
    if wanted == GQA and rk != rv:
        return ATTENTION, "key width != value width"
    if wanted == GQA and rk % 8:
        return ATTENTION, "head size not a multiple of 8"  # GroupQueryAttention's CheckInputs
    return wanted, ""


def _identity_keys(g: _Graph, layer: _Layer) -> bool:
    """A pre-mode layer whose key_up is the identity [G, d, d] (G = 1 or Hkv; checked on the data,
    which `rewrite_file` loads): its cache holds the original pre-RoPE keys at full width, so rotating
    them as they are written (GQA) and not as they are read (the op) gives the same scores."""
    init = g.inits.get(layer.inputs.get("key_up", ""))
    if init is None or init.data_location == TensorProto.EXTERNAL or len(init.dims) != 3 or init.dims[1] != init.dims[2]:
        return False
    up = numpy_helper.to_array(init)
    return bool(np.array_equal(up, np.broadcast_to(np.eye(up.shape[1], dtype=up.dtype), up.shape)))


def _same_tables(g: _Graph, tables, layer: _Layer) -> bool:
    """The query's RoPE tables (which GQA rotates keys with) hold the op's rope_cos/rope_sin data."""
    for mine, op in zip(tables, (layer.inputs.get("rope_cos"), layer.inputs.get("rope_sin"))):
        if mine == op:
            continue
        a, b = g.inits.get(mine), g.inits.get(op or "")
        if a is None or b is None or TensorProto.EXTERNAL in (a.data_location, b.data_location) \
                or not np.array_equal(numpy_helper.to_array(a), numpy_helper.to_array(b)):
            return False
    return True


def _attr(node, name, default=None):
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def _int_values(g: _Graph, name: str) -> list | None:
    """The values of a small int initializer or Constant, else None."""
    if name in g.inits and g.inits[name].data_location != TensorProto.EXTERNAL:
        return numpy_helper.to_array(g.inits[name]).reshape(-1).tolist()
    node = g.producer.get(name)
    if node is not None and node.op_type == "Constant" and _attr(node, "value") is not None:
        return numpy_helper.to_array(_attr(node, "value")).reshape(-1).tolist()
    return None


def _made_by(g: _Graph, name: str, op: str):
    node = g.producer.get(name)
    return node if node is not None and node.op_type == op and node.domain in ("", "ai.onnx") else None


def _bhsd_of(g: _Graph, name: str, heads: int, d: int) -> str | None:
    """`name` [B, H, S, d] = Transpose(Reshape(y), perm 0,2,1,3) with y [B, S, H*d] (the exporter's
    head split of a projection) -> y, else None. Checked on the value infos: Reshape keeps B and S
    and splits the last axis into (H, d), so y[b, s, h*d + j] == name[b, h, s, j]."""
    t = _made_by(g, name, "Transpose")
    r = _made_by(g, t.input[0], "Reshape") if t is not None and list(_attr(t, "perm", [])) == [0, 2, 1, 3] else None
    if r is None:
        return None
    y, view = r.input[0], g.symbols.get(r.output[0])
    ys = g.symbols.get(y)
    if ys is None or view is None or len(ys) != 3 or len(view) != 4 or None in ys[:2]:
        return None
    return y if view[:2] == ys[:2] and view[2:] == [heads, d] and ys[2] == heads * d else None


def _rope_of(g: _Graph, name: str) -> tuple | None:
    """`name` = x * cos[pos] + rotate_half(x) * sin[pos] (the exporter's RoPE: Mul, Split in
    halves, Neg, Concat, Mul, Add; cos/sin rows gathered by GatherND at the graph input `pos`
    [B, S] unsqueezed to [B, 1, S, 1]) -> (x, cos table, sin table, pos), else None."""
    add = _made_by(g, name, "Add")
    muls = [_made_by(g, i, "Mul") for i in add.input] if add is not None else [None]
    if None in muls or len(muls) != 2:
        return None
    for m_cos, m_sin in (muls, muls[::-1]):
        for x, cg in (m_cos.input, m_cos.input[::-1]):
            for cat, sg in (m_sin.input, m_sin.input[::-1]):
                found = _rotate_half_of(g, cat, x) and _gathered(g, cg, sg)
                if found:
                    return (x,) + found
    return None


def _rotate_half_of(g: _Graph, cat: str, x: str) -> bool:
    """cat == Concat(-x[..., d/2:], x[..., :d/2]) along the last axis of a rank-4 x."""
    concat = _made_by(g, cat, "Concat")
    if concat is None or len(concat.input) != 2 or _attr(concat, "axis") not in (3, -1):
        return False
    neg = _made_by(g, concat.input[0], "Neg")
    split = _made_by(g, neg.input[0], "Split") if neg is not None else None
    if split is None or split.input[0] != x or _attr(split, "axis") not in (3, -1) or len(split.output) != 2:
        return False
    d = g.dim(x, 3)
    sizes = _int_values(g, split.input[1]) if len(split.input) > 1 and split.input[1] else None
    halves = sizes == [d // 2, d // 2] if sizes is not None else _attr(split, "num_outputs") == 2
    return bool(halves and d and d % 2 == 0 and len(g.shapes.get(x) or []) == 4
                and neg.input[0] == split.output[1] and concat.input[1] == split.output[0])


def _gathered(g: _Graph, cos: str, sin: str) -> tuple | None:
    """cos, sin == GatherND(table, idx) of one idx = pos [B, S] (a graph input) unsqueezed to
    [B, 1, S, 1] -> (cos table, sin table, pos), else None."""
    gc, gs = _made_by(g, cos, "GatherND"), _made_by(g, sin, "GatherND")
    if gc is None or gs is None or gc.input[1] != gs.input[1] or _attr(gc, "batch_dims", 0) or _attr(gs, "batch_dims", 0):
        return None
    idx = gc.input[1]
    pos = idx
    while (u := _made_by(g, pos, "Unsqueeze")) is not None:
        pos = u.input[0]
    ps, ix = g.symbols.get(pos), g.symbols.get(idx)
    if pos not in g.graph_inputs or ps is None or len(ps) != 2 or ix != [ps[0], 1, ps[1], 1] \
            or g.dtypes.get(pos) != TensorProto.INT64:
        return None
    return gc.input[0], gs.input[0], pos


def _tables_ok(g: _Graph, tables, d: int) -> bool:
    """RoPE tables [P, d] that repeat their first half, loaded."""
    for name in tables:
        init = g.inits.get(name)
        if init is None or list(init.dims[1:]) != [d] or init.data_location == TensorProto.EXTERNAL:
            return False
        table = numpy_helper.to_array(init)
        if table.dtype != np.float32 or not np.array_equal(table[:, : d // 2], table[:, d // 2:]):
            return False
    return True


def _half_table(g: _Graph, table: str) -> str:
    half = _C + table + ".half"
    if half not in g.inits:
        data = numpy_helper.to_array(g.inits[table])
        g.const(table + ".half", np.ascontiguousarray(data[:, : data.shape[1] // 2]), data.dtype)
    return half


def _lengths_of(g: _Graph, name: str) -> tuple | None:
    """The layer's valid slots after the write, `Cast(Gather(cache_lengths, i) + S)` with
    cache_lengths [L, B] a graph input and i a constant -> (cache_lengths, i, S), else None."""
    cast = _made_by(g, name, "Cast")
    add = _made_by(g, cast.input[0], "Add") if cast is not None and _attr(cast, "to") == TensorProto.INT32 else None
    if add is None:
        return None
    for sel, s in (add.input, add.input[::-1]):
        gather = _made_by(g, sel, "Gather")
        if gather is None or _attr(gather, "axis", 0) != 0 or gather.input[0] not in g.graph_inputs:
            continue
        i = _int_values(g, gather.input[1])
        if i is not None and len(i) == 1 and len(g.shapes.get(gather.input[1], [0])) == 0 \
                and len(g.shapes.get(gather.input[0]) or []) == 2 and len(g.shapes.get(s, [0])) == 0:
            return gather.input[0], int(i[0]), s
    return None


def _shared(g: _Graph, nodes: list, key: str, build) -> str:
    """A value all layers share, built (into `nodes`) by the first layer that needs it."""
    if key not in g.shared:
        g.shared[key] = build()
    return g.shared[key]


def _gqa(g: _Graph, layer: _Layer) -> list:
    """One GroupQueryAttention in place of the layer's two TensorScatter and its attention node
    (and, where the exporter's RoPE, head split and head merge are recognised, those too)."""
    p, nodes = layer.prefix + "fused/", []
    q, kc = layer.inputs["query"], layer.inputs["key_cache"]
    hq, hkv, d = g.dim(q, 1), g.dim(kc, 1), g.dim(q, 3)
    k, v = layer.k_scatter.input[1], layer.v_scatter.input[1]
    rope = [_rope_of(g, q), _rope_of(g, k)]
    if layer.pre:  # identity keys (`_choose`): the cached keys are the un-rotated keys, rotated at their positions
        rope[1] = None if rope[0] is None else (k,) + rope[0][1:]
    if None in rope or rope[0][1:] != rope[1][1:] or not _tables_ok(g, rope[0][1:3], d):
        rope = None  # queries and keys rotated in the graph: do_rotary=0
    else:
        q, k = rope[0][0], rope[1][0]
    flat = [_bhsd_of(g, x, h, d) for x, h in ((q, hq), (k, hkv), (v, hkv))]

    def bsh(x, y, tag):  # [B, H, S, d] -> [B, S, H*d]
        if y is not None:
            return y
        t = _node(nodes, "Transpose", [x], f"{p}{tag}_bshd", perm=[0, 2, 1, 3])
        return _node(nodes, "Reshape", [t, g.const("shape_bs_flat", [0, 0, -1])], f"{p}{tag}_bsh")

    q3, k3, v3 = bsh(q, flat[0], "q"), bsh(k, flat[1], "k"), bsh(v, flat[2], "v")
    found = _lengths_of(g, layer.inputs["cache_lengths"])
    if found is not None and g.shared.setdefault("source", found[::2]) != found[::2]:
        found = None  # not the first layer's (cache_lengths, S): the shared values are not its own
    if found is not None:  # the slot counts of all layers at once; each layer takes its row
        table, i, s = found
        after = _shared(g, nodes, "lengths", lambda: _node(nodes, "Cast", [_node(
            nodes, "Add", [table, s], _C + "lengths_after")], _C + "lengths_after_i32", to=TensorProto.INT32))
        all_seqlens = _shared(g, nodes, "seqlens", lambda: _node(
            nodes, "Sub", [after, g.const("one_i32", 1, np.int32)], _C + "seqlens_k"))
        n_layers = g.dim(table, 0)
        if n_layers and 0 <= i < n_layers:  # one Split of the flat [L*B] table: row i is output i
            rows = [f"{_C}seqlens_k.{j}" for j in range(n_layers)]
            seqlens = rows[i]
            _shared(g, nodes, "seqlens_rows", lambda: _node(
                nodes, "Split", [_node(nodes, "Reshape", [all_seqlens, g.const("shape_m1", [-1])], _C + "seqlens_k_flat")],
                _C + "seqlens_k_rows", outputs=rows, axis=0, num_outputs=n_layers))
            # each layer's own bound: GQA sizes `present` from it, and with eviction the layers' buffers
            # differ (skipped layers hold the whole context), so a maximum over all layers can exceed
            # one; one ReduceMax over [L, B] and one Split give every layer its row's maximum
            totals = [f"{_C}total_sequence_length.{j}" for j in range(n_layers)]
            total = totals[i]
            _shared(g, nodes, "total_rows", lambda: _node(
                nodes, "Split", [_node(nodes, "ReduceMax", [after, g.const("axis_1", [1])], _C + "total_sequence_length",
                                       keepdims=0)],
                _C + "total_sequence_length_rows", outputs=totals, axis=0, num_outputs=n_layers))
        else:
            seqlens = _node(nodes, "Gather", [all_seqlens, g.const(f"layer_{i}", i)], f"{p}seqlens_k", axis=0)
            after_i = _node(nodes, "Gather", [after, g.const(f"layer_{i}", i)], f"{p}lengths_after", axis=0)
            total = _node(nodes, "ReduceMax", [after_i], f"{p}total_sequence_length", keepdims=0)
        steps = _shared(g, nodes, "steps", lambda: _node(nodes, "Cast", [s], _C + "q_len_i32", to=TensorProto.INT32))
        batch = _shared(g, nodes, "batch", lambda: _node(nodes, "Shape", [table], _C + "batch", start=1, end=2))
    else:
        lengths = _node(nodes, "Cast", [layer.inputs["cache_lengths"]], f"{p}lengths_i32",  # after the write
                        to=TensorProto.INT32)
        seqlens = _node(nodes, "Sub", [lengths, g.const("one_i32", 1, np.int32)], f"{p}seqlens_k")
        total = _node(nodes, "ReduceMax", [lengths], f"{p}total_sequence_length", keepdims=0)
        steps = _node(nodes, "Cast", [_node(nodes, "Shape", [q3], f"{p}q_len", start=1, end=2)], f"{p}q_len_i32",
                      to=TensorProto.INT32)
        batch = _node(nodes, "Shape", [lengths], f"{p}batch")
    if found is not None:
        query_seqlens = _shared(g, nodes, "query_seqlens", lambda: _node(nodes, "Expand", [steps, batch],
                                                                         _C + "query_seqlens"))
    else:
        query_seqlens = _node(nodes, "Expand", [steps, batch], f"{p}query_seqlens")
    rotary = [_half_table(g, rope[0][1]), _half_table(g, rope[0][2]), rope[0][3]] if rope else ["", "", ""]
    merged = _merged_heads(g, layer, hq, d)
    out = merged.output[0] if merged is not None else f"{p}gqa_out"
    _node(nodes, "GroupQueryAttention",
          [q3, k3, v3, layer.k_scatter.input[0], layer.v_scatter.input[0], seqlens, total] + rotary + [""] * 6
          + [query_seqlens], layer.prefix + "GroupQueryAttention_0",
          outputs=[out, layer.k_scatter.output[0], layer.v_scatter.output[0]], domain=MS_DOMAIN,
          num_heads=hq, kv_num_heads=hkv, scale=float(layer.attrs["scale"]), do_rotary=int(rope is not None))
    if merged is None:
        out4 = _node(nodes, "Reshape", [out, g.const(f"shape_bshd_{hq}_{d}", [0, 0, hq, d])], f"{p}out_bshd")
        _node(nodes, "Transpose", [out4], f"{p}out", outputs=[layer.node.output[0]], perm=[0, 2, 1, 3])
    return nodes


def _merged_heads(g: _Graph, layer: _Layer, hq: int, d: int):
    """The exporter's head merge after the op, Reshape(Transpose(out, perm 0,2,1,3)) to [B, S, Hq*d]
    (GQA's own output layout), when it is the op's only reader -> that Reshape (marked dropped with
    the Transpose: GQA writes its output), else None."""
    users = g.consumers.get(layer.node.output[0], [])
    t = users[0] if len(users) == 1 and users[0].op_type == "Transpose" else None
    if t is None or list(_attr(t, "perm", [])) != [0, 2, 1, 3]:
        return None
    r = _only_consumer(g, t.output[0], "Reshape")
    out, q = g.symbols.get(r.output[0]) if r is not None else None, g.symbols.get(layer.inputs["query"])
    if out is None or q is None or len(out) != 3 or out != [q[0], q[2], hq * d] or None in out[:2]:
        return None
    g.dropped.update((id(t), id(r)))
    return r


def _attention(g: _Graph, layer: _Layer, valid_only: bool = False) -> list:
    """ONNX Attention (opset 24) over the whole buffers after the TensorScatter writes, or with
    `valid_only` over their first max(cache_lengths) slots (keys, values and slot positions sliced
    to the batch's longest valid length first)."""
    p, nodes = layer.prefix + "fused/", []
    kr, v, pos = (layer.inputs.get(k) for k in ("key_cache", "value_cache", "slot_positions"))
    nonpad = _node(nodes, "Cast", [layer.inputs["cache_lengths"]], f"{p}nonpad_kv_seqlen", to=TensorProto.INT64)
    if valid_only:
        longest = _node(nodes, "ReduceMax", [nonpad], f"{p}longest", keepdims=1)  # [1]
        zero, axis = g.const("axes_0", [0]), g.const("axes_2", [2])
        kr, v = (_node(nodes, "Slice", [x, zero, longest, axis], f"{p}{tag}_valid")
                 for x, tag in ((kr, "kr"), (v, "v")))
        pos = _node(nodes, "Slice", [pos, zero, longest, axis], f"{p}pos_valid") if layer.pre else pos
    keys = _rope_keys(g, layer, nodes, kr, pos) if layer.pre else kr
    _node(nodes, "Attention", [layer.inputs["query"], keys, v, "", "", "", nonpad],
          layer.prefix + "Attention_0", outputs=[layer.node.output[0]], is_causal=1, scale=float(layer.attrs["scale"]))
    return nodes


def _attention_valid(g: _Graph, layer: _Layer) -> list:
    """`attention` over the first max(cache_lengths) slots only."""
    return _attention(g, layer, valid_only=True)


def _rope_tables(g: _Graph, layer: _Layer) -> list[str]:
    """[P, hd/2] first halves of the op's cos and sin tables, as initializers."""
    out = []
    for key in ("rope_cos", "rope_sin"):
        table = layer.inputs[key]
        half = _C + table + ".half"
        if half not in g.inits:
            data = numpy_helper.to_array(g.inits[table])
            g.const(table + ".half", np.ascontiguousarray(data[:, : data.shape[1] // 2]), data.dtype)
        out.append(half)
    return out


def _rope_keys(g: _Graph, layer: _Layer, nodes: list, kr: str, positions: str) -> str:
    """Pre mode: rope(K_r @ key_up) at the slot positions, K_r [B, Hkv, S, rk] and positions
    [B, Hkv, S] (the layer's cache and slot positions, or their first slots) -> [B, Hkv, S, hd]."""
    p = layer.prefix + "fused/"
    k = _node(nodes, "MatMul", [kr, layer.inputs["key_up"]], f"{p}k_up")  # [B, Hkv, S, hd]
    flat_k = _node(nodes, "Reshape", [k, g.const("shape_rope4", [-1, 1, 0, 0])], f"{p}k_up_rows")  # [B*Hkv,1,S,hd]
    pos64 = _node(nodes, "Cast", [positions], f"{p}slot_pos_i64", to=TensorProto.INT64)
    flat_pos = _node(nodes, "Flatten", [pos64], f"{p}slot_pos_rows", axis=2)  # [B*Hkv, S]
    cos, sin = _rope_tables(g, layer)
    rot = _node(nodes, "RotaryEmbedding", [flat_k, cos, sin, flat_pos], f"{p}k_rope_rows")
    return _node(nodes, "Reshape", [rot, _node(nodes, "Shape", [k], f"{p}k_up_shape")], f"{p}k_rope")


def _attention_rows(g: _Graph, layer: _Layer) -> list:
    """Pre mode, one (sequence, KV head) row at a time: ONNX Scan over B*Hkv rows of
    MatMul (K_r @ key_up) -> RotaryEmbedding -> Attention (G query heads, one KV head)."""
    p, nodes = layer.prefix + "fused/", []
    q, kr, v, up = layer.inputs["query"], layer.inputs["key_cache"], layer.inputs["value_cache"], layer.inputs["key_up"]
    hq, hkv, d, rk, rv = g.dim(q, 1), g.dim(kr, 1), g.dim(q, 3), g.dim(kr, 3), g.dim(v, 3)
    group = hq // hkv
    lengths = _node(nodes, "Cast", [layer.inputs["cache_lengths"]], f"{p}nonpad_kv_seqlen", to=TensorProto.INT64)
    batch = _node(nodes, "Shape", [lengths], f"{p}batch")
    per_row = _node(nodes, "Expand", [_node(nodes, "Unsqueeze", [lengths, g.const("axes_1", [1])], f"{p}lengths_b1"),
                                      _node(nodes, "Concat", [batch, g.const(f"dims_{hkv}", [hkv])], f"{p}rows_shape",
                                            axis=0)], f"{p}lengths_bh")
    scan_in = [_node(nodes, "Reshape", [q, g.const(f"shape_q_rows_{group}_{d}", [-1, group, 0, d])], f"{p}q_rows"),
               _node(nodes, "Flatten", [kr], f"{p}kr_rows", axis=2),  # [B*Hkv, Smax*rk]
               _node(nodes, "Flatten", [v], f"{p}v_rows", axis=2),
               _node(nodes, "Flatten", [_node(nodes, "Cast", [layer.inputs["slot_positions"]], f"{p}slot_pos_i64",
                                              to=TensorProto.INT64)], f"{p}pos_rows", axis=2),
               _node(nodes, "Reshape", [per_row, g.const("shape_m1", [-1])], f"{p}lengths_rows")]
    body_in = ["q", "kr", "v", "pos", "len"]
    if g.dim(up, 0) == 1:
        up_body = _node(nodes, "Reshape", [up, g.const(f"shape_up_{rk}_{d}", [rk, d])], f"{p}key_up_2d")
    else:  # one key_up per KV head: tile it over the batch, one per row
        tiled = _node(nodes, "Expand", [up, _node(nodes, "Concat", [batch, g.const("ones_3", [1, 1, 1])],
                                                  f"{p}key_up_shape", axis=0)], f"{p}key_up_b")
        scan_in.append(_node(nodes, "Reshape", [tiled, g.const(f"shape_up_rows_{rk}_{d}", [-1, rk, d])],
                             f"{p}key_up_rows"))
        body_in.append("up")
        up_body = "up"
    cos, sin = _rope_tables(g, layer)
    b, body = layer.prefix + "rows/", []
    zero = g.const("axes_0", [0])
    n = _node(body, "Reshape", ["len", g.const("shape_1", [1])], f"{b}nonpad")  # [1]: the row's valid slots

    def valid(x, width, tag):  # the row's first n slots [n, width]: nothing past them is rebuilt or read
        rows = _node(body, "Reshape", [x, g.const(f"shape_m1_{width}", [-1, width])], f"{b}{tag}_all")
        return _node(body, "Slice", [rows, zero, n, zero], f"{b}{tag}")
    k = _node(body, "MatMul", [valid("kr", rk, "kr_valid"), up_body], f"{b}k_up")  # [n, hd]
    k4 = _node(body, "Reshape", [k, g.const(f"shape_11m1_{d}", [1, 1, -1, d])], f"{b}k_up4")
    pos = _node(body, "Unsqueeze", [_node(body, "Slice", ["pos", zero, n, zero], f"{b}pos_valid"), zero], f"{b}pos")
    keys = _node(body, "RotaryEmbedding", [k4, cos, sin, pos], f"{b}k_rope")
    values = _node(body, "Reshape", [valid("v", rv, "v_valid"), g.const(f"shape_11m1_{rv}", [1, 1, -1, rv])], f"{b}v")
    y = _node(body, "Attention", [_node(body, "Unsqueeze", ["q", zero], f"{b}q"), keys, values, "", "", "", n],
              f"{b}Attention_0", is_causal=1, scale=float(layer.attrs["scale"]))
    _node(body, "Squeeze", [y, zero], f"{b}out", outputs=["out"])
    vi = helper.make_tensor_value_info
    graph = helper.make_graph(body, f"{b}body", [vi(n, TensorProto.INT64 if n in ("pos", "len") else TensorProto.FLOAT,
                                                   None) for n in body_in], [vi("out", TensorProto.FLOAT, None)])
    out = _node(nodes, "Scan", scan_in, layer.prefix + "Scan_0", outputs=[f"{p}out_rows"], body=graph,
                num_scan_inputs=len(scan_in))
    _node(nodes, "Reshape", [out, g.const(f"shape_out_{hq}_{rv}", [-1, hq, 0, rv])], f"{p}out",
          outputs=[layer.node.output[0]])
    return nodes


def _attention_by_step(g: _Graph, layer: _Layer) -> list:
    """Pre mode: ONNX `If`s pick the formulation per step from the layer's valid slots after the
    write (n_b = cache_lengths[b], longest = max n_b, Smax the buffer's slots, S the step's tokens;
    `by_step_branch` is the same rule in Python):
    - batch ragged (3 * sum n_b < 2 * B * longest: over a third of the first `longest` slots of
      the batch unwritten; for a decode step over a buffer not nearly full, 5 * sum n_b < 4 * B *
      longest: over a fifth) -> `attention-rows` (each row rebuilds only its own n_b slots);
    - else, the buffer nearly full (5 * longest >= 4 * Smax) -> `attention` over the whole
      buffers (no copies);
    - else -> `attention-valid` (keys, values and positions sliced to `longest` first).
    All three read the same cache writes and are exact. Why these thresholds (measured on the
    default model, module docstring, `tools/bench_pre_ragged.py`): whole buffers decode 1.24-1.5x
    faster than sliced ones when full (the Slices copy the cache), sliced ones 1.04-1.08x faster
    when 3/4 full; on ragged batches the rows' decode step beats the whole buffers below about 2/3
    filled and the sliced ones below 4/5 (mixed at 0.85, slower from 0.92), and a 256-token
    prefill chunk over rows ties the batched forms at 0.6 filled and is 1.13-1.21x slower from 0.74."""
    p, nodes = layer.prefix + "fused/", []
    kr = layer.inputs["key_cache"]  # [B, Hkv, Smax, rk]
    lengths = _node(nodes, "Cast", [layer.inputs["cache_lengths"]], f"{p}lengths_i64", to=TensorProto.INT64)
    longest = _node(nodes, "ReduceMax", [lengths], f"{p}longest_len", keepdims=1)  # [1]
    batch = _node(nodes, "Shape", [kr], f"{p}batch_b", start=0, end=1)
    smax = _node(nodes, "Shape", [kr], f"{p}slots_per_seq", start=2, end=3)
    total = _node(nodes, "ReduceSum", [lengths], f"{p}valid_slots", keepdims=1)  # [1]
    (a, b), (a1, b1), (c, d) = RAGGED, RAGGED_DECODE, NEARLY_FULL
    full = _node(nodes, "GreaterOrEqual", [
        _node(nodes, "Mul", [longest, g.const(f"int_{c}", [c])], f"{p}longest_x{c}"),
        _node(nodes, "Mul", [smax, g.const(f"int_{d}", [d])], f"{p}slots_x{d}")], f"{p}nearly_full")  # >= d/c
    batch_longest = _node(nodes, "Mul", [batch, longest], f"{p}batch_longest")

    def at_least(num: int, den: int, tag: str) -> str:  # num * sum n_b >= den * B * longest: >= den/num filled
        return _node(nodes, "GreaterOrEqual", [
            _node(nodes, "Mul", [total, g.const(f"int_{num}", [num])], f"{p}{tag}_valid_x{num}"),
            _node(nodes, "Mul", [batch_longest, g.const(f"int_{den}", [den])], f"{p}{tag}_batch_longest_x{den}")],
            f"{p}{tag}_filled")
    step = _node(nodes, "Shape", [layer.inputs["query"]], f"{p}new_tokens", start=2, end=3)  # [1]: S
    sparse_decode = _node(nodes, "And", [
        _node(nodes, "Equal", [step, g.const("int_1", [1])], f"{p}decode"),
        _node(nodes, "Not", [full], f"{p}not_nearly_full")], f"{p}decode_not_full")
    # not ragged: >= b/a filled, and for a decode step over a buffer not nearly full >= b1/a1 (b1/a1 > b/a)
    even = _node(nodes, "And", [at_least(a, b, "any_step"), _node(nodes, "Or", [
        _node(nodes, "Not", [sparse_decode], f"{p}not_decode_not_full"), at_least(a1, b1, "decode")], f"{p}decode_rule")],
        f"{p}not_ragged")

    def branch(tag: str, how: str) -> onnx.GraphProto:
        node = helper.make_node(layer.node.op_type, [], [f"{layer.node.output[0]}/{tag}"],
                                name=f"{layer.prefix}{tag}/{layer.node.name.rsplit('/', 1)[-1]}")
        sub = _Layer(node, layer.inputs, layer.attrs, layer.k_scatter, layer.v_scatter)
        out = helper.make_tensor_value_info(node.output[0], TensorProto.FLOAT, None)
        return helper.make_graph(_BUILDERS[how](g, sub), f"{layer.prefix}{tag}", [], [out])

    batched = []
    _node(batched, "If", [full], layer.prefix + "batched/If_0", outputs=[f"{layer.node.output[0]}/batched"],
          then_branch=branch("whole", ATTENTION), else_branch=branch("valid", ATTENTION_VALID))
    out = helper.make_tensor_value_info(f"{layer.node.output[0]}/batched", TensorProto.FLOAT, None)
    _node(nodes, "If", [even], layer.prefix + "If_0", outputs=[layer.node.output[0]],
          then_branch=helper.make_graph(batched, f"{layer.prefix}batched", [], [out]),
          else_branch=branch("rows", ATTENTION_ROWS))
    return nodes


_BUILDERS = {GQA: _gqa, ATTENTION: _attention, ATTENTION_ROWS: _attention_rows, ATTENTION_BY_STEP: _attention_by_step,
             ATTENTION_VALID: _attention_valid}


def _scalar(g: _Graph, name: str) -> float | None:
    """The value of a one-element constant (an embedded initializer or a Constant node), else None."""
    if name in g.inits:
        init = g.inits[name]
        if init.data_location == TensorProto.EXTERNAL:
            return None
        value = numpy_helper.to_array(init)
    elif name in g.producer and g.producer[name].op_type == "Constant":
        attr = next((a for a in g.producer[name].attribute if a.name == "value"), None)
        if attr is None:
            return None
        value = numpy_helper.to_array(attr.t)
    else:
        return None
    return float(value.reshape(-1)[0]) if value.size == 1 else None


def _only_consumer(g: _Graph, name: str, op: str):
    users = g.consumers.get(name, [])
    return users[0] if len(users) == 1 and users[0].op_type == op else None


def _rms_norm(g: _Graph, pow_node) -> tuple[list, onnx.NodeProto] | None:
    """The RMSNorm that transformers' `x * rsqrt(mean(x^2) + eps) * w` traces to, starting at its
    Pow: Pow(x, 2) -> ReduceMean(last axis, keepdims) -> Add(eps) -> Sqrt -> Reciprocal ->
    Mul(x, .) -> Mul(w, .) -> (the 7 nodes, one SimplifiedLayerNormalization(x, w)), or None when
    any link differs (a fp32 weight [D] and single-consumer intermediates are required)."""
    x = pow_node.input[0]
    if _scalar(g, pow_node.input[1]) != 2.0:
        return None
    mean = _only_consumer(g, pow_node.output[0], "ReduceMean")
    if mean is None:
        return None
    attrs = {a.name: helper.get_attribute_value(a) for a in mean.attribute}
    axes = attrs.get("axes")
    if axes is None and len(mean.input) > 1 and mean.input[1] in g.inits:
        axes = numpy_helper.to_array(g.inits[mean.input[1]]).reshape(-1).tolist()
    rank = len(g.shapes.get(x) or [None, None, None])
    if attrs.get("keepdims", 1) != 1 or axes is None or [a % rank for a in axes] != [rank - 1]:
        return None
    add = _only_consumer(g, mean.output[0], "Add")
    if add is None:
        return None
    eps = _scalar(g, add.input[1] if add.input[0] == mean.output[0] else add.input[0])
    sqrt = _only_consumer(g, add.output[0], "Sqrt") if eps is not None else None
    recip = _only_consumer(g, sqrt.output[0], "Reciprocal") if sqrt is not None else None
    scale = _only_consumer(g, recip.output[0], "Mul") if recip is not None else None
    if scale is None or set(scale.input) != {x, recip.output[0]}:
        return None
    weigh = _only_consumer(g, scale.output[0], "Mul")
    if weigh is None:
        return None
    w = weigh.input[0] if weigh.input[1] == scale.output[0] else weigh.input[1]
    init = g.inits.get(w)
    if init is None or init.data_type != TensorProto.FLOAT or list(init.dims) != [g.dim(x, rank - 1)] \
            or g.dtypes.get(x, TensorProto.FLOAT) != TensorProto.FLOAT:
        return None
    fused = helper.make_node("SimplifiedLayerNormalization", [x, w], [weigh.output[0]],
                             name=weigh.name + "/rms_norm", axis=-1, epsilon=eps, stash_type=1)
    return [pow_node, mean, add, sqrt, recip, scale, weigh], fused


def fuse_rms_norms(model: onnx.ModelProto) -> int:
    """Replace every RMSNorm subgraph (`_rms_norm`) of `model` (in place) by ONNX Runtime's
    SimplifiedLayerNormalization (what ORT-GenAI's graphs use; `fuse_skip_norms` then takes the
    residual Add in, which ONNX Runtime's own fusion does not) -> how many were replaced. Exact up to
    float32 round-off: the same mean of squares, eps, reciprocal square root and scale."""
    g = _Graph(model)
    replace: dict[int, list] = {}
    for node in model.graph.node:
        if node.op_type != "Pow" or node.domain not in ("", "ai.onnx"):
            continue
        found = _rms_norm(g, node)
        if found is None:
            continue
        old, fused = found
        for n in old:
            replace[id(n)] = []
        replace[id(old[-1])] = [fused]
    if replace:
        nodes = [new for node in model.graph.node for new in replace.get(id(node), [node])]
        del model.graph.node[:]
        model.graph.node.extend(nodes)
    return sum(1 for v in replace.values() if v)


def _weight(g: _Graph, name: str, base_dir: Path | None) -> np.ndarray | None:
    """A float32 [D, N] MatMul weight (read from the export's data files when external), else None."""
    init = g.inits.get(name)
    if init is None or init.data_type != TensorProto.FLOAT or len(init.dims) != 2:
        return None
    if init.data_location == TensorProto.EXTERNAL and base_dir is None:
        return None
    copy = TensorProto()  # (some onnx versions load external data into the tensor they read)
    copy.CopyFrom(init)
    return numpy_helper.to_array(copy, base_dir=str(base_dir) if base_dir is not None else "")


def pack_qkv(model: onnx.ModelProto, base_dir: Path | None = None) -> int:
    """Each GroupQueryAttention whose query, key and value are MatMul(x, W_q|W_k|W_v) of one x,
    read by it only, gets them packed (what ORT-GenAI's graphs do): one MatMul(x, [W_q | W_k |
    W_v]) as GQA's packed query input, no key and value -> how many. The packed weights are new
    (embedded) initializers; `base_dir` is where external weights are read from. Exact: every
    output column is the same dot product over x's row."""
    g = _Graph(model)
    replace: dict[int, list] = {}
    for node in model.graph.node:
        if node.op_type != "GroupQueryAttention" or node.domain != MS_DOMAIN or len(node.input) < 3 \
                or not all(node.input[:3]):
            continue
        mms = [_made_by(g, x, "MatMul") for x in node.input[:3]]
        if None in mms or len({m.input[0] for m in mms}) != 1:
            continue
        # other readers: only Shape of the batch and step axes (the per-layer step count), which
        # the packed [B, S, N] output answers the same
        others = [c for m in mms for c in g.consumers.get(m.output[0], []) if c is not node]
        if any(c.op_type != "Shape" or not 0 <= _attr(c, "start", 0) or not 0 < (_attr(c, "end") or 9) <= 2
               for c in others) or any(g.consumers.get(m.output[0], []).count(node) != 1 for m in mms):
            continue
        weights = [_weight(g, m.input[1], base_dir) for m in mms]
        if any(w is None for w in weights) or len({w.shape[0] for w in weights}) != 1:
            continue
        packed = g.const(mms[0].input[1] + ".qkv", np.concatenate(weights, axis=1), np.float32)
        name = node.name.rsplit("/", 1)[0] + "/qkv_proj/MatMul_0" if "/" in node.name else node.name + "/qkv"
        matmul = helper.make_node("MatMul", [mms[0].input[0], packed], [name], name=name)
        node.input[0], node.input[1], node.input[2] = name, "", ""
        for c in others:
            c.input[0] = name
        for m in mms:
            replace[id(m)] = []
        replace[id(mms[0])] = [matmul]
    if replace:
        nodes = [new for node in model.graph.node for new in replace.get(id(node), [node])]
        del model.graph.node[:]
        model.graph.node.extend(nodes)
        model.graph.initializer.extend(g.new_inits)
    return sum(1 for v in replace.values() if v)


def pack_siblings(model: onnx.ModelProto, base_dir: Path | None = None) -> int:
    """Each group of two or more MatMul(x, W_i) of one x by constant float32 [D, N_i] weights (an
    MLP's gate and up projections; a `pre` layer's query, rank-r key and value projections) becomes
    one MatMul(x, [W_1 | W_2 | ...]) and a Split of its last axis into the original outputs (same
    names, so every reader is unchanged) -> how many groups. A decode step then launches one GEMV
    per group instead of one per weight. Exact: every output column is the same dot product over
    x's row. The packed weights are new (embedded) initializers; `base_dir` is where external
    weights are read from. Top-level graph only; run after `pack_qkv` (GQA reads its packing
    without a Split)."""
    if next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0) < 13:
        return 0  # Split's sizes as an input: opset 13+
    g = _Graph(model)
    groups: dict[str, list] = {}
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.domain in ("", "ai.onnx") and len(node.input) == 2 \
                and node.input[1] in g.inits and node.input[1] not in g.graph_inputs:  # (not overridable)
            groups.setdefault(node.input[0], []).append(node)
    replace: dict[int, list] = {}
    for x, mms in groups.items():
        if len(mms) < 2:
            continue
        weights = [_weight(g, m.input[1], base_dir) for m in mms]
        mms = [m for m, w in zip(mms, weights) if w is not None]
        weights = [w for w in weights if w is not None]
        if len(mms) < 2 or len({w.shape[0] for w in weights}) != 1:
            continue
        name = mms[0].output[0] + "/packed"  # (output names are unique; node names may be empty)
        packed = g.const(name, np.concatenate(weights, axis=1), np.float32)
        sizes = g.const(f"split_{'_'.join(str(w.shape[1]) for w in weights)}", [w.shape[1] for w in weights])
        replace[id(mms[0])] = [helper.make_node("MatMul", [x, packed], [name], name=name),
                               helper.make_node("Split", [name, sizes], [m.output[0] for m in mms],
                                                name=name + "/split", axis=-1)]
        for m in mms[1:]:
            replace[id(m)] = []
    if replace:
        nodes = [new for node in model.graph.node for new in replace.get(id(node), [node])]
        del model.graph.node[:]
        model.graph.node.extend(nodes)
        model.graph.initializer.extend(init for init in g.new_inits if init.name not in
                                       {i.name for i in model.graph.initializer})
    return sum(1 for v in replace.values() if v)


def fuse_skip_norms(model: onnx.ModelProto) -> int:
    """Fold each residual `Add(a, b)` that feeds a SimplifiedLayerNormalization (`fuse_rms_norms`)
    into com.microsoft SkipSimplifiedLayerNormalization(a, b, w) (what ORT-GenAI's graphs run;
    ONNX Runtime's own fusion does not fire on these graphs), whose fourth output is the sum the
    Add's other readers (the next residual) take -> how many. Exact: the same float32 a + b, then
    the same normalization. Only same-shape [B, S, D] float32 operands (no broadcasting)."""
    g = _Graph(model)
    replace: dict[int, list] = {}
    for norm in model.graph.node:
        if norm.op_type != "SimplifiedLayerNormalization" or norm.domain not in ("", "ai.onnx") or len(norm.output) != 1:
            continue
        add = _made_by(g, norm.input[0], "Add")
        if add is None or id(add) in replace or _attr(norm, "axis", -1) not in (-1, 2):
            continue
        a, b = (g.symbols.get(x) for x in add.input)
        if a is None or a != b or len(a) != 3 or any(g.dtypes.get(x) != TensorProto.FLOAT for x in add.input) \
                or add.output[0] in {o.name for o in model.graph.output}:
            continue
        fused = helper.make_node("SkipSimplifiedLayerNormalization", [add.input[0], add.input[1], norm.input[1]],
                                 [norm.output[0], "", "", add.output[0]], name=norm.name + "/skip", domain=MS_DOMAIN,
                                 epsilon=float(_attr(norm, "epsilon", 1e-5)))
        replace[id(add)], replace[id(norm)] = [fused], []  # at the Add: before all its readers
    if replace:
        nodes = [new for node in model.graph.node for new in replace.get(id(node), [node])]
        del model.graph.node[:]
        model.graph.node.extend(nodes)
        _tidy_imports(model)
    return len(replace) // 2


def rewrite(model: onnx.ModelProto, rope_mode: RopeMode | str, plan: dict | None = None
            ) -> tuple[onnx.ModelProto, dict]:
    """Rewrite every `eigen::LowRankAttention` layer of `model` (in place; also returned) into
    `plan[rope_mode]` (default `DEFAULT_PLAN`) where it applies (module doc). RoPE tables must be
    loaded (not external) for `pre` layers to be rewritten. -> (model, report): {"attention":
    the ONNX Runtime ops that run attention, "formulation": planned, "layers": {formulation:
    count}, "kept_function"/"fell_back": {reason: count}}."""
    rope_mode = RopeMode(rope_mode)
    wanted = dict(DEFAULT_PLAN if plan is None else plan).get(rope_mode, FUNCTION)
    if wanted not in FORMULATIONS:
        raise ValueError(f"unknown attention formulation {wanted!r}; known: {', '.join(FORMULATIONS)}")
    g = _Graph(model)
    chosen, reasons = Counter(), Counter()
    replace: dict[int, list] = {}  # id(node) -> nodes in its place ([]: dropped)
    for layer in _layers(g):
        how, reason = _choose(g, layer, wanted)
        chosen[how] += 1
        if reason:
            reasons[reason] += 1
        if how == GQA:
            replace[id(layer.k_scatter)] = replace[id(layer.v_scatter)] = []
        if how != FUNCTION:
            replace[id(layer.node)] = _BUILDERS[how](g, layer)
    replace.update({dropped: [] for dropped in g.dropped})
    if replace:
        nodes = [new for node in model.graph.node for new in replace.get(id(node), [node])]
        del model.graph.node[:]
        model.graph.node.extend(nodes)
        model.graph.initializer.extend(g.new_inits)
        _prune(model)
        _tidy_imports(model)
    ops = sorted({OP_NAMES[k] for k in chosen}, key=list(OP_NAMES.values()).index)
    report = {"attention": "+".join(ops) if ops else "none", "formulation": wanted, "layers": dict(chosen)}
    if reasons:
        report["fell_back"] = dict(reasons)
    return model, report


def _prune(model: onnx.ModelProto) -> None:
    """Drop the nodes no graph output depends on any more (the exporter's RoPE, head splits and
    slot counts a fused kernel took over)."""
    live = {o.name for o in model.graph.output}
    kept = []
    for node in reversed(model.graph.node):
        if any(o in live for o in node.output):
            kept.append(node)
            live.update(node.input)
            for a in node.attribute:  # a subgraph's reads of outer values
                for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                    live.update(i for n in _all_nodes(sub) for i in n.input)
    if len(kept) != len(model.graph.node):
        del model.graph.node[:]
        model.graph.node.extend(reversed(kept))


def _all_nodes(graph: onnx.GraphProto):
    for node in graph.node:
        yield node
        for a in node.attribute:
            for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                yield from _all_nodes(sub)


def _tidy_imports(model: onnx.ModelProto) -> None:
    """Import com.microsoft if a node uses it; drop the op's function and domain once no node
    calls it. (Value infos of removed intermediates are harmless and stay.)"""
    domains = {n.domain for n in model.graph.node}
    imported = {o.domain for o in model.opset_import}
    if MS_DOMAIN in domains and MS_DOMAIN not in imported:
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    if spec.DOMAIN not in domains:
        kept = [f for f in model.functions if f.domain != spec.DOMAIN]
        del model.functions[:]
        model.functions.extend(kept)
        imports = [o for o in model.opset_import if o.domain != spec.DOMAIN]
        del model.opset_import[:]
        model.opset_import.extend(imports)


def rewrite_file(src: Path, tmp: Path, rope_mode: RopeMode | str, remedy: str = "", plan: dict | None = None
                 ) -> tuple[Path | None, dict]:
    """The graph at `src` rewritten (`rewrite` with `plan`, the norm fusions, `pack_qkv`, `pack_siblings`) and
    saved in the folder `tmp` -> (its path, or None when nothing changed; the report). The copy's
    weights stay in the export's data files, hard-linked into `tmp` (copied across file systems);
    read from them are the RoPE tables the rewrite slices and the projection weights it packs, and
    the packed weights (new) go to `tmp/<src name>.packed.data`."""
    from onnx.external_data_helper import load_external_data_for_tensor, set_external_data, uses_external_data

    from eigenkv.errors import EigenError
    try:
        model = onnx.load(str(src), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - protobuf's DecodeError and friends
        raise EigenError(f"{src} is corrupt or truncated ({str(e).splitlines()[0][:160]})"
                         + (f"; {remedy}" if remedy else "")) from None
    rope = _INPUTS.index("rope_cos"), _INPUTS.index("rope_sin"), _INPUTS.index("key_up")  # key_up: `_identity_keys`
    tables = {n.input[i] for n in model.graph.node if n.domain == spec.DOMAIN for i in rope if i < len(n.input)}
    tables |= {n.input[0] for n in model.graph.node if n.op_type == "GatherND"}  # the graph's RoPE rows (gqa)
    locations = set()
    for init in model.graph.initializer:
        if not uses_external_data(init):
            continue
        if init.name in tables:
            load_external_data_for_tensor(init, str(src.parent))
            init.data_location = TensorProto.DEFAULT
            del init.external_data[:]
        else:
            locations.add(next(e.value for e in init.external_data if e.key == "location"))
    model, report = rewrite(model, rope_mode, plan)
    report["rms_norms_fused"] = fuse_rms_norms(model)
    report["skip_norms_fused"] = fuse_skip_norms(model)
    report["qkv_packed"] = pack_qkv(model, src.parent)
    report["matmuls_packed"] = pack_siblings(model, src.parent)
    if set(report["layers"]) <= {FUNCTION} and not (report["rms_norms_fused"] or report["matmuls_packed"]):
        return None, report
    for location in locations:  # relative to the graph: the export's data files beside the copy, hard-linked
        target, data = tmp / location, (src.parent / location).resolve()  # (ORT refuses symlinks out of its folder)
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(data, target)
        except OSError:  # another file system: copy
            shutil.copyfile(data, target)
    # the packed weights (new, embedded) go to a data file of their own beside the copy (a model's packed
    # MLP weights alone can pass protobuf's 2 GB limit); the export's external tensors stay as they are
    packed_data = src.name + ".packed.data"
    for init in model.graph.initializer:
        if init.HasField("raw_data") and len(init.raw_data) >= 1 << 16:
            set_external_data(init, packed_data)
    path = tmp / src.name
    onnx.save_model(model, str(path))
    return path, report
