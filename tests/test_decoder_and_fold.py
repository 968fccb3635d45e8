"""EigenDecoder vs transformers, and folding, on tiny random models of every family."""

import copy

import pytest
import torch
from tiny_models import FAMILIES, tiny_model

from eigenkv.exporter.calibrate import calibrate
from eigenkv.exporter.decoder import decoder_from_hf
from eigenkv.exporter.decompose import decompose
from eigenkv.exporter.fold import fold

TOL = 1e-4  # max |logit diff|, float32


@pytest.fixture(scope="module", params=FAMILIES)
def family_setup(request):
    model = tiny_model(request.param)
    decoder = decoder_from_hf(model)
    samples = torch.randint(0, 256, (4, 48), generator=torch.Generator().manual_seed(5))
    stats = calibrate(decoder, samples, progress=False)
    return request.param, model, decoder, stats


def _fresh_ids(seed=11, batch=2, seq=40):
    return torch.randint(0, 256, (batch, seq), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_decoder_matches_transformers(family_setup):
    _, model, decoder, _ = family_setup
    ids = _fresh_ids()
    diff = (model(ids).logits - decoder(ids)).abs().max().item()
    assert diff <= TOL, diff


@pytest.mark.parametrize("rope_mode", ["pre", "joint"])
@torch.no_grad()
def test_full_rank_fold_reproduces_original(family_setup, rope_mode):
    _, model, decoder, stats = family_setup
    rope = decoder.family.positions == "rope"
    d, L = decoder.dims.head_dim, decoder.dims.n_layers
    folded = fold(decoder, decompose(stats, rope, rope_mode), [d] * L, [d] * L, rope_mode)
    ids = _fresh_ids(seed=12)
    ref = model(ids).logits
    diff = (ref - folded(ids)).abs().max().item()
    assert diff <= TOL, diff
    # and the fold is not a no-op: a lower rank changes the logits
    low = fold(decoder, decompose(stats, rope, rope_mode), [d // 2] * L, [d // 2] * L, rope_mode)
    assert (ref - low(ids)).abs().max().item() > 1e-3


@torch.no_grad()
def test_full_key_rank_is_the_identity_and_identity_factors_keep_the_layer(family_setup):
    """At key rank head_dim the fold caches the original keys (identity bases, whatever the method
    found); with `identity_factors` (the layers --compress-layers leaves alone) every projection is
    the original's and the layer's output equals the original layer's in float64 (to 1e-12)."""
    from eigenkv.exporter.decompose import eigen_factors, identity_factors
    from eigenkv.exporter.fold import fold_attention
    _, _, decoder, stats = family_setup
    rope = decoder.family.positions == "rope"
    d = decoder.dims.head_dim
    bases = decompose(stats, rope, "pre")
    attn0 = decoder.layers[1].attn
    folded = fold_attention(attn0, bases[1], d, d // 2, "pre")
    eye = torch.eye(d)
    assert all(torch.equal(g, eye) for g in folded.key_gram)
    if folded.key_up is not None:
        assert all(torch.equal(u, eye) for u in folded.key_up)
    kept = fold_attention(attn0, identity_factors(eigen_factors(bases[1])), d, d, "pre")
    x = torch.randn(2, 24, decoder.dims.hidden, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    pos = torch.arange(24).expand(2, -1)
    rope_tables = None if decoder.rope is None else type(decoder.rope)(decoder.rope.cos.double(),
                                                                       decoder.rope.sin.double())
    ref = copy.deepcopy(attn0).double()(x, pos, rope_tables)
    got = copy.deepcopy(kept).double()(x, pos, rope_tables)
    assert (ref - got).abs().max().item() <= 1e-12 * (1 + ref.abs().max().item())


@pytest.mark.parametrize("rope_mode", ["pre", "joint"])
@torch.no_grad()
def test_kv_reconstruction_error_non_increasing_in_rank(family_setup, rope_mode):
    """Nested bases: the error of cached K/V (mapped back to head_dim) shrinks as rank grows,
    on fresh inputs, and the cached widths are the chosen ranks."""
    _, _, decoder, stats = family_setup
    rope = decoder.family.positions == "rope"
    bases = decompose(stats, rope, rope_mode)
    x = torch.randn(2, 24, decoder.dims.hidden, generator=torch.Generator().manual_seed(3))
    pos = torch.arange(24).expand(2, -1)
    attn0 = decoder.layers[1].attn
    _, k_full, v_full = attn0.project(x, pos, decoder.rope)  # rotated keys for RoPE models
    if rope and rope_mode == "pre":
        k_full = attn0._heads(attn0.k_proj(x), attn0.n_kv_heads)  # pre mode caches pre-RoPE keys
        if attn0.k_norm is not None:  # QK-norm: the keys the basis sees are normalised per head
            k_full = attn0.k_norm(k_full)
    errors = {"key": [], "value": []}
    d = decoder.dims.head_dim
    for r in range(1, d + 1):
        from eigenkv.exporter.fold import fold_attention
        attn = fold_attention(attn0, bases[1], r, r, rope_mode)
        _, k, v = attn.project(x, pos, decoder.rope)
        assert k.shape[-1] == r and v.shape[-1] == r
        u_v = bases[1].value[:, :, :r].float()  # [Hkv, d, r]
        v_back = torch.einsum("bhsr,hdr->bhsd", v, u_v)
        if rope and rope_mode == "joint":
            k_back = k @ attn.joint_basis.T
        elif rope:
            k_back = k @ attn.key_up[0]
        elif r == d:  # full width: the fold keeps the original keys (identity bases)
            k_back = k
        else:
            k_back = torch.einsum("bhsr,hdr->bhsd", k, bases[1].key[:, :, :r].float())
        errors["key"].append(float((k_back - k_full).norm()))
        errors["value"].append(float((v_back - v_full).norm()))
    for kind, e in errors.items():
        assert all(b <= a + 1e-4 * (1 + a) for a, b in zip(e, e[1:])), (kind, e)
        assert e[-1] <= 1e-4 * (1 + e[0]), (kind, e)


@torch.no_grad()
def test_cached_decode_equals_full_forward(family_setup):
    """Prefill + token-by-token decode through the preallocated cache gives the logits of one
    full forward, for a folded model (rank < head_dim), with prompts of different lengths."""
    _, _, decoder, stats = family_setup
    rope = decoder.family.positions == "rope"
    d, L = decoder.dims.head_dim, decoder.dims.n_layers
    folded = fold(decoder, decompose(stats, rope, "pre"), [d // 2] * L, [3 * d // 4] * L, "pre")
    ids = _fresh_ids(seed=4, batch=1, seq=20)
    full = folded(ids)
    cache = folded.new_cache(batch=1, max_len=32)
    assert [c.shape[-1] for c in cache.keys] == [d // 2] * L
    steps = [folded(ids[:, :12], torch.arange(12)[None], cache)]
    for t in range(12, 20):
        steps.append(folded(ids[:, t:t + 1], torch.tensor([[t]]), cache))
    diff = (torch.cat(steps, dim=1) - full).abs().max().item()
    assert diff <= TOL, diff


def test_calibration_hooks_are_removed_even_on_error(family_setup):
    _, _, decoder, _ = family_setup
    from eigenkv.exporter.calibrate import gram_hooks
    attn = decoder.layers[0].attn
    modules = [attn.q_proj, attn.k_proj, attn.v_proj, attn.projected_query, attn.projected_key,
               attn.rotated_query, attn.rotated_key]
    with pytest.raises(RuntimeError):
        with gram_hooks(attn):
            assert any(m._forward_hooks for m in modules)
            raise RuntimeError("boom")
    assert not any(m._forward_hooks for m in modules) and not attn.o_proj._forward_pre_hooks
