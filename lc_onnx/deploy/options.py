"""Serving options for a Triton repository, and the command-line flags that set them.

Kept free of heavy imports so that building the CLI parser (`lc-onnx --help`) does not load onnx.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

DEFAULT_MAX_BATCH_SIZE = 8
ACCELERATORS = ("none", "cuda", "tensorrt")
INSTANCE_KINDS = ("cpu", "gpu")


@dataclass(frozen=True)
class TritonOptions:
    """How to serve the model; None means "derive it" (see `write_model_repository`)."""

    name: str | None = None
    version: int | None = None
    max_batch_size: int | None = None
    instance_kind: str | None = None
    instances: int = 1
    dynamic_batching: bool = False
    accelerator: str = "none"
    force: bool = False


def add_triton_arguments(
    parser: argparse.ArgumentParser,
    *,
    repo_flag: str = "--repo",
    repo_required: bool = True,
    prefix: str = "",
) -> None:
    """Add the repository options to `parser`, all stored under `triton_*` destinations.

    Args:
        repo_flag: the flag naming the repository directory (`--repo` for deploy, `--triton-repo` for
            fuse); stored as `args.triton_repo`.
        repo_required: False for commands where writing a repository is optional.
        prefix: put before every other flag name (`prefix="triton-"` gives `--triton-name`, ...), for
            commands whose own flags would clash.
    """
    group = parser.add_argument_group("Triton model repository")
    group.add_argument(
        repo_flag, dest="triton_repo", type=Path, metavar="DIR", required=repo_required,
        help="the Triton model repository to write into (created if missing)",
    )  # fmt: skip
    group.add_argument(
        f"--{prefix}name", dest="triton_name", metavar="NAME",
        help="model name in the repository (default: the model file's name without .onnx)",
    )  # fmt: skip
    group.add_argument(
        f"--{prefix}version", dest="triton_version", type=_int_at_least(1), metavar="N",
        help="version number (default: one above the highest existing version, 1 in a new model)",
    )  # fmt: skip
    group.add_argument(
        f"--{prefix}max-batch-size", dest="triton_max_batch_size", type=_int_at_least(0), metavar="B",
        help=f"Triton max_batch_size (default: {DEFAULT_MAX_BATCH_SIZE} when every input and output has a "
        "leading dynamic dimension, else 0 with full dims)",
    )  # fmt: skip
    group.add_argument(
        f"--{prefix}instance-kind", dest="triton_instance_kind", choices=INSTANCE_KINDS,
        help="instance_group kind (default: gpu with an --accelerator, else cpu)",
    )  # fmt: skip
    group.add_argument(
        f"--{prefix}instances", dest="triton_instances", type=_int_at_least(1), default=1, metavar="N",
        help="model instances in the instance_group (default 1)",
    )  # fmt: skip
    group.add_argument(
        f"--{prefix}dynamic-batching", dest="triton_dynamic_batching", action="store_true",
        help="let Triton batch concurrent requests (needs max_batch_size > 0)",
    )  # fmt: skip
    group.add_argument(
        f"--{prefix}accelerator", dest="triton_accelerator", choices=ACCELERATORS, default="none",
        help="onnxruntime GPU execution accelerator in the config (default none)",
    )  # fmt: skip
    group.add_argument(
        f"--{prefix}force", dest="triton_force", action="store_true",
        help="replace an existing version directory and a config.pbtxt that says something else",
    )  # fmt: skip


def triton_options_from_args(args: argparse.Namespace, *, default_name: str | None = None) -> TritonOptions:
    """The options `add_triton_arguments` parsed; `default_name` fills in a missing `--name`."""
    return TritonOptions(
        name=args.triton_name or default_name,
        version=args.triton_version,
        max_batch_size=args.triton_max_batch_size,
        instance_kind=args.triton_instance_kind,
        instances=args.triton_instances,
        dynamic_batching=args.triton_dynamic_batching,
        accelerator=args.triton_accelerator,
        force=args.triton_force,
    )


def _int_at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be {low} or more, got {value}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse
