"""Issue 13's reported failure kinds, each as a test on tiny random models, compared with
transformers where it applies:

1. non-finite outputs: the export fails in one line (nothing written), the runtime stops in one
   line; fp16 graphs keep the residual stream and norms in fp32 (massive activations);
2. the checkpoint's generation settings: every eos id of generation_config.json, prompts
   tokenized as transformers does (BOS), `--chat` applies the chat template;
3. streaming never splits a character: streamed text == final text;
4. small edges: a prompt exactly at capacity with 0 new tokens; no echo before a refusal;
5. fail before the expensive part, one line, no traceback (the CLI's error paths);
6. the README's examples, run in order into one folder;
7. SIGTERM like SIGINT, stale temporaries swept, published files follow the umask,
   --no-compress skips perplexity, help texts.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tiny_models import byte_tokenizer, save_tiny, tiny_model

from eigenkv.cli import main
from eigenkv.errors import EigenError

TEXT = "The quick brown fox jumps over the lazy dog. " * 80
MAX_SEQ = 64
BOS = 189  # the BOS of `_bos_chat_tokenizer`: "ā", the symbol of byte 1 in the sorted byte alphabet


def _export(model: Path, calib: Path, out: Path, *extra) -> int:
    return main(["export", str(out), "--model", str(model), "--calib-text", str(calib), "--calib-samples", "4",
                 "--calib-seq-len", "32", "--eval-tokens", "0", "--no-progress", "--max-seq-len", str(MAX_SEQ),
                 *extra])


def _one_line_error(err: str, prog: str = "eigenkv") -> str:
    err = err.strip()
    assert err.startswith(f"{prog}: error:") and "\n" not in err and "Traceback" not in err, err
    return err


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    r = tmp_path_factory.mktemp("kinds")
    (r / "calib.txt").write_text(TEXT)
    save_tiny("llama", r / "llama")
    return r


# ---- models ------------------------------------------------------------------------------------

def _hot_model():
    """Activations beyond the fp16 range in weights the fp16 graph must hold (issue 13, item 1):
    fp32 logits stay finite."""
    m = tiny_model("llama")
    with torch.no_grad():
        m.model.embed_tokens.weight.mul_(6e5)
        m.model.layers[0].mlp.down_proj.weight.mul_(1e7)
    return m


def _massive_model():
    """'Massive activations': tokens 0..63 carry 6e4 on channel 0 (fp16 holds it: max 65504), and
    layer 0's MLP adds ~6.4e3 more there, so the residual stream reaches ~66400: beyond fp16,
    while every weight and every matmul output stays inside it. Other tokens are unaffected."""
    m = tiny_model("llama")
    with torch.no_grad():
        e = m.model.embed_tokens.weight
        e[:, 0] = 0.0
        e[:64, 0] = 6e4
        m.model.layers[0].self_attn.o_proj.weight[0] = 0.0  # attention leaves channel 0 alone
        mlp = m.model.layers[0].mlp
        for w in (mlp.gate_proj.weight, mlp.up_proj.weight):
            w[0] = 0.0
            w[0, 0] = 1.0
        mlp.down_proj.weight[:, 0] = 0.0
        mlp.down_proj.weight[0, 0] = 100.0
    return m


def _bos_chat_tokenizer():
    """The byte tokenizer, plus a BOS that the tokenizer adds (as Llama's does) and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}  # fixed ids
    chars = list(vocab)
    assert chars[BOS] == "\u0101" and chars[BOS - 1] == "\u0100"  # bytes 1 and 0: no text character
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single=f"{chars[BOS]} $A", special_tokens=[(chars[BOS], BOS)])
    t = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=chars[BOS], eos_token=chars[BOS - 1])
    t.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                       "{% if add_generation_prompt %}<assistant>{% endif %}")
    return t


def _hf(model_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    return (AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager").float().eval(),
            AutoTokenizer.from_pretrained(model_dir))


@torch.no_grad()
def _hf_new_tokens(model, ids: torch.Tensor, n: int) -> list[int]:
    """transformers' greedy generate with the checkpoint's generation config (eos included)."""
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)
    return out[0, ids.shape[1]:].tolist()


