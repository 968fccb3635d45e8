"""Engines (ort backend) and the runtime: parity with torch, batching, in-place KV, bad input."""

import importlib.util
import json

import pytest
import torch
from tiny_models import export_tiny, folded_for_manifest

from eigenkv.cli import main
from eigenkv.engines.backend import load_engine
from eigenkv.engines.runtime import Sampling, generate
from eigenkv.errors import EigenError

TEXT = "The quick brown fox jumps over the lazy dog. " * 80


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("engines")
    (root / "calib.txt").write_text(TEXT)
    out = root / "exp" / "model.onnx"
    assert export_tiny(root, "llama", out, "--kv-ratio", "0.5", "--max-seq-len", "96", "--decode-steps", "4") == 0
    engine_dir = root / "engine"
    assert main(["build", str(out), "-o", str(engine_dir), "--backend", "ort"]) == 0
    manifest = json.loads((out.parent / "model.eigen.json").read_text())
    folded = folded_for_manifest(root, "llama", manifest, out).with_max_positions(96)
    return root, out, engine_dir, folded


@torch.no_grad()
def _torch_greedy(decoder, prompt, steps):
    cache = decoder.new_cache(1, len(prompt) + steps)
    logits = decoder(torch.tensor([prompt]), torch.arange(len(prompt))[None], cache)[0, -1]
    out = []
    for t in range(steps):
        out.append(int(logits.argmax()))
        logits = decoder(torch.tensor([[out[-1]]]), torch.tensor([[len(prompt) + t]]), cache)[0, -1]
    return out


def _prompts():
    g = torch.Generator().manual_seed(7)
    return [torch.randint(0, 256, (n,), generator=g).tolist() for n in (5, 12, 3, 9)]


def test_engine_config_records_layout_and_runtime(built):
    _, _, engine_dir, folded = built
    config = json.loads((engine_dir / "config.json").read_text())
    import onnxruntime
    assert config["backend"] == "ort" and config["schema_version"] == 2
    assert config["kv_layout"]["key_ranks"] == folded.key_ranks and config["kv_layout"]["slot_positions"]
    assert config["runtime"]["onnxruntime"] == onnxruntime.__version__
    assert config["session_options"]["graph_optimization_level"] == "ORT_ENABLE_ALL"
    assert config["source"]["directory"].endswith("llama") and config["source"]["gguf_file"] is None


def test_greedy_64_tokens_match_torch_and_batch_matches_alone(built):
    _, _, engine_dir, folded = built
    engine = load_engine(engine_dir)
    prompts = _prompts()
    alone = [generate(engine, [p], 64)[0] for p in prompts]
    assert alone[0] == _torch_greedy(folded, prompts[0], 64)
    assert generate(engine, prompts, 64) == alone  # batch 4, different prompt lengths
    assert generate(engine, prompts, 16, prefill_chunk=4) == [a[:16] for a in alone]  # chunked prefill


def test_kv_buffers_never_move_or_rebind_during_decode(built):
    _, _, engine_dir, _ = built
    engine = load_engine(engine_dir)
    seen = []
    generate(engine, _prompts()[:2], 20, on_cache=lambda cache: seen.append(cache.pointers()))
    assert len(seen) == 19 and all(p == seen[0] for p in seen)
    assert engine.binds == 2 * 3  # one binding per layer and kind, for the whole call


def test_sampling_is_seeded_and_stops(built):
    _, _, engine_dir, _ = built
    engine = load_engine(engine_dir)
    s = Sampling(temperature=0.9, top_p=0.8, seed=3)
    a, b = generate(engine, [[1, 2, 3]], 16, s), generate(engine, [[1, 2, 3]], 16, s)
    assert a == b and a != generate(engine, [[1, 2, 3]], 16, Sampling(0.9, 0.8, seed=4))
    greedy = generate(engine, [[1, 2, 3]], 16)[0]
    stopped = generate(engine, [[1, 2, 3]], 16, stop_tokens={greedy[3]})[0]
    assert stopped == greedy[: greedy.index(greedy[3]) + 1]
    streamed = []
    generate(engine, [[1, 2, 3]], 8, on_tokens=lambda step: streamed.append(step[0]))
    assert streamed == greedy[:8]


