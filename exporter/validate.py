"""Check an exported graph against the folded torch model it came from (ONNX Runtime, CPU).

Prefill logits on fresh random prompts (batch 2), then greedy decoding through the
graph's own KV buffers, token by token, against the torch model's preallocated cache.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from eigenkv.exporter.decoder import EigenDecoder
from eigenkv.exporter.onnx_graph import IONames

_NP = {torch.float32: np.float32, torch.float16: np.float16}


class OrtGraph:
    """A minimal driver of the exported graph with numpy buffers (the runtime is `eigenkv.engines`)."""

    def __init__(self, path: Path, decoder: EigenDecoder, dtype: torch.dtype):
        import onnxruntime as ort
        options = ort.SessionOptions()
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.names, self.n_layers = IONames(), decoder.dims.n_layers
        self.shapes = [(decoder.dims.n_kv_heads, r) for pair in zip(decoder.key_ranks, decoder.value_ranks)
                       for r in pair]
        self.dtype = _NP[dtype]

    def new_cache(self, batch: int, max_len: int) -> list[np.ndarray]:
        return [np.zeros((batch, h, max_len, r), dtype=self.dtype) for h, r in self.shapes]

    def step(self, ids: np.ndarray, positions: np.ndarray, lengths: np.ndarray, cache: list[np.ndarray]):
        """ids/positions [B, S] int64, lengths [B] int64 -> (logits [B, S, V], new cache)."""
        feeds = dict(zip(self.names.inputs(self.n_layers), [ids, positions, lengths, *cache]))
        logits, *present = self.session.run(None, feeds)
        return logits, present


FLOAT64_MAX_PARAMS = 2e9  # a float64 copy of larger models does not fit a workstation


def _float64_logits(decoder: EigenDecoder, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor | None:
    """The folded model in float64 (the reference for float32 round-off), when it fits."""
    import copy
    if sum(p.numel() for p in decoder.parameters()) > FLOAT64_MAX_PARAMS:
        return None
    return copy.deepcopy(decoder).double()(ids, positions)


def _prompt(batch: int, seq: int, vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def validate(path: Path, decoder: EigenDecoder, steps: int, prompt_len: int, max_seq_len: int,
             dtype: torch.dtype, progress: bool = True) -> dict:
    """-> figures for the manifest: prefill max |logit diff|, decode agreement."""
    graph = OrtGraph(path, decoder, dtype)
    vocab = decoder.lm_head.out_features
    prompt_len = min(prompt_len, max_seq_len - steps - 1)
    if prompt_len < 1:
        steps, prompt_len = max(0, max_seq_len - 2), 1
    ids = _prompt(2, prompt_len, vocab)
    positions = torch.arange(prompt_len).expand(2, -1)
    ref = decoder(ids, positions).float()
    cache = graph.new_cache(2, prompt_len + steps)
    logits, _ = graph.step(ids.numpy(), positions.numpy(), np.zeros(2, np.int64), cache)
    logits = torch.from_numpy(logits).double()
    prefill_diff = float((logits - ref).abs().max())
    ref64 = _float64_logits(decoder, ids, positions)
    vs64 = None if ref64 is None else float((logits - ref64).abs().max())
    torch_vs64 = None if ref64 is None else float((ref.double() - ref64).abs().max())

    # greedy, batch 1, through both caches
    tcache = decoder.new_cache(1, prompt_len + steps)
    ocache = graph.new_cache(1, prompt_len + steps)
    t_logits = decoder(ids[:1], positions[:1], tcache)[:, -1]
    o_logits, ocache = graph.step(ids[:1].numpy(), positions[:1].numpy(), np.zeros(1, np.int64), ocache)
    o_logits = torch.from_numpy(o_logits[:, -1]).float()
    t_tokens, o_tokens, decode_diff = [], [], 0.0
    for t in tqdm(range(steps), desc="validate decode", unit="tok", disable=not progress):
        if t_tokens == o_tokens:  # compare logits while both sides have seen the same tokens
            decode_diff = max(decode_diff, float((o_logits - t_logits.float()).abs().max()))
        t_next, o_next = int(t_logits.argmax()), int(o_logits.argmax())
        t_tokens.append(t_next)
        o_tokens.append(o_next)
        pos = prompt_len + t
        t_logits = decoder(torch.tensor([[t_next]]), torch.tensor([[pos]]), tcache)[:, -1]
        o_out, ocache = graph.step(np.array([[o_next]], np.int64), np.array([[pos]], np.int64),
                                   np.array([pos], np.int64), ocache)
        o_logits = torch.from_numpy(o_out[:, -1]).float()
    same = next((i for i, (a, b) in enumerate(zip(t_tokens, o_tokens)) if a != b), len(t_tokens))
    return {"prompt_tokens": prompt_len, "prefill_max_abs_logit_diff": prefill_diff,
            "prefill_max_abs_logit_diff_vs_float64": vs64,
            "torch_float32_max_abs_logit_diff_vs_float64": torch_vs64,
            "decode_steps": steps, "decode_tokens_equal": t_tokens == o_tokens,
            "decode_first_mismatch": None if t_tokens == o_tokens else same,
            "decode_max_abs_logit_diff": decode_diff, "reference": "folded torch model, float32",
            "runtime": "onnxruntime CPUExecutionProvider"}
