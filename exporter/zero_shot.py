"""Zero-shot accuracy computed in-process: a multiple-choice cloze set generated from held-out text.

Each item is a context of `context` tokens from the text and `choices` candidate continuations of
`span` tokens: the true next tokens, and distractors that are spans of the same length taken from
elsewhere in the same text (so they are fluent, in-domain text, not noise). The model picks the
candidate with the highest summed log-probability given the context; accuracy is the share of
items where that is the true one (chance: 1 / choices). The set is a deterministic function of
the tokens and the seed, so every model is judged on the same items. The idea is LAMBADA's
(Paperno et al., 2016) and the scoring HellaSwag-style multiple choice (Zellers et al., 2019),
built here from any text because no data set can be downloaded.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm


@dataclass(frozen=True)
class ClozeSet:
    contexts: torch.Tensor  # [N, context] int64
    candidates: torch.Tensor  # [N, choices, span] int64
    answer: torch.Tensor  # [N] int64: index of the true continuation


def cloze_items(tokens: torch.Tensor, n_items: int = 200, context: int = 96, span: int = 4, choices: int = 4,
                seed: int = 0) -> ClozeSet:
    """Items from tokens [T] (held-out text): item i's context and true span are consecutive tokens at a
    random start, its distractors `span`-token windows from other random places (never equal to the
    true span), the true one at a random index. ValueError if the text is too short for n_items
    non-overlapping items."""
    need = context + span
    slots = tokens.numel() // need
    if slots < n_items:
        raise ValueError(f"{tokens.numel()} tokens give {slots} cloze items of {need} tokens, need {n_items}")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randperm(slots, generator=gen)[:n_items] * need
    contexts = torch.stack([tokens[s:s + context] for s in starts.tolist()])
    truth = torch.stack([tokens[s + context:s + need] for s in starts.tolist()])
    answer = torch.randint(0, choices, (n_items,), generator=gen)
    candidates = torch.empty(n_items, choices, span, dtype=torch.int64)
    for i in range(n_items):
        picked = [truth[i]]
        while len(picked) < choices:
            s = int(torch.randint(0, tokens.numel() - span, (1,), generator=gen))
            other = tokens[s:s + span]
            if not any(torch.equal(other, p) for p in picked):
                picked.append(other)
        order = list(range(1, choices))
        order.insert(int(answer[i]), 0)
        candidates[i] = torch.stack([picked[j] for j in order])
    return ClozeSet(contexts, candidates, answer)


@torch.no_grad()
def cloze_accuracy(model, items: ClozeSet, batch_size: int = 16, progress: bool = False, desc: str = "cloze") -> float:
    """The share of items whose true continuation has the highest summed log-probability (float in
    [0, 1]). `model`: an EigenDecoder, which runs each context once into a KV cache
    (`EigenDecoder.new_cache`) that its candidates then share (`batch_size` items at a time; 96 +
    4 x 3 token positions per item instead of 4 x 100 by default), the lm_head only where a
    candidate token is predicted; or any callable ids [B, S] -> logits [B, S, V], given each
    context + candidate sequence whole (`batch_size` sequences at a time)."""
    from .decoder import EigenDecoder
    n, choices, span = items.candidates.shape
    ctx = items.contexts.shape[1]
    scores = []
    if isinstance(model, EigenDecoder):
        for start in tqdm(range(0, n, batch_size), desc=desc, unit="batch", disable=not progress):
            scores.append(_shared_context_scores(model, items.contexts[start:start + batch_size],
                                                 items.candidates[start:start + batch_size]))
        picked = torch.cat(scores).argmax(-1)
        return float((picked == items.answer).double().mean())
    seqs = torch.cat([items.contexts[:, None, :].expand(n, choices, ctx), items.candidates], dim=2).reshape(-1, ctx + span)
    for start in tqdm(range(0, seqs.shape[0], batch_size), desc=desc, unit="batch", disable=not progress):
        ids = seqs[start:start + batch_size]
        logp = torch.log_softmax(_at_least_f32(model(ids)[:, ctx - 1:-1]), dim=-1)  # predictions of the span tokens
        scores.append(logp.gather(-1, ids[:, ctx:, None])[..., 0].sum(-1))
    picked = torch.cat(scores).view(n, choices).argmax(-1)
    return float((picked == items.answer).double().mean())


def _shared_context_scores(model, contexts: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """contexts [b, ctx], candidates [b, C, span] -> summed log-probabilities [b, C]: the contexts
    run once into a cache, copied per candidate, then the candidates' first span - 1 tokens."""
    b, choices, span = candidates.shape
    ctx = contexts.shape[1]
    cache = model.new_cache(b, ctx + span - 1, dtype=next(model.parameters()).dtype)
    h = model.hidden_states(contexts, cache=cache)
    first = torch.log_softmax(_at_least_f32(model.head(h[:, -1])), -1)  # [b, V]: predicts each candidate's first token
    for buffers in (cache.keys, cache.values, cache.positions):
        buffers[:] = [t.repeat_interleave(choices, 0) for t in buffers]
    cache.lengths = cache.lengths.repeat_interleave(choices, 1)
    flat = candidates.reshape(b * choices, span)
    score = first.repeat_interleave(choices, 0).gather(-1, flat[:, :1])[:, 0]
    if span > 1:
        positions = torch.arange(ctx, ctx + span - 1).expand(b * choices, span - 1)
        rest = torch.log_softmax(_at_least_f32(model.head(model.hidden_states(flat[:, :-1], positions, cache))), -1)
        score = score + rest.gather(-1, flat[:, 1:, None])[..., 0].sum(-1)
    return score.view(b, choices)


def _at_least_f32(logits: torch.Tensor) -> torch.Tensor:
    return logits.to(torch.promote_types(logits.dtype, torch.float32))
