"""A plain Hugging Face copy of a bridged model that shares its weights, for fast token-by-token decoding.

TransformerLens' ``TransformerBridge`` replaces the HF modules by hooked bridge components. That is what
analysis wants, but each decode step then pays the bridge's Python dispatch (about 4x the module calls
of the HF model) and its eager attention, about 0.75x plain HF speed on CPU (BENCHMARKS.md, section 2).

:class:`PlainDecoder` holds a second instance of the HF model class, built on the meta device and then
pointed at the bridged model's own parameter and buffer tensors (no copy, no extra weight memory), with
the fastest attention the class supports. It accepts the same ``(hook_name, fn(x, hook))`` forward hooks
as the bridge for the two hook points that generation uses:

* ``blocks.{i}.hook_out``: output of decoder block ``i`` (= HF ``hidden_states[i + 1]``);
* ``embed.hook_out``: output of the token embedding.

so an :class:`steering.interventions.InterventionPlan` applies to it unchanged, through the same
:func:`steering.interventions.applied`. Everything else (attention patterns, MLP outputs, ...) stays on
the bridge.
"""
from __future__ import annotations

import copy
import logging
import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

log = logging.getLogger(__name__)

_WRAPPED = "._original_component"
_BLOCK_OUT = re.compile(r"^blocks\.(\d+)\.hook_out$")
EMBED_OUT = "embed.hook_out"


class PlainDecoderError(RuntimeError):
    """The plain twin could not be built or asked for a hook point it does not have."""


@dataclass(frozen=True)
class HookInfo:
    """What a hook function receives as ``hook`` (the bridge passes a HookPoint; only ``name`` is shared)."""

    name: str


def _plain_name(name: str) -> str:
    return name.replace(_WRAPPED, "")


def _set_tensor(module: nn.Module, dotted: str, tensor: torch.Tensor, *, parameter: bool) -> None:
    *path, leaf = dotted.split(".")
    owner = module.get_submodule(".".join(path)) if path else module
    (owner._parameters if parameter else owner._buffers)[leaf] = tensor


def _instantiate(model_class, config, attn_implementation: str) -> nn.Module:
    config = copy.deepcopy(config)  # never touch the bridged model's config (the bridge forces eager there)
    config._attn_implementation = attn_implementation
    with torch.device("meta"):
        return model_class(config)


def weight_sharing_twin(bridged_hf_model, attn_implementation: str = "sdpa") -> nn.Module:
    """A plain instance of ``type(bridged_hf_model)`` whose parameters and buffers ARE the bridged model's.

    Falls back to eager attention when the class does not support ``attn_implementation``.
    """
    model_class = type(bridged_hf_model)
    try:
        twin = _instantiate(model_class, bridged_hf_model.config, attn_implementation)
    except (ValueError, ImportError):
        twin = _instantiate(model_class, bridged_hf_model.config, "eager")
    params = {_plain_name(n): p for n, p in bridged_hf_model.named_parameters(remove_duplicate=False)}
    buffers = {_plain_name(n): b for n, b in bridged_hf_model.named_buffers(remove_duplicate=False)}
    missing = [n for n, _ in twin.named_parameters(remove_duplicate=False) if n not in params]
    missing += [n for n, _ in twin.named_buffers(remove_duplicate=False) if n not in buffers]
    if missing:
        raise PlainDecoderError(
            f"cannot build a plain {model_class.__name__} sharing the bridged weights: "
            f"{len(missing)} tensors have no counterpart (first: {missing[:3]})"
        )
    # Listing with remove_duplicate=False keeps tied weights tied: both names get the same Parameter.
    for name, _ in list(twin.named_parameters(remove_duplicate=False)):
        _set_tensor(twin, name, params[name], parameter=True)
    for name, _ in list(twin.named_buffers(remove_duplicate=False)):
        _set_tensor(twin, name, buffers[name], parameter=False)
    twin.generation_config = copy.deepcopy(bridged_hf_model.generation_config)
    return twin.eval()


