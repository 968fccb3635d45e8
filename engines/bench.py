"""`eigenkv bench ENGINE --baseline ENGINE2 [--peer PATH ...]`: the engines in one process, same
prompts, interleaved runs; prefill latency, per-token decode latency p50/p90, tokens/s, KV
bytes held, KV bytes read per decode step and the achieved read bandwidth.

Written against `Engine` only (engines/backend.py): any backend, and the peers of the registry
in engines/peer.py (Optimum, onnxruntime-genai, llama.cpp), run through the same prefill and
decode code. With eviction settings the first engine evicts; `evict_compare` times both our
engines without and with eviction ("compressed", "compressed+evict", "baseline",
"baseline+evict"; each loaded once).
Each (context, batch) point runs warm-up rounds, then `repeats` rounds alternating the order
of the engines, on the same random prompt. Writes bench.json and bench.md (and bench.png
when matplotlib is installed).
"""

from __future__ import annotations

import platform
import resource
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from eigenkv.engines.backend import Engine, load_engine
from eigenkv.engines.runtime import capacities, decode_step, prefill
from eigenkv.errors import EigenError


@dataclass
class BenchConfig:
    contexts: tuple[int, ...] = (512, 1024, 2048, 4096)
    batches: tuple[int, ...] = (1, 8)
    decode_tokens: int = 32
    warmup: int = 1
    repeats: int = 2
    prefill_chunk: int = 512
    threads: int = 0  # 0: onnxruntime's default
    seed: int = 0
    progress: bool = True
    eviction: object = None  # EvictionSettings for the compressed engine (engines/eviction.py), or None
    evict_compare: bool = False  # with eviction: time both engines without and with it


@dataclass
class Point:
    engine: str
    context: int
    batch: int
    prefill_s: list[float] = field(default_factory=list)
    step_s: list[float] = field(default_factory=list)
    kv_bytes: int = 0
    read_bytes: list[int] = field(default_factory=list)  # KV bytes each timed decode step read
    prefill_chunk: int = 0  # tokens per prefill step (the whole prompt for one-step batch prefill)

    def summary(self) -> dict:
        steps = np.array(self.step_s) * 1e3
        read = np.array(self.read_bytes, dtype=np.float64)
        return {"engine": self.engine, "context": self.context, "batch": self.batch,
                "prefill_ms_median": round(float(np.median(self.prefill_s)) * 1e3, 2),
                "decode_ms_p50": round(float(np.percentile(steps, 50)), 3),
                "decode_ms_p90": round(float(np.percentile(steps, 90)), 3),
                "tokens_per_s": round(self.batch * 1e3 / float(steps.mean()), 2),
                "kv_bytes": self.kv_bytes, "kv_bytes_read_per_step": int(read.mean()),
                "kv_read_gb_per_s": round(float((read / (steps / 1e3)).mean()) / 1e9, 3),
                "decode_steps_timed": int(steps.size), "prefill_chunk": self.prefill_chunk}


def _run_once(engine: Engine, prompt: np.ndarray, config: BenchConfig, point: Point | None,
              evictor=None) -> None:
    """One prefill (chunked) + `decode_tokens` greedy steps; timings go into `point`. With an
    evictor the cache is sized by its budget and eviction runs inside the timed steps."""
    batch, ctx = prompt.shape
    cache = engine.new_cache(batch, capacities(engine, ctx + config.decode_tokens + 1, config.prefill_chunk, evictor))
    lengths = np.full(batch, ctx, dtype=np.int64)
    chunk = ctx if engine.batch_prefill_in_one_step and batch > 1 else config.prefill_chunk
    t0 = time.perf_counter()
    last = prefill(engine, cache, prompt, lengths, chunk, evictor)
    engine.synchronize()
    t1 = time.perf_counter()
    steps, read = [], []
    for t in range(config.decode_tokens):
        tokens = last.argmax(-1)
        read.append(cache.bytes_read(new_tokens=1))
        s0 = time.perf_counter()
        last = decode_step(engine, cache, tokens, lengths + t, evictor)
        engine.synchronize()
        steps.append(time.perf_counter() - s0)
    if point is not None:
        point.prefill_chunk = chunk
        point.prefill_s.append(t1 - t0)
        point.step_s += steps
        point.read_bytes += read
        point.kv_bytes = cache.nbytes


