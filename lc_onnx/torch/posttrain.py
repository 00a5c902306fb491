"""Post-training LayerCollapse without labels: the unmodified model teaches its own collapsible copy.

The recipe behind `lc-onnx finetune --objective distill`. The teacher is the model as given, frozen; the
student starts as an exact copy whose last `ceil(fraction * n)` MLP blocks get PReLU activations. The
loss is `distill_loss(student outputs, teacher outputs) + lam * collapse_penalty(student)`: hidden states
(`cosine+mse` by default, see `fidelity`) for encoders, logits (`kl` at `temperature`) for classifiers.
No labels are read. After every epoch but the last the targeted blocks whose slopes are within
`threshold` of 1 are collapsed (as `recipe` does); at the end every targeted block still outside the
threshold has its slope set to 1 (*snapped*; the report says which, and how far each was), then the
model is exported, collapsed in torch, and the export fused by the graph pass.

Fidelity is measured on held-out inputs against the teacher's outputs: mean-pooled cosine for hidden
states, top-1 agreement (a fraction; the mean KL beside it) for logits. `report.json`'s `fidelity` block
has it at the start (activations swapped, before training), before the collapse, after the collapse in
torch, and for the fused ONNX model in onnxruntime.

Adaptive depth (`max_drop`): blocks are made collapsible one more at a time from the output end, each
stage trained for `epochs`, then snapped and collapsed; the deepest model whose held-out fidelity stays
within `max_drop` of the unmodified model's (1.0) is kept, up to `ceil(fraction * n)` blocks.

Data (`PostTrainingData`):
- `text:FILE`: one example per line, tokenized by the model's own tokenizer (`max_length`); the held-out
  lines are fixed by their text (`textdata.split`);
- an image directory: its images (labels ignored), in the folder's own train/test split;
- `FILE.py:FN` (`data`): a function yielding feeds `{input name: array}`, as for calibration; every
  tenth feed (the 1st, 11th, ...) is held out.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lc_onnx import files, io, runtime
from lc_onnx.errors import UserError
from lc_onnx.torch import collapsible, data, fidelity, hf, models, textdata
from lc_onnx.torch.checkpoint import Structure, save_checkpoint
from lc_onnx.torch.evaluate import count_params
from lc_onnx.torch.export import export_onnx
from lc_onnx.torch.loop import Dist, Step, Trainer
from lc_onnx.torch.schedule import Collapser

logger = logging.getLogger(__name__)

TEXT = "text:"
HELD_OUT_EVERY = 10  # of `data` feeds: the 1st, 11th, 21st, ... are held out
EVAL_BATCH = 32


@dataclass
class Outputs:
    """How the model is called and what its first output is."""

    keyword: bool  # batches are keyword arguments (transformers' `input_ids`, ...), else positional
    hidden: bool  # hidden states `[B, T, D]` (encoders), else logits `[B, C]`

    def __call__(self, model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        out = model(**batch) if self.keyword else model(*batch.values())
        while not isinstance(out, torch.Tensor):
            out = next(iter(out.values())) if isinstance(out, Mapping) else out[0]
        return out

    def example(self, batch: Mapping[str, torch.Tensor]):
        """`batch` as `export_onnx` takes it: keyword inputs by name, positional ones as a tuple."""
        return dict(batch) if self.keyword else tuple(batch.values())


@dataclass
class PostTrainingData:
    """Train and held-out batches, each a dict of input tensors."""

    train: Dataset
    held_out: Dataset
    batch_size: int | None  # None: the datasets' items are batches already (`data` feeds)
    collate: Callable | None

    def held_out_batches(self) -> list[dict[str, torch.Tensor]]:
        size = None if self.batch_size is None else EVAL_BATCH
        return list(DataLoader(self.held_out, batch_size=size, collate_fn=self.collate))


class _Images(Dataset):
    """The images of an `(image, label)` dataset as `{name: image}`."""

    def __init__(self, dataset: Dataset, name: str) -> None:
        self.dataset, self.name = dataset, name

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {self.name: self.dataset[index][0]}


class _Feeds(Dataset):
    """Feeds `{name: array}` as batches of tensors."""

    def __init__(self, feeds: Sequence[Mapping[str, np.ndarray]]) -> None:
        self.feeds = [{k: torch.from_numpy(np.asarray(v)) for k, v in f.items()} for f in feeds]

    def __len__(self) -> int:
        return len(self.feeds)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.feeds[index]


def teacher_and_data(cfg) -> tuple[nn.Module, Outputs, PostTrainingData]:
    """The unmodified model, how to call it, and its data, as `cfg` (a `FinetuneConfig`) names them.

    Raises:
        UserError: naming `dataset`, `data` or `model`.
    """
    if cfg.data is not None:
        return _from_feeds(cfg)
    if cfg.dataset.startswith(TEXT):
        return _from_text(cfg)
    image = models.image_format(cfg.model, cfg.img_size, cfg.model_kwargs)
    splits = data.load(cfg.dataset, image)
    model = models.build_model(
        cfg.model, splits.num_classes, image.size, pretrained=cfg.pretrained, kwargs=cfg.model_kwargs
    )
    return (
        model,
        Outputs(keyword=False, hidden=False),
        PostTrainingData(_Images(splits.train, "input"), _Images(splits.test, "input"), cfg.batch_size, None),
    )


def _from_text(cfg) -> tuple[nn.Module, Outputs, PostTrainingData]:
    path = cfg.dataset[len(TEXT) :]
    source = hf.parse(cfg.model, task="features", overrides=cfg.model_kwargs)
    if source is None:
        raise UserError(
            f"{{dataset}} {cfg.dataset}: text needs a transformers model with a tokenizer (hf:DIR), "
            f"not {cfg.model}",
            params=["dataset"],
        )
    lines = textdata.read_lines(path)
    processor = source.processor()
    tokenizer = getattr(processor, "tokenizer", processor)
    if tokenizer is None or not callable(getattr(tokenizer, "pad", None)):
        raise UserError(
            f"{{dataset}} {cfg.dataset}: {{model}} {cfg.model} has no tokenizer to read text with",
            params=["dataset", "model"],
        )
    train, held = textdata.split(lines)
    make = textdata.TextDataset.from_lines
    train_set, held_set = make(train, tokenizer, cfg.max_length), make(held, tokenizer, cfg.max_length)
    model = source.model()
    return (
        model,
        Outputs(keyword=True, hidden=True),
        PostTrainingData(train_set, held_set, cfg.batch_size, train_set.collate),
    )


def _from_feeds(cfg) -> tuple[nn.Module, Outputs, PostTrainingData]:
    from lc_onnx.calibration.data import from_spec

    feeds = list(from_spec(cfg.data))
    for i, feed in enumerate(feeds):
        if not isinstance(feed, Mapping) or not feed:
            raise UserError(
                f"{{data}} {cfg.data}: feed {i} is a {type(feed).__name__}, not a dict of input arrays",
                params=["data"],
            )
    if len(feeds) < 2:
        raise UserError(
            f"{{data}} {cfg.data}: yielded {len(feeds)} feed(s); give at least 2 (every "
            f"{HELD_OUT_EVERY}th, from the first, is held out)",
            params=["data"],
        )
    held = [f for i, f in enumerate(feeds) if i % HELD_OUT_EVERY == 0]
    train = [f for i, f in enumerate(feeds) if i % HELD_OUT_EVERY != 0]
    names = list(feeds[0])
    keyword = names != ["input"]
    source = hf.parse(cfg.model, task="features", overrides=cfg.model_kwargs)
    if source is not None and "pixel_values" not in names:
        model, hidden = source.model(), True
    else:
        first = next(iter(feeds[0].values()))
        size = int(first.shape[-1]) if first.ndim == 4 else cfg.img_size
        model = models.build_model(cfg.model, 1000, size, pretrained=cfg.pretrained, kwargs=cfg.model_kwargs)
        keyword, hidden = False, False
    return model, Outputs(keyword, hidden), PostTrainingData(_Feeds(train), _Feeds(held), None, None)


def distill_step(teacher: nn.Module, outputs: Outputs, loss: Callable, lam: float) -> Step:
    """The `Step` of distillation: the teacher's outputs (no gradients) against the student's, plus
    `lam` times the collapse penalty."""

    def step(model: nn.Module, raw: nn.Module, batch: Mapping[str, torch.Tensor], device: torch.device):
        batch = {k: v.to(device) for k, v in batch.items()}
        with torch.no_grad():
            target = outputs(teacher, batch)
        value = loss(outputs(model, batch), target, batch.get("attention_mask"))
        n = len(next(iter(batch.values())))
        return value + lam * collapsible.collapse_penalty(raw), {"seen": n}

    return step


class Fidelity:
    """The held-out measure of a student against the teacher's outputs on the same batches."""

    def __init__(self, teacher: nn.Module, outputs: Outputs, batches: list[dict[str, torch.Tensor]]):
        self.outputs, self.batches = outputs, batches
        with torch.no_grad():
            teacher.eval()
            self.targets = [outputs(teacher, b) for b in batches]
        self.metric = "mean_pooled_cosine" if outputs.hidden else "top1_agreement"

    def torch(self, model: nn.Module, device: torch.device) -> dict[str, float]:
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                got = [
                    self.outputs(model, {k: v.to(device) for k, v in b.items()}).cpu() for b in self.batches
                ]
        finally:
            model.train(was_training)
        return self.measure(got)

    def onnx(self, path: Path) -> dict[str, float]:
        """The same measure for an ONNX model run in onnxruntime (feeds limited to its inputs)."""
        session = runtime.session(path, optimization="all")
        names = [i.name for i in session.get_inputs()]
        got = []
        for b in self.batches:
            values = list(b.values())
            feed = (
                {k: v.numpy() for k, v in b.items() if k in names}
                if self.outputs.keyword
                else dict(zip(names, (v.numpy() for v in values)))
            )
            out = runtime.run(session, feed, None, on="held-out inputs", what=path.name)
            got.append(torch.from_numpy(next(iter(out.values()))))
        return self.measure(got)

    def measure(self, outputs: list[torch.Tensor]) -> dict[str, float]:
        if self.outputs.hidden:
            cos = [
                fidelity.pooled_cosine(s.float(), t.float(), b.get("attention_mask"))
                for s, t, b in zip(outputs, self.targets, self.batches)
            ]
            return {self.metric: float(torch.cat(cos).mean())}
        agree = sum(int((s.argmax(-1) == t.argmax(-1)).sum()) for s, t in zip(outputs, self.targets))
        n = sum(len(t) for t in self.targets)
        kl = sum(
            float(fidelity.kl_divergence(s.float(), t.float())) * len(t)
            for s, t in zip(outputs, self.targets)
        )
        return {self.metric: agree / n, "kl": kl / n}


