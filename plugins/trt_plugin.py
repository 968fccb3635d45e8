"""`eigen::LowRankAttention` as a TensorRT 11.x Python plugin (`tensorrt.plugin`, "QDP").

`register()` defines the plugin; nothing here imports tensorrt, triton or CUDA at module import
(tests introspect the spec-derived tables below on machines without any of them).

What `register()` defines, all of it derived from `plugins/spec.py`:
  * `@trtp.register("eigen::LowRankAttention")`: the ten spec inputs as `TensorDesc`s in spec
    order, then the spec attributes (`scale: float`, `rope_mode`, `causal`, `window`, `version: int`);
    one output `attn` of shape `spec.output_shape(query, value_cache)` in the query's type.
  * `@trtp.aot_impl`: the fused Triton kernel of `triton_attention.py`, compiled to PTX (ISA 8.4,
    `AOT_PTX_VERSION`) for the building GPU, with the float `scale` and `rope_mode` (and
    `causal`, the ranks, head_dim, group size, dtype, which optional inputs are real) baked in as
    constexprs: one compiled variant per combination (`Variant`, memoised). Launch:
    grid (B * Hkv, cdiv(S, block_s), 1) from shape expressions with `trtp.cdiv`, block
    num_warps * 32 threads, dynamic shared memory from the compile metadata; extra int32 args
    `triton_attention.LAUNCH_INTS` from shape expressions. TensorRT passes
    (inputs..., extra ints..., outputs...) = `triton_attention.LAUNCH_PARAMS` exactly.
  * `@trtp.impl` (JIT, debugging only): the torch reference (`reference.py`) on TensorRT's stream.
  * `@trtp.autotune`: fp32 / fp16 / bf16 for every float I/O together (int32 index inputs),
    linear format, two tactics (1: query block sized for decoding, 2: for prefill); TensorRT
    times both per optimisation profile.

Absent optional inputs. A QDP register function has a fixed list of `TensorDesc` parameters
and no defaults (`_validate._parse_register_inputs`), so the plugin always takes all ten spec
inputs. The exported node leaves absent optional inputs empty or off the end; before parsing,
the TensorRT backend fills them with placeholders (`fill_absent_inputs`): one-element
constants whose *rank* differs from the spec's (`PLACEHOLDER_SHAPES`), so every stage (even the
shape-less `get_output_data_types`) tells a real input from a placeholder by `ndim`. The kernel
still receives the placeholder pointers (TensorRT passes every input) and never reads them:
the variant's constexprs switch those paths off. The model-local function of the op is dropped
from the copy TensorRT parses, so a missing plugin fails loudly instead of falling back to it.

Hidden trailing kernel parameters. Triton 3.9 (checked here: `_lowrank_attn_fwd` compiles to a
`.entry` with its 15 runtime parameters + 2 extra `.u64` ones that the body never loads) appends
a global-scratch and a profile-scratch pointer to every kernel; older releases may append fewer
(the GPU hosts run 3.6: not checked). Triton's own AOT tool (`triton/tools/compile.py`) passes
`&global_scratch, &profile_scratch` after the declared arguments. TensorRT's AOT launcher
(libnvinfer, closed source) passes only what the plugin declares: inputs, `SymIntExprs`,
outputs. With the hidden parameters in the PTX the driver would read two more kernelParams slots
than TensorRT provides (Torch-TensorRT's `kernels/_triton.py` states TensorRT pads missing
arguments with null; the 11.4 Python sources cannot confirm it). We avoid the question:
`compile_variant` refuses kernels whose metadata asks for global or profile scratch, checks that
the hidden parameters are never referenced in the PTX body, and removes them from the `.entry`
declaration (`strip_hidden_params`), so the entry takes exactly LAUNCH_PARAMS (ptxas assembles
the result: tests/test_trt.py).

Open report (NVIDIA/TensorRT#4849, 11.1-11.2): AOT plugins leak CUDA modules when input shapes
change. Keep per-profile shapes stable (allocate caches at a fixed capacity, reuse batch sizes).

Checked against the tensorrt-cu13-bindings 11.4.0.106 sources (`tensorrt_bindings/plugin/`; the
`tensorrt-cu13` 11.4.0.106 package's `tensorrt/plugin/*.py` are
`from tensorrt_bindings.plugin... import *` shims, so `import tensorrt.plugin` runs this code):
  * `_lib.py`: `register(plugin_id, lazy_register=False)` (non-lazy registers the creator at
    once; `PluginDef`; a second register of the same id is a ValueError, and the definition is
    reachable as `tensorrt.plugin.op.<namespace>.<name>`, which `register()` checks), `impl`,
    `aot_impl` (returns kernel name, PTX as str or bytes, `KernelLaunchParams`, `SymIntExprs`;
    "attributes are not serialized" with AOT), `autotune`;
    `_TemplatePluginCreator.create_plugin`: attribute values typed by the register annotations,
    any field not a register parameter is an AssertionError, and the node `aot` attribute /
    network flags arrive as `QuickPluginCreationRequest` (STRICT_AOT for `aot=1`).
  * `_validate.py`: `DISALLOWED_ATTR_NAMES` = outputs, stream, tactic (`RESERVED_ATTRIBUTE_NAMES`);
    reserved namespaces "", trt, tensorrt, std and no dots; no default values; the exact
    parameter schemas of impl (..., outputs, stream[, tactic]), aot_impl (..., outputs, tactic)
    and autotune (..., outputs), attributes a subset in register order.
  * `_plugin_class.py`: `get_output_data_types` calls the register function with fake shape
    expressions (rank only); `_TemplateAOTPlugin.get_launch_params` passes *all* attributes
    positionally in creation order (so the aot_impl declares all of them, in register order),
    sets each desc's concrete `shape`, and requires every extra arg to be a `SymInt32`;
    kernels are keyed by (I/O types, formats, tactic); the JIT `enqueue` passes `stream=` by
    keyword.
  * `_tensor.py`: `ShapeExpr` (a `SymInt32`) arithmetic, `is_fake`, `is_constant`,
    `constant_value()`; `SymIntExprs(n)`; `KernelLaunchParams` fields grid_x/y/z, block_x/y/z,
    shared_mem (each converted with `SymInt32(...)`); `Tensor.__cuda_array_interface__`
    (refuses bf16, hence `_as_torch`).
  * `_top_level.py`: `cdiv(first, second)` = `DimensionOperation.CEIL_DIV`, one side may be an
    int; `from_shape_expr(tuple, dtype)`. `_autotune.py`: `AutoTuneCombination(io_types,
    layouts, tactics)`, "|" for types that move together, type names "FP32", "FP16", "BF16",
    "INT32". `_export.py`: AOT is available iff `trt.QuickPluginCreationRequest` exists.
  * ONNX parser (onnx/onnx-tensorrt `importerUtils.cpp` `createPlugin`, `onnxOpImporters.cpp`
    `loadFields` / `addPluginWithCreator`): the plugin is found by (op_type, `plugin_version`
    default "1", `plugin_namespace`); only attributes the creator lists are passed (INT as
    int32, FLOAT as float32), so `plugin_namespace` and `aot` never reach the plugin; node
    `aot` overrides the network's PREFER_AOT/JIT flags; an empty input becomes a null input.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import re
from dataclasses import dataclass
from pathlib import Path

from eigenkv.plugins import spec

PLUGIN_ID = f"{spec.DOMAIN}::{spec.NAME}"
PLUGIN_VERSION = "1"  # QDP creators are always version "1" (`_TemplatePluginCreator`); spec.VERSION is the op's
INPUT_NAMES = tuple(t.name for t in spec.INPUTS)
OUTPUT_NAMES = tuple(t.name for t in spec.OUTPUTS)
_PY_TYPES = {"float": float, "int": int}
ATTRIBUTE_TYPES = {a.name: _PY_TYPES[a.type] for a in spec.ATTRIBUTES}  # register order = spec order
IMPL_ATTRIBUTES = ("scale", "rope_mode", "causal", "window")  # what the JIT reference needs (serialised with JIT)
RESERVED_ATTRIBUTE_NAMES = frozenset({"outputs", "stream", "tactic"})  # tensorrt/plugin/_validate.py
RESERVED_NAMESPACES = frozenset({"", "trt", "tensorrt", "std"})

SPEC_RANKS = {t.name: len(t.shape.split(",")) for t in spec.INPUTS}
OPTIONAL_INPUTS = tuple(t.name for t in spec.INPUTS if t.optional)
# An absent optional input is a one-element constant of another rank than the spec's.
PLACEHOLDER_SHAPES = {name: ((1, 1) if SPEC_RANKS[name] == 1 else (1,)) for name in OPTIONAL_INPUTS}
PLACEHOLDER_PREFIX = "eigen_trt_absent."

TACTICS = {1: 1, 2: 64}  # tactic -> the query-token count the kernel's block is sized for (decode, prefill)
NUM_WARPS, NUM_STAGES, BLOCK_N = 4, 2, 64
_DTYPE_NAMES = {"float32": "FP32", "float16": "FP16", "bfloat16": "BF16"}  # torch dtype name -> autotune name


def is_present(name: str, ndim: int) -> bool:
    """Whether input `name` of rank `ndim` is a real tensor (not a placeholder for an absent one)."""
    return ndim == SPEC_RANKS[name]


def placeholder_name(name: str) -> str:
    """The initializer name that stands for absent input `name` in a prepared graph."""
    return PLACEHOLDER_PREFIX + name


# --------------------------------------------------------------------------- graph preparation

def fill_absent_inputs(model, float_type: int) -> int:
    """Give every `eigen::LowRankAttention` node of an onnx ModelProto all ten spec inputs, in place.

    Empty and missing optional inputs become placeholder initializers (`PLACEHOLDER_SHAPES`,
    zeros; `float_type` an onnx TensorProto element type for float inputs, int32 otherwise), and
    the op's model-local function is removed. Returns the number of nodes. ValueError if a
    required input is absent.
    """
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    added: set[str] = set()
    count = 0
    for node in _op_nodes(model.graph):
        count += 1
        inputs = list(node.input) + [""] * (len(spec.INPUTS) - len(node.input))
        for i, tensor in enumerate(spec.INPUTS):
            if inputs[i]:
                continue
            if not tensor.optional:
                raise ValueError(f"node {node.name!r}: required input {tensor.name!r} is empty")
            inputs[i] = placeholder_name(tensor.name)
            if inputs[i] not in added:
                elem = TensorProto.INT32 if tensor.dtype == "int32" else float_type
                value = np.zeros(PLACEHOLDER_SHAPES[tensor.name], helper.tensor_dtype_to_np_dtype(elem))
                model.graph.initializer.append(numpy_helper.from_array(value, inputs[i]))
                added.add(inputs[i])
        del node.input[:]
        node.input.extend(inputs)
    kept = [f for f in model.functions if not (f.name == spec.NAME and f.domain == spec.DOMAIN)]
    del model.functions[:]
    model.functions.extend(kept)
    return count


def _op_nodes(graph):
    """The op's nodes of a graph (top level: the exporter writes no subgraphs)."""
    return [n for n in graph.node if n.op_type == spec.NAME and n.domain == spec.DOMAIN]


