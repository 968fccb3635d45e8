"""The llama.cpp peer (engines/peer_llamacpp.py, tools/llamacpp_peer.py).

Always run: accepts() on paths, the tool's --help, load()'s one-line error without llama_cpp,
the f32 de-quantizer. With llama-cpp-python importable (CI does not have it: the tool builds
it, about 10 minutes): a tiny random llama written as an f32 GGUF runs through the peer and
matches transformers in float64 (step logits within LOGIT_ATOL, greedy tokens identical).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from eigenkv.engines import peer_llamacpp
from eigenkv.errors import EigenError

REPO = Path(__file__).resolve().parent.parent
TOOL = REPO / "tools" / "llamacpp_peer.py"
HAVE_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None
needs_llama_cpp = pytest.mark.skipif(not HAVE_LLAMA_CPP, reason="llama-cpp-python is not installed (a tool, not a "
                                     "dependency: `python tools/llamacpp_peer.py --install-only` builds it, ~10 min)")
# llama.cpp computes in float32 (F32 weights and KV cache, flash attention off: the peer's
# setting for an all-F32 model); the reference is float64. The tiny model's logits are below 1;
# measured max |diff| 1.1e-7 (AVX-512 machine), the bound leaves room for other CPUs' kernels
# and sum orders.
LOGIT_ATOL = 1e-5


# ---- always run ----------------------------------------------------------------------------

def test_accepts_gguf_files_and_peer_folders(tmp_path):
    gguf_file = tmp_path / "m.gguf"
    gguf_file.write_bytes(b"GGUF")
    (tmp_path / "m.bin").write_bytes(b"")
    assert peer_llamacpp.accepts(gguf_file)
    assert not peer_llamacpp.accepts(tmp_path / "m.bin")
    assert not peer_llamacpp.accepts(tmp_path / "missing.gguf")
    folder = tmp_path / "peer"
    folder.mkdir()
    assert not peer_llamacpp.accepts(folder)  # no peer.json
    (folder / "peer.json").write_text(json.dumps({"kind": "optimum"}))
    assert not peer_llamacpp.accepts(folder)
    (folder / "peer.json").write_text("{not json")
    assert not peer_llamacpp.accepts(folder)
    (folder / "peer.json").write_text(json.dumps({"kind": "llama.cpp", "default_file": "model-f32.gguf"}))
    assert peer_llamacpp.accepts(folder)
    assert peer_llamacpp.NAME == "llama.cpp"


def test_tool_help_needs_no_llama_cpp():
    code = ("import runpy, sys; sys.modules['llama_cpp'] = None; sys.argv = ['llamacpp_peer.py', '--help']; "
            f"runpy.run_path({str(TOOL)!r}, run_name='__main__')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "llama-cpp-python" in out.stdout and "--install-only" in out.stdout


def test_load_without_llama_cpp_is_one_line(tmp_path, monkeypatch):
    gguf_file = tmp_path / "m.gguf"
    gguf_file.write_bytes(b"GGUF")
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp now raises ImportError
    with pytest.raises(EigenError) as e:
        peer_llamacpp.load(gguf_file)
    assert "\n" not in str(e.value) and "tools/llamacpp_peer.py" in str(e.value)
    with pytest.raises(EigenError, match="no such GGUF"):
        peer_llamacpp.load(tmp_path / "missing.gguf")
    folder = tmp_path / "peer"
    folder.mkdir()
    with pytest.raises(EigenError, match="not a llama.cpp peer folder"):
        peer_llamacpp.load(folder)


def _tool():
    sys.path.insert(0, str(TOOL.parent))
    try:
        import llamacpp_peer
    finally:
        sys.path.remove(str(TOOL.parent))
    return llamacpp_peer


def test_f32_gguf_is_the_dequantized_source(tmp_path):
    """write_f32_gguf on a small quantized GGUF: every tensor equals gguf.dequantize of the
    source, in F32, metadata identical but the file type."""
    import gguf
    rng = np.random.default_rng(0)
    src, dst = tmp_path / "q.gguf", tmp_path / "f.gguf"
    w = gguf.GGUFWriter(src, "llama")
    w.add_block_count(1)
    w.add_file_type(int(gguf.LlamaFileType.MOSTLY_Q8_0))
    w.add_array("tokenizer.ggml.tokens", ["a", "b"])
    x = rng.standard_normal((4, 64)).astype(np.float32)
    q = gguf.quantize(x, gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("blk.0.attn_q.weight", q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("blk.0.attn_norm.weight", x[0])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    made = _tool().write_f32_gguf(src, dst)
    assert made["source_tensor_types"] == {"Q8_0": 1, "F32": 1}
    a, b = gguf.GGUFReader(src), gguf.GGUFReader(dst)
    assert [t.tensor_type.name for t in b.tensors] == ["F32", "F32"]
    for s, d in zip(a.tensors, b.tensors):
        assert s.name == d.name and list(s.shape) == list(d.shape)
        assert np.array_equal(gguf.dequantize(s.data, s.tensor_type), d.data)
    assert b.get_field("general.file_type").contents() == int(gguf.LlamaFileType.ALL_F32)
    assert b.get_field("tokenizer.ggml.tokens").contents() == ["a", "b"]


# ---- with llama-cpp-python -------------------------------------------------------------------

def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """HF q/k rows (rotate-half RoPE) -> GGUF llama order (interleaved pairs), as llama.cpp's
    convert_hf_to_gguf.py does."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(model, path: Path) -> Path:
    """A transformers LlamaForCausalLM (untied, no biases) -> an all-F32 GGUF llama.cpp runs, with
    a placeholder vocabulary ("no_vocab": ids only)."""
    import gguf
    c = model.config
    head_dim = c.hidden_size // c.num_attention_heads
    rope = getattr(c, "rope_parameters", None) or {}
    w = gguf.GGUFWriter(path, "llama")
    w.add_name("tiny-llama")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(float(rope.get("rope_theta", getattr(c, "rope_theta", 10000.0))))
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    w.add_file_type(int(gguf.LlamaFileType.ALL_F32))
    w.add_tokenizer_model("no_vocab")
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.add_tensor("output.weight", sd["lm_head.weight"])
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        names = {"attn_norm": "input_layernorm", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
                 "ffn_norm": "post_attention_layernorm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                 "ffn_down": "mlp.down_proj"}
        w.add_tensor(f"blk.{i}.attn_q.weight", _permute(sd[p + "self_attn.q_proj.weight"], c.num_attention_heads))
        w.add_tensor(f"blk.{i}.attn_k.weight", _permute(sd[p + "self_attn.k_proj.weight"], c.num_key_value_heads))
        for ours, theirs in names.items():
            w.add_tensor(f"blk.{i}.{ours}.weight", np.ascontiguousarray(sd[p + theirs + ".weight"]))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny_peer(tmp_path_factory):
    from tiny_models import tiny_model
    model = tiny_model("llama")
    path = write_tiny_gguf(model, tmp_path_factory.mktemp("llamacpp") / "tiny-f32.gguf")
    return model.double(), path


@needs_llama_cpp
def test_tiny_llama_matches_transformers_float64(tiny_peer):
    from eigenkv.engines.runtime import prefill
    model, path = tiny_peer
    engine = peer_llamacpp.load(path, threads=2)
    assert engine.vocab_size == 256 and engine.max_positions == 128 and engine.precision == "fp32"
    assert (engine.kv_type, engine.flash_attn) == ("f32", "off")
    assert engine.label.startswith("llama.cpp ") and engine.label.endswith(" f32") and engine.source_hash is None
    assert (engine.layout.n_layers, engine.layout.n_kv_heads, engine.layout.head_dim) == (3, 2, 16)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 256, size=(2, 40), dtype=np.int64)
    with torch.no_grad():
        ref = model(torch.from_numpy(ids)).logits.numpy()  # [B, S, V] float64
    cache = engine.new_cache(2, 48)
    got = [engine.step(cache, ids[:, :25], np.broadcast_to(np.arange(25), (2, 25)))]
    cache.advance(np.full(2, 25))
    for t in range(25, 40):  # then one token per step
        got.append(engine.step(cache, ids[:, t:t + 1], np.full((2, 1), t)))
        cache.advance(np.ones(2, np.int64))
    got = np.concatenate(got, axis=1)
    assert got.shape == (2, 40, 256) and got.dtype == np.float32
    assert np.abs(got - ref).max() < LOGIT_ATOL
    # chunked prefill through the runtime gives the same last-token logits
    last = prefill(engine, engine.new_cache(2, 48), ids, np.full(2, 40), chunk=7)
    assert np.abs(last - ref[:, -1]).max() < LOGIT_ATOL
    assert cache.nbytes == 2 * 3 * 2 * 256 * 2 * 16 * 4  # K+V, layers, B, cells (48 -> 256), Hkv, D, f32


