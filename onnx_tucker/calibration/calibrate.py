"""Calibration: refit each decomposed layer's factors on unlabeled data ("asymmetric" reconstruction,
Zhang et al., TPAMI 2016), keeping its ranks and the graph's structure.

Layers are visited in graph order. For each one, the *input* comes from the compressed model with
every earlier layer already refit, the *target* is the original model's output of that layer, both
from onnxruntime batch by batch; only Gram statistics are kept (`numerics.refit`), so memory is
bounded by the layer's width. Candidates, each solved exactly on those statistics:
- `last`:  the last 1x1 factor and the bias by ridge least squares (front factors kept);
- `joint`: the core (or the SVD's first factor) and the last factor together, as a reduced-rank
  ridge regression on the im2col of the spatial step's input (strides, pads, dilations, groups kept);
- `data`:  as `joint`, after replacing a Tucker-2 first factor by a data-aware one chosen from the
  input activations' channel covariance (`numerics.refit.data_aware_basis`).
A Tucker-1-in chain (1x1 S->R3 then the k x k core R3->T) is refit as a Tucker-2 one whose last factor
is the identity (folded into the core afterwards, `ConvHandler.from_refit_blocks`): its first factor
data-aware under "full", its core by least squares on the first factor's output.
A spatial SVD (kh x 1 then 1 x kw: a free im2col front would not split into two convs,
`OpHandler.refit_front`) has `last` (its 1 x kw factor and the bias, the kh x 1 factor kept) and, under
"full", `data` (the kh x 1 factor replaced by a data-aware one, `data_aware_basis` on the (channel,
row tap) moment against the rearranged kernel's Gram, then the 1 x kw factor fitted on it).
The candidate with the lowest calibration error wins, and the weight-space factors are kept when
none beats them: a refit never increases a layer's error on the calibration rows.

Grouped convs are refit group by group (block-diagonal factors). The `method` option caps the
candidates: "last" < "joint" < "full" (all three). A layer whose output only feeds an `Add` (the
residual branch of a ResNet block) is fitted to the original Add output minus the compressed model's
other Add input (`residual`), so it also absorbs the error carried by the skip path.

Cost: about one onnxruntime pass over the calibration data per model (`ActivationCache` keeps the
frontier's activations, so each layer's request runs only the nodes after the previous one), plus
Gram products of `rows` sampled output positions by the im2col width. Memory: a few Gram matrices of
the im2col width plus the frontier's activations for the calibration set (capped: over the cap, each
request runs its prefix again).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

from ..config import CompressionConfig, Preprocess
from ..data import open_for_model
from ..errors import ValidationError
from ..graph.model import ModelIndex
from ..graph.probe import (
    FactorChain,
    factor_chain,
    node_io,
    read_initializer,
    residual_partner,
    write_initializers,
)
from ..graph.rewrite import Replacement
from ..numerics.refit import (
    DEFAULT_RIDGE,
    GramStats,
    channel_moment,
    conv_pads_begin,
    data_aware_basis,
    fit_first_given_rest,
    fit_last,
    fit_reduced_rank,
    fit_ridge,
    im2col,
    kernel_input_grams,
    residual,
    sample_positions,
    spatial_front,
)
from ..numerics.tucker import spatial_unfold
from ..ops.base import OpHandler
from ..ops.layer import Im2col, Layer, LayerFactors
from ..ops.registry import handler_for
from ..planning.planner import CompressionPlan
from ..runtime.activations import ActivationCache

if TYPE_CHECKING:  # annotations only: the stages take models from the graph layer
    import onnx

    from ..data import DataSet
    from ..training.lossaware import ChannelWeights
    from ..training.refine import BlockRefinement

METHODS = ("last", "joint", "full")
Batches = Sequence[Mapping[str, np.ndarray]]


@dataclass(frozen=True)
class CalibrationOptions:
    method: str = "full"  # "last", "joint" or "full" (see the module docstring)
    ridge: float = DEFAULT_RIDGE
    # Output positions sampled per layer over the whole calibration set (all when there are fewer).
    rows: int = 32768
    # Widest joint regression (columns of im2col per group), as rank choice's cap (512 x 3x3 = 4608
    # fits; a 6144-wide float64 Gram is 302 MB); wider layers (a VGG FC6's 25088 inputs) only refit the
    # last factor, on the statistics of the front factor's output, with a note.
    max_width: int = 6144
    seed: int = 0
    # A layer whose output only feeds an Add (a residual branch) is fitted to the original Add's output
    # minus the compressed other branch, so it also absorbs the error the skip path carries.
    residual: bool = True
    # Alternations of (first factor | core and last) after the joint / data-aware fit (Tucker-2, "full").
    # Measured on CIFAR ResNet-56 at x2 MACs: 1 sweep 56 s / 81.05 %, 3 sweeps 75 s / 81.40 % (2,000 test
    # images: within noise); each sweep solves an (R3 S)-wide least squares per layer.
    sweeps: int = 1
    # Per layer id, one positive weight per output channel (`--refit-weights fisher`): the refit then
    # minimises the weighted squared error of the layer's output; layers absent are unweighted.
    channel_weights: Mapping[str, np.ndarray] | None = None


@dataclass(frozen=True)
class LayerCalibration:
    """One layer's refit: relative output error ||y - y_orig|| / ||y_orig|| on the calibration rows,
    with the input from the already-refit compressed model, before and after."""

    method: str  # "last", "joint", "data", "alt", or "kept" (weight-space factors kept)
    error_before: float | None
    error_after: float | None
    rows: int
    note: str | None = None
    # The other input of the Add this layer feeds, when the target was compensated for its error
    # (`CalibrationOptions.residual`): the errors are then those of the Add's output.
    compensated_for: str | None = None


@dataclass
class _Group:
    first: np.ndarray | None  # R3 x S_g (Tucker-2 only)
    front: np.ndarray  # d x R
    last: np.ndarray  # R x T_g
    bias: np.ndarray  # T_g (zeros without a bias)
    kernel_gram: np.ndarray | None = None  # S_g x S_g, for the data-aware first factor


@dataclass
class _Geometry:
    im: Im2col  # how the layer reads its input (its handler's answer)
    groups: list[_Group]
    # Why the front factor stays as it is whatever the method (`OpHandler.refit_front`: a spatial
    # SVD's k x 1 factor); None: it may be refit.
    front_kept: str | None = None


def _geometry(handler: OpHandler, im: Im2col, layer: Layer, f: LayerFactors, bias: np.ndarray | None,
              beta: float) -> _Geometry:
    blocks = handler.refit_blocks(layer, f)
    t = blocks[0][2].shape[1]  # outputs per group
    # One bias per output (a Gemm's C times beta; beta is 1 elsewhere), split like the outputs.
    b = np.zeros(t * len(blocks)) if bias is None else beta * np.broadcast_to(
        bias.astype(np.float64).ravel(), (t * len(blocks),))
    return _Geometry(im, [_Group(fi, fr, la, np.array(b[k * t : (k + 1) * t])) for k, (fi, fr, la) in enumerate(blocks)])


def _check_finite(arr: np.ndarray, tensor: str, what: str) -> None:
    if not np.all(np.isfinite(arr)):
        raise ValidationError(
            f"calibration: tensor '{tensor}' of the {what} model is not finite on the calibration data; "
            "check the data (scaling, NaN) or leave out --calibrate; nothing was written"
        )


class _LayerPass:
    """Accumulates one layer's statistics, one batch at a time, per group, in one of three spaces:
    "x" the im2col of the layer's input (Tucker-2 under method "full": any first factor's statistics
    follow from it, the data-aware one included), "z" the im2col of the current first factor's output
    (or of the input when there is none), "q" that times the current front factor (too wide a layer,
    or method "last": only the last factor can be refit)."""

    def __init__(self, geo: _Geometry, opts: CalibrationOptions, per_sample: int | None, rng: np.random.Generator,
                 tucker2: bool) -> None:
        self.geo, self.opts, self.per_sample, self.rng = geo, opts, per_sample, rng
        kk = geo.im.taps
        self.kk = kk
        self.space: list[str] = []
        self.stats: list[GramStats] = []
        for grp in geo.groups:
            d, t = grp.front.shape[0], grp.last.shape[1]
            if opts.method == "last" or d > opts.max_width:
                space, width = "q", grp.front.shape[1]
            elif tucker2 and opts.method == "full" and grp.first is not None and grp.first.shape[1] * kk <= opts.max_width:
                space, width = "x", grp.first.shape[1] * kk
            else:
                space, width = "z", d
            self.space.append(space)
            self.stats.append(GramStats(width, t))

    def add(self, x: np.ndarray, y: np.ndarray) -> None:
        geo, im = self.geo, self.geo.im
        if not im.conv:
            rows = x.T if im.trans_a else x.reshape(-1, x.shape[-1])
            self._add(0, rows, y.reshape(-1, y.shape[-1]))
            return
        out_sp = y.shape[2:]
        n_idx, coords = sample_positions(self.rng, x.shape[0], out_sp, self.per_sample)
        yr = y[(n_idx, slice(None)) + tuple(coords.T)]  # (m, T)
        pads = conv_pads_begin(x.shape[2:], out_sp, im.kernel, im.strides, im.dilations, im.pads, im.auto_pad)
        g = len(geo.groups)
        s_g, t_g = x.shape[1] // g, y.shape[1] // g
        kk = self.kk
        for k, grp in enumerate(geo.groups):
            p = im2col(x[:, k * s_g : (k + 1) * s_g], n_idx, coords, im.kernel, im.strides, pads, im.dilations)
            if self.space[k] != "x" and grp.first is not None:
                # The first factor on the sampled receptive fields only (a 1x1 conv commutes with
                # im2col): far less work and memory than on the whole activation map.
                p = np.einsum("rs,msk->mrk", grp.first, p.reshape(p.shape[0], s_g, kk), optimize=True).reshape(p.shape[0], -1)
            self._add(k, p, yr[:, k * t_g : (k + 1) * t_g])

    def _add(self, k: int, p: np.ndarray, y: np.ndarray) -> None:
        if self.space[k] == "q":
            p = p @ self.geo.groups[k].front
        self.stats[k].add(p, y)

    def first_space(self, k: int, first: np.ndarray) -> GramStats:
        """Statistics of the im2col of `first` applied to the input ("x" space only)."""
        return self.stats[k].projected_channels(first, self.kk)

    def channel_moment(self, k: int) -> np.ndarray:
        """Second moment of the input channels over the receptive fields ("x" space only)."""
        return channel_moment(self.stats[k], self.kk)


def _group_rss(lp: _LayerPass, k: int, g: _Group) -> float:
    """sum ||y - y^||^2 of group `k` with the factors `g`, on `lp`'s statistics (in its space)."""
    space = lp.space[k]
    st = lp.first_space(k, g.first) if space == "x" and g.first is not None else lp.stats[k]
    return residual(st, g.last if space == "q" else g.front @ g.last, g.bias)


