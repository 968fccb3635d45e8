"""An engine directory: `config.json` (versioned, strict) beside the backend's files.

Loading refuses what it cannot run: a newer or older schema, unknown or missing keys, or an
unknown backend, each with one line that says what to rebuild. The backend then checks the
host (`Backend.check_host`: runtime version, device).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from eigenkv.artifacts import read_json_object
from eigenkv.errors import EigenError
from eigenkv.manifest import IONames, KVLayout, Manifest, Source, check_precision
from eigenkv.plugins.spec import RopeMode

ENGINE_SCHEMA = 2  # 2: layout with slot positions and per-layer lengths, typed source, key Gram file
_OPTIONAL = {"session_options", "device", "report", "key_gram_file", "eviction"}


@dataclass
class EngineConfig:
    """What an engine directory holds and was built with."""

    schema_version: int
    backend: str
    precision: str  # fp32 | fp16
    model_file: str  # relative to the engine directory
    kv_layout: KVLayout
    io: IONames
    runtime: dict  # e.g. {"onnxruntime": "1.32.0"}
    source: Source  # the checkpoint (its directory also holds the tokenizer)
    family: str
    rope_mode: RopeMode
    session_options: dict = field(default_factory=dict)  # backend options the loader applies
    device: dict = field(default_factory=dict)  # GPU backends: name, compute capability
    key_gram_file: str | None = None  # safetensors beside the model (key-norm eviction)
    eviction: dict | None = None  # default eviction policy for run/bench (`engines/eviction.py`)
    report: dict = field(default_factory=dict)  # the export's figures: KV bytes, perplexity, validation

    @classmethod
    def from_manifest(cls, manifest: Manifest, backend: str, model_file: str, runtime: dict, **extra) -> "EngineConfig":
        return cls(schema_version=ENGINE_SCHEMA, backend=backend, precision=manifest.precision, model_file=model_file,
                   kv_layout=manifest.layout, io=manifest.io, runtime=runtime, source=manifest.source,
                   family=manifest.family, rope_mode=manifest.rope_mode,
                   report={"kv_bytes_per_token": manifest.to_json()["kv_bytes_per_token"],
                           "perplexity": manifest.report.get("perplexity", {}),
                           "calibration": manifest.report.get("calibration")}, **extra)

    @property
    def calibrated_context(self) -> int | None:
        """Tokens per calibration sequence behind a low-rank cache (the export's `--calib-seq-len`),
        or None: a full-width cache, or an engine built before builds recorded it."""
        if self.kv_layout.kv_ratio >= 1:  # every rank is head_dim
            return None
        seq_len = (self.report.get("calibration") or {}).get("seq_len")
        return seq_len if isinstance(seq_len, int) and seq_len > 0 else None

    def context_warning(self, context: int) -> str | None:
        """One line when a request's context (prompt + new tokens, in tokens) is longer than the
        sequences the low-rank cache was calibrated on, else None. Past that length a kv-ratio 0.5
        export calibrated on 32 × 1024 tokens (the default before 8 × 4096) answered 1/3 pass keys
        at 2k and 0/3 at 4k (3/3 at 1k; the 8 × 4096 one 3/3 at each) while its perplexity in
        1024-token windows looked fine (README, long-context results), so `eigenkv run` says so."""
        calibrated = self.calibrated_context
        if calibrated is None or context <= calibrated:
            return None
        return (f"context {context} tokens is longer than the {calibrated}-token sequences this low-rank cache "
                f"was calibrated on; past that a compressed cache can lose what it should recall (README, "
                f"long-context results); export with --calib-seq-len {context} or more for such prompts")

    @property
    def weights(self) -> str:
        """The MatMul weights' format: "graph" (as exported) or "int4" / "int8" (`eigenkv build
        --weights`, recorded in runtime["weights"]; engines built before it read as "graph")."""
        return ((self.runtime or {}).get("weights") or {}).get("weights", "graph")

    def save(self, path: Path) -> None:
        from eigenkv.artifacts import write_json
        data = asdict(self)
        data["rope_mode"] = self.rope_mode.value
        write_json(path, data)

    @classmethod
    def load(cls, engine_dir: Path) -> "EngineConfig":
        """The config.json of `engine_dir`, strictly (one-line EigenError saying what to rebuild)."""
        path = Path(engine_dir) / "config.json"
        if not path.is_file():
            raise EigenError(f"{engine_dir} is not an engine directory (no config.json); build one with `eigenkv build`")
        rebuild = f"rebuild it with `eigenkv build ... -o {engine_dir} --force`"
        raw = read_json_object(path, rebuild)
        version = raw.get("schema_version")
        if not isinstance(version, int) or version > ENGINE_SCHEMA:
            raise EigenError(f"{path} has schema {version!r}, newer than this eigenkv reads ({ENGINE_SCHEMA}); "
                             "upgrade eigenkv or rebuild the engine with this version")
        if version != ENGINE_SCHEMA:
            raise EigenError(f"{path} has the old schema {version}: {rebuild}")
        known = {f.name for f in fields(cls)}
        unknown, missing = sorted(set(raw) - known), sorted(known - set(raw) - _OPTIONAL)
        if unknown or missing:
            raise EigenError(f"{path}: unknown keys {unknown} / missing keys {missing}; {rebuild}")
        try:
            raw.update(kv_layout=KVLayout(**raw["kv_layout"]), io=IONames(**raw["io"]),
                       source=Source(**raw["source"]), rope_mode=RopeMode.parse(raw["rope_mode"]),
                       precision=check_precision(raw["precision"]))
        except (TypeError, ValueError) as e:
            raise EigenError(f"{path}: bad value ({str(e).splitlines()[0]}); {rebuild}") from None
        return cls(**raw)
