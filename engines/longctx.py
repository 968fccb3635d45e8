"""Long-context retrieval tasks built in-process: pass key in filler text, needle in real text.

Every task is a token-exact prompt for one tokenizer:

    [head: chat-template start + instructions][haystack with the fact at `depth`][question part]

- `passkey`: a random 5-digit pass key hidden in repeated plain filler sentences.
- `needle`: "the magic number of <city> is <7 digits>" hidden in real text (the built-in wiki
  text by default, `<doc>` markup removed, each seed starting at another article).

The prompt is exactly `context_tokens` tokens long (the haystack is cut to fit), the fact
starts at the sentence boundary nearest to `depth` × haystack length, and `question_start`
marks where the question part (question, chat-template end, answer prefix) begins: a KV
eviction method that keeps the question out of compression (kvpress's pipeline does) can
prefill `prompt_ids[:question_start]` under compression and the rest without.

No backend knowledge: `run_tasks` takes any greedy `generate(prompt_ids, max_new_tokens)
-> new token ids`. Pure python (numpy-free even); the wiki text is read lazily.
"""

from __future__ import annotations

import random
import re
import time
from dataclasses import dataclass, field

from eigenkv.errors import EigenError

KINDS = ("passkey", "needle")
MIN_HAYSTACK_TOKENS = 16

# Plain filler for the pass-key task (our own sentences; any repetitive, fact-free text works).
FILLER = ("The grass is green. The sky is blue. The sun is bright. Rivers flow to the sea. "
          "Birds sing in the morning. Time goes on. ")
CITIES = ("Lisbon", "Nairobi", "Oslo", "Lima", "Hanoi", "Dublin", "Quito", "Tbilisi", "Perth", "Accra",
          "Bergen", "Valencia", "Kyoto", "Tallinn", "Porto", "Zagreb", "Cusco", "Harare", "Adelaide",
          "Montreal", "Seville", "Krakow", "Salvador", "Mombasa", "Bilbao", "Gdansk", "Osaka", "Tunis")

PASSKEY_INTRO = ("Below is a long text. Somewhere in it there is a secret pass key. "
                 "Read carefully: at the end I will ask you for the pass key.\n\n")
NEEDLE_INTRO = ("Below are some articles. Somewhere in them one sentence gives the magic number of a city. "
                "Read carefully: at the end I will ask you for that number.\n\n")


@dataclass(frozen=True)
class Task:
    """One retrieval prompt. Lengths and positions are in tokens of the tokenizer it was built for.

    prompt_ids: the whole prompt, len == context_tokens.
    question_start: index of the first token of the question part (the question, the chat
        template's end and the answer prefix); prompt_ids[:question_start] is the context.
    needle_start / needle_tokens: where the hidden fact's tokens lie in prompt_ids.
    haystack_tokens: filler/text tokens around the fact (the rest is instructions and question).
    depth: the requested depth (0 = start of the haystack, 1 = just before the question);
        `actual_depth` is where the fact landed after snapping to a sentence boundary.
    """

    kind: str
    context_tokens: int
    depth: float
    seed: int
    prompt_ids: list[int] = field(repr=False)
    question_start: int
    needle_start: int
    needle_tokens: int
    haystack_tokens: int
    answer: str
    needle: str
    question: str
    answer_prefix: str
    chat: bool
    actual_depth: float

    @property
    def context_ids(self) -> list[int]:
        """The tokens before the question part (what a prefill-time eviction may compress)."""
        return self.prompt_ids[:self.question_start]

    @property
    def question_ids(self) -> list[int]:
        """The question part: question, template end, answer prefix."""
        return self.prompt_ids[self.question_start:]


def _encode(tokenizer, text: str) -> list[int]:
    """Token ids of text, no special tokens added, no length warning."""
    old = getattr(tokenizer, "model_max_length", None)
    tokenizer.model_max_length = int(1e12)
    try:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    finally:
        tokenizer.model_max_length = old


def _use_chat(tokenizer, chat: bool | None) -> bool:
    """chat=None: use the chat template when the tokenizer has one. chat=True without one: error."""
    has = getattr(tokenizer, "chat_template", None) is not None
    if chat is None:
        return has
    if chat and not has:
        raise EigenError("chat=True but the tokenizer has no chat template; pass chat=False")
    return bool(chat)


def _frame(tokenizer, chat: bool) -> tuple[str, str]:
    """(text before the user's content, text after it up to where the answer starts)."""
    if not chat:
        return "", "\n"
    marker = "\u2063EIGENKV-USER-CONTENT\u2063"
    text = tokenizer.apply_chat_template([{"role": "user", "content": marker}], add_generation_prompt=True,
                                         tokenize=False)
    if text.count(marker) != 1:
        raise EigenError("the tokenizer's chat template does not render the user message verbatim")
    before, after = text.split(marker)
    return before, after


