"""One helper for the tools that install or build things in subprocesses (optimum_baseline.py,
kvpress_peer.py, llamacpp_peer.py): run a command, keep its output, fail in one line."""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path


def run_logged(cmd: list[str], env: dict | None = None, log: Path | None = None, error=RuntimeError,
               shown: int = 4) -> str:
    """Run `cmd` with stdout and stderr together -> its output (also written to `log`). A non-zero
    exit raises `error` with one line: the command's first `shown` words, the exit code and the
    last meaningful output line (pip's "WARNING: ..." lines skipped), and where the full output is."""
    with tempfile.TemporaryFile("w+") as out:
        code = subprocess.call(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        out.seek(0)
        text = out.read()
    if log is not None:
        log.write_text(text)
    if code != 0:
        lines = [ln for ln in text.strip().splitlines() if ln.strip() and not ln.startswith("WARNING: ")]
        where = f" (full output: {log})" if log is not None else ""
        head = " ".join(Path(c).name if i == 0 else c for i, c in enumerate(cmd[:shown]))
        raise error(f"`{head} ...` failed (exit {code}): {(lines or ['no output'])[-1][:300]}{where}")
    return text
