"""Write the benchmark models offline: random-init timm ViT-T/S/B/16 and Mixer-B/16.

For each model, the MLP activation of the last k blocks (default: all) becomes PReLU with slope 1, so the
MLP is exactly linear, and three files are written under OUT (default `out/models/`):

- `NAME.onnx`: the PReLU model, exported by the dynamo exporter with a dynamic batch dim;
- `NAME.oracle.onnx`: the same weights collapsed in PyTorch (each such MLP replaced by one `nn.Linear`
  with `W = W2 @ W1`, `b = W2 @ b1 + b2`), exported by the same exporter: the best a graph rewrite can do;
- `NAME.fused.onnx`: `lc-onnx fuse NAME.onnx` (skip with `--no-fuse`), and its report `NAME.fuse.json`.

timm zero-inits the MLP biases and the exporter then shares one zero tensor across blocks, which the
rewrite rightly refuses to touch; the biases are drawn from N(0, 0.02) so every MLP is its own site.

    python tools/make_models.py --models vit_s16,mixer_b16 [--k 4] [--out out/models]
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

logger = logging.getLogger("make_models")

MODELS = {
    "vit_t16": "vit_tiny_patch16_224",
    "vit_s16": "vit_small_patch16_224",
    "vit_b16": "vit_base_patch16_224",
    "mixer_b16": "mixer_b16_224",
}


def mlp_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(qualified name, module) of every timm `Mlp` with fc1/act/fc2, in forward order."""
    from timm.layers import Mlp

    return [(name, m) for name, m in model.named_modules() if isinstance(m, Mlp)]


def build(name: str, k: int | None, seed: int) -> tuple[nn.Module, list[str]]:
    """The random-init timm model with the activation of the last k blocks' MLPs set to PReLU(1).

    Returns the model (eval mode) and the qualified names of the MLPs changed.
    """
    import timm

    torch.manual_seed(seed)
    model = timm.create_model(MODELS[name], pretrained=False).eval()
    blocks = list(model.blocks)
    chosen = blocks if k is None else blocks[len(blocks) - k :]
    chosen_ids = {id(b) for b in chosen}
    head = getattr(model, "head", None)
    if isinstance(head, nn.Linear) and not head.weight.any():
        # Mixer zero-inits its head: every logit would be 0 and verifying the fuse would prove nothing.
        nn.init.normal_(head.weight, std=0.02)
    changed = []
    for block_index, block in enumerate(blocks):
        for mlp_name, mlp in mlp_modules(block):
            nn.init.normal_(mlp.fc1.bias, std=0.02)
            nn.init.normal_(mlp.fc2.bias, std=0.02)
            if id(block) in chosen_ids:
                mlp.act = nn.PReLU(num_parameters=1, init=1.0)
                changed.append(f"blocks.{block_index}.{mlp_name}")
    return model, changed


@torch.no_grad()
def collapse_mlps(model: nn.Module, names: list[str]) -> nn.Module:
    """A copy of `model` with each named PReLU(1) MLP replaced by the single equivalent `nn.Linear`."""
    oracle = copy.deepcopy(model)
    for qualified in names:
        parent_name, _, attr = qualified.rpartition(".")
        parent = oracle.get_submodule(parent_name)
        mlp = getattr(parent, attr)
        if not isinstance(mlp.norm, nn.Identity) or not torch.all(mlp.act.weight == 1):
            raise ValueError(f"{qualified} is not linear: norm {mlp.norm}, PReLU slopes {mlp.act.weight}")
        w1, b1 = mlp.fc1.weight.double(), mlp.fc1.bias.double()
        w2, b2 = mlp.fc2.weight.double(), mlp.fc2.bias.double()
        linear = nn.Linear(w1.shape[1], w2.shape[0])
        linear.weight.copy_(w2 @ w1)
        linear.bias.copy_(w2 @ b1 + b2)
        setattr(parent, attr, linear)
    return oracle


def export(model: nn.Module, path: Path) -> None:
    """Dynamo export with a dynamic batch dim; input `input`, output `logits`."""
    x = torch.randn(2, 3, 224, 224)
    batch = torch.export.Dim("batch", min=1, max=1024)
    tmp = path.with_name(path.name + ".tmp")
    torch.onnx.export(
        model,
        (x,),
        str(tmp),
        dynamo=True,
        dynamic_shapes={"x": {0: batch}},
        input_names=["input"],
        output_names=["logits"],
        external_data=False,
        verbose=False,
    )
    tmp.replace(path)


def fuse(src: Path, dst: Path, report: Path) -> None:
    cmd = [sys.executable, "-m", "lc_onnx.cli", "fuse", str(src), "-o", str(dst), "--report", str(report)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma list of {', '.join(MODELS)}")
    parser.add_argument("--k", type=int, default=None, help="collapse the MLPs of the last k blocks only")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("out/models"))
    parser.add_argument("--no-fuse", action="store_true", help="export only; do not run lc-onnx fuse")
    parser.add_argument("--force", action="store_true", help="rewrite files that already exist")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("torch", "onnxscript", "torch.onnx"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    args.out.mkdir(parents=True, exist_ok=True)

    for name in args.models.split(","):
        if name not in MODELS:
            parser.error(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
        stem = name if args.k is None else f"{name}-k{args.k}"
        base, oracle_path = args.out / f"{stem}.onnx", args.out / f"{stem}.oracle.onnx"
        fused, report = args.out / f"{stem}.fused.onnx", args.out / f"{stem}.fuse.json"
        if args.force or not (base.exists() and oracle_path.exists()):
            model, changed = build(name, args.k, args.seed)
            logger.info("%s: %d MLPs set to PReLU(1); exporting", stem, len(changed))
            export(model, base)
            export(collapse_mlps(model, changed), oracle_path)
            (args.out / f"{stem}.mlps.json").write_text(json.dumps(changed, indent=1))
        if not args.no_fuse and (args.force or not fused.exists()):
            logger.info("%s: lc-onnx fuse", stem)
            fuse(base, fused, report)
            sites = json.loads(report.read_text()).get("sites", [])
            logger.info("%s: fused, report lists %d site(s)", stem, len(sites))
    return 0


if __name__ == "__main__":
    sys.exit(main())
