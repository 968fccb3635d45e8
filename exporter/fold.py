"""Fold rank-r bases into the attention weights (computed in float64, stored in the model dtype).

Per KV head h with value basis U_v,h [d, r_v]: W_v,h <- U_v,hᵀ W_v,h (bias too), and for
every query head j of h's group: W_o[:, j] <- W_o[:, j] U_v,h. Keys:
  no RoPE  per KV head U_k,h [d, r_k]: W_k,h <- U_k,hᵀ W_k,h and W_q,j <- U_k,hᵀ W_q,j
  pre      shared U_k: W_k,h <- U_kᵀ W_k,h; key_up = U_kᵀ [1, r_k, d] (op reconstructs)
  joint    shared U_k applied after RoPE to queries and keys (joint_basis = U_k)
Orthonormal U at full rank reproduces the original model to round-off.
"""

from __future__ import annotations

import torch
from torch import nn

from eigenkv.errors import EigenError
from eigenkv.exporter.attention import LowRankAttention
from eigenkv.exporter.decoder import EigenDecoder
from eigenkv.exporter.decompose import LayerBases


def _linear(weight: torch.Tensor, bias: torch.Tensor | None, like: nn.Linear) -> nn.Linear:
    out = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None,
                    dtype=like.weight.dtype, device=like.weight.device)
    with torch.no_grad():
        out.weight.copy_(weight)
        if bias is not None:
            out.bias.copy_(bias)
    return out


def _project_rows(lin: nn.Linear, bases: torch.Tensor, n_heads: int, group: int) -> nn.Linear:
    """Rows of head j (d of them) -> U_{j//group}ᵀ rows: lin [H*d, in] -> [H*r, in]."""
    w = lin.weight.detach().to(torch.float64).view(n_heads, -1, lin.in_features)
    u = bases.to(torch.float64).repeat_interleave(group, dim=0)  # [H, d, r]
    w_new = torch.einsum("hdr,hdi->hri", u, w).reshape(-1, lin.in_features)
    b_new = None
    if lin.bias is not None:
        b = lin.bias.detach().to(torch.float64).view(n_heads, -1)
        b_new = torch.einsum("hdr,hd->hr", u, b).reshape(-1)
    return _linear(w_new, b_new, lin)


def _project_cols(lin: nn.Linear, bases: torch.Tensor, n_heads: int, group: int) -> nn.Linear:
    """Input columns of head j -> times U_{j//group}: lin [out, H*d] -> [out, H*r]."""
    w = lin.weight.detach().to(torch.float64).view(lin.out_features, n_heads, -1)
    u = bases.to(torch.float64).repeat_interleave(group, dim=0)  # [H, d, r]
    w_new = torch.einsum("ohd,hdr->ohr", w, u).reshape(lin.out_features, -1)
    bias = None if lin.bias is None else lin.bias.detach()
    return _linear(w_new, bias, lin)


def fold_attention(attn: LowRankAttention, bases: LayerBases, key_rank: int, value_rank: int,
                   rope_mode: str) -> LowRankAttention:
    """A new attention module caching rank-`key_rank` keys and rank-`value_rank` values."""
    d = attn.head_dim
    for what, r in (("key", key_rank), ("value", value_rank)):
        if not 1 <= r <= d:
            raise EigenError(f"{what} rank {r} is out of range: ranks must be in 1..head_dim ({d})")
    group = attn.n_heads // attn.n_kv_heads
    u_v = bases.value[:, :, :value_rank]
    u_k = bases.key[:, :, :key_rank]
    v_proj = _project_rows(attn.v_proj, u_v, attn.n_kv_heads, 1)
    o_proj = _project_cols(attn.o_proj, u_v, attn.n_heads, group)
    q_proj, k_proj, key_up, joint = attn.q_proj, attn.k_proj, None, None
    dtype = attn.k_proj.weight.dtype
    if not attn.rope:
        k_proj = _project_rows(attn.k_proj, u_k, attn.n_kv_heads, 1)
        q_proj = _project_rows(attn.q_proj, u_k, attn.n_heads, group)
        mode = "plain"
    elif rope_mode == "pre":
        k_proj = _project_rows(attn.k_proj, u_k.expand(attn.n_kv_heads, -1, -1), attn.n_kv_heads, 1)
        key_up = u_k.transpose(1, 2).to(dtype).contiguous()  # [1, r_k, d]
        mode = "pre"
    else:
        joint = u_k[0].to(dtype).contiguous()  # [d, r_k]
        mode = "joint"
    return LowRankAttention(q_proj, k_proj, v_proj, o_proj, n_heads=attn.n_heads, n_kv_heads=attn.n_kv_heads,
                            head_dim=d, scale=attn.scale, rope=attn.rope, key_mode=mode, key_up=key_up,
                            joint_basis=joint, alibi_slopes=attn.alibi_slopes)


def fold(decoder: EigenDecoder, bases: list[LayerBases], key_ranks: list[int], value_ranks: list[int],
         rope_mode: str) -> EigenDecoder:
    """The folded decoder (shares every non-attention module with `decoder`)."""
    n = decoder.dims.n_layers
    if not len(bases) == len(key_ranks) == len(value_ranks) == n:
        raise EigenError(f"need bases and ranks for all {n} layers, got {len(bases)}/{len(key_ranks)}/{len(value_ranks)}")
    return decoder.with_attention([
        fold_attention(layer.attn, b, kr, vr, rope_mode)
        for layer, b, kr, vr in zip(decoder.layers, bases, key_ranks, value_ranks)])
