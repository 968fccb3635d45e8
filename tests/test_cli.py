"""The CLI end to end on a tiny model directory, and its one-line errors for bad input."""

import json
import subprocess
import sys

import pytest
from tiny_models import save_tiny

from eigenkv.cli import main

TEXT = ("The quick brown fox jumps over the lazy dog. " * 60)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny("llama", tmp_path_factory.mktemp("tiny") / "llama")


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("text") / "calib.txt"
    p.write_text(TEXT)
    return p


def _args(tiny_dir, text_file, out, *extra):
    return ["compress", "-o", str(out), "--model", str(tiny_dir), "--calib-text", str(text_file),
            "--calib-samples", "4", "--calib-seq-len", "32", "--eval-tokens", "0", "--no-progress", *extra]


def test_compress_writes_projections_and_report(tiny_dir, text_file, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(_args(tiny_dir, text_file, out, "--kv-ratio", "0.5")) == 0
    report = json.loads((out / "compress.json").read_text())
    assert report["kv_ratio"] == pytest.approx(0.5, abs=1 / 32)
    assert len(report["ranks"]["key"]) == 3
    # every stage timed (seconds), the perplexity before/after (none here: no evaluation text) too
    assert list(report["seconds"]) == ["load", "calibrate_decompose_fold", "output_refit", "heal", "evaluate"]
    assert all(v >= 0 for v in report["seconds"].values())
    assert (out / "projections.safetensors").stat().st_size > 0
    from eigenkv.artifacts import load_projections
    layers, meta = load_projections(out / "projections.safetensors")
    assert meta["key_ranks"] == report["ranks"]["key"] and len(layers) == 3
    assert layers[0]["k_proj.weight"].shape[0] == 2 * report["ranks"]["key"][0]  # 2 KV heads at the chosen rank
    printed = capsys.readouterr().out
    assert "KV cache" in printed and "method loss-aware\n" in printed and report["ranks"]["method"] == "loss-aware"
    # a second run into the same directory needs --force
    assert main(_args(tiny_dir, text_file, out, "--kv-ratio", "0.5")) == 2


def test_calibration_shape_defaults_follow_the_model(tiny_dir, tmp_path):
    """Without --calib-seq-len / --calib-samples a run calibrates on sequences as long as the
    model's positions allow, up to 4096 tokens, 32768 tokens in all (the tiny model: 128
    positions -> 256 x 128); a given value is kept."""
    text = tmp_path / "long.txt"
    text.write_text(TEXT * 28)  # 75k characters: 2 x 32768 byte tokens and more
    out = tmp_path / "out"
    assert main(["compress", "-o", str(out), "--model", str(tiny_dir), "--calib-text", str(text), "--eval-tokens",
                 "0", "--no-progress", "--kv-ratio", "0.5"]) == 0
    report = json.loads((out / "compress.json").read_text())
    assert (report["calibration"]["seq_len"], report["calibration"]["samples"]) == (128, 256)
    assert (report["config"]["calib_seq_len"], report["config"]["calib_samples"]) == (128, 256)
    out2 = tmp_path / "out2"
    assert main(["compress", "-o", str(out2), "--model", str(tiny_dir), "--calib-text", str(text), "--eval-tokens",
                 "0", "--no-progress", "--kv-ratio", "0.5", "--calib-samples", "3"]) == 0
    assert json.loads((out2 / "compress.json").read_text())["calibration"]["samples"] == 3


def test_error_budget_respects_budget(tiny_dir, text_file, tmp_path):
    out = tmp_path / "out"
    assert main(_args(tiny_dir, text_file, out, "--error-budget", "0.05", "--rope-mode", "joint")) == 0
    ranks = json.loads((out / "compress.json").read_text())["ranks"]
    assert ranks["method"] == "eigen" and ranks["allocation"] == "error-budget"
    assert all(e <= 0.05 for e in ranks["layer_errors"])
    assert all(r >= 0.45 * 16 for r in ranks["key"] + ranks["value"])  # the paper's floor (head_dim 16)


@pytest.mark.parametrize("extra, message", [
    (["--kv-ratio", "1.5"], "--kv-ratio must be in (0, 1]"),
    (["--kv-ratio", "0"], "--kv-ratio must be in (0, 1]"),
    (["--key-rank", "17"], "exceeds head_dim 16"),
    (["--calib-samples", "500"], "need 16000"),
    (["--fisher-draws", "0"], "--fisher-draws must be >= 1"),
    (["--calib-seq-len", "4096"], "exceeds the model's maximum positions"),
    (["--compress-layers", "0,x"], "--compress-layers takes layer indices like 0,1 or 0-3"),
    (["--compress-layers", "1-3"], "--compress-layers 3 is out of range: the model has layers 0..2"),
    (["--compress-layers", "0", "--method", "eigen"], "works with --kv-ratio"),
    (["--compress-layers", "0", "--max-ppl-increase", "0.1"], "works with --kv-ratio"),
    (["--compress-layers", "0", "--heal-steps", "2"], "does not heal yet"),
])
def test_bad_input_one_line_exit_2_nothing_written(tiny_dir, text_file, tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    assert main(_args(tiny_dir, text_file, out, *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and err.startswith("eigenkv: error:")
    assert not out.exists()


def test_missing_model_and_unknown_model_type(tmp_path, text_file, capsys):
    assert main(_args(tmp_path / "nope", text_file, tmp_path / "o1")) == 2
    assert "no such file or directory" in capsys.readouterr().err
    from transformers import GPT2Config
    GPT2Config(n_layer=1, n_embd=16, n_head=2).save_pretrained(tmp_path / "gpt2")
    assert main(_args(tmp_path / "gpt2", text_file, tmp_path / "o2")) == 2
    err = capsys.readouterr().err.strip()
    assert "unsupported model_type 'gpt2'" in err and "llama" in err and "mpt" in err and "\n" not in err
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_help_teaches_and_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "eigenkv.cli", "compress", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--kv-ratio" in out.stdout and "--rope-mode" in out.stdout


def test_broken_model_directory_is_one_line(tmp_path, text_file, capsys):
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    assert main(_args(tmp_path / "broken", text_file, tmp_path / "o")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("eigenkv: error: cannot load model") and "\n" not in err
    assert not (tmp_path / "o").exists()


def test_model_paths_resolve_without_guessing(tmp_path, tiny_dir):
    from eigenkv.errors import EigenError
    from eigenkv.exporter.sources import resolve_model
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert resolve_model(str(gguf)).gguf_file == "m.gguf"
    assert resolve_model(str(tiny_dir)).gguf_file is None
    (tmp_path / "empty").mkdir()
    with pytest.raises(EigenError, match="no config.json"):
        resolve_model(str(tmp_path / "empty"))


def test_config_is_parsed_once_per_file_version_and_copied(tmp_path, tiny_dir, monkeypatch):
    """load_config reuses a parsed config (a GGUF's costs a full metadata parse) until the file
    changes, and hands out copies: a caller's edit never reaches the next caller."""
    import json
    import os
    import shutil

    import transformers

    from eigenkv.exporter.sources import ModelSource, load_config
    model = tmp_path / "model"
    shutil.copytree(tiny_dir, model)
    parses = []
    real = transformers.AutoConfig.from_pretrained.__func__
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained",
                        classmethod(lambda cls, *a, **k: parses.append(a) or real(cls, *a, **k)))
    source = ModelSource(model, None)
    first = load_config(source)
    first.num_hidden_layers = 99
    second = load_config(source)
    assert len(parses) == 1 and second.num_hidden_layers != 99 and second is not first
    raw = json.loads((model / "config.json").read_text())
    raw["rms_norm_eps"] = 0.125
    (model / "config.json").write_text(json.dumps(raw))
    st = (model / "config.json").stat()
    os.utime(model / "config.json", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert load_config(source).rms_norm_eps == 0.125 and len(parses) == 2
    # the model load takes that config instead of parsing the checkpoint's again
    from eigenkv.exporter.sources import load_model
    seen = []
    real_model = transformers.AutoModelForCausalLM.from_pretrained.__func__

    def model_load(cls, *a, **k):
        before = len(parses)
        model = real_model(cls, *a, **k)
        seen.append((k.get("config"), len(parses) - before))
        return model
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", classmethod(model_load))
    model, _ = load_model(source, progress=False)
    (config, parsed_inside), = seen
    assert config.rms_norm_eps == 0.125 and parsed_inside == 0 and model.config.rms_norm_eps == 0.125


def test_version_answers_without_importing_torch():
    code = ("import sys; from eigenkv.cli import main, export_main; "
            "assert main(['--version']) == 0 and export_main(['--version']) == 0; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    from eigenkv import __version__
    assert out == ["eigenkv", __version__, "eigenkv", __version__, "False"]
    with pytest.raises(SystemExit) as e:  # the full parser's --version says the same
        from eigenkv.cli import build_parser
        build_parser().parse_args(["--version"])
    assert e.value.code == 0


@pytest.mark.parametrize("method, attention, fisher, weighting", [
    ("loss-aware", False, True, "fisher"), ("loss-aware-attention", True, False, "attention"),
    ("loss-aware-uniform", False, False, None), ("eigen", False, False, None)])
def test_compress_calibrates_the_statistics_its_method_reads(tiny_dir, text_file, tmp_path, monkeypatch,
                                                             method, attention, fisher, weighting):
    """The pipeline asks calibration for the attention statistics and the Fisher pass only when the
    method reads them (each costs about as much as calibration itself); the report says which key
    weighting `loss-aware` meant."""
    import eigenkv.exporter.pipeline as pipeline
    seen = []

    def spy(*a, **k):
        seen.append((k["attention"], k["fisher"], k["fisher_draws"]))
        return real(*a, **k)
    real = pipeline.calibrate
    monkeypatch.setattr(pipeline, "calibrate", spy)
    extra = ("--kv-ratio", "0.5") if method != "eigen" else ()
    assert main(_args(tiny_dir, text_file, tmp_path / "out", "--method", method, "--fisher-draws", "3", *extra)) == 0
    assert seen == [(attention, fisher, 3)]
    report = json.loads((tmp_path / "out" / "compress.json").read_text())
    assert report["ranks"]["method"] == method and report["ranks"].get("key_weighting") == weighting
    assert report["ranks"].get("fisher_draws") == (3 if fisher else None)
    assert report["output_refit"] == {"applied": False, "reason": "off (--output-refit turns it on)"}


def test_output_refit_runs_when_asked_and_is_recorded(tiny_dir, text_file, tmp_path):
    """--output-refit refits the compressed layers' W_o on --refit-samples windows and records the
    residuals; without it, or with too few tokens per o_proj input (here 2 x 64), the fold's W_o
    stays and the report says why; --refit-samples 0 and --output-refit with --max-ppl-increase
    are refused (exit 2, nothing written)."""
    assert main(_args(tiny_dir, text_file, tmp_path / "a", "--kv-ratio", "0.5", "--calib-samples", "8",
                      "--output-refit", "--refit-samples", "6")) == 0
    report = json.loads((tmp_path / "a" / "compress.json").read_text())
    refit = report["output_refit"]
    assert refit["applied"] and refit["tokens"] == 6 * 32 and refit["layers"]
    d = report["head_dim"]
    assert all(report["ranks"]["key"][i] < d or report["ranks"]["value"][i] < d for i in refit["layers"])
    assert all(a <= b + 1e-9 for a, b in zip(refit["relative_residual_after"], refit["relative_residual_before"]))
    assert main(_args(tiny_dir, text_file, tmp_path / "b", "--kv-ratio", "0.5")) == 0
    report = json.loads((tmp_path / "b" / "compress.json").read_text())
    assert report["output_refit"] == {"applied": False, "reason": "off (--output-refit turns it on)"}
    assert main(_args(tiny_dir, text_file, tmp_path / "c", "--kv-ratio", "0.5", "--refit-samples", "0")) == 2
    assert main(_args(tiny_dir, text_file, tmp_path / "c", "--max-ppl-increase", "0.5", "--output-refit")) == 2
    assert not (tmp_path / "c").exists()
    assert main(_args(tiny_dir, text_file, tmp_path / "d", "--kv-ratio", "0.5", "--output-refit",
                      "--refit-samples", "1")) == 0
    reason = json.loads((tmp_path / "d" / "compress.json").read_text())["output_refit"]["reason"]
    assert reason.startswith("32 calibration tokens are too few for a least-squares W_o of")


def test_joint_mode_conflict_is_refused_before_calibration(tiny_dir, text_file, tmp_path, capsys, monkeypatch):
    import eigenkv.exporter.pipeline as pipeline

    def no_calibration(*a, **k):
        raise AssertionError("calibration ran before the refusal")
    monkeypatch.setattr(pipeline, "calibrate", no_calibration)
    out = tmp_path / "out"
    assert main(_args(tiny_dir, text_file, out, "--rope-mode", "joint", "--method", "loss-aware-uniform")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "use --method loss-aware-shared, or --rope-mode pre" in err[0], err
    assert not out.exists()
