"""The one configuration of `lc-onnx finetune`: `FinetuneConfig`, its per-objective defaults and its checks.

A config names the model, the data and the objective (`labels` or `distill`); settings left None are
filled in per objective by `resolve` (`DEFAULTS`), and `check_config` refuses settings no objective can
run with, before anything is loaded or written. Both objectives read the same typed config.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from lc_onnx.calibration.text import PREFIX
from lc_onnx.errors import UserError

TEXT = PREFIX  # the `dataset` prefix of a text file (`text:FILE`), one example per line


@dataclass
class FinetuneConfig:
    """Everything one `lc-onnx finetune` run depends on (written into `report.json`)."""

    model: str
    out: Path
    dataset: str | None = None  # None: digits, unless `data` gives the feeds
    fractions: Sequence[float] = (0.5,)
    lam: float | None = None
    epochs: int = 10
    threshold: float = 0.05
    pretrained: bool = False
    img_size: int = 16
    seed: int = 0
    batch_size: int | None = None
    lr: float | None = None
    slope_lr: float | None = None
    weight_decay: float | None = None
    init: float | None = None
    max_error: float = 0.05
    model_kwargs: Mapping[str, Any] = field(default_factory=dict)
    checkpoint: Path | None = None
    progress: bool = True
    objective: str | None = None  # `labels` or `distill`; None: `distill` for text: and data, else labels
    data: str | None = None  # FILE.py:FN yielding feeds (distill)
    distill_loss: str | None = None  # None: `cosine+mse` for hidden states, `kl` for logits
    temperature: float = 1.0
    max_length: int = 128
    snap: bool = True
    max_drop: float | None = None

    def optimizer_settings(self) -> dict[str, Any]:
        """The `Trainer` keywords this config sets, whatever the objective (resolved: none is None)."""
        return {
            "lr": self.lr,
            "slope_lr": self.slope_lr,
            "weight_decay": self.weight_decay,
            "seed": self.seed,
            "progress": self.progress,
        }


OBJECTIVES = ("labels", "distill")
# Per objective, the settings left None. Training from scratch (labels) wants AdamW at 1e-3. A pretrained
# transformer distilled into itself moves less: 2e-4, with weight decay low so the pretrained weights are
# not pulled towards 0 (all-MiniLM-L6-v2, last 3 of 6 FFNs, 2 epochs: held-out cosine 0.817 at 1e-4 and
# 0.866 at 2e-4; after one epoch 0.69 / 0.78 / 0.83 at 5e-5 / 1e-4 / 2e-4). Its penalty weight is 10:
# the distillation loss pulls a slope back towards the GELU it replaces with a gradient of about 1 near
# slope 1 (measured on MiniLM), so at λ = 1 the slopes settle far from 1 (0.14 to 0.34 after an epoch,
# and snapping them destroyed the model), while at 10 they reach the threshold within the first epoch and
# the rest of the training repairs the collapsed model.
DEFAULTS = {
    "labels": {"lr": 1e-3, "slope_lr": 3e-2, "weight_decay": 0.05, "batch_size": 64, "lam": 1.0},
    "distill": {"lr": 2e-4, "slope_lr": 2e-2, "weight_decay": 0.01, "batch_size": 32, "lam": 10.0},
}


def resolve(cfg: FinetuneConfig) -> FinetuneConfig:
    """`cfg` with the objective and every setting left None filled in (see `DEFAULTS`).

    Raises:
        UserError: both `dataset` and `data` given, or an unknown `objective`.
    """
    if cfg.data is not None and cfg.dataset is not None:
        raise UserError("give {dataset} or {data}, not both", params=["dataset", "data"])
    dataset = cfg.dataset if cfg.dataset is not None or cfg.data is not None else "digits"
    objective = cfg.objective
    if objective is None:
        objective = "distill" if cfg.data is not None or dataset.startswith(TEXT) else "labels"
    if objective not in OBJECTIVES:
        raise UserError(
            f"{{objective}} {objective!r}: choose from {', '.join(OBJECTIVES)}", params=["objective"]
        )
    filled = {k: v for k, v in DEFAULTS[objective].items() if getattr(cfg, k) is None}
    return replace(cfg, dataset=dataset, objective=objective, **filled)


def check_config(cfg: FinetuneConfig) -> None:
    """Refuse settings the recipe cannot run with (before anything is loaded or written).

    Raises:
        UserError: naming the `FinetuneConfig` field(s) at fault.
    """
    for f in cfg.fractions:
        if not 0.0 <= f <= 1.0:
            raise UserError(f"{{fractions}} {f}: must be in [0, 1]", params=["fractions"])
    if list(cfg.fractions) != sorted(cfg.fractions):
        raise UserError(
            f"{{fractions}} {' '.join(map(str, cfg.fractions))}: give fractions in increasing order",
            params=["fractions"],
        )
    if cfg.epochs < 1:
        raise UserError(f"{{epochs}} {cfg.epochs}: must be at least 1", params=["epochs"])
    if cfg.objective == "labels" and (cfg.data is not None or cfg.dataset.startswith(TEXT)):
        raise UserError(
            "{objective} labels needs a labelled image dataset (digits or an ImageFolder); "
            "text: and {data} have no labels (use distill)",
            params=["objective", "data"],
        )
    if cfg.max_drop is not None and not 0.0 <= cfg.max_drop <= 1.0:
        raise UserError(f"{{max_drop}} {cfg.max_drop}: must be in [0, 1]", params=["max_drop"])
    if cfg.max_length < 2:
        raise UserError(f"{{max_length}} {cfg.max_length}: must be at least 2", params=["max_length"])
    if cfg.objective == "distill" and cfg.checkpoint is not None:
        raise UserError("{checkpoint} is for {objective} labels", params=["checkpoint", "objective"])
