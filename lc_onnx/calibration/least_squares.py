"""The calibrated fuse with whole-block least-squares fits (`fit_method="block"`, the default with data):
fit every block on the original, choose by measured error, fit the chosen in order, keep the better of
the two fits, fuse and verify on the held-out feeds, and say in the report what was done (see
`blockfit` for the method)."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import replace

from lc_onnx.calibration import blockfit
from lc_onnx.calibration.blockfit import Block, BlockResult, Choice
from lc_onnx.calibration.data import Feed, Passes
from lc_onnx.calibration.select import Budget, Measurer, judge, score
from lc_onnx.errors import UserError
from lc_onnx.graph import pipeline
from lc_onnx.graph.options import BlockFit, FuseOptions
from lc_onnx.graph.reasons import Kind
from lc_onnx.graph.report import Report
from lc_onnx.graph.verify import Side
from lc_onnx.model import io

log = logging.getLogger(__name__)


def fuse_blocks(
    loaded: io.LoadedModel,
    options: FuseOptions,
    passes: Passes,
    budget: Budget,
    *,
    blocks: int | None,
    gate_given: bool,
    progress: bool,
):
    """Least-squares fits of the blocks, `blocks` of them (chosen by held-out error) or as many as keep
    `budget`; returns the `FuseResult` of the verified fuse."""
    start = time.perf_counter()
    found = blockfit.blocks(loaded, allow_growth=options.allow_growth)
    if blocks is not None and blocks > len(found):
        raise UserError(
            f"{{blocks}} {blocks}: the model has {len(found)} block(s) a least-squares fit can replace",
            params=["blocks"],
        )
    original = Side.of(loaded)
    mask = blockfit.mask_input(passes.specs)
    bar = _bar if progress else _quiet
    if found:
        first = blockfit.fit_all(original, found, passes, mask, bar)
    else:  # nothing to fit: the data is still checked, and its held-out feeds verify the fuse
        first = {}
        for _ in passes.fit():
            pass
    if not passes.held:
        raise UserError(
            "no held-out calibration feeds to choose and verify on: give at least 4 batches, or more than "
            "{calib_batches}",
            params=["calib_batches"],
        )
    starts = [b.input for b in found]
    measurer = Measurer(loaded, passes.held, budget, options.allow_growth, mask, starts)
    base = measurer.measure({})[0]
    choice = _choose(measurer, base, first, blocks, budget)
    chosen = [b for b in found if b.key in choice.order]  # graph order
    _fit_chosen(loaded, original, chosen, first, choice, measurer, passes, mask, bar, options)
    gate, abs_gate = max(options.max_error, base.worst_rel_l2), options.max_abs_error
    if abs_gate is not None:
        abs_gate = max(abs_gate, base.worst_max_abs)
    if budget.metric is not None or (blocks is not None and not gate_given):
        gate, abs_gate = float("inf"), None  # the choice was made; the errors are still reported
    source = loaded.path if loaded.path is not None else loaded.proto
    result = pipeline.fuse(
        source,
        replace(
            options, threshold=0.0, max_error=gate, max_abs_error=abs_gate, feeds=passes.held,
            fits=None, block_fits=choice.block_fits(), padding_mask=mask,
        ),
    )  # fmt: skip
    annotate(result.report, found, first, choice)
    result.report.calibration["seconds"] = round(time.perf_counter() - start, 2)
    return result


def _choose(
    measurer: Measurer, base, first: Mapping[str, BlockResult], count: int | None, budget: Budget
) -> Choice:
    """Greedy: add the block whose fit (on the original) gives the best measured model with those chosen
    so far, until `count` are chosen, or (without `count`) while the model keeps the budget; then a block
    that broke the budget on its own is not tried again. Each candidate runs from the input of its first
    replaced block on (the original's value of it fed in)."""
    within = judge(budget, base, measurer.reference_metric)
    choice = Choice(fits=dict(first))
    graph_order = list(first)
    remaining = list(first)
    fits = {k: BlockFit(r.block.input, r.affine) for k, r in first.items()}
    while remaining and (count is None or len(choice.order) < count):
        if count is not None and len(remaining) == count - len(choice.order):
            choice.order += remaining  # every one left is needed: nothing to compare
            break
        trials = []
        for key in remaining:
            keys = sorted([*choice.order, key], key=graph_order.index)
            verification, metric, _ = measurer.measure(
                {}, {k: fits[k] for k in keys}, start=fits[keys[0]].input
            )
            trials.append((score(verification, metric), key, verification, metric))
        best, key, verification, metric = min(trials, key=lambda t: t[0])
        ok, why = within(verification, metric)
        if count is None and not ok:
            choice.stopped = f"the next best, {key}, would break the budget ({why})"
            break
        if count is None and not choice.order:  # alone outside the budget: never within it with others
            for _, other, v, m in trials:
                fine, reason = within(v, m)
                if not fine:
                    choice.rejected[other] = f"on its own it breaks the budget ({reason})"
                    remaining.remove(other)
        choice.order.append(key)
        choice.measured[key] = best
        remaining.remove(key)
        log.info("block %d: %s (held-out score %.4g)", len(choice.order), key, best)
    if count is not None:
        choice.stopped = f"{count} block(s) asked for, chosen by held-out error"
    return choice


def _fit_chosen(
    loaded, original: Side, chosen: list[Block], first, choice: Choice, measurer: Measurer, passes,
    mask, bar, options: FuseOptions,
) -> None:  # fmt: skip
    """Fit the chosen blocks again in order and keep the better of the two ways (measured)."""
    if len(chosen) < 2:
        choice.note = "one block or none: fitted on the original (nothing before it changes)"
        return
    if not passes.replayable:
        choice.note = "the calibration data can be read only once: fitted on the original's activations"
        return

    # The tensors the passes read stay graph outputs, so no other collapse removes them.
    read = [name for b in chosen for name in (b.input, b.residual) if name is not None]
    exposed = io.LoadedModel(io.with_outputs(loaded.proto, read), loaded.base_dir)

    def rewrite(block_fits: Mapping[str, BlockFit]) -> Side:
        rewritten = pipeline.collapse_graph(
            exposed, FuseOptions(threshold=0.0, allow_growth=options.allow_growth, block_fits=block_fits)
        )
        return Side(rewritten.proto if rewritten.proto is not None else exposed.proto, loaded.base_dir)

    in_order = blockfit.fit_in_order(original, chosen, first, passes, mask, bar, rewrite)
    scores = {}
    for way, results in (("original", first), ("in order", in_order)):
        fits = {b.key: BlockFit(b.input, results[b.key].affine) for b in chosen}
        scores[way] = score(*measurer.measure({}, fits)[:2])
    choice.scores = scores
    if scores["in order"] <= scores["original"]:
        choice.fitted_on = "in order"
        choice.fits.update(in_order)


def annotate(report: Report, found: list[Block], first: Mapping[str, BlockResult], choice: Choice) -> None:
    """Per block, the fit's numbers (`least_squares`) and, for a block not chosen, why."""
    by_nodes = {tuple(site.nodes): site for site in report.sites}
    by_first = {site.nodes[0]: site for site in report.sites if site.nodes}
    for block in found:
        site = by_nodes.get(block.nodes) or by_first.get(block.nodes[0])  # later rounds add nodes
        if site is None:
            continue
        result = choice.fits.get(block.key, first[block.key])
        entry = result.to_dict()
        if block.key in choice.order:
            entry["order"] = choice.order.index(block.key) + 1
            entry["fitted_on"] = choice.fitted_on
            if block.key in choice.measured:
                entry["measured_score"] = choice.measured[block.key]
        elif site.decision == "skipped":
            why = choice.rejected.get(block.key, choice.stopped)
            site.reason = "least-squares fit not chosen" + (f": {why}" if why else "")
            site.reason_kind = Kind.FIT_REJECTED.value
        site.extra["least_squares"] = entry
    report.calibration = {
        "fit_method": "block",
        "blocks": len(choice.order),
        "candidates": len(found),
        "fitted_on": choice.fitted_on,
        "rows": next((r.rows for r in first.values()), 0),
        "held_out_rows": next((r.held_rows for r in first.values()), 0),
    }
    if choice.scores:
        report.calibration["held_out_score"] = choice.scores
    if choice.note:
        report.calibration["note"] = choice.note


def _quiet(feeds: Iterable[Feed], desc: str) -> Iterable[Feed]:
    return feeds


def _bar(feeds: Iterable[Feed], desc: str) -> Iterable[Feed]:
    """A progress bar on a terminal (tqdm, where installed)."""
    try:
        from tqdm import tqdm
    except ImportError:
        return feeds
    return tqdm(feeds, desc=desc, unit="feed", leave=False, disable=None)
