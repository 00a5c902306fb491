"""The interleaved latency runner for onnxruntime's CPU and CUDA providers.

Every model gets the same session options (graph optimisation `ORT_ENABLE_ALL`, the fair baseline since
onnxruntime fuses some ops itself; fixed intra-op threads; one inter-op thread; sequential execution) and
the same random feeds. Runs are interleaved A B A B ... so that drift of the machine (clock, thermals,
other processes) hits every model alike; the order rotates every round (A B, B A, ...) so that no model
always runs right after the same other one. On CUDA, inputs and outputs live on the device through I/O
binding and each timed run ends with a device synchronisation, so the time is the GPU's, not the launch's.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lc_onnx.errors import UserError
from lc_onnx.model import io, runtime
from lc_onnx.model.macs import count_macs

__all__ = ["BatchRun", "BenchConfig", "Timing", "bench_models", "make_feeds", "make_session"]

logger = logging.getLogger(__name__)

_NUMPY_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(bool)": np.bool_,
}


@dataclass(frozen=True)
class BenchConfig:
    """How to time: provider (`cpu` or `cuda`), batch sizes, intra-op threads, timed and warm-up runs."""

    provider: str = "cpu"
    batches: tuple[int, ...] = (1, 8, 32)
    threads: int = 2
    runs: int = 50
    warmup: int = 5
    seed: int = 0
    input_shapes: Mapping[str, tuple[int, ...]] | None = None  # other dims than the batch, per input

    def __post_init__(self) -> None:
        if self.provider not in runtime.PROVIDERS:
            raise UserError(
                f"unknown {{provider}} {self.provider!r}; choose from {', '.join(runtime.PROVIDERS)}",
                params=["provider"],
            )
        if not self.batches or min(self.batches) < 1:
            raise UserError(
                f"{{batches}} must be positive integers, got {list(self.batches)}", params=["batches"]
            )
        if self.threads < 1 or self.runs < 1 or self.warmup < 0:
            raise UserError(
                "{threads} and {runs} must be at least 1 and {warmup} at least 0",
                params=["threads", "runs", "warmup"],
            )


@dataclass(frozen=True)
class Timing:
    """Latency statistics of one model at one batch size, in milliseconds."""

    ms_median: float
    ms_p90: float
    ms_p99: float
    ms_min: float
    throughput: float  # samples (batch items) per second at the median latency
    samples_ms: tuple[float, ...] = field(repr=False, default=())

    @classmethod
    def from_samples(cls, samples_ms: Sequence[float], batch: int) -> Timing:
        arr = np.asarray(samples_ms, dtype=np.float64)
        median = float(np.median(arr))
        return cls(
            ms_median=median,
            ms_p90=float(np.percentile(arr, 90)),
            ms_p99=float(np.percentile(arr, 99)),
            ms_min=float(arr.min()),
            throughput=batch * 1000.0 / median,
            samples_ms=tuple(float(x) for x in arr),
        )


@dataclass(frozen=True)
class BatchRun:
    """All models timed at one batch size; `timings` and `macs` are keyed like the models given."""

    provider: str
    batch: int
    timings: dict[str, Timing]
    macs: dict[str, int]
    # 1-minute load average of the machine when this batch's rounds started and ended (None off Unix):
    # the timings are only as quiet as this.
    load_average: tuple[float, float] | None = None


def make_session(path: Path, provider: str, threads: int, profile_prefix: str | None = None):
    """A session with the benchmark's fixed options (`ORT_ENABLE_ALL`, `threads` intra-op threads, one
    inter-op thread, sequential) on exactly the requested provider."""
    return runtime.session(
        path,
        provider=provider,
        threads=threads,
        optimization="all",
        profile_prefix=profile_prefix,
        name=str(path),
    )


def _input_signature(session) -> list[tuple[str, list[int | str | None], str]]:
    return [(i.name, list(i.shape), i.type) for i in session.get_inputs()]


def make_feeds(
    session, batch: int, seed: int, input_shapes: Mapping[str, Sequence[int]] | None = None
) -> dict[str, np.ndarray]:
    """Random inputs at `batch` (`runtime.random_inputs`: attention masks are ones): the leading dim
    takes the batch; `input_shapes` gives an input's other dims (its leading one is replaced by the
    batch); remaining symbolic dims are 1.

    Raises:
        UserError: a leading dim is fixed to another value, a shape does not fit the input, or an
            input type cannot be generated.
    """
    given = dict(input_shapes or {})
    unknown = sorted(set(given) - {name for name, _, _ in _input_signature(session)})
    if unknown:
        raise UserError(
            f"{{input_shapes}} names unknown input(s): {', '.join(unknown)}", params=["input_shapes"]
        )
    shapes, dtypes = {}, {}
    for name, shape, type_ in _input_signature(session):
        override = given.get(name)
        if override is not None and len(override) != len(shape):
            raise UserError(
                f"input {name!r} has rank {len(shape)}, but {{input_shapes}} gives {len(override)} dims",
                params=["input_shapes"],
            )
        dims = []
        for axis, dim in enumerate(shape):
            if isinstance(dim, int) and dim >= 0:
                if axis == 0 and dim != batch:
                    raise UserError(
                        f"input {name!r} has a fixed batch dim {dim}; it cannot run at batch {batch}"
                    )
                if override is not None and axis > 0 and override[axis] != dim:
                    raise UserError(
                        f"input {name!r} has a fixed dim {dim}, but {{input_shapes}} gives {override[axis]}",
                        params=["input_shapes"],
                    )
                dims.append(dim)
            elif axis == 0:
                dims.append(batch)
            elif override is not None:
                dims.append(int(override[axis]))
            else:
                logger.info("input %s: symbolic dim %s set to 1", name, dim)
                dims.append(1)
        if type_ not in _NUMPY_TYPES:
            raise UserError(f"input {name!r} has type {type_}, which the benchmark cannot generate")
        shapes[name], dtypes[name] = dims, np.dtype(_NUMPY_TYPES[type_])
    return runtime.random_inputs(dtypes, shapes, seed=seed)


def _cpu_runner(session, feeds: Mapping[str, np.ndarray]) -> Callable[[], float]:
    output_names = [o.name for o in session.get_outputs()]

    def run() -> float:
        start = time.perf_counter()
        session.run(output_names, feeds)
        return (time.perf_counter() - start) * 1000.0

    return run


def _cuda_runner(session, feeds: Mapping[str, np.ndarray]) -> Callable[[], float]:
    import onnxruntime as ort

    binding = session.io_binding()
    # Kept referenced: the binding does not own the device buffers.
    device_inputs = {name: ort.OrtValue.ortvalue_from_numpy(x, "cuda", 0) for name, x in feeds.items()}
    for name, value in device_inputs.items():
        binding.bind_ortvalue_input(name, value)
    for output in session.get_outputs():
        binding.bind_output(output.name, "cuda", 0)

    def run() -> float:
        binding.synchronize_inputs()
        start = time.perf_counter()
        session.run_with_iobinding(binding)
        binding.synchronize_outputs()
        return (time.perf_counter() - start) * 1000.0

    run.device_inputs = device_inputs  # type: ignore[attr-defined]
    return run


def _load_average() -> float | None:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def bench_models(
    models: Mapping[str, Path],
    config: BenchConfig,
    progress: Callable[[int], None] | None = None,
) -> list[BatchRun]:
    """Time every model at every batch size, interleaved, on identical feeds.

    Args:
        models: label -> model path, in the order each round runs them; the first is the baseline.
        config: provider, batch sizes, threads and run counts.
        progress: called with the number of rounds just finished (for a progress bar).

    Returns:
        One `BatchRun` per batch size, in the order of `config.batches`.

    Raises:
        UserError: a model cannot be read or loaded, the models' inputs differ, or the provider is
            unavailable.
    """
    runtime.check_provider(config.provider)
    graphs = {label: io.load(path).proto for label, path in models.items()}  # weights stay on disk
    sessions = {label: make_session(Path(p), config.provider, config.threads) for label, p in models.items()}
    labels = list(models)
    reference = _input_signature(sessions[labels[0]])
    for label in labels[1:]:
        if [(n, t) for n, _, t in _input_signature(sessions[label])] != [(n, t) for n, _, t in reference]:
            raise UserError(
                f"{models[label]} and {models[labels[0]]} have different inputs; a benchmark needs the same"
            )

    results = []
    for batch in config.batches:
        # Each model's own fixed dims must admit the batch; all then share the first model's arrays.
        feeds = [make_feeds(sessions[label], batch, config.seed, config.input_shapes) for label in labels][0]
        shapes = {name: list(x.shape) for name, x in feeds.items()}
        macs = {label: count_macs(graphs[label], shapes) for label in labels}
        make_runner = _cuda_runner if config.provider == "cuda" else _cpu_runner
        runners = {label: make_runner(sessions[label], feeds) for label in labels}
        samples: dict[str, list[float]] = {label: [] for label in labels}
        load_start = _load_average()
        for round_index in range(config.warmup + config.runs):
            # Rotate who goes first so no model always runs right after the same other one.
            shift = round_index % len(labels)
            for label in labels[shift:] + labels[:shift]:
                elapsed = runners[label]()
                if round_index >= config.warmup:
                    samples[label].append(elapsed)
            if progress is not None:
                progress(1)
        timings = {label: Timing.from_samples(samples[label], batch) for label in labels}
        load_end = _load_average()
        load = None if load_start is None or load_end is None else (load_start, load_end)
        results.append(BatchRun(config.provider, batch, timings, macs, load))
        logger.info(
            "batch %d: %s",
            batch,
            ", ".join(f"{label} {t.ms_median:.3f} ms" for label, t in timings.items()),
        )
    return results
