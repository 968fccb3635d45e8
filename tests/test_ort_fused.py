"""The ORT engine's attention rewrite (engines/ort_fused.py): fused ONNX Runtime kernels in place of
the op's ONNX function, per mode (`--no-compress` -> GroupQueryAttention in shared-buffer mode;
kv-ratio 0.5 `pre` -> Ifs on the valid slots: MatMul + RotaryEmbedding + Attention over the whole
buffers when nearly full, over the longest valid length otherwise, per (sequence, KV head) row
when the batch is ragged; `joint` with r_k != r_v -> Attention). Each fused engine must match the engine built without the rewrite
(the op's function) step by step, and a float64 torch model, also after `KVCache.keep` moved
random slots (any order) and on multi-token steps over a compacted cache."""

import copy
import json
import shutil
from collections import Counter

import numpy as np
import onnx
from onnx import numpy_helper
import pytest
import torch
from tiny_models import export_tiny, folded_for_manifest

from eigenkv.cli import main
from eigenkv.engines import ort_fused
from eigenkv.engines.backend import load_engine
from eigenkv.engines.runtime import generate, prefill

TEXT = "The quick brown fox jumps over the lazy dog. " * 80
PROMPT = 21
MAX_LEN = 64
TOL_ENGINES = 1e-4  # max |logit diff| fused vs function engine (both fp32)
TOL_REF = 2e-5  # max |logit diff| fp32 engine vs float64 model (tiny models: logits ~1), as test_cache_moves
MODES = {"rotated": ["--no-compress"], "pre": ["--kv-ratio", "0.5", "--rope-mode", "pre"],
         "joint": ["--kv-ratio", "0.5", "--rope-mode", "joint"],
         # layer 0 at rank 4 (pre), layers 1-2 left uncompressed (identity keys): GQA for them, by-step for layer 0
         "mixed": ["--compress-layers", "0", "--key-rank", "4", "--value-rank", "4", "--rope-mode", "pre"]}
ROPE_MODE = {"rotated": "rotated", "pre": "pre", "joint": "joint", "mixed": "pre"}  # the manifest's
OPS = {"rotated": "GroupQueryAttention", "pre": "Attention", "joint": "Attention",
       "mixed": "GroupQueryAttention+Attention"}  # runtime["attention"] (in OP_NAMES order)
KERNELS = {"rotated": {"GroupQueryAttention"}, "pre": {"If", "Scan", "Attention", "RotaryEmbedding"},
           "joint": {"Attention"}, "mixed": {"If", "Scan", "GroupQueryAttention"}}  # in the saved engine graph
# (branches included)


@pytest.fixture(scope="module", params=list(MODES))
def built(request, tmp_path_factory):
    mode = request.param
    root = tmp_path_factory.mktemp(f"fused-{mode}")
    (root / "calib.txt").write_text(TEXT)
    out = root / "exp" / "model.onnx"
    assert export_tiny(root, "llama", out, *MODES[mode], "--max-seq-len", str(MAX_LEN), "--decode-steps", "4") == 0
    assert main(["build", str(out), "-o", str(root / "fused")]) == 0
    assert main(["build", str(out), "-o", str(root / "function"), "--attention", "function"]) == 0
    manifest = json.loads((out.parent / "model.eigen.json").read_text())
    assert manifest["rope_mode"] == ROPE_MODE[mode]
    if mode == "rotated":
        from transformers import AutoModelForCausalLM

        from eigenkv.exporter.decoder import decoder_from_hf
        hf = AutoModelForCausalLM.from_pretrained(root / "llama", attn_implementation="eager").float().eval()
        reference = decoder_from_hf(hf, MAX_LEN).double()
    else:
        reference = copy.deepcopy(folded_for_manifest(root, "llama", manifest, out).with_max_positions(MAX_LEN)).double()
    return {"mode": mode, "root": root, "graph": out, "fused": load_engine(root / "fused"),
            "function": load_engine(root / "function"), "reference": reference}


