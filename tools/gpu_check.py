"""Every GPU check of eigenkv in one command: one table on stdout, JSON + markdown in docs/results/.

    python tools/gpu_check.py                       # all checks within --time-budget (default 480 s)
    python tools/gpu_check.py --quick               # fewer points (one parity shape, 4 contexts, 2 batches)
    python tools/gpu_check.py --quick --cpu-dry-run # the harness on a CPU: tiny shapes, reference only

Needs torch + triton and a CUDA device; no network, no model files: speed does not depend on
the weights, so models are random at the default model's configuration (SmolLM2-135M: 30
layers, 9 query / 3 KV heads, head_dim 64, hidden 576, intermediate 1536, vocab 49152, built
with transformers' LlamaConfig) and attention also at Llama-3-8B's shape (32 / 8 heads,
head_dim 128). Compressed caches use kv-ratio 0.5 split as r_k = r_v = head_dim / 2 in `pre`
mode (pre-RoPE rank keys rebuilt with key_up and rotated in the kernel: the default export).

Checks
  parity  the Triton kernel against the float64 reference on the device: fp16/bf16/fp32, `pre`
          and rank-space modes, decode (one token, also forced split-KV) and prefill (7 tokens),
          moved slots (every KV head holds its tokens in a random slot order, positions with
          gaps, stale slots past the length); the torch op (fused SDPA formulation) on the same
          cases, eagerly and replayed from a CUDA graph. Then engines: the torch backend with the kernel
          and a CUDA graph (compressed) and with SDPA and a CUDA graph (uncompressed) against
          the same engine with the reference attention, fp32: greedy tokens and logits through
          prefill, decode, a `keep` of random slots, and more decode.
  kernel  one decode step of attention, captured in a CUDA graph and replayed (device time; the
          L2 cache is scrubbed before each replay): the kernel over the compressed cache, the
          kernel over a full-width cache, torch SDPA (flash, GQA) over the full-width cache and
          the engine's masked SDPA; contexts 1k-32k, batches 1-16, both shapes, fp16. Achieved
          GB/s = K/V bytes read / time, beside the device's copy bandwidth measured in the same
          run ((read + written bytes) / time of a 1 GiB device-to-device copy).
  e2e     decode through the torch backend (TorchEngine.step: CUDA graph replay, logits to the
          host), batch 8, contexts 2k-16k: compressed (kernel) vs the same code uncompressed
          with SDPA (and with the kernel at full width); the cache is filled with random K/V at
          positions 0..ctx-1 instead of a prefill. tokens/s = batch x steps / time.

Timing: CUDA events (perf_counter on the CPU), warm-up first, median of repeats. A time budget
(--time-budget, seconds) is shared by the sections (parity 20 %, kernel 40 %, e2e 40 %, unused
time passes on); points past it are recorded as "skipped: time budget". Results are written
after every point, so an interrupted run (Ctrl-C, SIGTERM) leaves its partial results, marked
"interrupted".
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import signal
import statistics
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
NO_CUDA = "skipped: no CUDA device"
OVER_BUDGET = "skipped: time budget"
# kernel parity: |out - ref| <= tol * (1 + |ref|) against the float64 reference (tests/test_triton_kernel.py's)
TOLERANCE = {"fp32": 2e-5, "fp16": 2e-3, "bf16": 2e-2}
SHARES = {"parity": 0.2, "kernel": 0.4, "e2e": 0.4}


@dataclass(frozen=True)
class AttnShape:
    """One model's attention geometry and its compressed ranks (kv-ratio (r_k + r_v) / (2 head_dim))."""

    name: str
    n_heads: int
    n_kv_heads: int
    head_dim: int
    key_rank: int
    value_rank: int

    @property
    def groups(self) -> int:
        return self.n_heads // self.n_kv_heads


SMOLLM2 = AttnShape("smollm2-135m", 9, 3, 64, 32, 32)
LLAMA3_8B = AttnShape("llama3-8b", 32, 8, 128, 64, 64)


@dataclass
class Plan:
    """What one run measures (points per section) and how (repeats)."""

    parity_shapes: list
    parity_dtypes: list
    parity_slots: int
    kernel_shapes: list
    kernel_contexts: list
    kernel_batches: list
    e2e_model: dict  # LlamaConfig keyword arguments
    e2e_batch: int
    e2e_contexts: list
    e2e_variants: list
    e2e_steps: int
    repeats: int
    warmup: int
    copy_bytes: int
    engine_model: dict  # the (smaller) random model of the engine parity checks


def smollm2_config(max_positions: int) -> dict:
    """SmolLM2-135M's LlamaConfig arguments; max_position_embeddings raised to cover the contexts."""
    return dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=max_positions,
                rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True)