# --------------------------------------------------------------------------- AOT kernel variants

@dataclass(frozen=True)
class Variant:
    """Everything one compiled kernel is specialised on (the memo key of `compile_variant`)."""

    scale: float
    rope_mode: int
    causal: bool
    dtype: str  # torch dtype name of every float input and the output: float32 | float16 | bfloat16
    has_slot_positions: bool
    has_alibi: bool
    r_k: int
    r_v: int
    head_dim: int  # pre mode: rebuilt key width; 0 otherwise
    groups: int  # Hq / Hkv
    key_up_per_head: bool
    seq_hint: int  # query tokens the block is sized for (TACTICS)
    capability: int  # 80, 90, ...
    window: int = 0  # sliding window (0: none)

    def kernel_shape(self):
        """The triton_attention.KernelShape of this variant."""
        from eigenkv.plugins import triton_attention as ta
        return ta.default_shape(scale=self.scale, rope_mode=self.rope_mode, groups=self.groups, r_k=self.r_k,
                                r_v=self.r_v, head_dim=self.head_dim, causal=self.causal,
                                has_slot_positions=self.has_slot_positions, has_alibi=self.has_alibi,
                                key_up_per_head=self.key_up_per_head, seq_len_hint=self.seq_hint, block_n=BLOCK_N,
                                window=self.window)


