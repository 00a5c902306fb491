"""One forward pass, recorded as a graph of calls joined by the tensors they pass (`Flow`).

Nodes are the example inputs, the calls of *leaf* modules (modules without child modules: linear layers,
activations, dropouts, norms) and the torch functions called outside any leaf module (`F.gelu(x)` or
`x * y` in some module's forward): the function calls inside a leaf are the leaf's own business. An edge
runs from the call that produced a tensor to every call that takes that tensor object (tensors are told
apart by `id()`; every tensor is kept alive for the pass, so ids are not reused). Tensors that do not
depend on the inputs — parameters, buffers, `torch.arange(...)` — are constants: no producer, no edge, and
a call that takes no data tensor is not a node.

Module calls are seen by forward hooks, function calls by a `TorchFunctionMode`; nothing is traced
symbolically (`torch.fx` fails on most transformers models), so any Python in a forward is fine. The pass
runs in eval mode without gradients and leaves the model as it was.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from lc_onnx.errors import UserError, one_line

ExampleInputs = torch.Tensor | Sequence[Any] | Mapping[str, Any]
"""One tensor, a tuple of positional arguments, or a dict of keyword arguments for `model(...)`."""

INPUT, MODULE, FUNCTION = "input", "module", "function"


@dataclass(frozen=True)
class Source:
    """Output `slot` of node `node`: one tensor."""

    node: int
    slot: int = 0


@dataclass
class Node:
    """One call.

    Attributes:
        kind: `input`, `module` (a leaf module's call) or `function`.
        name: the module's qualified name, the function's name, or `input:NAME`.
        where: for a function, the qualified name of the module whose forward called it ("" for the root).
        inputs: the distinct data tensors it took, in order of appearance.
        in_shapes, out_shapes: shapes of those inputs and of its tensor outputs.
        returns_input: its only output is its only data input, the same tensor object.
        inplace: a function called as an in-place operation (`relu_`, `x += y`, `inplace=True`).
        consumers: per output slot, the nodes that took that tensor.
    """

    index: int
    kind: str
    name: str
    where: str = ""
    inputs: list[Source] = field(default_factory=list)
    in_shapes: list[tuple[int, ...]] = field(default_factory=list)
    out_shapes: list[tuple[int, ...]] = field(default_factory=list)
    returns_input: bool = False
    inplace: bool = False
    consumers: dict[int, list[int]] = field(default_factory=dict)


@dataclass
class Flow:
    """The recorded forward: nodes in call order, and how often each module (leaf or not) was called."""

    nodes: list[Node]
    calls: collections.Counter[str]

    def consumers(self, source: Source) -> list[int]:
        return self.nodes[source.node].consumers.get(source.slot, [])


def tensors(value: Any) -> Iterator[torch.Tensor]:
    """The tensors in a (nested) tuple, list or dict — transformers' `ModelOutput` is a dict."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from tensors(item)
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from tensors(item)


def split_inputs(example_inputs: ExampleInputs) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """`(args, kwargs)` for `model(*args, **kwargs)`."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, Mapping):
        return (), dict(example_inputs)
    return tuple(example_inputs), {}


class _Recorder(TorchFunctionMode):
    def __init__(self, names: Mapping[int, str]) -> None:
        super().__init__()
        self.names = names
        self.nodes: list[Node] = []
        self.calls: collections.Counter[str] = collections.Counter()
        self.producer: dict[int, Source] = {}
        self.alive: list[torch.Tensor] = []
        self.stack: list[str] = [""]
        self.open: list[Node | None] = []  # the leaf module calls under way (nested only by odd models)
        self.leaf_depth = 0
        self.paused = False

    # -- nodes --------------------------------------------------------------------------------------

    def add(self, kind: str, name: str, values: Any, where: str = "") -> Node | None:
        """A node for a call taking `values`, or None (and no node) when none of them is data."""
        sources: list[Source] = []
        shapes: list[tuple[int, ...]] = []
        seen: set[int] = set()
        for t in tensors(values):
            source = self.producer.get(id(t))
            if source is None or id(t) in seen:
                continue
            seen.add(id(t))
            sources.append(source)
            shapes.append(tuple(t.shape))
        if kind != INPUT and not sources:
            return None
        node = Node(len(self.nodes), kind, name, where, sources, shapes)
        for source in sources:
            self.nodes[source.node].consumers.setdefault(source.slot, []).append(node.index)
        self.nodes.append(node)
        return node

    def produce(self, node: Node, inputs: Any, output: Any) -> None:
        outs = list(tensors(output))
        ins = list(tensors(inputs))
        node.out_shapes = [tuple(t.shape) for t in outs]
        data_ins = [t for t in ins if id(t) in self.producer]
        node.returns_input = len(outs) == 1 and len(data_ins) >= 1 and outs[0] is data_ins[0]
        for slot, t in enumerate(outs):
            self.producer[id(t)] = Source(node.index, slot)
            self.alive.append(t)

    # -- module calls (hooks) -----------------------------------------------------------------------

    def pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.paused = True
        try:
            name = self.names.get(id(module), "?")
            self.calls[name] += 1
            self.stack.append(name)
            if _is_leaf(module):
                if self.leaf_depth == 0:
                    self.open.append(self.add(MODULE, name, (args, kwargs)))
                self.leaf_depth += 1
        finally:
            self.paused = False

    def post_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        self.paused = True
        try:
            self.stack.pop()
            if _is_leaf(module):
                self.leaf_depth -= 1
                if self.leaf_depth == 0:
                    node = self.open.pop()
                    if node is not None:
                        self.produce(node, (args, kwargs), output)
        finally:
            self.paused = False

    # -- function calls -----------------------------------------------------------------------------

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.paused or self.leaf_depth > 0 or not any(True for _ in tensors(out)):
            return out
        name = getattr(func, "__name__", repr(func))
        node = self.add(FUNCTION, name, (args, kwargs), where=self.stack[-1])
        if node is not None:
            node.inplace = bool(kwargs.get("inplace")) or _inplace_name(name)
            self.produce(node, (args, kwargs), out)
        return out


def _is_leaf(module: nn.Module) -> bool:
    return next(module.children(), None) is None


def _inplace_name(name: str) -> bool:
    return (name.endswith("_") and not name.endswith("__")) or name.startswith("__i")


def record(model: nn.Module, example_inputs: ExampleInputs) -> Flow:
    """Run `model` once on `example_inputs` (eval mode, no gradients) and return what flowed where.

    Raises:
        UserError: naming `example_inputs`, when the forward fails on them.
    """
    names = {id(m): name for name, m in model.named_modules()}
    recorder = _Recorder(names)
    args, kwargs = split_inputs(example_inputs)
    for position, value in enumerate(args):
        _register_input(recorder, f"input:{position}", value)
    for key, value in kwargs.items():
        _register_input(recorder, f"input:{key}", value)
    modes = {m: m.training for m in model.modules()}
    handles = []
    for module in model.modules():
        handles.append(module.register_forward_pre_hook(recorder.pre_hook, with_kwargs=True))
        handles.append(module.register_forward_hook(recorder.post_hook, with_kwargs=True))
    model.eval()
    try:
        with torch.no_grad(), recorder:
            model(*args, **kwargs)
    except Exception as exc:  # the user's model and inputs: any error is theirs to read
        raise UserError(
            f"{{example_inputs}}: the model's forward failed on them ({type(exc).__name__}: {one_line(exc)})",
            params=["example_inputs"],
        ) from exc
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.training = training
    return Flow(recorder.nodes, recorder.calls)


def _register_input(recorder: _Recorder, name: str, value: Any) -> None:
    for k, t in enumerate(tensors(value)):
        node = recorder.add(INPUT, name if k == 0 else f"{name}.{k}", ())
        recorder.produce(node, (), t)
