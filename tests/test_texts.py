"""Token roles of a run (calibration / evaluation / validation) and the resolved compress config."""

import random
from dataclasses import asdict

import pytest
import torch
from tiny_models import byte_tokenizer

from eigenkv.errors import EigenError
from eigenkv.exporter.pipeline import CompressConfig
from eigenkv.exporter.sources import tokenize
from eigenkv.exporter.texts import split_texts
from eigenkv.plugins.spec import RopeMode

N_CHARS = 4000  # one byte-tokenizer token per character


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    rng = random.Random(5)  # random letters: any 64-token window occurs once in the text
    path = tmp_path_factory.mktemp("texts") / "calib.txt"
    path.write_text("".join(rng.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(N_CHARS)))
    return path


def _span(stream: torch.Tensor, part: torch.Tensor) -> range:
    """Where `part` [n] stands in `stream` [T]: the one start whose window matches it."""
    windows = stream.unfold(0, part.numel(), 1)
    starts = (windows == part).all(1).nonzero().flatten().tolist()
    assert len(starts) == 1, starts
    return range(starts[0], starts[0] + part.numel())


def test_calibration_evaluation_and_validation_tokens_are_disjoint(text_file):
    tokenizer = byte_tokenizer()
    stream = tokenize(tokenizer, text_file.read_text())
    assert stream.numel() == N_CHARS
    config = CompressConfig(calib_text=str(text_file), eval_texts=(str(text_file),), eval_tokens=500,
                            max_ppl_increase=0.1, validation_tokens=300, eval_window=100, calib_samples=4,
                            calib_seq_len=100)
    texts = split_texts(config, tokenizer)
    half = N_CHARS // 2
    name = str(text_file)
    spans = {"calibration": _span(stream, texts.calibration[name]), "samples": _span(stream, texts.samples.flatten()),
             "evaluation": _span(stream, texts.evals[name]), "validation": _span(stream, texts.validation[name])}
    assert spans == {"calibration": range(0, half), "samples": range(0, 400),
                     "evaluation": range(half, half + 500), "validation": range(N_CHARS - 300, N_CHARS)}
    held_out = set(spans["evaluation"]) | set(spans["validation"])
    assert not set(spans["calibration"]) & held_out and not set(spans["evaluation"]) & set(spans["validation"])
    # nothing held out: calibration takes the whole text
    whole = split_texts(CompressConfig(calib_text=str(text_file), eval_tokens=0, calib_samples=4,
                                       calib_seq_len=100), tokenizer)
    assert _span(stream, whole.calibration[name]) == range(0, N_CHARS) and not whole.evals
    assert whole.validation is None


@pytest.fixture(scope="module")
def three_texts(tmp_path_factory):
    root = tmp_path_factory.mktemp("mix")
    paths = []
    for i, n in enumerate((4000, 3000, 2400)):
        rng = random.Random(10 + i)
        path = root / f"text{i}.txt"
        path.write_text("".join(rng.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(n)))
        paths.append(path)
    return paths


def test_a_mix_splits_every_text_into_disjoint_roles(three_texts):
    """Two texts calibrate (weights 3:1), the third is evaluated only: per text, the samples lie in the
    calibration half, evaluation and validation in the held-out half and apart; samples follow the
    weights, interleaved; the text outside the mix is evaluated from its start; the validation slices
    share validation_tokens by weight in whole windows."""
    a, b, c = (str(p) for p in three_texts)
    tokenizer = byte_tokenizer()
    streams = {p: tokenize(tokenizer, open(p).read()) for p in (a, b, c)}
    config = CompressConfig(calib_text=(f"{a}:3", f"{b}:1"), eval_texts=(a, b, c), eval_tokens=400,
                            max_ppl_increase=0.1, validation_tokens=400, eval_window=100, calib_samples=8,
                            calib_seq_len=50)
    texts = split_texts(config, tokenizer)
    assert texts.weights == {a: 0.75, b: 0.25} and texts.samples_per_text == {a: 6, b: 2}
    assert set(texts.calibration) == {a, b} and set(texts.validation) == {a, b}
    # round-robin: a, b, a, b, a, a, a, a
    origin = [next(p for p in (a, b) if (streams[p].unfold(0, 50, 1) == row).all(1).any()) for row in texts.samples]
    assert origin == [a, b, a, b, a, a, a, a]
    assert {p: t.numel() for p, t in texts.validation.items()} == {a: 300, b: 100}
    for p in (a, b):
        half = streams[p].numel() // 2
        cal = _span(streams[p], texts.calibration[p])
        ev, val = _span(streams[p], texts.evals[p]), _span(streams[p], texts.validation[p])
        assert cal == range(0, half) and ev.start == half and val.stop == streams[p].numel()
        assert not set(ev) & set(val) and not set(cal) & (set(ev) | set(val))
        for row, o in zip(texts.samples, origin):
            if o == p:
                assert _span(streams[p], row).stop <= half
    assert _span(streams[c], texts.evals[c]) == range(0, 400)


@pytest.mark.parametrize("spec, message", [
    (("wiki:0",), "the weight must be a positive number"),
    (("wiki:-1",), "the weight must be a positive number"),
    (("wiki", "wiki:2"), "names 'wiki' twice"),
    (("mix", "c4"), "--calib-text mix is the built-in mix"),
    (("no/such/file.txt:2",), "--calib-text 'no/such/file.txt': no such file"),
])
def test_bad_mixes_are_refused_in_one_line(spec, message):
    with pytest.raises(EigenError) as err:
        CompressConfig(calib_text=spec).resolved()
    assert message in str(err.value) and "\n" not in str(err.value)


