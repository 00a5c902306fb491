"""Blocks found by structure alone, without a forward pass: the spellings whose forward is known.

- timm's `Mlp` (`fc1, act, drop1, norm, fc2, drop2`; exact type: a subclass may change `forward`),
  wherever it sits: ViT/DeiT blocks, both MLP-Mixer MLPs (`mlp_tokens`, `mlp_channels`), PoolFormer's
  `use_conv=True` MLPs (1x1 convolutions), any model built from `timm.layers.Mlp`. Refused, with a
  reason: an `Mlp` whose `norm` is a LayerNorm or another non-batch norm, and the gated variants
  `GluMlp`, `SwiGLU`, `SwiGLUPacked`, `GatedMlp` (`act(x1) * x2` is not linear in `x`).
- any `nn.Sequential` containing `Linear -> act -> [Dropout] -> [BatchNorm1d] -> Linear` (a VGG-style
  classifier). Consecutive blocks may share a Linear (`Linear, ReLU, Linear, ReLU, Linear` is two blocks).

Blocks are listed in `model.named_modules()` order, input side first. Everything else (transformers
models, torchvision's MLPs outside a Sequential, functional activations) needs `discover`'s forward pass.
"""

from __future__ import annotations

import logging

from torch import nn

from lc_onnx.torch.blocks import linear
from lc_onnx.torch.blocks.records import Block, Refusal, RefusalKind, join

logger = logging.getLogger(__name__)

# Activations recognised inside an nn.Sequential. Anything else between two Linears ends the match.
ACTIVATIONS: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.GELU,
    nn.SiLU,
    nn.LeakyReLU,
    nn.PReLU,
    nn.ELU,
    nn.CELU,
    nn.SELU,
    nn.Mish,
    nn.Hardswish,
    nn.Tanh,
    nn.Sigmoid,
    nn.Identity,
)
# Linear (in eval mode) chain elements allowed around the activation.
_PASS_THROUGH: tuple[type[nn.Module], ...] = (nn.Identity, nn.Dropout)
_TIMM_GATED = ("GluMlp", "SwiGLU", "SwiGLUPacked", "GatedMlp")
_TIMM_KEYS = ("fc1", "act", "drop1", "norm", "fc2")


def _timm_layers():
    try:
        from timm import layers
    except ImportError:
        return None
    return layers


def find(model: nn.Module) -> tuple[list[Block], list[Refusal]]:
    """The blocks of `model` (input side first) and the refused timm MLPs."""
    layers = _timm_layers()
    mlp_type = getattr(layers, "Mlp", None)
    gated = tuple(getattr(layers, name) for name in _TIMM_GATED if hasattr(layers, name))
    blocks: list[Block] = []
    refusals: list[Refusal] = []
    for prefix, module in model.named_modules():
        if mlp_type is not None and type(module) is mlp_type:
            found = _timm_block(prefix, module)
            if isinstance(found, Block):
                blocks.append(found)
            elif found is not None:
                refusals.append(found)
        elif gated and type(module) in gated:
            refusals.append(
                Refusal(
                    join(prefix, "act"),
                    RefusalKind.GATED,
                    f"gated MLP (timm {type(module).__name__}): act(x·Wg) ⊙ (x·Wu) is not linear in x",
                )
            )
        elif isinstance(module, nn.Sequential):
            blocks.extend(_sequential_blocks(prefix, module))
    return blocks, refusals


def _timm_block(prefix: str, mlp: nn.Module) -> Block | Refusal | None:
    # Any `act` counts here: in timm's Mlp the slot is the activation by construction (timm's own GELU
    # classes included).
    fc1, norm, fc2 = mlp.fc1, mlp.norm, mlp.fc2
    if not (linear.is_linear(fc1) and linear.is_linear(fc2)):
        logger.debug("%s: skipped, fc1/fc2 are no linear layers (already collapsed)", prefix)
        return None
    batch_norm = nn.BatchNorm2d if linear.axis(fc1) is linear.Axis.CHANNEL else nn.BatchNorm1d
    if not isinstance(norm, (nn.Identity, batch_norm)):
        return Refusal(
            join(prefix, "act"),
            RefusalKind.NORM,
            f"{type(norm).__name__} {join(prefix, 'norm')} between {join(prefix, 'fc1')} and "
            f"{join(prefix, 'fc2')} is a norm, not linear",
        )
    return Block(join(prefix, "act"), mlp, _TIMM_KEYS, "act", prefix)


def _sequential_blocks(prefix: str, seq: nn.Sequential) -> list[Block]:
    items = list(seq.named_children())
    blocks = []
    i = 0
    while i < len(items):
        if not isinstance(items[i][1], nn.Linear):
            i += 1
            continue
        end, act_index = _match_chain(items, i + 1)
        if end is None:
            i += 1
            continue
        keys = tuple(key for key, _ in items[i : end + 1])
        act_key = items[act_index][0]
        blocks.append(Block(join(prefix, act_key), seq, keys, act_key, prefix))
        i = end  # fc2 may be the next block's fc1
    return blocks


def _match_chain(items: list[tuple[str, nn.Module]], start: int) -> tuple[int | None, int | None]:
    """(index of fc2, index of the activation) for a chain starting at `start`, or (None, None)."""
    act_index = None
    seen_norm = False
    for j in range(start, len(items)):
        module = items[j][1]
        if isinstance(module, nn.Linear):
            return (j, act_index) if act_index is not None else (None, None)
        if isinstance(module, _PASS_THROUGH):
            continue
        if isinstance(module, nn.BatchNorm1d) and act_index is not None and not seen_norm:
            seen_norm = True
            continue
        if isinstance(module, ACTIVATIONS) and act_index is None:
            act_index = j
            continue
        return None, None
    return None, None
