"""The labelled objective of `lc-onnx finetune`: task loss + λ·`collapse_penalty`, collapsing blocks as
they become linear.

Labelled images (digits or an ImageFolder), cross-entropy. Stage by stage (`schedule`), the targeted
MLP blocks get PReLU activations; after every epoch but the last, the targeted blocks whose slopes are
within `threshold` of 1 are collapsed into one Linear (and leave the model's trainable parameters), so
the following epochs train the collapsed model. After the last epoch the model is exported, the
remaining linear blocks are collapsed in torch and, in the export, by the graph pass (`lc_onnx.fuse`;
see `endstep`). Blocks still not linear at the end stay PReLUs (and `report.json` says so). With
`max_drop`, the depth is searched instead (`adaptive`), measured by test accuracy.

Runs on every process of the run (`run`'s `finetune` starts them; see `loop`). Only rank 0 writes files:
`metrics.jsonl` and `checkpoint.pt` after every epoch, then `model.onnx`, `model.collapsed.onnx` and
`report.json`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from lc_onnx.errors import UserError
from lc_onnx.torch.blocks import collapsible
from lc_onnx.torch.blocks.checkpoint import load_checkpoint
from lc_onnx.torch.data import datasets
from lc_onnx.torch.finetune import adaptive, endstep
from lc_onnx.torch.finetune.config import FinetuneConfig
from lc_onnx.torch.finetune.evaluate import accuracy, count_params, onnx_predict, torch_predict
from lc_onnx.torch.finetune.loop import Dist, LossFn, Trainer, labelled, slope_metrics
from lc_onnx.torch.finetune.schedule import Collapser, CollapseResult
from lc_onnx.torch.models import builders

logger = logging.getLogger(__name__)

VERIFY_IMAGES = 64


@dataclass
class Training:
    """What the epochs leave for the end step."""

    accuracy_start: float
    params_start: int
    steps: list[str]  # fc1 names collapsed so far, in order (a checkpoint's `Structure.collapsed`)
    collapsed: list[str]  # activation names of the blocks collapsed during training
    seconds: float


def run(cfg: FinetuneConfig, ctx: Dist) -> dict[str, Any]:
    """The labelled objective for the resolved and checked `cfg` on this process.

    Returns:
        The report (rank 0; the content of `report.json`) or {} (other ranks).

    Raises:
        UserError: naming `model`, `dataset` or `checkpoint` when they cannot be loaded, or a model
            without a collapsible MLP block.
    """
    started = time.perf_counter()
    torch.manual_seed(cfg.seed)
    image = builders.image_format(cfg.model, cfg.img_size, cfg.model_kwargs)
    splits = datasets.load(cfg.dataset, image)
    model, steps = _build(cfg, splits, image.size)
    model.to(ctx.device)
    collapser = Collapser(model, cfg.fractions, threshold=cfg.threshold, init=cfg.init, steps=steps)
    if not collapser.schedule.blocks:
        refused = collapsible.refusals(model)
        why = f" ({len(refused)} refused, e.g. {refused[0]})" if refused else ""
        raise UserError(f"{{model}} {cfg.model}: no collapsible MLP block found{why}", params=["model"])
    outputs = endstep.EpochFiles(cfg.out) if ctx.main else None
    if cfg.max_drop is not None:
        return _adaptive(cfg, model, splits, ctx, outputs, started)
    collapser.start()
    accuracy_start, params_start = _test_accuracy(model, splits.test, ctx), count_params(model)
    trainer = _trainer(cfg, model, splits, ctx)
    for epoch in range(1, cfg.epochs + 1):
        row = {"epoch": epoch, **trainer.train(epoch - 1, cfg.epochs)}
        row.update(_epoch_metrics(model, splits.test, ctx))
        # Slopes are identical on every rank (DDP keeps parameters in sync), so every rank collapses the
        # same blocks and the module trees stay equal without communication. After the last epoch the
        # collapse is left to `_finish`, which measures the model before and after it and has the graph
        # pass collapse the same blocks in the export.
        done = collapser.collapse() if epoch < cfg.epochs else None
        if done is not None:
            trainer.rebuild()
            row.update(_collapse_row(done, model, splits.test, ctx))
        row["params"] = count_params(model)
        if outputs is not None:
            outputs.epoch(row, model, collapser.steps)
            _log_epoch(row)
    if outputs is None:
        return {}
    training = Training(
        accuracy_start, params_start, collapser.steps, collapser.collapsed, time.perf_counter() - started
    )
    return _finish(cfg, model, splits, ctx, training)


def _trainer(cfg: FinetuneConfig, model: nn.Module, splits: datasets.Splits, ctx: Dist) -> Trainer:
    return Trainer(
        model,
        ctx,
        splits.train,
        labelled(_penalised_loss(cfg.lam)),
        batch_size=cfg.batch_size,
        **cfg.optimizer_settings(),
    )


def _adaptive(
    cfg: FinetuneConfig,
    model: nn.Module,
    splits: datasets.Splits,
    ctx: Dist,
    outputs: endstep.EpochFiles | None,
    started: float,
) -> dict[str, Any]:
    """`max_drop`: one more block per stage from the output end (`adaptive.deepest`), test accuracy
    within `max_drop` (a fraction) of the unmodified model's."""

    def measure(m: nn.Module) -> float:  # on every rank: each must take the same decision
        return accuracy(torch_predict(m, ctx.device), splits.test) / 100.0

    def train_stage(m: nn.Module, k: int) -> None:
        trainer = _trainer(cfg, m, splits, ctx)
        for epoch in range(1, cfg.epochs + 1):
            row = {"stage": k, "epoch": epoch, **trainer.train(epoch - 1, cfg.epochs)}
            row.update(_epoch_metrics(m, splits.test, ctx))
            row["params"] = count_params(m)
            if outputs is not None:
                outputs.epoch(row, m, [])
                _log_epoch(row)

    accuracy_start, params_start = measure(model), count_params(model)
    model, depth = adaptive.deepest(
        model,
        max(cfg.fractions),
        train_stage=train_stage,
        measure=measure,
        reference=accuracy_start,
        max_drop=cfg.max_drop,
        threshold=cfg.threshold,
        init=cfg.init,
        metric="test_accuracy",
    )
    if outputs is None:
        return {}
    seconds = time.perf_counter() - started
    training = Training(100.0 * accuracy_start, params_start, depth.steps, depth.collapsed, seconds)
    return _finish(cfg, model, splits, ctx, training, {"adaptive": depth.to_dict(cfg.max_drop)})


