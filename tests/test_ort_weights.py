"""`eigenkv build --weights int4|int8` (engines/ort_weights.py): ONNX Runtime's block-wise
weight-only quantizer on the engine graph. Reference: the float64 model whose linear weights are
the engine's *dequantized* codes (scale · (q − 2^(bits−1)), decoded here in numpy from the
MatMulNBits initializers), so the check isolates the kernels and the rewrite from the rounding.
Tolerances (max |logit diff|, tiny models, logits ~1): fp32 activations (accuracy level 0)
as close as the fp32 engine (TOL_EXACT); the default level 4 quantizes activations to int8 per
block inside the kernel, measured and bounded by TOL_INT8_ACT."""

import copy
import json
import shutil

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from tiny_models import export_tiny, folded_for_manifest

from eigenkv.cli import main
from eigenkv.engines.backend import load_engine
from eigenkv.engines.ort_weights import quantize_in_place
from eigenkv.engines.runtime import generate, prefill

TEXT = "The quick brown fox jumps over the lazy dog. " * 80
MAX_LEN = 64
TOL_EXACT = 2e-5  # fp32 kernel math vs float64 on the same (dequantized) weights (measured ~2e-7), as the fp32 engine
TOL_INT8_ACT = 0.05  # int8 activations inside MatMulNBits (accuracy level 4; measured up to 2.5e-2 on logits ~0.6)
MODES = {"rotated": ["--no-compress"], "pre": ["--kv-ratio", "0.5", "--rope-mode", "pre"],
         "joint": ["--kv-ratio", "0.5", "--rope-mode", "joint"]}


def dequantized(engine_dir) -> dict[str, np.ndarray]:
    """{fp32 weight name: [K, N] float64} decoded from every MatMulNBits node of the engine graph
    (symmetric codes: no zero-point input, so the zero point is 2^(bits-1))."""
    graph = onnx.load(str(engine_dir / "model.onnx"))
    inits = {t.name: t for t in graph.graph.initializer}
    out = {}
    for node in graph.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        k, n, bits, block = attrs["K"], attrs["N"], attrs["bits"], attrs["block_size"]
        assert len(node.input) < 4 or not node.input[3]  # symmetric: no zero points
        packed = numpy_helper.to_array(inits[node.input[1]]).reshape(n, -1)  # [N, blocks * blob]
        if bits == 4:
            codes = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(n, -1)  # low nibble first
        else:
            codes = packed
        scales = numpy_helper.to_array(inits[node.input[2]]).astype(np.float64).reshape(n, -1)  # [N, blocks]
        w = (codes.astype(np.float64) - 2 ** (bits - 1)) * np.repeat(scales, block, axis=1)[:, : codes.shape[1]]
        out[node.input[1].rsplit("_Q", 1)[0]] = w[:, :k].T
    return out


def _float_weights(engine_dir) -> dict[str, np.ndarray]:
    graph = onnx.load(str(engine_dir / "model.onnx"))
    return {t.name: numpy_helper.to_array(t) for t in graph.graph.initializer}


def _with_weights(reference: torch.nn.Module, fp32: dict, quantized: dict) -> torch.nn.Module:
    """A copy of the float64 `reference` whose every nn.Linear weight that one of the engine's
    quantized MatMuls holds (alone or packed side by side with others, e.g. Q, K, V) is replaced by
    its dequantized columns; the match is by value against the fp32 engine's weight."""
    model = copy.deepcopy(reference)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    replaced = set()
    for name, w_hat in quantized.items():
        w = fp32[name]  # [K, N] as the fp32 engine multiplies
        offset = 0
        while offset < w.shape[1]:
            match = next((m for m in linears if id(m) not in replaced and m.in_features == w.shape[0]
                          and offset + m.out_features <= w.shape[1]
                          and np.array_equal(m.weight.detach().float().numpy().T,
                                             w[:, offset: offset + m.out_features])), None)
            assert match is not None, f"no linear holds columns {offset}.. of {name}"
            match.weight = torch.nn.Parameter(torch.from_numpy(
                np.ascontiguousarray(w_hat[:, offset: offset + match.out_features].T)))
            replaced.add(id(match))
            offset += match.out_features
    assert len(replaced) == len(linears), "every linear layer's weight is quantized"
    return model