@pytest.fixture(scope="module")
def chat(root):
    """A tiny llama whose tokenizer adds BOS and has a chat template, and whose
    generation_config.json lists three eos ids, one of which greedy decoding reaches at step 5;
    exported uncompressed (fp32) and built. -> (model dir, engine dir, prompt)."""
    from transformers import GenerationConfig
    model_dir = root / "chat-llama"
    tiny_model("llama", seed=3).save_pretrained(model_dir)
    _bos_chat_tokenizer().save_pretrained(model_dir)
    model, tok = _hf(model_dir)
    prompt = "The quick brown fox"
    free = _hf_new_tokens(model, tok(prompt, return_tensors="pt")["input_ids"], 24)
    unseen = next(i for i in range(2, 256) if i not in free)
    eos = [unseen, free[5], free[12]]
    GenerationConfig(bos_token_id=BOS, eos_token_id=eos).save_pretrained(model_dir)
    out = root / "chat-out" / "model.onnx"
    assert _export(model_dir, root / "calib.txt", out, "--no-compress", "--decode-steps", "8") == 0
    assert main(["build", str(out), "-o", str(root / "chat-engine")]) == 0
    return model_dir, root / "chat-engine", prompt


# ---- 1. non-finite outputs -------------------------------------------------------------------------

def test_fp16_export_with_non_finite_logits_fails_in_one_line_and_writes_nothing(root, tmp_path, capsys):
    model_dir = tmp_path / "hot"
    _hot_model().save_pretrained(model_dir)
    byte_tokenizer().save_pretrained(model_dir)
    out = tmp_path / "out" / "model.onnx"
    capsys.readouterr()
    assert _export(model_dir, root / "calib.txt", out, "--dtype", "fp16") == 2
    err = _one_line_error(capsys.readouterr().err)
    assert "non-finite logits" in err and "fp16" in err
    assert not (tmp_path / "out").exists()


def test_validation_judges_fp16_graphs_too():
    """Non-finite logits and greedy tokens that differ fail any precision (fp16 was 'reported,
    not judged'); fp16 prefill logits must stay within 5% of the largest logit."""
    from eigenkv.exporter.export import _require_parity
    good = {"prefill_max_abs_logit_diff": 2e-3, "prefill_max_abs_logit_diff_vs_float64": 2e-3,
            "torch_float32_max_abs_logit_diff_vs_float64": 1e-7, "reference_max_abs_logit": 30.0,
            "non_finite": None, "torch_non_finite": None, "decode_steps": 32, "decode_tokens_equal": True,
            "decode_first_mismatch": None}
    _require_parity(good, torch.float16)
    cases = [({"non_finite": "prefill", "prefill_max_abs_logit_diff": float("nan")}, "non-finite logits"),
             ({"decode_tokens_equal": False, "decode_first_mismatch": 5}, "differ from torch's at step 5 of 32"),
             ({"prefill_max_abs_logit_diff": 3.0}, "exceeds 5% of the largest logit")]
    for change, message in cases:
        with pytest.raises(EigenError, match=message):
            _require_parity({**good, **change}, torch.float16)
    with pytest.raises(EigenError, match="non-finite"):
        _require_parity({**good, "non_finite": "decode step 3"}, torch.float32)


def test_runtime_stops_in_one_line_on_non_finite_logits(root, tmp_path, capsys, monkeypatch):
    """An fp16 graph that overflows (the judgement switched off to make one) runs through
    `eigenkv build` and `eigenkv run`: run stops with one line before printing anything, and the
    runtime raises NonFiniteLogits instead of emitting token 0 forever."""
    import eigenkv.exporter.export as export_module
    from eigenkv.engines.backend import load_engine
    from eigenkv.engines.runtime import NonFiniteLogits, generate
    model_dir = tmp_path / "hot"
    _hot_model().save_pretrained(model_dir)
    byte_tokenizer().save_pretrained(model_dir)
    out = tmp_path / "out" / "model.onnx"
    monkeypatch.setattr(export_module, "_require_parity", lambda figures, dtype: None)
    assert _export(model_dir, root / "calib.txt", out, "--dtype", "fp16", "--decode-steps", "2") == 0
    monkeypatch.undo()
    assert main(["build", str(out), "-o", str(tmp_path / "engine")]) == 0
    capsys.readouterr()
    assert main(["run", str(tmp_path / "engine"), "--prompt", "fox", "--max-new-tokens", "8"]) == 2
    captured = capsys.readouterr()
    assert "non-finite logits" in _one_line_error(captured.err) and captured.out == ""
    with pytest.raises(NonFiniteLogits, match="non-finite logits .* at prefill"):
        generate(load_engine(tmp_path / "engine"), [[5, 6, 7]], 4)