def check_outputs(outputs: Outputs, teacher: nn.Module, batch: Mapping[str, torch.Tensor], loss_name: str):
    """Refuse a teacher whose first output the loss cannot compare (one line, naming `model`)."""
    with torch.no_grad():
        teacher.eval()
        out = outputs(teacher, batch)
    if not out.is_floating_point() or out.dim() not in (2, 3):
        raise UserError(
            f"{{model}}: its first output ({out.dtype}, shape {tuple(out.shape)}) is neither logits "
            "[batch, classes] nor hidden states [batch, tokens, features]; distillation cannot compare it",
            params=["model"],
        )
    hidden = out.dim() == 3
    if hidden != (loss_name != "kl"):
        wants = (
            "logits (use cosine+mse, cosine or mse for hidden states)"
            if loss_name == "kl"
            else ("hidden states (use kl for logits)")
        )
        raise UserError(
            f"{{distill_loss}} {loss_name} compares {wants}; the model's first output has shape "
            f"{tuple(out.shape)}",
            params=["distill_loss"],
        )
    return hidden


def snap(model: nn.Module, threshold: float, only: set[str] | None = None) -> dict[str, float]:
    """Set every PReLU block's slopes to 1 where some slope is further than `threshold` from 1; returns
    activation name -> the largest |slope - 1| it had."""
    snapped = {}
    for block in collapsible.prelu_blocks(model):
        if only is not None and block.name not in only:
            continue
        gap = float((block.act.weight.detach() - 1.0).abs().max())
        if gap > threshold:
            with torch.no_grad():
                block.act.weight.fill_(1.0)
            snapped[block.name] = gap
    if snapped:
        logger.info("snapped %d slope(s) to 1: %s", len(snapped), snapped)
    return snapped


