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


@torch.no_grad()
def perplexity(model, tokens: torch.Tensor, window: int = 1024, batch_size: int = 4,
               progress: bool = True, desc: str = "perplexity") -> Perplexity:
    """model(ids [B, S]) -> logits [B, S, V]; tokens [T] int64, cut into T // window windows."""
    n = tokens.numel() // window
    if n == 0:
        raise ValueError(f"need at least {window} tokens for one window, got {tokens.numel()}")
    windows = tokens[: n * window].view(n, window)
    nll, count = 0.0, 0
    for start in tqdm(range(0, n, batch_size), desc=desc, unit="batch", disable=not progress):
        ids = windows[start:start + batch_size]
        logits = model(ids).float()
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
        nll += float(loss)
        count += ids[:, 1:].numel()
    return Perplexity(math.exp(nll / count), count, window)


def kl_divergence(ref_logp: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(ref ‖ model) in nats; ref_logp (log-probabilities) and logits [..., V].
    Differentiable in `logits`."""
    logp = torch.log_softmax(logits.float(), -1)
    return (ref_logp.exp() * (ref_logp - logp)).sum(-1).mean()
