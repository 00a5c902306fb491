"""LayerCollapse fine-tuning: task loss + λ·`collapse_penalty`, collapsing blocks as they become linear.

The schedule (the reference's): stage k targets the last `ceil(fractions[k] * n)` of the model's n MLP
blocks. Their activations become PReLUs; after every epoch but the last, each targeted block whose slopes
are within `threshold` of 1 is collapsed into one Linear (and leaves the model's trainable parameters), so
the following epochs train the collapsed model. When every block of the stage has collapsed and a next
fraction is given, the next stage starts with the blocks it adds. After the last epoch the remaining
linear blocks are collapsed in torch and, in the export, by the graph pass. Blocks still not linear at the
end stay PReLUs (and `report.json` says so).

One process per device: run directly for one CPU or GPU, or under `torchrun` for several (the
`torch.distributed` environment variables select DistributedDataParallel; gloo on CPU, NCCL on GPU).
Only rank 0 writes files. Checkpoints are plain state dicts plus lists of names, read back with
`torch.load(weights_only=True)`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from lc_onnx import files
from lc_onnx.errors import UserError
from lc_onnx.torch import collapsible, data, models
from lc_onnx.torch.export import export_onnx

logger = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"


@dataclass
class FinetuneConfig:
    """Everything one `lc-onnx finetune` run depends on (written into `report.json`)."""

    model: str
    out: Path
    dataset: str = "digits"
    fractions: Sequence[float] = (0.5,)
    lam: float = 1.0
    epochs: int = 10
    threshold: float = 0.05
    pretrained: bool = False
    img_size: int = 16
    seed: int = 0
    batch_size: int = 64
    lr: float = 1e-3
    slope_lr: float = 3e-2
    weight_decay: float = 0.05
    init: float | None = None
    max_error: float = 0.05
    model_kwargs: Mapping[str, Any] = field(default_factory=dict)
    checkpoint: Path | None = None
    progress: bool = True


@dataclass
class Dist:
    """This process's place in a (possibly single-process) run."""

    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0


@contextlib.contextmanager
def distributed() -> Iterator[Dist]:
    """Join the `torchrun` process group when launched by it (`WORLD_SIZE` set), else run alone."""
    cuda = torch.cuda.is_available()
    if "WORLD_SIZE" not in os.environ:
        yield Dist(device=torch.device("cuda" if cuda else "cpu"))
        return
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    try:
        yield Dist(dist.get_rank(), dist.get_world_size(), device)
    finally:
        dist.destroy_process_group()


@dataclass
class Structure:
    """What a checkpoint needs besides the state dict to rebuild the module tree."""

    prelu: list[str] = field(default_factory=list)  # "act.name:num_slopes" when saved
    collapsed: list[str] = field(default_factory=list)  # fc1 names in collapse order

    @classmethod
    def of(cls, model: nn.Module, collapsed: Sequence[str]) -> Structure:
        prelu = [f"{b.name}:{b.act.weight.numel()}" for b in collapsible.prelu_blocks(model)]
        return cls(prelu, list(collapsed))


def save_checkpoint(path: Path, model: nn.Module, structure: Structure, **extra: Any) -> None:
    """Atomically write the state dict, the structure and plain extras (ints, floats, strings, lists)."""
    payload = {"model": model.state_dict(), "structure": asdict(structure), **extra}
    with files.atomic_open(path, "wb") as f:
        torch.save(payload, f)


def load_checkpoint(path: Path, model: nn.Module) -> dict[str, Any]:
    """Load a `save_checkpoint` file into a freshly built `model` (structure first); returns the payload.

    Only tensors and plain containers are unpickled (`weights_only=True`).
    """
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"--checkpoint {path}: no such file") from None
    except Exception as exc:  # unpickling errors come in many types
        raise UserError(f"--checkpoint {path}: not a readable lc-onnx checkpoint ({exc})") from None
    if not isinstance(payload, dict) or "model" not in payload or "structure" not in payload:
        raise UserError(f"--checkpoint {path}: not an lc-onnx checkpoint (no 'model'/'structure' keys)")
    structure = Structure(**payload["structure"])
    try:
        collapsible.restore_structure(model, structure.prelu, structure.collapsed)
        model.load_state_dict(payload["model"])
    except (ValueError, RuntimeError) as exc:
        raise UserError(
            f"--checkpoint {path}: does not fit this model ({str(exc).splitlines()[0]})"
        ) from None
    return payload


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def accuracy(model: nn.Module, dataset: Dataset, device: torch.device, batch_size: int = 256) -> float:
    """Top-1 accuracy in percent (eval mode; the training flag is restored)."""
    was_training = model.training
    model.eval()
    correct = total = 0
    for x, y in DataLoader(dataset, batch_size=batch_size):
        pred = model(x.to(device)).argmax(1).cpu()
        correct += int((pred == y).sum())
        total += len(y)
    model.train(was_training)
    return 100.0 * correct / total


