"""lc-onnx: LayerCollapse for ONNX graphs.

`fuse` collapses Linear -> (near-)linear activation -> Linear into one linear layer and verifies the
result in onnxruntime. The PyTorch half lives in `lc_onnx.torch` (imported on demand).
"""

from __future__ import annotations

from lc_onnx.errors import UserError, VerificationError

__version__ = "0.1.0"

__all__ = ["UserError", "VerificationError", "__version__", "fuse", "FuseResult", "calibrate"]


def __getattr__(name: str):
    # Lazy so that `import lc_onnx` (and the CLI's --help) does not pay for onnx-graphsurgeon/onnxruntime.
    if name in ("fuse", "FuseResult"):
        from lc_onnx import fuse as _fuse_module

        return getattr(_fuse_module, name)
    if name == "calibrate":
        from lc_onnx.calibrate import calibrate

        return calibrate
    raise AttributeError(f"module 'lc_onnx' has no attribute {name!r}")
