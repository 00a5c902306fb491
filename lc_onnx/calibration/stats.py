"""Streaming statistics of every activation that calibration can replace.

A *probe* is one activation step of a collapsible site: its input `h` (pre-activation) and output `y`
(post-activation) become extra graph outputs of a copy of the model, and the data streams through
onnxruntime once. Per channel (the last axis, or the channel axis of a 1x1 convolution) only running
moments are kept, in float64, merged batch by batch with Chan et al.'s pairwise update:

    n, mean_h, mean_y, M2_h = Σ(h − mean_h)², M2_y = Σ(y − mean_y)², C = Σ(h − mean_h)(y − mean_y)

so memory is `O(channels)` whatever the number of batches, and 1 batch or 10 give the same moments up to
float64 rounding. The least-squares affine fit `y ≈ a·h + c` is `a = C / M2_h`, `c = mean_y − a·mean_h`,
with residual `SSE = M2_y − C² / M2_h`. For the cost estimate the energy `Σ z²` of the following
layers' outputs `z` is accumulated too.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from lc_onnx.calibration.data import Feed
from lc_onnx.graph.constant_eval import Constants
from lc_onnx.graph.sites import Site
from lc_onnx.graph.steps import Step, StepKind
from lc_onnx.graph.verify import Side
from lc_onnx.model import io, runtime

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Probe:
    """One activation step to measure. `row_energy[j]` is `Σ_consumers ‖W[j, :]‖²` (the weights the
    step's channel j feeds), `consumer_outputs` the tensors those layers write."""

    key: str
    op: str
    input: str
    output: str
    channels: int
    row_energy: np.ndarray
    consumer_outputs: tuple[str, ...]
    axis: int = -1  # the channel axis (negative): -1 for Gemm/MatMul sites, 1 - rank for 1x1 convolutions


@dataclass
class Moments:
    """Running per-channel moments of `(h, y)` pairs; see the module docstring."""

    channels: int
    n: int = 0
    mean_h: np.ndarray = field(default=None)
    mean_y: np.ndarray = field(default=None)
    m2_h: np.ndarray = field(default=None)
    m2_y: np.ndarray = field(default=None)
    c_hy: np.ndarray = field(default=None)

    def __post_init__(self) -> None:
        for name in ("mean_h", "mean_y", "m2_h", "m2_y", "c_hy"):
            if getattr(self, name) is None:
                setattr(self, name, np.zeros(self.channels))

    def update(self, h: np.ndarray, y: np.ndarray) -> None:
        """Add the rows of `h` and `y` (any shape ending in `channels`; equal shapes)."""
        h = np.asarray(h, dtype=np.float64).reshape(-1, self.channels)
        y = np.asarray(y, dtype=np.float64).reshape(-1, self.channels)
        nb = h.shape[0]
        if nb == 0:
            return
        bh, by = h.mean(axis=0), y.mean(axis=0)
        dh, dy = h - bh, y - by
        self.merge(Moments(self.channels, nb, bh, by, (dh * dh).sum(0), (dy * dy).sum(0), (dh * dy).sum(0)))

    def merge(self, other: Moments) -> None:
        if other.n == 0:
            return
        n, nb = self.n, other.n
        total = n + nb
        delta_h, delta_y = other.mean_h - self.mean_h, other.mean_y - self.mean_y
        weight = n * nb / total
        self.m2_h = self.m2_h + other.m2_h + delta_h * delta_h * weight
        self.m2_y = self.m2_y + other.m2_y + delta_y * delta_y * weight
        self.c_hy = self.c_hy + other.c_hy + delta_h * delta_y * weight
        self.mean_h = self.mean_h + delta_h * (nb / total)
        self.mean_y = self.mean_y + delta_y * (nb / total)
        self.n = total

    def fit(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Least-squares `(a, c, SSE)` per channel. A channel whose `h` is constant on the data gets
        `a = 0`, `c = mean(y)` (exact on the data; any slope would be)."""
        flat = self.m2_h <= self.n * 1e-20 * np.maximum(self.mean_h**2, 1e-30)
        safe = np.where(flat, 1.0, self.m2_h)
        a = np.where(flat, 0.0, self.c_hy / safe)
        c = self.mean_y - a * self.mean_h
        sse = np.where(flat, self.m2_y, self.m2_y - self.c_hy * self.c_hy / safe)
        return a, c, np.maximum(sse, 0.0)

    def energy_y(self) -> np.ndarray:
        """`Σ y²` per channel."""
        return self.m2_y + self.n * self.mean_y**2


@dataclass
class Statistics:
    """Moments per probe key, output energies per consumer tensor, and how much data made them."""

    probes: dict[str, Probe]
    moments: dict[str, Moments]
    energy: dict[str, float]
    batches: int = 0


def probes_for(sites: Iterable[Site], constants: Constants) -> list[Probe]:
    """A probe for every step that a fit could replace, in sites without structural problems."""
    found: dict[str, Probe] = {}
    for site in sites:
        if site.problems:
            continue
        d_h = site.producer.shape(constants)[1]
        if any(c.shape(constants)[0] != d_h for c in site.consumers):
            continue
        row_energy = np.zeros(d_h)
        for consumer in site.consumers:
            w = np.asarray(consumer.weight_matrix(constants), dtype=np.float64) * consumer.alpha
            row_energy += (w * w).sum(axis=1)
        outputs = tuple(c.output.name for c in site.consumers)
        for step in site.steps:
            if needs_fit(step, constants) and step.key not in found:
                found[step.key] = Probe(
                    step.key, step.op, step.input.name, step.output.name, d_h, row_energy, outputs,
                    step.feature_axis,
                )  # fmt: skip
    return list(found.values())


def needs_fit(step: Step, constants: Constants) -> bool:
    """Whether the step is not exactly linear as it stands, so only a fit can make it so."""
    if step.kind == StepKind.NONLINEAR:
        return True
    if step.kind == StepKind.SLOPE:
        slopes = step.slopes(constants)
        return slopes is None or bool(np.any(slopes != 1.0))
    return False


def collect(loaded: io.LoadedModel, probes: Sequence[Probe], feeds: Iterable[Feed]) -> Statistics:
    """Stream `feeds` through the model once with every probe's tensors exposed; keep only moments."""
    stats = Statistics({p.key: p for p in probes}, {p.key: Moments(p.channels) for p in probes}, {})
    names = list(dict.fromkeys([t for p in probes for t in (p.input, p.output, *p.consumer_outputs)]))
    stats.energy = {name: 0.0 for p in probes for name in p.consumer_outputs}
    with contextlib.ExitStack() as stack:
        session = _session(loaded, names, stack) if probes else None
        _accumulate(stats, session, names, feeds)
    log.info("calibration statistics: %d probe(s) over %d batch(es)", len(probes), stats.batches)
    return stats


def _session(loaded: io.LoadedModel, names: Sequence[str], stack: contextlib.ExitStack):
    """A session of the model with `names` as extra outputs; a model read from a file is run from a
    hidden copy beside it, so onnxruntime reads the weights from the files itself (given memory-mapped
    arrays it copies them)."""
    side = Side.of(loaded)
    edited = stack.enter_context(side.edited(lambda proto: io.add_outputs(proto, names)))
    return runtime.session(edited.source, base_dir=edited.base_dir)


def _accumulate(stats: Statistics, session, names: Sequence[str], feeds: Iterable[Feed]) -> None:
    probes = stats.probes.values()
    for feed in feeds:
        stats.batches += 1
        if session is None:
            continue
        values = runtime.run(session, feed, names, on="the calibration data")
        for probe in probes:
            h, y = (np.moveaxis(values[name], probe.axis, -1) for name in (probe.input, probe.output))
            if h.shape != y.shape or h.shape[-1:] != (probe.channels,):
                raise AssertionError(
                    f"{probe.key}: activation shapes {h.shape} -> {y.shape}, {probe.channels} channels"
                )
            stats.moments[probe.key].update(h, y)
        for name in stats.energy:
            z = np.asarray(values[name], dtype=np.float64)
            stats.energy[name] += float(np.vdot(z, z))
        del values
