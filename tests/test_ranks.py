"""Rank selection on synthetic spectra where the answer is known."""

import pytest
import torch

from eigenkv.errors import EigenError
from eigenkv.exporter.decompose import LayerBases, eig_basis
from eigenkv.exporter.ranks import allocate_kv_ratio, kv_ratio, threshold_rank


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