def test_rewrite_is_recorded_and_the_export_keeps_the_op(built):
    mode, root = built["mode"], built["root"]
    runtime = json.loads((root / "fused" / "config.json").read_text())["runtime"]
    assert runtime["attention"] == OPS[mode] and "function" not in runtime["attention_rewrite"]["layers"]
    assert json.loads((root / "function" / "config.json").read_text())["runtime"]["attention"] == "function"
    engine_graph = onnx.load(str(root / "fused" / "model.onnx"), load_external_data=False)
    ops = {n.op_type for n in engine_graph.graph.node}
    all_ops = {n.op_type for n in ort_fused._all_nodes(engine_graph.graph)}
    assert KERNELS[mode] <= all_ops and "LowRankAttention" not in all_ops and not engine_graph.functions
    # every RMSNorm (2 per layer + the final one) became ONNX Runtime's fused norm, all but the
    # first (on the embedding) with the residual Add before it
    report = runtime["attention_rewrite"]
    assert report["rms_norms_fused"] == 2 * 3 + 1 and report["skip_norms_fused"] == 2 * 3
    assert "Pow" not in ops and "Reciprocal" not in ops
    # sibling projections of one input packed (`pack_siblings`): each layer's gate and up, and a
    # rows (`pre`) or Attention (`joint`) layer's query, key and value (GQA layers pack those as its input)
    packed = {"rotated": 3, "pre": 6, "joint": 6, "mixed": 4}[mode]
    assert report["matmuls_packed"] == packed
    splits = [n for n in engine_graph.graph.node if n.name.endswith("/packed/split")]
    assert len(splits) == packed
    counts = Counter(n.op_type for n in engine_graph.graph.node)
    assert counts["SkipSimplifiedLayerNormalization"] == 2 * 3 and counts["SimplifiedLayerNormalization"] == 1
    if mode == "rotated":  # RoPE inside GQA (position_ids), packed QKV projection, no head splits
        gqa = [n for n in engine_graph.graph.node if n.op_type == "GroupQueryAttention"]
        # per layer: qkv (GQA's packed input), o_proj, gate+up (one MatMul and a Split), down_proj; the LM head
        assert report["qkv_packed"] == 3 and counts["MatMul"] == 4 * 3 + 1
        for n in gqa:
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
            assert attrs["do_rotary"] == 1 and n.input[1] == n.input[2] == "" and n.input[9] == "position_ids"
        # slot counts computed once per step for all layers, Splits hand each layer its rows; each
        # layer's total_sequence_length is its own row's maximum (one ReduceMax over [L, B] for all)
        assert counts["ReduceMax"] == 1 and counts["Squeeze"] <= 1 and counts["Gather"] == 1  # (the embedding)
        assert not ops & {"Neg", "GatherND", "Transpose"} and counts["Reshape"] == 1  # (the flat seqlens table)
    ifs = [n for n in engine_graph.graph.node if n.op_type == "If"]
    assert len(ifs) == {"pre": 3, "mixed": 1}.get(mode, 0)  # one per compressed pre layer
    inits = {i.name: numpy_helper.to_array(i).tolist() for i in engine_graph.graph.initializer
             if not i.dims or i.dims == [1]}

    def attrs_of(node):
        return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}

    def scaled(made, name, factor):  # Mul(x, [factor]) -> the node making x
        mul = made[name]
        assert mul.op_type == "Mul" and inits[mul.input[1]] == [factor]
        return made[mul.input[0]]
    for branch in ifs:
        # `pre` layers branch per step on the valid slots after the write (n_b, longest = max n_b,
        # Smax slots): ragged (3 * sum n_b < 2 * B * longest) -> the rows' Scan; else nearly full
        # (5 * longest >= 4 * Smax) -> Attention over the whole buffers, else over their first
        # `longest` slots (Slices)
        # (a decode step over a buffer not nearly full is ragged below 4/5: 5 * sum n_b < 4 * B * longest)
        made = {o: n for n in engine_graph.graph.node for o in n.output}

        def filled(name, num, den):  # num * sum n_b >= den * B * longest -> (sum, B * longest)
            ge = made[name]
            assert ge.op_type == "GreaterOrEqual"
            return scaled(made, ge.input[0], num), scaled(made, ge.input[1], den)
        even = made[branch.input[0]]
        assert even.op_type == "And"
        total, batch_longest = filled(even.input[0], 3, 2)
        assert total.op_type == "ReduceSum" and batch_longest.op_type == "Mul"
        decode_rule = made[even.input[1]]
        assert decode_rule.op_type == "Or" and filled(decode_rule.input[1], 5, 4) == (total, batch_longest)
        sparse = made[made[decode_rule.input[0]].input[0]]
        assert made[decode_rule.input[0]].op_type == "Not" and sparse.op_type == "And"
        decode, not_full = (made[x] for x in sparse.input)
        assert decode.op_type == "Equal" and inits[decode.input[1]] == [1] and not_full.op_type == "Not"
        new_tokens = made[decode.input[0]]  # S: the query's third axis
        assert new_tokens.op_type == "Shape" and attrs_of(new_tokens) == {"start": 2, "end": 3}
        batch, longest = (made[x] for x in batch_longest.input)
        assert longest.op_type == "ReduceMax" and longest.input[0] == total.input[0]  # both over the lengths
        lengths = made[total.input[0]]
        assert lengths.op_type == "Cast" and attrs_of(lengths)["to"] == onnx.TensorProto.INT64
        batched, rows = (attrs_of(branch)[k] for k in ("then_branch", "else_branch"))
        assert [n.op_type for n in rows.node].count("Scan") == 1 and "If" not in {n.op_type for n in rows.node}
        (inner,) = [n for n in batched.node if n.op_type == "If"]
        full = made[inner.input[0]]
        assert made[not_full.input[0]] is full
        assert full.op_type == "GreaterOrEqual" and scaled(made, full.input[0], 5) is longest
        smax = scaled(made, full.input[1], 4)
        whole, valid = (attrs_of(inner)[k] for k in ("then_branch", "else_branch"))
        rebuild = next(n for n in whole.node if n.op_type == "MatMul")
        assert new_tokens.input[0] == next(n for n in whole.node if n.op_type == "Attention").input[0]  # the query
        _check_rule_nodes(engine_graph, branch.input[0], inner.input[0], new_tokens.input[0])
        for size, (start, end) in ((batch, (0, 1)), (smax, (2, 3))):  # B and Smax of the rank-r key buffer
            assert size.op_type == "Shape" and attrs_of(size) == {"start": start, "end": end}
            assert size.input[0] == rebuild.input[0]
        for sub, sliced in ((whole, False), (valid, True)):
            ops = Counter(n.op_type for n in sub.node)
            assert ops >= Counter(["MatMul", "RotaryEmbedding", "Attention"]) and not {"Scan", "If"} & set(ops)
            assert ops["Slice"] == (3 if sliced else 0)  # keys, values, slot positions
            sub_made = {o: n for n in sub.node for o in n.output}
            attention = next(n for n in sub.node if n.op_type == "Attention")
            nonpad = sub_made[attention.input[6]]
            assert nonpad.op_type == "Cast" and nonpad.input[0] == lengths.input[0]
            if sliced:  # [0, max(nonpad)) on the slot axis, of the buffers the whole branch reads
                ends = {n.input[2] for n in sub.node if n.op_type == "Slice"}
                assert len(ends) == 1 and sub_made[ends.pop()].op_type == "ReduceMax"
                sources = {n.input[0] for n in sub.node if n.op_type == "Slice"}
                assert rebuild.input[0] in sources and attention.input[2] not in sources
                assert next(n for n in whole.node if n.op_type == "Attention").input[2] in sources
    for scan in (n for n in ort_fused._all_nodes(engine_graph.graph) if n.op_type == "Scan"):
        # each (sequence, KV head) row rebuilds, rotates and reads only its valid slots: the rebuild's
        # keys, the values and the slot positions are Slices ending at the row's length
        body = onnx.helper.get_attribute_value(next(a for a in scan.attribute if a.name == "body"))
        made = {o: n for n in body.node for o in n.output}
        length = made[next(n for n in body.node if n.op_type == "Attention").input[6]]
        assert length.op_type == "Reshape" and length.input[0] == body.input[4].name  # the row's length
        rebuild = next(n for n in body.node if n.op_type == "MatMul")
        rotary = next(n for n in body.node if n.op_type == "RotaryEmbedding")
        values = made[next(n for n in body.node if n.op_type == "Attention").input[2]]
        names = [i.name for i in body.input]  # q, kr, v, pos, len (, up)
        for x, source in ((rebuild.input[0], "kr"), (made[rotary.input[3]].input[0], "pos"), (values.input[0], "v")):
            sliced = made.get(x)
            assert sliced is not None and sliced.op_type == "Slice", x
            assert sliced.input[2] == length.output[0] and sliced.input[1] == sliced.input[3]  # [0, n) on axis 0
            data = made.get(sliced.input[0])  # the row's buffer, reshaped to [Smax, width] (positions: as scanned)
            assert (data.input[0] if data is not None else sliced.input[0]) == names[["q", "kr", "v", "pos"].index(source)]
    if mode == "mixed":  # the compressed layer 0 by step (If); the identity-key layers on GQA, rotating as they write
        assert report["layers"] == {"attention-by-step": 1, "gqa": 2} and "fell_back" not in report
        gqa = [n for n in engine_graph.graph.node if n.op_type == "GroupQueryAttention"]
        assert [onnx.helper.get_attribute_value(a) for n in gqa for a in n.attribute if a.name == "do_rotary"] == [1, 1]
        manifest = json.loads((root / "exp" / "model.eigen.json").read_text())
        assert manifest["layout"]["key_ranks"] == [4, 16, 16] and manifest["layout"]["value_ranks"] == [4, 16, 16]
    exported = onnx.load(str(built["graph"]), load_external_data=False)  # TensorRT's copy: unchanged
    assert sum(n.op_type == "LowRankAttention" and n.domain == "eigen" for n in exported.graph.node) == 3
    assert [f.name for f in exported.functions] == ["LowRankAttention"]
    assert not any(n.domain == "com.microsoft" for n in exported.graph.node)


