"""The Optimum peer runner (engines/peer.py) and `bench --peer`, without optimum installed.

The peer graph is built here the way Optimum's `text-generation-with-past` graphs look: a
tiny HF llama's weights, I/O input_ids, attention_mask, position_ids,
past_key_values.{i}.key|value -> logits, present.{i}.key|value, and a cache that grows by
concatenation; exported with the TorchScript exporter, as optimum-onnx 0.1.0 does.
"""

import json
import math
import warnings

import numpy as np
import pytest
import torch
from tiny_models import export_tiny, tiny_model
from torch import nn

from eigenkv.cli import main
from eigenkv.engines.peer import PeerEngine
from eigenkv.engines.runtime import greedy
from eigenkv.errors import EigenError


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin


class ConcatCacheLlama(nn.Module):
    """forward(input_ids [B, S], attention_mask [B, P+S], position_ids [B, S], *past [B, Hkv, P, D])
    -> (logits [B, S, V], *present [B, Hkv, P+S, D]), over a HF llama's own modules."""

    def __init__(self, model):
        super().__init__()
        self.model, cfg = model, model.config
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        theta = cfg.rope_parameters["rope_theta"]
        self.register_buffer("inv_freq", 1.0 / theta ** (torch.arange(0, self.head_dim, 2).float() / self.head_dim))

    def forward(self, input_ids, attention_mask, position_ids, *past):
        body, (batch, seq) = self.model.model, input_ids.shape
        x = body.embed_tokens(input_ids)
        angles = position_ids[..., None].float() * self.inv_freq
        cos, sin = (f(torch.cat([angles, angles], -1))[:, None] for f in (torch.cos, torch.sin))
        keys_at = torch.arange(attention_mask.shape[1])
        allowed = (keys_at[None, None] <= position_ids[..., None]) & attention_mask[:, None].bool()
        bias = torch.where(allowed, 0.0, torch.finfo(x.dtype).min)[:, None]  # [B, 1, S, P+S]
        presents = []
        for i, layer in enumerate(body.layers):
            attn, h = layer.self_attn, layer.input_layernorm(x)
            q, k, v = (proj(h).view(batch, seq, -1, self.head_dim).transpose(1, 2)
                       for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
            k = torch.cat([past[2 * i], _rotate(k, cos, sin)], 2)
            v = torch.cat([past[2 * i + 1], v], 2)
            presents += [k, v]
            rep = self.heads // self.kv_heads
            scores = _rotate(q, cos, sin) @ k.repeat_interleave(rep, 1).transpose(-1, -2) / math.sqrt(self.head_dim)
            out = torch.softmax(scores + bias, -1) @ v.repeat_interleave(rep, 1)
            x = x + attn.o_proj(out.transpose(1, 2).reshape(batch, seq, -1))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return (self.model.lm_head(body.norm(x)), *presents)


def export_peer(model, folder, source_hash=None):
    """folder/model.onnx with Optimum's I/O names (+ peer.json when source_hash is given)."""
    folder.mkdir(parents=True, exist_ok=True)
    n, cfg = model.config.num_hidden_layers, model.config
    hd = cfg.hidden_size // cfg.num_attention_heads
    batch, seq, past_len = 2, 3, 4
    past = [torch.randn(batch, cfg.num_key_value_heads, past_len, hd) for _ in range(2 * n)]
    inputs = (torch.randint(0, cfg.vocab_size, (batch, seq)), torch.ones(batch, past_len + seq, dtype=torch.int64),
              torch.arange(past_len, past_len + seq).expand(batch, seq).contiguous(), *past)
    past_names = [f"past_key_values.{i}.{k}" for i in range(n) for k in ("key", "value")]
    present_names = [f"present.{i}.{k}" for i in range(n) for k in ("key", "value")]
    axes = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "total"},
            "position_ids": {0: "batch", 1: "seq"}, "logits": {0: "batch", 1: "seq"},
            **{name: {0: "batch", 2: "past"} for name in past_names},
            **{name: {0: "batch", 2: "total"} for name in present_names}}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(ConcatCacheLlama(model).eval(), inputs, str(folder / "model.onnx"), dynamo=False,
                          input_names=["input_ids", "attention_mask", "position_ids", *past_names],
                          output_names=["logits", *present_names], dynamic_axes=axes, opset_version=18)
    if source_hash is not None:
        (folder / "peer.json").write_text(json.dumps({"source_hash": source_hash, "source_model": "tiny"}))
    return folder


