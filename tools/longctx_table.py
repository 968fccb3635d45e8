"""Long-context accuracy and perplexity of engines under KV eviction: pass key and needle retrieval
(engines/longctx.py, built in-process) and decode-style perplexity, per engine × policy × keep ratio.

    python tools/longctx_table.py --engine base=out/engines/base --engine kv0.5=out/engines/kv05 \\
        --keep 1,0.5,0.3,0.1 --contexts 2048,4096 --out docs/results/longctx_smollm2

Every task runs through `eigenkv.engines.runtime.generate` (greedy, chunked prefill, eviction while
the buffer fills), exactly as `eigenkv run --evict ...` does. Keep 1.0 is generation without
eviction. KV bytes are the cache buffers allocated for the longest context, per sequence.
Writes OUT.json and OUT.md (with the command and the machine).
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from pathlib import Path

from eigenkv.malloc import malloc_mode, tune_malloc


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",")]


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",")]


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engine", action="append", required=True, metavar="NAME=DIR",
                    help="an engine directory with a row label (repeat)")
    ap.add_argument("--keep", type=_floats, default=[1.0, 0.5, 0.3, 0.1], metavar="R,R,...")
    ap.add_argument("--policies", default="key-norm", help="comma-separated eviction policies (default key-norm)")
    ap.add_argument("--contexts", type=_ints, default=[2048, 4096], metavar="N,N,...", help="prompt tokens")
    ap.add_argument("--depths", type=_floats, default=[0.1, 0.5, 0.9], metavar="D,D,...")
    ap.add_argument("--seeds", type=_ints, default=[0], metavar="S,S,...")
    ap.add_argument("--kinds", default="passkey,needle")
    ap.add_argument("--sink", type=int, default=4)
    ap.add_argument("--recent", type=int, default=64, help="newest tokens always kept (covers the question)")
    ap.add_argument("--skip-layers", default="0,1")
    ap.add_argument("--pool", type=_ints, default=None, metavar="W,W,...",
                    help="max-pooling widths of the policy's scores (odd tokens; 1: none; default: the runtime's "
                         "default), one row each")
    ap.add_argument("--headroom", type=int, default=256, help="slots above the budget; the prefill chunk")
    ap.add_argument("--max-new-tokens", type=int, default=12)
    ap.add_argument("--ppl-tokens", type=int, default=1024, help="decode-style perplexity tokens (0: skip)")
    ap.add_argument("--ppl-chunk", type=int, default=16, help="tokens per step while scoring perplexity")
    ap.add_argument("--ppl-text", default="wiki", help="built-in text or file; its second half is scored")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", default="docs/results/longctx_smollm2", metavar="PATH", help="writes PATH.json/.md")
    return ap.parse_args(argv)


def _settings(args, policy: str, keep: float, pool: int):
    from eigenkv.engines.eviction import EvictionSettings
    if keep >= 1.0:
        return None
    return EvictionSettings.from_args(policy, keep, None, args.sink, args.recent, args.skip_layers, args.headroom,
                                      pool=pool)


def _ppl_tokens(tokenizer, args) -> list[int]:
    from eigenkv.exporter.sources import read_text
    ids = tokenizer(read_text(args.ppl_text), add_special_tokens=False)["input_ids"]
    return ids[len(ids) // 2:][: args.ppl_tokens]


def run_engine(label: str, engine_dir: Path, args, tokenizer, tasks, ppl_ids) -> list[dict]:
    """Rows for one engine: every (policy, keep) over all tasks, plus its perplexity."""
    import numpy as np

    from eigenkv.engines.backend import load_engine
    from eigenkv.engines.eviction import make_evictor
    from eigenkv.engines.longctx import run_tasks, summarize
    from eigenkv.engines.runtime import capacities, generate, stream_perplexity
    engine = load_engine(engine_dir, threads=args.threads)
    stops = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    rows = []
    policies = args.policies.split(",")
    runs = [(policy, keep, pool) for policy in policies for keep in args.keep for pool in args.pool]
    for policy, keep, pool in runs:
        if keep >= 1.0 and (policy, pool) != (policies[0], args.pool[0]):
            continue  # no eviction: one row per engine
        settings = _settings(args, policy, keep, pool)
        t0 = time.perf_counter()

        def gen(ids, n):
            evictor = make_evictor(settings, engine)
            return generate(engine, [ids], n, stop_tokens=stops, evictor=evictor,
                            prefill_chunk=args.headroom)[0]

        records = run_tasks(gen, tokenizer, tasks, args.max_new_tokens)
        longest = max(args.contexts) + args.max_new_tokens
        evictor = make_evictor(settings, engine)
        caps = capacities(engine, longest, args.headroom, evictor)
        kv_bytes = engine.new_cache(1, caps).nbytes
        ppl = None
        if ppl_ids:
            # the same keep ratio of the scored stream, evicting while it is scored
            ppl = stream_perplexity(engine, np.array(ppl_ids), args.ppl_chunk, make_evictor(settings, engine))["ppl"]
        rows.append({"engine": label, "policy": policy if settings else "none", "keep": keep,
                     "pool": pool if settings else 1,
                     "accuracy": {f"{k}@{c}": round(a, 4) for (k, c), a in summarize(records).items()},
                     "kv_bytes_longest_context": kv_bytes, "ppl": None if ppl is None else round(ppl, 4),
                     "seconds": round(time.perf_counter() - t0, 1), "records": records})
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "records"}), flush=True)
    return rows


def markdown(result: dict) -> str:
    rows = result["rows"]
    cols = sorted({k for r in rows for k in r["accuracy"]}, key=lambda k: (k.split("@")[0], int(k.split("@")[1])))
    base = max((r["kv_bytes_longest_context"] for r in rows), default=1)
    head = "| engine | policy | pool | keep | " + " | ".join(cols) + " | ppl (decode-style) | KV MiB (longest) | vs largest |"
    lines = [head, "|" + "---|" * (len(cols) + 7)]
    for r in rows:
        acc = " | ".join(f"{100 * r['accuracy'].get(c, float('nan')):.0f}%" for c in cols)
        ppl = "-" if r["ppl"] is None else f"{r['ppl']:.2f}"
        lines.append(f"| {r['engine']} | {r['policy']} | {r.get('pool', 1)} | {r['keep']} | {acc} | {ppl} | "
                     f"{r['kv_bytes_longest_context'] / 2**20:.1f} | {r['kv_bytes_longest_context'] / base:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    tune_malloc()  # as the eigenkv commands do (eigenkv/malloc.py); recorded with the machine
    from transformers import AutoTokenizer

    from eigenkv.engines.eviction import DEFAULT_POOL
    args.pool = args.pool or [DEFAULT_POOL]

    from eigenkv.artifacts import write_json
    from eigenkv.engines.config import EngineConfig
    from eigenkv.engines.longctx import default_tasks
    from eigenkv.errors import EigenError
    try:
        engines = [(e.split("=", 1) if "=" in e else (Path(e).name, e)) for e in args.engine]
        source = EngineConfig.load(Path(engines[0][1])).source
        tokenizer = AutoTokenizer.from_pretrained(source.directory, gguf_file=source.gguf_file)
        tasks = default_tasks(tokenizer, contexts=args.contexts, depths=args.depths, seeds=args.seeds,
                              kinds=tuple(args.kinds.split(",")))
        ppl_ids = _ppl_tokens(tokenizer, args) if args.ppl_tokens else []
        rows = [row for label, d in engines for row in run_engine(label, Path(d), args, tokenizer, tasks, ppl_ids)]
    except EigenError as e:
        print(f"longctx_table: error: {e}", file=sys.stderr)
        return 2
    command = "python tools/longctx_table.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    result = {"command": command, "machine": f"{platform.machine()} CPU, {platform.platform()}, malloc {malloc_mode()}",
              "settings": {k: v for k, v in vars(args).items() if k != "engine"}, "engines": dict(engines),
              "tasks": len(tasks), "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out.with_suffix(".json"), result)
    out.with_suffix(".md").write_text(f"Command: `{command}` on {result['machine']}.\n\n{markdown(result)}\n")
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
