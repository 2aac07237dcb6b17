"""``import-roles``: bring in a role set in the paper's layout and make it a run's roles.

A role set is a folder of ``<role>.json`` files, ``default.json`` included, plus
``extraction_questions.jsonl`` in that folder or its parent. It can come from

* a local folder:                 ``/data/my_roles``
* a git repository (shallow clone into a cache folder, ``git`` must be installed):
  ``https://github.com/owner/repo.git``, ``git@host:owner/repo.git``, ``file:///srv/roles.git``
* a Hugging Face dataset repository: ``hf:owner/name`` (also ``hf://datasets/owner/name``
  or ``https://huggingface.co/datasets/owner/name``), via ``huggingface_hub.snapshot_download``.

Inside a repository the role folder is found by looking for ``default.json`` (or given
with ``subdir``). The set is validated with :func:`pipeline.role_schema.load_role_dir`
(every problem names the file and the field), optionally narrowed to some roles, and
copied into the destination folder, which is replaced as a whole only after the copy
has been validated.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import re
import shutil
import subprocess
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pipeline.role_schema import (
    DEFAULT_ROLE_NAME,
    QUESTIONS_FILENAME,
    RoleDataError,
    RoleSet,
    load_role_dir,
)

log = logging.getLogger(__name__)

SourceKind = Literal["path", "git", "hf"]
KINDS = ("auto", "path", "git", "hf")

_HF_URL_RE = re.compile(r"^https?://(?:www\.)?huggingface\.co/datasets/([^/]+/[^/?#]+)/?(.*)$")
_HF_TREE_RE = re.compile(r"^tree/([^/]+)/?(.*)$")
_REPO_ID_RE = re.compile(r"^[\w.-]+/[\w.-]+$")
_SCP_GIT_RE = re.compile(r"^[\w.-]+@[\w.-]+:")


class RoleImportError(RoleDataError):
    """The source could not be fetched or does not hold a usable role set."""


def default_cache_dir() -> Path:
    """``$AXIS_LAB_CACHE/role-sources`` (default ``~/.cache/assistant-axis-lab/role-sources``)."""
    root = os.environ.get("AXIS_LAB_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "assistant-axis-lab") / "role-sources"


@dataclass(frozen=True)
class RoleSource:
    kind: SourceKind
    location: str  # folder, git URL or dataset repo id
    revision: str | None = None  # git branch/tag/commit or Hub revision
    subdir: str | None = None  # folder inside the source holding the roles


def parse_source(
    source: str, kind: str = "auto", revision: str | None = None, subdir: str | None = None
) -> RoleSource:
    """Work out what ``source`` names (see the module docstring)."""
    text = source.strip()
    if not text:
        raise RoleImportError("import source: field 'source' is empty")
    if kind not in KINDS:
        raise RoleImportError(f"import source: field 'kind' must be one of {', '.join(KINDS)}; got {kind!r}")

    if kind in ("auto", "hf"):
        repo_id = None
        if text.startswith("hf://"):
            repo_id = text[len("hf://"):]
            if repo_id.startswith("datasets/"):
                repo_id = repo_id[len("datasets/"):]
        elif text.startswith("hf:"):
            repo_id = text[len("hf:"):]
        elif (match := _HF_URL_RE.match(text)) is not None:
            repo_id, rest = match.group(1), match.group(2)
            tree = _HF_TREE_RE.match(rest)
            if tree:  # .../tree/<revision>/<subdir>, as copied from the browser
                revision = revision or tree.group(1)
                subdir = subdir or (tree.group(2) or None)
        elif kind == "hf":
            repo_id = text
        if repo_id is not None:
            parts = repo_id.strip("/").split("/")
            repo_id = "/".join(parts[:2])
            if len(parts) > 2 and subdir is None:  # hf:owner/name/sub/dir
                subdir = "/".join(parts[2:])
            if not _REPO_ID_RE.match(repo_id):
                raise RoleImportError(
                    f"import source {source!r}: field 'source' must name a dataset repo as owner/name"
                )
            return RoleSource("hf", repo_id, revision, subdir)

    if kind == "path" or (kind == "auto" and Path(text).expanduser().exists()):
        path = Path(text).expanduser()
        if not path.exists():
            raise RoleImportError(f"import source {source!r}: folder {path} does not exist")
        if not path.is_dir():
            raise RoleImportError(f"import source {source!r}: {path} is a file; give the folder holding the role files")
        if revision:
            raise RoleImportError(f"import source {source!r}: a revision only applies to git and Hugging Face sources")
        return RoleSource("path", str(path.resolve()), None, subdir)

    looks_like_git = "://" in text or _SCP_GIT_RE.match(text) is not None or text.endswith(".git")
    if kind == "git" or looks_like_git:
        return RoleSource("git", text, revision, subdir)
    hint = f"; for a Hugging Face dataset write hf:{text}" if _REPO_ID_RE.match(text) else ""
    raise RoleImportError(
        f"import source {source!r}: not an existing folder, a git URL or a Hugging Face dataset{hint}"
    )


@dataclass(frozen=True)
class ImportRolesConfig:
    source: str
    dest_dir: Path
    kind: str = "auto"  # auto, path, git or hf
    revision: str | None = None
    subdir: str | None = None
    questions_path: str | None = None  # relative to the source root, or absolute for local sources
    roles: tuple[str, ...] | None = None  # keep only these roles (default is always kept)
    cache_dir: Path | None = None  # None: default_cache_dir()
    overwrite: bool = False  # replace a non-empty destination
    hf_endpoint: str | None = None  # None: HF_ENDPOINT or the public Hub
    git_timeout_s: float = 600.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "dest_dir", Path(self.dest_dir))
        if self.cache_dir is not None:
            object.__setattr__(self, "cache_dir", Path(self.cache_dir))
        if self.roles is not None:
            object.__setattr__(self, "roles", tuple(self.roles))


@dataclass
class ImportReport:
    source: str
    kind: str
    revision: str | None  # the commit that was read (git, hf), None for a folder
    source_dir: Path  # the folder the roles were read from
    dest_dir: Path
    roles: list[str] = field(default_factory=list)  # character roles copied
    n_questions: int = 0

    def as_dict(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        out["source_dir"] = str(self.source_dir)
        out["dest_dir"] = str(self.dest_dir)
        return out


# --------------------------------------------------------------------------- fetching


def _run_git(args: list[str], cwd: Path | None, timeout: float, what: str) -> str:
    env = dict(os.environ, GIT_TERMINAL_PROMPT="0", GIT_ASKPASS="", SSH_ASKPASS="")
    try:
        done = subprocess.run(
            ["git", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
        )
    except FileNotFoundError:
        raise RoleImportError("importing from a git repository needs the 'git' program, which is not installed") from None
    except subprocess.TimeoutExpired:
        raise RoleImportError(f"{what}: git did not finish within {timeout:.0f} s") from None
    if done.returncode != 0:
        detail = " ".join((done.stderr or done.stdout).strip().splitlines()[-3:])
        raise RoleImportError(f"{what}: git {args[0]} failed (exit {done.returncode}): {detail}")
    return done.stdout.strip()


def fetch_git(source: RoleSource, cache_dir: Path, timeout: float = 600.0) -> tuple[Path, str]:
    """Shallow-clone ``source`` into the cache; (checkout folder, commit sha)."""
    url = source.location
    local = Path(url).expanduser()
    if "://" not in url and not _SCP_GIT_RE.match(url) and local.exists():
        url = local.resolve().as_uri()  # file:// so that --depth applies to local repositories too
    key = hashlib.sha256(f"{url}\n{source.revision or ''}".encode()).hexdigest()[:20]
    root = cache_dir / "git"
    root.mkdir(parents=True, exist_ok=True)
    target = root / key
    staging = root / f".{key}.{uuid.uuid4().hex[:8]}.tmp"
    what = f"cloning {source.location}" + (f" at {source.revision}" if source.revision else "")
    try:
        if source.revision is None:
            _run_git(["clone", "--depth", "1", "--quiet", "--", url, str(staging)], None, timeout, what)
        else:  # works for branches, tags and commit ids alike
            staging.mkdir()
            _run_git(["init", "--quiet"], staging, timeout, what)
            _run_git(["remote", "add", "origin", url], staging, timeout, what)
            _run_git(["fetch", "--depth", "1", "--quiet", "origin", source.revision], staging, timeout, what)
            _run_git(["checkout", "--quiet", "FETCH_HEAD"], staging, timeout, what)
        commit = _run_git(["rev-parse", "HEAD"], staging, timeout, what)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    log.info("import-roles: %s checked out at %s in %s", source.location, commit[:12], target)
    return target, commit


def fetch_hf(source: RoleSource, cache_dir: Path, endpoint: str | None = None) -> tuple[Path, str]:
    """Download the dataset repo's JSON files into the cache; (snapshot folder, commit sha)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    from steering.models import hub_offline

    name = f"dataset {source.location}" + (f" at {source.revision}" if source.revision else "")
    try:
        folder = snapshot_download(
            source.location,
            repo_type="dataset",
            revision=source.revision,
            cache_dir=str(cache_dir / "hf"),
            endpoint=endpoint,
            allow_patterns=["*.json", "*.jsonl"],
        )
    except RevisionNotFoundError:
        raise RoleImportError(f"Hugging Face {name}: revision {source.revision!r} not found") from None
    except RepositoryNotFoundError:
        raise RoleImportError(
            f"Hugging Face {name}: repository not found (or private: set HF_TOKEN to a token with access)"
        ) from None
    except LocalEntryNotFoundError as exc:
        offline = " HF_HUB_OFFLINE is set, so nothing can be downloaded;" if hub_offline() else ""
        raise RoleImportError(f"Hugging Face {name}: not in the local cache and could not be downloaded;{offline} {exc}") from None
    except HfHubHTTPError as exc:
        raise RoleImportError(f"Hugging Face {name}: download failed: {exc}") from None
    path = Path(folder)
    return path, path.name  # snapshots/<commit>


