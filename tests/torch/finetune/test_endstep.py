"""The report's `blocks` block, built once (`endstep.blocks_report`) for both objectives, and the per-epoch
files."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("timm")

from torch import nn  # noqa: E402

from lc_onnx.torch import find_blocks, make_collapsible  # noqa: E402
from lc_onnx.torch.blocks import collapsible  # noqa: E402
from lc_onnx.torch.blocks.checkpoint import load_checkpoint  # noqa: E402
from lc_onnx.torch.finetune import endstep  # noqa: E402
from tests.torch import nets  # noqa: E402

DURING = ["earlier.act"]  # a block collapsed during training (gone from the model)


def collapsed_at_the_end() -> tuple[nn.Module, endstep.Fused]:
    """A VGG head whose output-side block is a PReLU at slope 1 and whose input-side block's activation is
    a LeakyReLU of slope 1 (linear, but no PReLU), collapsed in torch as `export_collapse_fuse` does,
    with a stand-in for the graph pass's report."""
    model = nets.vgg().eval()
    model.classifier[1] = nn.LeakyReLU(1.0)
    make_collapsible(model, 0.5, init=1.0)
    blocks_before = len(find_blocks(model))
    prelu_before = [b.name for b in collapsible.prelu_blocks(model)]
    steps = collapsible.collapse_steps(model, 0.05)
    remaining = {b.name for b in find_blocks(model)}
    at_end = [name for name in prelu_before if name not in remaining]
    report = SimpleNamespace(collapsed=["site"])
    return model, endstep.Fused(
        Path("m.onnx"), Path("m.collapsed.onnx"), blocks_before, steps, at_end, report
    )


def test_labels_layout_is_the_one_report_json_always_had():
    model, fused = collapsed_at_the_end()
    assert len(fused.steps) == 2 and fused.collapsed_at_end == ["classifier.5"]
    # as the labelled objective's end step wrote it by hand before `blocks_report`
    before = {
        "total": fused.blocks_before + len(DURING),
        "collapsed": len(DURING) + len(fused.steps),
        "collapsed_during_training": DURING,
        "collapsed_at_end": fused.collapsed_at_end,
        "collapsed_by_graph_pass": len(fused.report.collapsed),
        "not_collapsed": collapsible.slopes(model),
        "refused": [r.to_dict() for r in collapsible.refusals(model)],
    }
    got = endstep.blocks_report(model, fused, DURING)
    assert json.dumps(got, indent=2) == json.dumps(before, indent=2)
    assert (got["total"], got["collapsed"]) == (3, 3)  # every torch collapse step counts


def test_distill_layout_is_the_one_report_json_always_had():
    model, fused = collapsed_at_the_end()
    targets, snapped = ["classifier.5"], {"classifier.5": 0.2}
    # as the distillation objective's end step wrote it by hand before `blocks_report`
    before = {
        "total": fused.blocks_before + len(DURING),
        "targeted": len(targets),
        "collapsed": len(DURING) + len(fused.collapsed_at_end),
        "collapsed_during_training": DURING,
        "collapsed_at_end": fused.collapsed_at_end,
        "snapped": snapped,
        "not_collapsed": collapsible.slopes(model),
        "collapsed_by_graph_pass": len(fused.report.collapsed),
        "refused": [r.to_dict() for r in collapsible.refusals(model)],
    }
    got = endstep.blocks_report(model, fused, DURING, targeted=targets, snapped=snapped)
    assert json.dumps(got, indent=2) == json.dumps(before, indent=2)
    assert (got["total"], got["collapsed"]) == (3, 2)  # the PReLU blocks the torch collapse removed
    assert endstep.blocks_report(model, fused, DURING, targeted=targets)["snapped"] == {}


def test_epoch_files_start_empty_and_keep_one_line_and_a_checkpoint_per_epoch(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / endstep.METRICS).write_text("left over\n")
    model = nets.vgg()
    make_collapsible(model, 1.0, init=1.0)
    files = endstep.EpochFiles(out)
    assert (out / endstep.METRICS).read_text() == ""
    files.epoch({"epoch": 1, "train_loss": 0.5}, model, [])
    steps = [fc1 for fc1, _ in collapsible.collapse_steps(model, 0.05)]
    files.epoch({"epoch": 2, "train_loss": 0.25}, model, steps)
    rows = [json.loads(line) for line in (out / endstep.METRICS).read_text().splitlines()]
    assert rows == [{"epoch": 1, "train_loss": 0.5}, {"epoch": 2, "train_loss": 0.25}]
    fresh = nets.vgg()
    payload = load_checkpoint(out / endstep.CHECKPOINT, fresh)
    assert payload["epoch"] == 2 and payload["structure"]["collapsed"] == steps
    assert find_blocks(fresh) == []
