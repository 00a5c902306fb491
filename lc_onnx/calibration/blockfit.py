"""Whole-block least-squares fits: each MLP site replaced by the one linear map that best reproduces it.

A *block* is a site of the pass with one second layer (`x -> L2(act(L1(x)))`, any activation the pass
finds, Gemm, token MatMul+Add or 1x1 Conv). Its fit is the `A, c` minimising `‖L2out − (x @ A + c)‖²`
over every position of every calibration feed (`gram`), positions where the model's attention mask is 0
left out. How it goes:

1. **On the original:** one pass over the fit feeds and the held-out feeds sums every block's Gram; each
   block's fit takes the ridge that scores best on the held-out rows.
2. **Choosing by measured error:** greedily, the block whose fit added to those already chosen gives the
   smallest end-to-end error of the model on the held-out feeds (the worst output's relative L2 error,
   or the user's metric) is chosen next; with `blocks=K` until K are chosen, else while the model stays
   within the budget.
3. **In order:** the chosen blocks are fitted again in graph order, each on the inputs it gets in the
   model whose earlier chosen blocks are already replaced, towards a target that makes its output what
   the original's was: `L2out` itself, or, when the block's output is added to a residual `r`
   (`Add(L2out, r)`, or onnxruntime's `SkipLayerNormalization`), `L2out + r − r'` with `r'` the partly replaced model's residual. Errors of earlier
   fits are then corrected rather than compounded. Both versions, in order and all on the original, are
   measured on the held-out feeds and the better is used (the report says which).

Memory is the Gram sums (`O(d_in·(d_in + d_out))` per block) and one feed's activations, whatever the
number of feeds. The in-order pass reads the fit feeds again; data that can be read only once is fitted
all on the original.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from lc_onnx.calibration.data import Feed, Passes
from lc_onnx.calibration.gram import Gram, best_fit
from lc_onnx.calibration.stats import needs_fit
from lc_onnx.graph import pipeline
from lc_onnx.graph.algebra import Affine
from lc_onnx.graph.options import BlockFit
from lc_onnx.graph.verify import Side
from lc_onnx.model import io, runtime
from lc_onnx.model.protos import MS_DOMAIN, is_default_domain

log = logging.getLogger(__name__)

# Model inputs whose zeros mark padding (positions no fit sees), as tokenizers name them.
MASK_INPUTS = ("attention_mask", "input_mask")

Progress = Callable[[Iterable[Feed], str], Iterable[Feed]]


@dataclass(frozen=True)
class Block:
    """One block to fit: the tensor it reads, the tensor its second layer writes (its key), the other
    input of the `Add` that reads that output (a residual), widths and the feature axis."""

    key: str
    input: str
    residual: str | None
    d_in: int
    d_out: int
    axis: int
    nodes: tuple[str, ...]


@dataclass
class Sums:
    fitted: Gram
    held: Gram


@dataclass
class BlockResult:
    """A block's fit and its numbers for the report."""

    block: Block
    affine: Affine
    ridge: float
    rows: int
    held_rows: int
    fit_error: float
    held_error: float

    def to_dict(self) -> dict:
        return {
            "rows": self.rows,
            "held_out_rows": self.held_rows,
            "fit_error": _finite(self.fit_error),
            "held_out_error": _finite(self.held_error),
            "ridge": self.ridge,
        }


@dataclass
class Choice:
    """The chosen blocks (in the order chosen), their fits, and what was measured on the way."""

    order: list[str] = field(default_factory=list)
    fits: dict[str, BlockResult] = field(default_factory=dict)
    measured: dict[str, float] = field(default_factory=dict)  # end-to-end score when each was added
    fitted_on: str = "original"  # or "in order"
    scores: dict[str, float] = field(default_factory=dict)  # held-out score of each way of fitting
    stopped: str = ""  # why no more blocks were chosen
    rejected: dict[str, str] = field(default_factory=dict)  # blocks not tried again, and why
    note: str = ""  # how the fits were made, when not in order

    def block_fits(self) -> dict[str, BlockFit]:
        return {k: BlockFit(self.fits[k].block.input, self.fits[k].affine) for k in self.order}


