"""`EigenDecoder`: a small pre-norm decoder you can read in one sitting.

Built from a Hugging Face CausalLM through its family adapter; it *shares* the source
model's embedding, norms and MLP modules (no copies) and owns only its attention modules,
which folding replaces. Same numbers as the source model (tested per family).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from eigenkv.exporter.attention import KVCache, LowRankAttention, Rope
from eigenkv.exporter.families import Dims, Family, family_for, get_path, layer_windows
from eigenkv.plugins.spec import RopeMode


class PlainMLP(nn.Module):
    """down(act(up(x))) over the source model's own linears."""

    def __init__(self, up: nn.Module, act: nn.Module, down: nn.Module):
        super().__init__()
        self.up, self.act, self.down = up, act, down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.act(self.up(x)))


class EigenLayer(nn.Module):
    """x + attn_post_norm(attn(attn_norm(x))), then x + mlp_post_norm(mlp(mlp_norm(x))); the post
    norms (gemma3) are identities where a family has none."""

    def __init__(self, attn_norm: nn.Module, attn: LowRankAttention, mlp_norm: nn.Module, mlp: nn.Module,
                 attn_post_norm: nn.Module | None = None, mlp_post_norm: nn.Module | None = None):
        super().__init__()
        self.attn_norm, self.attn, self.mlp_norm, self.mlp = attn_norm, attn, mlp_norm, mlp
        self.attn_post_norm = attn_post_norm if attn_post_norm is not None else nn.Identity()
        self.mlp_post_norm = mlp_post_norm if mlp_post_norm is not None else nn.Identity()

    def forward(self, x, positions, rope=None, cache=None, layer=0):
        x = x + self.attn_post_norm(self.attn(self.attn_norm(x), positions, rope, cache, layer))
        return self.mlp_block(x)

    def mlp_block(self, x: torch.Tensor) -> torch.Tensor:
        """x + mlp_post_norm(mlp(mlp_norm(x))): the second half of `forward`."""
        return x + self.mlp_post_norm(self.mlp(self.mlp_norm(x)))

    def with_attn(self, attn: LowRankAttention) -> "EigenLayer":
        """The same layer (norms and MLP shared) around another attention module."""
        return EigenLayer(self.attn_norm, attn, self.mlp_norm, self.mlp, self.attn_post_norm, self.mlp_post_norm)


class EigenDecoder(nn.Module):
    """input_ids [B, S] (+ position_ids [B, S]) -> logits [B, S, vocab]."""

    def __init__(self, dims: Dims, family: Family, embed, layers, final_norm, lm_head, *,
                 rope: Rope | None = None, learned_positions: nn.Module | None = None,
                 project_in=None, project_out=None):
        super().__init__()
        self.dims, self.family = dims, family
        self.embed, self.layers, self.final_norm, self.lm_head = embed, nn.ModuleList(layers), final_norm, lm_head
        self.rope, self.learned_positions = rope, learned_positions
        self.project_in, self.project_out = project_in, project_out

    @property
    def key_ranks(self) -> list[int]:
        return [layer.attn.key_rank for layer in self.layers]

    @property
    def value_ranks(self) -> list[int]:
        return [layer.attn.value_rank for layer in self.layers]

    def embed_inputs(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """[B, S] -> hidden [B, S, hidden]."""
        h = self.embed(input_ids)
        if self.project_in is not None:
            h = self.project_in(h)
        if self.learned_positions is not None:
            h = h + nn.functional.embedding(positions + self.family.position_offset, self.learned_positions.weight)
        return h

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """hidden [..., hidden] (e.g. [B, S, hidden]) -> logits [..., vocab]."""
        if self.final_norm is not None:
            h = self.final_norm(h)
        if self.project_out is not None:
            h = self.project_out(h)
        return self.lm_head(h)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                cache: KVCache | None = None) -> torch.Tensor:
        return self.head(self.hidden_states(input_ids, position_ids, cache))

    def hidden_states(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                      cache: KVCache | None = None) -> torch.Tensor:
        """input_ids [B, S] -> the last layer's output [B, S, hidden], before `head` (the final
        norm, projection and lm_head): `forward` is head(hidden_states(...))."""
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1]).expand_as(input_ids)
        h = self.embed_inputs(input_ids, position_ids)
        for i, layer in enumerate(self.layers):
            h = layer(h, position_ids, self.rope, cache, i)
        if cache is not None:
            cache.advance(input_ids.shape[1])
        return h

    def new_cache(self, batch: int, max_len: int, dtype=torch.float32) -> KVCache:
        return KVCache(batch, max_len, self.dims.n_kv_heads, self.key_ranks, self.value_ranks, dtype)

    def _copy(self) -> "EigenDecoder":
        new = copy.copy(self)
        new._modules = dict(self._modules)
        new._buffers, new._parameters = dict(self._buffers), dict(self._parameters)
        return new

    def with_max_positions(self, n: int) -> "EigenDecoder":
        """A shallow copy whose RoPE tables cover positions 0..n-1 only (what an export needs)."""
        new = self._copy()
        if self.rope is not None:
            new.rope = Rope(self.rope.cos[:n].clone(), self.rope.sin[:n].clone())
        if any(layer.attn.own_rope is not None for layer in self.layers):
            new.layers = nn.ModuleList(layer if layer.attn.own_rope is None else layer.with_attn(
                layer.attn.with_rope(Rope(layer.attn.own_rope.cos[:n].clone(), layer.attn.own_rope.sin[:n].clone())))
                for layer in self.layers)
        return new

    def with_attention(self, attentions: list[LowRankAttention]) -> "EigenDecoder":
        """A shallow copy sharing every module but the attention ones (the fold's result)."""
        new = self._copy()
        new.layers = nn.ModuleList(old.with_attn(attn) for old, attn in zip(self.layers, attentions))
        return new


