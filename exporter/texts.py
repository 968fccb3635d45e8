"""Token streams of one compress run, and which tokens serve which role.

The calibration text (`--calib-text`, T tokens, half = T // 2) is cut so that no token serves
two roles:

  calibration  tokens [0, half) when the run measures perplexity or validates at all, else
               all of them; the first calib_samples × calib_seq_len tokens are the
               calibration samples, and healing draws its windows from the whole range
  evaluation   tokens [half, half + eval_tokens) when the calibration text is one of
               `eval_texts` (the reported perplexity); any other eval text is read from its start
  validation   the last validation_tokens of [half, T) (`--max-ppl-increase` only), after the
               evaluation tokens, never overlapping them
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from eigenkv.errors import EigenError
from eigenkv.exporter.sources import read_text, split_for_calibration, tokenize

if TYPE_CHECKING:
    from eigenkv.exporter.pipeline import CompressConfig


@dataclass
class Texts:
    """Token streams of one run (token ids, int64)."""

    samples: torch.Tensor  # [N, S] calibration sequences
    calibration: torch.Tensor  # [T_c] the calibration stream (healing draws from it)
    evals: dict  # eval text name -> [T_e] held-out tokens for perplexity
    validation: torch.Tensor | None  # [validation_tokens] (--max-ppl-increase), else None


def split_texts(config: CompressConfig, tokenizer) -> Texts:
    """Read and tokenize the texts of `config` and split them into their roles (module docstring).

    Raises EigenError (one line) for a missing or non-UTF-8 text, a calibration text too short
    for its samples, or too short for validation_tokens after the evaluation tokens.
    """
    calib_tokens = tokenize(tokenizer, read_text(config.calib_text))
    half = calib_tokens.numel() // 2
    evals = {}
    for name in config.eval_texts if config.eval_tokens else ():
        tokens = calib_tokens[half:] if name == config.calib_text else tokenize(tokenizer, read_text(name))
        evals[name] = tokens[: config.eval_tokens]
    validation = None
    if config.max_ppl_increase is not None:
        held_out = calib_tokens[half:]
        used = evals[config.calib_text].numel() if config.calib_text in evals else 0
        if held_out.numel() - used < config.validation_tokens:
            raise EigenError(f"calibration text {config.calib_text} is too short for {config.validation_tokens} "
                             f"validation tokens after {used} evaluation tokens in its second half")
        validation = held_out[held_out.numel() - config.validation_tokens:]
    usable = calib_tokens[:half] if (evals or validation is not None) else calib_tokens
    samples = split_for_calibration(usable, config.calib_samples, config.calib_seq_len, config.calib_text)
    return Texts(samples, usable, evals, validation)
