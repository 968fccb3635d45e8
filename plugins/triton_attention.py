"""A fused Triton kernel for `eigen::LowRankAttention` (contract: `spec.py`, math: `reference.py`).

One program instance handles one (batch, KV head) pair, one block of query tokens and, for
split decoding, one share of the cache slots. Its query rows are the G = Hq / Hkv query
heads of that KV head times the block's tokens, so in `pre` mode each block of keys is
rebuilt (`K_r @ key_up`) and rotated at its slots' positions once for the whole group.
Scores stream over slot blocks with an online softmax in float32 (flash attention); a
block whose smallest valid position is after every query's position is skipped (causal
blocks that hold for compacted caches too: positions are read, never assumed = slot).

Launches per call of `low_rank_attention_triton`:
  * 1 (`_lowrank_attn_fwd`) for prefill and for decoding with one split: it writes `attn`.
  * 2 for split decoding (flash-decoding): `_lowrank_attn_fwd` with the slots split across
    program instances writes per-split partial (max, sum, accumulator) to scratch, then
    `_lowrank_attn_merge` combines them into `attn`. No atomics.
A TensorRT AOT plugin (one launch per call) compiles the single-pass variant: `compile_aot`.

Kernel arguments follow `LAUNCH_PARAMS`: the op's inputs in spec order, the int32 sizes,
then the output (TensorRT's AOT order: inputs, extra ints, outputs). Everything else is a
compile-time constant: the float `scale` and `rope_mode` (TensorRT AOT can pass only
integers and tensors), `causal`, the sliding `window`, the ranks and head_dim, the group size, block sizes.
Absent optional inputs are passed as None, which removes them from the compiled signature.

Triton is imported only inside functions: importing this module never needs it. Kernels
run natively on CUDA tensors, or on CPU (or CUDA) tensors under `TRITON_INTERPRET=1`.
Triton fixes its own mode when it is first imported (its library functions are jitted for
the mode of that moment), so set TRITON_INTERPRET before anything imports triton, and do
not mix interpreted runs and `compile_aot` in one process.
"""

from __future__ import annotations

import functools
import os
import types
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from eigenkv.plugins.spec import ROPE_NONE, ROPE_PRE

if TYPE_CHECKING:  # device code reads `tl` from the namespace `_kernels` gives it; never imported here
    import triton.language as tl

# The compiled kernel's runtime arguments, in order: the single source of truth for any
# launcher (the Python entry below and a TensorRT AOT plugin). Optional inputs absent from
# a call are dropped from the compiled signature (`launch_params`).
LAUNCH_INPUTS = ("query", "key_cache", "value_cache", "cache_lengths", "query_positions",
                 "slot_positions", "key_up", "rope_cos", "rope_sin", "alibi_slopes")
LAUNCH_INTS = ("n_kv_heads", "seq_len", "n_slots", "n_positions")
LAUNCH_OUTPUTS = ("attn",)
LAUNCH_PARAMS = LAUNCH_INPUTS + LAUNCH_INTS + LAUNCH_OUTPUTS
SPLIT_PARAMS = ("part_acc", "part_ml")  # split decoding's scratch; None in the single-pass kernel

# PTX ISA written into AOT kernels: 8.4 (CUDA 12.4) loads on drivers >= 550, including the
# GPU hosts' 580 (CUDA 13.0, which takes up to 9.0). Unpinned, Triton 3.9 writes what its
# bundled ptxas knows: 8.8 for sm_80 (ptxas 12.9), 9.4 for sm_90 (ptxas 13.4).
AOT_PTX_VERSION = 84
MIN_SLOTS_PER_SPLIT = 256  # split decoding never gives a program fewer slots than this

_DEVICE_FNS: dict = {}


def _device(fn):
    """Register a Triton device function; it is jitted lazily, per mode (see `_kernels`)."""
    _DEVICE_FNS[fn.__name__] = fn
    return fn


# --------------------------------------------------------------------------- device code

@_device
def _dot(a, b, DOT_F32: tl.constexpr):
    """a [M, K] @ b [K, N] -> float32 [M, N]; DOT_F32 upcasts first (the interpreter's bf16 dot is wrong)."""
    if DOT_F32:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision="ieee", out_dtype=tl.float32)