def make_plan(quick: bool, dry: bool) -> Plan:
    """The points of a full, --quick or --cpu-dry-run (tiny shapes) run."""
    if dry:
        tiny = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                    rope_theta=10000.0, tie_word_embeddings=False)
        return Plan([SMOLLM2], ["fp32"], 64, [SMOLLM2, LLAMA3_8B], [64], [1, 2], tiny, 2, [32],
                    ["compressed-triton", "uncompressed-sdpa", "compressed-reference"], 3, 3, 1, 1 << 22, tiny)
    contexts = [1024, 4096, 16384, 32768] if quick else [1024, 2048, 4096, 8192, 16384, 32768]
    variants = ["compressed-triton", "uncompressed-sdpa", "uncompressed-triton"]
    engine_model = dict(smollm2_config(2048), vocab_size=2048, num_hidden_layers=4)
    return Plan([SMOLLM2] if quick else [SMOLLM2, LLAMA3_8B], ["fp16", "bf16", "fp32"], 1100,
                [SMOLLM2, LLAMA3_8B], contexts, [1, 16] if quick else [1, 4, 16],
                smollm2_config(16384 + 512), 8, [2048, 8192, 16384] if quick else [2048, 4096, 8192, 16384],
                variants if quick else variants + ["compressed-triton-eager"], 24 if quick else 48,
                10 if quick else 20, 3, 1 << 30, engine_model)


# --------------------------------------------------------------------------- results and budget

class Results:
    """The run's JSON document; `save()` rewrites the JSON and markdown files (atomically) after
    every point, so partial results survive an interrupt."""

    def __init__(self, out_dir: Path, stem: str, header: dict):
        self.json_path, self.md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
        self.doc = dict(header, status="running", sections={name: {"status": "pending", "rows": []}
                                                            for name in SHARES}, summary=[])

    def section(self, name: str) -> dict:
        return self.doc["sections"][name]

    def add(self, section: str, row: dict) -> dict:
        """Append a row, say so on stderr, save."""
        self.section(section)["rows"].append(row)
        print(f"[{section}] " + ", ".join(f"{k}={_fmt(v)}" for k, v in row.items()), file=sys.stderr, flush=True)
        self.save()
        return row

    def save(self) -> None:
        from eigenkv.artifacts import atomic_path, write_json
        self.doc["summary"] = summary(self.doc)
        self.doc["updated"] = _now()
        write_json(self.json_path, self.doc)
        with atomic_path(self.md_path) as tmp:
            tmp.write_text(markdown(self.doc))


class Budget:
    """Absolute deadlines per section: cumulative shares of the total, so unused time passes on."""

    def __init__(self, total_s: float, sections: list[str]):
        self.start, self.total = time.monotonic(), total_s
        weights = {s: SHARES[s] for s in sections}
        scale, acc, self.ends = sum(weights.values()), 0.0, {}
        for s in sections:
            acc += weights[s] / scale
            self.ends[s] = self.start + acc * total_s

    def left(self, section: str) -> float:
        """Seconds until `section`'s deadline (negative: past it)."""
        return self.ends[section] - time.monotonic()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.0f}"
    return str(v)


# --------------------------------------------------------------------------- timing

class Clock:
    """Times a callable on a device: CUDA events around each call (the L2 cache scrubbed before each
    by zeroing a 256 MiB buffer, outside the timed span), perf_counter on the CPU. Seconds."""

    def __init__(self, device):
        import torch
        self.device = device
        self.cuda = device.type == "cuda"
        self.scratch = torch.empty(256 << 20, dtype=torch.int8, device=device) if self.cuda else None

    def times(self, fn: Callable, repeats: int, warmup: int, scrub: bool = True) -> list[float]:
        """Per-call seconds of `repeats` calls after `warmup` untimed ones."""
        import torch
        for _ in range(warmup):
            fn()
        if not self.cuda:
            out = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                fn()
                out.append(time.perf_counter() - t0)
            return out
        events = []
        for _ in range(repeats):
            if scrub:
                self.scratch.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            events.append((start, end))
        torch.cuda.synchronize(self.device)
        return [s.elapsed_time(e) / 1e3 for s, e in events]

    def median(self, fn: Callable, repeats: int, warmup: int, scrub: bool = True) -> float:
        return statistics.median(self.times(fn, repeats, warmup, scrub))


def graphed(fn: Callable, device) -> tuple[Callable, bool]:
    """(a replay of fn captured in a CUDA graph, True), or (fn, False) on the CPU or if capture fails.
    fn runs twice eagerly on a side stream first (Triton compiles, libraries initialise)."""
    import torch
    if device.type != "cuda":
        return fn, False
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        fn()
        fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
    except Exception:  # noqa: BLE001 - any capture failure: time it eagerly and say so
        torch.cuda.synchronize(device)
        return fn, False
    return graph.replay, True


def copy_bandwidth(clock: Clock, nbytes: int, repeats: int) -> dict:
    """Device-to-device copy of `nbytes`: {gbps: (read + written bytes) / median time, bytes}."""
    import torch
    src = torch.empty(nbytes, dtype=torch.uint8, device=clock.device).fill_(1)
    dst = torch.empty_like(src)
    t = clock.median(lambda: dst.copy_(src), repeats, 2, scrub=False)
    return {"bytes": nbytes, "seconds": t, "gbps": 2 * nbytes / t / 1e9}


