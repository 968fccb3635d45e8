"""Rank selection: the paper's per-layer error-budget search, and a global KV-ratio target.

Ranks are per layer, the same for every head of a layer (the cache stays rectangular);
keys and values are ranked separately.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from eigenkv.errors import EigenError
from eigenkv.exporter.decompose import LayerBases


@dataclass(frozen=True)
class SearchSettings:
    """The paper's search: threshold from `start` down by `step` while the relative error of
    the layer output stays within `budget`; ranks never below `floor` × head_dim."""

    budget: float = 0.025
    start: float = 1.0
    step: float = 0.02
    floor: float = 0.45
    max_samples: int = 4  # calibration samples used to measure the layer error


def default_search(budget: float, rope: bool) -> SearchSettings:
    """Paper defaults: RoPE (Llama) starts at 1.0 with floor 0.45; OPT/MPT start at 0.98."""
    return SearchSettings(budget=budget, start=1.0 if rope else 0.98, floor=0.45 if rope else 0.0)


def threshold_rank(sv: torch.Tensor, threshold: float) -> int:
    """sv [H, d] -> smallest r whose cumulative share of Σs reaches `threshold`, max over heads."""
    share = sv.cumsum(-1) / sv.sum(-1, keepdim=True).clamp_min(1e-300)
    ranks = (share < threshold - 1e-9).sum(-1) + 1
    return int(ranks.clamp(max=sv.shape[-1]).max())


def check_kv_ratio(ratio: float) -> None:
    if not 0.0 < ratio <= 1.0:
        raise EigenError(f"--kv-ratio must be in (0, 1] (compressed KV bytes / original), got {ratio}")


def allocate(key_curves: list[torch.Tensor], value_curves: list[torch.Tensor], ratio: float,
             min_rank: int = 1) -> tuple[list[int], list[int]]:
    """Global target: drop directions, cheapest first, until KV bytes <= ratio × original.

    key_curves[i], value_curves[i] [d + 1]: predicted cost of layer i's keys (values) at
    rank r = 0..d, non-increasing in r. Dropping direction r costs curve[r] - curve[r+1];
    every key/value direction costs the same bytes.
    """
    check_kv_ratio(ratio)
    d = key_curves[0].numel() - 1
    candidates = []  # (cost, layer, kind, rank after the drop)
    for kind, curves in (("key", key_curves), ("value", value_curves)):
        for i, c in enumerate(curves):
            marginal = (c[:-1] - c[1:]).tolist()
            candidates += [(marginal[r], i, kind, r) for r in range(min_rank, d)]
    candidates.sort(key=lambda c: (c[0], -c[3]))  # ties: drop the highest index first
    n = len(key_curves)
    ranks = {"key": [d] * n, "value": [d] * n}
    total, target = 2 * d * n, ratio * 2 * d * n
    for _, i, kind, r in candidates:
        if total <= target + 1e-9:
            break
        if ranks[kind][i] == r + 1:  # only drop the layer's last kept direction
            ranks[kind][i] = r
            total -= 1
    return ranks["key"], ranks["value"]


def energy_curves(factors) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Each layer's objective curve as a share of its total (the energy allocation)."""
    return ([f.key_loss / f.key_loss[0].clamp_min(1e-300) for f in factors],
            [f.value_loss / f.value_loss[0].clamp_min(1e-300) for f in factors])


def allocate_kv_ratio(bases: list[LayerBases], ratio: float, n_kv_heads: int) -> tuple[list[int], list[int]]:
    """Energy allocation of the paper's bases: dropping direction r of a layer's keys (or
    values) costs the share of that layer's activation energy it carries, Σ_h s_h,r² / Σ_h ||s_h||²."""
    from eigenkv.exporter.decompose import eigen_factors
    return allocate(*energy_curves([eigen_factors(b) for b in bases]), ratio)


def kv_ratio(key_ranks: list[int], value_ranks: list[int], head_dim: int) -> float:
    """Compressed KV bytes / original (same dtype): Σ(r_k + r_v) / (2 · L · head_dim)."""
    return (sum(key_ranks) + sum(value_ranks)) / (2 * head_dim * len(key_ranks))


class ErrorBudgetSearch:
    """Per-layer search (the paper's), run as `calibrate(..., on_layer=search)`.

    Each layer is judged on the uncompressed layer's inputs, so errors do not accumulate
    during calibration. Results: `key_ranks`, `value_ranks`, `errors` (relative Frobenius
    error of the layer output at the chosen ranks), `thresholds`.
    """

    def __init__(self, decoder, settings: SearchSettings, rope_mode: str):
        self.decoder, self.settings, self.rope_mode = decoder, settings, rope_mode
        self.key_ranks: list[int] = []
        self.value_ranks: list[int] = []
        self.errors: list[float] = []
        self.thresholds: list[float] = []

    def _ranks(self, bases: LayerBases, threshold: float) -> tuple[int, int]:
        d = bases.value.shape[1]
        floor = max(1, math.ceil(self.settings.floor * d))
        return (max(threshold_rank(bases.key_sv, threshold), floor),
                max(threshold_rank(bases.value_sv, threshold), floor))

    @torch.no_grad()
    def _error(self, i, bases, ranks, inputs, outputs) -> float:
        from eigenkv.exporter.fold import fold_attention
        old = self.decoder.layers[i]
        layer = old.with_attn(fold_attention(old.attn, bases, *ranks, self.rope_mode))
        positions = torch.arange(inputs.shape[1]).expand(inputs.shape[0], -1)
        approx = layer(inputs, positions, self.decoder.rope)
        return float((outputs - approx).norm() / outputs.norm().clamp_min(1e-30))

    def __call__(self, i, inputs, outputs, stats) -> None:
        from eigenkv.exporter.decompose import layer_bases
        bases = layer_bases(stats, self.decoder.layers[i].attn.rope, self.rope_mode)
        x, y = inputs[: self.settings.max_samples], outputs[: self.settings.max_samples]
        s = self.settings
        threshold = s.start
        ranks = self._ranks(bases, threshold)
        error = self._error(i, bases, ranks, x, y)
        floor = self._ranks(bases, 0.0)
        while threshold - s.step > 0 and ranks != floor:  # the floor stops the search
            candidate = self._ranks(bases, threshold - s.step)
            cand_error = error if candidate == ranks else self._error(i, bases, candidate, x, y)
            if cand_error > s.budget:
                break
            threshold, ranks, error = threshold - s.step, candidate, cand_error
        self.key_ranks.append(ranks[0])
        self.value_ranks.append(ranks[1])
        self.errors.append(error)
        self.thresholds.append(round(threshold, 6))