@dataclass
class _Run:
    """What the training part hands to the end step."""

    start: dict[str, float]
    params_start: int
    steps: list[str]  # fc1 names collapsed during training, in order
    collapsed: list[str]  # activation names collapsed during training
    targets: list[str]  # activation names of every targeted block
    stages: list[dict[str, Any]]  # adaptive depth: one row per stage tried
    stopped: str | None  # adaptive depth: why it stopped


MetricsWriter = Callable[[dict[str, Any], nn.Module, Sequence[str]], None]


def run(cfg, ctx: Dist, writer: Callable[[], MetricsWriter] | None) -> dict[str, Any]:
    """The whole recipe for `FinetuneConfig` `cfg` on this process; returns the report (rank 0) or {}.

    `writer()` (rank 0) prepares the output directory once the model and data have loaded and returns
    what records each epoch's metrics row (and checkpoint).
    """
    started = time.perf_counter()
    torch.manual_seed(cfg.seed)
    teacher, outputs, splits = teacher_and_data(cfg)
    loss_name = cfg.distill_loss or ("kl" if not outputs.hidden else "cosine+mse")
    loss = fidelity.distill_loss(loss_name, cfg.temperature)
    held = splits.held_out_batches()
    outputs.hidden = check_outputs(outputs, teacher, held[0], loss_name)
    teacher.requires_grad_(False)
    student = copy.deepcopy(teacher)
    found = collapsible.discover(student, outputs.example({k: v[:2] for k, v in held[0].items()}))
    if not found.specs:
        refused = found.refusals
        why = f" ({len(refused)} refused, e.g. {refused[0]})" if refused else ""
        raise UserError(f"{{model}} {cfg.model}: no collapsible MLP block found{why}", params=["model"])
    teacher.to(ctx.device).eval()
    student.to(ctx.device)
    measure = Fidelity(teacher, outputs, held)
    out_metrics = writer() if writer is not None else None
    step = distill_step(teacher, outputs, loss, cfg.lam)
    params_start = count_params(student)
    if cfg.max_drop is None:
        result = _train(cfg, ctx, student, step, splits, measure, out_metrics, params_start)
    else:
        result, student = _adaptive(cfg, ctx, student, step, splits, measure, out_metrics, params_start)
    if not ctx.main:
        return {}
    result_seconds = time.perf_counter() - started
    return _finish(cfg, student, outputs, held, measure, ctx, result, loss_name, result_seconds)


