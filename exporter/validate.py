"""Check an exported graph against the folded torch model it came from, through the ORT `Engine`.

The graph runs exactly as `eigenkv run` runs it (engines/ort.py: IOBinding over in-place KV
buffers and slot positions): prefill logits on fresh random prompts (batch 2), then greedy
decoding token by token against the torch model's preallocated cache.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from eigenkv.exporter.decoder import EigenDecoder
from eigenkv.manifest import IONames, KVLayout

FLOAT64_MAX_PARAMS = 2e9  # a float64 copy of larger models does not fit a workstation


def _float64_logits(decoder: EigenDecoder, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor | None:
    """The folded model in float64 (the reference for float32 round-off), when it fits."""
    if sum(p.numel() for p in decoder.parameters()) > FLOAT64_MAX_PARAMS:
        return None
    return copy.deepcopy(decoder).double()(ids, positions)


def _prompt(batch: int, seq: int, vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _finite(t: torch.Tensor) -> bool:
    return bool(torch.isfinite(t).all())


@torch.no_grad()
def validate(path: Path, decoder: EigenDecoder, layout: KVLayout, precision: str, steps: int, prompt_len: int,
             progress: bool = True) -> dict:
    """-> figures for the manifest: prefill max |logit diff| (vs torch fp32 and float64), the largest
    torch logit, decode agreement, and where logits first turned non-finite (`non_finite`: graph,
    `torch_non_finite`: the torch model; None when finite). `export._require_parity` judges them."""
    from eigenkv.engines.ort import OrtEngine
    from eigenkv.engines.runtime import NonFiniteLogits, decode_step
    engine = OrtEngine(path, layout, IONames(), precision, remedy="the export produced an unloadable graph")
    prompt_len = min(prompt_len, layout.max_seq_len - steps - 1)
    if prompt_len < 1:
        steps, prompt_len = max(0, layout.max_seq_len - 2), 1
    ids = _prompt(2, prompt_len, decoder.lm_head.out_features)
    positions = torch.arange(prompt_len).expand(2, -1)
    ref = decoder(ids, positions).float()
    cache = engine.new_cache(2, prompt_len + steps)
    logits = torch.from_numpy(engine.step(cache, ids.numpy(), positions.numpy())).double()
    non_finite = None if _finite(logits) else "prefill"
    torch_non_finite = None if _finite(ref) else "prefill"
    prefill_diff = float((logits - ref).abs().max())
    ref64 = _float64_logits(decoder, ids, positions)
    vs64 = None if ref64 is None else float((logits - ref64).abs().max())
    torch_vs64 = None if ref64 is None else float((ref.double() - ref64).abs().max())
    figures = {"prompt_tokens": prompt_len, "prefill_max_abs_logit_diff": prefill_diff,
               "prefill_max_abs_logit_diff_vs_float64": vs64,
               "torch_float32_max_abs_logit_diff_vs_float64": torch_vs64,
               "reference_max_abs_logit": float(ref.abs().max()),
               "non_finite": non_finite, "torch_non_finite": torch_non_finite,
               "reference": "folded torch model, float32",
               "runtime": "onnxruntime CPUExecutionProvider (eigenkv ort engine)"}
    if non_finite or torch_non_finite:
        return {**figures, "decode_steps": steps, "decode_tokens_equal": False, "decode_first_mismatch": 0,
                "decode_max_abs_logit_diff": None}

    # greedy, batch 1, through both caches
    tcache = decoder.new_cache(1, prompt_len + steps)
    ocache = engine.new_cache(1, prompt_len + steps)
    t_logits = decoder(ids[:1], positions[:1], tcache)[:, -1]
    o_logits = torch.from_numpy(engine.step(ocache, ids[:1].numpy(), positions[:1].numpy())[:, -1]).float()
    ocache.advance(np.array([prompt_len]))
    t_tokens, o_tokens, decode_diff = [], [], 0.0
    for t in tqdm(range(steps), desc="validate decode", unit="tok", disable=not progress):
        if not _finite(t_logits):
            figures["torch_non_finite"] = f"decode step {t}"
            break
        if not _finite(o_logits):
            figures["non_finite"] = f"decode step {t}"
            break
        if t_tokens == o_tokens:  # compare logits while both sides have seen the same tokens
            decode_diff = max(decode_diff, float((o_logits - t_logits.float()).abs().max()))
        t_next, o_next = int(t_logits.argmax()), int(o_logits.argmax())
        t_tokens.append(t_next)
        o_tokens.append(o_next)
        pos = prompt_len + t
        t_logits = decoder(torch.tensor([[t_next]]), torch.tensor([[pos]]), tcache)[:, -1]
        try:
            o_logits = torch.from_numpy(decode_step(engine, ocache, np.array([o_next]), np.array([pos]))).float()
        except NonFiniteLogits:
            figures["non_finite"] = f"decode step {t + 1}"
            break
    complete = len(o_tokens) == steps and t_tokens == o_tokens
    same = next((i for i, (a, b) in enumerate(zip(t_tokens, o_tokens)) if a != b), len(t_tokens))
    return {**figures, "decode_steps": steps, "decode_tokens_equal": complete,
            "decode_first_mismatch": None if complete else same, "decode_max_abs_logit_diff": decode_diff}
