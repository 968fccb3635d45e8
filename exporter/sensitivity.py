"""Measured sensitivity: how much the model's output moves when one layer's keys or values
are cut, as KL(original ‖ probed) of next-token distributions on calibration text.

Each probe folds a single layer's keys (or values) to `probe_rank` and reruns only the
layers from there on (inputs of every layer are cached once), so 2·L probes cost about
L full forward passes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from eigenkv.exporter.decoder import EigenDecoder
from eigenkv.exporter.decompose import LayerFactors
from eigenkv.exporter.fold import fold_attention
from eigenkv.exporter.perplexity import kl_divergence


@dataclass
class Sensitivity:
    """KL (nats/token) with one layer's keys (values) at `probe_rank`, the rest uncompressed;
    None for a layer that was not probed."""

    probe_rank: int
    key_kl: list[float | None]
    value_kl: list[float | None]
    tokens: int

    def predicted(self, factors: list[LayerFactors]) -> tuple[list, list]:
        """Predicted KL at every rank r = 0..d per layer: KL_probe · loss(r) / loss(probe_rank),
        the method's own objective curve scaled to the measured KL (None for unprobed layers)."""
        out = ([], [])
        for f, kk, vk in zip(factors, self.key_kl, self.value_kl):
            for curves, loss, kl in ((out[0], f.key_loss, kk), (out[1], f.value_loss, vk)):
                if kl is None:
                    curves.append(None)
                    continue
                scale = max(kl, 0.0) / float(loss[self.probe_rank].clamp_min(1e-300))
                curves.append(loss.double() * scale)
        return out


@torch.no_grad()
def measure(decoder: EigenDecoder, factors: list[LayerFactors], samples: torch.Tensor, rope_mode: str,
            probe_rank: int | None = None, progress: bool = True, layers=None) -> Sensitivity:
    """samples [N, S] token ids (a few short sequences suffice) -> per-layer KL of each probe.
    `layers`: the layer indices to probe (default all; the others get None: a run that compresses
    only some layers, `--compress-layers`, needs no probe of the rest)."""
    d = decoder.dims.head_dim
    probe_rank = probe_rank or d // 2
    positions = torch.arange(samples.shape[1]).expand(samples.shape[0], -1)
    inputs = [decoder.embed_inputs(samples, positions)]
    for layer in decoder.layers:
        inputs.append(layer(inputs[-1], positions, decoder.rope))
    ref = torch.log_softmax(decoder.head(inputs[-1]).float(), -1)
    kls = {"key": [], "value": []}
    probed = set(range(len(decoder.layers)) if layers is None else layers)
    if not probed <= set(range(len(decoder.layers))):
        raise ValueError(f"layers {sorted(probed)} out of range: the decoder has {len(decoder.layers)} layers")
    bar = tqdm(total=2 * len(probed), desc="sensitivity", unit="probe", disable=not progress)
    for i, layer in enumerate(decoder.layers):
        if i not in probed:
            kls["key"].append(None)
            kls["value"].append(None)
            continue
        for kind, ranks in (("key", (probe_rank, d)), ("value", (d, probe_rank))):
            attn = fold_attention(layer.attn, factors[i], *ranks, rope_mode)
            h = layer.with_attn(attn)(inputs[i], positions, decoder.rope)
            for later in decoder.layers[i + 1:]:
                h = later(h, positions, decoder.rope)
            kls[kind].append(float(kl_divergence(ref, decoder.head(h))))
            bar.update()
    bar.close()
    return Sensitivity(probe_rank, kls["key"], kls["value"], samples.numel())
