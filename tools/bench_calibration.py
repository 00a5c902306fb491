"""Benchmark: calibrate a ViT-S/16 export on digit images; time and peak memory for 16 and 64 images.

    python tools/bench_calibration.py [--out DIR] [--images 16 64] [--batch 8]

Builds timm's `vit_small_patch16_224` (random init, no download, MLP biases drawn from N(0, 0.02) instead
of timm's zeros; GELU MLPs in 12 blocks), exports it
with the dynamo exporter (opset 18: GELU becomes the Div/Erf/Add/Mul/Mul pattern) to DIR/vit_s16.onnx
(a temporary directory by default), then runs `lc_onnx.calibrate` in a fresh subprocess per image count
on scikit-learn digits upsampled to 224x224, 3 channels, ImageNet-normalised, and prints the wall time of
`calibrate` and the process's peak RSS. Memory must not grow with the number of images: the statistics
are running moments and the data is produced batch by batch.
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


def worker(model: Path, count: int, batch: int) -> None:
    import lc_onnx

    start = time.perf_counter()
    calibration = lc_onnx.calibrate(model, digit_images(count, batch))
    seconds = time.perf_counter() - start
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    fits = {
        k: [f.op, round(f.fit_error, 4), round(f.estimated_error, 4)] for k, f in calibration.fits.items()
    }
    print(json.dumps({"images": count, "batches": calibration.batches, "seconds": seconds, "peak_rss_mb": rss_mb,
                      "fits": fits}))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, help="where to write the export (default: a temporary directory)")
    parser.add_argument("--images", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        worker(args.worker, args.images[0], args.batch)
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
            cmd = [
                sys.executable,
                __file__,
                "--worker",
                str(model),
                "--images",
                str(count),
                "--batch",
                str(args.batch),
            ]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
            results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        fits = results[-1]["fits"]
        ops = sorted({op for op, _, _ in fits.values()})
        errs = [e for _, e, _ in fits.values()]
        print(
            f"{len(fits)} activation(s) fitted ({', '.join(ops)}); fit error {min(errs):.3f}..{max(errs):.3f}"
        )
        print("| images | batches | calibrate s | peak RSS MiB |")
        print("| ---: | ---: | ---: | ---: |")
        for r in results:
            print(f"| {r['images']} | {r['batches']} | {r['seconds']:.1f} | {r['peak_rss_mb']:.0f} |")


if __name__ == "__main__":
    main()