def fetch_source(source: RoleSource, config: ImportRolesConfig) -> tuple[Path, str | None]:
    """A local folder holding the source, and the revision that was read."""
    cache = config.cache_dir or default_cache_dir()
    if source.kind == "path":
        return Path(source.location), None
    if source.kind == "git":
        return fetch_git(source, cache, config.git_timeout_s)
    return fetch_hf(source, cache, config.hf_endpoint)


# --------------------------------------------------------------------------- locating and validating


def _inside(path: Path, root: Path) -> bool:
    """Lexically inside root (symlinks not followed: Hub snapshots link into a blob store)."""
    try:
        Path(os.path.abspath(path)).relative_to(os.path.abspath(root))
    except ValueError:
        return False
    return True


def find_role_dir(root: Path, subdir: str | None = None) -> Path:
    """The folder holding ``default.json``: ``root/subdir`` if given, else found under root."""
    if subdir:
        folder = root / subdir
        if not _inside(folder, root):
            raise RoleImportError(f"{root}: field 'subdir' ({subdir!r}) points outside the source")
        if not folder.is_dir():
            raise RoleImportError(f"{root}: field 'subdir': folder {subdir!r} does not exist in the source")
        return folder
    if (root / f"{DEFAULT_ROLE_NAME}.json").is_file():
        return root
    found = sorted(
        p.parent for p in root.rglob(f"{DEFAULT_ROLE_NAME}.json")
        if ".git" not in p.relative_to(root).parts
    )
    if not found:
        raise RoleImportError(
            f"{root}: field 'default': no {DEFAULT_ROLE_NAME}.json anywhere in the source; a role set "
            f"needs <role>.json files, {DEFAULT_ROLE_NAME}.json and {QUESTIONS_FILENAME}"
        )
    if len(found) > 1:
        listed = ", ".join(str(p.relative_to(root)) or "." for p in found)
        raise RoleImportError(f"{root}: several role folders found ({listed}); choose one with subdir (--subdir)")
    return found[0]


