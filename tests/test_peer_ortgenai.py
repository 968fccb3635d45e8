"""The ORT-GenAI peer (engines/peer_ortgenai.py) and its build tool (tools/ortgenai_peer.py).

Without onnxruntime-genai: `accepts()` on folders, the install hint of `load()`, and the tool's
--help (both with the package made unimportable). With it: the tool builds a tiny random llama
(vocab 256, hidden 64, 3 layers) with ORT-GenAI's own model builder and checks it; the engine's
step logits match transformers run in float64 within 1e-5 (absolute; the logits are below 1 and
the fp32 engine's error is ~1e-7), greedy tokens are identical (batch 1 through append_tokens,
chunked; batch 2 through ORT-GenAI's decode loop), and what it cannot do is refused in one line.
"""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import save_tiny

from eigenkv.engines import peer_ortgenai
from eigenkv.engines.runtime import generate, greedy, prefill
from eigenkv.errors import EigenError

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO / "tools" / "ortgenai_peer.py"
TOL = 1e-5  # max |logit diff| vs float64 transformers (fp32 engine, logits below 1 in magnitude)


def _genai_importable() -> bool:
    try:
        import onnxruntime_genai  # noqa: F401 - absent, or its native library fails to load
    except ImportError:
        return False
    return True


needs_genai = pytest.mark.skipif(not _genai_importable(), reason="onnxruntime-genai is not importable "
                                 "(pip install onnxruntime-genai==0.18.0)")
# made unimportable in a fresh interpreter, then CODE runs
_BLOCKED = ("import sys\n"
            "class Block:\n"
            "    @staticmethod\n"
            "    def find_spec(name, path=None, target=None):\n"
            "        if name.partition('.')[0] == 'onnxruntime_genai':\n"
            "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
            "sys.meta_path.insert(0, Block)\n")


# ---- without onnxruntime-genai ----------------------------------------------------------------

def test_accepts_only_folders_with_a_genai_config(tmp_path):
    assert not peer_ortgenai.accepts(tmp_path)  # empty folder
    assert not peer_ortgenai.accepts(tmp_path / "missing")
    (tmp_path / "file").write_text("x")
    assert not peer_ortgenai.accepts(tmp_path / "file")
    (tmp_path / "model.onnx").write_text("")  # an Optimum-style folder is not one
    assert not peer_ortgenai.accepts(tmp_path)
    (tmp_path / "genai_config.json").write_text("{}")
    assert peer_ortgenai.accepts(tmp_path) and peer_ortgenai.NAME == "onnxruntime-genai"


