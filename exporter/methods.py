"""Basis methods: how a layer's calibration statistics become down/up factors.

Each method is a small registered dataclass with one hook, `factors(stats, context)`;
`--method NAME` picks one. `eigen` is the paper (orthonormal eigenvectors of the key and
value activations); the loss-aware methods minimise what the model actually reads:

  Fisher-weighted keys  E over keys of (gᵀ (k - U D k))², g = ∂ log p(y) / ∂k the gradient
                      of the model's own sampled next tokens (`calibrate.fisher_grams`): the
                      second-order KL cost of a key error, through attention, RoPE and every
                      later layer (FWSVD's Fisher weighting, Hsu et al. 2022, as a full Fisher
                      per KV head in K-FAC's Kronecker-factored form);
                      the earlier query-aware objectives are kept: (qᵀ R (k - U D k))² over
                      query/key pairs (KQ-SVD's closed form) weighted by attention
                      (`loss-aware-attention`) or uniformly (`loss-aware-uniform`), the query
                      second moment averaged over the RoPE rotations R of the distances
  output-aware values E ||W_o (a - U D a)||² over attention outputs a (what the value
                      cache feeds), then W_o refitted by least squares on all heads'
                      attention outputs (cross-head terms included)

Both are oblique projections from the SVD of M^½ C^½ (M the loss weight, C the activation
second moment), never worse than the plain SVD on their objective.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from eigenkv.errors import EigenError
from eigenkv.exporter.calibrate import LayerStats
from eigenkv.exporter.decompose import LayerFactors, eigen_factors, layer_bases
from eigenkv.plugins.reference import rotate_half


@dataclass(frozen=True)
class LayerContext:
    """What a method may read besides the statistics: one layer's weights and geometry."""

    n_heads: int
    n_kv_heads: int
    head_dim: int
    o_weight: torch.Tensor  # [hidden, Hq*d]
    rope: bool
    rope_mode: str
    rope_cos: torch.Tensor | None = None  # [P, d]
    rope_sin: torch.Tensor | None = None
    window: int = 1024  # calibration sequence length: relative distances 0..window-1
    sliding_window: int = 0  # the layer's sliding window (0: none): its queries reach distances < this


def psd_sqrt(gram: torch.Tensor, rel_floor: float = 1e-8) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric square root and its inverse of a PSD matrix [d, d], eigenvalues floored at
    rel_floor × the largest (so the inverse exists and full rank stays exact)."""
    evals, evecs = torch.linalg.eigh(gram.to(torch.float64))
    evals = evals.clamp_min(rel_floor * float(evals.max().clamp_min(1e-300)))
    root = evals.sqrt()
    return (evecs * root) @ evecs.T, (evecs / root) @ evecs.T


def oblique(m: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Minimise tr(M (I - U D) C (I - U D)ᵀ) over rank-r U [d, r], D [r, d], for every r at once.

    SVD M^½ C^½ = P S Vᵀ; D = Vᵀ C^-½, U = C^½ V (columns/rows in order). Returns
    (down [d, d], up [d, d], loss [d + 1]) with loss[r] = Σ_{i>=r} S_i², the objective at rank r.
    (Shrinking C towards its mean eigenvalue, to bound how much U D amplifies directions the
    calibration text barely visits, was measured and did not help: +25.8% / +32.9% wiki at
    shrink 0.01 / 0.1 vs +25.7% without, kv-ratio 0.5.)
    """
    m_half, _ = psd_sqrt(m)
    c_half, c_inv_half = psd_sqrt(c)
    _, s, vh = torch.linalg.svd(m_half @ c_half)
    e = s.pow(2)
    loss = torch.cat([e.flip(0).cumsum(0).flip(0), e.new_zeros(1)])
    return vh @ c_inv_half, c_half @ vh.T, loss


def rope_averaged(gram: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, window: int,
                  weights: torch.Tensor | None = None) -> torch.Tensor:
    """Σ_Δ w_Δ R_Δ G R_Δᵀ / Σ w over relative distances Δ = 0..window-1, R_Δ x = x·cos_Δ +
    rotate_half(x)·sin_Δ. gram [H, d, d]. weights: None for w_Δ = window - Δ (the causal pairs of
    a window), or [H, n] per head (e.g. the attention mass at each distance, `LayerStats.
    attention_distance`; distances past the RoPE tables are dropped).

    A query q at position m scores a key at n < m as (R_{m-n} q)ᵀ k, so this is the second
    moment of the queries as a pre-RoPE key error meets them.
    """
    g = gram.to(torch.float64)
    if weights is None:
        n = min(window, cos.shape[0])
        w = torch.arange(n, 0, -1, dtype=torch.float64).expand(g.shape[0], n)
    else:
        n = min(weights.shape[-1], cos.shape[0])
        w = weights[:, :n].to(torch.float64)
    w = w / w.sum(-1, keepdim=True).clamp_min(1e-300)  # [H, n]
    c, s = cos[:n].to(torch.float64), sin[:n].to(torch.float64)
    wcc, wcs, wss = (torch.einsum("nd,hn,ne->hde", a, w, b) for a, b in ((c, c), (c, s), (s, s)))
    eye = torch.eye(g.shape[-1], dtype=torch.float64)
    j = rotate_half(eye).T  # J x = rotate_half(x)
    return wcc * g + wcs * (g @ j.T) + wcs.transpose(1, 2) * (j @ g) + wss * (j @ g @ j.T)


