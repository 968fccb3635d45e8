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
    [0, 1]). `model`: an EigenDecoder (its lm_head then runs only on the positions that predict a
    candidate token, 5 of 100 by default) or any callable ids [B, S] -> logits [B, S, V]."""
    n, choices, span = items.candidates.shape
    ctx = items.contexts.shape[1]
    seqs = torch.cat([items.contexts[:, None, :].expand(n, choices, ctx), items.candidates], dim=2).reshape(-1, ctx + span)
    scores = []
    for start in tqdm(range(0, seqs.shape[0], batch_size), desc=desc, unit="batch", disable=not progress):
        ids = seqs[start:start + batch_size]
        logp = torch.log_softmax(_span_logits(model, ids, ctx).float(), dim=-1)  # predictions of the span tokens
        scores.append(logp.gather(-1, ids[:, ctx:, None])[..., 0].sum(-1))
    picked = torch.cat(scores).view(n, choices).argmax(-1)
    return float((picked == items.answer).double().mean())


def _span_logits(model, ids: torch.Tensor, ctx: int) -> torch.Tensor:
    """Logits [B, span, V] at positions ctx - 1 .. S - 2 of ids [B, S] (those predicting the span)."""
    from .decoder import EigenDecoder
    if isinstance(model, EigenDecoder):
        return model.head(model.hidden_states(ids)[:, ctx - 1:-1])
    return model(ids)[:, ctx - 1:-1]