# --------------------------------------------------------------------------- op inputs

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def torch_dtype(name: str):
    import torch
    return getattr(torch, DTYPES[name])


def rope_tables(n_positions: int, head_dim: int, theta: float = 10000.0):
    """Llama RoPE cos/sin [P, head_dim] float32 (rotate-half convention)."""
    import torch
    inv = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.arange(n_positions, dtype=torch.float64)[:, None] * inv[None, :]
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().float(), angles.sin().float()


def moved_slots(gen, lengths: list[int], n_kv: int, n_slots: int, seq: int):
    """(query_positions [B, S], slot_positions [B, Hkv, Smax]) of a compacted cache: each KV head of
    row b holds lengths[b] tokens (the S new ones at the newest positions, older ones sampled with
    gaps) in a random slot order; slots past the length hold stale positions."""
    import torch
    batch = len(lengths)
    q_pos = torch.zeros(batch, seq, dtype=torch.int64)
    slots = torch.zeros(batch, n_kv, n_slots, dtype=torch.int32)
    for b, n in enumerate(lengths):
        first = 2 * n  # the new tokens' first position: older tokens leave gaps below it
        q_pos[b] = torch.arange(first, first + seq)
        for h in range(n_kv):
            older = torch.randperm(first, generator=gen)[: n - seq]
            held = torch.cat((older, q_pos[b]))[torch.randperm(n, generator=gen)]
            slots[b, h, :n] = held.to(torch.int32)
            slots[b, h, n:] = torch.randint(0, first + seq, (n_slots - n,), generator=gen, dtype=torch.int32)
    return q_pos, slots


def op_case(shape: AttnShape, mode: str, batch: int, seq: int, n_slots: int, dtype, device, seed: int,
            moved: bool = True, full_width: bool = False) -> dict:
    """Keyword arguments of one op call: mode 'pre' (rank keys, key_up, RoPE tables) or 'rank'
    (keys ready to score); full_width: ranks = head_dim. Lengths < Smax in row 0 when moved."""
    import torch
    gen = torch.Generator().manual_seed(seed)
    r_k = shape.head_dim if full_width else shape.key_rank
    r_v = shape.head_dim if full_width else shape.value_rank
    if moved:
        lengths = [max(seq, n_slots - 7)] + [int(torch.randint(seq, n_slots + 1, (1,), generator=gen))
                                            for _ in range(batch - 1)]
        q_pos, slots = moved_slots(gen, lengths, shape.n_kv_heads, n_slots, seq)
    else:
        lengths = [n_slots] * batch
        q_pos = torch.arange(n_slots - seq, n_slots).expand(batch, seq).contiguous()
        slots = torch.arange(n_slots, dtype=torch.int32).expand(batch, shape.n_kv_heads, n_slots).contiguous()
    dq = shape.head_dim if mode == "pre" else r_k
    device_gen = torch.Generator(device=device).manual_seed(seed)  # large tensors are drawn on the device
    rnd = lambda *size: torch.randn(*size, generator=device_gen, device=device).to(dtype)  # noqa: E731
    args = dict(query=rnd(batch, shape.n_heads, seq, dq), key_cache=rnd(batch, shape.n_kv_heads, n_slots, r_k),
                value_cache=rnd(batch, shape.n_kv_heads, n_slots, r_v),
                cache_lengths=torch.tensor(lengths, dtype=torch.int64, device=device),
                query_positions=q_pos.to(device), scale=shape.head_dim ** -0.5, rope_mode=1 if mode == "pre" else 0,
                slot_positions=slots.to(device))
    if mode == "pre":
        cos, sin = rope_tables(int(q_pos.max()) + 1, shape.head_dim)
        args.update(key_up=rnd(shape.n_kv_heads, r_k, shape.head_dim) / math.sqrt(r_k),
                    rope_cos=cos.to(device=device, dtype=dtype), rope_sin=sin.to(device=device, dtype=dtype))
    return args


# --------------------------------------------------------------------------- (a) parity

def kernel_parity(case: dict, dtype_name: str, num_splits: int | None) -> dict:
    """Kernel vs the float64 reference on the same device: {max_abs_err, tol, excess, status}."""
    from eigenkv.plugins.reference import low_rank_attention
    from eigenkv.plugins.triton_attention import low_rank_attention_triton
    up = {k: (v.double() if hasattr(v, "is_floating_point") and v.is_floating_point() else v) for k, v in case.items()}
    ref = low_rank_attention(**up)
    out = low_rank_attention_triton(**case, num_splits=num_splits).double()
    tol = TOLERANCE[dtype_name]
    err = (out - ref).abs()
    excess = float((err - tol * (1 + ref.abs())).max())
    finite = bool(out.isfinite().all())
    return {"max_abs_err": float(err.max()), "tol": tol, "status": "pass" if excess <= 0 and finite else "FAIL"}


