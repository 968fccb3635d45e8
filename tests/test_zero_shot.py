"""The in-process cloze set (exporter/zero_shot.py): items built from the text as stated, accuracy
equal to a float64 reference, an oracle scoring 100%."""

import pytest
import torch
from tiny_models import tiny_model

from eigenkv.exporter.decoder import decoder_from_hf
from eigenkv.exporter.zero_shot import cloze_accuracy, cloze_items


def _stream(n=6000, seed=3):
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed))


def test_items_hold_the_true_continuation_and_distinct_distractors():
    tokens = _stream()
    items = cloze_items(tokens, n_items=40, context=32, span=3, choices=4, seed=1)
    assert items.contexts.shape == (40, 32) and items.candidates.shape == (40, 4, 3)
    windows = tokens.unfold(0, 35, 1)
    for ctx, cands, ans in zip(items.contexts, items.candidates, items.answer):
        start = int((windows[:, :32] == ctx).all(1).nonzero()[0])
        assert torch.equal(cands[ans], tokens[start + 32:start + 35])  # the true next tokens
        assert len({tuple(c.tolist()) for c in cands}) == 4  # no distractor equals another or the truth
    assert set(items.answer.tolist()) == {0, 1, 2, 3}  # the answer's place is random
    again = cloze_items(tokens, n_items=40, context=32, span=3, choices=4, seed=1)
    assert torch.equal(again.candidates, items.candidates) and torch.equal(again.answer, items.answer)
    with pytest.raises(ValueError, match="give 171 cloze items of 35 tokens, need 200"):
        cloze_items(tokens, n_items=200, context=32, span=3)


@torch.no_grad()
def test_accuracy_equals_a_float64_reference_and_an_oracle_scores_everything():
    decoder = decoder_from_hf(tiny_model("llama")).double()
    tokens = _stream()
    items = cloze_items(tokens, n_items=24, context=16, span=4, seed=2)
    # reference: each candidate on its own, float64, summed log-probabilities of its tokens
    correct = 0
    for ctx, cands, ans in zip(items.contexts, items.candidates, items.answer):
        scores = []
        for cand in cands:
            ids = torch.cat([ctx, cand])[None]
            logp = torch.log_softmax(decoder(ids)[0], -1)
            scores.append(sum(float(logp[15 + j, cand[j]]) for j in range(4)))
        correct += int(max(range(4), key=lambda i: scores[i]) == int(ans))
    assert cloze_accuracy(decoder, items, batch_size=5) == correct / 24
    # an oracle that knows the text (a period-37 phrase) picks the true continuation every time
    phrase = torch.randperm(256, generator=torch.Generator().manual_seed(4))[:37]
    periodic = phrase.repeat(200)
    successor = {int(a): int(b) for a, b in zip(phrase, phrase.roll(-1))}
    assert len(successor) == 37  # distinct tokens: the next one is a function of the current one

    def oracle(ids):
        logits = torch.full((*ids.shape, 256), -30.0)
        nxt = torch.tensor([[successor.get(int(t), 0) for t in row] for row in ids])
        return logits.scatter(-1, nxt[..., None], 0.0)

    assert cloze_accuracy(oracle, cloze_items(periodic, n_items=30, context=16, span=4, seed=5)) == 1.0


@pytest.mark.parametrize("family", ["llama", "opt", "gemma3_text", "qwen3"])
@torch.no_grad()
def test_shared_context_scores_equal_whole_sequences(family):
    """The EigenDecoder path (context once into a KV cache, candidates on copies of it) gives each
    candidate the summed log-probability a whole-sequence forward gives (float64, 1e-9), in
    families with learned positions (opt), sliding-window layers with their own RoPE (gemma3) and QK-norm."""
    from eigenkv.exporter.zero_shot import _shared_context_scores
    decoder = decoder_from_hf(tiny_model(family)).double()
    items = cloze_items(_stream(), n_items=6, context=20, span=3, seed=7)
    got = _shared_context_scores(decoder, items.contexts, items.candidates)
    for i, (ctx, cands) in enumerate(zip(items.contexts, items.candidates)):
        for c, cand in enumerate(cands):
            logp = torch.log_softmax(decoder(torch.cat([ctx, cand])[None])[0], -1)
            want = sum(float(logp[19 + j, cand[j]]) for j in range(3))
            assert abs(float(got[i, c]) - want) <= 1e-9, (family, i, c)
