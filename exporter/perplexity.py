"""Perplexity over non-overlapping windows of a token stream, and the KL divergence between two
models' next-token distributions (healing's loss, the sensitivity probes' measure)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm


@dataclass(frozen=True)
class Perplexity:
    value: float
    tokens: int  # tokens scored (each window scores window - 1 of them)
    window: int


# logits bytes per head chunk: below glibc's largest mmap threshold (32 MiB, eigenkv/malloc.py), so
# the chunks are reused from the heap instead of mapped and faulted in for every batch
HEAD_CHUNK_BYTES = 16 << 20


@torch.no_grad()
def perplexity(model, tokens: torch.Tensor, window: int = 1024, batch_size: int = 4,
               progress: bool = True, desc: str = "perplexity", head_chunk: int | None = None) -> Perplexity:
    """exp(mean next-token negative log-likelihood) over T // window non-overlapping windows of
    `tokens` [T] int64, `batch_size` windows per forward pass; each window scores window - 1 tokens.

    `model`: an EigenDecoder, whose lm_head runs on `head_chunk` tokens at a time (default: as
    many as fit HEAD_CHUNK_BYTES of float32 logits), so a batch never holds its full logits
    [B, window, vocab] (805 MB for 4 x 1024 tokens of a 49k vocabulary, three times over with
    the loss's temporaries); or any callable ids [B, S] -> logits [B, S, V]. Per-chunk losses are
    summed in float64, logits taken in at least float32. Raises ValueError when `tokens` holds less than one window.
    """
    n = tokens.numel() // window
    if n == 0:
        raise ValueError(f"need at least {window} tokens for one window, got {tokens.numel()}")
    windows = tokens[: n * window].view(n, window)
    nll, count = 0.0, 0
    for start in tqdm(range(0, n, batch_size), desc=desc, unit="batch", disable=not progress):
        ids = windows[start:start + batch_size]
        nll += _nll_sum(model, ids, head_chunk)
        count += ids[:, 1:].numel()
    return Perplexity(math.exp(nll / count), count, window)


def _nll_sum(model, ids: torch.Tensor, head_chunk: int | None) -> float:
    """Summed next-token negative log-likelihood (nats) of ids [B, S] under `model`."""
    from .decoder import EigenDecoder
    targets = ids[:, 1:].reshape(-1)
    if not isinstance(model, EigenDecoder):
        logits = model(ids)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        return float(torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), targets, reduction="sum"))
    h = model.hidden_states(ids)[:, :-1]
    h = h.reshape(-1, h.shape[-1])  # [B * (S - 1), hidden]
    if head_chunk is None:
        vocab = getattr(model.lm_head, "out_features", None)
        width = max(4, model.lm_head.weight.element_size()) if vocab else 4  # logits in at least float32
        head_chunk = max(1, HEAD_CHUNK_BYTES // (width * vocab)) if vocab else 128
    nll = 0.0
    for i in range(0, h.shape[0], head_chunk):
        logits = model.head(h[i:i + head_chunk])
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        nll += float(torch.nn.functional.cross_entropy(logits, targets[i:i + head_chunk], reduction="sum"))
    return nll


def kl_divergence(ref_logp: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(ref ‖ model) in nats; ref_logp (log-probabilities) and logits [..., V].
    Differentiable in `logits`."""
    logp = torch.log_softmax(logits.float(), -1)
    return (ref_logp.exp() * (ref_logp - logp)).sum(-1).mean()
