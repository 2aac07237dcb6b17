"""Role data schema for the Assistant Axis pipeline.

A *role* is a persona the model is asked to play.  Each role lives in its own
JSON file (``data/roles/<name>.json``) in the layout used by the paper::

    {
      "instruction": [{"pos": "You are ..."}, ... five system prompts ...],
      "questions":   ["...", ... role-specific questions ...],
      "eval_prompt": "... {question} ... {answer} ..."
    }

The special ``default`` role holds the neutral, assistant-style system prompts
(one of which may be the empty string, another may mention ``{model_name}``);
it has no role questions and no eval prompt.

General extraction questions, shared by every role, live in a JSONL file with
one ``{"id": int, "question": str}`` object per line.  The role catalog is a
JSONL file of ``{"name", "category", "description"}`` objects.

Everything here uses only the standard library.  Every problem found in the
data is reported as :class:`RoleDataError`, whose message names the file (and
line, for JSONL) and the offending field.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from steering.atomic_io import atomic_write_text

__all__ = [
    "RoleDataError",
    "Role",
    "Question",
    "CatalogEntry",
    "RoleSet",
    "DEFAULT_ROLE_NAME",
    "DATA_DIR",
    "ROLES_DIR",
    "QUESTIONS_FILE",
    "CATALOG_FILE",
    "QUESTIONS_FILENAME",
    "N_INSTRUCTIONS",
    "EXPECTED_ROLE_QUESTIONS",
    "ROLE_KEYS",
    "validate_role_dict",
    "load_role_file",
    "load_questions",
    "load_role_dir",
    "load_catalog",
    "shipped_role_set",
    "role_to_dict",
    "write_role_file",
    "format_eval_prompt",
    "find_duplicate_names",
    "normalize_name",
    "normalize_text",
]

DEFAULT_ROLE_NAME = "default"
DATA_DIR: Path = Path(__file__).resolve().parent.parent / "data"
ROLES_DIR: Path = DATA_DIR / "roles"
QUESTIONS_FILENAME = "extraction_questions.jsonl"
QUESTIONS_FILE: Path = DATA_DIR / QUESTIONS_FILENAME
CATALOG_FILE: Path = DATA_DIR / "role_catalog.jsonl"

#: Number of system prompts every character role must provide.
N_INSTRUCTIONS = 5
#: Number of role-specific questions the shipped roles provide (not enforced
#: by the validator, which accepts any positive number).
EXPECTED_ROLE_QUESTIONS = 40
#: Top-level keys allowed in a role file.
ROLE_KEYS = ("instruction", "questions", "eval_prompt")

QUESTION_PLACEHOLDER = "{question}"
ANSWER_PLACEHOLDER = "{answer}"
MODEL_NAME_PLACEHOLDER = "{model_name}"

_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
_EVAL_FIELD_RE = re.compile(r"\{(question|answer)\}")


class RoleDataError(ValueError):
    """Raised when role, question or catalog data is malformed.

    The message always starts with the file (and line, for JSONL files) and
    names the field at fault.
    """


# --------------------------------------------------------------------------
# data classes
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Role:
    """One persona: its system prompts, its own questions and its judge prompt."""

    name: str
    instructions: tuple[str, ...]
    questions: tuple[str, ...]
    eval_prompt: str | None
    source: str | None = None

    def __post_init__(self) -> None:
        # Accept lists from callers but store immutable tuples.
        object.__setattr__(self, "instructions", tuple(self.instructions))
        object.__setattr__(self, "questions", tuple(self.questions))

    @property
    def is_default(self) -> bool:
        return self.name == DEFAULT_ROLE_NAME

    def system_prompts(self, model_name: str) -> list[str]:
        """The instructions with ``{model_name}`` replaced by *model_name*."""
        return [p.replace(MODEL_NAME_PLACEHOLDER, model_name) for p in self.instructions]


@dataclass(frozen=True)
class Question:
    """A general extraction question, shared by all roles."""

    id: int
    question: str


@dataclass(frozen=True)
class CatalogEntry:
    """One line of the role catalog."""

    name: str
    category: str
    description: str


@dataclass(frozen=True)
class RoleSet:
    """Character roles (keyed by name, default excluded), the default role and
    the general extraction questions."""

    roles: dict[str, Role]
    default: Role
    questions: tuple[Question, ...] = field(default=())

    def __post_init__(self) -> None:
        object.__setattr__(self, "questions", tuple(self.questions))
        if DEFAULT_ROLE_NAME in self.roles:
            raise RoleDataError(
                f"{self.default.source or '<role set>'}: field 'roles' must not contain "
                f"the {DEFAULT_ROLE_NAME!r} role; pass it as 'default'"
            )

    @property
    def names(self) -> list[str]:
        """Character role names, in the set's order."""
        return list(self.roles)

    def all_roles(self) -> list[Role]:
        """The default role followed by every character role."""
        return [self.default, *self.roles.values()]

    def __len__(self) -> int:
        return len(self.roles)

    def __contains__(self, name: object) -> bool:
        return name in self.roles

    def __getitem__(self, name: str) -> Role:
        if name == DEFAULT_ROLE_NAME:
            return self.default
        return self.roles[name]

    def select(self, names: Iterable[str] | None) -> "RoleSet":
        """A subset with only *names* (in the given order); ``None`` keeps all.

        ``"default"`` may appear in *names* and is ignored (the default role is
        always kept).  Unknown names raise :class:`RoleDataError` listing them.
        """
        if names is None:
            return self
        if isinstance(names, str):
            names = [names]
        wanted: list[str] = []
        unknown: list[str] = []
        for raw in names:
            key = normalize_name(str(raw))
            if key == DEFAULT_ROLE_NAME or key in wanted:
                continue
            if key in self.roles:
                wanted.append(key)
            elif raw not in unknown:
                unknown.append(str(raw))
        if unknown:
            raise RoleDataError(
                f"role selection: field 'roles' has unknown role name(s): "
                f"{', '.join(unknown)} ({len(self.roles)} roles available)"
            )
        return RoleSet(
            roles={n: self.roles[n] for n in wanted},
            default=self.default,
            questions=self.questions,
        )


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


