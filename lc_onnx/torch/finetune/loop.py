"""Training-loop utilities: the distributed context, AdamW with a learning rate of its own for PReLU
slopes, the cosine schedule, one epoch of training, and `Trainer`, which holds them together for a model
whose module tree changes between epochs (a collapse removes parameters).

One process per device: run directly for one CPU or GPU, or under `torchrun` for several (the
`torch.distributed` environment variables select DistributedDataParallel; gloo on CPU, NCCL on GPU).
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from lc_onnx.torch.blocks import collapsible

LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""`loss_fn(model, x, y, logits)` -> scalar; `model` is the unwrapped module (not the DDP wrapper)."""

TrainStep = Callable[[nn.Module, nn.Module, Any, torch.device], tuple[torch.Tensor, dict[str, float]]]
"""`step(model, raw, batch, device)` -> (loss, sums): the forward of one batch through `model` (perhaps
the DDP wrapper of `raw`) and its loss; `sums` are this batch's totals to add up over the epoch: `seen`
(examples) always, `correct` (top-1 hits) where there are labels."""


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


def wrap(model: nn.Module, ctx: Dist) -> nn.Module:
    """`model` in DistributedDataParallel when a process group is running, else `model` itself."""
    if not dist.is_initialized():
        return model
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def train_loader(
    dataset: Dataset, batch_size: int | None, seed: int, ctx: Dist, collate_fn: Callable | None = None
) -> tuple[DataLoader, DistributedSampler | None]:
    """A shuffling loader over this process's shard of `dataset`, and the sampler that needs
    `set_epoch` (None when running alone). `batch_size=None`: the dataset's items are batches already."""
    sampler = None
    if dist.is_initialized():
        sampler = DistributedSampler(dataset, num_replicas=ctx.world, rank=ctx.rank, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=sampler is None,
        sampler=sampler,
        generator=gen,
        collate_fn=collate_fn,
    )
    return loader, sampler


def param_groups(model: nn.Module, weight_decay: float, lr: float, slope_lr: float) -> list[dict[str, Any]]:
    """Weights (decayed), biases and norms (not decayed), PReLU slopes (not decayed, at `slope_lr`);
    each group carries its `base_lr`."""
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
    """AdamW over `param_groups`; moments of parameters that survive from `previous` (after a collapse)
    are kept. `slope_lr` defaults to `lr`."""
    opt = torch.optim.AdamW(param_groups(model, weight_decay, lr, lr if slope_lr is None else slope_lr))
    if previous is not None:
        for group in opt.param_groups:
            for p in group["params"]:
                if p in previous.state:
                    opt.state[p] = previous.state[p]
    return opt


def set_lr_scale(opt: torch.optim.Optimizer, scale: float) -> None:
    """Every group's learning rate set to its `base_lr` times `scale`."""
    for group in opt.param_groups:
        group["lr"] = group["base_lr"] * scale


def cosine(epoch: int, epochs: int) -> float:
    """The cosine decay's scale at the start of `epoch` (0-based): 1 at epoch 0, towards 0 at `epochs`."""
    return 0.5 * (1.0 + math.cos(math.pi * epoch / max(epochs, 1)))


def labelled(loss_fn: LossFn) -> TrainStep:
    """The `TrainStep` of `(input, label)` batches: logits of the input, `loss_fn`, top-1 hits."""

    def step(model: nn.Module, raw: nn.Module, batch: Any, device: torch.device):
        x, y = (t.to(device) for t in batch)
        logits = model(x)
        return loss_fn(raw, x, y, logits), {"seen": len(y), "correct": float((logits.argmax(1) == y).sum())}

    return step


