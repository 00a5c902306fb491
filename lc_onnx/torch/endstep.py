"""The end of every fine-tuning recipe: export, collapse in torch, fuse the export, write the results.

The export is taken *before* the torch collapse, so the graph pass (`lc_onnx.fuse`) collapses the same
blocks in the ONNX graph, verified in onnxruntime on real inputs (slopes within the threshold, not
exactly 1, make the fused model differ from the export a little, and random inputs would not say by how
much in use). `fuse` writes `model.collapsed.onnx` itself: the fused model is verified from disk and
large weights may be stored as external data, which onnxruntime then reads from the path.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from lc_onnx.graph.report import Report
from lc_onnx.model import files, io
from lc_onnx.torch import collapsible
from lc_onnx.torch.checkpoint import Structure, save_checkpoint
from lc_onnx.torch.evaluate import count_params
from lc_onnx.torch.export import export_onnx

CHECKPOINT = "checkpoint.pt"


@dataclass
class Fused:
    """What `export_collapse_fuse` did."""

    onnx_path: Path
    fused_path: Path
    steps: list[tuple[str, str]]  # the torch collapse's (fc1, fc2) names, in order
    collapsed_at_end: list[str]  # activation names of the PReLU blocks the torch collapse removed
    report: Report  # the graph pass's


def export_collapse_fuse(
    model: nn.Module,
    example: Any,
    out: Path,
    *,
    threshold: float,
    max_error: float,
    feeds: Sequence[Mapping[str, np.ndarray]],
    input_shapes: Mapping[str, Sequence[int]],
    only: Collection[str] | None = None,
    dynamic_sequence: bool = False,
) -> Fused:
    """Export `model` (eval mode) to `out/model.onnx`, collapse its linear blocks in torch (`only` these
    activation names, when given), and fuse the export into `out/model.collapsed.onnx`, verified on
    `feeds` within `max_error` (entries for inputs the export does not have are left out);
    `input_shapes` are those of the report's MACs (one example)."""
    import lc_onnx

    model.eval()
    onnx_path = export_onnx(
        model, example, out / "model.onnx", dynamo=True, dynamic_sequence=dynamic_sequence
    )
    prelu_before = [b.name for b in collapsible.prelu_blocks(model)]
    steps = collapsible.collapse_steps(model, threshold, only=only)
    remaining = {b.name for b in collapsible.find_blocks(model)}
    fused_path = out / "model.collapsed.onnx"
    # The exporter drops inputs the forward does not read (a `token_type_ids` of zeros, say).
    kept = {i.name for i in io.load(onnx_path).proto.graph.input}
    result = lc_onnx.fuse(
        onnx_path,
        output=fused_path,
        threshold=threshold,
        max_error=max_error,
        input_shapes={k: v for k, v in input_shapes.items() if k in kept},
        feeds=[{k: v for k, v in feed.items() if k in kept} for feed in feeds],
    )
    collapsed_at_end = [name for name in prelu_before if name not in remaining]
    return Fused(onnx_path, fused_path, steps, collapsed_at_end, result.report)


def sizes(fused: Fused, model: nn.Module, **torch_params: int) -> dict[str, Any]:
    """The report's `params` (the given torch counts, the model's after the collapse, the ONNX graph's
    before and after the pass) and `macs` (per example, in the ONNX graph) blocks."""
    return {
        "params": {
            **torch_params,
            "after_collapse_torch": count_params(model),
            "onnx_before_fuse": fused.report.params_before,
            "onnx_after_fuse": fused.report.params_after,
        },
        "macs": {"onnx_before_fuse": fused.report.macs_before, "onnx_after_fuse": fused.report.macs_after},
    }


def config_dict(cfg) -> dict[str, Any]:
    """A config dataclass as JSON values (paths as text)."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()}


def write(out: Path, report: Mapping[str, Any], model: nn.Module, steps: Sequence[str], epoch: int) -> None:
    """`out/report.json` and the checkpoint of the collapsed model (`steps`: every fc1 collapsed, in order)."""
    files.write_text(out / "report.json", json.dumps(report, indent=2) + "\n")
    save_checkpoint(out / CHECKPOINT, model, Structure.of(model, steps), epoch=epoch)
