"""Slots that move: `KVCache.keep` on the ORT engine vs a float64 torch reference that attends only
to the kept tokens at their original positions, in `pre` and rank-space (`joint`) modes."""

import copy
import json

import numpy as np
import pytest
import torch
from tiny_models import export_tiny, folded_for_manifest

from eigenkv.cli import main
from eigenkv.engines.backend import load_engine
from eigenkv.engines.runtime import prefill

TEXT = "The quick brown fox jumps over the lazy dog. " * 80
PROMPT = 21
TOL = 2e-5  # max |logit diff| fp32 engine vs float64 reference (tiny models: logits ~1)


@pytest.fixture(scope="module", params=["pre", "joint"])
def mode(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"moves-{request.param}")
    (root / "calib.txt").write_text(TEXT)
    out = root / "exp" / "model.onnx"
    assert export_tiny(root, "llama", out, "--kv-ratio", "0.5", "--rope-mode", request.param,
                       "--max-seq-len", "64", "--decode-steps", "4") == 0
    assert main(["build", str(out), "-o", str(root / "engine")]) == 0
    manifest = json.loads((out.parent / "model.eigen.json").read_text())
    assert manifest["rope_mode"] == request.param
    folded = copy.deepcopy(folded_for_manifest(root, "llama", manifest, out).with_max_positions(64)).double()
    return load_engine(root / "engine"), folded


def _prompt(seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(2, PROMPT))


@torch.no_grad()
def _reference_next_logits(folded, prompt, kept, token, position):
    """Full float64 prefill, then a cache holding only `kept` (per layer: [B, Hkv, k] original
    positions) at those positions, then one decode step -> logits [B, V]."""
    full = folded.new_cache(2, PROMPT, dtype=torch.float64)
    folded(torch.from_numpy(prompt), torch.arange(PROMPT).expand(2, -1), full)
    ranks = [k.shape[-1] for k in full.keys], [v.shape[-1] for v in full.values]
    small = folded.new_cache(2, PROMPT + 1, dtype=torch.float64)
    for i, idx in enumerate(kept):
        idx_t = torch.from_numpy(idx).long()
        k = idx_t.shape[-1]
        small.keys[i][:, :, :k] = full.keys[i].gather(2, idx_t[..., None].expand(-1, -1, -1, ranks[0][i]))
        small.values[i][:, :, :k] = full.values[i].gather(2, idx_t[..., None].expand(-1, -1, -1, ranks[1][i]))
        small.positions[i][:, :, :k] = idx_t.to(torch.int32)  # slot index = position in the full prefill
        small.lengths[i] = k
    tokens = torch.from_numpy(token)[:, None]
    return folded(tokens, torch.from_numpy(position)[:, None], small)[:, -1]


def test_keep_random_slots_matches_float64_reference(mode):
    engine, folded = mode
    rng = np.random.default_rng(3)
    prompt = _prompt()
    cache = engine.new_cache(2, PROMPT + 1)
    last = prefill(engine, cache, prompt, np.full(2, PROMPT), PROMPT)
    kept = []
    for layer in range(engine.layout.n_layers):
        k = int(rng.integers(3, PROMPT))  # a different count per layer, the same for each head
        idx = np.stack([np.stack([rng.permutation(PROMPT)[:k] for _ in range(2)]) for _ in range(2)])  # [B, Hkv, k]
        for seq in range(2):
            cache.keep(layer, seq, idx[seq])  # any order: positions travel with their slots
        kept.append(idx)
        assert (cache.lengths[layer] == k).all()
        assert (cache.positions(layer)[:, :, :k] == idx).all()
    token, position = last.argmax(-1), np.full(2, PROMPT)
    logits = engine.step(cache, token[:, None], position[:, None])[:, 0]
    ref = _reference_next_logits(folded, prompt, kept, token, position)
    assert np.abs(logits - ref.numpy()).max() <= TOL


def test_keep_everything_in_order_changes_no_bit(mode):
    engine, _ = mode
    prompt = _prompt(1)
    results = []
    for moved in (False, True):
        cache = engine.new_cache(2, PROMPT + 1)
        last = prefill(engine, cache, prompt, np.full(2, PROMPT), 8)
        if moved:
            for layer in range(engine.layout.n_layers):
                for seq in range(2):
                    cache.keep(layer, seq, np.tile(np.arange(PROMPT), (2, 1)))
        results.append(engine.step(cache, last.argmax(-1)[:, None], np.full((2, 1), PROMPT)))
    assert np.array_equal(results[0], results[1])


def test_keep_refuses_slots_outside_the_valid_ones(mode):
    from eigenkv.errors import EigenError
    engine, _ = mode
    cache = engine.new_cache(1, 8)
    cache.lengths[0, 0] = 4
    with pytest.raises(EigenError, match="slot indices must be in 0..3"):
        cache.keep(0, 0, np.array([[0, 4], [1, 2]]))


def test_host_write_positions_equals_the_per_layer_loop():
    """HostKVCache writes a step's positions to every layer in one scatter; it must land exactly where
    the generic per-layer, per-sequence loop (KVCache.write_positions) puts them, with uneven
    capacities and lengths per layer, and refuse an overflow the same way."""
    from eigenkv.engines.backend import HostKVCache, KVCache
    from eigenkv.errors import EigenError
    from eigenkv.manifest import KVLayout
    rng = np.random.default_rng(7)
    layout = KVLayout(n_layers=4, n_kv_heads=3, head_dim=8, key_ranks=(8, 4, 8, 2), value_ranks=(8, 8, 4, 2),
                      max_seq_len=64)
    caps = [16, 9, 12, 20]
    fast, slow = (HostKVCache(layout, 2, caps, "fp32") for _ in range(2))
    for step, seq in enumerate((5, 1, 3)):
        lengths = np.stack([rng.integers(0, c - seq + 1, size=2) for c in caps])
        positions = rng.integers(0, 1000, size=(2, seq))
        for cache in (fast, slow):
            cache.lengths[:] = lengths
        fast.write_positions(positions)
        KVCache.write_positions(slow, positions)
        for i in range(layout.n_layers):
            assert np.array_equal(fast.positions(i), slow.positions(i)), (step, i)
    fast.lengths[1, 0] = caps[1]
    with pytest.raises(EigenError, match="layer 1 holds 9 of 9 slots"):
        fast.write_positions(np.zeros((2, 1), np.int64))