def _check_args(kind: str, context_tokens: int, depth: float) -> None:
    if kind not in KINDS:
        raise EigenError(f"unknown task kind {kind!r}; choose one of {', '.join(KINDS)}")
    if not isinstance(context_tokens, int) or context_tokens <= 0:
        raise EigenError(f"context_tokens must be a positive integer, got {context_tokens!r}")
    if not 0.0 <= float(depth) <= 1.0:
        raise EigenError(f"depth must lie in [0, 1], got {depth}")


def _boundaries(tokenizer, hay: list[int]) -> list[int]:
    """Indices i (0..len) where a sentence or line ends just before hay[i] (not "1.3"): places for the fact."""
    pieces = [tokenizer.decode([tok]) for tok in hay]
    found = [0, len(hay)]
    for i in range(1, len(hay)):
        before, after = pieces[i - 1], pieces[i]
        if before.endswith("\n") or (before.rstrip(" ").endswith((".", "!", "?")) and after[:1].isspace()) \
                or (before.endswith((". ", "! ", "? "))):
            found.append(i)
    return sorted(set(found))


def _build(tokenizer, kind: str, context_tokens: int, depth: float, seed: int, chat: bool | None,
           intro: str, needle: str, question: str, answer_prefix: str, answer: str, hay_source) -> Task:
    """Assemble head + haystack (cut to fit) + needle + question part, token-exact."""
    chat = _use_chat(tokenizer, chat)
    before, after = _frame(tokenizer, chat)
    head = _encode(tokenizer, before + intro)
    needle_ids = _encode(tokenizer, " " + needle)
    tail = _encode(tokenizer, "\n\n" + question + after + answer_prefix)
    n_hay = context_tokens - len(head) - len(needle_ids) - len(tail)
    if n_hay < MIN_HAYSTACK_TOKENS:
        raise EigenError(f"context_tokens={context_tokens} is too small for a {kind} task with this tokenizer: "
                         f"instructions, fact and question take {context_tokens - n_hay} tokens and the haystack "
                         f"needs >= {MIN_HAYSTACK_TOKENS} (use >= {context_tokens - n_hay + MIN_HAYSTACK_TOKENS})")
    hay = hay_source(n_hay)
    target = depth * n_hay
    cut = min(_boundaries(tokenizer, hay), key=lambda i: (abs(i - target), i))
    ids = head + hay[:cut] + needle_ids + hay[cut:] + tail
    assert len(ids) == context_tokens
    return Task(kind=kind, context_tokens=context_tokens, depth=float(depth), seed=seed, prompt_ids=ids,
                question_start=len(ids) - len(tail), needle_start=len(head) + cut, needle_tokens=len(needle_ids),
                haystack_tokens=n_hay, answer=answer, needle=needle, question=question, answer_prefix=answer_prefix,
                chat=chat, actual_depth=cut / n_hay)


def _rng(kind: str, context_tokens: int, depth: float, seed: int) -> random.Random:
    """One generator per task; str seeds are hashed deterministically (no PYTHONHASHSEED effect)."""
    return random.Random(f"{kind}:{seed}:{context_tokens}:{float(depth):.6f}")


def passkey_task(tokenizer, context_tokens: int, depth: float, seed: int, chat: bool | None = None) -> Task:
    """A random 5-digit pass key hidden at `depth` of repeated filler; prompt exactly context_tokens tokens.

    chat=None uses the tokenizer's chat template when it has one (True: required; False: plain
    text ending in "\\n" before the answer prefix). Raises EigenError for a bad depth or a
    context too small to hold the instructions, the fact and the question.
    """
    _check_args("passkey", context_tokens, depth)
    key = str(_rng("passkey", context_tokens, depth, seed).randint(10000, 99999))
    unit = _encode(tokenizer, FILLER)

    def hay(n: int) -> list[int]:
        return (unit * (n // len(unit) + 1))[:n]

    return _build(tokenizer, "passkey", context_tokens, depth, seed, chat, PASSKEY_INTRO,
                  needle=f"The secret pass key is {key}. Keep it in mind: the pass key is {key}.",
                  question="What is the secret pass key? Answer with the number only.",
                  answer_prefix="The secret pass key is", answer=key, hay_source=hay)


def clean_wiki(text: str) -> str:
    """The built-in wiki text without its `<doc ...>` / `</doc>` lines (an article's title line follows the
    previous article's last line). Changing this changes every needle task: results record the tasks."""
    lines = [ln for ln in text.splitlines() if not ln.startswith("<doc ") and ln.strip() != "</doc>"]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines))


_HAYSTACK_CACHE: dict[str, str] = {}


def _default_haystack() -> str:
    if "wiki" not in _HAYSTACK_CACHE:
        from eigenkv.exporter.sources import read_text  # lazy: that module imports torch
        _HAYSTACK_CACHE["wiki"] = clean_wiki(read_text("wiki"))
    return _HAYSTACK_CACHE["wiki"]


