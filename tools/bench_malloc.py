"""What eigenkv/malloc.py's glibc settings buy: one eigenkv command run in fresh processes with
glibc's default malloc (EIGENKV_MALLOC=default) and with the tuned one, alternated (A B B A ...),
each timed with its own rusage (os.wait4): wall, user and kernel CPU seconds, minor page faults,
peak RSS (ru_maxrss: the child's, which on Linux starts at this small parent's RSS). The children
get an environment without MALLOC_*, GLIBC_TUNABLES or PYTHONMALLOC, so "tuned" runs are tuned
(checked before the first run). Prints a markdown table and writes JSON + md.

    python tools/bench_malloc.py --rounds 2 --out docs/results/bench_malloc_compress
    python tools/bench_malloc.py -- compress -o {tmp}/c --kv-ratio 0.5 --eval-tokens 0 --heal-steps 10

`{tmp}` in the command is replaced by a fresh, empty temporary folder per run (removed afterwards).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from eigenkv.artifacts import atomic_path, write_json
from eigenkv.malloc import not_tunable

DEFAULT = ["compress", "-o", "{tmp}/c", "--kv-ratio", "0.5", "--eval-tokens", "0", "--no-progress"]


def child_env(tuned: bool) -> dict:
    """The environment of one run: ours without anything that sets malloc, plus the opt-out for A."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("MALLOC_") and k not in ("EIGENKV_MALLOC", "GLIBC_TUNABLES", "PYTHONMALLOC")}
    if not tuned:
        env["EIGENKV_MALLOC"] = "default"
    return env


def run_once(argv: list[str], tuned: bool) -> dict:
    """One `python -m eigenkv.cli ARGV` in a fresh process; its own rusage via os.wait4."""
    with tempfile.TemporaryDirectory(prefix="bench_malloc_") as tmp, tempfile.TemporaryFile("w+") as log:
        cmd = [sys.executable, "-m", "eigenkv.cli"] + [a.replace("{tmp}", tmp) for a in argv]
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=child_env(tuned))
        _, status, ru = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            log.seek(0)
            raise SystemExit(f"bench_malloc: `{shlex.join(cmd)}` exited {proc.returncode}:\n{log.read()[-2000:]}")
    return {"malloc": "tuned" if tuned else "default", "wall_s": round(wall, 2), "user_s": round(ru.ru_utime, 2),
            "sys_s": round(ru.ru_stime, 2), "minor_faults": ru.ru_minflt, "peak_rss_mib": ru.ru_maxrss // 1024}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2, help="pairs of runs, ordered A B, B A, A B, ... (default 2)")
    ap.add_argument("--out", default=None, help="write OUT.json and OUT.md")
    ap.add_argument("command", nargs=argparse.REMAINDER, help="eigenkv arguments after `--` (default: "
                    + shlex.join(DEFAULT) + ")")
    args = ap.parse_args()
    if args.rounds < 1:
        ap.error("--rounds must be >= 1")
    argv = (args.command[1:] if args.command[:1] == ["--"] else args.command) or DEFAULT
    for tuned in (False, True):  # what eigenkv/malloc.py will decide in the children
        reason = not_tunable(child_env(tuned))
        if (reason is None) != tuned:
            ap.error(f"cannot compare: glibc malloc would be left alone in the tuned runs ({reason})" if tuned
                     else "cannot compare: EIGENKV_MALLOC=default is not honoured")
    load0 = os.getloadavg()
    runs = []
    for i in range(args.rounds):
        for tuned in ((False, True) if i % 2 == 0 else (True, False)):
            runs.append(run_once(argv, tuned))
            print(json.dumps(runs[-1]), flush=True)
    load1 = os.getloadavg()
    med = {m: {k: statistics.median(r[k] for r in runs if r["malloc"] == m)
               for k in ("wall_s", "user_s", "sys_s", "minor_faults", "peak_rss_mib")} for m in ("default", "tuned")}
    lines = ["| run | malloc | wall s | user s | kernel s | minor faults | peak RSS MiB |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {i + 1} | {r['malloc']} | {r['wall_s']:.1f} | {r['user_s']:.1f} | {r['sys_s']:.1f} | "
              f"{r['minor_faults']:,} | {r['peak_rss_mib']:,} |" for i, r in enumerate(runs)]
    lines += [f"| median | {m} | {v['wall_s']:.1f} | {v['user_s']:.1f} | {v['sys_s']:.1f} | {v['minor_faults']:,.0f} | "
              f"{v['peak_rss_mib']:,.0f} |" for m, v in med.items()]
    summary = (f"median wall: tuned / default = {med['tuned']['wall_s'] / med['default']['wall_s']:.3f}; "
               f"load average (1 min) {load0[0]:.2f} at the start, {load1[0]:.2f} at the end")
    table = "\n".join(lines) + "\n\n" + summary
    print(table)
    if args.out:
        meta = {"command": "python " + shlex.join(sys.argv), "eigenkv_command": "eigenkv " + shlex.join(argv),
                "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
                "load_average_1min": [load0[0], load1[0]], "runs": runs, "median": med}
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        write_json(out.with_suffix(".json"), meta)
        with atomic_path(out.with_suffix(".md")) as tmp:
            tmp.write_text(f"Command: `{meta['command']}` on {meta['machine']}.\n"
                           f"Each run: `{meta['eigenkv_command']}` in a fresh process.\n\n{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
