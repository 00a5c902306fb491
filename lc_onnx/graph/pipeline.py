"""`fuse`: load -> find sites -> decide -> rewrite -> verify -> save, and the report.

Rounds of find/decide/rewrite repeat until nothing more collapses, so chains and fan-outs that only
become visible after a first collapse are handled in the same call, and fusing a fused model changes
nothing. The fused model is verified against the original before it is handed back or written; with an
output path it is first written into a temporary directory beside the output, verified from there and
only then moved into place.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from lc_onnx.errors import UserError, VerificationError
from lc_onnx.graph import report as report_mod
from lc_onnx.graph import rewrite, verify
from lc_onnx.graph.constant_eval import Constants
from lc_onnx.graph.decide import CollapsePlan, Skip, decide
from lc_onnx.graph.options import FuseOptions
from lc_onnx.graph.reasons import Kind
from lc_onnx.graph.report import ROUNDING, Report, SiteReport, Verification
from lc_onnx.graph.sites import SiteFinder
from lc_onnx.model import exercise, files, io, macs, runtime, shapes
from lc_onnx.model.protos import dims_of

log = logging.getLogger(__name__)

MAX_ROUNDS = 16
# Relative L2 error an exact collapse stays within (float rounding), by the outputs' element type.
EXACT_TOLERANCE = {onnx.TensorProto.FLOAT: 1e-5, onnx.TensorProto.DOUBLE: 1e-12}
# Relative L2 error an exact site's own output must stay within, by its element type (else the fuse fails).
SITE_TOLERANCE = {
    onnx.TensorProto.FLOAT: 1e-5,
    onnx.TensorProto.DOUBLE: 1e-10,
    onnx.TensorProto.FLOAT16: 1e-2,
    onnx.TensorProto.BFLOAT16: 1e-2,
}


class FuseResult:
    """The fused model, the report, and where the model was written (None when kept in memory).

    When the model was written, `model` is read back from `path` on first access, so a fuse of a large
    model does not keep its weights in memory.
    """

    def __init__(self, model: onnx.ModelProto | None, report: Report, path: Path | None = None) -> None:
        self._model = model
        self.report = report
        self.path = path

    @property
    def model(self) -> onnx.ModelProto:
        if self._model is None:
            self._model = io.load_model(self.path)
        return self._model

    @property
    def collapsed(self) -> int:
        return len(self.report.collapsed)


@dataclass
class Rewritten:
    """Outcome of the graph rounds: the new proto (None if unchanged), one report entry per site, and
    the collapsed sites' outputs that are still tensors of the new graph (to compare with the original)."""

    proto: onnx.ModelProto | None
    sites: list[SiteReport]
    probes: list[verify.Probe] = field(default_factory=list)


def fuse(model: str | os.PathLike | onnx.ModelProto, options: FuseOptions | None = None) -> FuseResult:
    """Collapse every qualifying Linear -> linear activation -> Linear of `model` and verify the result.

    Args:
        model: a path to an `.onnx` file (its external data stays on disk) or an in-memory `ModelProto`;
            neither is modified.
        options: what to collapse, how to verify and where to write (`FuseOptions`; defaults if None).

    Raises:
        UserError: the model cannot be read or written, or the options do not fit it.
        VerificationError: the fused model deviates more than `options.max_error`, or an exact site's own
            output is off by more than float rounding (nothing is written).
    """
    start = time.perf_counter()
    options = options or FuseOptions()
    options.check()
    work = _collapse_and_count(io.as_loaded(model), options)
    with contextlib.ExitStack() as stack:
        staged = _stage(work, options, stack)
        if work.changed and options.verify:
            _verify(work, staged, options)
        elif work.changed:
            work.report.verification = Verification(note="verification disabled")
        work.report.seconds = time.perf_counter() - start
        _gate(work, options)
        if work.out_path is not None:
            _publish(staged.parent, work.out_path)
            return FuseResult(None, work.report, path=work.out_path)
        return FuseResult(io.load_model(staged) if staged is not None else work.fused.proto, work.report)