def _group_sum(x: torch.Tensor, n_kv: int) -> torch.Tensor:
    return x.view(n_kv, -1, *x.shape[1:]).sum(1)


def _oblique_heads(m: torch.Tensor, c: torch.Tensor):
    """`oblique` per head: m, c [G, d, d] -> (down [G, d, d], up [G, d, d], loss summed over heads [d + 1])."""
    downs, ups, losses = zip(*(oblique(mh, ch) for mh, ch in zip(m, c)))
    return torch.stack(downs), torch.stack(ups), torch.stack(losses).sum(0)


@dataclass(frozen=True)
class Eigen:
    """The paper: orthonormal eigenvectors of keys (shared in RoPE `pre`/`joint`, per KV head
    otherwise, stacked with queries) and values (per KV head)."""

    name: str = "eigen"

    def factors(self, stats: LayerStats, ctx: LayerContext) -> LayerFactors:
        return eigen_factors(layer_bases(stats, ctx.rope, ctx.rope_mode))

    def needs_attention(self, rope_mode: str, rope: bool) -> bool:
        """Whether `factors` reads the calibration's attention statistics (`calibrate(attention=)`)."""
        return False

    def needs_fisher(self, rope_mode: str, rope: bool) -> bool:
        """Whether `factors` reads the keys' Fisher statistics (`calibrate(fisher=)`)."""
        return False

    def check(self, rope_mode: str, rope: bool) -> None:
        """Every RoPE mode folds the paper's bases."""


