"""Small random-init models for the torch tests (no downloads)."""

from __future__ import annotations

import timm
import torch
from timm.models.mlp_mixer import MlpMixer
from torch import nn

IMG = 16


def tiny(name: str = "vit_tiny_patch16_224", depth: int = 4, **kwargs) -> nn.Module:
    """A timm ViT-family model shrunk to 16x16 images, 4x4 patches, width 32 and 2 heads."""
    options = {"num_classes": 10, **kwargs}
    return timm.create_model(
        name, img_size=IMG, patch_size=4, depth=depth, embed_dim=32, num_heads=2, **options
    )


def vit(depth: int = 4) -> nn.Module:
    return tiny("vit_tiny_patch16_224", depth)


def deit(depth: int = 4) -> nn.Module:
    return tiny("deit_tiny_patch16_224", depth)


def mixer(blocks: int = 3) -> nn.Module:
    return MlpMixer(num_classes=10, img_size=IMG, patch_size=4, num_blocks=blocks, embed_dim=32)


class VGGStyle(nn.Module):
    """Conv features, then the classifier `Linear ReLU Dropout BatchNorm1d Linear ReLU Dropout Linear`."""

    def __init__(self, features: int = 24, hidden: int = 40, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()
        )
        self.classifier = nn.Sequential(
            nn.Linear(8, features),
            nn.ReLU(),
            nn.Dropout(0.1),
            nn.BatchNorm1d(features),
            nn.Linear(features, hidden),
            nn.ReLU(),
            nn.Dropout(0.1),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def vgg() -> nn.Module:
    return VGGStyle()


def randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-zero biases everywhere (timm zero-inits them and exporters then share one zero initializer)
    and non-trivial batch-norm statistics, so collapse algebra is exercised for real."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear) and module.bias is not None:
                module.bias.copy_(torch.randn(module.bias.shape, generator=gen) * 0.1)
            if isinstance(module, nn.BatchNorm1d):
                module.running_mean.copy_(torch.randn(module.num_features, generator=gen) * 0.2)
                module.running_var.copy_(torch.rand(module.num_features, generator=gen) + 0.5)
                module.weight.copy_(torch.rand(module.num_features, generator=gen) + 0.5)
                module.bias.copy_(torch.randn(module.num_features, generator=gen) * 0.1)
    return model.eval()


def images(n: int = 4, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, IMG, IMG, generator=torch.Generator().manual_seed(seed))
