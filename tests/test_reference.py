"""The op's reference math vs plain float64 attention (fresh random inputs)."""

import math

import pytest
import torch

from eigenkv.plugins.reference import ROPE_NONE, ROPE_PRE, apply_rope, low_rank_attention


def _plain_attention(q, k, v, scale, mask):
    """q [B,H,S,d], k/v [B,H,N,d], mask [B,1|H,S,N] bool (True = attend)."""
    s = (q @ k.transpose(-1, -2)) * scale
    return torch.softmax(s.masked_fill(~mask, float("-inf")), -1) @ v


@pytest.mark.parametrize("groups", [1, 3])
def test_prefill_matches_plain_causal_attention(groups):
    g = torch.Generator().manual_seed(1)
    B, Hkv, S, d, rv = 2, 2, 7, 8, 5
    q = torch.randn(B, Hkv * groups, S, d, generator=g, dtype=torch.float64)
    k = torch.randn(B, Hkv, S, d, generator=g, dtype=torch.float64)
    v = torch.randn(B, Hkv, S, rv, generator=g, dtype=torch.float64)
    pos = torch.arange(S).expand(B, S)
    out = low_rank_attention(q, k, v, torch.full((B,), S), pos, scale=0.3)
    mask = torch.ones(S, S, dtype=torch.bool).tril()[None, None]
    ref = _plain_attention(q, k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1), 0.3, mask)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)


def test_decode_reads_only_valid_slots():
    """Slots past cache_lengths hold garbage that must not leak into the output."""
    g = torch.Generator().manual_seed(2)
    B, H, Smax, d = 2, 2, 10, 4
    k = torch.randn(B, H, Smax, d, generator=g, dtype=torch.float64)
    v = torch.randn(B, H, Smax, d, generator=g, dtype=torch.float64)
    q = torch.randn(B, H, 1, d, generator=g, dtype=torch.float64)
    lengths = torch.tensor([4, 7])
    pos = (lengths - 1)[:, None]
    out = low_rank_attention(q, k, v, lengths, pos, scale=0.5)
    for b in range(B):
        n = int(lengths[b])
        ref = _plain_attention(q[b:b + 1], k[b:b + 1, :, :n], v[b:b + 1, :, :n], 0.5,
                               torch.ones(1, 1, 1, n, dtype=torch.bool))
        torch.testing.assert_close(out[b:b + 1], ref, rtol=0, atol=1e-12)
    k[:, :, 8:] = 1e6  # garbage past every length changes nothing
    torch.testing.assert_close(low_rank_attention(q, k, v, lengths, pos, scale=0.5), out)


def test_pre_mode_equals_rotating_reconstructed_keys():
    g = torch.Generator().manual_seed(3)
    B, H, S, d, r = 1, 2, 6, 8, 3
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    ang = torch.arange(32, dtype=torch.float64)[:, None] * inv[None]
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    key_up = torch.randn(1, r, d, generator=g, dtype=torch.float64)
    kr = torch.randn(B, H, S, r, generator=g, dtype=torch.float64)
    q = torch.randn(B, H, S, d, generator=g, dtype=torch.float64)
    v = torch.randn(B, H, S, 4, generator=g, dtype=torch.float64)
    pos = torch.arange(S)[None] + 5
    out = low_rank_attention(q, kr, v, torch.tensor([S]), pos, scale=1 / math.sqrt(d), rope_mode=ROPE_PRE,
                             slot_positions=pos[:, None].expand(B, H, S), key_up=key_up, rope_cos=cos, rope_sin=sin)
    k_full = apply_rope(kr @ key_up, pos[:, None].expand(B, H, S), cos, sin)
    ref = low_rank_attention(q, k_full, v, torch.tensor([S]), pos, scale=1 / math.sqrt(d), rope_mode=ROPE_NONE,
                             slot_positions=pos[:, None].expand(B, H, S))
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)


def test_rope_is_a_rotation():
    """Norm-preserving: the basis of L2-norm eviction on rotated caches."""
    d = 16
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    ang = torch.arange(100, dtype=torch.float64)[:, None] * inv[None]
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    x = torch.randn(3, 50, d, dtype=torch.float64)
    y = apply_rope(x, torch.randint(0, 100, (3, 50)), cos, sin)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-12, atol=0)


def test_bad_mode_and_heads_rejected():
    q, k = torch.zeros(1, 3, 1, 4), torch.zeros(1, 2, 2, 4)
    with pytest.raises(ValueError, match="multiple"):
        low_rank_attention(q, k, k, torch.tensor([2]), torch.tensor([[1]]), scale=1.0)
    with pytest.raises(ValueError, match="key_up"):
        low_rank_attention(q[:, :2], k, k, torch.tensor([2]), torch.tensor([[1]]), scale=1.0, rope_mode=ROPE_PRE)


def test_reference_signature_follows_the_spec():
    """The reference takes exactly the spec's inputs (in order) and math attributes."""
    import inspect

    from eigenkv.plugins import spec
    params = inspect.signature(low_rank_attention).parameters
    positional = [n for n, p in params.items() if p.kind is p.POSITIONAL_OR_KEYWORD]
    keyword = {n for n, p in params.items() if p.kind is p.KEYWORD_ONLY}
    required = [t.name for t in spec.INPUTS if not t.optional]
    optional = {t.name for t in spec.INPUTS if t.optional}
    assert positional == required
    assert keyword == optional | {a.name for a in spec.ATTRIBUTES if a.name != "version"}
    assert spec.output_shape((2, 9, 5, 64), (2, 3, 100, 17)) == (2, 9, 5, 17)
