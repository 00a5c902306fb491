"""Models as users have them, for the export tests: random-init configs (no download) whose biases,
LayerScale gammas and norm parameters are drawn away from their init (timm starts gammas at 1e-5 and
biases at 0, which would hide a wrong fold and make the dynamo exporter share one zero tensor), exported
by the torch exporters, saved with external data, and fused from another working directory.
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

import lc_onnx
from lc_onnx.testing import ort_outputs, rel_l2

# Parameters that scale a branch per channel (timm LayerScale.gamma and MetaFormer Scale.scale, CaiT's
# gamma_1/gamma_2, ConvNeXt's gamma, torchvision CNBlock.layer_scale).
SCALE_NAMES = {"gamma", "gamma_1", "gamma_2", "scale", "layer_scale"}
NORMS = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d)


def linear_layers() -> tuple[type, ...]:
    from transformers.pytorch_utils import Conv1D

    return (nn.Linear, nn.Conv1d, nn.Conv2d, Conv1D)


def prelu_one() -> nn.PReLU:
    return nn.PReLU(1, init=1.0)


@torch.no_grad()
def randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Biases ~ N(0, 0.1²), LayerScale gammas ~ 0.5 + N(0, 0.1²), norm affine parameters and running
    statistics away from 1 and 0, all-zero weight matrices ~ N(0, 0.1²); in eval mode."""
    gen = torch.Generator().manual_seed(seed)

    def draw(t: torch.Tensor, mean: float, std: float) -> None:
        t.copy_(mean + std * torch.randn(t.shape, generator=gen))

    for module in model.modules():
        if isinstance(module, linear_layers()) and getattr(module, "bias", None) is not None:
            draw(module.bias, 0.0, 0.1)
        if isinstance(module, NORMS):
            if getattr(module, "weight", None) is not None:
                draw(module.weight, 1.0, 0.1)
            if getattr(module, "bias", None) is not None:
                draw(module.bias, 0.0, 0.1)
            if getattr(module, "running_mean", None) is not None:
                draw(module.running_mean, 0.0, 0.1)
                module.running_var.copy_(0.5 + torch.rand(module.running_var.shape, generator=gen))
    for name, param in model.named_parameters():
        if name.rsplit(".", 1)[-1] in SCALE_NAMES:
            draw(param, 0.5, 0.1)
        elif param.dim() >= 2 and not param.any():
            # zero-init heads (torchvision's ViT, timm's Mixer) would make the output independent of the input
            draw(param, 0.0, 0.1)
    return model.eval()


class FirstOutput(nn.Module):
    """The model on positional inputs, reduced to its first output (`last_hidden_state`, logits), as
    exported; transformers models get their inputs by name."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        super().__init__()
        self.model = model
        self.names = names if hasattr(model, "config") else None

    def forward(self, *args):
        out = self.model(**dict(zip(self.names, args))) if self.names else self.model(*args)
        if isinstance(out, torch.Tensor):
            return out
        return out[0] if isinstance(out, tuple) else next(iter(out.values()))


def export(
    model: nn.Module,
    inputs: Mapping[str, torch.Tensor],
    path: Path,
    *,
    dynamo: bool,
    dynamic: Mapping[str, Mapping[int, str]],
) -> Path:
    """Export `model(*inputs.values())` (first output `output`) with `dynamic` axes, then save it with
    external data (`path.data`, tensors of 1 KiB and more) beside `path`."""
    names = list(inputs)
    wrapped = FirstOutput(model, names).eval()
    args = tuple(inputs.values())
    tmp = path.with_suffix(".export.onnx")
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            dims: dict[str, torch.export.Dim] = {}
            shapes = tuple(
                {axis: dims.setdefault(label, torch.export.Dim(label, min=1, max=128)) for axis, label in dynamic[n].items()}
                for n in names
            )  # fmt: skip
            program = torch.onnx.export(
                wrapped, args, dynamo=True, input_names=names, output_names=["output"], opset_version=18,
                dynamic_shapes={"args": shapes}, verbose=False,
            )  # fmt: skip
            proto = program.model_proto
        else:
            torch.onnx.export(
                wrapped, args, str(tmp), dynamo=False, input_names=names, output_names=["output"],
                opset_version=18, dynamic_axes={n: dict(dynamic[n]) for n in names},
            )  # fmt: skip
            proto = onnx.load(str(tmp))
            tmp.unlink()
    onnx.save(
        proto,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=path.name + ".data",
    )
    return path


def fuse_elsewhere(source: Path, output: Path, workdir: Path, **options) -> lc_onnx.FuseResult:
    """`lc_onnx.fuse` of `source` (absolute path) run from `workdir`, another directory."""
    workdir.mkdir(exist_ok=True)
    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        return lc_onnx.fuse(source.resolve(), output=output.resolve(), **options)
    finally:
        os.chdir(cwd)


@torch.no_grad()
def torch_output(model: nn.Module, inputs: Mapping[str, torch.Tensor]) -> np.ndarray:
    return FirstOutput(model, list(inputs)).eval()(*inputs.values()).numpy()


def assert_matches_torch(
    path: Path, model: nn.Module, inputs: Mapping[str, torch.Tensor], tol: float = 1e-5
) -> float:
    """The ONNX model at `path` gives `model`'s output on `inputs` within rel. L2 `tol`; returns it."""
    got = ort_outputs(str(path), {k: v.numpy() for k, v in inputs.items()})[0]
    error = rel_l2(got, torch_output(model, inputs))
    assert error <= tol, error
    return error
