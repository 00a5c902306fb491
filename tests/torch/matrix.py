"""One matrix case: a `families.Family` made collapsible by data flow, collapsed in torch and, exported by one
torch exporter (saved with external data, fused from another working directory), by the graph pass."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from lc_onnx.testing import ort_outputs, rel_l2
from lc_onnx.torch import collapse, find_blocks, make_collapsible
from tests.exports import export, fuse_elsewhere, randomise, torch_output
from tests.torch.families import DYNAMO, Family

TOL = 1e-5


@dataclass
class Result:
    """What one case measured (asserted by the test, tabulated for the README)."""

    blocks: int  # found by make_collapsible
    torch_layers: list[str]  # the layers `collapse` wrote, output side first
    torch_error: float  # rel. L2 of the torch-collapsed model vs the PReLU(1) model
    kinds_kept: bool  # every collapsed layer of its fc1's kind (Conv1D stays Conv1D, ...)
    keys_kept: bool  # the state dict lost exactly the folded slots' keys
    sites: int  # collapsed by the graph pass
    exact: bool  # every collapsed site an exact collapse
    prelus_left: int  # PRelu nodes left in the fused graph
    onnx_error: float  # rel. L2 of the fused export vs the torch model
    external_data: bool  # the fused model was written with its weights beside it
    workdir_empty: bool  # fusing from another directory left nothing there
    seconds: float


def run(family: Family, exporter: str, tmp: Path) -> Result:
    started = time.perf_counter()
    torch.manual_seed(0)
    model = family.build()
    inputs = family.inputs(0)
    names = make_collapsible(model, init=1.0, example_inputs=example(model, inputs))
    randomise(model)
    expected = torch_output(model, inputs)
    found = find_blocks(model)
    kinds = {b.fc1_name: type(b.module(b.keys[0])) for b in found}
    keys = set(model.state_dict())
    folded = {f"{b.prefix}.{k}." if b.prefix else f"{k}." for b in found for k in b.keys[1:]}

    source = export(model, inputs, tmp / "model.onnx", dynamo=exporter == DYNAMO, dynamic=family.dynamic)
    fused_path = tmp / "fused.onnx"
    result = fuse_elsewhere(source, fused_path, tmp / "elsewhere")
    fused = onnx.load(str(fused_path))
    got = ort_outputs(str(fused_path), {k: v.numpy() for k, v in inputs.items()})[0]

    layers = collapse(model)
    after = torch_output(model, inputs)
    return Result(
        blocks=len(names),
        torch_layers=layers,
        torch_error=rel_l2(after.astype(np.float64), expected),
        kinds_kept=all(type(model.get_submodule(n)) is kinds[n] for n in layers),
        keys_kept=set(model.state_dict()) == {k for k in keys if not k.startswith(tuple(folded))},
        sites=result.collapsed,
        exact=all(s.reason_kind == "exact" for s in result.report.collapsed),
        prelus_left=[n.op_type for n in fused.graph.node].count("PRelu"),
        onnx_error=rel_l2(got, expected),
        external_data=(tmp / "fused.onnx.data").exists(),
        workdir_empty=not any((tmp / "elsewhere").iterdir()),
        seconds=time.perf_counter() - started,
    )


def example(model: nn.Module, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | tuple:
    """transformers models take their inputs by name, the others by position."""
    return inputs if hasattr(model, "config") else tuple(inputs.values())
