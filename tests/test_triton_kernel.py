"""The Triton kernel of `eigen::LowRankAttention` on the CPU: interpreted parity and AOT compile.

Parity: `low_rank_attention_triton` under `TRITON_INTERPRET=1` against the float64
reference on random inputs seeded per case (moved slots: every (batch, KV head) holds its tokens in a
random slot order at positions with gaps, slots past `cache_lengths` hold stale positions).
Triton fixes interpreter or compiler mode when it is first imported, so this module sets
TRITON_INTERPRET before anything imports triton (module import happens at collection,
before any test runs) and does the AOT compile in a subprocess with the variable unset.
The variable then stays set for the session: nothing else runs Triton kernels, and
torch.onnx's dynamo export, which imports triton when it is installed, works either way.

Tolerances, on attention outputs of magnitude ~1 (max |out - ref| <= atol + rtol |ref|):
fp32 2e-5 (float32 accumulation, IEEE dots); fp16 2e-3 and bf16 2e-2 (the kernel rounds
rebuilt keys and softmax probabilities to the input type before its tensor-core dots, as
FlashAttention does; the reference stays in float64).
"""

from __future__ import annotations

import inspect
import json
import os
import re
import subprocess
import sys
import zlib

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported by anyone (see the docstring)

from eigenkv.plugins import spec  # noqa: E402
from eigenkv.plugins import triton_attention as ta  # noqa: E402 - never imports triton itself
from eigenkv.plugins.reference import low_rank_attention  # noqa: E402

TRITON_REASON = "triton is not installed (pip install 'eigenkv[triton]')"
TOLERANCE = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
MAX_PTX_ISA = (9, 0)  # what the GPU hosts' driver 580 (CUDA 13.0) loads

# (B, Hkv, groups, Smax, r_k, r_v, head_dim): odd cache sizes, ranks off multiples of 16
SHAPES = {
    "g1-d64": (2, 2, 1, 37, 13, 51, 64),
    "g3-d128": (1, 2, 3, 45, 51, 13, 128),
    "g4-d64": (2, 1, 4, 29, 16, 24, 64),
    "g8-d128": (1, 1, 8, 33, 13, 51, 128),
}
MODES = {"pre": 1, "rank": 0}
TOKENS = {"decode": 1, "prefill": 5}