def test_tool_help_and_load_hint_without_the_package(tmp_path):
    run = subprocess.run([sys.executable, "-c", _BLOCKED + f"import runpy; sys.argv = ['x', '--help']\n"
                          f"runpy.run_path({str(TOOL)!r}, run_name='__main__')"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert run.returncode == 0 and run.stdout.startswith("usage:"), run.stderr[-2000:]
    (tmp_path / "genai_config.json").write_text("{}")
    code = (_BLOCKED + "from pathlib import Path\nfrom eigenkv.engines.peer_ortgenai import load\n"
            "from eigenkv.errors import EigenError\n"
            f"try:\n    load(Path({str(tmp_path)!r}))\nexcept EigenError as e:\n    print(e)\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "pip install onnxruntime-genai==0.18.0" in run.stdout and len(run.stdout.strip().splitlines()) == 1


# ---- with onnxruntime-genai: a tiny llama built by ORT-GenAI's model builder --------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(float64 HF model, ORT-GenAI folder built and checked by the tool, HF folder)."""
    root = tmp_path_factory.mktemp("ortgenai")
    hf = save_tiny("llama", root / "hf")
    spec = importlib.util.spec_from_file_location("ortgenai_peer_tool", TOOL)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.main(["-o", str(root / "peer"), "--model", str(hf), "--threads", "1"]) == 0
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(hf, attn_implementation="eager").double().eval()
    return model, root / "peer", hf


@torch.no_grad()
def _logits64(model, ids: np.ndarray) -> np.ndarray:
    return model(torch.from_numpy(np.asarray(ids, dtype=np.int64))).logits.numpy()


@torch.no_grad()
def _torch_greedy(model, ids: np.ndarray, steps: int) -> np.ndarray:
    seq = torch.from_numpy(ids)
    for _ in range(steps):
        seq = torch.cat([seq, model(seq).logits[:, -1].argmax(-1, keepdim=True)], 1)
    return seq[:, ids.shape[1]:].numpy()


@needs_genai
def test_tool_builds_checks_and_records(tiny):
    from eigenkv.exporter.sources import model_hash, resolve_model
    _, folder, hf = tiny
    assert peer_ortgenai.accepts(folder)
    info = json.loads((folder / "peer.json").read_text())
    import onnxruntime_genai as og
    assert info["kind"] == "onnxruntime-genai" and info["version"] == og.__version__
    assert info["source_hash"] == model_hash(resolve_model(str(hf))) and info["source_model"] == str(hf.resolve())
    assert info["command"][:3] == ["python", "-m", "onnxruntime_genai.models.builder"]
    assert {"-p", "fp32", "-e", "cpu"} <= set(info["command"])
    v = info["validation"]
    assert v["greedy_tokens_equal"] and v["prefill_max_abs_logit_diff"] < 1e-4
    assert [c["batch"] for c in v["cases"]] == [1, 1, 1, 2]
    assert (folder / "builder.log").is_file() and not list(folder.parent.glob(".peer.*"))  # temp folder gone


@needs_genai
def test_step_logits_match_float64_and_greedy_tokens(tiny):
    model, folder, _ = tiny
    engine = peer_ortgenai.load(folder, threads=1)
    lay = engine.layout
    assert (lay.n_layers, lay.n_kv_heads, lay.head_dim, engine.vocab_size) == (3, 2, 16, 256)
    assert engine.max_positions == engine.max_seq_len == 128 and engine.precision == "fp32"
    assert engine.label.startswith("onnxruntime-genai ") and engine.source_hash == engine.info["source_hash"]
    ids = np.random.default_rng(0).integers(0, 255, size=(2, 7))
    # batch 2: one prefill step, then ORT-GenAI's decode loop, fed tokens that are not its greedy
    # picks, among them the model's own end tokens (its search would otherwise pad after them)
    cache = engine.new_cache(2, 12)
    logits = engine.step(cache, ids, np.broadcast_to(np.arange(7), (2, 7)))
    cache.advance(np.array([7, 7]))
    assert logits.dtype == np.float32 and logits.shape == (2, 7, 256)
    assert np.abs(logits - _logits64(model, ids)).max() < TOL
    seq = ids
    eos = json.loads((folder / "genai_config.json").read_text())["model"]["eos_token_id"]
    eos = eos if isinstance(eos, list) else [eos]
    for t, new in enumerate([[eos[0], 3], [eos[-1], eos[-1]], [5, 9], [40, 41]]):
        new = np.array(new)
        step = engine.step(cache, new[:, None], np.full((2, 1), 7 + t))
        cache.advance(np.ones(2, np.int64))
        seq = np.concatenate([seq, new[:, None]], 1)
        assert step.shape == (2, 1, 256) and np.abs(step[:, 0] - _logits64(model, seq)[:, -1]).max() < TOL
    assert cache.keys(1).shape == (2, 2, 11, 16) and cache.nbytes == 2 * 3 * 2 * 2 * 12 * 16 * 4
    assert cache.positions(0).shape == (2, 2, 11) and (cache.positions(0)[1, 1] == np.arange(11)).all()
    expected = _torch_greedy(model, ids, 12)
    assert (greedy(engine, ids, 12) == expected).all()  # batch 2, one-step prefill
    for b in range(2):  # batch 1: append_tokens for every step, prefill in chunks of 3 + 3 + 1
        assert (greedy(engine, ids[b:b + 1], 12, chunk=3) == expected[b:b + 1]).all()
    cache = engine.new_cache(1, 10)
    last = prefill(engine, cache, ids[:1], np.array([7]), chunk=2)
    assert np.abs(last - _logits64(model, ids[:1])[:, -1]).max() < TOL


@needs_genai
def test_generate_batch_with_sampling_and_stop_tokens(tiny):
    """Sampled tokens differ from ORT-GenAI's greedy picks, so they are forced into its search."""
    from eigenkv.engines.runtime import Sampling
    _, folder, _ = tiny
    engine = peer_ortgenai.load(folder)
    prompts = [[10, 20, 30, 40], [50, 60, 70, 80]]
    out = generate(engine, prompts, 10, Sampling(temperature=1.5, seed=3))
    again = generate(engine, prompts, 10, Sampling(temperature=1.5, seed=3))
    assert out == again and all(len(o) == 10 for o in out)
    stop = out[0][2]
    stopped = generate(engine, prompts, 10, Sampling(temperature=1.5, seed=3), stop_tokens=[stop])
    assert stopped[0] == out[0][:out[0].index(stop) + 1]


@needs_genai
def test_refusals_are_one_line(tiny):
    _, folder, _ = tiny
    engine = peer_ortgenai.load(folder)
    ids = np.arange(8, dtype=np.int64).reshape(2, 4)
    pos = np.broadcast_to(np.arange(4), (2, 4))
    cache = engine.new_cache(2, 8)
    with pytest.raises(EigenError, match="positions contiguous from 0"):
        engine.step(cache, ids, pos + 1)
    with pytest.raises(EigenError, match="token ids must be in 0..255"):
        engine.step(cache, ids + 300, pos)
    engine.step(cache, ids, pos)
    with pytest.raises(EigenError, match="cannot evict"):
        cache.keep(0, 0, np.zeros((2, 1), np.int64))
    with pytest.raises(EigenError, match="equal-length prompts only"):
        cache.advance(np.array([4, 3]))
    cache.advance(np.array([4, 4]))
    with pytest.raises(EigenError, match="one prefill step only"):
        engine.step(cache, ids[:, :2], pos[:, :2] + 4)
    with pytest.raises(EigenError, match="end token"):
        engine.step(cache, np.array([[255], [3]]), np.full((2, 1), 4))
    with pytest.raises(EigenError, match="KV cache full"):
        engine.step(cache, ids[:1, :1].repeat(2, 0).repeat(5, 1), np.broadcast_to(np.arange(4, 9), (2, 5)))
    with pytest.raises(EigenError, match="exceed the engine's max_seq_len 128"):
        engine.new_cache(1, 129)
    with pytest.raises(EigenError, match="one capacity for all layers"):
        engine.new_cache(1, [8, 8, 9])
    with pytest.raises(EigenError, match="not an ORT-GenAI model folder"):
        peer_ortgenai.load(folder.parent)
    for line in [str(e) for e in _errors_of(folder)]:
        assert "\n" not in line


def _errors_of(folder: Path):
    """EigenErrors of broken copies of `folder` (config corrupt, fields missing, model missing)."""
    import shutil
    import tempfile
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        broken = Path(tmp) / "broken"
        shutil.copytree(folder, broken, ignore=shutil.ignore_patterns("*.data"))
        for text, match in (("{", "genai_config.json is corrupt"),
                            ('{"model": {}}', "not an ORT-GenAI decoder config")):
            (broken / "genai_config.json").write_text(text)
            with pytest.raises(EigenError, match=match) as e:
                peer_ortgenai.load(broken)
            out.append(e.value)
        shutil.copyfile(folder / "genai_config.json", broken / "genai_config.json")
        (broken / "model.onnx").unlink()
        with pytest.raises(EigenError, match="lacks model.onnx") as e:
            peer_ortgenai.load(broken)
        out.append(e.value)
    return out


@needs_genai
def test_pruned_lm_head_gives_last_logits_and_prefill_uses_them(tiny, tmp_path):
    """`--prune-lm-head` (the batch-8 4k bench's build): a multi-token step returns the last
    position's logits [B, 1, V] (float64 transformers within TOL), prefill in chunks and the
    batch decode loop give the greedy tokens of transformers, and what needs every position's
    logits (unequal prompts ending inside a step, chunked perplexity) is refused in one line."""
    from eigenkv.engines.runtime import stream_perplexity
    model, _, hf = tiny
    spec = importlib.util.spec_from_file_location("ortgenai_peer_tool", TOOL)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.main(["-o", str(tmp_path / "pruned"), "--model", str(hf), "--threads", "1", "--prune-lm-head"]) == 0
    info = json.loads((tmp_path / "pruned" / "peer.json").read_text())
    assert info["prune_lm_head"] and info["command"][-2:] == ["--extra_options", "prune_lm_head=true"]
    assert all(c["prefill_positions_compared"] == 1 for c in info["validation"]["cases"])
    engine = peer_ortgenai.load(tmp_path / "pruned", threads=1)
    assert engine.last_logits_only and not peer_ortgenai.load(tiny[1]).last_logits_only
    ids = np.random.default_rng(1).integers(0, 255, size=(2, 9))
    logits = engine.step(engine.new_cache(2, 12), ids, np.broadcast_to(np.arange(9), (2, 9)))
    assert logits.shape == (2, 1, 256) and np.abs(logits[:, 0] - _logits64(model, ids)[:, -1]).max() < TOL
    expected = _torch_greedy(model, ids, 6)
    assert (greedy(engine, ids, 6) == expected).all()
    assert (greedy(engine, ids[:1], 6, chunk=4) == expected[:1]).all()  # chunks 4 + 4 + 1
    with pytest.raises(EigenError, match="scores only each step's last token"):
        prefill(engine, engine.new_cache(1, 12), ids[:1], np.array([7]), chunk=9)
    with pytest.raises(EigenError, match="returns only the last token's logits"):
        stream_perplexity(engine, ids[0], chunk=4)
    assert np.isfinite(stream_perplexity(engine, ids[0], chunk=1)["ppl"])


@needs_genai
def test_session_spread_drives_the_genai_graph_like_ortgenai(tiny, tmp_path):
    """tools/session_spread.py runs ORT-GenAI's graph in plain ONNX Runtime (shared past/present
    buffers, all-ones mask), pruned lm_head or not: its greedy tokens are the float64 model's; the
    whole tool runs it beside an eigenkv engine of the same checkpoint and refuses a context the
    folder cannot hold in one line, exit 2, nothing written."""
    from eigenkv.cli import main as eigenkv_main
    model, folder, hf = tiny
    spec = importlib.util.spec_from_file_location("session_spread_tool", TOOL.parent / "session_spread.py")
    spread = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(spread)
    spec = importlib.util.spec_from_file_location("ortgenai_peer_tool", TOOL)
    builder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(builder)
    assert builder.main(["-o", str(tmp_path / "pruned"), "--model", str(hf), "--threads", "1", "--prune-lm-head"]) == 0
    ids = np.random.default_rng(1).integers(0, 255, size=(2, 9))
    expected = _torch_greedy(model, ids, 6)
    for path in (folder, tmp_path / "pruned"):
        info = peer_ortgenai.read_folder(path)
        assert info.last_logits_only == (path != folder) and info.vocab_size == 256 and info.dtype == np.float32
        graph = spread.OrtGenaiGraph(info, ids, steps=6, threads=1)
        tokens = [graph.tokens]
        for _ in range(5):
            graph.step()
            tokens.append(graph.tokens)
        assert (np.stack(tokens, 1) == expected).all()
    text = tmp_path / "calib.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    assert eigenkv_main(["export", str(tmp_path / "e" / "model.onnx"), "--model", str(hf), "--no-compress",
                         "--calib-text", str(text), "--calib-seq-len", "64", "--calib-samples", "2", "--eval-tokens", "0",
                         "--max-seq-len", "96", "--decode-steps", "2", "--no-progress"]) == 0
    assert eigenkv_main(["build", str(tmp_path / "e" / "model.onnx"), "-o", str(tmp_path / "engine")]) == 0
    out = tmp_path / "spread.v1"
    assert spread.main(["--engine", str(tmp_path / "engine"), "--ortgenai", str(tmp_path / "pruned"), "--sessions",
                        "2", "--contexts", "20", "--blocks", "3", "--steps", "2", "--threads", "1", "--out", str(out)]) == 0
    cells = json.loads(Path(f"{out}.json").read_text())["cells"]
    assert [c["order"] for c in cells] == ["ours-first", "peer-first"]
    assert cells[1]["load_order"] == ["ORT-GenAI graph", "ours #1", "ours #2"]
    assert cells[1]["blocks"] == [["ORT-GenAI graph", "ours #1", "ours #2"], ["ours #1", "ours #2", "ORT-GenAI graph"],
                                  ["ours #2", "ORT-GenAI graph", "ours #1"]]
    assert all(v["steps"] == 6 for c in cells for v in c["ms"].values()) and Path(f"{out}.md").is_file()
    run = subprocess.run([sys.executable, str(TOOL.parent / "session_spread.py"), "--engine", str(tmp_path / "engine"),
                          "--ortgenai", str(tmp_path / "pruned"), "--contexts", "90", "--blocks", "2", "--steps", "5",
                          "--out", str(tmp_path / "bad")], capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and run.stderr.strip().count("\n") == 0 and "max_seq_len 96" in run.stderr
    assert not list(tmp_path.glob("bad*"))


@needs_genai
def test_int4_build_is_recorded_labelled_and_close(tiny, tmp_path):
    """`--precision int4`: the builder's CPU int4 model; the tool records it, does not require
    identical greedy tokens (rounded weights), and the peer's label names it. Its logits stay
    near the float64 model's (a tiny random model quantizes coarsely: within 30% of the logits'
    largest magnitude, measured 21%; a wrong build is off by the whole scale)."""
    model, _, hf = tiny
    spec = importlib.util.spec_from_file_location("ortgenai_peer_tool", TOOL)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.main(["-o", str(tmp_path / "int4"), "--model", str(hf), "--threads", "1", "--precision", "int4",
                      "--check-steps", "2"]) == 0
    info = json.loads((tmp_path / "int4" / "peer.json").read_text())
    assert info["dtype"] == "int4" and {"-p", "int4", "-e", "cpu"} <= set(info["command"])
    import onnx
    graph = onnx.load(str(tmp_path / "int4" / "model.onnx"), load_external_data=False)
    assert any(n.op_type == "MatMulNBits" for n in graph.graph.node)
    engine = peer_ortgenai.load(tmp_path / "int4", threads=1)
    assert engine.label.endswith(" int4") and not peer_ortgenai.load(tiny[1]).label.endswith("int4")
    ids = np.random.default_rng(2).integers(0, 255, size=(1, 9))
    logits = engine.step(engine.new_cache(1, 12), ids, np.arange(9)[None])
    ref = _logits64(model, ids)
    assert np.abs(logits - ref).max() < 0.3 * np.abs(ref).max()  # measured 0.10 of 0.48
