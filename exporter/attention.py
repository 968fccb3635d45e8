"""`LowRankAttention`: one decoder layer's attention, original or folded, in torch.

The attention math is the op's (`eigenkv.plugins.reference.low_rank_attention` defines it; the
torch op and healing's differentiable path compute it with PyTorch's fused attention,
`plugins/sdpa_attention.py`); this module only projects, rotates and caches around it. How keys are cached is a
`RopeMode` (plugins/spec.py):
  NONE     no RoPE: keys cached as the op scores them (rank r_k when folded with the queries)
  ROTATED  RoPE, uncompressed: rotated full-width keys
  PRE      keys cached pre-RoPE at rank r_k; the op reconstructs with key_up [G, r_k, head_dim]
           (G = 1 shared, or Hkv) and rotates at each slot's position
  JOINT    queries and keys rotated at head_dim, then projected per layer: keys by
           `joint_basis` [head_dim, r_k], queries by `joint_query_basis` (default: the same);
           the cache holds post-RoPE rank-r_k keys
QK-norm families (qwen3) normalise each query and key head (`q_norm`, `k_norm` over head_dim)
after W_q/W_k and before RoPE; a nonlinear norm sits between W_k and the key basis, so the key
down-projection cannot fold into W_k: it is `key_down` [Hkv, r_k, head_dim], applied to the
normalised keys (the "key post-projection"). Values still fold into W_v and W_o.
`key_gram` [G, r_k, r_k] (folded modes) is UᵀU of the key up-projection U, so the norm of a
reconstructed key is computed in rank space: ‖U k_r‖² = k_rᵀ (UᵀU) k_r (key-norm eviction).
"""

from __future__ import annotations

import torch
from torch import nn

from eigenkv.plugins.reference import apply_rope
from eigenkv.plugins.sdpa_attention import sdpa_low_rank_attention
from eigenkv.plugins.spec import RopeMode
from eigenkv.plugins.torch_op import low_rank_attention_op


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
    """Preallocated per-layer buffers key [B, Hkv, Smax, r_k_i], value [B, Hkv, Smax, r_v_i] and
    the token position of every slot [B, Hkv, Smax] (int32), in torch (the reference runtime).

    `lengths` [L, B] counts each layer's valid slots per sequence; a step's S new tokens go to
    slots lengths..lengths+S-1 of every layer, with their positions. `keep` compacts chosen slots
    to the front, as the engines' caches do.
    """

    def __init__(self, batch: int, max_len: int, n_kv: int, key_ranks, value_ranks, dtype=torch.float32):
        self.keys = [torch.zeros(batch, n_kv, max_len, r, dtype=dtype) for r in key_ranks]
        self.values = [torch.zeros(batch, n_kv, max_len, r, dtype=dtype) for r in value_ranks]
        self.positions = [torch.zeros(batch, n_kv, max_len, dtype=torch.int32) for _ in key_ranks]
        self.lengths = torch.zeros(len(self.keys), batch, dtype=torch.int64)
        self.max_len = max_len

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor):
        """k [B, Hkv, S, r_k], v [B, Hkv, S, r_v], positions [B, S] -> (key buffer, value buffer,
        lengths after the write [B], slot positions [B, Hkv, Smax]). ValueError when full."""
        seq, lengths = k.shape[2], self.lengths[layer]
        if int(lengths.max()) + seq > self.max_len:
            raise ValueError(f"cache full: {int(lengths.max())} + {seq} tokens > capacity {self.max_len}")
        for buf, new in ((self.keys[layer], k), (self.values[layer], v)):
            buf.scatter_(2, slot_index(lengths, new), new.to(buf.dtype))
        pos = positions[:, None, :, None].expand(-1, k.shape[1], -1, 1).to(torch.int32)
        self.positions[layer].scatter_(2, slot_index(lengths, pos)[..., 0], pos[..., 0])
        return self.keys[layer], self.values[layer], lengths + seq, self.positions[layer]

    def advance(self, seq: int) -> None:
        """After every layer wrote this step's `seq` tokens."""
        self.lengths = self.lengths + seq

    def keep(self, layer: int, seq: int, slots: torch.Tensor) -> None:
        """Keep `slots` [Hkv, k] (slot indices, per KV head) of sequence `seq` in `layer`, moved
        to the front in the given order; the layer's length for that sequence becomes k."""
        for buf in (self.keys[layer], self.values[layer], self.positions[layer]):
            kept = buf[seq].gather(1, slots.long().view(*slots.shape, *([1] * (buf.dim() - 3))).expand(
                -1, -1, *buf.shape[3:]))
            buf[seq, :, : slots.shape[1]] = kept
        self.lengths[layer, seq] = slots.shape[1]


