"""Multi-node activation patterns that exporters write instead of one op (matched read-only).

`match(node, tensor, graph_outputs)` is called for each consumer `node` of the tensor `tensor` that sits
between two linear layers; it returns `(nodes, output, name)` when `node` belongs to an element-wise
function of `tensor` written as several nodes, where every node's outputs except `output` are used only
inside the pattern. Such steps are non-linear: they collapse only with a calibration fit.

Pattern: the largest *element-wise region* of `tensor`, grown from its consumers: nodes of
`ELEMENTWISE_OPS` whose inputs are `tensor`, outputs of region nodes, or constants that are one value or
one value per channel (last axis). The region must end in exactly one tensor (its only value used
outside) and contain something non-linear (`Erf`, `Tanh`, `Sigmoid`, ..., or a product of two values
that depend on `tensor`). Whatever the exporter's spelling, the result is `act(h)` per channel, which is
all calibration needs. This covers what the torch exporters write (checked by the tests):

- GELU (opsets below 20, both exporters): `0.5 · x · (1 + erf(x / √2))` as Div, Erf, Add, Mul, Mul;
- GELU with `approximate="tanh"`: Pow (or Mul·Mul), Mul, Add, Mul, Tanh, Add, Mul, Mul;
- SiLU / Swish: `x · sigmoid(x)` (Sigmoid, Mul), `x · sigmoid(β·x)` (Mul, Sigmoid, Mul);
- Mish (TorchScript): Softplus, Tanh, Mul; a hand-written HardSwish `x · HardSigmoid(x)`.

The name is the function the region computes, recognised by evaluating it on a grid of values
(`Gelu`, `GeluTanh`, `Silu`, `Mish`, `HardSwish`), else `Swish` (a sigmoid gate) or `Elementwise`.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_graphsurgeon as gs

ELEMENTWISE_OPS = frozenset(
    {
        "Add", "Sub", "Mul", "Div", "Pow", "Neg", "Abs", "Sqrt", "Reciprocal", "Exp", "Erf", "Tanh",
        "Sigmoid", "Softplus", "HardSigmoid", "HardSwish", "Relu", "Clip",
    }
)  # fmt: skip
# Ops that are non-linear on their own (a region of only Add/Mul/Div by constants is affine).
_NONLINEAR = ELEMENTWISE_OPS - {"Add", "Sub", "Mul", "Div", "Neg"}
MAX_NODES = 32


def match(
    node: gs.Node, tensor: gs.Tensor, graph_outputs: set[str]
) -> tuple[list[gs.Node], gs.Tensor, str] | None:
    """The activation pattern through `node` applied to `tensor`, or None."""
    nodes = _region(tensor)
    if not nodes or all(n is not node for n in nodes):
        return None
    members = {id(n) for n in nodes}
    exits = {
        out.name: out
        for n in nodes
        for out in n.outputs
        if out.name in graph_outputs or any(id(c) not in members for c in out.outputs)
    }
    if len(exits) != 1 or not _is_nonlinear(nodes, tensor):
        return None
    output = next(iter(exits.values()))
    return nodes, output, _name(nodes, tensor, output)


def _region(x: gs.Tensor) -> list[gs.Node]:
    """Element-wise nodes computing functions of `x` only, in a topological order found from `x`."""
    nodes: list[gs.Node] = []
    produced = {x.name}
    frontier = [x]
    while frontier and len(nodes) < MAX_NODES:
        grown = False
        for tensor in list(frontier):
            for consumer in tensor.outputs:
                if any(consumer is n for n in nodes) or not _joins(consumer, produced):
                    continue
                nodes.append(consumer)
                produced.update(out.name for out in consumer.outputs)
                frontier.extend(consumer.outputs)
                grown = True
        if not grown:
            break
    return nodes


def _joins(node: gs.Node, produced: set[str]) -> bool:
    if node.op not in ELEMENTWISE_OPS or len(node.outputs) != 1:
        return False
    inputs = [t for t in node.inputs if t.name]
    return any(t.name in produced for t in inputs) and all(
        t.name in produced or _channel_constant(t) is not None for t in inputs
    )


def _channel_constant(tensor: gs.Tensor) -> np.ndarray | None:
    """The value of a small constant (an initializer or a `Constant` output) that is one value or one value
    per channel of the last axis; None otherwise."""
    value = None
    if isinstance(tensor, gs.Constant):
        value = np.asarray(tensor.values)
    elif len(tensor.inputs) == 1 and tensor.inputs[0].op == "Constant":
        attrs = tensor.inputs[0].attrs
        if isinstance(attrs.get("value"), gs.Constant):
            value = np.asarray(attrs["value"].values)
        elif "value_float" in attrs:
            value = np.asarray(attrs["value_float"], dtype=np.float32)
    if value is None or not all(d == 1 for d in value.shape[:-1]):
        return None
    return value


def _is_nonlinear(nodes: list[gs.Node], x: gs.Tensor) -> bool:
    for node in nodes:
        if node.op in _NONLINEAR:
            return True
        if node.op in ("Mul", "Div") and all(_channel_constant(t) is None for t in node.inputs):
            return True  # a product of two functions of x
    return False


def _gelu(t):
    return 0.5 * t * (1.0 + np.vectorize(math.erf)(t / math.sqrt(2.0)))


def _sigmoid(t):
    return 1.0 / (1.0 + np.exp(-t))


_KNOWN = {
    "Gelu": _gelu,
    "GeluTanh": lambda t: 0.5 * t * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (t + 0.044715 * t**3))),
    "Silu": lambda t: t * _sigmoid(t),
    "Mish": lambda t: t * np.tanh(np.log1p(np.exp(t))),
    "HardSwish": lambda t: t * np.clip(t / 6.0 + 0.5, 0.0, 1.0),
}
_GRID = np.linspace(-6.0, 6.0, 97)


def _name(nodes: list[gs.Node], x: gs.Tensor, output: gs.Tensor) -> str:
    try:
        with np.errstate(all="ignore"):
            values = _evaluate(nodes, x, output, _GRID)
    except (KeyError, ValueError, TypeError):
        values = None
    if values is not None and values.shape == _GRID.shape:
        for name, fn in _KNOWN.items():
            if np.allclose(values, fn(_GRID), rtol=1e-4, atol=1e-4):
                return name
    ops = {n.op for n in nodes}
    return "Swish" if {"Sigmoid", "Mul"} <= ops else "Elementwise"


def _evaluate(nodes: list[gs.Node], x: gs.Tensor, output: gs.Tensor, grid: np.ndarray) -> np.ndarray | None:
    """The region's output on `grid` (float64), when every constant is one value; None otherwise."""
    env = {x.name: grid}
    for node in nodes:
        args = []
        for t in node.inputs:
            if not t.name:
                args.append(None)
            elif t.name in env:
                args.append(env[t.name])
            else:
                value = _channel_constant(t)
                if value.size != 1:
                    return None
                args.append(float(value.reshape(())))
        env[node.outputs[0].name] = np.asarray(_OPS[node.op](node.attrs, *args), dtype=np.float64)
    return env[output.name]


