"""What a module is inside an MLP block, judged by its type and its parameters, never by its name.

- `LINEAR`: a linear layer (`linear.is_linear`: `nn.Linear`, transformers' `Conv1D`, a 1x1 `nn.Conv2d`).
- `PASS_THROUGH`: `nn.Identity`, dropouts and stochastic depth (the identity in eval mode).
- `BATCH_NORM`: `nn.BatchNorm1d`/`2d` with running statistics, a per-channel affine map in eval mode
  (the collapse folds it).
- `NORM`: any other normalisation (LayerNorm, GroupNorm, RMSNorm, transformers' and timm's own, a batch
  norm without running statistics): not linear in its input.
- `ACTIVATION`: `nn.PReLU`, `nn.LeakyReLU`, and any other module without parameters and without child
  modules that is none of the above — `nn.GELU`, timm's GELU, every class of transformers' `ACT2FN`
  (`GELUActivation`, `NewGELUActivation`, `QuickGELUActivation`, ...). That it keeps its input's shape is a
  property of the call, which `discover` checks.
- `OTHER`: anything else (a module with parameters that is no linear layer and no norm, a container).
"""

from __future__ import annotations

import enum

from torch import nn

from lc_onnx.torch.blocks import linear


class Role(enum.Enum):
    LINEAR = "linear layer"
    PASS_THROUGH = "pass-through"
    BATCH_NORM = "batch norm"
    NORM = "norm"
    ACTIVATION = "activation"
    OTHER = "other"


# Class names (anywhere in the MRO) of pass-throughs outside torch.nn: timm's DropPath and DropBlock,
# torchvision's StochasticDepth.
_PASS_THROUGH_NAMES = ("Dropout", "DropPath", "DropBlock", "StochasticDepth")


def role(module: nn.Module) -> Role:
    if linear.is_linear(module):
        return Role.LINEAR
    if isinstance(module, (nn.PReLU, nn.LeakyReLU)):
        return Role.ACTIVATION
    names = [cls.__name__ for cls in type(module).__mro__]
    if isinstance(module, (nn.Identity, nn.modules.dropout._DropoutNd)) or any(
        marker in name for name in names for marker in _PASS_THROUGH_NAMES
    ):
        return Role.PASS_THROUGH
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
        has_stats = module.running_mean is not None and module.running_var is not None
        return Role.BATCH_NORM if has_stats else Role.NORM
    if any("Norm" in name for name in names):
        return Role.NORM
    has_children = next(module.children(), None) is not None
    has_params = next(module.parameters(), None) is not None
    if not has_children and not has_params:
        return Role.ACTIVATION
    return Role.OTHER
