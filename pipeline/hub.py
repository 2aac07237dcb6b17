"""Assistant Axes on the Hugging Face Hub: download one, or publish a run's axis.

Two repository layouts are read:

* **native** (what :func:`upload_run` writes): ``[<folder>/]axis.safetensors`` in the format of
  :mod:`steering.axis_io` (axis, optional default/role vectors, metadata with thresholds), plus
  optionally ``vectors.safetensors`` and ``thresholds.json``;
* **paper** (``lu-christina/assistant-axis-vectors``, a dataset repo): ``<model>/assistant_axis.pt``,
  ``<model>/role_vectors/<role>.pt`` and ``<model>/capping_config.pt``.

Every failure is raised as a :class:`HubError` subclass whose message says what to do:
:class:`HubAuthError` (no token, or the token is refused), :class:`HubNetworkError` (offline,
unreachable endpoint), :class:`HubNotFoundError` (repository or revision), :class:`HubMissingFilesError`
(the repository lacks the files) and :class:`HubUploadError`. An axis that does not fit a model
raises :class:`steering.axis_io.AxisFileError` from ``AxisBundle.check_compatible``.

The endpoint is ``endpoint=`` if given, else ``$HF_ENDPOINT`` read at call time (huggingface_hub
itself reads it once, at import), else the public Hub. Uploads are staged in a temporary folder
and sent as one commit, so the run directory is only ever read.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal

import torch

from steering.axis_io import AxisBundle, AxisFileError, load_axis, load_role_vectors
from steering.capping_config import CappingConfig, load_capping_config
from steering.models import hub_offline

__all__ = [
    "PAPER_REPO", "PAPER_REPO_TYPE", "NATIVE_AXIS_FILE", "PAPER_AXIS_FILE", "PAPER_ROLE_DIR", "PAPER_CAPPING_FILE",
    "PAPER_CITATION", "HubError", "HubAuthError", "HubNetworkError", "HubNotFoundError", "HubMissingFilesError",
    "HubUploadError", "HubAxis", "UploadReport", "hub_endpoint", "resolve_token", "list_axis_folders",
    "download_axis", "dataset_card", "stage_run_for_upload", "upload_run",
]

PAPER_REPO = "lu-christina/assistant-axis-vectors"
PAPER_REPO_TYPE = "dataset"
NATIVE_AXIS_FILE = "axis.safetensors"
NATIVE_VECTORS_FILE = "vectors.safetensors"
THRESHOLDS_FILE = "thresholds.json"
PAPER_AXIS_FILE = "assistant_axis.pt"
PAPER_ROLE_DIR = "role_vectors"
PAPER_CAPPING_FILE = "capping_config.pt"
REPO_TYPES = ("dataset", "model")

PAPER_CITATION = """@article{lu2026assistantaxis,
  title   = {The Assistant Axis: Situating and Stabilizing the Default Persona of Language Models},
  author  = {Lu, Christina and Gallagher, Jack and Michala, Jonathan and Fish, Kyle and Lindsey, Jack},
  journal = {arXiv preprint arXiv:2601.10387},
  year    = {2026}
}"""

Layout = Literal["native", "paper"]


class HubError(RuntimeError):
    """Something went wrong talking to the Hub; the message names the repository and the fix."""


class HubAuthError(HubError):
    """No token was available, or the Hub refused it."""


class HubNetworkError(HubError):
    """The Hub could not be reached (offline mode, no network, wrong endpoint)."""


class HubNotFoundError(HubError):
    """The repository or the revision does not exist (or is private and the token has no access)."""


class HubMissingFilesError(HubError):
    """The repository exists but does not hold the files asked for."""


class HubUploadError(HubError):
    """An upload failed; the local files were not changed."""


# --------------------------------------------------------------------------- settings


def hub_endpoint(endpoint: str | None = None) -> str:
    """The Hub URL to use: ``endpoint``, else ``$HF_ENDPOINT`` now, else huggingface_hub's default."""
    if endpoint:
        return endpoint.rstrip("/")
    from_env = os.environ.get("HF_ENDPOINT", "").strip()
    if from_env:
        return from_env.rstrip("/")
    from huggingface_hub import constants

    return constants.ENDPOINT.rstrip("/")


