"""Research probe: perplexity when the first n tokens' keys and values stay full width
(attention sinks), everything else as the folded `loss-aware` model at kv-ratio 0.5/0.75.

Not part of the package: it swaps the folded attention modules' `forward` on these
instances for an eager version that mixes full-width sink slots with rank-r slots, to
decide whether sink slots are worth a new op version. n = 0 must reproduce the folded
model (a built-in check: the run fails if it does not). Needs a stats file from a
calibration run (see --stats) or calibrates first.

    python tools/sink_probe.py --stats STATS.pt   # or without --stats: calibrate first

Prints one line per (ratio, sinks); with --out also writes OUT.json and OUT.md.
"""
import argparse
import json
import platform
import sys
import types
from pathlib import Path

import torch

from eigenkv.exporter import ranks as R
from eigenkv.exporter import sensitivity
from eigenkv.exporter.decoder import decoder_from_hf
from eigenkv.exporter.fold import fold
from eigenkv.exporter.methods import get_method, method_factors
from eigenkv.exporter.perplexity import perplexity
from eigenkv.exporter.pipeline import CompressConfig, DEFAULT_CALIB_SEQ_LEN, calibration_shape
from eigenkv.exporter.sources import load_model, resolve_model
from eigenkv.exporter.texts import split_texts
from eigenkv.malloc import malloc_mode, tune_malloc
from eigenkv.plugins.reference import apply_rope

N0_TOLERANCE = 1e-4  # relative perplexity difference allowed between n = 0 and the folded model


def sink_forward(self, x, positions, rope=None, cache=None, layer=0):
    o = self.orig
    b, s, _ = x.shape
    n = self.n_sink
    q = apply_rope(self._heads(o.q_proj(x), self.n_heads), positions[:, None, :], rope.cos, rope.sin)
    k_r = self._heads(self.k_proj(x), self.n_kv_heads)                      # [B,Hkv,S,r]
    k_hat = torch.einsum("bhsr,hrd->bhsd", k_r, self.key_up.expand(self.n_kv_heads, -1, -1))
    k_full = self._heads(o.k_proj(x), self.n_kv_heads)
    k = torch.cat([k_full[:, :, :n], k_hat[:, :, n:]], 2)
    k = apply_rope(k, positions[:, None, :], rope.cos, rope.sin)
    g = self.n_heads // self.n_kv_heads
    k = k.repeat_interleave(g, 1)
    scores = (q @ k.transpose(-1, -2)) * self.scale
    mask = torch.ones(s, s, dtype=torch.bool).triu(1)
    p = scores.masked_fill(mask, float("-inf")).softmax(-1)
    v_r = self._heads(self.v_proj(x), self.n_kv_heads).repeat_interleave(g, 1)
    v_full = self._heads(o.v_proj(x), self.n_kv_heads).repeat_interleave(g, 1)
    out_r = p[..., n:] @ v_r[:, :, n:]
    out_f = p[..., :n] @ v_full[:, :, :n]
    y = self.o_proj(out_r.transpose(1, 2).reshape(b, s, -1))
    return y + torch.nn.functional.linear(out_f.transpose(1, 2).reshape(b, s, -1), o.o_proj.weight)


def _ints(text):
    return [int(v) for v in text.split(",")]


