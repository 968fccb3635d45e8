"""How much of a decode-speed gap between two ONNX Runtime graphs is the sessions themselves:
several sessions of the same engine (or of each of several engines), plus ORT-GenAI's graph run
through plain ONNX Runtime, in one process, timed step by step in interleaved blocks, in two load
orders.

    python tools/session_spread.py --engine out/engines/base --ortgenai out/ortgenai-smollm2-pruned \\
        --contexts 512,2048 --batches 1,8 --out docs/results/session_spread_smollm2

`--engine` may be given several times (engines of one checkpoint, e.g. two builds of one export):
each gets `--sessions` sessions, labelled by its folder name and loaded interleaved (A #1, B #1,
A #2, ...), in the same rotation, so an A/B of two graphs is measured against the spread of each
one's own sessions.

Ours runs through `eigenkv.engines.runtime.decode_step` (what `eigenkv run`/`bench` time). The
ORT-GenAI folder's `model.onnx` (its `genai_config.json` gives layers, KV heads, head size) runs in
an onnxruntime.InferenceSession driven the way ORT-GenAI drives it: one IOBinding, each layer's
past and present bound to the same buffer, decode logits into one preallocated array, an all-ones
attention mask of the total length. It measures graph execution, not ORT-GenAI's own C++ loop.
After one untimed warm-up block per session, blocks of `--steps` decode steps rotate over the
sessions (block b starts with session b mod K); every session has decoded the same number of
steps when a block starts. Per session: p50 and mean ms per decode step over its timed steps.
Bad input (engine or folder unreadable, vocabularies differ, context + steps beyond either
model's length) is a one-line error, exit 2, before anything is timed or written.
"""

from __future__ import annotations

import argparse
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",")]


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engine", required=True, action="append",
                    help="an `eigenkv build --backend ort` engine directory (repeat to compare engines)")
    ap.add_argument("--ortgenai", help="an ORT-GenAI model folder (tools/ortgenai_peer.py) run as a plain ORT graph")
    ap.add_argument("--sessions", type=int, default=3, help="sessions of each --engine loaded side by side (default 3)")
    ap.add_argument("--contexts", type=_ints, default=[512], help="prompt tokens per sequence (default 512)")
    ap.add_argument("--batches", type=_ints, default=[1], help="sequences per step (default 1)")
    ap.add_argument("--blocks", type=int, default=10, help="timed blocks per session (default 10)")
    ap.add_argument("--steps", type=int, default=20, help="decode steps per block (default 20)")
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads of every session (default 2)")
    ap.add_argument("--out", default="session_spread", help="output path without suffix (.json and .md written)")
    args = ap.parse_args(argv)
    if args.sessions < 1 or args.blocks < 2 or args.steps < 1 or args.threads < 0:
        ap.error("--sessions and --steps must be >= 1, --blocks >= 2, --threads >= 0")
    if min(args.contexts) < 1 or min(args.batches) < 1:
        ap.error("--contexts and --batches must be >= 1")
    if len({Path(e).resolve().name for e in args.engine}) != len(args.engine):
        ap.error("each --engine needs its own folder name (the sessions are labelled by it)")
    return args


def _labels(engines: list[str], sessions: int) -> list[tuple[str, str]]:
    """(label, engine) per session in load order: "ours #i" for one engine, "<folder> #i" for
    several, interleaved (A #1, B #1, A #2, B #2, ...) so no engine is always loaded first."""
    if len(engines) == 1:
        return [(f"ours #{i + 1}", engines[0]) for i in range(sessions)]
    return [(f"{Path(e).resolve().name} #{i + 1}", e) for i in range(sessions) for e in engines]


class Ours:
    """One session of an eigenkv ORT engine, prefilled, decoding greedily."""

    def __init__(self, engine_dir: Path, ids: np.ndarray, steps: int, threads: int):
        from eigenkv.engines.backend import load_engine
        from eigenkv.engines.runtime import prefill
        self.engine = load_engine(engine_dir, threads=threads)
        batch, ctx = ids.shape
        self.cache = self.engine.new_cache(batch, [ctx + steps + 1] * self.engine.layout.n_layers)
        self.tokens = prefill(self.engine, self.cache, ids, np.full(batch, ctx), 512).argmax(-1)
        self.position = ctx

    def step(self) -> None:
        from eigenkv.engines.runtime import decode_step
        batch = self.tokens.shape[0]
        self.tokens = decode_step(self.engine, self.cache, self.tokens, np.full(batch, self.position)).argmax(-1)
        self.position += 1