def torch_op_parity(case: dict, dtype_name: str) -> dict:
    """The torch op as models call it (`low_rank_attention_op`: plugins/sdpa_attention.py) vs the
    float64 reference on the same device, eagerly and, on CUDA, replayed from a CUDA graph (where
    its value checks are skipped): {max_abs_err, tol, status}."""
    import torch

    from eigenkv.plugins.reference import low_rank_attention
    from eigenkv.plugins.torch_op import low_rank_attention_op
    up = {k: (v.double() if hasattr(v, "is_floating_point") and v.is_floating_point() else v) for k, v in case.items()}
    ref = low_rank_attention(**up)
    outs = [low_rank_attention_op(**case)]
    if case["query"].is_cuda:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            low_rank_attention_op(**case)  # warm-up off the capture
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = low_rank_attention_op(**case)
        graph.replay()
        torch.cuda.synchronize()
        outs.append(captured)
    tol = TOLERANCE[dtype_name]
    excess, err, finite = -math.inf, 0.0, True
    for out in outs:
        e = (out.double() - ref).abs()
        excess, err = max(excess, float((e - tol * (1 + ref.abs())).max())), max(err, float(e.max()))
        finite = finite and bool(out.isfinite().all())
    return {"max_abs_err": err, "tol": tol, "status": "pass" if excess <= 0 and finite else "FAIL"}


def run_parity(plan: Plan, device, results: Results, budget: Budget) -> None:
    """(a): the kernel at every dtype x mode x tokens (x split) case, then the engines."""
    section = results.section("parity")
    section["status"] = "running"
    seed = 0
    for shape in plan.parity_shapes:
        for dtype_name in plan.parity_dtypes:
            for mode in ("pre", "rank"):
                for tokens, splits in (("decode", 1), ("decode-split4", 4), ("prefill", None)):
                    seed += 1
                    row = {"check": "kernel", "shape": shape.name, "dtype": dtype_name, "mode": mode,
                           "tokens": tokens}
                    op_row = dict(row, check="torch-op") if splits != 4 else None  # the op has no split-KV variant
                    if budget.left("parity") <= 0:
                        results.add("parity", dict(row, status=OVER_BUDGET))
                        if op_row:
                            results.add("parity", dict(op_row, status=OVER_BUDGET))
                        continue
                    seq = 7 if tokens == "prefill" else 1
                    case = op_case(shape, mode, 2, seq, plan.parity_slots, torch_dtype(dtype_name), device, seed)
                    if device.type != "cuda":
                        results.add("parity", dict(row, status=NO_CUDA))
                    else:
                        results.add("parity", dict(row, **_guard(lambda: kernel_parity(case, dtype_name, splits))))
                    if op_row:  # on the CPU too (a dry run): eagerly only
                        results.add("parity", dict(op_row, **_guard(lambda: torch_op_parity(case, dtype_name))))
            if budget.left("parity") > 0:  # plain causal prefill (the op's unmasked path): cache = the tokens
                seed += 1
                case = op_case(shape, "pre", 2, 16, 16, torch_dtype(dtype_name), device, seed, moved=False)
                results.add("parity", {"check": "torch-op", "shape": shape.name, "dtype": dtype_name, "mode": "pre",
                                       "tokens": "causal-prefill", **_guard(lambda: torch_op_parity(case, dtype_name))})
    for row in engine_parity(plan, device, budget):
        results.add("parity", row)
    section["status"] = "done"


def _guard(fn: Callable) -> dict:
    """fn()'s dict, or {status: 'error: ...'} (one line) if it raised: the run goes on."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - an unattended run records failures and continues
        traceback.print_exc(file=sys.stderr)
        return {"status": f"error: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"}


def random_decoders(config_kwargs: dict, max_positions: int, seed: int = 0):
    """(uncompressed, compressed) EigenDecoders of one random LlamaConfig model on the CPU, float32;
    the compressed one folds random rank-r_k/r_v attention (`pre` mode, r = head_dim / 2) and
    shares every other module with the uncompressed one."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from eigenkv.exporter.decoder import decoder_from_hf
    from eigenkv.exporter.fold import attention_from_tensors
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**config_kwargs), attn_implementation="eager",
                                             dtype=torch.float32).eval()
    decoder = decoder_from_hf(model, max_positions)
    d = decoder.dims
    r_k = r_v = d.head_dim // 2
    hidden = decoder.layers[0].attn.q_proj.in_features
    folded = []
    for layer in decoder.layers:
        key_up = torch.randn(d.n_kv_heads, r_k, d.head_dim) / math.sqrt(r_k)
        tensors = {"k_proj.weight": torch.randn(d.n_kv_heads * r_k, hidden) * 0.02,
                   "v_proj.weight": torch.randn(d.n_kv_heads * r_v, hidden) * 0.02,
                   "o_proj.weight": torch.randn(hidden, d.n_heads * r_v) * 0.02,
                   "key_up": key_up, "key_gram": key_up @ key_up.transpose(1, 2)}
        folded.append(attention_from_tensors(layer.attn, tensors, "pre"))
    return decoder, decoder.with_attention(folded)


