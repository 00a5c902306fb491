"""The graph pass's options: one list, with its defaults, for `lc_onnx.fuse`, `pipeline.fuse`, `decide`
and the commands' flags."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from lc_onnx.errors import UserError
from lc_onnx.graph.algebra import Affine, ChannelAffine

DEFAULT_THRESHOLD = 0.05  # PRelu/LeakyRelu slopes this close to 1 count as the identity
DEFAULT_MAX_ERROR = 1e-2  # relative L2 error of any output the fused model may have


@dataclass(frozen=True)
class BlockFit:
    """A whole site replaced by one fitted linear map `x -> x @ weight + bias` (`affine`), reading the
    site's input tensor `input` and writing the output of the site's second layer (the fit's key)."""

    input: str
    affine: Affine


@dataclass(frozen=True)
class FuseOptions:
    """What the graph pass does and how strictly it checks.

    Attributes:
        output: where to write the fused model (atomically, after verification); None keeps it in memory.
        threshold: PRelu/LeakyRelu slopes within this distance of 1 count as the identity.
        max_error: largest allowed relative L2 error of any output; beyond it `VerificationError`.
        max_abs_error: also a largest allowed absolute error of any output element (None: no limit).
        verify: run original and fused in onnxruntime (strongly recommended).
        allow_growth: collapse even when the single layer has more weights than the ones it replaces.
        input_shapes: concrete shapes for graph inputs (dynamic dims default to 2); sets verification and
            MAC-count shapes.
        feeds: verification inputs (`{input name: array}` per run) instead of random data.
        fits: fitted per-channel affine maps `a ⊙ h + c` for activation steps, keyed by step name; these
            sites collapse with the fitted map (calibration chooses them; see `lc_onnx.calibration`).
        padding_mask: with `feeds`, the model input whose zeros mark padding: outputs whose leading dims
            are that input's shape are compared at its non-zero positions only.
        block_fits: fitted linear maps that replace whole sites, keyed by the output tensor of the site's
            second layer; a site collapses into its fit when its first layer reads `BlockFit.input`
            (the least-squares fits of `lc_onnx.calibration`).
    """

    output: str | os.PathLike | None = None
    threshold: float = DEFAULT_THRESHOLD
    max_error: float = DEFAULT_MAX_ERROR
    max_abs_error: float | None = None
    verify: bool = True
    allow_growth: bool = False
    input_shapes: Mapping[str, Sequence[int]] | None = None
    feeds: Iterable[Mapping[str, np.ndarray]] | None = None
    fits: Mapping[str, ChannelAffine] | None = None
    block_fits: Mapping[str, BlockFit] | None = None
    padding_mask: str | None = None

    def check(self) -> None:
        """Raises `UserError` for values no model can satisfy."""
        if (
            self.threshold < 0
            or self.max_error < 0
            or (self.max_abs_error is not None and self.max_abs_error < 0)
        ):
            raise UserError(
                "{threshold}, {max_error} and {max_abs_error} must be >= 0",
                params=["threshold", "max_error", "max_abs_error"],
            )
