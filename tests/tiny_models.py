"""Tiny random models of each supported family, built in-process from their *Config (seeded)."""

from __future__ import annotations

import torch

FAMILIES = ("llama", "qwen2", "opt", "mpt", "qwen3", "phi3", "gemma3_text")
QK_NORM_FAMILIES = ("qwen3", "gemma3_text")  # keys normalised per head before RoPE: W_k stays full width


def tiny_config(model_type: str):
    import transformers as tf
    if model_type == "llama":
        return tf.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                              rope_theta=10000.0, tie_word_embeddings=False)
    if model_type == "qwen2":
        return tf.Qwen2Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                              num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=128,
                              tie_word_embeddings=True)
    if model_type == "qwen3":  # QK-norm
        return tf.Qwen3Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
                              tie_word_embeddings=True)
    if model_type == "phi3":  # fused qkv_proj and gate_up_proj
        return tf.Phi3Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                             original_max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                             tie_word_embeddings=False)
    if model_type == "gemma3_text":  # QK-norm, 4 norms per layer, local layers (window 8, own RoPE base)
        return tf.Gemma3TextConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=24,
                                   max_position_embeddings=128, sliding_window=8,
                                   layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                                   pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if model_type == "mistral-window":  # every layer slides (window 8)
        return tf.MistralConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                sliding_window=8, tie_word_embeddings=False)
    if model_type == "opt":
        return tf.OPTConfig(vocab_size=256, hidden_size=64, ffn_dim=128, num_hidden_layers=3,
                            num_attention_heads=4, max_position_embeddings=128, word_embed_proj_dim=64)
    if model_type == "mpt":
        return tf.MptConfig(vocab_size=256, d_model=64, n_heads=4, n_layers=3, max_seq_len=128, expansion_ratio=2)
    raise KeyError(model_type)


def tiny_model(model_type: str, seed: int = 0):
    """A float32 CausalLM with random weights; biases randomised too so they are exercised."""
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type), attn_implementation="eager")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.05)
            elif "q_norm" in name or "k_norm" in name:  # QK-norm weights away from 1
                p.uniform_(0.5, 1.5)
            elif model_type == "gemma3_text" and "norm" in name:  # Gemma norms scale by (1 + w): w = 0 is 1
                p.normal_(0, 0.2)
    return model.float().eval()


def byte_tokenizer():
    """A byte-level tokenizer with a 256-token vocabulary (no merges), for tiny models.

    Ids are fixed (the alphabet sorted: `ByteLevel.alphabet()` comes in a different order on
    every call, which changed tokenization, calibration and ranks from one tiny model to the
    next); the end token is "Ā", the symbol of byte 0, so no text character is special."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="\u0100")


def save_tiny(model_type: str, path, seed: int = 0):
    """A tiny model + byte tokenizer saved as a Hugging Face directory."""
    tiny_model(model_type, seed).save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


# ---- export helpers shared by the export and engine tests ------------------------------------
# workdir holds calib.txt; models are saved there once per family.

def ensure_model(workdir, family):
    model = workdir / family
    if not model.exists():
        save_tiny(family, model)
    return model


_EXPORTS: dict = {}  # (family, graph name, options, calibration text) -> folder of a successful export
_EXPORT_CACHE = None  # tempfile.TemporaryDirectory holding those folders; removed at interpreter exit


def _export_cache_dir():
    """A fresh folder for one cached export, inside one temporary directory per test session
    that is deleted when the interpreter exits (a plain mkdtemp per export left ~1 MB per export
    in the system temp folder after every run of the suite)."""
    import tempfile
    from pathlib import Path
    global _EXPORT_CACHE
    if _EXPORT_CACHE is None:
        _EXPORT_CACHE = tempfile.TemporaryDirectory(prefix="eigenkv-tiny-exports-")
    return Path(tempfile.mkdtemp(dir=_EXPORT_CACHE.name))


def export_tiny(workdir, family, out, *extra):
    """export-eigen on workdir's tiny `family` model -> exit code. Identical successful exports
    (same family, graph name, options and calibration text; tiny models are seeded) are made once
    per test session and copied: the suite exports the same engine for several test modules."""
    import shutil
    from pathlib import Path
    model = ensure_model(workdir, family)
    out = Path(out)
    key = (family, out.name, extra, (workdir / "calib.txt").read_text())
    if key in _EXPORTS:
        out.parent.mkdir(parents=True, exist_ok=True)
        for f in _EXPORTS[key].glob(out.stem + ".*"):
            shutil.copyfile(f, out.parent / f.name)
        return 0
    from eigenkv.cli import main
    code = main(["export", str(out), "--model", str(model), "--calib-text", str(workdir / "calib.txt"),
                 "--calib-samples", "4", "--calib-seq-len", "32", "--eval-tokens", "0", "--no-progress", *extra])
    if code == 0 and not any(a in ("--force", "--projections") for a in extra):
        keep = _export_cache_dir()
        for f in out.parent.glob(out.stem + ".*"):
            shutil.copyfile(f, keep / f.name)
        _EXPORTS[key] = keep
    return code


def folded_for_manifest(workdir, family, manifest, graph):
    """The folded torch model the graph came from: the export's own projections file
    (OUT.projections.safetensors) applied to workdir's tiny `family` model. Recalibrating
    instead is not reproducible across machines: on tiny models the KL-measured ranks sit on
    ties that a different thread count or instruction set can flip."""
    from pathlib import Path
    from eigenkv.exporter.pipeline import CompressConfig, compress
    projections = Path(graph).parent / manifest["files"]["projections"]
    config = CompressConfig(model=str(workdir / family), projections=str(projections),
                            calib_text=str(workdir / "calib.txt"), calib_samples=4, calib_seq_len=32,
                            eval_tokens=0, progress=False)
    folded = compress(config).folded
    layout = manifest["layout"]
    assert folded.key_ranks == layout["key_ranks"] and folded.value_ranks == layout["value_ranks"]
    return folded
