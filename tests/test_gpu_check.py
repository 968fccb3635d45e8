"""tools/gpu_check.py on a CPU: --help, the --cpu-dry-run harness, the time budget and an interrupt.

The GPU parts (kernel on CUDA, CUDA graphs, fp16 engines) run on a GPU host; here every such
row must say "skipped: no CUDA device" and every CPU row must hold real numbers.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parents[1] / "tools" / "gpu_check.py"
NO_CUDA = "skipped: no CUDA device"


def _run(*args, timeout=240):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout)


HELP = textwrap.dedent("""
    import runpy, sys
    sys.argv = [sys.argv[1], "--help"]
    try:
        runpy.run_path(sys.argv[0], run_name="__main__")
    except SystemExit as e:
        print("exit", e.code, "torch imported:", "torch" in sys.modules)
""")


def test_help_needs_no_torch():
    run = _run("-c", HELP, str(TOOL), timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().endswith("exit 0 torch imported: False")
    for option in ("--quick", "--time-budget", "--cpu-dry-run", "--only", "--out-dir"):
        assert option in run.stdout
    bad = _run(str(TOOL), "--only", "speed", timeout=60)
    assert bad.returncode == 2 and "--only takes parity, kernel, e2e; got speed" in bad.stderr


def test_cpu_dry_run_writes_every_section(tmp_path):
    run = _run(str(TOOL), "--quick", "--cpu-dry-run", "--out-dir", str(tmp_path))
    assert run.returncode == 0, run.stderr[-3000:]
    doc = json.loads((tmp_path / "gpu_check_cpu-dry-run_quick.json").read_text())
    markdown = (tmp_path / "gpu_check_cpu-dry-run_quick.md").read_text()
    assert doc["status"] == "complete" and doc["mode"]["cpu_dry_run"] and doc["device"]["name"] == "cpu-dry-run"
    assert {name: s["status"] for name, s in doc["sections"].items()} == dict.fromkeys(("parity", "kernel", "e2e"),
                                                                                       "done")
    parity = doc["sections"]["parity"]["rows"]
    kernel_rows = [r for r in parity if r["check"] == "kernel"]
    assert len(kernel_rows) == 6 and all(r["status"] == NO_CUDA for r in kernel_rows)  # 2 modes x 3 token cases
    op_rows = [r for r in parity if r["check"] == "torch-op"]  # the torch op runs on the CPU: 2 modes x 2 token cases
    assert [(r["mode"], r["tokens"]) for r in op_rows] == [(m, t) for m in ("pre", "rank") for t in ("decode", "prefill")] + [
        ("pre", "causal-prefill")]
    assert all(r["status"] == "pass" and 0 < r["max_abs_err"] <= r["tol"] for r in op_rows)
    engines = {(r["model"], r["attention"], r["precision"]): r for r in parity if r["check"] == "engine"}
    sdpa = engines[("uncompressed", "sdpa", "fp32")]  # SDPA's mask and layout on the CPU, against the reference
    assert sdpa["status"] == "pass" and sdpa["token_agreement"] == 1.0 and sdpa["max_abs_logit_diff"] < 1e-4
    assert engines[("compressed", "triton", "fp32")]["status"] == NO_CUDA
    kernel = doc["sections"]["kernel"]
    assert kernel["copy_bandwidth"]["gbps"] > 0
    assert [(r["shape"], r["batch"]) for r in kernel["rows"]] == [("smollm2-135m", 1), ("smollm2-135m", 2),
                                                                   ("llama3-8b", 1), ("llama3-8b", 2)]
    for r in kernel["rows"]:
        assert r["status"].startswith("ok") and NO_CUDA in r["status"]
        assert r["reference_us"] > 0 and r["sdpa-flash_us"] > 0 and r["sdpa-masked_us"] > 0
        assert r["kv_bytes_full"] == 2 * r["kv_bytes_compressed"]  # kv-ratio 0.5
    e2e = {r["variant"]: r for r in doc["sections"]["e2e"]["rows"]}
    assert e2e["compressed-triton"]["status"] == NO_CUDA
    for variant in ("uncompressed-sdpa", "compressed-reference"):
        assert e2e[variant]["status"] == "ok" and e2e[variant]["tokens_per_s"] > 0
    assert e2e["compressed-reference"]["kv_cache_bytes"] * 2 == e2e["uncompressed-sdpa"]["kv_cache_bytes"]
    assert len(doc["summary"]) == len(parity) + 1 + len(kernel["rows"]) + len(e2e)  # + the copy bandwidth row
    assert "## Summary" in markdown and "skipped: no CUDA device" in markdown
    assert run.stdout.splitlines()[0].split() == ["check", "case", "measured", "baseline", "ratio", "status"]
    assert run.stdout.strip().endswith("status: complete")


INTERRUPT = textwrap.dedent("""
    import importlib.util, json, sys
    spec = importlib.util.spec_from_file_location("gpu_check", sys.argv[1])
    gc = sys.modules["gpu_check"] = importlib.util.module_from_spec(spec)  # dataclasses look their module up
    spec.loader.exec_module(gc)
    over = gc.main(["--cpu-dry-run", "--only", "e2e", "--time-budget", "0.001", "--out-dir", sys.argv[2]])
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt
    gc.run_e2e = interrupt  # Ctrl-C during the e2e section, after the kernel section wrote its rows
    cut = gc.main(["--cpu-dry-run", "--quick", "--only", "kernel,e2e", "--out-dir", sys.argv[2]])
    print(json.dumps([over, cut]))