def _check_rule_nodes(model, even: str, full: str, query: str) -> None:
    """Run the engine graph's own rule nodes (those computing `even` and `full` from the query's
    and key buffer's shapes and the layer's valid slots) in ONNX Runtime on random batches: the
    If takes rows when not `even`, the whole buffers when `even` and `full`, else the sliced form,
    as `ort_fused.by_step_branch` says."""
    import onnxruntime as ort
    graph = model.graph
    made = {o: (i, n) for i, n in enumerate(graph.node) for o in n.output}
    inits = {i.name: i for i in graph.initializer}
    kept, leaves, todo = {}, {}, [even, full]
    while todo:
        name = todo.pop()
        if name in inits or name in leaves or name not in made or made[name][0] in kept:
            continue
        i, node = made[name]
        kept[i] = node
        if node.op_type == "Shape" or (node.op_type == "Cast" and node.output[0].endswith("lengths_i64")):
            leaves[node.input[0]] = node.op_type  # a tensor only its shape (Shape) or values (the lengths) matter of
        else:
            todo.extend(node.input)
    assert sorted(leaves.values()) == ["Cast", "Shape", "Shape"], leaves  # lengths, query, key buffer
    lengths_in = next(k for k, v in leaves.items() if v == "Cast")
    shaped = [k for k, v in leaves.items() if v == "Shape"]
    nodes = [kept[i] for i in sorted(kept)]
    used = {x for n in nodes for x in n.input}
    vi = onnx.helper.make_tensor_value_info
    sub = onnx.helper.make_graph(
        nodes, "rule", [vi(lengths_in, onnx.TensorProto.INT64, None)] + [vi(k, onnx.TensorProto.FLOAT, None) for k in shaped],
        [vi(even, onnx.TensorProto.BOOL, None), vi(full, onnx.TensorProto.BOOL, None)],
        [inits[k] for k in sorted(used & set(inits))])
    rule = onnx.helper.make_model(sub, opset_imports=[o for o in model.opset_import if o.domain == ""],
                                  ir_version=model.ir_version)
    session = ort.InferenceSession(rule.SerializeToString(), providers=["CPUExecutionProvider"])
    assert query in shaped
    rng = np.random.default_rng(11)
    seen = Counter()
    for _ in range(300):
        batch, slots, new = int(rng.integers(1, 9)), int(rng.integers(4, 120)), int(rng.choice([1, 1, 2, 8]))
        valid = rng.integers(1, slots + 1, batch)
        feeds = {lengths_in: valid.astype(np.int64)}
        for k in shaped:  # query [B, H, S, d], key buffer [B, Hkv, Smax, r]: only shapes are read
            feeds[k] = np.zeros((batch, 1, new if k == query else slots, 1), np.float32)
        is_even, is_full = (bool(np.asarray(x).reshape(-1)[0]) for x in session.run([even, full], feeds))
        got = "attention-rows" if not is_even else ("attention" if is_full else "attention-valid")
        assert got == ort_fused.by_step_branch(valid, slots, new), (valid.tolist(), slots, new)
        seen[got] += 1
    assert len(seen) == 3


