"""``python -m pipeline <step>``: every step of the method, plus ``run`` for all of them in order."""
from __future__ import annotations

import argparse
import logging
import sys

from pipeline import (axis_step, build_roles, checkpoints, drift, extract, generate, hub, judge,
                      question_extraction, role_import, rollouts, vectors)
from pipeline.llm import LLMError
from pipeline.manifest import RunMismatchError
from pipeline.role_schema import RoleDataError
from steering.axis_io import AxisFileError
from steering.chat_format import ChatTemplateError
from steering.models import ModelLoadError

STEP_MODULES = (build_roles, question_extraction, role_import, rollouts, generate, extract, judge, vectors, axis_step,
                checkpoints, drift, hub)
CLEAR_ERRORS = (hub.HubError, LLMError, RunMismatchError, RoleDataError, AxisFileError, ChatTemplateError, ModelLoadError,
                FileNotFoundError, ValueError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress lines (rate, ETA) to stderr")
    sub = parser.add_subparsers(dest="command", required=True, metavar="STEP")
    for module in STEP_MODULES:
        module.add_cli(sub)
    from pipeline import run_all
    run_all.add_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("\ninterrupted: finished work is saved; rerun the same command to resume", file=sys.stderr)
        return 130
    except CLEAR_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
