"""The decoder as one ONNX graph for prefill and decode, with fixed-capacity KV buffers.

Graph I/O (Optimum / onnxruntime-genai names):
  input_ids [B, S] int64, position_ids [B, S] int64, cache_lengths [B] int64 (valid slots
  before this step), past_key_values.{i}.key [B, Hkv, Smax, r_k_i], .value [.., r_v_i]
  -> logits [B, S, vocab], present.{i}.key|value (the past buffers after this step's
  write; bind them to the same memory as the past ones to update in place).
Cache writes are standard ONNX `TensorScatter` (opset 24, axis -2, linear) at
`cache_lengths`; attention is one `eigen::LowRankAttention` node per layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from eigenkv.exporter.attention import slot_index
from eigenkv.exporter.decoder import EigenDecoder

OPSET = 24


def tensor_scatter(past: torch.Tensor, update: torch.Tensor, write_indices: torch.Tensor) -> torch.Tensor:
    """past [B, H, Smax, r] with update [B, H, S, r] written at slots write_indices[b] + 0..S-1."""
    if torch.onnx.is_in_onnx_export():
        return torch.onnx.ops.symbolic("::TensorScatter", (past, update, write_indices),
                                       dict(axis=-2, mode="linear"), dtype=past.dtype, shape=past.shape,
                                       version=OPSET)
    return past.scatter(2, slot_index(write_indices, update), update.to(past.dtype))


class GraphCache:
    """The cache protocol of `LowRankAttention` over graph inputs: functional writes, presents kept."""

    def __init__(self, past: tuple[torch.Tensor, ...], cache_lengths: torch.Tensor):
        self.past, self.lengths = past, cache_lengths
        self.present: list[torch.Tensor] = []

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        keys = tensor_scatter(self.past[2 * layer], k, self.lengths)
        values = tensor_scatter(self.past[2 * layer + 1], v, self.lengths)
        self.present += [keys, values]
        return keys, values, self.lengths + k.shape[2]

    def advance(self, seq: int) -> None:  # the runtime advances its own lengths
        pass


class GraphDecoder(nn.Module):
    """forward(input_ids, position_ids, cache_lengths, *past) -> (logits, *present)."""

    def __init__(self, decoder: EigenDecoder):
        super().__init__()
        self.decoder = decoder

    def forward(self, input_ids, position_ids, cache_lengths, *past):
        cache = GraphCache(past, cache_lengths)
        logits = self.decoder(input_ids, position_ids, cache)
        return (logits, *cache.present)


@dataclass(frozen=True)
class IONames:
    """Name patterns recorded in the manifest; nothing infers them from file names."""

    input_ids: str = "input_ids"
    position_ids: str = "position_ids"
    cache_lengths: str = "cache_lengths"
    past_key: str = "past_key_values.{i}.key"
    past_value: str = "past_key_values.{i}.value"
    logits: str = "logits"
    present_key: str = "present.{i}.key"
    present_value: str = "present.{i}.value"

    def inputs(self, n_layers: int) -> list[str]:
        kv = [p.format(i=i) for i in range(n_layers) for p in (self.past_key, self.past_value)]
        return [self.input_ids, self.position_ids, self.cache_lengths, *kv]

    def outputs(self, n_layers: int) -> list[str]:
        kv = [p.format(i=i) for i in range(n_layers) for p in (self.present_key, self.present_value)]
        return [self.logits, *kv]


def example_inputs(decoder: EigenDecoder, batch: int = 2, seq: int = 5, max_cache: int = 16,
                   dtype=torch.float32) -> tuple:
    """Inputs for tracing (B, S > 1 so neither is specialised): empty cache, positions 0..S-1."""
    ids = torch.randint(0, 100, (batch, seq))
    positions = torch.arange(seq).expand(batch, seq).contiguous()
    lengths = torch.zeros(batch, dtype=torch.int64)
    past = []
    for kr, vr in zip(decoder.key_ranks, decoder.value_ranks):
        past += [torch.zeros(batch, decoder.dims.n_kv_heads, max_cache, kr, dtype=dtype),
                 torch.zeros(batch, decoder.dims.n_kv_heads, max_cache, vr, dtype=dtype)]
    return (ids, positions, lengths, *past)


def dynamic_shapes(n_layers: int, max_seq_len: int) -> tuple:
    from torch.export import Dim
    batch, seq = Dim("batch", min=1, max=4096), Dim("sequence", min=1, max=max_seq_len)
    cache = Dim("max_cache_len", min=2, max=max_seq_len)
    kv = {0: batch, 2: cache}
    return ({0: batch, 1: seq}, {0: batch, 1: seq}, {0: batch}, tuple([kv] * (2 * n_layers)))


def _scope_path(namespace: str) -> str:
    """'…/decoder.layers.0.attn: LowRankAttention/linear_3: aten.linear' -> 'model/layers.0/attn'."""
    names = [seg.split(":")[0].strip() for seg in namespace.split("/")][:-1]  # the last is the fx node
    dotted = next((n for n in reversed(names) if n), "")
    parts = []
    for piece in dotted.split("."):
        if piece.isdigit() and parts:
            parts[-1] += "." + piece  # keep layers.0 together
        else:
            parts.append(piece)
    if parts and parts[0] == "decoder":
        parts[0] = "model"
    return "/".join(p for p in parts if p and not p.startswith("_")) or "model"


def hierarchical_names(model) -> None:
    """Rename nodes `/model/layers.{i}/attn/q_proj/MatMul_0`-style from the exporter's module
    scope metadata (deterministic: scope + op type + a counter in graph order)."""
    counts: dict[str, int] = {}
    for node in model.graph.node:
        scope = next((p.value for p in node.metadata_props if p.key == "namespace"), "")
        prefix = f"/{_scope_path(scope)}/{node.op_type}"
        k = counts.get(prefix, 0)
        counts[prefix] = k + 1
        node.name = f"{prefix}_{k}"