def _solve(geo: _Geometry, lp: _LayerPass, intercept: bool, opts: CalibrationOptions,
           kernel_grams: list[np.ndarray] | None,
           channel_weights: np.ndarray | None = None) -> tuple[str, float, float, list[_Group], int, str | None]:
    """(chosen candidate, rss before, rss after, new groups, rows, note). With `channel_weights` (one
    positive weight per output channel) every candidate minimises the weighted squared error and the
    best is chosen on it; the returned rss are unweighted (what the report shows)."""
    if channel_weights is None:
        return _solve_plain(geo, lp, intercept, opts, kernel_grams)
    t = geo.groups[0].last.shape[1]
    scales = [np.sqrt(np.asarray(channel_weights, dtype=np.float64)[k * t : (k + 1) * t]) for k in range(len(geo.groups))]
    weighted = copy.copy(lp)
    weighted.stats = [st.scaled_targets(sc) for st, sc in zip(lp.stats, scales, strict=True)]
    geo_w = replace(geo, groups=[_Group(g.first, g.front, g.last * sc, g.bias * sc, g.kernel_gram)
                                 for g, sc in zip(geo.groups, scales, strict=True)])
    best, _, _, found, rows, note = _solve_plain(geo_w, weighted, intercept, opts, kernel_grams)
    groups = [_Group(g.first, g.front, g.last / sc, g.bias / sc, g.kernel_gram) for g, sc in zip(found, scales, strict=True)]
    before = sum(_group_rss(lp, k, g) for k, g in enumerate(geo.groups))
    after = sum(_group_rss(lp, k, g) for k, g in enumerate(groups)) if best != "kept" else before
    return best, before, after, (geo.groups if best == "kept" else groups), rows, note


