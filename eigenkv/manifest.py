"""The export manifest (`OUT.eigen.json`): one typed, strictly loaded description of a graph.

One module owns it: the export writes it, `eigenkv build` reads it, engines copy its
`KVLayout`. Loading refuses a newer or older schema, unknown or missing keys, and a
manifest that describes another graph file, each with one line saying what to redo.
The manifest's name is tied to its graph (`model.onnx` -> `model.eigen.json`), so two
exports share a folder without overwriting each other.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from eigenkv.errors import EigenError
from eigenkv.plugins.spec import RopeMode

MANIFEST_SCHEMA = 2  # 2: typed; slot positions and per-layer cache lengths in the graph's I/O
MANIFEST_SUFFIX = ".eigen.json"

# Graph precisions: name -> (numpy dtype name, bytes per element). torch dtypes via `torch_dtype`.
PRECISIONS = {"fp32": ("float32", 4), "fp16": ("float16", 2)}


def check_precision(precision: str) -> str:
    """`precision` itself, or a one-line EigenError naming the accepted ones."""
    if precision not in PRECISIONS:
        raise EigenError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return precision


def numpy_dtype(precision: str):
    """'fp32' -> numpy.float32, 'fp16' -> numpy.float16."""
    import numpy as np
    return np.dtype(PRECISIONS[check_precision(precision)][0]).type


def torch_dtype(precision: str):
    """'fp32' -> torch.float32, 'fp16' -> torch.float16."""
    import torch
    return getattr(torch, PRECISIONS[check_precision(precision)][0])


def precision_of(dtype) -> str:
    """The inverse of numpy_dtype/torch_dtype: a numpy or torch float dtype -> 'fp32' | 'fp16'."""
    name = str(dtype).removeprefix("torch.")
    for precision, (np_name, _) in PRECISIONS.items():
        if name == np_name:
            return precision
    raise EigenError(f"dtype {dtype} is not one of the graph precisions ({', '.join(PRECISIONS)})")


@dataclass(frozen=True)
class KVLayout:
    """Per-layer cache geometry: layer i's buffers are key [B, n_kv_heads, Smax, key_ranks[i]] and
    value [B, n_kv_heads, Smax, value_ranks[i]] in the graph's precision; with `slot_positions`,
    the graph also reads each slot's token position [B, n_kv_heads, Smax] per layer (int32), so
    slots may be reordered or compacted (eviction). A sliding-window layer (`windows[i]` = W > 0)
    attends to its last W positions only, so its buffer needs W - 1 + (tokens per step) slots
    whatever the context (engines/runtime.py slides it)."""

    n_layers: int
    n_kv_heads: int
    head_dim: int
    key_ranks: tuple[int, ...]
    value_ranks: tuple[int, ...]
    max_seq_len: int
    slot_positions: bool = True
    windows: tuple[int, ...] = ()  # per-layer sliding window in tokens (0: global); () = no windows

    def __post_init__(self):
        object.__setattr__(self, "key_ranks", tuple(self.key_ranks))
        object.__setattr__(self, "value_ranks", tuple(self.value_ranks))
        object.__setattr__(self, "windows", tuple(int(w) for w in self.windows) if any(self.windows) else ())
        if not len(self.key_ranks) == len(self.value_ranks) == self.n_layers:
            raise EigenError(f"KV layout: {self.n_layers} layers but {len(self.key_ranks)} key ranks and "
                             f"{len(self.value_ranks)} value ranks")
        if self.windows and (len(self.windows) != self.n_layers or min(self.windows) < 0):
            raise EigenError(f"KV layout: windows must be one value >= 0 per layer ({self.n_layers}), "
                             f"got {list(self.windows)}")

    def window(self, layer: int) -> int:
        """Layer `layer`'s sliding window in tokens (0: it attends to the whole context)."""
        return self.windows[layer] if self.windows else 0

    def bytes_per_token(self, precision: str) -> int:
        """KV bytes one token occupies in all layers' K and V buffers (bytes)."""
        return PRECISIONS[check_precision(precision)][1] * self.n_kv_heads * (sum(self.key_ranks) + sum(self.value_ranks))

    def original_bytes_per_token(self, precision: str) -> int:
        """The same for the uncompressed model (full head_dim keys and values)."""
        return PRECISIONS[check_precision(precision)][1] * 2 * self.n_layers * self.n_kv_heads * self.head_dim

    @property
    def kv_ratio(self) -> float:
        """Compressed / original KV bytes."""
        return (sum(self.key_ranks) + sum(self.value_ranks)) / (2 * self.n_layers * self.head_dim)


