"""tools/*.py: each benchmark/table tool smoke-runs on a tiny model in a subprocess and writes the
JSON/markdown it promises; every tool's, `eigenkv` subcommand's and `export-eigen`'s --help
works, and every module of the package imports, with the optional packages made unimportable.

tools/bench_compress.py has its smoke test in tests/test_ranks.py. tools/optimum_baseline.py
and tools/kvpress_peer.py build their own virtual environments (pip installs of optimum-onnx
or kvpress, minutes, network), and tools/gpu_check.py is a GPU harness with its own CPU
tests (tests/test_gpu_check.py: --cpu-dry-run, time budget, interrupt): those three only get
the --help check here.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_models import save_tiny

REPO = Path(__file__).resolve().parents[1]
TOOLS = REPO / "tools"
TEXT = "The quick brown fox jumps over the lazy dog. " * 80  # 3600 byte tokens: 1800 calibrate, 1800 held out
# tiny everything: 2 x 32 calibration tokens, perplexity on 64 held-out tokens of the same file in
# windows of 32 (2 windows x 31 scored tokens); relative paths, the tools run in the fixture's folder
SMALL = ["--model", "llama", "--calib-text", "calib.txt", "--calib-samples", "2", "--calib-seq-len", "32",
         "--eval-texts", "calib.txt", "--eval-tokens", "64", "--eval-window", "32"]
QUIET = ["--no-progress"]  # sink_probe never shows progress bars and has no such option
SCORED = {"calib.txt": 2 * 31}
OPTIONAL = ("tensorrt", "triton", "torchvision", "torchaudio", "matplotlib", "kvpress")  # never needed to import


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tools")
    save_tiny("llama", root / "llama")  # 3 layers, 4 query / 2 KV heads, head_dim 16, byte tokenizer
    (root / "calib.txt").write_text(TEXT)
    return root


def _tool(name: str, *args, cwd: Path) -> subprocess.CompletedProcess:
    run = subprocess.run([sys.executable, str(TOOLS / name), *map(str, args)], capture_output=True, text=True,
                         cwd=cwd, timeout=900)
    assert run.returncode == 0, f"{name} exited {run.returncode}\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    return run


def _table(text: str) -> list[list[str]]:
    """The cells of the markdown table rows in `text` (header and rule included)."""
    return [[c.strip() for c in line.strip().strip("|").split("|")] for line in text.splitlines()
            if line.startswith("|")]


def test_bench_export(workdir):
    from eigenkv.manifest import Manifest
    run = _tool("bench_export.py", *SMALL, *QUIET, "--decode-steps", "4", "--max-seq-len", "64",
                "--out-dir", "export", "--json", "bench_export.json", cwd=workdir)
    result = json.loads((workdir / "bench_export.json").read_text())
    assert set(result) == {"command", "machine", "model", "kv_ratio", "dtype", "eval_tokens_per_text", "seconds",
                           "seconds_total", "peak_rss_mib", "file_bytes", "kv_bytes_per_token", "validation",
                           "perplexity"}
    manifest = Manifest.load(workdir / "export" / "model.eigen.json")
    assert result["model"] == manifest.source.label == str((workdir / "llama").resolve())
    assert (result["kv_ratio"], result["dtype"], result["eval_tokens_per_text"]) == (0.5, "fp32", 64)
    assert list(result["seconds"]) == ["compress", "export", "validate"] == list(manifest.report["seconds"])
    assert all(v >= 0 for v in result["seconds"].values())
    assert result["seconds_total"] >= sum(result["seconds"].values()) - 0.1
    files = ("model.onnx", "model.onnx.data")
    assert result["file_bytes"] == {p: (workdir / "export" / p).stat().st_size for p in files}
    assert result["kv_bytes_per_token"] == {"original": manifest.layout.original_bytes_per_token("fp32"),
                                            "compressed": manifest.layout.bytes_per_token("fp32")}
    assert result["kv_bytes_per_token"]["compressed"] <= result["kv_bytes_per_token"]["original"] // 2
    v = result["validation"]
    assert v == manifest.report["validation"] and v["decode_steps"] == 4 and v["decode_tokens_equal"]
    ppl = result["perplexity"]["calib.txt"]
    assert list(result["perplexity"]) == ["calib.txt"] and (ppl["tokens"], ppl["window"]) == (SCORED["calib.txt"], 32)
    assert ppl["original"] > 1 and ppl["folded"] > 1
    rows = _table(run.stdout)
    assert [r[0] for r in rows] == ["stage", "---", "compress", "export", "validate", "total"]
    assert "peak RSS" in run.stdout


def test_bench_torch_op(workdir):
    """tools/bench_torch_op.py on small shapes: one row per (mode, batch, tokens, pass), the fused
    result within float32 round-off of the float64 reference, JSON and table agree."""
    run = _tool("bench_torch_op.py", "--modes", "pre,joint", "--batches", "1", "--seqs", "16,40", "--repeats", "1",
                "--backward", "--out", "torchop/bench", cwd=workdir)
    meta = json.loads((workdir / "torchop" / "bench.json").read_text())
    assert set(meta) == {"command", "machine", "shapes", "median_of", "rows"}
    _assert_malloc_recorded(meta["machine"])
    rows = meta["rows"]
    assert [(r["mode"], r["seq"], r["pass"]) for r in rows] == [
        (m, s, p) for m in ("pre", "joint") for s in (16, 40) for p in ("fwd", "fwd+bwd")]
    for r in rows:
        assert r["reference_ms"] > 0 and r["fused_ms"] > 0 and r["fused_max_abs_diff_vs_float64"] <= 1e-5
        assert r["speedup"] == pytest.approx(r["reference_ms"] / r["fused_ms"], rel=0.05, abs=0.02)
    table = _table((workdir / "torchop" / "bench.md").read_text())
    assert len(table) == 2 + len(rows) and _table(run.stdout) == table
    bad = subprocess.run([sys.executable, str(TOOLS / "bench_torch_op.py"), "--modes", "flash", "--out", "torchop/bad"],
                         capture_output=True, text=True, cwd=workdir, timeout=300)
    assert bad.returncode == 2 and "--modes takes" in bad.stderr and not (workdir / "torchop" / "bad.json").exists()


def test_bench_op(workdir):
    run = _tool("bench_op.py", "--contexts", "16,32", "--batches", "1,2", "--repeats", "2", "--out", "op/bench",
                cwd=workdir)
    meta = json.loads((workdir / "op" / "bench.json").read_text())
    assert set(meta) == {"command", "machine", "shapes", "median_of", "rows"} and meta["median_of"] == 2
    assert meta["shapes"]["key_rank"] == 13 and meta["shapes"]["value_rank"] == 52  # the defaults
    rows = meta["rows"]
    assert [(r["batch"], r["context"]) for r in rows] == [(1, 16), (1, 32), (2, 16), (2, 32)]
    for r in rows:
        assert set(r) == {"batch", "context", "uncompressed_ms", "pre_ms", "joint_ms", "pre_speedup", "joint_speedup"}
        assert min(r["uncompressed_ms"], r["pre_ms"], r["joint_ms"]) > 0
        for mode in ("pre", "joint"):  # both rounded from the same unrounded times
            assert r[f"{mode}_speedup"] == pytest.approx(r["uncompressed_ms"] / r[f"{mode}_ms"], rel=0.05, abs=2e-3)
    md = (workdir / "op" / "bench.md").read_text()
    assert md.startswith("Command: `python ") and "median of 2" in md
    table = _table(md)
    assert table[0][:2] == ["batch", "context"] and len(table) == 2 + len(rows)
    assert [row[:2] for row in table[2:]] == [["1", "16"], ["1", "32"], ["2", "16"], ["2", "32"]]
    assert _table(run.stdout) == table


def test_bench_malloc(workdir):
    # `eigenkv --version` keeps this to two interpreter starts; what the settings do is tests/test_malloc.py's
    run = _tool("bench_malloc.py", "--rounds", "1", "--out", "malloc/bench", "--", "--version", cwd=workdir)
    meta = json.loads((workdir / "malloc" / "bench.json").read_text())
    assert set(meta) == {"command", "eigenkv_command", "machine", "load_average_1min", "runs", "median"}
    assert meta["eigenkv_command"] == "eigenkv --version"
    assert [r["malloc"] for r in meta["runs"]] == ["default", "tuned"]  # round 1: A B
    for r in meta["runs"]:
        assert r["wall_s"] > 0 and r["user_s"] > 0 and r["minor_faults"] > 0 and r["peak_rss_mib"] > 0
        assert meta["median"][r["malloc"]] == {k: v for k, v in r.items() if k != "malloc"}  # one run each
    table = _table((workdir / "malloc" / "bench.md").read_text())
    assert [row[:2] for row in table[2:]] == [["1", "default"], ["2", "tuned"], ["median", "default"],
                                              ["median", "tuned"]]
    assert _table(run.stdout) == table
    failed = subprocess.run([sys.executable, str(TOOLS / "bench_malloc.py"), "--rounds", "1", "--", "compress", "--kv-ratio", "2"],
                            capture_output=True, text=True, cwd=workdir, timeout=300)
    assert failed.returncode == 1 and "exited 2" in failed.stderr and "--kv-ratio" in failed.stderr  # the child's error


def _assert_malloc_recorded(machine: str):
    """The quality tools tune malloc as the CLI does and say so beside the machine (eigenkv/malloc.py)."""
    from eigenkv.malloc import not_tunable
    reason = not_tunable()  # the tools' environment is this process's
    assert machine.endswith(", malloc tuned" if reason is None else f", malloc default ({reason})"), machine


def test_method_table(workdir):
    run = _tool("method_table.py", *SMALL, *QUIET, "--ratios", "0.5", "--methods", "eigen,loss-aware",
                "--joint-methods", "loss-aware-shared", "--heal-steps", "1", "--heal-methods", "loss-aware",
                "--out", "method/table", cwd=workdir)
    meta = json.loads((workdir / "method" / "table.json").read_text())
    assert set(meta) == {"command", "machine", "model", "calibration", "evaluation", "seconds", "rows"}
    assert meta["evaluation"]["tokens_scored"] == SCORED and meta["evaluation"]["window"] == 32
    assert meta["calibration"].startswith("calib.txt (first half of the file), 2 x 32 tokens")
    _assert_malloc_recorded(meta["machine"])
    rows = meta["rows"]
    assert [(r["method"], r["allocation"], r["healing_steps"]) for r in rows] == [
        ("original", "-", 0), ("eigen", "loss", 0), ("eigen", "energy", 0), ("loss-aware", "loss", 0),
        ("loss-aware", "loss", 1), ("loss-aware-shared, joint", "loss", 0)]
    for r in rows:
        assert r["ppl_calib.txt"] > 1 and isinstance(r["increase_calib.txt_pct"], float)
    assert rows[0]["kv_ratio"] == 1.0 and all(0.4 < r["kv_ratio"] <= 0.5 for r in rows[1:])
    assert all(len(r["key_ranks"]) == len(r["value_ranks"]) == 3 for r in rows[1:])
    table = _table((workdir / "method" / "table.md").read_text())
    assert table[0][0] == "method" and "ppl calib.txt (rise)" in table[0] and len(table) == 2 + len(rows)
    assert [row[0] for row in table[2:]] == [r["method"] for r in rows]
    assert _table(run.stdout) == table


def test_quality_table(workdir):
    """Two calibrations (one text; a two-text mix), one ratio with rows before and after the W_o
    refit, a healed row (from the refitted fold) and its held-out KL curve, cloze accuracy on the
    rows at the cloze ratio."""
    (workdir / "other.txt").write_text("Pack my box with five dozen liquor jugs! " * 90)
    run = _tool("quality_table.py", "--model", "llama", "--calibrations", "calib.txt", "calib.txt:1,other.txt:3",
                "--calib-samples", "2", "--calib-seq-len", "32", "--eval-texts", "calib.txt,other.txt",
                "--eval-tokens", "64", "--eval-window", "32", "--cloze-texts", "other.txt", "--cloze-items", "5",
                "--ratios", "0.5", "--heal-ratios", "0.5", "--heal-steps", "2", "--heal-eval-every", "1",
                "--heal-batch", "3", "--heal-seq-len", "16", "--heal-query", "--methods", "loss-aware,loss-aware-uniform",
                "--refit", "both",
                *QUIET, "--out", "quality/table", cwd=workdir)
    meta = json.loads((workdir / "quality" / "table.json").read_text())
    assert meta["calibrations"] == {"calib.txt": "calib.txt:1", "calib.txt:1,other.txt:3": "calib.txt:0.25,other.txt:0.75"}
    rows = meta["rows"]
    assert [(r["calibration"], r["method"], bool(r["healing"])) for r in rows] == [
        ("-", "original", False), ("calib.txt:1", "eigen (paper), energy", False),
        *[(c, m + tail, h) for c in ("calib.txt:1", "calib.txt:0.25,other.txt:0.75")
          for m in ("loss-aware", "loss-aware-uniform")
          for tail, h in (("", False), (" + W_o refit", False), (" + W_o refit", True))]]
    assert rows[2]["ppl"] != rows[5]["ppl"]  # the two key weightings give different bases
    assert rows[2]["ppl"] != rows[3]["ppl"] and rows[2]["key_ranks"] == rows[3]["key_ranks"]  # the refit changed W_o
    assert any(k.startswith("refit calib.txt:1 loss-aware 0.5") for k in meta["seconds"])
    assert meta["evaluation"]["tokens_scored"] == {"calib.txt": 62, "other.txt": 62}
    _assert_malloc_recorded(meta["machine"])
    for r in rows:
        assert set(r["ppl"]) == {"calib.txt", "other.txt"} and all(v > 1 for v in r["ppl"].values())
        assert r["cloze"] is not None and 0 <= r["cloze"]["other.txt"] <= 1  # every row here is at the cloze ratio
    healed = rows[4]["healing"]
    assert [s for s, _ in healed["held_out_kl"]] == [0, 1, 2] and healed["steps"] == 2
    assert (healed["batch"], healed["seq_len"]) == (3, 16) and "3 x 16-token windows" in meta["calibration"]
    assert healed["query"] is True and "(query projections trained too)" in meta["calibration"]
    text = (workdir / "quality" / "table.md").read_text()
    tables = [t for t in text.split("\n\n") if t.startswith("|")]
    assert len(tables) == 3 and len(_table(tables[0])) == 2 + len(rows) and len(_table(tables[2])) == 2 + 4
    assert _table(run.stdout)[: 2 + len(rows)] == _table(tables[0])


def test_quality_table_without_cloze(workdir):
    """--cloze-items 0: no cloze items, column or table; a negative count, no Fisher draws or no
    calibration samples are refused (exit 2, nothing written); the draws are recorded."""
    common = ("quality_table.py", "--model", "llama", "--calibrations", "calib.txt", "--calib-samples", "2",
              "--calib-seq-len", "32", "--eval-texts", "calib.txt", "--eval-tokens", "64", "--eval-window", "32",
              "--ratios", "0.5", "--heal-ratios", "", *QUIET)
    for option, value, message in (("--cloze-items", "-1", "--cloze-items must be >= 0"),
                                   ("--fisher-draws", "0", "--fisher-draws must be >= 1, got 0"),
                                   ("--calib-samples", "0", "--calib-samples must be >= 1, got 0")):
        bad = subprocess.run([sys.executable, str(TOOLS / common[0]), *common[1:], option, value, "--out",
                              "bad/table"], capture_output=True, text=True, cwd=workdir, timeout=300)
        assert bad.returncode == 2 and message in bad.stderr.strip().splitlines()[-1]
        assert not (workdir / "bad").exists()
    _tool(*common, "--cloze-items", "0", "--fisher-draws", "2", "--refit", "both", "--out", "quality/table", cwd=workdir)
    meta = json.loads((workdir / "quality" / "table.json").read_text())
    assert "Fisher pass 2 draw(s) per sample" in meta["calibration"]  # loss-aware reads the keys' Fisher statistics
    assert [r["method"] for r in meta["rows"]] == ["original", "eigen (paper), energy", "loss-aware",
                                                   "loss-aware + W_o refit"]
    assert all(r["cloze"] is None for r in meta["rows"])
    text = (workdir / "quality" / "table.md").read_text()
    assert "No cloze items." in text and "| cloze" not in text
    tables = [t for t in text.split("\n\n") if t.startswith("|")]
    assert len(tables) == 1 and len(_table(tables[0])) == 2 + 4


def test_ppl_table(workdir):
    run = _tool("ppl_table.py", *SMALL, *QUIET, "--ratios", "0.5", "--out", "ppl/table", cwd=workdir)
    meta = json.loads((workdir / "ppl" / "table.json").read_text())
    assert set(meta) == {"command", "machine", "model", "calibration", "evaluation", "calibration_seconds", "rows"}
    assert meta["evaluation"] == {"texts": "calib.txt: second half of the file", "tokens_scored": SCORED, "window": 32}
    rows = meta["rows"]
    assert [(r["setting"], r["rope_mode"]) for r in rows] == [
        ("original", "-"), ("kv-ratio 0.5", "pre"), ("kv-ratio 0.5", "joint"), ("error-budget 0.025", "pre"),
        ("error-budget 0.025", "joint"), ("keys only, rank 8", "pre"), ("values only, rank 8", "pre")]
    assert rows[0]["kv_ratio"] == 1.0 and rows[0]["increase_calib.txt_pct"] == 0.0
    assert all(r["kv_ratio"] <= 0.5 for r in rows[1:3]) and rows[5]["kv_ratio"] == rows[6]["kv_ratio"] == 0.75
    assert rows[5]["key_ranks"] == [8] * 3 and rows[6]["value_ranks"] == [8] * 3
    table = _table((workdir / "ppl" / "table.md").read_text())
    assert table[0][:3] == ["setting", "RoPE mode", "KV ratio"] and len(table) == 2 + len(rows)
    assert _table(run.stdout) == table


def test_sink_probe(workdir):
    run = _tool("sink_probe.py", *SMALL, "--ratios", "0.5", "--sinks", "0,1", "--threads", "1",
                "--out", "sink/probe", cwd=workdir)
    assert [line.split(":")[0] for line in run.stdout.splitlines()] == ["ratio 0.5 sinks 0", "ratio 0.5 sinks 1"]
    meta = json.loads((workdir / "sink" / "probe.json").read_text())
    assert set(meta) == {"command", "machine", "model", "method", "rope_mode", "original_ppl", "evaluation", "rows"}
    assert meta["evaluation"] == {"tokens_scored": SCORED, "window": 32}
    assert [(r["kv_ratio"], r["sinks"]) for r in meta["rows"]] == [(0.5, 0), (0.5, 1)]
    assert all(r["ppl_calib.txt"] > 1 for r in meta["rows"])
    table = _table((workdir / "sink" / "probe.md").read_text())
    assert table[0][:2] == ["KV ratio", "full-width sink slots"] and [row[1] for row in table[2:]] == ["0", "1"]


# Runs in a fresh interpreter: the finder goes in before anything else is imported. A missing
# package makes `import x` raise ModuleNotFoundError and `importlib.util.find_spec("x")` return
# None (transformers probes torchvision that way at import), so both are reproduced.
_DRIVER = r'''
import sys

OPTIONAL = {optional!r}


def blocked(name):
    top = name.partition(".")[0]
    return top in OPTIONAL or top.startswith("tensorrt")  # also tensorrt_bindings, tensorrt_libs


class Unimportable:
    @staticmethod
    def find_spec(name, path=None, target=None):
        if blocked(name):
            raise ModuleNotFoundError(f"No module named {{name!r}} (made unimportable by the test)", name=name)
        return None


sys.meta_path.insert(0, Unimportable)
already = sorted(m for m in sys.modules if blocked(m))

import contextlib
import importlib
import importlib.util
import io
import json
import pkgutil
import runpy
import traceback
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: tomli, which pytest itself needs there
    import tomli as tomllib

_find_spec = importlib.util.find_spec


def find_spec(name, package=None):
    return None if blocked(importlib.util.resolve_name(name, package)) else _find_spec(name, package)


importlib.util.find_spec = find_spec
failures, modules, commands, tools = [], [], [], []


def failed(what):
    failures.append(f"{{what}}: " + traceback.format_exc(limit=-3).strip().splitlines()[-1])


def run_help(what, call, expect):
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            call()
        failures.append(f"{{what}}: --help returned instead of exiting")
    except SystemExit as e:
        if e.code not in (0, None) or expect not in out.getvalue():
            failures.append(f"{{what}}: exit {{e.code!r}}, output {{out.getvalue()[:300]!r}}")
    except BaseException:
        failed(what)


# every module of every package the distribution installs (eigenkv.exporter/plugins/engines are
# mapped from top-level folders, so each package is walked on its own __path__)
packages = tomllib.loads(Path({repo!r}, "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
for package in packages:
    try:
        modules.append(importlib.import_module(package).__name__)
    except BaseException:
        failed(package)
        continue
    for info in pkgutil.walk_packages(sys.modules[package].__path__, package + ".", onerror=failed):
        try:
            modules.append(importlib.import_module(info.name).__name__)
        except BaseException:
            failed(info.name)

from importlib.metadata import entry_points

from eigenkv.cli import build_parser

subparsers = next(a for a in build_parser()._actions if a.dest == "command")
scripts = {{ep.name: ep for ep in entry_points(group="console_scripts") if ep.value.startswith("eigenkv.")}}
for name, ep in sorted(scripts.items()):
    main = ep.load()
    argvs = [[]] + ([[c] for c in subparsers.choices] if name == "eigenkv" else [])
    for argv in argvs:
        commands.append(" ".join([name, *argv]))
        run_help(commands[-1], lambda: main([*argv, "--help"]), "usage: " + commands[-1])

sys.path.insert(0, {tools!r})
for tool in sorted(t for t in Path({tools!r}).glob("*.py") if not t.name.startswith("_")):  # _x.py: shared helpers
    tools.append(tool.name)
    sys.argv = [str(tool), "--help"]
    run_help(tool.name, lambda: runpy.run_path(str(tool), run_name="__main__"), "usage:")

imported = sorted(m for m in sys.modules if blocked(m))
print(json.dumps({{"already": already, "imported": imported, "failures": failures, "modules": modules,
                  "commands": commands, "tools": tools}}))
'''


def test_help_and_imports_without_optional_packages(tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(_DRIVER.format(optional=OPTIONAL, repo=str(REPO), tools=str(TOOLS)))
    run = subprocess.run([sys.executable, str(driver)], capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["failures"] == [], "\n".join(report["failures"])
    assert report["already"] == [] and report["imported"] == []
    # every .py file of every installed package was imported (nothing the walk could miss)
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    setup = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {p: REPO / setup["package-dir"].get(p, p.replace(".", "/")) for p in setup["packages"]}
    files = {(p if f.stem == "__init__" else f"{p}.{f.stem}") for p, d in folders.items() for f in d.glob("*.py")}
    assert set(report["modules"]) == files and len(report["modules"]) == len(files)
    assert {"eigenkv.cli", "eigenkv.engines.trt", "eigenkv.plugins.trt_plugin",
            "eigenkv.plugins.triton_attention", "eigenkv.engines.bench"} <= files
    from eigenkv.cli import build_parser
    subcommands = next(a for a in build_parser()._actions if a.dest == "command").choices
    assert {"compress", "export", "build", "run", "bench"} <= set(subcommands)
    assert report["commands"] == ["eigenkv", *(f"eigenkv {c}" for c in subcommands), "export-eigen"]
    assert report["tools"] == sorted(p.name for p in TOOLS.glob("*.py") if not p.name.startswith("_"))
    assert {"bench_export.py", "bench_op.py", "gpu_check.py", "kvpress_peer.py",
            "optimum_baseline.py"} <= set(report["tools"])


def test_bench_pre_ragged(workdir):
    """tools/bench_pre_ragged.py on a tiny `pre` export: one engine per formulation from the same
    export, every point timed for each (steps x blocks), the first step's logits of each within
    1e-4 of the rows' engine on the same synthetic cache, the by-step branch as the graph's rule
    picks it, JSON and table agree; fills outside (0, 1] or rows past the export's positions are
    a one-line exit 2 and nothing is written."""
    from tiny_models import export_tiny

    from eigenkv.engines import ort_fused
    out = workdir / "ragged" / "model.onnx"
    assert export_tiny(workdir, "llama", out, "--kv-ratio", "0.5", "--max-seq-len", "96", "--decode-steps", "4") == 0
    run = _tool("bench_pre_ragged.py", out, "--batches", "2,3", "--longest", "20", "--fills", "0.5,0.6,1",
                "--chunk", "4", "--chunk-points", "3:20:0.7", "--steps", "2", "--blocks", "2", "--threads", "1",
                "--out", "ragged/result", cwd=workdir)
    result = json.loads((workdir / "ragged" / "result" / "result.json").read_text())
    points = result["points"]
    assert [(p["batch"], max(p["lengths"]), p["width"]) for p in points] == [
        (b, 20, 1) for b in (2, 3) for _ in range(3)] + [(3, 20, 4)]
    formulations = ["attention-rows", "attention-valid", "attention", "attention-by-step"]
    for p in points:
        after = [n + p["width"] for n in p["lengths"]]
        assert p["slots"] == max(after) and p["fill"] == pytest.approx(sum(after) / (len(after) * max(after)), abs=1e-4)
        assert p["by_step_branch"] == ort_fused.by_step_branch(after, p["slots"], p["width"])
        assert list(p["p50_ms"]) == formulations and all(v > 0 for v in p["p50_ms"].values())
        steps = 2 * 2 if p["width"] == 1 else 1 * 2
        assert all(len(v) == steps for v in p["steps_ms"].values())
        assert all(d <= 1e-4 for d in p["max_abs_diff_vs_rows"].values()), p["max_abs_diff_vs_rows"]
    # full rows -> whole buffers; one long row and short ones -> rows (3 * sum < 2 * B * longest)
    assert [p["by_step_branch"] for p in points if p["batch"] == 3 and p["width"] == 1] == [
        "attention-rows", "attention-rows", "attention"]
    table = _table((workdir / "ragged" / "result" / "result.md").read_text())
    assert len(table) == 2 + len(points) and table[2:] == _table(run.stdout)[-len(points):]
    for row, p in zip(table[2:], points):
        assert [float(c) for c in row[6:10]] == [round(p["p50_ms"][n], 1) for n in formulations]
    # a buffer twice the longest row (--slack 1): a decode step 0.76 filled runs rows (below 4/5)
    _tool("bench_pre_ragged.py", out, "--batches", "3", "--longest", "20", "--fills", "0.75", "--slack", "1",
          "--steps", "1", "--blocks", "1", "--threads", "1", "--out", "ragged/slack", cwd=workdir)
    (point,) = json.loads((workdir / "ragged" / "slack" / "result.json").read_text())["points"]
    assert (point["lengths"], point["slots"], point["by_step_branch"]) == ([20, 15, 10], 41, "attention-rows")
    assert all(d <= 1e-4 for d in point["max_abs_diff_vs_rows"].values())
    for bad, message in ((["--fills", "0.5,1.5"], "fills must lie in (0, 1], got 1.5"),
                         (["--longest", "200"], "past the export's 96 positions"),
                         (["--batches", "4", "--fills", "0.2"], "fill 0.2 is out of reach at batch 4"),
                         (["--chunk", "4", "--chunk-points", "2:20"], "--chunk-points takes batch:longest:fill")):
        run = subprocess.run([sys.executable, str(TOOLS / "bench_pre_ragged.py"), str(out), *bad, "--out", "ragged/bad"],
                             capture_output=True, text=True, cwd=workdir, timeout=300)
        assert run.returncode == 2 and message in run.stderr and run.stderr.strip().count("\n") == 0
        assert not (workdir / "ragged" / "bad").exists()


def test_engine_agreement(workdir):
    """Fused ORT attention vs the op's function on one export: identical greedy tokens, logits
    within 1e-4; an engine of another cache (uncompressed) is reported as different."""
    from tiny_models import export_tiny

    from eigenkv.cli import main
    out = workdir / "agree" / "model.onnx"
    assert export_tiny(workdir, "llama", out, "--kv-ratio", "0.5", "--max-seq-len", "96", "--decode-steps", "4") == 0
    base = workdir / "agree" / "base.onnx"
    assert export_tiny(workdir, "llama", base, "--no-compress", "--max-seq-len", "96", "--decode-steps", "4") == 0
    for graph, name, extra in ((out, "fused", []), (out, "function", ["--attention", "function"]), (base, "base", [])):
        assert main(["build", str(graph), "-o", str(workdir / "agree" / name), *extra]) == 0
    _tool("engine_agreement.py", "--engine", "function=agree/function", "--engine", "fused=agree/fused",
          "--engine", "base=agree/base", "--prompt", "the quick brown", "--tokens", "8", "--chunk", "5",
          "--random-len", "20", "--decode-steps", "3", "--out", "agree/check", cwd=workdir)
    result = json.loads((workdir / "agree" / "check.json").read_text())
    assert result["engines"]["fused"]["runtime"]["attention"] != "function"
    assert result["greedy"]["the quick brown"]["fused"]["identical"]
    vs = result["random_prompts"]["vs_reference"]
    assert vs["fused"]["max_abs_diff"] < 1e-4 and vs["fused"]["greedy_steps_identical"]
    assert vs["base"]["max_abs_diff"] > 1e-3
    assert _table((workdir / "agree" / "check.md").read_text())[0] == ["prompt", "fused", "base"]


@pytest.fixture(scope="module")
def oracle_engine(workdir):
    """A tiny kv-ratio 0.5 engine (workdir/oracle/engine) of workdir/llama512, RoPE to 512 positions:
    a pass-key prompt takes >= 295 byte tokens."""
    from eigenkv.cli import main
    model = save_tiny("llama", workdir / "llama512")
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 512}))
    out = workdir / "oracle" / "model.onnx"
    assert main(["export", str(out), "--model", str(model), "--calib-text", str(workdir / "calib.txt"),
                 "--calib-samples", "4", "--calib-seq-len", "64", "--eval-tokens", "0", "--kv-ratio", "0.5",
                 "--max-seq-len", "384", "--decode-steps", "4", "--no-progress"]) == 0
    assert main(["build", str(out), "-o", str(workdir / "oracle" / "engine")]) == 0
    return model


def test_evict_oracle(workdir, oracle_engine):
    """tools/evict_oracle.py on a tiny kv-ratio 0.5 engine: one row per scorer, evictions made,
    the oracle's kept slots are its own (overlap exactly 1), the others' a share in [0, 1]."""
    model = oracle_engine
    _tool("evict_oracle.py", "--engine", "oracle/engine", "--model", "llama512", "--keep", "0.5", "--contexts", "320",
          "--depths", "0.5", "--sink", "2", "--recent", "8", "--skip-layers", "0", "--headroom", "32",
          "--max-new-tokens", "4", "--threads", "1", "--out", "oracle/result", cwd=workdir)
    result = json.loads((workdir / "oracle" / "result.json").read_text())
    rows = {r["scorer"]: r for r in result["rows"]}
    assert list(rows) == ["key-norm", "plain", "oracle"] and all(r["evictions"] > 0 for r in rows.values())
    assert rows["oracle"]["kept_also_by_oracle"] == 1.0
    assert all(0.0 <= r["kept_also_by_oracle"] <= 1.0 for r in rows.values())
    assert all(list(r["accuracy"]) == ["passkey@320"] and len(r["records"]) == 1 for r in rows.values())
    # the tool's key-norm row is the engine's own evictor: same generated text
    from transformers import AutoTokenizer

    from eigenkv.engines.backend import load_engine
    from eigenkv.engines.eviction import EvictionSettings, make_evictor
    from eigenkv.engines.longctx import passkey_task
    from eigenkv.engines.runtime import generate
    tok = AutoTokenizer.from_pretrained(model)
    engine = load_engine(workdir / "oracle" / "engine", threads=1)
    # the tool's default --pool 1 (the paper's selection, as its recorded results used)
    evictor = make_evictor(EvictionSettings.from_args("key-norm", 0.5, None, 2, 8, "0", 32, pool=1), engine)
    new = generate(engine, [passkey_task(tok, 320, 0.5, 0).prompt_ids], 4, stop_tokens={tok.eos_token_id},
                   evictor=evictor, prefill_chunk=32)[0]
    assert evictor.evictions > 0 and tok.decode(new, skip_special_tokens=True) == rows["key-norm"]["records"][0]["generated"]
    table = _table((workdir / "oracle" / "result.md").read_text())
    assert [row[0] for row in table[2:]] == ["key-norm", "plain", "oracle"] and table[2][-1].endswith("%")
    bad = subprocess.run([sys.executable, str(TOOLS / "evict_oracle.py"), "--engine", "oracle/engine", "--model",
                          "llama512", "--scorers", "attention", "--out", "oracle/bad"], capture_output=True, text=True,
                         cwd=workdir, timeout=300)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "--scorers takes" in bad.stderr


def test_longctx_table(workdir, oracle_engine):
    """tools/longctx_table.py: one row per (policy, keep, pool), keep 1 once, KV bytes shrink with
    eviction, the pool recorded per row and shown in the table."""
    _tool("longctx_table.py", "--engine", "tiny=oracle/engine", "--keep", "1,0.5", "--pool", "1,3", "--contexts",
          "320", "--depths", "0.5", "--kinds", "passkey", "--sink", "2", "--recent", "8", "--skip-layers", "0",
          "--headroom", "32", "--max-new-tokens", "4", "--ppl-tokens", "48", "--ppl-text", "calib.txt",
          "--threads", "1", "--out", "longctx/result", cwd=workdir)
    result = json.loads((workdir / "longctx" / "result.json").read_text())
    rows = [(r["policy"], r["keep"], r["pool"]) for r in result["rows"]]
    _assert_malloc_recorded(result["machine"])
    assert rows == [("none", 1.0, 1), ("key-norm", 0.5, 1), ("key-norm", 0.5, 3)]
    kv = [r["kv_bytes_longest_context"] for r in result["rows"]]
    assert kv[0] > kv[1] == kv[2] and all(r["ppl"] > 1 for r in result["rows"])
    assert all(list(r["accuracy"]) == ["passkey@320"] and len(r["records"]) == 1 for r in result["rows"])
    table = _table((workdir / "longctx" / "result.md").read_text())
    assert table[0][:4] == ["engine", "policy", "pool", "keep"] and [row[2] for row in table[2:]] == ["1", "1", "3"]


def test_peak_memory(workdir, oracle_engine, capsys):
    """tools/peak_memory.py (its main in-process; each setting still runs in a child process): the
    child's own peak RSS and the KV buffers it allocates (smaller with eviction); a bad setting is a
    one-line exit 2 before anything runs, and nothing is written."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("peak_memory", TOOLS / "peak_memory.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    engine, out = str(workdir / "oracle" / "engine"), workdir / "peak" / "result"
    assert tool.main(["--engine", engine, "--batch", "2", "--context", "200", "--max-new-tokens", "2",
                      "--prefill-chunk", "32", "--setting", "none=", "--setting",
                      "evict=--evict key-norm --keep 0.25 --sink 2 --recent 8 --skip-layers 0 --evict-headroom 32",
                      "--out", str(out)]) == 0
    result = json.loads(out.with_suffix(".json").read_text())
    none, evict = result["rows"]
    assert (none["setting"], evict["setting"]) == ("none", "evict") and 150 <= result["prompt_tokens_max"] <= 250
    assert none["kv_bytes"] > evict["kv_bytes"] > 0
    from eigenkv.malloc import not_tunable
    reason = not_tunable()
    assert result["malloc"] == ("tuned by eigenkv/malloc.py" if reason is None else f"glibc default ({reason})")
    assert 50 < none["peak_rss_mib"] < 20_000 and 50 < evict["peak_rss_mib"] < 20_000  # a plausible process size, read by the child
    assert _table(out.with_suffix(".md").read_text())[0][2] == "peak RSS MiB"
    capsys.readouterr()
    bad = workdir / "peak" / "bad"
    assert tool.main(["--engine", engine, "--batch", "1", "--context", "50", "--setting",
                      "x=--evict key-norm --keep 2", "--out", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("peak_memory: error: setting 'x': --keep must be in (0, 1]") and "\n" not in err
    assert not bad.with_suffix(".json").exists() and not bad.with_suffix(".md").exists()
    assert tool.main(["--engine", engine, "--setting", "no-label", "--out", str(bad)]) == 2
    assert "--setting takes LABEL=ARGS" in capsys.readouterr().err and not bad.with_suffix(".json").exists()


def test_session_spread(workdir, oracle_engine):
    """tools/session_spread.py: every session times the same number of decode steps, block b starts
    with session b mod K, the table lists the sessions in load order with the JSON's figures; a
    folder without genai_config.json is a one-line exit 2 and nothing is written."""
    _tool("session_spread.py", "--engine", "oracle/engine", "--sessions", "2", "--contexts", "40", "--batches", "1,2",
          "--blocks", "3", "--steps", "2", "--threads", "1", "--out", "spread/result", cwd=workdir)
    result = json.loads((workdir / "spread" / "result.json").read_text())
    assert [(c["context"], c["batch"], c["order"]) for c in result["cells"]] == [(40, 1, "ours-first"), (40, 2, "ours-first")]
    for cell in result["cells"]:
        assert cell["load_order"] == ["ours #1", "ours #2"]
        assert cell["blocks"] == [["ours #1", "ours #2"], ["ours #2", "ours #1"], ["ours #1", "ours #2"]]
        assert all(v["steps"] == 6 and 0 < v["p50"] <= v["mean"] * 10 for v in cell["ms"].values())
    table = _table((workdir / "spread" / "result.md").read_text())
    assert [(row[0], row[2], float(row[3])) for row in table[2:]] == [
        (f"40 × {c['batch']}", name, round(c["ms"][name]["p50"], 2)) for c in result["cells"] for name in c["load_order"]]
    # two engines (here two copies of one build): each gets its sessions, labelled by folder, in one rotation
    shutil.copytree(workdir / "oracle" / "engine", workdir / "spread" / "copy")
    _tool("session_spread.py", "--engine", "oracle/engine", "--engine", "spread/copy", "--sessions", "1",
          "--contexts", "40", "--blocks", "2", "--steps", "2", "--threads", "1", "--out", "spread/ab", cwd=workdir)
    cell, = json.loads((workdir / "spread" / "ab.json").read_text())["cells"]
    assert cell["load_order"] == ["engine #1", "copy #1"] and cell["blocks"] == [["engine #1", "copy #1"],
                                                                                ["copy #1", "engine #1"]]
    assert all(v["steps"] == 4 for v in cell["ms"].values())
    bad = subprocess.run([sys.executable, str(TOOLS / "session_spread.py"), "--engine", "oracle/engine", "--ortgenai",
                          "oracle", "--contexts", "40", "--blocks", "2", "--steps", "1", "--out", "spread/bad"],
                         capture_output=True, text=True, cwd=workdir, timeout=300)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "genai_config.json" in bad.stderr
    assert not list((workdir / "spread").glob("bad*"))