@dataclass
class _Work:
    """A fuse in progress: this call's own record, which lets go of the fused weights once staged."""

    original: io.LoadedModel
    fused: io.LoadedModel | None
    rewritten: Rewritten
    report: Report
    out_path: Path | None
    skeletons: tuple[onnx.ModelProto, onnx.ModelProto]  # both models without weights, for counting
    feeds: list[dict] | None  # the caller's verification feeds; None: random ones, chosen here

    @property
    def exercised(self) -> bool:
        """Shapes and feeds are chosen here: they may fall back to the small dims."""
        return self.feeds is None

    @property
    def changed(self) -> bool:
        return self.rewritten.proto is not None


def _collapse_and_count(loaded: io.LoadedModel, options: FuseOptions) -> _Work:
    """Check the output path, collapse, and count both models at the shapes they are verified at."""
    out_path = Path(options.output) if options.output is not None else None
    if out_path is not None and loaded.path is not None and _same_file(out_path, loaded.path):
        raise UserError(f"{out_path}: output would overwrite the input model; choose another path")
    rewritten = collapse_graph(loaded, options)
    fused = (
        io.LoadedModel(rewritten.proto, loaded.base_dir, source_external=loaded.source_external)
        if rewritten.proto is not None
        else loaded
    )
    skeletons = (io.skeleton(loaded.proto), io.skeleton(fused.proto))  # counting needs dims only
    report = Report(
        sites=rewritten.sites,
        params_before=macs.count_params(skeletons[0]),
        params_after=macs.count_params(skeletons[1]),
        macs_before=0,
        macs_after=0,
        verification=Verification(note="model unchanged: nothing collapsed"),
    )
    feeds = [dict(f) for f in options.feeds] if options.feeds is not None else None
    if feeds is not None and not feeds:
        raise UserError("no verification feeds given (the data is empty)")
    work = _Work(loaded, fused, rewritten, report, out_path, skeletons, feeds)
    inputs = {v.name for v in loaded.proto.graph.input}
    given = {k: np.shape(v) for k, v in feeds[0].items() if k in inputs} if feeds else {}
    _count_macs(
        work, runtime.input_shapes(loaded.proto, {**given, **(options.input_shapes or {})}, exercise=True)
    )
    return work


def _count_macs(work: _Work, shapes: Mapping[str, Sequence[int]]) -> None:
    before, after = (macs.count(skeleton, shapes) for skeleton in work.skeletons)
    report = work.report
    report.macs_before, report.macs_after = before.total, after.total
    report.macs_not_counted_before, report.macs_not_counted_after = (
        list(before.not_counted),
        list(after.not_counted),
    )


def _stage(work: _Work, options: FuseOptions, stack: contextlib.ExitStack) -> Path | None:
    """Write the fused model into a temporary directory beside the output (or anywhere, when it has
    external data and is verified in memory otherwise), so it is verified as it will be read."""
    fused = work.fused
    if work.out_path is None and not (work.changed and fused.has_external_data and options.verify):
        return None
    parent = work.out_path.parent if work.out_path is not None else None
    if parent is not None and not parent.is_dir():
        raise UserError(f"{work.out_path}: directory {parent} does not exist")
    staging = Path(stack.enter_context(files.staging_dir(parent)))
    staged = staging / (work.out_path.name if work.out_path is not None else "model.onnx")
    io.save(fused, staged)
    work.fused = None  # the weights live in the staged files now: let go of the in-memory copy
    return staged


