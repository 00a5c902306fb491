"""Measure on calibration data how linear each activation is: per-channel least-squares fits a*h + c.

Streams the data once through onnxruntime with every candidate activation's input and output exposed,
keeps running per-channel moments (memory does not grow with the data), and writes the fits as JSON for
`lc-onnx fuse MODEL --fits FITS.json --data SPEC` (or `--fits` alone to apply them all).

--data is FILE.py:FUNCTION (the function returns an iterable of {input name: array}, or an onnxruntime
CalibrationDataReader), a directory of .npz files (one feed per file), one .npz file, or text:FILE (one
example per line, tokenized with --tokenizer DIR; the lines held out by their CRC-32 are not fitted on).

Exit codes: 0 done, 2 bad input (a bad model, bad data: wrong input name, dtype or shape, no feeds).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lc_onnx.commands import common
from lc_onnx.commands.common import FLAGS  # noqa: F401  (how errors spell the parameters)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", type=Path, help="the .onnx model to calibrate")
    parser.add_argument(
        "--data", required=True, metavar="SPEC",
        help="FILE.py:FUNCTION, DIR of .npz, FILE.npz, or text:FILE (with --tokenizer)",
    )  # fmt: skip
    common.add_text_options(parser)
    parser.add_argument("-o", "--output", type=Path, help="where to write the fits (default MODEL.fits.json)")
    parser.add_argument("--calib-batches", type=int, metavar="N", help="use only the first N feeds")


def run(args: argparse.Namespace) -> int:
    from lc_onnx.calibration import calibrate

    output = args.output or args.model.with_name(_stem(args.model) + ".fits.json")
    calibration = calibrate(
        args.model, common.data_from_args(args), calib_batches=args.calib_batches, output=output
    )
    print(f"{len(calibration.fits)} activation(s) fitted on {calibration.batches} batch(es)")
    for key, fit in calibration.fits.items():
        print(
            f"  {key} [{fit.op}, {fit.scale.shape[0]} channels]: fit error {fit.fit_error:.3g}, "
            f"estimated output error {fit.estimated_error:.3g}"
        )
    print(f"wrote {output}")
    return 0


def _stem(model: Path) -> str:
    return model.name[: -len(".onnx")] if model.name.endswith(".onnx") else model.name
