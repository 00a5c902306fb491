"""Serving: write fused models into a Triton Inference Server model repository (onnxruntime backend).

`options` (the `TritonOptions` dataclass and its values, no heavy imports), `model_config` (Triton's
`ModelConfig` message, protobuf only), `config` (graph -> `config.pbtxt`), `triton` (the repository
writer). The names below are imported on first use. The command-line flags for these options live in
`lc_onnx.commands.triton_options`.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "ACCELERATORS": "options",
    "DEFAULT_MAX_BATCH_SIZE": "options",
    "INSTANCE_KINDS": "options",
    "TritonOptions": "options",
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