def test_fp16_keeps_residual_stream_and_norms_in_fp32_and_matches_transformers(root, tmp_path):
    """Massive activations (residual ~66400 > fp16's 65504, every weight and matmul inside it):
    the fp16 graph (fp16 cache, float32 residual stream, norms and logits) stays finite, its
    prefill logits are within 2e-3 of transformers' float32 logits and 20 greedy tokens equal
    transformers' (a plain fp16 cast gives NaN)."""
    from eigenkv.engines.backend import load_engine
    from eigenkv.engines.runtime import generate
    model_dir = tmp_path / "massive"
    hf = _massive_model()
    hf.save_pretrained(model_dir)
    byte_tokenizer().save_pretrained(model_dir)
    out = tmp_path / "out" / "model.onnx"
    assert _export(model_dir, root / "calib.txt", out, "--no-compress", "--dtype", "fp16") == 0
    v = json.loads((tmp_path / "out" / "model.eigen.json").read_text())["report"]["validation"]
    assert v["decode_tokens_equal"] and v["non_finite"] is None and v["prefill_max_abs_logit_diff"] < 2e-3
    import onnx
    graph = onnx.load(str(out), load_external_data=False).graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.input, *graph.output]}
    assert types["past_key_values.0.key"] == onnx.TensorProto.FLOAT16  # an fp16 cache...
    assert types["logits"] == onnx.TensorProto.FLOAT  # ...and float32 logits
    assert main(["build", str(out), "-o", str(tmp_path / "engine")]) == 0
    engine = load_engine(tmp_path / "engine")
    assert engine.precision == "fp16"
    prompt = [5, 100, 120, 200, 77, 90]  # token 5 is massive
    ids = torch.tensor([prompt])
    with torch.no_grad():
        ref = hf(ids).logits[0]
    assert not torch.isfinite(_plain_fp16_logits(hf, ids)).all()  # what a plain cast gives
    cache = engine.new_cache(1, len(prompt))
    logits = torch.from_numpy(engine.step(cache, ids.numpy(), torch.arange(len(prompt))[None].numpy())[0]).float()
    assert torch.isfinite(logits).all() and float((logits - ref).abs().max()) < 2e-3
    assert generate(engine, [prompt], 20)[0] == _hf_new_tokens(hf, ids, 20)


def _plain_fp16_logits(hf, ids):
    """The old fp16 export's model: the whole decoder cast to fp16."""
    import copy

    from eigenkv.exporter.decoder import decoder_from_hf
    with torch.no_grad():
        return copy.deepcopy(decoder_from_hf(hf)).half()(ids)


# ---- 2. the checkpoint's generation settings ------------------------------------------------------