@_device
def _load_rows(base, rows, row_ok, col0, N_COLS: tl.constexpr, WIDTH: tl.constexpr, PAD: tl.constexpr):
    """[len(rows), PAD] tile of a row-major [*, WIDTH] tensor: columns col0 .. col0 + N_COLS, zeros outside."""
    cols = tl.arange(0, PAD)
    mask = row_ok[:, None] & (cols < N_COLS)[None, :]
    return tl.load(base + rows[:, None] * WIDTH + col0 + cols[None, :], mask=mask, other=0.0)


@_device
def _rotated_key_halves(kr, u1, u2, rope_cos, rope_sin, k_pos, slot_ok, n_positions,
                        HEAD_DIM: tl.constexpr, HALF_PAD: tl.constexpr, DOT_F32: tl.constexpr):
    """Rebuilt, rotated keys of one slot block as float32 halves ([BLOCK_N, HALF_PAD] each).

    K = K_r @ key_up, then rotate_half RoPE at each slot's own position: the first half is
    k1 * cos1 - k2 * sin1, the second k2 * cos2 + k1 * sin2. Positions are clamped to the
    table for the address only (slots outside the cache are masked later).
    """
    HALF: tl.constexpr = HEAD_DIM // 2
    k1 = _dot(kr, u1, DOT_F32)
    k2 = _dot(kr, u2, DOT_F32)
    pos = tl.minimum(tl.maximum(k_pos, 0), n_positions - 1).to(tl.int64)
    c1 = _load_rows(rope_cos, pos, slot_ok, 0, HALF, HEAD_DIM, HALF_PAD).to(tl.float32)
    c2 = _load_rows(rope_cos, pos, slot_ok, HALF, HALF, HEAD_DIM, HALF_PAD).to(tl.float32)
    s1 = _load_rows(rope_sin, pos, slot_ok, 0, HALF, HEAD_DIM, HALF_PAD).to(tl.float32)
    s2 = _load_rows(rope_sin, pos, slot_ok, HALF, HALF, HEAD_DIM, HALF_PAD).to(tl.float32)
    return k1 * c1 - k2 * s1, k2 * c2 + k1 * s2


