"""exporter/perplexity.py against a float64 reference: the chunked lm_head (an EigenDecoder's
logits computed `head_chunk` tokens at a time) and the plain-callable path give the perplexity of
the float64 model's full logits on fresh random tokens, within float32 round-off (rel 1e-5)."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from eigenkv.exporter.decoder import decoder_from_hf
from eigenkv.exporter.perplexity import perplexity
from tiny_models import FAMILIES, tiny_model


def _reference64(decoder, tokens: torch.Tensor, window: int) -> float:
    n = tokens.numel() // window
    ids = tokens[: n * window].view(n, window)
    with torch.no_grad():
        logits = copy.deepcopy(decoder).double()(ids)
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                            reduction="sum")
    return math.exp(nll.item() / ids[:, 1:].numel())


@pytest.mark.parametrize("family", ["llama", "opt", "gemma3_text"])
def test_chunked_head_matches_float64_full_logits(family):
    assert family in FAMILIES
    decoder = decoder_from_hf(tiny_model(family))
    vocab = decoder.lm_head.out_features
    gen = torch.Generator().manual_seed(1234)
    tokens = torch.randint(0, vocab, (5 * 24 + 7,), generator=gen)  # 5 windows of 24, 7 tokens left over
    ref = _reference64(decoder, tokens, 24)
    for chunk in (None, 1, 7, 23 * 5, 10_000):  # default, one token, uneven, one batch exactly, more than all
        p = perplexity(decoder, tokens, window=24, batch_size=2, progress=False, head_chunk=chunk)
        assert (p.tokens, p.window) == (5 * 23, 24)
        assert p.value == pytest.approx(ref, rel=1e-5), chunk
    plain = perplexity(lambda ids: decoder(ids), tokens, window=24, batch_size=3, progress=False)
    assert plain.value == pytest.approx(ref, rel=1e-5)
    double = copy.deepcopy(decoder).double()  # a float64 model stays float64 on both paths
    for model in (double, lambda ids: double(ids)):
        assert perplexity(model, tokens, window=24, batch_size=2, progress=False, head_chunk=7).value == pytest.approx(
            ref, rel=1e-12)


def test_too_few_tokens_for_one_window():
    decoder = decoder_from_hf(tiny_model("llama"))
    with pytest.raises(ValueError, match="need at least 24 tokens for one window, got 23"):
        perplexity(decoder, torch.zeros(23, dtype=torch.long), window=24, progress=False)