def test_cli_run_streams_text(built, capsys, monkeypatch):
    from transformers import AutoTokenizer

    import eigenkv.engines.runtime as runtime
    root, _, engine_dir, _ = built
    runs, real_generate = [], runtime.generate  # what the CLI's generate calls got and returned

    def recording_generate(engine, prompts, *args, **kwargs):
        runs.append((prompts, real_generate(engine, prompts, *args, **kwargs)))
        return runs[-1][1]

    monkeypatch.setattr(runtime, "generate", recording_generate)
    args = ["run", str(engine_dir), "--prompt", "fox", "--max-new-tokens", "5", "--ignore-eos"]
    capsys.readouterr()
    assert main(args) == 0
    streamed = capsys.readouterr().out
    assert main([*args, "--no-stream"]) == 0
    whole = capsys.readouterr().out
    # both runs are the same greedy run: the prompt, then exactly 5 new tokens
    tokenizer = AutoTokenizer.from_pretrained(root / "llama")
    (prompts, out), again = runs
    assert again == runs[0] and len(prompts) == 1 and tokenizer.decode(prompts[0]) == "fox"
    assert len(out) == 1 and len(out[0]) == 5
    text = "fox" + tokenizer.decode(out[0], skip_special_tokens=True, clean_up_tokenization_spaces=False)
    assert len(text) > len("fox")
    assert streamed == text + "\n" and whole == text + "\n---\n"  # streamed pieces join to the whole text


def test_run_warns_past_the_calibrated_context(built, capsys):
    """`eigenkv run` says so in one stderr line when prompt + new tokens exceed the sequences the
    low-rank cache was calibrated on (32 tokens in these exports), and generates anyway; within
    that length nothing is said; a full-width cache (or an engine built before builds recorded
    the calibration) never warns."""
    import dataclasses

    from eigenkv.engines.config import EngineConfig
    _, _, engine_dir, _ = built
    config = EngineConfig.load(engine_dir)
    assert config.calibrated_context == 32 and config.kv_layout.kv_ratio < 1
    assert config.context_warning(32) is None
    assert "context 33 tokens" in config.context_warning(33) and "--calib-seq-len 33" in config.context_warning(33)
    kv = config.kv_layout
    full = dataclasses.replace(config, kv_layout=dataclasses.replace(
        kv, key_ranks=[kv.head_dim] * kv.n_layers, value_ranks=[kv.head_dim] * kv.n_layers))
    unrecorded = dataclasses.replace(config, report={k: v for k, v in config.report.items() if k != "calibration"})
    assert full.context_warning(90) is None and unrecorded.context_warning(90) is None
    args = ["run", str(engine_dir), "--max-new-tokens", "6", "--ignore-eos", "--no-stream"]
    capsys.readouterr()
    assert main([*args, "--prompt", "fox"]) == 0
    assert capsys.readouterr().err == ""
    assert main([*args, "--prompt", "fox " * 9]) == 0  # 30-some tokens + 6 new: past 32, within max_seq_len 96
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("eigenkv: warning: context ") and "32-token" in lines[0]
    assert out.endswith("---\n")  # it still generated


@pytest.mark.parametrize("case", ["truncated", "newer-schema", "wrong-backend", "too-long", "not-engine"])
def test_bad_engines_and_prompts(built, tmp_path, capsys, case):
    import shutil
    _, _, engine_dir, _ = built
    broken = tmp_path / "e"
    shutil.copytree(engine_dir, broken)
    args = ["run", str(broken), "--prompt", "fox", "--max-new-tokens", "4"]
    if case == "truncated":
        model = broken / "model.onnx"
        model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
        expected = "corrupt or truncated"
    elif case == "newer-schema":
        cfg = json.loads((broken / "config.json").read_text())
        cfg["schema_version"] = 99
        (broken / "config.json").write_text(json.dumps(cfg))
        expected = "newer than this eigenkv reads"
    elif case == "wrong-backend":
        cfg = json.loads((broken / "config.json").read_text())
        cfg["backend"] = "tpu"
        (broken / "config.json").write_text(json.dumps(cfg))
        expected = "unknown backend 'tpu'; known: ort, torch, trt"
    elif case == "too-long":
        args = ["run", str(broken), "--prompt", "x" * 90, "--max-new-tokens", "10"]
        expected = "exceeds the engine's max_seq_len 96"
    else:
        (broken / "config.json").unlink()
        expected = "not an engine directory"
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("eigenkv: error:") and expected in err and "\n" not in err, err


def test_build_refuses_unknown_backend_and_missing_manifest(built, tmp_path, capsys):
    _, out, _, _ = built
    with pytest.raises(SystemExit) as e:  # argparse: choices come from the backend registry
        main(["build", str(out), "-o", str(tmp_path / "t"), "--backend", "tpu"])
    assert e.value.code == 2 and "invalid choice: 'tpu' (choose from 'ort', 'torch', 'trt')" in capsys.readouterr().err
    lone = tmp_path / "lone.onnx"
    lone.write_bytes(out.read_bytes())
    assert main(["build", str(lone), "-o", str(tmp_path / "t")]) == 2
    assert "no lone.eigen.json beside" in capsys.readouterr().err
    assert not (tmp_path / "t").exists()