def _split_linear(fused: nn.Linear, sizes: list[int]) -> list[nn.Linear]:
    out, start = [], 0
    for n in sizes:
        lin = nn.Linear(fused.in_features, n, bias=fused.bias is not None,
                        dtype=fused.weight.dtype, device=fused.weight.device)
        with torch.no_grad():
            lin.weight.copy_(fused.weight[start:start + n])
            if fused.bias is not None:
                lin.bias.copy_(fused.bias[start:start + n])
        out.append(lin)
        start += n
    return out


def _attention(layer: nn.Module, family: Family, dims: Dims, slopes, window: int = 0,
               rope: Rope | None = None) -> LowRankAttention:
    q_out, kv_out = dims.n_heads * dims.head_dim, dims.n_kv_heads * dims.head_dim
    if family.qkv is not None:
        q, k, v = _split_linear(get_path(layer, family.qkv), [q_out, kv_out, kv_out])
    else:
        q, k, v = (get_path(layer, p) for p in (family.q, family.k, family.v))
    return LowRankAttention(q, k, v, get_path(layer, family.o), n_heads=dims.n_heads,
                            n_kv_heads=dims.n_kv_heads, head_dim=dims.head_dim, scale=dims.scale,
                            rope_mode=RopeMode.ROTATED if family.positions == "rope" else RopeMode.NONE,
                            alibi_slopes=slopes, q_norm=get_path(layer, family.q_norm),
                            k_norm=get_path(layer, family.k_norm), window=window, rope=rope)


def _rope_tables(model: nn.Module, dims: Dims, max_positions: int, layer_type: str | None = None) -> Rope:
    """Cos/sin [P, head_dim] from the source model's own rotary module (any RoPE scaling); for a
    model whose rotary module takes a `layer_type` (gemma3_text: local and global layers have
    their own base), the tables of that layer type."""
    rotary = get_path(model, "model.rotary_emb")
    positions = torch.arange(max_positions)[None]
    probe = torch.zeros(1, dtype=torch.float32)
    with torch.no_grad():
        cos, sin = rotary(probe, positions) if layer_type is None else rotary(probe, positions, layer_type)
    return Rope(cos[0].float(), sin[0].float())


def _layer_ropes(model: nn.Module, dims: Dims, max_positions: int) -> tuple[Rope, list[Rope | None]]:
    """(the model's RoPE tables, per layer: its own tables where its layer type has other ones, else None)."""
    import inspect
    rotary = get_path(model, "model.rotary_emb")
    types = getattr(model.config, "layer_types", None)
    if types is None or "layer_type" not in inspect.signature(rotary.forward).parameters:
        return _rope_tables(model, dims, max_positions), [None] * dims.n_layers
    tables = {t: _rope_tables(model, dims, max_positions, t) for t in sorted(set(types))}
    main = tables["full_attention"] if "full_attention" in tables else tables[types[0]]
    own = [None if (tables[t].cos.equal(main.cos) and tables[t].sin.equal(main.sin)) else tables[t] for t in types]
    return main, own


def decoder_from_hf(model: nn.Module, max_positions: int | None = None) -> EigenDecoder:
    """Wrap a transformers CausalLM (float32 recommended) as an uncompressed EigenDecoder."""
    family = family_for(model.config)
    dims = family.dims(model.config)
    positions = min(max_positions or dims.max_positions, dims.max_positions)
    slopes = family.alibi_slopes(model.config).float() if family.alibi_slopes else None
    rope, own_ropes = _layer_ropes(model, dims, positions) if family.positions == "rope" else (None, [None] * dims.n_layers)
    windows = [w if w < positions else 0 for w in layer_windows(model.config)]  # a window >= the context: none
    layers = []
    for i, layer in enumerate(get_path(model, family.layers)):
        mlp = get_path(layer, family.mlp) if family.mlp else PlainMLP(
            get_path(layer, family.mlp_up), family.activation(model.config), get_path(layer, family.mlp_down))
        attn = _attention(layer, family, dims, slopes, windows[i], own_ropes[i])
        layers.append(EigenLayer(get_path(layer, family.attn_norm), attn, get_path(layer, family.mlp_norm), mlp,
                                 get_path(layer, family.attn_post_norm), get_path(layer, family.mlp_post_norm)))
    return EigenDecoder(
        dims, family, get_path(model, family.embed), layers, get_path(model, family.final_norm),
        get_path(model, family.lm_head),
        rope=rope,
        learned_positions=get_path(model, family.learned_positions),
        project_in=get_path(model, family.project_in), project_out=get_path(model, family.project_out),
    ).eval()
