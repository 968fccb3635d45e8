"""KV-cache eviction: a policy scores each cached slot, the evictor keeps a budget of them.

The method is key L2-norm eviction (Devoto et al., "A Simple and Effective L2 Norm-Based
Strategy for KV Cache Compression", EMNLP 2024): keys with a low L2 norm draw the most
attention, so per (sequence, layer, KV head) keep the lowest-norm slots, with no attention
scores needed. On the low-rank cache the norm is that of the *reconstructed* key, computed
in rank space with the fold's Gram matrix G = UᵀU of the key up-projection U:
‖U k_r‖ = √(k_rᵀ G k_r) (RoPE is a rotation, so pre-RoPE and rotated keys have one norm).

A policy is a small registered object with one hook, `score(keys, positions, gram, rng)`:
it sees arrays, never a backend (the way kvpress writes a press). The `Evictor` can max-pool
the scores over neighbouring positions (`pool`: a token is kept when a token within pool // 2
positions scores as well, so a span spelled over several tokens, such as a number written
digit by digit, is kept or dropped whole; SnapKV pools attention scores the same way, Li et
al. 2024), protects the first `sink` tokens (attention sinks) and the `recent` newest, skips
chosen layers (default: the first two, as the paper's runs did), and compacts the kept slots
in place through
`KVCache.keep`, so each slot keeps its token position (RoPE and the causal mask stay right).
Memory is bounded by the budget: evicted layers' buffers hold budget + headroom slots, and
the runtime makes room before every step (prefill chunks and decode tokens alike).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field

import numpy as np

from eigenkv.errors import EigenError

POLICIES: dict[str, type["Policy"]] = {}


def register(cls):
    """Class decorator: add a policy to POLICIES under its `name`."""
    POLICIES[cls.name] = cls
    return cls


def key_norms(keys: np.ndarray, gram: np.ndarray | None) -> np.ndarray:
    """keys [Hkv, n, r] as cached, gram [G, r, r] (G = 1 or Hkv) or None (keys are full keys)
    -> norms of the reconstructed keys [Hkv, n], float64: √(k_rᵀ G k_r) per slot."""
    k = keys.astype(np.float64)
    if gram is None:
        return np.sqrt(np.einsum("hnr,hnr->hn", k, k))
    # (k G) · k per slot: one batched matrix product (BLAS) instead of a three-operand einsum
    quad = np.einsum("hnr,hnr->hn", k @ gram.astype(np.float64), k)
    return np.sqrt(np.maximum(quad, 0.0))


class Policy(ABC):
    """Scores slots; the evictor keeps the highest scores."""

    name: str

    @abstractmethod
    def score(self, keys: np.ndarray, positions: np.ndarray, gram: np.ndarray | None,
              rng: np.random.Generator) -> np.ndarray:
        """keys [Hkv, n, r] (valid slots as cached), positions [Hkv, n] -> scores [Hkv, n]."""


@register
class KeyNormPolicy(Policy):
    """Keep the lowest reconstructed-key L2 norms (Devoto et al. 2024)."""

    name = "key-norm"

    def score(self, keys, positions, gram, rng):
        return -key_norms(keys, gram)


@register
class RandomPolicy(Policy):
    """The control: keep a uniformly random subset (seeded)."""

    name = "random"

    def score(self, keys, positions, gram, rng):
        return rng.random(positions.shape)


@register
class RecentPolicy(Policy):
    """Keep the newest tokens (with the sinks, StreamingLLM's window)."""

    name = "recent"

    def score(self, keys, positions, gram, rng):
        return positions.astype(np.float64)


def pool_scores(scores: np.ndarray, positions: np.ndarray, width: int) -> np.ndarray:
    """Max pooling over token positions: scores, positions [Hkv, n] (distinct positions per head)
    -> [Hkv, n] float64, each slot's score replaced by the highest score among the slots whose
    positions lie within width // 2 of its own (itself included). width 1 returns the scores.
    Slots of a cache are in position order (appended in order, compacted in order); other orders
    are sorted first."""
    scores = np.asarray(scores, dtype=np.float64)
    half = width // 2
    if half == 0 or scores.shape[1] < 2:
        return scores
    order = None
    if (np.diff(positions, axis=1) <= 0).any():
        order = np.argsort(positions, axis=1, kind="stable")
        scores, positions = np.take_along_axis(scores, order, 1), np.take_along_axis(positions, order, 1)
    pos = positions.astype(np.int64)
    out = scores.copy()
    for d in range(1, min(half, scores.shape[1] - 1) + 1):
        # slot j and slot j + d (d slots apart, so >= d positions apart) are neighbours when
        # their positions differ by at most `half`
        near = pos[:, d:] - pos[:, :-d] <= half
        np.maximum(out[:, :-d], np.where(near, scores[:, d:], -np.inf), out=out[:, :-d])
        np.maximum(out[:, d:], np.where(near, scores[:, :-d], -np.inf), out=out[:, d:])
    if order is not None:
        restored = np.empty_like(out)
        np.put_along_axis(restored, order, out, 1)
        out = restored
    return out


def top_slots(scores: np.ndarray, k: int, tiebreak: np.ndarray) -> np.ndarray:
    """scores, tiebreak [Hkv, n] -> [Hkv, k] slot indices in slot order: the k highest scores;
    among slots tied at the cut, the higher tiebreak, then the lower slot (deterministic, so a
    pooled score that several neighbours share picks the same slots on every backend)."""
    scores = np.nan_to_num(np.asarray(scores, dtype=np.float64), nan=-np.inf)  # a NaN score is never kept first
    part = np.argpartition(-scores, k - 1, axis=1)
    cut = np.take_along_axis(scores, part[:, k - 1:k], 1)
    above, tied = scores > cut, scores == cut
    out = np.empty((scores.shape[0], k), dtype=np.int64)
    for h in range(scores.shape[0]):
        first = np.flatnonzero(above[h])
        ties = np.flatnonzero(tied[h])
        ties = ties[np.argsort(-tiebreak[h, ties], kind="stable")[: k - first.size]]
        out[h] = np.sort(np.concatenate([first, ties]))
    return out


DEFAULT_POOL = 3  # tokens; measured: pass keys at keep 0.25 on SmolLM2-135M 83% -> 96% (README)


def _skip_text(text: str) -> tuple[int, ...]:
    if text.strip().lower() in ("", "none"):
        return ()
    try:
        return tuple(sorted({int(v) for v in text.split(",")}))
    except ValueError:
        raise EigenError(f"--skip-layers takes comma-separated layer indices or 'none', got {text!r}") from None


@dataclass(frozen=True)
class EvictionSettings:
    """What to keep: `keep` (a fraction of the context, in (0, 1]) or `budget` (tokens per sequence,
    layer and KV head); `sink` first and `recent` newest tokens always kept; `skip_layers` never
    evicted; `headroom` slots above the budget (at least one prefill chunk) before eviction runs;
    `pool` (odd, tokens) the max-pooling width of the policy's scores (1: none, the paper's
    selection; default DEFAULT_POOL)."""

    policy: str = "key-norm"
    keep: float | None = None
    budget: int | None = None
    sink: int = 4
    recent: int = 32
    skip_layers: tuple[int, ...] = (0, 1)
    headroom: int = 64
    seed: int = 0
    pool: int = DEFAULT_POOL

    @classmethod
    def from_args(cls, policy, keep, budget, sink, recent, skip_layers: str, headroom, seed=0,
                  pool=DEFAULT_POOL) -> "EvictionSettings":
        return cls(policy, keep, budget, sink, recent, _skip_text(skip_layers), headroom, seed, pool)

    def check(self, n_layers: int, max_seq_len: int) -> None:
        """One-line EigenError for anything out of range."""
        if self.policy not in POLICIES:
            raise EigenError(f"--evict must be one of {', '.join(POLICIES)}, got {self.policy!r}")
        if (self.keep is None) == (self.budget is None):
            raise EigenError("eviction needs exactly one of --keep R or --kv-budget N")
        if self.keep is not None and not 0 < self.keep <= 1:
            raise EigenError(f"--keep must be in (0, 1] (the fraction of tokens kept), got {self.keep}")
        if self.sink < 0 or self.recent < 0 or self.headroom < 1:
            raise EigenError("--sink and --recent must be >= 0 and the headroom >= 1")
        if self.pool < 1 or self.pool % 2 == 0:
            raise EigenError(f"--pool must be an odd number of tokens >= 1 (1: no pooling), got {self.pool}")
        if self.budget is not None and not self.sink + self.recent < self.budget <= max_seq_len:
            raise EigenError(f"--kv-budget must be larger than --sink + --recent ({self.sink + self.recent}) and "
                             f"at most the engine's max_seq_len {max_seq_len}, got {self.budget}")
        bad = [i for i in self.skip_layers if not 0 <= i < n_layers]
        if bad:
            raise EigenError(f"--skip-layers {bad} out of range: the engine has layers 0..{n_layers - 1}")

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class Evictor:
    """Applies `settings` to one cache: call `capacities` once (it fixes the budget for that context),
    then `make_room` before every step."""

    settings: EvictionSettings
    budget: int = 0
    evictions: int = 0  # (sequence, layer) compactions made
    _rng: np.random.Generator = field(default=None, repr=False)

    def __post_init__(self):
        self.policy = POLICIES[self.settings.policy]()
        self._rng = np.random.default_rng(self.settings.seed)

    @property
    def headroom(self) -> int:
        return self.settings.headroom

    def budget_for(self, context: int) -> int:
        """Slots kept per (sequence, layer, KV head) for `context` tokens (prompt + new)."""
        s = self.settings
        if s.budget is not None:
            return s.budget
        return max(s.sink + s.recent + 1, math.ceil(s.keep * context))

    def capacities(self, n_layers: int, context: int, chunk: int) -> list[int]:
        """Slots per layer: skipped layers hold the whole context; evicted ones the budget plus
        room for one step of `chunk` tokens (never more than the context)."""
        self.budget = self.budget_for(context)
        evicted = min(context, self.budget + max(self.headroom, chunk))
        return [context if i in self.settings.skip_layers else evicted for i in range(n_layers)]

    def select(self, keys: np.ndarray, positions: np.ndarray, gram: np.ndarray | None) -> np.ndarray:
        """keys [Hkv, n, r], positions [Hkv, n] of one (sequence, layer) -> kept slot indices
        [Hkv, budget] in slot order: protected (sink, recent) first, then the best pooled scores."""
        return self.keep_best(self.policy.score(keys, positions, gram, self._rng), positions)

    def keep_best(self, scores: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """scores, positions [Hkv, n] -> kept slot indices [Hkv, budget] in slot order: the
        protected slots (sink, recent), then the highest scores after `pool` max pooling (ties at
        the cut: the higher own score, then the lower slot). Pooling sees every slot's own score,
        the protected ones' too, so the neighbour of a low-norm sink scores as that sink does."""
        s = self.settings
        raw = np.asarray(scores, dtype=np.float64)
        pooled = pool_scores(raw, positions, s.pool)
        newest = positions.max(axis=1, keepdims=True)
        protected = (positions < s.sink) | (positions > newest - s.recent)
        return top_slots(np.where(protected, np.inf, pooled), self.budget, raw)

    def choose(self, engine, layer: int, keys: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """The slots `make_room` keeps in `layer` of one sequence: `select` with the layer's key Gram."""
        return self.select(keys, positions, engine.key_gram(layer))

    def make_room(self, engine, cache, new_tokens: int) -> None:
        """Before a step of `new_tokens`: in every evicted layer where a sequence would overflow,
        keep `budget` of its slots (per KV head) and compact them in place."""
        for layer, cap in enumerate(cache.capacities):
            if layer in self.settings.skip_layers or cache.layout.window(layer):
                continue  # skipped, or a sliding-window layer (its window bounds it: runtime.slide_windows)
            for seq in np.flatnonzero(cache.lengths[layer] + new_tokens > cap):
                n = int(cache.lengths[layer, seq])
                if n <= self.budget:
                    raise EigenError(f"eviction budget {self.budget} + a step of {new_tokens} tokens exceeds the "
                                     f"layer's {cap} slots; raise the headroom or lower the prefill chunk")
                slots = self.choose(engine, layer, cache.keys(layer)[seq, :, :n], cache.positions(layer)[seq, :, :n])
                cache.keep(layer, int(seq), slots)
                self.evictions += 1


def make_evictor(settings: EvictionSettings | None, engine) -> Evictor | None:
    """An Evictor checked against `engine` (EigenError naming the problem), or None for no eviction.
    Refuses engines whose graph has no slot positions (exported before eviction could move slots)."""
    if settings is None:
        return None
    settings.check(engine.layout.n_layers, engine.max_seq_len)
    if not engine.layout.slot_positions:
        raise EigenError("this engine's graph has no slot positions, so slots cannot move: re-export it with "
                         "this eigenkv's `export-eigen` and rebuild it to use eviction")
    missing = [i for i, r in enumerate(engine.layout.key_ranks)
               if r < engine.layout.head_dim and engine.key_gram(i) is None]
    if missing:
        raise EigenError(f"layers {missing} cache rank-reduced keys but the engine has no key Gram to score their "
                         "norms: re-export with this eigenkv's `export-eigen` and rebuild the engine")
    return Evictor(settings)
