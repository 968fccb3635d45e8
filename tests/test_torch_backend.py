"""The `torch` backend on the CPU: build, parity with the ORT engine and the folded torch model,
`keep` + step, the CLI, self-containment, SDPA and the (interpreted) Triton attention.

CUDA-only paths (CUDA graphs, the compiled kernel, fp16 compute) are exercised by
`tools/gpu_check.py` on a GPU host, not here.
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from tiny_models import export_tiny, folded_for_manifest, tiny_model

from eigenkv.cli import main
from eigenkv.engines.backend import load_engine
from eigenkv.engines.runtime import generate, prefill
from eigenkv.errors import EigenError

TEXT = "The quick brown fox jumps over the lazy dog. " * 80


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(root, graph, torch engine dir, ort engine dir, folded torch model) of one tiny llama export."""
    root = tmp_path_factory.mktemp("torch_backend")
    (root / "calib.txt").write_text(TEXT)
    out = root / "exp" / "model.onnx"
    assert export_tiny(root, "llama", out, "--kv-ratio", "0.5", "--max-seq-len", "96", "--decode-steps", "4") == 0
    assert main(["build", str(out), "-o", str(root / "torch"), "--backend", "torch"]) == 0
    assert main(["build", str(out), "-o", str(root / "ort"), "--backend", "ort"]) == 0
    manifest = json.loads((out.parent / "model.eigen.json").read_text())
    folded = folded_for_manifest(root, "llama", manifest, out).with_max_positions(96)
    return root, out, root / "torch", root / "ort", folded


def _prompts():
    g = torch.Generator().manual_seed(11)
    return [torch.randint(0, 256, (n,), generator=g).tolist() for n in (5, 12, 3, 9)]


@torch.no_grad()
def _torch_greedy(decoder, prompt, steps):
    cache = decoder.new_cache(1, len(prompt) + steps)
    logits = decoder(torch.tensor([prompt]), torch.arange(len(prompt))[None], cache)[0, -1]
    out = []
    for t in range(steps):
        out.append(int(logits.argmax()))
        logits = decoder(torch.tensor([[out[-1]]]), torch.tensor([[len(prompt) + t]]), cache)[0, -1]
    return out