def test_runtime_version_mismatch_says_rebuild(built, tmp_path):
    import shutil
    _, _, engine_dir, _ = built
    shutil.copytree(engine_dir, tmp_path / "e")
    cfg = json.loads((tmp_path / "e" / "config.json").read_text())
    cfg["runtime"]["onnxruntime"] = "0.0.1"
    (tmp_path / "e" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(EigenError, match="built with onnxruntime 0.0.1, installed is .*rebuild it with `eigenkv build"):
        load_engine(tmp_path / "e")


def test_bench_compressed_vs_baseline_writes_tables(built, tmp_path, monkeypatch):
    import numpy as np

    import eigenkv.engines.bench as bench_module
    raw = {}  # (engine, context, batch) -> (decode step seconds, KV bytes read per step) as timed
    real_summary = bench_module.Point.summary

    def summary(self):
        raw[(self.engine, self.context, self.batch)] = (list(self.step_s), list(self.read_bytes))
        return real_summary(self)

    monkeypatch.setattr(bench_module.Point, "summary", summary)
    root, _, engine_dir, _ = built
    base = root / "base" / "model.onnx"
    if not base.exists():
        assert export_tiny(root, "llama", base, "--no-compress", "--max-seq-len", "96", "--decode-steps", "4") == 0
        assert main(["build", str(base), "-o", str(root / "base-engine")]) == 0
    out = tmp_path / "bench"
    assert main(["bench", str(engine_dir), "--baseline", str(root / "base-engine"), "--contexts", "8,32",
                 "--batches", "1,2", "--decode-tokens", "4", "--repeats", "1", "--prefill-chunk", "16",
                 "--out", str(out), "--no-progress"]) == 0
    result = json.loads((out / "bench.json").read_text())
    assert len(result["points"]) == 2 * 2 * 2
    by = {(p["engine"], p["context"], p["batch"]): p for p in result["points"]}
    comp, base_cfg = (json.loads((d / "config.json").read_text())["kv_layout"]
                      for d in (engine_dir, root / "base-engine"))
    assert set(raw) == set(by)
    for (name, ctx, batch), p in by.items():
        steps_ms, reads = np.array(raw[(name, ctx, batch)][0]) * 1e3, raw[(name, ctx, batch)][1]
        assert p["decode_steps_timed"] == steps_ms.size == 4 and p["prefill_ms_median"] > 0
        assert 0 < p["decode_ms_p50"] <= p["decode_ms_p90"]  # percentiles of the timed steps (3 decimals):
        assert steps_ms.min() - 5e-4 <= p["decode_ms_p50"] and p["decode_ms_p90"] <= steps_ms.max() + 5e-4
        assert p["tokens_per_s"] == pytest.approx(batch * 1e3 / steps_ms.mean(), abs=0.0051)  # 2 decimals
        layout = comp if name == "compressed" else base_cfg
        width = (sum(layout["key_ranks"]) + sum(layout["value_ranks"])) * layout["n_kv_heads"] * 4  # fp32, all layers
        assert p["kv_bytes"] == batch * (ctx + 4 + 1) * width  # buffers of prompt + decode tokens + 1 slots
        # decode step t reads the ctx + t cached slots and its own new token, every sequence and layer
        per_step = [batch * (ctx + t + 1) * width for t in range(4)]
        assert reads == per_step and p["kv_bytes_read_per_step"] == batch * (ctx + 2.5) * width  # their mean
        gb_per_s = np.mean(np.array(per_step) / (steps_ms / 1e3)) / 1e9
        assert p["kv_read_gb_per_s"] == pytest.approx(gb_per_s, abs=5.1e-4)  # 3 decimals
        bounds = min(per_step) / steps_ms.max() * 1e-6, max(per_step) / steps_ms.min() * 1e-6  # GB/s
        assert bounds[0] - 5.1e-4 <= p["kv_read_gb_per_s"] <= bounds[1] + 5.1e-4
    ratio = (sum(comp["key_ranks"]) + sum(comp["value_ranks"])) / (sum(base_cfg["key_ranks"]) + sum(base_cfg["value_ranks"]))
    p_c, p_b = by[("compressed", 32, 2)], by[("baseline", 32, 2)]
    assert p_c["kv_bytes"] / p_b["kv_bytes"] == pytest.approx(ratio)
    assert "speed-up" in (out / "bench.md").read_text()
    if importlib.util.find_spec("matplotlib") is not None:
        assert (out / "bench.png").read_bytes()[:4] == b"\x89PNG"
