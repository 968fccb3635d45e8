"""Research probe: perplexity when the first n tokens' keys and values stay full width
(attention sinks), everything else as the folded `loss-aware` model at kv-ratio 0.5/0.75.

Not part of the package: it swaps the folded attention modules' `forward` on these
instances for an eager version that mixes full-width sink slots with rank-r slots, to
decide whether sink slots are worth a new op version. n = 0 must reproduce the folded
model (a built-in check). Needs a stats file from a calibration run (see --stats).

    python tools/sink_probe.py --stats STATS.pt   # or without --stats: calibrate first
"""
import argparse
import types

import torch
torch.set_num_threads(2)
from eigenkv.exporter.pipeline import CompressConfig
from eigenkv.exporter.texts import split_texts
from eigenkv.exporter.sources import resolve_model, load_model
from eigenkv.exporter.decoder import decoder_from_hf
from eigenkv.exporter.methods import get_method, method_factors
from eigenkv.exporter import sensitivity, ranks as R
from eigenkv.exporter.fold import fold
from eigenkv.exporter.perplexity import perplexity
from eigenkv.plugins.reference import apply_rope

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

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--stats", metavar="FILE", help="torch.save'd list of LayerStats (default: calibrate first)")
args = ap.parse_args()
src = resolve_model(None); model, tok = load_model(src, progress=False); dec = decoder_from_hf(model)
cfg = CompressConfig(eval_texts=("wiki", "c4"), eval_tokens=8192)
tx = split_texts(cfg, tok)
if args.stats:
    stats = torch.load(args.stats, weights_only=False)
else:
    from eigenkv.exporter.calibrate import calibrate
    stats = calibrate(dec, tx.samples)
base = {n: perplexity(dec, t, 1024, progress=False).value for n, t in tx.evals.items()}
f = method_factors(get_method("loss-aware"), dec, stats, "pre", 1024)
sens = sensitivity.measure(dec, f, tx.samples[:4, :256], "pre", progress=False)
for ratio in (0.5, 0.75):
    kr, vr = R.allocate(*sens.predicted(f), ratio)
    folded = fold(dec, f, kr, vr, "pre")
    for n_sink in (0, 1, 4):
        for layer, orig in zip(folded.layers, dec.layers):
            layer.attn.orig, layer.attn.n_sink = orig.attn, n_sink
            layer.attn.forward = types.MethodType(sink_forward, layer.attn)
        ppl = {n: perplexity(folded, t, 1024, progress=False).value for n, t in tx.evals.items()}
        print(f"ratio {ratio} sinks {n_sink}: " + " ".join(f"{n} {100*(ppl[n]/base[n]-1):+.1f}%" for n in base), flush=True)
