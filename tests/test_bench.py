"""Smoke test of the benchmark harness (issue 6): the extract benchmark on the tiny random model.

Real computation (both extraction paths, the equivalence check, the JSON file); no timing
assertions: only that the ratio fields exist and are positive numbers.
"""
from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("transformer_lens")


def test_extract_benchmark_quick_on_tiny_model(tiny_model_dir, tmp_path):
    from bench.__main__ import main

    out = tmp_path / "results"
    code = main(["extract", "--quick", "--model", str(tiny_model_dir), "--n-responses", "6", "--max-tokens", "24",
                 "--batch-size", "4", "--out-dir", str(out)])
    assert code == 0
    data = json.loads((out / "extract-quick.json").read_text())
    assert data["benchmark"] == "extract" and data["quick"] is True
    for key in ("speedup_all_layers", "speedup_8_layers", "pipeline_8_vs_all_layers"):
        value = data["ratios"][key]
        assert isinstance(value, float) and math.isfinite(value) and value > 0, key
    checks = data["checks"]
    assert checks["equivalent"] is True
    assert checks["max_rel_diff_all_layers"] < 1e-4 and checks["max_rel_diff_8_layers"] < 1e-4
    assert data["settings"]["n_responses"] == 6 and data["settings"]["response_tokens"] > 0
    assert set(data["targets"]) == {"speedup_all_layers >= 1.5", "speedup_8_layers >= 1.5"}
    for measurement in data["measurements"].values():
        assert measurement["units"] == data["settings"]["response_tokens"]
    assert {"nproc", "cpu_model", "ram_gib", "versions"} <= set(data["machine"])


def test_max_relative_difference_detects_a_mismatch():
    import torch

    from bench.extract_bench import max_relative_difference

    reference = {"a": torch.ones(3, 5), "b": torch.full((3, 5), 2.0)}
    assert max_relative_difference({k: v.clone() for k, v in reference.items()}, reference) == 0.0
    shifted = {"a": reference["a"] + 1e-3, "b": reference["b"].clone()}
    assert max_relative_difference(shifted, reference) == pytest.approx(1e-3, rel=1e-3)
    assert max_relative_difference({"a": reference["a"][[1]]}, reference) == math.inf  # missing response
    assert max_relative_difference({k: v[[0, 2]] for k, v in reference.items()}, reference, [0, 2]) == 0.0


def test_capping_layers_and_cli_parser():
    from bench.__main__ import build_parser
    from bench.common import capping_layers

    assert capping_layers(30) == list(range(21, 29))
    assert capping_layers(4) == [0, 1, 2, 3]
    assert capping_layers(10) == list(range(2, 10))
    args = build_parser().parse_args(["all", "--quick"])
    assert args.name == "all" and args.quick


def test_steer_benchmark_quick_on_tiny_model(tiny_model_dir, tmp_path):
    from bench.__main__ import main

    out = tmp_path / "results"
    code = main(["steer", "--quick", "--model", str(tiny_model_dir), "--max-tokens", "8", "--repeats", "1",
                 "--out-dir", str(out)])
    assert code == 0
    data = json.loads((out / "steer-quick.json").read_text())
    checks = data["checks"]
    assert checks["all_generated_max_tokens"] is True
    # The plain twin and the bridge decode the same tokens with the same cap; the cap changes them.
    assert checks["capped_same_tokens_as_through_bridge"] is True
    assert checks["unsteered_same_tokens_as_through_bridge"] is True
    for key in ("steered_vs_plain", "tl_stream_unsteered_vs_plain", "tl_generate_unsteered_vs_plain"):
        value = data["ratios"][key]
        assert isinstance(value, float) and math.isfinite(value) and value > 0, key
    assert set(data["targets"]) == {"steered_vs_plain >= 0.8"}
