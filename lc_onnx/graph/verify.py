"""Verification: the original and the fused model run in onnxruntime on the same feeds, and the one
error measure every comparison in lc-onnx uses.

The two sessions never live at the same time (the original runs first, its outputs are kept, its session
is dropped), so peak memory is one model's weights plus the outputs. Errors accumulate over all feeds:
`max_abs` is the largest absolute difference, `rel_l2` is `||fused - original|| / ||original||` over all
elements of all feeds, in float64, and `max_ref` the largest |original| value.

Besides the graph outputs, each collapsed site's own output (the tensor its new layer writes, which keeps
its name) is compared (`Probe`): an exact site that is off cannot hide behind an output that saturates.
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from lc_onnx.errors import UserError, VerificationError
from lc_onnx.graph.report import OutputError, Verification
from lc_onnx.model import io, runtime


def measure(pairs: Iterable[tuple[np.ndarray, np.ndarray]]) -> OutputError:
    """`max_abs` and `rel_l2` of `actual` against `expected` over every `(actual, expected)` pair, in
    float64 (`rel_l2` is 0 when both are all zeros and infinite when only `expected` is)."""
    max_abs, max_ref, diff_sq, ref_sq = 0.0, 0.0, 0.0, 0.0
    for actual, expected in pairs:
        ref = np.asarray(expected, dtype=np.float64)
        got = np.asarray(actual, dtype=np.float64)
        if ref.shape != got.shape:
            raise AssertionError(f"compared arrays differ in shape: {got.shape} != {ref.shape}")
        diff = got - ref
        if diff.size:
            max_abs = max(max_abs, float(np.max(np.abs(diff))))
            max_ref = max(max_ref, float(np.max(np.abs(ref))))
        diff_sq += float(np.vdot(diff, diff))
        ref_sq += float(np.vdot(ref, ref))
    rel = math.sqrt(diff_sq / ref_sq) if ref_sq > 0 else (0.0 if diff_sq == 0 else math.inf)
    return OutputError(max_abs=max_abs, rel_l2=rel, max_ref=max_ref)


def output_errors(
    names: Sequence[str],
    expected: Sequence[Mapping[str, np.ndarray]],
    actual: Sequence[Mapping[str, np.ndarray]],
) -> Verification:
    """`measure` per output name over all runs (`expected[i]`, `actual[i]`: one run's outputs)."""
    outputs = {name: measure((a[name], e[name]) for e, a in zip(expected, actual)) for name in names}
    return Verification(outputs=outputs, feeds=len(expected))


@dataclass(frozen=True)
class Probe:
    """A collapsed site, checked on its own: the tensor its new layer writes (`tensor`, which keeps its
    name) computed from the original's value of the site's input (`source`); `site` is the site's index
    in the report."""

    site: int
    tensor: str
    source: str
    elem_type: int


@dataclass(frozen=True)
class Side:
    """One model as onnxruntime gets it: a path, serialized bytes, or a proto whose external tensors
    live in `base_dir`."""

    source: str | bytes | onnx.ModelProto
    base_dir: str | os.PathLike | None = None

    @classmethod
    def of(cls, loaded: io.LoadedModel) -> Side:
        """A loaded model as onnxruntime reads it: from its file, or the proto with its tensors' directory."""
        if loaded.path is not None:
            return cls(str(loaded.path))
        return cls(loaded.proto, loaded.base_dir)

    def copy(self) -> tuple[onnx.ModelProto, str | os.PathLike | None]:
        """A proto of the model to change (large weights stay on disk) and where its tensors live."""
        if isinstance(self.source, onnx.ModelProto):
            proto = onnx.ModelProto()
            proto.CopyFrom(self.source)
            return proto, self.base_dir
        if isinstance(self.source, bytes):
            proto = onnx.ModelProto()
            proto.ParseFromString(self.source)
            return proto, None
        loaded = io.load(self.source)
        return loaded.proto, loaded.base_dir

    @contextlib.contextmanager
    def edited(self, change: Callable[[onnx.ModelProto], None]) -> Iterator[Side]:
        """This model changed by `change` (the model itself is not). A model read from a file is written
        as a hidden temporary file beside it, removed afterwards, so that onnxruntime reads the weights
        from the same data files itself, once (given as memory-mapped arrays it copies them: twice the
        weights in memory); where that directory is not writable, and for a proto, it stays in memory."""
        proto, base = self.copy()
        change(proto)
        if isinstance(self.source, onnx.ModelProto | bytes):
            yield Side(proto, base)
            return
        try:
            handle, name = tempfile.mkstemp(prefix=".lc-onnx-verify-", suffix=".onnx", dir=base)
        except OSError:  # a read-only directory: run from memory
            yield Side(proto, base)
            return
        try:
            with os.fdopen(handle, "wb") as f:
                f.write(proto.SerializeToString())
            yield Side(name)
        finally:
            Path(name).unlink(missing_ok=True)


@dataclass
class Comparison:
    """The graph outputs' errors, each probed site's error, and whether the original's outputs depend on
    the inputs at all (equal on every feed, or every output constant: the check then proves little)."""

    verification: Verification
    probes: dict[str, OutputError] = field(default_factory=dict)
    input_independent: bool = False


def run_all(
    side: Side, feeds: Sequence[Mapping[str, np.ndarray]], *, fused: bool = False, last: bool = False
) -> tuple[list[str], list[dict[str, np.ndarray]]]:
    """Every output of the model for every feed; a run that fails is the input's fault for the original
    (wrong shapes or types in the feeds, an invalid graph) and a failed verification for the fused model.
    The session is gone before the next model loads (`last`: no model loads after it)."""
    session = runtime.session(side.source, base_dir=side.base_dir)
    names = [o.name for o in session.get_outputs()]
    if fused:
        results = [
            runtime.run(session, f, names, what="the fused model", on="the verification inputs",
                        error=VerificationError)
            for f in feeds
        ]  # fmt: skip
    else:
        results = [
            runtime.run(session, f, names, on="the verification inputs", error=UserError) for f in feeds
        ]
    del session
    if not last:
        gc.collect()
    return names, results


def without_padding(
    feed: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray], mask: str | None
) -> dict[str, np.ndarray]:
    """`outputs` at the positions where the feed's `mask` input is not 0, for the outputs whose leading
    dims are the mask's shape (token outputs); the others, and all without a mask, as they are."""
    if mask is None or mask not in feed:
        return dict(outputs)
    keep = np.asarray(feed[mask]) != 0
    return {k: v[keep] if np.shape(v)[: keep.ndim] == keep.shape else v for k, v in outputs.items()}


