"""The compress stage: model -> calibrate -> factors (--method) -> ranks -> fold -> W_o refit [-> heal] -> perplexity.

`compress(CompressConfig[, ModelSource])` returns the folded decoder with a report;
`run_compress` also writes `projections.safetensors` and `compress.json` into an output
directory. Texts are split by role in `texts.py`, ranks chosen by `rank_strategies.py`.
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from eigenkv import __version__
from eigenkv.errors import EigenError
from eigenkv.manifest import KVLayout
from eigenkv.exporter import ranks as rank_sel
from eigenkv.exporter.calibrate import calibrate
from eigenkv.exporter.decoder import EigenDecoder, decoder_from_hf
from eigenkv.exporter.decompose import identity_factors
from eigenkv.exporter.fold import attention_from_tensors, fold
from eigenkv.exporter.heal import HealSettings, heal
from eigenkv.exporter.methods import get_method, method_factors
from eigenkv.exporter.quality import validation_rise
from eigenkv.exporter.refit import refit_outputs, refittable_layers
from eigenkv.exporter.perplexity import perplexity
from eigenkv.exporter.families import Dims, family_for, registered
from eigenkv.exporter.rank_strategies import chosen_strategies, rank_strategy
from eigenkv.exporter.sources import BUILTIN_TEXTS, ModelSource, load_config, load_model, model_hash, resolve_model
from eigenkv.exporter.texts import Texts, parse_mix, split_texts
from eigenkv.plugins.spec import RopeMode

COMPRESS_ROPE_MODES = (RopeMode.PRE, RopeMode.JOINT)  # what the compress stage folds into
REFIT_TOKENS_PER_INPUT = 2  # the W_o refit needs at least this many tokens per o_proj input, else it is skipped


# Calibration shape when --calib-seq-len / --calib-samples are not given (`calibration_shape`):
# sequences as long as the context a compressed cache is meant to serve, up to 4096 tokens (a
# low-rank cache holds up to about its calibration length; README, long-context results), and
# 32,768 calibration tokens in all (8 x 4096 for the default model; 32 x 1024 before).
DEFAULT_CALIB_SEQ_LEN = 4096  # tokens
DEFAULT_CALIB_TOKENS = 32768  # tokens


def calibration_shape(seq_len: int | None, samples: int | None, max_positions: int,
                      n_texts: int = 1) -> tuple[int, int]:
    """(--calib-seq-len, --calib-samples) with the defaults filled in for one model.

    seq_len: tokens per calibration sequence, or None for min(DEFAULT_CALIB_SEQ_LEN,
    max_positions); samples: sequences, or None for ceil(DEFAULT_CALIB_TOKENS / seq_len) and at
    least one per text of the mix (n_texts). Values given are returned unchanged (they are
    checked elsewhere: `CompressConfig.resolved`, `_check_dims`)."""
    if seq_len is None:
        seq_len = min(DEFAULT_CALIB_SEQ_LEN, max_positions)
    if samples is None:
        samples = max(n_texts, -(-DEFAULT_CALIB_TOKENS // max(seq_len, 1)))
    return seq_len, samples


@dataclass
class CompressConfig:
    """Everything the compress stage needs; the CLI only fills this in."""

    model: str | None = None  # None: the embedded default model
    kv_ratio: float | None = None  # global target (compressed / original KV bytes)
    error_budget: float | None = None  # the paper's per-layer search (default 0.025)
    key_rank: int | None = None  # or the same ranks for every layer
    value_rank: int | None = None
    compress_layers: str | tuple[int, ...] | None = None  # "0,1" / "0-3": only these layers get ranks < head_dim;
    #                   the others keep the original keys and values (identity bases); `resolved()` stores a tuple
    max_ppl_increase: float | None = None  # or the smallest cache within this perplexity rise
    method: str | None = None  # basis method (exporter/methods.py); None: loss-aware, loss-aware-shared
    #                            under rope_mode joint, eigen with error_budget
    allocation: str = "loss"  # --kv-ratio: "loss" (measured KL per byte) or "energy" (the paper's spectra)
    rope_mode: str = "pre"  # a RopeMode name; `resolved()` stores the RopeMode member
    heal_steps: int = 0  # distillation steps on calibration text after the fold
    heal_lr: float = 1e-4
    heal_batch: int = 2  # token windows per healing step
    heal_seq_len: int | None = None  # tokens per healing window; None: min(256, calib_seq_len)
    heal_query: bool = False  # healing also trains every layer's query projection
    output_refit: bool = False  # refit W_o of output-aware layers on the compressed model's own inputs (refit.py)
    refit_samples: int = 32  # calibration windows the refit's least squares reads (the first ones)
    validation_tokens: int = 8192  # --max-ppl-increase judges on this many held-out tokens
    projections: str | None = None  # reuse folded attention from a projections.safetensors
    no_compress: bool = False  # the uncompressed baseline through the same code
    calib_text: str | tuple[str, ...] = "mix"  # `NAME_OR_FILE[:WEIGHT]` item(s), or "mix" (texts.DEFAULT_MIX)
    calib_samples: int | None = None  # sequences; None: `calibration_shape` (8 for the default model)
    calib_seq_len: int | None = None  # tokens each; None: min(4096, the model's maximum positions)
    fisher_draws: int = 1  # sampled next tokens per position in the Fisher pass (Fisher-weighted keys)
    eval_texts: tuple[str, ...] = ("wiki", "c4", "tiny")  # tiny is in no calibration mix by default
    eval_tokens: int = 20480
    eval_window: int = 1024
    progress: bool = True

    def resolved(self) -> CompressConfig:
        """A validated copy with the defaults filled in; the caller's object is left untouched.

        rope_mode becomes a RopeMode member (PRE or JOINT); method defaults to "eigen" with
        error_budget, "loss-aware-shared" under joint, else "loss-aware"; kv_ratio to 0.5 when
        no target is given and the method is not "eigen" (whose default is the paper's error
        budget). Raises EigenError (one line) for bad or conflicting options.
        """
        try:
            rope_mode = RopeMode.parse(self.rope_mode)
        except ValueError:
            rope_mode = None
        if rope_mode not in COMPRESS_ROPE_MODES:
            shown = self.rope_mode if rope_mode is None else rope_mode.value
            raise EigenError(f"--rope-mode must be one of {', '.join(m.value for m in COMPRESS_ROPE_MODES)}, "
                             f"got {shown!r}")
        targets = chosen_strategies(self)
        if len(targets) > 1:
            raise EigenError("pass one of --kv-ratio, --error-budget, --max-ppl-increase or --key-rank/--value-rank")
        if self.no_compress and (self.projections or targets or self.heal_steps or self.heal_query):
            raise EigenError("--no-compress takes no rank option, no --heal-steps/--heal-query and no --projections")
        if self.projections and (targets or self.heal_steps or self.heal_query):
            raise EigenError("--projections holds folded weights at fixed ranks: pass no rank option and no "
                             "--heal-steps/--heal-query with it (recalibrate instead)")
        method = self.method
        if method is None:
            method = ("eigen" if self.error_budget is not None else
                      "loss-aware-shared" if rope_mode is RopeMode.JOINT else "loss-aware")
        get_method(method)
        kv_ratio = self.kv_ratio
        if not targets and method != "eigen" and not self.no_compress and not self.projections:
            kv_ratio = 0.5  # the default target; the paper's error budget belongs to --method eigen
        if self.error_budget is not None and method != "eigen":
            raise EigenError("--error-budget is the paper's search over its own bases: use it with --method eigen")
        if self.allocation not in ("loss", "energy"):
            raise EigenError(f"--allocation must be loss or energy, got {self.allocation!r}")
        if self.heal_steps < 0 or not self.heal_lr > 0:
            raise EigenError("--heal-steps must be >= 0 and --heal-lr > 0")
        if self.output_refit and (self.max_ppl_increase is not None or self.projections or self.no_compress):
            raise EigenError("--output-refit refits a fold made in this run: not with --max-ppl-increase (its search "
                             "validates folds without the refit), --projections or --no-compress")
        if self.heal_query and not self.heal_steps:
            raise EigenError("--heal-query trains the query projections while healing: pass --heal-steps N > 0 with it")
        if self.heal_batch < 1 or (self.heal_seq_len is not None and self.heal_seq_len < 2):
            raise EigenError(f"--heal-batch must be >= 1 and --heal-seq-len >= 2 tokens, got {self.heal_batch} and "
                             f"{self.heal_seq_len}")
        if self.max_ppl_increase is not None and not 0 < self.max_ppl_increase <= 10:
            raise EigenError(f"--max-ppl-increase is a fraction in (0, 10] (0.1 = +10%), got {self.max_ppl_increase}")
        if self.max_ppl_increase is not None and self.validation_tokens < self.eval_window:
            raise EigenError(f"--validation-tokens must be >= --eval-window ({self.eval_window}) for "
                             "--max-ppl-increase")
        for name in ("key_rank", "value_rank"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise EigenError(f"--{name.replace('_', '-')} must be >= 1")
        layers = parse_layers(self.compress_layers)
        if layers is not None:
            if self.no_compress or self.projections:
                raise EigenError("--compress-layers chooses which layers a calibration compresses: not with "
                                 "--no-compress or --projections")
            if self.error_budget is not None or self.max_ppl_increase is not None or method == "eigen" and not targets:
                raise EigenError("--compress-layers works with --kv-ratio (the target over those layers) or "
                                 "--key-rank/--value-rank, not with --error-budget or --max-ppl-increase")
            if self.heal_steps:
                raise EigenError("--compress-layers does not heal yet (healing would train the uncompressed "
                                 "layers' projections too): drop --heal-steps")
        if kv_ratio is not None:
            rank_sel.check_kv_ratio(kv_ratio)
        if self.error_budget is not None and not self.error_budget > 0:
            raise EigenError(f"--error-budget must be > 0 (relative layer-output error), got {self.error_budget}")
        for name in ("calib_samples", "calib_seq_len", "eval_window", "fisher_draws", "refit_samples"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise EigenError(f"--{name.replace('_', '-')} must be >= 1")
        for name, _ in parse_mix(self.calib_text):
            if name not in BUILTIN_TEXTS and not Path(name).is_file():
                raise EigenError(f"--calib-text {name!r}: no such file (pass UTF-8 files or built-in texts: "
                                 f"{', '.join(BUILTIN_TEXTS)})")
        if self.eval_tokens < 0:
            raise EigenError("--eval-tokens must be >= 0 (0 skips perplexity)")
        return replace(self, rope_mode=rope_mode, method=method, kv_ratio=kv_ratio, compress_layers=layers)


def parse_layers(spec: str | tuple[int, ...] | list[int] | None) -> tuple[int, ...] | None:
    """`--compress-layers`: "0,1", "0-3,7" or a sequence of ints -> sorted unique layer indices
    (None -> None). EigenError (one line) for anything else, an empty list or a negative index;
    the upper bound is the model's (`_check_dims`)."""
    if spec is None:
        return None
    if isinstance(spec, str):
        items = [re.fullmatch(r"(\d+)(?:-(\d+))?", item.strip()) for item in spec.split(",")]
        spans = [] if None in items else [(int(m[1]), int(m[2] or m[1])) for m in items]
        ok = all(lo <= hi < 1_000_000 for lo, hi in spans)  # a reversed or absurd range is a typo
        out = {i for lo, hi in spans for i in range(lo, hi + 1)} if ok else set()
    else:
        out = {int(i) for i in spec}
    if not out or min(out) < 0:
        raise EigenError(f"--compress-layers takes layer indices like 0,1 or 0-3, got {spec!r}")
    return tuple(sorted(out))


