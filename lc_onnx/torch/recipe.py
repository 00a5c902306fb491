"""LayerCollapse fine-tuning: task loss + λ·`collapse_penalty`, collapsing blocks as they become linear.

The recipe behind `lc-onnx finetune`. Stage by stage (`schedule`), the targeted MLP blocks get PReLU
activations; after every epoch but the last, the targeted blocks whose slopes are within `threshold` of
1 are collapsed into one Linear (and leave the model's trainable parameters), so the following epochs
train the collapsed model. After the last epoch the model is exported, the remaining linear blocks are
collapsed in torch and, in the export, by the graph pass (`lc_onnx.fuse`). Blocks still not linear at the
end stay PReLUs (and `report.json` says so).

One process per device, or several under `torchrun` (see `loop`). Only rank 0 writes files:
`metrics.jsonl` and `checkpoint.pt` after every epoch, then `model.onnx`, `model.collapsed.onnx` and
`report.json`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from lc_onnx.errors import UserError
from lc_onnx.torch import adaptive, collapsible, data, endstep, hf, models, posttrain
from lc_onnx.torch.checkpoint import Structure, load_checkpoint, save_checkpoint
from lc_onnx.torch.evaluate import accuracy, count_params, onnx_predict, torch_predict
from lc_onnx.torch.loop import Dist, LossFn, Trainer, distributed, labelled, slope_metrics
from lc_onnx.torch.schedule import Collapsed, Collapser

logger = logging.getLogger(__name__)

CHECKPOINT = endstep.CHECKPOINT
METRICS = "metrics.jsonl"
VERIFY_IMAGES = 64


@dataclass
class FinetuneConfig:
    """Everything one `lc-onnx finetune` run depends on (written into `report.json`)."""

    model: str
    out: Path
    dataset: str | None = None  # None: digits, unless `data` gives the feeds
    fractions: Sequence[float] = (0.5,)
    lam: float | None = None
    epochs: int = 10
    threshold: float = 0.05
    pretrained: bool = False
    img_size: int = 16
    seed: int = 0
    batch_size: int | None = None
    lr: float | None = None
    slope_lr: float | None = None
    weight_decay: float | None = None
    init: float | None = None
    max_error: float = 0.05
    model_kwargs: Mapping[str, Any] = field(default_factory=dict)
    checkpoint: Path | None = None
    progress: bool = True
    objective: str | None = None  # `labels` or `distill`; None: `distill` for text: and data, else labels
    data: str | None = None  # FILE.py:FN yielding feeds (distill)
    distill_loss: str | None = None  # None: `cosine+mse` for hidden states, `kl` for logits
    temperature: float = 1.0
    max_length: int = 128
    snap: bool = True
    max_drop: float | None = None


OBJECTIVES = ("labels", "distill")
# Per objective, the settings left None. Training from scratch (labels) wants AdamW at 1e-3. A pretrained
# transformer distilled into itself moves less: 2e-4, with weight decay low so the pretrained weights are
# not pulled towards 0 (all-MiniLM-L6-v2, last 3 of 6 FFNs, 2 epochs: held-out cosine 0.817 at 1e-4 and
# 0.866 at 2e-4; after one epoch 0.69 / 0.78 / 0.83 at 5e-5 / 1e-4 / 2e-4). Its penalty weight is 10:
# the distillation loss pulls a slope back towards the GELU it replaces with a gradient of about 1 near
# slope 1 (measured on MiniLM), so at λ = 1 the slopes settle far from 1 (0.14 to 0.34 after an epoch,
# and snapping them destroyed the model), while at 10 they reach the threshold within the first epoch and
# the rest of the training repairs the collapsed model.
DEFAULTS = {
    "labels": {"lr": 1e-3, "slope_lr": 3e-2, "weight_decay": 0.05, "batch_size": 64, "lam": 1.0},
    "distill": {"lr": 2e-4, "slope_lr": 2e-2, "weight_decay": 0.01, "batch_size": 32, "lam": 10.0},
}


def resolve(cfg: FinetuneConfig) -> FinetuneConfig:
    """`cfg` with the objective and every setting left None filled in (see `DEFAULTS`)."""
    if cfg.data is not None and cfg.dataset is not None:
        raise UserError("give {dataset} or {data}, not both", params=["dataset", "data"])
    dataset = cfg.dataset if cfg.dataset is not None or cfg.data is not None else "digits"
    objective = cfg.objective
    if objective is None:
        objective = "distill" if cfg.data is not None or dataset.startswith(posttrain.TEXT) else "labels"
    if objective not in OBJECTIVES:
        raise UserError(
            f"{{objective}} {objective!r}: choose from {', '.join(OBJECTIVES)}", params=["objective"]
        )
    filled = {k: v for k, v in DEFAULTS[objective].items() if getattr(cfg, k) is None}
    return replace(cfg, dataset=dataset, objective=objective, **filled)


@dataclass
class Training:
    """What the epochs leave for the end step."""

    accuracy_start: float
    params_start: int
    steps: list[str]  # fc1 names collapsed so far, in order (a checkpoint's `Structure.collapsed`)
    collapsed: list[str]  # activation names of the blocks collapsed during training
    seconds: float


def finetune(cfg: FinetuneConfig) -> dict[str, Any]:
    """Run the whole recipe; rank 0 writes `cfg.out/{model.onnx, model.collapsed.onnx, report.json, ...}`.

    Returns:
        The report (same content as `report.json`; empty dict on ranks other than 0).

    Raises:
        UserError: a bad setting (naming the `FinetuneConfig` field), model, dataset or checkpoint.
    """
    cfg = resolve(cfg)
    check_config(cfg)
    if not cfg.progress:
        hf.hide_progress()
    with distributed() as ctx:
        if cfg.objective == "distill":
            # The output directory is made once the model and data have loaded (nothing half-written).
            return posttrain.run(cfg, ctx, (lambda: _Outputs(cfg.out).epoch) if ctx.main else None)
        return _finetune(cfg, ctx)


def check_config(cfg: FinetuneConfig) -> None:
    """Refuse settings the recipe cannot run with (before anything is loaded or written)."""
    for f in cfg.fractions:
        if not 0.0 <= f <= 1.0:
            raise UserError(f"{{fractions}} {f}: must be in [0, 1]", params=["fractions"])
    if list(cfg.fractions) != sorted(cfg.fractions):
        raise UserError(
            f"{{fractions}} {' '.join(map(str, cfg.fractions))}: give fractions in increasing order",
            params=["fractions"],
        )
    if cfg.epochs < 1:
        raise UserError(f"{{epochs}} {cfg.epochs}: must be at least 1", params=["epochs"])
    if cfg.objective == "labels" and (cfg.data is not None or cfg.dataset.startswith(posttrain.TEXT)):
        raise UserError(
            "{objective} labels needs a labelled image dataset (digits or an ImageFolder); "
            "text: and {data} have no labels (use distill)",
            params=["objective", "data"],
        )
    if cfg.max_drop is not None and not 0.0 <= cfg.max_drop <= 1.0:
        raise UserError(f"{{max_drop}} {cfg.max_drop}: must be in [0, 1]", params=["max_drop"])
    if cfg.max_length < 2:
        raise UserError(f"{{max_length}} {cfg.max_length}: must be at least 2", params=["max_length"])
    if cfg.objective == "distill" and cfg.checkpoint is not None:
        raise UserError("{checkpoint} is for {objective} labels", params=["checkpoint", "objective"])


def _finetune(cfg: FinetuneConfig, ctx: Dist) -> dict[str, Any]:
    started = time.perf_counter()
    torch.manual_seed(cfg.seed)
    image = models.image_format(cfg.model, cfg.img_size, cfg.model_kwargs)
    splits = data.load(cfg.dataset, image)
    model, steps = _build(cfg, splits, image.size)
    model.to(ctx.device)
    collapser = Collapser(model, cfg.fractions, threshold=cfg.threshold, init=cfg.init, steps=steps)
    if not collapser.schedule.blocks:
        refused = collapsible.refusals(model)
        why = f" ({len(refused)} refused, e.g. {refused[0]})" if refused else ""
        raise UserError(f"{{model}} {cfg.model}: no collapsible MLP block found{why}", params=["model"])
    outputs = _Outputs(cfg.out) if ctx.main else None
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


def _trainer(cfg: FinetuneConfig, model: nn.Module, splits: data.Splits, ctx: Dist) -> Trainer:
    return Trainer(
        model,
        ctx,
        splits.train,
        labelled(_penalised_loss(cfg.lam)),
        lr=cfg.lr,
        slope_lr=cfg.slope_lr,
        weight_decay=cfg.weight_decay,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        progress=cfg.progress,
    )


def _adaptive(
    cfg: FinetuneConfig,
    model: nn.Module,
    splits: data.Splits,
    ctx: Dist,
    outputs: _Outputs | None,
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


def _build(cfg: FinetuneConfig, splits: data.Splits, img_size: int) -> tuple[nn.Module, list[str]]:
    """The model, loaded from `cfg.checkpoint` when given, and the fc1 names collapsed in it.

    A fresh model's blocks are found by data flow on two test images (`collapsible.discover`); a
    checkpoint brings the blocks it was saved with.
    """
    model = models.build_model(
        cfg.model, splits.num_classes, img_size, pretrained=cfg.pretrained, kwargs=cfg.model_kwargs
    )
    if cfg.checkpoint is None:
        collapsible.discover(model, (_examples(splits),))
        return model, []
    payload = load_checkpoint(cfg.checkpoint, model)
    return model, list(payload["structure"]["collapsed"])


def _examples(splits: data.Splits, n: int = 2) -> torch.Tensor:
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


def _collapse_row(done: Collapsed, model: nn.Module, test: Dataset, ctx: Dist) -> dict[str, Any]:
    """The metrics row's record of a collapse: the blocks, the stage it started, the accuracy after it."""
    row: dict[str, Any] = {"collapsed": done.blocks}
    if done.stage is not None:
        row["stage"] = done.stage
    row["test_acc_after_collapse"] = _test_accuracy(model, test, ctx)
    return row