@dataclass(frozen=True)
class IONames:
    """Graph input/output name patterns ({i} = layer); nothing infers them from file names.

    cache_lengths is int64 [n_layers, B]: the valid slots of each layer's buffers before the
    step, and the slot where the step's first new token is written.
    """

    input_ids: str = "input_ids"
    position_ids: str = "position_ids"
    cache_lengths: str = "cache_lengths"
    past_key: str = "past_key_values.{i}.key"
    past_value: str = "past_key_values.{i}.value"
    slot_positions: str = "slot_positions.{i}"
    logits: str = "logits"
    present_key: str = "present.{i}.key"
    present_value: str = "present.{i}.value"

    def past(self, n_layers: int) -> list[str]:
        return [p.format(i=i) for i in range(n_layers) for p in (self.past_key, self.past_value)]

    def present(self, n_layers: int) -> list[str]:
        return [p.format(i=i) for i in range(n_layers) for p in (self.present_key, self.present_value)]

    def inputs(self, n_layers: int) -> list[str]:
        slots = [self.slot_positions.format(i=i) for i in range(n_layers)]
        return [self.input_ids, self.position_ids, self.cache_lengths, *self.past(n_layers), *slots]

    def outputs(self, n_layers: int) -> list[str]:
        return [self.logits, *self.present(n_layers)]


@dataclass(frozen=True)
class Source:
    """Where the model came from: a directory, the GGUF file inside it (or None), a content hash."""

    directory: str
    gguf_file: str | None
    hash: str

    @property
    def label(self) -> str:
        return str(Path(self.directory) / self.gguf_file) if self.gguf_file else self.directory


@dataclass(frozen=True)
class Files:
    """File names relative to the manifest's folder."""

    graph: str
    data: str
    key_gram: str | None = None  # safetensors: layers.{i}.key_gram [G, r_k, r_k] (see `key_gram`)
    projections: str | None = None  # safetensors: the folded attention tensors (`artifacts.save_projections`)


@dataclass
class Manifest:
    """Everything known about one exported graph; `report` holds the measured figures (ranks,
    calibration, healing, perplexity, validation, timings) as written by the export."""

    source: Source
    family: str  # config.model_type
    rope_mode: RopeMode
    precision: str
    layout: KVLayout
    io: IONames
    files: Files
    op: dict  # {domain, name, version}
    opset: int
    eigenkv_version: str
    report: dict = field(default_factory=dict)
    schema_version: int = MANIFEST_SCHEMA

    def to_json(self) -> dict:
        data = asdict(self)
        data["rope_mode"] = self.rope_mode.value
        data["kv_bytes_per_token"] = {"original": self.layout.original_bytes_per_token(self.precision),
                                      "compressed": self.layout.bytes_per_token(self.precision)}
        return data

    def save(self, path: Path) -> None:
        from eigenkv.artifacts import write_json
        write_json(path, self.to_json())

    @classmethod
    def load(cls, path: Path) -> "Manifest":
        from eigenkv.artifacts import read_json_object
        path = Path(path)
        redo = "re-export the graph with this eigenkv's `export-eigen`"
        raw = read_json_object(path, redo)
        if raw.get("schema_version") != MANIFEST_SCHEMA:
            raise EigenError(f"{path} has manifest schema {raw.get('schema_version')!r}, this eigenkv reads "
                             f"{MANIFEST_SCHEMA}: {redo}")
        raw.pop("kv_bytes_per_token", None)  # derived from the layout
        try:
            _require_keys(raw, cls, path)
            return cls(source=Source(**raw.pop("source")), rope_mode=RopeMode.parse(raw.pop("rope_mode")),
                       precision=check_precision(raw.pop("precision")), layout=KVLayout(**raw.pop("layout")),
                       io=IONames(**raw.pop("io")), files=Files(**raw.pop("files")), **raw)
        except (TypeError, ValueError) as e:
            raise EigenError(f"{path} is not a valid manifest ({str(e).splitlines()[0]}): {redo}") from None


def _require_keys(raw: dict, cls, path: Path) -> None:
    known = {f.name for f in fields(cls)}
    optional = {"report", "schema_version"}
    unknown, missing = sorted(set(raw) - known), sorted(known - set(raw) - optional)
    if unknown or missing:
        raise TypeError(f"unknown keys {unknown} / missing keys {missing}")


def manifest_path(graph: Path) -> Path:
    """The manifest that belongs to a graph: `out/model.onnx` -> `out/model.eigen.json`."""
    graph = Path(graph)
    return graph.with_name(graph.stem + MANIFEST_SUFFIX)


def read_manifest(graph: Path) -> Manifest:
    """The manifest beside `graph`, checked to describe this very graph file."""
    graph = Path(graph)
    if not graph.is_file():
        raise EigenError(f"{graph}: no such ONNX file (export one with `export-eigen`)")
    path = manifest_path(graph)
    if not path.is_file():
        raise EigenError(f"no {path.name} beside {graph}: engines are built from `export-eigen` output")
    manifest = Manifest.load(path)
    if manifest.files.graph != graph.name:
        raise EigenError(f"{path} describes {manifest.files.graph!r}, not {graph.name!r}")
    return manifest
