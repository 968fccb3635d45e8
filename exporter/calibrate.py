"""Layer-streamed calibration: Gram matrices of each layer's attention activations.

Samples are pushed through the *uncompressed* decoder one layer at a time, so only one
layer's activations (plus the hidden states between layers) live in memory. Forward
hooks, attached inside a context manager that always removes them, accumulate float64
Gram matrices XᵀX; their eigenvectors are the right singular vectors of the stacked
activations X (the paper's SVD, without materialising X).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from tqdm.auto import tqdm

from eigenkv.exporter.attention import LowRankAttention
from eigenkv.exporter.decoder import EigenDecoder
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
    """

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    rot_query: torch.Tensor | None
    rot_key: torch.Tensor | None
    attn_out: torch.Tensor
    tokens: int

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


class _Accumulator:
    def __init__(self, attn: LowRankAttention):
        self.attn, self.tokens = attn, 0
        self.grams: dict[str, torch.Tensor] = {}

    def add(self, name: str, x: torch.Tensor, n_heads: int) -> None:
        if name == "attn_out":  # [B, S, Hq*d]: one Gram over all heads
            x = x.detach().to(torch.float64).flatten(0, 1)
            g = (x.T @ x)[None]
            self.grams[name] = self.grams[name] + g if name in self.grams else g
            return
        if x.dim() == 3:  # projection output [B, S, H*d] -> [B, H, S, d]
            x = x.view(x.shape[0], x.shape[1], n_heads, -1).transpose(1, 2)
        b, s = x.shape[0], x.shape[2]
        g = _gram(x)
        self.grams[name] = self.grams[name] + g if name in self.grams else g
        if name == "value":
            self.tokens += b * s

    def result(self) -> LayerStats:
        g = self.grams
        rot_q = g["rot_q"].sum(0, keepdim=True) if "rot_q" in g else None
        rot_k = g["rot_k"].sum(0, keepdim=True) if "rot_k" in g else None
        return LayerStats(query=g["query"], key=g["key"], value=g["value"], rot_query=rot_q, rot_key=rot_k,
                          attn_out=g["attn_out"][0], tokens=self.tokens)


@contextmanager
def gram_hooks(attn: LowRankAttention) -> Iterator[_Accumulator]:
    """Hooks on one uncompressed attention module; removed on exit, whatever happens."""
    acc = _Accumulator(attn)
    taps = [(attn.projected_query, "query", attn.n_heads), (attn.projected_key, "key", attn.n_kv_heads),
            (attn.v_proj, "value", attn.n_kv_heads)]
    if attn.rope:
        taps += [(attn.rotated_query, "rot_q", attn.n_heads), (attn.rotated_key, "rot_k", attn.n_kv_heads)]
    handles = [m.register_forward_hook(lambda mod, inp, out, n=name, h=heads: acc.add(n, out, h))
               for m, name, heads in taps]
    handles.append(attn.o_proj.register_forward_pre_hook(lambda mod, inp: acc.add("attn_out", inp[0], attn.n_heads)))
    try:
        yield acc
    finally:
        for h in handles:
            h.remove()


LayerCallback = Callable[[int, torch.Tensor, torch.Tensor, LayerStats], None]


@torch.no_grad()
def calibrate(decoder: EigenDecoder, samples: torch.Tensor, batch_size: int = 4,
              on_layer: LayerCallback | None = None, progress: bool = True) -> list[LayerStats]:
    """samples [N, S] token ids -> one LayerStats per layer.

    on_layer(i, inputs [N, S, hidden], outputs [N, S, hidden], stats) runs after each layer,
    with that layer's uncompressed inputs and outputs (the error-budget search uses it).
    """
    if decoder.key_ranks != [decoder.dims.head_dim] * decoder.dims.n_layers or any(
            layer.attn.rope_mode not in (RopeMode.NONE, RopeMode.ROTATED) for layer in decoder.layers):
        raise ValueError("calibrate needs the uncompressed decoder")
    positions = torch.arange(samples.shape[1]).expand(samples.shape[0], -1)
    hidden = decoder.embed_inputs(samples, positions)
    stats = []
    for i, layer in enumerate(tqdm(decoder.layers, desc="calibrate", unit="layer", disable=not progress)):
        out = torch.empty_like(hidden)
        with gram_hooks(layer.attn) as acc:
            for start in range(0, len(samples), batch_size):
                sl = slice(start, start + batch_size)
                out[sl] = layer(hidden[sl], positions[sl], decoder.rope)
        stats.append(acc.result())
        if on_layer is not None:
            on_layer(i, hidden, out, stats[-1])
        hidden = out
    return stats
