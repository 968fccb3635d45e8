"""Where the `pre` engine's per-row attention pays: each `pre`-mode formulation of the ORT backend
(engines/ort_fused.py) timed on ragged batches, decode steps and prefill chunks, side by side.

    python tools/bench_pre_ragged.py out/smollm2.onnx --batches 4,8 --longest 1024,2048 \\
        --fills 0.4,0.5,0.6,0.67,0.75,0.85,1 --out docs/results/bench_pre_ragged

`attention-by-step` (the default) runs a step over the (sequence, KV head) rows (`attention-rows`,
an ONNX Scan: each row rebuilds and rotates only its own n_b valid keys) when the batch is ragged
(`ort_fused.by_step_branch`: 3·Σn_b < 2·B·max n_b, or 5·Σn_b < 4·B·max n_b for a decode step
over a buffer not nearly full), and otherwise one batched Attention over the first max n_b slots
of every row (`attention-valid`, or `attention` over the whole buffers when max n_b >= 4/5 of
them). This measures those thresholds: for each batch B, longest row L and fill f = Σn_b / (B·L) (`--fills`:
the valid slots before the step as a share of the batched form's B·L; the table reports it after
the step's write, what the If sees), one engine per formulation is built from the same export and
timed on the same cache. The buffers hold L + S slots (S the step's tokens), so the whole-buffer
branch applies, or with `--slack X` L·(1 + X) + S slots (a buffer sized for the generation, the
sliced branch's case).

The cache is synthetic, not prefilled (a prefill of 8 × 2k takes minutes here): rank-space keys
and values drawn from N(0, 0.1²), row b holding n_b tokens at positions 0..n_b-1, n_b spread
evenly from L down to L·(2f-1) for f >= 1/2, or one row of L and the rest equal below that. A
decode step appends one token per row at position n_b, a prefill step `--chunk` tokens; the
lengths are not advanced, so every timed step sees the same fill. Timings: after one untimed step per
engine, `--blocks` blocks of `--steps` steps rotate over the engines (block k starts with engine
k mod E); per engine the p50 of its timed steps in ms. Each engine's first timed step's logits
are checked against the `attention-rows` engine's on the same cache (max |diff| reported; they
are the same exact math, fp32).

Bad values (unreadable export, a non-`pre` export, fills outside (0, 1] or out of reach at a batch
(below 1/B; batch 1 only at fill 1), counts below 1, lengths past the model's positions, negative
slack, malformed --chunk-points) are a one-line error, exit 2, before anything is built or
written (argparse's own usage errors for unparsable numbers are its two lines, exit 2).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from eigenkv.engines.ort_fused import by_step_branch

FORMULATIONS = ("attention-rows", "attention-valid", "attention", "attention-by-step")


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",")]


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",")]


def ragged_lengths(batch: int, longest: int, fill: float) -> np.ndarray:
    """int64 [batch] valid slots per row with max = `longest` and sum ≈ fill · batch · longest:
    evenly spread from `longest` down to longest·(2·fill - 1) when fill >= 1/2, else one row of
    `longest` and the others equal. Every row holds at least one slot (tokens)."""
    if batch == 1:
        return np.array([longest], np.int64)
    if fill >= 0.5:
        n = np.linspace(longest, longest * (2 * fill - 1), batch)
    else:
        n = np.full(batch, (fill * batch - 1) * longest / (batch - 1))
        n[0] = longest
    return np.maximum(np.rint(n), 1).astype(np.int64)


def fill_cache(cache, lengths: np.ndarray, rng: np.random.Generator) -> None:
    """Synthetic cache content: every layer's row b holds lengths[b] tokens at positions 0..n-1."""
    for buf in cache.buffers:
        buf[...] = rng.standard_normal(buf.shape, dtype=np.float32) * 0.1
    for i in range(cache.layout.n_layers):
        pos = cache.positions(i)
        pos[...] = 0
        for b, n in enumerate(lengths):
            pos[b, :, :n] = np.arange(n)
    cache.lengths[...] = lengths[None, :]


