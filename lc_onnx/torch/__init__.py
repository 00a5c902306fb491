"""The PyTorch half of LayerCollapse: make MLP activations trainable PReLUs, push them to linear with
`collapse_penalty`, `collapse` the linear ones, `export_onnx` for the graph pass.

Needs the `torch` extra (torch; timm for timm models; transformers for transformers models). Nothing here
is imported by `import lc_onnx`, and this package imports only from `blocks`.

Subpackages by job, bottom to top (each imports only those before it):

- `blocks`, finding and collapsing blocks: `linear` (the three linear-layer spellings as affine maps),
  `roles` (what a module is in a block), `dataflow` (one forward recorded as calls and tensors),
  `records` (blocks, refusals and the discovery kept on a model), `discover` (blocks by data flow) and
  `structural` (by structure: timm `Mlp`, `nn.Sequential`), `collapsible` (the API: finding,
  linearising, collapsing blocks), `export`, `checkpoint`;
- `data`, what `lc-onnx finetune` trains on: `datasets` (digits, ImageFolders), `text` (unlabeled text);
- `models`, what it trains: `builders` (timm, `vgg-mlp`), `hf` (transformers models and their
  preprocessing);
- `finetune`, the recipes: `config` (`FinetuneConfig`, its defaults and checks), `run` (`finetune`,
  which dispatches to an objective), the objectives `labels` (cross-entropy) and `distill` (the
  unmodified model as teacher, no labels), and what they share: `schedule` (which blocks collapse
  when), `loop` (distributed context, optimizer, one epoch, `Trainer`), `adaptive` (adaptive depth),
  `fidelity` (distillation losses and measures), `evaluate` (accuracy over a predict callable, torch or
  onnxruntime), `endstep` (per-epoch files; the end step that exports, fuses and writes
  `report.json`); `kd_baseline` (the knowledge-distillation baseline).
"""

from __future__ import annotations

from lc_onnx.torch.blocks.collapsible import (
    Block,
    collapse,
    collapse_penalty,
    discover,
    find_blocks,
    make_collapsible,
    refusals,
    slopes,
)
from lc_onnx.torch.blocks.export import export_onnx
from lc_onnx.torch.blocks.records import Discovery, Refusal, RefusalKind, Spec

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