def resolve_token(token: str | None = None, *, required: bool = False, action: str = "this") -> str | None:
    """``token`` if given, else ``$HF_TOKEN``, else the token saved by ``hf auth login``.

    With ``required`` a missing token raises :class:`HubAuthError`.
    """
    if token and token.strip():
        return token.strip()
    from_env = os.environ.get("HF_TOKEN", "").strip()
    if from_env:
        return from_env
    try:
        from huggingface_hub import get_token

        saved = get_token()
    except Exception:  # a broken token file must not hide the real message
        saved = None
    if saved:
        return saved
    if required:
        raise HubAuthError(
            f"{action} needs a Hugging Face token with write access: sign in with the Hugging Face button "
            "(on a Space), paste a token, or set HF_TOKEN (https://huggingface.co/settings/tokens)"
        )
    return None


def _repo_label(repo_id: str, repo_type: str, revision: str | None = None) -> str:
    kind = "dataset" if repo_type == "dataset" else "model" if repo_type == "model" else repo_type
    return f"{kind} repo {repo_id!r}" + (f" at revision {revision!r}" if revision else "")


def _check_repo_type(repo_type: str) -> None:
    if repo_type not in REPO_TYPES:
        raise HubError(f"repo type must be one of {', '.join(REPO_TYPES)}; got {repo_type!r}")


@contextmanager
def _hub_errors(what: str, endpoint: str) -> Iterator[None]:
    """Translate huggingface_hub / HTTP exceptions into :class:`HubError` subclasses."""
    import httpx2
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    offline_hint = (
        "HF_HUB_OFFLINE=1 is set, so nothing can be fetched from the Hub; unset it (or use a local axis file)"
    )
    try:
        yield
    except HubError:
        raise
    except OfflineModeIsEnabled:
        raise HubNetworkError(f"{what}: {offline_hint}") from None
    except GatedRepoError:
        raise HubAuthError(f"{what}: the repository is gated; accept its terms on the Hub and use a token") from None
    except RevisionNotFoundError:
        raise HubNotFoundError(f"{what}: revision not found") from None
    except RepositoryNotFoundError:
        raise HubNotFoundError(
            f"{what}: repository not found at {endpoint} (check the name and the repo type; "
            "a private repository also needs a token with access)"
        ) from None
    except RemoteEntryNotFoundError as exc:
        raise HubMissingFilesError(f"{what}: file not found in the repository ({_first_line(exc)})") from None
    except LocalEntryNotFoundError as exc:
        if hub_offline():
            raise HubNetworkError(f"{what}: {offline_hint}") from None
        raise HubNetworkError(f"{what}: the Hub at {endpoint} could not be reached and nothing is cached "
                              f"({_first_line(exc)})") from None
    except HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status in (401, 403):
            raise HubAuthError(f"{what}: the Hub refused the token (HTTP {status}); "
                               "use a token with write access to this namespace") from None
        raise HubError(f"{what}: the Hub answered HTTP {status}: {_first_line(exc)}") from None
    except (httpx2.TransportError, ConnectionError, TimeoutError) as exc:
        raise HubNetworkError(f"{what}: cannot reach the Hub at {endpoint} ({type(exc).__name__}: {exc})") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# --------------------------------------------------------------------------- download


@dataclass
class HubAxis:
    """An axis fetched from the Hub, with what came with it."""

    bundle: AxisBundle
    layout: Layout
    repo_id: str
    repo_type: str
    commit: str | None
    folder: str  # folder inside the repo ("" = root)
    files: dict[str, Path] = field(default_factory=dict)  # repo path -> local path
    capping: CappingConfig | None = None

    @property
    def source(self) -> str:
        where = f"{self.repo_id}/{self.folder}".rstrip("/")
        return f"hf:{where}" + (f"@{self.commit[:12]}" if self.commit else "")

    def summary(self) -> dict[str, Any]:
        meta = self.bundle.metadata
        return {
            "source": self.source,
            "layout": self.layout,
            "shape": [self.bundle.n_layers, self.bundle.d_model],
            "model_id": meta.model_id,
            "thresholds": sorted(meta.thresholds),
            "role_vectors": len(self.bundle.role_vectors),
            "capping_experiments": sorted(self.capping.experiments) if self.capping else [],
            "files": sorted(self.files),
        }