def kernel_signature(variant: Variant) -> tuple[dict, dict]:
    """(signature, constexprs) for `_lowrank_attn_fwd`: every spec input is a runtime pointer.

    `triton_attention.aot_signature` drops absent optional inputs from the signature; TensorRT
    passes all ten plugin inputs, so absent ones stay pointers here (placeholders, never read:
    the constexprs turn their paths off). The split-decoding scratch stays constexpr None.
    """
    import torch

    from eigenkv.plugins import triton_attention as ta
    dtype = getattr(torch, variant.dtype)
    signature, constexprs = ta.aot_signature(variant.kernel_shape(), dtype)
    float_ptr = "*" + ta._TRITON_DTYPES[dtype]
    for tensor in spec.INPUTS:
        if signature[tensor.name] == "constexpr":
            signature[tensor.name] = "*i32" if tensor.dtype == "int32" else float_ptr
            del constexprs[tensor.name]
    return signature, constexprs


def strip_hidden_params(ptx: str, name: str, keep: int) -> str:
    """`ptx` with the `.entry name(...)` parameters after the first `keep` removed.

    Those are Triton's hidden scratch pointers; RuntimeError if any is referenced in the body, if
    there are more than two, or if they are not pointers (then the PTX cannot be launched with
    `keep` arguments).
    """
    match = re.search(rf"\.entry\s+{re.escape(name)}\s*\((.*?)\)", ptx, re.S)
    if match is None:
        raise RuntimeError(f"no .entry {name} in the PTX")
    params = [p.strip() for p in match.group(1).split(",") if p.strip()]
    if len(params) < keep:
        raise RuntimeError(f".entry {name} takes {len(params)} parameters, fewer than the {keep} launched")
    hidden = params[keep:]
    if len(hidden) > 2:
        raise RuntimeError(f".entry {name} has {len(hidden)} parameters beyond the {keep} launched (Triton adds 2)")
    for decl in hidden:
        param = decl.split()[-1]
        if ".u64" not in decl or len(re.findall(rf"\b{re.escape(param)}\b", ptx)) != 1:
            raise RuntimeError(f"hidden kernel parameter {param} is used by the kernel; TensorRT cannot pass it")
    if not hidden:
        return ptx
    body = ",\n\t".join(params[:keep])
    return ptx[:match.start(1)] + "\n\t" + body + "\n" + ptx[match.end(1):]


