"""Benchmark: the op's torch implementations at prefill shapes, side by side in one process.

What calibration probes, perplexity, validation and healing run in torch: the reference math
(`plugins/reference.py`, which materialises [B, Hq, S, S] scores, masks and probabilities) and
the fused formulation the torch op runs (`plugins/sdpa_attention.py`), forward and, with
--backward, forward + backward (healing). Shapes follow the default model (9 query heads, 3 KV
heads, head_dim 64); every row is checked against the float64 reference (max |diff| printed).
Timed alternately (reference, fused, reference, fused, ...), median per implementation; minor
page faults per call from getrusage. Prints a table; writes OUT.json and OUT.md.

    python tools/bench_torch_op.py --out docs/results/bench_torch_op_smollm2
"""

from __future__ import annotations

import argparse
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

from eigenkv.artifacts import atomic_path, write_json
from eigenkv.malloc import malloc_mode, tune_malloc
from eigenkv.plugins.reference import ROPE_NONE, ROPE_PRE, low_rank_attention
from eigenkv.plugins.sdpa_attention import sdpa_low_rank_attention

HQ, HKV, HEAD_DIM = 9, 3, 64
IMPLEMENTATIONS = {"reference": low_rank_attention, "fused": sdpa_low_rank_attention}


def inputs(mode: str, batch: int, seq: int, key_rank: int, value_rank: int, seed: int = 0) -> tuple[dict, dict]:
    """Prefill inputs (cache = the sequence, full) for `mode`: pre (rank keys rebuilt and rotated in
    the op), joint (rank-space queries and keys), uncompressed (rotated head_dim keys)."""
    g = torch.Generator().manual_seed(seed)
    dq = {"pre": HEAD_DIM, "joint": key_rank, "uncompressed": HEAD_DIM}[mode]
    rk = {"pre": key_rank, "joint": key_rank, "uncompressed": HEAD_DIM}[mode]
    rv = HEAD_DIM if mode == "uncompressed" else value_rank
    positions = torch.arange(seq).expand(batch, seq)
    x = dict(query=torch.randn(batch, HQ, seq, dq, generator=g), key_cache=torch.randn(batch, HKV, seq, rk, generator=g),
             value_cache=torch.randn(batch, HKV, seq, rv, generator=g), cache_lengths=torch.full((batch,), seq),
             query_positions=positions)
    kw = dict(scale=HEAD_DIM ** -0.5, slot_positions=positions[:, None, :].expand(batch, HKV, seq))
    if mode == "pre":
        angles = torch.arange(seq, dtype=torch.float64)[:, None] * 10000.0 ** (-torch.arange(0, HEAD_DIM, 2) / HEAD_DIM)
        angles = torch.cat((angles, angles), -1)
        kw.update(rope_mode=ROPE_PRE, key_up=torch.randn(HKV, rk, HEAD_DIM, generator=g) / rk ** 0.5,
                  rope_cos=angles.cos().float(), rope_sin=angles.sin().float())
    else:
        kw["rope_mode"] = ROPE_NONE
    return x, kw


def run_once(fn, x: dict, kw: dict, backward: bool) -> None:
    if not backward:
        with torch.no_grad():
            fn(**x, **kw)
        return
    leaves = {k: x[k].clone().requires_grad_() for k in ("query", "key_cache", "value_cache")}
    fn(**{**x, **leaves}, **kw).sum().backward()