@dataclass
class CompressResult:
    folded: EigenDecoder
    original: EigenDecoder
    key_ranks: list[int]
    value_ranks: list[int]
    report: dict = field(default_factory=dict)


def with_calibration_shape(config: CompressConfig, max_positions: int) -> CompressConfig:
    """`config` with calib_seq_len and calib_samples filled in for a model of `max_positions`
    positions (`calibration_shape`; the mix's text count bounds the samples from below)."""
    seq_len, samples = calibration_shape(config.calib_seq_len, config.calib_samples, max_positions,
                                         len(parse_mix(config.calib_text)))
    return replace(config, calib_seq_len=seq_len, calib_samples=samples)


def load_for_tables(config: CompressConfig):
    """Model, decoder and token streams of `config` (the dev tables' setup) -> (source, decoder, texts)."""
    source = resolve_model(config.model)
    model, tokenizer = load_model(source, progress=config.progress)
    decoder = decoder_from_hf(model)
    return source, decoder, split_texts(with_calibration_shape(config, decoder.dims.max_positions), tokenizer)


def heal_window(config: CompressConfig) -> int:
    """Tokens per healing window: --heal-seq-len, else min(256, calib_seq_len)."""
    return config.heal_seq_len or min(256, config.calib_seq_len or DEFAULT_CALIB_SEQ_LEN)


