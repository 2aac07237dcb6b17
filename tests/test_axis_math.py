import numpy as np
import pytest
import torch
from sklearn.decomposition import PCA

from steering.axis_math import (axis_norm_per_layer, compute_axis, cosine_per_layer, pca, project,
                                summarize_layers, unit)


def test_axis_is_default_minus_mean_role_per_layer():
    g = torch.Generator().manual_seed(0)
    roles = torch.randn(7, 3, 16, generator=g)
    default = torch.randn(3, 16, generator=g)
    axis = compute_axis(default, roles)
    manual = torch.stack([default[l] - roles[:, l].mean(0) for l in range(3)])
    assert axis.dtype == torch.float32
    assert torch.allclose(axis, manual, atol=1e-6)
    several_defaults = torch.stack([default + 1.0, default - 1.0])
    assert torch.allclose(compute_axis(several_defaults, roles), manual, atol=1e-6)


def test_axis_shape_errors_are_clear():
    with pytest.raises(ValueError, match="does not match"):
        compute_axis(torch.zeros(3, 8), torch.zeros(2, 3, 9))
    with pytest.raises(ValueError, match="empty"):
        compute_axis(torch.zeros(3, 8), torch.zeros(0, 3, 8))


def test_projection_is_dot_with_unit_axis_in_fp32():
    g = torch.Generator().manual_seed(1)
    acts = torch.randn(5, 3, 16, generator=g)
    axis = torch.randn(3, 16, generator=g) * 7
    proj = project(acts.to(torch.bfloat16), axis.to(torch.bfloat16))
    assert proj.shape == (5, 3) and proj.dtype == torch.float32
    expected = np.einsum("nld,ld->nl", acts.to(torch.bfloat16).float().numpy(),
                         (axis.to(torch.bfloat16).float() / axis.to(torch.bfloat16).float().norm(dim=-1, keepdim=True)).numpy())
    assert np.allclose(proj.numpy(), expected, atol=1e-4)
    # scaling the axis does not change projections
    assert torch.allclose(project(acts, axis), project(acts, axis * 0.01), atol=1e-5)


def test_cosine_and_norm_per_layer():
    a = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    b = torch.tensor([[0.0, 2.0], [-3.0, -3.0]])
    assert torch.allclose(cosine_per_layer(a, b), torch.tensor([0.0, -1.0]), atol=1e-6)
    assert torch.allclose(axis_norm_per_layer(b), torch.tensor([2.0, float(np.sqrt(18))]), atol=1e-5)
    assert torch.allclose(unit(b).norm(dim=-1), torch.ones(2))


def test_pca_matches_sklearn_and_pc1_aligns_with_generating_axis():
    g = torch.Generator().manual_seed(2)
    direction = torch.randn(32, generator=g)
    spread = torch.linspace(-5, 5, 40).unsqueeze(1)
    roles = 3.0 + spread * unit(direction) + 0.3 * torch.randn(40, 32, generator=g)
    result = pca(roles, axis=-direction, n_components=4)
    reference = PCA(n_components=4).fit(roles.numpy())
    assert np.allclose(result.explained_variance_ratio.numpy(), reference.explained_variance_ratio_, atol=1e-4)
    assert result.pc1_axis_cosine > 0.98  # oriented towards the axis even though it was given negated
    assert torch.allclose(result.components.norm(dim=-1), torch.ones(4), atol=1e-5)
    assert result.scores.shape == (40, 4)


def test_summarize_layers_shapes():
    g = torch.Generator().manual_seed(3)
    roles = torch.randn(6, 4, 8, generator=g)
    axis = compute_axis(torch.randn(4, 8, generator=g), roles)
    summary = summarize_layers(roles, axis)
    for field in (summary.axis_norm, summary.pc1_axis_cosine, summary.pc1_variance_explained):
        assert field.shape == (4,)
    assert bool(((summary.pc1_variance_explained + summary.pc2_variance_explained) <= 1 + 1e-6).all())
