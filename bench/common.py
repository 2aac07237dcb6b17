"""Shared helpers: machine description, interleaved timing, result tables and JSON files.

Every benchmark reports RATIOS against a baseline measured in the same process, on the same
inputs, interleaved with the measured code (round ``r`` runs every variant once, in an order
rotated from round to round), so a busy or slow machine shifts both sides alike. The ratio of
the best (smallest) times is the headline: on a shared machine noise only ever adds time.
"""
from __future__ import annotations

import gc
import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RESULTS_DIR = ROOT / "bench" / "results"


@dataclass
class Options:
    """Settings common to every benchmark (``python -m bench <name> --help``)."""

    quick: bool = False
    model_id: str | None = None  # None = the embedded default (SmolLM2-135M-Instruct)
    out_dir: Path = DEFAULT_RESULTS_DIR
    threads: int | None = None  # torch intra-op threads; None = torch's default
    repeats: int | None = None  # rounds of interleaved measurements; None = per-benchmark default
    n_responses: int | None = None
    max_tokens: int | None = None
    batch_size: int = 8
    profile: bool = False
    ablations: bool = False
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.out_dir = Path(self.out_dir)


def apply_threads(options: Options) -> int:
    import torch

    if options.threads:
        torch.set_num_threads(int(options.threads))
    return torch.get_num_threads()


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ram_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024 ** 2, 1)
    except OSError:
        pass
    return None


def _versions() -> dict[str, str]:
    import importlib.metadata

    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "transformer-lens"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine_info() -> dict[str, Any]:
    import torch

    try:
        nproc = len(os.sched_getaffinity(0))
    except AttributeError:
        nproc = os.cpu_count()
    info = {
        "nproc": nproc,
        "cpu_model": _cpu_model(),
        "ram_gib": _ram_gib(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "versions": _versions(),
        "load_average_start": load_average(),
    }
    return info


# ---------------------------------------------------------------- timing

@dataclass
class Measurement:
    """Wall times of one variant over the rounds, and the work units (tokens) it did per run."""

    name: str
    units: float = 0.0  # tokens (or items) per run
    times: list[float] = field(default_factory=list)

    @property
    def best(self) -> float:
        return min(self.times)

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def rate(self) -> float:
        """Units per second at the best time."""
        return self.units / self.best if self.best > 0 else float("inf")

    def as_dict(self) -> dict[str, Any]:
        return {"units": self.units, "times_s": [round(t, 4) for t in self.times], "best_s": round(self.best, 4),
                "median_s": round(self.median, 4), "rate_per_s": round(self.rate, 3)}


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    gc.collect()
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def interleave(variants: dict[str, Callable[[], tuple[float, Any]]], rounds: int,
               log: Callable[[str], None] = print) -> tuple[dict[str, Measurement], dict[str, Any]]:
    """Run each variant once per round, rotating the order; ``fn() -> (units, result)``.

    Returns the measurements and the result of each variant's last run (for equivalence checks).
    """
    names = list(variants)
    measurements = {name: Measurement(name) for name in names}
    results: dict[str, Any] = {}
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            elapsed, (units, result) = timed(variants[name])
            measurements[name].times.append(elapsed)
            measurements[name].units = units
            results[name] = result
            log(f"  round {r + 1}/{rounds} {name}: {elapsed:.2f} s ({units / elapsed if elapsed else 0:.1f}/s)")
    return measurements, results


def run_steps(steps: Iterator[None]) -> Any:
    """Drive a step generator (see :func:`interleave_steps`) to the end; its return value."""
    while True:
        try:
            next(steps)
        except StopIteration as stop:
            return stop.value


def interleave_steps(variants: dict[str, Callable[[], Iterator[None]]], rounds: int,
                     log: Callable[[str], None] = print) -> tuple[dict[str, Measurement], dict[str, Any]]:
    """Like :func:`interleave`, but the variants take turns step by step (e.g. one batch each).

    ``fn()`` returns a generator that yields after each step and returns ``(units, result)``. Each
    ``next()`` is timed and added to that variant's time, so a load spike on a shared machine lands
    on every variant alike instead of on whichever ran during it.
    """
    names = list(variants)
    measurements = {name: Measurement(name) for name in names}
    results: dict[str, Any] = {}
    for r in range(rounds):
        gc.collect()
        order = names[r % len(names):] + names[: r % len(names)]
        running = {name: variants[name]() for name in order}
        elapsed = {name: 0.0 for name in order}
        while running:
            for name in list(running):
                start = time.perf_counter()
                try:
                    next(running[name])
                except StopIteration as stop:
                    elapsed[name] += time.perf_counter() - start
                    units, results[name] = stop.value
                    measurements[name].units = units
                    del running[name]
                    continue
                elapsed[name] += time.perf_counter() - start
        for name in order:
            measurements[name].times.append(elapsed[name])
            rate = measurements[name].units / elapsed[name] if elapsed[name] else 0.0
            log(f"  round {r + 1}/{rounds} {name}: {elapsed[name]:.2f} s ({rate:.1f}/s)")
    return measurements, results


def per_round_ratios(num: Measurement, den: Measurement) -> list[float]:
    """Rate ratio num/den of each round (same units)."""
    return [round((num.units / a) / (den.units / b), 4) for a, b in zip(num.times, den.times)]


def ratio(num: Measurement, den: Measurement) -> float:
    return round(num.rate / den.rate, 4)


# ---------------------------------------------------------------- output

def format_table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if value != value:  # nan
            return "-"
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return "-" if value is None else str(value)


def write_result(options: Options, name: str, payload: dict[str, Any]) -> Path:
    """Write ``<out_dir>/<name>[-quick].json`` and return its path."""
    payload = {"benchmark": name, "quick": options.quick, **payload}
    payload.setdefault("machine", machine_info())
    payload["machine"]["load_average_end"] = load_average()
    payload["options"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(options).items()}
    options.out_dir.mkdir(parents=True, exist_ok=True)
    path = options.out_dir / f"{name}{'-quick' if options.quick else ''}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    os.replace(tmp, path)
    return path


def capping_layers(n_layers: int, count: int = 8) -> list[int]:
    """``count`` consecutive layers starting at 70% of the depth (where the paper caps), or every layer."""
    if n_layers <= count:
        return list(range(n_layers))
    start = min(int(0.7 * n_layers), n_layers - count)
    return list(range(start, start + count))


def profile_call(fn: Callable[[], Any], top: int = 20, sort: str = "tottime") -> list[str]:
    """cProfile ``fn`` once; the ``top`` lines of the stats table sorted by ``sort``."""
    import cProfile
    import io
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    try:
        fn()
    finally:
        profiler.disable()
    stream = io.StringIO()
    stats = pstats.Stats(profiler, stream=stream)
    stats.strip_dirs().sort_stats(sort).print_stats(top)
    lines = [line.rstrip() for line in stream.getvalue().splitlines()]
    start = next((i for i, line in enumerate(lines) if line.lstrip().startswith("ncalls")), 0)
    total = next((line.strip() for line in lines if "function calls" in line), "")
    return [total] + [line for line in lines[start:] if line.strip()]
