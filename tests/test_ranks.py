"""Rank selection on synthetic spectra where the answer is known; the rank strategies and the
compress benchmark that drives them."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import save_tiny, tiny_model

from eigenkv.errors import EigenError
from eigenkv.exporter.decoder import decoder_from_hf
from eigenkv.exporter.decompose import LayerBases, eig_basis
from eigenkv.exporter.pipeline import CompressConfig
from eigenkv.exporter.rank_strategies import RANK_STRATEGIES, rank_strategy
from eigenkv.exporter.ranks import ErrorBudgetSearch, allocate_kv_ratio, kv_ratio, threshold_rank


def _bases(key_sv, value_sv):
    d = key_sv.shape[-1]
    eye = torch.eye(d, dtype=torch.float64)
    return LayerBases(eye.expand(key_sv.shape[0], d, d), key_sv, eye.expand(value_sv.shape[0], d, d), value_sv)


def test_threshold_rank_uses_normalised_singular_values_max_over_heads():
    sv = torch.tensor([[4.0, 3.0, 2.0, 1.0], [9.0, 1.0, 0.0, 0.0]], dtype=torch.float64)
    assert threshold_rank(sv, 0.7) == 2  # head 0: 4+3=7 of 10; head 1 needs 1
    assert threshold_rank(sv, 1.0) == 4
    assert threshold_rank(sv, 0.0) == 1


def test_kv_ratio_allocation_hits_target_and_spends_rank_where_energy_is():
    d = 8
    flat = torch.ones(1, d, dtype=torch.float64)  # every direction matters
    steep = torch.tensor([[10.0, 1, 0.1, 0.01, 0.001, 0, 0, 0]], dtype=torch.float64)
    bases = [_bases(steep, flat), _bases(flat, steep)]
    for ratio in (1.0, 0.75, 0.5, 0.25):
        kr, vr = allocate_kv_ratio(bases, ratio, 1)
        assert kv_ratio(kr, vr, d) <= ratio + 1e-9
        assert kv_ratio(kr, vr, d) > ratio - 1 / (4 * d)
    kr, vr = allocate_kv_ratio(bases, 0.5, 1)
    # the steep spectra go down to rank 1 first; the last 2 drops come from the flat ones
    assert kr[0] == 1 and vr[1] == 1 and vr[0] + kr[1] == 2 * d - 2


def test_kv_ratio_out_of_range():
    with pytest.raises(EigenError, match=r"\(0, 1\]"):
        allocate_kv_ratio([], 0.0, 1)


def test_eig_basis_matches_svd_of_activations():
    x = torch.randn(500, 6, dtype=torch.float64) @ torch.randn(6, 6, dtype=torch.float64)
    basis, sv = eig_basis((x.T @ x)[None])
    _, s, vh = torch.linalg.svd(x, full_matrices=False)
    torch.testing.assert_close(sv[0], s, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close((basis[0].T @ vh.T).abs(), torch.eye(6, dtype=torch.float64), rtol=0, atol=1e-8)


@pytest.mark.parametrize("fields, name", [
    ({"key_rank": 4}, "uniform"),
    ({"value_rank": 4}, "uniform"),
    ({"error_budget": 0.05}, "error-budget"),
    ({"method": "eigen"}, "error-budget"),  # no target: the paper's default search
    ({"kv_ratio": 0.4}, "kv-ratio"),
    ({}, "kv-ratio"),  # the default target 0.5
    ({"max_ppl_increase": 0.1}, "quality-budget"),
])
def test_rank_strategy_is_registered_and_selected_by_its_option(fields, name):
    assert set(RANK_STRATEGIES) == {"uniform", "error-budget", "kv-ratio", "quality-budget"}
    strategy = rank_strategy(CompressConfig(**fields).resolved())
    assert type(strategy) is RANK_STRATEGIES[name] and strategy.name == name


def test_only_the_error_budget_watches_calibration_and_uniform_ranks_are_uniform():
    decoder = decoder_from_hf(tiny_model("llama"))  # 3 layers, head_dim 16
    hooks = {}
    for fields in ({"key_rank": 4}, {"method": "eigen"}, {"error_budget": 0.05}, {}, {"max_ppl_increase": 0.1}):
        config = CompressConfig(**fields).resolved()
        hooks[tuple(fields)] = rank_strategy(config).search_hook(decoder, config)
    assert isinstance(hooks[("method",)], ErrorBudgetSearch) and hooks[("method",)].settings.budget == 0.025
    assert hooks[("error_budget",)].settings.budget == 0.05
    assert all(hooks[k] is None for k in (("key_rank",), (), ("max_ppl_increase",)))
    config = CompressConfig(key_rank=4).resolved()
    assert rank_strategy(config).choose(decoder, None, None, config) == ([4] * 3, [16] * 3, {"allocation": "uniform"})


def test_compress_layers_leave_the_other_layers_full_width():
    """--compress-layers: uniform ranks only on those layers; --kv-ratio is the target over their
    bytes (here the energy allocation on a tiny model's bases); the parser's forms and errors."""
    from eigenkv.exporter.calibrate import calibrate
    from eigenkv.exporter.decompose import decompose, eigen_factors
    from eigenkv.exporter.pipeline import parse_layers
    decoder = decoder_from_hf(tiny_model("llama"))  # 3 layers, head_dim 16
    config = CompressConfig(key_rank=4, compress_layers="1").resolved()
    assert config.compress_layers == (1,)
    assert rank_strategy(config).choose(decoder, None, None, config)[:2] == ([16, 4, 16], [16, 16, 16])
    stats = calibrate(decoder, torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1)),
                      progress=False)
    factors = [eigen_factors(b) for b in decompose(stats, True, "pre")]
    config = CompressConfig(kv_ratio=0.25, allocation="energy", compress_layers="0-1").resolved()
    keys, values, _ = rank_strategy(config).choose(decoder, factors, None, config)
    assert keys[2] == values[2] == 16 and keys[0] + values[0] + keys[1] + values[1] == 0.25 * 4 * 16
    # the loss allocation probes only the compressed layers (the others' KLs are None in the details)
    from types import SimpleNamespace
    texts = SimpleNamespace(samples=torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(2)))
    config = CompressConfig(kv_ratio=0.25, compress_layers="2", progress=False).resolved()
    keys, values, details = rank_strategy(config).choose(decoder, factors, texts, config)
    assert keys[:2] == values[:2] == [16, 16] and keys[2] + values[2] == 0.25 * 2 * 16
    assert details["sensitivity"]["key_kl"][:2] == details["sensitivity"]["value_kl"][:2] == [None, None]
    assert details["sensitivity"]["key_kl"][2] >= 0 and details["sensitivity"]["value_kl"][2] > 0  # (keys: ~3e-7, rounded)
    assert parse_layers("0-2,5,1") == (0, 1, 2, 5) and parse_layers([3, 1]) == (1, 3) and parse_layers(None) is None
    for bad in ("", "a", "1-", "-1", "2,x", "0,3-1", "0-99999999999"):
        with pytest.raises(EigenError, match="--compress-layers takes layer indices"):
            parse_layers(bad)


def test_bench_compress_runs_end_to_end(tmp_path):
    model = save_tiny("llama", tmp_path / "llama")
    text = tmp_path / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    out = tmp_path / "bench.json"
    tool = Path(__file__).parents[1] / "tools" / "bench_compress.py"
    run = subprocess.run([sys.executable, str(tool), "--model", str(model), "--calib-text", str(text),
                          "--calib-samples", "2", "--calib-seq-len", "32", "--out", str(out)],
                         capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(out.read_text())
    assert list(result["seconds"]) == ["load", "text", "calibrate_decompose_ranks", "fold"]
    assert all(v >= 0 for v in result["seconds"].values()) and result["seconds_total"] > 0
    assert (result["rank_method"], result["basis_method"], result["rope_mode"]) == ("loss", "loss-aware", "pre")
    assert result["calibration_tokens"] == 64 and "| total |" in run.stdout
