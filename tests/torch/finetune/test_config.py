"""`FinetuneConfig`: the objective and its defaults filled in (`resolve`), and the settings refused before
anything is loaded (`check_config`), naming the config's fields."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("torch")

from lc_onnx.errors import UserError  # noqa: E402
from lc_onnx.torch.finetune.config import DEFAULTS, TEXT, FinetuneConfig, check_config, resolve  # noqa: E402

OUT = Path("out")


def config(**changes) -> FinetuneConfig:
    return FinetuneConfig(model="vgg-mlp", out=OUT, **changes)


@pytest.mark.parametrize(
    ("changes", "dataset", "objective"),
    [
        ({}, "digits", "labels"),
        ({"dataset": "/some/images"}, "/some/images", "labels"),
        ({"dataset": f"{TEXT}lines.txt"}, f"{TEXT}lines.txt", "distill"),
        ({"data": "feeds.py:make"}, None, "distill"),
        ({"objective": "distill"}, "digits", "distill"),
    ],
)
def test_resolve_picks_the_objective_and_fills_its_defaults(changes, dataset, objective):
    cfg = resolve(config(**changes))
    assert (cfg.dataset, cfg.objective) == (dataset, objective)
    assert {k: getattr(cfg, k) for k in DEFAULTS[objective]} == DEFAULTS[objective]


def test_resolve_keeps_what_was_given():
    cfg = resolve(config(lr=0.5, lam=0.0, batch_size=7))
    assert (cfg.lr, cfg.lam, cfg.batch_size) == (0.5, 0.0, 7)
    assert cfg.slope_lr == DEFAULTS["labels"]["slope_lr"]


@pytest.mark.parametrize(
    ("changes", "message", "params"),
    [
        ({"dataset": "digits", "data": "f.py:g"}, "give dataset or data, not both", ("dataset", "data")),
        ({"objective": "ranking"}, "objective 'ranking': choose from labels, distill", ("objective",)),
    ],
)
def test_resolve_refusals_name_fields(changes, message, params):
    with pytest.raises(UserError) as exc:
        resolve(config(**changes))
    assert (str(exc.value), exc.value.params) == (message, params)


@pytest.mark.parametrize(
    ("changes", "message", "params"),
    [
        ({"objective": "labels", "dataset": f"{TEXT}x.txt"}, "objective labels needs", ("objective", "data")),
        ({"max_drop": 1.5}, "max_drop 1.5: must be in [0, 1]", ("max_drop",)),
        ({"max_length": 1}, "max_length 1: must be at least 2", ("max_length",)),
        (
            {"objective": "distill", "checkpoint": Path("c.pt")},
            "checkpoint is for objective labels",
            ("checkpoint", "objective"),
        ),
    ],
)
def test_check_config_refusals_name_fields(changes, message, params):
    with pytest.raises(UserError) as exc:
        check_config(resolve(config(**changes)))
    assert str(exc.value).startswith(message)
    assert exc.value.params == params