def test_run_stops_at_any_eos_of_generation_config_and_adds_bos_like_transformers(chat, capsys):
    model_dir, engine_dir, prompt = chat
    model, tok = _hf(model_dir)
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    assert ids[0, 0] == BOS  # transformers' default tokenization adds the BOS
    expected = _hf_new_tokens(model, ids, 24)
    assert len(expected) <= 6 and expected[-1] in model.generation_config.eos_token_id  # stopped at the first eos
    capsys.readouterr()
    assert main(["run", str(engine_dir), "--prompt", prompt, "--max-new-tokens", "24", "--no-stream"]) == 0
    text = tok.decode(expected, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    assert capsys.readouterr().out == f"{prompt}{text}\n---\n"


def test_generation_config_eos_ids_are_read_as_transformers_reads_them(chat, tmp_path):
    from eigenkv.exporter.sources import ModelSource, eos_token_ids, resolve_model
    model_dir, _, _ = chat
    model, tok = _hf(model_dir)
    assert eos_token_ids(resolve_model(str(model_dir)), tok) == set(model.generation_config.eos_token_id)
    # no generation_config.json: the model config's eos (as transformers derives it), not the tokenizer's
    plain = save_tiny("llama", tmp_path / "plain")
    (plain / "generation_config.json").unlink()
    from transformers import AutoModelForCausalLM
    derived = AutoModelForCausalLM.from_pretrained(plain).generation_config.eos_token_id
    assert eos_token_ids(ModelSource(plain, None), byte_tokenizer()) == {derived}


def test_chat_applies_the_tokenizers_chat_template_like_transformers(chat, root, capsys):
    model_dir, engine_dir, _ = chat
    model, tok = _hf(model_dir)
    message = "Name a fox."
    ids = tok.apply_chat_template([{"role": "user", "content": message}], add_generation_prompt=True,
                                  return_dict=True, return_tensors="pt")["input_ids"]
    expected = tok.decode(_hf_new_tokens(model, ids, 10), skip_special_tokens=True,
                          clean_up_tokenization_spaces=False)
    capsys.readouterr()
    assert main(["run", str(engine_dir), "--prompt", message, "--chat", "--max-new-tokens", "10", "--no-stream"]) == 0
    assert capsys.readouterr().out == f"{expected}\n---\n"
    # a tokenizer without a chat template: one line, before the engine loads
    out = root / "plain-out" / "model.onnx"
    if not out.exists():
        assert _export(root / "llama", root / "calib.txt", out, "--no-compress", "--decode-steps", "2") == 0
        assert main(["build", str(out), "-o", str(root / "plain-engine")]) == 0
    capsys.readouterr()
    assert main(["run", str(root / "plain-engine"), "--prompt", "hi", "--chat"]) == 2
    assert "has no chat template" in _one_line_error(capsys.readouterr().err)


# ---- 3. streaming ---------------------------------------------------------------------------------

def test_stream_holds_back_incomplete_characters():
    from eigenkv.engines.runtime import TextStream
    tok = byte_tokenizer()
    text = "Zoë 日本 🙂 ok"
    ids = tok(text)["input_ids"]
    assert len(ids) > len(text)  # characters spread over several byte tokens
    stream = TextStream(tok)
    pieces = [stream.push([i]) for i in ids] + [stream.finish()]
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)

    byte_of = {ch: b for b, ch in _byte_alphabet().items()}

    class Slow:  # no fast backend: the decode-everything path holds back the same way
        def decode(self, ids, **kwargs):
            return bytes(byte_of[t] for t in tok.convert_ids_to_tokens(ids)).decode("utf-8", "replace")
    slow = TextStream(Slow())
    pieces = [slow.push([i]) for i in ids] + [slow.finish()]
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)
    cut = TextStream(tok)  # a character that never completes comes out at the end, as the final text has it
    assert cut.push(ids[:3]) == "Zo" and cut.finish() == tok.decode(ids[:3])[2:]


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character map (what ByteLevel tokens are made of)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _looping_model(tok):
    """A llama whose greedy continuation of any text is "ë ë ë ...": attention and MLPs write
    nothing (o_proj, down_proj zero), so each position's state is its token's embedding, and the
    LM head maps the three directions used to the next byte token of the cycle C3 AB 20 ("ë" is
    two byte-level tokens). Other tokens lead into the cycle."""
    m = tiny_model("llama")
    alphabet = _byte_alphabet()
    a, b, c = (tok.convert_tokens_to_ids(alphabet[x]) for x in (0xC3, 0xAB, 0x20))
    with torch.no_grad():
        for layer in m.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        e, w = m.model.embed_tokens.weight, m.lm_head.weight
        e.zero_()
        w.zero_()
        e[:, 3] = 1.0  # any token -> the start of the cycle
        e[a], e[b], e[c] = torch.eye(64)[1], torch.eye(64)[2], torch.eye(64)[3]
        w[a], w[b], w[c] = 10 * torch.eye(64)[3], 10 * torch.eye(64)[1], 10 * torch.eye(64)[2]
    return m


