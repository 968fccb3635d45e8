"""Peer for key-norm eviction: NVIDIA kvpress's KnormPress on the uncompressed model in transformers.

    python tools/kvpress_peer.py                                   # keep 1, .5, .3, .1 at 2k and 4k
    python tools/kvpress_peer.py --keep 1,0.5 --contexts 2048 --depths 0.5 --seeds 0 -o out/kvpress
    python tools/kvpress_peer.py --baseline --contexts 1024,2048,4096 -o out/baseline  # no kvpress

The long-context tasks are `eigenkv.engines.longctx.default_tasks` (same kinds, contexts,
depths and seeds as our engines get), built here, in the project's environment, with the
project's tokenizer: kvpress sees exactly our token ids. Results: OUT.json (every record,
accuracy per task kind × context × keep ratio, versions, machine, command, timings) and
OUT.md (the table). `--baseline` runs the same tasks through plain transformers greedy
generation in the project's environment instead (no eviction, no venv): the reference.

How it runs
1. A separate virtual environment (default .venv-kvpress at the repo root), because kvpress
   0.5.5 needs transformers < 5.3 and the project runs a newer one. torch goes in first,
   pinned to this environment's build (a CPU build stays CPU; on our machines it comes from
   the local wheel directory) and held there by a constraints file, then kvpress and `gguf`
   (transformers reads the default model's GGUF file with it). The project itself is not
   installed there: this same file runs in that venv as a worker (`--worker`) that needs
   only torch, transformers and kvpress, and gets the token ids from the parent.
2. The worker loads the model like eigenkv does (GGUF dequantised to float32,
   AutoModelForCausalLM), with `--attn` attention (sdpa by default, for speed; kvpress's
   KnormPress needs no attention weights), and runs kvpress's own text-generation pipeline
   (`KVPressTextGenerationPipeline.forward`) once per (task, keep ratio) with
   `KnormPress(compression_ratio = 1 - keep)`.

What kvpress does (0.5.5, read from its source)
- Prefill only: the press is a forward hook on every attention layer that fires when the
  pass is the prefill (cache_position ends at the query length). After a layer has
  attended over the full context, the hook scores each cached key by minus its L2 norm and
  keeps the int(S × keep) highest-scoring (lowest-norm) positions *per KV head* (scores
  are [batch, kv_heads, S]: with GQA, each of SmolLM2's 3 KV heads keeps its own set, the
  3 query heads of a group share it; every head keeps the same count, so the cache stays
  dense). The prefill itself is exact; only what comes after it reads the evicted cache.
  Keys are scored after RoPE (as cached), which leaves their norm unchanged.
- The question is not compressed: the pipeline prefills the context under the press, then
  feeds the question tokens (with positions continuing from the *original* context length)
  and decodes greedily, all without the press. Decode never evicts: the cache grows by
  one entry per question/generated token. We pass `prompt_ids[:question_start]` as the
  context and the rest (question, chat-template end, answer prefix) as its question, so
  the template's system prompt and the instructions are compressed, the question is not;
  the worker checks that our question ids equal what the pipeline's own preprocess makes
  of the same question text.
- Greedy decoding stops at the model's eos token or after --max-new-tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tools/_commands.py, however this file is run
from _commands import run_logged  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
KVPRESS_SPEC = "kvpress==0.5.5"
TRANSFORMERS_SPEC = "transformers<5.3"  # kvpress 0.5.5's own bound, stated so pip resolves it first
EXTRA_SPECS = ("gguf>=0.10",)  # transformers reads the GGUF default model with it
VERSIONED = ("kvpress", "transformers", "torch", "accelerate", "gguf", "numpy")
DEFAULT_OUT = REPO / "docs" / "results" / "kvpress_peer_smollm2"


class PeerError(Exception):
    """A one-line failure of this tool (the CLI prints it and exits 2)."""


# ---- parent side: the project's environment -------------------------------------------------

def _run(cmd: list[str], env: dict | None = None, log: Path | None = None) -> str:
    """Run cmd; return its output. A failure is one line (PeerError)."""
    return run_logged(cmd, env, log, PeerError)


def _clean_env() -> dict:
    """This environment minus the project venv; offline for the Hugging Face hub."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1",
               HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return env


