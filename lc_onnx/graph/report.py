"""The fuse report: plain dataclasses that serialise to the documented JSON.

Schema (stable keys; other tools read them):
`{"sites": [{"nodes", "activation", "decision", "reason", "reason_kind", "params_before", "params_after",
...}],
"params_before", "params_after", "macs_before", "macs_after",
"verification": {"outputs": {name: {"max_abs", "rel_l2", "max_ref"}}, "feeds", "feed_shapes", ["padding_mask"]},
"seconds"}`,
and when there is something to say, "macs_not_counted": {"before": [node], "after": [node]} (matrix-multiplying
nodes whose shapes stayed unknown), "warnings": [text] and "calibration": {...} (what a calibrated fuse did as a
whole: `lc_onnx.calibration.least_squares`).
Site entries may carry more keys (`exact`, `site_error` of a collapsed site, calibration fit fields);
consumers must ignore unknown keys.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
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


# An output whose largest difference is within float32 rounding of its own scale passes, whatever its
# relative error: a saturated sigmoid's rounding gives a large relative error on values near zero.
ROUNDING = 1e-6


@dataclass
class OutputError:
    max_abs: float
    rel_l2: float
    max_ref: float = 0.0  # the largest |original| value: the output's scale

    def within_rounding(self) -> bool:
        """`max_abs` is at most float32 rounding of the output's scale."""
        return self.max_abs <= ROUNDING * max(1.0, self.max_ref)


