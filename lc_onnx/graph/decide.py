"""Deciding, per site, to collapse or skip, with a reason.

An activation is collapsible when every step is affine on the data: Identity/Dropout and leading-axes
reshapes exactly, per-feature constant Mul/Add/Sub/Div exactly, BatchNorm exactly (on its channel axis
1: rank-2 tensors of Gemm/MatMul layers, or the channels of 1x1 convolutions), PRelu/LeakyRelu when
every slope is within `threshold` of 1 (then treated as the identity — the reference implementation's
rule), and any step for which a calibration fit `a ⊙ h + c` is given. A site with a block fit (a fitted
linear map from its input to its second layer's output, `FuseOptions.block_fits`) is replaced by that map
whatever its activation.

Linear layers joined by collapsible sites form chains; each chain is cut into the segments that minimise
the weight count (`d_in·d_out` for a collapsed segment against `Σ d_i·d_{i+1}` kept), so a bottleneck
(`d_in·d_out >= d_h·(d_in+d_out)`) is never collapsed unless `allow_growth`. A site whose activation
feeds several linear layers (fan-out) gives each of them its own composed layer when that shrinks the
weights. The parameter guard then counts exactly what a collapse removes (the weights only the replaced
nodes read; a constant shared with other nodes stays) against what it adds (the new weight and, when it
is not zero, the new bias).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from lc_onnx.graph import algebra
from lc_onnx.graph.algebra import Affine, ChannelAffine
from lc_onnx.graph.constant_eval import Constants
from lc_onnx.graph.layers import Linear, exclusive_params
from lc_onnx.graph.options import BlockFit, FuseOptions
from lc_onnx.graph.reasons import Kind, Reason
from lc_onnx.graph.reshapes import rank_of
from lc_onnx.graph.sites import Site
from lc_onnx.graph.steps import StepKind


@dataclass(frozen=True)
class Head:
    """One output layer of a collapse and the single layer that replaces everything up to it.

    `reshape` is the shape the new layer's output takes when reshapes between the layers regrouped the
    leading axes (None: the new layer's output already has the head's shape).
    """

    layer: Linear
    result: Affine
    reshape: tuple[int, ...] | None = None

    @property
    def with_bias(self) -> bool:
        return bool(np.any(self.result.bias != 0))

    @property
    def params(self) -> int:
        return self.result.d_in * self.result.d_out + (self.result.d_out if self.with_bias else 0)


@dataclass(frozen=True)
class CollapsePlan:
    """`chain[0] -> ... -> chain[-1] -> act -> head` for every head, as one layer per head."""

    chain: tuple[Linear, ...]
    heads: tuple[Head, ...]
    sites: tuple[Site, ...]
    kind: Kind  # EXACT, NEAR_LINEAR, FITTED or LEAST_SQUARES
    params_before: int
    params_after: int

    @property
    def exact(self) -> bool:
        return self.kind is Kind.EXACT

    @property
    def reason(self) -> Reason:
        heads = ", ".join(h.layer.name for h in self.heads)
        spelled = {
            Kind.EXACT: "exact collapse",
            Kind.NEAR_LINEAR: "near-linear collapse",
            Kind.FITTED: "collapse with fitted activations",
            Kind.LEAST_SQUARES: "replaced by its least-squares linear map",
        }[self.kind]
        return Reason(self.kind, f"{spelled} into {len(self.heads)} layer(s) ending at {heads}")

    @property
    def activation(self) -> str:
        return ";".join(site.activation for site in self.sites)

    def node_names(self) -> list[str]:
        names: list[str] = []
        for site in self.sites:
            names += [n for n in site.node_names() if n not in names]
        return names


@dataclass(frozen=True)
class Skip:
    site: Site
    reason: Reason
    params: int


class NotCollapsible(Exception):
    """A site's activation cannot be written as one affine map; `reason` says why."""

    def __init__(self, kind: Kind, message: str) -> None:
        super().__init__(message)
        self.reason = Reason(kind, message)


@dataclass(frozen=True)
class _Ready:
    site: Site
    act: ChannelAffine
    kind: Kind