def normalize_name(name: str) -> str:
    """Name normalisation used only for duplicate detection and lookup."""
    return name.strip().lower()


def normalize_text(text: str) -> str:
    """Casefold, drop punctuation and collapse whitespace (near-duplicate check)."""
    text = re.sub(r"[^\w\s]", " ", text.casefold())
    return " ".join(text.split())


def find_duplicate_names(names: Iterable[str]) -> list[str]:
    """Normalised names that occur more than once in *names*, sorted.

    ``["Diplomat", "diplomat", "pirate"]`` gives ``["diplomat"]``.
    """
    seen: set[str] = set()
    dupes: set[str] = set()
    for n in names:
        key = normalize_name(n)
        if key in seen:
            dupes.add(key)
        seen.add(key)
    return sorted(dupes)


def _type_name(value: object) -> str:
    if value is None:
        return "null"
    return {dict: "object", list: "array", str: "string", bool: "boolean",
            int: "integer", float: "number"}.get(type(value), type(value).__name__)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_name(name: object, source: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise RoleDataError(
            f"{source}: field 'name' (role name {name!r}) must be lowercase letters, "
            f"digits, '_' or '-', starting with a letter or digit"
        )
    return name


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RoleDataError(f"{path}: file not found") from None
    except UnicodeDecodeError as exc:
        raise RoleDataError(f"{path}: file is not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise RoleDataError(f"{path}: cannot read file ({exc.strerror or exc})") from None


# --------------------------------------------------------------------------
# roles
# --------------------------------------------------------------------------


def validate_role_dict(name: str, data: object, source: str) -> Role:
    """Check one parsed role file and build a :class:`Role`.

    *name* is the role name (the file stem); *source* is used in messages.
    """
    source = str(source)
    _check_name(name, source)
    is_default = name == DEFAULT_ROLE_NAME

    if not isinstance(data, Mapping):
        raise RoleDataError(
            f"{source}: top level must be a JSON object with fields "
            f"{', '.join(repr(k) for k in ROLE_KEYS)}, got {_type_name(data)}"
        )
    unknown = [k for k in data if k not in ROLE_KEYS]
    if unknown:
        raise RoleDataError(
            f"{source}: unknown field(s) {', '.join(repr(str(k)) for k in unknown)} "
            f"(allowed: {', '.join(repr(k) for k in ROLE_KEYS)})"
        )

    # -- instruction -------------------------------------------------------
    if "instruction" not in data:
        raise RoleDataError(f"{source}: field 'instruction' is required")
    raw_instr = data["instruction"]
    if not isinstance(raw_instr, list):
        raise RoleDataError(
            f"{source}: field 'instruction' must be a list of {{\"pos\": str}} objects, "
            f"got {_type_name(raw_instr)}"
        )
    if is_default:
        if not raw_instr:
            raise RoleDataError(f"{source}: field 'instruction' must list at least 1 prompt")
    elif len(raw_instr) != N_INSTRUCTIONS:
        raise RoleDataError(
            f"{source}: field 'instruction' must list exactly {N_INSTRUCTIONS} prompts, "
            f"got {len(raw_instr)}"
        )
    instructions: list[str] = []
    for i, item in enumerate(raw_instr):
        where = f"field 'instruction'[{i}]"
        if not isinstance(item, Mapping):
            raise RoleDataError(
                f"{source}: {where} must be an object {{\"pos\": str}}, got {_type_name(item)}"
            )
        extra = [k for k in item if k != "pos"]
        if extra:
            raise RoleDataError(
                f"{source}: {where} has unknown field(s) "
                f"{', '.join(repr(str(k)) for k in extra)} (allowed: 'pos')"
            )
        if "pos" not in item:
            raise RoleDataError(f"{source}: {where}.pos is required")
        pos = item["pos"]
        if is_default:
            if not isinstance(pos, str):
                raise RoleDataError(f"{source}: {where}.pos must be a string, got {_type_name(pos)}")
        elif not isinstance(pos, str) or not pos.strip():
            raise RoleDataError(f"{source}: {where}.pos must be a non-empty string")
        instructions.append(pos)

    # -- questions ---------------------------------------------------------
    if "questions" in data:
        raw_q = data["questions"]
    elif is_default:
        raw_q = []
    else:
        raise RoleDataError(f"{source}: field 'questions' is required for character roles")
    if not isinstance(raw_q, list):
        raise RoleDataError(
            f"{source}: field 'questions' must be a list of strings, got {_type_name(raw_q)}"
        )
    if not is_default and not raw_q:
        raise RoleDataError(f"{source}: field 'questions' must list at least 1 question")
    questions: list[str] = []
    seen_q: dict[str, int] = {}
    for i, q in enumerate(raw_q):
        if not isinstance(q, str):
            raise RoleDataError(
                f"{source}: field 'questions'[{i}] must be a string, got {_type_name(q)}"
            )
        if not q.strip():
            raise RoleDataError(f"{source}: field 'questions'[{i}] must be a non-empty string")
        key = normalize_text(q)
        if key in seen_q:
            raise RoleDataError(
                f"{source}: field 'questions'[{i}] duplicates 'questions'[{seen_q[key]}]: {q!r}"
            )
        seen_q[key] = i
        questions.append(q)

    # -- eval_prompt -------------------------------------------------------
    eval_prompt = data.get("eval_prompt")
    if eval_prompt is None:
        if not is_default:
            raise RoleDataError(
                f"{source}: field 'eval_prompt' is required for character roles "
                f"(a string containing {QUESTION_PLACEHOLDER} and {ANSWER_PLACEHOLDER})"
            )
    else:
        if not isinstance(eval_prompt, str):
            raise RoleDataError(
                f"{source}: field 'eval_prompt' must be a string, got {_type_name(eval_prompt)}"
            )
        missing = [p for p in (QUESTION_PLACEHOLDER, ANSWER_PLACEHOLDER) if p not in eval_prompt]
        if missing:
            raise RoleDataError(
                f"{source}: field 'eval_prompt' must contain the placeholder(s) "
                f"{' and '.join(missing)}"
            )

    return Role(
        name=name,
        instructions=tuple(instructions),
        questions=tuple(questions),
        eval_prompt=eval_prompt,
        source=source,
    )


def _parse_json(text: str, source: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise RoleDataError(
            f"{source}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}"
        ) from None


def load_role_file(path: str | os.PathLike[str]) -> Role:
    """Load and validate one ``<role>.json`` file; the role name is the stem."""
    p = Path(path)
    data = _parse_json(_read_text(p), str(p))
    return validate_role_dict(p.stem, data, str(p))


def role_to_dict(role: Role) -> dict[str, Any]:
    """The JSON-ready form of *role* (inverse of :func:`validate_role_dict`)."""
    return {
        "instruction": [{"pos": p} for p in role.instructions],
        "questions": list(role.questions),
        "eval_prompt": role.eval_prompt,
    }


def write_role_file(path: str | os.PathLike[str], role: Role) -> None:
    """Validate *role* and write it to *path* atomically.

    The JSON is written with :func:`steering.atomic_io.atomic_write_text`.  The file stem
    must equal ``role.name`` so that loading it back gives the same role.
    """
    p = Path(path)
    if p.suffix != ".json" or p.stem != role.name:
        raise RoleDataError(
            f"{p}: field 'name' ({role.name!r}) must match the file name; "
            f"expected a path ending in {role.name}.json"
        )
    data = role_to_dict(role)
    validate_role_dict(role.name, data, str(p))
    text = json.dumps(data, indent=2, ensure_ascii=False) + "\n"

    atomic_write_text(p, text)


def format_eval_prompt(role: Role, question: str, answer: str) -> str:
    """Fill the role's judge prompt with *question* and *answer*.

    Substitution is a single pass over the template, so braces (or even the
    literal text ``{answer}``) inside the question or answer are left alone.
    """
    if role.eval_prompt is None:
        raise RoleDataError(
            f"{role.source or role.name}: field 'eval_prompt' is not set for role "
            f"{role.name!r}; it cannot be judged"
        )
    values = {"question": question, "answer": answer}
    return _EVAL_FIELD_RE.sub(lambda m: values[m.group(1)], role.eval_prompt)


# --------------------------------------------------------------------------
# JSONL files: extraction questions and the catalog
# --------------------------------------------------------------------------


def _iter_jsonl(path: Path) -> Iterable[tuple[int, str, Any]]:
    """Yield ``(line_number, location, object)`` for each non-blank line."""
    text = _read_text(path)
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        loc = f"{path}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise RoleDataError(
                f"{loc}: invalid JSON at line {lineno}, column {exc.colno}: {exc.msg}"
            ) from None
        if not isinstance(obj, dict):
            raise RoleDataError(f"{loc}: line must be a JSON object, got {_type_name(obj)}")
        yield lineno, loc, obj


def _check_keys(obj: Mapping[str, Any], keys: tuple[str, ...], loc: str) -> None:
    unknown = [k for k in obj if k not in keys]
    if unknown:
        raise RoleDataError(
            f"{loc}: unknown field(s) {', '.join(repr(k) for k in unknown)} "
            f"(allowed: {', '.join(repr(k) for k in keys)})"
        )
    for k in keys:
        if k not in obj:
            raise RoleDataError(f"{loc}: field {k!r} is required")


def load_questions(path: str | os.PathLike[str]) -> tuple[Question, ...]:
    """Load general extraction questions from JSONL (``{"id", "question"}``).

    Duplicate ids and duplicate (normalised) texts are rejected; errors carry
    the line number.
    """
    p = Path(path)
    out: list[Question] = []
    ids: dict[int, int] = {}
    texts: dict[str, int] = {}
    for lineno, loc, obj in _iter_jsonl(p):
        _check_keys(obj, ("id", "question"), loc)
        qid, text = obj["id"], obj["question"]
        if not _is_int(qid) or qid < 0:
            raise RoleDataError(f"{loc}: field 'id' must be a non-negative integer, got {qid!r}")
        if not isinstance(text, str) or not text.strip():
            raise RoleDataError(f"{loc}: field 'question' must be a non-empty string")
        if qid in ids:
            raise RoleDataError(f"{loc}: field 'id' {qid} duplicates the id on line {ids[qid]}")
        key = normalize_text(text)
        if key in texts:
            raise RoleDataError(
                f"{loc}: field 'question' duplicates the question on line {texts[key]}: {text!r}"
            )
        ids[qid] = lineno
        texts[key] = lineno
        out.append(Question(id=qid, question=text))
    if not out:
        raise RoleDataError(f"{p}: field 'question': the file contains no questions")
    return tuple(out)


def load_catalog(path: str | os.PathLike[str] | None = None) -> tuple[CatalogEntry, ...]:
    """Load the role catalog (default ``data/role_catalog.jsonl``).

    Every line is ``{"name", "category", "description"}``; names follow the
    role-name rules and duplicates (case-insensitive) are rejected, listed.
    """
    p = Path(path) if path is not None else CATALOG_FILE
    entries: list[CatalogEntry] = []
    first_line: dict[str, int] = {}
    dupes: list[str] = []
    for lineno, loc, obj in _iter_jsonl(p):
        _check_keys(obj, ("name", "category", "description"), loc)
        for k in ("name", "category", "description"):
            if not isinstance(obj[k], str) or not obj[k].strip():
                raise RoleDataError(f"{loc}: field {k!r} must be a non-empty string")
        name = obj["name"]
        _check_name(name, loc)
        key = normalize_name(name)
        if key in first_line:
            dupes.append(f"{name!r} (lines {first_line[key]} and {lineno})")
        else:
            first_line[key] = lineno
        entries.append(CatalogEntry(name=name, category=obj["category"], description=obj["description"]))
    if dupes:
        raise RoleDataError(f"{p}: field 'name' has duplicate role name(s): {', '.join(dupes)}")
    if not entries:
        raise RoleDataError(f"{p}: field 'name': the catalog is empty")
    return tuple(entries)


# --------------------------------------------------------------------------
# role directories
# --------------------------------------------------------------------------


def load_role_dir(
    path: str | os.PathLike[str],
    questions_path: str | os.PathLike[str] | None = None,
) -> RoleSet:
    """Load a folder in the paper's layout.

    The folder holds one ``<role>.json`` per role, including ``default.json``.
    The extraction questions come from *questions_path* if given, else from
    ``extraction_questions.jsonl`` in the folder, else from the folder's parent.
    Role names that collide case-insensitively (``Diplomat.json`` and
    ``diplomat.json``) are rejected, listing the files.
    """
    d = Path(path)
    if not d.is_dir():
        raise RoleDataError(f"{d}: field 'roles': not a directory")
    files = sorted(f for f in d.iterdir() if f.suffix == ".json" and f.is_file())

    by_key: dict[str, list[str]] = {}
    for f in files:
        by_key.setdefault(normalize_name(f.stem), []).append(f.name)
    dupes = find_duplicate_names(f.stem for f in files)
    if dupes:
        listed = "; ".join(f"{k}: {', '.join(by_key[k])}" for k in dupes)
        raise RoleDataError(f"{d}: field 'name' has duplicate role name(s): {listed}")

    default: Role | None = None
    roles: dict[str, Role] = {}
    for f in files:
        role = load_role_file(f)
        if role.name == DEFAULT_ROLE_NAME:
            default = role
        else:
            roles[role.name] = role
    if default is None:
        raise RoleDataError(f"{d}: field 'default': missing {DEFAULT_ROLE_NAME}.json")
    if not roles:
        raise RoleDataError(f"{d}: field 'roles': no character role files (<name>.json) found")

    if questions_path is not None:
        qpath = Path(questions_path)
    else:
        candidates = [d / QUESTIONS_FILENAME, d.parent / QUESTIONS_FILENAME]
        qpath = next((c for c in candidates if c.is_file()), None)  # type: ignore[assignment]
        if qpath is None:
            raise RoleDataError(
                f"{d}: field 'questions': no {QUESTIONS_FILENAME} in the folder or its parent "
                f"(pass questions_path)"
            )
    questions = load_questions(qpath)
    return RoleSet(roles=roles, default=default, questions=questions)


def shipped_role_set() -> RoleSet:
    """The roles and questions shipped in ``data/``."""
    return load_role_dir(ROLES_DIR, QUESTIONS_FILE)