def _verify(work: _Work, staged: Path | None, options: FuseOptions) -> None:
    """Run the original and the fused model on the same feeds and record what they show: the outputs'
    errors, every collapsed site's own error, and whether the check could tell anything apart."""
    original = verify.Side.of(work.original)
    fused = (
        verify.Side(str(staged))
        if staged is not None
        else verify.Side(work.fused.proto, work.original.base_dir)
    )
    shapes = runtime.input_shapes(work.original.proto, options.input_shapes, exercise=True)
    mask = options.padding_mask if work.feeds is not None else None  # random feeds mark no padding
    try:
        comparison = verify.compare(
            original, fused, _feeds(work, shapes), work.rewritten.probes, padding_mask=mask
        )
    except VerificationError:
        raise
    except UserError as exc:  # the original cannot run at these shapes
        if not work.exercised:
            raise
        _warn(work.report, f"the original model does not run at {report_mod.shapes_text(shapes)} "
              f"({exc}); verified at the small shapes instead")  # fmt: skip
        shapes = runtime.input_shapes(work.original.proto, options.input_shapes)
        _count_macs(work, shapes)
        comparison = verify.compare(original, fused, _feeds(work, shapes), work.rewritten.probes)
    work.report.verification = comparison.verification
    for probe in work.rewritten.probes:
        site = work.report.sites[probe.site].extra
        error = comparison.probes[probe.tensor]
        if "site_error" not in site or error.rel_l2 > site["site_error"]["rel_l2"]:
            site["site_error"] = {"rel_l2": error.rel_l2, "max_abs": error.max_abs, "tensor": probe.tensor}
    if comparison.input_independent:
        _warn(work.report, "the original model's outputs do not depend on its inputs here (equal on every "
              "feed, or constant): the verification proves little")  # fmt: skip


def _feeds(work: _Work, shapes: Mapping[str, Sequence[int]]) -> list[dict]:
    """The caller's feeds, or two random ones at `shapes` (integer ids drawn from the rows they index)."""
    if work.feeds is not None:
        return work.feeds
    rows = exercise.index_rows(work.original.proto)
    return [runtime.random_feeds(work.original.proto, shapes, seed=s, index_rows=rows) for s in range(2)]


def _gate(work: _Work, options: FuseOptions) -> None:
    """Refuse a fused model beyond the error budget, or with an exact site off by more than rounding;
    say when an output passed on rounding alone, or an exact model is further off than rounding."""
    verification = work.report.verification
    breach = verification.breach(options.max_error, options.max_abs_error)
    if breach is not None:
        raise VerificationError(f"fused model differs from the original: {breach}; nothing written")
    for probe in work.rewritten.probes:
        site = work.report.sites[probe.site]
        error = site.extra["site_error"]["rel_l2"] if "site_error" in site.extra else 0.0
        limit = SITE_TOLERANCE.get(probe.elem_type, 1e-5)
        if site.reason_kind == Kind.EXACT and error > limit:
            raise VerificationError(
                f"exact collapse {site.nodes[0]} -> {site.nodes[-1]} differs from the original at its own "
                f"output {probe.tensor!r}: relative L2 error {error:.3g} > {limit:g} (float rounding); "
                "nothing written"
            )
    for name in verification.passed_by_rounding(options.max_error):
        error = verification.outputs[name]
        _warn(work.report, f"output {name!r} passed on float rounding alone: relative L2 error "
              f"{error.rel_l2:.3g} > max_error {options.max_error:g}, but max_abs {error.max_abs:.3g} is within "
              f"{ROUNDING:g} of its scale {error.max_ref:.3g}")  # fmt: skip
    if work.changed and all(s.reason_kind == Kind.EXACT for s in work.report.collapsed):
        _check_rounding(verification, work.skeletons[0])


def _check_rounding(verification: Verification, model: onnx.ModelProto) -> None:
    """Warn when an exact collapse is further from the original than float rounding explains."""
    types = {o.name: o.type.tensor_type.elem_type for o in model.graph.output}
    for name, error in verification.outputs.items():
        tolerance = EXACT_TOLERANCE.get(types.get(name))  # fp16/bf16 rounding depends on the values
        if tolerance is not None and error.rel_l2 > tolerance:
            log.warning(
                "exact collapse but relative L2 error %.3g (> %g) on %r", error.rel_l2, tolerance, name
            )