@torch.no_grad()
def _torch_greedy(model, ids: np.ndarray, steps: int) -> np.ndarray:
    """HF model, no cache (the whole sequence every step): [B, S] -> [B, steps]."""
    seq = torch.from_numpy(ids)
    for _ in range(steps):
        seq = torch.cat([seq, model(seq).logits[:, -1].argmax(-1, keepdim=True)], 1)
    return seq[:, ids.shape[1]:].numpy()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("peer")
    model = tiny_model("llama")
    return model, export_peer(model, root / "peer")


def test_peer_greedy_matches_torch_one_go_and_chunked(tiny):
    model, folder = tiny
    engine = PeerEngine(folder)
    layout = engine.layout
    assert (layout.n_layers, layout.n_kv_heads, layout.head_dim, engine.vocab_size) == (3, 2, 16, 256)
    ids = np.random.default_rng(0).integers(0, 256, size=(2, 7))
    expected = _torch_greedy(model, ids, 12)
    assert (greedy(engine, ids, 12) == expected).all()
    assert (greedy(engine, ids, 12, chunk=3) == expected).all()  # prefill 3 + 3 + 1 tokens through the past
    with torch.no_grad():
        ref = model(torch.from_numpy(ids)).logits.numpy()
    cache = engine.new_cache(2)
    logits = engine.step(cache, ids, np.broadcast_to(np.arange(7), (2, 7)))
    assert np.abs(logits - ref).max() < 1e-4
    assert cache.length == 7 and cache.nbytes == 2 * 3 * 2 * 2 * 7 * 16 * 4  # kinds, layers, B, Hkv, S, D, fp32
    with pytest.raises(EigenError, match="cannot evict"):
        cache.keep(0, 0, np.zeros((2, 1), np.int64))


def test_peer_refuses_what_is_not_an_optimum_decoder(tiny, tmp_path):
    with pytest.raises(EigenError, match="has no model.onnx"):
        PeerEngine(tmp_path)
    import onnx
    from onnx import TensorProto, helper
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(graph), str(tmp_path / "model.onnx"))
    with pytest.raises(EigenError, match="not an Optimum text-generation-with-past decoder"):
        PeerEngine(tmp_path)
    (tmp_path / "peer.json").write_text("{")
    with pytest.raises(EigenError, match="peer.json is corrupt"):
        PeerEngine(tmp_path)


def test_bench_with_peer_writes_peer_columns(tiny, tmp_path, monkeypatch):
    import importlib.util

    import eigenkv.engines.bench as bench_module
    from eigenkv.exporter.sources import model_hash, resolve_model
    raw = {}  # (engine, context) -> (decode step seconds, KV bytes read per step) as timed
    real_summary = bench_module.Point.summary

    def summary(self):
        raw[(self.engine, self.context)] = (list(self.step_s), list(self.read_bytes))
        return real_summary(self)

    monkeypatch.setattr(bench_module.Point, "summary", summary)
    model, _ = tiny
    (tmp_path / "calib.txt").write_text("The quick brown fox jumps over the lazy dog. " * 40)
    onnx_path = tmp_path / "exp" / "model.onnx"
    assert export_tiny(tmp_path, "llama", onnx_path, "--no-compress", "--max-seq-len", "64",
                       "--decode-steps", "2") == 0
    engine = tmp_path / "engine"
    assert main(["build", str(onnx_path), "-o", str(engine)]) == 0
    peer = export_peer(model, tmp_path / "peer", source_hash=model_hash(resolve_model(str(tmp_path / "llama"))))
    out = tmp_path / "bench"
    args = ["bench", str(engine), "--baseline", str(engine), "--peer", str(peer), "--peer", str(peer), "--contexts", "8,16",
            "--batches", "2", "--decode-tokens", "3", "--warmup", "0", "--repeats", "1", "--prefill-chunk", "5",
            "--out", str(out), "--no-progress"]
    assert main(args) == 0
    result = json.loads((out / "bench.json").read_text())
    assert result["engines"]["optimum"] == result["engines"]["optimum #2"] == str(peer)  # named by label
    by = {(p["engine"], p["context"]): p for p in result["points"]}
    assert len(result["points"]) == 4 * 2 and set(raw) == set(by)
    width = 3 * 2 * (16 + 16) * 4  # KV bytes per slot: layers, KV heads, key + value head_dim, fp32 (all full width)
    for (name, ctx), p in by.items():
        steps_ms, reads = np.array(raw[(name, ctx)][0]) * 1e3, raw[(name, ctx)][1]
        assert p["batch"] == 2 and p["decode_steps_timed"] == steps_ms.size == 3 and p["prefill_ms_median"] > 0
        assert 0 < p["decode_ms_p50"] <= p["decode_ms_p90"]  # percentiles of the timed steps (3 decimals):
        assert steps_ms.min() - 5e-4 <= p["decode_ms_p50"] and p["decode_ms_p90"] <= steps_ms.max() + 5e-4
        assert p["tokens_per_s"] == pytest.approx(2 * 1e3 / steps_ms.mean(), abs=0.0051)  # 2 decimals
        # decode step t reads the ctx + t cached slots and its own new token, both sequences, every layer
        per_step = [2 * (ctx + t + 1) * width for t in range(3)]
        assert reads == per_step and p["kv_bytes_read_per_step"] == 2 * (ctx + 2) * width  # their mean
        gb_per_s = np.mean(np.array(per_step) / (steps_ms / 1e3)) / 1e9
        assert p["kv_read_gb_per_s"] == pytest.approx(gb_per_s, abs=5.1e-4)  # 3 decimals
        # ours preallocate prompt + decode tokens + 1 slots; the peer's cache grew to prompt + 3 decode tokens
        assert p["kv_bytes"] == 2 * (ctx + 3 + (not name.startswith("optimum"))) * width
    text = (out / "bench.md").read_text()
    assert text.startswith("Command: `eigenkv bench ")  # each result says how it was made
    table = [line for line in text.splitlines() if line.startswith("|")]
    assert "speed-up vs optimum |" in table[0] and "speed-up vs optimum #2 |" in table[0]
    assert table[0].count("|") == table[1].count("|") == table[2].count("|") == 11 + 2 * 4
    if importlib.util.find_spec("matplotlib") is not None:
        assert (out / "bench.png").read_bytes()[:4] == b"\x89PNG"
    (peer / "peer.json").write_text(json.dumps({"source_hash": "0" * 64, "source_model": "other"}))
    assert main(args) == 2  # another checkpoint: refused