class OrtGenaiGraph:
    """ORT-GenAI's exported graph in a plain ONNX Runtime session with shared past/present buffers."""

    def __init__(self, folder, ids: np.ndarray, steps: int, threads: int):
        import onnxruntime as ort
        self.folder = folder  # engines.peer_ortgenai.GenAIFolder
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(folder.model), options, providers=["CPUExecutionProvider"])
        batch, ctx = ids.shape
        shape = (batch, folder.n_kv_heads, ctx + steps + 1, folder.head_dim)
        self.buffers = [np.zeros(shape, folder.dtype) for _ in range(2 * folder.n_layers)]
        self.values = [ort.OrtValue.ortvalue_from_numpy(b) for b in self.buffers]
        self.binding = self.session.io_binding()
        for i in range(folder.n_layers):
            for j, (past, present) in enumerate(((folder.past_key, folder.present_key),
                                                 (folder.past_value, folder.present_value))):
                self.binding.bind_ortvalue_input(past % i, self.values[2 * i + j])
                self.binding.bind_ortvalue_output(present % i, self.values[2 * i + j])
        self.mask = np.ones((batch, ctx + steps + 1), np.int64)
        self.length = 0
        self.tokens = self._run(ids, np.empty((batch, 1 if folder.last_logits_only else ctx, folder.vocab_size),
                                              np.float32))
        self.decode_logits = np.empty((batch, 1, folder.vocab_size), np.float32)  # bound once per step, reused
        self.decode_value = ort.OrtValue.ortvalue_from_numpy(self.decode_logits)

    def _run(self, ids: np.ndarray, logits: np.ndarray, value=None) -> np.ndarray:
        import onnxruntime as ort
        self.length += ids.shape[1]
        self.binding.bind_ortvalue_output(self.folder.logits, value or ort.OrtValue.ortvalue_from_numpy(logits))
        self.binding.bind_cpu_input(self.folder.input_ids, np.ascontiguousarray(ids, dtype=np.int64))
        self.binding.bind_cpu_input(self.folder.attention_mask, self.mask[:, :self.length])
        self.session.run_with_iobinding(self.binding)
        return logits[:, -1].argmax(-1)

    def step(self) -> None:
        self.tokens = self._run(self.tokens[:, None], self.decode_logits, self.decode_value)


def time_cell(args, folder, context: int, batch: int, order: str) -> dict:
    """Load the sessions in `order` ("ours-first" or "peer-first"), decode one untimed warm-up
    block in each, then time `args.blocks` blocks: block b runs every session for `args.steps`
    steps, starting with session b mod K in load order (so no session always follows the same
    one or runs two blocks back to back)."""
    total = (args.blocks + 1) * args.steps
    ids = np.random.default_rng(0).integers(0, args.vocab, (batch, context))  # the same prompts for every session
    makers = [(name, lambda e=engine: Ours(Path(e), ids, total, args.threads))
              for name, engine in _labels(args.engine, args.sessions)]
    if folder is not None:
        peer = ("ORT-GenAI graph", lambda: OrtGenaiGraph(folder, ids, total, args.threads))
        makers = [peer] + makers if order == "peer-first" else makers + [peer]
    runners = [(name, make()) for name, make in makers]
    for _, runner in runners:
        for _ in range(args.steps):
            runner.step()
    times = {name: [] for name, _ in runners}
    blocks = []
    for block in range(args.blocks):
        turn = runners[block % len(runners):] + runners[:block % len(runners)]
        blocks.append([name for name, _ in turn])
        for name, runner in turn:
            for _ in range(args.steps):
                t = time.perf_counter()
                runner.step()
                times[name].append(1e3 * (time.perf_counter() - t))
    return {"context": context, "batch": batch, "order": order, "load_order": [name for name, _ in runners],
            "blocks": blocks,
            "ms": {name: {"p50": round(float(np.median(v)), 3), "mean": round(float(np.mean(v)), 3), "steps": len(v)}
                   for name, v in times.items()}}


def markdown(result: dict) -> str:
    lines = ["| context × batch | load order | session (in load order) | p50 ms/step | mean ms/step | vs fastest session (p50) |",
             "|---|---|---|---|---|---|"]
    for cell in result["cells"]:
        best = min(v["p50"] for v in cell["ms"].values())
        for name in cell["load_order"]:
            v = cell["ms"][name]
            lines.append(f"| {cell['context']} × {cell['batch']} | {cell['order']} | {name} | {v['p50']:.2f} | "
                         f"{v['mean']:.2f} | {v['p50'] / best:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    from eigenkv.artifacts import atomic_path, write_json
    from eigenkv.engines.backend import load_engine
    from eigenkv.engines.peer_ortgenai import read_folder
    from eigenkv.errors import EigenError
    orders = ["ours-first", "peer-first"] if args.ortgenai else ["ours-first"]
    longest = max(args.contexts) + (args.blocks + 1) * args.steps + 1
    try:  # everything checked before the first session is timed
        vocabs = set()
        for path in args.engine:
            engine = load_engine(Path(path), threads=1)
            vocabs.add(engine.vocab_size)
            if longest > engine.max_seq_len:
                raise EigenError(f"context + decode steps ({longest} tokens) exceed {path}'s max_seq_len {engine.max_seq_len}")
            del engine
        if len(vocabs) != 1:
            raise EigenError(f"the engines' vocabularies differ ({sorted(vocabs)}): not one checkpoint")
        args.vocab = vocabs.pop()
        folder = read_folder(Path(args.ortgenai)) if args.ortgenai else None
        if folder is not None:
            if folder.vocab_size != args.vocab:
                raise EigenError(f"--ortgenai {args.ortgenai} has vocabulary {folder.vocab_size}, the engine {args.vocab}: "
                                 "not the same checkpoint")
            if longest > folder.context_length:
                raise EigenError(f"context + decode steps ({longest} tokens) exceed --ortgenai's context_length "
                                 f"{folder.context_length}")
        cells = [time_cell(args, folder, c, b, o) for c in args.contexts for b in args.batches for o in orders]
    except EigenError as e:
        print(f"session_spread: error: {e}", file=sys.stderr)
        return 2
    command = "python tools/session_spread.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    result = {"command": command, "machine": f"{platform.machine()} CPU, {platform.platform()}",
              "settings": vars(args), "cells": cells}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(Path(f"{out}.json"), result)
    with atomic_path(Path(f"{out}.md")) as tmp:
        tmp.write_text(f"Command: `{command}` on {result['machine']}.\n\n{markdown(result)}\n")
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
