"""The files of every fine-tuning objective: each epoch's, and the end step that exports, collapses in
torch, fuses the export and writes the results.

During training rank 0 appends one JSON line per epoch to `metrics.jsonl` and saves `checkpoint.pt`
(`EpochFiles`). At the end the export is taken *before* the torch collapse, so the graph pass
(`lc_onnx.fuse`) collapses the same blocks in the ONNX graph, verified in onnxruntime on real inputs
(slopes within the threshold, not exactly 1, make the fused model differ from the export a little, and
random inputs would not say by how much in use). `fuse` writes `model.collapsed.onnx` itself: the fused
model is verified from disk and large weights may be stored as external data, which onnxruntime then
reads from the path. `report.json`'s `blocks`, `params` and `macs` blocks are built here for both
objectives (`blocks_report`, `sizes`).
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
from lc_onnx.torch.blocks import collapsible
from lc_onnx.torch.blocks.checkpoint import Structure, save_checkpoint
from lc_onnx.torch.blocks.export import export_onnx
from lc_onnx.torch.finetune.config import FinetuneConfig
from lc_onnx.torch.finetune.evaluate import count_params

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"


class EpochFiles:
    """Rank 0's files in the output directory during training: `metrics.jsonl` (emptied at the start, one
    JSON line per epoch) and `checkpoint.pt` (after every epoch)."""

    def __init__(self, out: Path) -> None:
        out.mkdir(parents=True, exist_ok=True)
        self.out = out
        self.metrics = out / METRICS
        self.metrics.write_text("")

    def epoch(self, row: Mapping[str, Any], model: nn.Module, steps: Sequence[str]) -> None:
        """Append the metrics `row` and save the checkpoint (`steps`: the fc1 names collapsed so far)."""
        with self.metrics.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        save_checkpoint(self.out / CHECKPOINT, model, Structure.of(model, steps), epoch=row["epoch"])


@dataclass
class Fused:
    """What `export_collapse_fuse` did."""

    onnx_path: Path
    fused_path: Path
    blocks_before: int  # the collapsible blocks the model had before the torch collapse
    steps: list[tuple[str, str]]  # the torch collapse's (fc1, fc2) names, in order
    collapsed_at_end: list[str]  # activation names of the PReLU blocks the torch collapse removed
    report: Report  # the graph pass's


def export_collapse_fuse(
    cfg: FinetuneConfig,
    model: nn.Module,
    example: Any,
    *,
    feeds: Sequence[Mapping[str, np.ndarray]],
    input_shapes: Mapping[str, Sequence[int]],
    only: Collection[str] | None = None,
    dynamic_sequence: bool = False,
) -> Fused:
    """Export `model` (eval mode) to `cfg.out/model.onnx`, collapse its linear blocks in torch (`only`
    these activation names, when given; slopes within `cfg.threshold`), and fuse the export into
    `cfg.out/model.collapsed.onnx`, verified on `feeds` within `cfg.max_error` (entries for inputs the
    export does not have are left out);
    `input_shapes` are those of the report's MACs (one example)."""
    import lc_onnx

    model.eval()
    blocks_before = len(collapsible.find_blocks(model))
    onnx_path = export_onnx(
        model, example, cfg.out / "model.onnx", dynamo=True, dynamic_sequence=dynamic_sequence
    )
    prelu_before = [b.name for b in collapsible.prelu_blocks(model)]
    steps = collapsible.collapse_steps(model, cfg.threshold, only=only)
    remaining = {b.name for b in collapsible.find_blocks(model)}
    fused_path = cfg.out / "model.collapsed.onnx"
    # The exporter drops inputs the forward does not read (a `token_type_ids` of zeros, say).
    kept = {i.name for i in io.load(onnx_path).proto.graph.input}
    result = lc_onnx.fuse(
        onnx_path,
        output=fused_path,
        threshold=cfg.threshold,
        max_error=cfg.max_error,
        input_shapes={k: v for k, v in input_shapes.items() if k in kept},
        feeds=[{k: v for k, v in feed.items() if k in kept} for feed in feeds],
    )
    collapsed_at_end = [name for name in prelu_before if name not in remaining]
    return Fused(onnx_path, fused_path, blocks_before, steps, collapsed_at_end, result.report)


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


def blocks_report(
    model: nn.Module,
    fused: Fused,
    collapsed_during_training: Sequence[str],
    *,
    targeted: Sequence[str] | None = None,
    snapped: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """The report's `blocks` block, after `export_collapse_fuse`.

    Args:
        model: the model after the torch collapse.
        fused: what `export_collapse_fuse` did.
        collapsed_during_training: activation names of the blocks collapsed during training, in order.
        targeted: activation names of every targeted block when the end collapse took only those
            (`distill`); None when it took every linear block (`labels`).
        snapped: activation name -> the largest |slope - 1| of each block whose slopes were set to 1 at
            the end (`distill`, given with `targeted`).

    Returns:
        `total`, `collapsed` (during training and at the end), the blocks collapsed during training and at
        the end, the graph pass's count, the slopes of the blocks `not_collapsed` and the `refused` ones;
        with `targeted`, also `targeted` (a count) and `snapped`. Both layouts keep the key order and
        counts of earlier `report.json` files: at the end, `labels` counts every torch collapse step,
        `distill` the PReLU blocks the collapse removed.
    """
    during = list(collapsed_during_training)
    report: dict[str, Any] = {"total": fused.blocks_before + len(during)}
    if targeted is not None:
        report["targeted"] = len(targeted)
    at_end = fused.steps if targeted is None else fused.collapsed_at_end
    report["collapsed"] = len(during) + len(at_end)
    report["collapsed_during_training"] = during
    report["collapsed_at_end"] = fused.collapsed_at_end
    by_graph_pass = {"collapsed_by_graph_pass": len(fused.report.collapsed)}
    not_collapsed = {"not_collapsed": collapsible.slopes(model)}
    if targeted is None:
        report.update({**by_graph_pass, **not_collapsed})
    else:
        report["snapped"] = dict(snapped or {})
        report.update({**not_collapsed, **by_graph_pass})
    report["refused"] = [r.to_dict() for r in collapsible.refusals(model)]
    return report


def config_dict(cfg: FinetuneConfig) -> dict[str, Any]:
    """`cfg` as JSON values (paths as text): the report's `config` block."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()}


def write(out: Path, report: Mapping[str, Any], model: nn.Module, steps: Sequence[str], epoch: int) -> None:
    """`out/report.json` and the checkpoint of the collapsed model (`steps`: every fc1 collapsed, in order)."""
    files.write_text(out / "report.json", json.dumps(report, indent=2) + "\n")
    save_checkpoint(out / CHECKPOINT, model, Structure.of(model, steps), epoch=epoch)
