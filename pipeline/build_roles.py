"""``build-roles``: write a role file for every catalog persona that lacks one.

For each selected entry of the role catalog (``data/role_catalog.jsonl``) the LLM is
given ``pipeline/prompts/build_role.txt`` and answers with a JSON object holding five
system prompts, the role's questions and a judge prompt with the 0-3 rubric. The
answer is validated with :func:`pipeline.role_schema.validate_role_dict` plus a few
builder-only checks; a malformed answer is sent back with the problem named, up to
``max_attempts`` times. A refusal is recorded with its reason and the builder moves on.

Every role is written as soon as it is ready (``write_role_file`` is atomic) and the
summary JSON is rewritten after each role, so an interrupted build loses at most the
roles in flight. Resuming is the default: a role whose file exists and validates is
skipped.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import re
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.llm import (
    Completion,
    FailureStreak,
    JobProgress,
    LLMClient,
    LLMConfig,
    LLMError,
    LLMRequestError,
    ProgressCallback,
    add_llm_arguments,
    extract_json_object,
    llm_config_from_args,
    make_client,
    render_prompt,
    run_workers,
)
from pipeline.role_schema import (
    DEFAULT_ROLE_NAME,
    EXPECTED_ROLE_QUESTIONS,
    N_INSTRUCTIONS,
    ROLES_DIR,
    CatalogEntry,
    Role,
    RoleDataError,
    load_catalog,
    load_role_file,
    normalize_name,
    validate_role_dict,
    write_role_file,
)
from pipeline.progress import StopRequested, check_stop, print_progress
from pipeline.store import atomic_write_json

log = logging.getLogger(__name__)

#: Stop reasons with which providers signal that the model declined.
REFUSAL_STOP_REASONS = frozenset({"refusal", "content_filter"})
#: Stop reasons meaning the answer hit the token limit.
TRUNCATED_STOP_REASONS = frozenset({"max_tokens", "length"})

_REFUSAL_RE = re.compile(
    r"\b(I\s+can(?:no|')t|I\s+(?:am|'m)\s+(?:not\s+able|unable|not\s+comfortable)|"
    r"I\s+won't|I\s+will\s+not|I\s+must\s+decline|I\s+(?:am|'m)\s+sorry,?\s+but|"
    r"I\s+(?:do\s+not|don't)\s+feel\s+comfortable)\b",
    re.IGNORECASE,
)
#: Names that must not appear in a judge prompt (the judge must not be told which model it grades).
_MODEL_NAME_RE = re.compile(r"\b(Claude|ChatGPT|GPT(?:-?\d[\w.]*)?|Anthropic|OpenAI|LLaMA|Llama|Qwen|Gemma|DeepSeek)\b")


class BuildRolesAborted(LLMError):
    """The LLM API kept failing; ``report`` holds what was done before the stop."""

    def __init__(self, message: str, report: "BuildRolesReport"):
        super().__init__(message)
        self.report = report


@dataclass(frozen=True)
class BuildRolesConfig:
    llm: LLMConfig
    output_dir: Path = ROLES_DIR
    catalog_path: Path | None = None  # None: data/role_catalog.jsonl
    start: int | None = None  # slice of the catalog, Python semantics
    end: int | None = None
    roles: tuple[str, ...] | None = None  # only these catalog names
    resume: bool = True  # skip roles whose file exists and validates
    max_attempts: int = 3  # answers per role before giving up on it
    n_questions: int = EXPECTED_ROLE_QUESTIONS
    summary_path: Path | None = None  # None: <output_dir>.build_summary.json beside the folder

    def __post_init__(self) -> None:
        object.__setattr__(self, "output_dir", Path(self.output_dir))
        if self.catalog_path is not None:
            object.__setattr__(self, "catalog_path", Path(self.catalog_path))
        if self.summary_path is not None:
            object.__setattr__(self, "summary_path", Path(self.summary_path))
        if self.roles is not None:
            object.__setattr__(self, "roles", tuple(self.roles))
        if self.max_attempts < 1:
            raise ValueError(f"BuildRolesConfig.max_attempts must be >= 1; got {self.max_attempts}")
        if self.n_questions < 1:
            raise ValueError(f"BuildRolesConfig.n_questions must be >= 1; got {self.n_questions}")

    @property
    def resolved_summary_path(self) -> Path:
        # Not inside output_dir: every *.json there is read as a role.
        if self.summary_path is not None:
            return self.summary_path
        return self.output_dir.parent / f"{self.output_dir.name}.build_summary.json"


@dataclass
class BuildRolesReport:
    selected: list[str] = field(default_factory=list)
    built: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # already present and valid
    refused: dict[str, str] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    usage: dict[str, int] = field(default_factory=dict)
    estimated_cost_usd: float | None = None
    model: str = ""
    summary_path: Path | None = None
    stopped: str | None = None  # why the run stopped early, if it did
    started_at: float = field(default_factory=time.time)
    finished_at: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "selected": len(self.selected),
            "done": sorted(self.built),
            "skipped_existing": sorted(self.skipped),
            "refused": dict(sorted(self.refused.items())),
            "failed": dict(sorted(self.failed.items())),
            "pending": sorted(
                set(self.selected) - set(self.built) - set(self.skipped) - set(self.refused) - set(self.failed)
            ),
            "usage": self.usage,
            "estimated_cost_usd": self.estimated_cost_usd,
            "stopped": self.stopped,
        }


# --------------------------------------------------------------------------- answer parsing


@dataclass(frozen=True)
class RoleAnswer:
    """One LLM answer, judged: exactly one of role / refusal / problem is set."""

    role: Role | None = None
    refusal: str | None = None
    problem: str | None = None


def _first_sentence(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    match = re.search(r"(.+?[.!?])(\s|$)", text)
    sentence = match.group(1) if match else text
    return sentence[:limit]


def parse_role_answer(
    entry: CatalogEntry,
    completion: Completion,
    n_questions: int = EXPECTED_ROLE_QUESTIONS,
) -> RoleAnswer:
    """Turn one answer into a Role, a refusal reason, or a problem to send back."""
    text = completion.text or ""
    if completion.stop_reason in REFUSAL_STOP_REASONS:
        why = _first_sentence(text) if text.strip() else "no text"
        return RoleAnswer(refusal=f"the model declined (stop reason {completion.stop_reason!r}): {why}")
    data = extract_json_object(text)
    if data is None:
        if _REFUSAL_RE.search(text[:600]):
            return RoleAnswer(refusal=_first_sentence(text))
        if completion.stop_reason in TRUNCATED_STOP_REASONS:
            return RoleAnswer(
                problem="the reply was cut off at the output token limit before the JSON object was "
                "complete; keep every part shorter"
            )
        return RoleAnswer(problem="the reply does not contain a JSON object")
    if "refusal" in data and "instruction" not in data:
        reason = data.get("refusal")
        return RoleAnswer(refusal=str(reason).strip() or "the model declined without a reason")
    try:
        role = validate_role_dict(entry.name, data, f"LLM answer for role {entry.name!r}")
    except RoleDataError as exc:
        return RoleAnswer(problem=str(exc))
    if len(role.questions) != n_questions:
        return RoleAnswer(
            problem=f"field 'questions' must list exactly {n_questions} different questions, "
            f"got {len(role.questions)}"
        )
    assert role.eval_prompt is not None  # validate_role_dict requires it for character roles
    missing_scores = [d for d in "0123" if d not in role.eval_prompt]
    if missing_scores:
        return RoleAnswer(
            problem="field 'eval_prompt' must define the scores 0, 1, 2 and 3 "
            f"(missing: {', '.join(missing_scores)})"
        )
    allowed = f"{entry.name} {entry.description}"
    names = sorted({m.group(1) for m in _MODEL_NAME_RE.finditer(role.eval_prompt)} - set(allowed.split()))
    if names:
        return RoleAnswer(
            problem=f"field 'eval_prompt' must not name an AI model or company (found: {', '.join(names)})"
        )
    return RoleAnswer(role=role)


# --------------------------------------------------------------------------- selection


def select_entries(config: BuildRolesConfig) -> list[CatalogEntry]:
    """The catalog entries this run covers (slice, then --roles filter), default excluded."""
    catalog = load_catalog(config.catalog_path)
    chosen = list(catalog[config.start : config.end])
    if config.roles is not None:
        by_name = {normalize_name(e.name): e for e in chosen}
        wanted, unknown = [], []
        for raw in config.roles:
            key = normalize_name(raw)
            if key in by_name:
                if by_name[key] not in wanted:
                    wanted.append(by_name[key])
            else:
                unknown.append(raw)
        if unknown:
            where = "the catalog" if config.start is None and config.end is None else "the selected catalog slice"
            raise RoleDataError(
                f"{config.catalog_path or 'role catalog'}: field 'name': role(s) not in {where}: "
                f"{', '.join(unknown)}"
            )
        chosen = wanted
    return [e for e in chosen if e.name != DEFAULT_ROLE_NAME]


def _existing_valid(path: Path) -> bool:
    if not path.is_file():
        return False
    try:
        load_role_file(path)
    except RoleDataError as exc:
        log.warning("%s exists but is invalid, rebuilding it: %s", path, exc)
        return False
    return True


# --------------------------------------------------------------------------- building


async def build_one_role(
    client: LLMClient, entry: CatalogEntry, config: BuildRolesConfig
) -> RoleAnswer:
    """Ask for one role, feeding validation problems back; the final RoleAnswer."""
    prompt = render_prompt(
        "build_role.txt",
        role_name=entry.name,
        role_category=entry.category,
        role_description=entry.description,
        n_prompts=N_INSTRUCTIONS,
        n_questions=config.n_questions,
    )
    messages: list[dict[str, str]] = [{"role": "user", "content": prompt}]
    problem = ""
    for attempt in range(1, config.max_attempts + 1):
        completion = await client.complete(messages)
        answer = parse_role_answer(entry, completion, config.n_questions)
        if answer.problem is None:
            return answer
        problem = answer.problem
        log.info("role %s: attempt %d/%d unusable: %s", entry.name, attempt, config.max_attempts, problem)
        messages = messages + [
            {"role": "assistant", "content": completion.text.strip() or "(empty reply)"},
            {"role": "user", "content": render_prompt("build_role_retry.txt", problem=problem, role_name=entry.name)},
        ]
    return RoleAnswer(problem=f"no valid role after {config.max_attempts} attempts; last problem: {problem}")


async def build_roles_async(
    config: BuildRolesConfig,
    progress: ProgressCallback | None = None,
    stop_event: threading.Event | None = None,
) -> BuildRolesReport:
    """Async form of :func:`build_roles` (for callers that already run an event loop)."""
    entries = select_entries(config)
    report = BuildRolesReport(
        selected=[e.name for e in entries],
        model=config.llm.describe(),
        summary_path=config.resolved_summary_path,
    )
    todo: list[CatalogEntry] = []
    for entry in entries:
        if config.resume and _existing_valid(config.output_dir / f"{entry.name}.json"):
            report.skipped.append(entry.name)
        else:
            todo.append(entry)
    log.info(
        "build-roles: %d selected, %d already built, %d to build with %s",
        len(entries), len(report.skipped), len(todo), config.llm.describe(),
    )
    if not todo:
        _finish(report, None)
        return report

    client = make_client(config.llm)  # MissingAPIKeyError here, before any request
    tracker = JobProgress(total=len(todo), label="build-roles", callback=progress)

    def save_summary() -> None:
        report.usage = client.usage.as_dict()
        report.estimated_cost_usd = client.estimated_cost()
        atomic_write_json(config.resolved_summary_path, report.as_dict())

    streak = FailureStreak(5)

    async def handle(entry: CatalogEntry) -> None:
        rejected: LLMRequestError | None = None
        check_stop(stop_event)
        try:
            answer = await build_one_role(client, entry, config)
        except LLMRequestError as exc:
            report.failed[entry.name] = str(exc)
            if not exc.request_specific:
                raise
            answer, rejected = None, exc
        else:
            streak.success()
        if answer is not None:
            if answer.role is not None:
                write_role_file(config.output_dir / f"{entry.name}.json", answer.role)
                report.built.append(entry.name)
            elif answer.refusal is not None:
                report.refused[entry.name] = answer.refusal
                log.warning("role %s refused: %s", entry.name, answer.refusal)
            else:
                report.failed[entry.name] = answer.problem or "unknown problem"
                log.warning("role %s failed: %s", entry.name, answer.problem)
        save_summary()
        tracker.advance(entry.name)
        if rejected is not None:
            streak.failure(rejected)  # stops the run when every request is being rejected

    config.output_dir.mkdir(parents=True, exist_ok=True)
    try:
        await run_workers(todo, handle, config.llm.max_concurrency)
    except StopRequested:
        _finish(report, "stopped on request", save_summary)
        return report
    except LLMRequestError as exc:
        message = (
            f"build-roles stopped: {exc}. {len(report.built)} role(s) were written to "
            f"{config.output_dir}; run again to continue (finished roles are skipped)"
        )
        _finish(report, message, save_summary)
        raise BuildRolesAborted(message, report) from exc
    except BaseException:
        _finish(report, "interrupted", save_summary)
        raise
    finally:
        await client.close()
    _finish(report, None, save_summary)
    return report


def _finish(report: BuildRolesReport, stopped: str | None, save: Any = None) -> None:
    report.stopped = stopped
    report.finished_at = time.time()
    if save is not None:
        save()
    elif report.summary_path is not None:
        atomic_write_json(report.summary_path, report.as_dict())


def build_roles(
    config: BuildRolesConfig,
    progress: ProgressCallback | None = None,
    stop_event: threading.Event | None = None,
) -> BuildRolesReport:
    """Build the missing role files; see the module docstring.

    Raises MissingAPIKeyError before any request, RoleDataError for a bad catalog or
    unknown role names, and BuildRolesAborted (with ``.report``) if the API keeps failing.
    Setting ``stop_event`` stops before the next role (roles in flight are dropped;
    ``report.stopped`` says so).
    """
    return asyncio.run(build_roles_async(config, progress, stop_event))


# --------------------------------------------------------------------------- command line


def _split_names(values: list[str] | None) -> tuple[str, ...] | None:
    if not values:
        return None
    names = [n.strip() for v in values for n in v.split(",") if n.strip()]
    return tuple(names) or None


def add_cli(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "build-roles",
        help="generate role files (system prompts, questions, judge prompt) with an LLM",
        description=" ".join(__doc__.split("\n\n")[0].split(": ", 1)[-1].split()) if __doc__ else None,
    )
    parser.add_argument(
        "--output-dir", type=Path, default=ROLES_DIR,
        help=f"folder of <role>.json files to complete (default: {ROLES_DIR})",
    )
    parser.add_argument(
        "--catalog", type=Path, default=None,
        help="role catalog JSONL with name/category/description per line (default: data/role_catalog.jsonl)",
    )
    parser.add_argument("--start", type=int, default=None, help="first catalog line to use, 0-based (default: 0)")
    parser.add_argument("--end", type=int, default=None, help="stop before this catalog line (default: the end)")
    parser.add_argument(
        "--roles", nargs="+", default=None, metavar="NAME",
        help="only these catalog roles (space- or comma-separated)",
    )
    parser.add_argument(
        "--no-resume", dest="resume", action="store_false",
        help="rebuild roles even if their file exists and is valid (default: skip them)",
    )
    parser.add_argument(
        "--max-attempts", type=int, default=3,
        help="answers asked per role before it is reported as failed (default: 3)",
    )
    parser.add_argument(
        "--n-questions", type=int, default=EXPECTED_ROLE_QUESTIONS,
        help=f"questions per role (default: {EXPECTED_ROLE_QUESTIONS})",
    )
    parser.add_argument(
        "--summary", type=Path, default=None,
        help="where to write the summary JSON (default: <output-dir>.build_summary.json next to the folder)",
    )
    add_llm_arguments(parser, default_provider="anthropic", default_concurrency=4,
                      default_max_tokens=8192, default_temperature=1.0)
    parser.set_defaults(func=run_cli)


def run_cli(args: argparse.Namespace) -> int:
    """Exit 0 when every selected role exists (refusals are reported but not errors),
    1 when some roles failed or were refused, 2 when the run could not start or stopped."""
    try:
        config = BuildRolesConfig(
            llm=llm_config_from_args(args),
            output_dir=args.output_dir,
            catalog_path=args.catalog,
            start=args.start,
            end=args.end,
            roles=_split_names(args.roles),
            resume=args.resume,
            max_attempts=args.max_attempts,
            n_questions=args.n_questions,
            summary_path=args.summary,
        )
        report = build_roles(config, progress=print_progress)
    except BuildRolesAborted as exc:
        _print_report(exc.report)
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (LLMError, RoleDataError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    _print_report(report)
    return 1 if report.failed or report.refused else 0



def _print_report(report: BuildRolesReport) -> None:
    cost = f"${report.estimated_cost_usd:.2f}" if report.estimated_cost_usd is not None else "unknown"
    print(
        f"build-roles: {len(report.built)} built, {len(report.skipped)} already present, "
        f"{len(report.refused)} refused, {len(report.failed)} failed "
        f"({report.usage.get('input_tokens', 0)} input / {report.usage.get('output_tokens', 0)} output tokens, "
        f"estimated cost {cost}); summary: {report.summary_path}"
    )
    for name, reason in sorted(report.refused.items()):
        print(f"  refused {name}: {reason}")
    for name, reason in sorted(report.failed.items()):
        print(f"  failed  {name}: {reason}")