@dataclass(frozen=True)
class LossAware:
    """Query-aware keys and/or output-aware values (the other side falls back to `eigen`).

    keys: "query-aware" | "eigen"; values: "output-aware" | "eigen";
    key_sharing: "per-head" (a basis per KV head) | "shared" (one per layer; `joint` needs it);
    value_stats: "output" (attention outputs a, what values feed) | "value" (values v);
    key_weighting: "fisher" | "attention" | "uniform" (query-aware keys outside `joint`).
    "fisher" weighs each key's error by the gradient of the log-likelihood of sampled next
    tokens with respect to that key: M = Σ_s g_s g_sᵀ (the keys' Fisher information, per KV head;
    it already holds the attention weights, the RoPE rotations and the later layers) and
    C = Σ_s |g_s|² k_s k_sᵀ, a Kronecker (K-FAC-style) approximation of Σ_s (g_sᵀ e_s)² that
    weighs each key by its gradient's energy (`LayerStats.key_fisher`, `key_fisher_x`); the cross
    terms between keys of the second-order KL are dropped. The other two weigh the logit
    error of query/key pairs: "uniform" counts every causal pair alike; "attention"
    counts the pair (t, p) by its attention weight a_tp, the second-order term of the KL
    between the original and perturbed attention rows (KL ≈ ½ Σ_p a_tp (δ_tp - δ̄_t)², δ the
    logit error), factorised as keys weighted by the attention they receive
    (`LayerStats.key_attention`) times queries whose RoPE rotations are averaged by the attention
    mass at each distance (`attention_distance`) instead of by the count of causal pairs.
    """

    name: str
    keys: str = "query-aware"
    values: str = "output-aware"
    key_sharing: str = "per-head"
    value_stats: str = "output"
    ridge: float = 1e-9  # relative ridge of the W_o refit (1e-2 measured: +27.2% vs +25.7% wiki at 0.5)
    key_weighting: str = "fisher"

    def _weighted(self, rope_mode: str, rope: bool) -> bool:
        return self.keys == "query-aware" and not (rope and rope_mode == "joint")

    def needs_attention(self, rope_mode: str, rope: bool) -> bool:
        """Whether `factors` reads the calibration's attention statistics (`calibrate(attention=)`):
        attention-weighted query-aware keys outside RoPE models' `joint` mode."""
        return self.key_weighting == "attention" and self._weighted(rope_mode, rope)

    def needs_fisher(self, rope_mode: str, rope: bool) -> bool:
        """Whether `factors` reads the keys' Fisher statistics (`calibrate(fisher=)`): Fisher-weighted
        keys outside RoPE models' `joint` mode."""
        return self.key_weighting == "fisher" and self._weighted(rope_mode, rope)

    def _keys(self, st: LayerStats, ctx: LayerContext):
        n = max(st.tokens, 1)
        if ctx.rope and ctx.rope_mode == "joint":
            m, c = st.rot_query / n, st.rot_key / n  # already rotated, summed over heads
        else:
            if self.key_weighting == "fisher":
                if st.key_fisher is None:
                    raise EigenError(f"--method {self.name} needs the keys' Fisher statistics, which this "
                                     f"calibration did not collect")
                m, c = st.key_fisher, st.key_fisher_x
                if self.key_sharing == "shared":
                    m, c = m.sum(0, keepdim=True), c.sum(0, keepdim=True)
                return _oblique_heads(m, c)
            attention = self.key_weighting == "attention"
            if attention and st.key_attention is None:
                raise EigenError(f"--method {self.name} needs attention-weighted key statistics, which this "
                                 f"calibration did not collect")
            q = st.query / n
            if ctx.rope:
                weights = st.attention_distance if attention else None
                if weights is None and ctx.sliding_window:  # the causal pairs a sliding window keeps
                    reach = min(ctx.window, ctx.sliding_window)
                    weights = torch.arange(ctx.window, ctx.window - reach, -1, dtype=torch.float64).expand(q.shape[0], -1)
                q = rope_averaged(q, ctx.rope_cos, ctx.rope_sin, ctx.window, weights=weights)
            m, c = _group_sum(q, ctx.n_kv_heads), (st.key_attention if attention else st.key) / n
            if self.key_sharing == "shared":
                m, c = m.sum(0, keepdim=True), c.sum(0, keepdim=True)
        return _oblique_heads(m, c)

    def _values(self, st: LayerStats, ctx: LayerContext):
        n, d, hq, hkv = max(st.tokens, 1), ctx.head_dim, ctx.n_heads, ctx.n_kv_heads
        w = ctx.o_weight.to(torch.float64).view(-1, hq, d)
        m = _group_sum(torch.einsum("ohd,ohe->hde", w, w), hkv)  # Σ_j W_o,jᵀ W_o,j per KV head
        if self.value_stats == "output":
            blocks = st.attn_out.view(hq, d, hq, d).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
            c = _group_sum(blocks, hkv) / n
        else:
            c = st.value / n
        return _oblique_heads(m, c)

    def check(self, rope_mode: str, rope: bool) -> None:
        """Refuse, before any work, a RoPE mode this method cannot fold: per-head key bases in
        `joint` mode (one line; EigenError)."""
        if rope and rope_mode == "joint" and self.key_sharing != "shared" and self.keys != "eigen":
            shared = [m.name for m in METHODS.values() if isinstance(m, LossAware) and m.key_sharing == "shared"]
            raise EigenError(f"--method {self.name} uses per-head key bases; --rope-mode joint needs shared ones "
                             f"(use --method {' or '.join(shared)}, or --rope-mode pre)")

    def factors(self, stats: LayerStats, ctx: LayerContext) -> LayerFactors:
        self.check(ctx.rope_mode, ctx.rope)
        base = None if self.keys == "query-aware" and self.values == "output-aware" else \
            eigen_factors(layer_bases(stats, ctx.rope, ctx.rope_mode))  # the paper's side, where one is kept
        kd, ku, kl = (self._keys(stats, ctx) if self.keys == "query-aware"
                      else (base.key_down, base.key_up, base.key_loss))
        if self.values == "output-aware":
            vd, vu, vl = self._values(stats, ctx)
            gram = stats.attn_out / max(stats.tokens, 1)
        else:
            vd, vu, vl, gram = base.value_down, base.value_up, base.value_loss, None
        return LayerFactors(kd, ku, kl, vd, vu, vl, output_gram=gram, output_ridge=self.ridge)


METHODS = {m.name: m for m in (
    Eigen(),
    LossAware("loss-aware"),
    LossAware("loss-aware-attention", key_weighting="attention"),
    LossAware("loss-aware-uniform", key_weighting="uniform"),
    LossAware("loss-aware-shared", key_sharing="shared"),
    LossAware("query-aware-keys", values="eigen"),
    LossAware("output-aware-values", keys="eigen"),
)}


def get_method(name: str):
    if name not in METHODS:
        raise EigenError(f"unknown --method {name!r}; choose one of: {', '.join(METHODS)}")
    return METHODS[name]


def layer_context(decoder, index: int, rope_mode: str, window: int) -> LayerContext:
    """One layer's weights and geometry: its own RoPE tables where it has them (gemma3's local
    layers), the calibration window and the layer's sliding window."""
    attn = decoder.layers[index].attn
    rope = attn.layer_rope(decoder.rope) if attn.rope else None
    return LayerContext(attn.n_heads, attn.n_kv_heads, attn.head_dim, attn.o_proj.weight.detach(), attn.rope,
                        rope_mode, None if rope is None else rope.cos, None if rope is None else rope.sin, window,
                        attn.window)


def method_factors(method, decoder, stats: list[LayerStats], rope_mode: str, window: int) -> list[LayerFactors]:
    """One LayerFactors per layer from the calibration statistics."""
    return [method.factors(s, layer_context(decoder, i, rope_mode, window)) for i, s in enumerate(stats)]
