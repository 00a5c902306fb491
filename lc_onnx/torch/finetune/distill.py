"""The distillation objective of `lc-onnx finetune`: post-training LayerCollapse without labels, the
unmodified model teaching its own collapsible copy.

The objective behind `lc-onnx finetune --objective distill`. The teacher is the model as given,
frozen; the student starts as an exact copy whose last `ceil(fraction * n)` MLP blocks get PReLU
activations. The loss is `distill_loss(student outputs, teacher outputs) + lam * collapse_penalty(student)`:
hidden states (`cosine+mse` by default, see `fidelity`) for encoders, logits (`kl` at `temperature`) for
classifiers. No labels are read. After every epoch but the last the targeted blocks whose slopes are
within `threshold` of 1 are collapsed (as the `labels` objective does); at the end every targeted block
still outside the threshold has its slope set to 1 (*snapped*; the report says which, and how far each
was), then the model is exported, collapsed in torch, and the export fused by the graph pass (`endstep`).

Fidelity is measured on held-out inputs against the teacher's outputs: mean-pooled cosine for hidden
states, top-1 agreement (a fraction; the mean KL beside it) for logits. `report.json`'s `fidelity` block
has it at the start (activations swapped, before training), before the collapse, after the collapse in
torch, and for the fused ONNX model in onnxruntime.

Adaptive depth (`max_drop`): blocks are made collapsible one more at a time from the output end, each
stage trained for `epochs`, then snapped and collapsed; the deepest model whose held-out fidelity stays
within `max_drop` of the unmodified model's (1.0) is kept, up to `ceil(fraction * n)` blocks.

Data (`PostTrainingData`):
- `text:FILE`: one example per line, tokenized by the model's own tokenizer (`max_length`); the held-out
  lines are fixed by their text (`text.split`);
- an image directory: its images (labels ignored), in the folder's own train/test split;
- `FILE.py:FN` (`data`): a function yielding feeds `{input name: array}`, as for calibration; every
  tenth feed (the 1st, 11th, ...) is held out.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lc_onnx.errors import UserError
from lc_onnx.model import runtime
from lc_onnx.torch.blocks import collapsible
from lc_onnx.torch.blocks.export import export_input_names, first_tensor
from lc_onnx.torch.data import datasets, text
from lc_onnx.torch.finetune import adaptive, endstep, fidelity
from lc_onnx.torch.finetune.config import TEXT, FinetuneConfig
from lc_onnx.torch.finetune.evaluate import count_params
from lc_onnx.torch.finetune.loop import Dist, Trainer, TrainStep, slope_metrics
from lc_onnx.torch.finetune.schedule import Collapser
from lc_onnx.torch.models import builders, hf

logger = logging.getLogger(__name__)

HELD_OUT_EVERY = 10  # of `data` feeds: the 1st, 11th, 21st, ... are held out
EVAL_BATCH = 32


@dataclass(frozen=True)
class Outputs:
    """How the model is called and what its first output is (`outputs_of` finds out)."""

    keyword: bool  # batches are keyword arguments (transformers' `input_ids`, ...), else positional
    hidden: bool  # hidden states `[B, T, D]` (encoders), else logits `[B, C]`

    def __call__(self, model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return first_tensor(model(**batch) if self.keyword else model(*batch.values()))

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


def teacher_and_data(cfg: FinetuneConfig) -> tuple[nn.Module, bool, PostTrainingData]:
    """The unmodified model, whether it takes its inputs by keyword, and its data, as `cfg` names them.

    Raises:
        UserError: naming `dataset`, `data` or `model`.
    """
    if cfg.data is not None:
        return _from_feeds(cfg)
    if cfg.dataset.startswith(TEXT):
        return _from_text(cfg)
    image = builders.image_format(cfg.model, cfg.img_size, cfg.model_kwargs)
    splits = datasets.load(cfg.dataset, image)
    model = _image_teacher(cfg, splits.num_classes, image.size)
    return (
        model,
        False,
        PostTrainingData(_Images(splits.train, "input"), _Images(splits.test, "input"), cfg.batch_size, None),
    )


def _from_text(cfg: FinetuneConfig) -> tuple[nn.Module, bool, PostTrainingData]:
    path = cfg.dataset[len(TEXT) :]
    source = hf.parse(cfg.model, task="features", overrides=cfg.model_kwargs)
    if source is None:
        raise UserError(
            f"{{dataset}} {cfg.dataset}: text needs a transformers model with a tokenizer (hf:DIR), "
            f"not {cfg.model}",
            params=["dataset"],
        )
    lines = text.read_lines(path)
    processor = source.processor()
    tokenizer = getattr(processor, "tokenizer", processor)
    if tokenizer is None or not callable(getattr(tokenizer, "pad", None)):
        raise UserError(
            f"{{dataset}} {cfg.dataset}: {{model}} {cfg.model} has no tokenizer to read text with",
            params=["dataset", "model"],
        )
    train, held = text.split(lines)
    make = text.TextDataset.from_lines
    train_set, held_set = make(train, tokenizer, cfg.max_length), make(held, tokenizer, cfg.max_length)
    model = source.model()
    return (
        model,
        True,
        PostTrainingData(train_set, held_set, cfg.batch_size, train_set.collate),
    )


def _from_feeds(cfg: FinetuneConfig) -> tuple[nn.Module, bool, PostTrainingData]:
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
    source = hf.parse(cfg.model, task="features", overrides=cfg.model_kwargs)
    if source is not None and "pixel_values" not in names:
        model, keyword = source.model(), True
    else:  # images: the classifiers `lc-onnx finetune` builds take them positionally
        first = next(iter(feeds[0].values()))
        size = int(first.shape[-1]) if first.ndim == 4 else cfg.img_size
        model, keyword = _image_teacher(cfg, 1000, size), False
    return model, keyword, PostTrainingData(_Feeds(train), _Feeds(held), None, None)


def _image_teacher(cfg: FinetuneConfig, num_classes: int, size: int) -> nn.Module:
    """An image classifier to distil: a pretrained transformers one keeps its own head (its config's
    labels); any other is built with `num_classes` outputs (random, or timm's `pretrained` weights)."""
    keep_head = cfg.model.startswith(hf.PRETRAINED)
    return builders.build_model(
        cfg.model,
        None if keep_head else num_classes,
        size,
        pretrained=cfg.pretrained,
        kwargs=cfg.model_kwargs,
    )


def distill_step(teacher: nn.Module, outputs: Outputs, loss: Callable, lam: float) -> TrainStep:
    """The `TrainStep` of distillation: the teacher's outputs (no gradients) against the student's, plus
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

    def onnx(self, path: Path, names: Sequence[str]) -> dict[str, float]:
        """The same measure for an ONNX model run in onnxruntime; `names` are the export's input names
        for the batches' tensors (those the export dropped are left out)."""
        session = runtime.session(path, optimization="all")
        kept = {i.name for i in session.get_inputs()}
        got = []
        for batch in self.batches:
            feed = {k: v for k, v in _numpy_feed(batch, names).items() if k in kept}
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


def outputs_of(teacher: nn.Module, keyword: bool, batch: Mapping[str, torch.Tensor]) -> Outputs:
    """How `teacher` answers `batch`: logits or hidden states, from its first output's rank.

    Raises:
        UserError: naming `model`, when the first output is neither.
    """
    with torch.no_grad():
        teacher.eval()
        out = Outputs(keyword, False)(teacher, batch)
    if not out.is_floating_point() or out.dim() not in (2, 3):
        raise UserError(
            f"{{model}}: its first output ({out.dtype}, shape {tuple(out.shape)}) is neither logits "
            "[batch, classes] nor hidden states [batch, tokens, features]; distillation cannot compare it",
            params=["model"],
        )
    return Outputs(keyword, out.dim() == 3)


def loss_for(outputs: Outputs, name: str | None) -> str:
    """The distillation loss `name` (None: the default for the outputs), refused where it cannot compare
    them (one line, naming `distill_loss`)."""
    if name is None:
        return "cosine+mse" if outputs.hidden else "kl"
    if outputs.hidden == (name == "kl"):
        wants = (
            "logits (use cosine+mse, cosine or mse for hidden states)" if name == "kl" else "hidden states"
        )
        has = "hidden states" if outputs.hidden else "logits (use kl)"
        raise UserError(
            f"{{distill_loss}} {name} compares {wants}; the model's first output is {has}",
            params=["distill_loss"],
        )
    return name


@dataclass
class _Run:
    """What the training part hands to the end step."""

    start: dict[str, float]
    params_start: int
    steps: list[str]  # fc1 names collapsed during training, in order
    collapsed: list[str]  # activation names collapsed during training
    targets: list[str]  # activation names of every targeted block
    depth: adaptive.Depth | None = None  # the adaptive search, when there was one


MetricsWriter = Callable[[dict[str, Any], nn.Module, Sequence[str]], None]


def run(cfg: FinetuneConfig, ctx: Dist) -> dict[str, Any]:
    """The distillation objective for the resolved and checked `cfg` on this process.

    Rank 0 makes the output directory once the model and data have loaded (nothing half-written).

    Returns:
        The report (rank 0; the content of `report.json`) or {} (other ranks).

    Raises:
        UserError: naming `model`, `dataset`, `data` or `distill_loss` when they cannot be used, or a
            model without a collapsible MLP block.
    """
    started = time.perf_counter()
    torch.manual_seed(cfg.seed)
    teacher, keyword, splits = teacher_and_data(cfg)
    held = splits.held_out_batches()
    outputs = outputs_of(teacher, keyword, held[0])
    loss_name = loss_for(outputs, cfg.distill_loss)
    loss = fidelity.distill_loss(loss_name, cfg.temperature)
    student = copy.deepcopy(teacher)  # before freezing the teacher: the student trains every weight
    teacher.requires_grad_(False)
    found = collapsible.discover(student, outputs.example({k: v[:2] for k, v in held[0].items()}))
    if not found.specs:
        refused = found.refusals
        why = f" ({len(refused)} refused, e.g. {refused[0]})" if refused else ""
        raise UserError(f"{{model}} {cfg.model}: no collapsible MLP block found{why}", params=["model"])
    teacher.to(ctx.device).eval()
    student.to(ctx.device)
    measure = Fidelity(teacher, outputs, held)
    out_metrics = endstep.EpochFiles(cfg.out).epoch if ctx.main else None
    step = distill_step(teacher, outputs, loss, cfg.lam)
    job = _Job(cfg, ctx, step, splits, measure, out_metrics, count_params(student))
    if cfg.max_drop is None:
        result = _train(job, student)
    else:
        result, student = _adaptive(job, student)
    if not ctx.main:
        return {}
    result_seconds = time.perf_counter() - started
    return _finish(cfg, student, outputs, held, measure, ctx, result, loss_name, result_seconds)


@dataclass(frozen=True)
class _Job:
    """What training the student needs besides the student itself."""

    cfg: FinetuneConfig
    ctx: Dist
    step: TrainStep
    splits: PostTrainingData
    measure: Fidelity
    out_metrics: MetricsWriter | None
    params_start: int

    def trainer(self, model: nn.Module) -> Trainer:
        return Trainer(
            model,
            self.ctx,
            self.splits.train,
            self.step,
            batch_size=self.splits.batch_size,
            collate_fn=self.splits.collate,
            **self.cfg.optimizer_settings(),
        )

    def epoch_row(self, model: nn.Module) -> dict[str, Any]:
        return _epoch_row(model, self.measure, self.ctx)


def _train(job: _Job, student: nn.Module) -> _Run:
    cfg = job.cfg
    collapser = Collapser(student, cfg.fractions, threshold=cfg.threshold, init=cfg.init)
    collapser.start()
    start = job.measure.torch(student, job.ctx.device)
    trainer = job.trainer(student)
    for epoch in range(1, cfg.epochs + 1):
        row = {"epoch": epoch, **trainer.train(epoch - 1, cfg.epochs)}
        done = collapser.collapse() if epoch < cfg.epochs else None
        if done is not None:
            trainer.rebuild()
            row["collapsed"] = done.blocks
        row.update(job.epoch_row(student))
        if job.out_metrics is not None:
            job.out_metrics(row, student, collapser.steps)
    # the blocks of every stage reached (later stages extend the earlier ones)
    targets = collapser.schedule.targets()
    return _Run(start, job.params_start, collapser.steps, collapser.collapsed, targets)


def _adaptive(job: _Job, student: nn.Module) -> tuple[_Run, nn.Module]:
    """One more block per stage from the output end; keep the deepest model within `max_drop`."""
    cfg, measure, device = job.cfg, job.measure, job.ctx.device
    start = measure.torch(student, device)

    def train_stage(model: nn.Module, k: int) -> None:
        trainer = job.trainer(model)
        for epoch in range(1, cfg.epochs + 1):
            row = {"stage": k, "epoch": epoch, **trainer.train(epoch - 1, cfg.epochs)}
            row.update(job.epoch_row(model))
            if job.out_metrics is not None:
                job.out_metrics(row, model, [])

    student, depth = adaptive.deepest(
        student,
        max(cfg.fractions),
        train_stage=train_stage,
        measure=lambda model: measure.torch(model, device)[measure.metric],
        reference=1.0,
        max_drop=cfg.max_drop,
        threshold=cfg.threshold,
        init=cfg.init,
        metric=measure.metric,
    )
    return _Run(start, job.params_start, depth.steps, depth.collapsed, depth.collapsed, depth), student


def _epoch_row(model: nn.Module, measure: Fidelity, ctx: Dist) -> dict[str, Any]:
    row: dict[str, Any] = {**slope_metrics(model), "params": count_params(model)}
    if ctx.main:
        row.update(measure.torch(model, ctx.device))
    return row


def _finish(
    cfg: FinetuneConfig,
    model: nn.Module,
    outputs: Outputs,
    held: list[dict[str, torch.Tensor]],
    measure: Fidelity,
    ctx: Dist,
    run_: _Run,
    loss_name: str,
    seconds: float,
) -> dict[str, Any]:
    """Snap, export, collapse in torch, fuse the export; measure each; write `report.json`."""
    model.eval()
    before = measure.torch(model, ctx.device)
    pending = {b.name for b in collapsible.prelu_blocks(model)} & set(run_.targets)
    snapped = adaptive.snap(model, cfg.threshold, pending) if cfg.snap else {}
    example = outputs.example({k: v[:2].to(ctx.device) for k, v in held[0].items()})
    names = export_input_names(example)
    feeds = [_numpy_feed(b, names) for b in held[:2]]
    fused = endstep.export_collapse_fuse(
        cfg,
        model,
        example,
        feeds=feeds,
        input_shapes={k: (1, *v.shape[1:]) for k, v in feeds[0].items()},
        only=set(run_.targets),
        dynamic_sequence=outputs.hidden,
    )
    after_torch = measure.torch(model, ctx.device)
    after_onnx = measure.onnx(fused.fused_path, names)
    metric = measure.metric
    fid = {
        "metric": metric,
        "start": run_.start[metric],
        "before_collapse": before[metric],
        "after_collapse_torch": after_torch[metric],
        "after_collapse_onnxruntime": after_onnx[metric],
        "held_out_batches": len(held),
    }
    if "kl" in after_onnx:
        fid["kl"] = {"before_collapse": before["kl"], "after_collapse_onnxruntime": after_onnx["kl"]}
    report = {
        "config": endstep.config_dict(cfg),
        "objective": "distill",
        "distill_loss": loss_name,
        "fidelity": fid,
        "blocks": endstep.blocks_report(model, fused, run_.collapsed, targeted=run_.targets, snapped=snapped),
        **endstep.sizes(fused, model, start=run_.params_start),
        "fuse": fused.report.to_dict(),
        "seconds": seconds,
    }
    if run_.depth is not None:
        report["adaptive"] = run_.depth.to_dict(cfg.max_drop)
    endstep.write(cfg.out, report, model, [*run_.steps, *(fc1 for fc1, _ in fused.steps)], cfg.epochs)
    return report


def _numpy_feed(batch: Mapping[str, torch.Tensor], names: Sequence[str]) -> dict[str, np.ndarray]:
    """A batch as onnxruntime feeds named as the export's inputs."""
    return {name: v.cpu().numpy() for name, v in zip(names, batch.values())}
