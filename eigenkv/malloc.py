"""glibc malloc settings for eigenkv's processes: keep freed tensor memory in the heap.

PyTorch frees and re-allocates buffers of the same few sizes at every layer, batch and healing
step (activations, gradients, logits). With glibc's defaults (an mmap threshold that starts at
128 KiB and follows the largest mapped block freed, up to 32 MiB, and a trim threshold of twice
it) much of that memory goes back to the kernel on `free` and is faulted in again, page by page,
on the next allocation. On this project's 2-core VM, three 2 x 512-token forward passes of the
default model took 1.3-1.8 million minor page faults and 4-5 s of kernel time against 17 s of
user time; with the settings below, 50 thousand faults and 0.1-0.3 s (`resource.getrusage`, one
torch thread; `tools/bench_malloc.py` measures whole commands).

`tune_malloc` fixes the mmap threshold at glibc's 64-bit maximum (32 MiB: larger blocks are still
mapped and unmapped), and raises the trim threshold (1 GiB) and the top pad (256 MiB) so the heap
keeps what it was given: mallopt(3)'s M_MMAP_THRESHOLD, M_TRIM_THRESHOLD and M_TOP_PAD, the knobs
the MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_ and MALLOC_TOP_PAD_ environment variables set
(all three are needed: any one alone turns the dynamic threshold off and can fault more). The
cost: freed memory stays with the process, up to the trim threshold per malloc arena (the main
one and one per thread that allocates), plus whatever fragmentation keeps below live blocks;
heaps grow in steps of at least the top pad (address space; pages count once touched). PyTorch's
CPU performance guide makes the same diagnosis and suggests jemalloc or tcmalloc through
LD_PRELOAD; these settings need nothing installed. The `eigenkv` and `export-eigen` commands and
the quality and op benchmarks under tools/ call it; EIGENKV_MALLOC=default (or off, 0) turns it off.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys

# mallopt(3) parameter numbers (glibc's malloc.h) and the values set; the mmap threshold first: it is the
# one glibc can refuse (its maximum is 512 KiB on 32-bit), and without it the other two do harm
SETTINGS = {"M_MMAP_THRESHOLD": (-3, 32 << 20), "M_TRIM_THRESHOLD": (-1, 1 << 30), "M_TOP_PAD": (-2, 256 << 20)}
OPT_OUT = "EIGENKV_MALLOC"  # EIGENKV_MALLOC=default (or off, 0) leaves glibc's settings alone
# the user's settings of the same knobs, which win: environment variables and GLIBC_TUNABLES names
USER_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")
USER_TUNABLES = ("glibc.malloc.mmap_threshold", "glibc.malloc.trim_threshold", "glibc.malloc.top_pad",
                 "glibc.malloc.mmap_max")
_MODE: str | None = None  # what tune_malloc did in this process (None: not called)


def not_tunable(environ=None) -> str | None:
    """Why `tune_malloc` would leave malloc alone in a process with this environment (None: it
    would tune it): EIGENKV_MALLOC=default/off/0, the user's own settings of these knobs
    (USER_VARIABLES, USER_TUNABLES in GLIBC_TUNABLES), or a C library other than glibc."""
    env = os.environ if environ is None else environ
    if env.get(OPT_OUT, "").strip().lower() in ("default", "off", "0"):
        return f"{OPT_OUT}={env[OPT_OUT]}"
    tunables = env.get("GLIBC_TUNABLES", "")
    if any(v in env for v in USER_VARIABLES) or any(t in tunables for t in USER_TUNABLES):
        return "malloc settings from the environment"
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return "not glibc"
    return None


def tune_malloc(environ=None) -> str:
    """Apply SETTINGS to this process's glibc malloc with mallopt(3) (`environ`: the environment
    to judge by, default os.environ; see `not_tunable`).

    Returns "tuned", or "default (<reason>)" when it left malloc alone (`not_tunable`'s reason, or
    mallopt unavailable or refusing the mmap threshold, in which case nothing else is set). Never
    raises.
    """
    global _MODE
    answer = _tune(environ)
    if _MODE is None or not answer.startswith("default"):  # a declined call leaves earlier settings in place
        _MODE = answer
    return answer


def malloc_mode() -> str:
    """What this process's malloc runs with, for result files: the answer of the last `tune_malloc`
    call that changed something (else of the first call), or "default (not tuned in this process)"."""
    return _MODE or "default (not tuned in this process)"


def _tune(environ) -> str:
    reason = not_tunable(environ)
    if reason:
        return f"default ({reason})"
    try:
        libc = ctypes.CDLL("libc.so.6")
        for name, (param, value) in SETTINGS.items():
            if libc.mallopt(param, value) != 1:
                return f"default (mallopt refused {name})" if name == "M_MMAP_THRESHOLD" else f"partly tuned (mallopt refused {name})"
    except (OSError, AttributeError):
        return "default (mallopt unavailable)"
    return "tuned"