def needle_task(tokenizer, context_tokens: int, depth: float, seed: int, chat: bool | None = None,
                haystack: str | None = None) -> Task:
    """A "magic number of <city>" sentence hidden at `depth` of real text; exactly context_tokens tokens.

    haystack: the text to hide it in (default: the built-in wiki text without markup); each
    seed starts at another paragraph. The answer is 7 digits. Raises EigenError for a bad
    depth, a too small context, or a haystack shorter than the context.
    """
    _check_args("needle", context_tokens, depth)
    rng = _rng("needle", context_tokens, depth, seed)
    city = rng.choice(CITIES)
    number = str(rng.randint(1_000_000, 9_999_999))
    text = _default_haystack() if haystack is None else haystack
    starts = [0] + [m.end() for m in re.finditer(r"\n\n", text)]

    def hay(n: int) -> list[int]:
        budget = 8 * n + 2000  # characters; real text runs ~3-5 characters a token
        usable = [s for s in starts if len(text) - s >= budget] or [0]
        begin = usable[rng.randrange(len(usable))]
        ids = _encode(tokenizer, text[begin:begin + budget])
        if len(ids) < n:
            raise EigenError(f"the haystack text has too few tokens for a {context_tokens}-token needle task "
                             f"(needs {n} after position {begin}, has {len(ids)})")
        return ids[:n]

    return _build(tokenizer, "needle", context_tokens, depth, seed, chat, NEEDLE_INTRO,
                  needle=f"The magic number of {city} is {number}.",
                  question=f"What is the magic number of {city}? Answer with the number only.",
                  answer_prefix=f"The magic number of {city} is", answer=number, hay_source=hay)


def make_task(tokenizer, kind: str, context_tokens: int, depth: float, seed: int, chat: bool | None = None,
              haystack: str | None = None) -> Task:
    """passkey_task or needle_task by name."""
    if kind == "passkey":
        return passkey_task(tokenizer, context_tokens, depth, seed, chat=chat)
    if kind == "needle":
        return needle_task(tokenizer, context_tokens, depth, seed, chat=chat, haystack=haystack)
    raise EigenError(f"unknown task kind {kind!r}; choose one of {', '.join(KINDS)}")


def default_tasks(tokenizer, contexts=(1024, 2048, 4096), depths=(0.0, 0.25, 0.5, 0.75, 1.0), seeds=(0, 1),
                  kinds=KINDS, chat: bool | None = None, haystack: str | None = None) -> list[Task]:
    """Every (kind, context, depth, seed), in that nesting order; contexts in tokens."""
    return [make_task(tokenizer, kind, int(c), float(d), int(s), chat=chat, haystack=haystack)
            for kind in kinds for c in contexts for d in depths for s in seeds]


def is_correct(task: Task, generated_text: str) -> bool:
    """True when the answer appears in the generation as a whole token (not inside a longer number/word)."""
    pattern = r"(?<![0-9A-Za-z])" + re.escape(task.answer) + r"(?![0-9A-Za-z])"
    return re.search(pattern, generated_text) is not None


def run_tasks(generate, tokenizer, tasks, max_new_tokens: int = 16) -> list[dict]:
    """Run each task through `generate(prompt_ids, max_new_tokens) -> new token ids` (greedy, any backend).

    Returns one record per task: kind, context (tokens), depth, actual_depth, seed, answer,
    correct, generated (text), new_tokens, seconds.
    """
    if max_new_tokens < 1:
        raise EigenError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    records = []
    for task in tasks:
        t0 = time.perf_counter()
        new = [int(t) for t in generate(list(task.prompt_ids), max_new_tokens)]
        seconds = time.perf_counter() - t0
        text = tokenizer.decode(new, skip_special_tokens=True)
        records.append(record(task, text, len(new), seconds))
    return records


def record(task: Task, generated_text: str, new_tokens: int, seconds: float) -> dict:
    """The per-task result dict (what run_tasks returns; peers that only return text use it too)."""
    return {"kind": task.kind, "context": task.context_tokens, "depth": task.depth,
            "actual_depth": round(task.actual_depth, 4), "seed": task.seed, "answer": task.answer,
            "correct": is_correct(task, generated_text), "generated": generated_text,
            "new_tokens": int(new_tokens), "seconds": round(float(seconds), 3)}


def summarize(records) -> dict[tuple[str, int], float]:
    """{(kind, context): accuracy in [0, 1]} over the records, keys sorted."""
    groups: dict[tuple[str, int], list[bool]] = {}
    for r in records:
        groups.setdefault((r["kind"], int(r["context"])), []).append(bool(r["correct"]))
    return {k: sum(v) / len(v) for k, v in sorted(groups.items())}