def _engine(decoder, precision: str, device, attention: str, cuda_graph: bool = True):
    """A TorchEngine over `decoder` (fp32: moved to the device in place; fp16: a mixed-precision copy)."""
    from eigenkv.engines.torch_backend import TorchEngine, layout_of
    return TorchEngine(decoder, layout_of(decoder, decoder.rope.cos.shape[0]), precision, device=device,
                       attention=attention, cuda_graph=cuda_graph)


def trace(engine, prompts: list[list[int]], steps: int, keep_at: int, seed: int = 3):
    """Greedy decode of right-padded prompts with a `keep` of random slots (every layer, sequence
    and KV head) after `keep_at` decode steps -> (tokens [steps][B], logits per step [B, V])."""
    import numpy as np

    from eigenkv.engines.runtime import decode_step, prefill
    lengths = np.array([len(p) for p in prompts])
    ids = np.zeros((len(prompts), lengths.max()), np.int64)
    for b, p in enumerate(prompts):
        ids[b, : len(p)] = p
    cache = engine.new_cache(len(prompts), int(lengths.max()) + steps + 1)
    logits = prefill(engine, cache, ids, lengths, chunk=int(lengths.max()))
    rng = np.random.default_rng(seed)
    tokens, all_logits = [], [logits]
    for t in range(steps):
        if t == keep_at:
            for layer in range(engine.layout.n_layers):
                for b in range(len(prompts)):
                    n = int(cache.lengths[layer, b])
                    cache.keep(layer, b, np.stack([rng.permutation(n)[: n - 2]
                                                   for _ in range(engine.layout.n_kv_heads)]))
        tokens.append(logits.argmax(-1))
        logits = decode_step(engine, cache, tokens[-1], lengths + t)
        all_logits.append(logits)
    return np.stack(tokens), all_logits


def engine_parity(plan: Plan, device, budget: Budget) -> list[dict]:
    """Torch-backend engines against the same engine with the reference attention (fp32): compressed
    with the kernel, uncompressed with SDPA, each with CUDA graphs on CUDA; plus the fp16 kernel
    engine (reported, not judged). Rows with status pass/FAIL/skipped."""
    import numpy as np
    rows = []
    cases = [("compressed", "triton", "fp32"), ("uncompressed", "sdpa", "fp32"), ("compressed", "triton", "fp16")]
    if budget.left("parity") <= 0:
        return [{"check": "engine", "model": m, "attention": a, "precision": p, "status": OVER_BUDGET}
                for m, a, p in cases]
    uncompressed, compressed = random_decoders(plan.engine_model, 256)
    decoders = {"compressed": compressed, "uncompressed": uncompressed}
    gen = np.random.default_rng(1)
    vocab = plan.engine_model["vocab_size"]
    prompts = [gen.integers(0, vocab, n).tolist() for n in (37, 20)]
    steps, keep_at = 12, 6
    references = {}
    for model, attention, precision in cases:
        row = {"check": "engine", "model": model, "attention": attention, "precision": precision}
        if attention == "triton" and device.type != "cuda":
            rows.append(dict(row, status=NO_CUDA))
            continue
        if budget.left("parity") <= 0:
            rows.append(dict(row, status=OVER_BUDGET))
            continue

        def compare():
            if model not in references:
                references[model] = trace(_engine(decoders[model], "fp32", device, "reference", False), prompts,
                                          steps, keep_at)
            ref_tokens, ref_logits = references[model]
            engine = _engine(decoders[model], precision, device, attention)
            tokens, logits = trace(engine, prompts, steps, keep_at)
            diff = max(float(np.abs(a - b).max()) for a, b in zip(logits, ref_logits))
            scale = max(float(np.abs(b).max()) for b in ref_logits)
            agree = float((tokens == ref_tokens).mean())
            judged = precision == "fp32"
            ok = agree == 1.0 and diff <= 1e-3 * max(1.0, scale)
            return {"max_abs_logit_diff": diff, "logit_scale": scale, "token_agreement": agree,
                    "graph_captures": engine.graph_captures, "graph_replays": engine.graph_replays,
                    "status": ("pass" if ok else "FAIL") if judged else "reported"}
        rows.append(dict(row, **_guard(compare)))
    return rows


# --------------------------------------------------------------------------- (b) kernel latency