def activation_affine(site: Site, constants: Constants, options: FuseOptions) -> tuple[ChannelAffine, Kind]:
    """The site's activation as one `a ⊙ h + c` and how it was obtained (EXACT, NEAR_LINEAR: slopes
    taken as 1, FITTED: calibration fits).

    Raises:
        NotCollapsible: the activation is not linear (enough), or does not line up with the layers.
    """
    d_h = site.producer.shape(constants)[1]
    for consumer in site.consumers:
        if consumer.shape(constants)[0] != d_h:
            raise NotCollapsible(
                Kind.SHAPE,
                f"{consumer.name} expects {consumer.shape(constants)[0]} features, {site.producer.name} gives {d_h}",
            )
    fits = options.fits or {}
    parts: list[ChannelAffine] = []
    kind = Kind.EXACT
    for step in site.steps:
        if step.key in fits:
            parts.append(algebra.channel_affine(fits[step.key].scale, fits[step.key].shift, d_h))
            kind = Kind.FITTED
        elif step.kind in (StepKind.IDENTITY, StepKind.RESHAPE, StepKind.AFFINE):
            parts.append(step.channel_affine(constants, d_h))
        elif step.kind == StepKind.SLOPE:
            slopes = step.slopes(constants)
            worst = float(np.max(np.abs(slopes - 1.0))) if slopes.size else 0.0
            if worst > options.threshold:
                raise NotCollapsible(
                    Kind.NOT_LINEAR,
                    f"{step.op} {step.key}: slopes {slopes.min():.4g}..{slopes.max():.4g} are not within "
                    f"{options.threshold:g} of 1",
                )
            parts.append(ChannelAffine.identity(d_h))
            if worst != 0.0 and kind is Kind.EXACT:
                kind = Kind.NEAR_LINEAR
        elif step.kind == StepKind.BATCHNORM:
            parts.append(_batchnorm(site, step, constants, d_h))
        else:
            raise NotCollapsible(Kind.NOT_LINEAR, f"{step.op} {step.key} is not linear")
    for consumer in site.consumers:  # refuses what the rewrite could not reshape back
        _output_shape(site.producer, consumer, site.steps, consumer.shape(constants)[1], constants)
    return (algebra.compose_steps(parts) if parts else ChannelAffine.identity(d_h)), kind


def _batchnorm(site: Site, step, constants: Constants, d_h: int) -> ChannelAffine:
    """BatchNormalization normalises axis 1: the features of a rank-2 tensor or of a convolution."""
    rank = rank_of(step.input)
    if rank is None and site.producer.is_gemm and all(s.kind != StepKind.RESHAPE for s in site.steps):
        rank = 2
    if not site.producer.is_conv and rank != 2:
        raise NotCollapsible(
            Kind.UNSUPPORTED,
            f"BatchNormalization {step.key} normalises axis 1 of a rank-{rank or '?'} tensor, not the feature axis",
        )
    scale, bias, mean, var = (constants.value(t) for t in step.node.inputs[1:5])
    try:
        bn = algebra.batchnorm(scale, bias, mean, var, step.node.attrs.get("epsilon", 1e-5))
        return algebra.channel_affine(bn.scale, bn.shift, d_h)
    except ValueError as exc:
        raise NotCollapsible(Kind.SHAPE, f"BatchNormalization {step.key}: {exc}") from None


def _output_shape(
    first: Linear, head: Linear, steps: Iterable, d_out: int, constants: Constants
) -> tuple[int, ...] | None:
    """The shape a new layer reading `first.input` must give its output to stand for `head.output`.

    Steps that reshape regroup the leading axes only (rows of features stay rows, in order), so the new
    layer's output holds the right values; only its leading shape may differ from the head's. That is
    the leading shape of the head's own input: `[-1]` when it is a matrix, else the last reshape's
    constant target.

    Raises:
        NotCollapsible: the head's leading shape is only known at run time.
    """
    reshapes = [s for s in steps if s.kind == StepKind.RESHAPE]
    if not reshapes:
        return None
    rank_in, rank_head = rank_of(first.input), rank_of(head.core_input)
    if rank_head == 2:
        return None if rank_in == 2 else (-1, d_out)
    last = reshapes[-1].node
    target = constants.value(last.inputs[1]) if last.op == "Reshape" and len(last.inputs) > 1 else None
    if target is not None:
        dims = [int(v) for v in np.asarray(target).reshape(-1)]
        if dims and (0 not in dims[:-1] or last.attrs.get("allowzero", 0)):
            return (*dims[:-1], d_out)
    raise NotCollapsible(
        Kind.UNSUPPORTED,
        f"the reshapes between {first.name} and {head.name} regroup the leading axes into a shape known "
        "only at run time",
    )


