"""Peak resident memory of `eigenkv run` with and without eviction: one process per setting.

    python tools/peak_memory.py --engine out/engines/base --batch 8 --context 4096 \\
        --setting "none=" --setting "keep 0.25=--evict key-norm --keep 0.25 --recent 64 --evict-headroom 256" \\
        --out docs/results/peak_memory_smollm2

Each setting runs `eigenkv run ENGINE` in its own process on the same `batch` prompts of
`context` tokens (slices of the built-in wiki text, decoded back to text), with the same
prefill chunk, and reports that process's peak RSS (os.wait4's ru_maxrss) and wall time, so
the difference between settings is what the KV buffers and eviction add. The engine's KV bytes
for the setting (the buffers `generate` allocates) are printed beside it.
Writes OUT.json and OUT.md (command, machine).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engine", required=True, type=Path, metavar="DIR")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--context", type=int, default=4096, help="prompt tokens per sequence (about: re-tokenized)")
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--prefill-chunk", type=int, default=256, help="the same for every setting")
    ap.add_argument("--setting", action="append", required=True, metavar="LABEL=ARGS",
                    help="a row: label and extra `eigenkv run` arguments (repeat; empty ARGS: no eviction)")
    ap.add_argument("--out", required=True, metavar="PATH", help="writes PATH.json and PATH.md")
    return ap.parse_args(argv)


def prompts(engine: Path, batch: int, context: int) -> list[str]:
    """`batch` texts of about `context` tokens each: consecutive slices of the built-in wiki text."""
    from transformers import AutoTokenizer

    from eigenkv.engines.config import EngineConfig
    from eigenkv.exporter.sources import read_text
    source = EngineConfig.load(engine).source
    tok = AutoTokenizer.from_pretrained(source.directory, gguf_file=source.gguf_file)
    ids = tok(read_text("wiki"), add_special_tokens=False)["input_ids"]
    if len(ids) < batch * context:
        ids = ids * (batch * context // len(ids) + 1)
    return [tok.decode(ids[b * context:(b + 1) * context]) for b in range(batch)]


def kv_bytes(engine_dir: Path, extra: list[str], batch: int, context: int, chunk: int) -> int:
    """The KV buffers `generate` allocates for this setting and `context` tokens (prompt + new),
    prefilled `chunk` tokens at a time (the same capacities code)."""
    from eigenkv.cli import _eviction, build_parser
    from eigenkv.engines.backend import load_engine
    from eigenkv.engines.eviction import make_evictor
    from eigenkv.engines.runtime import capacities
    args = build_parser().parse_args(["run", str(engine_dir), "--prompt", "x", *extra])
    engine = load_engine(engine_dir)
    evictor = make_evictor(_eviction(args), engine)
    return engine.new_cache(batch, capacities(engine, context, chunk, evictor)).nbytes


def run_one(cmd: list[str]) -> tuple[int, float, float]:
    """-> (exit code, peak RSS MiB, wall s) of one child process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        print(proc.stderr.read().decode(errors="replace")[-2000:], file=sys.stderr)
    return proc.returncode, usage.ru_maxrss / 1024, wall


def main(argv=None) -> int:
    args = parse_args(argv)
    texts = prompts(args.engine, args.batch, args.context)
    rows = []
    for setting in args.setting:
        label, _, extra = setting.partition("=")
        extra_args = shlex.split(extra)
        cmd = [sys.executable, "-m", "eigenkv.cli", "run", str(args.engine), "--max-new-tokens",
               str(args.max_new_tokens), "--ignore-eos", "--no-stream", "--prefill-chunk", str(args.prefill_chunk),
               *extra_args]
        for t in texts:
            cmd += ["--prompt", t]
        rc, rss, wall = run_one(cmd)
        if rc:
            print(f"peak_memory: `eigenkv run` failed for {label!r} (exit {rc})", file=sys.stderr)
            return 2
        kv = kv_bytes(args.engine, extra_args, args.batch, args.context + args.max_new_tokens, args.prefill_chunk)
        rows.append({"setting": label, "args": extra, "peak_rss_mib": round(rss, 1), "seconds": round(wall, 1),
                     "kv_bytes": kv, "kv_mib": round(kv / 2**20, 1)})
        print(json.dumps(rows[-1]), flush=True)
    command = "python tools/peak_memory.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    result = {"command": command, "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores, "
              f"{platform.platform()}", "batch": args.batch, "context": args.context, "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    from eigenkv.artifacts import write_json
    write_json(out.with_suffix(".json"), result)
    lines = ["| setting | `eigenkv run` arguments | peak RSS MiB | KV buffers MiB | wall s |", "|---|---|---|---|---|"]
    lines += [f"| {r['setting']} | `{r['args']}` | {r['peak_rss_mib']:.0f} | {r['kv_mib']:.0f} | {r['seconds']:.0f} |"
              for r in rows]
    out.with_suffix(".md").write_text(f"Command: `{command}` on {result['machine']}; batch {args.batch}, "
                                      f"prompts of about {args.context} tokens.\n\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