@pytest.fixture(scope="module")
def interpreter():
    """triton, imported in interpreter mode; skipped with the reason when that is impossible."""
    triton = pytest.importorskip("triton", reason=TRITON_REASON)
    from triton.runtime.interpreter import InterpretedFunction

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip(f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')!r} in the environment; these tests need 1")
    if not isinstance(triton.language.standard.cdiv, InterpretedFunction):
        pytest.skip("triton was imported in compiled mode before this module set TRITON_INTERPRET=1")
    return triton


def _rope_tables(n_positions: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Llama-style cos/sin tables [P, head_dim] (float32)."""
    inv_freq = 1.0 / 10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(n_positions, dtype=torch.float64), inv_freq)
    emb = torch.cat((angles, angles), dim=-1)
    return emb.cos().float(), emb.sin().float()


def _moved_slots(gen, lengths, n_kv, n_slots, seq_len):
    """query_positions [B, S] and slot_positions [B, Hkv, Smax] of an evicted, compacted cache.

    Each row keeps cache_lengths[b] tokens: the S new ones (the newest positions) and older
    ones sampled with gaps, in a random slot order per KV head; stale slots past the length
    hold leftover positions.
    """
    batch = len(lengths)
    query_positions = torch.zeros(batch, seq_len, dtype=torch.int32)
    slots = torch.zeros(batch, n_kv, n_slots, dtype=torch.int32)
    for b, length in enumerate(lengths.tolist()):
        first = length - seq_len + int(torch.randint(0, length + 1, (1,), generator=gen))
        new = torch.arange(first, first + seq_len)
        query_positions[b] = new
        for h in range(n_kv):
            old = torch.randperm(max(first, 1), generator=gen)[: length - seq_len]
            kept = torch.cat((old, new))
            slots[b, h, :length] = kept[torch.randperm(length, generator=gen)]
            slots[b, h, length:] = torch.randint(0, first + seq_len, (n_slots - length,), generator=gen)
    return query_positions, slots


def make_case(shape, mode: int, seq_len: int, dtype, seed: int, *, moved=True, alibi=False, shared_up=False):
    """(inputs in `dtype`, attributes) for one call; positions fit in the RoPE table."""
    batch, n_kv, groups, n_slots, r_k, r_v, head_dim = shape
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(seq_len, n_slots + 1, (batch,), generator=gen, dtype=torch.int32)
    lengths[0] = n_slots - 2 if n_slots - 2 >= seq_len else n_slots  # at least one row ends before Smax
    if moved:
        query_positions, slots = _moved_slots(gen, lengths, n_kv, n_slots, seq_len)
    else:
        query_positions = (lengths[:, None] - seq_len + torch.arange(seq_len)).int()
        slots = None
    dq = head_dim if mode == 1 else r_k
    rnd = lambda *size: torch.randn(*size, generator=gen)  # noqa: E731
    inputs = dict(query=rnd(batch, n_kv * groups, seq_len, dq), key_cache=rnd(batch, n_kv, n_slots, r_k),
                  value_cache=rnd(batch, n_kv, n_slots, r_v))
    attrs = dict(scale=head_dim ** -0.5, rope_mode=mode, causal=True, slot_positions=slots)
    if mode == 1:
        cos, sin = _rope_tables(int(query_positions.max()) + 3, head_dim)
        up = rnd(1 if shared_up else n_kv, r_k, head_dim) / r_k ** 0.5
        attrs.update(key_up=up, rope_cos=cos, rope_sin=sin)
    if alibi:
        attrs["alibi_slopes"] = 2.0 ** (-8.0 * torch.arange(1, n_kv * groups + 1) / (n_kv * groups))
    cast = lambda t: t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t  # noqa: E731
    inputs = {k: cast(v) for k, v in inputs.items()}
    attrs = {k: cast(v) for k, v in attrs.items()}
    return dict(inputs, cache_lengths=lengths, query_positions=query_positions), attrs


def check(args, attrs, dtype, **kernel_options) -> torch.Tensor:
    """Run the kernel and assert it matches the float64 reference within TOLERANCE[dtype]."""
    up = lambda t: t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t  # noqa: E731
    ref = low_rank_attention(**{k: up(v) for k, v in args.items()}, **{k: up(v) for k, v in attrs.items()})
    out = ta.low_rank_attention_triton(**args, **attrs, block_n=16, **kernel_options)
    assert out.dtype == dtype and out.shape == ref.shape
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)
    return out


@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", SHAPES)
def test_fp32_matches_reference(interpreter, shape, mode, tokens):
    """Every shape, both modes, decode and prefill, moved slots: fp32 within 2e-5."""
    seed = zlib.crc32(f"{shape}-{mode}-{tokens}".encode())
    args, attrs = make_case(SHAPES[shape], MODES[mode], TOKENS[tokens], torch.float32, seed)
    check(args, attrs, torch.float32)


@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", ["g1-d64", "g8-d128"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_matches_reference(interpreter, dtype, shape, mode, tokens):
    """fp16 and bf16 inputs (float32 accumulation) on the two extreme group sizes."""
    seed = zlib.crc32(f"{dtype}-{shape}-{mode}-{tokens}".encode())
    args, attrs = make_case(SHAPES[shape], MODES[mode], TOKENS[tokens], dtype, seed)
    check(args, attrs, dtype)


@pytest.mark.parametrize("mode,dtype", [("pre", torch.float32), ("rank", torch.float32), ("pre", torch.bfloat16)])
def test_split_decode_matches_reference(interpreter, mode, dtype):
    """Flash-decoding: slots split over 3 programs, partials merged by the second launch."""
    args, attrs = make_case(SHAPES["g3-d128"], MODES[mode], 1, dtype, seed=7)
    check(args, attrs, dtype, num_splits=1)
    check(args, attrs, dtype, num_splits=3)  # 45 slots in blocks of 16: 3 splits of one block


@pytest.mark.parametrize("mode,tokens,splits", [("pre", 5, 1), ("rank", 1, 3), ("pre", 1, 3)])
def test_sliding_window_matches_reference(interpreter, mode, tokens, splits):
    """Sliding-window layers (op v2): slots with q_pos - k_pos >= window are masked by position
    on moved slots, and blocks wholly before every query's window are skipped (split decode too)."""
    args, attrs = make_case(SHAPES["g3-d128"], MODES[mode], tokens, torch.float32, seed=29)
    window = 6
    assert int((args["query_positions"].max() - attrs["slot_positions"].min())) >= window  # it masks something
    check(args, dict(attrs, window=window), torch.float32, num_splits=splits)


def test_alibi_prefill(interpreter):
    """ALiBi bias -slope * (q_pos - k_pos) with moved slots, rank-space prefill."""
    args, attrs = make_case(SHAPES["g4-d64"], 0, 5, torch.float32, seed=11, alibi=True)
    check(args, attrs, torch.float32)


def test_slot_index_positions_non_causal_shared_key_up(interpreter):
    """slot_positions absent (position = slot index), causal off, one key_up shared by all KV heads."""
    args, attrs = make_case(SHAPES["g3-d128"], 1, 4, torch.float32, seed=13, moved=False, shared_up=True)
    check(args, attrs, torch.float32)
    check(args, dict(attrs, causal=False), torch.float32)


def test_rows_without_a_valid_slot_are_zero(interpreter):
    """An empty cache row and queries older than every slot give zeros, like the reference."""
    args, attrs = make_case(SHAPES["g1-d64"], 1, 1, torch.float32, seed=17)
    args["cache_lengths"] = torch.tensor([0, 9], dtype=torch.int32)
    out = check(args, attrs, torch.float32, num_splits=2)
    assert out[0].abs().max() == 0
    args["query_positions"] = torch.full_like(args["query_positions"], -1)
    assert check(args, attrs, torch.float32).abs().max() == 0


def test_bad_inputs_are_value_errors(interpreter):
    """Spec violations are ValueErrors naming the input, before any launch."""
    args, attrs = make_case(SHAPES["g1-d64"], 1, 1, torch.float32, seed=19)
    with pytest.raises(ValueError, match="key_up"):
        ta.low_rank_attention_triton(**args, **dict(attrs, key_up=None))
    with pytest.raises(ValueError, match="r_k"):
        ta.low_rank_attention_triton(**args, **dict(attrs, rope_mode=0))
    with pytest.raises(ValueError, match="multiple of KV heads"):
        ta.low_rank_attention_triton(**dict(args, query=args["query"][:, :1].expand(-1, 3, -1, -1)), **attrs)


def test_launch_params_are_the_kernel_signature():
    """LAUNCH_PARAMS is the kernel's argument order (inputs, ints, outputs); no triton needed."""
    names = list(inspect.signature(ta._lowrank_attn_fwd).parameters)
    assert tuple(names[: len(ta.LAUNCH_PARAMS)]) == ta.LAUNCH_PARAMS
    assert ta.LAUNCH_INPUTS == tuple(t.name for t in spec.INPUTS)
    assert ta.LAUNCH_OUTPUTS == tuple(t.name for t in spec.OUTPUTS)
    assert names[len(ta.LAUNCH_PARAMS): len(ta.LAUNCH_PARAMS) + 2] == list(ta.SPLIT_PARAMS)
    assert all(n.isupper() for n in names[len(ta.LAUNCH_PARAMS) + 2:])  # the rest are constexprs
    assert ta.launch_params(0, False, False) == ("query", "key_cache", "value_cache", "cache_lengths",
                                                 "query_positions", *ta.LAUNCH_INTS, "attn")


# ----------------------------------------------------------------------------- AOT compile

AOT_VARIANTS = {  # name: (capability, dtype, KernelShape arguments, split)
    "pre-fp16-sm80": (80, "float16", dict(scale=0.125, rope_mode=1, groups=3, r_k=13, r_v=51, head_dim=64,
                                          has_alibi=True), False),
    "pre-fp16-sm90": (90, "float16", dict(scale=0.125, rope_mode=1, groups=3, r_k=13, r_v=51, head_dim=64,
                                          has_alibi=True), False),
    "rank-bf16-sm90": (90, "bfloat16", dict(scale=0.125, rope_mode=0, groups=8, r_k=51, r_v=13,
                                            has_slot_positions=False), False),
    "split-pre-bf16-sm90": (90, "bfloat16", dict(scale=0.125, rope_mode=1, groups=4, r_k=13, r_v=51,
                                                 head_dim=128), True),
}

_AOT_SCRIPT = r"""
import json, sys, torch
import eigenkv.plugins.triton_attention as ta
result = {"triton_imported_by_module": "triton" in sys.modules}
try:
    from triton.backends.nvidia.compiler import get_ptxas
    for arch in (80, 90):
        get_ptxas(arch).path
except Exception as exc:
    print(json.dumps(dict(result, skip=f"no ptxas to compile with: {exc!r}"))); sys.exit(0)

def entry(kernel, signature):
    types = [v for v in signature.values() if v != "constexpr"]
    return dict(name=kernel.name, ptx=kernel.ptx, params=kernel.params, types=types)

for name, (cap, dtype, kwargs, split) in json.loads(sys.argv[1]).items():
    shape, dtype = ta.default_shape(**kwargs), getattr(torch, dtype)
    result[name] = entry(ta.compile_aot(shape, dtype, cap, split=split), ta.aot_signature(shape, dtype, split=split)[0])
merge = ta.compile_merge_aot(51, 8, torch.bfloat16, 90)
result["merge-sm90"] = dict(name=merge.name, ptx=merge.ptx, params=merge.params, types=["*fp32", "*fp32", "*bf16", "i32"])
print(json.dumps(result))
"""


@pytest.fixture(scope="module")
def aot():
    """Compile every AOT_VARIANTS entry once, in a subprocess with TRITON_INTERPRET unset."""
    pytest.importorskip("triton", reason=TRITON_REASON)  # harmless here: TRITON_INTERPRET is already set
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _AOT_SCRIPT, json.dumps(AOT_VARIANTS)], capture_output=True,
                          text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if "skip" in result:
        pytest.skip(result["skip"])
    return result


def _entry_params(ptx: str) -> list[str]:
    """The PTX types of the `.entry` parameters, in order (e.g. ['u64', ..., 'u32'])."""
    body = re.search(r"\.visible\s+\.entry\s+\w+\s*\((.*?)\)", ptx, re.S).group(1)
    return re.findall(r"\.param\s+\.(\w+)", body)


def test_module_import_does_not_import_triton(aot):
    """`import eigenkv.plugins.triton_attention` leaves triton unimported (it is optional)."""
    assert aot["triton_imported_by_module"] is False


@pytest.mark.parametrize("variant", [*AOT_VARIANTS, "merge-sm90"])
def test_aot_ptx_loads_on_cuda_13_driver(aot, variant):
    """PTX ISA <= 9.0 (driver 580 / CUDA 13.0 loads it) and the target matches the capability."""
    ptx = aot[variant]["ptx"]
    major, minor = map(int, re.search(r"^\.version (\d+)\.(\d+)", ptx, re.M).groups())
    assert (major, minor) <= MAX_PTX_ISA and major * 10 + minor == ta.AOT_PTX_VERSION
    capability = AOT_VARIANTS[variant][0] if variant in AOT_VARIANTS else 90
    assert re.search(rf"^\.target sm_{capability}a?\b", ptx, re.M)


@pytest.mark.parametrize("variant", [*AOT_VARIANTS, "merge-sm90"])
def test_aot_parameter_order_is_launch_params(aot, variant):
    """The compiled entry takes LAUNCH_PARAMS (minus absent inputs) in order, with matching types.

    Pointers are .u64 and int32 sizes .u32; after them Triton appends at most two hidden
    pointers (its global and profile scratch, unused: compile_aot checks none is needed).
    The flash-decoding variant adds SPLIT_PARAMS; the merge kernel has its own four.
    """
    compiled = aot[variant]
    if variant in AOT_VARIANTS:
        _, _, kwargs, split = AOT_VARIANTS[variant]
        expected = ta.launch_params(kwargs["rope_mode"], kwargs.get("has_slot_positions", True),
                                    kwargs.get("has_alibi", False)) + (ta.SPLIT_PARAMS if split else ())
        assert [n for n in ta.LAUNCH_PARAMS + ta.SPLIT_PARAMS if n in expected] == list(expected)
        assert compiled["name"] == "_lowrank_attn_fwd"
    else:
        expected = ("part_acc", "part_ml", "attn", "n_splits")
    assert tuple(compiled["params"]) == expected
    types = _entry_params(compiled["ptx"])
    want = ["u32" if t == "i32" else "u64" for t in compiled["types"]]
    assert types[: len(want)] == want
    assert len(types) - len(want) <= 2 and set(types[len(want):]) <= {"u64"}
