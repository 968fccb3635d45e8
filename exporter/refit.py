"""Sequential output refit: each compressed layer's W_o refitted, in layer order, on the inputs
the compressed model actually gives it (closed form, no gradients).

The fold's output-aware values (`fold.refit_output`) fit W_o' to the original attention output
with both models fed the *original* hidden states. A compressed model never sees those after its
first compressed layer: every layer's error shifts the next layer's input. This pass runs both
models layer by layer over the calibration windows, keeping their two residual streams, and for
each compressed layer l solves

    W_o' = argmin Σ_t ||W_o' a_t + b - y_t||² + λ ||W_o'||²

where a_t [Hq·r_v] is the compressed layer's input to o_proj on the compressed stream, y_t
[hidden] the original attention's output on the original stream, b the bias (kept) and
λ = ridge · mean(diag(Σ a aᵀ)). It is the sequential (compressed-input) form of the layer-wise
least-squares updates of GPTQ/OBQ-style post-training compression (Frantar & Alistarh, 2022),
applied to the one matrix a KV-cache fold leaves free; the target is the original layer's
output, not the drifted stream's residual (measured: correcting the drift too helped wiki and
code but hurt c4 and the held-out stories).

Cost: one forward of each model over the samples (layer by layer), plus per refitted layer a
[Hq·r_v]² Gram accumulated in the model's precision (at least float32) per chunk and in float64
across chunks; memory: the two residual streams, [N·S, hidden] floats each, and the layer's
o_proj inputs, [N·S, Hq·r_v].
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from eigenkv.exporter.decoder import EigenDecoder

RIDGE = 1e-6  # relative ridge (λ / mean diagonal of the Gram): the scratch screen's value


@dataclass(frozen=True)
class RefitReport:
    layers: list[int]  # the refitted layers
    tokens: int  # calibration tokens per layer's least squares
    seconds: float
    ridge: float
    residual_before: list[float]  # per refitted layer: Σ||y - b - W_o a||² / Σ||y - b||² with the fold's W_o
    residual_after: list[float]  # the same with W_o'

    def summary(self) -> dict:
        return {"layers": self.layers, "tokens": self.tokens, "seconds": round(self.seconds, 1), "ridge": self.ridge,
                "relative_residual_before": [round(x, 5) for x in self.residual_before],
                "relative_residual_after": [round(x, 5) for x in self.residual_after]}


def compressed_layers(folded: EigenDecoder) -> list[int]:
    """Layers whose keys or values are cached below head_dim (what a refit may change)."""
    d = folded.dims.head_dim
    return [i for i, layer in enumerate(folded.layers) if layer.attn.key_rank < d or layer.attn.value_rank < d]


def refittable_layers(folded: EigenDecoder, factors: list) -> list[int]:
    """The compressed layers whose fold refitted W_o (output-aware values: `LayerFactors.output_gram`
    set); the paper's bases fold value_up into W_o and keep it."""
    return [i for i in compressed_layers(folded) if factors[i].output_gram is not None]


def _solve(gram: torch.Tensor, cross: torch.Tensor, ridge: float) -> torch.Tensor:
    """(gram + ridge·mean(diag)·I)⁻¹ cross, float64; gram [n, n], cross [n, out] -> [n, out]."""
    lhs = gram + ridge * gram.diagonal().mean().clamp_min(1e-30) * torch.eye(gram.shape[0], dtype=gram.dtype)
    return torch.linalg.solve(lhs, cross)


