"""pipeline.hub against the local fake Hub (tests/fake_hub_server.py): download both layouts, upload a run."""
from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import pytest
import torch

from pipeline import hub
from steering.axis_io import AxisBundle, AxisFileError, AxisMetadata, load_axis, save_axis
from tests.fake_hub_server import FakeHub

L, D = 4, 8


def _pt_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def paper_files(model: str = "tiny-model") -> dict[str, bytes]:
    torch.manual_seed(0)
    axis = torch.randn(L, D)
    vector = -axis[2] / axis[2].norm()
    capping = {
        "vectors": {"layer_2": {"layer": 2, "vector": vector}},
        "experiments": [{"id": "layers_2:3-p0.25", "interventions": [{"vector": "layer_2", "cap": 1.5}]}],
    }
    return {
        f"{model}/assistant_axis.pt": _pt_bytes(axis),
        f"{model}/role_vectors/pirate.pt": _pt_bytes(torch.randn(L, D)),
        f"{model}/role_vectors/ghost.pt": _pt_bytes(torch.randn(L, D)),
        f"{model}/capping_config.pt": _pt_bytes(capping),
        "other-model/assistant_axis.pt": _pt_bytes(torch.randn(L + 1, D)),
        "README.md": b"# vectors\n",
    }


@pytest.fixture
def fake_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # conftest sets HF_HUB_OFFLINE=1
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # no saved token from the machine
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    with FakeHub() as server:
        monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
        yield server


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    torch.manual_seed(1)
    bundle = AxisBundle(
        axis=torch.randn(L, D),
        metadata=AxisMetadata(model_id="tiny/model", revision="abc123", thresholds={"p0.25": [0.1, 0.2, 0.3, 0.4]},
                              settings={"min_score": 3}),
        default_vector=torch.randn(L, D),
        role_vectors={"pirate": torch.randn(L, D)},
    )
    save_axis(run / "axis.safetensors", bundle)
    (run / "vectors.safetensors").write_bytes(b"not really safetensors, copied as is")
    (run / "manifest.json").write_text(json.dumps({"model": {"model_id": "tiny/model", "revision": "abc123"},
                                                   "steps": {"generate": {"settings": {"seed": 7}}},
                                                   "versions": {"torch": "2.13.0"}}))
    return run


