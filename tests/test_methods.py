"""Basis methods: objectives against their closed forms, and full-rank folds of every method."""

import pytest
import torch
from tiny_models import FAMILIES, tiny_model

from eigenkv.exporter.calibrate import calibrate
from eigenkv.exporter.decoder import decoder_from_hf
from eigenkv.exporter.fold import fold, refit_output
from eigenkv.exporter.methods import METHODS, get_method, method_factors, oblique, rope_averaged
from eigenkv.errors import EigenError
from eigenkv.plugins.reference import apply_rope

TOL = 1e-4  # max |logit diff| at full rank, float32


def _psd(d, rank, gen):
    x = torch.randn(d, rank, generator=gen, dtype=torch.float64) * torch.logspace(0, -2, rank, dtype=torch.float64)  # well above the 1e-8 floor
    return x @ x.T


def _objective(m, c, up, down):
    e = torch.eye(m.shape[0], dtype=torch.float64) - up @ down
    return float(torch.trace(m @ e @ c @ e.T))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_oblique_matches_closed_form_and_beats_plain_svd(seed):
    """loss[r] is the objective tr(M E C Eᵀ) at rank r; it equals the optimum Σ_{i>=r} s_i²
    of SVD(M^½ C^½), and is <= the plain SVD's (eigenvectors of C) on the same objective."""
    gen = torch.Generator().manual_seed(seed)
    d = 12
    m, c = _psd(d, d, gen), _psd(d, d, gen)
    down, up, loss = oblique(m, c)
    evals, evecs = torch.linalg.eigh(c)
    plain = evecs[:, evals.argsort(descending=True)]
    m_half = torch.linalg.cholesky(m)  # any square root gives the same singular values
    c_half = torch.linalg.cholesky(c)
    s = torch.linalg.svdvals(m_half.T @ c_half)
    for r in range(d + 1):
        got = _objective(m, c, up[:, :r], down[:r])
        assert got == pytest.approx(float(loss[r]), rel=1e-6, abs=1e-9)
        assert got == pytest.approx(float(s[r:].pow(2).sum()), rel=1e-6, abs=1e-9)
        svd = _objective(m, c, plain[:, :r], plain[:, :r].T)
        assert got <= svd * (1 + 1e-9) + 1e-12
    assert _objective(m, c, up, down) < 1e-9  # full rank: exact
    r = d // 2  # and strictly better somewhere when M is not isotropic
    assert float(loss[r]) < 0.9 * _objective(m, c, plain[:, :r], plain[:, :r].T)