def decide(sites: Sequence[Site], constants: Constants, options: FuseOptions) -> list[CollapsePlan | Skip]:
    """A decision for every site; layers already taken by an earlier collapse are left for the next round."""
    decisions: list[CollapsePlan | Skip] = []
    ready: list[_Ready] = []
    taken: set[int] = set()
    for site in sites:
        if site.problems:
            decisions.append(Skip(site, site.problems[0], _site_params(site, constants)))
            continue
        fit = _block_fit(site, options.block_fits or {})
        if fit is not None:
            decision = _decide_block(site, fit, constants, options, taken)
            if decision is not None:
                decisions.append(decision)
            continue
        try:
            ready.append(_Ready(site, *activation_affine(site, constants, options)))
        except NotCollapsible as refusal:
            decisions.append(Skip(site, refusal.reason, _site_params(site, constants)))

    for chain in _chains([r for r in ready if len(r.site.consumers) == 1]):
        decisions += _decide_chain(chain, constants, options, taken)
    for item in (r for r in ready if len(r.site.consumers) > 1):
        decision = _decide_fanout(item, constants, options, taken)
        if decision is not None:
            decisions.append(decision)
    return decisions


def _block_fit(site: Site, fits: Mapping[str, BlockFit]) -> BlockFit | None:
    """The block fit for `site`: one for its (only) second layer's output that reads the site's input."""
    if len(site.consumers) != 1:
        return None
    fit = fits.get(site.consumers[0].output.name)
    return fit if fit is not None and fit.input == site.producer.input.name else None


def _decide_block(
    site: Site, fit: BlockFit, constants: Constants, options: FuseOptions, taken: set[int]
) -> CollapsePlan | Skip | None:
    """The site replaced by its fitted map (None: a layer of it is taken by another collapse this round)."""
    head = site.consumers[0]
    d_in, d_out = site.producer.shape(constants)[0], head.shape(constants)[1]
    if fit.affine.weight.shape != (d_in, d_out):
        reason = Reason(
            Kind.SHAPE, f"the block fit maps {fit.affine.weight.shape}, the site {d_in} -> {d_out} features"
        )
        return Skip(site, reason, _site_params(site, constants))
    try:
        reshape = _output_shape(site.producer, head, site.steps, d_out, constants)
    except NotCollapsible as refusal:
        return Skip(site, refusal.reason, _site_params(site, constants))
    if id(site.producer.core) in taken or id(head.core) in taken:
        return None
    new = Head(head, fit.affine, reshape)
    plan = CollapsePlan(
        (site.producer,), (new,), (site,), Kind.LEAST_SQUARES,
        exclusive_params(site.nodes, constants), new.params,
    )  # fmt: skip
    if plan.params_after >= plan.params_before and not options.allow_growth:
        return _params_skip(site, plan, constants)
    taken.update((id(site.producer.core), id(head.core)))
    return plan


def _chains(items: list[_Ready]) -> list[list[_Ready]]:
    by_producer = {id(r.site.producer.core): r for r in items}
    continued = {id(r.site.consumers[0].core) for r in items}
    chains = []
    for start in items:
        if id(start.site.producer.core) in continued:
            continue
        chain = [start]
        while (nxt := by_producer.get(id(chain[-1].site.consumers[0].core))) is not None:
            chain.append(nxt)
        chains.append(chain)
    return chains


def _segments(dims: list[int], allow_growth: bool) -> list[tuple[int, int]]:
    """Cut layers `0..n-1` (layer i maps dims[i] -> dims[i+1]) into segments `[i, j)` minimising weights.

    Ties keep layers apart: a collapse must strictly reduce the weight count.
    """
    n = len(dims) - 1
    if allow_growth:
        return [(0, n)]
    # best[j] = (weights, -segments, cuts) for layers [0, j)
    best: list[tuple[int, int, list[tuple[int, int]]]] = [(0, 0, [])]
    for j in range(1, n + 1):
        options = []
        for i in range(j):
            cost = dims[i] * dims[j]
            prev = best[i]
            options.append((prev[0] + cost, prev[1] - 1, prev[2] + [(i, j)]))
        best.append(min(options, key=lambda o: (o[0], o[1])))
    return best[n][2]