def _digest(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_download_paper_layout(fake_hub: FakeHub, tmp_path: Path) -> None:
    fake_hub.add_repo(hub.PAPER_REPO, paper_files())
    assert hub.list_axis_folders() == {"other-model": "paper", "tiny-model": "paper"}
    got = hub.download_axis(hub.PAPER_REPO, "tiny-model", cache_dir=tmp_path / "cache", role_vectors=True,
                            expect_shape=(L, D))
    assert got.layout == "paper" and got.bundle.axis.shape == (L, D)
    assert sorted(got.bundle.role_vectors) == ["ghost", "pirate"]
    assert got.capping is not None and "layers_2:3-p0.25" in got.capping.experiments
    floors = got.capping.as_axis_floors("layers_2:3-p0.25")
    assert floors[0].layer == 2 and floors[0].lo == pytest.approx(-1.5)
    assert got.commit and got.bundle.metadata.source.startswith("hf:lu-christina/assistant-axis-vectors/tiny-model@")
    # Only the files asked for were fetched (no other model, no README).
    fetched = {p for m, p in fake_hub.requests if m == "GET" and "/resolve/" in p}
    assert not any("other-model" in p or "README" in p for p in fetched)


def test_download_without_role_vectors_skips_them(fake_hub: FakeHub, tmp_path: Path) -> None:
    fake_hub.add_repo(hub.PAPER_REPO, paper_files())
    got = hub.download_axis(folder="tiny-model", cache_dir=tmp_path / "cache")
    assert got.bundle.role_vectors == {}
    assert not any("role_vectors" in p for _, p in fake_hub.requests if "/resolve/" in p)


def test_download_native_layout(fake_hub: FakeHub, run_dir: Path, tmp_path: Path) -> None:
    fake_hub.add_folder("someone/axes", run_dir, prefix="tiny/", repo_type="model")
    got = hub.download_axis("someone/axes", repo_type="model", cache_dir=tmp_path / "cache")
    assert got.layout == "native" and got.folder == "tiny"
    assert got.bundle.metadata.thresholds == {"p0.25": [0.1, 0.2, 0.3, 0.4]}
    assert torch.equal(got.bundle.axis, load_axis(run_dir / "axis.safetensors").axis)


def test_download_errors(fake_hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_hub.add_repo(hub.PAPER_REPO, paper_files())
    with pytest.raises(hub.HubMissingFilesError, match="several axes; choose a folder: other-model, tiny-model"):
        hub.download_axis(cache_dir=tmp_path / "c")
    with pytest.raises(hub.HubMissingFilesError, match="no axis.safetensors or assistant_axis.pt in folder 'gemma'"):
        hub.download_axis(folder="gemma", cache_dir=tmp_path / "c")
    with pytest.raises(hub.HubNotFoundError, match="repository not found"):
        hub.download_axis("nobody/nothing", cache_dir=tmp_path / "c")
    with pytest.raises(hub.HubNotFoundError, match="revision"):
        hub.download_axis(folder="tiny-model", revision="v9", cache_dir=tmp_path / "c")
    with pytest.raises(AxisFileError, match=r"axis shape \[5, 8\].*does not fit model m with 4 layers"):
        hub.download_axis(folder="other-model", cache_dir=tmp_path / "c", expect_shape=(L, D), model_id="m")
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(hub.HubNetworkError, match="HF_HUB_OFFLINE=1"):
        hub.download_axis(folder="tiny-model", cache_dir=tmp_path / "c")


def test_download_no_network(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    server = FakeHub()
    endpoint = server.endpoint
    server.stop()  # nothing listens on the port any more
    with pytest.raises(hub.HubNetworkError, match="cannot reach the Hub"):
        hub.download_axis(folder="x", endpoint=endpoint, cache_dir=tmp_path / "c")


def test_upload_run(fake_hub: FakeHub, run_dir: Path, tmp_path: Path) -> None:
    before = _digest(run_dir)
    report = hub.upload_run(run_dir, "tester/my-axis", token="hf_test_token", folder="tiny")
    assert _digest(run_dir) == before
    repo = fake_hub.repo("tester/my-axis")
    assert repo is not None and report.commit_oid == repo.branches["main"]
    assert set(repo.files) == {"README.md", "tiny/axis.safetensors", "tiny/vectors.safetensors",
                               "tiny/manifest.json", "tiny/thresholds.json", "tiny/assistant_axis.pt"}
    card = repo.files["README.md"].decode()
    assert "tiny/model" in card and "abc123" in card and "2601.10387" in card and "p0.25" in card
    assert '"seed": 7' in card and '"min_score": 3' in card and '"torch": "2.13.0"' in card
    assert json.loads(repo.files["tiny/thresholds.json"])["thresholds"]["p0.25"] == [0.1, 0.2, 0.3, 0.4]
    # Round trip: what was uploaded downloads again as the same axis.
    got = hub.download_axis("tester/my-axis", "tiny", cache_dir=tmp_path / "cache")
    assert torch.equal(got.bundle.axis, load_axis(run_dir / "axis.safetensors").axis)
    # A second upload to the same repo works (create_repo exist_ok).
    hub.upload_run(run_dir, "tester/my-axis", token="hf_test_token", folder="tiny")


def test_upload_failures_leave_run_intact(fake_hub: FakeHub, run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before = _digest(run_dir)
    with pytest.raises(hub.HubAuthError, match="needs a Hugging Face token"):
        hub.upload_run(run_dir, "tester/my-axis")
    assert not any(m == "POST" for m, _ in fake_hub.requests)  # failed before any request
    with pytest.raises(hub.HubAuthError, match="refused the token"):
        hub.upload_run(run_dir, "tester/my-axis", token="wrong")
    fake_hub.fail("commit", 500)
    with pytest.raises(hub.HubError, match=r"HTTP 500.*Nothing was changed in"):
        hub.upload_run(run_dir, "tester/my-axis", token="hf_test_token")
    assert fake_hub.repo("tester/my-axis").files == {}  # created, but the commit never landed
    assert _digest(run_dir) == before
    with pytest.raises(hub.HubUploadError, match="owner/name"):
        hub.upload_run(run_dir, "no-slash", token="hf_test_token")
    empty = run_dir.parent / "empty-run"
    empty.mkdir()
    with pytest.raises(hub.HubUploadError, match="no axis.safetensors"):
        hub.upload_run(empty, "tester/x", token="hf_test_token")
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")  # token from the environment
    del fake_hub.failures["commit"]
    assert hub.upload_run(run_dir, "tester/from-env").files[0] == "README.md"


def test_cli_download_and_upload(fake_hub: FakeHub, run_dir: Path, tmp_path: Path, capsys,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.cli import main

    fake_hub.add_repo("lu-christina/assistant-axis-vectors", paper_files())
    assert main(["hub-download", "--list"]) == 0
    listed = capsys.readouterr().out
    assert "tiny-model\tpaper" in listed and "other-model\tpaper" in listed
    out = tmp_path / "tiny.safetensors"
    assert main(["hub-download", "--folder", "tiny-model", "--role-vectors", "--out", str(out)]) == 0
    saved = load_axis(out)
    assert saved.axis.shape == (L, D) and set(saved.role_vectors) == {"pirate", "ghost"}
    assert main(["hub-download", "--folder", "no-such-model"]) == 2
    assert "no-such-model" in capsys.readouterr().err
    # upload: no token is a clear error before any request, then a real upload
    assert main(["hub-upload", "--run-dir", str(run_dir), "--repo", "tester/axis"]) == 2
    assert "token" in capsys.readouterr().err.lower()
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    assert main(["hub-upload", "--run-dir", str(run_dir), "--repo", "tester/axis"]) == 0
    assert "axis.safetensors" in fake_hub.repo("tester/axis").files
