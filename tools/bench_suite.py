"""The standard latency suite: original vs fused vs oracle, interleaved, on onnxruntime.

Needs the files `tools/make_models.py` writes (NAME.onnx, NAME.fused.onnx, NAME.oracle.onnx). For each
model it first compares the fused and oracle graphs op by op (a rewrite that leaves nothing on the table
has the same op counts as the model collapsed before export), then runs `lc-onnx bench` logic with the
oracle as a third interleaved model and an onnxruntime profile, and writes under OUT (default
`out/bench/`): NAME.json, NAME.md, NAME.png and summary.md, the tables quoted in the README.

    python tools/make_models.py --models vit_s16,mixer_b16
    python tools/bench_suite.py --models vit_s16,mixer_b16 --batch 1,8 --runs 50
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import sys
from pathlib import Path

import onnx

from lc_onnx.bench import BenchConfig, run_bench
from lc_onnx.bench.profile import SHRINKING_OPS
from lc_onnx.model.macs import count_params

logger = logging.getLogger("bench_suite")

TITLES = {"vit_t16": "ViT-T/16", "vit_s16": "ViT-S/16", "vit_b16": "ViT-B/16", "mixer_b16": "Mixer-B/16"}


def op_counts(path: Path) -> collections.Counter:
    return collections.Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node)


def op_signatures(path: Path) -> collections.Counter:
    """Count of (op type, shapes of its constant inputs): a MatMul by a [384, 384] weight is not one by
    [384, 1536], and a bias Add split in two would show as an extra ("Add", ((384,),))."""
    model = onnx.load(str(path), load_external_data=False)
    consts = {t.name: tuple(t.dims) for t in model.graph.initializer}
    return collections.Counter(
        (n.op_type, tuple(consts[i] for i in n.input if i in consts)) for n in model.graph.node
    )


def compare_graphs(fused: Path, oracle: Path) -> dict[str, object]:
    """Fused vs oracle: op-count difference (empty when identical), the (op, weight shapes) signatures
    only one of them has, and both parameter counts."""
    a, b = op_counts(fused), op_counts(oracle)
    diff = {op: a[op] - b[op] for op in sorted(set(a) | set(b)) if a[op] != b[op]}
    sa, sb = op_signatures(fused), op_signatures(oracle)
    return {
        "op_diff_fused_minus_oracle": diff,
        "signatures_only_in_fused": [f"{op} {list(shapes)} x{n}" for (op, shapes), n in (sa - sb).items()],
        "signatures_only_in_oracle": [f"{op} {list(shapes)} x{n}" for (op, shapes), n in (sb - sa).items()],
        "fused_ops": dict(a),
        "oracle_ops": dict(b),
        "fused_params": count_params(onnx.load(str(fused), load_external_data=False)),
        "oracle_params": count_params(onnx.load(str(oracle), load_external_data=False)),
    }


def non_shrinking_share(profile: dict[str, float]) -> float:
    """Fraction of a run's kernel time in ops that a collapse does not shrink (nor remove)."""
    kernels = {op: ms for op, ms in profile.items() if op != "total"}
    keep = sum(ms for op, ms in kernels.items() if op not in SHRINKING_OPS and op != "PRelu")
    return keep / sum(kernels.values())


def time_split(profile: dict[str, float]) -> tuple[float, float, float]:
    """(ms in ops a collapse shrinks, ms in PRelu, ms in everything else) per run, from a profile."""
    kernels = {op: ms for op, ms in profile.items() if op != "total"}
    shrink = sum(ms for op, ms in kernels.items() if op in SHRINKING_OPS)
    prelu = kernels.get("PRelu", 0.0)
    return shrink, prelu, sum(kernels.values()) - shrink - prelu