@needs_llama_cpp
def test_tiny_llama_greedy_identical(tiny_peer):
    from eigenkv.engines.runtime import greedy
    model, path = tiny_peer
    engine = peer_llamacpp.load(path, threads=1)
    ids = np.random.default_rng(1).integers(0, 256, size=(3, 12), dtype=np.int64)
    with torch.no_grad():
        want = model.generate(torch.from_numpy(ids), attention_mask=torch.ones_like(torch.from_numpy(ids)),
                              max_new_tokens=10, do_sample=False, pad_token_id=0)[:, 12:].numpy()
    assert (greedy(engine, ids, 10) == want).all()
    assert (greedy(engine, ids[:1], 10) == want[:1]).all()  # a new context for another batch size


@needs_llama_cpp
def test_refusals_are_one_line(tiny_peer, tmp_path):
    from eigenkv.engines.runtime import generate
    _, path = tiny_peer
    engine = peer_llamacpp.load(path)
    cache = engine.new_cache(2, 16)
    with pytest.raises(EigenError, match="contiguous positions"):
        engine.step(cache, np.zeros((2, 3), np.int64), np.array([[0, 1, 2], [1, 2, 3]]))
    with pytest.raises(EigenError, match="token ids"):
        engine.step(cache, np.full((2, 1), 256), np.zeros((2, 1), np.int64))
    with pytest.raises(EigenError, match="cannot evict"):
        cache.keep(0, 0, np.zeros((2, 1), np.int64))
    with pytest.raises(EigenError, match="equal-length"):
        generate(engine, [[1, 2, 3], [4, 5]], 2)
    old = engine.new_cache(1, 8)
    engine.new_cache(1, 8)
    with pytest.raises(EigenError, match="stale"):
        engine.step(old, np.zeros((1, 1), np.int64), np.zeros((1, 1), np.int64))
    fresh = engine.new_cache(1, 8)
    with pytest.raises(EigenError, match="full"):
        engine.step(fresh, np.zeros((1, 300), np.int64), np.arange(300)[None])
    with pytest.raises(EigenError, match="max_seq_len"):
        engine.new_cache(1, 129)
    with pytest.raises(EigenError, match="llama.cpp cannot load"):
        bad = tmp_path / "bad.gguf"
        bad.write_bytes(b"GGUF not really")
        peer_llamacpp.load(bad)


@needs_llama_cpp
def test_source_hash_from_peer_json(tiny_peer, tmp_path):
    _, path = tiny_peer
    link = tmp_path / "model-f32.gguf"
    link.symlink_to(path)
    (tmp_path / "peer.json").write_text(json.dumps({"kind": "llama.cpp", "source_hash": "ab" * 32,
                                                    "default_file": "model-f32.gguf",
                                                    "files": {"model-f32.gguf": {}}}))
    assert peer_llamacpp.load(link).source_hash == "ab" * 32
    assert peer_llamacpp.load(tmp_path).path == link  # the folder loads its default file
    assert peer_llamacpp.load(path).source_hash is None  # no peer.json beside it