def _questions_file(root: Path, role_dir: Path, questions_path: str | None, confined: bool) -> Path:
    if questions_path:
        path = Path(questions_path)
        path = path if path.is_absolute() and not confined else root / questions_path
        if confined and not _inside(path, root):
            raise RoleImportError(f"{root}: field 'questions' ({questions_path!r}) points outside the source")
        if not path.is_file():
            raise RoleImportError(f"{path}: field 'questions': file not found")
        return path
    candidates = [role_dir / QUESTIONS_FILENAME, role_dir.parent / QUESTIONS_FILENAME]
    if confined:  # never pick up a file from the cache folder around a checkout
        candidates = [c for c in candidates if _inside(c, root)]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    looked = " or ".join(str(c) for c in candidates)
    raise RoleImportError(f"{role_dir}: field 'questions': {QUESTIONS_FILENAME} not found (looked for {looked})")


def load_source_roles(
    root: Path, subdir: str | None, questions_path: str | None, confined: bool
) -> tuple[RoleSet, Path, Path]:
    """(validated role set, role folder, questions file)."""
    role_dir = find_role_dir(root, subdir)
    questions = _questions_file(root, role_dir, questions_path, confined)
    return load_role_dir(role_dir, questions), role_dir, questions


# --------------------------------------------------------------------------- copying


def _check_confined(files: list[Path], allowed_root: Path) -> None:
    """Refuse files that resolve (through symlinks) outside the fetched source."""
    root = allowed_root.resolve()
    for path in files:
        try:
            path.resolve().relative_to(root)
        except ValueError:
            raise RoleImportError(f"{path}: links to {path.resolve()}, outside the imported source") from None


