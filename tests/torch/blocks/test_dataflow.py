from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from lc_onnx.errors import UserError  # noqa: E402
from lc_onnx.torch.blocks.dataflow import FUNCTION, INPUT, MODULE, Source, record  # noqa: E402


class Net(nn.Module):
    """fc1 -> F.relu (a function in this forward) -> view -> scale (a parameter) -> drop -> fc2."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 6)
        self.drop = nn.Dropout(0.5)
        self.fc2 = nn.Linear(6, 3)
        self.scale = nn.Parameter(torch.ones(6))

    def forward(self, x):
        h = F.relu(self.fc1(x)).view(-1, 6) * self.scale
        return self.fc2(self.drop(h))


def test_record_lists_leaf_calls_and_functions_outside_leaves_joined_by_tensors():
    flow = record(Net(), (torch.randn(2, 4),))
    assert [(n.kind, n.name) for n in flow.nodes] == [
        (INPUT, "input:0"),
        (MODULE, "fc1"),  # F.linear inside nn.Linear is the leaf's own business: no node
        (FUNCTION, "relu"),
        (FUNCTION, "view"),
        (FUNCTION, "mul"),  # the parameter is a constant: one data input
        (MODULE, "drop"),
        (MODULE, "fc2"),
    ]
    assert [n.inputs for n in flow.nodes] == [[]] + [[Source(i)] for i in range(6)]
    assert [flow.consumers(Source(i)) for i in range(7)] == [[1], [2], [3], [4], [5], [6], []]
    assert flow.nodes[2].where == ""  # called in the root's forward
    assert [n.returns_input for n in flow.nodes] == [False] * 5 + [True, False]  # eval-mode dropout
    assert (flow.nodes[3].in_shapes, flow.nodes[3].out_shapes) == ([(2, 6)], [(2, 6)])
    assert flow.calls["fc1"] == flow.calls[""] == 1


def test_keyword_inputs_split_outputs_and_inplace_calls():
    class Split(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.out = nn.Identity()  # a child: the root is no leaf, its own calls are recorded

        def forward(self, a, b):
            x, y = (a + b).chunk(2, dim=-1)
            return x.relu_(), self.out(y)

    flow = record(Split(), {"a": torch.randn(2, 4), "b": torch.randn(2, 4)})
    assert [(n.kind, n.name) for n in flow.nodes] == [
        (INPUT, "input:a"),
        (INPUT, "input:b"),
        (FUNCTION, "add"),
        (FUNCTION, "chunk"),
        (FUNCTION, "relu_"),
        (MODULE, "out"),
    ]
    assert flow.nodes[5].inputs == [Source(3, 1)]
    assert flow.nodes[2].inputs == [Source(0), Source(1)]
    assert flow.nodes[3].out_shapes == [(2, 2), (2, 2)]
    assert flow.nodes[4].inputs == [Source(3, 0)]
    assert (flow.nodes[4].inplace, flow.nodes[4].returns_input) == (True, True)


def test_record_restores_every_training_flag_and_runs_without_gradients():
    model = Net().train()
    model.drop.eval()
    seen = []
    model.fc2.register_forward_hook(lambda m, i, o: seen.append((m.training, o.requires_grad)))
    record(model, torch.randn(2, 4))
    assert seen == [(False, False)]
    assert (model.training, model.fc1.training, model.drop.training) == (True, True, False)
    assert all(not m._forward_pre_hooks for m in model.modules())  # our hooks are gone


def test_a_failing_forward_is_a_user_error_naming_the_example_inputs():
    with pytest.raises(UserError) as exc:
        record(Net(), (torch.randn(2, 5),))
    assert str(exc.value).startswith("example_inputs: the model's forward failed on them (RuntimeError: ")
    assert exc.value.params == ("example_inputs",)
