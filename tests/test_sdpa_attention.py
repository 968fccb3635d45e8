"""plugins/sdpa_attention.py (what the torch op runs eagerly) against the float64 reference on
fresh random inputs, in the cases the op parity matrix does not reach: plain causal prefill (SDPA's
`is_causal` path, no mask), value rank wider or narrower than the query/key width (the padding),
queries with no valid slot (zeros), non-causal, half-precision inputs, and gradients (healing
trains through it). Tolerances: float32 1e-5, float64 1e-10, float16 2e-3 (max |diff|)."""

from __future__ import annotations

import pytest
import torch

from eigenkv.plugins.reference import ROPE_NONE, ROPE_PRE, low_rank_attention
from eigenkv.plugins.sdpa_attention import _plain_causal, sdpa_low_rank_attention


def _case(seed, *, batch=2, n_q=6, n_kv=2, seq=7, n_slots=7, dq=8, r_v=8, rope_mode=ROPE_NONE, lengths=None,
          slots="positions", alibi=False, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(lengths if lengths is not None else [n_slots] * batch)
    q_pos = torch.stack([torch.arange(int(n) - seq, int(n)) for n in lengths]).clamp(min=0)
    x = dict(query=torch.randn(batch, n_q, seq, dq, generator=g, dtype=dtype),
             key_cache=torch.randn(batch, n_kv, n_slots, 4 if rope_mode == ROPE_PRE else dq, generator=g, dtype=dtype),
             value_cache=torch.randn(batch, n_kv, n_slots, r_v, generator=g, dtype=dtype),
             cache_lengths=lengths, query_positions=q_pos)
    kw = dict(scale=0.3)
    if slots == "positions":
        kw["slot_positions"] = torch.arange(n_slots).expand(batch, n_kv, n_slots).clone()
    elif slots == "shuffled":  # a different permutation per KV head, as after eviction and compaction
        kw["slot_positions"] = torch.stack([torch.stack([torch.randperm(n_slots, generator=g) for _ in range(n_kv)])
                                            for _ in range(batch)])
    if rope_mode == ROPE_PRE:
        kw.update(rope_mode=ROPE_PRE, key_up=torch.randn(n_kv, 4, dq, generator=g, dtype=dtype) / 2)
        angles = torch.arange(64, dtype=torch.float64)[:, None] * 0.5 ** torch.arange(dq // 2)
        angles = torch.cat((angles, angles), -1)
        kw.update(rope_cos=angles.cos().to(dtype), rope_sin=angles.sin().to(dtype))
    if alibi:
        kw["alibi_slopes"] = 0.5 ** torch.arange(1, n_q + 1, dtype=dtype)
    return x, kw


def _cast(x, kw, dtype):
    f = lambda v: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v  # noqa: E731
    return {k: f(v) for k, v in x.items()}, {k: f(v) for k, v in kw.items()}


def _check(x, kw, dtype=torch.float32, tol=1e-5):
    ref = low_rank_attention(**x, **kw)
    xc, kwc = _cast(x, kw, dtype)
    out = sdpa_low_rank_attention(**xc, **kwc)
    assert out.dtype == dtype and out.shape == ref.shape and torch.isfinite(out).all()
    assert float((out.double() - ref).abs().max()) <= tol
    return ref


@pytest.mark.parametrize("rope_mode, dq, r_v", [(ROPE_NONE, 8, 8), (ROPE_NONE, 4, 12), (ROPE_PRE, 16, 6)])
@pytest.mark.parametrize("slots", ["positions", None])
def test_plain_causal_prefill(rope_mode, dq, r_v, slots):
    x, kw = _case(1, dq=dq, r_v=r_v, rope_mode=rope_mode, slots=slots)
    assert _plain_causal(True, 0, None, x["cache_lengths"], x["query_positions"], kw.get("slot_positions"), 7)
    _check(x, kw)
    _check(x, kw, torch.float64, 1e-10)


@pytest.mark.parametrize("slots, alibi", [("positions", True), ("shuffled", False), ("shuffled", True)])
@pytest.mark.parametrize("dq, r_v", [(8, 8), (4, 12), (12, 4)])
def test_masked_paths(slots, alibi, dq, r_v):
    # a partly filled cache of 11 slots, 3 new queries: slots past each length masked
    x, kw = _case(2, seq=3, n_slots=11, lengths=[11, 6], dq=dq, r_v=r_v, slots=slots, alibi=alibi)
    assert not _plain_causal(True, 0, kw.get("alibi_slopes"), x["cache_lengths"], x["query_positions"],
                             kw.get("slot_positions"), 11)
    _check(x, kw)
    _check(x, kw, torch.float64, 1e-10)
    _check(x, {**kw, "window": 2})
    _check(x, {**kw, "causal": False})


def test_query_with_no_valid_slot_gives_zeros():
    x, kw = _case(3, seq=2, n_slots=5, lengths=[5, 0], slots=None)
    ref = _check(x, kw)
    assert float(ref[1].abs().max()) == 0.0


def test_half_precision_inputs_computed_in_float32():
    x, kw = _case(4, seq=5, n_slots=9, lengths=[9, 7], rope_mode=ROPE_PRE, dq=16, r_v=8)
    ref = low_rank_attention(**_cast(x, kw, torch.float16)[0], **_cast(x, kw, torch.float16)[1])  # float32 inside
    out = sdpa_low_rank_attention(**_cast(x, kw, torch.float16)[0], **_cast(x, kw, torch.float16)[1])
    assert out.dtype == torch.float16 and float((out.double() - ref.double()).abs().max()) <= 2e-3


def test_plain_causal_only_when_the_mask_is_lower_triangular_by_index():
    """S == Smax near misses take the masked path (and still match the reference)."""
    x, kw = _case(8, seq=6, n_slots=6)
    lengths, q_pos, slots = x["cache_lengths"], x["query_positions"], kw["slot_positions"]
    assert _plain_causal(True, 0, None, lengths, q_pos, slots, 6)
    reversed_head = slots.clone()
    reversed_head[1, 1] = slots[1, 1].flip(0)  # one KV head of one sequence holds its tokens in reverse
    repeated = q_pos.clone()
    repeated[0, 3] = repeated[0, 2]  # two queries at one position
    near_misses = {"one length short": dict(cache_lengths=torch.tensor([6, 5])),
                   "a KV head reversed": dict(slot_positions=reversed_head),
                   "shifted positions": dict(query_positions=q_pos + 1, slot_positions=slots + 1),
                   "repeated position": dict(query_positions=repeated,
                                             slot_positions=repeated[:, None, :].expand_as(slots).clone())}
    for name, change in near_misses.items():
        y = {**x, **{k: v for k, v in change.items() if k != "slot_positions"}}
        kw_y = {**kw, **({"slot_positions": change["slot_positions"]} if "slot_positions" in change else {})}
        plain = _plain_causal(True, 0, None, y["cache_lengths"], y["query_positions"], kw_y["slot_positions"], 6)
        # shifted positions are still lower triangular by index: the one near miss allowed to be plain
        assert plain == (name == "shifted positions"), name
        _check(y, kw_y)
    assert not _plain_causal(False, 0, None, lengths, q_pos, slots, 6)
    assert not _plain_causal(True, 2, None, lengths, q_pos, slots, 6)


@pytest.mark.parametrize("causal_prefill", [True, False])
def test_gradients_match_the_reference(causal_prefill):
    # the masked case has a sequence with an empty cache: its queries see no slot (zeros, zero gradients)
    shape = dict(seq=7, n_slots=7) if causal_prefill else dict(seq=3, n_slots=9, lengths=[9, 0])
    x, kw = _case(5, rope_mode=ROPE_PRE, dq=16, r_v=6, alibi=not causal_prefill, **shape)
    grads = []
    for attention in (low_rank_attention, sdpa_low_rank_attention):
        leaves = {k: x[k].clone().requires_grad_() for k in ("query", "key_cache", "value_cache")}
        up = kw["key_up"].clone().requires_grad_()
        out = attention(**{**x, **leaves}, **{**kw, "key_up": up})
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        grads.append([leaves[k].grad for k in ("query", "key_cache", "value_cache")] + [up.grad])
    for ref, got in zip(*grads):
        assert float((ref - got).abs().max()) <= 1e-10


def test_errors_match_the_reference():
    x, kw = _case(6, n_q=5)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        sdpa_low_rank_attention(**x, **kw)
    x, kw = _case(6)
    with pytest.raises(ValueError, match="rope_mode=pre needs"):
        sdpa_low_rank_attention(**x, **{**kw, "rope_mode": ROPE_PRE})
    with pytest.raises(ValueError, match="rope_mode must be"):
        sdpa_low_rank_attention(**x, **{**kw, "rope_mode": 7})