def _steps(engine, prompts, chunk, new_tokens):
    """Right-padded prompts of different lengths, prefilled `chunk` tokens per step (multi-token
    steps over caches of different lengths), then greedy decode -> logits of every step."""
    lengths = np.array([len(p) for p in prompts])
    ids = np.zeros((len(prompts), lengths.max()), np.int64)
    for b, p in enumerate(prompts):
        ids[b, : len(p)] = p
    cache = engine.new_cache(len(prompts), int(lengths.max()) + new_tokens)
    out = [prefill(engine, cache, ids, lengths, chunk)]
    for step in range(new_tokens):
        logits = engine.step(cache, out[-1].argmax(-1)[:, None], (lengths + step)[:, None])[:, 0]
        cache.advance(np.ones(len(prompts), np.int64))
        out.append(logits)
    return np.stack(out)


def test_fused_matches_the_function_engine(built):
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(0, 256, n)) for n in (5, 13, 9)]
    fused, function = (_steps(built[k], prompts, 4, 12) for k in ("fused", "function"))
    assert np.abs(fused - function).max() <= TOL_ENGINES
    assert (fused.argmax(-1) == function.argmax(-1)).all()
    tokens = [generate(built[k], prompts, 10, prefill_chunk=3) for k in ("fused", "function")]
    assert tokens[0] == tokens[1]


def test_fused_matches_the_function_engine_under_eviction(built):
    """Evicted layers hold budget + headroom slots while the skipped layer holds the whole context:
    buffers of different sizes in one step (each GQA layer bounds its own present)."""
    from eigenkv.engines.eviction import EvictionSettings, make_evictor
    rng = np.random.default_rng(5)
    prompts = [list(rng.integers(0, 256, n)) for n in (30, 23)]
    settings = EvictionSettings(budget=8, sink=1, recent=2, skip_layers=(0,), headroom=4)
    runs = []
    for k in ("fused", "function"):
        evictor = make_evictor(settings, built[k])
        caches = []
        runs.append(generate(built[k], prompts, 12, prefill_chunk=4, evictor=evictor, on_cache=caches.append))
        caps = caches[-1].capacities
        assert caps[0] > caps[1] and evictor.evictions > 0
    assert runs[0] == runs[1]


@torch.no_grad()
def _reference(model, prompt, kept, tokens, positions):
    """Float64: full prefill of `prompt`; then a cache holding only `kept` (per layer, per sequence
    [Hkv, k_b] original positions, in that slot order) and one step of tokens/positions [B, S] -> logits."""
    batch = prompt.shape[0]
    full = model.new_cache(batch, PROMPT, dtype=torch.float64)
    prefill_logits = model(torch.from_numpy(prompt), torch.arange(PROMPT).expand(batch, -1), full)
    small = model.new_cache(batch, PROMPT + tokens.shape[1], dtype=torch.float64)
    for i, per_seq in enumerate(kept):
        for b, idx in enumerate(per_seq):
            idx_t = torch.from_numpy(np.asarray(idx)).long()  # [Hkv, k]
            k = idx_t.shape[-1]
            for src, dst in ((full.keys[i], small.keys[i]), (full.values[i], small.values[i])):
                dst[b, :, :k] = src[b].gather(1, idx_t[..., None].expand(-1, -1, src.shape[-1]))
            small.positions[i][b, :, :k] = idx_t.to(torch.int32)  # slot index = position in the full prefill
            small.lengths[i, b] = k
    step = model(torch.from_numpy(tokens), torch.from_numpy(positions), small)
    return prefill_logits[:, -1].numpy(), step.numpy()