""")


def test_time_budget_and_interrupt_keep_partial_results(tmp_path):
    run = _run("-c", INTERRUPT, str(TOOL), str(tmp_path))
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads(run.stdout.strip().splitlines()[-1]) == [0, 130]
    over = json.loads((tmp_path / "gpu_check_cpu-dry-run.json").read_text())
    assert over["status"] == "complete" and over["sections"]["parity"]["status"] == "not requested"
    assert [r["status"] for r in over["sections"]["e2e"]["rows"]] == [NO_CUDA, "skipped: time budget",
                                                                      "skipped: time budget"]
    cut = json.loads((tmp_path / "gpu_check_cpu-dry-run_quick.json").read_text())
    assert cut["status"] == "interrupted" and cut["finished"]
    assert cut["sections"]["kernel"]["status"] == "done" and len(cut["sections"]["kernel"]["rows"]) == 4
    assert cut["sections"]["e2e"]["rows"] == []


KERNEL_PARITY = textwrap.dedent("""
    import importlib.util, json, sys
    import torch
    spec = importlib.util.spec_from_file_location("gpu_check", sys.argv[1])
    gc = sys.modules["gpu_check"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gc)
    shape, cpu, out = gc.AttnShape("tiny", 4, 2, 16, 8, 8), torch.device("cpu"), []
    for mode, seq, splits in (("pre", 1, 2), ("rank", 1, 1), ("pre", 3, None)):
        case = gc.op_case(shape, mode, 2, seq, 40, torch.float32, cpu, seed=seq)
        assert int(case["cache_lengths"][0]) == 33 and case["slot_positions"].shape == (2, 2, 40)
        out.append(gc.kernel_parity(case, "fp32", splits))
    print(json.dumps(out))
""")


def test_kernel_parity_check_runs_the_kernel_interpreted():
    """The parity check's inputs (moved slots) and comparison, with the kernel under TRITON_INTERPRET=1."""
    pytest.importorskip("triton", reason="triton is not installed")
    run = subprocess.run([sys.executable, "-c", KERNEL_PARITY, str(TOOL)], capture_output=True, text=True,
                         timeout=300, env=dict(os.environ, TRITON_INTERPRET="1"))
    assert run.returncode == 0, run.stderr[-3000:]
    rows = json.loads(run.stdout.strip().splitlines()[-1])
    assert [r["status"] for r in rows] == ["pass"] * 3 and all(0 < r["max_abs_err"] < 2e-5 for r in rows)