def prelu_share(profile: dict[str, float]) -> float:
    """Fraction of a run's kernel time in PRelu, the activation a collapse removes outright."""
    kernels = {op: ms for op, ms in profile.items() if op != "total"}
    return kernels.get("PRelu", 0.0) / sum(kernels.values())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default="vit_s16,mixer_b16")
    parser.add_argument("--dir", type=Path, default=Path("out/models"), help="where make_models wrote")
    parser.add_argument("--out", type=Path, default=Path("out/bench"))
    parser.add_argument("--batch", default="1,8")
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--provider", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--profile-runs", type=int, default=10)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    config = BenchConfig(
        provider=args.provider,
        batches=tuple(int(b) for b in args.batch.split(",")),
        threads=args.threads,
        runs=args.runs,
        warmup=args.warmup,
    )

    summary = [
        "| model | batch | original ms | fused ms | oracle ms | realized | oracle | fused/oracle "
        "| MAC bound | realized/MAC bound | non-shrinking share orig → fused | PRelu share orig | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    split_table = [
        "| model | batch | shrinking ops ms orig → fused | their speedup | MAC bound | PRelu ms orig "
        "| other ops ms orig → fused | profiled run ms orig → fused |",
        "|---|---|---|---|---|---|---|---|",
    ]
    graph_notes = []
    for name in args.models.split(","):
        paths = {kind: args.dir / f"{name}{kind}.onnx" for kind in ("", ".fused", ".oracle")}
        missing = [str(p) for p in paths.values() if not p.exists()]
        if missing:
            parser.error(f"missing {', '.join(missing)}; run tools/make_models.py first")
        graphs = compare_graphs(paths[".fused"], paths[".oracle"])
        diff = graphs["op_diff_fused_minus_oracle"]
        graph_notes.append(
            f"- {TITLES.get(name, name)}: fused vs oracle op counts "
            + ("identical" if not diff else f"differ (fused - oracle): {diff}")
            + (
                "; (op, weight shapes) identical"
                if not graphs["signatures_only_in_fused"] and not graphs["signatures_only_in_oracle"]
                else f"; only in fused {graphs['signatures_only_in_fused']}, "
                f"only in oracle {graphs['signatures_only_in_oracle']}"
            )
            + f"; params fused {graphs['fused_params']:,}, oracle {graphs['oracle_params']:,}"
        )
        logger.info(graph_notes[-1])
        result = run_bench(
            paths[""], paths[".fused"], config, oracle=paths[".oracle"], profile_runs=args.profile_runs
        )
        record = result.to_dict()
        record["graphs"] = graphs
        (args.out / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n")
        (args.out / f"{name}.md").write_text(result.to_markdown() + "\n\n" + result.profile_markdown() + "\n")
        result.plot(args.out / f"{name}.png", title=f"{TITLES.get(name, name)}, onnxruntime {args.provider}")
        for run, row in zip(result.runs, result.rows(), strict=True):
            profile = result.profiles.get(run.batch, {})
            share_a, share_b, prelu = (
                (
                    non_shrinking_share(profile["a"]),
                    non_shrinking_share(profile["b"]),
                    prelu_share(profile["a"]),
                )
                if profile
                else (float("nan"),) * 3
            )
            load = "n/a" if run.load_average is None else "{:.1f}–{:.1f}".format(*run.load_average)
            if profile:
                (sa, pa, ra), (sb, _, rb) = time_split(profile["a"]), time_split(profile["b"])
                split_table.append(
                    f"| {TITLES.get(name, name)} | {run.batch} | {sa:.1f} → {sb:.1f} | {sa / sb:.2f}× "
                    f"| {row['ideal_speedup']:.2f}× | {pa:.1f} | {ra:.1f} → {rb:.1f} "
                    f"| {profile['a']['total']:.1f} → {profile['b']['total']:.1f} |"
                )
            summary.append(
                f"| {TITLES.get(name, name)} | {run.batch} | {row['a_ms_median']:.1f} | {row['b_ms_median']:.1f} "
                f"| {row['c_ms_median']:.1f} | {row['speedup']:.2f}× | {row['oracle_speedup']:.2f}× "
                f"| {row['fused_over_oracle']:.3f} | {row['ideal_speedup']:.2f}× "
                f"| {row['realized_over_ideal']:.2f} | {share_a:.0%} → {share_b:.0%} | {prelu:.0%} | {load} |"
            )
    env = result.environment
    text = (
        f"onnxruntime {env['onnxruntime']} {args.provider}, {env['cpu']} ({env['cpu_count']} cores), "
        f"intra-op threads {args.threads}, inter-op 1, ORT_ENABLE_ALL, {args.runs} interleaved runs "
        f"after {args.warmup} warm-up, medians.\n\n"
        + "\n".join(summary)
        + "\n\nWhere the time goes (onnxruntime profile, kernel ms per run; shrinking ops: "
        + ", ".join(sorted(SHRINKING_OPS))
        + "):\n\n"
        + "\n".join(split_table)
        + "\n\n"
        + "\n".join(graph_notes)
        + "\n"
    )
    (args.out / "summary.md").write_text(text)
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
