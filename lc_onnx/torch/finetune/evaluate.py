"""Measuring a model: top-1 accuracy over a *predict* callable, whatever runs the model, and its size.

A predict callable maps a batch of inputs (a CPU tensor `[N, ...]`) to logits `[N, classes]`, as a torch
tensor or a numpy array: `torch_predict` makes one from a module, `onnx_predict` from an ONNX file run in
onnxruntime, so the torch model and its fused export are measured by the same `accuracy`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lc_onnx.model import runtime

Predict = Callable[[torch.Tensor], torch.Tensor | np.ndarray]


def accuracy(predict: Predict, dataset: Dataset, batch_size: int = 256) -> float:
    """Top-1 accuracy in percent of `predict` on `dataset`'s `(input, label)` pairs."""
    correct = total = 0
    for x, y in DataLoader(dataset, batch_size=batch_size):
        pred = torch.as_tensor(predict(x)).argmax(1).cpu()
        correct += int((pred == y).sum())
        total += len(y)
    return 100.0 * correct / total


def torch_predict(model: nn.Module, device: torch.device | str = "cpu") -> Predict:
    """`model`'s logits on `device`, in eval mode and without gradients (the training flag is restored
    after every batch)."""

    @torch.no_grad()
    def predict(x: torch.Tensor) -> torch.Tensor:
        was_training = model.training
        model.eval()
        try:
            return model(x.to(device))
        finally:
            model.train(was_training)

    return predict


def onnx_predict(path: str | os.PathLike) -> Predict:
    """The logits (first output) of the ONNX model at `path` for its first input, in onnxruntime on CPU.

    Raises:
        UserError: onnxruntime cannot load or run the model.
    """
    # onnxruntime's own default optimisation level, as a deployed model would run.
    session = runtime.session(path, optimization="all")
    input_name, output_name = session.get_inputs()[0].name, session.get_outputs()[0].name
    what = Path(path).name

    def predict(x: torch.Tensor) -> np.ndarray:
        feed = {input_name: x.numpy()}
        return runtime.run(session, feed, [output_name], on="a batch of test images", what=what)[output_name]

    return predict


def count_params(model: nn.Module) -> int:
    """The number of parameter elements (buffers such as batch-norm statistics not counted)."""
    return sum(p.numel() for p in model.parameters())