def _check_heal_streams(config: CompressConfig, texts: Texts) -> None:
    """Every calibration stream holds at least one healing window (checked before calibration)."""
    if not config.heal_steps:
        return
    short = {name: int(t.numel()) for name, t in texts.calibration.items() if t.numel() < heal_window(config)}
    if short:
        raise EigenError(f"--heal-seq-len {heal_window(config)} is longer than the calibration text "
                         + ", ".join(f"{n} ({k} tokens)" for n, k in short.items())
                         + ": lower --heal-seq-len or give longer texts")


def _check_dims(config: CompressConfig, dims: Dims) -> None:
    """Options that the model's sizes bound, checked before any weight is read."""
    for name in ("key_rank", "value_rank"):
        r = getattr(config, name)
        if r is not None and r > dims.head_dim:
            raise EigenError(f"--{name.replace('_', '-')} {r} exceeds head_dim {dims.head_dim}: "
                             f"ranks must be in 1..{dims.head_dim}")
    if config.compress_layers and config.compress_layers[-1] >= dims.n_layers:
        raise EigenError(f"--compress-layers {config.compress_layers[-1]} is out of range: the model has layers "
                         f"0..{dims.n_layers - 1}")
    limit = dims.max_positions
    names = ("calib_seq_len", "eval_window") if config.eval_tokens else ("calib_seq_len",)
    for name in names + (("heal_seq_len",) if config.heal_steps and config.heal_seq_len else ()):
        if getattr(config, name) > limit:
            raise EigenError(f"--{name.replace('_', '-')} {getattr(config, name)} exceeds the model's "
                             f"maximum positions ({limit})")


