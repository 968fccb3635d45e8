"""The op's math through PyTorch's fused attention (`torch.nn.functional.scaled_dot_product_attention`).

What the torch op runs eagerly (calibration probes, perplexity, validation, healing): the same
result as `reference.low_rank_attention` without materialising its [B, Hq, S, Smax] scores,
masks and probabilities several times over. On the default model's shapes (4 x 1024-token
prefill, 9 query / 3 KV heads, `pre` mode, r_k = r_v = 32, 2 threads) one call took 107 ms
against the reference's 521 ms (`tools/bench_torch_op.py`, docs/results/bench_torch_op_smollm2.md).

PyTorch's CPU flash-attention kernel needs one head size for queries, keys and values; with
value rank r_v != query/key width it falls back to a slower unfused path. So the narrower side
is zero-padded to E = max(dq, r_v): zero columns add nothing to q.k, and padded value columns
are sliced off the output. The scale is passed explicitly (not derived from E).

Masking follows the reference exactly: slots at or past `cache_lengths`, slots whose position
is after the query's (causal), outside the sliding window, and ALiBi's -slope * (q_pos - k_pos)
bias, as one additive float mask (a boolean mask measured slower here). A query with no valid
slot returns zeros, as in the reference (only those rows are zeroed). Plain causal prefill (full cache, slot positions equal
to the strictly increasing query positions, no window, no ALiBi) takes SDPA's `is_causal` path
with no mask at all (those checks read tensor values; under CUDA-graph capture they are skipped
and the masked path runs). Differentiable (SDPA has autograd), so healing uses it too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from eigenkv.plugins.reference import ROPE_NONE, ROPE_PRE, _expand_kv, apply_rope


def sdpa_low_rank_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    cache_lengths: torch.Tensor,
    query_positions: torch.Tensor,
    *,
    scale: float,
    rope_mode: int = ROPE_NONE,
    causal: bool = True,
    slot_positions: torch.Tensor | None = None,
    key_up: torch.Tensor | None = None,
    rope_cos: torch.Tensor | None = None,
    rope_sin: torch.Tensor | None = None,
    alibi_slopes: torch.Tensor | None = None,
    window: int = 0,
) -> torch.Tensor:
    """Same arguments, shapes, result and errors as `reference.low_rank_attention`:
    query [B, Hq, S, dq], caches [B, Hkv, Smax, r_k | r_v] -> [B, Hq, S, r_v] in query's dtype,
    computed in at least float32. Raises ValueError for Hq not a multiple of Hkv, `pre` mode
    without key_up/rope tables, or an unknown rope_mode."""
    batch, n_q, seq, _ = query.shape
    n_kv, n_slots = key_cache.shape[1], key_cache.shape[2]
    if n_q % n_kv:
        raise ValueError(f"query heads ({n_q}) must be a multiple of KV heads ({n_kv})")
    work = torch.promote_types(query.dtype, torch.float32)
    keys = key_cache.to(work)
    if rope_mode == ROPE_PRE:
        if key_up is None or rope_cos is None or rope_sin is None:
            raise ValueError("rope_mode=pre needs key_up, rope_cos and rope_sin")
        positions = slot_positions if slot_positions is not None else torch.arange(
            n_slots, device=query.device).expand(batch, n_kv, n_slots)
        keys = apply_rope(keys @ key_up.to(work), positions, rope_cos.to(work), rope_sin.to(work))
    elif rope_mode != ROPE_NONE:
        raise ValueError(f"rope_mode must be {ROPE_NONE} (none) or {ROPE_PRE} (pre), got {rope_mode}")
    q, values = query.to(work), value_cache.to(work)
    width, r_v = max(q.shape[-1], values.shape[-1]), values.shape[-1]
    if q.shape[-1] < width:
        q, keys = F.pad(q, (0, width - q.shape[-1])), F.pad(keys, (0, width - keys.shape[-1]))
    if r_v < width:
        values = F.pad(values, (0, width - r_v))
    if _plain_causal(causal, window, alibi_slopes, cache_lengths, query_positions, slot_positions, n_slots):
        out = F.scaled_dot_product_attention(q, keys, values, is_causal=True, scale=scale, enable_gqa=True)
        return out[..., :r_v].contiguous().to(query.dtype)
    mask = _additive_mask(cache_lengths, query_positions, slot_positions, alibi_slopes, causal, window,
                          n_q // n_kv, n_slots, work)
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale, enable_gqa=True)
    # a query with no valid slot gets zeros, as in the reference (SDPA may give NaN there); nothing else is touched
    empty = torch.isneginf(mask).all(-1, keepdim=True)  # [B, 1 | Hq, S, 1]
    return out[..., :r_v].masked_fill(empty, 0.0).contiguous().to(query.dtype)


def _plain_causal(causal, window, alibi_slopes, cache_lengths, query_positions, slot_positions, n_slots) -> bool:
    """True when the reference's mask is exactly SDPA's `is_causal` (top-left aligned, S == Smax):
    every slot valid, slot i holding query i's position, positions strictly increasing."""
    seq = query_positions.shape[1]
    if not causal or window > 0 or alibi_slopes is not None or seq != n_slots or _capturing():
        return False
    if not bool((cache_lengths == n_slots).all()):
        return False
    if seq > 1 and not bool((query_positions[:, 1:] > query_positions[:, :-1]).all()):
        return False
    if slot_positions is None:  # slot index is the position
        return torch.equal(query_positions.long(), torch.arange(seq, device=query_positions.device).expand_as(query_positions))
    return torch.equal(slot_positions.long(), query_positions.long()[:, None, :].expand_as(slot_positions))


def _additive_mask(cache_lengths, query_positions, slot_positions, alibi_slopes, causal, window, groups,
                   n_slots, dtype) -> torch.Tensor:
    """The reference's validity and ALiBi bias as one float mask [B, 1 | Hq, S, Smax] (0 or the
    bias where valid, -inf elsewhere); one head row when every KV head holds the same positions."""
    batch = query_positions.shape[0]
    device = query_positions.device
    if slot_positions is None:
        k_pos = torch.arange(n_slots, device=device).expand(batch, 1, n_slots)
    elif not _capturing() and torch.equal(slot_positions, slot_positions[:, :1].expand_as(slot_positions)):
        k_pos = slot_positions[:, :1]
    else:
        k_pos = _expand_kv(slot_positions, groups)  # [B, Hq, Smax]
    k_pos = k_pos.long().unsqueeze(2)  # [B, 1 | Hq, 1, Smax]
    q_pos = query_positions.long()[:, None, :, None]  # [B, 1, S, 1]
    valid = torch.arange(n_slots, device=device)[None, None, None, :] < cache_lengths.long()[:, None, None, None]
    if causal:
        valid = valid & (k_pos <= q_pos)
    if window > 0:
        valid = valid & (q_pos - k_pos < window)
    if alibi_slopes is None:
        mask = torch.zeros(valid.shape, dtype=dtype, device=device)
    else:
        mask = -alibi_slopes.to(dtype)[None, :, None, None] * (q_pos - k_pos).to(dtype)
    return mask.masked_fill_(~valid, float("-inf"))


def _capturing() -> bool:
    """Whether a CUDA stream is being captured into a graph, where the value checks above (host
    synchronisations) are not allowed: the general masked path is taken instead."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
