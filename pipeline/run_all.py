"""``python -m pipeline run``: rollouts -> generate -> extract -> judge -> vectors -> axis in one run directory.

Every step resumes, so rerunning the same command after a crash continues where it stopped.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from pipeline import rollouts
from pipeline.axis_step import AxisConfig, run_axis
from pipeline.extract import AGGREGATIONS, ExtractConfig, run_extract
from pipeline.generate import BACKENDS, GenerateConfig, add_generation_arguments, run_generate
from pipeline.judge import JudgeConfig, judge_run
from pipeline.llm import PROVIDERS, LLMConfig
from pipeline.progress import print_progress
from pipeline.vectors import VectorsConfig, run_vectors


def add_cli(subparsers) -> None:
    parser = subparsers.add_parser("run", help="run every step (rollouts, generate, extract, judge, vectors, axis)")
    rollouts.add_rollout_arguments(parser)
    add_generation_arguments(parser)
    parser.add_argument("--backend", choices=BACKENDS, default="transformers", help="generation backend")
    parser.add_argument("--base-url", default=None, help="generation endpoint for the openai-compatible backend")
    parser.add_argument("--batch-size", type=int, default=8, help="generation and extraction batch size")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="maximum tokens per response")
    parser.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (0 = greedy)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--aggregation", choices=AGGREGATIONS, default="mean", help="extraction aggregation")
    parser.add_argument("--judge-provider", choices=PROVIDERS, default="openai", help="judge API")
    parser.add_argument("--judge-model", default="gpt-4.1-mini", help="judge model name")
    parser.add_argument("--judge-base-url", default=None, help="judge endpoint (openai-compatible, or a proxy)")
    parser.add_argument("--judge-concurrency", type=int, default=16, help="judge requests in flight")
    parser.add_argument("--judge-rps", type=float, default=None, help="judge requests per second limit")
    parser.add_argument("--min-score", type=int, default=3, help="vectors: keep responses with score >= this")
    parser.add_argument("--min-count", type=int, default=1, help="vectors: minimum kept responses per role")
    parser.add_argument("--quantiles", type=float, nargs="+", default=[0.01, 0.05, 0.25, 0.5, 0.75],
                        help="capping threshold quantiles")
    parser.set_defaults(func=run_cli)


def run_cli(args: argparse.Namespace) -> int:
    run_dir: Path = args.run_dir
    frame = rollouts.make_rollouts(rollouts.config_from_args(args))
    print(f"[1/6] rollouts: {len(frame)}")
    gen = run_generate(GenerateConfig(run_dir=run_dir, model_id=args.model_id, revision=args.revision, dtype=args.dtype,
                                      device=args.device, backend=args.backend, base_url=args.base_url,
                                      batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                                      temperature=args.temperature, seed=args.seed), progress=print_progress)
    print(f"[2/6] generate: {gen.generated} new, {gen.already_done} saved before")
    ext = run_extract(ExtractConfig(run_dir=run_dir, model_id=args.model_id, revision=args.revision, dtype=args.dtype,
                                    device=args.device, aggregation=args.aggregation, batch_size=args.batch_size),
                      progress=print_progress)
    print(f"[3/6] extract: {ext.extracted} new, {ext.already_done} saved before")
    judge = judge_run(run_dir, JudgeConfig(llm=LLMConfig(provider=args.judge_provider, model=args.judge_model,
                                                         base_url=args.judge_base_url,
                                                         max_concurrency=args.judge_concurrency,
                                                         requests_per_second=args.judge_rps, max_tokens=16)),
                      progress=print_progress)
    print(f"[4/6] judge: {judge.scored} scored, {judge.remaining} without a valid score")
    vec = run_vectors(VectorsConfig(run_dir=run_dir, min_score=args.min_score, min_count=args.min_count))
    print(f"[5/6] vectors: {len(vec.counts)} roles" + (f", skipped {sorted(vec.skipped)}" if vec.skipped else ""))
    axis = run_axis(AxisConfig(run_dir=run_dir, quantiles=tuple(args.quantiles)))
    print(f"[6/6] axis: {axis.path}")
    return 0