@functools.lru_cache(maxsize=None)
def compile_variant(variant: Variant):
    """Compile `_lowrank_attn_fwd` for `variant` to PTX that TensorRT can launch (no GPU needed)
    -> `triton_attention.AotKernel`.

    Params are LAUNCH_PARAMS; Triton's hidden scratch parameters are stripped. RuntimeError if
    the kernel needs global or profile scratch memory, or if TRITON_INTERPRET is set (Triton
    would then be in interpreter mode); ImportError without triton.
    """
    from eigenkv.plugins import triton_attention as ta
    if ta._interpreting():
        raise RuntimeError("TRITON_INTERPRET is set: unset it to compile the TensorRT plugin's kernel")
    import triton
    from triton.backends.compiler import GPUTarget

    signature, constexprs = kernel_signature(variant)
    source = triton.compiler.ASTSource(fn=ta._kernels(False)._lowrank_attn_fwd, signature=signature,
                                       constexprs=constexprs)
    compiled = triton.compile(source, target=GPUTarget("cuda", variant.capability, 32),
                              options=dict(num_warps=NUM_WARPS, num_stages=NUM_STAGES,
                                           ptx_version=ta.AOT_PTX_VERSION, enable_fp_fusion=True))
    meta = compiled.metadata
    for field in ("global_scratch_size", "profile_scratch_size"):
        if getattr(meta, field, 0):
            raise RuntimeError(f"the kernel needs Triton {field.split('_size')[0]} memory; TensorRT AOT cannot give it")
    params = tuple(n for n, ty in signature.items() if ty != "constexpr")
    ptx = strip_hidden_params(compiled.asm["ptx"], meta.name, len(params))
    shape = variant.kernel_shape()
    return ta.AotKernel(name=meta.name, ptx=ptx, params=params, num_warps=NUM_WARPS, shared=meta.shared,
                        block_s=shape.block_s, block_n=shape.block_n)


