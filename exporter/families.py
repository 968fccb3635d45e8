"""Model-family adapters, registered by `config.model_type`.

An adapter only *describes* a family: where its modules live (dotted paths), how its
config names heads and sizes, which positional scheme it uses. `decoder.py` turns that
description into an `EigenDecoder`; nothing here runs a model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Callable

import torch
from torch import nn

from eigenkv.errors import EigenError

POSITIONS = ("rope", "learned", "alibi")


@dataclass(frozen=True)
class Dims:
    """The sizes every stage needs, read one way from any family's config."""

    hidden: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    max_positions: int
    scale: float  # softmax scale (1/sqrt(head_dim) unless the family says otherwise)


@dataclass(frozen=True)
class Family:
    """Where a family keeps its modules (paths relative to the CausalLM / to one layer)."""

    model_type: str
    positions: str  # one of POSITIONS
    layers: str
    embed: str
    final_norm: str | None
    lm_head: str
    attn_norm: str
    mlp_norm: str
    q: str | None = None
    k: str | None = None
    v: str | None = None
    o: str = "self_attn.o_proj"
    qkv: str | None = None  # fused [q; k; v] projection
    mlp: str | None = None  # a module callable as mlp(x)
    mlp_up: str | None = None  # or two linears with an activation between
    mlp_down: str | None = None
    activation: Callable[[object], nn.Module] | None = None
    learned_positions: str | None = None
    position_offset: int = 0
    project_in: str | None = None
    project_out: str | None = None
    dims: Callable[[object], Dims] = field(default=None)  # type: ignore[assignment]
    check: Callable[[object], None] = lambda config: None
    alibi_slopes: Callable[[object], torch.Tensor] | None = None
    q_norm: str | None = None  # per-head norm of queries after W_q, before RoPE (QK-norm)
    k_norm: str | None = None  # per-head norm of keys after W_k, before RoPE (QK-norm)
    attn_post_norm: str | None = None  # norm of the attention output before the residual add (gemma3)
    mlp_post_norm: str | None = None  # norm of the MLP output before the residual add (gemma3)


_REGISTRY: dict[str, Family] = {}


def register(family: Family, *aliases: str) -> Family:
    """Add a family under its model_type (and aliases that share its structure)."""
    if family.positions not in POSITIONS:
        raise ValueError(f"positions must be one of {POSITIONS}")
    for name in (family.model_type, *aliases):
        _REGISTRY[name] = family
    return family


def registered(model_type: str | None) -> Family | None:
    """The family registered under `model_type` (aliases included), or None."""
    return _REGISTRY.get(model_type)


def supported() -> list[str]:
    return sorted(_REGISTRY)


def family_for(config) -> Family:
    """The adapter for `config.model_type`, or a one-line EigenError naming the supported ones."""
    model_type = getattr(config, "model_type", None)
    if model_type not in _REGISTRY:
        raise EigenError(f"unsupported model_type {model_type!r}; supported: {', '.join(supported())}")
    family = _REGISTRY[model_type]
    family.check(config)
    return family


def layer_windows(config) -> list[int]:
    """Per-layer sliding window in tokens (0: global) as transformers applies it: `layer_types`
    ("sliding_attention" layers get `sliding_window`) where the config has them (qwen2, qwen3,
    gemma3_text), else `sliding_window` on every layer unless `use_sliding_window` is off
    (mistral, phi3). A query at position q sees keys at q - window + 1 .. q."""
    n = config.num_hidden_layers
    window = getattr(config, "sliding_window", None) or 0
    types = getattr(config, "layer_types", None)
    if not window:
        return [0] * n
    if types is not None:
        return [window if t == "sliding_attention" else 0 for t in types]
    return [window] * n if getattr(config, "use_sliding_window", True) else [0] * n


def _unsupported(what: str, model_type: str) -> EigenError:
    return EigenError(f"{model_type}: {what} is not supported by eigenkv yet")


# ---- llama-like (RoPE, GQA, RMSNorm, gated MLP) ------------------------------------------

# RoPE types whose tables transformers recomputes from the sequence length (dynamic NTK,
# Phi-3's longrope): up to `original_max_position_embeddings` they equal the unscaled (or
# short-factor) tables, so the export stays there and matches transformers at every length.
_LENGTH_DEPENDENT_ROPE = ("dynamic", "longrope")


def _rope_parameters(c) -> dict:
    params = getattr(c, "rope_parameters", None) or getattr(c, "rope_scaling", None) or {}
    return params if isinstance(params, dict) else {}


def _llama_dims(c) -> Dims:
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    max_positions = c.max_position_embeddings
    rope = _rope_parameters(c)
    if rope.get("rope_type", rope.get("type")) in _LENGTH_DEPENDENT_ROPE:
        original = rope.get("original_max_position_embeddings") or getattr(c, "original_max_position_embeddings", None)
        max_positions = min(max_positions, original or max_positions)
    return Dims(c.hidden_size, c.num_hidden_layers, c.num_attention_heads,
                c.num_key_value_heads or c.num_attention_heads, head_dim,
                max_positions, 1.0 / math.sqrt(head_dim))


def _llama_check(c) -> None:
    if getattr(c, "pretraining_tp", 1) not in (1, None):
        raise _unsupported("pretraining_tp > 1", c.model_type)
    factor = _rope_parameters(c).get("partial_rotary_factor", getattr(c, "partial_rotary_factor", 1.0))
    if factor not in (None, 1, 1.0):
        raise _unsupported(f"partial rotary embeddings (partial_rotary_factor={factor})", c.model_type)