def time_config(engines: dict, batch: int, lengths: np.ndarray, width: int, steps: int, blocks: int,
                vocab_hi: int, seed: int, slack: float = 0.0) -> dict:
    """One (batch, lengths, step width) point: per engine p50 ms over its timed steps, the branch
    `attention-by-step` takes, and max |logits - rows' logits| on the first step."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(100, vocab_hi, (batch, width))
    positions = lengths[:, None] + np.arange(width)[None, :]
    slots = int(round(int(lengths.max()) * (1 + slack))) + width
    caches, first = {}, {}
    for name, engine in engines.items():
        cache = engine.new_cache(batch, slots)
        fill_cache(cache, lengths, np.random.default_rng(seed))
        first[name] = engine.step(cache, ids, positions)  # untimed: warm-up and the parity check
        caches[name] = cache
    times = {name: [] for name in engines}
    names = list(engines)
    for k in range(blocks):
        for name in names[k % len(names):] + names[:k % len(names)]:
            engine, cache = engines[name], caches[name]
            for _ in range(steps):
                t = time.perf_counter()
                engine.step(cache, ids, positions)
                times[name].append(time.perf_counter() - t)
    ref = first.get("attention-rows", next(iter(first.values())))
    after = lengths + width
    return {"batch": batch, "lengths": lengths.tolist(), "width": width, "slots": slots,
            "fill": round(float(after.sum()) / (batch * int(after.max())), 4),
            "by_step_branch": by_step_branch(after, slots, width),
            "p50_ms": {n: round(float(np.median(t)) * 1e3, 2) for n, t in times.items()},
            "steps_ms": {n: [round(v * 1e3, 2) for v in t] for n, t in times.items()},
            "max_abs_diff_vs_rows": {n: float(np.abs(f - ref).max()) for n, f in first.items()}}


def _table(points: list[dict], names: list[str]) -> str:
    head = ("| step | batch | longest | slots | fill | by-step picks | " + " | ".join(f"{n} p50 ms" for n in names)
            + " | rows / best batched |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for p in points:
        ms = p["p50_ms"]
        batched = min(v for n, v in ms.items() if n in ("attention", "attention-valid"))
        step = "decode" if p["width"] == 1 else f"chunk {p['width']}"
        lines.append(f"| {step} | {p['batch']} | {max(p['lengths'])} | {p['slots']} | {p['fill']:.3f} | {p['by_step_branch']} | "
                     + " | ".join(f"{ms[n]:.1f}" for n in names) + f" | {ms['attention-rows'] / batched:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("graph", type=Path, help="a `pre`-mode export (export-eigen's model.onnx)")
    ap.add_argument("--batches", type=_ints, default=[4, 8])
    ap.add_argument("--longest", type=_ints, default=[1024, 2048], help="longest row's valid slots (tokens)")
    ap.add_argument("--fills", type=_floats, default=[0.4, 0.5, 0.6, 0.67, 0.75, 0.85, 1.0])
    ap.add_argument("--chunk", type=int, default=0, help="also time prefill steps of this many tokens (0: decode only)")
    ap.add_argument("--chunk-points", default="8:1024:0.5,8:1024:0.67,8:1024:0.85",
                    help="batch:longest:fill points of the prefill steps (default: %(default)s)")
    ap.add_argument("--steps", type=int, default=4, help="steps per block (decode)")
    ap.add_argument("--chunk-steps", type=int, default=1, help="steps per block (prefill chunks)")
    ap.add_argument("--blocks", type=int, default=3)
    ap.add_argument("--slack", type=float, default=0.0,
                    help="buffer slots beyond the longest row's, as a fraction of it (default 0)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, help="folder for result.json and result.md")
    args = ap.parse_args(argv)

    from eigenkv.engines import ort
    from eigenkv.errors import EigenError
    from eigenkv.manifest import read_manifest
    from eigenkv.plugins.spec import RopeMode
    try:
        manifest = read_manifest(args.graph)
        if manifest.rope_mode != RopeMode.PRE:
            raise EigenError(f"{args.graph} is a {manifest.rope_mode.value} export; this measures `pre` exports "
                             "(export-eigen --rope-mode pre, the default)")
        counts = {"--batches": args.batches, "--longest": args.longest, "--steps": [args.steps],
                  "--chunk-steps": [args.chunk_steps], "--blocks": [args.blocks], "--threads": [args.threads]}
        for flag, values in counts.items():
            if min(values) < 1:
                raise EigenError(f"{flag} must be >= 1, got {values if len(values) > 1 else values[0]}")
        if args.chunk < 0:
            raise EigenError(f"--chunk must be >= 0 tokens (0: decode only), got {args.chunk}")
        points = []
        for p in args.chunk_points.split(",") if args.chunk else []:
            try:
                b, n, f = p.split(":")
                points.append((int(b), int(n), float(f)))
            except ValueError:
                raise EigenError(f"--chunk-points takes batch:longest:fill,..., got {p!r}") from None
            if min(points[-1][:2]) < 1:
                raise EigenError(f"--chunk-points: batch and longest row must be >= 1, got {p!r}")
        for batch, fill in [(b, f) for b in args.batches for f in args.fills] + [(b, f) for b, _, f in points]:
            if not 0 < fill <= 1:
                raise EigenError(f"--fills and --chunk-points fills must lie in (0, 1], got {fill}")
            if fill * batch < 1 or (batch == 1 and fill < 1):
                raise EigenError(f"fill {fill} is out of reach at batch {batch} (the longest row alone fills "
                                 f"1/{batch}; batch 1 is never ragged: fill 1)")
        if args.slack < 0:
            raise EigenError(f"--slack must be >= 0, got {args.slack}")
        widest = int(round(max([*args.longest, *(int(p[1]) for p in points)]) * (1 + args.slack))) + max(args.chunk, 1)
        if widest > manifest.layout.max_seq_len:
            raise EigenError(f"longest row + step = {widest} tokens is past the export's {manifest.layout.max_seq_len} positions")
    except EigenError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    engines = {}
    with tempfile.TemporaryDirectory(prefix="bench-pre-ragged-") as tmp:
        for name in FORMULATIONS:
            folder = Path(tmp) / name
            folder.mkdir()
            t = time.perf_counter()
            fields = ort.build(args.graph, manifest, folder, plan={RopeMode.PRE: name})
            layers = fields["runtime"]["attention_rewrite"].get("layers", {})
            if name not in layers:
                print(f"error: the {name} build rewrote no layer into it ({layers})", file=sys.stderr)
                return 1
            engines[name] = ort.OrtEngine(folder / fields["model_file"], manifest.layout, manifest.io,
                                          manifest.precision, {"intra_op_num_threads": args.threads})
            print(f"built {name} in {time.perf_counter() - t:.0f} s: {layers}", flush=True)
    vocab_hi = min(engines["attention-rows"].vocab_size, 40000)
    results, seed = [], 0
    configs = [(b, n, f, 1) for b in args.batches for n in args.longest for f in args.fills]
    configs += [(b, n, f, args.chunk) for b, n, f in points]
    for batch, longest, fill, width in configs:
        seed += 1
        steps = args.steps if width == 1 else args.chunk_steps
        p = time_config(engines, batch, ragged_lengths(batch, longest, fill), width, steps, args.blocks, vocab_hi, seed,
                        args.slack)
        results.append(p)
        print(_table([p], list(engines)).splitlines()[-1], flush=True)
    table = _table(results, list(engines))
    print(table)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        meta = {"command": "python " + shlex.join(["tools/bench_pre_ragged.py", *(sys.argv[1:] if argv is None else argv)]),
                "machine": f"{platform.machine()}, {os.cpu_count()} cores, {args.threads} threads",
                "onnxruntime": __import__("onnxruntime").__version__, "date": time.strftime("%Y-%m-%d %H:%M"),
                "key_ranks": list(manifest.layout.key_ranks), "value_ranks": list(manifest.layout.value_ranks)}
        for path, text in ((args.out / "result.json", json.dumps({**meta, "points": results}, indent=1)),
                           (args.out / "result.md", f"`{meta['command']}` ({meta['machine']}, {meta['date']})\n\n{table}\n")):
            tmp = path.with_suffix(path.suffix + ".tmp")
            tmp.write_text(text)
            tmp.replace(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
