"""The compress stage: model -> calibrate -> decompose -> ranks -> fold -> perplexity.

`compress(CompressConfig)` returns the folded decoder with a report; `run_compress` also
writes `projections.safetensors` and `compress.json` into an output directory.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from eigenkv import __version__
from eigenkv.errors import EigenError
from eigenkv.exporter import ranks as rank_sel
from eigenkv.exporter.calibrate import calibrate
from eigenkv.exporter.decoder import EigenDecoder, decoder_from_hf
from eigenkv.exporter.decompose import ROPE_MODES, decompose
from eigenkv.exporter.fold import fold
from eigenkv.exporter.perplexity import perplexity
from eigenkv.exporter.families import Dims, family_for
from eigenkv.exporter.sources import (load_config, load_model, model_hash, read_text, resolve_model, split_for_calibration,
                                      tokenize)


@dataclass
class CompressConfig:
    """Everything the compress stage needs; the CLI only fills this in."""

    model: str | None = None  # None: the embedded default model
    kv_ratio: float | None = None  # global target (compressed / original KV bytes)
    error_budget: float | None = None  # the paper's per-layer search (default 0.025)
    key_rank: int | None = None  # or the same ranks for every layer
    value_rank: int | None = None
    rope_mode: str = "pre"
    projections: str | None = None  # reuse bases + ranks from a projections.safetensors
    no_compress: bool = False  # the uncompressed baseline through the same code
    calib_text: str = "wiki"  # built-in name or file
    calib_samples: int = 16
    calib_seq_len: int = 1024
    eval_texts: tuple[str, ...] = ("wiki", "c4")
    eval_tokens: int = 20480
    eval_window: int = 1024
    progress: bool = True

    def validate(self) -> None:
        if self.rope_mode not in ROPE_MODES:
            raise EigenError(f"--rope-mode must be one of {', '.join(ROPE_MODES)}, got {self.rope_mode!r}")
        uniform = self.key_rank is not None or self.value_rank is not None
        if sum([self.kv_ratio is not None, self.error_budget is not None, uniform]) > 1:
            raise EigenError("pass one of --kv-ratio, --error-budget or --key-rank/--value-rank")
        if self.no_compress and (self.projections or self.kv_ratio or self.error_budget or uniform):
            raise EigenError("--no-compress takes no rank option and no --projections")
        for name in ("key_rank", "value_rank"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise EigenError(f"--{name.replace('_', '-')} must be >= 1")
        if self.kv_ratio is not None:
            rank_sel.check_kv_ratio(self.kv_ratio)
        if self.error_budget is not None and not self.error_budget > 0:
            raise EigenError(f"--error-budget must be > 0 (relative layer-output error), got {self.error_budget}")
        for name in ("calib_samples", "calib_seq_len", "eval_window"):
            if getattr(self, name) < 1:
                raise EigenError(f"--{name.replace('_', '-')} must be >= 1")
        if self.eval_tokens < 0:
            raise EigenError("--eval-tokens must be >= 0 (0 skips perplexity)")


@dataclass
class CompressResult:
    folded: EigenDecoder
    original: EigenDecoder
    bases: list
    key_ranks: list[int]
    value_ranks: list[int]
    report: dict = field(default_factory=dict)


def _texts(config: CompressConfig, tokenizer):
    """Calibration samples [N, S] and held-out eval token streams: a text used for both is
    split in halves (calibration from the first, evaluation from the second)."""
    calib_tokens = tokenize(tokenizer, read_text(config.calib_text))
    evals = {}
    for name in config.eval_texts if config.eval_tokens else ():
        tokens = calib_tokens if name == config.calib_text else tokenize(tokenizer, read_text(name))
        if name == config.calib_text:
            tokens = tokens[tokens.numel() // 2:]
        evals[name] = tokens[: config.eval_tokens]
    usable = calib_tokens[: calib_tokens.numel() // 2] if config.calib_text in evals else calib_tokens
    samples = split_for_calibration(usable, config.calib_samples, config.calib_seq_len, config.calib_text)
    return samples, evals


def _check_dims(config: CompressConfig, dims: Dims) -> None:
    """Options that the model's sizes bound, checked before any weight is read."""
    for name in ("key_rank", "value_rank"):
        r = getattr(config, name)
        if r is not None and r > dims.head_dim:
            raise EigenError(f"--{name.replace('_', '-')} {r} exceeds head_dim {dims.head_dim}: "
                             f"ranks must be in 1..{dims.head_dim}")
    limit = dims.max_positions
    for name in ("calib_seq_len", "eval_window") if config.eval_tokens else ("calib_seq_len",):
        if getattr(config, name) > limit:
            raise EigenError(f"--{name.replace('_', '-')} {getattr(config, name)} exceeds the model's "
                             f"maximum positions ({limit})")