def compare(
    original: Side,
    fused: Side,
    feeds: Sequence[Mapping[str, np.ndarray]],
    probes: Sequence[Probe] = (),
    padding_mask: str | None = None,
) -> Comparison:
    """Run both models on `feeds` and measure the differences of their outputs (at the positions
    `padding_mask` keeps, see `without_padding`); run each probed site of the fused model on the
    original's value of its input and measure its output against the original's."""
    added: list[str] = []
    tensors = [name for p in probes for name in (p.tensor, p.source)]
    probing = original.edited(lambda proto: added.extend(io.add_outputs(proto, tensors)))
    with probing if probes else contextlib.nullcontext(original) as side:
        names, expected = run_all(side, feeds)
    fused_names, actual = run_all(fused, feeds, fused=True)
    outputs = [n for n in names if n not in added]
    if fused_names != outputs:
        raise AssertionError(f"fused model outputs {fused_names} differ from the original's {outputs}")
    kept = [without_padding(f, e, padding_mask) for f, e in zip(feeds, expected)]
    verification = output_errors(
        outputs, kept, [without_padding(f, a, padding_mask) for f, a in zip(feeds, actual)]
    )
    verification.feed_shapes = {k: list(np.shape(v)) for k, v in feeds[0].items()} if feeds else {}
    if padding_mask is not None and any(padding_mask in f for f in feeds):
        verification.padding_mask = padding_mask
    errors = _site_errors(fused, feeds, expected, probes) if probes else {}
    return Comparison(verification, errors, _input_independent(outputs, kept))


def _site_errors(
    fused: Side,
    feeds: Sequence[Mapping[str, np.ndarray]],
    expected: Sequence[Mapping[str, np.ndarray]],
    probes: Sequence[Probe],
) -> dict[str, OutputError]:
    """Each probed tensor of the fused model, computed from the original's values of the sites' inputs."""
    cuts: dict[str, str] = {}

    def cut(proto: onnx.ModelProto) -> None:
        cuts.update(_cut_at_sources(proto, probes))
        io.add_outputs(proto, [p.tensor for p in probes])

    with fused.edited(cut) as sites:
        site_feeds = [{**f, **{c: e[source] for source, c in cuts.items()}} for f, e in zip(feeds, expected)]
        _, actual = run_all(sites, site_feeds, fused=True, last=True)
    return {p.tensor: measure((a[p.tensor], e[p.tensor]) for e, a in zip(expected, actual)) for p in probes}


_PROBE_DEPTH = 4  # nodes a collapsed layer has at most: MatMul, Add, Reshape (or one Gemm or Conv)


def _cut_at_sources(proto: onnx.ModelProto, probes: Sequence[Probe]) -> dict[str, str]:
    """Make the collapsed layers read their input from a new graph input (one per site input that is not
    a graph input already); returns {site input: the new input's name}."""
    graph = proto.graph
    producers = {out: node for node in graph.node for out in node.output}
    graph_inputs = {v.name for v in graph.input}
    used = set(producers) | graph_inputs
    cuts: dict[str, str] = {}
    for probe in probes:
        if probe.source in graph_inputs:
            continue
        cut = cuts.get(probe.source) or _unique(f"{probe.source}/lc_onnx_site_input", used)
        frontier, depth = [probe.tensor], 0
        while frontier and depth < _PROBE_DEPTH:
            nodes = [producers[t] for t in frontier if t in producers and t != probe.source]
            frontier = []
            for node in nodes:
                for i, name in enumerate(node.input):
                    if name == probe.source:
                        node.input[i] = cut
                        cuts[probe.source] = cut
                    elif name in producers:
                        frontier.append(name)
            depth += 1
    for source, cut in cuts.items():
        elem = next(p.elem_type for p in probes if p.source == source)
        graph.input.append(onnx.helper.make_tensor_value_info(cut, elem, None))
    return cuts


def _unique(name: str, used: set[str]) -> str:
    candidate, k = name, 1
    while candidate in used:
        k += 1
        candidate = f"{name}_{k}"
    used.add(candidate)
    return candidate


def _input_independent(names: Sequence[str], runs: Sequence[Mapping[str, np.ndarray]]) -> bool:
    """The outputs are the same on every feed, or every output holds one value throughout."""
    same = len(runs) > 1 and all(np.array_equal(runs[0][n], run[n]) for run in runs[1:] for n in names)
    constant = all(np.all(run[n] == run[n].flat[0]) for run in runs for n in names if np.size(run[n]))
    return bool(names) and (same or constant)