@dataclass
class Verification:
    """Original vs fused on the same feeds; `outputs` is empty when nothing was compared (`note` says why)."""

    outputs: dict[str, OutputError] = field(default_factory=dict)
    feeds: int = 0
    note: str = ""
    feed_shapes: dict[str, list[int]] = field(default_factory=dict)  # of the first feed
    padding_mask: str = ""  # the input whose zeros marked positions left out of the comparison

    @property
    def worst_rel_l2(self) -> float:
        return max((e.rel_l2 for e in self.outputs.values()), default=0.0)

    @property
    def worst_max_abs(self) -> float:
        return max((e.max_abs for e in self.outputs.values()), default=0.0)

    def breach(self, max_error: float, max_abs_error: float | None = None) -> str | None:
        """What exceeds the budget, or None. An output is within it when its relative L2 error is at most
        `max_error` or its largest difference is within float rounding of its scale (`within_rounding`),
        and, with `max_abs_error`, its largest difference is at most that."""
        over = {k: e for k, e in self.outputs.items() if e.rel_l2 > max_error and not e.within_rounding()}
        if over:
            name = max(over, key=lambda k: over[k].rel_l2)
            return f"relative L2 error {over[name].rel_l2:.3g} > max_error {max_error:g} (output {name!r})"
        if not self.outputs:
            return None
        name = max(self.outputs, key=lambda k: self.outputs[k].max_abs)
        if max_abs_error is not None and self.outputs[name].max_abs > max_abs_error:
            return (
                f"max abs error {self.outputs[name].max_abs:.3g} > max_abs_error {max_abs_error:g} "
                f"(output {name!r})"
            )
        return None

    def passed_by_rounding(self, max_error: float) -> list[str]:
        """Outputs over `max_error` that pass only because the difference is float rounding."""
        return [k for k, e in self.outputs.items() if e.rel_l2 > max_error and e.within_rounding()]

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "outputs": {k: asdict(v) for k, v in self.outputs.items()},
            "feeds": self.feeds,
        }
        if self.feed_shapes:
            data["feed_shapes"] = self.feed_shapes
        if self.padding_mask:
            data["padding_mask"] = self.padding_mask
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
    macs_not_counted_before: list[str] = field(default_factory=list)
    macs_not_counted_after: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    calibration: dict[str, Any] = field(default_factory=dict)  # what a calibrated fuse did, as a whole

    @property
    def collapsed(self) -> list[SiteReport]:
        return [s for s in self.sites if s.decision == "collapsed"]

    def to_dict(self) -> dict[str, Any]:
        data = {
            "sites": [s.to_dict() for s in self.sites],
            "params_before": self.params_before,
            "params_after": self.params_after,
            "macs_before": self.macs_before,
            "macs_after": self.macs_after,
            "verification": self.verification.to_dict(),
            "seconds": round(self.seconds, 4),
        }
        if self.macs_not_counted_before or self.macs_not_counted_after:
            data["macs_not_counted"] = {
                "before": self.macs_not_counted_before,
                "after": self.macs_not_counted_after,
            }
        if self.warnings:
            data["warnings"] = self.warnings
        if self.calibration:
            data["calibration"] = self.calibration
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def summary(report: Report) -> str:
    """A few human lines: what collapsed, what was skipped and why, sizes, and the measured error."""
    lines = []
    for site in report.sites:
        mark = "collapsed" if site.decision == "collapsed" else "skipped  "
        head = site.nodes[0] if site.nodes else "?"
        tail = f" -> {site.nodes[-1]}" if len(site.nodes) > 1 else ""
        error = site.extra.get("site_error")
        checked = f" (site rel_l2={error['rel_l2']:.3g})" if error else ""
        lines.append(f"  {mark} {head}{tail} [{site.activation}]: {site.reason}{checked}")
    n = len(report.collapsed)
    lines.insert(0, f"{n} of {len(report.sites)} site(s) collapsed")
    lines.append(f"params {_ratio(report.params_before, report.params_after)}")
    lines.append(_macs_line(report))
    verification = report.verification
    if verification.outputs:
        worst = max(verification.outputs.items(), key=lambda kv: kv[1].rel_l2)
        at = f" at {shapes_text(verification.feed_shapes)}" if verification.feed_shapes else ""
        if verification.padding_mask:
            at += f" (padding, {verification.padding_mask} = 0, left out)"
        lines.append(
            f"verified on {verification.feeds} feed(s){at}: worst output {worst[0]!r} "
            f"rel_l2={worst[1].rel_l2:.3g} max_abs={worst[1].max_abs:.3g}"
        )
    else:
        lines.append(f"not verified: {verification.note}")
    calibration = report.calibration
    if calibration.get("fit_method") == "block":
        lines.append(
            f"least squares: {calibration['blocks']} of {calibration['candidates']} block(s) replaced, fitted "
            f"{'in order' if calibration['fitted_on'] == 'in order' else 'on the original'} on "
            f"{calibration['rows']:,} rows ({calibration['held_out_rows']:,} held out)"
        )
    lines += [f"warning: {w}" for w in report.warnings]
    if "seconds" in calibration:
        lines.append(f"{calibration['seconds']:.1f} s in all (the graph pass {report.seconds:.2f} s)")
    else:
        lines.append(f"{report.seconds:.2f} s")
    return "\n".join(lines)


def _macs_line(report: Report) -> str:
    missing = report.macs_not_counted_before or report.macs_not_counted_after
    if not missing:
        return f"MACs   {_ratio(report.macs_before, report.macs_after)}"
    if report.macs_before == 0:
        return f"MACs   not counted ({len(missing)} matmul/conv node(s) of unknown shape, e.g. {missing[0]})"
    return (
        f"MACs   {_ratio(report.macs_before, report.macs_after)}; not counted: {len(missing)} matmul/conv "
        f"node(s) of unknown shape, e.g. {missing[0]}"
    )


def shapes_text(shapes: Mapping[str, Sequence[int]]) -> str:
    """`x[2,3,224,224] mask[2,32]`: input shapes as the summary shows them."""
    return " ".join(f"{name}[{','.join(str(d) for d in dims)}]" for name, dims in shapes.items())


def _ratio(before: int, after: int) -> str:
    if before <= 0:
        return f"{before:,} -> {after:,}"
    return f"{before:,} -> {after:,} ({100.0 * (after - before) / before:+.1f}%)"
