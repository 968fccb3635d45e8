"""How much of a decode-speed gap between two ONNX Runtime graphs is the sessions themselves:
several sessions of the same engine, plus ORT-GenAI's graph run through plain ONNX Runtime, in
one process, timed step by step in interleaved blocks, in two load orders.

    python tools/session_spread.py --engine out/engines/base --ortgenai out/ortgenai-smollm2-pruned \\
        --contexts 512,2048 --batches 1 --out docs/results/session_spread_smollm2

Ours runs through `eigenkv.engines.runtime.decode_step` (what `eigenkv run`/`bench` time). The
ORT-GenAI folder's `model.onnx` (its `genai_config.json` gives layers, KV heads, head size) runs in
an onnxruntime.InferenceSession driven the way ORT-GenAI drives it: one IOBinding, each layer's
past and present bound to the same buffer, logits into a preallocated array, an all-ones
attention mask of the total length. It measures graph execution, not ORT-GenAI's own C++ loop.
Blocks of `--steps` decode steps rotate over the sessions (forward, then backward order, so no
session always follows the same one); every session has decoded the same number of steps when
a block starts. Per session: p50 and mean ms per decode step over all its timed steps.
"""

from __future__ import annotations

import argparse
import json
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
    ap.add_argument("--engine", required=True, help="an `eigenkv build --backend ort` engine directory")
    ap.add_argument("--ortgenai", help="an ORT-GenAI model folder (tools/ortgenai_peer.py) run as a plain ORT graph")
    ap.add_argument("--sessions", type=int, default=3, help="sessions of --engine loaded side by side (default 3)")
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
    return args


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

    def __init__(self, folder: Path, ids: np.ndarray, steps: int, threads: int):
        import onnxruntime as ort
        from eigenkv.errors import EigenError
        try:
            config = json.loads((folder / "genai_config.json").read_text())["model"]
            dec = config["decoder"]
        except (OSError, ValueError, KeyError) as e:
            raise EigenError(f"--ortgenai {folder}: no readable genai_config.json with a decoder ({e}); "
                             "build the folder with tools/ortgenai_peer.py") from None
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(folder / dec["filename"]), options, providers=["CPUExecutionProvider"])
        batch, ctx = ids.shape
        shape = (batch, dec["num_key_value_heads"], ctx + steps + 1, dec["head_size"])
        self.buffers = [np.zeros(shape, np.float32) for _ in range(2 * dec["num_hidden_layers"])]
        self.values = [ort.OrtValue.ortvalue_from_numpy(b) for b in self.buffers]
        self.binding = self.session.io_binding()
        names = dec["inputs"], dec["outputs"]
        for i in range(dec["num_hidden_layers"]):
            for j, kind in enumerate(("key", "value")):
                value = self.values[2 * i + j]
                self.binding.bind_ortvalue_input(names[0][f"past_{kind}_names"] % i, value)
                self.binding.bind_ortvalue_output(names[1][f"present_{kind}_names"] % i, value)
        self.vocab, self.logits_name = config["vocab_size"], names[1]["logits"]
        self.ids_name, self.mask_name = names[0]["input_ids"], names[0]["attention_mask"]
        self.length = 0
        self.tokens = self._run(ids)

    def _run(self, ids: np.ndarray) -> np.ndarray:
        import onnxruntime as ort
        batch, n = ids.shape
        self.length += n
        pruned = {o.name: o.shape for o in self.session.get_outputs()}[self.logits_name][1] == 1  # prune_lm_head
        logits = np.empty((batch, 1 if pruned else n, self.vocab), np.float32)
        self.binding.bind_ortvalue_output(self.logits_name, ort.OrtValue.ortvalue_from_numpy(logits))
        self.binding.bind_cpu_input(self.ids_name, np.ascontiguousarray(ids, dtype=np.int64))
        self.binding.bind_cpu_input(self.mask_name, np.ones((batch, self.length), np.int64))
        self.session.run_with_iobinding(self.binding)
        return logits[:, -1].argmax(-1)

    def step(self) -> None:
        self.tokens = self._run(self.tokens[:, None])


def time_cell(args, context: int, batch: int, order: str) -> dict:
    """Load the sessions in `order` ("ours-first" or "peer-first"), then time interleaved blocks."""
    total = args.blocks * args.steps
    ids = np.random.default_rng(0).integers(0, args.vocab, (batch, context))  # the same prompts for every session
    makers = [(f"ours #{i + 1}", lambda: Ours(Path(args.engine), ids, total, args.threads)) for i in range(args.sessions)]
    if args.ortgenai:
        peer = ("ORT-GenAI graph", lambda: OrtGenaiGraph(Path(args.ortgenai), ids, total, args.threads))
        makers = [peer] + makers if order == "peer-first" else makers + [peer]
    runners = {name: make() for name, make in makers}
    times = {name: [] for name in runners}
    for block in range(args.blocks):
        for name, runner in (list(runners.items()) if block % 2 == 0 else list(runners.items())[::-1]):
            for _ in range(args.steps):
                t = time.perf_counter()
                runner.step()
                times[name].append(1e3 * (time.perf_counter() - t))
    return {"context": context, "batch": batch, "order": order, "load_order": list(runners),
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
    from eigenkv.errors import EigenError
    orders = ["ours-first", "peer-first"] if args.ortgenai else ["ours-first"]
    try:
        from eigenkv.engines.backend import load_engine
        args.vocab = load_engine(Path(args.engine), threads=1).vocab_size
        cells = [time_cell(args, c, b, o) for c in args.contexts for b in args.batches for o in orders]
    except EigenError as e:
        print(f"session_spread: error: {e}", file=sys.stderr)
        return 2
    command = "python tools/session_spread.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    result = {"command": command, "machine": f"{platform.machine()} CPU, {platform.platform()}",
              "settings": vars(args), "cells": cells}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out.with_suffix(".json"), result)
    with atomic_path(out.with_suffix(".md")) as tmp:
        tmp.write_text(f"Command: `{command}` on {result['machine']}.\n\n{markdown(result)}\n")
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