@_device
def _softmax_step(qk, valid, m_i, l_i, acc, v, DOT_F32: tl.constexpr):
    """Online-softmax update with one block of base-2 scores qk [M, N] and values v [N, R].

    Returns the new (max, sum, accumulator). Masked scores are -inf; a row with no valid
    slot so far keeps max -inf, sum 0 and accumulator 0 (no NaN: exponents use base 0).
    """
    qk = tl.where(valid, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, axis=1))
    m_base = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.math.exp2(m_i - m_base)
    p = tl.math.exp2(qk - m_base[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_F32)
    return m_new, l_i, acc


@_device
def _lowrank_attn_fwd(
    query, key_cache, value_cache, cache_lengths, query_positions,
    slot_positions, key_up, rope_cos, rope_sin, alibi_slopes,
    n_kv_heads, seq_len, n_slots, n_positions,
    attn,
    part_acc, part_ml,
    SCALE: tl.constexpr, ROPE_MODE: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
    HAS_SLOT_POSITIONS: tl.constexpr, HAS_ALIBI: tl.constexpr, KEY_UP_PER_HEAD: tl.constexpr,
    GROUPS: tl.constexpr, G_PAD: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_N: tl.constexpr,
    R_K: tl.constexpr, R_V: tl.constexpr, HEAD_DIM: tl.constexpr,
    RK_PAD: tl.constexpr, RV_PAD: tl.constexpr, HALF_PAD: tl.constexpr,
    SPLIT: tl.constexpr, DOT_F32: tl.constexpr,
):
    """Attention of one (batch, KV head), one block of BLOCK_S query tokens x its G query heads.

    Grid: (B * Hkv, cdiv(S, BLOCK_S)[, n_splits]). Row m of the tile is head g = m % G_PAD
    of the group and token s = block start + m // G_PAD. Without SPLIT it writes attn
    [B, Hq, S, R_V]; with SPLIT, program z covers its share of the slots and writes its
    partial accumulator to part_acc [B*Hq*S, n_splits, R_V] and (max, sum) to part_ml
    [B*Hq*S, n_splits, 2] (float32, base-2 max) for `_lowrank_attn_merge`.
    """
    BLOCK_M: tl.constexpr = BLOCK_S * G_PAD
    HALF: tl.constexpr = HEAD_DIM // 2
    QK_SCALE: tl.constexpr = SCALE * 1.4426950408889634  # scores in base 2
    pid_bh = tl.program_id(0).to(tl.int64)  # b * Hkv + kv head
    b = pid_bh // n_kv_heads
    hk = pid_bh % n_kv_heads
    rows = tl.arange(0, BLOCK_M)
    g = rows % G_PAD
    s = tl.program_id(1) * BLOCK_S + rows // G_PAD
    row_ok = (g < GROUPS) & (s < seq_len)
    q_row = (pid_bh * GROUPS + g) * seq_len + s  # row of [B*Hq*S, *] (query and attn)
    q_pos = tl.load(query_positions + b * seq_len + s, mask=row_ok, other=0)
    q_max = tl.max(tl.where(row_ok, q_pos, -2147483647), axis=0)
    q_min = tl.min(tl.where(row_ok, q_pos, 2147483647), axis=0)
    if HAS_ALIBI:
        slope = tl.load(alibi_slopes + hk * GROUPS + g, mask=row_ok, other=0.0).to(tl.float32) * 1.4426950408889634

    if ROPE_MODE == 1:
        q1 = _load_rows(query, q_row, row_ok, 0, HALF, HEAD_DIM, HALF_PAD)
        q2 = _load_rows(query, q_row, row_ok, HALF, HALF, HEAD_DIM, HALF_PAD)
        r = tl.arange(0, RK_PAD)
        up = key_up + (hk * R_K * HEAD_DIM if KEY_UP_PER_HEAD else 0)
        u1 = _load_rows(up, r, r < R_K, 0, HALF, HEAD_DIM, HALF_PAD).to(key_cache.dtype.element_ty)
        u2 = _load_rows(up, r, r < R_K, HALF, HALF, HEAD_DIM, HALF_PAD).to(key_cache.dtype.element_ty)
    else:
        q = _load_rows(query, q_row, row_ok, 0, R_K, R_K, RK_PAD)

    length = tl.minimum(tl.load(cache_lengths + b), n_slots)
    start = 0
    end = length
    if SPLIT:
        chunk = tl.cdiv(tl.cdiv(n_slots, tl.num_programs(2)), BLOCK_N) * BLOCK_N
        start = tl.program_id(2) * chunk
        end = tl.minimum(start + chunk, length)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, RV_PAD], tl.float32)
    kv_row0 = pid_bh * n_slots
    for n0 in range(start, end, BLOCK_N):
        offs = n0 + tl.arange(0, BLOCK_N)
        slot_ok = offs < end
        if HAS_SLOT_POSITIONS:
            k_pos = tl.load(slot_positions + kv_row0 + offs, mask=slot_ok, other=0)
        else:
            k_pos = offs
        live = True
        if CAUSAL:  # skip a block whose every valid slot is after every query
            live = tl.min(tl.where(slot_ok, k_pos, 2147483647), axis=0) <= q_max
        if WINDOW > 0:  # or before every query's window
            live = live & (tl.max(tl.where(slot_ok, k_pos, -2147483647), axis=0) > q_min - WINDOW)
        if live:
            kr = _load_rows(key_cache, kv_row0 + offs, slot_ok, 0, R_K, R_K, RK_PAD)
            if ROPE_MODE == 1:
                k1, k2 = _rotated_key_halves(kr, u1, u2, rope_cos, rope_sin, k_pos, slot_ok, n_positions,
                                             HEAD_DIM, HALF_PAD, DOT_F32)
                qk = _dot(q1, tl.trans(k1.to(query.dtype.element_ty)), DOT_F32)
                qk += _dot(q2, tl.trans(k2.to(query.dtype.element_ty)), DOT_F32)
            else:
                qk = _dot(q, tl.trans(kr.to(query.dtype.element_ty)), DOT_F32)
            qk = qk * QK_SCALE
            if HAS_ALIBI:
                qk -= slope[:, None] * (q_pos[:, None] - k_pos[None, :]).to(tl.float32)
            valid = slot_ok[None, :]
            if CAUSAL:
                valid = valid & (k_pos[None, :] <= q_pos[:, None])
            if WINDOW > 0:  # sliding window: q_pos - k_pos < WINDOW
                valid = valid & (q_pos[:, None] - k_pos[None, :] < WINDOW)
            v = _load_rows(value_cache, kv_row0 + offs, slot_ok, 0, R_V, R_V, RV_PAD)
            m_i, l_i, acc = _softmax_step(qk, valid, m_i, l_i, acc, v, DOT_F32)

    cols = tl.arange(0, RV_PAD)
    if SPLIT:
        part = q_row * tl.num_programs(2) + tl.program_id(2)
        tl.store(part_acc + part[:, None] * R_V + cols[None, :], acc,
                 mask=row_ok[:, None] & (cols < R_V)[None, :])
        tl.store(part_ml + part * 2, m_i, mask=row_ok)
        tl.store(part_ml + part * 2 + 1, l_i, mask=row_ok)
    else:
        out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]  # rows with no valid slot: zeros
        tl.store(attn + q_row[:, None] * R_V + cols[None, :], out.to(attn.dtype.element_ty),
                 mask=row_ok[:, None] & (cols < R_V)[None, :])


