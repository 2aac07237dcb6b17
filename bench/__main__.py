"""``python -m bench <name> [--quick]``: see ``bench/__init__.py`` and BENCHMARKS.md."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from bench.common import DEFAULT_RESULTS_DIR, Options

BENCHMARKS = ("extract", "steer", "memory", "pipeline-cost")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmarks; every figure is a ratio against a baseline measured in the same run. "
                    "Results: a table on stdout and <out-dir>/<name>[-quick].json.")
    parser.add_argument("name", choices=BENCHMARKS + ("all",), help="benchmark to run ('all': every one, in order)")
    parser.add_argument("--quick", action="store_true", help="small inputs (seconds to a few minutes)")
    parser.add_argument("--model", dest="model_id", default=None,
                        help="HF model id or local directory (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_RESULTS_DIR, help="where the JSON results go")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved measurement rounds")
    parser.add_argument("--n-responses", type=int, default=None, help="extract/memory: number of responses")
    parser.add_argument("--max-tokens", type=int, default=None,
                        help="extract/memory: max response tokens; steer: tokens to generate; "
                             "pipeline-cost: max_new_tokens")
    parser.add_argument("--batch-size", type=int, default=8, help="extraction/generation batch size")
    parser.add_argument("--profile", action="store_true", help="also cProfile one run of each side")
    parser.add_argument("--ablations", action="store_true",
                        help="extract/steer: extra variants that isolate where the time goes")
    return parser


def options_from_args(args: argparse.Namespace) -> Options:
    return Options(quick=args.quick, model_id=args.model_id, out_dir=args.out_dir, threads=args.threads,
                   repeats=args.repeats, n_responses=args.n_responses, max_tokens=args.max_tokens,
                   batch_size=args.batch_size, profile=args.profile, ablations=args.ablations)


def run_benchmark(name: str, options: Options) -> dict:
    if name == "extract":
        from bench import extract_bench as module
    elif name == "steer":
        from bench import steer_bench as module
    elif name == "memory":
        from bench import memory_bench as module
    elif name == "pipeline-cost":
        from bench import pipeline_cost as module
    else:
        raise ValueError(f"unknown benchmark {name!r}")
    return module.run(options)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    options = options_from_args(args)
    names = BENCHMARKS if args.name == "all" else (args.name,)
    for index, name in enumerate(names):
        if index:
            print()
        print(f"=== {name}{' (quick)' if options.quick else ''} ===")
        run_benchmark(name, options)
    return 0


if __name__ == "__main__":
    sys.exit(main())
