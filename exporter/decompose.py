"""Bases from Gram matrices: the paper's eigenvectors (`LayerBases`), and the general
down/up factor pairs every basis method produces (`LayerFactors`), which `fold` consumes."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from eigenkv.exporter.calibrate import LayerStats

ROPE_MODES = ("pre", "joint")


@dataclass
class LayerBases:
    """Orthonormal bases (columns, strongest first) and singular values of one layer.

    key   [G, d, d] with G = 1 (shared; RoPE models) or Hkv (per KV head; other models)
    value [Hkv, d, d]
    key_sv [G, d], value_sv [Hkv, d]  singular values of the stacked activations
    """

    key: torch.Tensor
    key_sv: torch.Tensor
    value: torch.Tensor
    value_sv: torch.Tensor


@dataclass
class LayerFactors:
    """Rank-ordered down/up projections of one layer, usable at any rank r.

    A cached key is key_down[g, :r] @ k and k ≈ key_up[g, :, :r] @ cached (same for values);
    G = 1 (shared) or Hkv (per KV head) for keys, Hkv for values.
    key_down, key_up [G, d, d]; value_down, value_up [Hkv, d, d]
    key_loss, value_loss [d + 1]: the method's objective when r directions are kept (r = 0..d)
    output_gram [Hq*d, Hq*d] or None: attention-output Gram; when set, the fold refits W_o by
        least squares on it (output-aware values) instead of folding value_up into W_o.
    """

    key_down: torch.Tensor
    key_up: torch.Tensor
    key_loss: torch.Tensor
    value_down: torch.Tensor
    value_up: torch.Tensor
    value_loss: torch.Tensor
    output_gram: torch.Tensor | None = None
    output_ridge: float = 1e-9  # relative ridge of that refit


def identity_factors(like: LayerFactors) -> LayerFactors:
    """Factors that keep a layer's keys and values as they are (down = up = I, shapes of `like`,
    no output refit): folded at full rank, the layer is the original attention exactly."""
    eye = lambda t: torch.eye(t.shape[-1], dtype=t.dtype).expand_as(t).clone()  # noqa: E731
    return LayerFactors(eye(like.key_down), eye(like.key_up), torch.zeros_like(like.key_loss),
                        eye(like.value_down), eye(like.value_up), torch.zeros_like(like.value_loss))


def tail_loss(sv: torch.Tensor) -> torch.Tensor:
    """sv [H, d] -> [d + 1]: Σ_h Σ_{i>=r} s_h,i², the energy left out at rank r."""
    e = sv.pow(2).sum(0)
    return torch.cat([e.flip(0).cumsum(0).flip(0), e.new_zeros(1)])


def eigen_factors(bases: LayerBases) -> LayerFactors:
    """The paper's orthonormal bases as factors: down = Uᵀ, up = U, loss = energy left out."""
    return LayerFactors(bases.key.transpose(1, 2), bases.key, tail_loss(bases.key_sv),
                        bases.value.transpose(1, 2), bases.value, tail_loss(bases.value_sv))


def eig_basis(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """gram [H, d, d] (XᵀX) -> (basis [H, d, d], singular values [H, d]), descending."""
    evals, evecs = torch.linalg.eigh(gram.to(torch.float64))
    order = torch.argsort(evals, dim=-1, descending=True)
    evals = torch.gather(evals, -1, order).clamp_min(0.0)
    evecs = torch.gather(evecs, -1, order[:, None, :].expand_as(evecs))
    return evecs, evals.sqrt()


def layer_bases(stats: LayerStats, rope: bool, rope_mode: str) -> LayerBases:
    """The paper's bases: RoPE `pre` -> pre-RoPE keys shared by all KV heads; `joint` ->
    rotated queries+keys shared; no RoPE -> keys+queries per KV head; values per KV head."""
    if rope_mode not in ROPE_MODES:
        raise ValueError(f"rope_mode must be one of {ROPE_MODES}")
    if not rope:
        key_gram = stats.key_pre
    elif rope_mode == "pre":
        key_gram = stats.key_pre.sum(0, keepdim=True)
    else:
        key_gram = stats.key_joint
    key, key_sv = eig_basis(key_gram)
    value, value_sv = eig_basis(stats.value)
    return LayerBases(key, key_sv, value, value_sv)


def decompose(stats: list[LayerStats], rope: bool, rope_mode: str) -> list[LayerBases]:
    return [layer_bases(s, rope, rope_mode) for s in stats]
