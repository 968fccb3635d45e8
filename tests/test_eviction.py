"""Key-norm eviction: the slots kept vs a numpy reference, the rank-space norm vs the reconstructed
key's norm (float64), keep 1.0 = no eviction, evicted logits vs a float64 reference over the kept
tokens at their original positions, and one-line errors for bad settings."""

import copy
import json

import numpy as np
import pytest
import torch
from tiny_models import export_tiny, folded_for_manifest

from eigenkv.cli import main
from eigenkv.engines.backend import HostKVCache, load_engine
from eigenkv.engines.eviction import EvictionSettings, Evictor, key_norms, make_evictor, pool_scores
from eigenkv.engines.runtime import generate, prefill
from eigenkv.errors import EigenError
from eigenkv.manifest import KVLayout
from eigenkv.plugins.reference import apply_rope

TEXT = "The quick brown fox jumps over the lazy dog. " * 80


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("evict")
    (root / "calib.txt").write_text(TEXT)
    out = root / "exp" / "model.onnx"
    assert export_tiny(root, "llama", out, "--kv-ratio", "0.5", "--max-seq-len", "96", "--decode-steps", "4") == 0
    assert main(["build", str(out), "-o", str(root / "engine")]) == 0
    manifest = json.loads((out.parent / "model.eigen.json").read_text())
    folded = folded_for_manifest(root, "llama", manifest, out).with_max_positions(96)
    return root, load_engine(root / "engine"), folded


class _FakeEngine:
    def __init__(self, grams):
        self.grams = grams

    def key_gram(self, layer):
        return self.grams[layer]


def _reference_keep(keys, positions, gram, budget, sink, recent):
    """Per head, in plain loops: protected = first `sink` positions and the `recent` newest; the
    rest by ascending reconstructed norm; -> sorted kept slot indices [Hkv, budget]."""
    out = []
    for h in range(keys.shape[0]):
        g = gram[min(h, len(gram) - 1)] if gram is not None else np.eye(keys.shape[-1])
        norms = [float(np.sqrt(k @ g @ k)) for k in keys[h].astype(np.float64)]
        newest = positions[h].max()
        protected = [i for i, p in enumerate(positions[h]) if p < sink or p > newest - recent]
        rest = sorted((i for i in range(len(norms)) if i not in protected), key=lambda i: norms[i])
        out.append(sorted(protected + rest[: budget - len(protected)]))
    return np.array(out)


def test_kept_slots_equal_numpy_reference_with_skipped_layers_and_protected_tokens():
    rng = np.random.default_rng(0)
    layout = KVLayout(4, 3, 16, [5, 6, 7, 8], [4, 4, 4, 4], 256)
    grams = []
    for r in layout.key_ranks:
        u = rng.normal(size=(3, 16, r))
        grams.append(np.einsum("hdr,hds->hrs", u, u))  # per KV head, oblique: not the identity
    settings = EvictionSettings(budget=12, sink=2, recent=3, skip_layers=(1,), headroom=8, pool=1)  # the paper's
    evictor = Evictor(settings)
    caps = evictor.capacities(layout.n_layers, context=200, chunk=8)
    assert caps == [20, 200, 20, 20]
    cache = HostKVCache(layout, 2, caps, "fp32")
    n = 19
    for i in range(layout.n_layers):
        cache.keys(i)[:, :, :n] = rng.normal(size=(2, 3, n, layout.key_ranks[i]))
        cache.positions(i)[:, :, :n] = np.arange(n) * 2  # positions with gaps: slots already moved once
    cache.lengths[:] = n
    before = {i: (cache.keys(i).copy(), cache.positions(i).copy()) for i in range(4)}
    evictor.make_room(_FakeEngine(grams), cache, new_tokens=2)  # 19 + 2 > 20: evict layers 0, 2, 3
    for i in range(4):
        if i == 1:
            assert (cache.lengths[1] == n).all() and np.array_equal(cache.keys(1), before[1][0])
            continue
        for b in range(2):
            ref = _reference_keep(before[i][0][b, :, :n], before[i][1][b, :, :n], grams[i], 12, 2, 3)
            kept_pos = cache.positions(i)[b, :, :12]
            assert np.array_equal(kept_pos, np.take_along_axis(before[i][1][b, :, :n], ref, 1))
            assert np.array_equal(cache.keys(i)[b, :, :12], np.take_along_axis(before[i][0][b, :, :n], ref[..., None], 1))
            assert (kept_pos[:, :1] == 0).all() and (kept_pos[:, -1] == 2 * (n - 1)).all()  # a sink, the newest
        assert (cache.lengths[i] == 12).all()
    assert evictor.evictions == 3 * 2


