"""Finding collapse sites in a graph, read-only.

A *site* is a linear layer (`layers`) whose output reaches one or more linear layers of the same kind of
feature axis through a chain of steps (`steps`): identity, leading-axes reshapes, per-feature constants,
slopes, BatchNorm, or a known non-linear activation. Matching records everything that stands in the way
of a collapse as `problems` (a graph output or another consumer in the middle, a weight that is a graph
input, a non-float dtype); whether the activation is linear enough is for `decide`. A constant shared
with nodes outside the site is no problem: the collapse writes tensors of its own.

A `Shape` node that reads a tensor inside a site is no problem either when the shape is held by a tensor
outside the site (the target of the reshape it came from, `reshapes.shape_source`): the rewrite makes it
read that instead.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

import onnx_graphsurgeon as gs

from lc_onnx.graph import reshapes
from lc_onnx.graph.constant_eval import Constants, describe
from lc_onnx.graph.layers import LINEAR_OPS, Linear, layer_dims, match_linear
from lc_onnx.graph.reasons import Kind, Reason
from lc_onnx.graph.steps import Scope, Step, StepKind, classify
from lc_onnx.model.protos import is_default_domain

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Site:
    """A linear layer whose output reaches `consumers` (linear layers) through `steps`."""

    producer: Linear
    steps: tuple[Step, ...]
    consumers: tuple[Linear, ...]
    problems: tuple[Reason, ...] = field(default=())
    # `Shape` nodes reading a tensor inside the site, and the tensor that holds that same shape outside
    # it (the target of the reshape the tensor came from): the rewrite makes them read it instead.
    shape_users: tuple[tuple[gs.Node, gs.Tensor], ...] = ()

    @property
    def hidden(self) -> gs.Tensor:
        return self.steps[-1].output if self.steps else self.producer.output

    @property
    def activation(self) -> str:
        return ",".join(step.op for step in self.steps if step.kind != StepKind.RESHAPE) or "none"

    @property
    def nodes(self) -> list[gs.Node]:
        """Every node of the site, in order (the layers' own steps included)."""
        nodes = list(self.producer.nodes) + [n for step in self.steps for n in step.nodes]
        return nodes + [n for consumer in self.consumers for n in consumer.nodes]

    def node_names(self) -> list[str]:
        return [describe(n) for n in self.nodes]


class SiteFinder:
    """Matches sites in a graphsurgeon graph without changing it."""

    def __init__(self, graph: gs.Graph, constants: Constants) -> None:
        self.graph = graph
        self.constants = constants
        self.scope = Scope(constants, frozenset(t.name for t in graph.outputs))

    def sites(self) -> Iterator[Site]:
        for node in list(self.graph.nodes):
            if node.op in LINEAR_OPS and is_default_domain(node.domain):
                layer = match_linear(node, self.scope, leading=True)
                if layer is not None:
                    site = self._follow(layer)
                    if site is not None:
                        yield site

    def _follow(self, layer: Linear) -> Site | None:
        steps: list[Step] = []
        problems = list(layer.problems)
        tensor = layer.output
        axis = layer.feature_axis
        d_h = layer_dims(layer.core, layer.weight, self.constants)[1]
        shape_users: list[tuple[gs.Node, gs.Tensor]] = []
        seen = set()
        while tensor.name not in seen:
            seen.add(tensor.name)
            if tensor.name in self.scope.outputs:
                problems.append(
                    Reason(Kind.CONSUMER, f"{tensor.name!r} between the layers is a graph output")
                )
            consumers = list(tensor.outputs)
            linears = [
                lin
                for c in consumers
                if c.op in LINEAR_OPS and c.inputs and c.inputs[0] is tensor
                for lin in [match_linear(c, self.scope)]
                if lin is not None and lin.is_conv == layer.is_conv
            ]
            if linears:
                others = [c for c in consumers if all(c is not lin.core for lin in linears)]
                problems += self._other_consumers(tensor, others, steps, shape_users)
                for lin in linears:
                    problems += lin.problems
                return Site(
                    layer, tuple(steps), tuple(linears), tuple(dict.fromkeys(problems)), tuple(shape_users)
                )
            # A multi-node pattern can be found from several of its nodes: one step per output.
            found = {
                id(st.output): st
                for c in consumers
                if (st := classify(c, tensor, axis, d_h, self.scope)) is not None
            }
            if len(found) != 1:
                return None
            step = next(iter(found.values()))
            others = [c for c in consumers if all(c is not n for n in step.nodes)]
            problems += self._other_consumers(tensor, others, steps, shape_users)
            steps.append(step)
            tensor = step.output
        return None

    def _other_consumers(
        self, tensor: gs.Tensor, others: list[gs.Node], steps: list[Step], shape_users: list
    ) -> list[Reason]:
        """The problem of nodes outside the site reading `tensor`, inside it; none when they are `Shape`
        nodes and the shape is held by a tensor outside the site (then recorded in `shape_users`)."""
        if not others:
            return []
        source = reshapes.shape_source([s.node for s in steps if s.kind == StepKind.RESHAPE], self.constants)
        if source is not None and all(c.op == "Shape" and is_default_domain(c.domain) for c in others):
            shape_users += [(c, source) for c in others]
            return []
        return [Reason(Kind.CONSUMER, f"{tensor.name!r} also feeds {describe(others[0])}")]
