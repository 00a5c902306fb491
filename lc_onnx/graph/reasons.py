"""Why a site was collapsed or skipped, as a value: a kind code branches on, and a message people read.

The report keeps the message as `reason` and the kind as `reason_kind` (the enum's string value).
Code never inspects the message.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Kind(str, Enum):
    """What decided a site."""

    # collapsed
    EXACT = "exact"  # every step exactly linear
    NEAR_LINEAR = "near_linear"  # slopes within the threshold, taken as 1
    FITTED = "fitted"  # calibration fits applied
    LEAST_SQUARES = "least_squares"  # the whole site replaced by its least-squares linear map
    # skipped
    NOT_LINEAR = "not_linear"  # an activation that is not (close enough to) linear
    PARAMETER_GROWTH = "parameter_growth"  # the collapse would not reduce the parameters
    BOUNDARY = "boundary"  # kept apart: collapsing the neighbours saves more
    CONSUMER = "consumer"  # a graph output or another consumer between the layers
    GRAPH_INPUT = "graph_input"  # a weight is a graph input (it can change at run time)
    SHARED = "shared"  # a weight is shared with nodes outside the match
    DTYPE = "dtype"  # not floating point
    SHAPE = "shape"  # shapes that do not line up (a bias that is not a row, features that differ)
    UNSUPPORTED = "unsupported"  # a pattern the pass does not rewrite (BatchNorm on the token axis, ...)
    FIT_REJECTED = "fit_rejected"  # calibration measured the fitted site outside the budget
    FIT_UNUSED = "fit_unused"  # a fit was accepted but its site does not collapse for another reason


@dataclass(frozen=True)
class Reason:
    kind: Kind
    message: str

    def __str__(self) -> str:
        return self.message
