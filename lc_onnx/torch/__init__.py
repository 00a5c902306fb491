"""The PyTorch half of LayerCollapse: make MLP activations trainable PReLUs, push them to linear with
`collapse_penalty`, `collapse` the linear ones, `export_onnx` for the graph pass.

Needs the `torch` extra (torch; timm for timm models). Nothing here is imported by `import lc_onnx`.

Modules, bottom to top: `collapsible` (finding, linearising, collapsing blocks), `export`, `evaluate`
(accuracy over a predict callable, torch or onnxruntime), `checkpoint`, `schedule` (which blocks collapse
when), `loop` (distributed context, optimizer, one epoch, `Trainer`), `data` and `models` (what
`lc-onnx finetune` trains on and trains), `recipe` (`FinetuneConfig`, `finetune`: the epochs and the end
step that exports, fuses and writes `report.json`), `distill` (the knowledge-distillation baseline).
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