# --------------------------------------------------------------------------- signatures

def _param(name: str, annotation=inspect.Parameter.empty) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=annotation)


def register_signature(tensor_type, output_type=inspect.Signature.empty) -> inspect.Signature:
    """The register function's signature: spec inputs (as `tensor_type`), then spec attributes."""
    params = [_param(n, tensor_type) for n in INPUT_NAMES]
    params += [_param(n, t) for n, t in ATTRIBUTE_TYPES.items()]
    return inspect.Signature(params, return_annotation=output_type)


def _signature(tensor_type, attributes, tail, return_annotation=inspect.Signature.empty) -> inspect.Signature:
    """inputs, the named attributes (register order), then `tail` (outputs, stream, tactic)."""
    params = [_param(n, tensor_type) for n in INPUT_NAMES]
    params += [_param(n, ATTRIBUTE_TYPES[n]) for n in ATTRIBUTE_TYPES if n in attributes]
    params += [_param(n) for n in tail]
    return inspect.Signature(params, return_annotation=return_annotation)


def _with_signature(fn, signature: inspect.Signature):
    """A function with `signature` (what tensorrt.plugin validates) calling fn(bound arguments dict)."""
    def wrapper(*args, **kwargs):
        return fn(signature.bind(*args, **kwargs).arguments)
    wrapper.__signature__ = signature
    wrapper.__name__ = wrapper.__qualname__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper


# --------------------------------------------------------------------------- provenance

def plugin_fingerprint() -> dict:
    """{version, sha256} of the plugin: the op version and a hash of this file and the Triton kernel's."""
    from eigenkv.plugins import triton_attention
    digest = hashlib.sha256()
    for path in (Path(__file__), Path(triton_attention.__file__)):
        digest.update(path.read_bytes())
    return {"version": spec.VERSION, "sha256": digest.hexdigest()}


# --------------------------------------------------------------------------- registration

_REGISTERED = False


def register() -> None:
    """Register `eigen::LowRankAttention` with TensorRT's plugin registry (idempotent).

    Imports tensorrt (and tensorrt.plugin) here, never at module import; ImportError or OSError
    when TensorRT cannot be imported. Call it before parsing a graph that holds the op.
    """
    global _REGISTERED
    if _REGISTERED:
        return
    import tensorrt as trt
    import tensorrt.plugin as trtp

    namespace = getattr(trtp.op, spec.DOMAIN, None)  # tensorrt.plugin.op.<namespace>.<name> once registered
    if namespace is None or not hasattr(namespace, spec.NAME):
        _define(trt, trtp)
    _REGISTERED = True


