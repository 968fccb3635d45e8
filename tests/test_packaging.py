"""Packaging guards: the mapped subpackages ship in the wheel; bare folder imports refuse."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAPPED = ("exporter", "plugins", "engines")


@pytest.mark.parametrize("name", MAPPED)
def test_bare_folder_import_refused(name):
    out = subprocess.run([sys.executable, "-c", f"import {name}"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode != 0 and f"import eigenkv.{name}, not {name}" in out.stderr


def test_wheel_contains_every_module(tmp_path):
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                          "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True)
    if out.returncode != 0 and "No module named" in out.stderr:
        pytest.skip(f"cannot build a wheel here: {out.stderr.strip().splitlines()[-1]}")
    assert out.returncode == 0, out.stderr
    wheel = next(tmp_path.glob("eigenkv-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for folder in MAPPED:
        for src in (ROOT / folder).rglob("*.py"):
            rel = src.relative_to(ROOT / folder)
            assert f"eigenkv/{folder}/{rel.as_posix()}" in names, rel
    assert "eigenkv/cli.py" in names


def test_modules_and_help_import_without_optional_deps():
    """--help works with no onnx/tensorrt/triton installed-or-not: they are never imported eagerly."""
    code = ("import sys, eigenkv.cli, eigenkv.exporter.pipeline, eigenkv.plugins.reference;"
            "bad = [m for m in ('onnx', 'onnxruntime', 'tensorrt', 'triton') if m in sys.modules];"
            "assert not bad, bad")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
