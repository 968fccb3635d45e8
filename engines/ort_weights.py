"""Weight-only quantization of an ORT engine's graph (`eigenkv build --backend ort --weights int4|int8`).

CPU decode at small batch reads every weight once per step, so weight bytes per token set its
floor (why llama.cpp's 4-bit files beat fp32 engines at batch 1). This rewrite hands the graph to
ONNX Runtime's own block-wise weight-only quantizer (`onnxruntime.quantization.
matmul_nbits_quantizer`, the one onnxruntime-genai's model builder uses for its CPU int4
models): every MatMul by a linear layer's weight (`weight_matmuls`: the projections and the
LM head) becomes a `MatMulNBits` (com.microsoft) node holding symmetric round-to-nearest codes
per block of `block_size` input rows (w ≈ scale · (q − 2^(bits−1)), one fp32 scale per block
and output column). Attention (its products and its low-rank bases), the KV cache and its
layout are untouched: the cache stays exactly what the export declares,
so eviction and the low-rank cache combine with it. `accuracy_level` 4 lets ONNX Runtime's
kernel quantize the activations to int8 per block for an int8 dot product (its fastest CPU
path); 0 keeps fp32 activations.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

from eigenkv.errors import EigenError

WEIGHT_CHOICES = ("graph", "int4", "int8")  # `eigenkv build --weights`; "graph": as exported
BLOCK_SIZE = 32  # input rows per scale (onnxruntime-genai's CPU int4 default)
ACCURACY_LEVEL = 4  # int8 activations inside MatMulNBits (ORT's fastest CPU kernel)


def quantize_in_place(model: Path, bits: int, **kwargs) -> dict:
    """`quantize_file` from `model` onto itself (its weights file `model.name + ".data"` replaced),
    through a temporary folder beside it: on any error the original files stay as they were."""
    import tempfile
    with tempfile.TemporaryDirectory(prefix="weights-", dir=model.parent) as tmp:
        out = Path(tmp) / model.name
        report = quantize_file(model, out, bits, **kwargs)
        Path(str(out) + ".data").replace(Path(str(model) + ".data"))
        out.replace(model)
    return report


def _subgraph_nodes(graph):
    """Every node of `graph` and of the graphs nested in its nodes' attributes (Scan, If, Loop)."""
    import onnx
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _subgraph_nodes(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _subgraph_nodes(g)


def weight_matmuls(graph) -> list[str]:
    """Names of the top-level MatMul nodes that multiply by a linear layer's weight: a constant
    2-D fp32 initializer with the model's hidden size (the token embedding's width) as one
    dimension (the projections into and out of attention and the MLP, and the LM head). The
    attention's own constants (low-rank bases [head_dim, r], `key_up`, anything inside a Scan
    body) never have that width and stay float: the cache and the attention math are untouched."""
    import onnx
    constants = {t.name: t for t in graph.initializer}
    gathers = [constants[n.input[0]] for n in graph.node
               if n.op_type == "Gather" and n.input[0] in constants and len(constants[n.input[0]].dims) == 2]
    if not gathers:
        return []
    hidden = int(max(gathers, key=lambda t: t.dims[0]).dims[1])  # the embedding table [vocab, hidden]
    return [n.name for n in graph.node
            if n.op_type == "MatMul" and n.name and n.input[1] in constants
            and constants[n.input[1]].data_type == onnx.TensorProto.FLOAT
            and len(constants[n.input[1]].dims) == 2 and hidden in constants[n.input[1]].dims]


def quantize_file(src: Path, dst: Path, bits: int, block_size: int = BLOCK_SIZE,
                  accuracy_level: int = ACCURACY_LEVEL) -> dict:
    """Quantize the linear layers' MatMul weights (`weight_matmuls`) of the ONNX file `src` to
    `bits` (4 or 8) and write the graph to `dst` (weights in `dst.name + ".data"` beside it).
    -> report {"weights": "int4"|"int8", "block_size", "accuracy_level", "matmuls": n quantized,
    "kept_float": n MatMul nodes left in float, subgraphs included (attention products, low-rank
    bases)}. EigenError when no linear weight could be quantized (nothing would change), when the
    graph's weights are not fp32 (the quantizer reads fp32 weights: build an fp32 export), or when
    ONNX Runtime's quantizer fails (its message, one line)."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import (DefaultWeightOnlyQuantConfig,
                                                                 MatMulNBitsQuantizer)
    if bits not in (4, 8):
        raise EigenError(f"weight quantization takes 4 or 8 bits, got {bits}")
    model = onnx.load(str(src))
    constants = {t.name: t for t in model.graph.initializer}
    if any(constants[n.input[1]].data_type != onnx.TensorProto.FLOAT for n in model.graph.node
           if n.op_type == "MatMul" and n.input[1] in constants):
        raise EigenError(f"--weights int{bits} quantizes fp32 weights, and {src.name} stores them in another type: "
                         "build it from an fp32 export (`export-eigen` without --dtype fp16)")
    chosen = set(weight_matmuls(model.graph))
    if not chosen:
        raise EigenError(f"{src.name} has no MatMul by a linear layer's constant weight to quantize")
    others = {n.name for n in _subgraph_nodes(model.graph) if n.op_type == "MatMul" and n.name not in chosen}
    config = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=True, accuracy_level=accuracy_level,
                                          bits=bits)
    quantizer = MatMulNBitsQuantizer(model, bits=bits, block_size=block_size, is_symmetric=True,
                                     accuracy_level=accuracy_level, nodes_to_exclude=sorted(others),
                                     algo_config=config)
    level = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    saved, level.level = level.level, logging.WARNING  # it logs every node at INFO
    try:
        quantizer.process()
    except Exception as e:  # noqa: BLE001 - the quantizer raises ValueError, AssertionError, ...
        raise EigenError(f"ONNX Runtime's weight quantizer failed on {src.name}: "
                         f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}") from None
    finally:
        level.setLevel(saved)
    out = quantizer.model.model
    ops = Counter(n.op_type for n in _subgraph_nodes(out.graph))
    onnx.save(out, str(dst), save_as_external_data=True, location=dst.name + ".data", size_threshold=1024)
    return {"weights": f"int{bits}", "block_size": block_size, "accuracy_level": accuracy_level,
            "matmuls": ops["MatMulNBits"], "kept_float": ops["MatMul"]}
