"""Multi-node activation patterns that exporters write instead of one op (matched read-only).

`match(node, tensor, graph_outputs)` is called for each consumer `node` of the tensor `tensor` that sits
between two linear layers; it returns `(nodes, output, name)` when `node` starts (or belongs to) a known
pattern computing an element-wise activation of `tensor`, where every node's outputs except `output` are
used only inside the pattern. Such steps are non-linear: they collapse only with a calibration fit.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs


def match(
    node: gs.Node, tensor: gs.Tensor, graph_outputs: set[str]
) -> tuple[list[gs.Node], gs.Tensor, str] | None:
    """The activation pattern through `node` applied to `tensor`, or None."""
    return None
