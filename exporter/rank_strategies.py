"""Rank strategies: how a compress run turns its target option into per-layer ranks.

Each strategy is a small registered dataclass, selected by the CompressConfig fields that
name its target (`options`), with one hook, `choose(decoder, factors, texts, config) ->
(key_ranks, value_ranks, details)`; a strategy that must watch calibration (the paper's
error-budget search) also returns an `on_layer` callback from `search_hook`.

  uniform         --key-rank/--value-rank: the same ranks in every layer
  error-budget    --error-budget (the default of --method eigen): the paper's per-layer search
  kv-ratio        --kv-ratio: a global byte target, dropped where the predicted cost is lowest
  quality-budget  --max-ppl-increase: the smallest KV ratio within a validation perplexity rise
Uniform and kv-ratio honour --compress-layers (only those layers get ranks below head_dim; the
kv-ratio target is then over those layers' bytes).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from eigenkv.exporter import ranks as rank_sel
from eigenkv.exporter import sensitivity
from eigenkv.exporter.calibrate import LayerCallback
from eigenkv.exporter.quality import search_smallest_cache


@dataclass
class RankStrategy:
    """Base of the strategies; one instance per run (`rank_strategy`)."""

    name: ClassVar[str]
    options: ClassVar[tuple[str, ...]]  # CompressConfig fields that select this strategy

    @classmethod
    def chosen_by(cls, config) -> bool:
        """Whether `config` sets one of this strategy's options."""
        return any(getattr(config, option) is not None for option in cls.options)

    def search_hook(self, decoder, config) -> LayerCallback | None:
        """An `on_layer` callback for `calibrate`, or None when the strategy needs none."""
        return None

    def choose(self, decoder, factors: list, texts, config) -> tuple[list[int], list[int], dict]:
        """factors: one LayerFactors per layer; texts: `split_texts`' streams -> (key ranks [L],
        value ranks [L], the report's details of the choice)."""
        raise NotImplementedError


@dataclass
class Uniform(RankStrategy):
    """The same key (value) rank in every layer; head_dim for the side not given."""

    name: ClassVar[str] = "uniform"
    options: ClassVar[tuple[str, ...]] = ("key_rank", "value_rank")

    def choose(self, decoder, factors, texts, config):
        d, n = decoder.dims.head_dim, decoder.dims.n_layers
        chosen = _compressed(config, n)
        return ([config.key_rank or d if i in chosen else d for i in range(n)],
                [config.value_rank or d if i in chosen else d for i in range(n)], {"allocation": "uniform"})


def _compressed(config, n_layers: int) -> tuple[int, ...]:
    """The layers a run compresses: --compress-layers, else all."""
    if isinstance(config.compress_layers, str):
        raise TypeError("compress_layers is parsed by CompressConfig.resolved(): pass a resolved config")
    return tuple(range(n_layers)) if config.compress_layers is None else tuple(config.compress_layers)


@dataclass
class ErrorBudget(RankStrategy):
    """The paper's per-layer search during calibration (`ranks.ErrorBudgetSearch`), at
    `--error-budget` or the paper's default 0.025."""

    name: ClassVar[str] = "error-budget"
    options: ClassVar[tuple[str, ...]] = ("error_budget",)
    search: rank_sel.ErrorBudgetSearch | None = field(default=None, init=False)  # set by search_hook

    def search_hook(self, decoder, config):
        budget = rank_sel.SearchSettings.budget if config.error_budget is None else config.error_budget
        settings = rank_sel.default_search(budget, decoder.family.positions == "rope")
        self.search = rank_sel.ErrorBudgetSearch(decoder, settings, config.rope_mode)
        return self.search

    def choose(self, decoder, factors, texts, config):
        s = self.search
        return s.key_ranks, s.value_ranks, {"allocation": "error-budget", "budget": s.settings.budget,
                                            "layer_errors": [round(e, 6) for e in s.errors],
                                            "thresholds": s.thresholds}


def _cost_curves(decoder, factors, texts, config, allocation: str):
    """Predicted cost of every rank r = 0..d of each layer's keys and values -> ((key curves,
    value curves), details): "energy", each objective curve as a share of its total; "loss",
    the curves scaled to the KL measured by sensitivity probes on 4 × 256 calibration tokens."""
    if allocation == "energy":
        return rank_sel.energy_curves(factors), {"allocation": allocation}
    sens = sensitivity.measure(decoder, factors, texts.samples[:4, :256], config.rope_mode, progress=config.progress,
                               layers=_compressed(config, decoder.dims.n_layers))  # (unprobed layers: None)
    details = {"sensitivity": {"probe_rank": sens.probe_rank, "tokens": sens.tokens,
                               "key_kl": [None if k is None else round(k, 6) for k in sens.key_kl],
                               "value_kl": [None if v is None else round(v, 6) for v in sens.value_kl]},
               "allocation": allocation}
    return sens.predicted(factors), details


@dataclass
class KvRatio(RankStrategy):
    """A global KV byte target, allocated by `--allocation` (measured KL or energy)."""

    name: ClassVar[str] = "kv-ratio"
    options: ClassVar[tuple[str, ...]] = ("kv_ratio",)

    def choose(self, decoder, factors, texts, config):
        curves, details = _cost_curves(decoder, factors, texts, config, config.allocation)
        d, n = decoder.dims.head_dim, decoder.dims.n_layers
        chosen = _compressed(config, n)  # the target is over these layers; the others stay full width
        keys, values = rank_sel.allocate(*([c[i] for i in chosen] for c in curves), config.kv_ratio)
        key_ranks, value_ranks = [d] * n, [d] * n
        for i, kr, vr in zip(chosen, keys, values):
            key_ranks[i], value_ranks[i] = kr, vr
        return key_ranks, value_ranks, {**details, "target": config.kv_ratio}


@dataclass
class QualityBudget(RankStrategy):
    """Bisection over the KV ratio on the validation text (`quality.search_smallest_cache`),
    always with the loss allocation."""

    name: ClassVar[str] = "quality-budget"
    options: ClassVar[tuple[str, ...]] = ("max_ppl_increase",)

    def choose(self, decoder, factors, texts, config):
        curves, details = _cost_curves(decoder, factors, texts, config, "loss")
        found = search_smallest_cache(decoder, factors, curves, texts.validation, config.max_ppl_increase,
                                      config.rope_mode, config.eval_window, progress=config.progress)
        return found.key_ranks, found.value_ranks, {**details, "quality_budget": found.summary()}


RANK_STRATEGIES = {s.name: s for s in (Uniform, ErrorBudget, KvRatio, QualityBudget)}


def chosen_strategies(config) -> list[str]:
    """Names of the strategies whose options `config` sets (a valid config sets at most one)."""
    return [name for name, s in RANK_STRATEGIES.items() if s.chosen_by(config)]


def rank_strategy(config) -> RankStrategy:
    """A fresh instance of the strategy a resolved CompressConfig selects; with no target set
    (`--method eigen` alone), the paper's error-budget search."""
    chosen = chosen_strategies(config)
    return RANK_STRATEGIES[chosen[0] if chosen else ErrorBudget.name]()
