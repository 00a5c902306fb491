"""Serving: write fused models into a Triton Inference Server model repository (onnxruntime backend).

`options` (flags and the `TritonOptions` dataclass, no heavy imports), `config` (graph -> `config.pbtxt`),
`triton` (the repository writer). The names below are imported on first use.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "DEFAULT_MAX_BATCH_SIZE": "options",
    "TritonOptions": "options",
    "add_triton_arguments": "options",
    "triton_options_from_args": "options",
    "TRITON_DTYPES": "config",
    "Signature": "config",
    "TensorSpec": "config",
    "TritonConfig": "config",
    "build_config": "config",
    "signature_of": "config",
    "RepositoryPlan": "triton",
    "check_model_repository": "triton",
    "write_model_repository": "triton",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    # Lazy so that `from lc_onnx.deploy.options import ...` (the CLI parser) does not load onnx.
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"lc_onnx.deploy.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'lc_onnx.deploy' has no attribute {name!r}")
