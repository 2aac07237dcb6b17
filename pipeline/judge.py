"""``judge``: score how well each role-play response stays in its role (0-3).

For every saved response of a character role (the ``default`` role is not judged)
that has no valid score yet, the role's ``eval_prompt`` (from the run's role
snapshot) is filled with the question and the response and sent to the judge
model. The reply must be a lone digit ("2", "**2**", "2.") or a labelled score
("Score: 2"); anything else, or a number outside 0-3, is stored as unscored (score
null, with the raw reply and the reason) and asked again on the next run.

Scores are appended to ``scores.jsonl`` one line per reply as they arrive, so a
crash or a stopped run loses nothing already received; the latest record for a
rollout_id wins. An API that keeps failing (retries exhausted, authentication or
model errors) stops the run with a clear error.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import os
import re
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.llm import (
    JobProgress,
    LLMConfig,
    LLMError,
    LLMRequestError,
    FailureStreak,
    ProgressCallback,
    add_llm_arguments,
    estimate_cost,
    llm_config_from_args,
    make_client,
    run_workers,
)
from pipeline.role_schema import DEFAULT_ROLE_NAME, Role, RoleDataError, format_eval_prompt, load_role_dir
from pipeline.manifest import record_step
from pipeline.progress import StopRequested, check_stop, print_progress
from pipeline.store import JsonlLog, RunPaths, read_responses

log = logging.getLogger(__name__)

MIN_SCORE, MAX_SCORE = 0, 3
#: Rough characters per token, for the dry-run estimate only.
CHARS_PER_TOKEN = 4.0

_LONE_NUMBER_RE = re.compile(r"^[\W_]*(\d+)[\W_]*$")
_LABELLED_RE = re.compile(r"\bscore\b[^\w\n]{0,3}(?:is|of|=)?[^\w\n]{0,4}(\d+)\b", re.IGNORECASE)


class JudgeAborted(LLMError):
    """The judge API kept failing; ``report`` says what was scored before the stop."""

    def __init__(self, message: str, report: "JudgeReport"):
        super().__init__(message)
        self.report = report


@dataclass(frozen=True)
class JudgeConfig:
    llm: LLMConfig
    roles: tuple[str, ...] | None = None  # only responses of these roles
    limit: int | None = None  # at most this many requests in this run
    est_output_tokens: int = 4  # output tokens per reply assumed by the dry run
    max_rejected_in_a_row: int = 5  # HTTP 400s in a row that stop the run (a bad setting, not a bad item)

    def __post_init__(self) -> None:
        if self.roles is not None:
            object.__setattr__(self, "roles", tuple(self.roles))
        if self.limit is not None and self.limit < 0:
            raise ValueError(f"JudgeConfig.limit must be >= 0; got {self.limit}")


@dataclass(frozen=True)
class JudgeItem:
    rollout_id: str
    role: str
    prompt: str


@dataclass
class JudgePlan:
    """What a run would do (the dry run)."""

    total_responses: int
    default_responses: int
    already_scored: int
    pending: int  # requests this run would send
    est_input_tokens: int
    est_output_tokens: int
    est_cost_usd: float | None
    model: str

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class JudgeReport:
    total_responses: int = 0
    default_responses: int = 0
    already_scored: int = 0
    requested: int = 0
    scored: int = 0  # valid scores received in this run
    unscored: int = 0  # replies without a usable score (asked again next run)
    failed: int = 0  # requests the API rejected (asked again next run)
    score_counts: dict[int, int] = field(default_factory=lambda: {s: 0 for s in range(MIN_SCORE, MAX_SCORE + 1)})
    usage: dict[str, int] = field(default_factory=dict)
    estimated_cost_usd: float | None = None
    model: str = ""
    stopped: str | None = None  # why the run ended early ("stopped on request", an API error)
    left_by_limit: int = 0  # unscored responses not requested because of JudgeConfig.limit

    @property
    def remaining(self) -> int:
        """Responses still without a valid score after this run (limit, stop, bad replies)."""
        return self.requested - self.scored + self.left_by_limit

    def as_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "remaining": self.remaining}


# --------------------------------------------------------------------------- scores


def parse_score(text: str) -> tuple[int | None, str | None]:
    """(score, None) for a usable reply, else (None, reason)."""
    stripped = (text or "").strip()
    if not stripped:
        return None, "empty judge reply"
    match = _LONE_NUMBER_RE.match(stripped)
    if match:
        value = int(match.group(1))
    else:
        labelled = _LABELLED_RE.findall(stripped)
        if not labelled:
            return None, "no score found in the judge reply (expected a digit 0-3 or 'Score: N')"
        value = int(labelled[-1])
    if not MIN_SCORE <= value <= MAX_SCORE:
        return None, f"score {value} is outside {MIN_SCORE}-{MAX_SCORE}"
    return value, None


def _valid(score: Any) -> bool:
    return isinstance(score, int) and not isinstance(score, bool) and MIN_SCORE <= score <= MAX_SCORE


def latest_score_records(run_dir: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """The latest scores.jsonl record per rollout_id."""
    latest: dict[str, dict[str, Any]] = {}
    for record in JsonlLog(RunPaths(run_dir).scores).read():
        rollout_id = record.get("rollout_id")
        if isinstance(rollout_id, str):
            latest[rollout_id] = record
    return latest


def read_scores(run_dir: str | os.PathLike[str]) -> dict[str, int]:
    """rollout_id -> score (0-3) for every rollout whose latest record has a valid score."""
    return {rid: rec["score"] for rid, rec in latest_score_records(run_dir).items() if _valid(rec.get("score"))}


# --------------------------------------------------------------------------- planning


def _collect(run_dir: Path, config: JudgeConfig) -> tuple[list[JudgeItem], JudgeReport]:
    """The pending judge requests, with the counts of what is skipped."""
    paths = RunPaths(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {run_dir} does not exist")
    responses = read_responses(run_dir)
    report = JudgeReport(total_responses=len(responses), model=config.llm.describe())
    if responses.empty:
        return [], report
    if not paths.roles_dir.is_dir():
        raise RoleDataError(f"{paths.roles_dir}: field 'roles': the run has no role snapshot to take eval prompts from")
    role_set = load_role_dir(paths.roles_dir)

    is_default = responses["role"] == DEFAULT_ROLE_NAME
    report.default_responses = int(is_default.sum())
    judged = responses[~is_default]
    if config.roles is not None:
        unknown = sorted(set(config.roles) - set(judged["role"]))
        if unknown:
            raise RoleDataError(
                f"{run_dir}: field 'roles': no responses for role(s) {', '.join(unknown)} in this run"
            )
        judged = judged[judged["role"].isin(config.roles)]
    missing = sorted(set(judged["role"]) - set(role_set.roles))
    if missing:
        raise RoleDataError(
            f"{paths.roles_dir}: field 'roles': responses exist for role(s) with no role file in the "
            f"run's snapshot: {', '.join(missing)}"
        )

    scored = set(read_scores(run_dir))
    items: list[JudgeItem] = []
    for row in judged.itertuples(index=False):
        if row.rollout_id in scored:
            report.already_scored += 1
            continue
        role: Role = role_set.roles[row.role]
        answer = row.response if isinstance(row.response, str) else ""
        items.append(JudgeItem(str(row.rollout_id), str(row.role), format_eval_prompt(role, str(row.question), answer)))
    if config.limit is not None:
        report.left_by_limit = max(0, len(items) - config.limit)
        items = items[: config.limit]
    return items, report


def plan_judge(run_dir: str | os.PathLike[str], config: JudgeConfig) -> JudgePlan:
    """Count the requests and estimate tokens and cost, without any API call or key."""
    items, report = _collect(Path(run_dir), config)
    input_tokens = sum(math.ceil(len(item.prompt) / CHARS_PER_TOKEN) for item in items)
    output_tokens = len(items) * config.est_output_tokens
    return JudgePlan(
        total_responses=report.total_responses,
        default_responses=report.default_responses,
        already_scored=report.already_scored,
        pending=len(items),
        est_input_tokens=input_tokens,
        est_output_tokens=output_tokens,
        est_cost_usd=estimate_cost(config.llm.provider, config.llm.model, input_tokens, output_tokens),
        model=config.llm.describe(),
    )


# --------------------------------------------------------------------------- judging


def _settings(config: JudgeConfig) -> dict[str, Any]:
    """What the manifest records about a judge run (never the API key)."""
    return {"llm": config.llm.public_settings(), "roles": config.roles, "limit": config.limit}


async def judge_run_async(
    run_dir: str | os.PathLike[str],
    config: JudgeConfig,
    progress: ProgressCallback | None = None,
    stop_event: threading.Event | None = None,
) -> JudgeReport:
    """Async form of :func:`judge_run` (for callers that already run an event loop)."""
    run_dir = Path(run_dir)
    client = make_client(config.llm)  # MissingAPIKeyError before anything else
    try:
        items, report = _collect(run_dir, config)
        report.requested = len(items)
        record_step(run_dir, "judge", _settings(config), finished=False)
        log.info(
            "judge: %d responses, %d default (not judged), %d already scored, %d to judge with %s",
            report.total_responses, report.default_responses, report.already_scored, len(items),
            config.llm.describe(),
        )
        scores = JsonlLog(RunPaths(run_dir).scores)
        tracker = JobProgress(total=len(items), label="judge", callback=progress)

        streak = FailureStreak(config.max_rejected_in_a_row)

        async def handle(item: JudgeItem) -> None:
            rejected: LLMRequestError | None = None
            check_stop(stop_event)
            try:
                completion = await client.complete([{"role": "user", "content": item.prompt}])
            except LLMRequestError as exc:
                if not exc.request_specific:
                    raise
                score, raw, problem = None, "", str(exc)
                report.failed += 1
                rejected = exc
            else:
                streak.success()
                raw = completion.text
                score, problem = parse_score(raw)
                if score is None:
                    report.unscored += 1
                    log.warning("judge: rollout %s unscored: %s (reply %r)", item.rollout_id, problem, raw[:200])
                else:
                    report.scored += 1
                    report.score_counts[score] += 1
            scores.append({
                "rollout_id": item.rollout_id,
                "role": item.role,
                "score": score,
                "raw": raw,
                "judge_model": config.llm.model,
                "error": problem,
            })
            tracker.advance(item.role)
            if rejected is not None:
                streak.failure(rejected)  # stops the run when every request is being rejected

        try:
            await run_workers(items, handle, config.llm.max_concurrency)
        except StopRequested:
            report.stopped = "stopped on request; scores received so far are kept"
        except LLMRequestError as exc:
            report.stopped = (
                f"judge stopped: {exc}. {report.scored + report.unscored + report.failed} replies received "
                f"in this run are kept in {scores.path}; run the judge again to continue"
            )
            raise JudgeAborted(report.stopped, report) from exc
        finally:
            report.usage = client.usage.as_dict()
            report.estimated_cost_usd = client.estimated_cost()
            record_step(
                run_dir, "judge", _settings(config), finished=report.remaining == 0 and report.stopped is None,
                extra={"scored": len(read_scores(run_dir)), "unscored_or_pending": report.remaining},
            )
        return report
    finally:
        await client.close()


def judge_run(
    run_dir: str | os.PathLike[str],
    config: JudgeConfig,
    progress: ProgressCallback | None = None,
    stop_event: threading.Event | None = None,
) -> JudgeReport:
    """Judge every unscored character-role response of ``run_dir``; see the module docstring.

    Raises MissingAPIKeyError before any work, RoleDataError if the run's role snapshot
    is missing or lacks a role, and JudgeAborted (with ``.report``) if the API keeps failing.
    Setting ``stop_event`` stops the run before its next request (``report.stopped`` says so).
    """
    return asyncio.run(judge_run_async(run_dir, config, progress, stop_event))


# --------------------------------------------------------------------------- command line


def add_cli(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "judge",
        help="score each role-play response's role adherence (0-3) with an LLM judge",
        description=" ".join(__doc__.split("\n\n")[0].split(": ", 1)[-1].split()) if __doc__ else None,
    )
    parser.add_argument("--run-dir", type=Path, required=True, help="the run directory whose responses to judge")
    parser.add_argument(
        "--roles", nargs="+", default=None, metavar="NAME",
        help="only judge responses of these roles (space- or comma-separated)",
    )
    parser.add_argument("--limit", type=int, default=None, help="send at most this many requests in this run")
    parser.add_argument(
        "--dry-run", action="store_true",
        help="print the number of requests and the estimated tokens and cost, without calling the API",
    )
    add_llm_arguments(parser, default_provider="openai", default_concurrency=16,
                      default_max_tokens=256, default_temperature=0.0)
    parser.set_defaults(func=run_cli)


def run_cli(args: argparse.Namespace) -> int:
    """Exit 0 when every judged response has a valid score, 1 when some are still
    unscored (run again), 2 when the run could not start or stopped."""
    roles = None
    if args.roles:
        roles = tuple(n.strip() for v in args.roles for n in v.split(",") if n.strip()) or None
    try:
        config = JudgeConfig(llm=llm_config_from_args(args), roles=roles, limit=args.limit)
        if args.dry_run:
            plan = plan_judge(args.run_dir, config)
            cost = f"${plan.est_cost_usd:.2f}" if plan.est_cost_usd is not None else "unknown (no price for this model)"
            print(
                f"judge dry run with {plan.model}: {plan.pending} requests "
                f"({plan.total_responses} responses, {plan.default_responses} default not judged, "
                f"{plan.already_scored} already scored); about {plan.est_input_tokens} input and "
                f"{plan.est_output_tokens} output tokens, estimated cost {cost}"
            )
            return 0
        report = judge_run(args.run_dir, config, progress=print_progress)
    except JudgeAborted as exc:
        _print_report(exc.report)
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (LLMError, RoleDataError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    _print_report(report)
    return 1 if report.unscored or report.failed else 0


def _print_report(report: JudgeReport) -> None:
    cost = f"${report.estimated_cost_usd:.2f}" if report.estimated_cost_usd is not None else "unknown"
    counts = ", ".join(f"{s}: {n}" for s, n in report.score_counts.items())
    print(
        f"judge: {report.scored} scored ({counts}), {report.unscored} unscored, {report.failed} rejected, "
        f"{report.already_scored} already scored before; {report.usage.get('input_tokens', 0)} input / "
        f"{report.usage.get('output_tokens', 0)} output tokens, estimated cost {cost}"
    )
