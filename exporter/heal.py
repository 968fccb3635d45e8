"""Healing: distil the folded model to the original (KL on next-token distributions) on
calibration text, training only the folded attention projections, so they stay foldable.

Trained: every attention tensor the fold created (k/v/o projections, `key_up`, the joint
bases, and q_proj where the fold rewrote it); with `HealSettings.query`, also every layer's
query projection (a private copy where the fold left it shared: a full-width W_q stays
foldable, the cache is unchanged). Shared modules (embeddings, norms, MLPs and unfolded
projections, which the original model uses too) stay frozen. The op has no backward, so
attention calls the op's math directly while healing (`plugins/sdpa_attention.py`, with autograd).
"""

from __future__ import annotations

import copy
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from eigenkv.exporter.decoder import EigenDecoder
from eigenkv.exporter.perplexity import kl_divergence


@dataclass(frozen=True)
class HealSettings:
    steps: int = 0
    lr: float = 1e-4
    batch_size: int = 2
    seq_len: int = 256
    seed: int = 0
    eval_every: int = 0  # steps between held-out KL measurements (0: none)
    query: bool = False  # also train every layer's query projection (own_query_projections)


@dataclass
class HealReport:
    steps: int
    seconds: float
    kl_first: float  # mean KL of the first 10% of steps (nats/token)
    kl_last: float  # mean KL of the last 10%
    trained_parameters: int
    lr: float = 0.0  # the peak learning rate of the steps
    batch_size: int = 0  # windows per step, as drawn (0: no step ran)
    seq_len: int = 0  # tokens per window, as drawn
    query: bool = False  # the query projections were trained too
    losses: list[float] = field(default_factory=list)
    held_out_kl: list[tuple[int, float]] = field(default_factory=list)  # (step, KL nats/token) on held-out text

    def summary(self) -> dict:
        out = {"steps": self.steps, "seconds": round(self.seconds, 1), "kl_first": round(self.kl_first, 5),
               "kl_last": round(self.kl_last, 5), "trained_parameters": self.trained_parameters,
               "lr": self.lr, "batch": self.batch_size, "seq_len": self.seq_len, "query": self.query}
        if self.held_out_kl:
            out["held_out_kl"] = [[s, round(k, 5)] for s, k in self.held_out_kl]
        return out


def folded_parameters(folded: EigenDecoder, original: EigenDecoder) -> list[torch.Tensor]:
    """Tensors the fold created (not shared with the original model)."""
    shared = {id(p) for p in original.parameters()} | {id(b) for b in original.buffers()}
    out = []
    for layer in folded.layers:
        a = layer.attn
        for t in [*a.parameters(), a.key_up, a.key_down, a.joint_basis, a.joint_query_basis]:
            if t is not None and id(t) not in shared and t.is_floating_point():
                out.append(t)
    return list({id(t): t for t in out}.values())


def own_query_projections(folded: EigenDecoder, original: EigenDecoder) -> int:
    """Give every folded layer whose q_proj is the original's module a private copy of it (so
    training it leaves the teacher intact); returns how many layers got one. The copy computes
    the same queries, so the folded model's outputs are unchanged by this call."""
    shared = {id(p) for p in original.parameters()}
    copied = 0
    for layer in folded.layers:
        if any(id(p) in shared for p in layer.attn.q_proj.parameters()):
            layer.attn.q_proj = copy.deepcopy(layer.attn.q_proj)
            copied += 1
    return copied


@contextmanager
def _training(folded: EigenDecoder, params: list[torch.Tensor]):
    saved = [p.requires_grad for p in folded.parameters()]
    try:
        for p in folded.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        for layer in folded.layers:
            layer.attn.differentiable = True
        yield
    finally:
        for p, r in zip(folded.parameters(), saved):
            p.requires_grad_(r)
        for p in params:
            p.requires_grad_(False)
        for layer in folded.layers:
            layer.attn.differentiable = False


def heal(folded: EigenDecoder, original: EigenDecoder, tokens, settings: HealSettings,
         progress: bool = True, weights: dict | None = None, held_out: torch.Tensor | None = None) -> HealReport:
    """Train `folded` in place on KL(original ‖ folded) with Adam (warm-up, then linear decay).

    tokens: the calibration stream [T] (int64), or {text: [T_i]} streams of a mix, each cut into
    windows of settings.seq_len tokens; every step draws settings.batch_size windows, each from a
    text chosen by `weights` ({text: weight}, default equal). held_out [B, S]: token windows never
    trained on; with settings.eval_every, the KL on them is measured before the first step, every
    eval_every steps and after the last (`HealReport.held_out_kl`: the curve that says whether more
    steps would pay). settings.query: the query projections train too (own_query_projections).
    ValueError if a text has fewer than seq_len tokens."""
    if settings.query:
        own_query_projections(folded, original)
    params = folded_parameters(folded, original)
    gen = torch.Generator().manual_seed(settings.seed)
    streams = tokens if isinstance(tokens, dict) else {"text": tokens}
    names = list(streams)
    pools = []
    for name in names:
        n_windows = streams[name].numel() // settings.seq_len
        if n_windows < 1:
            raise ValueError(f"healing needs at least {settings.seq_len} tokens of {name}, got {streams[name].numel()}")
        pools.append(streams[name][: n_windows * settings.seq_len].view(n_windows, settings.seq_len))
    probs = torch.tensor([float((weights or {}).get(n, 1.0)) for n in names], dtype=torch.float64)
    losses: list[float] = []
    curve: list[tuple[int, float]] = []
    reference = None
    if held_out is not None and settings.eval_every:
        with torch.no_grad():
            reference = torch.log_softmax(original(held_out).float(), -1)

    def measure(step: int) -> None:
        if reference is not None:
            with torch.no_grad():
                curve.append((step, float(kl_divergence(reference, folded(held_out)))))

    t0 = time.perf_counter()
    drawn = (0, 0)  # [batch, tokens] of the windows the steps trained on
    measure(0)
    with _training(folded, params):
        opt = torch.optim.Adam(params, lr=settings.lr)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10) * (1 - s / max(settings.steps, 1)))
        for _ in tqdm(range(settings.steps), desc="heal", unit="step", disable=not progress):
            texts = torch.multinomial(probs, settings.batch_size, replacement=True, generator=gen).tolist()
            ids = torch.stack([pools[t][int(torch.randint(0, pools[t].shape[0], (1,), generator=gen))]
                               for t in texts])
            drawn = tuple(ids.shape)
            with torch.no_grad():
                ref = torch.log_softmax(original(ids).float(), -1)
            loss = kl_divergence(ref, folded(ids))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            if settings.eval_every and len(losses) % settings.eval_every == 0 and len(losses) < settings.steps:
                measure(len(losses))
    if settings.steps:
        measure(settings.steps)
    k = max(1, len(losses) // 10)
    return HealReport(settings.steps, time.perf_counter() - t0,
                      sum(losses[:k]) / k if losses else 0.0, sum(losses[-k:]) / k if losses else 0.0,
                      sum(p.numel() for p in params), settings.lr, *drawn, settings.query, losses, curve)
