"""Reference math of the `eigen::LowRankAttention` op, in plain torch.

This is the op's definition: the torch module, the ONNX function and any kernel must
agree with it. It runs in the dtype it is given (use float64 for reference checks); the
softmax is computed in at least float32.

Shapes (B batch, Hq query heads, Hkv KV heads, S new tokens, Smax cache slots):
  query          [B, Hq, S, dq]     dq = head_dim in `pre` mode (already rotated), else r_k
  key_cache      [B, Hkv, Smax, r_k]
  value_cache    [B, Hkv, Smax, r_v]
  cache_lengths  int [B]            valid slots after this step's write
  query_positions int [B, S]        absolute position of each query token
  slot_positions int [B, Hkv, Smax] position of the token in each slot (None: slot index)
  key_up         [1 or Hkv, r_k, head_dim]   `pre` mode only: K = K_r @ key_up
  rope_cos/sin   [P, head_dim]      `pre` mode only: tables indexed by position
  alibi_slopes   [Hq]               optional ALiBi bias: -slope * (q_pos - k_pos)
  window         int                sliding window: slot visible only when q_pos - k_pos < window (0: none)
  returns        [B, Hq, S, r_v]
"""

from __future__ import annotations

import torch

from eigenkv.plugins.spec import ROPE_NONE, ROPE_PRE  # noqa: F401 - re-exported: the op's attribute values


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[..., d] -> [..., d]: (-x2, x1), the Llama/NeoX RoPE convention."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [..., N, d] at integer positions [..., N] with tables [P, d]."""
    c = cos[positions.long()].to(x.dtype)
    s = sin[positions.long()].to(x.dtype)
    return x * c + rotate_half(x) * s


def _expand_kv(t: torch.Tensor, groups: int) -> torch.Tensor:
    """[B, Hkv, N, r] -> [B, Hkv * groups, N, r] (query head h reads KV head h // groups)."""
    return t if groups == 1 else t.repeat_interleave(groups, dim=1)


def low_rank_attention(
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
    """Attention of the new queries over the cached (compressed) keys and values."""
    batch, n_q, _, _ = query.shape
    n_kv, n_slots = key_cache.shape[1], key_cache.shape[2]
    if n_q % n_kv:
        raise ValueError(f"query heads ({n_q}) must be a multiple of KV heads ({n_kv})")
    if slot_positions is None:
        slot_positions = torch.arange(n_slots, device=query.device).expand(batch, n_kv, n_slots)
    keys = key_cache
    if rope_mode == ROPE_PRE:
        if key_up is None or rope_cos is None or rope_sin is None:
            raise ValueError("rope_mode=pre needs key_up, rope_cos and rope_sin")
        keys = apply_rope(keys @ key_up.to(keys.dtype), slot_positions, rope_cos, rope_sin)
    elif rope_mode != ROPE_NONE:
        raise ValueError(f"rope_mode must be {ROPE_NONE} (none) or {ROPE_PRE} (pre), got {rope_mode}")
    probs = attention_probs(query, keys, cache_lengths, query_positions, scale=scale, causal=causal,
                            slot_positions=slot_positions, alibi_slopes=alibi_slopes, window=window)
    values = _expand_kv(value_cache, n_q // n_kv)
    return (probs @ values.to(probs.dtype)).to(query.dtype)


def attention_probs(
    query: torch.Tensor,
    keys: torch.Tensor,
    cache_lengths: torch.Tensor,
    query_positions: torch.Tensor,
    *,
    scale: float,
    causal: bool = True,
    slot_positions: torch.Tensor | None = None,
    alibi_slopes: torch.Tensor | None = None,
    window: int = 0,
) -> torch.Tensor:
    """The op's attention weights: query [B, Hq, S, dq] over keys [B, Hkv, Smax, dq] as scored
    (rotated and rebuilt to head_dim in `pre` mode) -> probabilities [B, Hq, S, Smax] in at least
    float32 (the query's dtype when wider); rows with no valid slot are zeros. Masks, ALiBi and the
    window as in `low_rank_attention` (whose definition this is); slot_positions [B, Hkv, Smax] or None."""
    batch, n_q, n_kv, n_slots = query.shape[0], query.shape[1], keys.shape[1], keys.shape[2]
    if slot_positions is None:
        slot_positions = torch.arange(n_slots, device=query.device).expand(batch, n_kv, n_slots)
    groups = n_q // n_kv
    keys = _expand_kv(keys, groups)
    work = torch.promote_types(query.dtype, torch.float32)
    scores = (query.to(work) @ keys.to(work).transpose(-1, -2)) * scale  # [B, Hq, S, Smax]
    k_pos = _expand_kv(slot_positions, groups).unsqueeze(2).long()  # [B, Hq, 1, Smax]
    q_pos = query_positions.long()[:, None, :, None]  # [B, 1, S, 1]
    if alibi_slopes is not None:
        scores = scores - alibi_slopes.to(work)[None, :, None, None] * (q_pos - k_pos)
    valid = torch.arange(n_slots, device=query.device)[None, None, None, :] < cache_lengths.long()[:, None, None, None]
    if causal:
        valid = valid & (k_pos <= q_pos)
    if window > 0:  # transformers' sliding_window_overlay: kv > q - window
        valid = valid & (q_pos - k_pos < window)
    scores = scores.masked_fill(~valid, float("-inf"))
    return torch.softmax(scores, dim=-1).nan_to_num(0.0)  # rows with no valid slot give zeros
