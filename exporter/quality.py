"""Quality budget: the smallest KV cache whose perplexity on validation text stays within a
given rise over the original model (`--max-ppl-increase`).

Ranks for a candidate byte ratio come from the loss-based allocation; the ratio is found by
bisection on the validation text (never the calibration or the reported evaluation text),
and every probe is recorded.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from eigenkv.exporter import ranks as rank_sel
from eigenkv.exporter.decoder import EigenDecoder
from eigenkv.exporter.fold import fold
from eigenkv.exporter.perplexity import perplexity


@dataclass
class QualitySearch:
    max_increase: float
    original_ppl: float
    validation_tokens: int
    key_ranks: list[int]
    value_ranks: list[int]
    kv_ratio: float
    ppl: float
    probes: list[dict] = field(default_factory=list)

    def summary(self) -> dict:
        return {"max_ppl_increase": self.max_increase, "validation_tokens": self.validation_tokens,
                "original_ppl": round(self.original_ppl, 4), "chosen_kv_ratio": round(self.kv_ratio, 6),
                "validation_ppl": round(self.ppl, 4),
                "validation_increase_pct": round(100 * (self.ppl / self.original_ppl - 1), 2),
                "probes": self.probes}


def validation_rise(original: EigenDecoder, folded: EigenDecoder, tokens: torch.Tensor, window: int,
                    progress: bool = False) -> dict:
    before = perplexity(original, tokens, window, progress=progress, desc="ppl validation original").value
    after = perplexity(folded, tokens, window, progress=progress, desc="ppl validation folded").value
    return {"original_ppl": round(before, 4), "ppl": round(after, 4), "increase_pct": round(100 * (after / before - 1), 2)}


def search_smallest_cache(decoder: EigenDecoder, factors: list, curves, tokens: torch.Tensor, max_increase: float,
                          rope_mode: str, window: int = 1024, steps: int = 7, progress: bool = True) -> QualitySearch:
    """Bisection over the KV byte ratio in (0, 1]: the smallest ratio probed whose validation
    perplexity is <= (1 + max_increase) × the original's. Ratio 1.0 (no compression) always
    qualifies. tokens [T] validation stream."""
    original = perplexity(decoder, tokens, window, progress=False).value
    limit = (1 + max_increase) * original
    d, n = decoder.dims.head_dim, decoder.dims.n_layers
    best = ([d] * n, [d] * n, 1.0, original)
    probes = []
    lo, hi = 0.0, 1.0  # lo fails (or is empty), hi passes
    for _ in range(steps):
        ratio = (lo + hi) / 2
        key_ranks, value_ranks = rank_sel.allocate(*curves, ratio)
        ppl = perplexity(fold(decoder, factors, key_ranks, value_ranks, rope_mode), tokens, window,
                         progress=False).value
        actual = rank_sel.kv_ratio(key_ranks, value_ranks, d)
        ok = ppl <= limit
        probes.append({"kv_ratio": round(actual, 6), "ppl": round(ppl, 4),
                       "increase_pct": round(100 * (ppl / original - 1), 2), "within": ok})
        if progress:
            print(f"quality search: kv-ratio {actual:.3f} -> validation ppl {ppl:.3f} "
                  f"({100 * (ppl / original - 1):+.1f}%, {'within' if ok else 'over'} {100 * max_increase:.1f}%)")
        if ok:
            hi = ratio
            if actual < best[2]:
                best = (key_ranks, value_ranks, actual, ppl)
        else:
            lo = ratio
    return QualitySearch(max_increase, original, tokens.numel(), best[0], best[1], best[2], best[3], probes)
