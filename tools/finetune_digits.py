"""LayerCollapse vs. plain fine-tuning vs. knowledge distillation on scikit-learn's digits (CPU, no download).

1. Train a small timm ViT (16x16 input, patch 4, depth 6, width 64) from scratch: the "pretrained" model
   and the KD teacher.
2. From it, fine-tune for --epochs with collapse fraction 0 (the reference: same recipe, no collapse) and
   with each --fractions value (LayerCollapse: penalty, progressive collapse, export, graph-pass fuse).
3. Adaptive depth (`--max-drop`, unless --no-adaptive): from the same model, one more block per stage
   from the output end, --adaptive-epochs each, keeping the deepest collapse whose test accuracy stays
   within --max-drop (a fraction: 0.01 = 1 pt) of the model it started from.
4. For each fraction, train a KD student with that LayerCollapse run's final architecture (the last
   ceil(F * 6) MLPs each one 64x64 Linear), from scratch, from the same teacher, for --epochs; and for the
   last fraction also for --base-epochs + --epochs (the teacher's and the fine-tune's epochs together).

Writes OUT/results.json and OUT/table.md and prints the table (the README's `torch` section quotes it);
with several --seeds, one such directory per seed (OUT/seed-N) and OUT/summary.md:

    python tools/finetune_digits.py --out runs/digits
    python tools/finetune_digits.py --out runs/digits-seeds --seeds 0 1 2 3 4
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import time
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch

from lc_onnx.bench.report import environment
from lc_onnx.torch.blocks import collapsible
from lc_onnx.torch.blocks.checkpoint import load_checkpoint
from lc_onnx.torch.data import datasets as data
from lc_onnx.torch.finetune import FinetuneConfig, finetune
from lc_onnx.torch.finetune.kd_baseline import collapsed_student, distill
from lc_onnx.torch.models import builders as models

VIT = "vit_tiny_patch16_224"
VIT_ARGS = {"patch_size": 4, "depth": 6, "embed_dim": 64, "num_heads": 4}


def _lc_row(name: str, report: dict, reference_acc: float | None) -> dict:
    acc = report["accuracy"]["after_collapse_torch"]
    return {
        "run": name,
        "collapsed": f"{report['blocks']['collapsed']}/{report['blocks']['total']}",
        "params": report["params"]["after_collapse_torch"],
        "macs": report["macs"]["onnx_after_fuse"],
        "acc": acc,
        "acc_onnx": report["accuracy"]["after_collapse_onnxruntime"],
        "delta": None if reference_acc is None else acc - reference_acc,
        "seconds": report["seconds"],
    }


def _table(rows: list[dict]) -> str:
    lines = [
        "| run | MLP blocks collapsed | parameters | MACs / image | test acc. (torch) | test acc. (ORT, fused) "
        "| Δ vs. no collapse | train wall time |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        delta = "" if r["delta"] is None else f"{r['delta']:+.2f} pt"
        macs = "" if r["macs"] is None else f"{r['macs'] / 1e6:.2f} M"
        onnx = "" if r["acc_onnx"] is None else f"{r['acc_onnx']:.2f} %"
        lines.append(
            f"| {r['run']} | {r['collapsed']} | {r['params']:,} | {macs} | {r['acc']:.2f} % | {onnx} | {delta} "
            f"| {r['seconds']:.0f} s |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--base-epochs", type=int, default=40)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.5, 1.0])
    parser.add_argument("--lam", type=float, default=1.0)
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=[0],
        help="one experiment per seed (base training included); several: OUT/seed-N each and OUT/summary.md",
    )
    parser.add_argument("--lr", type=float, default=1e-3, help="fine-tune and KD learning rate")
    parser.add_argument("--slope-lr", type=float, default=3e-2)
    parser.add_argument("--no-kd-long", action="store_true", help="skip the --base-epochs + --epochs KD run")
    parser.add_argument("--max-drop", type=float, default=0.01, help="adaptive depth's budget (default 0.01)")
    parser.add_argument(
        "--adaptive-epochs", type=int, default=5, help="epochs per adaptive stage (default 5)"
    )
    parser.add_argument("--no-adaptive", action="store_true", help="skip the adaptive-depth run")
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="keep finished runs found in OUT (their report.json / kd-*.json) instead of training again",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(2)
    per_seed = {}
    for seed in args.seeds:
        out = args.out if len(args.seeds) == 1 else args.out / f"seed-{seed}"
        started = time.perf_counter()
        rows = experiment(args, seed, out)
        table = _table(rows)
        machine = {
            "cpu": environment()["cpu"],
            "cores_visible": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "load_average_at_end": os.getloadavg(),
            "total_seconds": time.perf_counter() - started,
        }
        results = {"args": {k: str(v) for k, v in vars(args).items()}, "seed": seed, "machine": machine}
        (out / "results.json").write_text(json.dumps({**results, "rows": rows}, indent=2) + "\n")
        (out / "table.md").write_text(table)
        print(f"seed {seed}:\n{table}\n{json.dumps(machine)}\n")
        per_seed[seed] = rows
    if len(args.seeds) > 1:
        summary = _summary(per_seed)
        (args.out / "summary.md").write_text(summary)
        print(summary)


def experiment(args: argparse.Namespace, seed: int, out: Path) -> list[dict]:
    """Base training, the no-collapse fine-tune, LayerCollapse per fraction, the KD students: table rows."""
    out.mkdir(parents=True, exist_ok=True)
    common = FinetuneConfig(
        model=VIT,
        out=out,
        model_kwargs=VIT_ARGS,
        lam=args.lam,
        seed=seed,
        lr=args.lr,
        slope_lr=args.slope_lr,
        progress=False,
    )
    run = partial(_finetune, reuse=args.reuse)
    base_cfg = replace(common, out=out / "base", fractions=(0.0,), epochs=args.base_epochs, lr=1e-3)
    base = run(base_cfg)
    ckpt = out / "base" / "checkpoint.pt"
    rows = [{**_lc_row(f"base: from scratch, {args.base_epochs} epochs", base, None), "collapsed": "0/6"}]

    reference = run(replace(common, out=out / "ft-0", fractions=(0.0,), epochs=args.epochs, checkpoint=ckpt))
    ref_acc = reference["accuracy"]["after_collapse_torch"]
    rows.append(_lc_row(f"fine-tune, no collapse, {args.epochs} epochs", reference, ref_acc))
    for fraction in args.fractions:
        cfg = replace(
            common,
            out=out / f"lc-{fraction}",
            fractions=(fraction,),
            epochs=args.epochs,
            checkpoint=ckpt,
        )
        rows.append(_lc_row(f"LayerCollapse, fraction {fraction}, {args.epochs} epochs", run(cfg), ref_acc))
    if not args.no_adaptive:
        cfg = replace(
            common,
            out=out / "lc-adaptive",
            fractions=(1.0,),
            epochs=args.adaptive_epochs,
            checkpoint=ckpt,
            max_drop=args.max_drop,
        )
        name = (
            f"LayerCollapse, adaptive (max drop {args.max_drop:g}), {args.adaptive_epochs} epochs per block"
        )
        rows.append(_lc_row(name, run(cfg), ref_acc))

    splits = data.digits(common.img_size)
    build = partial(models.build_model, VIT, splits.num_classes, common.img_size, kwargs=VIT_ARGS)
    teacher = build()
    load_checkpoint(ckpt, teacher)
    n_blocks = len(collapsible.find_blocks(teacher))
    kd_runs = [(fraction, args.epochs) for fraction in args.fractions]
    if not args.no_kd_long:
        kd_runs.append((args.fractions[-1], args.base_epochs + args.epochs))
    for fraction, epochs in kd_runs:
        cache = out / f"kd-{fraction}-{epochs}.json"
        if args.reuse and cache.exists():
            result = json.loads(cache.read_text())
        else:
            torch.manual_seed(seed)
            student = collapsed_student(build, fraction)
            result = distill(student, teacher, splits, epochs=epochs, lr=args.lr, seed=seed)
            cache.write_text(json.dumps(result) + "\n")
        rows.append(
            {
                "run": f"KD student, architecture of LayerCollapse {fraction}, from scratch, {epochs} epochs",
                "collapsed": f"{math.ceil(fraction * n_blocks)}/{n_blocks}",
                "params": result["params"],
                "macs": None,
                "acc": result["accuracy"],
                "acc_onnx": None,
                "delta": result["accuracy"] - ref_acc,
                "seconds": result["seconds"],
            }
        )
    return rows


def _summary(per_seed: dict[int, list[dict]]) -> str:
    """One row per run: blocks and parameters (per seed where seeds differ), accuracy per seed, mean ± sample
    standard deviation, Δ vs. no collapse likewise, mean wall time."""
    seeds = list(per_seed)
    lines = [
        "| run | MLP blocks collapsed | parameters | test acc. per seed ("
        + ", ".join(map(str, seeds))
        + ") | mean ± std | Δ vs. no collapse, mean ± std | mean train wall time |",
        "|---|---|---|---|---|---|---|",
    ]
    for i, first in enumerate(per_seed[seeds[0]]):
        rows = [per_seed[s][i] for s in seeds]
        accs = [r["acc"] for r in rows]
        deltas = [r["delta"] for r in rows if r["delta"] is not None]
        delta = f"{_mean_std(deltas, signed=True)} pt" if deltas else ""
        collapsed = _per_seed([r["collapsed"] for r in rows])
        params = _per_seed([f"{r['params']:,}" for r in rows])
        lines.append(
            f"| {first['run']} | {collapsed} | {params} | "
            + " / ".join(f"{a:.2f}" for a in accs)
            + f" % | {_mean_std(accs)} % | {delta} | "
            f"{sum(r['seconds'] for r in rows) / len(rows):.0f} s |"
        )
    return "\n".join(lines) + "\n"


def _per_seed(values: list[str]) -> str:
    """One value when every seed has it, else each seed's."""
    return values[0] if len(set(values)) == 1 else " / ".join(values)


def _mean_std(values: list[float], signed: bool = False) -> str:
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return f"{mean:+.2f} ± {std:.2f}" if signed else f"{mean:.2f} ± {std:.2f}"


def _finetune(cfg: FinetuneConfig, reuse: bool) -> dict:
    report = cfg.out / "report.json"
    if reuse and report.exists():
        return json.loads(report.read_text())
    return finetune(cfg)


if __name__ == "__main__":
    main()
