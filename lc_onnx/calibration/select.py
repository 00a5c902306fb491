"""Choosing which fitted sites to collapse under an accuracy budget, by measuring candidate models.

Like NNCF's `quantize_with_accuracy_control`, decisions are made on the real model, not on estimates:

1. Candidates are the sites whose non-exact steps all have fits; exactly linear steps (Identity,
   BatchNorm, slope 1) need none and always collapse. A budget is either `max_error` (the worst relative
   L2 error of any output on the held-out feeds) or a user `metric(run) -> float` (higher is better)
   with `max_drop`.
2. The exact-only model is measured first: its float rounding is always allowed (so a budget of 0
   collapses exactly linear sites only).
3. All candidates together are tried; when that model is within the budget every fit is accepted.
4. Otherwise candidates are tried one at a time in order of their estimated error (cheapest first), each
   together with those accepted so far; a candidate is kept when the measured model stays within the
   budget. One onnxruntime session per trial; the original's outputs are computed once.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx

from lc_onnx.calibration.data import Feed
from lc_onnx.calibration.fits import Calibration
from lc_onnx.calibration.stats import needs_fit
from lc_onnx.errors import UserError
from lc_onnx.graph.options import DEFAULT_MAX_ERROR, FuseOptions
from lc_onnx.graph.pipeline import collapse_graph, site_finder
from lc_onnx.graph.reasons import Kind, Reason
from lc_onnx.graph.report import Verification
from lc_onnx.graph.verify import output_errors, without_padding
from lc_onnx.model import io, runtime

log = logging.getLogger(__name__)

START_CACHE_BYTES = 512 * 2**20  # the original's values of the candidates' start tensors, at most

Metric = Callable[[Callable[[Feed], dict[str, np.ndarray]]], float]


@dataclass(frozen=True)
class Budget:
    """`max_error` on the outputs' relative L2 error (and `max_abs_error` on their largest absolute
    error, when given), or `metric` with `max_drop` (then the output errors are not used for selection)."""

    max_error: float = DEFAULT_MAX_ERROR
    max_abs_error: float | None = None
    metric: Metric | None = None
    max_drop: float | None = None

    def describe(self) -> str:
        if self.metric is not None:
            return f"metric drop <= {self.max_drop:g}"
        if self.max_abs_error is not None:
            return f"rel_l2 <= {self.max_error:g} and max_abs <= {self.max_abs_error:g}"
        return f"rel_l2 <= {self.max_error:g}"


@dataclass
class Trial:
    """One candidate: the steps it fits, the estimate, what was measured and the outcome."""

    keys: tuple[str, ...]
    estimated_error: float
    measured_error: float | None = None
    metric: float | None = None
    accepted: bool = False
    reason: Reason | None = None  # FITTED (accepted), FIT_REJECTED or FIT_UNUSED


@dataclass
class Selection:
    accepted: set[str]
    trials: list[Trial]
    baseline: Verification
    budget: Budget
    reference_metric: float | None = None
    notes: list[str] = field(default_factory=list)

    def trial_of(self, key: str) -> Trial | None:
        return next((t for t in self.trials if key in t.keys), None)


def candidates(loaded: io.LoadedModel, calibration: Calibration) -> list[Trial]:
    """One trial per collapsible site whose non-exact steps all have fits, cheapest estimate first."""
    finder = site_finder(loaded)
    trials = []
    for site in finder.sites():
        if site.problems:
            continue
        keys = tuple(s.key for s in site.steps if needs_fit(s, finder.constants))
        if keys and all(k in calibration.fits for k in keys):
            estimate = math.sqrt(sum(calibration.fits[k].estimated_error ** 2 for k in keys))
            trials.append(Trial(keys, estimate))
    trials.sort(key=lambda t: (t.estimated_error, t.keys))
    return trials


class Measurer:
    """Runs candidate models on the held-out feeds against the original's outputs (computed once).

    With `mask` (the model input that marks padding), outputs whose leading dims are the mask's are
    compared at its non-zero positions only: what a model computes at padding is read by no one.

    `starts` are tensors where a candidate may begin to differ from the original (the inputs of the
    blocks a fit replaces): the original's values of them are kept (up to `START_CACHE_BYTES`), and a
    candidate measured with `start` runs only the part of the graph after that tensor, fed its original
    value, which gives the same outputs for less."""

    def __init__(
        self,
        loaded: io.LoadedModel,
        feeds: Sequence[Feed],
        budget: Budget,
        allow_growth: bool,
        mask: str | None = None,
        starts: Sequence[str] = (),
    ):
        self.loaded, self.feeds, self.budget, self.allow_growth = loaded, list(feeds), budget, allow_growth
        self.mask = mask
        original = runtime.session(loaded.proto, base_dir=loaded.base_dir)
        self.names = [o.name for o in original.get_outputs()]
        self.reference_metric = self._metric(original) if budget.metric is not None else None
        self.reference: list[dict[str, np.ndarray]] = []
        self.starts: dict[str, list[np.ndarray]] = {}
        if budget.metric is None:
            inputs = {v.name for v in loaded.proto.graph.input}
            extra = [name for name in starts if name not in {*self.names, *inputs}]
            if extra:  # one session at a time: the original with the start tensors as outputs too
                del original
                original = runtime.session(io.with_outputs(loaded.proto, extra), base_dir=loaded.base_dir)
            self._reference(original, extra)

    def _reference(self, original, starts: list[str]) -> None:
        kept = 0
        for feed in self.feeds:
            values = runtime.run(original, feed, [*self.names, *starts], on="the calibration data")
            self.reference.append(self._masked(feed, {n: values[n] for n in self.names}))
            kept += sum(values[name].nbytes for name in starts)
            if kept > START_CACHE_BYTES:  # too large to keep: candidates run whole
                self.starts.clear()
                starts = []
            for name in starts:
                self.starts.setdefault(name, []).append(values[name])

    def _metric(self, session) -> float:
        value = self.budget.metric(lambda feed: runtime.run(session, feed, on="the metric's data"))
        try:
            return float(value)
        except (TypeError, ValueError):
            raise UserError(
                f"{{metric}} returned {type(value).__name__}, expected a number", params=["metric"]
            ) from None

    def _run(self, session, feed: Feed) -> dict[str, np.ndarray]:
        return self._masked(feed, runtime.run(session, feed, self.names, on="the calibration data"))

    def _masked(self, feed: Feed, outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return without_padding(feed, outputs, self.mask)

    def measure(
        self, fits: Mapping, block_fits: Mapping | None = None, start: str | None = None
    ) -> tuple[Verification, float | None, list[str]]:
        """The candidate with `fits` (and `block_fits`): its output errors, its metric (with a metric
        budget) and the nodes of the sites that collapsed. `start`: a tensor before which the candidate
        equals the original (see the class docstring)."""
        rewritten = collapse_graph(
            self.loaded,
            FuseOptions(threshold=0.0, allow_growth=self.allow_growth, fits=fits, block_fits=block_fits),
        )
        collapsed = [n for s in rewritten.sites if s.decision == "collapsed" for n in s.nodes]
        if rewritten.proto is None and self.budget.metric is None:
            return output_errors(self.names, self.reference, self.reference), None, collapsed  # the original
        proto = rewritten.proto if rewritten.proto is not None else self.loaded.proto
        feeds = self.feeds
        if start in self.starts and io.start_at(proto, {start: _elem(self.starts[start][0])}):
            feeds = [{**feed, start: value} for feed, value in zip(self.feeds, self.starts[start])]
        session = runtime.session(proto, base_dir=self.loaded.base_dir)
        if self.budget.metric is not None:
            return Verification(), self._metric(session), collapsed
        actual = [self._run(session, f) for f in feeds]
        return output_errors(self.names, self.reference, actual), None, collapsed


def _elem(value: np.ndarray) -> int:
    return onnx.helper.np_dtype_to_tensor_dtype(value.dtype)


def judge(
    budget: Budget, base: Verification, reference_metric: float | None
) -> Callable[[Verification, float | None], tuple[bool, str]]:
    """`within(verification, metric) -> (ok, why)`: whether a measured candidate keeps the budget. The
    exact-only model's (`base`) float rounding is always allowed."""

    def within(verification: Verification, metric: float | None) -> tuple[bool, str]:
        if budget.metric is not None:
            drop = reference_metric - metric
            return (
                drop <= budget.max_drop,
                f"metric {metric:.6g} (drop {drop:.3g}, max_drop {budget.max_drop:g})",
            )
        limit = max(budget.max_error, base.worst_rel_l2)
        abs_limit = None if budget.max_abs_error is None else max(budget.max_abs_error, base.worst_max_abs)
        breach = verification.breach(limit, abs_limit)
        if breach is not None:
            return False, f"measured {breach}"
        measured = f"measured output error {verification.worst_rel_l2:.3g} <= max_error {budget.max_error:g}"
        if abs_limit is not None:
            measured += (
                f", max abs {verification.worst_max_abs:.3g} <= max_abs_error {budget.max_abs_error:g}"
            )
        return True, measured

    return within


