"""Layer selections written as text, one syntax for the CLI, the app and the library.

``all`` · ``middle`` · ``12`` · ``-1`` (from the end) · ``10-14`` (inclusive range) ·
``10:15`` or ``10:20:2`` (Python slice) · comma lists of those (``3,5,10-12``).
"""
from __future__ import annotations

import re
from typing import Sequence

_SLICE = re.compile(r"^(-?\d*):(-?\d*)(?::(\d*))?$")
_RANGE = re.compile(r"^(-?\d+)-(-?\d+)$")


class LayerSpecError(ValueError):
    """A layer selection that cannot be read or does not fit the model."""


def parse_layer_spec(spec: str | Sequence[int] | None, n_layers: int, default: str = "all") -> list[int]:
    """Sorted unique layer indices in ``0..n_layers-1`` selected by ``spec`` (``None``/empty -> ``default``)."""
    if spec is not None and not isinstance(spec, str):
        chosen = [int(layer) for layer in spec]
        return _check([l + n_layers if l < 0 else l for l in chosen], n_layers, str(list(spec)))
    text = (spec or "").strip().lower() or default
    if text == "all":
        return list(range(n_layers))
    if text in ("middle", "mid"):
        return [n_layers // 2]
    layers: list[int] = []
    for part in (re.sub(r"\s+", "", p) for p in text.split(",")):
        if not part:
            continue
        if (m := _SLICE.match(part)) is not None:
            a, b, step = m.groups()
            layers += range(n_layers)[slice(int(a) if a else None, int(b) if b else None, int(step) if step else None)]
        elif (m := _RANGE.match(part)) is not None:
            a, b = int(m.group(1)), int(m.group(2))
            if a > b:
                raise LayerSpecError(f"layers {part!r}: the range runs backwards")
            layers += [l + n_layers if l < 0 else l for l in range(a, b + 1)]
        elif re.fullmatch(r"-?\d+", part):
            layer = int(part)
            layers.append(layer + n_layers if layer < 0 else layer)
        else:
            raise LayerSpecError(f"layers {part!r}: write e.g. '20', '18-24', '18:25', '18,20,22', 'middle' or 'all'")
    return _check(layers, n_layers, text)


def _check(layers: list[int], n_layers: int, text: str) -> list[int]:
    bad = [l for l in layers if not 0 <= l < n_layers]
    if bad:
        raise LayerSpecError(f"layer {bad[0]} is outside the model's 0..{n_layers - 1} (from {text!r})")
    if not layers:
        raise LayerSpecError(f"layers {text!r} select no layer of a {n_layers}-layer model")
    return sorted(set(layers))


def default_capping_band(n_layers: int) -> str:
    """A capping band in the paper's region (roughly 70-85% of the depth), as ``a:b`` slice text."""
    start = max(0, int(round(0.70 * n_layers)))
    stop = max(start + 1, int(round(0.85 * n_layers)))
    return f"{start}:{min(stop, n_layers)}"
