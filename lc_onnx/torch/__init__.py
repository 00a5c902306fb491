"""The PyTorch half of LayerCollapse: make MLP activations trainable PReLUs, push them to linear with
`collapse_penalty`, `collapse` the linear ones, `export_onnx` for the graph pass.

Needs the `torch` extra (torch; timm for timm models). Nothing here is imported by `import lc_onnx`.
"""

from __future__ import annotations

from lc_onnx.torch.collapsible import (
    Block,
    collapse,
    collapse_penalty,
    find_blocks,
    make_collapsible,
    slopes,
)
from lc_onnx.torch.export import export_onnx

__all__ = [
    "Block",
    "collapse",
    "collapse_penalty",
    "export_onnx",
    "find_blocks",
    "make_collapsible",
    "slopes",
]