def _define(trt, trtp) -> None:
    """The register, autotune, aot_impl and impl functions, built from the spec tables."""
    from typing import Tuple, Union

    desc = trtp.TensorDesc
    describe = _with_signature(_describe_fn(trt, trtp), register_signature(desc, desc))
    trtp.register(PLUGIN_ID)(describe)
    trtp.autotune(PLUGIN_ID)(_with_signature(_autotune_fn(trtp), _signature(desc, (), ("outputs",))))
    aot_return = Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams, trtp.SymIntExprs]
    aot_sig = _signature(desc, tuple(ATTRIBUTE_TYPES), ("outputs", "tactic"), aot_return)
    trtp.aot_impl(PLUGIN_ID)(_with_signature(_aot_fn(trt, trtp), aot_sig))
    impl_sig = _signature(trtp.Tensor, IMPL_ATTRIBUTES, ("outputs", "stream"))
    trtp.impl(PLUGIN_ID)(_with_signature(_impl_fn(trt), impl_sig))


def _describe_fn(trt, trtp):
    def describe(args: dict):
        """attn [B, Hq, S, r_v] in the query's type; ValueError for a node of another op version."""
        if args["version"] not in spec.READ_VERSIONS:
            raise ValueError(f"{PLUGIN_ID} node was written for op version {args['version']}, "
                             f"this plugin reads versions {spec.READ_VERSIONS}: re-export the graph")
        shape = spec.output_shape(args["query"].shape_expr, args["value_cache"].shape_expr)
        return trtp.from_shape_expr(tuple(shape), dtype=args["query"].dtype)
    return describe


def autotune_types() -> str:
    """The autotune type string: float I/O move together through fp32/fp16/bf16, indices int32."""
    floats = "|".join(_DTYPE_NAMES.values())
    io = [("INT32" if t.dtype == "int32" else floats) for t in spec.INPUTS + spec.OUTPUTS]
    return ", ".join(io)


def _autotune_fn(trtp):
    def autotune(args: dict):
        """fp32/fp16/bf16 linear I/O, both query-block tactics."""
        return [trtp.AutoTuneCombination(autotune_types(), "LINEAR", list(TACTICS))]
    return autotune


def _aot_fn(trt, trtp):
    def aot_impl(args: dict):
        """(kernel name, PTX, launch params, extra int32 args) for this node's types and shapes."""
        variant = _variant(trt, args)
        kernel = compile_variant(variant)
        q, kc = args["query"].shape_expr, args["key_cache"].shape_expr
        launch = trtp.KernelLaunchParams()
        launch.grid_x = q[0] * kc[1]
        launch.grid_y = trtp.cdiv(q[2], kernel.block_s)
        launch.block_x = kernel.num_warps * 32
        launch.shared_mem = kernel.shared
        sizes = dict(n_kv_heads=kc[1], seq_len=q[2], n_slots=kc[2],
                     n_positions=args["rope_cos"].shape_expr[0] if variant.rope_mode == spec.ROPE_PRE else 1)
        from eigenkv.plugins.triton_attention import LAUNCH_INTS
        extra = trtp.SymIntExprs(len(LAUNCH_INTS))
        for i, name in enumerate(LAUNCH_INTS):
            extra[i] = trtp.SymInt32(sizes[name])
        return kernel.name, kernel.ptx, launch, extra
    return aot_impl


def _torch_dtype_name(trt, dtype) -> str:
    """torch dtype name of a TensorRT float type; ValueError for others."""
    names = {trt.float32: "float32", trt.float16: "float16", trt.bfloat16: "bfloat16"}
    if dtype not in names:
        raise ValueError(f"{PLUGIN_ID}: float inputs must be fp32, fp16 or bf16, got {dtype}")
    return names[dtype]


def _static_dim(desc, axis: int, what: str) -> int:
    """A dimension that must be known at build time (heads, ranks, head_dim)."""
    if desc.has_shape and int(desc.shape[axis]) >= 0:
        return int(desc.shape[axis])
    expr = desc.shape_expr[axis]
    if not expr.is_fake and expr.is_constant:
        return int(expr.constant_value())
    raise ValueError(f"{PLUGIN_ID}: {what} must be static, it is dynamic in this network")


