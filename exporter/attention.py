"""`LowRankAttention`: one decoder layer's attention, original or folded, in torch.

The attention math is `eigenkv.plugins.reference.low_rank_attention` (the op's reference);
this module only projects, rotates and caches around it. Key modes:
  plain  keys cached as the op scores them: no RoPE, rotated full-width keys, or keys
         folded to rank r_k with queries folded the same way (non-RoPE models)
  pre    RoPE models: keys cached pre-RoPE at rank r_k; the op reconstructs with key_up
         [G, r_k, head_dim] (G = 1 shared, or Hkv) and rotates at each slot's position
  joint  RoPE models: queries and keys rotated at head_dim, then projected per layer:
         keys by `joint_basis` [head_dim, r_k], queries by `joint_query_basis` (default: the
         same); the cache holds post-RoPE rank-r_k keys
"""

from __future__ import annotations

import torch
from torch import nn

from eigenkv.plugins.reference import ROPE_NONE, ROPE_PRE, apply_rope, low_rank_attention
from eigenkv.plugins.torch_op import low_rank_attention_op

KEY_MODES = ("plain", "pre", "joint")


class Rope(nn.Module):
    """Cos/sin tables [P, head_dim] for positions 0..P-1, taken from the source model."""

    def __init__(self, cos: torch.Tensor, sin: torch.Tensor):
        super().__init__()
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x [B, H, S, d] rotated at positions [B, S]."""
        return apply_rope(x, positions[:, None, :], self.cos, self.sin)


def slot_index(starts: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
    """Scatter index writing update [B, H, S, r] at slots starts[b] + 0..S-1 along dim 2."""
    slots = starts[:, None] + torch.arange(update.shape[2])  # [B, S]
    return slots[:, None, :, None].expand(-1, update.shape[1], -1, update.shape[3])


class KVCache:
    """Preallocated per-layer buffers key [B, Hkv, Smax, r_k_i], value [B, Hkv, Smax, r_v_i].

    `lengths` [B] counts the valid slots of each sequence; a step's S new tokens go to
    slots lengths..lengths+S-1 (no eviction, so a slot's position is its index).
    """

    def __init__(self, batch: int, max_len: int, n_kv: int, key_ranks, value_ranks, dtype=torch.float32):
        self.keys = [torch.zeros(batch, n_kv, max_len, r, dtype=dtype) for r in key_ranks]
        self.values = [torch.zeros(batch, n_kv, max_len, r, dtype=dtype) for r in value_ranks]
        self.lengths = torch.zeros(batch, dtype=torch.int64)
        self.max_len = max_len

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """k [B, Hkv, S, r_k], v [B, Hkv, S, r_v] -> (key buffer, value buffer, lengths after [B])."""
        seq = k.shape[2]
        if int(self.lengths.max()) + seq > self.max_len:
            raise ValueError(f"cache full: {int(self.lengths.max())} + {seq} tokens > capacity {self.max_len}")
        for buf, new in ((self.keys[layer], k), (self.values[layer], v)):
            buf.scatter_(2, slot_index(self.lengths, new), new.to(buf.dtype))
        return self.keys[layer], self.values[layer], self.lengths + seq

    def advance(self, seq: int) -> None:
        """After every layer wrote this step's `seq` tokens."""
        self.lengths = self.lengths + seq


class LowRankAttention(nn.Module):
    """Projections [+ RoPE] + cache + reference op + output projection. x [B, S, hidden]."""

    def __init__(self, q_proj: nn.Linear, k_proj: nn.Linear, v_proj: nn.Linear, o_proj: nn.Linear, *,
                 n_heads: int, n_kv_heads: int, head_dim: int, scale: float, rope: bool,
                 key_mode: str = "plain", key_up: torch.Tensor | None = None,
                 joint_basis: torch.Tensor | None = None, joint_query_basis: torch.Tensor | None = None,
                 alibi_slopes: torch.Tensor | None = None):
        super().__init__()
        if key_mode not in KEY_MODES:
            raise ValueError(f"key_mode must be one of {KEY_MODES}")
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = q_proj, k_proj, v_proj, o_proj
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.scale, self.rope, self.key_mode = scale, rope, key_mode
        self.register_buffer("key_up", key_up)
        self.register_buffer("joint_basis", joint_basis)
        self.register_buffer("joint_query_basis", joint_query_basis)
        self.differentiable = False  # True: call the reference math (has autograd) instead of the op
        self.register_buffer("alibi_slopes", alibi_slopes)
        # Identity taps: calibration hooks read rotated full-width queries/keys here.
        self.rotated_query, self.rotated_key = nn.Identity(), nn.Identity()

    @property
    def key_rank(self) -> int:
        return self.k_proj.out_features // self.n_kv_heads if self.joint_basis is None else self.joint_basis.shape[1]

    @property
    def value_rank(self) -> int:
        return self.v_proj.out_features // self.n_kv_heads

    def _heads(self, t: torch.Tensor, n: int) -> torch.Tensor:
        b, s, _ = t.shape
        return t.view(b, s, n, -1).transpose(1, 2)

    def project(self, x: torch.Tensor, positions: torch.Tensor, rope: Rope | None):
        """x [B, S, hidden] -> q [B, Hq, S, dq], k [B, Hkv, S, r_k], v [B, Hkv, S, r_v] as cached."""
        q = self._heads(self.q_proj(x), self.n_heads)
        k = self._heads(self.k_proj(x), self.n_kv_heads)
        v = self._heads(self.v_proj(x), self.n_kv_heads)
        if self.rope:
            q = self.rotated_query(rope(q, positions))
            if self.key_mode != "pre":
                k = self.rotated_key(rope(k, positions))
            if self.key_mode == "joint":
                q_basis = self.joint_basis if self.joint_query_basis is None else self.joint_query_basis
                q, k = q @ q_basis, k @ self.joint_basis
        return q, k, v

    def forward(self, x: torch.Tensor, positions: torch.Tensor, rope: Rope | None = None,
                cache=None, layer: int = 0) -> torch.Tensor:
        """x [B, S, hidden], positions [B, S]; `cache.write(layer, k, v)` returns the buffers to
        attend over and the valid lengths after the write (None: the sequence is the cache)."""
        q, k, v = self.project(x, positions, rope)
        batch, seq = positions.shape
        if cache is None:
            slots = positions[:, None, :].expand(batch, self.n_kv_heads, seq)
            lengths = torch.full((batch,), seq, dtype=torch.int64)
        else:
            k, v, lengths = cache.write(layer, k, v)
            slots = None  # slot index = position
        pre = self.rope and self.key_mode == "pre"
        attention = low_rank_attention if self.differentiable else low_rank_attention_op
        out = attention(
            q, k, v, lengths, positions, scale=self.scale, rope_mode=ROPE_PRE if pre else ROPE_NONE,
            slot_positions=slots, key_up=self.key_up if pre else None,
            rope_cos=rope.cos if pre else None, rope_sin=rope.sin if pre else None,
            alibi_slopes=self.alibi_slopes,
        )  # [B, Hq, S, r_v]
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, -1))
