"""The Triton repository flags of `lc-onnx deploy` and `lc-onnx fuse --triton-repo`.

Each flag is a `TritonOptions` field with dashes (`--max-batch-size` sets `max_batch_size`), which is how
the CLI spells the library's errors about them by default; only the repository directory, the `repo_dir`
argument of `lc_onnx.deploy.write_model_repository`, is named per command (`--repo`, `--triton-repo`).
No heavy imports: `lc-onnx --help` builds these.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from lc_onnx.deploy.options import ACCELERATORS, DEFAULT_MAX_BATCH_SIZE, INSTANCE_KINDS, TritonOptions


def add_triton_arguments(
    parser: argparse.ArgumentParser, *, repo_flag: str = "--repo", repo_required: bool = True
) -> None:
    """Add the repository flags to `parser`, stored under `triton_*` destinations.

    Args:
        repo_flag: the flag naming the repository directory, stored as `args.triton_repo`; the
            command's `FLAGS` maps the library's `repo_dir` to it.
        repo_required: False for commands where writing a repository is optional.
    """
    group = parser.add_argument_group("Triton model repository")
    group.add_argument(
        repo_flag, dest="triton_repo", type=Path, metavar="DIR", required=repo_required,
        help="the Triton model repository to write into (created if missing)",
    )  # fmt: skip
    group.add_argument(
        "--name", dest="triton_name", metavar="NAME",
        help="model name in the repository (default: the model file's name without .onnx)",
    )  # fmt: skip
    group.add_argument(
        "--version", dest="triton_version", type=_int_at_least(1), metavar="N",
        help="version number (default: one above the highest existing version, 1 in a new model)",
    )  # fmt: skip
    group.add_argument(
        "--max-batch-size", dest="triton_max_batch_size", type=_int_at_least(0), metavar="B",
        help=f"Triton max_batch_size (default: {DEFAULT_MAX_BATCH_SIZE} when every input and output has a "
        "leading dynamic dimension, else 0 with full dims)",
    )  # fmt: skip
    group.add_argument(
        "--instance-kind", dest="triton_instance_kind", choices=INSTANCE_KINDS,
        help="instance_group kind (default: gpu with an --accelerator, else cpu)",
    )  # fmt: skip
    group.add_argument(
        "--instances", dest="triton_instances", type=_int_at_least(1), default=1, metavar="N",
        help="model instances in the instance_group (default 1)",
    )  # fmt: skip
    group.add_argument(
        "--dynamic-batching", dest="triton_dynamic_batching", action="store_true",
        help="let Triton batch concurrent requests (needs max_batch_size > 0)",
    )  # fmt: skip
    group.add_argument(
        "--accelerator", dest="triton_accelerator", choices=ACCELERATORS, default="none",
        help="onnxruntime GPU execution accelerator in the config (default none)",
    )  # fmt: skip
    group.add_argument(
        "--force", dest="triton_force", action="store_true",
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