def kernel_point(shape: AttnShape, batch: int, ctx: int, device, clock: Clock, plan: Plan) -> dict:
    """One decode step at (shape, batch, ctx), fp16: seconds and K/V GB/s of each implementation."""
    import torch
    import torch.nn.functional as F

    from eigenkv.engines.torch_backend import sdpa_attention
    from eigenkv.plugins.reference import low_rank_attention
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    compressed = op_case(shape, "pre", batch, 1, ctx, dtype, device, seed=ctx + batch, moved=False)
    full = op_case(shape, "rank", batch, 1, ctx, dtype, device, seed=ctx + batch + 1, moved=False, full_width=True)
    item = torch.empty(0, dtype=dtype).element_size()
    kv_bytes = {"compressed": batch * shape.n_kv_heads * ctx * (shape.key_rank + shape.value_rank) * item,
                "full": batch * shape.n_kv_heads * ctx * 2 * shape.head_dim * item}
    impls = {}
    if device.type == "cuda":
        from eigenkv.plugins.triton_attention import low_rank_attention_triton
        impls["triton"] = ("compressed", lambda: low_rank_attention_triton(**compressed))
        impls["triton-full"] = ("full", lambda: low_rank_attention_triton(**full))
    else:
        impls["reference"] = ("compressed", lambda: low_rank_attention(**compressed))
    q, k, v = full["query"], full["key_cache"], full["value_cache"]
    impls["sdpa-flash"] = ("full", lambda: F.scaled_dot_product_attention(q, k, v, scale=full["scale"],
                                                                        enable_gqa=True))
    impls["sdpa-masked"] = ("full", lambda: sdpa_attention(**full))
    row = {"shape": shape.name, "batch": batch, "context": ctx, "dtype": str(dtype).removeprefix("torch."),
           "kv_bytes_compressed": kv_bytes["compressed"], "kv_bytes_full": kv_bytes["full"]}
    with torch.no_grad():
        for name, (cache, fn) in impls.items():
            run, in_graph = graphed(fn, device)
            t = clock.median(run, plan.repeats, plan.warmup)
            row[f"{name}_us"] = t * 1e6
            row[f"{name}_gbps"] = kv_bytes[cache] / t / 1e9
            row[f"{name}_graph"] = in_graph
    fast = row.get("triton_us", row.get("reference_us"))
    row["speedup_vs_best_sdpa"] = min(row["sdpa-flash_us"], row["sdpa-masked_us"]) / fast
    row["status"] = "ok" if device.type == "cuda" else "ok (reference on the CPU; kernel " + NO_CUDA + ")"
    return row


def run_kernel(plan: Plan, device, results: Results, budget: Budget, clock: Clock) -> None:
    """(b): copy bandwidth, then every (shape, context, batch) point, smallest first."""
    section = results.section("kernel")
    section["status"] = "running"
    section["copy_bandwidth"] = _guard(lambda: copy_bandwidth(clock, plan.copy_bytes, plan.repeats))
    results.save()
    for shape in plan.kernel_shapes:
        for ctx in plan.kernel_contexts:
            for batch in plan.kernel_batches:
                row = {"shape": shape.name, "batch": batch, "context": ctx}
                if budget.left("kernel") <= 0:
                    results.add("kernel", dict(row, status=OVER_BUDGET))
                    continue
                results.add("kernel", dict(row, **_guard(lambda: kernel_point(shape, batch, ctx, device, clock,
                                                                              plan))))
                _free(device)
    section["status"] = "done"


def _free(device) -> None:
    import gc

    import torch
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------- (c) end to end

VARIANTS = {  # name -> (decoder, attention, cuda_graph)
    "compressed-triton": ("compressed", "triton", True),
    "compressed-triton-eager": ("compressed", "triton", False),
    "compressed-reference": ("compressed", "reference", True),
    "uncompressed-sdpa": ("uncompressed", "sdpa", True),
    "uncompressed-triton": ("uncompressed", "triton", True),
}


