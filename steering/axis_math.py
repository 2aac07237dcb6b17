"""Pure tensor math of the Assistant Axis. All results are fp32 whatever the input dtype.

Shapes: ``L`` layers, ``D`` model width, ``R`` roles, ``N`` responses.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def _f32(x: Tensor) -> Tensor:
    return x.detach().to(torch.float32)


def compute_axis(default_vectors: Tensor, role_vectors: Tensor) -> Tensor:
    """``mean(default) - mean(roles)`` per layer.

    Args:
        default_vectors: ``[L, D]`` (one default vector) or ``[K, L, D]`` (several, averaged).
        role_vectors: ``[R, L, D]`` per-role mean vectors.
    Returns:
        ``[L, D]`` axis; higher projection = more Assistant-like.
    """
    default = _f32(default_vectors)
    if default.dim() == 3:
        default = default.mean(0)
    roles = _f32(role_vectors)
    if roles.dim() != 3:
        raise ValueError(f"role_vectors must be [R, L, D], got shape {tuple(roles.shape)}")
    if roles.shape[0] == 0:
        raise ValueError("role_vectors is empty: at least one role vector is needed to compute an axis")
    if default.shape != roles.shape[1:]:
        raise ValueError(
            f"default vector shape {tuple(default.shape)} does not match role vectors {tuple(roles.shape[1:])}"
        )
    return default - roles.mean(0)


def unit(vectors: Tensor, eps: float = 1e-12) -> Tensor:
    """``vectors / ||vectors||`` along the last dimension, fp32."""
    v = _f32(vectors)
    return v / v.norm(dim=-1, keepdim=True).clamp_min(eps)


def project(activations: Tensor, axis: Tensor) -> Tensor:
    """Scalar projection of activations onto the unit axis, per layer.

    Args:
        activations: ``[..., L, D]`` with ``axis`` ``[L, D]``, or ``[..., D]`` with ``axis`` ``[D]``.
    Returns:
        ``[..., L]`` (or ``[...]``) fp32.
    """
    return (_f32(activations) * unit(axis)).sum(-1)


def cosine_per_layer(a: Tensor, b: Tensor) -> Tensor:
    """Cosine similarity of ``a`` and ``b`` (``[..., L, D]``) along the last dim -> ``[..., L]``."""
    return (unit(a) * unit(b)).sum(-1)


def axis_norm_per_layer(axis: Tensor) -> Tensor:
    """``||axis[l]||`` for every layer -> ``[L]``."""
    return _f32(axis).norm(dim=-1)


@dataclass(frozen=True)
class PCAResult:
    """PCA of role vectors at one layer.

    Attributes:
        components: ``[K, D]`` unit principal directions (PC1 oriented so that its cosine with the
            axis is >= 0; the sign of a PC is otherwise arbitrary).
        explained_variance_ratio: ``[K]``.
        scores: ``[R, K]`` coordinates of each role in PC space.
        mean: ``[D]`` the mean role vector that was subtracted.
        pc1_axis_cosine: cosine of PC1 with the axis (``nan`` without an axis).
    """

    components: Tensor
    explained_variance_ratio: Tensor
    scores: Tensor
    mean: Tensor
    pc1_axis_cosine: float


def pca(role_vectors: Tensor, axis: Tensor | None = None, n_components: int | None = None) -> PCAResult:
    """PCA of ``role_vectors`` ``[R, D]`` (one layer) via SVD of the centred matrix."""
    x = _f32(role_vectors)
    if x.dim() != 2:
        raise ValueError(f"pca expects [R, D] role vectors of one layer, got {tuple(x.shape)}")
    if x.shape[0] < 2:
        raise ValueError("PCA needs at least two role vectors")
    mean = x.mean(0)
    centred = x - mean
    _, s, vh = torch.linalg.svd(centred, full_matrices=False)
    variance = s.pow(2)
    total = variance.sum().clamp_min(1e-30)
    k = min(n_components or vh.shape[0], vh.shape[0])
    components = vh[:k].clone()
    cos = float("nan")
    if axis is not None:
        a = unit(axis)
        cos = float((components[0] * a).sum())
        if cos < 0:
            components[0] = -components[0]
            cos = -cos
    scores = centred @ components.T
    return PCAResult(components, (variance / total)[:k], scores, mean, cos)


@dataclass(frozen=True)
class LayerSummary:
    """Per-layer diagnostics of an axis: each field is ``[L]``."""

    axis_norm: Tensor
    pc1_axis_cosine: Tensor
    pc1_variance_explained: Tensor
    pc2_variance_explained: Tensor


def summarize_layers(role_vectors: Tensor, axis: Tensor) -> LayerSummary:
    """Axis norm, PC1-axis cosine and variance explained by PC1/PC2 for every layer.

    Args:
        role_vectors: ``[R, L, D]``; axis: ``[L, D]``.
    """
    n_layers = axis.shape[0]
    cos, ev1, ev2 = [], [], []
    for layer in range(n_layers):
        result = pca(role_vectors[:, layer], axis[layer], n_components=2)
        cos.append(result.pc1_axis_cosine)
        ev1.append(float(result.explained_variance_ratio[0]))
        ev2.append(float(result.explained_variance_ratio[1]) if len(result.explained_variance_ratio) > 1 else 0.0)
    return LayerSummary(axis_norm_per_layer(axis), torch.tensor(cos), torch.tensor(ev1), torch.tensor(ev2))