def test_the_default_mix_and_its_shares():
    from eigenkv.exporter.texts import DEFAULT_MIX, parse_mix, share
    assert CompressConfig().calib_text == "mix" and parse_mix("mix") == DEFAULT_MIX
    assert abs(sum(w for _, w in DEFAULT_MIX) - 1) < 1e-12 and "tiny" not in dict(DEFAULT_MIX)
    assert "tiny" in CompressConfig().eval_texts  # one evaluation domain in no calibration set
    assert share(16, [w for _, w in DEFAULT_MIX]) == [5, 5, 2, 2, 2]
    assert share(5, [0.9, 0.05, 0.05]) == [3, 1, 1]  # every text gets one
    with pytest.raises(EigenError, match="cannot give each of 3 texts"):
        share(2, [0.5, 0.25, 0.25])
    assert parse_mix(("x.txt:1", "y.txt:3")) == (("x.txt", 0.25), ("y.txt", 0.75))
    assert parse_mix("C:dir/notes.txt") == (("C:dir/notes.txt", 1.0),)  # a colon without a weight is a path


def test_calibration_shape_defaults():
    from eigenkv.exporter.pipeline import DEFAULT_CALIB_SEQ_LEN, DEFAULT_CALIB_TOKENS, calibration_shape
    assert (DEFAULT_CALIB_SEQ_LEN, DEFAULT_CALIB_TOKENS) == (4096, 32768)
    assert CompressConfig().calib_seq_len is None and CompressConfig().calib_samples is None
    assert calibration_shape(None, None, 8192, 5) == (4096, 8)  # the default model: 8 x 4096 tokens
    assert calibration_shape(None, None, 2048, 5) == (2048, 16)  # a shorter model: as long as it allows
    assert calibration_shape(1024, None, 8192, 5) == (1024, 32)  # the same 32768 tokens
    assert calibration_shape(None, None, 8192, 10) == (4096, 10)  # at least one sequence per text
    assert calibration_shape(16384, 3, 8192, 5) == (16384, 3)  # given values pass through (checked later)
    assert calibration_shape(3000, None, 8192) == (3000, 11)  # rounded up


def test_validation_that_would_overlap_evaluation_is_refused(text_file):
    config = CompressConfig(calib_text=str(text_file), eval_texts=(str(text_file),), eval_tokens=1800,
                            max_ppl_increase=0.1, validation_tokens=300, eval_window=100, calib_samples=4,
                            calib_seq_len=100)
    with pytest.raises(EigenError, match="too short for 300 validation tokens after 1800 evaluation tokens"):
        split_texts(config, byte_tokenizer())


def test_resolved_returns_a_filled_copy_and_leaves_the_caller_untouched():
    config = CompressConfig()
    before = asdict(config)
    resolved = config.resolved()
    assert asdict(config) == before and config.method is None and config.kv_ratio is None
    assert type(config.rope_mode) is str
    assert (resolved.method, resolved.kv_ratio) == ("loss-aware", 0.5) and resolved.rope_mode is RopeMode.PRE
    assert resolved is not config and resolved.resolved() == resolved  # idempotent


@pytest.mark.parametrize("fields, method, kv_ratio, rope_mode", [
    ({}, "loss-aware", 0.5, RopeMode.PRE),
    ({"error_budget": 0.05}, "eigen", None, RopeMode.PRE),
    ({"method": "eigen"}, "eigen", None, RopeMode.PRE),  # the paper's default: its error budget
    ({"rope_mode": "joint"}, "loss-aware-shared", 0.5, RopeMode.JOINT),
    ({"rope_mode": "joint", "error_budget": 0.05}, "eigen", None, RopeMode.JOINT),
    ({"kv_ratio": 0.3, "method": "eigen"}, "eigen", 0.3, RopeMode.PRE),
    ({"key_rank": 4}, "loss-aware", None, RopeMode.PRE),
    ({"no_compress": True}, "loss-aware", None, RopeMode.PRE),
])
def test_resolved_defaults(fields, method, kv_ratio, rope_mode):
    resolved = CompressConfig(**fields).resolved()
    assert (resolved.method, resolved.kv_ratio) == (method, kv_ratio) and resolved.rope_mode is rope_mode


@pytest.mark.parametrize("fields, message", [
    ({"rope_mode": "rotated"}, "--rope-mode must be one of pre, joint, got 'rotated'"),
    ({"rope_mode": RopeMode.NONE}, "--rope-mode must be one of pre, joint, got 'none'"),
    ({"rope_mode": "post"}, "--rope-mode must be one of pre, joint, got 'post'"),
    ({"kv_ratio": 0.5, "key_rank": 4}, "pass one of --kv-ratio, --error-budget"),
    ({"kv_ratio": 1.5}, "--kv-ratio must be in (0, 1]"),
    ({"method": "loss-aware", "error_budget": 0.02}, "--error-budget is the paper's search"),
])
def test_resolved_refuses_bad_options_in_one_line(fields, message):
    with pytest.raises(EigenError) as err:
        CompressConfig(**fields).resolved()
    assert message in str(err.value) and "\n" not in str(err.value)