def _saved_ranks(config: CompressConfig, decoder: EigenDecoder, source_hash: str):
    """Bases and ranks from --projections, refused if they were made for another model."""
    from eigenkv.artifacts import load_projections
    bases, meta = load_projections(Path(config.projections))
    d = decoder.dims
    mine = {"model_type": decoder.family.model_type, "source_hash": source_hash, "n_layers": d.n_layers,
            "n_kv_heads": d.n_kv_heads, "head_dim": d.head_dim}
    wrong = [k for k, v in mine.items() if meta.get(k) != v]
    rope_mode = meta["rope_mode"] if meta["rope_mode"] in ROPE_MODES else config.rope_mode  # the bases' own mode
    if wrong:
        raise EigenError(f"--projections {config.projections} was made for another model "
                         f"({', '.join(f'{k}={meta.get(k)!r}' for k in wrong)}); recalibrate without --projections")
    if config.kv_ratio is not None:
        key_ranks, value_ranks = rank_sel.allocate_kv_ratio(bases, config.kv_ratio, d.n_kv_heads)
        return bases, key_ranks, value_ranks, {"method": "kv-ratio", "target": config.kv_ratio,
                                               "projections": str(config.projections), "rope_mode": rope_mode}
    return bases, meta["key_ranks"], meta["value_ranks"], {"method": "projections file", "rope_mode": rope_mode,
                                                           "projections": str(config.projections)}


def choose_ranks(config: CompressConfig, decoder: EigenDecoder, samples: torch.Tensor):
    """Calibrate and pick ranks -> (bases, key_ranks, value_ranks, search details)."""
    dims = decoder.dims
    rope = decoder.family.positions == "rope"
    search = None
    uniform = config.key_rank is not None or config.value_rank is not None
    if config.kv_ratio is None and not uniform:
        budget = 0.025 if config.error_budget is None else config.error_budget
        search = rank_sel.ErrorBudgetSearch(decoder, rank_sel.default_search(budget, rope), config.rope_mode)
    stats = calibrate(decoder, samples, on_layer=search, progress=config.progress)
    bases = decompose(stats, rope, config.rope_mode)
    if uniform:
        key_ranks = [config.key_rank or dims.head_dim] * dims.n_layers
        value_ranks = [config.value_rank or dims.head_dim] * dims.n_layers
        details = {"method": "uniform"}
    elif search is None:
        key_ranks, value_ranks = rank_sel.allocate_kv_ratio(bases, config.kv_ratio, dims.n_kv_heads)
        details = {"method": "kv-ratio", "target": config.kv_ratio}
    else:
        key_ranks, value_ranks = search.key_ranks, search.value_ranks
        details = {"method": "error-budget", "budget": search.settings.budget,
                   "layer_errors": [round(e, 6) for e in search.errors], "thresholds": search.thresholds}
    return bases, key_ranks, value_ranks, details


