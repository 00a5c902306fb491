"""ONNX export that the graph pass can collapse: `PRelu` stays one op, the batch dimension is dynamic.

Both torch exporters keep `nn.PReLU` as an ONNX `PRelu` node (checked by the tests): the TorchScript one
(`dynamo=False`) writes `Gemm`/`MatMul + Add` around it, the dynamo one (`torch.export`, then onnxscript)
the same ops after its optimiser folds the transposes into constants.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from lc_onnx.model import files

logger = logging.getLogger(__name__)

OPSET = 18


def export_onnx(
    model: nn.Module,
    example_inputs: torch.Tensor | Sequence[torch.Tensor] | Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    *,
    dynamo: bool = True,
    dynamic_batch: bool = True,
    dynamic_sequence: bool = False,
) -> Path:
    """Export `model` (in eval mode) to `path`, written atomically; returns the path.

    Args:
        model: exported in eval mode; its training flag is restored afterwards.
        example_inputs: one tensor or a sequence of tensors (inputs named `input`, `input_1`, ...), or a
            dict of keyword arguments (`{"input_ids": ..., "attention_mask": ...}`: inputs named by the
            keys). The (first) output is `output`: of a transformers `ModelOutput` or a tuple, its first
            tensor (`logits`, `last_hidden_state`).
        dynamo: `True` for the `torch.export`-based exporter, `False` for the TorchScript one.
        dynamic_batch: make dimension 0 of every input and output symbolic (`batch`).
        dynamic_sequence: make dimension 1 of every input, and of outputs of rank 3 or more, symbolic
            (`sequence`): token inputs of any length, as a tokenizer pads them.
    """
    was_training = model.training
    input_names = export_input_names(example_inputs)
    if isinstance(example_inputs, Mapping):
        inputs = tuple(example_inputs.values())
        module: nn.Module = _FirstOutput(model, input_names).eval()
    else:
        inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
        # transformers models return a ModelOutput; others are exported as they are
        module = _FirstOutput(model, None).eval() if hasattr(model, "config") else model
    path = Path(path)
    model.eval()
    try:
        with files.atomic_path(path) as tmp:
            _export(
                module,
                inputs,
                tmp,
                input_names,
                dynamo=dynamo,
                dims=_dynamic_dims(dynamic_batch, dynamic_sequence),
            )
    finally:
        model.train(was_training)
    logger.info("exported %s (%s exporter)", path, "dynamo" if dynamo else "TorchScript")
    return path


def export_input_names(
    example_inputs: torch.Tensor | Sequence[torch.Tensor] | Mapping[str, torch.Tensor],
) -> list[str]:
    """The ONNX input names `export_onnx` gives these example inputs (before the exporter drops unused
    ones): a dict's keys, else `input`, `input_1`, ..."""
    if isinstance(example_inputs, Mapping):
        return list(example_inputs)
    n = 1 if isinstance(example_inputs, torch.Tensor) else len(example_inputs)
    return ["input"] + [f"input_{i}" for i in range(1, n)]


class _FirstOutput(nn.Module):
    """`model` called with positional inputs (by keyword when `names` are given), reduced to its first
    output tensor."""

    def __init__(self, model: nn.Module, names: list[str] | None) -> None:
        super().__init__()
        self.model = model
        self.names = names

    def forward(self, *args):
        return first_tensor(self.model(**dict(zip(self.names, args))) if self.names else self.model(*args))


def first_tensor(out) -> torch.Tensor:
    """A model's first output tensor: of a transformers `ModelOutput` (a mapping) or a tuple, its first
    entry, recursively (`logits`, `last_hidden_state`)."""
    while not isinstance(out, torch.Tensor):
        out = next(iter(out.values())) if isinstance(out, Mapping) else out[0]
    return out


def _dynamic_dims(batch: bool, sequence: bool) -> dict[int, str]:
    """The symbolic dims of every input: dimension -> name."""
    return {**({0: "batch"} if batch else {}), **({1: "sequence"} if sequence else {})}


def _export(
    model: nn.Module,
    inputs: tuple[torch.Tensor, ...],
    path: Path,
    input_names: list[str],
    *,
    dynamo: bool,
    dims: Mapping[int, str],
) -> None:
    """Run the chosen torch exporter on `model`, writing the ONNX file `path`; `dims` of every input
    (and of the output, where it has them) are symbolic."""
    kwargs: dict = {"input_names": input_names, "output_names": ["output"], "opset_version": OPSET}
    if dynamo:
        if dims:
            named = {axis: torch.export.Dim(name) for axis, name in dims.items()}
            shapes = tuple(dict(named) for _ in inputs)
            # `_FirstOutput.forward(*args)`: torch.export names the shapes of variadic arguments by "args"
            kwargs["dynamic_shapes"] = {"args": shapes} if isinstance(model, _FirstOutput) else shapes
        # The dynamo exporter prints progress lines on stdout; library code must not. Inputs sharing one
        # dim (every input's `batch`) make it warn that the name is used once: that is the intent.
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="# The axis name", category=UserWarning)
            program = torch.onnx.export(model, inputs, dynamo=True, verbose=False, **kwargs)
        # Tensors inline in the .onnx file: the models this is for are far below 2 GiB.
        program.save(str(path), external_data=False)
    else:
        if dims:
            with torch.no_grad():
                rank = model(*inputs).dim()
            out_dims = {axis: name for axis, name in dims.items() if axis == 0 or rank >= 3}
            kwargs["dynamic_axes"] = {**{name: dict(dims) for name in input_names}, "output": out_dims}
        with warnings.catch_warnings():
            # Tracing warns about every Python branch on shapes in timm's forward; they are harmless
            # for a fixed architecture and would bury real warnings.
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            torch.onnx.export(model, inputs, str(path), dynamo=False, **kwargs)