@torch.no_grad()
def refit_outputs(folded: EigenDecoder, original: EigenDecoder, samples: torch.Tensor,
                  layers: list[int] | None = None, ridge: float = RIDGE, chunk: int = 4,
                  progress: bool = False) -> RefitReport:
    """Refit W_o of `layers` (default: `compressed_layers(folded)`) of `folded` in place (each
    o_proj is replaced by a new nn.Linear of the same shape, dtype and bias; nothing the original
    shares is written).

    folded: the fold of `original` (same embeddings, norms and MLPs); samples [N, S] int64 token
    windows (the calibration's), run `chunk` windows at a time, positions 0..S-1. Returns a
    RefitReport with each layer's relative residual before and after (float64). Raises
    ValueError for an empty `samples` or a layer index out of range.
    """
    if samples.ndim != 2 or samples.numel() == 0:
        raise ValueError(f"samples must be a non-empty [N, S] tensor of token ids, got shape {tuple(samples.shape)}")
    n_layers = len(folded.layers)
    todo = compressed_layers(folded) if layers is None else sorted(set(layers))
    if any(not 0 <= i < n_layers for i in todo):
        raise ValueError(f"layers must be in 0..{n_layers - 1}, got {todo}")
    t0 = time.perf_counter()
    if not todo:
        return RefitReport([], int(samples.numel()), 0.0, ridge, [], [])
    batches = samples.split(chunk)
    positions = [torch.arange(b.shape[1]).expand_as(b) for b in batches]
    h_orig = [original.embed_inputs(b, p) for b, p in zip(batches, positions)]
    h_comp = [folded.embed_inputs(b, p) for b, p in zip(batches, positions)]
    before, after = [], []
    bar = tqdm(total=n_layers, desc="refit W_o", unit="layer", disable=not progress)
    for i, (lo, lc) in enumerate(zip(original.layers, folded.layers)):
        if i not in todo:
            h_orig = [lo(h, p, original.rope) for h, p in zip(h_orig, positions)]
            h_comp = [lc(h, p, folded.rope) for h, p in zip(h_comp, positions)]
            bar.update()
            continue
        o_proj = lc.attn.o_proj
        width, hidden = o_proj.in_features, o_proj.out_features
        bias = None if o_proj.bias is None else o_proj.bias.detach().to(torch.float64)
        if lc.attn is lo.attn or o_proj is lo.attn.o_proj:
            raise ValueError(f"layer {i}: the folded model shares its attention with the original; refit a fold")
        captured = []
        gram = torch.zeros(width, width, dtype=torch.float64)
        cross = torch.zeros(width, hidden, dtype=torch.float64)
        energy = 0.0
        for j, (h, p) in enumerate(zip(h_orig, positions)):
            y = lo.attn(lo.attn_norm(h), p, original.rope)
            h_orig[j] = lo.mlp_block(h + lo.attn_post_norm(y))
            hook = o_proj.register_forward_hook(lambda mod, args, out: captured.append(args[0]))
            try:
                lc.attn(lc.attn_norm(h_comp[j]), p, folded.rope)
            finally:
                hook.remove()
            a = captured[j].reshape(-1, width)
            a = a.float() if a.dtype in (torch.float16, torch.bfloat16) else a  # float32 or the model's float64
            t = y.reshape(-1, hidden).to(a.dtype)
            if bias is not None:
                t = t - bias.to(a.dtype)
            gram += (a.T @ a).double()
            cross += (a.T @ t).double()
            energy += float(t.double().pow(2).sum())
        w_old = o_proj.weight.detach().to(torch.float64).T  # [width, hidden]
        w_new = _solve(gram, cross, ridge)
        # Σ||t - a w||² = Σ||t||² - 2 tr(wᵀ Σaᵀt) + tr(wᵀ Σaᵀa w): no second pass over the tokens
        residual = lambda w: energy - 2 * float((w * cross).sum()) + float((w * (gram @ w)).sum())  # noqa: E731
        before.append(max(residual(w_old), 0.0) / max(energy, 1e-300))
        after.append(max(residual(w_new), 0.0) / max(energy, 1e-300))
        new = nn.Linear(width, hidden, bias=o_proj.bias is not None, dtype=o_proj.weight.dtype,
                        device=o_proj.weight.device)
        new.weight.copy_(w_new.T)
        if o_proj.bias is not None:
            new.bias.copy_(o_proj.bias)
        lc.attn.o_proj = new
        for j, (h, a) in enumerate(zip(h_comp, captured)):
            h_comp[j] = lc.mlp_block(h + lc.attn_post_norm(new(a)))
        bar.update()
    bar.close()
    return RefitReport(todo, int(samples.numel()), time.perf_counter() - t0, ridge, before, after)
