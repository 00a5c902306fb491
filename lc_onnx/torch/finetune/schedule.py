"""The schedule of collapses during fine-tuning (the reference's).

Stage k targets the last `ceil(fractions[k] * n)` of the model's n MLP blocks (counted when training
starts). Their activations become PReLUs; after an epoch, each targeted block whose slopes are within
`threshold` of 1 is collapsed into one Linear. When every block of the stage has collapsed and a next
fraction is given, the next stage starts with the blocks it adds. `Schedule` is the bookkeeping over
block names; `Collapser` applies it to a model.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from lc_onnx.torch.blocks import collapsible

logger = logging.getLogger(__name__)


class Schedule:
    """Which blocks are targeted now; extends stage by stage as the targeted blocks collapse."""

    def __init__(self, all_blocks: Sequence[str], fractions: Sequence[float]) -> None:
        self.blocks = list(all_blocks)  # activation names, input side first, at the start of training
        self.fractions = list(fractions)
        self.stage = 0

    def targets(self, stage: int | None = None) -> list[str]:
        fraction = self.fractions[self.stage if stage is None else stage]
        n = len(self.blocks)
        return self.blocks[n - math.ceil(fraction * n) :]

    def advance(self, done: set[str]) -> list[str]:
        """Next stage's new blocks if every current target is in `done` and a next fraction exists."""
        if self.stage + 1 >= len(self.fractions) or not set(self.targets()) <= done:
            return []
        self.stage += 1
        return [name for name in self.targets() if name not in done]


@dataclass(frozen=True)
class CollapseResult:
    """What one `Collapser.collapse` did."""

    blocks: list[str]  # activation names of the blocks collapsed
    stage: int | None  # the stage started because of them (its blocks are now PReLUs), if any


class Collapser:
    """A `Schedule` applied to `model`, in place: PReLUs for each stage's blocks, then collapses of the
    targeted blocks that became linear, recorded for the checkpoint and the report.

    Args:
        model: the model being fine-tuned (blocks collapsed by an earlier run, as named in `steps`, are
            not counted among its blocks).
        steps: the fc1 names collapsed before (a checkpoint's `Structure.collapsed`).
        init: the PReLUs' starting slope (see `collapsible.make_collapsible`).
    """

    def __init__(
        self,
        model: nn.Module,
        fractions: Sequence[float],
        *,
        threshold: float,
        init: float | None = None,
        steps: Sequence[str] = (),
    ) -> None:
        self.model = model
        self.schedule = Schedule([b.name for b in collapsible.find_blocks(model)], fractions)
        self.threshold = threshold
        self.init = init
        self.steps = list(steps)  # fc1 names in collapse order, as `Structure.collapsed`
        self.collapsed: list[str] = []  # activation names of the blocks collapsed here

    def start(self) -> list[str]:
        """Make stage 0's blocks PReLUs; returns the names changed."""
        made = self._convert(self.schedule.targets())
        logger.info(
            "stage 0: %d target block(s), %d made collapsible", len(self.schedule.targets()), len(made)
        )
        return made

    def collapse(self) -> CollapseResult | None:
        """Collapse the targeted blocks that are linear within the threshold, and start the next stage when
        the current one is complete; None when no block collapsed."""
        targets = set(self.schedule.targets())
        pending = [b.name for b in collapsible.prelu_blocks(self.model) if b.name in targets]
        steps = collapsible.collapse_steps(self.model, self.threshold, only=pending)
        if not steps:
            return None
        self.steps += [fc1 for fc1, _ in steps]
        remaining = {b.name for b in collapsible.find_blocks(self.model)}
        done = [name for name in pending if name not in remaining]
        self.collapsed += done
        new = self.schedule.advance(set(self.collapsed))
        if new:
            self._convert(new)
        return CollapseResult(done, self.schedule.stage if new else None)

    def _convert(self, names: Sequence[str]) -> list[str]:
        wanted = set(names)
        blocks = [b for b in collapsible.find_blocks(self.model) if b.name in wanted]
        return collapsible.convert_blocks(blocks, self.init)