def decode_rate(engine, batch: int, ctx: int, steps: int, warmup: int, seed: int = 0) -> dict:
    """tokens/s of `steps` decode steps (TorchEngine.step: logits to the host every step) over a cache
    holding `ctx` random tokens per sequence; the first `warmup` steps (eager + capture) untimed."""
    import numpy as np
    import torch
    capacity = -(-(ctx + steps + warmup + 1) // 64) * 64  # a multiple of 64 slots (aligned masks)
    cache = engine.new_cache(batch, capacity)
    gen = torch.Generator(device=engine.device).manual_seed(seed)
    for layer in range(engine.layout.n_layers):
        k, v, slots = cache.layer_tensors(layer)
        k.normal_(generator=gen)
        v.normal_(generator=gen)
        slots[:, :, :ctx] = torch.arange(ctx, dtype=torch.int32, device=slots.device)
    cache.lengths[:] = ctx
    tokens = np.random.default_rng(seed).integers(0, engine.vocab_size, (warmup + steps, batch, 1))
    start = None
    for t in range(warmup + steps):
        if t == warmup:
            engine.synchronize()
            start = time.perf_counter()
        engine.step(cache, tokens[t], np.full((batch, 1), ctx + t))
        cache.advance(np.ones(batch, np.int64))
    engine.synchronize()
    seconds = time.perf_counter() - start
    return {"tokens_per_s": batch * steps / seconds, "ms_per_step": 1e3 * seconds / steps,
            "kv_cache_bytes": cache.nbytes, "graph_replays": engine.graph_replays}


def run_e2e(plan: Plan, device, results: Results, budget: Budget) -> None:
    """(c): every context x variant on random SmolLM2-shaped decoders (fp16 on CUDA)."""
    section = results.section("e2e")
    section["status"] = "running"
    precision = "fp16" if device.type == "cuda" else "fp32"
    decoders = None
    for ctx in plan.e2e_contexts:
        for variant in plan.e2e_variants:
            model, attention, graph = VARIANTS[variant]
            row = {"variant": variant, "batch": plan.e2e_batch, "context": ctx, "precision": precision}
            if attention == "triton" and device.type != "cuda":
                results.add("e2e", dict(row, status=NO_CUDA))
                continue
            if budget.left("e2e") <= 0:
                results.add("e2e", dict(row, status=OVER_BUDGET))
                continue
            if decoders is None:
                t0 = time.perf_counter()
                pair = random_decoders(plan.e2e_model, plan.e2e_model["max_position_embeddings"])
                decoders = {"uncompressed": pair[0], "compressed": pair[1]}
                section["model_build_s"] = time.perf_counter() - t0

            def point():
                engine = _engine(decoders[model], precision, device, attention, graph)
                out = decode_rate(engine, plan.e2e_batch, ctx, plan.e2e_steps, plan.warmup)
                return dict(out, attention=engine.attention, cuda_graph=engine.cuda_graph, status="ok")
            results.add("e2e", dict(row, **_guard(point)))
            _free(device)
    section["status"] = "done"


# --------------------------------------------------------------------------- report

def summary(doc: dict) -> list[dict]:
    """The one table: check | case | measured | baseline | ratio | status."""
    out = []
    for r in doc["sections"]["parity"]["rows"]:
        if r.get("check") in ("kernel", "torch-op"):
            case = f"{r['check']} {r['shape']} {r['dtype']} {r['mode']} {r['tokens']}"
            measured = f"max err {r['max_abs_err']:.2e}" if "max_abs_err" in r else ""
            baseline = f"tol {r['tol']:.0e}" if "tol" in r else ""
        else:
            case = f"engine {r['model']} {r['attention']} {r['precision']}"
            measured = (f"tokens {r['token_agreement']:.0%}, max |dlogit| {r['max_abs_logit_diff']:.1e}"
                        if "token_agreement" in r else "")
            baseline = "reference attention"
        out.append({"check": "parity", "case": case, "measured": measured, "baseline": baseline, "ratio": "",
                    "status": r["status"]})
    bw = doc["sections"]["kernel"].get("copy_bandwidth", {})
    if "gbps" in bw:
        out.append({"check": "kernel", "case": "device copy bandwidth", "measured": f"{bw['gbps']:.0f} GB/s",
                    "baseline": "", "ratio": "", "status": "ok"})
    for r in doc["sections"]["kernel"]["rows"]:
        impl = "triton" if "triton_us" in r else "reference"
        measured = f"{impl} {r[impl + '_us']:.1f} us {r[impl + '_gbps']:.0f} GB/s" if impl + "_us" in r else ""
        best = min(("sdpa-flash", "sdpa-masked"), key=lambda n: r.get(n + "_us", math.inf))
        baseline = f"{best} {r[best + '_us']:.1f} us {r[best + '_gbps']:.0f} GB/s" if best + "_us" in r else ""
        ratio = f"{r['speedup_vs_best_sdpa']:.2f}x" if "speedup_vs_best_sdpa" in r else ""
        out.append({"check": "kernel", "case": f"{r['shape']} b{r['batch']} ctx {r['context']}",
                    "measured": measured, "baseline": baseline, "ratio": ratio, "status": r["status"]})
    rows = doc["sections"]["e2e"]["rows"]
    base = {(r["context"]): r for r in rows if r["variant"] == "uncompressed-sdpa" and "tokens_per_s" in r}
    for r in rows:
        b = base.get(r["context"])
        ratio = (f"{r['tokens_per_s'] / b['tokens_per_s']:.2f}x" if b and "tokens_per_s" in r
                 and r["variant"] != "uncompressed-sdpa" else "")
        out.append({"check": "e2e", "case": f"{r['variant']} b{r['batch']} ctx {r['context']}",
                    "measured": f"{r['tokens_per_s']:.0f} tok/s" if "tokens_per_s" in r else "",
                    "baseline": f"uncompressed-sdpa {b['tokens_per_s']:.0f} tok/s" if b and ratio else "",
                    "ratio": ratio, "status": r["status"]})
    return out


def _table(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def markdown(doc: dict) -> str:
    """The run as markdown: header, the summary table, each section's full table."""
    dev = doc["device"]
    parts = [f"# eigenkv GPU check: {dev.get('name', dev['type'])}", "",
             f"`{doc['command']}` — status **{doc['status']}**, started {doc['started']}, updated "
             f"{doc.get('updated', '')}; torch {dev.get('torch')}, triton {dev.get('triton')}, CUDA {dev.get('cuda')}.",
             "", "Kernel rows are device time of one decode step replayed from a CUDA graph with the L2 cache "
             "scrubbed; GB/s = K/V bytes / time (the kernel also reads 4 B of slot position per slot and head, "
             "and in `pre` mode a RoPE table row per slot, mostly from L2). e2e rows are TorchEngine.step "
             "wall time including the logits' copy to the host.", "", "## Summary", "",
             _table(doc["summary"], ["check", "case", "measured", "baseline", "ratio", "status"])]
    for name, section in doc["sections"].items():
        parts += ["", f"## {name} ({section['status']})", ""]
        if section.get("copy_bandwidth"):
            parts += [f"Device copy bandwidth: {json.dumps(section['copy_bandwidth'])}", ""]
        rows = section["rows"]
        if rows:
            columns = list(dict.fromkeys(k for r in rows for k in r))
            parts.append(_table(rows, columns))
    return "\n".join(parts) + "\n"


def print_table(doc: dict) -> None:
    """The summary as aligned plain text on stdout."""
    columns = ["check", "case", "measured", "baseline", "ratio", "status"]
    rows = [[str(r.get(c, "")) for c in columns] for r in doc["summary"]]
    widths = [max([len(c)] + [len(r[i]) for r in rows]) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)))
    print(f"status: {doc['status']}")