@_device
def _lowrank_attn_merge(part_acc, part_ml, attn, n_splits,
                        R_V: tl.constexpr, RV_PAD: tl.constexpr, SPLIT_PAD: tl.constexpr):
    """attn row = the splits' partial results combined (grid: B * Hq * S, one row each)."""
    row = tl.program_id(0).to(tl.int64)
    sp = tl.arange(0, SPLIT_PAD)
    sp_ok = sp < n_splits
    part = row * n_splits + sp
    m = tl.load(part_ml + part * 2, mask=sp_ok, other=float("-inf"))
    l = tl.load(part_ml + part * 2 + 1, mask=sp_ok, other=0.0)
    m_max = tl.max(m, axis=0)
    w = tl.math.exp2(m - tl.where(m_max == float("-inf"), 0.0, m_max))
    total = tl.sum(w * l, axis=0)
    cols = tl.arange(0, RV_PAD)
    acc = tl.load(part_acc + part[:, None] * R_V + cols[None, :], mask=sp_ok[:, None] & (cols < R_V)[None, :],
                  other=0.0)
    out = tl.sum(w[:, None] * acc, axis=0) / tl.where(total > 0.0, total, 1.0)
    tl.store(attn + row * R_V + cols, out.to(attn.dtype.element_ty), mask=cols < R_V)


# --------------------------------------------------------------------------- host side

@functools.lru_cache(maxsize=2)
def _kernels(interpret: bool) -> types.SimpleNamespace:
    """The device functions jitted for one mode (interpreter or compiler).

    Each registered function is copied onto a private globals dict holding `tl` and the
    other device functions of the same mode: jitting happens at first use, never at
    import. ImportError when triton is not installed.
    """
    import triton.language
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    namespace = {"tl": triton.language, "__name__": __name__}
    wrap = InterpretedFunction if interpret else JITFunction
    for name, fn in _DEVICE_FNS.items():
        copy = types.FunctionType(fn.__code__, namespace, name, fn.__defaults__, fn.__closure__)
        copy.__module__, copy.__qualname__, copy.__doc__ = fn.__module__, fn.__qualname__, fn.__doc__
        namespace[name] = wrap(copy)
    return types.SimpleNamespace(**{name: namespace[name] for name in _DEVICE_FNS})