def test_rope_average_matches_brute_force():
    """Σ_Δ w_Δ R_Δ G R_Δᵀ via four elementwise weights == rotating G at every Δ explicitly."""
    gen = torch.Generator().manual_seed(3)
    d, window = 8, 37
    g = _psd(d, d, gen)[None]
    inv = 1.0 / (100.0 ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    ang = torch.arange(64, dtype=torch.float64)[:, None] * torch.cat([inv, inv])[None]
    cos, sin = ang.cos(), ang.sin()
    eye = torch.eye(d, dtype=torch.float64)
    total, wsum = torch.zeros(d, d, dtype=torch.float64), 0.0
    for delta in range(window):
        rot = apply_rope(eye, torch.full((d,), delta), cos, sin).T  # R_Δ (columns = images of e_i)
        total += (window - delta) * rot @ g[0] @ rot.T
        wsum += window - delta
    got = rope_averaged(g, cos, sin, window)[0]
    assert torch.allclose(got, total / wsum, atol=1e-12)


def test_rope_average_with_per_head_weights_matches_brute_force():
    """weights [H, n] (the attention mass per distance): Σ_Δ w_hΔ R_Δ G_h R_Δᵀ / Σ_Δ w_hΔ per head."""
    gen = torch.Generator().manual_seed(6)
    d, n, heads = 8, 29, 3
    g = torch.stack([_psd(d, d, gen) for _ in range(heads)])
    w = torch.rand(heads, n, generator=gen, dtype=torch.float64)
    w[1, 5:] = 0.0  # a head that only looks back 4 tokens
    inv = 1.0 / (100.0 ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    ang = torch.arange(64, dtype=torch.float64)[:, None] * torch.cat([inv, inv])[None]
    cos, sin = ang.cos(), ang.sin()
    eye = torch.eye(d, dtype=torch.float64)
    got = rope_averaged(g, cos, sin, 1024, weights=w)
    for h in range(heads):
        total = torch.zeros(d, d, dtype=torch.float64)
        for delta in range(n):
            rot = apply_rope(eye, torch.full((d,), delta), cos, sin).T
            total += w[h, delta] * rot @ g[h] @ rot.T
        assert torch.allclose(got[h], total / w[h].sum(), atol=1e-12)
    causal = torch.arange(n, 0, -1, dtype=torch.float64).expand(heads, n)  # the default weights, given explicitly
    assert torch.allclose(rope_averaged(g, cos, sin, n, weights=causal), rope_averaged(g, cos, sin, n), atol=1e-12)


def test_output_refit_is_least_squares():
    """refit_output == the normal-equations solution, and never worse than folding value_up."""
    gen = torch.Generator().manual_seed(4)
    hq, hkv, d, r, out = 4, 2, 6, 3, 10
    a = torch.randn(500, hq * d, generator=gen, dtype=torch.float64) @ torch.randn(hq * d, hq * d, generator=gen,
                                                                                  dtype=torch.float64)
    lin = torch.nn.Linear(hq * d, out, bias=False, dtype=torch.float64)
    down = torch.linalg.qr(torch.randn(hkv, d, d, generator=gen, dtype=torch.float64))[0][:, :, :r].transpose(1, 2)
    new = refit_output(lin, down, a.T @ a, hq, ridge=0.0)
    a_hat = torch.block_diag(*down.repeat_interleave(hq // hkv, 0))
    target = a @ lin.weight.T.detach()
    z = a @ a_hat.T
    best = torch.linalg.lstsq(z, target).solution.T
    assert torch.allclose(new.weight.detach(), best, atol=1e-8)
    err_refit = (target - z @ new.weight.detach().T).norm()
    up = down.transpose(1, 2).repeat_interleave(hq // hkv, 0)  # orthonormal D: U = Dᵀ, [Hq, d, r]
    folded_up = torch.einsum("ohd,hdr->ohr", lin.weight.detach().view(out, hq, d), up).reshape(out, -1)
    err_up = (target - z @ folded_up.T).norm()
    assert err_refit <= err_up + 1e-9


@pytest.fixture(scope="module", params=FAMILIES)
def setup(request):
    model = tiny_model(request.param)
    decoder = decoder_from_hf(model)
    samples = torch.randint(0, 256, (4, 48), generator=torch.Generator().manual_seed(5))
    return model, decoder, calibrate(decoder, samples, progress=False, fisher=True)


@pytest.mark.parametrize("method", sorted(METHODS))
@torch.no_grad()
def test_every_method_reproduces_original_at_full_rank(setup, method):
    model, decoder, stats = setup
    d, n = decoder.dims.head_dim, decoder.dims.n_layers
    factors = method_factors(get_method(method), decoder, stats, "pre", 48)
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(12))
    ref = model(ids).logits
    diff = (ref - fold(decoder, factors, [d] * n, [d] * n, "pre")(ids)).abs().max().item()
    assert diff <= TOL, diff
    low = fold(decoder, factors, [d // 2] * n, [d // 2] * n, "pre")(ids)
    assert (ref - low).abs().max().item() > 1e-3  # not a no-op


@pytest.mark.parametrize("family", [*FAMILIES, "mistral-window"])
@torch.no_grad()
def test_attention_statistics_match_transformers_attention_weights(family, monkeypatch):
    """LayerStats.key_attention and attention_distance against transformers' own (eager) attention
    weights in float64: keys weighted by the attention they receive (per KV head, over its query
    group / group size), and the attention mass per query-key distance (RoPE models). Small blocks
    of query rows and two calibration batches, so the blockwise accumulation is exercised."""
    import eigenkv.exporter.calibrate as cal
    monkeypatch.setattr(cal, "ATTENTION_CHUNK_BYTES", 4 * 2 * 4 * 48 * 7)  # 7 query rows per block (2 sequences)
    model = tiny_model(family)
    decoder = decoder_from_hf(model)
    samples = torch.randint(0, 256, (4, 48), generator=torch.Generator().manual_seed(5))
    keys = []  # the keys as projected (the tap calibration reads), layer by layer
    taps = [layer.attn.projected_key.register_forward_hook(lambda m, i, o, j=j: keys.append((j, o.detach())))
            for j, layer in enumerate(decoder.layers)]
    try:
        stats = cal.calibrate(decoder, samples, batch_size=2, progress=False)
    finally:
        for t in taps:
            t.remove()
    weights = model(samples, output_attentions=True).attentions  # per layer [B, Hq, S, S]
    s = samples.shape[1]
    for i, (st, att) in enumerate(zip(stats, weights)):
        att = att.double()
        hq, hkv = att.shape[1], st.key.shape[0]
        k = torch.cat([o for j, o in keys if j == i]).double()  # [B, Hkv, S, d]
        received = att.sum(2).view(att.shape[0], hkv, hq // hkv, s).sum(2) / (hq // hkv)
        want = torch.einsum("bhs,bhsd,bhse->hde", received, k, k)
        assert torch.allclose(st.key_attention, want, rtol=1e-5, atol=1e-6 * want.abs().max())
        assert float(received.sum()) == pytest.approx(st.tokens * hkv, rel=1e-6)  # weights sum to the tokens
        if not decoder.layers[i].attn.rope:
            assert st.attention_distance is None
            continue
        t = torch.arange(s)
        want_d = torch.stack([att[:, :, t[delta:], t[:s - delta]].sum((0, 2))
                              for delta in range(s)], -1)  # [Hq, Δ]: pairs (t, t - Δ)
        assert torch.allclose(st.attention_distance, want_d, atol=1e-5)
        window = decoder.layers[i].attn.window
        if window:
            assert float(st.attention_distance[:, window:].abs().max()) == 0.0  # nothing past the window


@torch.no_grad()
def test_attention_statistics_only_when_a_method_reads_them():
    """calibrate(attention=False) leaves the attention statistics None and every other Gram as it
    was; the methods say which of them read the statistics (the pipeline calibrates accordingly)."""
    decoder = decoder_from_hf(tiny_model("llama"))
    samples = torch.randint(0, 256, (4, 48), generator=torch.Generator().manual_seed(5))
    full, bare = calibrate(decoder, samples, progress=False), calibrate(decoder, samples, progress=False, attention=False)
    for a, b in zip(full, bare):
        assert b.key_attention is None and b.attention_distance is None and a.key_attention is not None
        assert all(torch.equal(getattr(a, f), getattr(b, f)) for f in ("query", "key", "value", "attn_out"))
    assert {n for n, m in METHODS.items() if m.needs_attention("pre", True)} == {"loss-aware-attention"}
    assert {n for n, m in METHODS.items() if m.needs_fisher("pre", True)} == {
        "loss-aware", "loss-aware-shared", "query-aware-keys"}
    assert not any(m.needs_attention("joint", True) or m.needs_fisher("joint", True) for m in METHODS.values())
    assert get_method("loss-aware-attention").needs_attention("joint", False)  # no RoPE: joint does not apply
    assert get_method("loss-aware").needs_fisher("joint", False)
    assert all(st.key_fisher is None for st in full)  # calibrate(fisher=False), the default
    with pytest.raises(EigenError, match="attention-weighted key statistics"):
        method_factors(get_method("loss-aware-attention"), decoder, bare, "pre", 48)
    with pytest.raises(EigenError, match="the keys' Fisher statistics"):
        method_factors(get_method("loss-aware"), decoder, full, "pre", 48)
    method_factors(get_method("loss-aware-uniform"), decoder, bare, "pre", 48)  # reads none


def test_local_layers_use_their_own_rope_tables_and_window():
    """gemma3's local layers rotate with their own RoPE base: the method's context carries their
    tables (not the global layers'), and their sliding window."""
    from eigenkv.exporter.methods import layer_context
    decoder = decoder_from_hf(tiny_model("gemma3_text"))
    local, glob = layer_context(decoder, 0, "pre", 48), layer_context(decoder, 1, "pre", 48)
    own = decoder.layers[0].attn.own_rope
    assert own is not None and torch.equal(local.rope_cos, own.cos) and torch.equal(glob.rope_cos, decoder.rope.cos)
    assert not torch.equal(local.rope_cos, glob.rope_cos)
    assert (local.sliding_window, glob.sliding_window) == (8, 0)


@pytest.mark.parametrize("family", ["llama", "qwen2"])  # joint mode exists for RoPE models only
@torch.no_grad()
def test_shared_keys_in_joint_mode_and_per_head_refused(family):
    model = tiny_model(family)
    decoder = decoder_from_hf(model)
    stats = calibrate(decoder, torch.randint(0, 256, (4, 48), generator=torch.Generator().manual_seed(5)),
                      progress=False)
    d, n = decoder.dims.head_dim, decoder.dims.n_layers
    factors = method_factors(get_method("loss-aware-shared"), decoder, stats, "joint", 48)
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(13))
    assert (model(ids).logits - fold(decoder, factors, [d] * n, [d] * n, "joint")(ids)).abs().max() <= TOL
    if decoder.dims.n_kv_heads > 1:
        with pytest.raises(EigenError, match="joint needs shared"):
            method_factors(get_method("loss-aware"), decoder, stats, "joint", 48)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_joint_refusals_name_methods_that_exist(name):
    """A method that cannot fold `joint` says so in one line, naming only methods that exist."""
    method = get_method(name)
    method.check("pre", True)
    method.check("joint", False)  # no RoPE: nothing to refuse
    try:
        method.check("joint", True)
    except EigenError as e:
        suggested = [w.strip(",") for w in str(e).split("use --method ")[1].split(", or")[0].split(" or ")]
        assert suggested and all(s in METHODS for s in suggested), str(e)
        assert all(not (get_method(s).needs_attention("joint", True) or get_method(s).needs_fisher("joint", True))
                   for s in suggested)
    else:
        assert name in ("eigen", "loss-aware-shared", "output-aware-values")


def test_unknown_method_is_one_line():
    with pytest.raises(EigenError, match="unknown --method 'svd'; choose one of: eigen"):
        get_method("svd")


@pytest.mark.parametrize("family", [*FAMILIES, "mistral-window"])
def test_fisher_statistics_match_direct_autograd(family):
    """fisher_grams against autograd on zero offsets added to every layer's keys as projected,
    float64: the same sampled next tokens (the generator replayed), the gradient of their summed
    log-probability through log_softmax and gather (fisher_grams gives onehot - p to the head), and its Grams Σ g gᵀ and Σ |g|² k kᵀ per KV head, two draws per sample; the
    decoder's weights and attention path are left as they were."""
    from eigenkv.exporter.calibrate import fisher_grams, sample_next_tokens
    decoder = decoder_from_hf(tiny_model(family).double())
    samples = torch.randint(0, 256, (3, 20), generator=torch.Generator().manual_seed(4))
    stats = calibrate(decoder, samples, progress=False, attention=False)
    fisher_grams(decoder, samples, stats, draws=2, seed=7, progress=False)
    assert all(p.requires_grad for p in decoder.parameters())
    assert not any(layer.attn.differentiable for layer in decoder.layers)
    gen = torch.Generator().manual_seed(7)
    n = len(decoder.layers)
    want = {name: [0.0] * n for name in ("key_fisher", "key_fisher_x")}
    for layer in decoder.layers:
        layer.attn.differentiable = True
    try:
        for row in samples:
            for _ in range(2):
                seen, offsets, taps = {}, {}, []
                for i, layer in enumerate(decoder.layers):
                    a = layer.attn
                    def tap(m, inp, out, i=i):
                        seen[i] = out.detach()
                        offsets[i] = torch.zeros_like(out, requires_grad=True)
                        return out + offsets[i]
                    taps.append(a.projected_key.register_forward_hook(tap))
                try:
                    logp = torch.log_softmax(decoder(row[None]), -1)[0]
                    y = sample_next_tokens(logp.detach().exp(), gen)[:, None]
                    grads = torch.autograd.grad(logp.gather(1, y).sum(), list(offsets.values()))
                finally:
                    for t in taps:
                        t.remove()
                for (i, k), g in zip(seen.items(), grads):  # [1, Hkv, S, d]
                    assert k.dim() == 4 and k.shape[1] == decoder.layers[i].attn.n_kv_heads
                    want["key_fisher"][i] = want["key_fisher"][i] + torch.einsum("bhsd,bhse->hde", g, g)
                    w = g.pow(2).sum(-1)
                    want["key_fisher_x"][i] = want["key_fisher_x"][i] + torch.einsum("bhs,bhsd,bhse->hde", w, k, k)
    finally:
        for layer in decoder.layers:
            layer.attn.differentiable = False
    for name, per_layer in want.items():
        for st, w in zip(stats, per_layer):
            got = getattr(st, name)
            assert got.dtype == torch.float64 and got.shape == w.shape
            assert float(w.abs().max()) > 0
            assert torch.allclose(got, w, rtol=1e-9, atol=1e-12 * float(w.abs().max())), name


@pytest.mark.parametrize("family", [*FAMILIES, "mistral-window"])
def test_one_pass_calibration_matches_the_layer_streamed_pass_and_fisher_grams(family):
    """calibrate(fisher=True) gathers the plain and attention statistics on the Fisher pass's own
    forward (one sample at a time, PyTorch's fused attention); in float64 every statistic matches
    the layer-streamed pass (batches of 2, the op's reference attention) followed by fisher_grams
    with the same seed, to rtol 1e-9 (1e-5 for the attention statistics, whose attention weights
    are reduced in float32). An on_layer callback (the error-budget search) still gets
    every layer's inputs and outputs."""
    from eigenkv.exporter.calibrate import fisher_grams
    decoder = decoder_from_hf(tiny_model(family).double())
    samples = torch.randint(0, 256, (3, 24), generator=torch.Generator().manual_seed(8))
    one = calibrate(decoder, samples, batch_size=2, progress=False, fisher=True, fisher_draws=2)
    two = calibrate(decoder, samples, batch_size=2, progress=False)
    fisher_grams(decoder, samples, two, draws=2, progress=False)
    names = ("query", "key", "value", "rot_query", "rot_key", "attn_out", "key_attention",
             "attention_distance", "key_fisher", "key_fisher_x")
    for a, b in zip(one, two):
        assert a.tokens == b.tokens == samples.numel()
        for name in names:
            x, y = getattr(a, name), getattr(b, name)
            if y is None:
                assert x is None and name in ("rot_query", "rot_key", "attention_distance"), name
                continue
            assert x.dtype == torch.float64 and not x.requires_grad, name
            assert float(y.abs().max()) > 0, name
            rtol = 1e-5 if name in ("key_attention", "attention_distance") else 1e-9  # summed in float32
            assert torch.allclose(x, y, rtol=rtol, atol=rtol * 1e-3 * float(y.abs().max())), name
    seen = []
    streamed = calibrate(decoder, samples, progress=False, fisher=True, fisher_draws=2,
                         on_layer=lambda i, inp, out, st: seen.append((i, inp.shape, out.shape)))
    assert [i for i, _, _ in seen] == list(range(len(decoder.layers)))
    assert all(torch.allclose(a.key_fisher, b.key_fisher, rtol=1e-9) for a, b in zip(streamed, one))


@pytest.mark.parametrize("vocab,block", [(1000, 64), (1003, 256), (50, 256)])
def test_next_token_sampler_draws_the_rows_distribution(vocab, block):
    """sample_next_tokens on 20k rows of one distribution (every 7th token and the last impossible,
    the rest 0.2-1.2 before normalising, so every live cell expects >= 3 draws; a vocab that is or
    is not a multiple of the block; rows summing to 0.97 rather than 1): a chi-square statistic of
    the counts under its 0.999 quantile (Wilson-Hilferty), zero-probability tokens never drawn,
    the same seed the same tokens; the same counts against a distribution with a quarter of the
    mass moved fail the bound."""
    from eigenkv.exporter.calibrate import sample_next_tokens
    gen = torch.Generator().manual_seed(1)
    p = 0.2 + torch.rand(vocab, generator=gen, dtype=torch.float64)
    p[::7] = 0
    p[-1] = 0  # an impossible last token: never the fallback of a rounding at the row's end
    p = p / p.sum()
    n = 20_000
    rows = (0.97 * p).float().expand(n, vocab)  # not contiguous: the sampler makes it so
    y = sample_next_tokens(rows, torch.Generator().manual_seed(2), block=block)
    assert y.dtype == torch.int64 and y.shape == (n,)
    assert torch.equal(y, sample_next_tokens(rows, torch.Generator().manual_seed(2), block=block))
    counts = torch.bincount(y, minlength=vocab).double()
    assert counts[p == 0].sum() == 0

    def chi2(q):
        live = q > 0
        return float(((counts[live] - n * q[live]) ** 2 / (n * q[live])).sum())
    dof = int((p > 0).sum()) - 1
    z = 3.09  # the standard normal's 0.999 quantile
    bound = dof * (1 - 2 / (9 * dof) + z * (2 / (9 * dof)) ** 0.5) ** 3
    assert chi2(p) < bound, (chi2(p), bound)
    moved, half = p.clone(), vocab // 2  # a quarter of the first half's mass moved to the second
    moved[:half] *= 0.75
    moved[half:] *= 1 + 0.25 * p[:half].sum() / p[half:].sum()
    assert chi2(moved) > bound


def test_next_token_sampler_refuses_rows_without_probability():
    from eigenkv.exporter.calibrate import sample_next_tokens
    for bad in (torch.zeros(2, 300), torch.full((2, 300), float("nan"))):
        with pytest.raises(ValueError, match="positive, finite total"):
            sample_next_tokens(bad, torch.Generator().manual_seed(0))


@pytest.mark.parametrize("one_pass", [False, True])
def test_fisher_pass_restores_the_decoder_when_it_fails(monkeypatch, one_pass):
    """An error inside the Fisher pass (here the LM head) leaves no hook, no trainable-flag or
    attention-path change and no partial statistics behind, whether it runs alone (fisher_grams)
    or carries the plain statistics' hooks too (calibrate(fisher=True))."""
    from eigenkv.exporter.calibrate import fisher_grams
    decoder = decoder_from_hf(tiny_model("llama"))
    samples = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(4))
    stats = calibrate(decoder, samples, progress=False, attention=False)

    def broken(h):
        raise RuntimeError("head failed")
    monkeypatch.setattr(decoder, "head", broken)
    with pytest.raises(RuntimeError, match="head failed"):
        if one_pass:
            calibrate(decoder, samples, progress=False, fisher=True)
        else:
            fisher_grams(decoder, samples, stats, progress=False)
    assert all(p.requires_grad and p.grad is None for p in decoder.parameters())
    assert not any(layer.attn.differentiable for layer in decoder.layers)
    for layer in decoder.layers:
        a = layer.attn
        for m in (a.projected_query, a.projected_key, a.v_proj, a.rotated_query, a.rotated_key, a.o_proj):
            assert not m._forward_hooks and not m._forward_pre_hooks
    assert all(st.key_fisher is None and st.key_fisher_x is None for st in stats)


@torch.no_grad()
def test_fisher_keys_beat_the_other_bases_on_their_objective():
    """At every rank, the Fisher-weighted key basis has the smallest Fisher objective
    tr(M (I - UD) C (I - UD)ᵀ) (M = key_fisher, C = key_fisher_x) of the key bases: the paper's
    SVD and the attention-weighted and uniform query-aware ones (a check that the statistics
    reach the oblique projection, not only that it is exact at full rank)."""
    decoder = decoder_from_hf(tiny_model("llama"))
    samples = torch.randint(0, 256, (4, 48), generator=torch.Generator().manual_seed(5))
    stats = calibrate(decoder, samples, progress=False, fisher=True)
    for i, st in enumerate(stats):
        m, c = st.key_fisher, st.key_fisher_x
        bases = {name: method_factors(get_method(name), decoder, stats, "pre", 48)[i]
                 for name in ("loss-aware", "loss-aware-attention", "loss-aware-uniform", "eigen")}
        d = m.shape[-1]
        for r in range(1, d):
            cost = {}
            for name, f in bases.items():
                up, down = f.key_up.to(torch.float64), f.key_down.to(torch.float64)
                up = up.expand(m.shape[0], -1, -1) if up.shape[0] == 1 else up
                down = down.expand(m.shape[0], -1, -1) if down.shape[0] == 1 else down
                cost[name] = sum(_objective(m[h], c[h], up[h][:, :r], down[h][:r]) for h in range(m.shape[0]))
            assert cost["loss-aware"] <= min(cost.values()) * (1 + 1e-9) + 1e-12, (i, r, cost)
        assert cost["loss-aware"] < cost["eigen"]
