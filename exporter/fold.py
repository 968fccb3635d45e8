"""Fold rank-r factors into the attention weights (computed in float64, stored in the model dtype).

With a layer's `LayerFactors` (down D [r, d], up U [d, r] per head; the paper's bases have
D = Uᵀ), per KV head h and every query head j of h's group:
  values   W_v,h <- D_v,h W_v,h (bias too); W_o[:, j] <- W_o[:, j] U_v,h, or W_o refitted
           by least squares on the attention-output Gram (output-aware methods)
  no RoPE  W_k,h <- D_k,h W_k,h and W_q,j <- U_k,hᵀ W_q,j  (scores qᵀ U D k)
  pre      W_k,h <- D_k,h W_k,h; key_up = U_kᵀ [G, r_k, d] (the op reconstructs and rotates)
  joint    after RoPE: keys @ D_kᵀ, queries @ U_k (one pair per layer)
  QK-norm  (pre mode only) W_k stays; key_down = D_k [Hkv, r_k, d] applies after k_norm
Factors with D U = I at full rank reproduce the original model to round-off; at key rank d the
fold uses D_k = U_k = I (the cached keys are the original keys exactly, whatever the method's basis).
Every folded layer also keeps key_gram = U_kᵀU_k [G, r_k, r_k] (computed before U_k folds into
W_q where it does), so a cached key's reconstructed norm is a rank-space product.
"""

from __future__ import annotations

import torch
from torch import nn

from eigenkv.errors import EigenError
from eigenkv.exporter.attention import LowRankAttention
from eigenkv.exporter.decoder import EigenDecoder
from eigenkv.exporter.decompose import LayerBases, LayerFactors, eigen_factors
from eigenkv.plugins.spec import RopeMode


def _linear(weight: torch.Tensor, bias: torch.Tensor | None, like: nn.Linear) -> nn.Linear:
    out = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None,
                    dtype=like.weight.dtype, device=like.weight.device)
    with torch.no_grad():
        out.weight.copy_(weight)
        if bias is not None:
            out.bias.copy_(bias)
    return out


def _project_rows(lin: nn.Linear, down: torch.Tensor, n_heads: int, group: int) -> nn.Linear:
    """Rows of head j (d of them) -> D_{j//group} rows: lin [H*d, in] -> [H*r, in]; down [G, r, d]."""
    w = lin.weight.detach().to(torch.float64).view(n_heads, -1, lin.in_features)
    m = down.to(torch.float64).repeat_interleave(group, dim=0)  # [H, r, d]
    w_new = torch.einsum("hrd,hdi->hri", m, w).reshape(-1, lin.in_features)
    b_new = None
    if lin.bias is not None:
        b = lin.bias.detach().to(torch.float64).view(n_heads, -1)
        b_new = torch.einsum("hrd,hd->hr", m, b).reshape(-1)
    return _linear(w_new, b_new, lin)


def _project_cols(lin: nn.Linear, up: torch.Tensor, n_heads: int, group: int) -> nn.Linear:
    """Input columns of head j -> times U_{j//group}: lin [out, H*d] -> [out, H*r]; up [G, d, r]."""
    w = lin.weight.detach().to(torch.float64).view(lin.out_features, n_heads, -1)
    u = up.to(torch.float64).repeat_interleave(group, dim=0)  # [H, d, r]
    w_new = torch.einsum("ohd,hdr->ohr", w, u).reshape(lin.out_features, -1)
    bias = None if lin.bias is None else lin.bias.detach()
    return _linear(w_new, bias, lin)