def _pre_branch(valid: list[int], slots: int, new: int) -> str:
    """The branch a `pre` layer's step of `new` tokens takes, given each sequence's valid slots
    after the write (`ort_fused._attention_by_step`'s conditions)."""
    full = 5 * max(valid) >= 4 * slots
    num, den = (5, 4) if new == 1 and not full else (3, 2)
    if num * sum(valid) < den * len(valid) * max(valid):
        return "rows"
    return "whole" if full else "valid"


def test_by_step_branch_is_the_graph_rule():
    """`ort_fused.by_step_branch` (what tools/bench_pre_ragged.py reports) picks the branch the
    graph's Ifs pick (`_pre_branch`, pinned to the graph above), on random batches, and the decode
    rule differs from the multi-token one only below 4/5 filled over buffers not nearly full."""
    rng = np.random.default_rng(0)
    names = {"rows": "attention-rows", "whole": "attention", "valid": "attention-valid"}
    seen = Counter()
    for _ in range(2000):
        batch, slots, new = int(rng.integers(1, 9)), int(rng.integers(8, 200)), int(rng.choice([1, 2, 16]))
        valid = rng.integers(1, slots + 1, batch).tolist()
        got = ort_fused.by_step_branch(valid, slots, new)
        assert got == names[_pre_branch(valid, slots, new)], (valid, slots, new)
        seen[got] += 1
    assert set(seen) == set(names.values())
    # 4 rows of 100, 85, 70, 55 slots (310 / 400 = 0.775 filled) in 200 slots: decode -> rows, chunk -> sliced
    assert ort_fused.by_step_branch([100, 85, 70, 55], 200, 1) == "attention-rows"
    assert ort_fused.by_step_branch([100, 85, 70, 55], 200, 4) == "attention-valid"
    assert ort_fused.by_step_branch([100, 85, 70, 55], 110, 1) == "attention"  # nearly full: 2/3 rule
    assert ort_fused.by_step_branch([100, 90, 80, 70], 200, 1) == "attention-valid"  # 0.85 filled


# kept slots per sequence (ranges) -> the branch each layer's step takes
KEPT = {"whole": ((17, 21), (17, 21)), "valid": ((8, 10), (8, 10)), "rows": ((16, 21), (2, 4))}


@pytest.mark.parametrize("new,branch", [(1, "whole"), (1, "valid"), (1, "rows"), (3, "whole"), (3, "valid"), (3, "rows")])
def test_fused_matches_float64_after_keep(built, new, branch):
    """Prefill, then every layer keeps a different random subset of slots in random order (per
    sequence and KV head), then a step of `new` tokens: vs the float64 model on the kept tokens.
    How many slots are kept picks the branch a `pre` layer's step takes (`_pre_branch`): nearly
    full buffers (the whole-buffer branch then rebuilds the stale slots past the kept ones too),
    fewer slots alike in both sequences (sliced to the longer one), or very different counts (rows)."""
    engine, model = built["fused"], built["reference"]
    rng = np.random.default_rng(3 + new + 10 * list(KEPT).index(branch))
    prompt = rng.integers(0, 256, size=(2, PROMPT))
    cache = engine.new_cache(2, PROMPT + new)
    last = prefill(engine, cache, prompt, np.full(2, PROMPT), 8)
    hkv = engine.layout.n_kv_heads
    kept = []
    for layer in range(engine.layout.n_layers):
        counts = [int(rng.integers(*KEPT[branch][seq])) for seq in range(2)]
        assert _pre_branch([k + new for k in counts], PROMPT + new, new) == branch
        idx = [np.stack([rng.permutation(PROMPT)[:k] for _ in range(hkv)]) for k in counts]  # per sequence [Hkv, k]
        for seq in range(2):
            cache.keep(layer, seq, idx[seq])
        kept.append(idx)
    tokens = np.concatenate([last.argmax(-1)[:, None], rng.integers(0, 256, (2, new - 1))], axis=1)
    positions = np.broadcast_to(np.arange(PROMPT, PROMPT + new), (2, new)).copy()
    logits = engine.step(cache, tokens, positions)
    ref_prefill, ref_step = _reference(model, prompt, kept, tokens, positions)
    assert np.abs(last - ref_prefill).max() <= TOL_REF
    assert np.abs(logits - ref_step).max() <= TOL_REF


