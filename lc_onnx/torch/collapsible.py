"""Finding, linearising and collapsing MLP blocks in PyTorch models.

A *block* is `fc1 -> chain -> fc2` where `fc1`, `fc2` are `nn.Linear` and the chain holds exactly one
activation plus any number of `nn.Identity`, `nn.Dropout` and `nn.BatchNorm1d` (eval semantics: dropout is
the identity, batch norm uses its running statistics). Two spellings are recognised:

- timm's `Mlp` (`fc1, act, drop1, norm, fc2, drop2`), wherever it sits: ViT/DeiT blocks, both MLP-Mixer
  MLPs (`mlp_tokens`, `mlp_channels`), any model built from `timm.layers.Mlp`. Skipped: `Mlp` with
  `use_conv=True` (1x1 convolutions, not `nn.Linear`), `Mlp` whose `norm` is a LayerNorm (not linear),
  and the gated variants `GluMlp`, `SwiGLU`, `GatedMlp` (`act(x1) * x2` is not linear in `x`).
- any `nn.Sequential` containing `Linear -> act -> [Dropout] -> [BatchNorm1d] -> Linear` (a VGG-style
  classifier). Consecutive blocks may share a Linear (`Linear, ReLU, Linear, ReLU, Linear` is two blocks).

Collapsing rewrites `fc1` into the single linear layer and puts `nn.Identity` in every other slot, so
module names (and state-dict keys of the surviving layers) stay stable. With the activation's slope taken
to be 1 (the reference's rule) and each chain element written as a per-channel affine map `a⊙h + c`:
`W = W2·diag(a)·W1`, `b = W2·(a⊙b1 + c) + b2`, computed in float64 and cast back.

Blocks are counted in `model.named_modules()` order; "the last k blocks" are the k closest to the output,
as in the reference implementation.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import torch
from torch import nn

logger = logging.getLogger(__name__)

# Activations that `make_collapsible` replaces. Anything else between two Linears ends the match.
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

# The reference (LayerCollapse, `CollapsibleMlp`) starts every PReLU at slope 0.01: close to the ReLU/GELU
# it replaces, so the network keeps working, while the penalty then pulls the slope towards 1.
DEFAULT_INIT = 0.01


@dataclass(frozen=True)
class Block:
    """One collapsible MLP block: `parent`'s children `keys[0]` (fc1) ... `keys[-1]` (fc2), in order.

    Attributes:
        name: the qualified name of the activation module (`blocks.5.mlp.act`, `classifier.1`).
        parent: the module owning all slots (the timm `Mlp` itself, or the `nn.Sequential`).
        keys: child names from fc1 to fc2 inclusive.
        act_key: the child name of the activation.
        prefix: qualified name of `parent` ("" for the root).
    """

    name: str
    parent: nn.Module
    keys: tuple[str, ...]
    act_key: str
    prefix: str

    def module(self, key: str) -> nn.Module:
        return self.parent.get_submodule(key)

    @property
    def act(self) -> nn.Module:
        return self.module(self.act_key)

    @property
    def fc1_name(self) -> str:
        return _join(self.prefix, self.keys[0])


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _timm_mlp_type() -> type[nn.Module] | None:
    try:
        from timm.layers import Mlp
    except ImportError:
        return None
    return Mlp


def find_blocks(model: nn.Module) -> list[Block]:
    """All collapsible MLP blocks of `model`, input side first (not yet collapsed ones only)."""
    mlp_type = _timm_mlp_type()
    blocks: list[Block] = []
    for prefix, module in model.named_modules():
        # Exact type: timm's gated MLPs are separate classes today, but a subclass may change forward().
        if mlp_type is not None and type(module) is mlp_type:
            block = _timm_block(prefix, module)
            if block is not None:
                blocks.append(block)
        elif isinstance(module, nn.Sequential):
            blocks.extend(_sequential_blocks(prefix, module))
    return blocks


def _timm_block(prefix: str, mlp: nn.Module) -> Block | None:
    # Any `act` counts here: in timm's Mlp the slot is the activation by construction (timm's own GELU
    # classes included).
    fc1, norm, fc2 = mlp.fc1, mlp.norm, mlp.fc2
    if not (isinstance(fc1, nn.Linear) and isinstance(fc2, nn.Linear)):
        logger.debug("%s: skipped, fc1/fc2 are not nn.Linear (use_conv or already collapsed)", prefix)
        return None
    if not isinstance(norm, (nn.Identity, nn.BatchNorm1d)):
        logger.debug("%s: skipped, norm %s is not linear", prefix, type(norm).__name__)
        return None
    return Block(_join(prefix, "act"), mlp, ("fc1", "act", "drop1", "norm", "fc2"), "act", prefix)


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
        blocks.append(Block(_join(prefix, act_key), seq, keys, act_key, prefix))
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


def make_collapsible(
    model: nn.Module, fraction: float = 1.0, init: float | None = None, *, per_channel: bool = False
) -> list[str]:
    """Replace the activation of the last `ceil(fraction * n)` MLP blocks with a trainable `nn.PReLU`.

    Args:
        model: changed in place.
        fraction: share of the n blocks found by `find_blocks`, counted from the output end.
        init: the PReLU's starting slope. `None` (default) keeps a `LeakyReLU`'s own negative slope (the
            swap is then exact) and uses 0.01 otherwise, the reference's choice for GELU blocks: a slope
            near 0 keeps the block close to the ReLU/GELU it replaces, so accuracy survives the swap, and
            `collapse_penalty` pulls it to 1 during fine-tuning. `init=1.0` makes blocks linear at once
            (collapsible without training, at the cost of accuracy).
        per_channel: one slope per hidden unit instead of one per block. `nn.PReLU` applies per-channel
            slopes on dimension 1, which is the hidden dimension only for 2-D `(batch, features)` input
            (VGG-style classifiers), not for token MLPs; do not use it for transformers.

    Returns:
        The qualified names of the replaced activation modules. Blocks whose activation already is a
        PReLU are counted but left as they are (and not returned).
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    blocks = find_blocks(model)
    return convert_blocks(blocks[len(blocks) - math.ceil(fraction * len(blocks)) :], init, per_channel)


