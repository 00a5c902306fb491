"""The PyTorch half of LayerCollapse: make MLP activations trainable PReLUs, push them to linear with
`collapse_penalty`, `collapse` the linear ones, `export_onnx` for the graph pass.

Needs the `torch` extra (torch; timm for timm models; transformers for transformers models). Nothing here
is imported by `import lc_onnx`.

Modules, bottom to top: `linear` (the three linear-layer spellings as affine maps), `roles` (what a module
is in a block), `dataflow` (one forward recorded as calls and tensors), `blocks` (blocks, refusals and the
discovery kept on a model), `discover` (blocks by data flow) and `structural` (by structure: timm `Mlp`,
`nn.Sequential`), `collapsible` (the API: finding, linearising, collapsing blocks), `export`, `evaluate`
(accuracy over a predict callable, torch or onnxruntime), `checkpoint`, `schedule` (which blocks collapse
when), `loop` (distributed context, optimizer, one epoch, `Trainer`), `data` and `models` (what
`lc-onnx finetune` trains on and trains; `hf` loads transformers models and their preprocessing),
`recipe` (`FinetuneConfig`, `finetune`: the epochs and the end step that exports, fuses and writes
`report.json`), `distill` (the knowledge-distillation baseline).
"""

from __future__ import annotations

from lc_onnx.torch.blocks import Discovery, Refusal, RefusalKind, Spec
from lc_onnx.torch.collapsible import (
    Block,
    collapse,
    collapse_penalty,
    discover,
    find_blocks,
    make_collapsible,
    refusals,
    slopes,
)
from lc_onnx.torch.export import export_onnx

__all__ = [
    "Block",
    "Discovery",
    "Refusal",
    "RefusalKind",
    "Spec",
    "collapse",
    "collapse_penalty",
    "discover",
    "export_onnx",
    "find_blocks",
    "make_collapsible",
    "refusals",
    "slopes",
]
