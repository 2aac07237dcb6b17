"""Shared fixtures: a tiny random chat model (unit tests) and the embedded SmolLM2 default (integration)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

pytest_plugins = ["tests.fake_llm_servers"]

from tests.tiny_models import CHATML_TEMPLATE, NO_SYSTEM_TEMPLATE, build_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-chatml"), CHATML_TEMPLATE)


@pytest.fixture(scope="session")
def tiny_nosystem_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-nosystem"), NO_SYSTEM_TEMPLATE, seed=1)


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
    from steering.models import ModelSpec, load_model

    return load_model(ModelSpec(model_id=str(tiny_model_dir)))


@pytest.fixture(scope="session")
def smollm2():
    """The embedded default model (exported once to the cache dir, then reloaded in ~1 s)."""
    from steering.models import load_model

    return load_model()


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny matrices: one intra-op thread avoids OpenMP spin contention on a shared 2-core box (restored after).

    Use with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
