"""import-roles from a local folder, a local git repository and a fake Hugging Face Hub."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
from pathlib import Path
from typing import Iterator

import pytest

from pipeline import role_import as ri
from pipeline.role_import import ImportRolesConfig, RoleImportError, import_roles, parse_source
from pipeline.role_schema import QUESTIONS_FILENAME, RoleDataError, load_role_dir
from tests.fake_hub_server import FakeHub

HAS_GIT = shutil.which("git") is not None


def role_dict(name: str, flavour: str = "") -> dict:
    return {
        "instruction": [{"pos": f"You are a {name}{flavour}, variant {i}."} for i in range(5)],
        "questions": [f"What does a {name} do on day {i}?" for i in range(4)],
        "eval_prompt": f"Is this answer in the role of a {name}? {{question}} {{answer}} Reply 0-3.",
    }


def write_role_set(role_dir: Path, roles=("pirate", "stoic"), questions_in_parent: bool = True,
                   flavour: str = "") -> Path:
    """A role set in the paper layout: data/roles/*.json and data/extraction_questions.jsonl."""
    role_dir.mkdir(parents=True, exist_ok=True)
    (role_dir / "default.json").write_text(
        json.dumps({"instruction": [{"pos": ""}, {"pos": "You are {model_name}."}]}), encoding="utf-8"
    )
    for name in roles:
        (role_dir / f"{name}.json").write_text(json.dumps(role_dict(name, flavour)), encoding="utf-8")
    qdir = role_dir.parent if questions_in_parent else role_dir
    (qdir / QUESTIONS_FILENAME).write_text(
        "".join(json.dumps({"id": i, "question": f"General question {i}?"}) + "\n" for i in range(3)),
        encoding="utf-8",
    )
    return role_dir


def config(source: str, dest: Path, tmp_path: Path, **kw) -> ImportRolesConfig:
    return ImportRolesConfig(source=source, dest_dir=dest, cache_dir=tmp_path / "cache", **kw)


# --------------------------------------------------------------------------- local folders


def test_local_folder_paper_layout(tmp_path: Path) -> None:
    src = write_role_set(tmp_path / "data" / "roles")
    dest = tmp_path / "run" / "roles"
    report = import_roles(config(str(src), dest, tmp_path))
    assert report.kind == "path" and report.revision is None
    assert report.roles == ["pirate", "stoic"] and report.n_questions == 3
    assert sorted(p.name for p in dest.iterdir()) == ["default.json", QUESTIONS_FILENAME, "pirate.json", "stoic.json"]
    assert (dest / "pirate.json").read_bytes() == (src / "pirate.json").read_bytes()  # exact copy
    loaded = load_role_dir(dest)
    assert loaded.names == ["pirate", "stoic"] and loaded.default.instructions[1] == "You are {model_name}."
    assert not list(tmp_path.glob("run/.*"))  # no staging folders left behind


def test_select_roles(tmp_path: Path) -> None:
    src = write_role_set(tmp_path / "roles", roles=("pirate", "stoic", "chef"), questions_in_parent=False)
    report = import_roles(config(str(src), tmp_path / "dest", tmp_path, roles=("chef", "pirate")))
    assert report.roles == ["chef", "pirate"]
    assert sorted(p.stem for p in (tmp_path / "dest").glob("*.json")) == ["chef", "default", "pirate"]
    with pytest.raises(RoleDataError, match="wizard"):
        import_roles(config(str(src), tmp_path / "dest2", tmp_path, roles=("wizard",)))
    assert not (tmp_path / "dest2").exists()


def test_invalid_role_names_file_and_field(tmp_path: Path) -> None:
    src = write_role_set(tmp_path / "roles")
    broken = role_dict("stoic")
    broken["instruction"] = broken["instruction"][:3]
    (src / "stoic.json").write_text(json.dumps(broken), encoding="utf-8")
    with pytest.raises(RoleDataError) as info:
        import_roles(config(str(src), tmp_path / "dest", tmp_path))
    assert "stoic.json" in str(info.value) and "'instruction'" in str(info.value)
    assert not (tmp_path / "dest").exists()


def test_missing_files(tmp_path: Path) -> None:
    src = write_role_set(tmp_path / "a" / "roles")
    (src / "default.json").unlink()
    with pytest.raises(RoleDataError, match="default.json"):
        import_roles(config(str(src), tmp_path / "dest", tmp_path, subdir="."))

    src = write_role_set(tmp_path / "b" / "roles")
    (src.parent / QUESTIONS_FILENAME).unlink()
    with pytest.raises(RoleDataError, match=QUESTIONS_FILENAME):
        import_roles(config(str(src), tmp_path / "dest", tmp_path))

    with pytest.raises(RoleImportError, match="not an existing folder"):
        import_roles(config(str(tmp_path / "nowhere"), tmp_path / "dest", tmp_path))
    with pytest.raises(RoleImportError, match="is a file"):
        import_roles(config(str(src / "pirate.json"), tmp_path / "dest", tmp_path, kind="path"))


def test_duplicate_role_names(tmp_path: Path) -> None:
    src = write_role_set(tmp_path / "roles")
    (src / "Pirate.json").write_text(json.dumps(role_dict("pirate")), encoding="utf-8")
    try:
        with pytest.raises(RoleDataError) as info:
            import_roles(config(str(src), tmp_path / "dest", tmp_path))
    finally:
        (src / "Pirate.json").unlink()
    assert "duplicate" in str(info.value) and "Pirate.json" in str(info.value)


def test_destination_must_be_empty_unless_overwrite(tmp_path: Path) -> None:
    src = write_role_set(tmp_path / "roles")
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "old.json").write_text("{}", encoding="utf-8")
    with pytest.raises(RoleImportError, match="not empty"):
        import_roles(config(str(src), dest, tmp_path))
    import_roles(config(str(src), dest, tmp_path, overwrite=True))
    assert not (dest / "old.json").exists() and (dest / "pirate.json").exists()


@pytest.mark.parametrize(
    ("text", "kind", "location", "revision", "subdir"),
    [
        ("hf:owner/roles", "hf", "owner/roles", None, None),
        ("hf://datasets/owner/roles/data/roles", "hf", "owner/roles", None, "data/roles"),
        ("https://huggingface.co/datasets/owner/roles/tree/v2/data/roles", "hf", "owner/roles", "v2", "data/roles"),
        ("https://github.com/owner/repo.git", "git", "https://github.com/owner/repo.git", None, None),
        ("git@github.com:owner/repo.git", "git", "git@github.com:owner/repo.git", None, None),
        ("file:///srv/roles.git", "git", "file:///srv/roles.git", None, None),
    ],
)
def test_parse_source(text, kind, location, revision, subdir) -> None:
    assert parse_source(text) == ri.RoleSource(kind, location, revision, subdir)


def test_parse_source_hints() -> None:
    with pytest.raises(RoleImportError, match="hf:owner/name"):
        parse_source("owner/name")
    assert parse_source("owner/name", kind="hf").kind == "hf"
    with pytest.raises(RoleImportError, match="owner/name"):
        parse_source("hf:just-a-name")


# --------------------------------------------------------------------------- git


def git(*args: str, cwd: Path) -> str:
    return subprocess.run(
        ["git", "-c", "user.name=Test", "-c", "user.email=test@example.com", "-c", "init.defaultBranch=main",
         "-c", "commit.gpgsign=false", *args],
        cwd=cwd, check=True, capture_output=True, text=True,
    ).stdout.strip()


@pytest.fixture
def git_repo(tmp_path: Path) -> dict:
    """A bare repository with two commits: v1 (pirate, stoic) and main (adds chef, changes pirate)."""
    work = tmp_path / "work"
    work.mkdir()
    git("init", "--quiet", cwd=work)
    write_role_set(work / "data" / "roles")
    (work / "README.md").write_text("role set\n", encoding="utf-8")
    git("add", "-A", cwd=work)
    git("commit", "--quiet", "-m", "v1", cwd=work)
    git("tag", "v1", cwd=work)
    first = git("rev-parse", "HEAD", cwd=work)
    write_role_set(work / "data" / "roles", roles=("pirate", "stoic", "chef"), flavour=" (revised)")
    git("add", "-A", cwd=work)
    git("commit", "--quiet", "-m", "v2", cwd=work)
    second = git("rev-parse", "HEAD", cwd=work)
    bare = tmp_path / "roles.git"
    git("clone", "--quiet", "--bare", str(work), str(bare), cwd=tmp_path)
    return {"bare": bare, "url": bare.as_uri(), "first": first, "second": second, "work": work}


@pytest.mark.skipif(not HAS_GIT, reason="git is not installed")
def test_git_clone_latest(tmp_path: Path, git_repo: dict) -> None:
    report = import_roles(config(git_repo["url"], tmp_path / "dest", tmp_path))
    assert report.kind == "git" and report.revision == git_repo["second"]
    assert report.roles == ["chef", "pirate", "stoic"]
    assert report.source_dir.relative_to(tmp_path / "cache").parts[-2:] == ("data", "roles")
    assert "(revised)" in load_role_dir(tmp_path / "dest")["pirate"].instructions[0]
    # the clone is shallow
    checkout = report.source_dir.parent.parent
    assert git("rev-list", "--count", "HEAD", cwd=checkout) == "1"


@pytest.mark.skipif(not HAS_GIT, reason="git is not installed")
def test_git_revisions(tmp_path: Path, git_repo: dict) -> None:
    by_tag = import_roles(config(git_repo["url"], tmp_path / "a", tmp_path, revision="v1"))
    assert by_tag.revision == git_repo["first"] and by_tag.roles == ["pirate", "stoic"]
    by_sha = import_roles(config(git_repo["url"], tmp_path / "b", tmp_path, revision=git_repo["first"]))
    assert by_sha.revision == git_repo["first"]
    # a plain local path to the repository works with kind="git"
    plain = import_roles(config(str(git_repo["bare"]), tmp_path / "c", tmp_path, kind="git", subdir="data/roles"))
    assert plain.revision == git_repo["second"]
    # importing again refreshes the cached checkout
    again = import_roles(config(git_repo["url"], tmp_path / "a", tmp_path, revision="v1", overwrite=True))
    assert again.revision == git_repo["first"]


@pytest.mark.skipif(not HAS_GIT, reason="git is not installed")
def test_git_errors(tmp_path: Path, git_repo: dict) -> None:
    with pytest.raises(RoleImportError, match="git clone failed"):
        import_roles(config((tmp_path / "missing.git").as_uri(), tmp_path / "dest", tmp_path))
    with pytest.raises(RoleImportError, match="git fetch failed"):
        import_roles(config(git_repo["url"], tmp_path / "dest", tmp_path, revision="no-such-branch"))
    with pytest.raises(RoleImportError, match="'subdir'"):
        import_roles(config(git_repo["url"], tmp_path / "dest", tmp_path, subdir="elsewhere"))
    assert not (tmp_path / "dest").exists()
    assert [p.name for p in (tmp_path / "cache" / "git").iterdir() if p.name.startswith(".")] == []


@pytest.mark.skipif(not HAS_GIT, reason="git is not installed")
def test_git_several_role_folders(tmp_path: Path, git_repo: dict) -> None:
    work = git_repo["work"]
    write_role_set(work / "other" / "roles", roles=("chef",))
    git("add", "-A", cwd=work)
    git("commit", "--quiet", "-m", "second set", cwd=work)
    git("push", "--quiet", str(git_repo["bare"]), "HEAD:main", cwd=work)
    with pytest.raises(RoleImportError, match="several role folders"):
        import_roles(config(git_repo["url"], tmp_path / "dest", tmp_path))
    report = import_roles(config(git_repo["url"], tmp_path / "dest", tmp_path, subdir="other/roles"))
    assert report.roles == ["chef"]


# --------------------------------------------------------------------------- Hugging Face Hub


@pytest.fixture
def fake_hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # the test command sets HF_HUB_OFFLINE=1
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with FakeHub() as hub:
        yield hub


def test_hf_dataset(tmp_path: Path, fake_hub: FakeHub) -> None:
    repo = tmp_path / "repo"
    write_role_set(repo / "data" / "roles")
    (repo / "README.md").write_text("# roles\n", encoding="utf-8")
    head = fake_hub.add_folder("owner/roles", repo).branches["main"]
    report = import_roles(config("hf:owner/roles", tmp_path / "dest", tmp_path, hf_endpoint=fake_hub.endpoint))
    assert report.kind == "hf" and report.revision == head
    assert load_role_dir(tmp_path / "dest").names == ["pirate", "stoic"]
    downloaded = [path for method, path in fake_hub.requests if method == "GET" and "/resolve/" in path]
    assert not any(p.endswith("README.md") for p in downloaded)  # only JSON files are fetched


def test_hf_errors(tmp_path: Path, fake_hub: FakeHub) -> None:
    repo = tmp_path / "repo"
    write_role_set(repo / "roles")
    fake_hub.add_folder("owner/roles", repo)
    with pytest.raises(RoleImportError, match="repository not found"):
        import_roles(config("hf:owner/missing", tmp_path / "dest", tmp_path, hf_endpoint=fake_hub.endpoint))
    with pytest.raises(RoleImportError, match="revision 'v9' not found"):
        import_roles(config("hf:owner/roles", tmp_path / "dest", tmp_path, revision="v9",
                            hf_endpoint=fake_hub.endpoint))
    assert not (tmp_path / "dest").exists()


def test_hf_offline_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(RoleImportError, match="HF_HUB_OFFLINE"):
        import_roles(config("hf:owner/roles", tmp_path / "dest", tmp_path))


# --------------------------------------------------------------------------- command line


def test_cli(tmp_path: Path, capsys) -> None:
    src = write_role_set(tmp_path / "roles")
    parser = argparse.ArgumentParser()
    ri.add_cli(parser.add_subparsers())
    args = parser.parse_args(["import-roles", str(src), "--dest", str(tmp_path / "dest"), "--roles", "stoic"])
    assert args.func(args) == 0
    assert "1 roles and 3 questions" in capsys.readouterr().out
    args = parser.parse_args(["import-roles", str(tmp_path / "none"), "--dest", str(tmp_path / "dest2")])
    assert args.func(args) == 2
    assert "not an existing folder" in capsys.readouterr().err


@pytest.mark.skipif(not HAS_GIT, reason="git is not installed")
def test_git_symlink_outside_is_refused(tmp_path: Path, git_repo: dict) -> None:
    work = git_repo["work"]
    secret = tmp_path / "secret.json"
    secret.write_text(json.dumps(role_dict("chef")), encoding="utf-8")
    (work / "data" / "roles" / "chef.json").unlink()
    (work / "data" / "roles" / "chef.json").symlink_to(secret)
    git("add", "-A", cwd=work)
    git("commit", "--quiet", "-m", "link", cwd=work)
    git("push", "--quiet", str(git_repo["bare"]), "HEAD:main", cwd=work)
    with pytest.raises(RoleImportError, match="outside the imported source"):
        import_roles(config(git_repo["url"], tmp_path / "dest", tmp_path))
