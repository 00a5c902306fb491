"""Building the models `lc-onnx finetune` trains: any timm model by name, or `vgg-mlp`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from lc_onnx.errors import UserError, one_line

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
    num_classes: int,
    img_size: int,
    *,
    pretrained: bool = False,
    kwargs: Mapping[str, Any] | None = None,
) -> nn.Module:
    """`vgg-mlp` or a timm model name; `kwargs` go to the constructor (e.g. `depth=6, embed_dim=64`).

    Raises:
        UserError: unknown name, bad keyword, or pretrained weights that cannot be downloaded.
    """
    kwargs = dict(kwargs or {})
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
