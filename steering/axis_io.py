"""Axis files: the native safetensors format and the paper's ``.pt`` formats.

Native format (``*.safetensors``), all tensors fp32:
    ``axis``                 ``[L, D]``
    ``default_vector``       ``[L, D]`` (optional)
    ``role_vectors.<name>``  ``[L, D]`` per role (optional)
and the header metadata key ``assistant_axis_lab`` holding JSON :class:`AxisMetadata`.

Paper formats: ``assistant_axis.pt`` = a raw ``[L, D]`` tensor or ``{"axis": T}``; role vectors =
one raw tensor per ``role_vectors/<role>.pt``. ``.pt`` files are read with ``weights_only=True``:
no pickled code from a downloaded file is ever run.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from steering.atomic_io import atomic_write_with
from steering.calibration import format_quantile

METADATA_KEY = "assistant_axis_lab"
FORMAT_VERSION = 1
LAYER_CONVENTION = "block_output"
"""Activations after decoder block ``i`` (= HF ``hidden_states[i + 1]``, before the final norm for the last)."""


class AxisFileError(ValueError):
    """An axis file is unreadable, malformed, or does not fit the model it is used with."""


@dataclass
class AxisMetadata:
    model_id: str | None = None
    revision: str | None = None
    layer_convention: str = LAYER_CONVENTION
    n_layers: int | None = None
    d_model: int | None = None
    thresholds: dict[str, list[float]] = field(default_factory=dict)  # "p0.25" -> tau per layer
    settings: dict[str, Any] = field(default_factory=dict)
    source: str | None = None
    format_version: int = FORMAT_VERSION

    @classmethod
    def from_dict(cls, data: dict) -> "AxisMetadata":
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


@dataclass
class AxisBundle:
    """An axis with its optional vectors and metadata."""

    axis: Tensor  # [L, D] fp32
    metadata: AxisMetadata = field(default_factory=AxisMetadata)
    default_vector: Tensor | None = None  # [L, D]
    role_vectors: dict[str, Tensor] = field(default_factory=dict)  # name -> [L, D]

    def __post_init__(self) -> None:
        self.axis = _as_axis_tensor(self.axis, "axis")
        n_layers, d_model = self.axis.shape
        self.metadata.n_layers, self.metadata.d_model = n_layers, d_model
        if self.default_vector is not None:
            self.default_vector = _as_axis_tensor(self.default_vector, "default_vector", (n_layers, d_model))
        self.role_vectors = {
            name: _as_axis_tensor(v, f"role vector {name!r}", (n_layers, d_model)) for name, v in self.role_vectors.items()
        }

    @property
    def n_layers(self) -> int:
        return int(self.axis.shape[0])

    @property
    def d_model(self) -> int:
        return int(self.axis.shape[1])

    def threshold(self, quantile: float) -> Tensor:
        key = f"p{format_quantile(quantile)}"
        if key not in self.metadata.thresholds:
            have = ", ".join(sorted(self.metadata.thresholds)) or "none"
            raise AxisFileError(f"this axis has no thresholds at {key} (it has: {have})")
        return torch.tensor(self.metadata.thresholds[key], dtype=torch.float32)

    def check_compatible(self, n_layers: int, d_model: int, model_id: str | None = None) -> None:
        """Raise :class:`AxisFileError` when the axis cannot be used with a model of this shape."""
        if (self.n_layers, self.d_model) != (n_layers, d_model):
            made_for = f" (made for {self.metadata.model_id})" if self.metadata.model_id else ""
            raise AxisFileError(
                f"axis shape [{self.n_layers}, {self.d_model}]{made_for} does not fit model "
                f"{model_id or ''} with {n_layers} layers and d_model {d_model}".replace("  ", " ")
            )


def _as_axis_tensor(value: Any, what: str, shape: tuple[int, int] | None = None) -> Tensor:
    if not isinstance(value, Tensor):
        raise AxisFileError(f"{what} must be a tensor, got {type(value).__name__}")
    if value.dim() != 2:
        raise AxisFileError(f"{what} must be [n_layers, d_model], got shape {tuple(value.shape)}")
    if shape is not None and tuple(value.shape) != shape:
        raise AxisFileError(f"{what} has shape {tuple(value.shape)}, expected {shape} like the axis")
    if not torch.isfinite(value).all():
        raise AxisFileError(f"{what} contains NaN or infinite values")
    return value.detach().to(torch.float32).contiguous().cpu()


def save_axis(path: str | os.PathLike, bundle: AxisBundle) -> None:
    """Write ``bundle`` in the native format, atomically."""
    tensors = {"axis": bundle.axis}
    if bundle.default_vector is not None:
        tensors["default_vector"] = bundle.default_vector
    for name, vector in bundle.role_vectors.items():
        tensors[f"role_vectors.{name}"] = vector
    metadata = {METADATA_KEY: json.dumps(asdict(bundle.metadata), default=str)}
    atomic_write_with(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def _load_native(path: Path) -> AxisBundle:
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as exc:
        raise AxisFileError(f"{path}: not a readable safetensors file ({exc})") from exc
    if "axis" not in tensors:
        raise AxisFileError(f"{path}: no 'axis' tensor (keys: {', '.join(sorted(tensors)) or 'none'})")
    meta = AxisMetadata()
    if METADATA_KEY in header:
        try:
            meta = AxisMetadata.from_dict(json.loads(header[METADATA_KEY]))
        except (json.JSONDecodeError, TypeError) as exc:
            raise AxisFileError(f"{path}: metadata '{METADATA_KEY}' is not valid JSON ({exc})") from exc
    roles = {k[len("role_vectors."):]: v for k, v in tensors.items() if k.startswith("role_vectors.")}
    try:
        return AxisBundle(axis=tensors["axis"], metadata=meta, default_vector=tensors.get("default_vector"),
                          role_vectors=roles)
    except AxisFileError as exc:
        raise AxisFileError(f"{path}: {exc}") from exc


def _safe_globals() -> list:
    import numpy as np

    allowed: list = [np.dtype]
    core = getattr(np, "_core", None) or getattr(np, "core", None)
    scalar = getattr(getattr(core, "multiarray", None), "scalar", None)
    if scalar is not None:
        allowed.append(scalar)
    for name in ("Float64DType", "Float32DType", "Int64DType"):
        dtype_cls = getattr(getattr(np, "dtypes", None), name, None)
        if dtype_cls is not None:
            allowed.append(dtype_cls)
    return allowed


def load_pt_safely(path: str | os.PathLike) -> Any:
    """``torch.load`` restricted to tensors and plain containers (``weights_only=True``)."""
    path = Path(path)
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise AxisFileError(f"{path}: file not found") from None
    except Exception as exc:
        raise AxisFileError(
            f"{path}: refused or unreadable as a weights-only torch file ({type(exc).__name__}: {exc}). "
            "Only tensors and plain containers are loaded; pickled code is never run."
        ) from exc


def _load_paper_pt(path: Path) -> AxisBundle:
    obj = load_pt_safely(path)
    if isinstance(obj, dict):
        if "axis" not in obj:
            raise AxisFileError(f"{path}: a dict without an 'axis' entry (keys: {', '.join(map(str, obj))})")
        obj = obj["axis"]
    try:
        return AxisBundle(axis=obj, metadata=AxisMetadata(source=str(path)))
    except AxisFileError as exc:
        raise AxisFileError(f"{path}: {exc}") from exc


def load_axis(path: str | os.PathLike) -> AxisBundle:
    """Load an axis in the native format (``.safetensors``) or a paper ``.pt`` file."""
    path = Path(path)
    if not path.exists():
        raise AxisFileError(f"{path}: file not found")
    if path.suffix == ".safetensors":
        return _load_native(path)
    if path.suffix in {".pt", ".pth", ".bin"}:
        return _load_paper_pt(path)
    raise AxisFileError(f"{path}: unknown axis file type {path.suffix!r} (expected .safetensors or .pt)")


def load_role_vectors(folder: str | os.PathLike, shape: tuple[int, int] | None = None) -> dict[str, Tensor]:
    """Paper layout ``role_vectors/<role>.pt`` (each a raw ``[L, D]`` tensor) -> ``{role: tensor}``."""
    folder = Path(folder)
    files = sorted(folder.glob("*.pt"))
    if not files:
        raise AxisFileError(f"{folder}: no role vector files (*.pt)")
    vectors = {}
    for file in files:
        obj = load_pt_safely(file)
        if isinstance(obj, dict) and "vector" in obj:
            obj = obj["vector"]
        try:
            vectors[file.stem] = _as_axis_tensor(obj, f"{file}", shape)
        except AxisFileError:
            raise
        shape = shape or tuple(vectors[file.stem].shape)
    return vectors
