"""Write an ONNX model into a Triton model repository served by the onnxruntime backend.

Writes REPO/NAME/config.pbtxt (platform onnxruntime_onnx, every input and output with its TYPE_* and
dims, instance_group, optional dynamic_batching and GPU accelerator) and REPO/NAME/N/model.onnx (with
model.onnx.data when the weights are external), plus REPO/NAME/fuse_report_vN.json when --report names
the JSON report of `lc-onnx fuse --report`. The model is deployed as given: fuse it first, or use
`lc-onnx fuse MODEL --triton-repo DIR` to do both in one step.

max_batch_size defaults to 8 when every input and output has a leading dynamic dimension (the config
then lists the dims after it) and to 0 (full dims) otherwise. A new version goes beside the existing
ones; replacing a version or a differing config.pbtxt needs --force. Nothing is half-written.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lc_onnx.commands.triton_options import add_triton_arguments, triton_options_from_args
from lc_onnx.errors import UserError

FLAGS = {"repo_dir": "--repo"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", type=Path, help="the .onnx model to deploy (usually the fused one)")
    add_triton_arguments(parser, repo_flag=FLAGS["repo_dir"])
    parser.add_argument(
        "--report", type=Path, metavar="R.json",
        help="a fuse report (from `lc-onnx fuse --report`) to keep beside the config",
    )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    from lc_onnx.deploy.triton import write_model_repository

    report = _read_report(args.report) if args.report is not None else None
    version_dir = write_model_repository(
        args.model, args.triton_repo, triton_options_from_args(args), report=report
    )
    print(f"wrote {version_dir}")
    return 0


def _read_report(path: Path) -> dict:
    from lc_onnx.model import files

    data = files.read_json(path, "JSON report")
    if not isinstance(data, dict):
        raise UserError(f"{path}: a fuse report is a JSON object, found {type(data).__name__}")
    return data
