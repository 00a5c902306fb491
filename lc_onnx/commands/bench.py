"""Time a fused model against its original on onnxruntime, fairly.

Both models get the same session options (graph optimisation ORT_ENABLE_ALL, fixed intra-op threads,
one inter-op thread) and the same random inputs, and run interleaved (A B, B A, A B, ...) so machine drift
hits both alike. Per batch size it reports median, p90 and p99 latency, throughput, the realized speedup, the
ideal speedup from counted multiply-accumulates (MatMul, Gemm, Conv, attention included) at the same
shapes, and their ratio. On CUDA, inputs and outputs stay on the device (I/O binding) and every timed
run is synchronised.

Prints a Markdown table; --json, --plot and --markdown write files.

examples:
  lc-onnx bench vit.onnx vit.fused.onnx --batch 1,8 --runs 100 --json bench.json --plot bench.png
  lc-onnx bench vit.onnx vit.fused.onnx --oracle vit.oracle.onnx --profile 20
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lc_onnx.commands import common
from lc_onnx.commands.common import parse_input_shapes
from lc_onnx.errors import UserError

# How errors spell the library's parameters here (`BenchConfig.batches` is the `--batch` flag).
FLAGS = {**common.FLAGS, "batches": "--batch"}


def _batches(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"batch sizes must be positive integers, got {text!r}")
    return values


class _LazyBar:
    """A tqdm bar drawn at the first finished round, so errors found while loading stay one line."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.bar = None

    def __call__(self, n: int) -> None:
        if self.bar is None:
            try:
                from tqdm import tqdm
            except ImportError:
                return
            self.bar = tqdm(total=self.total, desc="bench", unit="round")
        self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("original", type=Path, help="the baseline model (ORIGINAL.onnx)")
    parser.add_argument("fused", type=Path, help="the model to compare (FUSED.onnx), same inputs")
    parser.add_argument("--provider", choices=("cpu", "cuda"), default="cpu", help="execution provider")
    parser.add_argument("--batch", type=_batches, default=(1, 8, 32), help="batch sizes (default 1,8,32)")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads (default 2)")
    parser.add_argument("--runs", type=int, default=50, help="timed runs per model and batch (default 50)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed runs first (default 5)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    parser.add_argument(
        "--input-shape", action="append", default=[], metavar="NAME:DxD...",
        help="an input's shape, e.g. input_ids:1x128 (the leading dim is each --batch; other symbolic "
        "dims default to 1); attention masks are fed as ones (repeatable)",
    )  # fmt: skip
    parser.add_argument("--oracle", type=Path, help="a third model timed in the same rounds")
    parser.add_argument(
        "--profile", type=int, default=0, metavar="RUNS", help="also profile op times over RUNS runs"
    )
    parser.add_argument("--json", type=Path, help="write the results as JSON")
    parser.add_argument("--markdown", type=Path, help="write the Markdown table(s)")
    parser.add_argument("--plot", type=Path, help="write a PNG plot of latency and speedup")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from lc_onnx.bench import BenchConfig, run_bench
    from lc_onnx.bench.report import write_text_atomic

    for out in (args.json, args.markdown, args.plot):
        if out is not None and not out.resolve().parent.is_dir():
            raise UserError(f"output directory does not exist: {out.parent}")
    if args.plot is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise UserError("--plot needs matplotlib (pip install 'lc-onnx[bench]')") from None
    config = BenchConfig(
        provider=args.provider,
        batches=tuple(args.batch),
        threads=args.threads,
        runs=args.runs,
        warmup=args.warmup,
        seed=args.seed,
        input_shapes=parse_input_shapes(args.input_shape) or None,
    )
    progress = None if args.no_progress else _LazyBar(len(config.batches) * (config.runs + config.warmup))
    try:
        result = run_bench(
            args.original,
            args.fused,
            config,
            oracle=args.oracle,
            profile_runs=args.profile,
            progress=progress,
        )
    finally:
        if progress is not None:
            progress.close()

    table = result.to_markdown()
    if result.profiles:
        table += "\n\n" + result.profile_markdown()
    print(table)
    if args.json is not None:
        write_text_atomic(args.json, json.dumps(result.to_dict(), indent=2) + "\n")
    if args.markdown is not None:
        write_text_atomic(args.markdown, table + "\n")
    if args.plot is not None:
        result.plot(args.plot)
    sys.stdout.flush()
    return 0
