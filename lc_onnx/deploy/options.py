"""Serving options for a Triton repository: the `TritonOptions` dataclass and the values they take.

Kept free of heavy imports so that building the command-line parser from these does not load onnx.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_MAX_BATCH_SIZE = 8
ACCELERATORS = ("none", "cuda", "tensorrt")
INSTANCE_KINDS = ("cpu", "gpu")


@dataclass(frozen=True)
class TritonOptions:
    """How to serve the model; None means "derive it" (see `write_model_repository`).

    Attributes:
        name: the model's directory in the repository (default: the model file's name without `.onnx`).
        version: the version directory (default: one above the highest existing version).
        max_batch_size: Triton's `max_batch_size` (default: `DEFAULT_MAX_BATCH_SIZE` when every input and
            output has a leading dynamic dimension, else 0 with full dims).
        instance_kind: one of `INSTANCE_KINDS` (default: `gpu` with an accelerator, else `cpu`).
        instances: model instances in the instance group.
        dynamic_batching: let Triton batch concurrent requests (needs `max_batch_size` above 0).
        accelerator: one of `ACCELERATORS`, the onnxruntime GPU execution accelerator.
        force: replace an existing version, and an existing `config.pbtxt` that says something else.
    """

    name: str | None = None
    version: int | None = None
    max_batch_size: int | None = None
    instance_kind: str | None = None
    instances: int = 1
    dynamic_batching: bool = False
    accelerator: str = "none"
    force: bool = False