class _Outputs:
    """Rank 0's files in the output directory during training: `metrics.jsonl` (emptied at the start, one
    JSON line per epoch) and `checkpoint.pt` (after every epoch)."""

    def __init__(self, out: Path) -> None:
        out.mkdir(parents=True, exist_ok=True)
        self.out = out
        self.metrics = out / METRICS
        self.metrics.write_text("")

    def epoch(self, row: Mapping[str, Any], model: nn.Module, steps: Sequence[str]) -> None:
        with self.metrics.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        save_checkpoint(self.out / CHECKPOINT, model, Structure.of(model, steps), epoch=row["epoch"])


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
    splits: data.Splits,
    ctx: Dist,
    training: Training,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Export, collapse in torch, fuse the export, measure both; write `report.json` and the checkpoint."""
    model.eval()
    acc_before = accuracy(torch_predict(model, ctx.device), splits.test)
    params_before = count_params(model)
    example = _examples(splits).to(ctx.device)
    blocks_total = len(collapsible.find_blocks(model)) + len(training.collapsed)
    n = min(VERIFY_IMAGES, len(splits.test))
    fused = endstep.export_collapse_fuse(
        model,
        example,
        cfg.out,
        threshold=cfg.threshold,
        max_error=cfg.max_error,
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
        "blocks": {
            "total": blocks_total,
            "collapsed": len(training.collapsed) + len(fused.steps),
            "collapsed_during_training": training.collapsed,
            "collapsed_at_end": fused.collapsed_at_end,
            "collapsed_by_graph_pass": len(fused.report.collapsed),
            "not_collapsed": collapsible.slopes(model),
            "refused": [r.to_dict() for r in collapsible.refusals(model)],
        },
        **endstep.sizes(fused, model, start=training.params_start, before_collapse=params_before),
        "fuse": fused.report.to_dict(),
        "seconds": training.seconds,
        **(extra or {}),
    }
    endstep.write(cfg.out, report, model, [*training.steps, *(fc1 for fc1, _ in fused.steps)], cfg.epochs)
    return report