def _load_peer(path: Path, source_hash: str, vocab_size: int, threads: int) -> Engine:
    from eigenkv.engines.peer import load_peer
    peer = load_peer(path, threads)
    if peer.source_hash is not None and peer.source_hash != source_hash:
        raise EigenError(f"the peer {path} comes from another source model than the engines; "
                         "build it from the same checkpoint")
    if peer.vocab_size != vocab_size:
        raise EigenError(f"the peer {path} has vocabulary {peer.vocab_size}, the engines {vocab_size}")
    return peer


def bench(engine_dir: Path, baseline_dir: Path, config: BenchConfig,
          peer_dirs: list[Path] | tuple[Path, ...] = ()) -> dict:
    """Time the engines (and peers) of one checkpoint -> the result dict (`write` saves it).

    Engine names in the result: "compressed" (ENGINE), "baseline" (with `config.evict_compare`
    also "compressed+evict" and "baseline+evict"), and each peer's `label`. EigenError (one line) for
    engines of different checkpoints, a peer of another checkpoint or vocabulary, or a context
    beyond an engine's max_seq_len."""
    from eigenkv.engines.config import EngineConfig
    dirs = {"compressed": Path(engine_dir), "baseline": Path(baseline_dir)}
    if len({EngineConfig.load(d).source.hash for d in dirs.values()}) != 1:
        raise EigenError("the two engines come from different source models; compare engines of one checkpoint")
    if config.evict_compare and config.eviction is None:
        raise EigenError("--evict-compare times the engine with and without eviction: pass --evict POLICY too")
    engines = {name: load_engine(d, threads=config.threads) for name, d in dirs.items()}
    for path in peer_dirs:
        peer = _load_peer(Path(path), EngineConfig.load(engine_dir).source.hash,
                          engines["compressed"].vocab_size, config.threads)
        name, n = peer.label, 2
        while name in engines:
            name, n = f"{peer.label} #{n}", n + 1
        dirs[name], engines[name] = Path(path), peer
    from eigenkv.engines.eviction import make_evictor
    evictors = {"compressed": make_evictor(config.eviction, engines["compressed"])}
    if config.evict_compare:
        ours = ("compressed", "baseline")
        evictors = {"compressed+evict": evictors["compressed"],
                    "baseline+evict": make_evictor(config.eviction, engines["baseline"])}
        engines = {**{k: engines[k.split("+")[0]] for k in ("compressed", "compressed+evict", "baseline",
                                                             "baseline+evict")},
                   **{k: v for k, v in engines.items() if k not in ours}}
        dirs = {k: dirs[k.split("+")[0]] if k.split("+")[0] in ours else dirs[k] for k in engines}
    limit = min(e.max_seq_len for e in engines.values())
    if max(config.contexts) + config.decode_tokens + 1 > limit:
        raise EigenError(f"context {max(config.contexts)} + {config.decode_tokens} decode tokens exceeds the "
                         f"engines' max_seq_len {limit}")
    rng = np.random.default_rng(config.seed)
    points = []
    grid = [(c, b) for b in config.batches for c in config.contexts]
    for ctx, batch in tqdm(grid, desc="bench", unit="point", disable=not config.progress):
        prompt = rng.integers(0, engines["compressed"].vocab_size, size=(batch, ctx), dtype=np.int64)
        results = {name: Point(name, ctx, batch) for name in engines}
        for r in range(config.warmup + config.repeats):
            order = list(engines) if r % 2 == 0 else list(reversed(engines))
            for name in order:
                _run_once(engines[name], prompt, config, results[name] if r >= config.warmup else None,
                          evictors.get(name))
        points += [p.summary() for p in results.values()]
    from eigenkv.engines import peer_eigenkv
    weights = {name: EngineConfig.load(d).weights for name, d in dirs.items() if peer_eigenkv.accepts(d)}
    return {"machine": f"{platform.machine()} CPU, {platform.platform()}",
            "engines": {name: str(d) for name, d in dirs.items()},
            "weights": weights,
            "config": asdict(config),
            "points": points,
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def markdown(result: dict) -> str:
    """One row per (context, batch); "compressed+evict" and "baseline+evict" (with `evict_compare`)
    get four columns each (decode p50, speed-up over the baseline without eviction, KV MiB held
    and read per step); each peer four
    more: its decode p50, prefill and KV MiB, and the compressed engine's speed-up over it
    (peer p50 / compressed p50)."""
    rows = {(p["context"], p["batch"], p["engine"]): p for p in result["points"]}
    ours = ("compressed", "compressed+evict", "baseline", "baseline+evict")
    peers = [name for name in result["engines"] if name not in ours]
    evicted = [name for name in ("compressed+evict", "baseline+evict") if name in result["engines"]]
    head = ("| context | batch | decode ms/token p50 (compressed / baseline) | p90 | tokens/s | "
            "speed-up | prefill ms | KV MiB | KV MiB read/step | KV read GB/s |")
    rule = "|---|---|---|---|---|---|---|---|---|---|"
    for name in evicted:
        head += f" {name} decode ms p50 | speed-up vs baseline | {name} KV MiB | {name} KV MiB read/step |"
        rule += "---|---|---|---|"
    for name in peers:
        head += f" {name} decode ms p50 | speed-up vs {name} | {name} prefill ms | {name} KV MiB |"
        rule += "---|---|---|---|"
    lines = [head, rule]
    for ctx, batch, _ in sorted(k for k in rows if k[2] == "compressed"):
        c, b = rows[(ctx, batch, "compressed")], rows[(ctx, batch, "baseline")]
        line = (
            f"| {ctx} | {batch} | {c['decode_ms_p50']:.1f} / {b['decode_ms_p50']:.1f} | "
            f"{c['decode_ms_p90']:.1f} / {b['decode_ms_p90']:.1f} | {c['tokens_per_s']:.1f} / {b['tokens_per_s']:.1f} | "
            f"{b['decode_ms_p50'] / c['decode_ms_p50']:.2f}x | {c['prefill_ms_median']:.0f} / {b['prefill_ms_median']:.0f} | "
            f"{c['kv_bytes'] / 2**20:.1f} / {b['kv_bytes'] / 2**20:.1f} | "
            f"{c['kv_bytes_read_per_step'] / 2**20:.1f} / {b['kv_bytes_read_per_step'] / 2**20:.1f} | "
            f"{c['kv_read_gb_per_s']:.2f} / {b['kv_read_gb_per_s']:.2f} |")
        for name in evicted:
            e = rows[(ctx, batch, name)]
            line += (f" {e['decode_ms_p50']:.1f} | {b['decode_ms_p50'] / e['decode_ms_p50']:.2f}x | "
                     f"{e['kv_bytes'] / 2**20:.1f} | {e['kv_bytes_read_per_step'] / 2**20:.1f} |")
        for name in peers:
            q = rows[(ctx, batch, name)]
            line += (f" {q['decode_ms_p50']:.1f} | {q['decode_ms_p50'] / c['decode_ms_p50']:.2f}x | "
                     f"{q['prefill_ms_median']:.0f} | {q['kv_bytes'] / 2**20:.1f} |")
        lines.append(line)
    return "\n".join(lines)


def write(result: dict, out_dir: Path) -> list[Path]:
    from eigenkv.artifacts import atomic_path, write_json
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "bench.json", result)
    head = f"Command: `{result['command']}` on {result['machine']}.\n\n" if result.get("command") else ""
    with atomic_path(out_dir / "bench.md") as tmp:
        tmp.write_text(head + markdown(result) + "\n")
    written = [out_dir / "bench.json", out_dir / "bench.md"]
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return written
    fig, axes = plt.subplots(1, len(result["config"]["batches"]), figsize=(5 * len(result["config"]["batches"]), 4))
    for ax, batch in zip(np.atleast_1d(axes), result["config"]["batches"]):
        for name in result["engines"]:
            pts = sorted((p["context"], p["decode_ms_p50"]) for p in result["points"]
                         if p["engine"] == name and p["batch"] == batch)
            ax.plot(*zip(*pts), marker="o", label=name)
        ax.set(title=f"batch {batch}", xlabel="context (tokens)", ylabel="decode ms/token (p50)")
        ax.legend()
    fig.tight_layout()
    with atomic_path(out_dir / "bench.png") as tmp:
        fig.savefig(tmp, format="png")
    written.append(out_dir / "bench.png")
    return written