def _saved(config: CompressConfig, decoder: EigenDecoder, source_hash: str):
    """The folded decoder from --projections, refused if it was made for another model."""
    from eigenkv.artifacts import load_projections
    layers, meta = load_projections(Path(config.projections))
    d = decoder.dims
    mine = {"source_hash": source_hash, "n_layers": d.n_layers, "n_kv_heads": d.n_kv_heads, "head_dim": d.head_dim}
    wrong = [k for k, v in mine.items() if meta.get(k) != v]
    if registered(meta.get("model_type")) is not decoder.family:  # aliases (mistral -> llama) share a family
        wrong.insert(0, "model_type")
    if wrong:
        raise EigenError(f"--projections {config.projections} was made for another model "
                         f"({', '.join(f'{k}={meta.get(k)!r}' for k in wrong)}); recalibrate without --projections")
    folded = decoder.with_attention([attention_from_tensors(layer.attn, t, meta["key_mode"])
                                     for layer, t in zip(decoder.layers, layers)])
    details = {"method": meta.get("method", "projections file"), "allocation": "projections file",
               "projections": str(config.projections), "rope_mode": meta["rope_mode"],
               "calibration": meta.get("calibration"),  # None: a file written before it was recorded
               "output_refit": meta.get("output_refit")}  # what the file's own compress run refitted
    return folded, details


