"""Peak resident memory of `eigenkv run` with and without eviction: one process per setting.

    python tools/peak_memory.py --engine out/engines/base --batch 8 --context 4096 \\
        --setting "none=" --setting "keep 0.25=--evict key-norm --keep 0.25 --recent 64 --evict-headroom 256" \\
        --out docs/results/peak_memory_smollm2

Each setting runs `eigenkv run ENGINE` (eigenkv.cli.main) in its own fresh Python process on the
same `batch` prompts of about `context` tokens (slices of the built-in wiki text, decoded back to
text), with the same prefill chunk, and reports that process's peak RSS: VmHWM from
/proc/self/status, read by the child itself when the run ends (Linux; a child's getrusage
ru_maxrss would start at the parent's RSS at fork time). The KV buffers column is what `generate`
allocates for the setting and the prompts' real token counts (same capacities code, computed
here, not measured). Writes OUT.json and OUT.md (command, machine); exit 2 and nothing written
if a run fails.
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

from eigenkv.errors import EigenError


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


def prompts(engine: Path, batch: int, context: int) -> tuple[list[str], int]:
    """`batch` texts of about `context` tokens each (consecutive slices of the built-in wiki text)
    -> (texts, the longest one's token count as `eigenkv run` tokenizes it)."""
    from eigenkv.cli import _encode, _load_tokenizer
    from eigenkv.engines.config import EngineConfig
    from eigenkv.exporter.sources import read_text
    tok = _load_tokenizer(EngineConfig.load(engine).source)
    ids = tok(read_text("wiki"), add_special_tokens=False)["input_ids"]
    if len(ids) < batch * context:
        ids = ids * (batch * context // len(ids) + 1)
    texts = [tok.decode(ids[b * context:(b + 1) * context]) for b in range(batch)]
    return texts, max(len(_encode(tok, t, chat=False)) for t in texts)


def kv_bytes(engine, evictor, batch: int, width: int, new_tokens: int, chunk: int) -> int:
    """The KV buffers `generate` allocates for a setting (its evictor, or None): prompts of `width`
    tokens (the longest) plus `new_tokens`, prefilled `chunk` tokens at a time (the same capacities code)."""
    from eigenkv.engines.runtime import capacities
    context = max(width + new_tokens, min(width + 1, engine.max_seq_len))
    return engine.new_cache(batch, capacities(engine, context, chunk, evictor)).nbytes


# the child: eigenkv's CLI in-process, then its own peak RSS (VmHWM, kB) as the last stderr line
CHILD = """import sys
from eigenkv.cli import main
rc = main(sys.argv[1:])
hwm = [line.split()[1] for line in open('/proc/self/status') if line.startswith('VmHWM:')]
print(f'VmHWM_kB {hwm[0] if hwm else -1}', file=sys.stderr)
sys.exit(rc)
"""


def run_one(argv: list[str]) -> tuple[int, float, float]:
    """`eigenkv` argv in a fresh process -> (exit code, its peak RSS MiB, wall s); exit code -1 when
    the child exited 0 but reported no VmHWM (not Linux)."""
    import tempfile
    with tempfile.TemporaryFile() as err:  # a file, not a pipe: a chatty child cannot block on it
        t0 = time.perf_counter()
        rc = subprocess.run([sys.executable, "-c", CHILD, *argv], stdout=subprocess.DEVNULL, stderr=err).returncode
        wall = time.perf_counter() - t0
        err.seek(0)
        text = err.read().decode(errors="replace")
    hwm = [line.split()[1] for line in text.splitlines() if line.startswith("VmHWM_kB ")]
    if rc or not hwm or hwm[-1] == "-1":
        print(text[-2000:], file=sys.stderr)
        return rc or -1, float("nan"), wall
    return rc, int(hwm[-1]) / 1024, wall


def check_settings(engine_dir: Path, settings: list[str]):
    """Parse every setting before any run -> (the loaded engine, [(label, ARGS as text, ARGS split,
    its evictor or None)]); EigenError (one line) for a setting whose `eigenkv run` arguments are invalid."""
    from eigenkv.cli import _eviction, build_parser
    from eigenkv.engines.backend import load_engine
    from eigenkv.engines.eviction import make_evictor
    engine, parsed = load_engine(engine_dir), []
    for setting in settings:
        if "=" not in setting:
            raise EigenError(f"--setting takes LABEL=ARGS (ARGS may be empty: 'none='), got {setting!r}")
        label, _, extra = setting.partition("=")
        try:
            extra_args = shlex.split(extra)
            evictor = make_evictor(_eviction(build_parser().parse_args(["run", str(engine_dir), "--prompt", "x",
                                                                        *extra_args])), engine)
        except (EigenError, ValueError) as e:  # ValueError: shlex, e.g. an unbalanced quote
            raise EigenError(f"setting {label!r}: {e}") from None
        parsed.append((label, extra, extra_args, evictor))
    return engine, parsed


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        engine, settings = check_settings(args.engine, args.setting)
    except EigenError as e:
        print(f"peak_memory: error: {e}", file=sys.stderr)
        return 2
    texts, width = prompts(args.engine, args.batch, args.context)
    rows = []
    for label, extra, extra_args, evictor in settings:
        run_argv = ["run", str(args.engine), "--max-new-tokens", str(args.max_new_tokens), "--ignore-eos",
                    "--no-stream", "--prefill-chunk", str(args.prefill_chunk), *extra_args]
        for t in texts:
            run_argv += ["--prompt", t]
        rc, rss, wall = run_one(run_argv)
        if rc:
            why = "reported no peak RSS (VmHWM needs Linux's /proc)" if rc == -1 else f"failed (exit {rc})"
            print(f"peak_memory: error: `eigenkv run` {why} for {label!r}, see above", file=sys.stderr)
            return 2
        kv = kv_bytes(engine, evictor, args.batch, width, args.max_new_tokens, args.prefill_chunk)
        rows.append({"setting": label, "args": extra, "peak_rss_mib": round(rss, 1), "seconds": round(wall, 1),
                     "kv_bytes": kv, "kv_mib": round(kv / 2**20, 1)})
        print(json.dumps(rows[-1]), flush=True)
    command = "python tools/peak_memory.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    from eigenkv.malloc import not_tunable
    reason = not_tunable()  # what the children's CLI did with glibc malloc (eigenkv/malloc.py)
    malloc = "tuned by eigenkv/malloc.py" if reason is None else f"glibc default ({reason})"
    result = {"command": command, "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores, "
              f"{platform.platform()}", "batch": args.batch, "context": args.context, "prompt_tokens_max": width,
              "malloc": malloc, "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    from eigenkv.artifacts import atomic_path, write_json
    write_json(Path(f"{out}.json"), result)
    lines = ["| setting | `eigenkv run` arguments | peak RSS MiB | KV buffers MiB (computed) | wall s |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['setting']} | `{r['args']}` | {r['peak_rss_mib']:.0f} | {r['kv_mib']:.0f} | {r['seconds']:.0f} |"
              for r in rows]
    with atomic_path(Path(f"{out}.md")) as tmp:
        tmp.write_text(f"Command: `{command}` on {result['machine']}; batch {args.batch}, prompts of about "
                       f"{args.context} tokens (longest {width}); malloc: {malloc}.\n\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
