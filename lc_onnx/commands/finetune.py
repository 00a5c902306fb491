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

Datasets: `digits` (scikit-learn's bundled 8x8 digits, upsampled to --img-size, fixed 1437/360 split),
an ImageFolder directory (DIR/train + DIR/test or DIR/val, else one folder split 80/20), `text:FILE`
(one example per line, the model's own tokenizer, --max-length; a fixed tenth held out by text) or
--data FILE.py:FN (a function yielding feeds {input name: array}, as for calibration; every tenth feed
held out).

Objectives: `labels` (cross-entropy; the default for digits and ImageFolders) or `distill` (the default
for text: and --data): post-training LayerCollapse without labels. The unmodified model is the teacher,
the loss is the distance between its outputs and the student's (--distill-loss: cosine+mse of hidden
states by default, kl at --temperature for logits) plus LAM times the penalty. Its defaults suit a
pretrained transformer: --lam 10, --lr 2e-4, --slope-lr 2e-2, weight decay 0.01, batch 32 (labels: 1,
1e-3, 3e-2, 0.05, 64). At the end, targeted slopes still outside --threshold are set to 1 (--no-snap keeps them) and
report.json's `fidelity` block compares teacher and student on the held-out inputs (mean-pooled cosine
for hidden states, top-1 agreement for logits): at the start, before the collapse, after it in torch and
for the fused ONNX model in onnxruntime. --max-drop D collapses one more block per stage (from the
output end, --epochs each, up to --fraction of them) and keeps the deepest model whose fidelity stays
within D of the unmodified model's (1.0).

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
        "--dataset",
        help="digits, an ImageFolder directory or text:FILE (one example per line) (default digits, "
        "unless --data gives the feeds)",
    )
    parser.add_argument("--data", metavar="FILE.py:FN", help="feeds from a Python function (distill)")
    parser.add_argument(
        "--objective",
        choices=["labels", "distill"],
        help="labels (cross-entropy) or distill (the unmodified model as teacher, no labels); "
        "default: distill for text: and --data, else labels",
    )
    parser.add_argument(
        "--distill-loss",
        choices=["cosine+mse", "cosine", "mse", "kl"],
        help="distill: cosine+mse (default for hidden states), cosine, mse, or kl (default for logits)",
    )
    parser.add_argument("--temperature", type=float, default=1.0, help="distill: kl temperature (default 1)")
    parser.add_argument(
        "--max-length", type=int, default=128, help="text: tokens per example at most (default 128)"
    )
    parser.add_argument(
        "--no-snap", action="store_true", help="distill: keep slopes still outside --threshold at the end"
    )
    parser.add_argument(
        "--max-drop",
        type=float,
        metavar="D",
        help="distill: adaptive depth; keep the deepest collapse whose held-out fidelity stays within D",
    )
    parser.add_argument(
        "--fraction",
        type=float,
        nargs="+",
        default=[0.5],
        metavar="F",
        help="share of MLP blocks (from the output end) to collapse; several values = progressive stages",
    )
    parser.add_argument(
        "--lam", type=float, help="weight of the collapse penalty (default 1.0; distill 10.0)"
    )
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
    parser.add_argument("--batch-size", type=int, help="per process (default 64; distill 32)")
    parser.add_argument(
        "--lr", type=float, help="AdamW learning rate, cosine decay (default 1e-3; distill 2e-4)"
    )
    parser.add_argument(
        "--slope-lr", type=float, help="learning rate of the PReLU slopes (default 3e-2; distill 2e-2)"
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
        from lc_onnx.torch.finetune import FinetuneConfig, finetune
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
        objective=args.objective,
        data=args.data,
        distill_loss=args.distill_loss,
        temperature=args.temperature,
        max_length=args.max_length,
        snap=not args.no_snap,
        max_drop=args.max_drop,
    )
    report = finetune(cfg)
    if report and "fidelity" in report:
        fid, blocks, params = report["fidelity"], report["blocks"], report["params"]
        print(
            f"{args.out}: {blocks['collapsed']}/{blocks['total']} MLP blocks collapsed "
            f"({len(blocks['snapped'])} snapped); held-out {fid['metric']} to the original "
            f"{fid['start']:.4f} at the start, {fid['before_collapse']:.4f} before collapse, "
            f"{fid['after_collapse_torch']:.4f} after (torch), {fid['after_collapse_onnxruntime']:.4f} "
            f"(onnxruntime, fused); parameters {params['start']:,} -> {params['after_collapse_torch']:,}"
        )
    elif report:
        acc, params = report["accuracy"], report["params"]
        blocks = report["blocks"]
        print(
            f"{args.out}: {blocks['collapsed']}/{blocks['total']} MLP blocks collapsed; test accuracy "
            f"{acc['before_collapse']:.2f}% before collapse, {acc['after_collapse_torch']:.2f}% after (torch), "
            f"{acc['after_collapse_onnxruntime']:.2f}% (onnxruntime, fused); parameters "
            f"{params['start']:,} -> {params['after_collapse_torch']:,}"
        )
    return 0
