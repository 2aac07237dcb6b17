import numpy as np
import pytest
import torch

from steering.calibration import ExperimentId, parse_experiment_id, thresholds_from_projections


def test_thresholds_are_per_layer_quantiles():
    g = torch.Generator().manual_seed(0)
    proj = torch.randn(101, 5, generator=g) * 3 + torch.arange(5)
    tau = thresholds_from_projections(proj, 0.25)
    assert tau.shape == (5,)
    assert np.allclose(tau.numpy(), np.quantile(proj.numpy(), 0.25, axis=0), atol=1e-5)
    for layer in range(5):
        assert abs(float((proj[:, layer] < tau[layer]).float().mean()) - 0.25) < 0.02


def test_threshold_input_errors():
    with pytest.raises(ValueError, match="quantile"):
        thresholds_from_projections(torch.zeros(3, 2), 25)
    with pytest.raises(ValueError, match="N >= 1"):
        thresholds_from_projections(torch.zeros(0, 2), 0.5)


def test_experiment_ids_round_trip_and_slice_semantics():
    exp = parse_experiment_id("layers_46:54-p0.25")
    assert exp == ExperimentId(46, 54, 0.25)
    assert str(exp) == "layers_46:54-p0.25"
    assert exp.layers(64) == list(range(46, 54))
    assert parse_experiment_id("layers_:3-p0.5").layers(10) == [0, 1, 2]
    assert parse_experiment_id("layers_-2:-p0.01").layers(10) == [8, 9]
    with pytest.raises(ValueError, match="layers_A:B-pQ"):
        parse_experiment_id("layers46-54")