def _variant(trt, args: dict) -> Variant:
    """The kernel variant of one plugin instance from its descs, attributes and tactic."""
    import torch
    if not isinstance(args["scale"], float) or not isinstance(args["rope_mode"], int):
        raise TypeError(f"{PLUGIN_ID}: attributes arrived out of order ({args['scale']!r}, {args['rope_mode']!r})")
    for name in ("cache_lengths", "query_positions", "slot_positions"):
        if is_present(name, args[name].ndim) and args[name].dtype != trt.int32:
            raise ValueError(f"{PLUGIN_ID}: {name} must be int32, got {args[name].dtype}")
    query, key_cache = args["query"], args["key_cache"]
    n_q, n_kv = _static_dim(query, 1, "query heads"), _static_dim(key_cache, 1, "KV heads")
    pre = args["rope_mode"] == spec.ROPE_PRE
    key_up = args["key_up"]
    major, minor = torch.cuda.get_device_capability()
    return Variant(scale=args["scale"], rope_mode=args["rope_mode"], causal=bool(args["causal"]),
                   dtype=_torch_dtype_name(trt, query.dtype),
                   has_slot_positions=is_present("slot_positions", args["slot_positions"].ndim),
                   has_alibi=is_present("alibi_slopes", args["alibi_slopes"].ndim),
                   r_k=_static_dim(key_cache, 3, "r_k"), r_v=_static_dim(args["value_cache"], 3, "r_v"),
                   head_dim=_static_dim(query, 3, "head_dim") if pre else 0, groups=n_q // n_kv,
                   key_up_per_head=pre and _static_dim(key_up, 0, "key_up groups") > 1,
                   seq_hint=TACTICS.get(args["tactic"], 1), capability=major * 10 + minor,
                   window=int(args.get("window", 0)))


def _impl_fn(trt):
    def impl(args: dict):
        """JIT (debugging): the torch reference on TensorRT's stream, written into the output."""
        import torch

        from eigenkv.plugins.reference import low_rank_attention
        tensors = {n: _as_torch(trt, args[n]) for n in INPUT_NAMES}
        optional = {n: (tensors[n] if is_present(n, tensors[n].dim()) else None) for n in OPTIONAL_INPUTS}
        with torch.cuda.stream(torch.cuda.ExternalStream(args["stream"])):
            out = low_rank_attention(tensors["query"], tensors["key_cache"], tensors["value_cache"],
                                     tensors["cache_lengths"], tensors["query_positions"], scale=args["scale"],
                                     rope_mode=args["rope_mode"], causal=bool(args["causal"]),
                                     window=int(args.get("window", 0)), **optional)
            _as_torch(trt, args["outputs"][0]).copy_(out)
    return impl


def _as_torch(trt, tensor):
    """A torch CUDA view of a `trtp.Tensor` (bf16 included, which its own interface refuses)."""
    import types

    import torch
    kinds = {trt.float32: ("<f4", None), trt.float16: ("<f2", None), trt.bfloat16: ("<i2", torch.bfloat16),
             trt.int32: ("<i4", None), trt.int64: ("<i8", None)}
    typestr, view = kinds[tensor.dtype]
    itemsize = int(typestr[-1])
    face = {"shape": tuple(int(d) for d in tensor.shape), "typestr": typestr, "version": 3,
            "strides": tuple(int(s) * itemsize for s in tensor.strides), "data": (int(tensor.data_ptr), False)}
    out = torch.as_tensor(types.SimpleNamespace(__cuda_array_interface__=face), device="cuda")
    return out.view(view) if view is not None else out


__all__ = ["PLUGIN_ID", "INPUT_NAMES", "OUTPUT_NAMES", "ATTRIBUTE_TYPES", "PLACEHOLDER_SHAPES", "TACTICS",
           "Variant", "register", "fill_absent_inputs", "compile_variant", "kernel_signature",
           "strip_hidden_params", "register_signature", "plugin_fingerprint", "autotune_types", "is_present"]
