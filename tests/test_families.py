"""The families added after llama/qwen2/opt/mpt (qwen3: QK-norm; phi3: fused qkv_proj, longrope;
gemma3_text: QK-norm, post norms, local sliding-window layers with their own RoPE base) and
sliding-window layers (mistral with a window) against transformers itself: the decoder, full-rank
folds in every RoPE mode, and the exported ONNX graph through ONNX Runtime, prefill logits and 32
greedy tokens, with prompts longer than the window; local layers' caches stay at their window."""

import pytest
import torch
from tiny_models import QK_NORM_FAMILIES, export_tiny, tiny_config, tiny_model

from eigenkv.errors import EigenError
from eigenkv.exporter.calibrate import calibrate
from eigenkv.exporter.decoder import decoder_from_hf
from eigenkv.exporter.decompose import decompose
from eigenkv.exporter.fold import fold

NEW_FAMILIES = ("qwen3", "phi3", "gemma3_text", "mistral-window")
WINDOW = 8  # tiny_models: gemma3_text local layers and mistral-window
TOL = 1e-4  # max |logit diff| vs transformers, float32
TEXT = "The quick brown fox jumps over the lazy dog. " * 20


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    (root / "calib.txt").write_text(TEXT)
    return root


def _ids(seed: int, batch: int = 2, seq: int = 20) -> torch.Tensor:
    return torch.randint(3, 256, (batch, seq), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _greedy_transformers(model, ids: torch.Tensor, n: int) -> list[int]:
    """n greedy tokens by full forwards of transformers' own model (no cache involved)."""
    out = ids.clone()
    for _ in range(n):
        out = torch.cat([out, model(out).logits[:, -1:].argmax(-1)], dim=1)
    return out[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("family", NEW_FAMILIES)
@pytest.mark.parametrize("rope_mode", ["pre", "joint"])
@torch.no_grad()
def test_full_rank_fold_equals_transformers(family, rope_mode):
    model = tiny_model(family)
    decoder = decoder_from_hf(model)
    stats = calibrate(decoder, _ids(5, 4, 48), progress=False)
    d, n = decoder.dims.head_dim, decoder.dims.n_layers
    if family in ("gemma3_text", "mistral-window"):
        assert any(layer.attn.window == WINDOW for layer in decoder.layers)
    folded = fold(decoder, decompose(stats, True, rope_mode), [d] * n, [d] * n, rope_mode)
    ids = _ids(7)
    ref = model(ids).logits
    assert float((decoder(ids) - ref).abs().max()) <= TOL
    assert float((folded(ids) - ref).abs().max()) <= TOL
    if family in QK_NORM_FAMILIES and rope_mode == "pre":
        attn = folded.layers[0].attn  # keys are normalised at full width, then projected
        assert attn.k_norm is not None and attn.key_down.shape == (attn.n_kv_heads, d, d)
        assert attn.k_proj.out_features == attn.n_kv_heads * d
    half = fold(decoder, decompose(stats, True, rope_mode), [d // 2] * n, [d // 2] * n, rope_mode)
    assert float((half(ids) - ref).abs().max()) > 10 * TOL  # the fold is not a no-op


@pytest.mark.parametrize("family", NEW_FAMILIES)
@torch.no_grad()
def test_onnxruntime_full_rank_matches_transformers_prefill_and_32_greedy(family, workdir):
    """Full-rank pre mode through the exported graph (qwen3: W_k, k_norm, then key_down in the
    graph) and the uncompressed baseline graph, each against transformers."""
    from eigenkv.engines.ort import OrtEngine
    from eigenkv.engines.runtime import generate
    from eigenkv.manifest import read_manifest
    model = tiny_model(family)
    config = tiny_config(family)
    d = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    ids = _ids(21, batch=1)  # 20 tokens: longer than the window
    ref_logits = model(ids).logits
    ref_tokens = _greedy_transformers(model, ids, 32)
    for name, extra in (("full", ("--key-rank", str(d), "--value-rank", str(d), "--rope-mode", "pre")),
                        ("base", ("--no-compress",))):
        out = workdir / f"{family}-{name}" / "model.onnx"
        assert export_tiny(workdir, family, out, "--max-seq-len", "64", *extra) == 0
        m = read_manifest(out)
        engine = OrtEngine(out, m.layout, m.io, m.precision)
        logits = engine.step(engine.new_cache(1, 64), ids.numpy(), torch.arange(20)[None].numpy())
        assert float((torch.from_numpy(logits) - ref_logits).abs().max()) <= TOL, name
        assert generate(engine, [ids[0].tolist()], 32)[0] == ref_tokens, name
        if name == "full" and family in QK_NORM_FAMILIES:  # built engines: ORT (fused rewrite; gemma3's
            # windowed layers keep the function) and torch (the folded model, key_down included)
            from eigenkv.cli import main
            from eigenkv.engines.backend import load_engine
            for backend in ("ort", "torch"):
                assert main(["build", str(out), "-o", str(out.parent / backend), "--backend", backend]) == 0
                built = load_engine(out.parent / backend)
                assert generate(built, [ids[0].tolist()], 32)[0] == ref_tokens, backend


@torch.no_grad()
def test_phi3_longrope_stays_where_its_tables_match():
    """longrope switches tables past original_max_position_embeddings: the decoder stops there
    and matches transformers (short factors) on any sequence up to it."""
    import transformers as tf
    d = 16
    config = tiny_config("phi3").to_dict()
    config.update(max_position_embeddings=256, original_max_position_embeddings=64,
                  rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                                   "short_factor": [1.0 + 0.1 * i for i in range(d // 2)],
                                   "long_factor": [2.0 + 0.5 * i for i in range(d // 2)]})
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(tf.Phi3Config(**config), attn_implementation="eager").eval()
    decoder = decoder_from_hf(model)
    assert decoder.dims.max_positions == 64 and decoder.rope.cos.shape[0] == 64
    for seq in (9, 64):
        ids = _ids(3, seq=seq)
        assert float((decoder(ids) - model(ids).logits).abs().max()) <= TOL, seq


def test_partial_rotary_is_refused_in_one_line():
    import transformers as tf
    config = tiny_config("phi3")
    config.rope_parameters["partial_rotary_factor"] = 0.5
    model = tf.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with pytest.raises(EigenError, match=r"^phi3: partial rotary embeddings \(partial_rotary_factor=0.5\)") as e:
        decoder_from_hf(model)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("family", ["gemma3_text", "mistral-window"])
@torch.no_grad()
def test_sliding_window_cache_stays_at_the_window(family, workdir):
    """Generating 40 tokens past a 20-token prompt in prefill chunks of 4 (rank-reduced export):
    each local layer's buffer holds W - 1 + 4 slots whatever the context (bytes checked), global
    layers the whole context, and the tokens equal the folded torch model's (which attends to the
    whole sequence with the window mask, no cache)."""
    from eigenkv.engines.ort import OrtEngine
    from eigenkv.engines.runtime import generate
    from eigenkv.manifest import read_manifest
    from tiny_models import folded_for_manifest
    out = workdir / f"{family}-half" / "model.onnx"
    assert export_tiny(workdir, family, out, "--max-seq-len", "64", "--kv-ratio", "0.5") == 0
    m = read_manifest(out)
    windows = [m.layout.window(i) for i in range(m.layout.n_layers)]
    assert WINDOW in windows
    engine = OrtEngine(out, m.layout, m.io, m.precision)
    import json
    manifest = json.loads((out.parent / "model.eigen.json").read_text())
    folded = folded_for_manifest(workdir, family, manifest, out).with_max_positions(64)
    ids = _ids(33, batch=1)
    seen = []
    for n_new in (24, 40):  # two contexts: local buffers the same size
        caches = []
        tokens = generate(engine, [ids[0].tolist()], n_new, prefill_chunk=4, on_cache=caches.append)[0]
        cache = caches[-1]
        assert _greedy_transformers(lambda x: type("R", (), {"logits": folded(x)}), ids, n_new) == tokens
        caps = cache.capacities
        for i, w in enumerate(windows):
            assert caps[i] == (w - 1 + 4 if w else 20 + n_new), (i, caps)
            per_slot = cache.layout.n_kv_heads * (cache.layout.key_ranks[i] + cache.layout.value_ranks[i]) * 4
            assert cache.buffers[2 * i].nbytes + cache.buffers[2 * i + 1].nbytes == caps[i] * per_slot
            if w:  # slid: the newest positions in order, the oldest tokens dropped
                held = cache.positions(i)[0, :, : cache.lengths[i, 0]]
                assert (held == held[:, :1] + range(held.shape[1])).all() and held.min() > 0
                assert held.max() == 20 + n_new - 2  # the last token fed back
        seen.append([caps[i] for i, w in enumerate(windows) if w])
    assert seen[0] == seen[1]