def _floats(text):
    return [float(v) for v in text.split(",")]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stats", metavar="FILE", help="torch.save'd list of LayerStats (default: calibrate first)")
    ap.add_argument("--model", default=None, help="HF directory or .gguf (default: the embedded SmolLM2)")
    ap.add_argument("--calib-text", default="wiki", metavar="FILE|NAME", help="calibration text (default wiki)")
    ap.add_argument("--calib-samples", type=int, default=None,
                    help="default: 32768 tokens' worth of --calib-seq-len (as `eigenkv compress`)")
    ap.add_argument("--calib-seq-len", type=int, default=DEFAULT_CALIB_SEQ_LEN)
    ap.add_argument("--eval-texts", default="wiki,c4", help="comma-separated built-in names or files (default wiki,c4)")
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--eval-window", type=int, default=1024)
    ap.add_argument("--ratios", type=_floats, default=[0.5, 0.75], metavar="R,R", help="KV ratios (default 0.5,0.75)")
    ap.add_argument("--sinks", type=_ints, default=[0, 1, 4], metavar="N,N",
                    help="full-width sink slots (default 0,1,4)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument("--out", metavar="PATH", help="also write PATH.json and PATH.md")
    args = ap.parse_args()
    args.calib_samples = calibration_shape(args.calib_seq_len, args.calib_samples, args.calib_seq_len)[1]
    tune_malloc()  # as the eigenkv commands do (eigenkv/malloc.py); recorded with the machine
    torch.set_num_threads(args.threads)
    window = args.eval_window
    src = resolve_model(args.model)
    model, tok = load_model(src, progress=False)
    dec = decoder_from_hf(model)
    if dec.family.positions != "rope":
        print("sink_probe: error: the probe rotates keys (RoPE models only)", file=sys.stderr)
        return 2
    cfg = CompressConfig(model=args.model, calib_text=args.calib_text, calib_samples=args.calib_samples,
                         calib_seq_len=args.calib_seq_len, eval_texts=tuple(args.eval_texts.split(",")),
                         eval_tokens=args.eval_tokens, eval_window=window)
    tx = split_texts(cfg, tok)
    if args.stats:
        stats = torch.load(args.stats, weights_only=False)
        if stats[0].key_fisher is None:  # saved without the Fisher pass the default method reads
            from eigenkv.exporter.calibrate import fisher_grams
            fisher_grams(dec, tx.samples, stats, progress=False)
    else:
        from eigenkv.exporter.calibrate import calibrate
        stats = calibrate(dec, tx.samples, progress=False, fisher=True)
    base = {n: perplexity(dec, t, window, progress=False).value for n, t in tx.evals.items()}
    f = method_factors(get_method("loss-aware"), dec, stats, "pre", args.calib_seq_len)
    sens = sensitivity.measure(dec, f, tx.samples[:4, :256], "pre", progress=False)
    rows = []
    for ratio in args.ratios:
        kr, vr = R.allocate(*sens.predicted(f), ratio)
        folded = fold(dec, f, kr, vr, "pre")
        plain = {n: perplexity(folded, t, window, progress=False).value for n, t in tx.evals.items()}
        for n_sink in args.sinks:
            for layer, orig in zip(folded.layers, dec.layers):
                layer.attn.orig, layer.attn.n_sink = orig.attn, n_sink
                layer.attn.forward = types.MethodType(sink_forward, layer.attn)
            ppl = {n: perplexity(folded, t, window, progress=False).value for n, t in tx.evals.items()}
            if n_sink == 0 and any(abs(ppl[n] / plain[n] - 1) > N0_TOLERANCE for n in ppl):
                print(f"sink_probe: error: with 0 sink slots the probe gives {ppl}, the folded model {plain}: "
                      f"the eager forward does not reproduce the op", file=sys.stderr)
                return 1
            rows.append({"kv_ratio": ratio, "sinks": n_sink, "key_ranks": kr, "value_ranks": vr,
                         **{f"ppl_{n}": round(ppl[n], 4) for n in ppl},
                         **{f"increase_{n}_pct": round(100 * (ppl[n] / base[n] - 1), 2) for n in ppl}})
            print(f"ratio {ratio} sinks {n_sink}: " + " ".join(f"{n} {100*(ppl[n]/base[n]-1):+.1f}%" for n in base),
                  flush=True)
    if args.out:
        names = list(base)
        lines = ["| KV ratio | full-width sink slots | " + " | ".join(f"{n} (rise)" for n in names) + " |",
                 "|" + "---|" * (2 + len(names))]
        lines += [f"| {r['kv_ratio']} | {r['sinks']} | " + " | ".join(
            f"{r[f'ppl_{n}']:.2f} ({r[f'increase_{n}_pct']:+.1f}%)" for n in names) + " |" for r in rows]
        table = "\n".join(lines)
        tokens = {n: (t.numel() // window) * (window - 1) for n, t in tx.evals.items()}
        meta = {"command": "python " + " ".join(sys.argv),
                "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} torch threads, malloc {malloc_mode()}",
                "model": src.label, "method": "loss-aware", "rope_mode": "pre",
                "original_ppl": {n: round(v, 4) for n, v in base.items()},
                "evaluation": {"tokens_scored": tokens, "window": window}, "rows": rows}
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
        out.with_suffix(".md").write_text(f"Command: `{meta['command']}` on {meta['machine']}. Perplexity: {tokens} "
                                          f"tokens scored, windows of {window}.\n\n{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