def _reference_pool(scores, positions, width):
    """Plain loops: each slot's score -> the max over slots whose positions are within width // 2."""
    out = np.empty_like(scores, dtype=np.float64)
    for h in range(scores.shape[0]):
        for i, p in enumerate(positions[h]):
            out[h, i] = max(s for s, q in zip(scores[h], positions[h]) if abs(int(q) - int(p)) <= width // 2)
    return out


@pytest.mark.parametrize("width", [1, 3, 5, 9])
def test_pooled_scores_equal_a_plain_loop_reference(width):
    rng = np.random.default_rng(width)
    # positions with gaps (slots already compacted once): neighbours are by position, not by slot
    positions = np.sort(np.stack([rng.choice(60, 25, replace=False) for _ in range(3)]), axis=1).astype(np.int32)
    scores = rng.normal(size=(3, 25))
    assert np.array_equal(pool_scores(scores, positions, width), _reference_pool(scores, positions, width))
    shuffled = rng.permutation(25)  # slots out of position order: same scores per slot
    assert np.array_equal(pool_scores(scores[:, shuffled], positions[:, shuffled], width),
                          _reference_pool(scores, positions, width)[:, shuffled])


def _reference_keep_pooled(keys, positions, gram, budget, sink, recent, width):
    """Per head, in plain loops: protected slots, then by descending pooled score (-norm pooled over
    positions within width // 2), ties by the slot's own score, then the lower slot."""
    out = []
    for h in range(keys.shape[0]):
        g = gram[min(h, len(gram) - 1)]
        own = [-float(np.sqrt(k @ g @ k)) for k in keys[h].astype(np.float64)]
        pooled = _reference_pool(np.array([own]), positions[h:h + 1], width)[0]
        newest = positions[h].max()
        protected = [i for i, p in enumerate(positions[h]) if p < sink or p > newest - recent]
        rest = sorted((i for i in range(len(own)) if i not in protected), key=lambda i: (-pooled[i], -own[i], i))
        out.append(sorted(protected + rest[: budget - len(protected)]))
    return np.array(out)


def test_pooled_kept_slots_equal_numpy_reference_and_keep_spans_whole():
    rng = np.random.default_rng(3)
    n, budget = 40, 15
    keys = rng.normal(size=(3, n, 6))
    keys[:, 20] *= 1e-3  # one very low-norm key per head: with pool 3 its neighbours stay too
    u = rng.normal(size=(3, 8, 6))
    gram = np.einsum("hdr,hds->hrs", u, u)
    positions = np.tile(np.arange(n, dtype=np.int32) * 3, (3, 1))  # gaps of 3: no neighbours at pool 3...
    evictor = Evictor(EvictionSettings(budget=budget, sink=2, recent=4, pool=3))
    evictor.budget = budget
    kept = evictor.select(keys, positions, gram)
    assert np.array_equal(kept, _reference_keep_pooled(keys, positions, gram, budget, 2, 4, 3))
    positions = np.tile(np.arange(n, dtype=np.int32), (3, 1))  # ...contiguous positions: the span 18..22 stays
    evictor = Evictor(EvictionSettings(budget=budget, sink=2, recent=4, pool=5))
    evictor.budget = budget
    kept = evictor.select(keys, positions, gram)
    assert np.array_equal(kept, _reference_keep_pooled(keys, positions, gram, budget, 2, 4, 5))
    assert all({18, 19, 20, 21, 22} <= set(row) for row in kept.tolist())


@pytest.mark.parametrize("mode", ["pre", "joint", "none"])
def test_rank_space_norm_equals_reconstructed_key_norm(mode):
    """float64: ‖U k_r‖ from the Gram equals the norm of the rebuilt (and rotated) full key."""
    g = torch.Generator().manual_seed(1)
    d, r, n_kv = 16, 5, 2
    k_r = torch.randn(n_kv, 9, r, generator=g, dtype=torch.float64)
    up = torch.randn(n_kv if mode != "joint" else 1, d, r, generator=g, dtype=torch.float64)  # U, oblique
    full = k_r @ up.transpose(1, 2)  # [Hkv, n, d]
    if mode != "none":  # RoPE at arbitrary positions: a rotation keeps the norm
        angles = torch.rand(64, d // 2, generator=g, dtype=torch.float64) * 6.28
        cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
        full = apply_rope(full, torch.randint(0, 64, (n_kv, 9), generator=g), cos, sin)
    gram = (up.transpose(1, 2) @ up).numpy()  # what the fold saves: UᵀU
    assert np.allclose(key_norms(k_r.numpy(), gram), full.norm(dim=-1).numpy(), rtol=1e-12, atol=0)


def test_fold_saves_the_gram_of_the_key_up_projection(built):
    _, engine, folded = built
    for i, layer in enumerate(folded.layers):
        up = layer.attn.key_up.double()  # [G, r, d]: K = K_r @ key_up
        assert np.allclose(engine.key_gram(i), (up @ up.transpose(1, 2)).numpy(), atol=1e-5)


def test_keep_one_gives_identical_tokens(built):
    _, engine, _ = built
    prompts = [list(range(3, 40)), list(range(50, 70))]
    plain = generate(engine, prompts, 24)
    evictor = make_evictor(EvictionSettings(keep=1.0, sink=2, recent=4), engine)
    assert generate(engine, prompts, 24, evictor=evictor) == plain and evictor.evictions == 0


@torch.no_grad()
def test_evicted_cache_next_logits_equal_float64_reference_over_kept_tokens(built):
    _, engine, folded = built
    prompt_len, budget = 40, 17
    ids = np.random.default_rng(5).integers(0, 256, size=(2, prompt_len))
    settings = EvictionSettings(budget=budget, sink=2, recent=5, skip_layers=(0,), headroom=prompt_len - budget)
    evictor = make_evictor(settings, engine)
    cache = engine.new_cache(2, evictor.capacities(3, prompt_len + 1, chunk=prompt_len - budget))
    assert cache.capacities == [prompt_len + 1, prompt_len, prompt_len]
    last = prefill(engine, cache, ids, np.full(2, prompt_len), prompt_len, evictor)  # fits: no eviction yet
    assert evictor.evictions == 0
    token, position = last.argmax(-1), np.full(2, prompt_len)
    evictor.make_room(engine, cache, 1)  # full: layers 1 and 2 keep 17 slots per head
    assert evictor.evictions == 2 * 2 and (cache.lengths[1:] == budget).all() and (cache.lengths[0] == prompt_len).all()
    logits = engine.step(cache, token[:, None], position[:, None])[:, 0]

    ref_model = copy.deepcopy(folded).double()
    full = ref_model.new_cache(2, prompt_len, dtype=torch.float64)
    ref_model(torch.from_numpy(ids), torch.arange(prompt_len).expand(2, -1), full)
    small = ref_model.new_cache(2, prompt_len + 1, dtype=torch.float64)
    for i in range(3):
        kept = torch.from_numpy(cache.positions(i)[:, :, : int(cache.lengths[i, 0])].astype(np.int64))
        for src, dst in ((full.keys[i], small.keys[i]), (full.values[i], small.values[i])):
            dst[:, :, : kept.shape[-1]] = src.gather(2, kept[..., None].expand(-1, -1, -1, src.shape[-1]))
        small.positions[i][:, :, : kept.shape[-1]] = kept.to(torch.int32)
        small.lengths[i] = kept.shape[-1]
    ref = ref_model(torch.from_numpy(token)[:, None], torch.from_numpy(position)[:, None], small)[:, -1]
    assert np.abs(logits - ref.numpy()).max() <= 2e-5
    full_next = engine.new_cache(2, prompt_len + 1)
    prefill(engine, full_next, ids, np.full(2, prompt_len), prompt_len)
    assert np.abs(engine.step(full_next, token[:, None], position[:, None])[:, 0] - logits).max() > 1e-4  # it evicted


@pytest.mark.parametrize("extra, message", [
    (["--keep", "1.5"], "--keep must be in (0, 1]"),
    (["--keep", "0"], "--keep must be in (0, 1]"),
    (["--kv-budget", "20", "--sink", "10", "--recent", "10"], "--kv-budget must be larger than --sink + --recent (20)"),
    (["--kv-budget", "500"], "at most the engine's max_seq_len 96"),
    (["--keep", "0.5", "--skip-layers", "0,7"], "--skip-layers [7] out of range: the engine has layers 0..2"),
    (["--keep", "0.5", "--skip-layers", "x"], "--skip-layers takes comma-separated layer indices"),
    (["--keep", "0.5", "--evict", "oracle"], "--evict must be one of key-norm, random, recent"),
    (["--keep", "0.5", "--pool", "2"], "--pool must be an odd number of tokens >= 1"),
    ([], "eviction needs exactly one of --keep R or --kv-budget N"),
])
def test_bad_eviction_settings_are_one_line_errors(built, capsys, extra, message):
    root, _, _ = built
    args = ["run", str(root / "engine"), "--prompt", "fox", "--max-new-tokens", "2", "--evict", "key-norm", *extra]
    capsys.readouterr()
    assert main(args) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("eigenkv: error:") and message in err and "\n" not in err, err


def test_eviction_refuses_an_engine_without_slot_positions(built, tmp_path, capsys):
    import shutil
    root, _, _ = built
    shutil.copytree(root / "engine", tmp_path / "e")
    cfg = json.loads((tmp_path / "e" / "config.json").read_text())
    cfg["kv_layout"]["slot_positions"] = False
    (tmp_path / "e" / "config.json").write_text(json.dumps(cfg))
    capsys.readouterr()
    assert main(["run", str(tmp_path / "e"), "--prompt", "fox", "--evict", "key-norm", "--keep", "0.5"]) == 2
    assert "no slot positions, so slots cannot move" in capsys.readouterr().err


def test_cli_run_and_bench_with_eviction(built, tmp_path, capsys):
    root, _, _ = built
    capsys.readouterr()
    assert main(["run", str(root / "engine"), "--prompt", "the quick brown fox " * 3, "--max-new-tokens", "6",
                 "--ignore-eos", "--evict", "key-norm", "--kv-budget", "12", "--sink", "2", "--recent", "4",
                 "--evict-headroom", "4", "--no-stream"]) == 0
    assert capsys.readouterr().out.startswith("the quick brown fox")
    out = tmp_path / "bench"
    assert main(["bench", str(root / "engine"), "--baseline", str(root / "engine"), "--contexts", "32",
                 "--batches", "2", "--decode-tokens", "3", "--repeats", "1", "--prefill-chunk", "8", "--out", str(out),
                 "--no-progress", "--evict", "key-norm", "--keep", "0.5", "--sink", "2", "--recent", "4",
                 "--evict-headroom", "8"]) == 0
    result = json.loads((out / "bench.json").read_text())
    assert result["config"]["eviction"]["policy"] == "key-norm" and result["config"]["eviction"]["keep"] == 0.5
    by = {p["engine"]: p for p in result["points"]}
    # budget ceil(0.5 * 36) = 18 + 8 headroom in layers 2.. ; layers 0, 1 skipped (whole context 36)
    layout = load_engine(root / "engine").layout
    width = [(k + v) * layout.n_kv_heads * 4 for k, v in zip(layout.key_ranks, layout.value_ranks)]
    assert by["compressed"]["kv_bytes"] == 2 * (36 * (width[0] + width[1]) + 26 * width[2])
    assert by["baseline"]["kv_bytes"] == 2 * 36 * sum(width)
    assert by["compressed"]["kv_bytes_read_per_step"] < by["baseline"]["kv_bytes_read_per_step"]


def test_bench_evict_compare_times_the_engine_with_and_without(built, tmp_path):
    root, _, _ = built
    out = tmp_path / "bench"
    base = ["bench", str(root / "engine"), "--baseline", str(root / "engine"), "--contexts", "32", "--batches", "1",
            "--decode-tokens", "2", "--repeats", "1", "--warmup", "0", "--prefill-chunk", "8", "--out", str(out),
            "--no-progress"]
    assert main(base + ["--evict-compare"]) == 2  # needs --evict
    assert main(base + ["--evict-compare", "--evict", "key-norm", "--kv-budget", "12", "--sink", "2",
                        "--recent", "4", "--evict-headroom", "8"]) == 0
    result = json.loads((out / "bench.json").read_text())
    assert list(result["engines"]) == ["compressed", "compressed+evict", "baseline", "baseline+evict"]
    by = {p["engine"]: p for p in result["points"]}
    assert by["compressed"]["kv_bytes"] == by["baseline"]["kv_bytes"] > by["compressed+evict"]["kv_bytes"]
    assert by["baseline+evict"]["kv_bytes"] == by["compressed+evict"]["kv_bytes"]  # one engine twice here
    table = [line for line in (out / "bench.md").read_text().splitlines() if line.startswith("|")]
    assert "compressed+evict decode ms p50" in table[0] and "baseline+evict decode ms p50" in table[0]
    assert table[0].count("|") == table[2].count("|") == 11 + 2 * 4