def compress(config: CompressConfig) -> CompressResult:
    config.validate()
    torch.manual_seed(0)
    t0 = time.perf_counter()
    source = resolve_model(config.model)
    hf_config = load_config(source)
    _check_dims(config, family_for(hf_config).dims(hf_config))
    model, tokenizer = load_model(source, progress=config.progress)
    decoder = decoder_from_hf(model)
    samples, evals = _texts(config, tokenizer)
    t_load = time.perf_counter()
    dims = decoder.dims
    source_hash = model_hash(source)
    if config.no_compress:
        bases, key_ranks, value_ranks = None, [dims.head_dim] * dims.n_layers, [dims.head_dim] * dims.n_layers
        details, folded = {"method": "none (uncompressed baseline)"}, decoder
    elif config.projections:
        bases, key_ranks, value_ranks, details = _saved_ranks(config, decoder, source_hash)
        folded = fold(decoder, bases, key_ranks, value_ranks, details["rope_mode"])
    else:
        bases, key_ranks, value_ranks, details = choose_ranks(config, decoder, samples)
        folded = fold(decoder, bases, key_ranks, value_ranks, config.rope_mode)
    t_fold = time.perf_counter()
    report = {
        "eigenkv_version": __version__,
        "source_model": source.label,
        "source_hash": source_hash,
        "model_type": model.config.model_type,
        "n_layers": dims.n_layers, "n_heads": dims.n_heads, "n_kv_heads": dims.n_kv_heads, "head_dim": dims.head_dim,
        "rope_mode": ("none" if decoder.family.positions != "rope" else
                      "uncompressed" if config.no_compress else details.get("rope_mode", config.rope_mode)),
        "calibration": {"text": config.calib_text, "samples": config.calib_samples, "seq_len": config.calib_seq_len},
        "ranks": {"key": key_ranks, "value": value_ranks, **details},
        "kv_ratio": round(rank_sel.kv_ratio(key_ranks, value_ranks, dims.head_dim), 6),
        "kv_bytes_per_token_fp16": {
            "original": 2 * 2 * dims.n_layers * dims.n_kv_heads * dims.head_dim,
            "compressed": 2 * dims.n_kv_heads * (sum(key_ranks) + sum(value_ranks))},
        "seconds": {"load": round(t_load - t0, 2), "calibrate_decompose_fold": round(t_fold - t_load, 2)},
        "perplexity": {},
    }
    for name, tokens in evals.items():
        before = perplexity(decoder, tokens, config.eval_window, progress=config.progress, desc=f"ppl {name} original")
        after = before if folded is decoder else perplexity(folded, tokens, config.eval_window,
                                                            progress=config.progress, desc=f"ppl {name} folded")
        report["perplexity"][name] = {"original": round(before.value, 4), "folded": round(after.value, 4),
                                      "increase_pct": round(100 * (after.value / before.value - 1), 2),
                                      "tokens": before.tokens, "window": before.window}
    report["config"] = {k: v for k, v in asdict(config).items() if k != "progress"}
    return CompressResult(folded, decoder, bases, key_ranks, value_ranks, report)


def run_compress(config: CompressConfig, out_dir: Path, force: bool = False) -> dict:
    """compress() and write projections.safetensors + compress.json into out_dir."""
    from eigenkv.artifacts import ensure_output_dir, save_projections, write_json
    created = not Path(out_dir).exists()
    out_dir = ensure_output_dir(Path(out_dir), force)
    try:
        result = compress(config)
    except BaseException:
        if created and not any(out_dir.iterdir()):
            out_dir.rmdir()  # leave nothing behind for a run that wrote nothing
        raise
    r = result.report
    meta = {k: r[k] for k in ("model_type", "source_hash", "rope_mode", "n_layers", "n_kv_heads", "head_dim")}
    save_projections(out_dir / "projections.safetensors", result.bases, result.key_ranks, result.value_ranks, meta)
    write_json(out_dir / "compress.json", r)
    return r