def _copy_role_set(role_set: RoleSet, questions: Path, dest: Path, overwrite: bool) -> None:
    if dest.exists() and not dest.is_dir():
        raise RoleImportError(f"{dest}: destination exists and is not a folder")
    if dest.is_dir() and any(dest.iterdir()) and not overwrite:
        raise RoleImportError(f"{dest}: destination folder is not empty; pass overwrite (--overwrite) to replace it")
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = dest.parent / f".{dest.name}.import-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        for role in role_set.all_roles():
            if role.source is None:
                raise RoleImportError(f"role {role.name!r} has no source file to copy")
            shutil.copyfile(role.source, staging / f"{role.name}.json")
        shutil.copyfile(questions, staging / QUESTIONS_FILENAME)
        load_role_dir(staging)  # the copy must load exactly as a run will load it
        old = None
        if dest.exists():
            old = dest.parent / f".{dest.name}.old-{uuid.uuid4().hex[:8]}"
            dest.rename(old)
        staging.rename(dest)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def import_roles(config: ImportRolesConfig) -> ImportReport:
    """Fetch, validate and copy a role set; raises RoleImportError / RoleDataError naming the problem."""
    source = parse_source(config.source, config.kind, config.revision, config.subdir)
    root, revision = fetch_source(source, config)
    role_set, role_dir, questions = load_source_roles(
        root, source.subdir, config.questions_path, confined=source.kind != "path"
    )
    if config.roles:
        role_set = role_set.select(config.roles)
    if source.kind != "path":  # a local folder may link wherever its owner likes
        store = root if source.kind == "git" else (config.cache_dir or default_cache_dir()) / "hf"
        _check_confined([Path(str(r.source)) for r in role_set.all_roles()] + [questions], store)
    _copy_role_set(role_set, questions, config.dest_dir, config.overwrite)
    report = ImportReport(
        source=config.source,
        kind=source.kind,
        revision=revision,
        source_dir=role_dir,
        dest_dir=config.dest_dir,
        roles=role_set.names,
        n_questions=len(role_set.questions),
    )
    log.info(
        "import-roles: %d roles and %d questions from %s copied to %s",
        len(report.roles), report.n_questions, config.source, config.dest_dir,
    )
    return report


# --------------------------------------------------------------------------- command line


def add_cli(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "import-roles",
        help="import a role set (paper layout) from a folder, a git repository or a Hugging Face dataset",
        description=" ".join(__doc__.split("\n\n")[0].split(": ", 1)[-1].split()) if __doc__ else None,
    )
    parser.add_argument(
        "source",
        help="a folder, a git URL (https://..., git@host:..., file://...) or hf:owner/name for a Hugging Face dataset",
    )
    parser.add_argument("--dest", type=Path, required=True, help="folder to copy the validated role set into")
    parser.add_argument("--kind", choices=KINDS, default="auto", help="what the source is (default: auto-detect)")
    parser.add_argument("--revision", default=None, help="git branch, tag or commit, or Hugging Face revision")
    parser.add_argument(
        "--subdir", default=None, help="folder inside the source holding the role files (default: where default.json is)"
    )
    parser.add_argument(
        "--questions", default=None,
        help=f"{QUESTIONS_FILENAME} path inside the source (default: in the role folder or its parent)",
    )
    parser.add_argument("--roles", nargs="+", default=None, metavar="NAME",
                        help="import only these roles (space- or comma-separated); default is always kept")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help=f"where git clones and Hub downloads are kept (default: {default_cache_dir()})")
    parser.add_argument("--overwrite", action="store_true", help="replace the destination folder if it is not empty")
    parser.add_argument("--hf-endpoint", default=None, help="Hugging Face Hub URL (default: $HF_ENDPOINT or the public Hub)")
    parser.set_defaults(func=run_cli)


def run_cli(args: argparse.Namespace) -> int:
    roles = None
    if args.roles:
        roles = tuple(n.strip() for v in args.roles for n in v.split(",") if n.strip()) or None
    try:
        report = import_roles(ImportRolesConfig(
            source=args.source, dest_dir=args.dest, kind=args.kind, revision=args.revision,
            subdir=args.subdir, questions_path=args.questions, roles=roles, cache_dir=args.cache_dir,
            overwrite=args.overwrite, hf_endpoint=args.hf_endpoint,
        ))
    except (RoleDataError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    at = f" at {report.revision}" if report.revision else ""
    print(
        f"import-roles: {len(report.roles)} roles and {report.n_questions} questions from "
        f"{report.kind} source {report.source}{at} written to {report.dest_dir}"
    )
    return 0
