"""`export-eigen OUT.onnx`: compress (or reuse projections) -> fold -> ONNX -> validate.

Everything is written into a temporary folder beside OUT.onnx and moved into place only
after validation passed, the graph last: a failed or interrupted export leaves no OUT.onnx.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from eigenkv import __version__
from eigenkv.errors import EigenError
from eigenkv.exporter.decoder import EigenDecoder
from eigenkv.exporter.onnx_graph import (OPSET, GraphDecoder, IONames, dynamic_shapes, example_inputs,
                                         hierarchical_names)
from eigenkv.exporter.pipeline import CompressConfig, compress
from eigenkv.exporter.sources import load_config, resolve_model
from eigenkv.plugins import spec

MANIFEST_SCHEMA = 1
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


@dataclass
class ExportConfig:
    output: Path
    compress: CompressConfig = field(default_factory=CompressConfig)
    max_seq_len: int | None = None  # default: the model's maximum positions
    dtype: str = "fp32"
    force: bool = False
    decode_steps: int = 32  # greedy steps compared between ONNX Runtime and torch
    validate_prompt_tokens: int = 24


def check_output(config: ExportConfig) -> Path:
    """OUT.onnx: refuse an existing one without --force, and an unwritable folder."""
    out = Path(config.output)
    if out.suffix != ".onnx":
        raise EigenError(f"output {out} must end in .onnx")
    if out.exists() and not config.force:
        raise EigenError(f"{out} exists; pass --force to overwrite it")
    parent = out.parent
    if parent.exists() and not parent.is_dir():
        raise EigenError(f"output directory {parent} is not a directory")
    if not parent.exists():
        existing = next(p for p in parent.parents if p.exists())
        if not existing.is_dir() or not os.access(existing, os.W_OK):
            raise EigenError(f"cannot create output directory {parent}: {existing} is not a writable directory")
    elif not os.access(parent, os.W_OK):
        raise EigenError(f"output directory {parent} is not writable")
    if config.dtype not in DTYPES:
        raise EigenError(f"--dtype must be one of {', '.join(DTYPES)}, got {config.dtype!r}")
    return out


def _check_max_seq_len(config: ExportConfig) -> int:
    source = resolve_model(config.compress.model)
    hf_config = load_config(source)
    from eigenkv.exporter.families import family_for
    limit = family_for(hf_config).dims(hf_config).max_positions
    n = config.max_seq_len or limit
    if not 2 <= n <= limit:
        raise EigenError(f"--max-seq-len {n} is outside 2..{limit} (the model's maximum positions)")
    return n


def to_onnx(decoder: EigenDecoder, path: Path, data_name: str, max_seq_len: int, dtype: torch.dtype) -> None:
    """Trace `decoder` (already cast to dtype) and save graph + external data + local function."""
    import onnx

    from eigenkv.plugins.onnx_function import attach_function, build_function
    names, n = IONames(), decoder.dims.n_layers
    graph = GraphDecoder(decoder).eval()
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)  # torchvision notes
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            graph, example_inputs(decoder, dtype=dtype), dynamo=True, opset_version=OPSET,
            input_names=names.inputs(n), output_names=names.outputs(n),
            dynamic_shapes=dynamic_shapes(n, max_seq_len), optimize=True, verbose=False)
    model = program.model_proto
    hierarchical_names(model)
    attn = decoder.layers[0].attn
    attach_function(model, build_function(rope_mode=int(attn.rope and attn.key_mode == "pre"),
                                          alibi=attn.alibi_slopes is not None, slot_positions=False,
                                          opset=OPSET))
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data_name, size_threshold=1024)


def kv_bytes_per_token(decoder: EigenDecoder, dtype: torch.dtype) -> int:
    """Bytes one token occupies in all layers' K and V buffers."""
    size = torch.empty(0, dtype=dtype).element_size()
    return size * decoder.dims.n_kv_heads * (sum(decoder.key_ranks) + sum(decoder.value_ranks))


def export(config: ExportConfig) -> dict:
    """Run the whole export; returns the manifest written to eigen.json."""
    out = check_output(config)
    max_seq_len = _check_max_seq_len(config)
    created = [p for p in (out.parent, *out.parent.parents) if not p.exists()]
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        return _export(config, out, max_seq_len)
    except BaseException:
        for p in created:  # innermost first: leave no empty folders behind
            if p.is_dir() and not any(p.iterdir()):
                p.rmdir()
        raise