@pytest.fixture(scope="module", params=list(MODES))
def built(request, tmp_path_factory):
    mode = request.param
    root = tmp_path_factory.mktemp(f"weights-{mode}")
    (root / "calib.txt").write_text(TEXT)
    out = root / "exp" / "model.onnx"
    assert export_tiny(root, "llama", out, *MODES[mode], "--max-seq-len", str(MAX_LEN), "--decode-steps", "4") == 0
    assert main(["build", str(out), "-o", str(root / "fp32")]) == 0
    formats = ("int4", "int8") if mode == "rotated" else ("int4",)  # int8: one mode is enough (suite time)
    for w in formats:
        assert main(["build", str(out), "-o", str(root / w), "--weights", w]) == 0
    shutil.copytree(root / "fp32", root / "int4-fp32act")  # same codes, fp32 activations in the kernel
    level0 = quantize_in_place(root / "int4-fp32act" / "model.onnx", 4, accuracy_level=0)
    manifest = json.loads((out.parent / "model.eigen.json").read_text())
    if mode == "rotated":
        from transformers import AutoModelForCausalLM

        from eigenkv.exporter.decoder import decoder_from_hf
        hf = AutoModelForCausalLM.from_pretrained(root / "llama", attn_implementation="eager").float().eval()
        reference = decoder_from_hf(hf, MAX_LEN).double()
    else:
        reference = copy.deepcopy(folded_for_manifest(root, "llama", manifest, out).with_max_positions(MAX_LEN)).double()
    fp32 = _float_weights(root / "fp32")
    refs = {w: _with_weights(reference, fp32, dequantized(root / w)) for w in formats}
    refs["int4-fp32act"] = _with_weights(reference, fp32, dequantized(root / "int4-fp32act"))
    return {"mode": mode, "root": root, "graph": out, "level0": level0, "reference": reference, "refs": refs,
            "fp32_weights": fp32, "formats": formats,
            **{k: load_engine(root / k) for k in ("fp32", *formats, "int4-fp32act")}}


def test_every_weight_matmul_is_quantized_and_recorded(built):
    root = built["root"]
    for w, bits in [(w, int(w[3:])) for w in built["formats"]]:
        runtime = json.loads((root / w / "config.json").read_text())["runtime"]
        report = runtime["weights"]
        assert report["weights"] == w and report["block_size"] == 32 and report["accuracy_level"] == 4
        # every linear layer: lm_head + 3 layers x (q, k, v packed into one, o, gate and up packed into
        # one, down)
        assert report["matmuls"] == 1 + 3 * 4
        # and none of attention's own: pre keeps one K_r @ key_up per layer in each branch of its Ifs
        # (whole buffers, sliced buffers, rows' Scan), joint its query and key bases per layer, in
        # float (also proven by the exact float64 test below)
        assert report["kept_float"] == {"rotated": 0, "pre": 9, "joint": 6}[built["mode"]]
        graph = onnx.load(str(root / w / "model.onnx"), load_external_data=False)
        ops = [n.op_type for n in graph.graph.node]
        assert ops.count("MatMulNBits") == report["matmuls"] and ("MatMul" in ops) == (built["mode"] == "joint")
        assert {a.i for n in graph.graph.node if n.op_type == "MatMulNBits" for a in n.attribute
                if a.name == "bits"} == {bits}
    assert json.loads((root / "fp32" / "config.json").read_text())["runtime"]["weights"] == {"weights": "graph"}
    assert built["level0"]["accuracy_level"] == 0
    # the KV cache is the export's: same layout as the fp32 engine
    assert built["int4"].layout == built["fp32"].layout