def convert_blocks(blocks: list[Block], init: float | None = None, per_channel: bool = False) -> list[str]:
    """Swap the activation of exactly these blocks for PReLU (see `make_collapsible`); returns names."""
    changed = []
    for block in blocks:
        act = block.act
        if isinstance(act, nn.PReLU):
            continue
        slope = init
        if slope is None:
            slope = act.negative_slope if isinstance(act, nn.LeakyReLU) else DEFAULT_INIT
        fc1 = block.module(block.keys[0])
        prelu = nn.PReLU(fc1.out_features if per_channel else 1, init=float(slope))
        prelu.to(device=fc1.weight.device, dtype=fc1.weight.dtype)
        setattr(block.parent, block.act_key, prelu)
        changed.append(block.name)
    logger.info("made %d block(s) collapsible: %s", len(changed), ", ".join(changed))
    return changed


def prelu_blocks(model: nn.Module) -> list[Block]:
    """The blocks whose activation is a PReLU: the ones `collapse_penalty` and `collapse` act on."""
    return [b for b in find_blocks(model) if isinstance(b.act, nn.PReLU)]


def collapse_penalty(model: nn.Module) -> torch.Tensor:
    """Σ over PReLU blocks of mean over channels of (1 − α)²: 0-dim, differentiable in the slopes.

    Zero (on the model's device) when the model has no PReLU block.
    """
    terms = [((1.0 - b.act.weight) ** 2).mean() for b in prelu_blocks(model)]
    if not terms:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        return torch.zeros((), device=device)
    return torch.stack(terms).sum()


def slopes(model: nn.Module) -> dict[str, list[float]]:
    """Activation name -> the PReLU slopes of every PReLU block."""
    return {b.name: b.act.weight.detach().cpu().flatten().tolist() for b in prelu_blocks(model)}


def _act_is_linear(act: nn.Module, threshold: float) -> bool:
    if isinstance(act, nn.Identity):
        return True
    if isinstance(act, nn.PReLU):
        return bool(((act.weight.detach() - 1.0).abs() <= threshold).all())
    if isinstance(act, nn.LeakyReLU):
        return abs(act.negative_slope - 1.0) <= threshold
    return False


def collapse(model: nn.Module, threshold: float = 0.05) -> list[str]:
    """Replace every block whose activation is linear within `threshold` by one `nn.Linear`, in place.

    Linear within threshold: a PReLU/LeakyReLU whose slopes are all within `threshold` of 1, or an
    `nn.Identity`. The slope is then taken to be exactly 1 (so a slope of 0.97 changes outputs slightly;
    a slope of 1 keeps them to float rounding). Batch norms are folded with their running statistics, so
    the collapsed model matches the original in eval mode.

    Returns:
        Qualified names of the new linear layers (the former `fc1` slots), output side first. A chain of
        blocks sharing Linears (`Linear, act, Linear, act, Linear`) becomes one Linear, named once.
    """
    final = surviving_linears(collapse_steps(model, threshold))
    logger.info("collapsed into %d Linear(s): %s", len(final), ", ".join(final))
    return final