def _clip(attrs, t, lo=None, hi=None):
    lo = attrs.get("min", -np.inf) if lo is None else lo
    hi = attrs.get("max", np.inf) if hi is None else hi
    return np.clip(t, lo, hi)


_OPS = {
    "Add": lambda _, a, b: a + b,
    "Sub": lambda _, a, b: a - b,
    "Mul": lambda _, a, b: a * b,
    "Div": lambda _, a, b: a / b,
    "Pow": lambda _, a, b: np.power(a, b),
    "Neg": lambda _, a: -a,
    "Abs": lambda _, a: np.abs(a),
    "Sqrt": lambda _, a: np.sqrt(np.abs(a)),
    "Reciprocal": lambda _, a: 1.0 / a,
    "Exp": lambda _, a: np.exp(a),
    "Erf": lambda _, a: np.vectorize(math.erf)(a),
    "Tanh": lambda _, a: np.tanh(a),
    "Sigmoid": lambda _, a: _sigmoid(a),
    "Softplus": lambda _, a: np.log1p(np.exp(a)),
    "HardSigmoid": lambda at, a: np.clip(at.get("alpha", 0.2) * a + at.get("beta", 0.5), 0.0, 1.0),
    "HardSwish": lambda _, a: a * np.clip(a / 6.0 + 0.5, 0.0, 1.0),
    "Relu": lambda _, a: np.maximum(a, 0.0),
    "Clip": _clip,
}
