"""Finding, linearising and collapsing MLP blocks in PyTorch models: the public API of the torch half.

A *block* is `fc1 -> chain -> fc2` (see `records`): two linear layers — `nn.Linear`, transformers'
`Conv1D` or a 1x1 `nn.Conv2d` — and between them exactly one activation plus any pass-throughs
(`nn.Identity`, dropouts) and batch norms (eval semantics: dropout is the identity, batch norm uses its
running statistics). Blocks are found

- by data flow (`discover`, or `make_collapsible(..., example_inputs=...)`): one forward pass on example
  inputs records which module's output feeds which module's input, through any nesting; this is what
  finds transformers' MLPs (BERT's `intermediate.dense -> intermediate_act_fn -> output.dense`, GPT-2's
  `Conv1D`s, Whisper's `fc1 -> activation_fn -> F.dropout -> fc2`) and lists the near-blocks it refuses
  (gated MLPs, norms inside, activations called as functions, ...) with their reasons. The result is
  kept on the model, so everything below needs no second pass;
- by structure (`structural`) when no discovery was kept: timm's `Mlp` and `nn.Sequential` runs.

Collapsing writes one layer of fc1's kind (a `Conv1D` stays a `Conv1D`, a 1x1 conv a 1x1 conv) into
fc1's slot and puts `nn.Identity` in every other slot (fc2's with `weight = bias = None`, for forwards
that read the layer they call), so module names (and state-dict keys of the surviving layers) stay
stable. With the activation's slope taken to be 1 (the reference's rule) and each
chain element written as a per-channel affine map `a⊙h + c`: `W = W2·diag(a)·W1`,
`b = W2·(a⊙b1 + c) + b2`, computed in float64 and cast back.

Blocks are counted input side first; "the last k blocks" are the k closest to the output, as in the
reference implementation.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Collection, Sequence

import torch
from torch import nn

from lc_onnx.torch.blocks import discover as dataflow_discovery
from lc_onnx.torch.blocks import linear, structural
from lc_onnx.torch.blocks import records as block_records
from lc_onnx.torch.blocks.dataflow import ExampleInputs
from lc_onnx.torch.blocks.records import Block, Discovery, Refusal, Spec

logger = logging.getLogger(__name__)

# The reference (LayerCollapse, `CollapsibleMlp`) starts every PReLU at slope 0.01: close to the ReLU/GELU
# it replaces, so the network keeps working, while the penalty then pulls the slope towards 1.
DEFAULT_INIT = 0.01

__all__ = [
    "Block",
    "Refusal",
    "collapse",
    "collapse_penalty",
    "collapse_steps",
    "convert_blocks",
    "discover",
    "find_blocks",
    "make_collapsible",
    "prelu_blocks",
    "refusals",
    "restore_structure",
    "slopes",
    "surviving_linears",
]


def discover(model: nn.Module, example_inputs: ExampleInputs) -> Discovery:
    """Find `model`'s blocks from one forward pass on `example_inputs` and keep the result on `model`.

    Args:
        model: any `nn.Module`; run once in eval mode without gradients, left as it was.
        example_inputs: one tensor, a tuple of positional arguments or a dict of keyword arguments
            (`{"input_ids": ..., "attention_mask": ...}`).

    Returns:
        The blocks (as `Spec`s, input side first) and the refusals, each with its reason.

    Raises:
        UserError: naming `example_inputs`, when the forward fails on them.
    """
    found = dataflow_discovery.find(model, example_inputs)
    block_records.remember(model, found)
    for refusal in found.refusals:
        logger.info("not a collapsible block: %s", refusal)
    logger.info("discovered %d MLP block(s), %d refused", len(found.specs), len(found.refusals))
    return found


def find_blocks(model: nn.Module) -> list[Block]:
    """All collapsible MLP blocks of `model`, input side first (not yet collapsed ones only): those of
    the discovery kept on it (or on submodules), else those found by structure."""
    if block_records.recorded(model):
        found = (block_records.resolve(model, spec) for spec in block_records.recorded_specs(model))
        return [block for block in found if block is not None]
    return structural.find(model)[0]


def refusals(model: nn.Module) -> list[Refusal]:
    """The near-blocks of `model` that are not collapsible, each with its reason (from the discovery kept
    on it, else the timm MLPs that structure alone refuses)."""
    if block_records.recorded(model):
        return block_records.recorded_refusals(model)
    return structural.find(model)[1]


def make_collapsible(
    model: nn.Module,
    fraction: float = 1.0,
    init: float | None = None,
    example_inputs: ExampleInputs | None = None,
    *,
    per_channel: bool = False,
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
        example_inputs: run `discover` on these first (needed for transformers models and any model
            whose MLPs are neither timm `Mlp`s nor `nn.Sequential` runs). Without them, a discovery
            kept on the model is used, else blocks are found by structure.
        per_channel: one slope per hidden unit instead of one per block. `nn.PReLU` applies per-channel
            slopes on dimension 1, which is the hidden dimension only for 2-D `(batch, features)` input
            (VGG-style classifiers) and 1x1 convolutions, not for token MLPs; do not use it for
            transformers.

    Returns:
        The qualified names of the replaced activation modules. Blocks whose activation already is a
        PReLU are counted but left as they are (and not returned).
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    if example_inputs is not None:
        discover(model, example_inputs)
    found = find_blocks(model)
    return convert_blocks(found[len(found) - math.ceil(fraction * len(found)) :], init, per_channel)


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
        prelu = nn.PReLU(linear.features(fc1)[1] if per_channel else 1, init=float(slope))
        prelu.to(device=fc1.weight.device, dtype=fc1.weight.dtype)
        block.replace(block.act_key, prelu)
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
    """Replace every block whose activation is linear within `threshold` by one linear layer, in place.

    Linear within threshold: a PReLU/LeakyReLU whose slopes are all within `threshold` of 1, or an
    `nn.Identity`. The slope is then taken to be exactly 1 (so a slope of 0.97 changes outputs slightly;
    a slope of 1 keeps them to float rounding). Batch norms are folded with their running statistics, so
    the collapsed model matches the original in eval mode. The new layer is of fc1's kind (`nn.Linear`,
    `Conv1D`, 1x1 `nn.Conv2d`).

    Returns:
        Qualified names of the new layers (the former `fc1` slots), output side first. A chain of
        blocks sharing linear layers (`Linear, act, Linear, act, Linear`) becomes one layer, named once.
    """
    final = surviving_linears(collapse_steps(model, threshold))
    logger.info("collapsed into %d layer(s): %s", len(final), ", ".join(final))
    return final


def surviving_linears(steps: Sequence[tuple[str, str]]) -> list[str]:
    """The fc1 names of `collapse_steps` output that are still layers (chains absorb later ones)."""
    final: list[str] = []
    for fc1_name, fc2_name in steps:
        if fc2_name in final:  # a chain: the later block's layer is now part of this one
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
            steps.append((block.fc1_name, block.fc2_name))
    return steps


def restore_structure(
    model: nn.Module,
    prelu: Collection[str],
    collapsed: Sequence[str],
    specs: Sequence[Spec] = (),
) -> None:
    """Rebuild the module tree of a fine-tuned model on a fresh one, values to be loaded afterwards.

    Args:
        model: a freshly built model of the same architecture, changed in place.
        prelu: activation names that were PReLU when the state was saved (`make_collapsible` names); a
            name may carry `:N` for a PReLU with N slopes.
        collapsed: fc1 names in the order `collapse_steps` collapsed them.
        specs: the blocks a discovery had found on the saved model (kept on `model` as its discovery, so
            no example inputs are needed); empty for blocks found by structure.
    """
    if specs:
        block_records.remember(model, Discovery(tuple(specs)))
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
    w1, b1 = linear.affine(fc1)
    w2, b2 = linear.affine(fc2)
    scale = torch.ones(w1.shape[0], dtype=torch.float64, device=w1.device)
    shift = torch.zeros_like(scale)
    for key in block.keys[1:-1]:
        module = block.module(key)
        if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
            if module.running_mean is None or module.running_var is None:
                logger.info("%s: not collapsed, %s has no running statistics", block.name, key)
                return False
            inv = torch.rsqrt(module.running_var.double() + module.eps)
            a = inv * module.weight.double() if module.affine else inv
            c = -module.running_mean.double() * a + (module.bias.double() if module.affine else 0.0)
            scale, shift = scale * a, shift * a + c
    weight = w2 @ (scale[:, None] * w1)
    has_bias = b1 is not None or b2 is not None or bool(shift.abs().max() > 0)
    bias = None
    if has_bias:
        b1 = torch.zeros_like(scale) if b1 is None else b1
        b2 = torch.zeros(w2.shape[0], dtype=torch.float64, device=w2.device) if b2 is None else b2
        bias = w2 @ (scale * b1 + shift) + b2.to(w2.device)
    block.replace(block.keys[0], linear.like(fc1, weight, bias))
    for key in block.keys[1:-1]:
        block.replace(key, nn.Identity())
    block.replace(block.keys[-1], _folded_layer())
    return True


def _folded_layer() -> nn.Identity:
    """The identity that takes fc2's slot: with `weight` and `bias` (registered as None parameters, so
    nothing is stored) for forwards that inspect the layer they call (transformers' T5 reads
    `wo.weight.dtype`)."""
    identity = nn.Identity()
    identity.register_parameter("weight", None)
    identity.register_parameter("bias", None)
    return identity