def test_peer_registry_says_what_it_accepts(tiny, tmp_path):
    from eigenkv.engines.peer import load_peer
    _, folder = tiny
    assert load_peer(folder).label == "optimum"
    with pytest.raises(EigenError, match="no such file or folder"):
        load_peer(tmp_path / "missing")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(EigenError, match="not another eigenkv engine directory .*, an Optimum export folder .*, "
                                         "an onnxruntime-genai folder .* or a GGUF"):
        load_peer(tmp_path / "notes.txt")


def test_an_eigenkv_engine_directory_is_a_peer(tmp_path):
    """`--peer ENGINE_DIR`: another engine of the checkpoint (here the same export with int8 weights)
    is timed beside the two under test, labelled by folder, backend and weights; the Optimum module
    does not claim it (its folder holds a model.onnx too)."""
    from eigenkv.engines import peer as optimum_peer
    from eigenkv.engines import peer_eigenkv
    from eigenkv.engines.peer import load_peer
    (tmp_path / "calib.txt").write_text("The quick brown fox jumps over the lazy dog. " * 40)
    onnx_path = tmp_path / "exp" / "model.onnx"
    assert export_tiny(tmp_path, "llama", onnx_path, "--no-compress", "--max-seq-len", "64", "--decode-steps", "2") == 0
    assert main(["build", str(onnx_path), "-o", str(tmp_path / "fp32")]) == 0
    assert main(["build", str(onnx_path), "-o", str(tmp_path / "w8"), "--weights", "int8"]) == 0
    assert peer_eigenkv.accepts(tmp_path / "w8") and not optimum_peer.accepts(tmp_path / "w8")
    assert not peer_eigenkv.accepts(tmp_path / "exp")  # an export folder is no engine
    engine = load_peer(tmp_path / "w8")
    assert engine.label == "eigenkv w8 (ort, int8)" and load_peer(tmp_path / "fp32").label == "eigenkv fp32 (ort, fp32)"
    out = tmp_path / "bench"
    assert main(["bench", str(tmp_path / "fp32"), "--baseline", str(tmp_path / "fp32"), "--peer", str(tmp_path / "w8"),
                 "--contexts", "8", "--batches", "1", "--decode-tokens", "2", "--warmup", "0", "--repeats", "1",
                 "--out", str(out), "--no-progress"]) == 0
    result = json.loads((out / "bench.json").read_text())
    assert result["engines"]["eigenkv w8 (ort, int8)"] == str(tmp_path / "w8")
    assert {p["engine"] for p in result["points"]} == {"compressed", "baseline", "eigenkv w8 (ort, int8)"}
    assert result["weights"] == {"compressed": "graph", "baseline": "graph", "eigenkv w8 (ort, int8)": "int8"}