def _interpreting() -> bool:
    """Whether TRITON_INTERPRET asks for the CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _pow2(n: int, floor: int = 16) -> int:
    """The smallest power of two >= max(n, floor) (tl.arange and tl.dot need powers of two >= 16)."""
    return max(floor, 1 << max(0, int(n) - 1).bit_length())


@dataclass(frozen=True)
class KernelShape:
    """The compile-time constants of one kernel variant (everything but the runtime sizes).

    rope_mode: 0 (keys ready to score) or 1 (pre); groups = Hq / Hkv; r_k, r_v: ranks;
    head_dim: the rebuilt key width in pre mode (0 in rank mode); block_s query tokens and
    block_n cache slots per tile.
    """

    scale: float
    rope_mode: int
    causal: bool
    groups: int
    r_k: int
    r_v: int
    head_dim: int
    has_slot_positions: bool
    has_alibi: bool
    key_up_per_head: bool
    block_s: int
    block_n: int
    window: int = 0  # sliding window in tokens (0: none), baked into the kernel like `causal`

    def constexprs(self, split: bool, dot_f32: bool) -> dict:
        """The kernel's constexpr arguments by name."""
        return dict(SCALE=float(self.scale), ROPE_MODE=int(self.rope_mode), CAUSAL=bool(self.causal),
                    WINDOW=int(self.window),
                    HAS_SLOT_POSITIONS=self.has_slot_positions, HAS_ALIBI=self.has_alibi,
                    KEY_UP_PER_HEAD=self.key_up_per_head, GROUPS=self.groups, G_PAD=_pow2(self.groups, 1),
                    BLOCK_S=self.block_s, BLOCK_N=self.block_n, R_K=self.r_k, R_V=self.r_v,
                    HEAD_DIM=self.head_dim, RK_PAD=_pow2(self.r_k), RV_PAD=_pow2(self.r_v),
                    HALF_PAD=_pow2(self.head_dim // 2), SPLIT=split, DOT_F32=dot_f32)


def query_block(groups: int, seq_len: int, block_m: int = 64) -> int:
    """Query tokens per program: the group's heads times the tokens fill about block_m rows (>= 16)."""
    g_pad = _pow2(groups, 1)
    tokens = min(_pow2(seq_len, 1), max(1, block_m // g_pad))
    return max(tokens, 16 // g_pad if g_pad < 16 else 1)


def launch_params(rope_mode: int, has_slot_positions: bool, has_alibi: bool) -> tuple:
    """LAUNCH_PARAMS without the optional inputs a variant does not take (its compiled argument order)."""
    absent = set()
    if rope_mode != ROPE_PRE:
        absent |= {"key_up", "rope_cos", "rope_sin"}
    if not has_slot_positions:
        absent.add("slot_positions")
    if not has_alibi:
        absent.add("alibi_slopes")
    return tuple(name for name in LAUNCH_PARAMS if name not in absent)


def _check_inputs(query, key_cache, value_cache, cache_lengths, query_positions, rope_mode, slot_positions,
                  key_up, rope_cos, rope_sin, alibi_slopes) -> None:
    """ValueError naming the first input whose shape, dtype or device breaks the spec."""
    if query.dim() != 4 or key_cache.dim() != 4 or value_cache.dim() != 4:
        raise ValueError("query, key_cache and value_cache must be 4-D [B, H, S, d]")
    batch, n_q, seq_len, dq = query.shape
    _, n_kv, n_slots, r_k = key_cache.shape
    if value_cache.shape[:3] != key_cache.shape[:3] or key_cache.shape[0] != batch:
        raise ValueError(f"key_cache {tuple(key_cache.shape)} and value_cache {tuple(value_cache.shape)} "
                         f"must share [B, Hkv, Smax] with B = {batch}")
    if n_q % n_kv:
        raise ValueError(f"query heads ({n_q}) must be a multiple of KV heads ({n_kv})")
    if tuple(cache_lengths.shape) != (batch,) or tuple(query_positions.shape) != (batch, seq_len):
        raise ValueError("cache_lengths must be [B] and query_positions [B, S]")
    if slot_positions is not None and tuple(slot_positions.shape) != (batch, n_kv, n_slots):
        raise ValueError(f"slot_positions must be [B, Hkv, Smax] = {(batch, n_kv, n_slots)}")
    if alibi_slopes is not None and tuple(alibi_slopes.shape) != (n_q,):
        raise ValueError(f"alibi_slopes must be [Hq] = [{n_q}]")
    if rope_mode == ROPE_PRE:
        if key_up is None or rope_cos is None or rope_sin is None:
            raise ValueError("rope_mode=pre needs key_up, rope_cos and rope_sin")
        if key_up.dim() != 3 or key_up.shape[0] not in (1, n_kv) or tuple(key_up.shape[1:]) != (r_k, dq):
            raise ValueError(f"key_up must be [1 or Hkv, r_k, head_dim] = [1 or {n_kv}, {r_k}, {dq}]")
        if dq % 2 or rope_cos.shape != rope_sin.shape or rope_cos.dim() != 2 or rope_cos.shape[1] != dq:
            raise ValueError(f"rope_cos/rope_sin must be [P, head_dim] with an even head_dim = {dq}")
    elif rope_mode == ROPE_NONE:
        if dq != r_k:
            raise ValueError(f"rope_mode=0 scores in rank space: query width {dq} must equal r_k {r_k}")
    else:
        raise ValueError(f"rope_mode must be {ROPE_NONE} (none) or {ROPE_PRE} (pre), got {rope_mode}")
    tensors = [t for t in (query, key_cache, value_cache, cache_lengths, query_positions, slot_positions, key_up,
                           rope_cos, rope_sin, alibi_slopes) if t is not None]
    if len({t.device for t in tensors}) != 1:
        raise ValueError("all inputs must be on one device")
    floats = (torch.float16, torch.bfloat16, torch.float32)
    if any(t.dtype not in floats for t in (query, key_cache, value_cache)):
        raise ValueError(f"query, key_cache and value_cache must be one of {floats}")


def _auto_splits(device: torch.device, programs: int, n_slots: int, block_n: int) -> int:
    """Slot splits for flash-decoding: fill about two waves of the GPU's SMs, >= MIN_SLOTS_PER_SPLIT each."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    by_length = max(1, n_slots // max(MIN_SLOTS_PER_SPLIT, block_n))
    return max(1, min(by_length, -(-2 * sms // programs)))


def low_rank_attention_triton(
    query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, cache_lengths: torch.Tensor,
    query_positions: torch.Tensor, *, scale: float, rope_mode: int = ROPE_NONE, causal: bool = True,
    slot_positions: torch.Tensor | None = None, key_up: torch.Tensor | None = None,
    rope_cos: torch.Tensor | None = None, rope_sin: torch.Tensor | None = None,
    alibi_slopes: torch.Tensor | None = None, num_splits: int | None = None, block_n: int | None = None,
    window: int = 0,
) -> torch.Tensor:
    """`reference.low_rank_attention` as a fused Triton kernel: same arguments, result [B, Hq, S, r_v].

    Tensors: CUDA, or CPU under `TRITON_INTERPRET=1`; float inputs fp16, bf16 or fp32 (the
    result has the query's dtype, accumulation is float32); integer inputs any int dtype
    (cast to int32). num_splits: slot splits for flash-decoding (None: automatic, 1 on the
    CPU; > 1 adds the merge launch). block_n: cache slots per tile (rounded up to a power
    of two >= 16; None: 64). ValueError for inputs that break the spec, RuntimeError for
    CPU tensors without the interpreter; ImportError without triton. Slot positions
    outside the RoPE table are clamped (the reference raises).
    """
    _check_inputs(query, key_cache, value_cache, cache_lengths, query_positions, rope_mode, slot_positions,
                  key_up, rope_cos, rope_sin, alibi_slopes)
    interpret = _interpreting()
    if query.device.type != "cuda" and not interpret:
        raise RuntimeError("low_rank_attention_triton runs CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 "
                           "set before triton is first imported")
    batch, n_q, seq_len, _ = query.shape
    _, n_kv, n_slots, r_k = key_cache.shape
    r_v = value_cache.shape[3]
    attn = query.new_empty((batch, n_q, seq_len, r_v))
    if attn.numel() == 0:
        return attn
    groups = n_q // n_kv
    shape = KernelShape(scale=float(scale), rope_mode=int(rope_mode), causal=bool(causal), groups=groups, r_k=r_k,
                        r_v=r_v, head_dim=query.shape[3] if rope_mode == ROPE_PRE else 0,
                        has_slot_positions=slot_positions is not None, has_alibi=alibi_slopes is not None,
                        key_up_per_head=key_up is not None and key_up.shape[0] > 1,
                        block_s=query_block(groups, seq_len), block_n=_pow2(block_n or 64), window=int(window))
    q_blocks = -(-seq_len // shape.block_s)
    splits = num_splits or _auto_splits(query.device, batch * n_kv * q_blocks, n_slots, shape.block_n)
    splits = max(1, min(int(splits), -(-n_slots // shape.block_n)))
    args = _launch_args(query, key_cache, value_cache, cache_lengths, query_positions, slot_positions, key_up,
                        rope_cos, rope_sin, alibi_slopes, attn, rope_mode)
    kernels = _kernels(interpret)
    constexprs = shape.constexprs(split=splits > 1, dot_f32=interpret)
    grid = (batch * n_kv, q_blocks) + ((splits,) if splits > 1 else ())
    if splits == 1:
        kernels._lowrank_attn_fwd[grid](*args, None, None, **constexprs, num_warps=4, num_stages=2,
                                        enable_fp_fusion=True)
        return attn
    rows = batch * n_q * seq_len
    part_acc = torch.empty((rows, splits, r_v), dtype=torch.float32, device=query.device)
    part_ml = torch.empty((rows, splits, 2), dtype=torch.float32, device=query.device)
    kernels._lowrank_attn_fwd[grid](*args, part_acc, part_ml, **constexprs, num_warps=4, num_stages=2,
                                        enable_fp_fusion=True)
    kernels._lowrank_attn_merge[(rows,)](part_acc, part_ml, attn, splits, R_V=r_v, RV_PAD=_pow2(r_v),
                                         SPLIT_PAD=_pow2(splits, 1), num_warps=1)
    return attn


def _launch_args(query, key_cache, value_cache, cache_lengths, query_positions, slot_positions, key_up, rope_cos,
                 rope_sin, alibi_slopes, attn, rope_mode) -> list:
    """The kernel's runtime arguments in LAUNCH_PARAMS order (contiguous tensors, int32 indices, None if absent)."""
    pre = rope_mode == ROPE_PRE
    given = dict(
        query=query, key_cache=key_cache, value_cache=value_cache,
        cache_lengths=cache_lengths.to(torch.int32), query_positions=query_positions.to(torch.int32),
        slot_positions=None if slot_positions is None else slot_positions.to(torch.int32),
        key_up=key_up if pre else None, rope_cos=rope_cos if pre else None, rope_sin=rope_sin if pre else None,
        alibi_slopes=alibi_slopes, attn=attn,
        n_kv_heads=key_cache.shape[1], seq_len=query.shape[2], n_slots=key_cache.shape[2],
        n_positions=rope_cos.shape[0] if pre else 1,
    )
    return [v.contiguous() if isinstance(v, torch.Tensor) else v for v in (given[n] for n in LAUNCH_PARAMS)]


# --------------------------------------------------------------------------- ahead of time

_TRITON_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


@dataclass(frozen=True)
class AotKernel:
    """A compiled single-pass kernel for an AOT launcher (TensorRT `aot_impl`).

    name: the PTX entry; ptx: its text; params: runtime arguments in order (a
    `launch_params` subset of LAUNCH_PARAMS); block_s and block_n: the grid is
    (B * Hkv, cdiv(S, block_s), 1) with num_warps * 32 threads and `shared` bytes of
    dynamic shared memory.
    """

    name: str
    ptx: str
    params: tuple
    num_warps: int
    shared: int
    block_s: int
    block_n: int


def aot_signature(shape: KernelShape, dtype: torch.dtype, *, split: bool = False) -> tuple[dict, dict]:
    """(signature, constexprs) for `triton.compiler.ASTSource` of `_lowrank_attn_fwd`.

    Every float tensor has `dtype`, indices and sizes are int32; absent optional inputs are
    constexpr None, and so is the split scratch unless `split` (then float32 pointers).
    """
    ty = "*" + _TRITON_DTYPES[dtype]
    present = launch_params(shape.rope_mode, shape.has_slot_positions, shape.has_alibi)
    kinds = {"cache_lengths": "*i32", "query_positions": "*i32", "slot_positions": "*i32"}
    kinds.update({name: "i32" for name in LAUNCH_INTS})
    if split:
        present += SPLIT_PARAMS
        kinds.update({name: "*fp32" for name in SPLIT_PARAMS})
    signature, constexprs = {}, {}
    for name in LAUNCH_PARAMS + SPLIT_PARAMS:
        if name in present:
            signature[name] = kinds.get(name, ty)
        else:
            signature[name], constexprs[name] = "constexpr", None
    for name, value in shape.constexprs(split=split, dot_f32=False).items():
        signature[name], constexprs[name] = "constexpr", value
    return signature, constexprs


def _compile(fn, signature: dict, constexprs: dict, capability: int, num_warps: int, num_stages: int,
             ptx_version: int):
    """triton.compile for GPUTarget("cuda", capability, 32) with the PTX ISA pinned; no GPU needed.

    RuntimeError if the kernel needs Triton's global scratch memory (an AOT launcher cannot
    provide it).
    """
    import triton
    from triton.backends.compiler import GPUTarget

    source = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32),
                              options=dict(num_warps=num_warps, num_stages=num_stages, ptx_version=ptx_version,
                                           enable_fp_fusion=True))
    if getattr(compiled.metadata, "global_scratch_size", 0):
        raise RuntimeError("the kernel needs Triton global scratch memory, which an AOT launcher cannot provide")
    return compiled


def compile_aot(shape: KernelShape, dtype: torch.dtype, capability: int, *, split: bool = False,
                num_warps: int = 4, num_stages: int = 2, ptx_version: int = AOT_PTX_VERSION) -> AotKernel:
    """Compile `_lowrank_attn_fwd` for a CUDA capability (80, 90, ...) with no GPU: PTX, and cubin by ptxas.

    The single-pass variant (the one launch of an AOT plugin) by default; `split`: the
    flash-decoding variant, whose params add SPLIT_PARAMS and which needs `compile_merge_aot`.
    The PTX states ISA `ptx_version` (84 -> `.version 8.4`).
    """
    signature, constexprs = aot_signature(shape, dtype, split=split)
    compiled = _compile(_kernels(False)._lowrank_attn_fwd, signature, constexprs, capability, num_warps,
                        num_stages, ptx_version)
    params = tuple(name for name, ty in signature.items() if ty != "constexpr")
    return AotKernel(name=compiled.metadata.name, ptx=compiled.asm["ptx"], params=params, num_warps=num_warps,
                     shared=compiled.metadata.shared, block_s=shape.block_s, block_n=shape.block_n)


def compile_merge_aot(r_v: int, max_splits: int, dtype: torch.dtype, capability: int, *,
                      ptx_version: int = AOT_PTX_VERSION) -> AotKernel:
    """Compile `_lowrank_attn_merge` (grid: B * Hq * S programs of one warp) for up to max_splits splits."""
    signature = dict(part_acc="*fp32", part_ml="*fp32", attn="*" + _TRITON_DTYPES[dtype], n_splits="i32",
                     R_V="constexpr", RV_PAD="constexpr", SPLIT_PAD="constexpr")
    constexprs = dict(R_V=r_v, RV_PAD=_pow2(r_v), SPLIT_PAD=_pow2(max_splits, 1))
    compiled = _compile(_kernels(False)._lowrank_attn_merge, signature, constexprs, capability, 1, 1, ptx_version)
    return AotKernel(name=compiled.metadata.name, ptx=compiled.asm["ptx"], params=tuple(signature)[:4],
                     num_warps=1, shared=compiled.metadata.shared, block_s=1, block_n=0)


def default_shape(*, scale: float, rope_mode: int, groups: int, r_k: int, r_v: int, head_dim: int = 0,
                  causal: bool = True, has_slot_positions: bool = True, has_alibi: bool = False,
                  key_up_per_head: bool = True, seq_len_hint: int = 1, block_n: int = 64,
                  window: int = 0) -> KernelShape:
    """A KernelShape with the entry's block sizes (block_s from the group size and a typical S)."""
    return KernelShape(scale=float(scale), rope_mode=rope_mode, causal=causal, groups=groups, r_k=r_k, r_v=r_v,
                       head_dim=head_dim if rope_mode == ROPE_PRE else 0, has_slot_positions=has_slot_positions,
                       has_alibi=has_alibi, key_up_per_head=key_up_per_head,
                       block_s=query_block(groups, seq_len_hint), block_n=_pow2(block_n), window=int(window))


__all__ = ["LAUNCH_PARAMS", "LAUNCH_INPUTS", "LAUNCH_INTS", "LAUNCH_OUTPUTS", "SPLIT_PARAMS", "AOT_PTX_VERSION",
           "AotKernel", "KernelShape", "low_rank_attention_triton", "launch_params", "compile_aot",
           "compile_merge_aot", "aot_signature", "default_shape", "query_block"]
