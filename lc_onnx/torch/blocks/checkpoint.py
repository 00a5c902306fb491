"""Checkpoints of partly collapsed models: a plain state dict plus the names that rebuild the module tree.

A fine-tuned model's tree differs from a freshly built one (PReLUs where activations were, collapsed
blocks as one Linear and Identities), so a state dict alone does not load. `Structure` lists those
changes; `load_checkpoint` replays them on a fresh model (`collapsible.restore_structure`), then loads the
values. Files are read with `torch.load(weights_only=True)`: only tensors and plain containers are ever
unpickled.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from lc_onnx.errors import UserError, one_line
from lc_onnx.model import files
from lc_onnx.torch.blocks import collapsible, records


@dataclass
class Structure:
    """What a checkpoint needs besides the state dict to rebuild the module tree."""

    prelu: list[str] = field(default_factory=list)  # "act.name:num_slopes" when saved
    collapsed: list[str] = field(default_factory=list)  # fc1 names in collapse order
    # The blocks a discovery found (`Spec.to_dict()`: module names of fc1 ... fc2 and the activation), so
    # a fresh model needs no example inputs; empty for blocks found by structure (and old checkpoints).
    blocks: list[dict] = field(default_factory=list)

    @classmethod
    def of(cls, model: nn.Module, collapsed: Sequence[str]) -> Structure:
        """`model`'s PReLU blocks now, the fc1 names `collapsed` so far (in `collapse_steps` order) and the
        blocks its discovery found."""
        prelu = [f"{b.name}:{b.act.weight.numel()}" for b in collapsible.prelu_blocks(model)]
        specs = [spec.to_dict() for spec in records.recorded_specs(model)]
        return cls(prelu, list(collapsed), specs)

    def specs(self) -> list[records.Spec]:
        return [records.Spec.from_dict(d) for d in self.blocks]


def save_checkpoint(path: str | os.PathLike, model: nn.Module, structure: Structure, **extra: Any) -> None:
    """Atomically write the state dict, the structure and plain extras (ints, floats, strings, lists)."""
    payload = {"model": model.state_dict(), "structure": asdict(structure), **extra}
    with files.atomic_open(path, "wb") as f:
        torch.save(payload, f)


def load_checkpoint(path: str | os.PathLike, model: nn.Module) -> dict[str, Any]:
    """Load a `save_checkpoint` file into a freshly built `model` (structure first); returns the payload.

    Raises:
        UserError: naming the `checkpoint`: no such file, not a checkpoint (or one holding objects other
            than tensors and plain containers), or one saved from another architecture.
    """
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"{{checkpoint}} {path}: no such file", params=["checkpoint"]) from None
    except Exception as exc:  # unpickling errors come in many types
        raise UserError(
            f"{{checkpoint}} {path}: not a readable lc-onnx checkpoint ({one_line(exc)})",
            params=["checkpoint"],
        ) from None
    if not isinstance(payload, dict) or "model" not in payload or "structure" not in payload:
        raise UserError(
            f"{{checkpoint}} {path}: not an lc-onnx checkpoint (no 'model'/'structure' keys)",
            params=["checkpoint"],
        )
    try:
        structure = Structure(**payload["structure"])
        collapsible.restore_structure(model, structure.prelu, structure.collapsed, structure.specs())
        model.load_state_dict(payload["model"])
    except (TypeError, KeyError, ValueError, RuntimeError) as exc:
        raise UserError(
            f"{{checkpoint}} {path}: does not fit this model ({one_line(exc)})", params=["checkpoint"]
        ) from None
    return payload
