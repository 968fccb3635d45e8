"""Calibration: Gram matrices of each layer's attention activations.

Samples are pushed through the *uncompressed* decoder one layer at a time, so only one
layer's activations (plus the hidden states between layers) live in memory, unless the Fisher
pass runs (below), which carries the same hooks on its whole-model forward. Forward
hooks, attached inside a context manager that always removes them, accumulate float64
Gram matrices XᵀX; their eigenvectors are the right singular vectors of the stacked
activations X (the paper's SVD, without materialising X). They also weigh each key by the
attention it receives and tally the attention mass at each query-key distance, from the
op's own attention weights (`reference.attention_probs`): the statistics of attention-weighted
query-aware keys (`methods.py`). `fisher_grams` is the one pass over the whole model at once
(forward and backward, one sample at a time, so its autograd graph spans every layer): the
keys' Fisher information (Fisher-weighted keys, the default). When a method reads the Fisher
statistics and nothing watches the layers one by one, the same hooks ride on that pass's
forward instead of a layer-streamed pass of their own (`calibrate`).
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from tqdm.auto import tqdm

from eigenkv.exporter.attention import LowRankAttention
from eigenkv.exporter.decoder import EigenDecoder
from eigenkv.plugins.reference import attention_probs
from eigenkv.plugins.spec import RopeMode


@dataclass
class LayerStats:
    """Float64 Gram matrices Σ x xᵀ of one layer's activations over `tokens` calibration tokens.

    query     [Hq, d, d]   queries as projected (after any QK-norm; pre-RoPE in RoPE models)
    key       [Hkv, d, d]  keys as projected (after any QK-norm; pre-RoPE in RoPE models)
    value     [Hkv, d, d]
    rot_query [1, d, d]    rotated queries, all heads summed (RoPE models, else None)
    rot_key   [1, d, d]    rotated keys, all heads summed (RoPE models, else None)
    attn_out  [Hq*d, Hq*d] attention outputs as o_proj reads them (all heads, cross terms kept)
    key_attention [Hkv, d, d]  Σ_p w_p k_p k_pᵀ of the keys as projected, w_p = the attention key p
              receives, summed over its KV head's query heads and all queries, divided by the group
              size (so the weights sum to `tokens`, like `key`'s)
    attention_distance [Hq, S]  attention mass at each query-key distance Δ = 0..S-1 (query
              position minus key position), summed over queries, per query head; RoPE models, else None
    key_fisher [Hkv, d, d]  Σ_s g_s g_sᵀ, g_s the gradient of the log-probability of sampled next
              tokens with respect to key s as projected (`fisher_grams`), else None
    key_fisher_x [Hkv, d, d]  Σ_s |g_s|² k_s k_sᵀ (the keys weighted by their gradients' energy)
    """

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    rot_query: torch.Tensor | None
    rot_key: torch.Tensor | None
    attn_out: torch.Tensor
    tokens: int
    key_attention: torch.Tensor | None = None
    attention_distance: torch.Tensor | None = None
    key_fisher: torch.Tensor | None = None
    key_fisher_x: torch.Tensor | None = None

    @property
    def key_pre(self) -> torch.Tensor:
        """The paper's key statistic per KV head: pre-RoPE keys (RoPE models) or keys plus
        their group's queries (others)."""
        return self.key if self.rot_key is not None else self.key + _group_sum(self.query, self.key.shape[0])

    @property
    def key_joint(self) -> torch.Tensor | None:
        """Rotated queries + keys [1, d, d] (the paper's `joint` statistic; RoPE models)."""
        return None if self.rot_key is None else self.rot_query + self.rot_key


def _gram(x: torch.Tensor) -> torch.Tensor:
    """x [B, H, S, d] -> sum over B, S of x xᵀ per head: [H, d, d] float64."""
    x = x.detach().to(torch.float64)
    return torch.einsum("bhsd,bhse->hde", x, x)


def _group_sum(gram: torch.Tensor, n_kv: int) -> torch.Tensor:
    """[Hq, d, d] -> [Hkv, d, d]: each KV head gets the sum over its query group."""
    return gram.view(n_kv, -1, *gram.shape[1:]).sum(1)


ATTENTION_CHUNK_BYTES = 16 << 20  # query rows per block of attention weights (all sequences): about this many bytes


def _distance_sums(probs: torch.Tensor, t0: int) -> torch.Tensor:
    """probs [H, T, S] for query rows t0..t0+T-1 over key positions 0..S-1 -> [H, S]: the sum over
    rows of probs[h, t, t - Δ] for Δ = 0..S-1 (zero where t - Δ < 0). Diagonals read in place:
    keys flipped and zero-padded to 2S, so row i's key t - Δ sits at offset i(2S-1) + S-1-t0 + Δ."""
    h, rows, s = probs.shape
    padded = torch.nn.functional.pad(probs.flip(-1), (0, s))  # [H, T, 2S]
    skewed = padded.as_strided((h, rows, s), (rows * 2 * s, 2 * s - 1, 1), s - 1 - t0)
    return skewed.sum(1)


def received_attention(attn: LowRankAttention, q: torch.Tensor, k: torch.Tensor, rope: bool
                       ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention weights of one calibration batch, in blocks of query rows, reduced as they come.

    q [B, Hq, S, d], k [B, Hkv, S, d] as scored (rotated in RoPE models), positions 0..S-1 of every
    sequence, the layer's scale, ALiBi and window (`reference.attention_probs`). Returns
    (received [B, Hkv, S]: the attention each key gets from its query group's heads over all
    queries, divided by the group size; distance [Hq, S] float64: attention mass at query-key
    distance Δ = 0..S-1 summed over batch and queries, None unless `rope`).
    """
    b, hq, s, _ = q.shape
    hkv = k.shape[1]
    k = k.repeat_interleave(hq // hkv, dim=1)  # once, not once per block: [B, Hq, S, d]
    rows = max(1, ATTENTION_CHUNK_BYTES // (4 * b * hq * s))
    received = torch.zeros(b, hq, s, dtype=torch.float32)
    distance = torch.zeros(hq, s, dtype=torch.float64) if rope else None
    lengths = torch.full((b,), s, dtype=torch.int64)
    for t0 in range(0, s, rows):
        t = torch.arange(t0, min(s, t0 + rows))
        probs = attention_probs(q[:, :, t], k, lengths, t.expand(b, -1), scale=attn.scale,
                                alibi_slopes=attn.alibi_slopes, window=attn.window).float()  # [B, Hq, T, S]
        received += probs.sum(2)
        if distance is not None:  # every sequence has the same positions: sum them first
            distance += _distance_sums(probs.sum(0), t0).double()
    return received.view(b, hkv, hq // hkv, s).sum(2) / (hq // hkv), distance


class _Accumulator:
    def __init__(self, attn: LowRankAttention, attention: bool = True):
        self.attn, self.tokens, self.attention = attn, 0, attention
        self.grams: dict[str, torch.Tensor] = {}
        self.scored: dict[str, torch.Tensor] = {}  # this batch's queries/keys as the op scores them

    @torch.no_grad()  # also under the Fisher pass's autograd forward: statistics, not graph
    def score(self, name: str, x: torch.Tensor) -> None:
        """Keep q or k as scored; with both, add the attention-weighted key Gram (needs `key`'s input first)."""
        self.scored[name] = x.detach()
        if "q" not in self.scored or "k" not in self.scored:
            return
        q, k = self.scored.pop("q"), self.scored.pop("k")
        received, distance = received_attention(self.attn, q, k, self.attn.rope)
        keys = self.scored.pop("key").to(torch.float64)  # [B, Hkv, S, d] as projected
        g = torch.einsum("bhs,bhsd,bhse->hde", received.to(torch.float64), keys, keys)
        self.grams["key_attention"] = self.grams["key_attention"] + g if "key_attention" in self.grams else g
        if distance is not None:
            self.grams["distance"] = self.grams["distance"] + distance if "distance" in self.grams else distance

    @torch.no_grad()
    def add(self, name: str, x: torch.Tensor, n_heads: int) -> None:
        if name == "attn_out":  # [B, S, Hq*d]: one Gram over all heads
            x = x.detach().to(torch.float64).flatten(0, 1)
            g = (x.T @ x)[None]
            self.grams[name] = self.grams[name] + g if name in self.grams else g
            return
        if x.dim() == 3:  # projection output [B, S, H*d] -> [B, H, S, d]
            x = x.view(x.shape[0], x.shape[1], n_heads, -1).transpose(1, 2)
        b, s = x.shape[0], x.shape[2]
        if name == "key" and self.attention:
            self.scored["key"] = x.detach()
        g = _gram(x)
        self.grams[name] = self.grams[name] + g if name in self.grams else g
        if name == "value":
            self.tokens += b * s

    def result(self) -> LayerStats:
        g = self.grams
        rot_q = g["rot_q"].sum(0, keepdim=True) if "rot_q" in g else None
        rot_k = g["rot_k"].sum(0, keepdim=True) if "rot_k" in g else None
        return LayerStats(query=g["query"], key=g["key"], value=g["value"], rot_query=rot_q, rot_key=rot_k,
                          attn_out=g["attn_out"][0], tokens=self.tokens, key_attention=g.get("key_attention"),
                          attention_distance=g.get("distance"))


@contextmanager
def gram_hooks(attn: LowRankAttention, attention: bool = True) -> Iterator[_Accumulator]:
    """Hooks on one uncompressed attention module; removed on exit, whatever happens.
    attention: also the attention statistics (`key_attention`, `attention_distance`)."""
    acc = _Accumulator(attn, attention)
    taps = [(attn.projected_query, "query", attn.n_heads), (attn.projected_key, "key", attn.n_kv_heads),
            (attn.v_proj, "value", attn.n_kv_heads)]
    if attn.rope:
        taps += [(attn.rotated_query, "rot_q", attn.n_heads), (attn.rotated_key, "rot_k", attn.n_kv_heads)]
    handles = [m.register_forward_hook(lambda mod, inp, out, n=name, h=heads: acc.add(n, out, h))
               for m, name, heads in taps]
    scored = (attn.rotated_query, attn.rotated_key) if attn.rope else (attn.projected_query, attn.projected_key)
    handles += [m.register_forward_hook(lambda mod, inp, out, n=name: acc.score(n, out))
                for m, name in zip(scored, ("q", "k")) if attention]
    handles.append(attn.o_proj.register_forward_pre_hook(lambda mod, inp: acc.add("attn_out", inp[0], attn.n_heads)))
    try:
        yield acc
    finally:
        for h in handles:
            h.remove()


LayerCallback = Callable[[int, torch.Tensor, torch.Tensor, LayerStats], None]


@torch.no_grad()
def calibrate(decoder: EigenDecoder, samples: torch.Tensor, batch_size: int = 4,
              on_layer: LayerCallback | None = None, progress: bool = True,
              attention: bool = True, fisher: bool = False, fisher_draws: int = 1) -> list[LayerStats]:
    """samples [N, S] token ids -> one LayerStats per layer.

    attention: also measure the attention statistics (`key_attention`, `attention_distance`; about
    as much work again as the forward passes); False leaves them None, for methods that do not
    read them (`method.needs_attention`).
    fisher: also the keys' Fisher statistics (`key_fisher`, `key_fisher_x`: `fisher_grams` with
    `fisher_draws` draws, one forward and `fisher_draws` backward passes of the whole model per
    sample), for methods that read them (`method.needs_fisher`).

    on_layer(i, inputs [N, S, hidden], outputs [N, S, hidden], stats) runs after each layer,
    with that layer's uncompressed inputs and outputs (the error-budget search uses it).

    With `fisher` and no `on_layer`, the plain and attention statistics are gathered by hooks on
    the Fisher pass's own forward (one sample at a time, PyTorch's fused attention), not by a
    separate layer-streamed pass: one forward of the model per sample instead of two.
    """
    if decoder.key_ranks != [decoder.dims.head_dim] * decoder.dims.n_layers or any(
            layer.attn.rope_mode not in (RopeMode.NONE, RopeMode.ROTATED) for layer in decoder.layers):
        raise ValueError("calibrate needs the uncompressed decoder")
    if fisher and on_layer is None:
        with ExitStack() as hooks:
            accs = [hooks.enter_context(gram_hooks(layer.attn, attention)) for layer in decoder.layers]
            grams = _fisher_pass(decoder, samples, draws=fisher_draws, progress=progress, desc="calibrate")
        stats = [acc.result() for acc in accs]
        _set_fisher(stats, grams)
        return stats
    positions = torch.arange(samples.shape[1]).expand(samples.shape[0], -1)
    hidden = decoder.embed_inputs(samples, positions)
    stats = []
    for i, layer in enumerate(tqdm(decoder.layers, desc="calibrate", unit="layer", disable=not progress)):
        out = torch.empty_like(hidden)
        with gram_hooks(layer.attn, attention) as acc:
            for start in range(0, len(samples), batch_size):
                sl = slice(start, start + batch_size)
                out[sl] = layer(hidden[sl], positions[sl], decoder.rope)
        stats.append(acc.result())
        if on_layer is not None:
            on_layer(i, hidden, out, stats[-1])
        hidden = out
    if fisher:
        fisher_grams(decoder, samples, stats, draws=fisher_draws, progress=progress)
    return stats


def _weighted_grams(x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x, g [B, H, S, d] -> (Σ g gᵀ, Σ |g|² x xᵀ) per head, float64 [H, d, d]."""
    x, g = x.to(torch.float64), g.to(torch.float64)
    w = g.pow(2).sum(-1)
    return torch.einsum("bhsd,bhse->hde", g, g), torch.einsum("bhs,bhsd,bhse->hde", w, x, x)


def sample_next_tokens(probs: torch.Tensor, generator: torch.Generator, block: int = 256) -> torch.Tensor:
    """One token per row of probs [S, V] (non-negative, each row summing to ~1) -> [S] int64.

    Inverse-CDF sampling in two levels: a uniform u per row from `generator`; the block of
    `block` consecutive tokens whose cumulative probability (float64) first exceeds u times the
    row's total, then the token inside that block the same way; tokens of probability 0 are never
    drawn. The same distribution as torch.multinomial(probs, 1), which draws an exponential variate
    for every one of the S × V entries (seconds per 1k × 49k block of rows on a CPU); this draws S
    variates and reads probs once, without copying it. Raises ValueError when a row's total is not
    a positive finite number (NaN or inf logits upstream).
    """
    s, v = probs.shape
    probs = probs.contiguous()
    nb, full = -(-v // block), v // block * block
    mass = torch.zeros(s, nb, dtype=torch.float64)  # [S, nb] probability of each block
    mass[:, :v // block] = probs[:, :full].view(s, -1, block).sum(-1, dtype=torch.float64)
    if full < v:
        mass[:, -1] = probs[:, full:].sum(-1, dtype=torch.float64)
    cdf = mass.cumsum(-1)
    total = cdf[:, -1:]
    if not bool((torch.isfinite(total) & (total > 0)).all()):
        raise ValueError("sample_next_tokens: every row needs a positive, finite total probability")
    x = torch.rand(s, 1, generator=generator, dtype=torch.float64) * total  # [S, 1]
    last = (cdf < total).sum(-1, keepdim=True)  # the last block with mass: never past it
    b = torch.searchsorted(cdf, x, right=True).minimum(last)  # [S, 1]: cdf[b - 1] <= x < cdf[b]
    before = torch.where(b > 0, cdf.gather(1, (b - 1).clamp_min(0)), 0.0)
    x = (x - before).clamp_min(0)  # u's offset inside block b, measured from the boundary searched
    idx = b * block + torch.arange(block)  # [S, block] the block's tokens (the last block may be short)
    inner = probs.gather(1, idx.clamp_max(v - 1)).to(torch.float64).masked_fill(idx >= v, 0).cumsum(-1)
    last = (inner < inner[:, -1:]).sum(-1, keepdim=True)  # the block's last token with mass
    t = torch.searchsorted(inner, x, right=True).minimum(last)
    return (b * block + t)[:, 0]


def fisher_grams(decoder: EigenDecoder, samples: torch.Tensor, stats: list[LayerStats], draws: int = 1,
                 seed: int = 0, progress: bool = True) -> None:
    """The keys' Fisher statistics, set on `stats` (one LayerStats per layer) in place.

    samples [N, S] token ids. Each sample runs through the uncompressed model with autograd (the
    differentiable attention path; the weights are not trained); `draws` times, one next token per
    position is sampled from the model's own distribution (`sample_next_tokens`, a generator seeded
    with `seed`) and the log-probability of those tokens, summed, is back-propagated (its gradient
    with respect to the logits, onehot(y) - p, is handed to the LM head directly). Its gradient g_s
    with respect to each key s as projected (pre-RoPE in RoPE models, after any QK-norm) estimates
    the keys' Fisher information E g gᵀ: ½ eᵀ F e is the second-order KL between the model's
    next-token distributions with and without a key error e (the cross terms between predicted
    positions vanish in expectation, so one backward pass per draw serves all of a sample's
    positions; the objective then keeps each key's own term, dropping the cross terms between keys).
    Unlike the layer-streamed statistics, this holds the whole model's autograd graph for one sample
    at a time. Sets, per KV head [Hkv, d, d] float64: key_fisher = Σ g gᵀ and key_fisher_x = Σ |g|²
    k kᵀ, summed over samples, positions and draws. (The Fisher weighting of FWSVD: Hsu et al.,
    "Language model compression with weighted low-rank factorization", ICLR 2022; here a full d × d
    Fisher per KV head of the cache, used in the Kronecker-factored form of K-FAC, Martens & Grosse
    2015: `methods.py`.)
    """
    _set_fisher(stats, _fisher_pass(decoder, samples, draws, seed, progress))


def _set_fisher(stats: list[LayerStats], grams: list[dict]) -> None:
    for st, g in zip(stats, grams):
        for name, v in g.items():
            setattr(st, name, v)


def _fisher_pass(decoder: EigenDecoder, samples: torch.Tensor, draws: int = 1, seed: int = 0,
                 progress: bool = True, desc: str = "fisher") -> list[dict]:
    """`fisher_grams`' pass: one dict per layer, {"key_fisher", "key_fisher_x"} [Hkv, d, d] float64."""
    params = [p for p in decoder.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    grams: list[dict] = [{} for _ in decoder.layers]

    def keep(i):
        def hook(mod, inp, out):  # out: the keys as projected [B, Hkv, S, d]
            keys = out.detach()

            def grad_hook(g):  # once per draw's backward pass
                gg, gx = _weighted_grams(keys, g)
                d = grams[i]
                d["key_fisher"] = d["key_fisher"] + gg if "key_fisher" in d else gg
                d["key_fisher_x"] = d["key_fisher_x"] + gx if "key_fisher_x" in d else gx
            out.register_hook(grad_hook)
        return hook

    handles, differentiable = [], [layer.attn.differentiable for layer in decoder.layers]
    for i, layer in enumerate(decoder.layers):
        layer.attn.differentiable = True  # the reference op has no backward
        handles.append(layer.attn.projected_key.register_forward_hook(keep(i)))
    gen = torch.Generator().manual_seed(seed)
    try:
        with torch.enable_grad():
            for row in tqdm(samples, desc=desc, unit="sample", disable=not progress):
                ids = row[None]
                positions = torch.arange(ids.shape[1])[None]
                h = decoder.embed_inputs(ids, positions).detach().requires_grad_(True)
                for layer in decoder.layers:
                    h = layer(h, positions, decoder.rope)
                logits = decoder.head(h)[0]  # [S, V]
                probs = torch.softmax(logits.detach().to(torch.promote_types(logits.dtype, torch.float32)), -1)
                for draw in range(draws):  # one forward pass, a backward pass per draw
                    y = sample_next_tokens(probs, gen)  # [S]
                    # d/dlogits Σ_s log softmax(logits_s)[y_s] = onehot(y_s) - p_s: given directly, it
                    # spares the [S, V] log-softmax, gather and their backward passes
                    grad = probs.neg()
                    grad[torch.arange(len(y)), y] += 1
                    logits.backward(grad.to(logits.dtype), retain_graph=draw < draws - 1)
                    del grad
                del h, logits, probs  # [S, V] each: freed before the next sample's graph
    finally:
        for h_ in handles:
            h_.remove()
        for layer, was in zip(decoder.layers, differentiable):
            layer.attn.differentiable = was
        for p in params:
            p.requires_grad_(True)
    return grams