def _module_names(root: nn.Module) -> dict[int, str]:
    return {id(module): name for name, module in root.named_modules(remove_duplicate=False)}


class PlainDecoder:
    """A weight-sharing plain HF twin of a bridged model with bridge-style forward hooks.

    Attributes:
        model: the plain ``PreTrainedModel`` (call it like the HF model: ``model(input_ids=...)``).
        hook_modules: hook name -> twin module whose forward output is that hook point.
    """

    def __init__(self, bridge, bridged_hf_model, attn_implementation: str = "sdpa") -> None:
        self.model = weight_sharing_twin(bridged_hf_model, attn_implementation)
        names = _module_names(bridged_hf_model)
        self.hook_modules: dict[str, nn.Module] = {}
        for index, block in enumerate(bridge.blocks):
            self.hook_modules[f"blocks.{index}.hook_out"] = self._twin_module(names, block, f"blocks.{index}")
        self.hook_modules[EMBED_OUT] = self._twin_module(names, bridge.embed, "embed")

    def _twin_module(self, names: dict[int, str], bridged: nn.Module, label: str) -> nn.Module:
        name = names.get(id(bridged))
        if name is None:
            raise PlainDecoderError(f"the bridge's {label} is not a module of its HF model; cannot map its hook")
        return self.model.get_submodule(_plain_name(name))

    @property
    def attn_implementation(self) -> str:
        return str(self.model.config._attn_implementation)

    def _torch_hook(self, name: str, fn: Callable) -> Callable:
        info = HookInfo(name)

        def hook(module: nn.Module, inputs: Any, output: Any) -> Any:
            hidden = output[0] if isinstance(output, tuple) else output
            new = fn(hidden, info)
            if new is None or new is hidden:
                return None  # unchanged
            return (new, *output[1:]) if isinstance(output, tuple) else new

        return hook

    @contextmanager
    def hooks(self, fwd_hooks: Sequence[tuple[str, Callable]] = ()) -> Iterator["PlainDecoder"]:
        """Register ``(hook_name, fn(x, hook) -> x)`` pairs on the twin; same call as the bridge's ``hooks``.

        Hooks at one point run in the order given. All are removed on exit, also on error.
        """
        handles = []
        try:
            for name, fn in fwd_hooks:
                if not (name == EMBED_OUT or _BLOCK_OUT.match(name)):
                    raise PlainDecoderError(
                        f"hook point {name!r} is not available on the plain decoder (it has {EMBED_OUT!r} and "
                        "'blocks.{i}.hook_out'); run analysis hooks on the bridge instead"
                    )
                if name not in self.hook_modules:
                    raise PlainDecoderError(f"hook point {name!r}: the model has {len(self.hook_modules) - 1} blocks")
                handles.append(self.hook_modules[name].register_forward_hook(self._torch_hook(name, fn)))
            yield self
        finally:
            for handle in handles:
                handle.remove()


@dataclass(frozen=True)
class BridgeDecoder:
    """Decoding through the bridge itself: its HF model (whose layers are the bridge blocks) with bridge hooks.

    The fallback of :func:`make_decoder` when no plain twin can be built; same interface as
    :class:`PlainDecoder`, same results, about 0.75x the speed.
    """

    model: Any
    bridge: Any
    attn_implementation: str = "bridge (eager)"

    def hooks(self, fwd_hooks: Sequence[tuple[str, Callable]] = ()):
        return self.bridge.hooks(fwd_hooks=fwd_hooks)


def make_decoder(bridge, bridged_hf_model) -> PlainDecoder | BridgeDecoder:
    """The plain twin, or decoding through the bridge (with a warning) where the twin cannot be built."""
    try:
        return PlainDecoder(bridge, bridged_hf_model)
    except Exception as exc:  # noqa: BLE001 - any architecture-specific failure: decode through the bridge
        log.warning("generation will run through the TransformerLens bridge (about 0.75x speed): "
                    "no plain twin of %s (%s: %s)", type(bridged_hf_model).__name__, type(exc).__name__, exc)
        return BridgeDecoder(model=bridged_hf_model, bridge=bridge)
