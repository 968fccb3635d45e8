"""`export-eigen OUT.onnx`: compress (or reuse projections) -> fold -> ONNX -> validate.

Everything is written into a temporary folder beside OUT.onnx and moved into place only
after validation passed, the graph last: a failed or interrupted export leaves no OUT.onnx.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from eigenkv import __version__
from eigenkv.errors import EigenError
from eigenkv.exporter.decoder import EigenDecoder
from eigenkv.exporter.onnx_graph import (OPSET, GraphDecoder, dynamic_shapes, example_inputs, hierarchical_names,
                                         optimize_graph)
from eigenkv.exporter.pipeline import CompressConfig, compress
from eigenkv.exporter.sources import ModelSource, load_config, resolve_model
from eigenkv.manifest import (PRECISIONS, Files, IONames, KVLayout, Manifest, Source, manifest_path,
                              torch_dtype)
from eigenkv.plugins import spec


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
    if config.dtype not in PRECISIONS:
        raise EigenError(f"--dtype must be one of {', '.join(PRECISIONS)}, got {config.dtype!r}")
    if config.decode_steps < 0:
        raise EigenError(f"--decode-steps must be >= 0, got {config.decode_steps}")
    return out


def _check_max_seq_len(config: ExportConfig, source: ModelSource) -> int:
    hf_config = load_config(source)
    from eigenkv.exporter.families import family_for
    limit = family_for(hf_config).dims(hf_config).max_positions
    n = limit if config.max_seq_len is None else config.max_seq_len
    if not 2 <= n <= limit:
        raise EigenError(f"--max-seq-len {n} is outside 2..{limit} (the model's maximum positions)")
    return n


def preflight(config: CompressConfig, source: ModelSource) -> CompressConfig:
    """Every check of the compress stage that needs no weights, made before any weight loads:
    options (`CompressConfig.resolved`), the model's family and sizes, the --projections file,
    and the texts (present, UTF-8, long enough: tokenized with the model's tokenizer). Run it
    inside `sources.reuse_loaded()` so the tokenizer and the tokens are reused by the run.
    -> the resolved config, its calibration shape filled in for the model
    (`pipeline.with_calibration_shape`); a one-line EigenError otherwise."""
    from eigenkv.exporter.families import family_for
    from eigenkv.exporter.pipeline import _check_dims, with_calibration_shape
    from eigenkv.exporter.sources import load_tokenizer
    from eigenkv.exporter.texts import split_texts
    hf_config = load_config(source)
    dims = family_for(hf_config).dims(hf_config)
    resolved = with_calibration_shape(config.resolved(), dims.max_positions)
    _check_dims(resolved, dims)
    if resolved.projections is not None and not Path(resolved.projections).is_file():
        raise EigenError(f"--projections {resolved.projections}: no such file (write one with `eigenkv compress`)")
    split_texts(resolved, load_tokenizer(source))
    return resolved


def to_onnx(decoder: EigenDecoder, path: Path, data_name: str, max_seq_len: int, dtype: torch.dtype,
            reference_optimizer: bool = False) -> None:
    """Trace `decoder` (already cast to dtype) and save graph + external data + local function.
    The traced graph is optimized by `optimize_graph`; reference_optimizer=True runs
    `torch.onnx.export(optimize=True)` instead (the same graph, slower on large models: tests compare
    the two)."""
    import onnx

    from eigenkv.plugins.onnx_function import attach_function, build_function
    names, n = IONames(), decoder.dims.n_layers  # the manifest records the same default names
    graph = GraphDecoder(decoder).eval()
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)  # torchvision notes
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            graph, example_inputs(decoder, dtype=dtype), dynamo=True, opset_version=OPSET,
            input_names=names.inputs(n), output_names=names.outputs(n),
            dynamic_shapes=dynamic_shapes(n, max_seq_len), optimize=reference_optimizer, verbose=False)
    if not reference_optimizer:
        optimize_graph(program.model)  # what optimize=True runs, minus one O(nodes²) rule
    model = program.model_proto
    hierarchical_names(model)
    attn = decoder.layers[0].attn
    attach_function(model, build_function(rope_mode=attn.rope_mode.op_code, alibi=attn.alibi_slopes is not None,
                                          slot_positions=True, opset=OPSET,
                                          window=any(layer.attn.window > 0 for layer in decoder.layers)))
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data_name, size_threshold=1024)


def layout_of(decoder: EigenDecoder, max_seq_len: int) -> KVLayout:
    """The cache geometry of a (folded) decoder's graph."""
    d = decoder.dims
    return KVLayout(d.n_layers, d.n_kv_heads, d.head_dim, decoder.key_ranks, decoder.value_ranks, max_seq_len,
                    windows=tuple(layer.attn.window for layer in decoder.layers))


def save_key_grams(decoder: EigenDecoder, path: Path) -> bool:
    """layers.{i}.key_gram [G, r_k, r_k] float32 (safetensors) for every folded layer; False (nothing
    written) when the keys are cached full width, whose norms need no Gram."""
    grams = {f"layers.{i}.key_gram": layer.attn.key_gram.detach().float().numpy()
             for i, layer in enumerate(decoder.layers) if layer.attn.key_gram is not None}
    if not grams:
        return False
    from safetensors.numpy import save_file
    save_file(grams, str(path))
    return True


def export(config: ExportConfig) -> Manifest:
    """Run the whole export; returns the manifest written to OUT.eigen.json. EigenError for bad
    options or output locations (checked before the model loads) and failed validation."""
    from eigenkv.artifacts import check_writable
    from eigenkv.exporter.sources import reuse_loaded
    out = check_output(config)
    source = resolve_model(config.compress.model)
    max_seq_len = _check_max_seq_len(config, source)
    created = [p for p in (out.parent, *out.parent.parents) if not p.exists()]
    try:
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise EigenError(f"cannot create output directory {out.parent}: {e.strerror or e}") from None
        check_writable(out.parent)
        with reuse_loaded():
            t0 = time.perf_counter()  # the checks' tokenizer and tokens are the compress stage's: time them with it
            preflight(config.compress, source)
            return _export(config, out, max_seq_len, source, t0)
    except BaseException:
        for p in created:  # innermost first: leave no empty folders behind
            if p.is_dir() and not any(p.iterdir()):
                p.rmdir()
        raise


def _export(config: ExportConfig, out: Path, max_seq_len: int, source: ModelSource, t0: float) -> Manifest:
    import onnx  # noqa: F401 - heavy imports before any file exists, so an interrupt never lands in one
    import onnxruntime  # noqa: F401

    from eigenkv.artifacts import publish, staging_dir
    from eigenkv.exporter.validate import validate
    result = compress(config.compress, source=source)
    dtype = torch_dtype(config.dtype)
    folded = result.folded.with_max_positions(max_seq_len)
    export_model = folded if dtype == torch.float32 else _cast_copy(folded, dtype)
    with staging_dir(out) as tmp:
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
        layout = layout_of(folded, max_seq_len)
        figures = validate(tmp / out.name, folded, layout, config.dtype, config.decode_steps,
                           config.validate_prompt_tokens, progress=config.compress.progress)
        stages.update()
        stages.close()
        _require_parity(figures, dtype)
        gram_name = out.stem + ".key_gram.safetensors"
        has_grams = save_key_grams(folded, tmp / gram_name)
        from eigenkv.artifacts import save_projections  # the folded attention tensors: `eigenkv build --backend torch`
        save_projections(tmp / (out.stem + PROJECTIONS_SUFFIX), folded, {k: result.report[k] for k in (
            "model_type", "source_hash", "rope_mode", "n_layers", "n_kv_heads", "head_dim", "calibration",
            "output_refit")})
        t3 = time.perf_counter()
        seconds = {"compress": round(t1 - t0, 2), "export": round(t2 - t1, 2), "validate": round(t3 - t2, 2)}
        manifest = _manifest(config, result.report, folded, layout, source, out, gram_name if has_grams else None,
                             {**{k: result.report[k] for k in REPORT_SECTIONS}, "validation": figures,
                              "seconds": seconds})
        manifest.save(tmp / "manifest.json")
        moves = [(data_name, data_name), ("manifest.json", manifest_path(out).name)]
        moves += [(gram_name, gram_name)] if has_grams else []
        moves += [(out.stem + PROJECTIONS_SUFFIX,) * 2]
        for staged, final in moves:
            publish(tmp / staged, out.parent / final)
        publish(tmp / out.name, out)  # the graph last: it exists only if everything else does
    return manifest


PROJECTIONS_SUFFIX = ".projections.safetensors"  # OUT.onnx -> OUT.projections.safetensors (Files.projections)
REPORT_SECTIONS = ("ranks", "output_refit", "healing", "calibration", "perplexity")  # copied from the compress report
FP32_LOGIT_TOLERANCE = 1e-3  # max |logit diff| of the fp32 graph
FP16_RELATIVE_TOLERANCE = 0.05  # fp16 graphs: max |logit diff| <= this x max |torch logit|


def _require_parity(figures: dict, dtype: torch.dtype) -> None:
    """The judgement of `validate`'s figures; a one-line EigenError fails the export (nothing is
    written). Every precision: logits must be finite (graph and torch) and all greedy tokens
    equal torch's. fp32 graphs: prefill logits within 1e-3 of the folded torch model or, where
    torch's own float32 round-off is that large (the default model's logits reach ~30), within
    max(1e-3, 3x torch fp32's distance) of the float64 model: export bugs give errors of order 1,
    round-off stays near torch's own. fp16 graphs: within 5% of the largest torch logit (fp16
    round-off over a deep network; a wrong graph is off by the logits' own size)."""
    precision = "fp32" if dtype == torch.float32 else "fp16"
    if figures.get("torch_non_finite"):
        raise EigenError(f"validation failed: the folded torch model itself gives non-finite logits "
                         f"({figures['torch_non_finite']}); the model cannot be exported")
    if figures.get("non_finite"):
        raise EigenError(f"validation failed: the {precision} graph gives non-finite logits ({figures['non_finite']}) "
                         f"where torch float32 is finite: its activations exceed the {precision} range"
                         + ("; export with --dtype fp32" if precision != "fp32" else ""))
    diff, vs64, torch64 = (figures["prefill_max_abs_logit_diff"], figures["prefill_max_abs_logit_diff_vs_float64"],
                           figures["torch_float32_max_abs_logit_diff_vs_float64"])
    if not figures["decode_tokens_equal"]:
        raise EigenError(f"validation failed: the {precision} graph's greedy tokens differ from torch's at step "
                         f"{figures['decode_first_mismatch']} of {figures['decode_steps']} (prefill max |logit diff| "
                         f"{diff:.2e})")
    if precision == "fp32":
        close = diff <= FP32_LOGIT_TOLERANCE or (vs64 is not None and vs64 <= max(FP32_LOGIT_TOLERANCE, 3 * torch64))
        if not close:
            raise EigenError(f"validation failed: prefill max |logit diff| {diff:.2e} vs torch fp32, {vs64} vs "
                             f"float64 (torch fp32 itself: {torch64})")
    else:
        bound = FP16_RELATIVE_TOLERANCE * figures["reference_max_abs_logit"]
        if not diff <= bound:
            raise EigenError(f"validation failed: {precision} prefill max |logit diff| {diff:.2e} exceeds "
                             f"{FP16_RELATIVE_TOLERANCE:.0%} of the largest logit ({bound:.2e})")


class _Cast(nn.Module):
    """`module` with its input cast to `to_input` and its output to `to_output` (None: as is)."""

    def __init__(self, module: nn.Module, to_input: torch.dtype | None = None, to_output: torch.dtype | None = None):
        super().__init__()
        self.module, self.to_input, self.to_output = module, to_input, to_output

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        y = self.module(x if self.to_input is None else x.to(self.to_input), *args, **kwargs)
        return y if self.to_output is None else y.to(self.to_output)


def _cast_copy(decoder: EigenDecoder, dtype: torch.dtype) -> EigenDecoder:
    """A copy of `decoder` for a `dtype` (fp16) graph: projections, MLPs, the attention op's
    inputs and output (RoPE tables included) and the KV cache in `dtype`; the residual stream,
    every norm, the attention softmax (the op computes it in float32) and the LM head with its
    logits in float32, as production engines keep them. So activations that exceed the fp16
    range between layers (massive activations) stay finite, and logits keep float32
    resolution: fp16 rounds a logit of ~30 to 1/64, which turns top-2 margins below that into
    ties (the default model has a 0.004 margin within 32 greedy steps of the validation
    prompt). Norms hand `dtype` to the projections after them. A tied input embedding shares
    the LM head's float32 table."""
    import copy
    new = copy.deepcopy(decoder).to(dtype)
    f32 = torch.float32
    new.lm_head.float()  # in place: a tied embedding keeps sharing it (its gathers are float32 too)

    def norm(module, out=dtype):
        return None if module is None else _Cast(module.float(), to_input=f32, to_output=out)
    if new.project_in is not None:  # OPT-350m style: the residual stream starts after project_in
        new.project_in = _Cast(new.project_in, to_input=dtype, to_output=f32)
    else:
        new.embed = _Cast(new.embed, to_output=f32)
    for layer in new.layers:  # x + attn(norm(x)): a float32 x plus the dtype output stays float32
        layer.attn_norm, layer.mlp_norm = norm(layer.attn_norm), norm(layer.mlp_norm)
        if layer.attn.q_norm is not None:  # QK-norm: computed in float32, handing dtype to RoPE
            layer.attn.q_norm, layer.attn.k_norm = norm(layer.attn.q_norm), norm(layer.attn.k_norm)
        if not isinstance(layer.attn_post_norm, nn.Identity):  # gemma3: norm the dtype output in float32
            layer.attn_post_norm = _Cast(layer.attn_post_norm.float(), to_input=f32, to_output=f32)
            layer.mlp_post_norm = _Cast(layer.mlp_post_norm.float(), to_input=f32, to_output=f32)
    if new.project_out is not None:  # final norm -> project_out (dtype) -> LM head (float32)
        new.final_norm = norm(new.final_norm)
        new.project_out = _Cast(new.project_out, to_input=dtype)
    else:
        new.final_norm = norm(new.final_norm, out=f32)
    new.lm_head = _Cast(new.lm_head, to_input=f32)
    return new  # RoPE tables stay in dtype: the op's float inputs share one type (plugins/spec.py)


def _manifest(config, report, decoder, layout, source, out, gram_name, sections) -> Manifest:
    return Manifest(
        source=Source(str(source.directory), source.gguf_file, report["source_hash"]), family=report["model_type"],
        rope_mode=decoder.layers[0].attn.rope_mode, precision=config.dtype, layout=layout, io=IONames(),
        files=Files(graph=out.name, data=out.name + ".data", key_gram=gram_name,
                    projections=out.stem + PROJECTIONS_SUFFIX),
        op={"domain": spec.DOMAIN, "name": spec.NAME, "version": spec.VERSION}, opset=OPSET,
        eigenkv_version=__version__, report=sections)