def _param_groups(model: nn.Module, weight_decay: float, lr: float, slope_lr: float) -> list[dict[str, Any]]:
    # PReLU slopes get their own learning rate: with Adam a parameter moves about `lr` per step whatever
    # the penalty's size, so at the weights' 1e-3 a slope needs ~1000 steps from 0.01 to 1. No decay on
    # slopes (decay would pull them to 0, against the penalty), biases and norms.
    slope_ids = {id(b.act.weight) for b in collapsible.prelu_blocks(model)}
    groups: dict[str, list[nn.Parameter]] = {"decay": [], "no_decay": [], "slopes": []}
    for p in model.parameters():
        if not p.requires_grad:
            continue
        key = "slopes" if id(p) in slope_ids else "decay" if p.dim() >= 2 else "no_decay"
        groups[key].append(p)
    return [
        {"params": groups["decay"], "weight_decay": weight_decay, "lr": lr, "base_lr": lr},
        {"params": groups["no_decay"], "weight_decay": 0.0, "lr": lr, "base_lr": lr},
        {"params": groups["slopes"], "weight_decay": 0.0, "lr": slope_lr, "base_lr": slope_lr},
    ]


def make_optimizer(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    slope_lr: float | None = None,
    previous: torch.optim.Optimizer | None = None,
) -> torch.optim.Optimizer:
    """AdamW; moments of parameters that survive from `previous` (after a collapse) are kept.

    Each group carries `base_lr`; `set_lr_scale` applies a schedule to all groups.
    """
    opt = torch.optim.AdamW(_param_groups(model, weight_decay, lr, lr if slope_lr is None else slope_lr))
    if previous is not None:
        for group in opt.param_groups:
            for p in group["params"]:
                if p in previous.state:
                    opt.state[p] = previous.state[p]
    return opt


def set_lr_scale(opt: torch.optim.Optimizer, scale: float) -> None:
    for group in opt.param_groups:
        group["lr"] = group["base_lr"] * scale


def cosine(epoch: int, epochs: int) -> float:
    return 0.5 * (1.0 + math.cos(math.pi * epoch / max(epochs, 1)))


LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def train_epoch(
    model: nn.Module,
    raw: nn.Module,
    loader: DataLoader,
    opt: torch.optim.Optimizer,
    loss_fn: LossFn,
    device: torch.device,
    *,
    desc: str = "",
    progress: bool = False,
) -> dict[str, float]:
    """One pass over `loader`; `loss_fn(raw, x, y, logits)` -> scalar. Returns mean loss and accuracy."""
    from tqdm import tqdm

    model.train()
    total_loss = correct = seen = 0.0
    for x, y in tqdm(loader, desc=desc, leave=False, disable=not progress):
        x, y = x.to(device), y.to(device)
        logits = model(x)
        loss = loss_fn(raw, x, y, logits)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total_loss += float(loss.detach()) * len(y)
        correct += float((logits.argmax(1) == y).sum())
        seen += len(y)
    if dist.is_initialized():  # every rank saw its own shard: report the whole epoch
        totals = torch.tensor([total_loss, correct, seen], dtype=torch.float64, device=device)
        dist.all_reduce(totals)
        total_loss, correct, seen = totals.tolist()
    return {"train_loss": total_loss / seen, "train_acc": 100.0 * correct / seen}


class Schedule:
    """Which blocks are targeted now; extends stage by stage as the targeted blocks collapse."""

    def __init__(self, all_blocks: Sequence[str], fractions: Sequence[float]) -> None:
        self.blocks = list(all_blocks)  # activation names, input side first, at the start of training
        self.fractions = list(fractions)
        self.stage = 0

    def targets(self, stage: int | None = None) -> list[str]:
        fraction = self.fractions[self.stage if stage is None else stage]
        n = len(self.blocks)
        return self.blocks[n - math.ceil(fraction * n) :]

    def advance(self, done: set[str]) -> list[str]:
        """Next stage's new blocks if every current target is in `done` and a next fraction exists."""
        if self.stage + 1 >= len(self.fractions) or not set(self.targets()) <= done:
            return []
        self.stage += 1
        return [name for name in self.targets() if name not in done]


def _wrap(raw: nn.Module, ctx: Dist) -> nn.Module:
    if not dist.is_initialized():
        return raw
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(raw, device_ids=device_ids)