class LowRankAttention(nn.Module):
    """Projections [+ RoPE] + cache + reference op + output projection. x [B, S, hidden]."""

    def __init__(self, q_proj: nn.Linear, k_proj: nn.Linear, v_proj: nn.Linear, o_proj: nn.Linear, *,
                 n_heads: int, n_kv_heads: int, head_dim: int, scale: float, rope_mode: RopeMode,
                 key_up: torch.Tensor | None = None, joint_basis: torch.Tensor | None = None,
                 joint_query_basis: torch.Tensor | None = None, key_gram: torch.Tensor | None = None,
                 alibi_slopes: torch.Tensor | None = None, q_norm: nn.Module | None = None,
                 k_norm: nn.Module | None = None, key_down: torch.Tensor | None = None, window: int = 0,
                 rope: "Rope | None" = None):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = q_proj, k_proj, v_proj, o_proj
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.scale, self.rope_mode = scale, RopeMode(rope_mode)
        self.register_buffer("key_up", key_up)
        self.register_buffer("key_gram", key_gram)
        self.register_buffer("joint_basis", joint_basis)
        self.register_buffer("joint_query_basis", joint_query_basis)
        self.differentiable = False  # True: call the op's math directly (has autograd) instead of the op
        self.register_buffer("alibi_slopes", alibi_slopes)
        self.q_norm, self.k_norm = q_norm, k_norm  # QK-norm (shared with the source model) or None
        self.register_buffer("key_down", key_down)  # [Hkv, r_k, head_dim] after k_norm, or None
        self.window = int(window)  # sliding window in tokens (the query's own included); 0: global
        self.own_rope = rope  # this layer's RoPE tables where they differ from the model's (gemma3 local layers)
        # Identity taps: calibration hooks read full-width queries/keys as projected (after any
        # QK-norm, before RoPE) and rotated here.
        self.projected_query, self.projected_key = nn.Identity(), nn.Identity()
        self.rotated_query, self.rotated_key = nn.Identity(), nn.Identity()

    @property
    def rope(self) -> bool:
        """Whether this layer rotates queries and keys."""
        return self.rope_mode.rope

    @property
    def key_rank(self) -> int:
        if self.joint_basis is not None:
            return self.joint_basis.shape[1]
        if self.key_down is not None:
            return self.key_down.shape[1]
        return self.k_proj.out_features // self.n_kv_heads

    @property
    def value_rank(self) -> int:
        return self.v_proj.out_features // self.n_kv_heads

    def _heads(self, t: torch.Tensor, n: int) -> torch.Tensor:
        b, s, _ = t.shape
        return t.view(b, s, n, -1).transpose(1, 2)

    def layer_rope(self, rope: Rope | None) -> Rope | None:
        """The tables this layer rotates with: its own where it has them, else the model's `rope`."""
        return self.own_rope if self.own_rope is not None else rope

    def with_rope(self, rope: Rope | None) -> "LowRankAttention":
        """A shallow copy (every weight shared) with its own RoPE tables `rope`."""
        import copy
        new = copy.copy(self)
        new._modules, new._buffers = dict(self._modules), dict(self._buffers)
        new.own_rope = rope
        return new

    def project(self, x: torch.Tensor, positions: torch.Tensor, rope: Rope | None):
        """x [B, S, hidden] -> q [B, Hq, S, dq], k [B, Hkv, S, r_k], v [B, Hkv, S, r_v] as cached
        (rotated with the layer's own tables where it has them, else `rope`)."""
        rope = self.layer_rope(rope)
        q = self._heads(self.q_proj(x), self.n_heads)
        k = self._heads(self.k_proj(x), self.n_kv_heads)
        v = self._heads(self.v_proj(x), self.n_kv_heads)
        if self.q_norm is not None:
            q = self.q_norm(q)
        if self.k_norm is not None:
            k = self.k_norm(k)
        q, k = self.projected_query(q), self.projected_key(k)
        if self.key_down is not None:  # [B, Hkv, S, d] -> [B, Hkv, S, r_k] per KV head
            k = k @ self.key_down.transpose(1, 2)
        if self.rope:
            q = self.rotated_query(rope(q, positions))
            if self.rope_mode is not RopeMode.PRE:
                k = self.rotated_key(rope(k, positions))
            if self.rope_mode is RopeMode.JOINT:
                q_basis = self.joint_basis if self.joint_query_basis is None else self.joint_query_basis
                q, k = q @ q_basis, k @ self.joint_basis
        return q, k, v

    def forward(self, x: torch.Tensor, positions: torch.Tensor, rope: Rope | None = None,
                cache=None, layer: int = 0) -> torch.Tensor:
        """x [B, S, hidden], positions [B, S]; `cache.write(layer, k, v, positions)` returns the
        buffers to attend over, the valid lengths after the write and every slot's position
        (cache None: the sequence is the cache)."""
        rope = self.layer_rope(rope)
        q, k, v = self.project(x, positions, rope)
        batch, seq = positions.shape
        if cache is None:
            slots = positions[:, None, :].expand(batch, self.n_kv_heads, seq)
            lengths = torch.full((batch,), seq, dtype=torch.int64)
        else:
            k, v, lengths, slots = cache.write(layer, k, v, positions)
        pre = self.rope_mode is RopeMode.PRE
        attention = sdpa_low_rank_attention if self.differentiable else low_rank_attention_op
        out = attention(
            q, k, v, lengths, positions, scale=self.scale, rope_mode=self.rope_mode.op_code,
            slot_positions=slots, key_up=self.key_up if pre else None,
            rope_cos=rope.cos if pre else None, rope_sin=rope.sin if pre else None,
            alibi_slopes=self.alibi_slopes, window=self.window,
        )  # [B, Hq, S, r_v]
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, -1))
