"""The op in torch: a `torch.library` custom op for eager use and one ONNX node at export.

`low_rank_attention_op(...)` is what models call. Eagerly it runs the custom op
`eigen::low_rank_attention` (the reference's result through PyTorch's fused attention,
`sdpa_attention.py`, parity-tested against the float64 reference; a fake kernel for tracing); inside
`torch.onnx.export(..., dynamo=True)` it emits exactly one `eigen::LowRankAttention` node
carrying the spec's attributes plus the TensorRT parser's `plugin_namespace` and `aot`.
"""

from __future__ import annotations

import torch

from eigenkv.plugins import spec
from eigenkv.plugins.sdpa_attention import sdpa_low_rank_attention

_Opt = torch.Tensor | None


@torch.library.custom_op("eigen::low_rank_attention", mutates_args=())
def _eager_op(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
              cache_lengths: torch.Tensor, query_positions: torch.Tensor, slot_positions: _Opt,
              key_up: _Opt, rope_cos: _Opt, rope_sin: _Opt, alibi_slopes: _Opt,
              scale: float, rope_mode: int, causal: int, window: int = 0) -> torch.Tensor:
    return sdpa_low_rank_attention(query, key_cache, value_cache, cache_lengths, query_positions, scale=scale,
                                   rope_mode=rope_mode, causal=bool(causal), slot_positions=slot_positions,
                                   key_up=key_up, rope_cos=rope_cos, rope_sin=rope_sin,
                                   alibi_slopes=alibi_slopes, window=window)


@_eager_op.register_fake
def _(query, key_cache, value_cache, cache_lengths, query_positions, slot_positions, key_up, rope_cos,
      rope_sin, alibi_slopes, scale, rope_mode, causal, window=0):
    return query.new_empty(spec.output_shape(tuple(query.shape), tuple(value_cache.shape)))


def low_rank_attention_op(query, key_cache, value_cache, cache_lengths, query_positions, *, scale: float,
                          rope_mode: int = 0, causal: bool = True, slot_positions=None, key_up=None,
                          rope_cos=None, rope_sin=None, alibi_slopes=None, window: int = 0) -> torch.Tensor:
    """Same arguments as `reference.low_rank_attention`; integer inputs are cast to int32."""
    cache_lengths, query_positions = cache_lengths.to(torch.int32), query_positions.to(torch.int32)
    if slot_positions is not None:
        slot_positions = slot_positions.to(torch.int32)
    if torch.onnx.is_in_onnx_export():
        inputs = (query, key_cache, value_cache, cache_lengths, query_positions, slot_positions, key_up,
                  rope_cos, rope_sin, alibi_slopes)
        attrs = dict(scale=float(scale), rope_mode=int(rope_mode), causal=int(causal), window=int(window),
                     version=spec.VERSION,
                     **spec.PARSER_ATTRIBUTES)
        shape = spec.output_shape(tuple(query.shape), tuple(value_cache.shape))
        return torch.onnx.ops.symbolic(f"{spec.DOMAIN}::{spec.NAME}", inputs, attrs, dtype=query.dtype,
                                       shape=shape, version=spec.VERSION)
    return _eager_op(query, key_cache, value_cache, cache_lengths, query_positions, slot_positions, key_up,
                     rope_cos, rope_sin, alibi_slopes, float(scale), int(rope_mode), int(causal), int(window))
