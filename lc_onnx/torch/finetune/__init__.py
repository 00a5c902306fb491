"""The fine-tuning recipes behind `lc-onnx finetune`: what trains the MLP activations to linear.

`FinetuneConfig` (`config`) is the one typed configuration; `finetune` (`run`) resolves it and hands
over to an objective: `labels` (cross-entropy on labelled images) or `distill` (post-training, the
unmodified model as teacher). An objective imports the shared pieces, never the other objective:
`schedule` (which blocks collapse when), `loop` (distributed context, optimizer, one epoch, `Trainer`),
`adaptive` (adaptive depth), `fidelity` (distillation losses and measures), `evaluate` (accuracy over a
predict callable, torch or onnxruntime) and `endstep` (the per-epoch files and the end step: export,
collapse, fuse, `report.json`). `kd_baseline` is the knowledge-distillation baseline the benchmarks
compare against.
"""

from __future__ import annotations

from lc_onnx.torch.finetune.config import FinetuneConfig
from lc_onnx.torch.finetune.run import finetune

__all__ = ["FinetuneConfig", "finetune"]