def test_streamed_text_equals_final_text(root, tmp_path, capsys):
    """Greedy output made of two-token characters ("ë ë ..."): streaming prints exactly what
    --no-stream prints (and transformers decodes), never a U+FFFD."""
    tok = byte_tokenizer()
    model_dir = tmp_path / "loop"
    hf = _looping_model(tok)
    hf.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    out = tmp_path / "out" / "model.onnx"
    assert _export(model_dir, root / "calib.txt", out, "--no-compress", "--decode-steps", "4") == 0
    assert main(["build", str(out), "-o", str(tmp_path / "engine")]) == 0
    prompt = "Zoë 日本 🙂 ok"
    new = _hf_new_tokens(hf, tok(prompt, return_tensors="pt")["input_ids"], 11)
    expected = tok.decode(new, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    assert expected == "ë ë ë ë"[: len(expected)] and len(expected) >= 6
    args = ["run", str(tmp_path / "engine"), "--prompt", prompt, "--max-new-tokens", "11", "--ignore-eos"]
    capsys.readouterr()
    assert main(args) == 0
    streamed = capsys.readouterr().out
    assert main([*args, "--no-stream"]) == 0
    final = capsys.readouterr().out
    assert final == f"{prompt}{expected}\n---\n" and streamed == f"{prompt}{expected}\n"
    assert "\ufffd" not in streamed


# ---- 4. small edges -------------------------------------------------------------------------------

def test_prompt_at_capacity_with_zero_new_tokens_and_no_echo_before_a_refusal(chat, capsys):
    from eigenkv.engines.backend import load_engine
    from eigenkv.engines.runtime import generate
    _, engine_dir, _ = chat
    engine = load_engine(engine_dir)
    full = list(range(10, 10 + MAX_SEQ))
    assert generate(engine, [full], 0) == [[]]  # exactly max_seq_len tokens, nothing new: fits
    assert len(generate(engine, [full[:-1]], 1)[0]) == 1
    with pytest.raises(EigenError, match="exceeds the engine's max_seq_len"):
        generate(engine, [full], 1)
    capsys.readouterr()
    assert main(["run", str(engine_dir), "--prompt", "x" * MAX_SEQ, "--max-new-tokens", "1"]) == 2  # + BOS
    captured = capsys.readouterr()
    assert "exceeds the engine's max_seq_len" in _one_line_error(captured.err) and captured.out == ""


# ---- 5. fail before the expensive part --------------------------------------------------------------

def _error_cases(root: Path, chat_engine: Path, tmp: Path) -> list[tuple[list[str], str]]:
    short, latin = tmp / "short.txt", tmp / "latin1.txt"
    exp = ["--model", str(root / "llama"), "--calib-samples", "4", "--calib-seq-len", "32", "--eval-tokens", "0",
           "--no-progress"]
    calib = ["--calib-text", str(root / "calib.txt")]
    graph = chat_engine.parent / "chat-out" / "model.onnx"
    run = ["run", str(chat_engine), "--prompt", "fox"]
    bench = ["bench", str(chat_engine), "--baseline", str(chat_engine), "--contexts", "8", "--batches", "1"]
    return [
        (["export", "/proc/eigenkv-x.onnx", *exp, *calib], "cannot write in /proc"),
        (["export", str(tmp / "o" / "m.onnx"), *exp, "--calib-text", str(tmp / "missing.txt")], "no such file"),
        (["export", str(tmp / "o" / "m.onnx"), *exp, "--calib-text", str(short)], "has 10 tokens"),
        (["export", str(tmp / "o" / "m.onnx"), *exp, "--calib-text", str(latin)], "is not UTF-8"),
        (["export", str(tmp / "o" / "m.onnx"), *exp, *calib, "--max-seq-len", "0"], "--max-seq-len 0 is outside"),
        (["export", str(tmp / "o" / "m.onnx"), *exp, *calib, "--max-seq-len", "-3"], "--max-seq-len -3 is outside"),
        (["export", str(tmp / "o" / "m.onnx"), *exp, *calib, "--decode-steps", "-1"], "--decode-steps must be >= 0"),
        (["export", str(tmp / "o" / "m.onnx"), *exp, *calib, "--kv-ratio", "2"], "--kv-ratio must be in (0, 1]"),
        (["export", str(tmp / "o" / "m.onnx"), *exp, *calib, "--projections", str(tmp / "p.safetensors")],
         "--projections"),
        (["export", str(tmp / "o" / "m.onnx"), *exp, *calib, "--calib-samples", "0"], "--calib-samples must be >= 1"),
        (["export", str(tmp / "o" / "m.onnx"), *exp, *calib, "--max-seq-len", "abc"], "invalid int value: 'abc'"),
        (["export", str(tmp / "m.txt"), *exp, *calib], "must end in .onnx"),
        (["export", str(short / "m.onnx"), *exp, *calib], "is not a directory"),
        (["export", str(tmp / "o" / "m.onnx"), *exp[2:], *calib, "--model", str(tmp / "nope")],
         "no such file or directory"),
        (["compress", "-o", "/proc/eigenkv-c", *exp, *calib], "cannot write in /proc"),
        (["compress", "-o", str(short), *exp, *calib], "is not a directory"),
        (["compress", "-o", str(tmp / "c"), *exp, "--calib-text", str(short)], "has 10 tokens"),
        (["build", str(tmp / "none.onnx"), "-o", str(tmp / "e")], "no such ONNX file"),
        (["build", str(graph), "-o", "/proc/eigenkv-e"], "cannot write in /proc"),
        ([*run, "--max-new-tokens", "-5"], "--max-new-tokens must be >= 0"),
        (["run", str(chat_engine), "--prompt", ""], "--prompt is empty"),
        ([*run, "--temperature", "-1"], "--temperature must be >= 0"),
        ([*run, "--top-p", "2"], "--top-p must be in (0, 1]"),
        ([*run, "--prefill-chunk", "0"], "--prefill-chunk must be >= 1"),
        ([*run, "--max-new-tokens", "5000"], "exceeds the engine's max_seq_len"),
        (["run", str(tmp / "no-engine"), "--prompt", "fox"], "not an engine directory"),
        ([*bench, "--out", "/proc/eigenkv-b"], "cannot write in /proc"),
        ([*bench, "--out", str(tmp / "b"), "--decode-tokens", "0"], "--decode-tokens must be >= 1"),
        ([*bench, "--out", str(tmp / "b"), "--contexts", "0"], "values must be >= 1"),
    ]


def test_cli_error_paths_exit_2_in_one_line_before_loading_anything(root, chat, tmp_path, capsys, monkeypatch):
    """Every refusal: exit 2, one line on stderr, no traceback, nothing written, and the model
    or engine never loaded (their loaders fail the test if called)."""
    import eigenkv.engines.backend as backend
    import eigenkv.engines.bench as bench
    import eigenkv.exporter.pipeline as pipeline

    def must_not_load(*args, **kwargs):
        raise AssertionError("loaded before refusing")
    monkeypatch.setattr(pipeline, "load_model", must_not_load)
    monkeypatch.setattr(backend, "load_engine", must_not_load)
    monkeypatch.setattr(bench, "load_engine", must_not_load)
    _, engine_dir, _ = chat
    work = tmp_path / "work"
    work.mkdir()
    (work / "short.txt").write_text("0123456789")
    (work / "latin1.txt").write_bytes("caf\xe9 ".encode("latin-1") * 200)
    before = _tree(work)
    for argv, message in _error_cases(root, engine_dir, work):
        capsys.readouterr()
        try:
            code = main(argv)
        except SystemExit as e:  # argparse
            code = e.code
        err = capsys.readouterr().err
        assert code == 2, (argv, err)
        assert message in _one_line_error(err), (argv, err)
        assert _tree(work) == before, argv


def test_export_eigen_bad_location_as_a_user_runs_it(root):
    """The console script on an output folder it cannot write (/proc): one line, exit 2, no
    traceback, without loading the model."""
    exe = Path(sys.executable).with_name("export-eigen")
    res = subprocess.run([str(exe), "/proc/x.onnx", "--model", str(root / "llama"), "--calib-text",
                          str(root / "calib.txt"), "--calib-samples", "4", "--calib-seq-len", "32", "--no-progress"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and res.stdout == ""
    assert "cannot write in /proc" in _one_line_error(res.stderr, "export-eigen")


# ---- 6 + 7. the README's examples in order, modes, --no-compress ------------------------------------

@pytest.fixture(scope="module")
def readme(root, tmp_path_factory):
    """The README's commands in order, in one folder, under umask 027 (perplexity must not run
    for --no-compress: it fails if called)."""
    import eigenkv.exporter.pipeline as pipeline
    work = tmp_path_factory.mktemp("readme")
    old_mask = os.umask(0o027)
    real = pipeline.perplexity

    def no_perplexity(*args, **kwargs):
        raise AssertionError("--no-compress measured perplexity")
    model = ["--model", str(root / "llama"), "--calib-text", str(root / "calib.txt"), "--calib-samples", "4",
             "--calib-seq-len", "32", "--no-progress"]
    common = [*model, "--max-seq-len", str(MAX_SEQ), "--decode-steps", "4"]
    cwd = os.getcwd()
    os.chdir(work)
    codes = {}
    try:
        codes["compress"] = main(["compress", "-o", "out/smollm2", "--kv-ratio", "0.5", "--eval-tokens", "0", *model])
        codes["export"] = main(["export", "out/model.onnx", "--kv-ratio", "0.5", "--eval-tokens", "0", *common])
        pipeline.perplexity = no_perplexity
        codes["base"] = main(["export", "out/base.onnx", "--no-compress", *common])
        pipeline.perplexity = real
        codes["build"] = main(["build", "out/model.onnx", "-o", "out/engines/model"])
        codes["build-base"] = main(["build", "out/base.onnx", "-o", "out/engines/base"])
        codes["run"] = main(["run", "out/engines/model", "--prompt", "The history of Rome", "--max-new-tokens", "4"])
        codes["bench"] = main(["bench", "out/engines/model", "--baseline", "out/engines/base", "--contexts", "8",
                               "--batches", "1", "--decode-tokens", "2", "--warmup", "0", "--repeats", "1",
                               "--no-progress"])
    finally:
        pipeline.perplexity = real
        os.chdir(cwd)
        os.umask(old_mask)
    return work, codes


def test_readme_examples_in_order_share_one_folder(readme):
    work, codes = readme
    assert codes == dict.fromkeys(codes, 0)
    out = work / "out"
    for name in ("model", "base"):
        manifest = json.loads((out / f"{name}.eigen.json").read_text())
        assert manifest["files"]["graph"] == f"{name}.onnx"
        assert json.loads((out / "engines" / name / "config.json").read_text())["kv_layout"] == manifest["layout"]
    assert (work / "bench-results" / "bench.json").is_file()  # the bench's documented default


def test_no_compress_skips_perplexity(readme):
    work, _ = readme
    report = json.loads((work / "out" / "base.eigen.json").read_text())["report"]
    assert report["perplexity"] == {}


def test_published_files_follow_the_umask(readme):
    """Under umask 027 every file eigenkv published is 0640 and every folder 0750 (not the
    0600/0700 of temporary files); no temporary is left."""
    work, _ = readme
    found = list((work / "out").rglob("*")) + list((work / "bench-results").rglob("*"))
    assert len(found) > 15
    for path in found:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o750 if path.is_dir() else 0o640), (path, oct(mode))
        assert not path.name.startswith("."), path


# ---- 7. signals and stale temporaries ---------------------------------------------------------------

def _export_process(root: Path, out: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "eigenkv.cli", "export", str(out), "--model", str(root / "llama"), "--calib-text",
           str(root / "calib.txt"), "--calib-samples", "4", "--calib-seq-len", "32", "--eval-tokens", "0",
           "--no-progress", "--kv-ratio", "0.5", "--decode-steps", "126", "--max-seq-len", "128"]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_staged_graph(proc: subprocess.Popen, folder: Path, name: str) -> None:
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        staged = [p for p in folder.iterdir() if p.name.startswith(f".{name}.")]
        if staged and (staged[0] / name).exists():
            return
        time.sleep(0.02)
    raise AssertionError(f"the export never staged its graph: {proc.poll()} {proc.communicate()}")


def test_sigterm_during_export_cleans_up_like_sigint(root, tmp_path):
    out = tmp_path / "m.onnx"
    proc = _export_process(root, out)
    _wait_for_staged_graph(proc, tmp_path, out.name)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-800:]
    assert err.strip().splitlines()[-1] == "eigenkv: terminated" and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_stale_temporaries_of_dead_runs_are_swept(tmp_path):
    from eigenkv.artifacts import _host, staging_dir
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = _host()
    names = {
        f".m.onnx.{host}-{dead.pid}-abcd1234": False,  # ours, process gone: swept
        f".m.onnx.{host}-{dead.pid}-abcd1234.tmp": False,  # an atomic file of it: swept
        f".m.onnx.{host}-{os.getpid()}-live1234": True,  # a live process's: kept
        ".m.onnx.old12345": False,  # older eigenkv naming, untouched for 2 h: swept
        ".m.onnx.new12345": True,  # older naming, recent: kept (may still be running)
        f".m.onnx.otherhost-{dead.pid}-abcd1234": True,  # another host (shared disk), recent: kept
        f".other.onnx.{host}-{dead.pid}-abcd1234": True,  # another target: kept
        ".m.onnx.notes": True,  # not our naming: kept
    }
    for name in names:
        if name.endswith(".tmp"):
            (tmp_path / name).write_text("x")
        else:
            (tmp_path / name).mkdir()
            (tmp_path / name / "m.onnx.data").write_text("x")
    old = time.time() - 7200
    os.utime(tmp_path / ".m.onnx.old12345", (old, old))
    with staging_dir(tmp_path / "m.onnx") as tmp:
        assert tmp.name.startswith(f".m.onnx.{host}-{os.getpid()}-")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(n for n, kept in names.items() if kept)


def test_killed_export_leftovers_are_swept_by_the_next_export(root, tmp_path):
    out = tmp_path / "m.onnx"
    proc = _export_process(root, out)
    _wait_for_staged_graph(proc, tmp_path, out.name)
    proc.kill()
    proc.communicate(timeout=60)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".m.onnx.")]  # SIGKILL: nothing ran
    assert _export(root / "llama", root / "calib.txt", out, "--kv-ratio", "0.5", "--decode-steps", "4") == 0
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