def _warn(report: Report, message: str) -> None:
    log.warning("%s", message)
    report.warnings.append(message)


def site_finder(loaded: io.LoadedModel) -> SiteFinder:
    """A `SiteFinder` over a graphsurgeon copy of the model (toposorted, with inferred shapes)."""
    proto = loaded.proto
    graph = gs.import_onnx(proto)
    try:
        graph.toposort()
    except gs.util.exception.OnnxGraphSurgeonException:
        raise UserError(
            "the graph has a cycle (or several nodes writing one tensor); not a valid model"
        ) from None
    _add_inferred_shapes(graph, io.skeleton(proto))
    constants = Constants(graph, proto, loaded.base_dir, graph_inputs=_feedable(proto))
    return SiteFinder(graph, constants)


def collapse_graph(loaded: io.LoadedModel, options: FuseOptions) -> Rewritten:
    """Run find/decide/rewrite rounds on a copy of the graph; the input proto is not modified."""
    proto = loaded.proto
    finder = site_finder(loaded)
    graph, constants = finder.graph, finder.constants
    reports: list[SiteReport] = []
    skipped: list[SiteReport] = []
    probes: list[verify.Probe] = []
    inexact: dict[str, Kind] = {}  # outputs of layers written by collapses that are not exact
    changed = False
    for _ in range(MAX_ROUNDS):
        decisions = decide(list(finder.sites()), constants, options)
        collapses = [_inherit(d, inexact) for d in decisions if isinstance(d, CollapsePlan)]
        skipped = [_skip_report(d, constants) for d in decisions if isinstance(d, Skip)]
        if not collapses:
            break
        probes += [p for c in collapses for p in _probes(c, len(reports) + collapses.index(c), constants)]
        reports += [_collapse_report(c, constants) for c in collapses]
        rewrite.apply(graph, collapses, constants)
        changed = True
    if not changed:
        return Rewritten(None, skipped)
    new = gs.export_onnx(graph, do_type_check=False)
    _restore_model_fields(new, proto)
    rewrite.restore_sparse(new, proto)
    written = {out for node in new.graph.node for out in node.output}
    return Rewritten(new, reports + skipped, [p for p in probes if p.tensor in written])


def _inherit(plan: CollapsePlan, inexact: dict[str, Kind]) -> CollapsePlan:
    """A collapse that takes in a layer an earlier inexact collapse wrote is no more exact than that one
    (its own check against the original could only fail); its new layers are recorded likewise."""
    layers = [*plan.chain, *(h.layer for h in plan.heads)]
    earlier = [inexact[layer.output.name] for layer in layers if layer.output.name in inexact]
    if plan.kind is Kind.EXACT and earlier:
        plan = replace(plan, kind=earlier[0])
    if plan.kind is not Kind.EXACT:
        inexact.update({h.layer.output.name: plan.kind for h in plan.heads})
    return plan


def _probes(plan: CollapsePlan, site: int, constants: Constants) -> list[verify.Probe]:
    """The tensors the collapse's new layers write (they keep the names of the heads' outputs)."""
    dtype = np.asarray(constants.value(plan.chain[0].weight)).dtype
    elem = onnx.helper.np_dtype_to_tensor_dtype(dtype)
    source = plan.chain[0].input.name
    return [verify.Probe(site, head.layer.output.name, source, elem) for head in plan.heads]


def _slopes(sites, constants: Constants) -> dict[str, list[float]]:
    """`{step: [min, max]}` of the PRelu/LeakyRelu slopes of `sites` (what inspect shows)."""
    found = {}
    for site in sites:
        for step in site.steps:
            values = step.slopes(constants)
            if values is not None and values.size:
                found[step.key] = [float(values.min()), float(values.max())]
    return found


