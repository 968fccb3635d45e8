"""Bases from Gram matrices: eigenvectors sorted by singular value, per head or shared."""

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