def score(verification: Verification, metric: float | None) -> float:
    """Lower is better: the worst output's relative L2 error, or the metric negated."""
    return -metric if metric is not None else verification.worst_rel_l2


def select(
    loaded: io.LoadedModel,
    calibration: Calibration,
    feeds: Sequence[Feed],
    budget: Budget,
    *,
    allow_growth: bool = False,
) -> Selection:
    """Accept the fits whose sites keep the model within `budget` on `feeds` (see the module docstring)."""
    trials = candidates(loaded, calibration)
    measurer = Measurer(loaded, feeds, budget, allow_growth)
    base, base_metric, _ = measurer.measure({})
    selection = Selection(set(), trials, base, budget, measurer.reference_metric)

    within = judge(budget, base, measurer.reference_metric)

    def affines(keys) -> dict:
        return calibration.affines(keys)

    if not trials:
        return selection
    every = {k for t in trials for k in t.keys}
    verification, metric, collapsed = measurer.measure(affines(every))
    ok, why = within(verification, metric)
    if ok:
        for trial in trials:
            _record(trial, verification, metric, collapsed, True, f"all fitted sites together: {why}")
        selection.accepted = {k for t in trials if t.accepted for k in t.keys}
        return selection
    log.info(
        "all %d fitted sites together are outside the budget (%s); trying them one by one", len(trials), why
    )
    for trial in trials:
        verification, metric, collapsed = measurer.measure(affines(selection.accepted | set(trial.keys)))
        ok, why = within(verification, metric)
        _record(trial, verification, metric, collapsed, ok, why)
        if trial.accepted:
            selection.accepted |= set(trial.keys)
    return selection


def _record(
    trial: Trial, verification: Verification, metric, collapsed: list[str], ok: bool, why: str
) -> None:
    trial.measured_error = verification.worst_rel_l2 if verification.outputs else None
    trial.metric = metric
    if ok and not any(k in collapsed for k in trial.keys):
        trial.accepted = False
        trial.reason = Reason(Kind.FIT_UNUSED, "fit not used: the site does not collapse (see its reason)")
        return
    trial.accepted = ok
    trial.reason = (
        Reason(Kind.FITTED, f"fit accepted: {why}")
        if ok
        else Reason(Kind.FIT_REJECTED, f"fit rejected: {why}")
    )
