"""glibc malloc settings for eigenkv's processes: keep freed tensor memory in the heap.

PyTorch frees and re-allocates buffers of the same few sizes at every layer, batch and healing
step (activations, gradients, logits). With glibc's defaults (a dynamic mmap threshold that
starts at 128 KiB, a trim threshold of twice it) much of that memory goes back to the kernel on
`free` and is faulted in again, page by page, on the next allocation. On this project's 2-core VM,
three 2 x 512-token forward passes of the default model took 1.3-1.8 million minor page faults and
4-5 s of kernel time against 17 s of user time; with the settings below, 50 thousand faults and
0.1-0.3 s (measured with `resource.getrusage`, one torch thread).

`tune_malloc` fixes the mmap threshold at glibc's 64-bit maximum (32 MiB: larger blocks are still
mapped and unmapped), and raises the trim threshold (1 GiB) and the top pad (256 MiB) so the heap
keeps what it was given: mallopt(3)'s M_MMAP_THRESHOLD, M_TRIM_THRESHOLD and M_TOP_PAD, the knobs
the MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_ and MALLOC_TOP_PAD_ environment variables set
(all three are needed: any one alone disables the dynamic threshold and can fault more). The cost
is up to 1 GiB of freed memory held by the process instead of returned. PyTorch's CPU performance
guide makes the same diagnosis and suggests jemalloc or tcmalloc through LD_PRELOAD; these
settings need nothing installed. Only the `eigenkv` and `export-eigen` commands call it.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys

# mallopt(3) parameter numbers (glibc's malloc.h) and the values set
SETTINGS = {"M_TRIM_THRESHOLD": (-1, 1 << 30), "M_TOP_PAD": (-2, 256 << 20), "M_MMAP_THRESHOLD": (-3, 32 << 20)}
OPT_OUT = "EIGENKV_MALLOC"  # EIGENKV_MALLOC=default leaves glibc's settings alone


def tune_malloc(environ=None) -> str:
    """Apply SETTINGS to this process's glibc malloc with mallopt(3).

    Returns "tuned", or "default (<reason>)" when it left malloc alone: EIGENKV_MALLOC=default,
    the user's own MALLOC_*_ or GLIBC_TUNABLES malloc settings (theirs win), a C library other
    than glibc, or a mallopt call that failed. Never raises.
    """
    env = os.environ if environ is None else environ
    if env.get(OPT_OUT, "").lower() == "default":
        return f"default ({OPT_OUT}=default)"
    if any(k.startswith("MALLOC_") and k.endswith("_") for k in env) or "glibc.malloc" in env.get("GLIBC_TUNABLES", ""):
        return "default (malloc settings from the environment)"
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return "default (not glibc)"
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = all(libc.mallopt(param, value) == 1 for param, value in SETTINGS.values())
    except (OSError, AttributeError):
        return "default (mallopt unavailable)"
    return "tuned" if ok else "default (mallopt refused a setting)"
