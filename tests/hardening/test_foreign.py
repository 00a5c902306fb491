"""`lc_onnx.fuse` on graphs it did not build: timm and torchvision exports by both torch exporters, and the
ONNX backend test models that ship inside the `onnx` package.

Exported as they are, their MLPs have no linear activation between the two linear layers: fuse must run,
report every MLP it found with the activation that stops it, and collapse only what is exactly linear as
exported (MobileNetV3 has one pair of 1x1 convolutions with nothing between them), so that the output is
the input model itself (same proto, same onnxruntime outputs) or, where that pair collapsed, equal to it
to float rounding. The CNNs' other 1x1-convolution pairs (squeeze-and-excitation, a projection feeding a
residual) are listed with the activation or the consumer that stops them. With the MLP activations made
collapsible (PReLU of slope 1), the same exports must collapse every block exactly.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest

import lc_onnx
from lc_onnx.model import runtime
from lc_onnx.testing import ort_outputs, rel_l2

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")

from lc_onnx.torch import export_onnx, make_collapsible  # noqa: E402
from tests.torch.nets import randomise  # noqa: E402

LIGHT = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
IMG = 32


@dataclass(frozen=True)
class Family:
    """A small random-init member of an architecture family; `blocks` MLPs stopped by `activation`, and
    the other sites of the export as it is, counted by `(decision, reason_kind, activation)`."""

    build: object
    blocks: int
    activation: str
    others: tuple[tuple[tuple[str, str, str], int], ...] = ()

    @property
    def exact_pairs(self) -> int:
        return sum(n for (decision, _, _), n in self.others if decision == "collapsed")


# The smallest variants, cut to one or two blocks per stage where timm allows: the graph patterns of a
# block do not depend on the depth, the export time does.
FAMILIES = {
    "vit": Family(lambda: timm.create_model("vit_tiny_patch16_224", img_size=IMG, depth=2), 2, "Gelu"),
    "mixer": Family(
        lambda: timm.models.mlp_mixer.MlpMixer(img_size=IMG, patch_size=16, num_blocks=2, embed_dim=64),
        4,
        "Gelu",
    ),
    # conv_mlp=False: the MLP is nn.Linear on NHWC tensors (rank-4 MatMuls), as in the paper's ConvNeXt.
    "convnext": Family(
        lambda: timm.create_model("convnext_atto", depths=(1, 1, 1, 1), conv_mlp=False), 4, "Gelu"
    ),
    "swin": Family(
        lambda: timm.create_model(
            "swin_tiny_patch4_window7_224",
            img_size=IMG,
            window_size=2,
            depths=(1, 1, 1, 1),
            embed_dim=24,
            num_heads=(1, 1, 1, 1),
        ),
        4,
        "Gelu",
    ),  # fmt: skip
    "resnet": Family(lambda: torchvision.models.resnet18(), 0, ""),
    "mobilenetv3": Family(
        lambda: torchvision.models.mobilenet_v3_small(),
        1,
        "HardSwish",
        (
            (("collapsed", "exact", "none"), 1),  # a 1x1 projection straight into the next 1x1 expansion
            (("skipped", "not_linear", "Relu"), 9),  # squeeze-and-excitation: conv 1x1, ReLU, conv 1x1
            (("skipped", "consumer", "none"), 4),  # a 1x1 projection that also feeds the residual Add
        ),
    ),
    "efficientnet": Family(
        lambda: torchvision.models.efficientnet_b0(),
        0,
        "",
        (
            (("skipped", "not_linear", "Silu"), 16),  # squeeze-and-excitation
            (("skipped", "consumer", "none"), 5),
            (("skipped", "parameter_growth", "none"), 2),  # projection -> expansion: a bottleneck
        ),
    ),
}
# The dynamo exporter takes 10-25 s for these three on two cores: their dynamo exports run with `-m slow`.
SLOW_DYNAMO = {"swin", "mobilenetv3", "efficientnet"}


def cases(families) -> list:
    """(family, dynamo) for both exporters; the slow dynamo exports marked `slow`."""
    return [
        pytest.param(f, dynamo, id=f"{f}-{'dynamo' if dynamo else 'torchscript'}",
                     marks=[pytest.mark.slow] if dynamo and f in SLOW_DYNAMO else [])
        for f in families
        for dynamo in (False, True)
    ]  # fmt: skip


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def export(family: str, dynamo: bool, directory: Path, *, collapsible: bool = False) -> Path:
    torch.manual_seed(0)
    # Non-zero biases: timm zero-inits them, and the exporters then share one zero tensor between layers.
    model = randomise(FAMILIES[family].build())
    if collapsible:
        assert len(make_collapsible(model, fraction=1.0, init=1.0)) == FAMILIES[family].blocks
    images = torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(1))
    return export_onnx(model, images, directory / f"{family}.onnx", dynamo=dynamo)


def assert_equal_outputs(source: Path, out: Path) -> None:
    """`out` passes the full check and gives `source`'s onnxruntime outputs to float rounding."""
    fused, original = onnx.load(str(out)), onnx.load(str(source))
    onnx.checker.check_model(fused, full_check=True)
    feeds = runtime.random_feeds(original, runtime.input_shapes(original), seed=3)
    for e, a in zip(ort_outputs(str(source), feeds), ort_outputs(str(out), feeds), strict=True):
        assert rel_l2(a, e) <= 1e-5