def test_build_writes_weights_and_config(built):
    root, out, engine_dir, _, folded = built
    assert sorted(p.name for p in engine_dir.iterdir()) == ["config.json", "hf_config.json", "model.safetensors"]
    config = json.loads((engine_dir / "config.json").read_text())
    assert config["backend"] == "torch" and config["rope_mode"] == "pre" and config["precision"] == "fp32"
    assert config["runtime"]["torch"] == torch.__version__ and config["device"] == {"type": "cpu"}
    assert config["kv_layout"]["key_ranks"] == folded.key_ranks
    manifest = json.loads((out.parent / "model.eigen.json").read_text())
    assert manifest["files"]["projections"] == "model.projections.safetensors"
    from safetensors import safe_open
    with safe_open(str(engine_dir / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
        assert f.get_tensor("layers.0.attn.key_up").shape == (2, folded.key_ranks[0], 16)  # [Hkv, r_k, head_dim]
    assert names == set(folded.state_dict())  # every tensor of the folded decoder, nothing else


def test_greedy_64_tokens_match_ort_and_folded_torch(built):
    _, _, torch_dir, ort_dir, folded = built
    engine, ort = load_engine(torch_dir), load_engine(ort_dir)
    assert (engine.name, engine.attention, engine.device.type) == ("torch", "reference", "cpu")
    prompts = _prompts()
    tokens = generate(engine, prompts, 64)
    assert tokens == generate(ort, prompts, 64)  # batch 4, prompts of different lengths
    assert tokens[0] == _torch_greedy(folded, prompts[0], 64)  # and the folded torch model, alone


def test_runner_is_the_model(built):
    """The engine's layer loop computes what the folded model's own forward does (same ops)."""
    _, _, torch_dir, _, folded = built
    engine = load_engine(torch_dir)
    ids = np.array([_prompts()[1]])
    positions = np.arange(ids.shape[1])[None]
    logits = engine.step(engine.new_cache(1, 40), ids, positions)
    with torch.no_grad():
        cache = engine.decoder.new_cache(1, 40)
        expected = engine.decoder(torch.from_numpy(ids), torch.from_numpy(positions), cache).numpy()
        expected_folded = folded(torch.from_numpy(ids), torch.from_numpy(positions), folded.new_cache(1, 40)).numpy()
    assert np.array_equal(logits, expected)
    assert np.abs(logits - expected_folded).max() < 1e-5  # the engine's weights are the export's


def _keep_then_step(engine, cache, rng_seed=5):
    """Prefill 2 prompts, keep random slots (per layer, sequence, head; random order), step once."""
    ids = np.array([_prompts()[1], _prompts()[3] + [0] * 3])
    lengths = np.array([12, 9])
    prefill(engine, cache, ids, lengths, chunk=12)
    rng = np.random.default_rng(rng_seed)
    for layer in range(engine.layout.n_layers):
        for seq in range(2):
            n = int(cache.lengths[layer, seq])
            slots = np.stack([rng.permutation(n)[: n - 3] for _ in range(engine.layout.n_kv_heads)])
            cache.keep(layer, seq, slots)
    logits = engine.step(cache, np.array([[7], [8]]), lengths[:, None])
    cache.advance(np.ones(2, np.int64))
    return logits[:, 0]


def test_keep_then_step_matches_ort(built):
    _, _, torch_dir, ort_dir, _ = built
    engine, ort = load_engine(torch_dir), load_engine(ort_dir)
    ours = _keep_then_step(engine, engine.new_cache(2, 20))
    theirs = _keep_then_step(ort, ort.new_cache(2, 20))
    assert np.abs(ours - theirs).max() < 1e-4
    # the keep mattered: without it the same step gives other logits
    cache = engine.new_cache(2, 20)
    prefill(engine, cache, np.array([_prompts()[1], _prompts()[3] + [0] * 3]), np.array([12, 9]), chunk=12)
    plain = engine.step(cache, np.array([[7], [8]]), np.array([[12], [9]]))[:, 0]
    assert np.abs(ours - plain).max() > 1e-3
    # the device cache class (CUDA's) gives the same result when placed on the CPU
    from eigenkv.engines.torch_backend import TorchDeviceKVCache
    device_cache = TorchDeviceKVCache(engine.layout, 2, [20] * 3, torch.float32, torch.device("cpu"))
    assert np.abs(_keep_then_step(engine, device_cache) - ours).max() < 1e-6


class EagerGraphs:
    """`CudaGraphs` on the CPU: capture records fn without running it; replay runs it and writes the
    one output tensor in place (what a CUDA graph replay does to its static output)."""

    def run(self, fn):
        return fn()

    def capture(self, fn):
        out = torch.empty(0)

        def replay():
            with torch.no_grad():
                result = fn()
            out.resize_(result.shape).copy_(result)
        return replay, out


def _decode_with_keep(engine, cache, steps=6, keep_at=3):
    """Prefill 2 prompts, decode greedily with a keep of random slots after `keep_at` steps -> logits per step."""
    from eigenkv.engines.runtime import decode_step
    ids, lengths = np.array([_prompts()[1], _prompts()[3] + [0] * 3]), np.array([12, 9])
    logits = [prefill(engine, cache, ids, lengths, chunk=12)]
    rng = np.random.default_rng(2)
    for t in range(steps):
        if t == keep_at:
            for layer in range(engine.layout.n_layers):
                for seq in range(2):
                    n = int(cache.lengths[layer, seq])
                    cache.keep(layer, seq, np.stack([rng.permutation(n)[: n - 2] for _ in range(2)]))
        logits.append(decode_step(engine, cache, logits[-1].argmax(-1), lengths + t))
    return np.stack(logits)


def test_graph_step_bookkeeping_with_an_eager_stand_in(built):
    """The CUDA-graph decode path's static buffers (ids, positions, lengths, logits) with a stand-in
    that replays eagerly: eager first step, one capture, replays that see a `keep` in between."""
    from eigenkv.engines.torch_backend import TorchDeviceKVCache
    _, _, torch_dir, _, _ = built
    plain = load_engine(torch_dir)
    expected = _decode_with_keep(plain, plain.new_cache(2, 24))
    engine = load_engine(torch_dir)
    engine.graphs = EagerGraphs()
    cache = TorchDeviceKVCache(engine.layout, 2, [24] * 3, torch.float32, torch.device("cpu"))
    pointers = cache.pointers()
    got = _decode_with_keep(engine, cache)
    assert np.abs(got - expected).max() < 1e-6
    assert (engine.graph_captures, engine.graph_replays, cache.eager_decode_steps) == (1, 5, 1)
    assert cache.pointers() == pointers


def test_cli_run_on_torch_engine_matches_ort(built, capsys):
    _, _, torch_dir, ort_dir, _ = built
    texts = []
    for engine_dir in (torch_dir, ort_dir):
        capsys.readouterr()
        assert main(["run", str(engine_dir), "--prompt", "fox", "--max-new-tokens", "12", "--ignore-eos"]) == 0
        texts.append(capsys.readouterr().out)
    assert texts[0].startswith("fox") and texts[0] == texts[1]


def test_engine_directory_is_self_contained(built, tmp_path):
    """Loading needs neither the export folder nor the source checkpoint (only `run` reads its tokenizer)."""
    root, _, torch_dir, _, _ = built
    moved = [(root / "exp", tmp_path / "exp"), (root / "llama", tmp_path / "llama")]
    for a, b in moved:
        shutil.move(a, b)
    try:
        engine = load_engine(torch_dir)
        assert generate(engine, [[1, 2, 3]], 4)[0] == generate(load_engine(root / "ort"), [[1, 2, 3]], 4)[0]
    finally:
        for a, b in moved:
            shutil.move(b, a)


@pytest.mark.parametrize("case", ["truncated", "no-projections", "sdpa-pre", "fp16-on-cpu"])
def test_bad_input_is_one_line(built, tmp_path, case):
    root, out, torch_dir, _, _ = built
    engine_dir = tmp_path / "e"
    shutil.copytree(torch_dir, engine_dir)
    if case == "truncated":
        model = engine_dir / "model.safetensors"
        model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
        with pytest.raises(EigenError, match="model.safetensors is corrupt or truncated .*rebuild it with"):
            load_engine(engine_dir)
    elif case == "no-projections":
        export = tmp_path / "x"
        shutil.copytree(out.parent, export)
        manifest = json.loads((export / "model.eigen.json").read_text())
        manifest["files"]["projections"] = None
        (export / "model.eigen.json").write_text(json.dumps(manifest))
        with pytest.raises(EigenError, match="exported without its folded attention tensors"):
            main_build(export / "model.onnx", tmp_path / "t")
        assert not (tmp_path / "t").exists()
    elif case == "sdpa-pre":
        with pytest.raises(EigenError, match="attention 'sdpa' needs keys ready to score"):
            load_engine(engine_dir, attention="sdpa")
    else:
        config = json.loads((engine_dir / "config.json").read_text())
        config["precision"] = "fp16"
        (engine_dir / "config.json").write_text(json.dumps(config))
        with pytest.warns(UserWarning, match="fp16 engine on a host without CUDA: it runs in float32"):
            engine = load_engine(engine_dir)
        assert engine.precision == "fp32" and engine.built_precision == "fp16"


def main_build(graph, out):
    from eigenkv.engines.build import build
    return build(graph, out, backend="torch")


def test_fp16_engine_is_the_exports_mixed_precision(built):
    """fp16 compute (CUDA's default for fp16 engines), forced on the CPU: the export's mixed precision
    (fp16 weights and KV cache, float32 residual stream and norms), close to float32."""
    from eigenkv.engines.torch_backend import TorchEngine, load_decoder
    from eigenkv.engines.config import EngineConfig
    _, _, torch_dir, _, _ = built
    config = EngineConfig.load(torch_dir)
    fp32 = load_engine(torch_dir)
    fp16 = TorchEngine(load_decoder(torch_dir, config), config.kv_layout, "fp16", device="cpu", dtype=torch.float16)
    assert fp16.precision == "fp16" and fp16.decoder.layers[0].mlp.up_proj.weight.dtype == torch.float16
    assert fp16.decoder.layers[0].attn_norm.module.weight.dtype == torch.float32  # norms stay float32
    caches = [e.new_cache(1, 30) for e in (fp32, fp16)]
    assert caches[1].keys(0).dtype == np.float16
    ids = np.array([_prompts()[1]])
    positions = np.arange(ids.shape[1])[None]
    a, b = (e.step(c, ids, positions) for e, c in zip((fp32, fp16), caches))
    assert b.dtype == np.float32 and np.isfinite(b).all() and 0 < np.abs(a - b).max() < 2e-2


def test_sdpa_matches_reference_on_an_uncompressed_model():
    """`--no-compress` engines' CUDA path (SDPA over full-width keys, slot-position mask), run on the CPU."""
    from eigenkv.engines.torch_backend import TorchEngine, layout_of
    from eigenkv.exporter.decoder import decoder_from_hf
    decoder = decoder_from_hf(tiny_model("llama"), 64)
    engines = [TorchEngine(decoder, layout_of(decoder, 64), "fp32", device="cpu", attention=a)
               for a in ("reference", "sdpa")]
    assert engines[1].attention == "sdpa"
    ref, sdpa = (_keep_then_step(e, e.new_cache(2, 20)) for e in engines)
    assert np.abs(ref - sdpa).max() < 1e-5 and np.abs(ref).max() > 0.1


TRITON_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    from eigenkv.engines.backend import load_engine
    from eigenkv.engines.runtime import generate
    ref, tri = load_engine(sys.argv[1]), load_engine(sys.argv[1], attention="triton")
    prompts = [[1, 2, 3, 4, 5], [7, 8, 9]]
    caches = [e.new_cache(2, 16) for e in (ref, tri)]
    ids, pos = np.array([[1, 2, 3, 4, 5], [7, 8, 9, 0, 0]]), np.broadcast_to(np.arange(5), (2, 5))
    diff = float(np.abs(ref.step(caches[0], ids, pos) - tri.step(caches[1], ids, pos)).max())
    print(json.dumps({"attention": tri.attention, "diff": diff,
                      "tokens": [generate(e, prompts, 3) for e in (ref, tri)]}))
""")


def test_triton_attention_interpreted_matches_reference(built):
    """The engine's Triton path (the CUDA default) under TRITON_INTERPRET=1 on the CPU: same tokens."""
    pytest.importorskip("triton", reason="triton is not installed")
    _, _, torch_dir, _, _ = built
    env = dict(os.environ, TRITON_INTERPRET="1")
    run = subprocess.run([sys.executable, "-c", TRITON_SCRIPT, str(torch_dir)], env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["attention"] == "triton" and result["diff"] < 1e-5
    assert result["tokens"][0] == result["tokens"][1]
