"""Knowledge-distillation baseline: a student with the collapsed model's architecture, trained from scratch.

The student is the teacher's architecture with the MLP blocks LayerCollapse would collapse (the last
`ceil(fraction * n)`) each replaced by one `in x out` Linear, as `collapse` leaves them, all of it freshly
initialised. Loss (Hinton et al.): `alpha * T² * KL(softmax(t/T) ||
softmax(s/T)) + (1 - alpha) * cross-entropy`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from lc_onnx.torch.blocks import collapsible
from lc_onnx.torch.data.datasets import Splits
from lc_onnx.torch.finetune.evaluate import accuracy, count_params, torch_predict
from lc_onnx.torch.finetune.loop import cosine, labelled, make_optimizer, set_lr_scale, train_epoch


def collapsed_student(build: Callable[[], nn.Module], fraction: float = 1.0) -> nn.Module:
    """`build()` with its last `ceil(fraction * n)` MLP blocks (the ones `make_collapsible` would pick)
    each replaced by one freshly initialised Linear: the architecture LayerCollapse ends with."""
    student = build()
    blocks = collapsible.find_blocks(student)
    only = {b.name for b in blocks[len(blocks) - math.ceil(fraction * len(blocks)) :]}
    steps = collapsible.collapse_steps(student, threshold=float("inf"), only=only, any_activation=True)
    for fc1_name in collapsible.surviving_linears(steps):
        student.get_submodule(fc1_name).reset_parameters()
    return student


def distill(
    student: nn.Module,
    teacher: nn.Module,
    splits: Splits,
    *,
    epochs: int,
    temperature: float = 4.0,
    alpha: float = 0.9,
    lr: float = 1e-3,
    weight_decay: float = 0.05,
    batch_size: int = 64,
    seed: int = 0,
    device: torch.device | None = None,
) -> dict[str, Any]:
    """Train `student` against `teacher`'s logits; returns test accuracy, parameters and wall seconds."""
    device = device or torch.device("cpu")
    student.to(device)
    teacher.to(device).eval()
    loader = DataLoader(
        splits.train, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed)
    )
    opt = make_optimizer(student, lr, weight_decay)

    def loss_fn(m: nn.Module, x: torch.Tensor, y: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            soft = (teacher(x) / temperature).softmax(1)
        kd = nn.functional.kl_div((logits / temperature).log_softmax(1), soft, reduction="batchmean")
        return alpha * temperature**2 * kd + (1 - alpha) * nn.functional.cross_entropy(logits, y)

    started = time.perf_counter()
    for epoch in range(epochs):
        set_lr_scale(opt, cosine(epoch, epochs))
        train_epoch(student, student, loader, opt, labelled(loss_fn), device)
    seconds = time.perf_counter() - started
    return {
        "accuracy": accuracy(torch_predict(student, device), splits.test),
        "params": count_params(student),
        "seconds": seconds,
    }