_LLAMA_PATHS = dict(
    positions="rope", layers="model.layers", embed="model.embed_tokens", final_norm="model.norm",
    lm_head="lm_head", attn_norm="input_layernorm", mlp_norm="post_attention_layernorm",
    q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj", o="self_attn.o_proj",
    mlp="mlp", dims=_llama_dims, check=_llama_check,
)
register(Family(model_type="llama", **_LLAMA_PATHS), "mistral")
register(Family(model_type="qwen2", **_LLAMA_PATHS))  # same layout; q/k/v carry biases
# Qwen3: llama layout plus QK-norm (RMSNorm over head_dim of each query and key head, before RoPE)
register(Family(model_type="qwen3", **_LLAMA_PATHS, q_norm="self_attn.q_norm", k_norm="self_attn.k_norm"))
# Phi-3/Phi-4: one fused qkv_proj and a fused gate_up MLP (callable as mlp(x)); longrope is
# matched up to original_max_position_embeddings (see _LENGTH_DEPENDENT_ROPE)
register(Family(model_type="phi3", **{**_LLAMA_PATHS, "q": None, "k": None, "v": None},
                qkv="self_attn.qkv_proj"))


# ---- Gemma 3 text (QK-norm, four norms per layer, local/global layers with their own RoPE) ----

def _gemma3_dims(c) -> Dims:
    return replace(_llama_dims(c), scale=c.query_pre_attn_scalar ** -0.5)


def _gemma3_check(c) -> None:
    _llama_check(c)
    for name in ("attn_logit_softcapping", "final_logit_softcapping"):
        if getattr(c, name, None) is not None:
            raise _unsupported(f"{name} (tanh soft-capping)", c.model_type)
    if getattr(c, "use_bidirectional_attention", False):
        raise _unsupported("bidirectional attention", c.model_type)


register(Family(
    model_type="gemma3_text", positions="rope", layers="model.layers", embed="model.embed_tokens",
    final_norm="model.norm", lm_head="lm_head", attn_norm="input_layernorm", mlp_norm="pre_feedforward_layernorm",
    attn_post_norm="post_attention_layernorm", mlp_post_norm="post_feedforward_layernorm",
    q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj", o="self_attn.o_proj", mlp="mlp",
    q_norm="self_attn.q_norm", k_norm="self_attn.k_norm", dims=_gemma3_dims, check=_gemma3_check,
))


# ---- OPT (learned positions, biases, LayerNorm, ReLU MLP) --------------------------------

def _opt_dims(c) -> Dims:
    head_dim = c.hidden_size // c.num_attention_heads
    return Dims(c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_attention_heads,
                head_dim, c.max_position_embeddings, head_dim ** -0.5)


def _opt_check(c) -> None:
    if not c.do_layer_norm_before:
        raise _unsupported("post-LayerNorm (do_layer_norm_before=False, e.g. opt-350m)", "opt")


def _opt_activation(c) -> nn.Module:
    from transformers.activations import ACT2FN
    return ACT2FN[c.activation_function]


register(Family(
    model_type="opt", positions="learned", layers="model.decoder.layers",
    embed="model.decoder.embed_tokens", final_norm="model.decoder.final_layer_norm", lm_head="lm_head",
    attn_norm="self_attn_layer_norm", mlp_norm="final_layer_norm",
    q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj", o="self_attn.out_proj",
    mlp_up="fc1", mlp_down="fc2", activation=_opt_activation,
    learned_positions="model.decoder.embed_positions", position_offset=2,
    project_in="model.decoder.project_in", project_out="model.decoder.project_out",
    dims=_opt_dims, check=_opt_check,
))


# ---- MPT (ALiBi, fused Wqkv, LayerNorm without bias, GELU MLP) ---------------------------

def _mpt_dims(c) -> Dims:
    head_dim = c.d_model // c.n_heads
    scale = c.attn_config.softmax_scale or 1.0 / math.sqrt(head_dim)
    return Dims(c.d_model, c.n_layers, c.n_heads, c.n_heads, head_dim, c.max_seq_len, scale)


def _mpt_check(c) -> None:
    a = c.attn_config
    if not a.alibi:
        raise _unsupported("MPT without ALiBi", "mpt")
    if a.clip_qkv:
        raise _unsupported("clip_qkv", "mpt")
    if getattr(a, "qk_ln", False):
        raise _unsupported("qk_ln", "mpt")


def _mpt_alibi_slopes(c) -> torch.Tensor:
    """[n_heads] slopes as MPT builds them (alibi_bias_max, odd/even interleave)."""
    n = c.n_heads
    n_pow2 = 2 ** math.ceil(math.log2(n))
    base = torch.arange(1, n_pow2 + 1, dtype=torch.float64) * (c.attn_config.alibi_bias_max / n_pow2)
    slopes = 1.0 / torch.pow(2.0, base)
    if n_pow2 != n:
        slopes = torch.cat([slopes[1::2], slopes[::2]])[:n]
    return slopes


register(Family(
    model_type="mpt", positions="alibi", layers="transformer.blocks", embed="transformer.wte",
    final_norm="transformer.norm_f", lm_head="lm_head", attn_norm="norm_1", mlp_norm="norm_2",
    qkv="attn.Wqkv", o="attn.out_proj", mlp_up="ffn.up_proj", mlp_down="ffn.down_proj",
    activation=lambda c: nn.GELU(approximate="none"), dims=_mpt_dims, check=_mpt_check,
    alibi_slopes=_mpt_alibi_slopes,
))


def get_path(root: nn.Module, path: str | None) -> nn.Module | None:
    """root.a.b.c for 'a.b.c'; None for a missing path or a module set to None."""
    if path is None:
        return None
    module = root
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module
