"""Microbenchmark: the `eigen::LowRankAttention` op alone (its ONNX function, ONNX Runtime CPU)
for one decode step, compressed vs uncompressed, at several contexts and batches.

    python tools/bench_op.py --key-rank 13 --value-rank 52 --out docs/results/bench_op_smollm2

Shapes follow the default model (9 query heads, 3 KV heads, head_dim 64). `pre` is the
paper's mode (cache rank-r pre-RoPE keys; the op rebuilds and rotates them); `joint`
scores in rank space; `uncompressed` caches rotated head_dim keys and values.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from eigenkv.engines.ort import make_session
from eigenkv.plugins import spec
from eigenkv.plugins.onnx_function import attach_function, build_function


def op_model(rope_mode: int) -> onnx.ModelProto:
    """A one-node graph: every spec input is a graph input (unused ones omitted)."""
    used = ["query", "key_cache", "value_cache", "cache_lengths", "query_positions"]
    if rope_mode:
        used += ["key_up", "rope_cos", "rope_sin"]
    types = {t.name: (TensorProto.INT32 if t.dtype == "int32" else TensorProto.FLOAT) for t in spec.INPUTS}
    inputs = [t.name if t.name in used else "" for t in spec.INPUTS]
    while inputs[-1] == "":
        inputs.pop()
    node = helper.make_node(spec.NAME, inputs, ["attn"], domain=spec.DOMAIN, scale=0.125, rope_mode=rope_mode,
                            causal=1, version=spec.VERSION, **spec.PARSER_ATTRIBUTES)
    graph = helper.make_graph([node], "op", [helper.make_tensor_value_info(n, types[n], None) for n in used],
                              [helper.make_tensor_value_info("attn", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 24)], ir_version=10)
    attach_function(model, build_function(rope_mode=rope_mode, alibi=False, slot_positions=False))
    return model


def op_sessions(modes=(0, 1)) -> dict:
    """rope_mode -> an ONNX Runtime session of `op_model(rope_mode)`, made by the engines'
    `make_session` (CPU provider, the engines' session options: ORT_ENABLE_ALL, default threads)."""
    with tempfile.TemporaryDirectory(prefix="bench-op-") as tmp:
        paths = {m: Path(tmp) / f"op_rope{m}.onnx" for m in modes}
        for m, path in paths.items():
            onnx.save_model(op_model(m), str(path))
        return {m: make_session(path) for m, path in paths.items()}  # loaded: the files may go


def feeds(batch, ctx, hq, hkv, d, rk, rv, rope_mode, rng) -> dict:
    f = {"query": rng.standard_normal((batch, hq, 1, d if rope_mode else rk), dtype=np.float32),
         "key_cache": rng.standard_normal((batch, hkv, ctx, rk), dtype=np.float32),
         "value_cache": rng.standard_normal((batch, hkv, ctx, rv), dtype=np.float32),
         "cache_lengths": np.full(batch, ctx, np.int32),
         "query_positions": np.full((batch, 1), ctx - 1, np.int32)}
    if rope_mode:
        f["key_up"] = rng.standard_normal((1, rk, d), dtype=np.float32)
        f["rope_cos"] = rng.standard_normal((ctx, d), dtype=np.float32)
        f["rope_sin"] = rng.standard_normal((ctx, d), dtype=np.float32)
    return f


def time_op(session, inputs, repeats: int) -> float:
    session.run(None, inputs)  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        session.run(None, inputs)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--key-rank", type=int, default=13)
    ap.add_argument("--value-rank", type=int, default=52)
    ap.add_argument("--contexts", default="512,1024,2048,4096")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--out", default="docs/results/bench_op_smollm2")
    args = ap.parse_args()
    hq, hkv, d = 9, 3, 64
    rng = np.random.default_rng(0)
    sessions = op_sessions()
    variants = {"uncompressed": (0, d, d), "pre": (1, args.key_rank, args.value_rank),
                "joint": (0, args.key_rank, args.value_rank)}
    rows = []
    for batch in map(int, args.batches.split(",")):
        for ctx in map(int, args.contexts.split(",")):
            ms = {name: 1e3 * time_op(sessions[mode], feeds(batch, ctx, hq, hkv, d, rk, rv, mode, rng), args.repeats)
                  for name, (mode, rk, rv) in variants.items()}
            rows.append({"batch": batch, "context": ctx, **{f"{k}_ms": round(v, 4) for k, v in ms.items()},
                         "pre_speedup": round(ms["uncompressed"] / ms["pre"], 3),
                         "joint_speedup": round(ms["uncompressed"] / ms["joint"], 3)})
            print(json.dumps(rows[-1]), flush=True)
    lines = ["| batch | context | uncompressed ms | pre ms (speed-up) | joint ms (speed-up) |", "|---|---|---|---|---|"]
    lines += [f"| {r['batch']} | {r['context']} | {r['uncompressed_ms']:.3f} | {r['pre_ms']:.3f} "
              f"({r['pre_speedup']:.2f}x) | {r['joint_ms']:.3f} ({r['joint_speedup']:.2f}x) |" for r in rows]
    table = "\n".join(lines)
    print(table)
    meta = {"command": "python " + " ".join(sys.argv), "machine": f"{platform.machine()} CPU, onnxruntime "
            f"{ort.__version__} (default threads)", "shapes": {"Hq": hq, "Hkv": hkv, "head_dim": d,
            "key_rank": args.key_rank, "value_rank": args.value_rank, "step": "decode, 1 query token"},
            "median_of": args.repeats, "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
    out.with_suffix(".md").write_text(f"Command: `{meta['command']}` on {meta['machine']}; ranks K{args.key_rank}/"
                                      f"V{args.value_rank} vs head_dim {d}; median of {args.repeats}.\n\n{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