def _decide_chain(
    chain: list[_Ready], constants: Constants, options: FuseOptions, taken: set[int]
) -> list[CollapsePlan | Skip]:
    """Site `chain[m]` joins `layers[m]` and `layers[m + 1]`."""
    layers = [chain[0].site.producer] + [r.site.consumers[0] for r in chain]
    dims = [layers[0].shape(constants)[0]] + [layer.shape(constants)[1] for layer in layers]
    out: list[CollapsePlan | Skip] = []
    handled: set[int] = set()
    for i, j in _segments(dims, options.allow_growth):
        if j - i < 2:
            continue
        handled.update(range(i, j - 1))
        if any(id(layer.core) in taken for layer in layers[i:j]):
            continue  # another collapse uses one of these layers this round; the next round retries
        items = chain[i : j - 1]
        result = algebra.collapse_chain(
            [layer.affine(constants) for layer in layers[i:j]], [r.act for r in items]
        )
        steps = [s for r in items for s in r.site.steps]
        try:
            reshape = _output_shape(layers[i], layers[j - 1], steps, dims[j], constants)
        except NotCollapsible as refusal:
            out += [Skip(r.site, refusal.reason, _site_params(r.site, constants)) for r in items]
            continue
        collapse = _collapse(
            tuple(layers[i : j - 1]), (Head(layers[j - 1], result, reshape),), items, constants
        )
        if collapse.params_after >= collapse.params_before and not options.allow_growth:
            out += [_params_skip(r.site, collapse, constants) for r in items]
            continue
        taken.update(id(layer.core) for layer in layers[i:j])
        out.append(collapse)
    out += [_growth_skip(item, dims, m, constants) for m, item in enumerate(chain) if m not in handled]
    return out


def _growth_skip(item: _Ready, dims: list[int], m: int, constants: Constants) -> Skip:
    d_in, d_h, d_out = dims[m], dims[m + 1], dims[m + 2]
    if d_in * d_out >= d_h * (d_in + d_out):
        reason = Reason(
            Kind.PARAMETER_GROWTH,
            f"collapsing would not reduce parameters: d_in·d_out = {d_in}·{d_out} = {d_in * d_out} >= "
            f"d_h·(d_in+d_out) = {d_h}·{d_in + d_out} = {d_h * (d_in + d_out)} (allow_growth forces it)",
        )
    else:
        reason = Reason(
            Kind.BOUNDARY,
            "kept as a boundary: collapsing the neighbouring layers of the chain saves more parameters",
        )
    return Skip(item.site, reason, _site_params(item.site, constants))


def _decide_fanout(
    item: _Ready, constants: Constants, options: FuseOptions, taken: set[int]
) -> CollapsePlan | Skip | None:
    site = item.site
    layers = (site.producer, *site.consumers)
    d_in, d_h = site.producer.shape(constants)
    outs = [c.shape(constants)[1] for c in site.consumers]
    before = d_in * d_h + sum(d_h * d for d in outs)
    after = sum(d_in * d for d in outs)
    if after >= before and not options.allow_growth:
        return Skip(
            site,
            Reason(
                Kind.PARAMETER_GROWTH,
                f"collapsing the {len(outs)} heads would not reduce parameters: {after} weights >= {before}",
            ),
            _site_params(site, constants),
        )
    if any(id(layer.core) in taken for layer in layers):
        return None
    first = site.producer.affine(constants)
    heads = tuple(
        Head(
            c,
            algebra.collapse_pair(first, item.act, c.affine(constants)),
            _output_shape(site.producer, c, site.steps, d, constants),
        )
        for c, d in zip(site.consumers, outs)
    )
    collapse = _collapse((site.producer,), heads, [item], constants)
    if collapse.params_after >= collapse.params_before and not options.allow_growth:
        return _params_skip(site, collapse, constants)
    taken.update(id(layer.core) for layer in layers)
    return collapse


def _params_skip(site: Site, collapse: CollapsePlan, constants: Constants) -> Skip:
    """The weights would shrink, but not the parameters once biases, slopes and BatchNorm are counted."""
    return Skip(
        site,
        Reason(
            Kind.PARAMETER_GROWTH,
            f"collapsing would not reduce parameters: {collapse.params_before} -> {collapse.params_after} "
            "with biases (a bias the layers did not have is needed; allow_growth forces it)",
        ),
        _site_params(site, constants),
    )


def _collapse(
    chain: tuple[Linear, ...], heads: tuple[Head, ...], items: Sequence[_Ready], constants
) -> CollapsePlan:
    nodes = list({id(n): n for r in items for n in r.site.nodes}.values())
    before = exclusive_params(nodes, constants)
    after = sum(h.params for h in heads)
    return CollapsePlan(
        chain, heads, tuple(r.site for r in items), _combined(r.kind for r in items), before, after
    )


def _combined(kinds: Iterable[Kind]) -> Kind:
    """The kind of a collapse of several sites: FITTED over NEAR_LINEAR over EXACT."""
    kinds = set(kinds)
    return (
        next(k for k in (Kind.FITTED, Kind.NEAR_LINEAR) if k in kinds) if kinds - {Kind.EXACT} else Kind.EXACT
    )


def _site_params(site: Site, constants: Constants) -> int:
    return exclusive_params(site.nodes, constants)