def _add_inferred_shapes(graph: gs.Graph, skeleton: onnx.ModelProto) -> None:
    """Give graph tensors the shapes onnx infers (on the data-free skeleton: no weights are serialized)."""
    try:
        inferred = shapes.infer(skeleton)
    except Exception as exc:  # shapes only refine matching (ranks); go on without them
        log.info("shape inference failed (%s); matching without shapes", exc)
        return
    tensors = graph.tensors()
    for info in inferred.graph.value_info:
        tensor = tensors.get(info.name)
        if isinstance(tensor, gs.Variable) and tensor.shape is None and info.type.HasField("tensor_type"):
            tt = info.type.tensor_type
            if tt.HasField("shape"):
                tensor.shape = dims_of(info, symbolic=True)
            if tensor.dtype is None and tt.elem_type:
                tensor.dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)


def _collapse_report(c: CollapsePlan, constants: Constants) -> SiteReport:
    return SiteReport(
        nodes=c.node_names(),
        activation=c.activation,
        decision="collapsed",
        reason=c.reason.message,
        reason_kind=c.reason.kind.value,
        params_before=c.params_before,
        params_after=c.params_after,
        extra={"exact": c.exact, "slopes": _slopes(c.sites, constants)},
    )


def _skip_report(s: Skip, constants: Constants) -> SiteReport:
    return SiteReport(
        nodes=s.site.node_names(),
        activation=s.site.activation,
        decision="skipped",
        reason=s.reason.message,
        reason_kind=s.reason.kind.value,
        params_before=s.params,
        params_after=s.params,
        extra={"slopes": _slopes([s.site], constants)},
    )


def _feedable(proto: onnx.ModelProto) -> set[str]:
    """Graph inputs a caller can feed. From IR 4 on, an initializer listed as an input is only a default
    (it can be overridden, so it is no constant weight); IR 3 has to list every initializer as an input."""
    names = {v.name for v in proto.graph.input}
    if proto.ir_version < 4:
        names -= {t.name for t in proto.graph.initializer}
    return names


def _restore_model_fields(new: onnx.ModelProto, old: onnx.ModelProto) -> None:
    """graphsurgeon rebuilds the ModelProto; keep everything about the model that the rewrite did not touch."""
    new.ir_version = old.ir_version
    del new.opset_import[:]
    new.opset_import.extend(old.opset_import)
    for name in ("producer_name", "producer_version", "domain", "model_version", "doc_string"):
        setattr(new, name, getattr(old, name))
    del new.metadata_props[:]
    new.metadata_props.extend(old.metadata_props)
    del new.functions[:]
    new.functions.extend(old.functions)
    new.graph.name = old.graph.name
    new.graph.doc_string = old.graph.doc_string
    # Graph inputs/outputs keep their original declarations (names, order, types, shapes).
    del new.graph.input[:]
    new.graph.input.extend(old.graph.input)
    if old.ir_version < 4:
        # IR 3 declares every initializer as a graph input too: follow the initializers the rewrite changed.
        kept = {t.name for t in new.graph.initializer}
        removed = {t.name for t in old.graph.initializer} - kept
        inputs = [v for v in new.graph.input if v.name not in removed]
        declared = {v.name for v in inputs}
        inputs += [
            onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
            for t in new.graph.initializer
            if t.name not in declared
        ]
        del new.graph.input[:]
        new.graph.input.extend(inputs)
    del new.graph.output[:]
    new.graph.output.extend(old.graph.output)


def _publish(staging: Path, out: Path) -> None:
    """Move the staged model (data file first, then the .onnx) into place."""
    model_file = staging / out.name
    try:
        for item in sorted(staging.iterdir(), key=lambda p: p == model_file):
            os.replace(item, out.parent / item.name)
    except OSError as exc:
        raise UserError(f"{out}: cannot write ({exc.strerror})") from None


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and os.path.samefile(a, b))
    except OSError:
        return False
