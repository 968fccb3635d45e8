"""An engine directory: `config.json` (versioned, strict) beside the backend's model file.

Loading refuses what it cannot run: a newer schema, unknown keys, another backend, or a
runtime version other than the one the engine was built with; each with one line that
says what to rebuild.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from eigenkv.artifacts import read_json_object
from eigenkv.errors import EigenError

ENGINE_SCHEMA = 1
BACKENDS = ("ort", "trt")


@dataclass
class KVLayout:
    """Per-layer cache widths: buffers are [B, n_kv_heads, Smax, rank] in `precision`."""

    n_layers: int
    n_kv_heads: int
    head_dim: int
    key_ranks: list[int]
    value_ranks: list[int]
    max_seq_len: int


@dataclass
class EngineConfig:
    schema_version: int
    backend: str
    precision: str  # fp32 | fp16
    model_file: str  # relative to the engine directory
    kv_layout: KVLayout
    io: dict  # name patterns, as in the export manifest
    runtime: dict  # e.g. {"onnxruntime": "1.32.0"}
    session_options: dict = field(default_factory=dict)
    device: dict = field(default_factory=dict)  # GPU backends: name, compute capability
    source: dict = field(default_factory=dict)  # the export manifest's model, hash, ranks, rope mode
    tokenizer: dict = field(default_factory=dict)  # {"path": ..., "gguf_file": ...}

    def save(self, path: Path) -> None:
        from eigenkv.artifacts import write_json
        write_json(path, asdict(self))

    @classmethod
    def load(cls, engine_dir: Path, backend: str | None = None) -> "EngineConfig":
        path = Path(engine_dir) / "config.json"
        if not path.is_file():
            raise EigenError(f"{engine_dir} is not an engine directory (no config.json); build one with `eigenkv build`")
        raw = read_json_object(path, "rebuild the engine with `eigenkv build`")
        version = raw.get("schema_version")
        if not isinstance(version, int) or version > ENGINE_SCHEMA:
            raise EigenError(f"{path} has schema {version!r}, newer than this eigenkv reads ({ENGINE_SCHEMA}); "
                             "upgrade eigenkv or rebuild the engine with this version")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        missing = sorted(k for k in known if k not in raw and k not in ("session_options", "device", "source",
                                                                          "tokenizer"))
        if unknown or missing:
            raise EigenError(f"{path}: unknown keys {unknown} / missing keys {missing}; rebuild the engine")
        try:
            raw["kv_layout"] = KVLayout(**raw["kv_layout"])
        except TypeError as e:
            raise EigenError(f"{path}: bad kv_layout ({e}); rebuild the engine") from None
        config = cls(**raw)
        if config.backend not in BACKENDS:
            raise EigenError(f"{path}: unknown backend {config.backend!r} (known: {', '.join(BACKENDS)})")
        if backend is not None and config.backend != backend:
            raise EigenError(f"{engine_dir} is a {config.backend!r} engine, not {backend!r}; "
                             f"build one with `eigenkv build MODEL.onnx -o DIR --backend {backend}`")
        return config
