"""The decoder as one ONNX graph for prefill and decode, with fixed-capacity KV buffers.

Graph I/O (Optimum / onnxruntime-genai names, `eigenkv.manifest.IONames`):
  input_ids [B, S] int64, position_ids [B, S] int64, cache_lengths [L, B] int64 (each
  layer's valid slots before this step), past_key_values.{i}.key [B, Hkv, Smax_i, r_k_i],
  .value [.., r_v_i], slot_positions.{i} [B, Hkv, Smax_i] int32 (the token position of every
  slot, the step's new tokens included: the runtime writes them before the step)
  -> logits [B, S, vocab], present.{i}.key|value (the past buffers after this step's
  write; bind them to the same memory as the past ones to update in place).
Cache writes are standard ONNX `TensorScatter` (opset 24, axis -2, linear) at
`cache_lengths[i]`; attention is one `eigen::LowRankAttention` node per layer, which masks and
(in `pre` mode) rotates by slot position, so slots may be compacted between steps.
"""

from __future__ import annotations

import torch
from torch import nn

from eigenkv.exporter.attention import slot_index
from eigenkv.exporter.decoder import EigenDecoder
from eigenkv.manifest import IONames

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

    def __init__(self, past: tuple[torch.Tensor, ...], slot_positions: tuple[torch.Tensor, ...],
                 cache_lengths: torch.Tensor):
        self.past, self.slot_positions, self.lengths = past, slot_positions, cache_lengths
        self.present: list[torch.Tensor] = []

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor):
        """positions are already in `slot_positions` (the runtime writes them)."""
        lengths = self.lengths[layer]
        keys = tensor_scatter(self.past[2 * layer], k, lengths)
        values = tensor_scatter(self.past[2 * layer + 1], v, lengths)
        self.present += [keys, values]
        return keys, values, lengths + k.shape[2], self.slot_positions[layer]

    def advance(self, seq: int) -> None:  # the runtime advances its own lengths
        pass


class GraphDecoder(nn.Module):
    """forward(input_ids, position_ids, cache_lengths, *past) -> (logits, *present)."""

    def __init__(self, decoder: EigenDecoder):
        super().__init__()
        self.decoder = decoder

    def forward(self, input_ids, position_ids, cache_lengths, *past_and_slots):
        n = self.decoder.dims.n_layers
        cache = GraphCache(past_and_slots[: 2 * n], past_and_slots[2 * n:], cache_lengths)
        logits = self.decoder(input_ids, position_ids, cache)
        return (logits, *cache.present)


def example_inputs(decoder: EigenDecoder, batch: int = 2, seq: int = 5, max_cache: int = 16,
                   dtype=torch.float32) -> tuple:
    """Inputs for tracing (B, S > 1 so neither is specialised; layers' capacities differ so none
    is tied to another): empty cache, positions 0..S-1."""
    ids = torch.randint(0, 100, (batch, seq))
    positions = torch.arange(seq).expand(batch, seq).contiguous()
    n_kv = decoder.dims.n_kv_heads
    lengths = torch.zeros(decoder.dims.n_layers, batch, dtype=torch.int64)
    past, slots = [], []
    for i, (kr, vr) in enumerate(zip(decoder.key_ranks, decoder.value_ranks)):
        cap = max_cache + i
        past += [torch.zeros(batch, n_kv, cap, kr, dtype=dtype), torch.zeros(batch, n_kv, cap, vr, dtype=dtype)]
        slots.append(torch.zeros(batch, n_kv, cap, dtype=torch.int32))
    return (ids, positions, lengths, *past, *slots)


def dynamic_shapes(n_layers: int, max_seq_len: int) -> tuple:
    """Batch and sequence shared by all inputs; each layer's cache capacity its own dimension
    (eviction sizes layers differently: skipped layers hold the whole context)."""
    from torch.export import Dim
    batch, seq = Dim("batch", min=1, max=4096), Dim("sequence", min=1, max=max_seq_len)
    caps = [Dim(f"cache_len_{i}", min=2, max=max_seq_len) for i in range(n_layers)]
    kv = tuple({0: batch, 2: caps[i // 2]} for i in range(2 * n_layers))
    slots = tuple({0: batch, 2: cap} for cap in caps)
    return ({0: batch, 1: seq}, {0: batch, 1: seq}, {1: batch}, kv + slots)


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


def optimize_graph(model) -> None:
    """What `torch.onnx.export(optimize=True)` runs (onnxscript's `optimize_ir`, then its ONNX
    fusions), in place on an `onnx_ir.Model`, without onnxscript's `SlicesSplit` rule.

    That rule is the default set's only multi-output pattern: onnxscript matches it by listing every
    node of the graph for every node it tries, O(nodes²). On the default model's graph (SmolLM2-135M,
    ~5.7k nodes before optimization) the optimizer took 35 s with it and 8.5 s without it on a 2-core
    CPU, and it never fired on our graphs: the saved graphs were byte-for-byte the same with and
    without it (the default model at kv-ratio 0.5; 8 tiny families at full rank and kv-ratio 0.5,
    `pre` and `joint`), and tests/test_export.py compares the two on a tiny model. The pass list is
    onnxscript 0.7's `optimize_ir`; if its private names move, the library's own `optimize_ir` runs.
    Raises what onnxscript's passes raise.
    """
    import onnx_ir as ir
    import onnx_ir.passes.common as common_passes
    import onnxscript.rewriter.onnx_fusions as onnx_fusions
    from onnxscript import optimizer, rewriter
    try:
        from onnxscript.optimizer._constant_folding import (DEFAULT_CONSTANT_FOLD_INPUT_SIZE_LIMIT,
                                                            DEFAULT_CONSTANT_FOLD_OUTPUT_SIZE_LIMIT, FoldConstantsPass)
        from onnxscript.rewriter.rules.common import slice_split_rule
        rules = [rule for rule in rewriter._DEFAULT_REWRITE_RULES if rule is not slice_split_rule]
    except (ImportError, AttributeError):
        optimizer.optimize_ir(model)
    else:
        fixed_point = ir.passes.PassManager(
            [FoldConstantsPass(shape_inference=True, input_size_limit=DEFAULT_CONSTANT_FOLD_INPUT_SIZE_LIMIT,
                               output_size_limit=DEFAULT_CONSTANT_FOLD_OUTPUT_SIZE_LIMIT, should_fold=lambda node: None),
             rewriter.RewritePass(rules), common_passes.RemoveUnusedNodesPass(),
             common_passes.RemoveUnusedFunctionsPass(), common_passes.RemoveUnusedOpsetsPass()],
            steps=2, early_stop=True)
        ir.passes.Sequential(
            common_passes.InlinePass(), fixed_point, common_passes.RemoveUnusedNodesPass(),
            common_passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
            common_passes.LiftSubgraphInitializersToMainGraphPass(), common_passes.DeduplicateInitializersPass(),
            common_passes.CommonSubexpressionEliminationPass(), common_passes.OutputFixPass(),
            common_passes.NameFixPass())(model)
    onnx_fusions.fuse(model)
