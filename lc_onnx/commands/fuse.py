"""Collapse Linear -> (near-)linear activation -> Linear into one linear layer, verified in onnxruntime.

Finds Gemm / MatMul(+Add) layers joined by Identity, Dropout, BatchNormalization or PRelu/LeakyRelu
whose slopes are within --threshold of 1, rewrites each chain as one layer, runs the original and the
fused model on the same inputs and writes the fused model only when every output's relative L2 error is
within --max-error. With --data (calibration data) blocks with activations of any kind are replaced by
their least-squares linear maps (or, with --fit-method channel, the activations by per-channel lines):
the best --blocks K by held-out error, or as many as keep the outputs within the budget on held-out data.
With --triton-repo DIR the fused model is also written as a new version of a Triton model repository
(see `lc-onnx deploy`; the repository options are checked before fusing).

Exit codes: 0 done (also when nothing qualified: the output is then the same graph), 1 verification
failed (nothing written), 2 bad input.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lc_onnx.commands import common
from lc_onnx.commands.triton_options import add_triton_arguments, triton_options_from_args
from lc_onnx.errors import UserError
from lc_onnx.model import files

FLAGS = {**common.FLAGS, "repo_dir": "--triton-repo"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", type=Path, help="the .onnx model to fuse")
    parser.add_argument("-o", "--output", type=Path, help="where to write (default MODEL.collapsed.onnx)")
    common.add_fuse_options(parser)
    common.add_calibration_options(parser)
    parser.add_argument("--report", type=Path, metavar="R.json", help="write the JSON report here")
    parser.add_argument("--dry-run", action="store_true", help="fuse and verify but write no model")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars for the data passes")
    parser.add_argument(
        "--no-verify", action="store_true", help="skip the onnxruntime comparison (not recommended)"
    )
    add_triton_arguments(parser, repo_flag=FLAGS["repo_dir"], repo_required=False)


def run(args: argparse.Namespace) -> int:
    from lc_onnx.api import fuse
    from lc_onnx.graph.report import summary

    output = None if args.dry_run else (args.output or default_output(args.model))
    deploy = _check_deploy(args) if args.triton_repo is not None else None
    result = fuse(
        args.model,
        output=output,
        verify=not args.no_verify,
        **common.fuse_kwargs(args),
        **common.calibration_kwargs(args),
    )
    print(summary(result.report))
    if args.report is not None:
        files.write_text(args.report, result.report.to_json() + "\n")
    print(f"wrote {output}" if output is not None else "dry run: no model written")
    if deploy is not None:
        from lc_onnx.deploy.triton import write_model_repository

        version_dir = write_model_repository(output, args.triton_repo, deploy, report=result.report.to_dict())
        print(f"wrote {version_dir}")
    return 0


def _check_deploy(args: argparse.Namespace):
    """The Triton options, checked against the input model (fusing keeps its inputs and outputs)."""
    from lc_onnx.deploy.triton import check_model_repository

    if args.dry_run:
        raise UserError("--triton-repo needs a written model; drop --dry-run")
    options = triton_options_from_args(args, default_name=_stem(args.model))
    check_model_repository(args.model, args.triton_repo, options)
    return options


def default_output(model: Path) -> Path:
    """`model.onnx` -> `model.collapsed.onnx` beside it."""
    return model.with_name(_stem(model) + ".collapsed.onnx")


def _stem(model: Path) -> str:
    return model.name[: -len(".onnx")] if model.name.endswith(".onnx") else model.name