def _export(config: ExportConfig, out: Path, max_seq_len: int) -> dict:
    import onnx  # noqa: F401 - heavy imports before any file exists, so an interrupt never lands in one
    import onnxruntime  # noqa: F401

    from eigenkv.artifacts import write_json
    from eigenkv.exporter.validate import validate
    t0 = time.perf_counter()
    result = compress(config.compress)
    dtype = DTYPES[config.dtype]
    folded = result.folded.with_max_positions(max_seq_len)
    export_model = folded if dtype == torch.float32 else _cast_copy(folded, dtype)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        stages = tqdm(total=3, desc="export", unit="stage", disable=not config.compress.progress)
        stages.set_postfix_str("trace to ONNX")
        t1 = time.perf_counter()
        data_name = out.name + ".data"
        to_onnx(export_model, tmp / out.name, data_name, max_seq_len, dtype)
        stages.update()
        stages.set_postfix_str("check")
        import onnx
        onnx.checker.check_model(str(tmp / out.name), full_check=True)
        stages.update()
        stages.set_postfix_str("validate against torch")
        t2 = time.perf_counter()
        figures = validate(tmp / out.name, folded, config.decode_steps, config.validate_prompt_tokens,
                           max_seq_len, dtype, progress=config.compress.progress)
        stages.update()
        stages.close()
        _require_parity(figures, dtype)
        t3 = time.perf_counter()
        manifest = _manifest(config, result.report, folded, dtype, max_seq_len, out, figures,
                             {"compress": round(t1 - t0, 2), "export": round(t2 - t1, 2),
                              "validate": round(t3 - t2, 2)})
        write_json(tmp / "eigen.json", manifest)
        os.replace(tmp / data_name, out.parent / data_name)
        os.replace(tmp / "eigen.json", out.parent / "eigen.json")
        os.replace(tmp / out.name, out)  # the graph last: it exists only if everything else does
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest


FP32_LOGIT_TOLERANCE = 1e-3  # max |logit diff| of the fp32 graph


def _require_parity(figures: dict, dtype: torch.dtype) -> None:
    """fp32 graphs must give every greedy token of torch, and prefill logits within 1e-3 of the
    folded torch model, or, where torch's own float32 round-off is that large (the default
    model's logits reach ~30), within max(1e-3, 3x torch fp32's distance) of the float64
    model: export bugs give errors of order 1, round-off stays near torch's own. fp16
    graphs are reported, not judged."""
    if dtype != torch.float32:
        return
    diff, vs64, torch64 = (figures["prefill_max_abs_logit_diff"], figures["prefill_max_abs_logit_diff_vs_float64"],
                           figures["torch_float32_max_abs_logit_diff_vs_float64"])
    close = diff <= FP32_LOGIT_TOLERANCE or (vs64 is not None and vs64 <= max(FP32_LOGIT_TOLERANCE, 3 * torch64))
    if not close or not figures["decode_tokens_equal"]:
        raise EigenError(f"validation failed: prefill max |logit diff| {diff:.2e} vs torch fp32, {vs64} vs float64 "
                         f"(torch fp32 itself: {torch64}); greedy tokens equal: {figures['decode_tokens_equal']}")


def _cast_copy(decoder: EigenDecoder, dtype: torch.dtype) -> EigenDecoder:
    import copy
    return copy.deepcopy(decoder).to(dtype)


def _manifest(config, report, decoder, dtype, max_seq_len, out, figures, seconds) -> dict:
    names = IONames()
    d = decoder.dims
    original = torch.empty(0, dtype=dtype).element_size() * 2 * d.n_layers * d.n_kv_heads * d.head_dim
    return {
        "schema_version": MANIFEST_SCHEMA,
        "eigenkv_version": __version__,
        "source_model": report["source_model"], "source_hash": report["source_hash"],
        "family": report["model_type"], "rope_mode": report["rope_mode"],
        "op": {"domain": spec.DOMAIN, "name": spec.NAME, "version": spec.VERSION}, "opset": OPSET,
        "dtype": config.dtype, "max_seq_len": max_seq_len,
        "files": {"graph": out.name, "data": out.name + ".data"},
        "n_layers": decoder.dims.n_layers, "n_heads": decoder.dims.n_heads,
        "n_kv_heads": decoder.dims.n_kv_heads, "head_dim": decoder.dims.head_dim,
        "key_ranks": decoder.key_ranks, "value_ranks": decoder.value_ranks,
        "kv_layout": "[batch, kv_heads, max_cache_len, rank] per layer; slot = position",
        "io": {"inputs": {"input_ids": names.input_ids, "position_ids": names.position_ids,
                          "cache_lengths": names.cache_lengths, "past_key": names.past_key,
                          "past_value": names.past_value},
               "outputs": {"logits": names.logits, "present_key": names.present_key,
                           "present_value": names.present_value}},
        "kv_bytes_per_token": {"original": original, "compressed": kv_bytes_per_token(decoder, dtype)},
        "ranks": report["ranks"], "healing": report["healing"], "calibration": report["calibration"],
        "perplexity": report["perplexity"], "validation": figures, "seconds": seconds,
    }
