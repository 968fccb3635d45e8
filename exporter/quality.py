"""Quality budget: the smallest KV cache whose perplexity on validation text stays within a
given rise over the original model (`--max-ppl-increase`), on **every** text of the
calibration mix: the worst text's rise is what the bound limits, not the mean.

Ranks for a candidate byte ratio come from the loss-based allocation; the ratio is found by
bisection on the validation slices (never the calibration or the reported evaluation text,
`texts.split_texts`), and every probe is recorded with each text's rise.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from eigenkv.exporter import ranks as rank_sel
from eigenkv.exporter.decoder import EigenDecoder
from eigenkv.exporter.fold import fold
from eigenkv.exporter.perplexity import perplexity


@dataclass
class QualitySearch:
    max_increase: float
    original_ppl: dict  # text -> the original model's validation perplexity
    validation_tokens: dict  # text -> validation tokens scored
    key_ranks: list[int]
    value_ranks: list[int]
    kv_ratio: float
    ppl: dict  # text -> the chosen cache's validation perplexity
    probes: list[dict] = field(default_factory=list)

    @property
    def worst_increase(self) -> float:
        """The largest relative rise over the texts (0.1 = +10%)."""
        return max(self.ppl[n] / self.original_ppl[n] - 1 for n in self.ppl)

    def summary(self) -> dict:
        return {"max_ppl_increase": self.max_increase, "bound": "worst text of the calibration mix",
                "validation_tokens": self.validation_tokens,
                "original_ppl": {n: round(v, 4) for n, v in self.original_ppl.items()},
                "chosen_kv_ratio": round(self.kv_ratio, 6),
                "validation_ppl": {n: round(v, 4) for n, v in self.ppl.items()},
                "validation_increase_pct": {n: round(100 * (self.ppl[n] / self.original_ppl[n] - 1), 2)
                                            for n in self.ppl},
                "worst_increase_pct": round(100 * self.worst_increase, 2),
                "probes": self.probes}


def validation_rise(original: EigenDecoder, folded: EigenDecoder, tokens: dict, window: int,
                    progress: bool = False) -> dict:
    """tokens {text: [T]} -> {text: {original_ppl, ppl, increase_pct}, "worst_increase_pct": %}."""
    out = {}
    for name, t in tokens.items():
        before = perplexity(original, t, window, progress=progress, desc=f"ppl validation {name} original").value
        after = perplexity(folded, t, window, progress=progress, desc=f"ppl validation {name} folded").value
        out[name] = {"original_ppl": round(before, 4), "ppl": round(after, 4),
                     "increase_pct": round(100 * (after / before - 1), 2)}
    out["worst_increase_pct"] = max(v["increase_pct"] for v in out.values())
    return out


def search_smallest_cache(decoder: EigenDecoder, factors: list, curves, tokens: dict, max_increase: float,
                          rope_mode: str, window: int = 1024, steps: int = 7, progress: bool = True) -> QualitySearch:
    """Bisection over the KV byte ratio in (0, 1]: the smallest ratio probed whose validation
    perplexity is <= (1 + max_increase) × the original's on every text of `tokens` ({text: [T]}
    validation slices). Ratio 1.0 (no compression) always qualifies."""
    original = {n: perplexity(decoder, t, window, progress=False).value for n, t in tokens.items()}
    d, n_layers = decoder.dims.head_dim, decoder.dims.n_layers
    best = ([d] * n_layers, [d] * n_layers, 1.0, dict(original))
    probes = []
    lo, hi = 0.0, 1.0  # lo fails (or is empty), hi passes
    for _ in range(steps):
        ratio = (lo + hi) / 2
        key_ranks, value_ranks = rank_sel.allocate(*curves, ratio)
        folded = fold(decoder, factors, key_ranks, value_ranks, rope_mode)
        ppl, worst_name, worst = {}, None, -float("inf")
        for name, t in tokens.items():  # stop at the first text over the bound: the probe has failed
            ppl[name] = perplexity(folded, t, window, progress=False).value
            rise = ppl[name] / original[name] - 1
            if rise > worst:
                worst_name, worst = name, rise
            if rise > max_increase:
                break
        actual = rank_sel.kv_ratio(key_ranks, value_ranks, d)
        ok = worst <= max_increase
        probes.append({"kv_ratio": round(actual, 6), "increase_pct": {n: round(100 * (p / original[n] - 1), 2)
                                                                      for n, p in ppl.items()},
                       "worst_text": worst_name, "within": ok})
        if progress:
            print(f"quality search: kv-ratio {actual:.3f} -> worst validation rise {100 * worst:+.1f}% "
                  f"({worst_name}; {'within' if ok else 'over'} {100 * max_increase:.1f}%)")
        if ok:
            hi = ratio
            if actual < best[2]:
                best = (key_ranks, value_ranks, actual, ppl)
        else:
            lo = ratio
    return QualitySearch(max_increase, original, {n: t.numel() for n, t in tokens.items()},
                         best[0], best[1], best[2], best[3], probes)
