"""Token streams of one compress run, and which tokens serve which role.

The calibration is a **mix** of texts (`--calib-text NAME[:WEIGHT] ...`; default `mix`, the
built-in `DEFAULT_MIX`). Each text of the mix (T_i tokens, half_i = T_i // 2) is cut so that no
token serves two roles:

  calibration  its tokens [0, half_i) when the run measures perplexity or validates at all, else
               all of them; its share of the calibration samples (weights, largest remainder,
               at least one each) are the first n_i × calib_seq_len tokens, and healing draws its
               windows from the whole range with the text's weight
  evaluation   tokens [half_i, half_i + eval_tokens) when the text is also one of `eval_texts`
               (the reported perplexity); an eval text outside the mix is read from its start
  validation   the last tokens of [half_i, T_i) (`--max-ppl-increase` only: its share of
               `validation_tokens`, whole windows, at least one), after the evaluation tokens,
               never overlapping them; the quality bound holds for the worst text of the mix
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from eigenkv.errors import EigenError
from eigenkv.exporter.sources import read_text, split_for_calibration, tokenize

if TYPE_CHECKING:
    from eigenkv.exporter.pipeline import CompressConfig

# The default calibration mix (`--calib-text mix`): encyclopedic and web text most, code,
# technical writing and other languages some. `tiny` (children's stories) stays out of it, so
# that one evaluation domain is in no calibration set.
DEFAULT_MIX = (("wiki", 0.3), ("c4", 0.3), ("code", 0.15), ("technical", 0.15), ("multilingual", 0.1))
MIX_NAME = "mix"


def parse_mix(spec) -> tuple[tuple[str, float], ...]:
    """`--calib-text` items -> ((text, weight), ...) with weights summing to 1.

    spec: one string or a sequence of them, each `NAME_OR_FILE[:WEIGHT]` (weight > 0, default 1)
    or `mix` (DEFAULT_MIX, which may not be combined with other items). Raises EigenError (one
    line) for a weight that is not a positive number or a text named twice."""
    items = [spec] if isinstance(spec, str) else list(spec)
    if not items:
        raise EigenError("--calib-text needs at least one text")
    if MIX_NAME in items:
        if len(items) > 1:
            raise EigenError(f"--calib-text {MIX_NAME} is the built-in mix; list texts with weights instead of "
                             "adding to it")
        return DEFAULT_MIX
    mix = []
    for item in items:
        name, weight = item, 1.0
        head, sep, tail = item.rpartition(":")
        if sep and head:
            try:
                weight = float(tail)
            except ValueError:  # a path with a colon in it and no weight
                head = None
            if head is not None:
                name = head
                if not weight > 0 or weight != weight or weight == float("inf"):
                    raise EigenError(f"--calib-text {item!r}: the weight must be a positive number")
        if name in (n for n, _ in mix):
            raise EigenError(f"--calib-text names {name!r} twice")
        mix.append((name, weight))
    total = sum(w for _, w in mix)
    return tuple((n, w / total) for n, w in mix)


def mix_label(mix) -> str:
    """`wiki:0.3,c4:0.3,...` (how reports and tables name a mix)."""
    return ",".join(f"{n}:{w:.3g}" for n, w in mix)


def share(total: int, weights: list[float], least: int = 1) -> list[int]:
    """`total` whole units split by `weights` (largest remainder, ties to the earlier text), each
    getting at least `least`. EigenError if total < least × len(weights)."""
    if total < least * len(weights):
        raise EigenError(f"{total} calibration samples cannot give each of {len(weights)} texts {least}: "
                         f"raise --calib-samples or list fewer texts")
    counts = [int(total * w) for w in weights]
    order = sorted(range(len(weights)), key=lambda i: -(total * weights[i] - counts[i]))
    for i in order[: total - sum(counts)]:
        counts[i] += 1
    for i in range(len(counts)):  # the minimum comes from the largest share
        while counts[i] < least:
            counts[max(range(len(counts)), key=lambda k: counts[k])] -= 1
            counts[i] += 1
    return counts


def interleave(groups: list[torch.Tensor]) -> torch.Tensor:
    """Rows of several [n_i, S] tensors in round-robin order (so any prefix of the samples, e.g.
    the KL probes' first few, is a mix too) -> [sum n_i, S]."""
    rows, k = [], 0
    while any(k < g.shape[0] for g in groups):
        rows += [g[k] for g in groups if k < g.shape[0]]
        k += 1
    return torch.stack(rows)


@dataclass
class Texts:
    """Token streams of one run (token ids, int64)."""

    samples: torch.Tensor  # [N, S] calibration sequences, texts interleaved
    calibration: dict  # text -> [T_c] its calibration stream (healing draws from it)
    weights: dict  # text -> weight in the mix (sums to 1)
    evals: dict  # eval text name -> [T_e] held-out tokens for perplexity
    validation: dict | None  # text of the mix -> [T_v] validation tokens (--max-ppl-increase), else None
    samples_per_text: dict  # text -> calibration sequences drawn from it

    @property
    def label(self) -> str:
        return mix_label(self.weights.items())


def split_texts(config: CompressConfig, tokenizer) -> Texts:
    """Read and tokenize the texts of `config` and split them into their roles (module docstring).

    Raises EigenError (one line) for a missing or non-UTF-8 text, a bad mix (`parse_mix`), a
    calibration text too short for its samples, or too short for its validation tokens after
    the evaluation tokens.
    """
    mix = parse_mix(config.calib_text)
    names = [n for n, _ in mix]
    streams = {n: tokenize(tokenizer, read_text(n)) for n in names}
    evals = {}
    for name in config.eval_texts if config.eval_tokens else ():
        tokens = streams[name][streams[name].numel() // 2:] if name in streams else tokenize(tokenizer, read_text(name))
        evals[name] = tokens[: config.eval_tokens]
    validation = None
    if config.max_ppl_increase is not None:
        window = config.eval_window
        validation = {}
        for (name, weight), n_windows in zip(mix, share(max(len(mix), config.validation_tokens // window),
                                                      [w for _, w in mix])):
            held_out = streams[name][streams[name].numel() // 2:]
            used = evals[name].numel() if name in evals else 0
            need = n_windows * window
            if held_out.numel() - used < need:
                raise EigenError(f"calibration text {name} is too short for {need} validation tokens after {used} "
                                 f"evaluation tokens in its second half")
            validation[name] = held_out[held_out.numel() - need:]
    hold_out = bool(evals) or validation is not None
    usable = {n: s[: s.numel() // 2] if hold_out else s for n, s in streams.items()}
    counts = share(config.calib_samples, [w for _, w in mix])
    samples = interleave([split_for_calibration(usable[n], c, config.calib_seq_len, n)
                          for n, c in zip(names, counts)])
    return Texts(samples, usable, dict(mix), evals, validation, dict(zip(names, counts)))