def choose_ranks(config: CompressConfig, decoder: EigenDecoder, texts: Texts):
    """Calibrate, build the method's factors and let the rank strategy (`rank_strategies`) pick ranks.

    config: a resolved CompressConfig (`CompressConfig.resolved()`); decoder: the uncompressed
    model; texts: from `split_texts`. Returns (factors: one LayerFactors per layer, key_ranks [L],
    value_ranks [L], details: the report's "ranks" entries besides the ranks themselves).
    """
    method = get_method(config.method)
    strategy = rank_strategy(config)
    rope = decoder.family.positions == "rope"
    attention, fisher = method.needs_attention(config.rope_mode, rope), method.needs_fisher(config.rope_mode, rope)
    stats = calibrate(decoder, texts.samples, on_layer=strategy.search_hook(decoder, config),
                      progress=config.progress, attention=attention, fisher=fisher, fisher_draws=config.fisher_draws)
    factors = method_factors(method, decoder, stats, config.rope_mode, config.calib_seq_len)
    key_ranks, value_ranks, details = strategy.choose(decoder, factors, texts, config)
    if config.compress_layers is not None:  # the other layers fold with identity bases: the original attention
        factors = [f if i in config.compress_layers else identity_factors(f) for i, f in enumerate(factors)]
        details["compress_layers"] = list(config.compress_layers)
    if attention or fisher:
        details["key_weighting"] = method.key_weighting  # which objective `loss-aware` meant when this ran
    if fisher:
        details["fisher_draws"] = config.fisher_draws
    return factors, key_ranks, value_ranks, {"method": method.name, "rope_mode": config.rope_mode.value, **details}


def _output_refit(config: CompressConfig, decoder: EigenDecoder, folded: EigenDecoder, factors: list,
                  texts: Texts) -> dict:
    """The sequential W_o refit (`refit.refit_outputs`) of the compressed layers whose values are
    output-aware, on the first `refit_samples` calibration windows -> the report's entry (what
    ran, or why nothing did: also when those windows hold fewer than REFIT_TOKENS_PER_INPUT tokens
    per o_proj input, where least squares would fit the calibration text rather than the model).
    The paper's method keeps its own W_o (value_up folded in); `resolved()` refuses the refit with
    --max-ppl-increase, whose search validated folds without it."""
    if not config.output_refit:
        return {"applied": False, "reason": "off (--output-refit turns it on)"}
    layers = refittable_layers(folded, factors)
    if not layers:
        return {"applied": False, "reason": f"no compressed layer has output-aware values (--method {config.method})"}
    samples = texts.samples[: config.refit_samples]
    width = max(folded.layers[i].attn.o_proj.in_features for i in layers)
    if samples.numel() < REFIT_TOKENS_PER_INPUT * width:
        return {"applied": False, "reason": f"{samples.numel()} calibration tokens are too few for a least-squares "
                                            f"W_o of {width} inputs (needs {REFIT_TOKENS_PER_INPUT * width}: raise "
                                            "--refit-samples or --calib-samples)"}
    report = refit_outputs(folded, decoder, samples, layers=layers, progress=config.progress)
    return {"applied": True, **report.summary()}


