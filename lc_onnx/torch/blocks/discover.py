"""Finding MLP blocks by how data flows in one recorded forward (`dataflow.Flow`).

From every call of a linear layer, follow the consumers of its output, call by call, through *steps* —
calls with one data input that keep its shape (splits aside), or a product `a * b` whose other factor is
accounted for (below) — for at most `MAX_STEPS` calls, up to a linear-layer call that takes the tensor as
its only data input. A walk also ends at a module holding a weight matrix or kernel (a depthwise conv).
Each such path is a candidate. A candidate with no activation on it (`Linear -> Dropout -> Linear`,
Swin's patch merging `reduction -> norm -> qkv`) is not an MLP and is ignored; every other one becomes a
block (`records.Spec`) or a refusal (`records.Refusal`) with its reason, checked in this order:

1. `GATED`: a product with a second linear map of the input, `act(x·Wg) ⊙ (x·Wu)` (T5 gated-gelu, Llama,
   timm `SwiGLU`, `GluMlp`'s `chunk`): not linear in x, even with a linear activation.
2. `FUNCTIONAL`: an activation called as a function in a forward (`F.gelu(h)`, `h * torch.sigmoid(1.702 *
   h)`, BERT given a callable `hidden_act`): there is no module to swap for a PReLU.
3. `NORM`: a LayerNorm, GroupNorm, RMSNorm... between the layers.
4. `STEP`: something else between them: a module with parameters that is not a norm, a function call
   (`h * 2`, `h.pow(2)`).
5. `ACTIVATIONS`: two activations.
6. `SHARED`: fc1, fc2, the activation or a batch norm called more than once (reused or tied modules):
   the block's modules must be its own to be swapped and collapsed.
7. `FAN_OUT`: a tensor inside the block also feeds something outside it.
8. `AXES`: a 1x1 conv and a Linear (features on different axes).
9. `BATCH_NORM_AXIS`: a batch norm that normalises axis 1 of a token tensor, not the features.

A product's other factor is traced back through the calls that made it (`MAX_BACK` calls at most): to
another linear layer, or to a tensor of the path through a split (`chunk`, `split`, indexing), it is a gate;
to a tensor of the path directly, the product is part of an activation written as functions; otherwise
(a constant mask, rotary tables) the path stops there.

Dropouts, `nn.Identity` and functions that return their input unchanged in eval mode (`F.dropout`,
`.contiguous()`) pass; a dropout module called elsewhere too stays out of the block's slots (it is the
identity in eval mode either way).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from torch import nn

from lc_onnx.torch.blocks import dataflow, linear, roles
from lc_onnx.torch.blocks.dataflow import FUNCTION, INPUT, MODULE, Flow, Node, Source
from lc_onnx.torch.blocks.records import Discovery, Refusal, RefusalKind, Spec
from lc_onnx.torch.blocks.roles import Role

MAX_STEPS = 8
MAX_BACK = 32
PRODUCTS = frozenset({"mul", "__mul__", "__rmul__", "multiply", "mul_", "__imul__"})
SPLITS = frozenset({"chunk", "split", "tensor_split", "unbind", "narrow", "__getitem__", "split_with_sizes"})
# Functions that are activations when called between two linear layers (torch, torch.nn.functional and
# Tensor-method spellings share these names). Not softmax: it normalises along an axis (CaiT's
# talking-heads attention has `proj_l -> softmax -> proj_w`, which is no MLP).
ACTIVATION_FUNCTIONS = frozenset(
    {
        "gelu", "relu", "relu_", "relu6", "silu", "silu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "elu",
        "elu_", "selu", "selu_", "celu", "celu_", "leaky_relu", "leaky_relu_", "hardswish", "hardsigmoid",
        "hardtanh", "hardtanh_", "mish", "softplus", "softsign", "tanhshrink", "logsigmoid", "rrelu",
        "rrelu_", "threshold", "threshold_", "prelu", "glu", "erf",
    }
)  # fmt: skip


@dataclass(frozen=True)
class PathStep:
    """One call on a path; `slot` is the output that flows on; for a product, what its other factor is
    (`gate`: a second linear map, described in `other`; `self`: the path's own tensor)."""

    node: Node
    slot: int = 0
    factor: str | None = None
    other: str = ""

    @property
    def source(self) -> Source:
        return Source(self.node.index, self.slot)


@dataclass(frozen=True)
class Path:
    fc1: Node
    steps: tuple[PathStep, ...]
    fc2: Node


def find(model: nn.Module, example_inputs: dataflow.ExampleInputs) -> Discovery:
    """Run `model` once on `example_inputs` and return its blocks (by fc1's call order) and refusals."""
    return analyse(dataflow.record(model, example_inputs), dict(model.named_modules()))


def analyse(flow: Flow, modules: Mapping[str, nn.Module]) -> Discovery:
    """Blocks and refusals of a recorded forward; `modules` by qualified name."""
    walker = _Walker(flow, modules)
    specs: dict[tuple[str, ...], Spec] = {}
    refusals: dict[tuple, tuple[Refusal, bool]] = {}
    for node in flow.nodes:
        if not walker.is_linear(node):
            continue
        for path in walker.paths(node):
            judge = _Judge(flow, modules, path)
            verdict = judge.verdict()
            if isinstance(verdict, Spec):
                specs.setdefault(verdict.slots, verdict)
            elif verdict is not None:
                key = judge.key(verdict)
                # Both branches of a gate reach the same product: keep the one through the activation.
                if key not in refusals or (judge.acts and not refusals[key][1]):
                    refusals[key] = (verdict, bool(judge.acts))
    refused = {r.name for r, _ in refusals.values()}
    kept = tuple(s for s in specs.values() if s.act not in refused)
    return Discovery(kept, tuple(r for r, _ in refusals.values()))


class _Walker:
    """The candidate paths of a recorded forward (see the module docstring)."""

    def __init__(self, flow: Flow, modules: Mapping[str, nn.Module]) -> None:
        self.flow, self.modules = flow, modules

    def is_linear(self, node: Node) -> bool:
        return node.kind == MODULE and linear.is_linear(self.modules[node.name])

    def opaque(self, node: Node) -> bool:
        """A module with a weight matrix or kernel (a depthwise conv, an embedding): a layer of its own,
        where walks end. Scalars and per-channel vectors (StarReLU's scale, a LayerScale) do not count."""
        return node.kind == MODULE and any(p.dim() >= 2 for p in self.modules[node.name].parameters())

    def passable(self, node: Node, slot: int) -> bool:
        if self.opaque(node):
            return False
        return node.in_shapes[0] == node.out_shapes[slot] or (node.kind == FUNCTION and node.name in SPLITS)

    def paths(self, start: Node) -> Iterator[Path]:
        first = Source(start.index, 0)
        yield from self._walk(start, first, (), frozenset({first}))

    def _walk(
        self, start: Node, source: Source, steps: tuple[PathStep, ...], on_path: frozenset[Source]
    ) -> Iterator[Path]:
        for index in self.flow.consumers(source):
            node = self.flow.nodes[index]
            if self.is_linear(node):
                if node.inputs == [source]:
                    yield Path(start, steps, node)
                continue
            if len(steps) >= MAX_STEPS:
                continue
            nexts: list[PathStep] = []
            if len(node.inputs) == 1:
                nexts = [
                    PathStep(node, slot) for slot in range(len(node.out_shapes)) if self.passable(node, slot)
                ]
            elif node.kind == FUNCTION and node.name in PRODUCTS and len(node.inputs) == 2:
                other = node.inputs[1] if node.inputs[0] == source else node.inputs[0]
                traced = self._trace_factor(other, on_path)
                nexts = [PathStep(node, 0, *traced)] if traced is not None else []
            for step in nexts:
                yield from self._walk(start, step.source, (*steps, step), on_path | {step.source})

    def _trace_factor(self, other: Source, on_path: frozenset[Source]) -> tuple[str, str] | None:
        """`("gate", what)` when a product's other factor is a second linear map of the input, `("self",
        "")` when it is made from the path's own tensor, None when neither (the path stops there)."""
        queue: list[tuple[Source, Node | None]] = [(other, None)]
        seen: set[Source] = set()
        while queue and len(seen) < MAX_BACK:
            source, split = queue.pop(0)
            if source in seen:
                continue
            seen.add(source)
            node = self.flow.nodes[source.node]
            if source in on_path:
                return ("self", "") if split is None else ("gate", f"{split.name}() of {node.name}")
            if self.is_linear(node):
                return "gate", node.name
            if node.kind == INPUT or self.opaque(node):
                continue
            splits_here = len(node.out_shapes) > 1 or node.name in SPLITS
            for inp in node.inputs:
                queue.append((inp, split if split is not None else (node if splits_here else None)))
        return None


class _Judge:
    """The verdict on one path: a `Spec`, a `Refusal`, or None when the path is no MLP."""

    def __init__(self, flow: Flow, modules: Mapping[str, nn.Module], path: Path) -> None:
        self.flow, self.modules, self.path = flow, modules, path
        self.fc1, self.fc2 = path.fc1.name, path.fc2.name
        self.between = f"between {self.fc1} and {self.fc2}"
        self.module_steps = [s for s in path.steps if s.node.kind == MODULE]
        self.roles = {s.node.name: roles.role(modules[s.node.name]) for s in self.module_steps}
        self.acts = [s for s in self.module_steps if self.roles[s.node.name] is Role.ACTIVATION]
        self.functions = [s for s in path.steps if s.node.kind == FUNCTION and not _transparent(s.node)]
        self.act_functions = [s for s in self.functions if s.node.name in ACTIVATION_FUNCTIONS]

    def verdict(self) -> Spec | Refusal | None:
        steps = self.path.steps
        gates = [s for s in steps if s.factor == "gate"]
        selfs = [s for s in steps if s.factor == "self"]
        if not (self.acts or self.act_functions or gates or selfs):
            return None
        for check in (
            self._gated,
            self._functional,
            self._norm,
            self._step,
            self._activations,
            self._shared,
            self._fan_out,
            self._axes,
            self._batch_norm_axis,
        ):
            refusal = check()
            if refusal is not None:
                return refusal
        slots = [self.fc1]
        for s in self.module_steps:
            if self.roles[s.node.name] is Role.PASS_THROUGH and self.flow.calls[s.node.name] > 1:
                continue  # the identity in eval mode, and used elsewhere: leave it where it is
            slots.append(s.node.name)
        slots.append(self.fc2)
        return Spec(tuple(slots), self.acts[0].node.name)

    def key(self, refusal: Refusal) -> tuple:
        """What makes two refusals one: a gate by its product (both of its branches reach it), anything
        else by its two layers (an activation written as functions offers several paths)."""
        gate = next((s for s in self.path.steps if s.factor == "gate"), None)
        if refusal.kind is RefusalKind.GATED and gate is not None:
            return ("gate", gate.node.index)
        if refusal.kind is RefusalKind.FUNCTIONAL:
            return ("layers", self.fc1, self.fc2)
        return ("text", refusal.name, refusal.reason)

    # -- naming -------------------------------------------------------------------------------------

    def _name(self) -> str:
        if self.acts:
            return self.acts[0].node.name
        if self.functions:
            return _function_name((self.act_functions or self.functions)[0].node)
        return self.fc1

    def _refuse(self, kind: RefusalKind, reason: str) -> Refusal:
        return Refusal(self._name(), kind, reason)

    def _act_text(self) -> str:
        if self.acts:
            return self.acts[0].node.name
        if self.act_functions:
            return f"{self.act_functions[0].node.name}()"
        return "act"

    # -- checks, in order ---------------------------------------------------------------------------

    def _gated(self) -> Refusal | None:
        gate = next((s for s in self.path.steps if s.factor == "gate"), None)
        if gate is None:
            return None
        return self._refuse(
            RefusalKind.GATED,
            f"gated MLP ({self.fc1} -> {self._act_text()} -> {gate.node.name}() with {gate.other} -> "
            f"{self.fc2}): act(x·Wg) ⊙ (x·Wu) is not linear in x",
        )

    def _functional(self) -> Refusal | None:
        if not self.act_functions and not any(s.factor == "self" for s in self.path.steps):
            return None
        calls = ", ".join(f"{s.node.name}()" for s in self.functions)
        where = self.functions[0].node.where or "the model"
        return self._refuse(
            RefusalKind.FUNCTIONAL,
            f"activation called as a function ({calls}) in the forward of {where}, {self.between}: "
            "no module to swap for a PReLU",
        )

    def _norm(self) -> Refusal | None:
        norm = next((s for s in self.module_steps if self.roles[s.node.name] is Role.NORM), None)
        if norm is None:
            return None
        kind = type(self.modules[norm.node.name]).__name__
        return self._refuse(RefusalKind.NORM, f"{kind} {norm.node.name} {self.between} is a norm, not linear")

    def _step(self) -> Refusal | None:
        for s in self.module_steps:
            if self.roles[s.node.name] is not Role.OTHER:
                continue
            what = f"{type(self.modules[s.node.name]).__name__} {s.node.name} (a module with parameters)"
            return self._refuse(
                RefusalKind.STEP, f"{what} {self.between} is neither an activation nor a pass-through"
            )
        for s in self.functions:
            if s.node.name in ACTIVATION_FUNCTIONS or s.factor is not None:
                continue
            return self._refuse(
                RefusalKind.STEP,
                f"{s.node.name}() in the forward of {s.node.where or 'the model'} {self.between} is neither "
                "an activation nor a pass-through",
            )
        return None

    def _activations(self) -> Refusal | None:
        if len(self.acts) + len(self.act_functions) <= 1:
            return None
        names = ", ".join(s.node.name for s in [*self.acts, *self.act_functions])
        return self._refuse(
            RefusalKind.ACTIVATIONS,
            f"{len(self.acts) + len(self.act_functions)} activations {self.between} ({names})",
        )

    def _shared(self) -> Refusal | None:
        owned = [
            self.fc1,
            *(s.node.name for s in self.module_steps if self.roles[s.node.name] is not Role.PASS_THROUGH),
            self.fc2,
        ]
        for name in owned:
            count = self.flow.calls[name]
            if count > 1:
                return self._refuse(
                    RefusalKind.SHARED,
                    f"{name} is called {count} times in one forward: a block's layers and activation must be "
                    "its own to be swapped and collapsed",
                )
        return None

    def _fan_out(self) -> Refusal | None:
        chain = [Source(self.path.fc1.index, 0), *(s.source for s in self.path.steps)]
        following = [s.node.index for s in self.path.steps] + [self.path.fc2.index]
        for source, nxt in zip(chain, following):
            for index in self.flow.consumers(source):
                if index != nxt:
                    other = self.flow.nodes[index]
                    what = _function_name(other) if other.kind == FUNCTION else other.name
                    return self._refuse(
                        RefusalKind.FAN_OUT,
                        f"the output of {self.flow.nodes[source.node].name} also feeds {what}, outside the "
                        "block: collapsing would change it",
                    )
        return None

    def _axes(self) -> Refusal | None:
        first, last = self.modules[self.fc1], self.modules[self.fc2]
        if linear.axis(first) is linear.axis(last):
            return None
        return self._refuse(
            RefusalKind.AXES,
            f"{self.fc1} ({linear.kind_name(first)}) and {self.fc2} ({linear.kind_name(last)}) act on "
            "different axes",
        )

    def _batch_norm_axis(self) -> Refusal | None:
        on_tokens = linear.axis(self.modules[self.fc1]) is linear.Axis.LAST
        for s in self.module_steps:
            if self.roles[s.node.name] is not Role.BATCH_NORM:
                continue
            shape = s.node.in_shapes[0]
            if (len(shape) == 2) == on_tokens and (on_tokens or len(shape) >= 3):
                continue
            return self._refuse(
                RefusalKind.BATCH_NORM_AXIS,
                f"{s.node.name} normalises axis 1 of a {list(shape)} tensor, not the features of {self.fc1}",
            )
        return None


def _transparent(node: Node) -> bool:
    """A function call that returns its input unchanged (`F.dropout` in eval mode, `.contiguous()`)."""
    return node.returns_input and not node.inplace and node.name not in ACTIVATION_FUNCTIONS


def _function_name(node: Node) -> str:
    return f"{node.where}.{node.name}()" if node.where else f"{node.name}()"