def blocks(loaded: io.LoadedModel, *, allow_growth: bool = False) -> list[Block]:
    """The blocks a fit can replace, in graph order: sites without problems, one second layer, a step
    that is not exactly linear (exact sites collapse without a fit), fewer weights once replaced (unless
    `allow_growth`), and no layer shared with an earlier block (a chain gives its first site)."""
    finder = pipeline.site_finder(loaded)
    constants = finder.constants
    found: list[Block] = []
    used: set[int] = set()
    for site in finder.sites():
        if site.problems or len(site.consumers) != 1:
            continue
        if not any(needs_fit(step, constants) for step in site.steps):
            continue
        first, second = site.producer, site.consumers[0]
        if id(first.core) in used or id(second.core) in used:
            continue
        d_in, d_h = first.shape(constants)
        d_out = second.shape(constants)[1]
        if d_in * d_out >= d_h * (d_in + d_out) and not allow_growth:
            continue
        used.update((id(first.core), id(second.core)))
        block = Block(
            second.output.name, first.input.name, _residual(second.output), d_in, d_out,
            first.feature_axis, tuple(site.node_names()),
        )  # fmt: skip
        found.append(block)
    return found


def _residual(tensor: gs.Tensor) -> str | None:
    """The tensor added to `tensor` by the one node that reads it, when computed (not a constant): the
    other input of an `Add`, or of onnxruntime's `SkipLayerNormalization` (which adds `input + skip`)."""
    readers = list(tensor.outputs)
    if len(readers) != 1:
        return None
    reader = readers[0]
    if reader.op == "Add" and is_default_domain(reader.domain):
        summed = list(reader.inputs)
    elif reader.op == "SkipLayerNormalization" and reader.domain == MS_DOMAIN:
        summed = list(reader.inputs[:2])
    else:
        return None
    others = [t for t in summed if t is not tensor]
    if len(summed) != 2 or len(others) != 1 or not isinstance(others[0], gs.Variable):
        return None
    return others[0].name


def mask_input(input_names: Iterable[str]) -> str | None:
    """The model input that marks padding, if it has one (see `MASK_INPUTS`)."""
    for name in input_names:
        if name.lower() in MASK_INPUTS or name.lower().endswith("attention_mask"):
            return name
    return None


def _rows(value: np.ndarray, axis: int, width: int) -> np.ndarray:
    return np.moveaxis(np.asarray(value), axis, -1).reshape(-1, width)


class _Runner:
    """A model restricted to the tensors a pass needs, as one onnxruntime session."""

    def __init__(self, side: Side, names: Sequence[str], stack: contextlib.ExitStack) -> None:
        self.names = list(dict.fromkeys(names))
        edited = stack.enter_context(side.edited(lambda proto: io.keep_outputs(proto, self.names)))
        self.session = runtime.session(edited.source, base_dir=edited.base_dir)

    def __call__(self, feed: Feed) -> dict[str, np.ndarray]:
        return runtime.run(self.session, feed, self.names, on="the calibration data")