def test_codes_round_to_nearest_within_half_a_step(built):
    """Every dequantized weight is within half a quantization step of the fp32 weight (step =
    the block's largest |w| / 2^(b-1)), except where the symmetric grid -2^(b-1) .. 2^(b-1) - 1
    cannot reach: values of the sign opposite to the block's extreme beyond 2^(b-1) - 1/2 steps
    are clipped to the last code, so their error is |w| - (2^(b-1) - 1) steps (ONNX Runtime's
    rule: the extreme maps exactly to -2^(b-1)). Both bounds are tight: a quantizer that truncated
    instead of rounding, or used another scale, fails."""
    fp32 = built["fp32_weights"]
    for w, bits in [(w, int(w[3:])) for w in built["formats"]]:
        for name, w_hat in dequantized(built["root"] / w).items():
            ref = fp32[name].astype(np.float64)
            k = ref.shape[0]
            blocks = -(-k // 32)
            padded = np.zeros((blocks * 32, ref.shape[1]))
            padded[:k] = ref
            step = np.repeat(np.abs(padded).reshape(blocks, 32, -1).max(1) / 2 ** (bits - 1), 32, axis=0)[:k]
            bound = np.maximum(0.5 * step, np.abs(ref) - (2 ** (bits - 1) - 1) * step)
            err = np.abs(w_hat - ref)
            assert (err <= bound * (1 + 1e-5) + 1e-12).all(), (w, name, float((err / bound).max()))
            assert float((err / step).mean()) < 0.3  # round to nearest: ~0.25 steps on average


@torch.no_grad()
def _reference_logits(model, prompts, steps):
    """Float64: prefill each right-padded prompt, then greedy decode `steps` tokens from the
    reference's own argmax -> [steps + 1, B, V] last-position logits."""
    batch, length = prompts.shape
    cache = model.new_cache(batch, length + steps, dtype=torch.float64)
    out = [model(torch.from_numpy(prompts), torch.arange(length).expand(batch, -1), cache)[:, -1]]
    for s in range(steps):
        tok = out[-1].argmax(-1, keepdim=True)
        out.append(model(tok, torch.full((batch, 1), length + s), cache)[:, -1])
    return torch.stack(out).numpy()


def _engine_logits(engine, prompts, steps, reference_tokens):
    """The same steps through the engine, fed the reference's tokens (teacher forcing, so a flipped
    argmax does not change what later steps see) -> [steps + 1, B, V]."""
    batch, length = prompts.shape
    cache = engine.new_cache(batch, length + steps)
    out = [prefill(engine, cache, prompts, np.full(batch, length), 5)]
    for s in range(steps):
        out.append(engine.step(cache, reference_tokens[s][:, None], np.full((batch, 1), length + s))[:, 0])
        cache.advance(np.ones(batch, np.int64))
    return np.stack(out)


def test_quantized_engine_matches_float64_on_its_dequantized_weights(built):
    """Every quantized engine of the mode (int4 with fp32 activations within TOL_EXACT; the CLI's
    int4 and int8 builds, int8 activations, within TOL_INT8_ACT), prefill then 6 decode steps."""
    rng = np.random.default_rng(11)
    prompts = rng.integers(0, 256, size=(2, 13))
    for engine, ref_model in built["refs"].items():
        tol = TOL_EXACT if engine == "int4-fp32act" else TOL_INT8_ACT
        ref = _reference_logits(ref_model, prompts, 6)
        got = _engine_logits(built[engine], prompts, 6, ref.argmax(-1))
        assert np.abs(got - ref).max() <= tol, (engine, float(np.abs(got - ref).max()))
        if engine == "int4-fp32act":  # the reference is the quantized model, not the original: the rounding
            plain = _reference_logits(built["reference"], prompts, 0)  # moves the logits ~1e4x more than the kernel
            assert np.abs(ref[:1] - plain).max() > 100 * np.abs(got - ref).max()


def test_quantized_engine_generates_and_evicts(built):
    """Generation with key-norm eviction runs on the quantized engine as on the fp32 one (the
    cache and its slots are untouched by the weights' format); greedy tokens of the accuracy-0
    engine equal its float64 reference's."""
    from eigenkv.engines.eviction import EvictionSettings, make_evictor
    rng = np.random.default_rng(2)
    prompts = [list(rng.integers(0, 256, n)) for n in (30, 23)]
    evictor = make_evictor(EvictionSettings(budget=8, sink=1, recent=2, skip_layers=(0,), headroom=4), built["int4"])
    tokens = generate(built["int4"], prompts, 8, prefill_chunk=4, evictor=evictor)
    assert evictor.evictions > 0 and [len(t) for t in tokens] == [8, 8]
    prompt = np.array([prompts[0][:13]])
    ref = _reference_logits(built["refs"]["int4-fp32act"], prompt, 5).argmax(-1)[:, 0]
    assert generate(built["int4-fp32act"], [prompts[0][:13]], 6)[0] == list(ref)


def test_bad_weight_options_are_one_line_and_leave_nothing(built, tmp_path, capsys):
    if built["mode"] != "rotated":
        pytest.skip("one mode is enough for argument checks")
    root = built["root"]
    assert main(["build", str(built["graph"]), "-o", str(tmp_path / "t"), "--backend", "torch", "--weights", "int4"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--weights quantizes the ort backend's MatMul weights" in err
    # an fp16 export: the same graph files with the manifest's precision fp16 (refused before the graph is read)
    exp16 = tmp_path / "exp16"
    shutil.copytree(built["graph"].parent, exp16)
    manifest = json.loads((exp16 / "model.eigen.json").read_text())
    (exp16 / "model.eigen.json").write_text(json.dumps({**manifest, "precision": "fp16"}))
    capsys.readouterr()
    assert main(["build", str(exp16 / "model.onnx"), "-o", str(tmp_path / "e16"), "--weights", "int4"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "quantizes fp32 weights" in err and "without --dtype fp16" in err
    assert not (tmp_path / "e16").exists() and not list(tmp_path.glob(".e16*"))  # no engine, no staging left