# --------------------------------------------------------------------------- main

def device_info(device) -> dict:
    """Device name, capability, memory and library versions (triton: None when absent)."""
    import importlib.util

    import torch
    info = {"type": device.type, "torch": torch.__version__, "cuda": torch.version.cuda,
            "triton": None, "host": platform.node(), "cpu_count": os.cpu_count()}
    if importlib.util.find_spec("triton") is not None and device.type == "cuda":
        import triton
        info["triton"] = triton.__version__
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(name=props.name, capability=f"{props.major}.{props.minor}",
                    memory_gib=round(props.total_memory / 2**30, 1), sms=props.multi_processor_count)
    else:
        info["name"] = "cpu-dry-run"
    return info


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer points: one parity shape, 4 kernel contexts, "
                    "batches 1 and 16, 3 e2e contexts")
    ap.add_argument("--time-budget", type=float, default=480.0, metavar="SECONDS",
                    help="wall-clock budget shared by the checks (default 480); points past it are skipped")
    ap.add_argument("--cpu-dry-run", action="store_true",
                    help="run the harness on the CPU with tiny shapes and the reference only (GPU parts skipped)")
    ap.add_argument("--only", default="parity,kernel,e2e", help="comma-separated checks to run (default: all)")
    ap.add_argument("--out-dir", type=Path, default=ROOT / "docs" / "results",
                    help="where the JSON and markdown go (default docs/results)")
    args = ap.parse_args(argv)
    args.only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(args.only) - set(SHARES))
    if unknown or not args.only:
        ap.error(f"--only takes {', '.join(SHARES)}; got {', '.join(unknown) or 'nothing'}")
    if args.time_budget <= 0:
        ap.error("--time-budget must be > 0 seconds")
    return args


def _on_sigterm(signum, frame):
    raise KeyboardInterrupt


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    if args.cpu_dry_run:
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        print("gpu_check: no CUDA device; run with --cpu-dry-run to exercise the harness on the CPU", file=sys.stderr)
        device = torch.device("cpu")
    plan = make_plan(args.quick, device.type != "cuda")
    info = device_info(device)
    stem = "gpu_check_" + _slug(info["name"]) + ("_quick" if args.quick else "")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    command = "python tools/gpu_check.py " + " ".join(sys.argv[1:] if argv is None else argv)
    results = Results(args.out_dir, stem, {
        "tool": "tools/gpu_check.py", "schema": 1, "command": command.strip(), "started": _now(),
        "mode": {"quick": args.quick, "cpu_dry_run": device.type != "cuda", "time_budget_s": args.time_budget,
                 "only": args.only},
        "device": info, "plan": _plan_json(plan)})
    for name in SHARES:
        if name not in args.only:
            results.section(name)["status"] = "not requested"
    budget = Budget(args.time_budget, args.only)
    signal.signal(signal.SIGTERM, _on_sigterm)
    torch.manual_seed(0)
    if device.type != "cuda":
        torch.set_num_threads(1)  # the dry run checks the harness, not the CPU's speed: stay light
    clock = Clock(device)
    try:
        if "parity" in args.only:
            run_parity(plan, device, results, budget)
        if "kernel" in args.only:
            run_kernel(plan, device, results, budget, clock)
        if "e2e" in args.only:
            run_e2e(plan, device, results, budget)
        results.doc["status"] = "complete"
    except KeyboardInterrupt:
        results.doc["status"] = "interrupted"
    except Exception as e:  # noqa: BLE001 - keep what was measured
        traceback.print_exc(file=sys.stderr)
        results.doc["status"] = f"error: {type(e).__name__}: {e}"
    results.doc["finished"] = _now()
    results.doc["seconds"] = round(time.monotonic() - budget.start, 1)
    results.save()
    print_table(results.doc)
    print(f"wrote {results.json_path} and {results.md_path}", file=sys.stderr)
    return 0 if results.doc["status"] == "complete" else 130 if results.doc["status"] == "interrupted" else 1


def _plan_json(plan: Plan) -> dict:
    data = asdict(plan)
    for key in ("parity_shapes", "kernel_shapes"):
        data[key] = [s["name"] if isinstance(s, dict) else s for s in data[key]]
    return data


if __name__ == "__main__":
    sys.exit(main())
