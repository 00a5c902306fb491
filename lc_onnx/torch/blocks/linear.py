"""The linear layers of an MLP block as affine maps `y = W·x + b` along a feature axis.

Three spellings, read into one form (`W` is `[out, in]`, the paper's layout, in float64) and written back
as a layer of the same kind:

- `nn.Linear` (any subclass): `weight` is `[out, in]`; features on the last axis.
- transformers' `Conv1D` (GPT-2 and relatives): `weight` is stored transposed, `[in, out]`, and the bias
  always exists; features on the last axis.
- a 1x1 `nn.Conv2d` with groups 1, stride 1 and no padding: `weight` is `[out, in, 1, 1]`; features on
  axis 1 (channels of NCHW).

Only floating-point weights count: a quantized layer is not an affine map we can compose.
"""

from __future__ import annotations

import enum
import sys

import torch
from torch import nn


class Axis(enum.Enum):
    """Where a layer's features are: the last axis (`Linear`, `Conv1D`) or axis 1 (a 1x1 conv)."""

    LAST = "last"
    CHANNEL = "channel"


def _conv1d_type() -> type[nn.Module] | None:
    # A model holding a Conv1D has imported transformers already; never import it for the check.
    module = sys.modules.get("transformers.pytorch_utils")
    return getattr(module, "Conv1D", None)


def is_conv1d(module: nn.Module) -> bool:
    conv1d = _conv1d_type()
    return conv1d is not None and isinstance(module, conv1d)


def is_pointwise_conv(module: nn.Module) -> bool:
    """A 1x1 `nn.Conv2d` that is a per-pixel linear map (groups 1, stride 1, no padding)."""
    if not isinstance(module, nn.Conv2d):
        return False
    padding = module.padding if isinstance(module.padding, tuple) else (module.padding,)
    return (
        tuple(module.kernel_size) == (1, 1)
        and tuple(module.stride) == (1, 1)
        and module.groups == 1
        and (padding == ("valid",) or all(p == 0 for p in padding))
    )


def is_linear(module: nn.Module) -> bool:
    """One of the three linear-layer spellings, with floating-point weights."""
    kind = isinstance(module, nn.Linear) or is_conv1d(module) or is_pointwise_conv(module)
    weight = getattr(module, "weight", None)
    return kind and isinstance(weight, torch.Tensor) and weight.is_floating_point()


def axis(module: nn.Module) -> Axis:
    return Axis.CHANNEL if isinstance(module, nn.Conv2d) else Axis.LAST


def kind_name(module: nn.Module) -> str:
    """`Linear`, `Conv1D` or `Conv2d 1x1`, for messages."""
    if isinstance(module, nn.Conv2d):
        return "Conv2d 1x1"
    return "Conv1D" if is_conv1d(module) else "Linear"


def features(module: nn.Module) -> tuple[int, int]:
    """(in, out) features."""
    out, inp = _matrix(module).shape
    return inp, out


def _matrix(module: nn.Module) -> torch.Tensor:
    weight = module.weight
    if isinstance(module, nn.Conv2d):
        return weight[:, :, 0, 0]
    return weight.t() if is_conv1d(module) else weight


def affine(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`(W [out, in], b [out] or None)` of a linear layer, in float64."""
    bias = module.bias
    return _matrix(module).detach().double(), None if bias is None else bias.detach().double()


def like(module: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """A fresh layer of `module`'s kind holding `weight` (`[out, in]`) and `bias`, on `module`'s device,
    dtype and training flag. A `Conv1D` always has a bias (zero when `bias` is None)."""
    out, inp = weight.shape
    if isinstance(module, nn.Conv2d):
        layer: nn.Module = nn.Conv2d(inp, out, 1, bias=bias is not None)
        values = weight[:, :, None, None]
    elif is_conv1d(module):
        layer = type(module)(out, inp)
        values = weight.t()
        bias = torch.zeros(out, dtype=weight.dtype) if bias is None else bias
    else:
        layer = nn.Linear(inp, out, bias=bias is not None)
        values = weight
    layer.to(device=module.weight.device, dtype=module.weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(values)
        if bias is not None:
            layer.bias.copy_(bias)
    layer.requires_grad_(module.weight.requires_grad)
    layer.train(module.training)
    return layer