def refit_output(o_proj: nn.Linear, value_down: torch.Tensor, gram: torch.Tensor, n_heads: int,
                 ridge: float = 1e-9) -> nn.Linear:
    """Least-squares W_o' [out, Hq*r] minimising Σ ||W_o a - W_o' Â a||² over the calibration
    attention outputs a [Hq*d] (Gram `gram`), Â = blockdiag(D_{h(j)}): cross-head terms included.
    value_down [Hkv, r, d]. W_o' = W_o C Âᵀ (Â C Âᵀ + ridge)⁻¹."""
    n_kv, r, d = value_down.shape
    a_hat = torch.block_diag(*value_down.to(torch.float64).repeat_interleave(n_heads // n_kv, dim=0))
    c = gram.to(torch.float64)
    lhs = a_hat @ c @ a_hat.T
    lhs = lhs + ridge * lhs.diagonal().mean() * torch.eye(lhs.shape[0], dtype=lhs.dtype)
    w = o_proj.weight.detach().to(torch.float64)
    w_new = torch.linalg.solve(lhs, (w @ c @ a_hat.T).T).T
    bias = None if o_proj.bias is None else o_proj.bias.detach()
    return _linear(w_new, bias, o_proj)


def fold_attention(attn: LowRankAttention, factors: LayerFactors | LayerBases, key_rank: int, value_rank: int,
                   rope_mode: str) -> LowRankAttention:
    """A new attention module caching rank-`key_rank` keys and rank-`value_rank` values."""
    if isinstance(factors, LayerBases):
        factors = eigen_factors(factors)
    d = attn.head_dim
    for what, r in (("key", key_rank), ("value", value_rank)):
        if not 1 <= r <= d:
            raise EigenError(f"{what} rank {r} is out of range: ranks must be in 1..head_dim ({d})")
    group = attn.n_heads // attn.n_kv_heads
    d_v, u_v = factors.value_down[:, :value_rank], factors.value_up[:, :, :value_rank]
    d_k, u_k = factors.key_down[:, :key_rank], factors.key_up[:, :, :key_rank]
    if key_rank == d:  # full width: the identity basis, so the cached keys are the original keys (exact; the ORT
        d_k = u_k = torch.eye(d, dtype=d_k.dtype).expand_as(d_k)  # backend runs such a layer on its fused kernel)
    v_proj = _project_rows(attn.v_proj, d_v, attn.n_kv_heads, 1)
    if factors.output_gram is not None:
        o_proj = refit_output(attn.o_proj, d_v, factors.output_gram, attn.n_heads, factors.output_ridge)
    else:
        o_proj = _project_cols(attn.o_proj, u_v, attn.n_heads, group)
    q_proj, k_proj, key_up, joint_k, joint_q = attn.q_proj, attn.k_proj, None, None, None
    dtype = attn.k_proj.weight.dtype
    per_head = d_k.shape[0] == attn.n_kv_heads
    u64 = u_k.to(torch.float64)
    key_gram = (u64.transpose(1, 2) @ u64).to(dtype).contiguous()  # [G, r_k, r_k]
    key_down = None
    if attn.k_norm is not None and not (attn.rope and rope_mode in (RopeMode.PRE, RopeMode.JOINT)):
        raise EigenError(f"keys normalised per head (QK-norm) fold in the pre or joint RoPE modes only, "
                         f"not {rope_mode!r}")
    if attn.rope and rope_mode == RopeMode.PRE and attn.k_norm is not None:
        key_down = d_k.expand(attn.n_kv_heads, -1, -1).to(dtype).contiguous()  # after k_norm
        key_up = u_k.transpose(1, 2).to(dtype).contiguous()  # [G, r_k, d]
        mode = RopeMode.PRE
    elif not attn.rope:
        k_proj = _project_rows(attn.k_proj, d_k.expand(attn.n_kv_heads, -1, -1), attn.n_kv_heads, 1)
        q_proj = _project_rows(attn.q_proj, u_k.transpose(1, 2).expand(attn.n_kv_heads, -1, -1),
                               attn.n_heads, group)
        mode = RopeMode.NONE
    elif rope_mode == RopeMode.PRE:
        k_proj = _project_rows(attn.k_proj, d_k.expand(attn.n_kv_heads, -1, -1), attn.n_kv_heads, 1)
        key_up = u_k.transpose(1, 2).to(dtype).contiguous()  # [G, r_k, d]
        mode = RopeMode.PRE
    else:
        if per_head and attn.n_kv_heads > 1:
            raise EigenError("joint RoPE mode needs one key basis per layer (shared), not per-head factors")
        joint_k = d_k[0].T.to(dtype).contiguous()  # [d, r_k]
        joint_q = u_k[0].to(dtype).contiguous()
        key_gram = key_gram[:1]
        mode = RopeMode.JOINT
    return LowRankAttention(q_proj, k_proj, v_proj, o_proj, n_heads=attn.n_heads, n_kv_heads=attn.n_kv_heads,
                            head_dim=d, scale=attn.scale, rope_mode=mode, key_up=key_up, joint_basis=joint_k,
                            joint_query_basis=joint_q, key_gram=key_gram, alibi_slopes=attn.alibi_slopes,
                            q_norm=attn.q_norm, k_norm=attn.k_norm, key_down=key_down, window=attn.window,
                            rope=attn.own_rope)


def fold(decoder: EigenDecoder, factors: list, key_ranks: list[int], value_ranks: list[int],
         rope_mode: str) -> EigenDecoder:
    """The folded decoder (shares every non-attention module with `decoder`); factors: one
    LayerFactors (or LayerBases) per layer."""
    n = decoder.dims.n_layers
    if not len(factors) == len(key_ranks) == len(value_ranks) == n:
        raise EigenError(f"need factors and ranks for all {n} layers, got {len(factors)}/{len(key_ranks)}/{len(value_ranks)}")
    return decoder.with_attention([
        fold_attention(layer.attn, f, kr, vr, rope_mode)
        for layer, f, kr, vr in zip(decoder.layers, factors, key_ranks, value_ranks)])


def attention_from_tensors(attn: LowRankAttention, tensors: dict, key_mode: str) -> LowRankAttention:
    """Rebuild a folded attention module from saved tensors (`artifacts.load_projections`);
    `attn` is the original module (geometry, and the projections the fold left unchanged).
    key_mode: a RopeMode value, or "plain" (files written before RopeMode: the original's mode)."""
    mode = attn.rope_mode if key_mode == "plain" else RopeMode.parse(key_mode)
    tensors = dict(tensors)
    if tensors.get("key_gram") is None:  # files written before the Gram was saved: rebuild it where possible
        up = tensors.get("key_up")  # [G, r, d] = Uᵀ
        up = up if up is not None else (None if tensors.get("joint_query_basis") is None
                                         else tensors["joint_query_basis"].T[None])
        if up is not None:
            tensors["key_gram"] = (up.double() @ up.double().transpose(1, 2)).float()
    def lin(name: str, like: nn.Linear) -> nn.Linear:
        w = tensors.get(f"{name}.weight")
        return like if w is None else _linear(w, tensors.get(f"{name}.bias"), like)
    dtype = attn.k_proj.weight.dtype
    get = lambda n: None if tensors.get(n) is None else tensors[n].to(dtype)  # noqa: E731
    return LowRankAttention(lin("q_proj", attn.q_proj), lin("k_proj", attn.k_proj), lin("v_proj", attn.v_proj),
                            lin("o_proj", attn.o_proj), n_heads=attn.n_heads, n_kv_heads=attn.n_kv_heads,
                            head_dim=attn.head_dim, scale=attn.scale, rope_mode=mode, key_up=get("key_up"),
                            joint_basis=get("joint_basis"), joint_query_basis=get("joint_query_basis"),
                            key_gram=get("key_gram"), alibi_slopes=attn.alibi_slopes, q_norm=attn.q_norm,
                            k_norm=attn.k_norm, key_down=get("key_down"), window=attn.window, rope=attn.own_rope)
