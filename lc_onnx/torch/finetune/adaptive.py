"""Adaptive depth: how many MLP blocks a model can lose within a budget, found by collapsing them.

Blocks are made collapsible one more at a time from the output end (the reference's order). Each stage
trains (the caller's `train_stage`), then the new block's slopes are snapped to 1 where still outside the
threshold and the block is collapsed; the held-out measure (`measure`, in the metric's own 0-1 units:
fidelity to the teacher, or accuracy) is taken on the collapsed model. A stage whose measure falls more
than `max_drop` below `reference` (the unmodified model's) ends the search, and the model of the stage
before it is kept: the deepest collapse within the budget.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lc_onnx.torch.blocks import collapsible
from lc_onnx.torch.finetune.schedule import Schedule

logger = logging.getLogger(__name__)


@dataclass
class Depth:
    """What the search did: the blocks it collapsed (activation names, output side first), the fc1 names
    in collapse order (for the checkpoint), one row per stage tried, and why it stopped."""

    collapsed: list[str] = field(default_factory=list)
    steps: list[str] = field(default_factory=list)
    stages: list[dict[str, Any]] = field(default_factory=list)
    stopped: str = ""

    def to_dict(self, max_drop: float) -> dict[str, Any]:
        return {
            "max_drop": max_drop,
            "blocks_reached": len(self.collapsed),
            "stopped": self.stopped,
            "stages": self.stages,
        }


def snap(model: nn.Module, threshold: float, only: set[str] | None = None) -> dict[str, float]:
    """Set every PReLU block's slopes to 1 where some slope is further than `threshold` from 1; returns
    activation name -> the largest |slope - 1| it had."""
    snapped = {}
    for block in collapsible.prelu_blocks(model):
        if only is not None and block.name not in only:
            continue
        gap = float((block.act.weight.detach() - 1.0).abs().max())
        if gap > threshold:
            with torch.no_grad():
                block.act.weight.fill_(1.0)
            snapped[block.name] = gap
    if snapped:
        logger.info("snapped %d slope(s) to 1: %s", len(snapped), snapped)
    return snapped


def deepest(
    model: nn.Module,
    fraction: float,
    *,
    train_stage: Callable[[nn.Module, int], None],
    measure: Callable[[nn.Module], float],
    reference: float,
    max_drop: float,
    threshold: float,
    init: float | None = None,
    metric: str = "measure",
) -> tuple[nn.Module, Depth]:
    """Collapse the last `ceil(fraction * n)` of the model's n MLP blocks (as `Schedule` targets them),
    one per stage from the output end, while `measure` stays within `max_drop` of `reference`.

    Args:
        model: changed in place; the returned model is it, or a copy of it as it was after the last
            stage within the budget.
        train_stage: `train_stage(model, k)` trains stage `k` (1-based) with the new block a PReLU.
        measure: the held-out measure of a model, in 0-1 units (higher is better).

    Returns:
        The deepest model within the budget and the record of the search.
    """
    targets = list(reversed(Schedule([b.name for b in collapsible.find_blocks(model)], [fraction]).targets()))
    depth = Depth(stopped=f"all {len(targets)} targeted block(s) collapsed within max_drop {max_drop}")
    kept = copy.deepcopy(model)
    for k, name in enumerate(targets, start=1):
        collapsible.convert_blocks([b for b in collapsible.find_blocks(model) if b.name == name], init)
        train_stage(model, k)
        snapped = snap(model, threshold, {name})
        new = [fc1 for fc1, _ in collapsible.collapse_steps(model, threshold, only={name})]
        value = measure(model)
        drop = reference - value
        depth.stages.append({"blocks": k, "block": name, metric: value, "drop": drop, "snapped": snapped})
        logger.info("stage %d (%s): %s %.4f, drop %.4f", k, name, metric, value, drop)
        if drop > max_drop:
            depth.stopped = (
                f"collapsing block {k} ({name}) dropped {metric} to {value:.4f}, {drop:.4f} below "
                f"{reference:.4f}, more than max_drop {max_drop}; kept {k - 1} block(s)"
            )
            return kept, depth
        depth.steps += new
        depth.collapsed.append(name)
        kept = copy.deepcopy(model)
    return model, depth
