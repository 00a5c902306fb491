"""Building the models `lc-onnx finetune` trains: any timm model by name, `vgg-mlp`, or a transformers
image classifier (`hf:DIR_OR_NAME` pretrained, `hf-config:TYPE_OR_DIR` random; see `hf`), and the image
format each wants (`image_format`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from lc_onnx.errors import UserError, one_line
from lc_onnx.torch.data.datasets import ImageFormat
from lc_onnx.torch.models import hf

VGG_MLP = "vgg-mlp"


class VGGMlp(nn.Module):
    """A small VGG-style network: two conv stages, then the classic MLP classifier
    `Linear ReLU Dropout BatchNorm1d Linear ReLU Dropout Linear` (two collapsible blocks sharing a Linear).
    """

    def __init__(self, num_classes: int = 10, width: int = 32, hidden: int = 256, drop: float = 0.1) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
        )
        self.classifier = nn.Sequential(
            nn.Linear(8 * width, hidden),
            nn.ReLU(),
            nn.Dropout(drop),
            nn.BatchNorm1d(hidden),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Dropout(drop),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x):
        return self.classifier(self.features(x))


def build_model(
    name: str,
    num_classes: int | None,
    img_size: int,
    *,
    pretrained: bool = False,
    kwargs: Mapping[str, Any] | None = None,
) -> nn.Module:
    """`vgg-mlp`, a timm model name or an `hf:`/`hf-config:` spelling; `kwargs` go to the constructor
    (e.g. `depth=6, embed_dim=64`; transformers: config fields). A transformers model comes wrapped in
    `hf.Logits` (images in, logits out); `pretrained` is for timm names (`hf:` always loads weights).
    `num_classes=None` keeps a transformers checkpoint's own head (what distillation needs); other models
    need a number.

    Raises:
        UserError: unknown name, bad keyword, or pretrained weights that cannot be loaded.
    """
    kwargs = dict(kwargs or {})
    source = hf.parse(name, overrides=kwargs)
    if source is not None:
        if pretrained and not source.pretrained:
            raise UserError(
                f"{{model}} {name} {{pretrained}}: hf-config: models have random weights; use hf:",
                params=["model", "pretrained"],
            )
        return hf.Logits(source.model(num_labels=num_classes, image_size=img_size))
    if name == VGG_MLP:
        try:
            return VGGMlp(num_classes=num_classes, **kwargs)
        except TypeError as exc:
            raise UserError(f"{{model}} {VGG_MLP}: {one_line(exc)}", params=["model"]) from None
    import timm

    if not timm.is_model(name):
        raise UserError(f"{{model}} {name}: not a timm model name nor {VGG_MLP!r}", params=["model"])
    try:
        try:
            return timm.create_model(
                name, pretrained=pretrained, num_classes=num_classes, img_size=img_size, **kwargs
            )
        except TypeError as exc:
            if "img_size" not in str(exc):
                raise
            # Convolutional timm models take any input size and have no img_size argument.
            return timm.create_model(name, pretrained=pretrained, num_classes=num_classes, **kwargs)
    except TypeError as exc:
        raise UserError(f"{{model}} {name}: {one_line(exc)}", params=["model"]) from None
    except (OSError, RuntimeError) as exc:
        if pretrained:
            raise UserError(
                f"{{model}} {name} {{pretrained}}: cannot get the weights ({one_line(exc)})",
                params=["model", "pretrained"],
            ) from None
        raise


def image_format(name: str, img_size: int, kwargs: Mapping[str, Any] | None = None) -> ImageFormat:
    """How the model `name` wants its images: a pretrained transformers model as its image processor
    says (size, mean, std), every other model at `img_size` with mean = std = 0.5."""
    source = hf.parse(name, overrides=kwargs)
    return ImageFormat(img_size) if source is None else source.image_format(img_size)