def assert_macs_counted(result: lc_onnx.FuseResult, source: Path) -> None:
    """Every MatMul, Gemm and Conv is counted (none of unknown shape), and a collapse removes MACs."""
    ops = {n.op_type for n in onnx.load(str(source), load_external_data=False).graph.node}
    report = result.report
    if ops & {"MatMul", "Gemm", "Conv"}:
        assert report.macs_before > 0
        assert (report.macs_not_counted_before, report.macs_not_counted_after) == ([], [])
    if result.collapsed:
        assert report.macs_after < report.macs_before


def assert_unchanged(source: Path, out: Path) -> None:
    """`out` is the same model as `source`: same proto, bit-identical onnxruntime outputs."""
    original, fused = onnx.load(str(source)), onnx.load(str(out))
    assert fused == original
    onnx.checker.check_model(fused, full_check=True)
    feeds = runtime.random_feeds(original, runtime.input_shapes(original), seed=3)
    for e, a in zip(ort_outputs(str(source), feeds), ort_outputs(str(out), feeds), strict=True):
        assert np.array_equal(e, a)


@pytest.mark.parametrize(("family", "dynamo"), cases(FAMILIES))
def test_export_without_linear_activations_is_left_identical(tmp_path, family, dynamo):
    source = export(family, dynamo, tmp_path)
    before = digest(source)

    result = lc_onnx.fuse(source, output=tmp_path / "out.onnx")

    assert digest(source) == before
    assert_macs_counted(result, source)
    expected = FAMILIES[family]
    mlps = [
        s for s in result.report.sites if re.fullmatch(rf"{expected.activation} \S+ is not linear", s.reason)
    ]
    assert len(mlps) == expected.blocks, [s.reason for s in result.report.sites]
    others = Counter((s.decision, s.reason_kind, s.activation) for s in result.report.sites if s not in mlps)
    assert sorted(others.items()) == sorted(expected.others)
    assert result.collapsed == expected.exact_pairs
    if expected.exact_pairs:
        assert all(s.extra["exact"] for s in result.report.collapsed)
        assert result.report.params_after < result.report.params_before
        assert_equal_outputs(source, tmp_path / "out.onnx")
    else:
        assert result.report.params_after == result.report.params_before
        assert_unchanged(source, tmp_path / "out.onnx")


# ResNet and EfficientNet have no Linear -> activation -> Linear; ViT and Mixer are covered in tests/torch.
@pytest.mark.parametrize(("family", "dynamo"), cases(["convnext", "swin", "mobilenetv3"]))
def test_export_with_linear_activations_collapses_every_block(tmp_path, family, dynamo):
    source = export(family, dynamo, tmp_path, collapsible=True)

    result = lc_onnx.fuse(source, output=tmp_path / "out.onnx", threshold=0.0)

    assert_macs_counted(result, source)
    expected = FAMILIES[family]
    assert result.collapsed == expected.blocks + expected.exact_pairs, [s.reason for s in result.report.sites]
    assert all(site.extra["exact"] for site in result.report.collapsed)
    assert result.report.params_after < result.report.params_before
    fused, original = onnx.load(str(tmp_path / "out.onnx")), onnx.load(str(source))
    onnx.checker.check_model(fused, full_check=True)
    assert [n.op_type for n in fused.graph.node].count("PRelu") == 0
    feeds = runtime.random_feeds(original, {"input": (3, 3, IMG, IMG)}, seed=3)
    for e, a in zip(ort_outputs(str(source), feeds), ort_outputs(fused, feeds), strict=True):
        assert rel_l2(a, e) <= 1e-5


RELU = r"Relu \S+ is not linear"
# model -> (sites, their reason): the `Gemm -> Relu [-> Dropout] -> Gemm` classifiers of the three
# Caffe-era CNNs (weights computed by ConstantOfShape nodes, IR 3 lists every initializer as an input),
# and SqueezeNet's fire modules, whose 1x1 squeeze feeds, through a Relu, both a 1x1 and a 3x3 expansion.
BACKEND = {
    "bvlc_alexnet": (2, RELU),
    "densenet121": (0, ""),
    "inception_v1": (0, ""),
    "inception_v2": (0, ""),
    "resnet50": (0, ""),
    "shufflenet": (0, ""),
    "squeezenet": (8, r"'\S+' also feeds \S+"),
    "vgg19": (2, RELU),
    "zfnet512": (2, RELU),
}


def test_every_backend_model_is_listed():
    assert sorted(p.stem.removeprefix("light_") for p in LIGHT.glob("*.onnx")) == sorted(BACKEND)


@pytest.mark.parametrize(("name", "expected"), list(BACKEND.items()))
def test_backend_model_with_relu_classifier_is_left_identical(tmp_path, name, expected):
    sites, pattern = expected
    source = LIGHT / f"light_{name}.onnx"
    before = digest(source)

    result = lc_onnx.fuse(source, output=tmp_path / "out.onnx")

    assert digest(source) == before
    assert_macs_counted(result, source)
    assert result.collapsed == 0
    reasons = [site.reason for site in result.report.sites]
    assert len(reasons) == sites
    assert all(re.fullmatch(pattern, r) for r in reasons), reasons
    assert_unchanged(source, tmp_path / "out.onnx")
