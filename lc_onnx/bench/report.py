"""The benchmark's outputs: the JSON record, the Markdown table and the plot.

Models are labelled `a` (the original, the baseline), `b` (the fused model) and optionally `c` (an
oracle: the same network collapsed before export). Speedups are baseline median latency over the other
model's; the ideal speedup is the ratio of counted multiply-accumulates at the same shapes, the bound a
collapse could reach if time were proportional to MACs.
"""

from __future__ import annotations

import math
import os
import platform
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lc_onnx.bench.runner import BatchRun, BenchConfig
from lc_onnx.model.files import atomic_open, write_text

__all__ = ["BenchResult", "environment"]


def environment() -> dict[str, object]:
    """What the numbers were measured on: CPU model, core count, onnxruntime and Python versions."""
    import onnxruntime as ort

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "onnxruntime": ort.__version__,
        "python": platform.python_version(),
        # Load from other processes when the timing started: the timings are only as quiet as this.
        "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "platform": platform.platform(),
    }


def _ratio(num: float, den: float) -> float:
    return num / den if den else math.inf


@dataclass
class BenchResult:
    """Everything one `lc-onnx bench` invocation measured."""

    models: dict[str, str]
    config: BenchConfig
    runs: list[BatchRun]
    environment: dict[str, object] = field(default_factory=dict)
    profiles: dict[int, dict[str, dict[str, float]]] = field(default_factory=dict)

    def rows(self) -> list[dict[str, object]]:
        """One flat record per batch size, as in the JSON's `runs`."""
        rows = []
        for run in self.runs:
            row: dict[str, object] = {"provider": run.provider, "batch": run.batch}
            if run.load_average is not None:
                row["load_average_1m_start"], row["load_average_1m_end"] = run.load_average
            for label, timing in run.timings.items():
                row[f"{label}_ms_median"] = timing.ms_median
                row[f"{label}_ms_p90"] = timing.ms_p90
                row[f"{label}_ms_p99"] = timing.ms_p99
                row[f"{label}_ms_min"] = timing.ms_min
                row[f"{label}_throughput"] = timing.throughput
                row[f"{label}_macs"] = run.macs[label]
            a, b = run.timings["a"], run.timings["b"]
            row["speedup"] = _ratio(a.ms_median, b.ms_median)
            row["ideal_speedup"] = _ratio(run.macs["a"], run.macs["b"])
            row["realized_over_ideal"] = _ratio(row["speedup"], row["ideal_speedup"])
            if "c" in run.timings:
                row["oracle_speedup"] = _ratio(a.ms_median, run.timings["c"].ms_median)
                row["oracle_ideal_speedup"] = _ratio(run.macs["a"], run.macs["c"])
                row["fused_over_oracle"] = _ratio(row["speedup"], row["oracle_speedup"])
            rows.append(row)
        return rows

    def to_dict(self) -> dict[str, object]:
        return {
            "models": self.models,
            "config": asdict(self.config),
            "environment": self.environment,
            "runs": self.rows(),
            "profile": {str(batch): by_model for batch, by_model in self.profiles.items()},
        }

    def to_markdown(self) -> str:
        """The results table; with an oracle, its latency, speedup and fused/oracle ratio too."""
        oracle = any("c" in run.timings for run in self.runs)
        head = ["provider", "batch", "original ms (p50/p90/p99)", "fused ms (p50/p90/p99)"]
        if oracle:
            head.append("oracle ms (p50/p90/p99)")
        head += ["speedup", "ideal (MACs)", "realized/ideal"]
        if oracle:
            head += ["oracle speedup", "fused/oracle"]
        head.append("throughput /s (orig → fused)")
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        for run, row in zip(self.runs, self.rows(), strict=True):
            cells = [run.provider, str(run.batch)]
            for label in ("a", "b", "c") if oracle else ("a", "b"):
                t = run.timings[label]
                cells.append(f"{t.ms_median:.2f} / {t.ms_p90:.2f} / {t.ms_p99:.2f}")
            cells += [
                f"{row['speedup']:.3f}×",
                f"{row['ideal_speedup']:.3f}×",
                f"{row['realized_over_ideal']:.2f}",
            ]
            if oracle:
                cells += [f"{row['oracle_speedup']:.3f}×", f"{row['fused_over_oracle']:.3f}"]
            cells.append(f"{run.timings['a'].throughput:.1f} → {run.timings['b'].throughput:.1f}")
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def profile_markdown(self, top: int = 8) -> str:
        """Per-op-type ms per run for each profiled batch: where the time goes in each model."""
        from lc_onnx.bench.profile import SHRINKING_OPS

        blocks = []
        for batch, by_model in self.profiles.items():
            labels = list(by_model)
            ops = sorted(
                {op for times in by_model.values() for op in times if op != "total"},
                key=lambda op: -by_model[labels[0]].get(op, 0.0),
            )
            shown = ops[:top]
            head = [f"op (batch {batch})", *(f"{label} ms" for label in labels)]
            lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
            for op in shown:
                mark = " (shrinks)" if op in SHRINKING_OPS else ""
                lines.append(
                    "| "
                    + " | ".join([op + mark, *(f"{by_model[lab].get(op, 0.0):.2f}" for lab in labels)])
                    + " |"
                )
            rest = [
                sum(t for op, t in by_model[lab].items() if op not in shown and op != "total")
                for lab in labels
            ]
            lines.append("| other | " + " | ".join(f"{r:.2f}" for r in rest) + " |")
            lines.append(
                "| **run total** | " + " | ".join(f"{by_model[lab]['total']:.2f}" for lab in labels) + " |"
            )
            blocks.append("\n".join(lines))
        return "\n\n".join(blocks)

    def plot(self, path: Path, title: str | None = None) -> None:
        """Median latency per batch (p90 as the error bar) and realized vs ideal speedup, as a PNG."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        names = {"a": "original", "b": "fused", "c": "oracle"}
        batches = [run.batch for run in self.runs]
        rows = self.rows()
        fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
        for label in self.runs[0].timings:
            med = [run.timings[label].ms_median for run in self.runs]
            p90 = [run.timings[label].ms_p90 - run.timings[label].ms_median for run in self.runs]
            left.errorbar(batches, med, yerr=[[0] * len(med), p90], marker="o", capsize=3, label=names[label])
        left.set(xscale="log", yscale="log", xlabel="batch", ylabel="ms per batch (median, bar to p90)")
        left.set_xticks(batches, [str(b) for b in batches])
        left.legend()
        x = range(len(batches))
        width = 0.25
        series = [("speedup", "realized (fused)"), ("ideal_speedup", "ideal (MACs)")]
        if "oracle_speedup" in rows[0]:
            series.insert(1, ("oracle_speedup", "oracle"))
        for i, (key, text) in enumerate(series):
            right.bar([j + (i - 1) * width for j in x], [r[key] for r in rows], width, label=text)
        right.axhline(1.0, color="grey", linewidth=0.8)
        right.set_xticks(list(x), [str(b) for b in batches])
        right.set(xlabel="batch", ylabel="speedup over original (×)")
        right.legend()
        fig.suptitle(
            title
            or f"{Path(self.models['a']).name} vs {Path(self.models['b']).name} ({self.config.provider})"
        )
        fig.tight_layout()
        _atomic_savefig(fig, Path(path))
        plt.close(fig)


def _atomic_savefig(fig, path: Path) -> None:
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=120)


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` atomically, with the permissions a plain `open()` would give."""
    write_text(path, text)


def labelled(models: Sequence[Path], oracle: Path | None) -> Mapping[str, Path]:
    """The label -> path map the runner and the report share: a, b and, if given, c."""
    result = {"a": Path(models[0]), "b": Path(models[1])}
    if oracle is not None:
        result["c"] = Path(oracle)
    return result