def _loaders(
    splits: data.Splits, cfg: FinetuneConfig, ctx: Dist
) -> tuple[DataLoader, DistributedSampler | None]:
    sampler = None
    if dist.is_initialized():
        sampler = DistributedSampler(splits.train, num_replicas=ctx.world, rank=ctx.rank, seed=cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    loader = DataLoader(
        splits.train, batch_size=cfg.batch_size, shuffle=sampler is None, sampler=sampler, generator=gen
    )
    return loader, sampler


def finetune(cfg: FinetuneConfig) -> dict[str, Any]:
    """Run the whole recipe; rank 0 writes `cfg.out/{model.onnx, model.collapsed.onnx, report.json, ...}`.

    Returns:
        The report (same content as `report.json`; empty dict on ranks other than 0).
    """
    for f in cfg.fractions:
        if not 0.0 <= f <= 1.0:
            raise UserError(f"--fraction {f}: must be in [0, 1]")
    if list(cfg.fractions) != sorted(cfg.fractions):
        raise UserError(f"--fraction {' '.join(map(str, cfg.fractions))}: give fractions in increasing order")
    if cfg.epochs < 1:
        raise UserError(f"--epochs {cfg.epochs}: must be at least 1")
    with distributed() as ctx:
        return _finetune(cfg, ctx)


def _finetune(cfg: FinetuneConfig, ctx: Dist) -> dict[str, Any]:
    started = time.perf_counter()
    torch.manual_seed(cfg.seed)
    splits = data.load(cfg.dataset, cfg.img_size)
    raw = models.build_model(
        cfg.model, splits.num_classes, cfg.img_size, pretrained=cfg.pretrained, kwargs=cfg.model_kwargs
    )
    collapsed_steps: list[str] = []
    if cfg.checkpoint is not None:
        payload = load_checkpoint(cfg.checkpoint, raw)
        collapsed_steps = list(payload["structure"]["collapsed"])
    raw.to(ctx.device)
    if ctx.main:
        cfg.out.mkdir(parents=True, exist_ok=True)
        metrics_path = cfg.out / METRICS
        metrics_path.write_text("")

    schedule = Schedule([b.name for b in collapsible.find_blocks(raw)], cfg.fractions)
    if not schedule.blocks:
        raise UserError(f"--model {cfg.model}: no collapsible MLP block found")
    made = collapsible.convert_blocks(
        [b for b in collapsible.find_blocks(raw) if b.name in schedule.targets()], init=cfg.init
    )
    logger.info("stage 0: %d target block(s), %d made collapsible", len(schedule.targets()), len(made))
    start_acc = accuracy(raw, splits.test, ctx.device)
    params_start = count_params(raw)
    model = _wrap(raw, ctx)
    opt = make_optimizer(raw, cfg.lr, cfg.weight_decay, cfg.slope_lr)
    loader, sampler = _loaders(splits, cfg, ctx)
    collapsed_blocks: list[str] = []  # activation names of collapsed blocks

    def loss_fn(m: nn.Module, x: torch.Tensor, y: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(logits, y) + cfg.lam * collapsible.collapse_penalty(m)

    for epoch in range(cfg.epochs):
        if sampler is not None:
            sampler.set_epoch(epoch)
        scale = cosine(epoch, cfg.epochs)
        set_lr_scale(opt, scale)
        t0 = time.perf_counter()
        stats = train_epoch(
            model,
            raw,
            loader,
            opt,
            loss_fn,
            ctx.device,
            desc=f"epoch {epoch + 1}/{cfg.epochs}",
            progress=cfg.progress and ctx.main,
        )
        row: dict[str, Any] = {
            "epoch": epoch + 1,
            "lr": cfg.lr * scale,
            **stats,
            "seconds": time.perf_counter() - t0,
        }
        with torch.no_grad():
            row["penalty"] = float(collapsible.collapse_penalty(raw))
        row["slopes"] = {k: sum(v) / len(v) for k, v in collapsible.slopes(raw).items()}
        row["test_acc"] = accuracy(raw, splits.test, ctx.device) if ctx.main else None

        # Slopes are identical on every rank (DDP keeps parameters in sync), so every rank collapses the
        # same blocks and the module trees stay equal without communication. After the last epoch the
        # collapse is left to `_finish`, which measures the model before and after it and has the graph
        # pass collapse the same blocks in the export.
        targets = set(schedule.targets())
        pending = [b.name for b in collapsible.prelu_blocks(raw) if b.name in targets]
        last = epoch + 1 == cfg.epochs
        steps = [] if last else collapsible.collapse_steps(raw, cfg.threshold, only=pending)
        if steps:
            collapsed_steps += [fc1 for fc1, _ in steps]
            done_now = [
                name for name in pending if name not in {b.name for b in collapsible.find_blocks(raw)}
            ]
            collapsed_blocks += done_now
            row["collapsed"] = done_now
            new = schedule.advance(set(collapsed_blocks))
            if new:
                collapsible.convert_blocks(
                    [b for b in collapsible.find_blocks(raw) if b.name in new], cfg.init
                )
                row["stage"] = schedule.stage
            model = _wrap(raw, ctx)
            opt = make_optimizer(raw, cfg.lr, cfg.weight_decay, cfg.slope_lr, previous=opt)
            set_lr_scale(opt, scale)
            row["test_acc_after_collapse"] = accuracy(raw, splits.test, ctx.device) if ctx.main else None
        row["params"] = count_params(raw)
        if ctx.main:
            with metrics_path.open("a") as fh:
                fh.write(json.dumps(row) + "\n")
            save_checkpoint(cfg.out / CHECKPOINT, raw, Structure.of(raw, collapsed_steps), epoch=epoch + 1)
            logger.info(
                "epoch %d: loss %.4f test %.2f%% penalty %.4f params %d%s",
                epoch + 1,
                stats["train_loss"],
                row["test_acc"],
                row["penalty"],
                row["params"],
                f" collapsed {row['collapsed']}" if "collapsed" in row else "",
            )
    if not ctx.main:
        return {}
    return _finish(
        cfg,
        raw,
        splits,
        ctx,
        {
            "collapsed_steps": collapsed_steps,
            "collapsed_during_training": collapsed_blocks,
            "accuracy_start": start_acc,
            "params_start": params_start,
            "train_seconds": time.perf_counter() - started,
        },
    )


def _finish(
    cfg: FinetuneConfig, raw: nn.Module, splits: data.Splits, ctx: Dist, partial: dict[str, Any]
) -> dict[str, Any]:
    import lc_onnx

    raw.eval()
    acc_before = accuracy(raw, splits.test, ctx.device)
    params_before = count_params(raw)
    example = torch.stack([splits.test[i][0] for i in range(2)]).to(ctx.device)
    onnx_path = export_onnx(raw, example, cfg.out / "model.onnx", dynamo=True)
    blocks_total = len(collapsible.find_blocks(raw)) + len(partial["collapsed_during_training"])
    prelu_before = [b.name for b in collapsible.prelu_blocks(raw)]
    steps = collapsible.collapse_steps(raw, cfg.threshold)
    remaining = {b.name for b in collapsible.find_blocks(raw)}
    collapsed_at_end = [name for name in prelu_before if name not in remaining]
    acc_after = accuracy(raw, splits.test, ctx.device)
    shape = {"input": (1, *example.shape[1:])}
    # Verify the graph pass on real test images: slopes within the threshold (not exactly 1) make the
    # fused model differ from the export a little, and random inputs would not say by how much in use.
    feeds = [{"input": torch.stack([splits.test[i][0] for i in range(min(64, len(splits.test)))]).numpy()}]
    # Written by `fuse` itself: the fused model is verified from disk and large weights may be stored
    # as external data, which onnxruntime then reads from the path.
    fused_path = cfg.out / "model.collapsed.onnx"
    result = lc_onnx.fuse(
        onnx_path,
        output=fused_path,
        threshold=cfg.threshold,
        max_error=cfg.max_error,
        input_shapes=shape,
        feeds=feeds,
    )
    fuse_report = result.report.to_dict()
    report = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
        "accuracy": {
            "start": partial["accuracy_start"],
            "before_collapse": acc_before,
            "after_collapse_torch": acc_after,
            "after_collapse_onnxruntime": onnx_accuracy(fused_path, splits.test),
        },
        "blocks": {
            "total": blocks_total,
            "collapsed": len(partial["collapsed_during_training"]) + len(steps),
            "collapsed_during_training": partial["collapsed_during_training"],
            "collapsed_at_end": collapsed_at_end,
            "collapsed_by_graph_pass": len(result.report.collapsed),
            "not_collapsed": collapsible.slopes(raw),
        },
        "params": {
            "start": partial["params_start"],
            "before_collapse": params_before,
            "after_collapse_torch": count_params(raw),
            "onnx_before_fuse": fuse_report["params_before"],
            "onnx_after_fuse": fuse_report["params_after"],
        },
        "macs": {
            "onnx_before_fuse": fuse_report["macs_before"],
            "onnx_after_fuse": fuse_report["macs_after"],
        },
        "fuse": fuse_report,
        "seconds": partial["train_seconds"],
    }
    files.write_text(cfg.out / "report.json", json.dumps(report, indent=2) + "\n")
    save_checkpoint(
        cfg.out / CHECKPOINT,
        raw,
        Structure.of(raw, [*partial["collapsed_steps"], *(fc1 for fc1, _ in steps)]),
        epoch=cfg.epochs,
    )
    return report


def onnx_accuracy(path: Path, dataset: Dataset, batch_size: int = 256) -> float:
    """Top-1 accuracy in percent of an ONNX model file (first input, first output) in onnxruntime on CPU."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    correct = total = 0
    for x, y in DataLoader(dataset, batch_size=batch_size):
        logits = session.run(None, {name: x.numpy()})[0]
        correct += int((torch.from_numpy(logits).argmax(1) == y).sum())
        total += len(y)
    return 100.0 * correct / total
