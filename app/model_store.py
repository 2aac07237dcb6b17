"""One model in memory for the whole app: loaded on first use, shared by every tab and session.

Asking for another model id replaces the loaded one (a GPU holds one at a time). Loading runs
under a lock, so concurrent first uses wait for a single load.
"""
from __future__ import annotations

import gc
import threading
import time
from dataclasses import dataclass

from steering.models import LoadedModel, ModelSpec, load_model


@dataclass(frozen=True)
class ModelInfo:
    model_id: str
    n_layers: int
    d_model: int
    device: str
    dtype: str
    revision: str | None
    load_seconds: float

    def describe(self) -> str:
        rev = f", {self.revision}" if self.revision else ""
        return (f"{self.model_id}{rev}: {self.n_layers} layers, d_model {self.d_model}, "
                f"{self.dtype} on {self.device} (loaded in {self.load_seconds:.1f} s)")


class ModelStore:
    def __init__(self, device: str = "cpu", dtype: str = "float32") -> None:
        self.device = device
        self.dtype = dtype
        self._lock = threading.Lock()
        self._model: LoadedModel | None = None
        self._info: ModelInfo | None = None

    @property
    def loaded(self) -> LoadedModel | None:
        return self._model

    @property
    def info(self) -> ModelInfo | None:
        return self._info

    def is_loaded(self, model_id: str) -> bool:
        model = self._model
        return model is not None and model.model_id == model_id

    def get(self, model_id: str) -> LoadedModel:
        """The model ``model_id``, loading it (and dropping any other) if needed."""
        model_id = model_id.strip()
        if not model_id:
            raise ValueError("no model id given")
        model = self._model
        if model is not None and model.model_id == model_id:
            return model
        with self._lock:  # one load at a time; others wait for it

            if self._model is not None and self._model.model_id == model_id:
                return self._model
            self.unload_locked()
            start = time.monotonic()
            model = load_model(ModelSpec(model_id=model_id, device=self.device, dtype=self.dtype))
            self._model = model
            self._info = ModelInfo(model_id=model_id, n_layers=model.n_layers, d_model=model.d_model,
                                   device=str(model.device), dtype=self.dtype, revision=model.revision_label,
                                   load_seconds=time.monotonic() - start)
            return model

    def adopt(self, model: LoadedModel) -> None:
        """Use a model that is already in memory (tests, notebooks) as the shared one."""
        with self._lock:
            self.unload_locked()
            self._model = model
            self._info = ModelInfo(model_id=model.model_id, n_layers=model.n_layers, d_model=model.d_model,
                                   device=str(model.device), dtype=model.spec.dtype, revision=model.revision_label,
                                   load_seconds=0.0)

    def unload(self) -> None:
        with self._lock:
            self.unload_locked()

    def unload_locked(self) -> None:
        """Drop the model (the caller holds the lock)."""
        if self._model is None:
            return
        self._model = None
        self._info = None
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except Exception:  # pragma: no cover
            pass
