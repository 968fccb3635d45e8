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
                            max_ppl_increase=0.1, validation_tokens=300, calib_samples=4, calib_seq_len=100)
    texts = split_texts(config, tokenizer)
    half = N_CHARS // 2
    spans = {"calibration": _span(stream, texts.calibration), "samples": _span(stream, texts.samples.flatten()),
             "evaluation": _span(stream, texts.evals[str(text_file)]), "validation": _span(stream, texts.validation)}
    assert spans == {"calibration": range(0, half), "samples": range(0, 400),
                     "evaluation": range(half, half + 500), "validation": range(N_CHARS - 300, N_CHARS)}
    held_out = set(spans["evaluation"]) | set(spans["validation"])
    assert not set(spans["calibration"]) & held_out and not set(spans["evaluation"]) & set(spans["validation"])
    # nothing held out: calibration takes the whole text
    whole = split_texts(CompressConfig(calib_text=str(text_file), eval_tokens=0, calib_samples=4,
                                       calib_seq_len=100), tokenizer)
    assert _span(stream, whole.calibration) == range(0, N_CHARS) and not whole.evals and whole.validation is None


def test_validation_that_would_overlap_evaluation_is_refused(text_file):
    config = CompressConfig(calib_text=str(text_file), eval_texts=(str(text_file),), eval_tokens=1800,
                            max_ppl_increase=0.1, validation_tokens=300, calib_samples=4, calib_seq_len=100)
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
