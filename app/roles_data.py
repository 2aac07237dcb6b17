"""Role catalog and role sets as the app shows and edits them (no UI here).

Role sets the app knows about:

* ``shipped``: ``data/roles`` (read-only in the app),
* ``my roles``: ``<workspace>/roles``, where the editor saves and the builder writes. It is made a
  complete role set on first use by copying the shipped ``default.json`` and extraction questions,
* ``imported/<name>``: ``<workspace>/role-sets/<name>``, one folder per imported set.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd

from pipeline.role_schema import (
    DEFAULT_ROLE_NAME,
    QUESTIONS_FILE,
    QUESTIONS_FILENAME,
    ROLES_DIR,
    Role,
    RoleDataError,
    load_catalog,
    load_role_dir,
    load_role_file,
    role_to_dict,
    validate_role_dict,
    write_role_file,
)

SHIPPED = "shipped"
MINE = "my roles"
IMPORTED_PREFIX = "imported/"


def imported_root(workspace: Path) -> Path:
    return Path(workspace) / "role-sets"


def role_sets(workspace: Path) -> dict[str, Path]:
    """``{label: folder}`` of every usable role set (a folder with ``default.json``)."""
    sets = {SHIPPED: ROLES_DIR}
    mine = Path(workspace) / "roles"
    if (mine / f"{DEFAULT_ROLE_NAME}.json").is_file():
        sets[MINE] = mine
    root = imported_root(workspace)
    if root.is_dir():
        for folder in sorted(p for p in root.iterdir() if p.is_dir()):
            if (folder / f"{DEFAULT_ROLE_NAME}.json").is_file():
                sets[IMPORTED_PREFIX + folder.name] = folder
    return sets


def role_set_names(folder: Path) -> list[str]:
    """Character role names of a role set (``[]`` if it does not load)."""
    try:
        return load_role_dir(folder).names
    except RoleDataError:
        return sorted(p.stem for p in Path(folder).glob("*.json") if p.stem != DEFAULT_ROLE_NAME)


def ensure_user_role_set(user_dir: Path) -> Path:
    """Make ``user_dir`` a loadable role set (default role + questions copied from the shipped set)."""
    user_dir = Path(user_dir)
    user_dir.mkdir(parents=True, exist_ok=True)
    if not (user_dir / f"{DEFAULT_ROLE_NAME}.json").exists():
        shutil.copyfile(ROLES_DIR / f"{DEFAULT_ROLE_NAME}.json", user_dir / f"{DEFAULT_ROLE_NAME}.json")
    if not (user_dir / QUESTIONS_FILENAME).exists():
        shutil.copyfile(QUESTIONS_FILE, user_dir / QUESTIONS_FILENAME)
    return user_dir


def catalog_table(query: str = "", category: str | None = None, user_dir: Path | None = None,
                  role_set: Path | None = None) -> pd.DataFrame:
    """Catalog entries (plus the roles of ``role_set`` that are not in the catalog), filtered by text
    and category, with where each role has a file."""
    entries = [(e.name, e.category, e.description) for e in load_catalog()]
    shipped = {p.stem for p in ROLES_DIR.glob("*.json")}
    mine = {p.stem for p in Path(user_dir).glob("*.json")} if user_dir is not None and Path(user_dir).is_dir() else set()
    chosen: set[str] = set()
    if role_set is not None and Path(role_set).is_dir() and Path(role_set) not in (ROLES_DIR, Path(user_dir or "")):
        chosen = {p.stem for p in Path(role_set).glob("*.json")}
        known = {name for name, _, _ in entries}
        entries += [(name, "(not in the catalog)", "") for name in sorted(chosen - known - {DEFAULT_ROLE_NAME})]
    needle = (query or "").strip().lower()
    rows = []
    for name, cat, description in entries:
        if category and category != "all" and cat != category:
            continue
        if needle and needle not in f"{name} {cat} {description}".lower():
            continue
        where = ", ".join(label for label, present in (("shipped", name in shipped), ("mine", name in mine),
                                                        ("this set", name in chosen)) if present) or "-"
        rows.append({"name": name, "category": cat, "description": description, "role file": where})
    return pd.DataFrame(rows, columns=["name", "category", "description", "role file"])


def categories() -> list[str]:
    return sorted({e.category for e in load_catalog()})


def find_role(name: str, folders: list[Path]) -> Role | None:
    """The role called ``name`` from the first folder that has a file for it, else None."""
    name = (name or "").strip()
    if not name:
        return None
    for folder in folders:
        path = Path(folder) / f"{name}.json"
        if path.is_file():
            return load_role_file(path)
    return None


def catalog_entry(name: str):
    for entry in load_catalog():
        if entry.name == name:
            return entry
    return None


def new_role_template(name: str, description: str = "") -> dict:
    """A starting point for a role that has no file yet (fill in before saving)."""
    who = description or f"a {name.replace('_', ' ').replace('-', ' ')}"
    return {
        "instruction": [{"pos": f"You are {who}. Stay in character."} for _ in range(5)],
        "questions": ["Who are you, and what do you do all day?"],
        "eval_prompt": ("Does the answer below stay in the role? Question: {question}\nAnswer: {answer}\n"
                        "Reply with one digit: 0 refuses, 1 says it is an AI and helps, 2 is an AI with some traits "
                        "of the role, 3 fully in role."),
    }


def role_json(role: Role) -> str:
    return json.dumps(role_to_dict(role), indent=2, ensure_ascii=False)


def role_from_json(name: str, text: str) -> Role:
    """Parse and validate the editor's JSON; :class:`RoleDataError` names the problem."""
    source = f"role editor ({name or 'no name'})"
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RoleDataError(f"{source}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
    return validate_role_dict((name or "").strip(), data, source)


def save_role(user_dir: Path, name: str, text: str) -> Path:
    """Validate the editor's JSON and write it to ``user_dir/<name>.json`` (atomically)."""
    role = role_from_json(name, text)
    ensure_user_role_set(user_dir)
    path = Path(user_dir) / f"{role.name}.json"
    write_role_file(path, role)
    return path


def role_markdown(role: Role) -> str:
    """A readable view of a role: its system prompts, questions and judge prompt."""
    lines = [f"### {role.name}", "", f"*file:* `{role.source}`", "", "**System prompts**", ""]
    lines += [f"{i}. {p or '*(empty system prompt)*'}" for i, p in enumerate(role.instructions, start=1)]
    lines += ["", f"**Questions** ({len(role.questions)})", ""]
    lines += [f"- {q}" for q in role.questions] or ["*(none: the default role uses only the shared extraction "
                                                    "questions)*"]
    lines += ["", "**Judge prompt**", ""]
    if role.eval_prompt:  # a quote block wraps long lines (a code block would cut them)
        lines += [f"> {line}" if line.strip() else ">" for line in role.eval_prompt.splitlines()]
    else:
        lines.append("*(none: the default role is not judged)*")
    return "\n".join(lines)
