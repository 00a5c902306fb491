"""Former home of the fine-tuning recipe, now split by job: `recipe` (`FinetuneConfig`, `finetune`),
`loop`, `evaluate`, `checkpoint`, `schedule`.

Kept only because `tests/hardening/test_security.py` imports `load_checkpoint` from here; once it imports
from `lc_onnx.torch.checkpoint`, delete this module.
"""

from __future__ import annotations

from lc_onnx.torch.checkpoint import load_checkpoint

__all__ = ["load_checkpoint"]