def train_epoch(
    model: nn.Module,
    raw: nn.Module,
    loader: DataLoader,
    opt: torch.optim.Optimizer,
    step: TrainStep,
    device: torch.device,
    *,
    desc: str = "",
    progress: bool = False,
) -> dict[str, float]:
    """One pass over `loader`: `step` on every batch, then a gradient step on its loss.

    Returns:
        `{"train_loss"}` (the mean loss per example) and, where `step` counts hits, `"train_acc"` (in
        percent), over all ranks.
    """
    from tqdm import tqdm

    model.train()
    totals: dict[str, float] = {}
    for batch in tqdm(loader, desc=desc, leave=False, disable=not progress):
        loss, sums = step(model, raw, batch, device)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        for key, value in {**sums, "loss": float(loss.detach()) * sums["seen"]}.items():
            totals[key] = totals.get(key, 0.0) + value
    keys = sorted(totals)
    if dist.is_initialized():  # every rank saw its own shard: report the whole epoch
        summed = torch.tensor([totals[k] for k in keys], dtype=torch.float64, device=device)
        dist.all_reduce(summed)
        totals = dict(zip(keys, summed.tolist()))
    stats = {"train_loss": totals["loss"] / totals["seen"]}
    if "correct" in totals:
        stats["train_acc"] = 100.0 * totals["correct"] / totals["seen"]
    return stats


def slope_metrics(model: nn.Module) -> dict[str, Any]:
    """A metrics row's `penalty` (`collapse_penalty`) and `slopes` (mean slope per PReLU block)."""
    with torch.no_grad():
        penalty = float(collapsible.collapse_penalty(model))
    slopes = {name: sum(v) / len(v) for name, v in collapsible.slopes(model).items()}
    return {"penalty": penalty, "slopes": slopes}


class Trainer:
    """One model trained epoch by epoch on this process's share of the data: AdamW with cosine decay,
    in DDP under `torchrun`; `rebuild` after the module tree changed.

    Args:
        model: the unwrapped module, on `ctx.device`.
        dataset: the training set (each process trains on its own shard).
        step: the forward and loss of one batch (`labelled(loss_fn)` for `(input, label)` batches).
        collate_fn: how the loader makes batches of the dataset's items (None: torch's default).
        progress: show a progress bar (rank 0 only).
    """

    def __init__(
        self,
        model: nn.Module,
        ctx: Dist,
        dataset: Dataset,
        step: TrainStep,
        *,
        lr: float,
        slope_lr: float,
        weight_decay: float,
        batch_size: int,
        seed: int,
        collate_fn: Callable | None = None,
        progress: bool = False,
    ) -> None:
        self.raw = model
        self.ctx = ctx
        self.step = step
        self.lr, self.slope_lr, self.weight_decay = lr, slope_lr, weight_decay
        self.progress = progress and ctx.main
        self.scale = 1.0
        self.model = wrap(model, ctx)
        self.opt = make_optimizer(model, lr, weight_decay, slope_lr)
        self.loader, self.sampler = train_loader(dataset, batch_size, seed, ctx, collate_fn)

    def train(self, epoch: int, epochs: int) -> dict[str, float]:
        """Train epoch `epoch` (0-based) of `epochs`.

        Returns:
            `{"lr", "train_loss", ["train_acc",] "seconds"}`: the epoch's base learning rate, the
            `train_epoch` statistics and its wall time.
        """
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)
        self.scale = cosine(epoch, epochs)
        set_lr_scale(self.opt, self.scale)
        started = time.perf_counter()
        stats = train_epoch(
            self.model,
            self.raw,
            self.loader,
            self.opt,
            self.step,
            self.ctx.device,
            desc=f"epoch {epoch + 1}/{epochs}",
            progress=self.progress,
        )
        return {"lr": self.lr * self.scale, **stats, "seconds": time.perf_counter() - started}

    def rebuild(self) -> None:
        """After the module tree changed: DDP over the new tree, an optimizer over its parameters (the
        moments of those that survive kept) at the current epoch's learning rate."""
        self.model = wrap(self.raw, self.ctx)
        self.opt = make_optimizer(self.raw, self.lr, self.weight_decay, self.slope_lr, previous=self.opt)
        set_lr_scale(self.opt, self.scale)