def surviving_linears(steps: Sequence[tuple[str, str]]) -> list[str]:
    """The fc1 names of `collapse_steps` output that are still Linears (chains absorb later ones)."""
    final: list[str] = []
    for fc1_name, fc2_name in steps:
        if fc2_name in final:  # a chain: the later block's Linear is now part of this one
            final.remove(fc2_name)
        final.append(fc1_name)
    return final


def collapse_steps(
    model: nn.Module,
    threshold: float = 0.05,
    only: Collection[str] | None = None,
    *,
    any_activation: bool = False,
) -> list[tuple[str, str]]:
    """`collapse`, returning every step as (fc1 name, fc2 name) in the order done, absorbed ones included.

    Replaying the fc1 names in this order with `restore_structure` rebuilds the same module tree (used to
    load checkpoints of partly collapsed models). `only` restricts collapsing to blocks with these
    activation names. `any_activation` collapses whatever the activation (the function changes; used to
    build the collapsed architecture).
    """
    steps = []
    # Output side first: in `Linear, act, Linear, act, Linear` the later block's new Linear becomes the
    # earlier block's fc2, which must be in place before the earlier block reads it.
    for block in reversed(find_blocks(model)):
        if only is not None and block.name not in only:
            continue
        if (any_activation or _act_is_linear(block.act, threshold)) and _collapse_block(block):
            steps.append((block.fc1_name, _join(block.prefix, block.keys[-1])))
    return steps


def restore_structure(model: nn.Module, prelu: Collection[str], collapsed: Sequence[str]) -> None:
    """Rebuild the module tree of a fine-tuned model on a fresh one, values to be loaded afterwards.

    Args:
        model: a freshly built model of the same architecture, changed in place.
        prelu: activation names that were PReLU when the state was saved (`make_collapsible` names); a
            name may carry `:N` for a PReLU with N slopes.
        collapsed: fc1 names in the order `collapse_steps` collapsed them.
    """
    counts = dict(name.split(":") if ":" in name else (name, "1") for name in prelu)
    by_name = {b.name: b for b in find_blocks(model)}
    for name, count in counts.items():
        if name not in by_name:
            raise ValueError(f"checkpoint names a PReLU block {name!r} this model does not have")
        convert_blocks([by_name[name]], init=1.0, per_channel=int(count) > 1)
    for fc1_name in collapsed:
        block = next((b for b in find_blocks(model) if b.fc1_name == fc1_name), None)
        if block is None or not _collapse_block(block):
            raise ValueError(f"checkpoint names a collapsed block at {fc1_name!r} this model does not have")


def _collapse_block(block: Block) -> bool:
    fc1 = block.module(block.keys[0])
    fc2 = block.module(block.keys[-1])
    scale = torch.ones(fc1.out_features, dtype=torch.float64, device=fc1.weight.device)
    shift = torch.zeros_like(scale)
    for key in block.keys[1:-1]:
        module = block.module(key)
        if isinstance(module, nn.BatchNorm1d):
            if module.running_mean is None or module.running_var is None:
                logger.info("%s: not collapsed, %s has no running statistics", block.name, key)
                return False
            inv = torch.rsqrt(module.running_var.double() + module.eps)
            a = inv * module.weight.double() if module.affine else inv
            c = -module.running_mean.double() * a + (module.bias.double() if module.affine else 0.0)
            scale, shift = scale * a, shift * a + c
    w1, w2 = fc1.weight.double(), fc2.weight.double()
    b1 = fc1.bias.double() if fc1.bias is not None else torch.zeros_like(scale)
    b2 = fc2.bias.double() if fc2.bias is not None else torch.zeros(fc2.out_features, dtype=torch.float64)
    weight = w2 @ (scale[:, None] * w1)
    bias = w2 @ (scale * b1 + shift) + b2.to(w2.device)
    has_bias = fc1.bias is not None or fc2.bias is not None or bool(shift.abs().max() > 0)
    linear = nn.Linear(fc1.in_features, fc2.out_features, bias=has_bias)
    linear.to(device=fc1.weight.device, dtype=fc1.weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if has_bias:
            linear.bias.copy_(bias)
    linear.train(fc1.training)
    setattr(block.parent, block.keys[0], linear)
    for key in block.keys[1:]:
        setattr(block.parent, key, nn.Identity())
    return True