@pytest.mark.parametrize("variant", ["rope-in-graph", "unpacked", "per-layer-slot-counts"])
def test_gqa_variants_match(built, variant, tmp_path, monkeypatch):
    """The GQA layers' other forms, which a graph gets when a pattern is not recognised (RoPE left
    in the graph with do_rotary=0; separate Q, K, V projections; slot counts computed per layer),
    are exact too: vs the function engine on the same steps (right-padded multi-token prefill,
    decode), same tolerance."""
    if built["mode"] != "rotated":
        pytest.skip("GQA layers: rotated mode")
    from eigenkv.engines import ort
    from eigenkv.manifest import read_manifest
    if variant == "rope-in-graph":
        monkeypatch.setattr(ort_fused, "_rope_of", lambda g, name: None)
    elif variant == "unpacked":
        monkeypatch.setattr(ort_fused, "pack_qkv", lambda model, base_dir=None: 0)
    else:
        monkeypatch.setattr(ort_fused, "_lengths_of", lambda g, name: None)
    fields = ort.build(built["graph"], read_manifest(built["graph"]), tmp_path)
    assert fields["runtime"]["attention"] == "GroupQueryAttention"
    graph = onnx.load(str(tmp_path / "model.onnx"), load_external_data=False)
    gqa = [n for n in graph.graph.node if n.op_type == "GroupQueryAttention"]
    rotary = {a.i for n in gqa for a in n.attribute if a.name == "do_rotary"}
    assert len(gqa) == 3 and rotary == ({0} if variant == "rope-in-graph" else {1})
    if variant != "per-layer-slot-counts":  # separate Q, K, V (the graph-rotated ones are no MatMul outputs)
        assert all(n.input[1] for n in gqa)
    else:  # packed; seqlens_k and total_sequence_length computed by each layer
        assert not any(n.input[1] for n in gqa)
        assert sum(n.op_type == "ReduceMax" for n in graph.graph.node) == 3
    got, function = _rebuilt_vs_function(built, tmp_path, seed=5)
    assert np.abs(got - function).max() <= TOL_ENGINES


@pytest.mark.parametrize("formulation", ["attention", "attention-valid", "attention-rows"])
def test_pre_formulations_each_match(built, formulation, tmp_path, monkeypatch):
    """Each branch of the default `pre` formulation alone (the batched `attention` over the whole
    buffers, or over their first max(cache_lengths) slots, or the rows' Scan, on every step) matches the function engine on right-padded multi-token prefill
    chunks and decode steps, same tolerance, so neither relies on the If to be exact."""
    if built["mode"] != "pre":
        pytest.skip("pre-mode formulations")
    from eigenkv.engines import ort
    from eigenkv.manifest import read_manifest
    from eigenkv.plugins.spec import RopeMode
    monkeypatch.setitem(ort_fused.DEFAULT_PLAN, RopeMode.PRE, formulation)
    fields = ort.build(built["graph"], read_manifest(built["graph"]), tmp_path)
    assert fields["runtime"]["attention_rewrite"]["layers"] == {formulation: 3}
    graph = onnx.load(str(tmp_path / "model.onnx"), load_external_data=False)
    assert "If" not in {n.op_type for n in graph.graph.node}
    assert ("Scan" in {n.op_type for n in graph.graph.node}) == (formulation == "attention-rows")
    got, function = _rebuilt_vs_function(built, tmp_path, seed=6)
    assert np.abs(got - function).max() <= TOL_ENGINES
    assert (got.argmax(-1) == function.argmax(-1)).all()


def _rebuilt_vs_function(built, engine_dir, seed):
    """The engine graph built into `engine_dir` (given the fused engine's config) and the function
    engine on the same right-padded prompts (`_steps`: chunked prefill, decode) -> their logits."""
    shutil.copyfile(built["root"] / "fused" / "config.json", engine_dir / "config.json")
    rng = np.random.default_rng(seed)
    prompts = [list(rng.integers(0, 256, n)) for n in (5, 13, 9)]
    return _steps(load_engine(engine_dir), prompts, 4, 12), _steps(built["function"], prompts, 4, 12)


def test_rewrite_plans_and_fallbacks(built):
    """`function` leaves the graph alone; GQA is refused where keys are pre-RoPE (unless their key_up
    is the identity, which needs the tables loaded) or widths differ."""
    from eigenkv.plugins.spec import RopeMode
    mode = RopeMode(ROPE_MODE[built["mode"]])
    graph = onnx.load(str(built["graph"]), load_external_data=False)
    same, report = ort_fused.rewrite(copy.deepcopy(graph), mode, {mode: "function"})
    assert report["attention"] == "function" and same.graph.node == graph.graph.node
    _, report = ort_fused.rewrite(copy.deepcopy(graph), mode, {mode: "gqa"})
    if mode is RopeMode.ROTATED:
        assert report["layers"] == {"gqa": 3}
    elif mode is RopeMode.PRE:  # tables not loaded here: pre layers keep the function
        assert report["layers"] == {"function": 3}
    else:
        assert report["layers"] == {"attention": 3} and report["fell_back"] == {"key width != value width": 3}
    with pytest.raises(ValueError, match="unknown attention formulation"):
        ort_fused.rewrite(copy.deepcopy(graph), mode, {mode: "flash"})


