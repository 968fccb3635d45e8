"""Sequential W_o refit (exporter/refit.py) against least squares solved independently, float64."""

import copy

import pytest
import torch
from tiny_models import FAMILIES, tiny_model

from eigenkv.exporter.calibrate import calibrate
from eigenkv.exporter.decoder import decoder_from_hf
from eigenkv.exporter.fold import fold
from eigenkv.exporter.methods import get_method, method_factors
from eigenkv.exporter.refit import compressed_layers, refit_outputs


def _setup(family, seed=5):
    model = tiny_model(family).double()
    decoder = decoder_from_hf(model)
    samples = torch.randint(0, 256, (6, 40), generator=torch.Generator().manual_seed(seed))
    stats = calibrate(decoder, samples, progress=False, fisher=True)
    factors = method_factors(get_method("loss-aware"), decoder, stats, "pre", 40)
    return decoder, samples, factors


def _captured(decoder, ids, module, output: bool):
    """The input (or output) of `module` in a plain full-model forward, [tokens, width]."""
    got = []
    hook = module.register_forward_hook(lambda m, a, out: got.append(out if output else a[0]))
    try:
        decoder(ids)
    finally:
        hook.remove()
    return got[0].reshape(-1, got[0].shape[-1])


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_refit_is_least_squares_on_the_compressed_models_own_inputs(family):
    """Each refitted W_o' equals lstsq(a, y - b), with a the o_proj input of the *refitted*
    compressed model and y the original attention output, both taken from whole-model forwards
    (hooks, not the refit's layer loop); max |ΔW| <= 1e-8 (float64, ridge 0). Residuals shrink."""
    decoder, samples, factors = _setup(family)
    d, n = decoder.dims.head_dim, decoder.dims.n_layers
    folded = fold(decoder, factors, [d // 2] * n, [d // 2] * n, "pre")
    before = {i: layer.attn.o_proj.weight.clone() for i, layer in enumerate(folded.layers)}
    original_w = [layer.attn.o_proj.weight.clone() for layer in decoder.layers]
    report = refit_outputs(folded, decoder, samples, ridge=0.0, chunk=4)  # 2 chunks: 4 + 2 windows
    assert report.layers == list(range(n)) and report.tokens == samples.numel()
    for i in range(n):
        a = _captured(folded, samples, folded.layers[i].attn.o_proj, output=False)
        y = _captured(decoder, samples, decoder.layers[i].attn, output=True)
        o = folded.layers[i].attn.o_proj
        target = y - (0 if o.bias is None else o.bias)
        best = torch.linalg.lstsq(a, target).solution.T
        assert (o.weight - best).abs().max().item() <= 1e-8, (family, i)
        assert not torch.equal(o.weight, before[i])
    assert all(after <= b * (1 + 1e-9) for after, b in zip(report.residual_after, report.residual_before))
    assert all(torch.equal(w, layer.attn.o_proj.weight) for w, layer in zip(original_w, decoder.layers))


@pytest.mark.parametrize("family", ["llama", "opt", "gemma3_text"])
@torch.no_grad()
def test_layers_left_out_carry_the_compressed_stream(family):
    """Refitting layers 0 and 2 only: layer 1 (compressed, not refitted) keeps its module and still
    feeds layer 2 the compressed model's stream, so layer 2's W_o' is lstsq on the inputs of the
    whole compressed model (hooks; float64, 1e-8)."""
    decoder, samples, factors = _setup(family)
    d, n = decoder.dims.head_dim, decoder.dims.n_layers
    assert n >= 3
    folded = fold(decoder, factors, [d // 2] * n, [d // 2] * n, "pre")
    kept = folded.layers[1].attn.o_proj
    report = refit_outputs(folded, decoder, samples, layers=[0, 2], ridge=0.0, chunk=4)
    assert report.layers == [0, 2] and folded.layers[1].attn.o_proj is kept
    for i in (0, 2):
        a = _captured(folded, samples, folded.layers[i].attn.o_proj, output=False)
        y = _captured(decoder, samples, decoder.layers[i].attn, output=True)
        o = folded.layers[i].attn.o_proj
        best = torch.linalg.lstsq(a, y - (0 if o.bias is None else o.bias)).solution.T
        assert (o.weight - best).abs().max().item() <= 1e-8, (family, i)


@torch.no_grad()
def test_refit_of_an_exact_fold_keeps_w_o_and_skips_what_it_is_not_asked():
    """At full rank the fold is the original model: after the refit it still is (logits within
    1e-8, float64, ridge 0; the weights themselves are only determined up to the near-null
    directions of a 240-token Gram) and every layer's residual is ~0; layers outside `layers` keep
    their o_proj module; full-rank layers are not `compressed_layers`."""
    decoder, samples, factors = _setup("llama")
    d, n = decoder.dims.head_dim, decoder.dims.n_layers
    exact = fold(decoder, factors, [d] * n, [d] * n, "pre")
    assert compressed_layers(exact) == []
    report = refit_outputs(exact, decoder, samples, layers=list(range(n)), ridge=0.0)
    assert max(report.residual_after) <= 1e-9  # from the Gram identity: cancellation at ~1e-13
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(9))
    assert (exact(ids) - decoder(ids)).abs().max().item() <= 1e-8
    ranks = [d] * n
    ranks[1] = d // 2
    folded = fold(decoder, factors, ranks, ranks, "pre")
    assert compressed_layers(folded) == [1]
    kept = [layer.attn.o_proj for layer in folded.layers]
    snapshot = copy.deepcopy(kept)
    report = refit_outputs(folded, decoder, samples)
    assert report.layers == [1]
    for i, layer in enumerate(folded.layers):
        assert (layer.attn.o_proj is kept[i]) is (i != 1)
    assert not torch.equal(folded.layers[1].attn.o_proj.weight, snapshot[1].weight)


def test_refit_refuses_bad_arguments():
    decoder, samples, factors = _setup("llama")
    d, n = decoder.dims.head_dim, decoder.dims.n_layers
    folded = fold(decoder, factors, [d // 2] * n, [d // 2] * n, "pre")
    with pytest.raises(ValueError, match="non-empty"):
        refit_outputs(folded, decoder, samples[:0])
    with pytest.raises(ValueError, match="layers must be in"):
        refit_outputs(folded, decoder, samples, layers=[n])
    with pytest.raises(ValueError, match="shares its attention with the original"):
        refit_outputs(decoder, decoder, samples, layers=[0])
    assert refit_outputs(folded, decoder, samples, layers=[]).layers == []