def _trainer(cfg, ctx: Dist, model: nn.Module, step: Step, splits: PostTrainingData) -> Trainer:
    return Trainer(
        model,
        ctx,
        splits.train,
        step,
        lr=cfg.lr,
        slope_lr=cfg.slope_lr,
        weight_decay=cfg.weight_decay,
        batch_size=splits.batch_size,
        seed=cfg.seed,
        collate_fn=splits.collate,
        progress=cfg.progress,
    )


def _train(cfg, ctx, student, step, splits, measure, out_metrics, params_start) -> _Run:
    collapser = Collapser(student, cfg.fractions, threshold=cfg.threshold, init=cfg.init)
    targets = list(collapser.start())
    start = measure.torch(student, ctx.device)
    trainer = _trainer(cfg, ctx, student, step, splits)
    for epoch in range(1, cfg.epochs + 1):
        row = {"epoch": epoch, **trainer.train(epoch - 1, cfg.epochs)}
        done = collapser.collapse() if epoch < cfg.epochs else None
        if done is not None:
            trainer.rebuild()
            row["collapsed"] = done.blocks
        row.update(_epoch_row(student, measure, ctx))
        if out_metrics is not None:
            out_metrics(row, student, collapser.steps)
    targets = sorted(set(targets) | set(collapser.collapsed))
    return _Run(start, params_start, collapser.steps, collapser.collapsed, targets, [], None)


