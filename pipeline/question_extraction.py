"""``extract-questions``: choose the general extraction questions from the role questions.

Every role asks the model its own questions, but the activations that define the
Assistant Axis are collected on questions that *any* persona can answer from its own
point of view ("What do you do when you feel overwhelmed?"). This step builds that
shared set from the questions of all roles:

1. pool the questions of every character role in the role folder;
2. drop exact duplicates (same text after casefolding and removing punctuation) and
   near duplicates (token Jaccard similarity of the content words at or above a
   threshold; pure Python, with prefix filtering so 10 000 questions take seconds);
3. ask the LLM, in batches (``pipeline/prompts/label_questions.txt``), whether each
   remaining question is *general* or *role-specific*; candidates are sent in an
   order that interleaves the source roles, and labelling stops once enough general
   questions are known (``oversample`` x N; 0 labels everything);
4. pick N general questions round-robin over their source roles, so no role dominates;
5. write ``extraction_questions.jsonl`` (``{"id", "question"}`` per line) atomically.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import random
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.llm import (
    JobProgress,
    LLMClient,
    LLMConfig,
    LLMError,
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
    QUESTIONS_FILE,
    QUESTIONS_FILENAME,
    ROLES_DIR,
    RoleDataError,
    load_questions,
    load_role_file,
    normalize_text,
)
from pipeline.progress import print_progress
from pipeline.store import atomic_write_text

log = logging.getLogger(__name__)

#: Function words ignored by the near-duplicate comparison.
STOPWORDS = frozenset(
    """a an the and or but if of to in on at by for with about as from into than then so
    is are was were be been being am do does did done have has had having will would shall
    should can could may might must i me my mine we us our you your yours he she it its they
    them their this that these those what which who whom whose when where why how s t d ll re
    ve m there here any some all""".split()
)


@dataclass(frozen=True)
class ExtractQuestionsConfig:
    llm: LLMConfig
    roles_dir: Path = ROLES_DIR
    output_path: Path | None = None  # None: the questions file load_role_dir finds for roles_dir
    n_questions: int = 240
    batch_size: int = 25
    similarity_threshold: float = 0.8  # token Jaccard at or above this = near duplicate
    oversample: float = 2.0  # label until this many x n_questions are general; 0 labels all
    max_attempts: int = 3  # answers per batch when labels are missing or malformed
    seed: int = 0
    force: bool = False  # overwrite an existing output file

    def __post_init__(self) -> None:
        object.__setattr__(self, "roles_dir", Path(self.roles_dir))
        if self.output_path is not None:
            object.__setattr__(self, "output_path", Path(self.output_path))
        if self.n_questions < 1:
            raise ValueError(f"ExtractQuestionsConfig.n_questions must be >= 1; got {self.n_questions}")
        if self.batch_size < 1:
            raise ValueError(f"ExtractQuestionsConfig.batch_size must be >= 1; got {self.batch_size}")
        if not 0 < self.similarity_threshold <= 1:
            raise ValueError(
                f"ExtractQuestionsConfig.similarity_threshold must be in (0, 1]; got {self.similarity_threshold}"
            )
        if self.oversample < 0:
            raise ValueError(f"ExtractQuestionsConfig.oversample must be >= 0; got {self.oversample}")
        if self.max_attempts < 1:
            raise ValueError(f"ExtractQuestionsConfig.max_attempts must be >= 1; got {self.max_attempts}")

    @property
    def resolved_output_path(self) -> Path:
        if self.output_path is not None:
            return self.output_path
        if self.roles_dir.resolve() == ROLES_DIR.resolve():
            return QUESTIONS_FILE
        return self.roles_dir / QUESTIONS_FILENAME


@dataclass(frozen=True)
class Candidate:
    role: str  # the first role that asked it
    question: str


@dataclass
class ExtractQuestionsReport:
    roles: int = 0
    pooled: int = 0
    exact_duplicates: int = 0
    near_duplicates: int = 0
    after_dedup: int = 0
    labelled: int = 0
    judged_general: int = 0
    unlabelled: int = 0  # sent to the LLM but no usable label came back
    written: int = 0
    output_path: Path | None = None
    per_role: dict[str, int] = field(default_factory=dict)  # written questions per source role
    usage: dict[str, int] = field(default_factory=dict)
    estimated_cost_usd: float | None = None

    def as_dict(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        out["output_path"] = str(self.output_path) if self.output_path else None
        return out


# --------------------------------------------------------------------------- pooling and dedup


def pool_role_questions(roles_dir: Path) -> tuple[list[Candidate], int]:
    """(every character role's questions in file order, number of roles)."""
    if not roles_dir.is_dir():
        raise RoleDataError(f"{roles_dir}: field 'roles': not a directory")
    pooled: list[Candidate] = []
    n_roles = 0
    for path in sorted(roles_dir.glob("*.json")):
        if path.stem == DEFAULT_ROLE_NAME:
            continue
        role = load_role_file(path)
        n_roles += 1
        pooled.extend(Candidate(role.name, q.strip()) for q in role.questions)
    if not pooled:
        raise RoleDataError(f"{roles_dir}: field 'questions': no character role files with questions found")
    return pooled, n_roles


def content_tokens(text: str) -> frozenset[str]:
    """The words compared by the near-duplicate check (all words if only function words)."""
    words = normalize_text(text).split()
    content = frozenset(w for w in words if w not in STOPWORDS)
    return content or frozenset(words)


def deduplicate(
    candidates: list[Candidate], threshold: float = 0.8
) -> tuple[list[Candidate], int, int]:
    """(kept, exact duplicates dropped, near duplicates dropped); the first occurrence is kept.

    Near duplicates: Jaccard(content_tokens) >= threshold. Pairs are found with prefix
    filtering: with tokens sorted rarest first, two sets this similar must share a
    token within their first ``len - ceil(threshold * len) + 1`` tokens, so only kept
    questions indexed under those prefix tokens are compared.
    """
    seen_exact: set[str] = set()
    unique: list[tuple[Candidate, frozenset[str]]] = []
    exact = 0
    for cand in candidates:
        key = normalize_text(cand.question)
        if key in seen_exact:
            exact += 1
            continue
        seen_exact.add(key)
        unique.append((cand, content_tokens(cand.question)))

    frequency = Counter(token for _, tokens in unique for token in tokens)
    index: dict[str, list[int]] = defaultdict(list)
    kept_tokens: list[frozenset[str]] = []
    kept: list[Candidate] = []
    near = 0
    for cand, tokens in unique:
        ordered = sorted(tokens, key=lambda t: (frequency[t], t))
        prefix = ordered[: len(ordered) - math.ceil(threshold * len(ordered)) + 1]
        duplicate = False
        checked: set[int] = set()
        for token in prefix:
            for other in index.get(token, ()):
                if other in checked:
                    continue
                checked.add(other)
                theirs = kept_tokens[other]
                if len(tokens & theirs) / len(tokens | theirs) >= threshold:
                    duplicate = True
                    break
            if duplicate:
                break
        if duplicate:
            near += 1
            continue
        position = len(kept)
        kept.append(cand)
        kept_tokens.append(tokens)
        for token in prefix:
            index[token].append(position)
    return kept, exact, near


def interleave_by_role(candidates: list[Candidate], seed: int = 0) -> list[Candidate]:
    """Round-robin over source roles (each role's questions shuffled with ``seed``)."""
    rng = random.Random(seed)
    by_role: dict[str, list[Candidate]] = defaultdict(list)
    for cand in candidates:
        by_role[cand.role].append(cand)
    roles = sorted(by_role)
    rng.shuffle(roles)
    for name in roles:
        rng.shuffle(by_role[name])
    out: list[Candidate] = []
    depth = 0
    while len(out) < len(candidates):
        for name in roles:
            if depth < len(by_role[name]):
                out.append(by_role[name][depth])
        depth += 1
    return out


def pick_spread(general: list[Candidate], n: int) -> list[Candidate]:
    """Up to n questions, taking one per source role in turn (order within a role kept)."""
    by_role: dict[str, list[Candidate]] = defaultdict(list)
    order: list[str] = []
    for cand in general:
        if cand.role not in by_role:
            order.append(cand.role)
        by_role[cand.role].append(cand)
    picked: list[Candidate] = []
    depth = 0
    while len(picked) < n and any(depth < len(v) for v in by_role.values()):
        for name in order:
            if depth < len(by_role[name]) and len(picked) < n:
                picked.append(by_role[name][depth])
        depth += 1
    return picked


# --------------------------------------------------------------------------- labelling


def parse_labels(text: str, n: int) -> tuple[dict[int, bool], str | None]:
    """({1-based number: is_general}, problem or None) from one labelling reply."""
    data = extract_json_object(text or "")
    if data is None:
        return {}, "the reply does not contain a JSON object"
    labels: dict[int, bool] = {}
    for key, value in data.items():
        try:
            number = int(str(key).strip())
        except ValueError:
            continue
        label = str(value).strip().lower() if not isinstance(value, bool) else ("general" if value else "specific")
        if 1 <= number <= n and label in ("general", "specific"):
            labels[number] = label == "general"
    missing = [i for i in range(1, n + 1) if i not in labels]
    if missing:
        shown = ", ".join(map(str, missing[:20])) + (" ..." if len(missing) > 20 else "")
        return labels, f"no valid label ('general' or 'specific') for question(s) {shown}"
    return labels, None


async def label_batch(
    client: LLMClient, batch: list[Candidate], max_attempts: int
) -> dict[int, bool]:
    """Labels for one batch, keyed by position in the batch (0-based); gaps = unlabelled."""
    numbered = "\n".join(f"{i}. {cand.question}" for i, cand in enumerate(batch, start=1))
    messages = [{
        "role": "user",
        "content": render_prompt("label_questions.txt", n_questions=len(batch), numbered_questions=numbered),
    }]
    labels: dict[int, bool] = {}
    for attempt in range(1, max_attempts + 1):
        completion = await client.complete(messages)
        found, problem = parse_labels(completion.text, len(batch))
        labels.update(found)
        if problem is None:
            break
        log.info("labelling batch: attempt %d/%d incomplete: %s", attempt, max_attempts, problem)
        messages = messages + [
            {"role": "assistant", "content": completion.text.strip() or "(empty reply)"},
            {"role": "user", "content": f"Your answer could not be used: {problem}. Reply again with the "
             f"complete JSON object labelling all {len(batch)} questions."},
        ]
    return {number - 1: general for number, general in labels.items()}


# --------------------------------------------------------------------------- the step


async def extract_questions_async(
    config: ExtractQuestionsConfig, progress: ProgressCallback | None = None
) -> ExtractQuestionsReport:
    """Async form of :func:`extract_questions`."""
    output = config.resolved_output_path
    if output.exists() and not config.force:
        raise FileExistsError(f"{output} already exists; pass force=True (--force) to replace it")
    report = ExtractQuestionsReport(output_path=output)
    pooled, report.roles = pool_role_questions(config.roles_dir)
    report.pooled = len(pooled)
    kept, report.exact_duplicates, report.near_duplicates = deduplicate(pooled, config.similarity_threshold)
    report.after_dedup = len(kept)
    log.info(
        "extract-questions: %d questions from %d roles, %d exact and %d near duplicates dropped, %d candidates",
        report.pooled, report.roles, report.exact_duplicates, report.near_duplicates, report.after_dedup,
    )
    ordered = interleave_by_role(kept, config.seed)
    batches = [ordered[i : i + config.batch_size] for i in range(0, len(ordered), config.batch_size)]
    target = math.ceil(config.oversample * config.n_questions) if config.oversample else None

    client = make_client(config.llm)
    tracker = JobProgress(total=len(batches), label="extract-questions", callback=progress)
    results: dict[int, dict[int, bool]] = {}
    general_so_far = 0

    async def handle(batch_index: int) -> None:
        nonlocal general_so_far
        if target is not None and general_so_far >= target:
            return  # enough general questions known; later batches are not sent
        labels = await label_batch(client, batches[batch_index], config.max_attempts)
        results[batch_index] = labels
        general_so_far += sum(labels.values())
        tracker.advance(f"batch {batch_index + 1}: {sum(labels.values())}/{len(batches[batch_index])} general")

    try:
        await run_workers(list(range(len(batches))), handle, config.llm.max_concurrency)
        if tracker.done < tracker.total:  # stopped early: enough general questions
            tracker.advance("enough general questions found", n=tracker.total - tracker.done)
    finally:
        report.usage = client.usage.as_dict()
        report.estimated_cost_usd = client.estimated_cost()
        await client.close()

    general: list[Candidate] = []
    for batch_index in sorted(results):  # candidate order, so the role interleaving is kept
        labels = results[batch_index]
        batch = batches[batch_index]
        report.labelled += len(labels)
        report.unlabelled += len(batch) - len(labels)
        general.extend(cand for i, cand in enumerate(batch) if labels.get(i))
    report.judged_general = len(general)

    chosen = pick_spread(general, config.n_questions)
    if not chosen:
        raise LLMError(
            f"extract-questions: the LLM labelled none of the {report.labelled} questions it saw as general; "
            f"nothing written to {output}"
        )
    lines = "".join(
        _json_line({"id": i, "question": cand.question}) for i, cand in enumerate(chosen)
    )
    atomic_write_text(output, lines)
    load_questions(output)  # the file must load back as the pipeline will read it
    report.written = len(chosen)
    report.per_role = dict(sorted(Counter(c.role for c in chosen).items()))
    if report.written < config.n_questions:
        log.warning(
            "extract-questions: only %d general questions found, fewer than the %d asked for",
            report.written, config.n_questions,
        )
    return report


def _json_line(obj: dict[str, Any]) -> str:
    return json.dumps(obj, ensure_ascii=False) + "\n"


def extract_questions(
    config: ExtractQuestionsConfig, progress: ProgressCallback | None = None
) -> ExtractQuestionsReport:
    """Build the extraction-question file; see the module docstring."""
    return asyncio.run(extract_questions_async(config, progress))


# --------------------------------------------------------------------------- command line


def add_cli(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "extract-questions",
        help="pick general (non-role-specific) extraction questions from the roles' questions with an LLM",
        description=" ".join(__doc__.split("\n\n")[0].split(": ", 1)[-1].split()) if __doc__ else None,
    )
    parser.add_argument(
        "--roles-dir", type=Path, default=ROLES_DIR,
        help=f"folder of <role>.json files whose questions are pooled (default: {ROLES_DIR})",
    )
    parser.add_argument(
        "--output", type=Path, default=None,
        help=f"JSONL file to write (default: {QUESTIONS_FILE} for the shipped roles, "
        f"else <roles-dir>/{QUESTIONS_FILENAME})",
    )
    parser.add_argument("--n", type=int, default=240, help="number of questions to write (default: 240)")
    parser.add_argument("--batch-size", type=int, default=25, help="questions labelled per request (default: 25)")
    parser.add_argument(
        "--similarity", type=float, default=0.8,
        help="content-word Jaccard similarity at or above which two questions are near duplicates (default: 0.8)",
    )
    parser.add_argument(
        "--oversample", type=float, default=2.0,
        help="stop labelling once this many times --n questions are judged general; 0 labels all (default: 2)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for the order in which candidates are sent (default: 0)")
    parser.add_argument("--force", action="store_true", help="replace the output file if it exists")
    add_llm_arguments(parser, default_provider="anthropic", default_concurrency=4,
                      default_max_tokens=2048, default_temperature=0.0)
    parser.set_defaults(func=run_cli)


def run_cli(args: argparse.Namespace) -> int:
    """Exit 0 when --n questions were written, 1 when fewer were found, 2 on errors."""
    try:
        config = ExtractQuestionsConfig(
            llm=llm_config_from_args(args),
            roles_dir=args.roles_dir,
            output_path=args.output,
            n_questions=args.n,
            batch_size=args.batch_size,
            similarity_threshold=args.similarity,
            oversample=args.oversample,
            seed=args.seed,
            force=args.force,
        )
        report = extract_questions(config, progress=print_progress)
    except (LLMError, RoleDataError, FileExistsError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    cost = f"${report.estimated_cost_usd:.2f}" if report.estimated_cost_usd is not None else "unknown"
    print(
        f"extract-questions: {report.pooled} pooled from {report.roles} roles, "
        f"{report.after_dedup} after dedup ({report.exact_duplicates} exact, {report.near_duplicates} near "
        f"duplicates), {report.labelled} labelled, {report.judged_general} judged general, "
        f"{report.written} written to {report.output_path} (estimated cost {cost})"
    )
    return 0 if report.written >= args.n else 1