def measure(x: dict, kw: dict, backward: bool, repeats: int) -> dict:
    """name -> (median ms, minor faults per call), the implementations alternated call by call."""
    times = {n: [] for n in IMPLEMENTATIONS}
    faults = {n: 0 for n in IMPLEMENTATIONS}
    for fn in IMPLEMENTATIONS.values():
        run_once(fn, x, kw, backward)  # warm-up
    for _ in range(repeats):
        for name, fn in IMPLEMENTATIONS.items():
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t0 = time.perf_counter()
            run_once(fn, x, kw, backward)
            times[name].append(time.perf_counter() - t0)
            faults[name] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
    return {n: (1e3 * statistics.median(times[n]), faults[n] // repeats) for n in IMPLEMENTATIONS}


def max_diff(x: dict, kw: dict) -> float:
    """max |fused float32 - reference float64|."""
    f64 = lambda d: {k: (v.double() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in d.items()}  # noqa: E731
    with torch.no_grad():
        ref = low_rank_attention(**f64(x), **f64(kw))
        return float((sdpa_low_rank_attention(**x, **kw).double() - ref).abs().max())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modes", default="pre,joint,uncompressed")
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--seqs", default="256,1024", help="prefill lengths in tokens")
    ap.add_argument("--key-rank", type=int, default=32)
    ap.add_argument("--value-rank", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--backward", action="store_true", help="also time forward + backward (healing)")
    ap.add_argument("--out", default="docs/results/bench_torch_op_smollm2")
    args = ap.parse_args()
    modes = args.modes.split(",")
    if not set(modes) <= {"pre", "joint", "uncompressed"} or args.repeats < 1:
        ap.error("--modes takes pre, joint, uncompressed (comma-separated); --repeats must be >= 1")
    tune_malloc()
    rows = []
    for mode in modes:
        for batch in map(int, args.batches.split(",")):
            for seq in map(int, args.seqs.split(",")):
                x, kw = inputs(mode, batch, seq, args.key_rank, args.value_rank)
                for backward in ((False, True) if args.backward else (False,)):
                    m = measure(x, kw, backward, args.repeats)
                    rows.append({"mode": mode, "batch": batch, "seq": seq, "pass": "fwd+bwd" if backward else "fwd",
                                 "reference_ms": round(m["reference"][0], 4), "fused_ms": round(m["fused"][0], 4),
                                 "speedup": round(m["reference"][0] / m["fused"][0], 3),
                                 "reference_faults": m["reference"][1], "fused_faults": m["fused"][1],
                                 "fused_max_abs_diff_vs_float64": max_diff(x, kw)})
                    r = rows[-1]
                    print(f"{mode:12s} B{batch} S{seq:5d} {r['pass']:7s} reference {r['reference_ms']:9.2f} ms  "
                          f"fused {r['fused_ms']:8.2f} ms  x{r['speedup']:.2f}  faults {r['reference_faults']} -> "
                          f"{r['fused_faults']}  diff {r['fused_max_abs_diff_vs_float64']:.1e}", flush=True)
    lines = ["| mode | batch | tokens | pass | reference ms | fused ms | speed-up | faults/call ref → fused | max abs diff vs float64 |",
             "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['mode']} | {r['batch']} | {r['seq']} | {r['pass']} | {r['reference_ms']:.2f} | {r['fused_ms']:.2f} | "
              f"{r['speedup']:.2f}x | {r['reference_faults']} → {r['fused_faults']} | {r['fused_max_abs_diff_vs_float64']:.1e} |"
              for r in rows]
    table = "\n".join(lines)
    print(table)
    meta = {"command": "python " + " ".join(sys.argv),
            "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} torch threads, torch {torch.__version__}, "
                       f"malloc {malloc_mode()}",
            "shapes": {"Hq": HQ, "Hkv": HKV, "head_dim": HEAD_DIM, "key_rank": args.key_rank,
                       "value_rank": args.value_rank, "step": "prefill, the cache is the sequence"},
            "median_of": args.repeats, "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out.with_suffix(".json"), meta)
    with atomic_path(out.with_suffix(".md")) as tmp:
        tmp.write_text(f"Command: `{meta['command']}` on {meta['machine']}; ranks K{args.key_rank}/V{args.value_rank} "
                       f"(joint, pre) vs head_dim {HEAD_DIM}; median of {args.repeats}, implementations alternated.\n\n"
                       f"{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
