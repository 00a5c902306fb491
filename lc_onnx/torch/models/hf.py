"""transformers models for `lc-onnx finetune`: which model to load, how, and its preprocessing (`HFModel`).

Two spellings of `--model` (`parse`):

- `hf:DIR_OR_NAME`: the weights with `from_pretrained` (a local directory, or a Hub name where the
  machine can download), and the preprocessing saved with them (`AutoProcessor`: an image processor, a
  tokenizer, or both).
- `hf-config:TYPE_OR_DIR`: random weights from a config alone, no download — a model type transformers
  knows (`vit`, `bert`, `clip_vision_model`, ...; `AutoConfig.for_model`) or a `config.json` / a
  directory holding one. For offline tests and from-scratch runs; there is no preprocessing to load.

`overrides` (`--model-arg KEY=VALUE`) change config fields either way (`hidden_size=32`,
`num_hidden_layers=2`).

A task says which auto class builds the model: `image-classification`
(`AutoModelForImageClassification`, a fresh head of `num_labels` outputs when the checkpoint's differs) or
`features` (`AutoModel`, no head: for objectives on hidden states, such as post-training distillation).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from lc_onnx.errors import UserError, one_line
from lc_onnx.torch.data.datasets import ImageFormat

logger = logging.getLogger(__name__)

PRETRAINED, FROM_CONFIG = "hf:", "hf-config:"
# task -> the transformers auto class that builds its model
TASKS = {"image-classification": "AutoModelForImageClassification", "features": "AutoModel"}


def hide_progress() -> None:
    """Turn off transformers' own progress bars (loading weights) for this process, where installed."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return
    hf_logging.disable_progress_bar()


def parse(
    spec: str, task: str = "image-classification", overrides: Mapping[str, Any] | None = None
) -> HFModel | None:
    """The `HFModel` a `--model` value names, or None when it is not an `hf:`/`hf-config:` spelling."""
    for prefix, pretrained in ((PRETRAINED, True), (FROM_CONFIG, False)):
        if spec.startswith(prefix):
            name = spec[len(prefix) :]
            if not name:
                raise UserError(
                    f"{{model}} {spec}: name a directory, a Hub model or a model type", params=["model"]
                )
            return HFModel(name, pretrained, task, dict(overrides or {}))
    return None


@dataclass(frozen=True)
class HFModel:
    """One transformers model to build.

    Attributes:
        name: a directory or Hub name (`pretrained`), or a model type / config path (not `pretrained`).
        pretrained: load weights with `from_pretrained`; otherwise random weights from the config.
        task: a key of `TASKS`.
        overrides: config fields to change.
    """

    name: str
    pretrained: bool
    task: str = "image-classification"
    overrides: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {', '.join(TASKS)}, got {self.task!r}")

    @property
    def spec(self) -> str:
        return (PRETRAINED if self.pretrained else FROM_CONFIG) + self.name

    def config(self, **changes: Any):
        """The model's config with `changes` applied where it has those fields, then `overrides`."""
        import transformers

        try:
            if self.pretrained or _is_path(self.name) or self.name not in transformers.CONFIG_MAPPING:
                config = transformers.AutoConfig.from_pretrained(self.name)
            else:
                config = transformers.AutoConfig.for_model(self.name)
        except (OSError, ValueError) as exc:
            raise UserError(
                f"{{model}} {self.spec}: cannot load its config ({one_line(exc)})", params=["model"]
            ) from None
        for key, value in changes.items():
            if hasattr(config, key):
                setattr(config, key, value)
        for key, value in self.overrides.items():
            if not hasattr(config, key):
                raise UserError(
                    f"{{model}} {self.spec}: {type(config).__name__} has no field {key!r}", params=["model"]
                )
            try:
                setattr(config, key, value)
            except Exception as exc:  # transformers validates fields (types, ranges) in many ways
                raise UserError(
                    f"{{model}} {self.spec}: {key}={value!r}: {one_line(exc)}", params=["model"]
                ) from None
        return config

    def model(self, num_labels: int | None = None, image_size: int | None = None) -> nn.Module:
        """The transformers model: for `image-classification` with a head of `num_labels` outputs; a
        random one for images of `image_size` where its config has that field (unless overridden)."""
        import transformers

        auto = getattr(transformers, TASKS[self.task])
        changes: dict[str, Any] = {} if num_labels is None else {"num_labels": num_labels}
        if image_size is not None and not self.pretrained:
            changes["image_size"] = image_size
        config = self.config(**changes)
        try:
            if not self.pretrained:
                return auto.from_config(config)
            return auto.from_pretrained(self.name, config=config, ignore_mismatched_sizes=True)
        except ValueError as exc:  # no such auto class for this model type
            raise UserError(
                f"{{model}} {self.spec}: transformers builds no {TASKS[self.task]} from it ({one_line(exc)})",
                params=["model"],
            ) from None
        except OSError as exc:
            raise UserError(
                f"{{model}} {self.spec}: cannot load the weights ({one_line(exc)})", params=["model"]
            ) from None

    def processor(self) -> Any | None:
        """The saved preprocessing (`AutoProcessor`: image processor, tokenizer or both), or None (random
        models have none; a directory without one neither)."""
        if not self.pretrained:
            return None
        import transformers

        try:
            return transformers.AutoProcessor.from_pretrained(self.name)
        except (OSError, ValueError, TypeError, KeyError) as exc:
            logger.info("%s: no processor (%s)", self.spec, one_line(exc))
            return None

    def image_format(self, default_size: int) -> ImageFormat:
        """The processor's image size and normalisation; without one, the config's `image_size` (random
        models: `default_size`, which `model` then builds for) and mean = std = 0.5."""
        processor = self.processor()
        images = getattr(processor, "image_processor", processor)
        if images is not None and getattr(images, "image_mean", None) is not None:
            size = _size(getattr(images, "crop_size", None)) or _size(getattr(images, "size", None))
            return ImageFormat(size or default_size, tuple(images.image_mean), tuple(images.image_std))
        if self.pretrained:
            return ImageFormat(int(getattr(self.config(), "image_size", default_size)))
        return ImageFormat(int(self.overrides.get("image_size", default_size)))


def _size(size: Any) -> int | None:
    if size is None:
        return None
    for key in ("height", "shortest_edge"):
        value = size.get(key) if isinstance(size, Mapping) else getattr(size, key, None)
        if value:
            return int(value)
    return None


def _is_path(name: str) -> bool:
    return os.sep in name or Path(name).exists()


class Logits(nn.Module):
    """A transformers image classifier as `lc-onnx finetune` trains and exports it: images in, logits out."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values):
        return self.model(pixel_values=pixel_values).logits