def test_build_falls_back_to_the_function_when_a_fused_kernel_fails(built, tmp_path, monkeypatch):
    """A kernel refusing the rewritten graph (here: GQA given the wrong head count) is caught by
    the build's engine check, which rebuilds the engine with the op's function and says why."""
    if built["mode"] != "rotated":
        pytest.skip("one mode is enough")
    from eigenkv.engines import ort
    from eigenkv.manifest import read_manifest
    real = ort_fused._gqa

    def broken(g, layer):
        nodes = real(g, layer)
        for node in nodes:
            if node.op_type == "GroupQueryAttention":
                for a in node.attribute:
                    if a.name == "kv_num_heads":
                        a.i += 1
        return nodes

    monkeypatch.setitem(ort_fused._BUILDERS, ort_fused.GQA, broken)
    # unpacked: with a packed QKV input the session itself refuses the head count (caught too,
    # `_optimize`), before the engine check this test is about
    monkeypatch.setattr(ort_fused, "pack_qkv", lambda model, base_dir=None: 0)
    fields = ort.build(built["graph"], read_manifest(built["graph"]), tmp_path)
    assert fields["runtime"]["attention"] == "function"
    reasons = fields["runtime"]["attention_rewrite"]["fell_back"]
    assert any(reason.startswith("engine check failed") for reason in reasons)
    ops = {n.op_type for n in onnx.load(str(tmp_path / "model.onnx"), load_external_data=False).graph.node}
    assert "GroupQueryAttention" not in ops and not any(p.name.startswith("fused-") for p in tmp_path.iterdir())


@pytest.mark.parametrize("broken_branch", ["attention", "attention-valid"])
def test_build_checks_every_branch(built, broken_branch, tmp_path, monkeypatch):
    """The `pre` Ifs run each branch only on some steps: a batched branch ONNX Runtime accepts at
    load but fails at run (here: values swapped for the query, a length mismatch) is caught by the
    build's engine check, which then builds the function engine and says why."""
    if built["mode"] != "pre":
        pytest.skip("the If is the pre mode's")
    from eigenkv.engines import ort
    from eigenkv.manifest import read_manifest
    real = ort_fused._BUILDERS[broken_branch]

    def broken(g, layer):
        nodes = real(g, layer)
        attention = next(n for n in nodes if n.op_type == "Attention")
        attention.input[2] = attention.input[0]
        return nodes

    monkeypatch.setitem(ort_fused._BUILDERS, broken_branch, broken)
    fields = ort.build(built["graph"], read_manifest(built["graph"]), tmp_path)
    assert fields["runtime"]["attention"] == "function"
    assert any(r.startswith("engine check failed") for r in fields["runtime"]["attention_rewrite"]["fell_back"])
    ops = {n.op_type for n in onnx.load(str(tmp_path / "model.onnx"), load_external_data=False).graph.node}
    assert "If" not in ops


def test_attention_option_is_checked(built, tmp_path, capsys):
    """`eigenkv build --attention` belongs to the ort backend; a wrong value is one line, exit 2."""
    from eigenkv.engines import ort
    from eigenkv.errors import EigenError
    from eigenkv.manifest import read_manifest
    assert main(["build", str(built["graph"]), "-o", str(tmp_path / "t"), "--backend", "torch",
                 "--attention", "function"]) == 2
    assert "--attention" in capsys.readouterr().err and not (tmp_path / "t").exists()
    with pytest.raises(EigenError, match="--attention must be one of fused, function"):
        ort.build(built["graph"], read_manifest(built["graph"]), tmp_path, attention="flash")


def _rms_norm_graph(exponent: float):
    """x [2, 3, 8] -> transformers' traced RMSNorm (Pow, ReduceMean, Add, Sqrt, Reciprocal, Mul, Mul)."""
    from onnx import TensorProto, helper, numpy_helper
    w = np.random.default_rng(1).normal(size=8).astype(np.float32)
    inits = [numpy_helper.from_array(np.array(exponent, np.float32), "two"),
             numpy_helper.from_array(np.array([-1], np.int64), "axes"),
             numpy_helper.from_array(np.array(1e-5, np.float32), "eps"), numpy_helper.from_array(w, "w")]
    nodes = [helper.make_node("Pow", ["x", "two"], ["sq"]),
             helper.make_node("ReduceMean", ["sq", "axes"], ["ms"], keepdims=1),
             helper.make_node("Add", ["ms", "eps"], ["v"]), helper.make_node("Sqrt", ["v"], ["r"]),
             helper.make_node("Reciprocal", ["r"], ["inv"]), helper.make_node("Mul", ["x", "inv"], ["n"]),
             helper.make_node("Mul", ["w", "n"], ["y"])]
    graph = helper.make_graph(nodes, "rms", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), w


