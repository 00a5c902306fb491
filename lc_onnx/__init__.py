"""lc-onnx: LayerCollapse for ONNX graphs.

`fuse` collapses Linear -> (near-)linear activation -> Linear into one linear layer and verifies the
result in onnxruntime. The PyTorch half lives in `lc_onnx.torch` (imported on demand, needs the `torch`
extra).
"""

from __future__ import annotations

from lc_onnx.errors import UserError, VerificationError

__version__ = "0.1.0"

__all__ = ["FuseResult", "UserError", "VerificationError", "__version__", "calibrate", "fuse"]


def __getattr__(name: str):
    # Lazy: `import lc_onnx.torch` or `lc-onnx --help` should not pay for onnx-graphsurgeon.
    if name in ("fuse", "FuseResult"):
        from lc_onnx import pipeline

        return getattr(pipeline, name)
    if name == "calibrate":
        from lc_onnx.calibration import calibrate

        return calibrate
    raise AttributeError(f"module 'lc_onnx' has no attribute {name!r}")
