"""Which loss costs the pass keys when key-norm eviction runs on a low-rank cache: the scores, or the cache?

    python tools/evict_oracle.py --engine out/engines/smollm2-c4096 --keep 0.5 \\
        --out docs/results/evict_oracle_smollm2_kv05_calib4096

Runs pass-key tasks (engines/longctx.py) through `eigenkv.engines.runtime.generate` on one
engine with key-norm eviction (sink, recent window, skipped layers, chunked prefill: what
`eigenkv run --evict key-norm` does), once per scorer of the slots:

  key-norm  the engine's own: norms of the reconstructed rank-r keys, √(k_rᵀ UᵀU k_r)
  plain     norms of the cached rank-r coordinates, ‖k_r‖ (the Gram left out)
  oracle    norms of the *original* model's full keys at the slots' positions, from a float32
            forward of the uncompressed model over the prompt (what a perfect scorer of the
            original keys would keep)

and records, besides accuracy, the mean share of each eviction's kept slots that the oracle
keeps too. If the oracle loses pass keys as well, better scores of the rank-r keys cannot fix
the mix: the low-rank error and the eviction compound. The model (--model, default the
embedded one) must be the engine's source checkpoint. Writes OUT.json and OUT.md.
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

from eigenkv.malloc import malloc_mode, tune_malloc

SCORERS = ("key-norm", "plain", "oracle")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engine", required=True, type=Path, metavar="DIR", help="a (low-rank) engine directory")
    ap.add_argument("--model", metavar="PATH", help="its source checkpoint (default: the embedded SmolLM2)")
    ap.add_argument("--keep", type=float, default=0.5, help="keep ratio (default 0.5)")
    ap.add_argument("--scorers", default=",".join(SCORERS), help=f"comma-separated, of {', '.join(SCORERS)}")
    ap.add_argument("--contexts", default="2048,4096", help="prompt tokens, comma-separated")
    ap.add_argument("--depths", default="0.25,0.5,0.75", help="pass-key depths, comma-separated")
    ap.add_argument("--seeds", default="0", help="comma-separated")
    ap.add_argument("--sink", type=int, default=4)
    ap.add_argument("--recent", type=int, default=64)
    ap.add_argument("--skip-layers", default="0,1")
    ap.add_argument("--headroom", type=int, default=256, help="slots above the budget; the prefill chunk")
    ap.add_argument("--pool", type=int, default=1,
                    help="max-pooling width of the scores (default 1: the paper's selection, as recorded)")
    ap.add_argument("--max-new-tokens", type=int, default=12)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", required=True, metavar="PATH", help="writes PATH.json and PATH.md")
    return ap.parse_args(argv)


def original_key_norms(decoder, ids: list[int]) -> list[np.ndarray]:
    """Per layer, the norms of the uncompressed model's keys over the prompt [Hkv, T] (float64),
    read from its own KV cache after one float32 forward (RoPE keeps norms)."""
    import torch
    cache = decoder.new_cache(1, len(ids))
    with torch.no_grad():
        decoder(torch.tensor([ids]), cache=cache)
    return [k[0, :, : len(ids)].double().norm(dim=-1).numpy() for k in cache.keys]


def make_evictor_class():
    from eigenkv.engines.eviction import Evictor, key_norms

    class ScoredEvictor(Evictor):
        """The engine's evictor (`Evictor.make_room`: same layers, protection, budget and
        compaction) with the slot scores chosen by `scorer`; records the overlap of each kept
        set with the oracle's. Generated tokens are scored with the last prompt token's norm:
        they sit in the recent window (run() checks --recent > --max-new-tokens)."""

        def __init__(self, settings, scorer: str, oracle: list[np.ndarray]):
            super().__init__(settings)
            self.scorer, self.oracle, self.overlaps = scorer, oracle, []

        def choose(self, engine, layer, keys, positions):
            pos, norms = positions.astype(np.int64), self.oracle[layer]
            oracle = -np.take_along_axis(norms, np.minimum(pos, norms.shape[1] - 1), 1)
            scores = {"key-norm": lambda: -key_norms(keys, engine.key_gram(layer)),
                      "plain": lambda: -key_norms(keys, None), "oracle": lambda: oracle}[self.scorer]()
            kept, best = self.keep_best(scores, pos), self.keep_best(oracle, pos)
            self.overlaps.append(np.mean([np.intersect1d(a, b).size / a.size for a, b in zip(kept, best)]))
            return kept

    return ScoredEvictor


def run(args) -> dict:
    import torch

    from eigenkv.engines.backend import load_engine
    from eigenkv.engines.eviction import EvictionSettings, make_evictor
    from eigenkv.engines.longctx import passkey_task, run_tasks, summarize
    from eigenkv.engines.runtime import generate
    from eigenkv.errors import EigenError
    from eigenkv.exporter.decoder import decoder_from_hf
    from eigenkv.exporter.sources import load_model, resolve_model
    scorers = args.scorers.split(",")
    if not scorers or any(s not in SCORERS for s in scorers):
        raise EigenError(f"--scorers takes {', '.join(SCORERS)}, got {args.scorers!r}")
    if args.recent <= args.max_new_tokens:
        raise EigenError(f"--recent ({args.recent}) must exceed --max-new-tokens ({args.max_new_tokens}): the oracle "
                         "has norms for prompt tokens only, so generated tokens must stay protected")
    engine = load_engine(args.engine, threads=args.threads)
    model, tokenizer = load_model(resolve_model(args.model), torch.float32, progress=False)
    decoder = decoder_from_hf(model).eval()
    d, lay = decoder.dims, engine.layout
    if (d.n_layers, d.n_kv_heads, d.head_dim) != (lay.n_layers, lay.n_kv_heads, lay.head_dim):
        raise EigenError(f"{args.engine} is not an engine of this model ({lay.n_layers} layers, {lay.n_kv_heads} KV "
                         f"heads vs {d.n_layers}, {d.n_kv_heads}): pass its source checkpoint with --model")
    settings = EvictionSettings.from_args("key-norm", args.keep, None, args.sink, args.recent, args.skip_layers,
                                          args.headroom, pool=args.pool)
    make_evictor(settings, engine)  # the engine's own checks (slot positions, key Gram)
    tasks = [passkey_task(tokenizer, int(c), float(d), int(s)) for c in args.contexts.split(",")
             for d in args.depths.split(",") for s in args.seeds.split(",")]
    stops = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    evictor_class, rows = make_evictor_class(), []
    for scorer in scorers:
        overlaps, t0 = [], time.perf_counter()

        def gen(ids, n):
            evictor = evictor_class(settings, scorer, original_key_norms(decoder, ids))
            out = generate(engine, [ids], n, stop_tokens=stops, evictor=evictor, prefill_chunk=args.headroom)[0]
            overlaps.extend(evictor.overlaps)
            return out

        records = run_tasks(gen, tokenizer, tasks, args.max_new_tokens)
        rows.append({"scorer": scorer, "accuracy": {f"{k}@{c}": round(a, 4) for (k, c), a in summarize(records).items()},
                     "kept_also_by_oracle": round(float(np.mean(overlaps)), 4) if overlaps else None,
                     "evictions": len(overlaps), "seconds": round(time.perf_counter() - t0, 1), "records": records})
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "records"}), flush=True)
    return {"command": "python tools/evict_oracle.py " + shlex.join(sys.argv[1:]), "engine": str(args.engine),
            "key_ranks": list(engine.layout.key_ranks), "value_ranks": list(engine.layout.value_ranks),
            "eviction": settings.to_json(), "machine": f"{platform.machine()} CPU, {platform.platform()}, malloc {malloc_mode()}",
            "rows": rows}


def markdown(result: dict) -> str:
    cols = sorted({k for r in result["rows"] for k in r["accuracy"]}, key=lambda k: int(k.split("@")[1]))
    lines = [f"Command: `{result['command']}` on {result['machine']}.", "",
             f"Eviction: {json.dumps(result['eviction'])}", "",
             "| scorer | " + " | ".join(cols) + " | kept slots also kept by the oracle |",
             "|---|" + "---|" * (len(cols) + 1)]
    for r in result["rows"]:
        n = len(r["records"]) // max(1, len(cols))
        cells = [f"{round(r['accuracy'][c] * n)}/{n}" for c in cols]
        share = "" if r["kept_also_by_oracle"] is None else f"{100 * r['kept_also_by_oracle']:.1f}%"
        lines.append(f"| {r['scorer']} | " + " | ".join(cells) + f" | {share} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    from eigenkv.errors import EigenError
    args = parse_args(argv)
    tune_malloc()  # as the eigenkv commands do (eigenkv/malloc.py); recorded with the machine
    try:
        result = run(args)
    except EigenError as e:
        print(f"evict_oracle: error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for suffix, text in ((".json", json.dumps(result, indent=1) + "\n"), (".md", markdown(result))):
        tmp = out.with_name(out.name + suffix + ".tmp")
        tmp.write_text(text)
        tmp.replace(out.with_name(out.name + suffix))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