def _adaptive(cfg, ctx, student, step, splits, measure, out_metrics, params_start):
    """One more block per stage from the output end; keep the deepest model within `max_drop`."""
    names = [b.name for b in collapsible.find_blocks(student)]
    limit = math.ceil(max(cfg.fractions) * len(names))
    start = measure.torch(student, ctx.device)
    kept, steps, collapsed, stages = copy.deepcopy(student), [], [], []
    stopped = f"all {limit} targeted block(s) collapsed within max_drop {cfg.max_drop}"
    for k, name in enumerate(reversed(names[len(names) - limit :]), start=1):
        collapsible.convert_blocks([b for b in collapsible.find_blocks(student) if b.name == name], cfg.init)
        trainer = _trainer(cfg, ctx, student, step, splits)
        for epoch in range(1, cfg.epochs + 1):
            row = {"stage": k, "epoch": epoch, **trainer.train(epoch - 1, cfg.epochs)}
            row.update(_epoch_row(student, measure, ctx))
            if out_metrics is not None:
                out_metrics(row, student, steps)
        snapped = snap(student, cfg.threshold, {name})
        new = [fc1 for fc1, _ in collapsible.collapse_steps(student, cfg.threshold, only={name})]
        value = measure.torch(student, ctx.device)[measure.metric]
        stage = {"blocks": k, "block": name, measure.metric: value, "drop": 1.0 - value, "snapped": snapped}
        stages.append(stage)
        logger.info("stage %d (%s): %s %.4f", k, name, measure.metric, value)
        if 1.0 - value > cfg.max_drop:
            stopped = (
                f"collapsing block {k} ({name}) dropped {measure.metric} to {value:.4f}, "
                f"more than max_drop {cfg.max_drop} below 1; kept {k - 1} block(s)"
            )
            student = kept
            break
        steps += new
        collapsed.append(name)
        kept = copy.deepcopy(student)
    return _Run(start, params_start, steps, collapsed, collapsed, stages, stopped), student


def _epoch_row(model: nn.Module, measure: Fidelity, ctx: Dist) -> dict[str, Any]:
    with torch.no_grad():
        penalty = float(collapsible.collapse_penalty(model))
    slopes = {name: sum(v) / len(v) for name, v in collapsible.slopes(model).items()}
    row: dict[str, Any] = {"penalty": penalty, "slopes": slopes, "params": count_params(model)}
    if ctx.main:
        row.update(measure.torch(model, ctx.device))
    return row


