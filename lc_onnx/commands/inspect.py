"""List every candidate site (Linear -> activation -> Linear), its activation and slopes, and what
`fuse` would do with it and why. Nothing is written and nothing is run in onnxruntime.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lc_onnx.commands import common

FLAGS = common.FLAGS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", type=Path, help="the .onnx model to inspect")
    common.add_fuse_options(parser)
    parser.add_argument("--json", action="store_true", help="print the site list as JSON")


def run(args: argparse.Namespace) -> int:
    from lc_onnx.graph.options import FuseOptions
    from lc_onnx.graph.pipeline import collapse_graph
    from lc_onnx.model import io

    loaded = io.load(args.model)
    rewritten = collapse_graph(loaded, FuseOptions(threshold=args.threshold, allow_growth=args.allow_growth))
    if args.json:
        print(json.dumps([s.to_dict() for s in rewritten.sites], indent=2))
        return 0
    if not rewritten.sites:
        print("no candidate sites (no linear layer feeds another through an activation)")
        return 0
    for i, site in enumerate(rewritten.sites):
        would = "collapse" if site.decision == "collapsed" else "skip"
        print(f"[{i}] {' -> '.join(site.nodes)}")
        print(f"    activation: {site.activation}")
        for step, (lo, hi) in site.extra.get("slopes", {}).items():
            print(f"    slopes of {step}: {lo:.4g}..{hi:.4g}")
        print(f"    params: {site.params_before:,} -> {site.params_after:,}")
        print(f"    would {would}: {site.reason}")
    return 0
