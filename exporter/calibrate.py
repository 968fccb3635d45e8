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


@dataclass
class LayerStats:
    """Float64 Gram matrices of one layer, each [heads, head_dim, head_dim].

    key_pre   pre-RoPE keys per KV head (RoPE models) or keys + their group's queries
              per KV head (other models)
    key_joint rotated queries + keys, all heads summed [1, d, d] (RoPE models only)
    value     values per KV head
    """

    key_pre: torch.Tensor
    value: torch.Tensor
    key_joint: torch.Tensor | None
    tokens: int


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
        if x.dim() == 3:  # projection output [B, S, H*d] -> [B, H, S, d]
            x = x.view(x.shape[0], x.shape[1], n_heads, -1).transpose(1, 2)
        b, s = x.shape[0], x.shape[2]
        g = _gram(x)
        self.grams[name] = self.grams[name] + g if name in self.grams else g
        if name == "value":
            self.tokens += b * s

    def result(self) -> LayerStats:
        a, g = self.attn, self.grams
        if a.rope:
            key_pre = g["key"]
            joint = (g["rot_q"].sum(0) + g["rot_k"].sum(0))[None]
        else:
            key_pre = g["key"] + _group_sum(g["query"], a.n_kv_heads)
            joint = None
        return LayerStats(key_pre=key_pre, value=g["value"], key_joint=joint, tokens=self.tokens)


@contextmanager
def gram_hooks(attn: LowRankAttention) -> Iterator[_Accumulator]:
    """Hooks on one uncompressed attention module; removed on exit, whatever happens."""
    acc = _Accumulator(attn)
    taps = [(attn.k_proj, "key", attn.n_kv_heads), (attn.v_proj, "value", attn.n_kv_heads)]
    if attn.rope:
        taps += [(attn.rotated_query, "rot_q", attn.n_heads), (attn.rotated_key, "rot_k", attn.n_kv_heads)]
    else:
        taps.append((attn.q_proj, "query", attn.n_heads))
    handles = [m.register_forward_hook(lambda mod, inp, out, n=name, h=heads: acc.add(n, out, h))
               for m, name, heads in taps]
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
            layer.attn.key_mode != "plain" for layer in decoder.layers):
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