def _versions(python: Path, packages) -> dict:
    code = ("import importlib.metadata as m, json\nout = {}\nfor p in %r:\n    try: out[p] = m.version(p)\n"
            "    except m.PackageNotFoundError: out[p] = None\nprint(json.dumps(out))") % (list(packages),)
    return json.loads(_run([str(python), "-c", code], env=_clean_env()).strip().splitlines()[-1])


def default_torch_spec() -> str:
    """torch==<this environment's torch> (read from metadata; torch is not imported)."""
    from importlib.metadata import PackageNotFoundError, version
    try:
        return f"torch=={version('torch')}"
    except PackageNotFoundError:
        return "torch"


def ensure_venv(venv: Path, torch_spec: str, torch_index: str | None) -> dict:
    """Create/complete the kvpress venv (torch first, then kvpress); returns its package versions."""
    python = venv / "bin" / "python"
    marker = venv / "eigenkv-kvpress.json"
    specs = {"torch": torch_spec, "kvpress": KVPRESS_SPEC, "transformers": TRANSFORMERS_SPEC,
             "extra": list(EXTRA_SPECS)}
    try:
        ready = json.loads(marker.read_text()).get("specs") == specs and python.exists()
    except (OSError, ValueError, AttributeError):
        ready = False
    if not ready:
        if not python.exists():
            print(f"creating {venv}", flush=True)
            _run([sys.executable, "-m", "venv", str(venv)])
        pip = [str(python), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
        print(f"installing {torch_spec} into {venv}", flush=True)
        _run(pip + ([torch_spec] if torch_index is None else ["--index-url", torch_index, torch_spec]),
             env=_clean_env())
        torch_version = _versions(python, ("torch",))["torch"]
        constraints = venv / "constraints.txt"
        constraints.write_text(f"torch=={torch_version}\n")  # later installs must keep this torch
        print(f"installing {KVPRESS_SPEC}, {TRANSFORMERS_SPEC}, {', '.join(EXTRA_SPECS)}", flush=True)
        _run(pip + ["-c", str(constraints), KVPRESS_SPEC, TRANSFORMERS_SPEC, *EXTRA_SPECS], env=_clean_env(),
             log=venv / "install.log")
        marker.write_text(json.dumps({"specs": specs}) + "\n")
    versions = _versions(python, VERSIONED)
    cuda = _run([str(python), "-c", "import torch; print(torch.version.cuda)"], env=_clean_env()).strip()
    if cuda.splitlines()[-1] != "None":
        raise PeerError(f"{venv} has a CUDA torch ({versions['torch']}, CUDA {cuda}); delete {venv} and pass "
                        f"--torch-spec/--torch-index for a CPU build")
    return versions


def parse_floats(text: str, name: str, lo: float, hi: float) -> list[float]:
    """'1,0.5' -> [1.0, 0.5], each in [lo, hi]; one-line error otherwise."""
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise PeerError(f"{name} {text!r}: expected comma-separated numbers") from None
    if not values or any(not lo <= v <= hi for v in values):
        raise PeerError(f"{name} {text!r}: each value must lie in [{lo}, {hi}]")
    return values


def parse_ints(text: str, name: str, lo: int) -> list[int]:
    """'2048,4096' -> [2048, 4096], each >= lo; one-line error otherwise."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise PeerError(f"{name} {text!r}: expected comma-separated integers") from None
    if not values or any(v < lo for v in values):
        raise PeerError(f"{name} {text!r}: each value must be >= {lo}")
    return values


def machine() -> str:
    """'<cores>-core <arch> CPU (<model name>)', e.g. '2-core x86_64 CPU (...)'."""
    name = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()}-core {platform.machine()} CPU" + (f" ({name})" if name else "")


def table(summary: list[dict], keeps: list[float]) -> str:
    """Markdown: one row per (task, context), one column per keep ratio, accuracy as n/N (%)."""
    head = "| task | context | " + " | ".join(f"keep {k:g}" for k in keeps) + " |"
    rows = [head, "|" + "---|" * (2 + len(keeps))]
    cells: dict[tuple, dict] = {}
    for s in summary:
        cells.setdefault((s["kind"], s["context"]), {})[s["keep"]] = s
    for (kind, ctx), by_keep in cells.items():
        row = [kind, f"{ctx}"]
        for k in keeps:
            s = by_keep.get(k)
            row.append("-" if s is None else f"{s['correct']}/{s['n']} ({100 * s['accuracy']:.0f}%)")
        rows.append("| " + " | ".join(row) + " |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[2:]))
    p.add_argument("--keep", default="1,0.5,0.3,0.1", help="keep ratios (kvpress compression_ratio = 1 - keep)")
    p.add_argument("--contexts", default="2048,4096", help="prompt lengths in tokens (default %(default)s)")
    p.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="fact depths in [0, 1] (default %(default)s)")
    p.add_argument("--seeds", default="0,1", help="task seeds (default %(default)s)")
    p.add_argument("--kinds", default="passkey,needle", help="task kinds (default %(default)s)")
    p.add_argument("--plain", action="store_true", help="plain-text prompts instead of the chat template")
    p.add_argument("--max-new-tokens", type=int, default=16, help="greedy tokens per answer (default %(default)s)")
    p.add_argument("--attn", default="sdpa", choices=("sdpa", "eager"), help="attention implementation")
    p.add_argument("--threads", type=int, default=2, help="torch threads in the worker (default %(default)s)")
    p.add_argument("-o", "--output", type=Path, default=DEFAULT_OUT,
                   help="writes OUTPUT.json and OUTPUT.md (default %(default)s)")
    p.add_argument("--model", metavar="PATH", help="HF directory or .gguf (default: the embedded SmolLM2)")
    p.add_argument("--venv", type=Path, default=REPO / ".venv-kvpress", help="kvpress environment (default %(default)s)")
    p.add_argument("--torch-spec", default=default_torch_spec(),
                   help="torch for the venv, installed first (default: this env's build, %(default)s)")
    p.add_argument("--torch-index", metavar="URL", help="pip index for torch, e.g. the PyTorch CPU wheel index")
    p.add_argument("--baseline", action="store_true",
                   help="instead: plain transformers greedy in this environment, no eviction (no kvpress needed)")
    p.add_argument("--worker", type=Path, metavar="JOB", help=argparse.SUPPRESS)  # internal: run inside the venv
    args = p.parse_args(argv)
    try:
        if args.worker is not None:
            worker(args.worker)
        else:
            run(args, sys.argv[1:] if argv is None else argv)
    except PeerError as e:
        print(f"kvpress_peer: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # EigenError from the project, without importing it at module level
        if type(e).__name__ != "EigenError":
            raise
        print(f"kvpress_peer: error: {e}", file=sys.stderr)
        return 2
    return 0


def _setup(args):
    """Parse the task grid, resolve the model, build the tasks: (source, tokenizer, tasks, grid dict)."""
    grid = {"keeps": parse_floats(args.keep, "--keep", 1e-6, 1.0),
            "contexts": parse_ints(args.contexts, "--contexts", 1),
            "depths": parse_floats(args.depths, "--depths", 0.0, 1.0),
            "seeds": parse_ints(args.seeds, "--seeds", 0),
            "kinds": [k.strip() for k in args.kinds.split(",") if k.strip()],
            "prompt_format": "plain" if args.plain else "chat template"}
    if args.max_new_tokens < 1 or args.threads < 1:
        raise PeerError("--max-new-tokens and --threads must be >= 1")
    from transformers import AutoTokenizer

    from eigenkv.engines import longctx
    from eigenkv.exporter.sources import load_config, resolve_model
    source = resolve_model(args.model)
    limit = getattr(load_config(source), "max_position_embeddings", None)
    if limit is not None and max(grid["contexts"]) + args.max_new_tokens > limit:
        raise PeerError(f"--contexts {max(grid['contexts'])} + {args.max_new_tokens} new tokens exceed the model's "
                        f"max_position_embeddings {limit}")
    tokenizer = AutoTokenizer.from_pretrained(source.directory, gguf_file=source.gguf_file)
    tasks = longctx.default_tasks(tokenizer, grid["contexts"], grid["depths"], grid["seeds"], kinds=grid["kinds"],
                                  chat=False if args.plain else None)
    return source, tokenizer, tasks, grid


def run(args, argv: list[str]) -> None:
    """Parent: build tasks, make sure the venv exists, run the worker, score, write JSON + markdown."""
    if args.baseline:
        return run_baseline(args, argv)
    from eigenkv.engines import longctx
    source, tokenizer, tasks, grid = _setup(args)
    keeps = grid["keeps"]
    versions = ensure_venv(args.venv.resolve(), args.torch_spec, args.torch_index)
    job = {"model_dir": str(source.directory), "gguf_file": source.gguf_file, "attn": args.attn,
           "threads": args.threads, "keeps": keeps, "max_new_tokens": args.max_new_tokens,
           "tasks": [{"context_ids": t.context_ids, "question_ids": t.question_ids,
                      "question_text": "\n\n" + t.question, "answer_prefix": t.answer_prefix} for t in tasks]}
    print(f"{len(tasks)} tasks x {len(keeps)} keep ratios with kvpress {versions['kvpress']} "
          f"(transformers {versions['transformers']}, torch {versions['torch']})", flush=True)
    with tempfile.TemporaryDirectory(prefix="kvpress-peer-") as tmp:
        job_path, result_path = Path(tmp) / "job.json", Path(tmp) / "job.result.jsonl"
        job_path.write_text(json.dumps(job))
        t0 = time.perf_counter()
        cmd = [str(args.venv.resolve() / "bin" / "python"), str(Path(__file__).resolve()), "--worker", str(job_path)]
        code = subprocess.call(cmd, env=_clean_env())  # streams its progress lines
        seconds = time.perf_counter() - t0
        lines = result_path.read_text().splitlines() if result_path.exists() else []
        results = [json.loads(ln) for ln in lines]
        errors = [r for r in results if "error" in r]
        if code != 0 or errors or len(results) != len(tasks) * len(keeps) + 1:
            why = errors[0]["error"] if errors else f"exit {code}, {len(results)} result lines"
            raise PeerError(f"the kvpress worker failed: {why}")
    meta, results = results[0], results[1:]
    records = []
    for r in results:
        task = tasks[r["task"]]
        rec = longctx.record(task, r["answer"], r["new_tokens"], r["seconds"])
        rec.update(keep=r["keep"], compression_ratio=r["compression_ratio"], kv_tokens_after_prefill=r["kv_tokens"],
                   context_tokens_compressed=len(task.context_ids), question_tokens=len(task.question_ids))
        records.append(rec)
    info = {"kind": "kvpress KnormPress peer (transformers, uncompressed model, eviction at prefill)",
            "press": "KnormPress(compression_ratio=1-keep)", "pipeline": "kv-press-text-generation (forward)",
            "kvpress_env": versions, "worker": meta}
    about = (f"Model {Path(source.label).name} (float32, {args.attn} attention, transformers "
             f"{versions['transformers']}, kvpress {versions['kvpress']}, torch {versions['torch']}). "
             f"Keep ratio R = kvpress `compression_ratio` 1 − R, applied to the context at prefill (per KV head, "
             f"lowest key norms kept); the question, the chat template's end and the answer prefix "
             f"({meta['question_tokens_min']}–{meta['question_tokens_max']} tokens) are never evicted, and "
             f"nothing is evicted during decode. Our question ids equal what kvpress's own preprocess makes of "
             f"the question text for {meta['question_ids_match_pipeline_preprocess']} tasks.")
    write_results(args, argv, source, grid, records, seconds, info,
                  "kvpress KnormPress peer: long-context retrieval accuracy", about)


def run_baseline(args, argv: list[str]) -> None:
    """--baseline: plain transformers greedy in this (the project's) environment, no eviction, no kvpress."""
    import torch
    import transformers

    from eigenkv.engines import longctx
    from eigenkv.exporter.sources import load_model
    source, tokenizer, tasks, grid = _setup(args)
    grid["keeps"] = [1.0]
    torch.set_num_threads(args.threads)
    model, _ = load_model(source, torch.float32, progress=False)
    model.set_attn_implementation(args.attn)
    eos = tokenizer.eos_token_id

    @torch.no_grad()
    def generate(prompt_ids: list[int], max_new_tokens: int) -> list[int]:
        ids = torch.tensor([prompt_ids])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=eos)
        return out[0, len(prompt_ids):].tolist()

    print(f"{len(tasks)} tasks, plain transformers {transformers.__version__} greedy (no eviction)", flush=True)
    t0 = time.perf_counter()
    records = []
    for i, task in enumerate(tasks):
        rec = longctx.run_tasks(generate, tokenizer, [task], args.max_new_tokens)[0]
        records.append(dict(rec, keep=1.0))
        print(f"[{i + 1}/{len(tasks)}] {task.kind} {task.context_tokens} depth {task.depth:g}: "
              f"{rec['generated'].strip()[:40]!r} {'ok' if rec['correct'] else 'WRONG'} ({rec['seconds']:.1f} s)",
              flush=True)
    seconds = time.perf_counter() - t0
    info = {"kind": "uncompressed baseline: plain transformers greedy generation (model.generate), no eviction",
            "project_env": {"transformers": transformers.__version__, "torch": torch.__version__}}
    about = (f"Model {Path(source.label).name} (float32, {args.attn} attention, transformers "
             f"{transformers.__version__}, torch {torch.__version__}), whole prompt in one prefill, no eviction.")
    write_results(args, argv, source, grid, records, seconds, info,
                  "Uncompressed baseline (transformers): long-context retrieval accuracy", about)


def write_results(args, argv, source, grid, records, seconds, info, title, about) -> None:
    """OUT.json (info + summary + records, command, machine) and OUT.md (title, command, about, table)."""
    from eigenkv.engines import longctx
    from eigenkv.exporter.sources import model_hash
    keeps = grid["keeps"]
    summary = []
    for keep in keeps:
        for (kind, ctx), acc in longctx.summarize([r for r in records if r["keep"] == keep]).items():
            n = sum(1 for r in records if r["keep"] == keep and r["kind"] == kind and r["context"] == ctx)
            summary.append({"kind": kind, "context": ctx, "keep": keep, "accuracy": acc, "n": n,
                            "correct": round(acc * n)})
    summary.sort(key=lambda s: (s["kind"] != "passkey", s["context"], -s["keep"]))
    command = "python tools/kvpress_peer.py " + " ".join(argv)
    info = {"kind": info.pop("kind"), "command": command, "machine": machine(),
            "source_model": source.label, "source_hash": model_hash(source),
            "attn_implementation": args.attn, "threads": args.threads, "max_new_tokens": args.max_new_tokens,
            **grid, **info, "seconds_total": round(seconds, 1), "summary": summary, "records": records}
    out = args.output.resolve()
    if out.suffix in (".json", ".md"):
        out = out.with_suffix("")
    json_path, md_path = out.parent / f"{out.name}.json", out.parent / f"{out.name}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(info, indent=1) + "\n")
    md = (f"# {title}\n\n`{command}`, {info['machine']}, {seconds / 60:.1f} min.\n\n"
          f"Tasks: `eigenkv.engines.longctx.default_tasks` ({', '.join(grid['kinds'])}; depths "
          f"{', '.join(f'{d:g}' for d in grid['depths'])}; seeds {', '.join(map(str, grid['seeds']))}; "
          f"{grid['prompt_format']}), greedy, {args.max_new_tokens} new tokens at most. {about}\n\n"
          + table(summary, keeps) + "\n")
    md_path.write_text(md)
    print(table(summary, keeps))
    print(f"wrote {json_path} and {md_path} ({seconds:.0f} s)")


# ---- worker side: inside the kvpress venv (torch, transformers, kvpress only) ---------------

def worker(job_path: Path) -> None:
    """Run every (task, keep) of the job through kvpress's pipeline; one JSON line per result."""
    job = json.loads(job_path.read_text())
    result_path = job_path.with_suffix(".result.jsonl")
    with open(result_path, "w") as out:
        try:
            _work(job, out)
        except Exception as e:  # reported to the parent as one line
            first = (str(e).strip().splitlines() or [""])[0]
            out.write(json.dumps({"error": f"{type(e).__name__}: {first}"[:400]}) + "\n")
            raise PeerError(f"{type(e).__name__}: {first}"[:400]) from None


def _work(job: dict, out) -> None:
    try:
        import kvpress
        import torch
        import transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache, pipeline
    except ImportError as e:
        raise PeerError(f"the worker needs kvpress, torch and transformers ({e}); run it through "
                        f"tools/kvpress_peer.py, which builds the venv") from None
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.set_num_threads(job["threads"])
    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(job["model_dir"], gguf_file=job["gguf_file"])
    model = AutoModelForCausalLM.from_pretrained(job["model_dir"], gguf_file=job["gguf_file"], dtype=torch.float32,
                                                 attn_implementation=job["attn"]).eval()
    pipe = pipeline("kv-press-text-generation", model=model, tokenizer=tokenizer, device="cpu")
    load_s = time.perf_counter() - t0
    tasks = job["tasks"]
    # Our question part must be what the pipeline itself makes of (question, answer_prefix).
    same = [pipe.preprocess(context="x", questions=[t["question_text"]], answer_prefix=t["answer_prefix"],
                            max_context_length=10 ** 9)["questions_ids"][0][0].tolist() == t["question_ids"]
            for t in tasks]
    q_lens = [len(t["question_ids"]) for t in tasks]
    from importlib.metadata import version
    out.write(json.dumps({"kvpress": version("kvpress"),
                          "transformers": transformers.__version__, "torch": torch.__version__,
                          "model_class": type(model).__name__, "load_seconds": round(load_s, 1),
                          "question_ids_match_pipeline_preprocess": f"{sum(same)}/{len(same)}",
                          "question_tokens_min": min(q_lens), "question_tokens_max": max(q_lens)}) + "\n")
    out.flush()
    total = len(tasks) * len(job["keeps"])
    done = 0
    for i, t in enumerate(tasks):
        context = torch.tensor([t["context_ids"]])
        question = torch.tensor([t["question_ids"]])
        for keep in job["keeps"]:
            ratio = round(1.0 - keep, 6)
            press = kvpress.KnormPress(compression_ratio=ratio)
            cache = DynamicCache()
            t1 = time.perf_counter()
            answers = pipe.forward({"context_ids": context, "questions_ids": [question]}, press=press,
                                   max_new_tokens=job["max_new_tokens"], cache=cache)
            seconds = time.perf_counter() - t1
            answer = answers[0] if isinstance(answers, list) else answers
            kv_tokens = [cache.get_seq_length(layer) for layer in range(len(cache))]
            new_tokens = len(tokenizer.encode(answer, add_special_tokens=False))
            out.write(json.dumps({"task": i, "keep": keep, "compression_ratio": ratio, "answer": answer,
                                  "new_tokens": new_tokens, "seconds": round(seconds, 3),
                                  "kv_tokens": min(kv_tokens) if len(set(kv_tokens)) == 1 else kv_tokens}) + "\n")
            out.flush()
            done += 1
            print(f"[{done}/{total}] {len(t['context_ids']) + len(t['question_ids'])} tokens, keep {keep:g}: "
                  f"{answer.strip()[:40]!r} ({seconds:.1f} s)", flush=True)


if __name__ == "__main__":
    sys.exit(main())
