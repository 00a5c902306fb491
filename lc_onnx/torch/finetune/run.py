"""`finetune`: one `lc-onnx finetune` run, from its config to `report.json`.

The config is resolved (the objective and its defaults, `config.resolve`) and checked before anything
is loaded or written; then the run joins the `torchrun` process group when launched by it (`loop`) and
hands over to its objective: `labels` (cross-entropy on labelled images) or `distill` (the unmodified
model as teacher, no labels). Only rank 0 writes files: `metrics.jsonl` and `checkpoint.pt` after every
epoch, then `model.onnx`, `model.collapsed.onnx` and `report.json` (`endstep`).
"""

from __future__ import annotations

from typing import Any

from lc_onnx.torch.finetune import distill, labels
from lc_onnx.torch.finetune.config import FinetuneConfig, check_config, resolve
from lc_onnx.torch.finetune.loop import distributed
from lc_onnx.torch.models import hf


def finetune(cfg: FinetuneConfig) -> dict[str, Any]:
    """Run the whole recipe; rank 0 writes `cfg.out/{model.onnx, model.collapsed.onnx, report.json, ...}`.

    Returns:
        The report (same content as `report.json`; empty dict on ranks other than 0).

    Raises:
        UserError: a bad setting (naming the `FinetuneConfig` field), model, dataset or checkpoint.
    """
    cfg = resolve(cfg)
    check_config(cfg)
    if not cfg.progress:
        hf.hide_progress()
    with distributed() as ctx:
        if cfg.objective == "distill":
            return distill.run(cfg, ctx)
        return labels.run(cfg, ctx)