def compress(config: CompressConfig, source: ModelSource | None = None) -> CompressResult:
    """Load, calibrate, fold [, refit W_o] [, heal] and measure one model -> CompressResult with the report.

    config: validated here (`resolved()`; the caller's object is not changed); source: the
    model of config.model when the caller already resolved it (`sources.resolve_model`), so it
    is resolved once per run. Raises EigenError (one line) for bad input.
    """
    config = config.resolved()
    torch.manual_seed(0)
    t0 = time.perf_counter()
    source = resolve_model(config.model) if source is None else source
    hf_config = load_config(source)
    family = family_for(hf_config)
    model_dims = family.dims(hf_config)
    config = with_calibration_shape(config, model_dims.max_positions)
    _check_dims(config, model_dims)
    if not (config.no_compress or config.projections):  # a method/mode conflict, before any weight is read
        get_method(config.method).check(config.rope_mode, family.positions == "rope")
    model, tokenizer = load_model(source, progress=config.progress)
    decoder = decoder_from_hf(model)
    texts = split_texts(config, tokenizer)
    _check_heal_streams(config, texts)
    evals = texts.evals
    t_load = time.perf_counter()
    dims = decoder.dims
    source_hash = model_hash(source)
    if config.no_compress:
        details, folded = {"method": "none (uncompressed baseline)"}, decoder
    elif config.projections:
        folded, details = _saved(config, decoder, source_hash)
    else:
        factors, key_ranks, value_ranks, details = choose_ranks(config, decoder, texts)
        folded = fold(decoder, factors, key_ranks, value_ranks, config.rope_mode)
    key_ranks, value_ranks = folded.key_ranks, folded.value_ranks
    t_fold = time.perf_counter()
    refit = (None if config.no_compress else details.pop("output_refit", None) if config.projections
             else _output_refit(config, decoder, folded, factors, texts))
    t_refit = time.perf_counter()
    healed = None
    if config.heal_steps:
        settings = HealSettings(steps=config.heal_steps, lr=config.heal_lr, batch_size=config.heal_batch,
                                seq_len=heal_window(config), query=config.heal_query)
        healed = heal(folded, decoder, texts.calibration, settings, progress=config.progress,
                      weights=texts.weights)
        if texts.validation is not None:
            details["quality_budget"]["after_healing"] = validation_rise(
                decoder, folded, texts.validation, config.eval_window, config.progress)
    t_heal = time.perf_counter()
    layout = KVLayout(dims.n_layers, dims.n_kv_heads, dims.head_dim, key_ranks, value_ranks, dims.max_positions)
    report = {
        "eigenkv_version": __version__,
        "source_model": source.label,
        "source_hash": source_hash,
        "model_type": model.config.model_type,
        "n_layers": dims.n_layers, "n_heads": dims.n_heads, "n_kv_heads": dims.n_kv_heads, "head_dim": dims.head_dim,
        "rope_mode": (RopeMode.NONE.value if decoder.family.positions != "rope" else
                      RopeMode.ROTATED.value if config.no_compress else details["rope_mode"]),
        # what the bases saw: the --projections file's own calibration when the fold came from one
        "calibration": details.get("calibration") if config.projections else (
            None if config.no_compress else {"text": texts.label, "samples": config.calib_samples,
                                             "seq_len": config.calib_seq_len,
                                             "samples_per_text": texts.samples_per_text}),
        "ranks": {"key": key_ranks, "value": value_ranks, **details},
        "kv_ratio": round(rank_sel.kv_ratio(key_ranks, value_ranks, dims.head_dim), 6),
        "kv_bytes_per_token_fp16": {"original": layout.original_bytes_per_token("fp16"),
                                     "compressed": layout.bytes_per_token("fp16")},
        "output_refit": refit,
        "healing": None if healed is None else healed.summary(),
        "seconds": {"load": round(t_load - t0, 2), "calibrate_decompose_fold": round(t_fold - t_load, 2),
                    "output_refit": round(t_refit - t_fold, 2), "heal": round(t_heal - t_refit, 2)},
        "perplexity": {},
    }
    t_eval = time.perf_counter()
    for name, tokens in evals.items():
        before = perplexity(decoder, tokens, config.eval_window, progress=config.progress, desc=f"ppl {name} original")
        after = before if folded is decoder else perplexity(folded, tokens, config.eval_window,
                                                            progress=config.progress, desc=f"ppl {name} folded")
        report["perplexity"][name] = {"original": round(before.value, 4), "folded": round(after.value, 4),
                                      "increase_pct": round(100 * (after.value / before.value - 1), 2),
                                      "tokens": before.tokens, "window": before.window}
    report["seconds"]["evaluate"] = round(time.perf_counter() - t_eval, 2)  # perplexity before/after
    report["config"] = {k: v for k, v in asdict(config).items() if k != "progress"}
    report["config"]["rope_mode"] = config.rope_mode.value
    return CompressResult(folded, decoder, key_ranks, value_ranks, report)


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
    meta = {k: r[k] for k in ("model_type", "source_hash", "rope_mode", "n_layers", "n_kv_heads", "head_dim",
                              "calibration")}
    meta.update(method=r["ranks"]["method"], healing=r["healing"], output_refit=r["output_refit"])
    save_projections(out_dir / "projections.safetensors", result.folded, meta)
    write_json(out_dir / "compress.json", r)
    return r