def _build(cfg: FinetuneConfig, splits: datasets.Splits, img_size: int) -> tuple[nn.Module, list[str]]:
    """The model, loaded from `cfg.checkpoint` when given, and the fc1 names collapsed in it.

    A fresh model's blocks are found by data flow on two test images (`collapsible.discover`); a
    checkpoint brings the blocks it was saved with.
    """
    model = builders.build_model(
        cfg.model, splits.num_classes, img_size, pretrained=cfg.pretrained, kwargs=cfg.model_kwargs
    )
    if cfg.checkpoint is None:
        collapsible.discover(model, (_examples(splits),))
        return model, []
    payload = load_checkpoint(cfg.checkpoint, model)
    return model, list(payload["structure"]["collapsed"])


def _examples(splits: datasets.Splits, n: int = 2) -> torch.Tensor:
    return torch.stack([splits.test[i][0] for i in range(n)])


def _penalised_loss(lam: float) -> LossFn:
    def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(logits, y) + lam * collapsible.collapse_penalty(model)

    return loss_fn


def _test_accuracy(model: nn.Module, test: Dataset, ctx: Dist) -> float | None:
    """Test accuracy, measured on rank 0 only (None elsewhere)."""
    return accuracy(torch_predict(model, ctx.device), test) if ctx.main else None


def _epoch_metrics(model: nn.Module, test: Dataset, ctx: Dist) -> dict[str, Any]:
    """The metrics row's penalty, mean slope per PReLU block and test accuracy after an epoch."""
    return {**slope_metrics(model), "test_acc": _test_accuracy(model, test, ctx)}


def _collapse_row(done: CollapseResult, model: nn.Module, test: Dataset, ctx: Dist) -> dict[str, Any]:
    """The metrics row's record of a collapse: the blocks, the stage it started, the accuracy after it."""
    row: dict[str, Any] = {"collapsed": done.blocks}
    if done.stage is not None:
        row["stage"] = done.stage
    row["test_acc_after_collapse"] = _test_accuracy(model, test, ctx)
    return row


def _log_epoch(row: Mapping[str, Any]) -> None:
    logger.info(
        "epoch %d: loss %.4f test %.2f%% penalty %.4f params %d%s",
        row["epoch"],
        row["train_loss"],
        row["test_acc"],
        row["penalty"],
        row["params"],
        f" collapsed {row['collapsed']}" if "collapsed" in row else "",
    )


def _finish(
    cfg: FinetuneConfig,
    model: nn.Module,
    splits: datasets.Splits,
    ctx: Dist,
    training: Training,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Export, collapse in torch, fuse the export, measure both; write `report.json` and the checkpoint."""
    model.eval()
    acc_before = accuracy(torch_predict(model, ctx.device), splits.test)
    params_before = count_params(model)
    example = _examples(splits).to(ctx.device)
    n = min(VERIFY_IMAGES, len(splits.test))
    fused = endstep.export_collapse_fuse(
        cfg,
        model,
        example,
        feeds=[{"input": torch.stack([splits.test[i][0] for i in range(n)]).numpy()}],
        input_shapes={"input": (1, *example.shape[1:])},
    )
    report = {
        "config": endstep.config_dict(cfg),
        "accuracy": {
            "start": training.accuracy_start,
            "before_collapse": acc_before,
            "after_collapse_torch": accuracy(torch_predict(model, ctx.device), splits.test),
            "after_collapse_onnxruntime": accuracy(onnx_predict(fused.fused_path), splits.test),
        },
        "blocks": endstep.blocks_report(model, fused, training.collapsed),
        **endstep.sizes(fused, model, start=training.params_start, before_collapse=params_before),
        "fuse": fused.report.to_dict(),
        "seconds": training.seconds,
        **(extra or {}),
    }
    endstep.write(cfg.out, report, model, [*training.steps, *(fc1 for fc1, _ in fused.steps)], cfg.epochs)
    return report
