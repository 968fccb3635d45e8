"""Do engines of one checkpoint agree? Greedy tokens on text prompts and logits on random prompts.

    python tools/engine_agreement.py --engine fused=out/engines/smollm2 \\
        --engine function=out/engines/smollm2-function --out docs/results/ort_fused_agreement

The first engine is the reference. For each text prompt (tokenized as `eigenkv run` does) every
engine generates `--tokens` greedy tokens (prefill in chunks of `--chunk`, then one token per
step); the table says whether they equal the reference's and where they first differ. Then a
batch of random prompts (`--random-batch` × `--random-len` tokens, seeded) is prefilled in chunks
and decoded for `--decode-steps` greedy steps (the reference's tokens fed to every engine) and the
largest |logit difference| from the reference over all those steps is reported, with the logits'
largest magnitude for scale. Writes OUT.json and OUT.md (command, machine).
"""

from __future__ import annotations

import argparse
import platform
import shlex
import sys
from pathlib import Path

PROMPTS = ("The history of Rome", "def fib(n):", "Paris is")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engine", action="append", required=True, metavar="NAME=DIR",
                    help="an engine directory with a label (repeat; the first is the reference)")
    ap.add_argument("--prompt", action="append", help=f"text prompt (repeat; default {', '.join(PROMPTS)})")
    ap.add_argument("--tokens", type=int, default=64, help="greedy tokens per prompt (default 64)")
    ap.add_argument("--chunk", type=int, default=512, help="prefill tokens per step (default 512)")
    ap.add_argument("--random-batch", type=int, default=2)
    ap.add_argument("--random-len", type=int, default=1000, help="random prompt tokens (default 1000)")
    ap.add_argument("--decode-steps", type=int, default=16)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", required=True, metavar="PATH", help="writes PATH.json and PATH.md")
    args = ap.parse_args(argv)
    if len(args.engine) < 2 or any("=" not in e for e in args.engine):
        ap.error("pass at least two --engine NAME=DIR")
    return args


def _logits_over_steps(engine, ids, chunk, steps, feed=None):
    """Prefill ids [B, P] in chunks, then `steps` greedy steps (tokens from `feed` [B, steps] when
    given) -> (logits of the last prompt token and of every step [B, 1 + steps, V], tokens fed)."""
    import numpy as np

    from eigenkv.engines.runtime import decode_step, prefill
    batch, length = ids.shape
    lengths = np.full(batch, length, np.int64)
    cache = engine.new_cache(batch, length + steps + 1)
    last = prefill(engine, cache, ids, lengths, chunk)
    out, fed = [last], []
    for t in range(steps):
        tokens = last.argmax(-1) if feed is None else feed[:, t]
        fed.append(tokens)
        last = decode_step(engine, cache, tokens, lengths + t)
        out.append(last)
    return np.stack(out, 1), np.stack(fed, 1)


def main(argv=None) -> int:
    args = parse_args(argv)
    import numpy as np

    from eigenkv.engines.backend import load_engine
    from eigenkv.engines.config import EngineConfig
    from eigenkv.engines.runtime import generate
    from eigenkv.exporter.sources import ModelSource, load_tokenizer
    names, dirs = zip(*(e.split("=", 1) for e in args.engine))
    configs = [EngineConfig.load(Path(d)) for d in dirs]
    if len({c.source.hash for c in configs}) != 1:
        print("engine_agreement: error: the engines come from different checkpoints", file=sys.stderr)
        return 2
    src = configs[0].source
    tokenizer = load_tokenizer(ModelSource(Path(src.directory), src.gguf_file))
    engines = [load_engine(Path(d), threads=args.threads) for d in dirs]
    prompts = args.prompt or list(PROMPTS)
    greedy = {}
    for prompt in prompts:
        ids = tokenizer(prompt)["input_ids"]
        runs = [generate(e, [ids], args.tokens, prefill_chunk=args.chunk)[0] for e in engines]
        ref = runs[0]
        greedy[prompt] = {name: {"tokens": run, "identical": run == ref,
                                 "first_difference": next((i for i, (a, b) in enumerate(zip(run, ref)) if a != b),
                                                          None if len(run) == len(ref) else min(len(run), len(ref)))}
                          for name, run in zip(names, runs)}
    rng = np.random.default_rng(0)
    ids = rng.integers(0, engines[0].vocab_size, size=(args.random_batch, args.random_len), dtype=np.int64)
    ref_logits, fed = _logits_over_steps(engines[0], ids, args.chunk, args.decode_steps)
    logits = {names[0]: {"max_abs_diff": 0.0}}
    for name, engine in zip(names[1:], engines[1:]):
        got, _ = _logits_over_steps(engine, ids, args.chunk, args.decode_steps, feed=fed)
        logits[name] = {"max_abs_diff": float(np.abs(got.astype(np.float64) - ref_logits).max()),
                        "greedy_steps_identical": bool((got.argmax(-1) == ref_logits.argmax(-1)).all())}
    result = {"command": "python tools/engine_agreement.py " + shlex.join(sys.argv[1:] if argv is None else argv),
              "machine": f"{platform.machine()} CPU, {platform.platform()}",
              "engines": {n: {"dir": d, "runtime": c.runtime} for n, d, c in zip(names, dirs, configs)},
              "reference": names[0], "tokens": args.tokens, "greedy": greedy,
              "random_prompts": {"batch": args.random_batch, "tokens": args.random_len, "decode_steps": args.decode_steps,
                                 "max_abs_logit": float(np.abs(ref_logits).max()), "vs_reference": logits}}
    lines = [f"Command: `{result['command']}` on {result['machine']}.", "",
             "| prompt | " + " | ".join(names[1:]) + " |", "|---|" + "---|" * (len(names) - 1)]
    for prompt, runs in greedy.items():
        cells = ["identical" if runs[n]["identical"] else f"differs at token {runs[n]['first_difference']}"
                 for n in names[1:]]
        lines.append(f"| {prompt!r} ({args.tokens} greedy tokens) | " + " | ".join(cells) + " |")
    lines.append(f"| random {args.random_batch}×{args.random_len} + {args.decode_steps} steps: max |logit diff| "
                 f"(logits ≤ {result['random_prompts']['max_abs_logit']:.1f}) | "
                 + " | ".join(f"{logits[n]['max_abs_diff']:.2e}" for n in names[1:]) + " |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    from eigenkv.artifacts import atomic_path, write_json
    write_json(out.with_suffix(".json"), result)
    with atomic_path(out.with_suffix(".md")) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    print("\n".join(lines[2:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
