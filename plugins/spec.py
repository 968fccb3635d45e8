"""`eigen::LowRankAttention`: the op's single source of truth.

Every implementation reads this: the reference (`reference.py`), and, as they land, the
torch custom op, the ONNX node and model-local function, and the TensorRT plugin. Change
an input, output or attribute only together with `VERSION`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

NAME = "LowRankAttention"  # never a built-in ONNX op name (TensorRT matches built-ins by name)
DOMAIN = "eigen"
VERSION = 2  # 2: the `window` attribute (sliding-window layers); a version-1 node is window = 0
READ_VERSIONS = (1, 2)  # node versions every implementation accepts


class RopeMode(str, Enum):
    """How keys sit in the KV cache: the one vocabulary of the op, the fold, the manifest and reports.

    NONE     the model has no RoPE (OPT, MPT): keys cached as scored (rank r_k when folded, the
             queries folded with them)
    ROTATED  RoPE model, keys rotated before the cache at full head_dim (the uncompressed baseline)
    PRE      RoPE model, keys cached pre-RoPE at rank r_k; the op rebuilds them with `key_up` and
             rotates each slot at its position (the paper's code; Palu)
    JOINT    RoPE model, rotated queries and keys projected to rank r_k before the cache; the op
             scores in rank space
    """

    NONE = "none"
    ROTATED = "rotated"
    PRE = "pre"
    JOINT = "joint"

    @property
    def op_code(self) -> int:
        """The op's `rope_mode` attribute: 1 for PRE (the op rotates), 0 otherwise (keys ready to score)."""
        return 1 if self is RopeMode.PRE else 0

    @property
    def rope(self) -> bool:
        """Whether the model rotates queries and keys at all."""
        return self is not RopeMode.NONE

    @classmethod
    def parse(cls, text: str) -> "RopeMode":
        """A mode from its name; ValueError naming the accepted ones."""
        try:
            return cls(text)
        except ValueError:
            raise ValueError(f"rope mode must be one of {', '.join(m.value for m in cls)}, got {text!r}") from None


# The op's `rope_mode` attribute values (RopeMode.op_code).
ROPE_NONE = 0  # keys are cached ready to score (no RoPE, rotated before the cache, or joint)
ROPE_PRE = 1  # keys cached pre-RoPE at rank r_k: reconstruct with key_up, rotate, score


@dataclass(frozen=True)
class Tensor:
    name: str
    shape: str  # symbolic, e.g. "B,Hq,S,dq"
    dtype: str  # "float" (the model's float type) or "int32"
    optional: bool = False
    doc: str = ""


@dataclass(frozen=True)
class Attribute:
    name: str
    type: str  # "float" or "int"
    default: float | int | None
    doc: str = ""


INPUTS = (
    Tensor("query", "B,Hq,S,dq", "float", doc="dq = head_dim in pre mode (already rotated), else r_k"),
    Tensor("key_cache", "B,Hkv,Smax,r_k", "float"),
    Tensor("value_cache", "B,Hkv,Smax,r_v", "float"),
    Tensor("cache_lengths", "B", "int32", doc="valid slots after this step's write"),
    Tensor("query_positions", "B,S", "int32", doc="absolute position of each query token"),
    Tensor("slot_positions", "B,Hkv,Smax", "int32", optional=True, doc="position of each slot; absent: slot index"),
    Tensor("key_up", "G,r_k,head_dim", "float", optional=True, doc="pre mode: K = K_r @ key_up (G = 1 or Hkv)"),
    Tensor("rope_cos", "P,head_dim", "float", optional=True, doc="pre mode: RoPE table by position"),
    Tensor("rope_sin", "P,head_dim", "float", optional=True, doc="pre mode: RoPE table by position"),
    Tensor("alibi_slopes", "Hq", "float", optional=True, doc="ALiBi: score -= slope * (q_pos - k_pos)"),
)

OUTPUTS = (Tensor("attn", "B,Hq,S,r_v", "float"),)

ATTRIBUTES = (
    Attribute("scale", "float", None, "softmax scale; stays 1/sqrt(original head_dim) after folding"),
    Attribute("rope_mode", "int", 0, "0: keys cached ready to score; 1: pre-RoPE rank-r keys, op rotates"),
    Attribute("causal", "int", 1, "mask slots whose position is after the query's"),
    Attribute("window", "int", 0, "sliding window: a query at q_pos sees slots with q_pos - k_pos < window "
              "(transformers' sliding_window, the query's own token included); 0: no window"),
    Attribute("version", "int", VERSION, "the op version the node was written for"),
)

# Node-only attributes for the TensorRT ONNX parser (not part of the math).
PARSER_ATTRIBUTES = {"plugin_namespace": DOMAIN, "aot": 1}


def output_shape(query: tuple, value_cache: tuple) -> tuple:
    """attn shape from query [B, Hq, S, dq] and value_cache [B, Hkv, Smax, r_v]."""
    return (query[0], query[1], query[2], value_cache[3])
