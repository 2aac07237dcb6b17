"""Where the app keeps its files and which model/device it uses, from the environment.

``AXIS_LAB_WORKSPACE``  folder for user roles, runs and downloaded axes (default: ``/data/assistant-axis-lab``
                        when a writable ``/data`` exists, i.e. Spaces persistent storage, else
                        ``<cache root>/workspace``)
``AXIS_LAB_MODEL``      model the chat and the pipeline start with (default: the embedded SmolLM2)
``AXIS_LAB_DEVICE``     ``cpu`` / ``cuda`` (default: ``cuda`` when available)
``AXIS_LAB_DTYPE``      ``float32`` / ``bfloat16`` / ``float16`` (default: float32 on CPU, bfloat16 on GPU)
``AXIS_LAB_RUN_DIR``    run directory preselected in the chat and pipeline tabs
``AXIS_LAB_CHAT_MAX_TOKENS``  default "max new tokens" of the chat (96)
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from steering.models import DEFAULT_MODEL_ID, cache_root


def _default_workspace() -> Path:
    data = Path("/data")
    if data.is_dir() and os.access(data, os.W_OK):
        return data / "assistant-axis-lab"
    return cache_root() / "workspace"


def _default_device() -> str:
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except Exception:  # pragma: no cover - torch is a hard dependency
        return "cpu"


@dataclass
class AppConfig:
    workspace: Path = field(default_factory=lambda: Path(os.environ.get("AXIS_LAB_WORKSPACE") or _default_workspace()))
    model_id: str = field(default_factory=lambda: os.environ.get("AXIS_LAB_MODEL") or DEFAULT_MODEL_ID)
    device: str = field(default_factory=lambda: os.environ.get("AXIS_LAB_DEVICE") or _default_device())
    dtype: str | None = field(default_factory=lambda: os.environ.get("AXIS_LAB_DTYPE") or None)
    run_dir: str | None = field(default_factory=lambda: os.environ.get("AXIS_LAB_RUN_DIR") or None)
    on_space: bool = field(default_factory=lambda: bool(os.environ.get("SPACE_ID")))
    chat_max_new_tokens: int = field(default_factory=lambda: int(os.environ.get("AXIS_LAB_CHAT_MAX_TOKENS") or 96))

    def __post_init__(self) -> None:
        self.workspace = Path(self.workspace).expanduser()
        if self.dtype is None:
            self.dtype = "bfloat16" if self.device.startswith("cuda") else "float32"

    @property
    def user_roles_dir(self) -> Path:
        return self.workspace / "roles"

    @property
    def runs_dir(self) -> Path:
        return self.workspace / "runs"

    @property
    def axes_dir(self) -> Path:
        return self.workspace / "axes"

    @property
    def transcripts_dir(self) -> Path:
        return self.workspace / "transcripts"

    def default_run_dir(self) -> str:
        return self.run_dir or str(self.runs_dir / "demo")