def test_skip_norm_fusion_matches_float64_and_keeps_the_residual():
    """Add(a, b) -> RMSNorm, the sum also read by the next residual Add: one
    SkipSimplifiedLayerNormalization whose fourth output feeds that Add; a broadcasting Add is left."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(2)
    w = rng.normal(size=8).astype(np.float32)

    def graph(b_shape):
        nodes = [helper.make_node("Add", ["a", "b"], ["h"]),
                 helper.make_node("SimplifiedLayerNormalization", ["h", "w"], ["n"], axis=-1, epsilon=1e-5),
                 helper.make_node("Add", ["h", "n"], ["y"])]
        vi = helper.make_tensor_value_info
        g = helper.make_graph(nodes, "skip", [vi("a", TensorProto.FLOAT, ["B", "S", 8]), vi("b", TensorProto.FLOAT, b_shape)],
                              [vi("y", TensorProto.FLOAT, ["B", "S", 8])], [numpy_helper.from_array(w, "w")])
        return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])

    model = graph(["B", "S", 8])
    assert ort_fused.fuse_skip_norms(model) == 1
    assert [n.op_type for n in model.graph.node] == ["SkipSimplifiedLayerNormalization", "Add"]
    a, b = (rng.normal(size=(2, 3, 8)).astype(np.float32) for _ in range(2))
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"a": a, "b": b})[0]
    h = a.astype(np.float64) + b
    expected = h + h / np.sqrt((h ** 2).mean(-1, keepdims=True) + 1e-5) * w
    assert np.abs(got - expected).max() < 1e-5  # float32 round-off
    broadcast = graph([1, 1, 8])
    assert ort_fused.fuse_skip_norms(broadcast) == 0 and len(broadcast.graph.node) == 3


def test_rms_norm_fusion_matches_float64_and_only_takes_the_exact_pattern():
    import onnxruntime as ort
    model, w = _rms_norm_graph(2.0)
    assert ort_fused.fuse_rms_norms(model) == 1
    assert [n.op_type for n in model.graph.node] == ["SimplifiedLayerNormalization"]
    x = np.random.default_rng(0).normal(size=(2, 3, 8)).astype(np.float32)
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    x64 = x.astype(np.float64)
    expected = x64 / np.sqrt((x64 ** 2).mean(-1, keepdims=True) + 1e-5) * w
    assert np.abs(got - expected).max() < 1e-5  # float32 round-off
    cubed, _ = _rms_norm_graph(3.0)
    assert ort_fused.fuse_rms_norms(cubed) == 0 and len(cubed.graph.node) == 7


def test_sibling_matmuls_pack_into_one_and_match_float64(tmp_path):
    """MatMuls of one x by constant weights (here of widths 5, 3, 4) become one MatMul and a Split
    into the same output names; a MatMul by a computed tensor and one of another x are left. Checked against float64 numpy; external weights are read from
    `base_dir`."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper
    from onnx.external_data_helper import convert_model_to_external_data
    rng = np.random.default_rng(3)
    w = {n: rng.normal(size=s).astype(np.float32) for n, s in
         {"w1": (8, 5), "w2": (8, 3), "w3": (8, 4), "w5": (8, 2)}.items()}
    vi = helper.make_tensor_value_info
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["a"]), helper.make_node("Relu", ["x"], ["r"]),
             helper.make_node("MatMul", ["r", "w5"], ["e"]),  # another x: alone, left
             helper.make_node("MatMul", ["x", "w2"], ["b"]), helper.make_node("MatMul", ["x", "y"], ["c"]),
             helper.make_node("MatMul", ["x", "w3"], ["d"])]
    outputs = [vi(n, TensorProto.FLOAT, None) for n in "abcde"]
    graph = helper.make_graph(nodes, "siblings", [vi("x", TensorProto.FLOAT, ["B", "S", 8]), vi("y", TensorProto.FLOAT, [8, 7])],
                              outputs, [numpy_helper.from_array(v, k) for k, v in w.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    convert_model_to_external_data(model, location="w.data", size_threshold=0)
    onnx.save_model(model, str(tmp_path / "m.onnx"))
    model = onnx.load(str(tmp_path / "m.onnx"), load_external_data=False)
    assert ort_fused.pack_siblings(model, tmp_path) == 1
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("MatMul") == 3 and ops.count("Split") == 1
    split = next(n for n in model.graph.node if n.op_type == "Split")
    assert list(split.output) == ["a", "b", "d"]
    onnx.save_model(model, str(tmp_path / "packed.onnx"))
    x, y = rng.normal(size=(2, 3, 8)).astype(np.float32), rng.normal(size=(8, 7)).astype(np.float32)
    got = ort.InferenceSession(str(tmp_path / "packed.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x, "y": y})
    x64 = x.astype(np.float64)
    expected = [x64 @ w["w1"], x64 @ w["w2"], x64 @ y, x64 @ w["w3"], np.maximum(x64, 0) @ w["w5"]]
    for g, e in zip(got, expected):
        assert g.shape == e.shape and np.abs(g - e).max() < 1e-5  # float32 round-off
    unread = onnx.load(str(tmp_path / "m.onnx"), load_external_data=False)
    assert ort_fused.pack_siblings(unread) == 0  # external weights and no base_dir: nothing to read, left
    # two groups sharing a weight, unnamed nodes: each group gets its own packed weight and name
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["a"]), helper.make_node("MatMul", ["x", "w2"], ["b"]),
             helper.make_node("Relu", ["x"], ["r"]), helper.make_node("MatMul", ["r", "w1"], ["c"]),
             helper.make_node("MatMul", ["r", "w3"], ["d"])]
    graph = helper.make_graph(nodes, "shared", [vi("x", TensorProto.FLOAT, ["B", 8])],
                              [vi(n, TensorProto.FLOAT, None) for n in "abcd"], [numpy_helper.from_array(w[k], k) for k in ("w1", "w2", "w3")])
    shared = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    assert ort_fused.pack_siblings(shared) == 2 and [n.op_type for n in shared.graph.node].count("MatMul") == 2
    got = ort.InferenceSession(shared.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x[0]})
    x64, r64 = x[0].astype(np.float64), np.maximum(x[0].astype(np.float64), 0)
    for g, e in zip(got, [x64 @ w["w1"], x64 @ w["w2"], r64 @ w["w1"], r64 @ w["w3"]]):
        assert np.abs(g - e).max() < 1e-5
