"""Fine-tune a model with the LayerCollapse penalty, collapse its MLPs, export and fuse it (needs torch).

Loss = cross-entropy + LAM * sum over PReLU blocks of mean (1 - slope)^2. The last ceil(F * n) of the
model's n MLP blocks get PReLU activations; after every epoch, blocks whose slopes are within
--threshold of 1 are collapsed into one Linear. With several --fraction values (increasing), the next one
starts once every block of the current one has collapsed. At the end the model is collapsed, exported to
DIR/model.onnx, fused by the graph pass into DIR/model.collapsed.onnx, and DIR/report.json records test
accuracy (before collapse, after collapse in torch, and in onnxruntime on the fused graph), parameters
and MACs. DIR/metrics.jsonl has one JSON line per epoch; DIR/checkpoint.pt is a state dict (load it with
--checkpoint; it is read with torch.load(weights_only=True)).

Models: a timm name, `vgg-mlp`, `hf:DIR_OR_NAME` (a transformers image classifier loaded with
from_pretrained, images as its image processor says) or `hf-config:TYPE_OR_DIR` (random weights from a
config: a model type such as `vit`, or a config.json / directory; --model-arg sets config fields).

Datasets: `digits` (scikit-learn's bundled 8x8 digits, upsampled to --img-size, fixed 1437/360 split) or
an ImageFolder directory (DIR/train + DIR/test or DIR/val, else one folder split 80/20).

Several GPUs or processes: torchrun --nproc-per-node N -m lc_onnx.cli finetune ... (DistributedDataParallel).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lc_onnx.errors import UserError, one_line

# How this command spells the library's parameters where it is not `--name-with-dashes`
# (`FinetuneConfig.fractions` is given one `--fraction` flag with several values).
FLAGS = {"fractions": "--fraction"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        required=True,
        help="a timm model name, vgg-mlp, hf:DIR_OR_NAME (a transformers image classifier, from_pretrained) "
        "or hf-config:TYPE_OR_DIR (random weights from a config, e.g. hf-config:vit)",
    )
    parser.add_argument(
        "--dataset", default="digits", help="digits or an ImageFolder directory (default digits)"
    )
    parser.add_argument(
        "--fraction",
        type=float,
        nargs="+",
        default=[0.5],
        metavar="F",
        help="share of MLP blocks (from the output end) to collapse; several values = progressive stages",
    )
    parser.add_argument("--lam", type=float, default=1.0, help="weight of the collapse penalty (default 1.0)")
    parser.add_argument("--epochs", type=int, default=10, help="training epochs (default 10)")
    parser.add_argument("--threshold", type=float, default=0.05, help="collapse when |slope - 1| <= T")
    parser.add_argument(
        "--max-error",
        type=float,
        default=0.05,
        help="largest relative L2 error of the fused graph vs. the export on test images (default 0.05)",
    )
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="output directory")
    parser.add_argument(
        "--pretrained", action="store_true", help="start from timm's pretrained weights (hf: always does)"
    )
    parser.add_argument("--img-size", type=int, default=16, help="input size (default 16)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=64, help="per process (default 64)")
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate, cosine decay")
    parser.add_argument(
        "--slope-lr", type=float, default=3e-2, help="learning rate of the PReLU slopes (default 3e-2)"
    )
    parser.add_argument(
        "--init", type=float, help="initial PReLU slope (default: 0.01, LeakyReLU keeps its own)"
    )
    parser.add_argument("--checkpoint", type=Path, help="start from this DIR/checkpoint.pt of an earlier run")
    parser.add_argument(
        "--model-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="model constructor argument (transformers: config field), repeatable "
        "(e.g. --model-arg depth=6 --model-arg embed_dim=64)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def parse_model_args(items: list[str]) -> dict[str, object]:
    """`KEY=VALUE` strings to keyword arguments; values are read as JSON when they parse (6, 0.1, true)."""
    kwargs: dict[str, object] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise UserError(f"--model-arg {item!r}: expected KEY=VALUE")
        try:
            kwargs[key] = json.loads(value)
        except json.JSONDecodeError:
            kwargs[key] = value
    return kwargs


def run(args: argparse.Namespace) -> int:
    try:
        from lc_onnx.torch.recipe import FinetuneConfig, finetune
    except ImportError as exc:
        raise UserError(f"needs the torch extra: pip install 'lc-onnx[torch]' ({one_line(exc)})") from None

    cfg = FinetuneConfig(
        model=args.model,
        out=args.out,
        dataset=args.dataset,
        fractions=tuple(args.fraction),
        lam=args.lam,
        epochs=args.epochs,
        threshold=args.threshold,
        max_error=args.max_error,
        pretrained=args.pretrained,
        img_size=args.img_size,
        seed=args.seed,
        batch_size=args.batch_size,
        lr=args.lr,
        slope_lr=args.slope_lr,
        init=args.init,
        model_kwargs=parse_model_args(args.model_arg),
        checkpoint=args.checkpoint,
        progress=not args.no_progress,
    )
    report = finetune(cfg)
    if report:
        acc, params = report["accuracy"], report["params"]
        blocks = report["blocks"]
        print(
            f"{args.out}: {blocks['collapsed']}/{blocks['total']} MLP blocks collapsed; test accuracy "
            f"{acc['before_collapse']:.2f}% before collapse, {acc['after_collapse_torch']:.2f}% after (torch), "
            f"{acc['after_collapse_onnxruntime']:.2f}% (onnxruntime, fused); parameters "
            f"{params['start']:,} -> {params['after_collapse_torch']:,}"
        )
    return 0