def _solve_plain(geo: _Geometry, lp: _LayerPass, intercept: bool, opts: CalibrationOptions,
                 kernel_grams: list[np.ndarray] | None) -> tuple[str, float, float, list[_Group], int, str | None]:
    """`_solve` without channel weights."""
    totals: dict[str, float] = {}
    solutions: dict[str, list[_Group]] = {}
    rows = lp.stats[0].n
    notes: list[str] = []
    for k, grp in enumerate(geo.groups):
        space = lp.space[k]
        st = lp.first_space(k, grp.first) if space == "x" and grp.first is not None else lp.stats[k]
        r = grp.front.shape[1]
        w0 = grp.last if space == "q" else grp.front @ grp.last
        cands: dict[str, tuple[float, _Group]] = {"kept": (residual(st, w0, grp.bias), grp)}
        if geo.front_kept is not None:  # a spatial SVD: the 1 x k factor on the k x 1 factor's output
            if not notes:
                notes.append(geo.front_kept if rows >= r else
                             f"{rows} calibration rows for rank {r}: weight-space factors kept; use more samples")
            kw = geo.im.kernel[-1]
            fronts = {"last": grp.front}
            if space == "z" and kernel_grams is not None and opts.method == "full":
                basis = data_aware_basis(channel_moment(st, kw), kernel_grams[k], r // kw, opts.ridge)
                fronts["data"] = spatial_front(basis, kw)
            for name, fr in fronts.items():
                if rows >= r:
                    qs = st if space == "q" else st.projected(fr)
                    la, b = fit_last(qs, np.eye(r), intercept, opts.ridge)
                    cands[name] = (residual(qs, la, b), _Group(grp.first, fr, la, b))
        elif rows >= r:
            qs = st if space == "q" else st.projected(grp.front)
            la, b = fit_last(qs, np.eye(r), intercept, opts.ridge)
            cands["last"] = (residual(qs, la, b), _Group(grp.first, grp.front, la, b))
        elif not notes:
            notes.append(f"{rows} calibration rows for rank {r}: weight-space factors kept; use more samples")
        if geo.front_kept is not None:
            pass
        elif opts.method != "last" and space == "q":
            if not notes:
                notes.append(f"im2col width {grp.front.shape[0]} > {opts.max_width}: only the last factor refit")
        elif opts.method != "last" and rows < st.d:
            if not notes:
                notes.append(f"{rows} calibration rows for a {st.d}-wide regression: only the last factor refit; "
                             "use more samples")
        elif opts.method != "last":
            fr, la, b = fit_reduced_rank(st, r, intercept, opts.ridge)
            cands["joint"] = (residual(st, fr @ la, b), _Group(grp.first, fr, la, b))
            if space == "x" and kernel_grams is not None and grp.first is not None:
                first = data_aware_basis(lp.channel_moment(k), kernel_grams[k], grp.first.shape[0], opts.ridge)
                sd = lp.first_space(k, first)
                fr, la, b = fit_reduced_rank(sd, r, intercept, opts.ridge)
                cands["data"] = (residual(sd, fr @ la, b), _Group(first, fr, la, b))
                # Block-coordinate descent from the better start: the first factor given the rest
                # (exact least squares), then core and last given it (exact); never worse.
                start = min(("joint", "data"), key=lambda n: cands[n][0])
                rss, g = cands[start]
                kk, r3 = lp.kk, grp.first.shape[0]
                for _ in range(opts.sweeps):
                    first = fit_first_given_rest(lp.stats[k], g.front @ g.last, r3, kk, intercept, opts.ridge, start=g.first)
                    sa = lp.first_space(k, first)
                    fr, la, b = fit_reduced_rank(sa, r, intercept, opts.ridge)
                    new_rss = residual(sa, fr @ la, b)
                    if not new_rss < rss * (1 - 1e-6):
                        break
                    rss, g = new_rss, _Group(first, fr, la, b)
                if rss < cands[start][0]:
                    cands["alt"] = (rss, g)
        for name, (rss, new) in cands.items():
            totals[name] = totals.get(name, 0.0) + rss
            solutions.setdefault(name, []).append(new)
    # A candidate counts only when every group has it (a layer is refit one way); ties keep the factors.
    complete = [n for n in totals if len(solutions[n]) == len(geo.groups)]
    best = min(complete, key=lambda n: (totals[n], n != "kept"))
    return best, totals["kept"], totals[best], solutions[best], rows, notes[0] if notes else None


def calibrate_model(
    original: onnx.ModelProto,
    compressed: onnx.ModelProto,
    replacements: Mapping[int, Replacement],
    batches: Batches,
    options: CalibrationOptions | None = None,
    read_weight: Callable[[str], np.ndarray] | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    memory_bytes: int = 512 << 20,
) -> dict[str, LayerCalibration]:
    """Refit every replaced layer of `compressed` (modified in place) on `batches` of feeds; per layer id,
    what was done. `read_weight` reads an original weight by name (the data-aware first factor)."""
    opts = options or CalibrationOptions()
    if opts.method not in METHODS:
        raise ValueError(f"calibration method {opts.method!r} not in {METHODS}")
    if read_weight is None:
        index = ModelIndex(original)
        read_weight = index.constant_value
    count = sum(int(next(iter(b.values())).shape[0]) for b in batches)
    results: dict[str, LayerCalibration] = {}
    order = sorted(replacements)
    # The walk runs each model about once: each request starts from the cached frontier.
    # Each model's activations share the memory budget; the rest is spilled to disk.
    with ActivationCache(compressed, batches, "compressed", memory_bytes // 2) as comp_cache, \
            ActivationCache(original, batches, "original", memory_bytes // 2) as orig_cache:
        rate = ""
        for step, node_index in enumerate(order):
            if progress is not None:  # the bar shows the layer and the speed of the one before
                progress(replacements[node_index].layer.layer_id + rate, step, len(order))
            t0 = time.perf_counter()
            _refit_layer(node_index, original, compressed, replacements, opts, read_weight, count,
                         comp_cache, orig_cache, results)
            rate = f" ({count / max(time.perf_counter() - t0, 1e-9):.0f} img/s)"
    if progress is not None and order:
        progress(replacements[order[-1]].layer.layer_id, len(order), len(order))
    return results


def _refit_layer(node_index: int, original: onnx.ModelProto, compressed: onnx.ModelProto,
                 replacements: Mapping[int, Replacement], opts: CalibrationOptions,
                 read_weight: Callable[[str], np.ndarray], count: int, comp_cache: ActivationCache,
                 orig_cache: ActivationCache, results: dict[str, LayerCalibration]) -> None:
    """One layer of `calibrate_model`: gather its statistics, solve, write the factors back."""
    rep = replacements[node_index]
    layer, f = rep.layer, rep.factors
    x_name, y_name = node_io(original, node_index)
    chain = factor_chain(compressed, y_name, len(f.arrays))
    if chain is None or chain.problem is not None:
        why = chain.problem if chain is not None else "its factor chain was not found"
        results[layer.layer_id] = LayerCalibration("kept", None, None, 0, f"not refit: {why}")
        return
    bias = read_initializer(compressed, chain.bias) if chain.bias else None
    handler = handler_for(layer)
    im = handler.im2col(layer)
    why = handler.refit_problem(layer, f, bias)
    if why is not None or im is None:
        if handler.pointwise_last(layer, f) and len(chain.weights) > 1:
            results[layer.layer_id] = _refit_pointwise(original, compressed, chain, handler.groups(layer), y_name,
                                                       opts, count, node_index, comp_cache, orig_cache)
        else:
            results[layer.layer_id] = LayerCalibration("kept", None, None, 0, f"not refit: {why or 'no im2col'}")
        return
    geo = replace(_geometry(handler, im, layer, f, bias, chain.beta), front_kept=handler.refit_front(layer, f))
    rng = np.random.default_rng([opts.seed, node_index])
    grams = None
    if opts.method == "full" and f.kind in ("tucker2", "tucker1-in") and layer.weight_name:
        grams = kernel_input_grams(read_weight(layer.weight_name), len(geo.groups))
    elif opts.method == "full" and f.kind == "spatial-svd" and layer.weight_name:  # the (S*kh)-side Gram
        grams = [m @ m.T for m in (spatial_unfold(np.asarray(b, dtype=np.float64))
                                   for b in handler.blocks(layer, read_weight(layer.weight_name)))]
    per_sample = max(1, math.ceil(opts.rows / max(count, 1))) if im.conv else None
    lp = _LayerPass(geo, opts, per_sample, rng, f.kind in ("tucker2", "tucker1-in"))
    # Residual compensation: when the output only feeds an Add, aim at the original *sum*, i.e. the
    # original output plus what the other branch lost in the compressed model.
    skip = residual_partner(original, y_name) if opts.residual else None
    extra = [skip] if skip else []
    comp_vals = comp_cache.values([x_name, *extra])
    orig_vals = orig_cache.values([y_name, *extra])
    for xs, ys in zip(comp_vals, orig_vals, strict=True):
        x, y = xs[0], ys[0]
        _check_finite(x, x_name, "compressed")
        _check_finite(y, y_name, "original")
        if skip and xs[1].shape == y.shape:
            _check_finite(xs[1], skip, "compressed")
            y = y + (ys[1] - xs[1])
        elif skip:  # a broadcasting Add: no compensation
            skip = None
        lp.add(x, y)
    # Gemm with beta = 0 ignores C: nothing to fit there.
    weights = (opts.channel_weights or {}).get(layer.layer_id)
    if weights is not None and np.asarray(weights).size != sum(g.last.shape[1] for g in geo.groups):
        weights = None  # not this layer's channels (a plan edited since): unweighted
    best, rss0, rss1, groups, rows, note = _solve(geo, lp, bias is not None and chain.beta != 0, opts, grams, weights)
    if weights is not None:
        w = np.asarray(weights)
        weighted = f"weighted by its output channels' Fisher information ({float(w.min()):.2g}-{float(w.max()):.2g})"
        note = weighted if note is None else f"{note}; {weighted}"
    energy = sum(s.target_energy for s in lp.stats)
    e0 = math.sqrt(rss0 / energy) if energy > 0 else math.sqrt(rss0)
    e1 = math.sqrt(rss1 / energy) if energy > 0 else math.sqrt(rss1)
    if best != "kept":
        arrays = handler.from_refit_blocks(layer, f, [(g.first, g.front, g.last) for g in groups])
        b = np.concatenate([g.bias for g in groups])
        # Balanced scales along the chain: the same function, but trainable (finetune after this).
        arrays = handler.balance(layer, arrays)
        stored = handler.stored(layer, replace(f, arrays=tuple(arrays)))
        values = dict(zip(chain.weights, stored, strict=True))
        if chain.bias is not None and chain.beta != 0:
            values[chain.bias] = b / chain.beta  # beta is 1 but for a Gemm's C
        write_initializers(compressed, values)
        comp_cache.invalidate(chain.produced)
    results[layer.layer_id] = LayerCalibration(best, e0, e1, rows, note, skip)


def _refit_pointwise(original: onnx.ModelProto, compressed: onnx.ModelProto, chain: FactorChain, g: int, y_name: str,
                     opts: CalibrationOptions, count: int, node_index: int, comp_cache: ActivationCache,
                     orig_cache: ActivationCache) -> LayerCalibration:
    """The last 1x1 Conv of a chain the im2col model does not cover (a ConvTranspose's): its weight and
    bias by ridge least squares per output pixel, from the compressed chain's own input to that conv
    against the original output (plus the residual compensation); kept when that does not lower the
    error on the calibration rows. Exact at full rank: the original is then a solution."""
    w = read_initializer(compressed, chain.weights[-1]).astype(np.float64)  # (T, R/g, 1, 1)
    t, r = w.shape[0] // g, w.shape[1]
    bias = read_initializer(compressed, chain.bias).astype(np.float64) if chain.bias else np.zeros(w.shape[0])
    stats = [GramStats(r, t) for _ in range(g)]
    rng = np.random.default_rng([opts.seed, node_index])
    per_sample = max(1, math.ceil(opts.rows / max(count, 1)))
    skip = residual_partner(original, y_name) if opts.residual else None
    extra = [skip] if skip else []
    for zs, ys in zip(comp_cache.values([chain.last_input, *extra]), orig_cache.values([y_name, *extra]), strict=True):
        z, y = zs[0], ys[0]
        _check_finite(z, chain.last_input, "compressed")
        _check_finite(y, y_name, "original")
        if skip and zs[1].shape == y.shape:
            y = y + (ys[1] - zs[1])
        elif skip:
            skip = None
        if z.shape[2:] != y.shape[2:]:
            return LayerCalibration("kept", None, None, 0, "not refit: the last 1x1 conv changes the resolution")
        n_idx, coords = sample_positions(rng, z.shape[0], y.shape[2:], per_sample)
        at = (n_idx, slice(None)) + tuple(coords.T)
        zr, yr = z[at].astype(np.float64), y[at].astype(np.float64)
        for k in range(g):
            stats[k].add(zr[:, k * r : (k + 1) * r], yr[:, k * t : (k + 1) * t])
    rows = stats[0].n
    before = after = 0.0
    new_w, new_b = w.copy(), bias.copy()
    for k, st in enumerate(stats):
        w0, b0 = w[k * t : (k + 1) * t, :, 0, 0].T, bias[k * t : (k + 1) * t]
        rss0 = residual(st, w0, b0)
        wk, bk = fit_ridge(st, chain.bias is not None, opts.ridge) if rows >= r else (w0, b0)
        rss1 = residual(st, wk, bk)
        if rss1 < rss0:
            new_w[k * t : (k + 1) * t, :, 0, 0], new_b[k * t : (k + 1) * t] = wk.T, bk
        before, after = before + rss0, after + min(rss0, rss1)
    energy = sum(st.target_energy for st in stats) or 1.0
    if not after < before:
        note = "the last 1x1 conv refit on its input did not lower the error" if rows >= r else \
            f"{rows} calibration rows for rank {r}: weight-space factors kept; use more samples"
        return LayerCalibration("kept", math.sqrt(before / energy), math.sqrt(before / energy), rows, note, skip)
    values = {chain.weights[-1]: new_w}
    if chain.bias is not None:
        values[chain.bias] = new_b
    write_initializers(compressed, values)
    comp_cache.invalidate(chain.produced[-1:])
    return LayerCalibration("last", math.sqrt(before / energy), math.sqrt(after / energy), rows,
                            "only the last 1x1 conv refit (on the chain's own input): the im2col model does not "
                            "cover this operator", skip)


HELD_OUT = 500  # at most this many samples beyond --calibration-samples measure the whole model


@dataclass(frozen=True)
class CalibrationSummary:
    """The whole model against the original on held-out samples of the calibration file (the samples
    not used for the refit, when it has more than `samples`): one-shot vs. calibrated."""

    samples: int
    held_out: int
    top1_agreement_before: float | None = None
    top1_agreement_after: float | None = None
    cosine_before: float | None = None
    cosine_after: float | None = None
    seconds: float = 0.0
    # --refine: each block's held-out error before / after gradient descent (`training.refine`).
    blocks: tuple[BlockRefinement, ...] = ()
    # --refit-weights fisher: the per-channel weights the refit used (`training.lossaware`).
    channel_weights: ChannelWeights | None = None


def calibration_data(path: str, model: onnx.ModelProto, limit: int | None, seed: int,
                     preprocess: Preprocess | None = None) -> tuple[DataSet, DataSet | None]:
    """(data used for the refit, held-out data or None), as `DataSet`s: with more than `limit` samples,
    `limit` of them chosen with `seed` and the next HELD_OUT of the same permutation held out (only
    those images are decoded)."""
    source = open_for_model(path, model, None, preprocess, option="--calibrate")
    if limit is None or source.count <= limit:
        return source.read(), None
    used, held = source.split(seed, limit, HELD_OUT)
    return used.without_labels(), held.without_labels()


def batches_of(data, model: onnx.ModelProto, input_shapes: Mapping[str, tuple[int, ...]],  # type: ignore[no-untyped-def]
                batch: int) -> list[dict[str, np.ndarray]]:
    from ..errors import UsageError
    from ..runtime.validate import data_batches, dynamic_batch

    try:
        chunks = data_batches(data, input_shapes, model)
    except UsageError as e:
        raise UsageError(str(e).replace("--data ", "--calibrate ", 1)) from None
    if not dynamic_batch(model):
        return chunks
    return [{n: a[i : i + batch] for n, a in c.items()} for c in chunks
            for i in range(0, next(iter(c.values())).shape[0], batch)]


def calibration_batches(path: str, model: onnx.ModelProto, input_shapes: Mapping[str, tuple[int, ...]],
                        limit: int | None, batch: int = 64, seed: int = 0, preprocess=None) -> list[dict[str, np.ndarray]]:  # type: ignore[no-untyped-def]
    """The calibration data (.npz, as `--data` reads it; labels ignored) as batches of feeds.

    With more samples than `limit`, a seeded random subset of `limit` is used (files are often sorted
    by class). Data that does not fit the model's inputs is a `UsageError` naming `--calibrate`.
    """
    used, _ = calibration_data(path, model, limit, seed, preprocess)
    return batches_of(used, model, input_shapes, batch)


def calibrate_from_config(original: onnx.ModelProto, compressed: onnx.ModelProto, replacements: Mapping[int, Replacement],
                          plan: CompressionPlan, input_shapes: Mapping[str, tuple[int, ...]], config: CompressionConfig,
                          progress: Callable[[str, int, int], None] | None = None,
                          read_weight: Callable[[str], np.ndarray] | None = None,
                          batch_size: Callable[[DataSet], int] | None = None, memory_bytes: int = 512 << 20,
                          started: Callable[[DataSet, int], None] | None = None,
                          channel_weights: Callable[[Batches], ChannelWeights] | None = None,
                          ) -> tuple[dict[str, LayerCalibration], CalibrationSummary]:
    """`compress --calibrate`: refit `compressed` in place; each refit layer's `LayerCalibration` by
    name (a result: plans hold only what replays), and the whole model's agreement with the original
    on held-out samples before and after. `read_weight`: as for `calibrate_model` (the source model's
    reader: no second graph index). `channel_weights`, given the calibration batches, measures the
    per-channel weights of the refit (`--refit-weights fisher`)."""
    from ..runtime.validate import validate_models

    assert config.calibrate is not None
    t0 = time.perf_counter()
    used, held = calibration_data(config.calibrate, original, config.calibration_samples, config.seed, config.preprocess)
    batch = batch_size(used) if batch_size is not None else 64
    batches = batches_of(used, original, input_shapes, batch)
    if started is not None:
        started(used, batch)
    # The one-shot model measured before the refit changes it in place (no copy of it kept).
    before = validate_models(original, compressed, input_shapes, data=held).outputs[0] if held is not None else None
    weights = channel_weights(batches) if channel_weights is not None else None
    opts = CalibrationOptions(seed=config.seed, channel_weights=None if weights is None else weights.weights)
    found = calibrate_model(original, compressed, replacements, batches, opts, read_weight, progress, memory_bytes)
    blocks: tuple[BlockRefinement, ...] = ()
    if config.calibration.refine:
        from ..training.refine import RefineOptions, refine_blocks  # torch: imported only here

        blocks = tuple(refine_blocks(original, compressed, replacements, batches,
                                     RefineOptions(steps=config.calibration.refine_steps, seed=config.seed),
                                     progress, memory_bytes))
    summary = CalibrationSummary(used.count, 0, blocks=blocks, channel_weights=weights)
    if held is not None and before is not None:
        after = validate_models(original, compressed, input_shapes, data=held).outputs[0]
        summary = CalibrationSummary(used.count, held.count, before.top1_agreement, after.top1_agreement,
                                     before.cosine, after.cosine, blocks=blocks, channel_weights=weights)
    return {lp.name: found[lp.name] for lp in plan.layers if lp.name in found}, replace(summary, seconds=time.perf_counter() - t0)
