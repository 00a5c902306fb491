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
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from lc_onnx.errors import UserError, VerificationError
from lc_onnx.graph import rewrite
from lc_onnx.graph.algebra import ChannelAffine
from lc_onnx.graph.constants import Constants
from lc_onnx.graph.decide import Collapse, Options, Skip, decide
from lc_onnx.graph.reasons import Kind
from lc_onnx.graph.report import Report, SiteReport, Verification
from lc_onnx.graph.sites import SiteFinder
from lc_onnx.graph.verify import compare
from lc_onnx.model import files, io, macs, runtime, shapes
from lc_onnx.model.protos import dims_of

log = logging.getLogger(__name__)

MAX_ROUNDS = 16
# Relative L2 error an exact collapse stays within (float rounding), by the outputs' element type.
EXACT_TOLERANCE = {onnx.TensorProto.FLOAT: 1e-5, onnx.TensorProto.DOUBLE: 1e-12}


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
    """Outcome of the graph rounds: the new proto (None if unchanged) and one report entry per site."""

    proto: onnx.ModelProto | None
    sites: list[SiteReport]


def fuse(
    model: str | os.PathLike | onnx.ModelProto,
    *,
    output: str | os.PathLike | None = None,
    threshold: float = 0.05,
    max_error: float = 1e-2,
    max_abs_error: float | None = None,
    verify: bool = True,
    allow_growth: bool = False,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    feeds: Iterable[Mapping[str, np.ndarray]] | None = None,
    fits: Mapping[str, ChannelAffine] | None = None,
) -> FuseResult:
    """Collapse every qualifying Linear -> linear activation -> Linear of `model` and verify the result.

    Args:
        model: a path to an `.onnx` file (its external data stays on disk) or an in-memory `ModelProto`.
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

    Raises:
        UserError: the model cannot be read or written, or the options do not fit it.
        VerificationError: the fused model deviates more than `max_error` (nothing is written).
    """
    start = time.perf_counter()
    if threshold < 0 or max_error < 0 or (max_abs_error is not None and max_abs_error < 0):
        raise UserError(
            "{threshold}, {max_error} and {max_abs_error} must be >= 0",
            params=["threshold", "max_error", "max_abs_error"],
        )
    loaded = io.as_loaded(model)
    out_path = Path(output) if output is not None else None
    if out_path is not None and loaded.path is not None and _same_file(out_path, loaded.path):
        raise UserError(f"{out_path}: output would overwrite the input model; choose another path")

    options = Options(threshold=threshold, allow_growth=allow_growth, fits=fits)
    rewritten = collapse_graph(loaded, options)
    fused = (
        io.LoadedModel(rewritten.proto, loaded.base_dir, source_external=loaded.source_external)
        if rewritten.proto is not None
        else loaded
    )

    shapes = runtime.input_shapes(loaded.proto, input_shapes)
    feed_list = [dict(f) for f in feeds] if feeds is not None else None
    if feed_list is not None and not feed_list:
        raise UserError("no verification feeds given (the data is empty)")
    if verify and rewritten.proto is not None and feed_list is None:
        feed_list = [runtime.random_feeds(loaded.proto, shapes, seed=0)]
    # Counting needs dims only: work on data-free skeletons.
    before, after = io.skeleton(loaded.proto), io.skeleton(fused.proto)
    report = Report(
        sites=rewritten.sites,
        params_before=macs.count_params(before),
        params_after=macs.count_params(after),
        macs_before=macs.count_macs(before, shapes),
        macs_after=macs.count_macs(after, shapes),
        verification=Verification(note="model unchanged: nothing collapsed"),
    )
    original_source = _session_source(loaded)
    changed = rewritten.proto is not None

    with contextlib.ExitStack() as stack:
        staging = staged = None
        if out_path is not None or (changed and fused.has_external_data and verify):
            parent = out_path.parent if out_path is not None else None
            if parent is not None and not parent.is_dir():
                raise UserError(f"{out_path}: directory {parent} does not exist")
            staging = Path(stack.enter_context(files.staging_dir(parent)))
            staged = staging / (out_path.name if out_path is not None else "model.onnx")
            io.save(fused, staged)
            # The weights now live in files; drop the in-memory copies before onnxruntime loads both models.
            loaded.proto = before
            fused = rewritten = None
        if changed and verify:
            fused_source = str(staged) if staged is not None else fused.proto.SerializeToString()
            report.verification = compare(original_source, fused_source, feed_list)
        elif changed:
            report.verification = Verification(note="verification disabled")
        report.seconds = time.perf_counter() - start
        verification = report.verification
        breach = verification.breach(max_error, max_abs_error)
        if breach is not None:
            raise VerificationError(f"fused model differs from the original: {breach}; nothing written")
        if changed and all(s.reason_kind == Kind.EXACT for s in report.collapsed):
            _check_rounding(verification, before)
        if out_path is not None:
            _publish(staging, out_path)
            return FuseResult(None, report, path=out_path)
        model_out = io.load_model(staged) if staged is not None else fused.proto
    return FuseResult(model_out, report)


def _check_rounding(verification: Verification, model: onnx.ModelProto) -> None:
    """Warn when an exact collapse is further from the original than float rounding explains."""
    types = {o.name: o.type.tensor_type.elem_type for o in model.graph.output}
    for name, error in verification.outputs.items():
        tolerance = EXACT_TOLERANCE.get(types.get(name))  # fp16/bf16 rounding depends on the values
        if tolerance is not None and error.rel_l2 > tolerance:
            log.warning(
                "exact collapse but relative L2 error %.3g (> %g) on %r", error.rel_l2, tolerance, name
            )


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


def collapse_graph(loaded: io.LoadedModel, options: Options) -> Rewritten:
    """Run find/decide/rewrite rounds on a copy of the graph; the input proto is not modified."""
    proto = loaded.proto
    finder = site_finder(loaded)
    graph, constants = finder.graph, finder.constants
    reports: list[SiteReport] = []
    skipped: list[SiteReport] = []
    changed = False
    for _ in range(MAX_ROUNDS):
        decisions = decide(list(finder.sites()), constants, options)
        collapses = [d for d in decisions if isinstance(d, Collapse)]
        skipped = [_skip_report(d, constants) for d in decisions if isinstance(d, Skip)]
        if not collapses:
            break
        reports += [_collapse_report(c, constants) for c in collapses]
        rewrite.apply(graph, collapses, constants)
        changed = True
    if not changed:
        return Rewritten(None, skipped)
    new = gs.export_onnx(graph, do_type_check=False)
    _restore_model_fields(new, proto)
    rewrite.restore_sparse(new, proto)
    return Rewritten(new, reports + skipped)


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


def _collapse_report(c: Collapse, constants: Constants) -> SiteReport:
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


def _session_source(loaded: io.LoadedModel) -> str | bytes:
    if loaded.path is not None:
        return str(loaded.path)
    return loaded.proto.SerializeToString()


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