def _axis_folders(paths: list[str]) -> dict[str, Layout]:
    """``{folder: layout}`` for every folder (``""`` = root) holding an axis file."""
    found: dict[str, Layout] = {}
    for path in paths:
        folder, _, name = path.rpartition("/")
        if name == NATIVE_AXIS_FILE:
            found[folder] = "native"
        elif name == PAPER_AXIS_FILE and folder not in found:
            found[folder] = "paper"
    return dict(sorted(found.items()))


def _repo_files(repo_id: str, repo_type: str, revision: str | None, token: str | None,
                endpoint: str) -> tuple[list[str], str | None]:
    from huggingface_hub import HfApi

    if hub_offline():
        raise HubNetworkError(
            f"{_repo_label(repo_id, repo_type, revision)}: HF_HUB_OFFLINE=1 is set, so nothing can be fetched "
            "from the Hub; unset it (or use a local axis file)"
        )
    api = HfApi(endpoint=endpoint, token=token)
    with _hub_errors(_repo_label(repo_id, repo_type, revision), endpoint):
        info = api.repo_info(repo_id, repo_type=repo_type, revision=revision)
    files = [s.rfilename for s in (info.siblings or [])]
    return files, info.sha


def list_axis_folders(repo_id: str = PAPER_REPO, *, repo_type: str = PAPER_REPO_TYPE, revision: str | None = None,
                      token: str | None = None, endpoint: str | None = None) -> dict[str, Layout]:
    """Folders of a repository that hold an axis, with their layout (``""`` is the root)."""
    _check_repo_type(repo_type)
    url = hub_endpoint(endpoint)
    files, _ = _repo_files(repo_id, repo_type, revision, resolve_token(token), url)
    return _axis_folders(files)


def download_axis(
    repo_id: str = PAPER_REPO,
    folder: str | None = None,
    *,
    repo_type: str = PAPER_REPO_TYPE,
    revision: str | None = None,
    token: str | None = None,
    endpoint: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    role_vectors: bool = False,
    capping: bool = True,
    expect_shape: tuple[int, int] | None = None,
    model_id: str | None = None,
) -> HubAxis:
    """Download the axis in ``folder`` of a repository (native or paper layout) and load it.

    ``folder`` may be omitted when the repository holds exactly one axis. With ``role_vectors`` the
    role vectors come too (paper layout: one file per role, up to a few hundred MB for large models).
    With ``expect_shape=(n_layers, d_model)`` an axis that does not fit raises ``AxisFileError``.
    """
    _check_repo_type(repo_type)
    from huggingface_hub import snapshot_download

    url = hub_endpoint(endpoint)
    token = resolve_token(token)
    label = _repo_label(repo_id, repo_type, revision)
    files, commit = _repo_files(repo_id, repo_type, revision, token, url)
    folders = _axis_folders(files)
    folder = (folder or "").strip().strip("/")
    if not folder and "" not in folders:
        if len(folders) == 1:
            folder = next(iter(folders))
        elif folders:
            raise HubMissingFilesError(
                f"{label} holds several axes; choose a folder: {', '.join(f or '(root)' for f in folders)}"
            )
    if folder not in folders:
        where = f"folder {folder!r}" if folder else "the repository root"
        have = ", ".join(f or "(root)" for f in folders) or "none"
        raise HubMissingFilesError(
            f"{label}: no {NATIVE_AXIS_FILE} or {PAPER_AXIS_FILE} in {where} (folders with an axis: {have})"
        )
    layout = folders[folder]
    prefix = f"{folder}/" if folder else ""
    if layout == "native":
        wanted = [prefix + NATIVE_AXIS_FILE] + [p for p in (prefix + THRESHOLDS_FILE,) if p in files]
    else:
        wanted = [prefix + PAPER_AXIS_FILE]
        if capping and prefix + PAPER_CAPPING_FILE in files:
            wanted.append(prefix + PAPER_CAPPING_FILE)
        if role_vectors:
            roles = [p for p in files if p.startswith(prefix + PAPER_ROLE_DIR + "/") and p.endswith(".pt")]
            if not roles:
                raise HubMissingFilesError(f"{label}: no {prefix}{PAPER_ROLE_DIR}/*.pt role vector files")
            wanted += roles
    with _hub_errors(label, url):
        snapshot = snapshot_download(
            repo_id, repo_type=repo_type, revision=commit or revision, token=token, endpoint=url,
            cache_dir=str(cache_dir) if cache_dir is not None else None, allow_patterns=wanted,
        )
    root = Path(snapshot)
    local = {p: root / p for p in wanted}
    missing = [p for p, path in local.items() if not path.is_file()]
    if missing:
        raise HubMissingFilesError(f"{label}: download finished without {', '.join(missing)}")

    try:
        if layout == "native":
            bundle = load_axis(local[prefix + NATIVE_AXIS_FILE])
            capping_config = None
        else:
            bundle = load_axis(local[prefix + PAPER_AXIS_FILE])
            bundle.metadata.model_id = bundle.metadata.model_id or folder or None
            if role_vectors:
                bundle.role_vectors = load_role_vectors(root / prefix / PAPER_ROLE_DIR,
                                                        shape=(bundle.n_layers, bundle.d_model))
            capping_config = (load_capping_config(local[prefix + PAPER_CAPPING_FILE])
                              if prefix + PAPER_CAPPING_FILE in local else None)
    except AxisFileError as exc:
        raise AxisFileError(f"{label}: {exc}") from None
    bundle.metadata.source = f"hf:{repo_id}/{folder}".rstrip("/") + (f"@{commit}" if commit else "")
    if expect_shape is not None:
        bundle.check_compatible(expect_shape[0], expect_shape[1], model_id)
    return HubAxis(bundle=bundle, layout=layout, repo_id=repo_id, repo_type=repo_type, commit=commit,
                   folder=folder, files=local, capping=capping_config)


