"""Latency benchmarks: an original model against its fused version, fairly, on onnxruntime.

`run_bench` times both (and optionally an oracle) interleaved on the same session options and feeds,
counts their multiply-accumulates at the benchmarked shapes for the ideal speedup, and optionally
profiles where the time goes. `BenchResult` writes the JSON, Markdown table and plot.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from lc_onnx.bench.report import BenchResult, environment, labelled
from lc_onnx.bench.runner import BatchRun, BenchConfig, Timing, bench_models, make_feeds, make_session

__all__ = ["BatchRun", "BenchConfig", "BenchResult", "Timing", "run_bench"]


def run_bench(
    original: str | Path,
    fused: str | Path,
    config: BenchConfig | None = None,
    *,
    oracle: str | Path | None = None,
    profile_runs: int = 0,
    progress: Callable[[int], None] | None = None,
) -> BenchResult:
    """Benchmark `fused` (and `oracle`, if given) against `original`.

    Args:
        original: the baseline model file.
        fused: the model to compare; must take the same inputs.
        config: provider, batch sizes, threads, run counts; defaults to `BenchConfig()`.
        oracle: a third model timed in the same interleaved rounds (e.g. collapsed before export).
        profile_runs: if positive, also profile every model at every batch size over this many runs
            (after the timing, so profiling never slows the timed runs).
        progress: called with 1 after each interleaved round.

    Raises:
        UserError: unreadable model, mismatched inputs, unavailable provider, impossible batch.
    """
    config = config or BenchConfig()
    models = labelled([Path(original), Path(fused)], None if oracle is None else Path(oracle))
    env = environment()  # before the timing, so the load average is the other processes'
    runs = bench_models(models, config, progress)
    result = BenchResult({k: str(v) for k, v in models.items()}, config, runs, env)
    if profile_runs > 0:
        from lc_onnx.bench.profile import profile_op_times

        first = make_session(models["a"], config.provider, config.threads)
        for batch in config.batches:
            feeds = make_feeds(first, batch, config.seed, config.input_shapes)
            result.profiles[batch] = {
                label: profile_op_times(path, feeds, config.provider, config.threads, profile_runs)
                for label, path in models.items()
            }
    return result