def collect(
    student: Side,
    teacher: Side | None,
    chosen: Sequence[Block],
    fit_feeds: Iterable[Feed],
    held_feeds: Sequence[Feed],
    mask: str | None,
    progress: Progress,
) -> dict[str, Sums]:
    """The Gram sums of `chosen` over the fit feeds and the held-out feeds: inputs from `student`,
    targets from `teacher` (residual-corrected, see the module docstring), or both from `student`."""
    sums = {b.key: Sums(Gram(b.d_in, b.d_out), Gram(b.d_in, b.d_out)) for b in chosen}
    own = [b.input for b in chosen]
    if teacher is None:
        own += [b.key for b in chosen]
    else:
        own += [b.residual for b in chosen if b.residual is not None]
    targets = [n for b in chosen for n in (b.key, b.residual) if n is not None]
    with contextlib.ExitStack() as stack:
        run_student = _Runner(student, own, stack)
        run_teacher = _Runner(teacher, targets, stack) if teacher is not None else None
        for part, feeds in (("fitted", fit_feeds), ("held", held_feeds)):
            for feed in progress(feeds, "held-out rows" if part == "held" else "fit rows"):
                values = run_student(feed)
                reference = run_teacher(feed) if run_teacher is not None else values
                keep = np.asarray(feed[mask]) != 0 if mask is not None else None
                for block in chosen:
                    x, y = _pair(block, values, reference, run_teacher is not None)
                    if keep is not None and _token_rows(values[block.input], block.axis, keep):
                        x, y = x[keep.reshape(-1)], y[keep.reshape(-1)]
                    getattr(sums[block.key], part).update(x, y)
    return sums


def _token_rows(value: np.ndarray, axis: int, keep: np.ndarray) -> bool:
    """Whether the rows of `value` are the mask's positions in its order: leading dims equal to the
    mask's (`[B, S, d]`), or a batch-major matrix of as many rows (`[B·S, d]`)."""
    shape = np.shape(np.moveaxis(value, axis, -1))
    return shape[:-1] == keep.shape or (len(shape) == 2 and shape[0] == keep.size)


def _pair(block: Block, values: Mapping, reference: Mapping, corrected: bool) -> tuple[np.ndarray, ...]:
    x = _rows(values[block.input], block.axis, block.d_in)
    target = reference[block.key]
    if corrected and block.residual is not None:
        own, original = values[block.residual], reference[block.residual]
        if own.shape == target.shape == original.shape:
            target = target.astype(np.float64) + original - own
    y = _rows(target, block.axis, block.d_out)
    if x.shape[0] != y.shape[0]:
        raise AssertionError(f"block {block.key}: {x.shape[0]} input rows, {y.shape[0]} output rows")
    return x, y


def fit(block: Block, sums: Sums) -> BlockResult:
    affine, ridge = best_fit(sums.fitted, sums.held)
    return BlockResult(
        block, affine, ridge, sums.fitted.n, sums.held.n,
        sums.fitted.relative_error(affine), sums.held.relative_error(affine),
    )  # fmt: skip


def fit_all(original: Side, found: Sequence[Block], passes: Passes, mask, progress) -> dict[str, BlockResult]:
    """Every block fitted on the original's activations (one pass)."""
    sums = collect(original, None, found, passes.fit(), _held_after(passes), mask, progress)
    return {b.key: fit(b, sums[b.key]) for b in found}


def _held_after(passes: Passes) -> Iterator[Feed]:
    """The held-out feeds, read once the fit stream has filled them."""
    yield from passes.held


def fit_in_order(
    original: Side,
    chosen: Sequence[Block],
    first: Mapping[str, BlockResult],
    passes: Passes,
    mask: str | None,
    progress: Progress,
    rewrite: Callable[[Mapping[str, BlockFit]], Side],
) -> dict[str, BlockResult]:
    """The chosen blocks fitted again in graph order, each on the model with the earlier ones replaced
    (the first needs no new pass: nothing before it changed). `rewrite(block_fits)` gives that model."""
    results: dict[str, BlockResult] = {}
    for index, block in enumerate(chosen):
        if index == 0:
            results[block.key] = first[block.key]
            continue
        earlier = {b.key: BlockFit(b.input, results[b.key].affine) for b in chosen[:index]}
        student = rewrite(earlier)
        sums = collect(student, original, [block], passes.fit(), passes.held, mask, progress)
        results[block.key] = fit(block, sums[block.key])
        log.info(
            "block %s fitted in order: held-out error %.4g (on the original's inputs %.4g)",
            block.key, results[block.key].held_error, first[block.key].held_error,
        )  # fmt: skip
    return results


def _finite(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None