# --------------------------------------------------------------------------- upload


@dataclass
class UploadReport:
    repo_id: str
    repo_type: str
    repo_url: str
    commit_url: str | None
    commit_oid: str | None
    files: list[str]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _read_manifest(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "manifest.json"
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def dataset_card(bundle: AxisBundle, repo_id: str, files: list[str], manifest: dict[str, Any] | None = None,
                 folder: str = "", repo_type: str = "dataset") -> str:
    """README.md for an uploaded axis: what it is, how it was made, how to load it, and the citation."""
    meta = bundle.metadata
    manifest = manifest or {}
    run_model = manifest.get("model") if isinstance(manifest.get("model"), dict) else {}
    model = meta.model_id or run_model.get("model_id") or "unknown model"
    revision = meta.revision or run_model.get("revision")
    settings = dict(meta.settings)
    steps = manifest.get("steps")
    if isinstance(steps, dict) and "steps" not in settings:
        settings["steps"] = {name: entry.get("settings") for name, entry in steps.items() if isinstance(entry, dict)}
    if isinstance(manifest.get("versions"), dict):
        settings.setdefault("versions", manifest["versions"])
    prefix = f"{folder}/" if folder else ""
    lines = [
        "---",
        "tags:",
        "- assistant-axis",
        "- activation-steering",
        "- interpretability",
        "---",
        "",
        f"# Assistant Axis for `{model}`",
        "",
        "A direction in the residual stream that separates the model's default Assistant persona from the "
        "characters it can be prompted to play, computed as `mean(default vectors) - mean(role vectors)` per "
        "layer, following Lu et al. (2026), *The Assistant Axis* (arXiv:2601.10387). Higher projection means "
        "more Assistant-like.",
        "",
        "| | |",
        "|---|---|",
        f"| Model | `{model}` |",
        f"| Model revision | `{revision or 'not recorded'}` |",
        f"| Layers x width | {bundle.n_layers} x {bundle.d_model} |",
        f"| Layer convention | `{meta.layer_convention}` (output of decoder block *i* = HF `hidden_states[i + 1]`) |",
        f"| Capping thresholds | {', '.join(sorted(meta.thresholds)) or 'none'} |",
        f"| Role vectors in the axis file | {len(bundle.role_vectors)} |",
        "",
        "## Files",
        "",
    ]
    descriptions = {
        NATIVE_AXIS_FILE: "axis `[L, D]` fp32 with metadata (safetensors; `steering.axis_io.load_axis`)",
        NATIVE_VECTORS_FILE: "per-role and default mean vectors of the run",
        THRESHOLDS_FILE: "capping thresholds tau per layer, by quantile (`p0.25` = 25th percentile)",
        PAPER_AXIS_FILE: "the same axis as a raw tensor, in the layout of `lu-christina/assistant-axis-vectors`",
        "manifest.json": "the run's manifest (settings, model, package versions)",
    }
    for name in files:
        if name == "README.md":
            continue
        short = name[len(prefix):] if name.startswith(prefix) else name
        lines.append(f"- `{name}`: {descriptions.get(short, '')}".rstrip(": "))
    if settings:
        lines += ["", "## Settings", "", "```json", json.dumps(settings, indent=2, default=str, sort_keys=True), "```"]
    lines += [
        "",
        "## Loading",
        "",
        "```python",
        "from huggingface_hub import hf_hub_download",
        "from steering.axis_io import load_axis  # Assistant Axis Lab",
        "",
        f"bundle = load_axis(hf_hub_download({repo_id!r}, {prefix + NATIVE_AXIS_FILE!r}, repo_type={repo_type!r}))",
        "axis = bundle.axis  # [n_layers, d_model]",
        "```",
        "",
        "## Citation",
        "",
        "```bibtex",
        PAPER_CITATION,
        "```",
        "",
    ]
    return "\n".join(lines)


def stage_run_for_upload(run_dir: str | os.PathLike, staging: str | os.PathLike, repo_id: str,
                         folder: str = "", paper_copy: bool = True, repo_type: str = "dataset") -> list[str]:
    """Copy what gets published from ``run_dir`` into ``staging``; returns the repo paths.

    Published: ``axis.safetensors`` (required), ``vectors.safetensors`` and ``manifest.json`` when
    present, ``thresholds.json`` (from the axis metadata), ``assistant_axis.pt`` (paper layout, with
    ``paper_copy``) and ``README.md`` (:func:`dataset_card`). ``run_dir`` is only read.
    """
    run = Path(run_dir)
    axis_path = run / NATIVE_AXIS_FILE
    if not axis_path.is_file():
        raise HubUploadError(f"{run}: no {NATIVE_AXIS_FILE}; run the axis step first (nothing was uploaded)")
    bundle = load_axis(axis_path)
    folder = folder.strip().strip("/")
    out = Path(staging) / folder if folder else Path(staging)
    out.mkdir(parents=True, exist_ok=True)
    prefix = f"{folder}/" if folder else ""
    names: list[str] = []
    shutil.copyfile(axis_path, out / NATIVE_AXIS_FILE)
    names.append(NATIVE_AXIS_FILE)
    for optional in (NATIVE_VECTORS_FILE, "manifest.json"):
        if (run / optional).is_file():
            shutil.copyfile(run / optional, out / optional)
            names.append(optional)
    if bundle.metadata.thresholds:
        (out / THRESHOLDS_FILE).write_text(json.dumps({
            "layer_convention": bundle.metadata.layer_convention,
            "model_id": bundle.metadata.model_id,
            "thresholds": bundle.metadata.thresholds,
        }, indent=2) + "\n", encoding="utf-8")
        names.append(THRESHOLDS_FILE)
    if paper_copy:
        torch.save(bundle.axis.clone(), out / PAPER_AXIS_FILE)
        names.append(PAPER_AXIS_FILE)
    repo_paths = [prefix + n for n in names]
    card = dataset_card(bundle, repo_id, repo_paths, _read_manifest(run), folder, repo_type)
    card_path = Path(staging) / "README.md"
    card_path.write_text(card, encoding="utf-8")
    return ["README.md"] + repo_paths


def upload_run(
    run_dir: str | os.PathLike,
    repo_id: str,
    *,
    token: str | None = None,
    repo_type: str = "dataset",
    private: bool = False,
    folder: str = "",
    endpoint: str | None = None,
    commit_message: str | None = None,
    paper_copy: bool = True,
) -> UploadReport:
    """Publish a run's axis, vectors, thresholds and a dataset card to ``repo_id`` in one commit.

    The repository is created if needed. Raises :class:`HubAuthError` without a token (before any
    request), :class:`HubUploadError` when the run has no axis, and a :class:`HubError` subclass when
    the Hub fails; the run directory is never modified.
    """
    _check_repo_type(repo_type)
    if not repo_id or repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise HubUploadError(f"repository name {repo_id!r} must be 'owner/name'")
    token = resolve_token(token, required=True, action=f"uploading to {repo_id}")
    url = hub_endpoint(endpoint)
    from huggingface_hub import CommitOperationAdd, HfApi

    if hub_offline():
        raise HubNetworkError(f"uploading to {repo_id}: HF_HUB_OFFLINE=1 is set, so nothing can be sent to the Hub; "
                              "unset it to upload")
    with tempfile.TemporaryDirectory(prefix="axis-upload-") as staging:
        paths = stage_run_for_upload(run_dir, staging, repo_id, folder=folder, paper_copy=paper_copy,
                                     repo_type=repo_type)
        api = HfApi(endpoint=url, token=token)
        label = f"uploading to {_repo_label(repo_id, repo_type)}"
        try:
            with _hub_errors(label, url):
                repo_url = api.create_repo(repo_id, repo_type=repo_type, private=private, exist_ok=True)
                operations = [CommitOperationAdd(path_in_repo=p, path_or_fileobj=str(Path(staging) / p))
                              for p in paths]
                info = api.create_commit(
                    repo_id, operations, repo_type=repo_type,
                    commit_message=commit_message or f"Upload Assistant Axis from {Path(run_dir).name}",
                )
        except HubError as exc:
            raise type(exc)(f"{exc}. Nothing was changed in {run_dir}") from None
    return UploadReport(repo_id=repo_id, repo_type=repo_type, repo_url=str(repo_url),
                        commit_url=getattr(info, "commit_url", None), commit_oid=getattr(info, "oid", None),
                        files=paths)


# --------------------------------------------------------------------------- command line


def add_cli(subparsers: Any) -> None:
    down = subparsers.add_parser("hub-download", help="download an axis (native or the paper's layout) from the Hub")
    down.add_argument("repo_id", nargs="?", default=PAPER_REPO, help=f"repository (default: {PAPER_REPO})")
    down.add_argument("--folder", default=None, help="folder of the axis inside the repo, e.g. the model name")
    down.add_argument("--repo-type", default=PAPER_REPO_TYPE, choices=["dataset", "model"], help="repository type")
    down.add_argument("--revision", default=None, help="branch, tag or commit")
    down.add_argument("--role-vectors", action="store_true", help="also download the role vectors")
    down.add_argument("--list", action="store_true", help="only list the folders that hold an axis")
    down.add_argument("--out", type=Path, default=None,
                      help="save the axis here in the native format (.safetensors), with role vectors if fetched")
    down.set_defaults(func=_download_cli)
    up = subparsers.add_parser("hub-upload", help="upload a run's axis, vectors, thresholds and a dataset card")
    up.add_argument("--run-dir", type=Path, required=True, help="the run whose axis to publish")
    up.add_argument("--repo", dest="repo_id", required=True, help="target repository 'owner/name'")
    up.add_argument("--repo-type", default="dataset", choices=["dataset", "model"], help="repository type")
    up.add_argument("--folder", default="", help="folder inside the repository (default: the root)")
    up.add_argument("--private", action="store_true", help="create the repository as private")
    up.add_argument("--token", default=None, help="Hub token (default: $HF_TOKEN or the saved login)")
    up.set_defaults(func=_upload_cli)


def _download_cli(args: Any) -> int:
    from steering.axis_io import save_axis

    if args.list:
        folders = list_axis_folders(args.repo_id, repo_type=args.repo_type, revision=args.revision)
        for folder, layout in sorted(folders.items()):
            print(f"{folder or '.'}\t{layout}")
        return 0
    fetched = download_axis(args.repo_id, args.folder, repo_type=args.repo_type, revision=args.revision,
                            role_vectors=args.role_vectors)
    print(json.dumps(fetched.summary(), indent=2))
    if args.out is not None:
        save_axis(args.out, fetched.bundle)
        print(f"saved {args.out}")
    return 0


def _upload_cli(args: Any) -> int:
    report = upload_run(args.run_dir, args.repo_id, token=args.token, repo_type=args.repo_type,
                        private=args.private, folder=args.folder)
    print(f"uploaded {len(report.files)} files to {report.repo_url}")
    return 0
