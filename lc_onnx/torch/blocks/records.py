"""MLP blocks as values: where a block sits (`Block`, `Spec`), why a near-block is not one (`Refusal`), and
the record of a discovery kept on the model.

A block is `fc1 -> chain -> fc2`: two linear layers (`linear`) and, between them, exactly one activation
plus any pass-throughs and batch norms (`roles`). `Spec` names its modules (qualified names, from fc1 to
fc2, and the activation); `Block` is a spec resolved against a model: the modules' deepest common
ancestor (`parent`) and their names below it (`keys`), so that a block whose layers live in different
submodules (BERT's `intermediate.dense` and `output.dense`) is one block too.

`discover` finds blocks in one forward pass; the result (`Discovery`) is kept on the model it ran on (as
a plain attribute), so `find_blocks`, `collapse_penalty`, `collapse` and checkpoints need no second pass.
A spec whose modules no longer form a block (collapsed, replaced) is skipped when resolved.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from lc_onnx.torch.blocks import linear, roles
from lc_onnx.torch.blocks.roles import Role

_ATTRIBUTE = "_lc_onnx_discovery"


@dataclass(frozen=True)
class Block:
    """One collapsible MLP block: `parent`'s submodules `keys[0]` (fc1) ... `keys[-1]` (fc2), in order.

    Attributes:
        name: the qualified name of the activation module (`blocks.5.mlp.act`, `classifier.1`).
        parent: the deepest module holding every slot (the timm `Mlp`, the `nn.Sequential`, BERT's layer).
        keys: names below `parent` from fc1 to fc2 inclusive (dotted when deeper: `intermediate.dense`).
        act_key: the key of the activation.
        prefix: qualified name of `parent` ("" for the root).
    """

    name: str
    parent: nn.Module
    keys: tuple[str, ...]
    act_key: str
    prefix: str

    def module(self, key: str) -> nn.Module:
        return self.parent.get_submodule(key)

    def replace(self, key: str, module: nn.Module) -> None:
        """Put `module` in slot `key`."""
        owner, _, attr = key.rpartition(".")
        setattr(self.parent.get_submodule(owner) if owner else self.parent, attr, module)

    @property
    def act(self) -> nn.Module:
        return self.module(self.act_key)

    @property
    def fc1_name(self) -> str:
        return join(self.prefix, self.keys[0])

    @property
    def fc2_name(self) -> str:
        return join(self.prefix, self.keys[-1])


def join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


@dataclass(frozen=True)
class Spec:
    """A block by name: qualified module names from fc1 to fc2 (`slots`), and which one is the activation."""

    slots: tuple[str, ...]
    act: str

    def prefixed(self, prefix: str) -> Spec:
        return Spec(tuple(join(prefix, s) for s in self.slots), join(prefix, self.act))

    def to_dict(self) -> dict[str, object]:
        return {"slots": list(self.slots), "act": self.act}

    @classmethod
    def from_dict(cls, data: dict) -> Spec:
        return cls(tuple(data["slots"]), data["act"])


class RefusalKind(enum.Enum):
    """Why a Linear -> ... -> Linear path with an activation on it is not a collapsible block."""

    GATED = "gated"  # act(x·Wg) ⊙ (x·Wu): not linear in x
    NORM = "norm"  # a LayerNorm/GroupNorm/... between the layers
    FUNCTIONAL = "functional-activation"  # F.gelu(...) in a forward: no module to swap
    STEP = "step"  # something between the layers that is neither activation nor pass-through
    ACTIVATIONS = "activations"  # more than one activation between the layers
    SHARED = "shared-module"  # a module called more than once in the forward
    FAN_OUT = "fan-out"  # a tensor inside the block is also used outside it
    AXES = "axes"  # fc1 and fc2 act on different axes (a 1x1 conv and a Linear)
    BATCH_NORM_AXIS = "batch-norm-axis"  # a batch norm that normalises another axis than the features


@dataclass(frozen=True)
class Refusal:
    """A near-block left alone: `name` (its activation, or where the function was called), the kind, the
    reason in words."""

    name: str
    kind: RefusalKind
    reason: str

    def __str__(self) -> str:
        return f"{self.name}: {self.reason}"

    def to_dict(self) -> dict[str, str]:
        return {"name": self.name, "kind": self.kind.value, "reason": self.reason}


@dataclass(frozen=True)
class Discovery:
    """What one discovery found: blocks input side first, refusals in the order met."""

    specs: tuple[Spec, ...]
    refusals: tuple[Refusal, ...] = ()


def remember(model: nn.Module, discovery: Discovery) -> None:
    """Keep `discovery` on `model` (replacing an earlier one; a plain attribute, not in the state dict)."""
    object.__setattr__(model, _ATTRIBUTE, discovery)


def recorded(model: nn.Module) -> list[tuple[str, Discovery]]:
    """Every discovery kept on `model` or its submodules, with the submodule's name; one kept on a
    module hides those of its descendants (it saw them)."""
    found: list[tuple[str, Discovery]] = []
    for name, module in model.named_modules():
        discovery = module.__dict__.get(_ATTRIBUTE)
        if discovery is None or any(_below(name, prefix) for prefix, _ in found):
            continue
        found.append((name, discovery))
    return found


def _below(name: str, prefix: str) -> bool:
    return prefix == "" or name == prefix or name.startswith(prefix + ".")


def recorded_specs(model: nn.Module) -> list[Spec]:
    """The specs of every discovery kept on `model`, named from `model`."""
    return [spec.prefixed(prefix) for prefix, d in recorded(model) for spec in d.specs]


def recorded_refusals(model: nn.Module) -> list[Refusal]:
    return [
        Refusal(join(prefix, r.name), r.kind, r.reason) for prefix, d in recorded(model) for r in d.refusals
    ]


def resolve(model: nn.Module, spec: Spec) -> Block | None:
    """The block `spec` names in `model` now, or None when its modules no longer form one."""
    parents = [slot.split(".")[:-1] for slot in spec.slots]
    common: list[str] = []
    for parts in zip(*parents):
        if len(set(parts)) != 1:
            break
        common.append(parts[0])
    prefix = ".".join(common)
    try:
        parent = model.get_submodule(prefix)
        modules = [model.get_submodule(slot) for slot in spec.slots]
    except AttributeError:
        return None
    if not valid(modules, spec.slots.index(spec.act)):
        return None
    cut = len(prefix) + 1 if prefix else 0
    keys = tuple(slot[cut:] for slot in spec.slots)
    return Block(spec.act, parent, keys, spec.act[cut:], prefix)


def valid(modules: Sequence[nn.Module], act_index: int) -> bool:
    """Do these modules (fc1 ... fc2, the activation at `act_index`) form a block?"""
    if len(modules) < 3 or not (linear.is_linear(modules[0]) and linear.is_linear(modules[-1])):
        return False
    if linear.axis(modules[0]) is not linear.axis(modules[-1]):
        return False
    for i, module in enumerate(modules[1:-1], start=1):
        wanted = (Role.ACTIVATION,) if i == act_index else (Role.PASS_THROUGH, Role.BATCH_NORM)
        if roles.role(module) not in wanted:
            return False
    return True