def _finish(cfg, model, outputs, held, measure, ctx, run_: _Run, loss_name, seconds) -> dict[str, Any]:
    """Snap, export, collapse in torch, fuse the export; measure each; write `report.json`."""
    import lc_onnx

    model.eval()
    before = measure.torch(model, ctx.device)
    pending = {b.name for b in collapsible.prelu_blocks(model)} & set(run_.targets)
    snapped = snap(model, cfg.threshold, pending) if cfg.snap else {}
    example = {k: v[:2].to(ctx.device) for k, v in held[0].items()}
    onnx_path = export_onnx(
        model, outputs.example(example), cfg.out / "model.onnx", dynamo=True, dynamic_sequence=outputs.hidden
    )
    prelu_before = [b.name for b in collapsible.prelu_blocks(model)]
    steps = collapsible.collapse_steps(model, cfg.threshold, only=set(run_.targets))
    remaining = {b.name for b in collapsible.find_blocks(model)}
    after_torch = measure.torch(model, ctx.device)
    fused_path = cfg.out / "model.collapsed.onnx"
    feeds = [_numpy_feed(b, outputs, onnx_path) for b in held[:2]]
    result = lc_onnx.fuse(
        onnx_path,
        output=fused_path,
        threshold=cfg.threshold,
        max_error=cfg.max_error,
        input_shapes={k: tuple(v.shape) for k, v in feeds[0].items()},
        feeds=feeds,
    )
    after_onnx = measure.onnx(fused_path)
    fuse_report = result.report.to_dict()
    metric = measure.metric

    def point(values: dict[str, float]) -> float:
        return values[metric]

    report = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in _config(cfg).items()},
        "objective": "distill",
        "distill_loss": loss_name,
        "fidelity": {
            "metric": metric,
            "start": point(run_.start),
            "before_collapse": point(before),
            "after_collapse_torch": point(after_torch),
            "after_collapse_onnxruntime": point(after_onnx),
            **(
                {"kl": {"before_collapse": before["kl"], "after_collapse_onnxruntime": after_onnx["kl"]}}
                if "kl" in after_onnx
                else {}
            ),
            "held_out_batches": len(held),
        },
        "blocks": {
            "total": len(collapsible.find_blocks(model)) + len(run_.steps) + len(steps),
            "targeted": len(run_.targets),
            "collapsed": len(run_.collapsed) + sum(1 for n in prelu_before if n not in remaining),
            "collapsed_during_training": run_.collapsed,
            "snapped": snapped,
            "not_collapsed": collapsible.slopes(model),
            "collapsed_by_graph_pass": len(result.report.collapsed),
            "refused": [r.to_dict() for r in collapsible.refusals(model)],
        },
        "params": {
            "start": run_.params_start,
            "after_collapse_torch": count_params(model),
            "onnx_before_fuse": fuse_report["params_before"],
            "onnx_after_fuse": fuse_report["params_after"],
        },
        "macs": {
            "onnx_before_fuse": fuse_report["macs_before"],
            "onnx_after_fuse": fuse_report["macs_after"],
        },
        "fuse": fuse_report,
        "seconds": seconds,
    }
    if cfg.max_drop is not None:
        report["adaptive"] = {
            "max_drop": cfg.max_drop,
            "blocks_reached": len(run_.collapsed),
            "stopped": run_.stopped,
            "stages": run_.stages,
        }
    files.write_text(cfg.out / "report.json", json.dumps(report, indent=2) + "\n")
    structure = Structure.of(model, [*run_.steps, *(fc1 for fc1, _ in steps)])
    save_checkpoint(cfg.out / "checkpoint.pt", model, structure, epoch=cfg.epochs)
    return report


def _numpy_feed(
    batch: Mapping[str, torch.Tensor], outputs: Outputs, onnx_path: Path
) -> dict[str, np.ndarray]:
    """A held-out batch as onnxruntime feeds of the export (inputs it dropped left out)."""
    names = [i.name for i in io.load(onnx_path).proto.graph.input]
    values = [v.cpu().numpy() for v in batch.values()]
    if outputs.keyword:
        return {k: v for k, v in zip(batch, values) if k in names}
    return dict(zip(names, values))


def _config(cfg) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(cfg)
