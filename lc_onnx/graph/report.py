"""The fuse report: plain dataclasses that serialise to the documented JSON.

Schema (stable keys; other tools read them):
`{"sites": [{"nodes", "activation", "decision", "reason", "reason_kind", "params_before", "params_after",
...}],
"params_before", "params_after", "macs_before", "macs_after",
"verification": {"outputs": {name: {"max_abs", "rel_l2"}}}, "seconds"}`.
Site entries may carry more keys (`exact`, calibration fit fields); consumers must ignore unknown keys.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class SiteReport:
    nodes: list[str]
    activation: str
    decision: str  # "collapsed" | "skipped"
    reason: str  # for people
    reason_kind: str  # for code: a `reasons.Kind` value
    params_before: int
    params_after: int
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(data.pop("extra"))
        return data


@dataclass
class OutputError:
    max_abs: float
    rel_l2: float


@dataclass
class Verification:
    """Original vs fused on the same feeds; `outputs` is empty when nothing was compared (`note` says why)."""

    outputs: dict[str, OutputError] = field(default_factory=dict)
    feeds: int = 0
    note: str = ""

    @property
    def worst_rel_l2(self) -> float:
        return max((e.rel_l2 for e in self.outputs.values()), default=0.0)

    @property
    def worst_max_abs(self) -> float:
        return max((e.max_abs for e in self.outputs.values()), default=0.0)

    def breach(self, max_error: float, max_abs_error: float | None = None) -> str | None:
        """What exceeds the budget (relative L2 `max_error`, absolute `max_abs_error`), or None."""
        if not self.outputs:
            return None
        name = max(self.outputs, key=lambda k: self.outputs[k].rel_l2)
        if self.outputs[name].rel_l2 > max_error:
            return f"relative L2 error {self.outputs[name].rel_l2:.3g} > max_error {max_error:g} (output {name!r})"
        name = max(self.outputs, key=lambda k: self.outputs[k].max_abs)
        if max_abs_error is not None and self.outputs[name].max_abs > max_abs_error:
            return (
                f"max abs error {self.outputs[name].max_abs:.3g} > max_abs_error {max_abs_error:g} "
                f"(output {name!r})"
            )
        return None

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "outputs": {k: asdict(v) for k, v in self.outputs.items()},
            "feeds": self.feeds,
        }
        if self.note:
            data["note"] = self.note
        return data


@dataclass
class Report:
    sites: list[SiteReport]
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    verification: Verification
    seconds: float = 0.0

    @property
    def collapsed(self) -> list[SiteReport]:
        return [s for s in self.sites if s.decision == "collapsed"]

    def to_dict(self) -> dict[str, Any]:
        return {
            "sites": [s.to_dict() for s in self.sites],
            "params_before": self.params_before,
            "params_after": self.params_after,
            "macs_before": self.macs_before,
            "macs_after": self.macs_after,
            "verification": self.verification.to_dict(),
            "seconds": round(self.seconds, 4),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def summary(report: Report) -> str:
    """A few human lines: what collapsed, what was skipped and why, sizes, and the measured error."""
    lines = []
    for site in report.sites:
        mark = "collapsed" if site.decision == "collapsed" else "skipped  "
        head = site.nodes[0] if site.nodes else "?"
        tail = f" -> {site.nodes[-1]}" if len(site.nodes) > 1 else ""
        lines.append(f"  {mark} {head}{tail} [{site.activation}]: {site.reason}")
    n = len(report.collapsed)
    lines.insert(0, f"{n} of {len(report.sites)} site(s) collapsed")
    lines.append(f"params {_ratio(report.params_before, report.params_after)}")
    lines.append(f"MACs   {_ratio(report.macs_before, report.macs_after)}")
    if report.verification.outputs:
        worst = max(report.verification.outputs.items(), key=lambda kv: kv[1].rel_l2)
        lines.append(
            f"verified on {report.verification.feeds} feed(s): worst output {worst[0]!r} "
            f"rel_l2={worst[1].rel_l2:.3g} max_abs={worst[1].max_abs:.3g}"
        )
    else:
        lines.append(f"not verified: {report.verification.note}")
    lines.append(f"{report.seconds:.2f} s")
    return "\n".join(lines)


def _ratio(before: int, after: int) -> str:
    if before <= 0:
        return f"{before:,} -> {after:,}"
    return f"{before:,} -> {after:,} ({100.0 * (after - before) / before:+.1f}%)"
