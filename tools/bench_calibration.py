"""Benchmark: calibrate a ViT-S/16 export on digit images; time and peak memory for 16 and 64 images,
beside onnxruntime's MinMax calibrator collecting its statistics over the same feeds.

    python tools/bench_calibration.py [--out DIR] [--images 16 64] [--batch 8] [--modes calibrate fuse minmax]

Builds timm's `vit_small_patch16_224` (random init, no download, MLP biases drawn from N(0, 0.02) instead
of timm's zeros; GELU MLPs in 12 blocks), exports it
with the dynamo exporter (opset 18: GELU becomes the Div/Erf/Add/Mul/Mul pattern) to DIR/vit_s16.onnx
(a temporary directory by default), then runs `lc_onnx.calibrate` in a fresh subprocess per image count
on scikit-learn digits upsampled to 224x224, 3 channels, ImageNet-normalised, and prints the wall time and
the process's peak RSS of each mode: `calibrate` (the per-channel statistics and fits), `fuse` (the whole
`lc_onnx.fuse(model, data=...)` with its defaults: least-squares block fits, the choice on held-out feeds,
in-order fits, the verified fuse) and `minmax` (onnxruntime's `MinMaxCalibrater` collecting its ranges
over the same feeds, the first step of static quantization). Memory must not grow with the number of
images: the statistics are running sums and the data is produced batch by batch.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MODES = ("calibrate", "fuse", "minmax")
MEAN = np.asarray([0.485, 0.456, 0.406], np.float32)[:, None, None]
STD = np.asarray([0.229, 0.224, 0.225], np.float32)[:, None, None]


def export(path: Path) -> None:
    import timm
    import torch

    from lc_onnx.torch.blocks.export import export_onnx

    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_224", pretrained=False)
    for block in model.blocks:
        # timm zero-inits MLP biases; the exporter would then share one zero tensor across blocks (a shared
        # weight: the sites would be refused). Trained models have distinct biases.
        torch.nn.init.normal_(block.mlp.fc1.bias, std=0.02)
        torch.nn.init.normal_(block.mlp.fc2.bias, std=0.02)
    export_onnx(model, torch.randn(1, 3, 224, 224), path, dynamo=True)


def digit_images(count: int, batch: int):
    """`count` digits as float32[batch, 3, 224, 224], produced one batch at a time."""
    sys.path.insert(0, str(ROOT / "calibration"))
    import digits

    train = digits._train_digits()
    for start in range(0, count, batch):
        chunk = digits.resize(train[start : min(start + batch, count)], 224, 224).astype(np.float32)
        yield {"input": (chunk[:, None] - MEAN) / STD}


class Images:
    """The digit images, readable again (the in-order fit reads the data once per chosen block)."""

    def __init__(self, count: int, batch: int) -> None:
        self.count, self.batch = count, batch

    def __iter__(self):
        return digit_images(self.count, self.batch)


class Reader:
    """The same feeds as an onnxruntime `CalibrationDataReader`."""

    def __init__(self, count: int, batch: int) -> None:
        self.feeds = digit_images(count, batch)

    def get_next(self):
        return next(self.feeds, None)


def worker(mode: str, model: Path, count: int, batch: int) -> None:
    start = time.perf_counter()
    out: dict = {"mode": mode, "images": count}
    if mode == "calibrate":
        import lc_onnx

        calibration = lc_onnx.calibrate(model, digit_images(count, batch))
        out["batches"] = calibration.batches
        out["fits"] = {
            k: [f.op, round(f.fit_error, 4), round(f.estimated_error, 4)] for k, f in calibration.fits.items()
        }
    elif mode == "fuse":
        import lc_onnx

        result = lc_onnx.fuse(model, data=Images(count, batch))
        out["collapsed"] = result.collapsed
        out["calibration"] = result.report.calibration
        out["worst_rel_l2"] = result.report.verification.worst_rel_l2
    else:
        from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator

        with tempfile.TemporaryDirectory() as tmp:
            calibrator = create_calibrator(
                str(model), augmented_model_path=str(Path(tmp) / "augmented.onnx"),
                calibrate_method=CalibrationMethod.MinMax,
            )  # fmt: skip
            calibrator.collect_data(Reader(count, batch))
            out["tensors"] = len(calibrator.compute_data().data)
    out["seconds"] = time.perf_counter() - start
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(out))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, help="where to write the export (default: a temporary directory)")
    parser.add_argument("--images", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        worker(args.modes[0], args.worker, args.images[0], args.batch)
        return
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        model = out / "vit_s16.onnx"
        if not model.exists():
            start = time.perf_counter()
            export(model)
            print(
                f"exported {model.name} ({model.stat().st_size / 2**20:.0f} MiB) in {time.perf_counter() - start:.1f} s"
            )
        results = []
        for count in args.images:
            for mode in args.modes:
                if mode == "fuse" and -(-count // args.batch) < 4:
                    continue  # the fuse holds out every 4th batch: it needs 4 at least
                cmd = [sys.executable, __file__, "--worker", str(model), "--images", str(count),
                       "--batch", str(args.batch), "--modes", mode]  # fmt: skip
                proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
                results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        for r in results:
            if "fits" in r:
                errs = [e for _, e, _ in r["fits"].values()]
                print(f"calibrate, {r['images']} images: {len(errs)} activation(s) fitted, fit error "
                      f"{min(errs):.3f}..{max(errs):.3f}")  # fmt: skip
            if "calibration" in r:
                print(f"fuse, {r['images']} images: {r['collapsed']} site(s) collapsed, worst output rel_l2 "
                      f"{r['worst_rel_l2']:.3g}; {json.dumps(r['calibration'])}")  # fmt: skip
        print("| images | what | seconds | peak RSS MiB |")
        print("| ---: | --- | ---: | ---: |")
        for r in results:
            print(f"| {r['images']} | {r['mode']} | {r['seconds']:.1f} | {r['peak_rss_mb']:.0f} |")


if __name__ == "__main__":
    main()
