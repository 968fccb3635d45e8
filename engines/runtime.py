"""Generation over any `Engine`: chunked prefill, greedy or sampled decode, eviction, perplexity.

Written once against `engines/backend.py`; nothing here knows a backend. The cache is
allocated once per call (per layer: the whole context, or the eviction budget plus headroom)
and never moves; each sequence of a right-padded batch writes at its own length, so padding
never reaches attention.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np

from eigenkv.engines.backend import Engine, KVCache
from eigenkv.errors import EigenError


class NonFiniteLogits(EigenError):
    """The engine returned NaN or infinite logits: its graph overflows its precision on this input."""


def check_finite(logits: np.ndarray, engine: Engine, where: str) -> np.ndarray:
    """`logits` itself, or NonFiniteLogits (one line) when any value is NaN or infinite."""
    if not np.isfinite(logits).all():
        precision = getattr(engine, "precision", "?")
        raise NonFiniteLogits(f"the engine produced non-finite logits (NaN or inf) at {where}: its {precision} graph "
                              f"overflows on this input" + ("; export the model with --dtype fp32"
                                                            if precision != "fp32" else ""))
    return logits


@dataclass(frozen=True)
class Sampling:
    """temperature 0 = greedy; otherwise softmax(logits / T) restricted to the top-p mass."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if self.temperature < 0:
            raise EigenError(f"--temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise EigenError(f"--top-p must be in (0, 1], got {self.top_p}")


def sample(logits: np.ndarray, sampling: Sampling, rng: np.random.Generator) -> np.ndarray:
    """logits [B, V] -> token ids [B]."""
    if sampling.temperature == 0:
        return logits.argmax(-1)
    z = logits.astype(np.float64) / sampling.temperature
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    out = np.empty(len(p), dtype=np.int64)
    for b, row in enumerate(p):
        order = np.argsort(-row)
        keep = np.cumsum(row[order]) - row[order] < sampling.top_p  # always keeps the top token
        kept = order[keep]
        out[b] = rng.choice(kept, p=row[kept] / row[kept].sum())
    return out


def capacities(engine: Engine, context: int, chunk: int, evictor=None) -> list[int]:
    """Slots per layer for `context` tokens (prompt + new) prefilled `chunk` at a time: the whole
    context, or with an evictor its budget plus room for one chunk (skipped layers: the whole).
    A sliding-window layer (window W) never needs more than W - 1 + chunk slots: the W - 1
    positions before a step's first token and the step's own (`slide_windows` keeps it there)."""
    caps = [context] * engine.layout.n_layers if evictor is None else \
        evictor.capacities(engine.layout.n_layers, context, chunk)
    return [min(cap, window - 1 + chunk) if (window := engine.layout.window(i)) else cap
            for i, cap in enumerate(caps)]


def slide_windows(engine: Engine, cache: KVCache, new_tokens: int, first_positions: np.ndarray) -> None:
    """Before a step of `new_tokens` tokens whose first positions are first_positions [B] (int):
    in each sliding-window layer (window W) where a sequence would overflow its buffer, keep only
    the slots a query of this step can see (position >= first - W + 1), compacted to the front in
    order. The op masks by position (q_pos - k_pos < W), so dropping older slots changes nothing.
    Sequences that fit are left alone (the buffer then holds older, masked slots)."""
    first = np.broadcast_to(np.asarray(first_positions, dtype=np.int64), (cache.lengths.shape[1],))
    for layer, cap in enumerate(cache.capacities):
        window = engine.layout.window(layer)
        if not window:
            continue
        for seq in np.flatnonzero(cache.lengths[layer] + new_tokens > cap):
            n = int(cache.lengths[layer, seq])
            pos = cache.positions(layer)[seq, :, :n]
            kept = [np.flatnonzero(p >= first[seq] - window + 1) for p in pos]
            cache.keep(layer, int(seq), np.stack(kept))


def _make_room(engine: Engine, cache: KVCache, new_tokens: int, first_positions, evictor) -> None:
    """Everything that frees slots before a step: sliding windows, then the evictor's budget."""
    if engine.layout.windows:
        slide_windows(engine, cache, new_tokens, first_positions)
    if evictor is not None:
        evictor.make_room(engine, cache, new_tokens)


def prefill(engine: Engine, cache: KVCache, ids: np.ndarray, lengths: np.ndarray, chunk: int,
            evictor=None) -> np.ndarray:
    """Right-padded prompts ids [B, W] (lengths [B] real tokens) into an empty cache, `chunk` tokens
    per step -> logits at each prompt's last token [B, V]. With an evictor, each step first makes
    room (evicting down to the budget) so memory stays bounded by it."""
    if chunk < 1:
        raise EigenError("the prefill chunk must be >= 1 token")
    batch, width = ids.shape
    last = None
    for start in range(0, width, chunk):
        stop = min(start + chunk, width)
        _make_room(engine, cache, stop - start, start, evictor)
        ends = (lengths - 1 >= start) & (lengths - 1 < stop)
        if engine.last_logits_only and (lengths[ends] != stop).any():
            raise EigenError(f"{engine.name} scores only each step's last token, so every prompt must end "
                             "where a prefill step ends (equal lengths, or chunk >= the prompt)")
        positions = np.broadcast_to(np.arange(start, stop), (batch, stop - start))
        logits = engine.step(cache, ids[:, start:stop], positions)
        cache.advance(np.clip(lengths - start, 0, stop - start))
        if last is None:
            last = np.empty((batch, logits.shape[-1]), dtype=logits.dtype)
        # an engine that returns the last position's logits only ([B, 1, V]) ends prompts at stop
        last[ends] = logits[ends, (lengths - 1 - start)[ends] if logits.shape[1] == stop - start else -1]
    return check_finite(last, engine, "prefill")


def decode_step(engine: Engine, cache: KVCache, tokens: np.ndarray, positions: np.ndarray,
                evictor=None) -> np.ndarray:
    """One token per sequence: tokens, positions [B] -> next-token logits [B, V]."""
    _make_room(engine, cache, 1, positions, evictor)
    logits = engine.step(cache, tokens[:, None], positions[:, None])[:, 0]
    cache.advance(np.ones(len(tokens), np.int64))
    return check_finite(logits, engine, f"position {int(positions.max())}")


def _check_request(prompts: list[list[int]], max_new_tokens: int, chunk: int | None) -> None:
    if chunk is not None and chunk < 1:
        raise EigenError("--prefill-chunk must be >= 1")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise EigenError("every prompt needs at least one token")
    if max_new_tokens < 0:
        raise EigenError("--max-new-tokens must be >= 0")


def generate(engine: Engine, prompts: list[list[int]], max_new_tokens: int, sampling: Sampling = Sampling(),
             stop_tokens: Iterable[int] = (), on_tokens: Callable[[dict[int, int]], None] | None = None,
             on_cache: Callable[[KVCache], None] | None = None, prefill_chunk: int | None = None,
             evictor=None) -> list[list[int]]:
    """Prompts of any lengths (right-padded into one batch) -> new tokens per prompt.

    Generation stops per sequence at a stop token (kept) or after max_new_tokens.
    `prefill_chunk` bounds the tokens per prefill step (attention memory grows with it; with an
    evictor the default is its headroom). `evictor` (engines/eviction.py) keeps each layer's cache
    within a budget. EigenError for empty prompts, negative counts, or a context over max_seq_len.
    """
    _check_request(prompts, max_new_tokens, prefill_chunk)
    lengths = np.array([len(p) for p in prompts], dtype=np.int64)
    batch, width = len(prompts), int(lengths.max())
    context = width + max_new_tokens
    if context > engine.max_seq_len:
        raise EigenError(f"prompt ({width} tokens) + --max-new-tokens ({max_new_tokens}) exceeds the "
                         f"engine's max_seq_len {engine.max_seq_len}; shorten them or export with a larger "
                         "--max-seq-len")
    chunk = prefill_chunk or (evictor.headroom if evictor is not None else width)
    ids = np.zeros((batch, width), dtype=np.int64)
    for b, p in enumerate(prompts):
        ids[b, : len(p)] = p
    # slots for the prompt and every new token but the last (never fed back), one spare when it fits
    cache = engine.new_cache(batch, capacities(engine, max(context, min(width + 1, engine.max_seq_len)), chunk,
                                               evictor))
    last = prefill(engine, cache, ids, lengths, chunk, evictor)
    rng = np.random.default_rng(sampling.seed)
    stops, done = set(stop_tokens), np.zeros(batch, dtype=bool)
    out: list[list[int]] = [[] for _ in prompts]
    for step in range(max_new_tokens):
        tokens = sample(last, sampling, rng)
        active = np.flatnonzero(~done)
        for b in active:
            out[b].append(int(tokens[b]))
            done[b] = int(tokens[b]) in stops
        if on_tokens is not None:
            on_tokens({int(b): int(tokens[b]) for b in active})
        if done.all() or step == max_new_tokens - 1:
            break
        last = decode_step(engine, cache, tokens, lengths + step, evictor)
        if on_cache is not None:
            on_cache(cache)
    return out


def greedy(engine: Engine, ids: np.ndarray, new_tokens: int, chunk: int | None = None, evictor=None) -> np.ndarray:
    """Equal-length prompts ids [B, S] -> the next `new_tokens` greedy tokens [B, new_tokens]."""
    out = generate(engine, [list(row) for row in np.asarray(ids)], new_tokens, prefill_chunk=chunk, evictor=evictor)
    return np.array([row + [row[-1]] * (new_tokens - len(row)) for row in out], dtype=np.int64).reshape(len(out), -1)


def stream_perplexity(engine: Engine, tokens: np.ndarray, chunk: int = 1, evictor=None) -> dict:
    """Perplexity of one token stream [T] scored as it is generated: `chunk` tokens per step
    (1: pure decode), evicting while scoring. -> {ppl, tokens scored, chunk}."""
    tokens = np.asarray(tokens, dtype=np.int64)
    if tokens.size < 2:
        raise EigenError("perplexity needs at least 2 tokens")
    if engine.last_logits_only and chunk > 1:
        raise EigenError(f"{engine.name} returns only the last token's logits of a step: score perplexity "
                         "with chunk 1 or an engine built without a pruned LM head")
    cache = engine.new_cache(1, capacities(engine, tokens.size, chunk, evictor))
    nll, count = 0.0, 0
    for start in range(0, tokens.size - 1, chunk):
        stop = min(start + chunk, tokens.size - 1)
        _make_room(engine, cache, stop - start, start, evictor)
        logits = engine.step(cache, tokens[None, start:stop], np.arange(start, stop)[None]).astype(np.float64)[0]
        cache.advance(np.array([stop - start]))
        z = logits - logits.max(-1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
        nll -= float(logp[np.arange(stop - start), tokens[start + 1:stop + 1]].sum())
        count += stop - start
    return {"ppl": math.exp(nll / count), "tokens": count, "chunk": chunk}


class TextStream:
    """Incremental detokenization for streaming: `push(ids)` returns the text that became final,
    holding back a character whose bytes are spread over tokens not all generated yet (a
    byte-level BPE emits "ë" or "🙂" as several tokens); `finish()` returns the rest. Joined, the
    pieces are `text(ids)`, the text printed without streaming.

    With a fast tokenizer, pieces come from the tokenizers library's `DecodeStream` (constant work
    per token) and `text` is the same backend decode; otherwise every push decodes all ids and
    holds back a trailing U+FFFD (an incomplete UTF-8 sequence).
    """

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.shown = tokenizer, [], ""
        self._backend = getattr(tokenizer, "backend_tokenizer", None)
        self._stream = None
        if self._backend is not None:
            from tokenizers.decoders import DecodeStream
            self._stream = DecodeStream(skip_special_tokens=True)

    def text(self, ids: list[int]) -> str:
        """The final text of `ids` (special tokens skipped, no clean-up of spaces: what streams)."""
        if self._backend is not None:
            return self._backend.decode([int(i) for i in ids], skip_special_tokens=True)
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, ids: Iterable[int]) -> str:
        """Append new token ids -> the newly final text ('' while a character is incomplete)."""
        ids = [int(i) for i in ids]
        self.ids += ids
        if self._stream is not None:
            new = "".join(piece for piece in (self._stream.step(self._backend, i) for i in ids) if piece)
            self.shown += new
            return new
        stable = self.text(self.ids).rstrip("\ufffd")
        if not stable.startswith(self.shown):
            return ""
        new, self.shown = stable[len(self.shown):], stable
        return new

    def finish(self) -> str:
        """The rest of `text(ids)`: held-back bytes that never completed a character."""
        text = self.text(self.ids)
        rest = text[len(self.shown):] if text.startswith(self.shown) else ""
        self.shown += rest
        return rest