# ---- 7. help texts ----------------------------------------------------------------------------------

def _help(argv: list[str], capsys) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0
    return " ".join(capsys.readouterr().out.split())


def test_help_texts(capsys):
    from eigenkv.cli import export_main
    from eigenkv.exporter.sources import BUILTIN_TEXTS
    capsys.readouterr()
    with pytest.raises(SystemExit):
        export_main(["--help"])
    export_help = capsys.readouterr().out
    assert export_help.startswith("usage: export-eigen ")
    export_help = " ".join(export_help.split())
    assert "folded attention weights" in export_help and "bases and ranks" not in export_help
    assert "OUT.eigen.json" in export_help
    bench = _help(["bench", "--help"], capsys)
    for default in ("(default 512,1024,2048,4096)", "(default 1,8)", "(default 32)", "(default 1)", "(default 2)",
                    "(default 512)", "(default ./bench-results)"):
        assert default in bench, default
    assert "(default 64)" in _help(["run", "--help"], capsys)
    compress = _help(["compress", "--help"], capsys)
    assert "a built-in text (" + ", ".join(BUILTIN_TEXTS) + ")" in compress
    assert "default `mix`: wiki 0.3, c4 0.3, code 0.15, technical 0.15, multilingual 0.1" in compress
    top = _help(["--help"], capsys)
    assert "loss-aware" in top and "take the SVD of each layer" not in top
    from eigenkv.exporter.sources import builtin_text_path
    with pytest.raises(EigenError, match=", ".join(BUILTIN_TEXTS)):
        builtin_text_path("nope")


@pytest.mark.parametrize("spin", [50_000_000, 0])
def test_signal_swallowed_by_a_finalizer_is_delivered_again(spin):
    """SIGTERM's handler running inside a finalizer (where Python only prints an exception) still
    stops the command: exit 143, one line, the rest of the command never runs (spin: the command
    goes on long enough for the signal to come back), or, when the command ends first, it still
    answers as stopped (spin 0)."""
    code = ("import signal, sys\n"
            "from eigenkv import cli\n"
            "class Dies:\n"
            "    def __del__(self):\n"
            "        cli._on_sigterm(signal.SIGTERM, None)  # as if the signal landed here\n"
            "def work(args):\n"
            "    d = Dies()\n"
            "    del d\n"
            "    total = 0\n"
            f"    for i in range({spin}):\n"
            "        total += i\n"
            f"    print('finished') if {spin} else None\n"
            "    return 0\n"
            "p = cli._Parser(prog='eigenkv')\n"
            "p.set_defaults(func=work)\n"
            "sys.exit(cli._run(p, []))\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 143, run.stderr
    assert run.stdout == "" and run.stderr.strip().splitlines() == ["eigenkv: terminated"], run.stderr
