"""lc-onnx: LayerCollapse for ONNX graphs.

`fuse` collapses Linear -> (near-)linear activation -> Linear into one linear layer and verifies the
result in onnxruntime; `calibrate` measures how linear each activation is on data. The PyTorch half
lives in `lc_onnx.torch` (imported on demand, needs the `torch` extra).
"""

from __future__ import annotations

from lc_onnx.errors import UserError, VerificationError

__version__ = "0.1.0"

__all__ = ["FuseResult", "UserError", "VerificationError", "__version__", "calibrate", "fuse"]


def __getattr__(name: str):
    # Lazy: `import lc_onnx.torch` or `lc-onnx --help` should not pay for onnx-graphsurgeon.
    if name in ("fuse", "FuseResult", "calibrate"):
        from lc_onnx import api

        return getattr(api, name)
    raise AttributeError(f"module 'lc_onnx' has no attribute {name!r}")
