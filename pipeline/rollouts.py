"""Step 1, rollouts: every (role, system prompt, question, sample) combination of a run.

The run's role set is snapshotted into ``<run>/roles`` (paper layout) so later steps (the judge's
eval prompts) and reproductions read exactly what this run used.
"""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from pipeline.manifest import record_step
from pipeline.role_schema import RoleSet, load_role_dir, shipped_role_set, write_role_file
from pipeline.store import RunPaths, atomic_write_text, write_parquet_atomic

ROLLOUT_COLUMNS = ("rollout_id", "role", "prompt_index", "question_index", "sample_index", "system_prompt", "question")


@dataclass(frozen=True)
class RolloutsConfig:
    run_dir: Path
    roles: tuple[str, ...] | None = None  # None = every role of the role set
    roles_dir: Path | None = None  # None = the shipped data/roles
    question_count: int | None = None  # None = all extraction questions
    prompt_count: int | None = None  # None = every system prompt of each role
    rollouts_per_prompt: int = 1
    include_default: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "run_dir", Path(self.run_dir))
        if self.roles is not None:
            object.__setattr__(self, "roles", tuple(self.roles))
        if self.question_count is not None and self.question_count < 1:
            raise ValueError(f"question_count must be >= 1, got {self.question_count}")
        if self.prompt_count is not None and self.prompt_count < 1:
            raise ValueError(f"prompt_count must be >= 1, got {self.prompt_count}")
        if self.rollouts_per_prompt < 1:
            raise ValueError(f"rollouts_per_prompt must be >= 1, got {self.rollouts_per_prompt}")


def rollout_id(role: str, prompt_index: int, question_index: int, sample_index: int) -> str:
    return f"{role}/p{prompt_index}/q{question_index}/s{sample_index}"


def load_run_role_set(config: RolloutsConfig) -> RoleSet:
    role_set = load_role_dir(config.roles_dir) if config.roles_dir else shipped_role_set()
    return role_set.select(list(config.roles) if config.roles is not None else None)


def snapshot_role_set(role_set: RoleSet, roles_dir: Path) -> None:
    roles_dir.mkdir(parents=True, exist_ok=True)
    for role in [role_set.default, *role_set.roles.values()]:
        write_role_file(roles_dir / f"{role.name}.json", role)
    lines = "".join(json.dumps({"id": q.id, "question": q.question}) + "\n" for q in role_set.questions)
    atomic_write_text(roles_dir / "extraction_questions.jsonl", lines)


def build_rollouts(role_set: RoleSet, question_count: int | None, rollouts_per_prompt: int,
                   include_default: bool = True, prompt_count: int | None = None) -> pd.DataFrame:
    questions = list(role_set.questions)[: question_count or None]
    roles = ([role_set.default] if include_default else []) + [role_set.roles[n] for n in sorted(role_set.roles)]
    rows = []
    for role in roles:
        for p_index, prompt in enumerate(role.instructions[: prompt_count or None]):
            for question in questions:
                for sample in range(rollouts_per_prompt):
                    rows.append((rollout_id(role.name, p_index, question.id, sample), role.name, p_index,
                                 question.id, sample, prompt, question.question))
    return pd.DataFrame(rows, columns=list(ROLLOUT_COLUMNS))


def make_rollouts(config: RolloutsConfig) -> pd.DataFrame:
    """Write ``rollouts.parquet`` and the role snapshot; returns the rollouts table."""
    paths = RunPaths(config.run_dir)
    role_set = load_run_role_set(config)
    frame = build_rollouts(role_set, config.question_count, config.rollouts_per_prompt, config.include_default,
                           config.prompt_count)
    snapshot_role_set(role_set, paths.roles_dir)
    write_parquet_atomic(paths.rollouts, frame)
    record_step(config.run_dir, "rollouts", config, finished=True,
                extra={"n_rollouts": len(frame), "n_roles": len(role_set.roles)})
    return frame


def read_rollouts(run_dir: str | os.PathLike) -> pd.DataFrame:
    path = RunPaths(run_dir).rollouts
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: run the 'rollouts' step first")
    return pd.read_parquet(path)


def add_cli(subparsers) -> None:
    parser = subparsers.add_parser("rollouts", help="write the (role x prompt x question x sample) table of a run")
    add_rollout_arguments(parser)
    parser.set_defaults(func=run_cli)


def add_rollout_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run-dir", type=Path, required=True, help="the run's output directory")
    parser.add_argument("--roles", nargs="+", default=None,
                        help="role names to include (default: all roles of the role set); 'default' is always added")
    parser.add_argument("--roles-dir", type=Path, default=None,
                        help="role set in the paper's layout (default: the shipped data/roles)")
    parser.add_argument("--question-count", type=int, default=None,
                        help="use the first N extraction questions (default: all)")
    parser.add_argument("--prompt-count", type=int, default=None,
                        help="use the first N system prompts of each role (default: all 5)")
    parser.add_argument("--rollouts-per-prompt", type=int, default=1, help="samples per (prompt, question) pair")


def config_from_args(args: argparse.Namespace) -> RolloutsConfig:
    return RolloutsConfig(run_dir=args.run_dir, roles=tuple(args.roles) if args.roles else None,
                          roles_dir=args.roles_dir, question_count=args.question_count,
                          prompt_count=args.prompt_count, rollouts_per_prompt=args.rollouts_per_prompt)


def run_cli(args: argparse.Namespace) -> int:
    frame = make_rollouts(config_from_args(args))
    print(f"wrote {len(frame)} rollouts for {frame['role'].nunique()} roles to {RunPaths(args.run_dir).rollouts}")
    return 0
