"""eigenkv/malloc.py: the glibc settings apply, the user's own settings win, and they take effect
(a block the default heap would map and unmap comes from the heap and stays there). What they buy
on the default model (page faults, kernel time, wall time) is measured by tools/bench_malloc.py,
not timed here."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from eigenkv.malloc import malloc_mode, not_tunable, tune_malloc

GLIBC = sys.platform == "linux" and platform.libc_ver()[0] == "glibc"


def test_opt_out_and_user_settings_win():
    for value in ("default", "off", "0", "OFF"):
        assert tune_malloc({"EIGENKV_MALLOC": value}) == f"default (EIGENKV_MALLOC={value})"
    assert tune_malloc({"MALLOC_TOP_PAD_": "0"}) == "default (malloc settings from the environment)"
    assert tune_malloc({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"}).startswith("default (malloc settings")
    # settings of other knobs do not conflict (meson sets MALLOC_PERTURB_ for its tests)
    assert not_tunable({"MALLOC_PERTURB_": "1", "GLIBC_TUNABLES": "glibc.malloc.tcache_count=0"}) in (None, "not glibc")
    assert not_tunable({"EIGENKV_MALLOC": "tuned"}) in (None, "not glibc")


@pytest.mark.skipif(not GLIBC, reason="mallopt(3) settings are glibc's; other C libraries are left alone")
def test_tuned_on_glibc():
    assert tune_malloc({}) == "tuned"
    assert malloc_mode() == "tuned"


def test_malloc_mode_records_what_this_process_did():
    # what the tools write beside the machine in their result files
    code = ("from eigenkv.malloc import malloc_mode, tune_malloc; print(malloc_mode()); "
            "tune_malloc({'EIGENKV_MALLOC': 'off'}); print(malloc_mode()); "
            "tune_malloc({}); tune_malloc({'EIGENKV_MALLOC': 'off'}); print(malloc_mode())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.splitlines()
    assert out[:2] == ["default (not tuned in this process)", "default (EIGENKV_MALLOC=off)"]
    # a later declined call does not undo settings in place: the mode stays what the process runs with
    assert out[2] == ("tuned" if GLIBC else "default (EIGENKV_MALLOC=off)")


# A fresh interpreter allocates and frees one 8 MiB block. glibc's defaults map it (the dynamic mmap
# threshold starts at 128 KiB) and unmap it on free; tuned, it comes from the heap, and the heap
# keeps it after the free (trim threshold 1 GiB). mallinfo2 (glibc >= 2.33) reports both.
_BLOCK = """
import ctypes, sys
from eigenkv.malloc import not_tunable, tune_malloc
assert sys.argv[1] == "default" or tune_malloc({}) == "tuned"
libc = ctypes.CDLL("libc.so.6")
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc.mallinfo2.restype = Info
libc.malloc.restype = ctypes.c_void_p
block = libc.malloc(8 << 20)
mapped = libc.mallinfo2().hblkhd
libc.free(ctypes.c_void_p(block))
print(mapped, libc.mallinfo2().arena)
"""


@pytest.mark.skipif(not GLIBC or tuple(int(x) for x in platform.libc_ver()[1].split(".")[:2]) < (2, 33),
                    reason="needs glibc's mallopt(3) and mallinfo2 (glibc >= 2.33)")
def test_settings_take_effect_in_a_fresh_process():
    def run(mode: str) -> tuple[int, int]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("MALLOC_") and k not in ("EIGENKV_MALLOC", "GLIBC_TUNABLES", "PYTHONMALLOC")}
        out = subprocess.run([sys.executable, "-c", _BLOCK, mode], capture_output=True, text=True, check=True, env=env)
        mapped, heap = map(int, out.stdout.split())
        return mapped, heap

    mib = 1 << 20
    mapped, heap = run("default")
    assert mapped >= 8 * mib and heap < 8 * mib, (mapped, heap)  # mapped, and gone after the free
    mapped, heap = run("tuned")
    assert mapped < 8 * mib and heap >= 8 * mib, (mapped, heap)  # from the heap, which keeps it
