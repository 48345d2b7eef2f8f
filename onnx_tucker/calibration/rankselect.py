"""Ranks chosen with calibration data (`--ranks data:F --calibrate DATA`): the whole model keeps a
fraction F of its MACs, spent where the original layers' *outputs on the data* lose least.

One walk over the original model's layers in graph order (`ActivationCache`: about one onnxruntime
pass) accumulates, per layer, the Gram statistics of its input im2col and its output; from them
`numerics.rankalloc` gives the error at every rank (Tucker-1 / SVD) or rank pair (Tucker-2, input
ranks on a grid) and allocates the MAC budget across layers, "keep the layer" being one candidate.
The result replays through the planner like a plan file (`PlannedRanks`), and `--calibrate` then
refits the chosen factors as usual.

Layers the error model does not cover (grouped convs, ConvTranspose, MatMul with a constant left
operand, im2col wider than `max_width`) keep the weight-space plan of `fallback` (EVBMF by default).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..errors import UsageError
from ..numerics.rankalloc import (
    Allocation,
    RankCandidate,
    allocate_macs,
    output_error_curve,
    rank_grid,
    tucker2_error_grid,
)
from ..numerics.refit import GramStats, conv_pads_begin, im2col, kernel_input_grams, sample_positions
from ..ops.layer import Im2col, Layer
from ..ops.registry import find_handler, handler_for
from ..planning.planner import LayerPlan, PlannedRanks, SkipCause
from ..runtime.activations import ActivationCache

if TYPE_CHECKING:  # annotations only: the stages take models from the graph layer
    import onnx

# Plans the user (--include / --exclude) or the weights (NaN/Inf) rule out: data ranks leave them alone.
RULED_OUT = frozenset({SkipCause.INCLUDE, SkipCause.EXCLUDE, SkipCause.NON_FINITE})


@dataclass(frozen=True)
class DataRankOptions:
    # Output positions sampled per layer over the calibration set (ResNet-20, 500 images: 16384 and 32768
    # rows gave the same top-1 within noise; the Gram products are half the work).
    rows: int = 16384
    max_width: int = 4096  # widest im2col handled; wider layers keep the fallback plan
    input_rank_points: int = 12  # Tucker-2 input ranks tried per layer
    seed: int = 0
    memory_bytes: int = 2 << 30  # activations kept in memory between layers (the rest: on disk)


def _covered(layer: Layer) -> Im2col | None:
    """How the layer reads its input, when the output-space error model covers it (None otherwise:
    operators without a handler or im2col, grouped convs)."""
    handler = find_handler(layer.op_type)
    im = handler.im2col(layer) if handler is not None else None
    return im if im is not None and im.groups == 1 else None


class _Accumulator:
    """Gram statistics of one layer: im2col (or rows) of its input against its output."""

    def __init__(self, im: Im2col, per_sample: int | None, rng: np.random.Generator) -> None:
        self.im, self.per_sample, self.rng = im, per_sample, rng
        self.stats = GramStats(im.width, im.outputs)

    def add(self, x: np.ndarray, y: np.ndarray) -> None:
        im = self.im
        if im.conv:
            n_idx, coords = sample_positions(self.rng, x.shape[0], y.shape[2:], self.per_sample)
            pads = conv_pads_begin(x.shape[2:], y.shape[2:], im.kernel, im.strides, im.dilations, im.pads, im.auto_pad)
            p = im2col(x, n_idx, coords, im.kernel, im.strides, pads, im.dilations)
            yr = y[(n_idx, slice(None)) + tuple(coords.T)]
            self.stats.add(p.astype(np.float64), yr.astype(np.float64))
        elif im.trans_a:
            self.stats.add(x.T.astype(np.float64), y.astype(np.float64))
        else:
            self.stats.add(x.reshape(-1, x.shape[-1]).astype(np.float64), y.reshape(-1, y.shape[-1]).astype(np.float64))


def _candidates(layer: Layer, im: Im2col, stats: GramStats, weight: np.ndarray, points: int) -> list[RankCandidate]:
    handler = handler_for(layer)
    intercept = bool(layer.bias_name)
    _, macs0 = handler.cost(layer, "original")
    out = [RankCandidate("original", (), int(macs0 or 0), 0.0)]
    kinds = handler.kinds(layer)
    curve = output_error_curve(stats, intercept)
    t = stats.t
    kk = im.taps
    if im.conv and kk > 1:
        for r in range(1, t + 1):
            out.append(RankCandidate("tucker1", (r,), int(handler.cost(layer, "tucker1", (r,))[1] or 0), float(curve[r])))
        if "tucker2" in kinds:
            s = stats.d // kk
            grid = tucker2_error_grid(stats, kernel_input_grams(weight)[0], kk, rank_grid(s, points)[:-1] or [1], intercept)
            for r3, errs in grid.items():
                for r4 in range(1, t + 1):
                    macs = int(handler.cost(layer, "tucker2", (r4, r3))[1] or 0)
                    out.append(RankCandidate("tucker2", (r4, r3), macs, float(errs[r4])))
    else:
        kind = "svd" if "svd" in kinds else kinds[0]
        for r in range(1, min(stats.d, t) + 1):
            out.append(RankCandidate(kind, (r,), int(handler.cost(layer, kind, (r,))[1] or 0), float(curve[r])))
    return out


# Chooses one candidate per covered layer for a MAC budget in place of `allocate_macs` (the covered
# layers, their candidates, the budget): `latency_alloc.LatencyAllocator` allocates on measured time.
# It raises its own error when it cannot meet its budget.
Allocator = Callable[[Sequence[Layer], Sequence[Sequence[RankCandidate]], int], Allocation]


@dataclass(frozen=True)
class DataRankSelection:
    planned: PlannedRanks
    chosen: Mapping[str, RankCandidate]  # per covered layer
    budget_macs: int  # what the covered layers may spend
    macs: int  # what they spend
    fixed_macs: int  # MACs of the layers outside the error model
    total_macs: int  # of the original model (Conv/Gemm/MatMul)


def select_ranks_data(
    original: onnx.ModelProto,
    layers: Sequence[Layer],
    fallback: Sequence[LayerPlan],
    batches: Sequence[Mapping[str, np.ndarray]],
    fraction: float,
    read_weight: Callable[[str], np.ndarray],
    options: DataRankOptions | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    allocator: Allocator | None = None,
) -> DataRankSelection:
    """Kinds and ranks for every layer so the model keeps `fraction` of its MACs (see the module
    docstring). `fallback`: the weight-space plan of each layer (same order as `layers`), used for the
    layers the error model does not cover and for the ones it may not touch (skipped, excluded).
    `allocator`: how the candidates are allocated (default `allocate_macs`; see `Allocator`)."""
    opts = options or DataRankOptions()
    count = sum(int(next(iter(b.values())).shape[0]) for b in batches)
    total = sum(int(p.macs_before or 0) for p in fallback)
    covered: list[tuple[Layer, Im2col]] = []
    fixed = 0
    entries: dict[str, tuple[str, tuple[int, ...] | None, tuple[int, ...] | None]] = {}
    reasons: dict[str, str] = {}
    causes: dict[str, SkipCause] = {}
    for lay, p in zip(layers, fallback, strict=True):
        im = _covered(lay)
        if im is not None and im.width > opts.max_width:
            im = None  # too wide an im2col
        # Layers the user or the model rule out, and the ones the error model does not cover, keep
        # their weight-space plan (decomposed or not, with its reason).
        ruled_out = lay.skip_reason or p.macs_before is None or p.cause in RULED_OUT
        if ruled_out or im is None or lay.node_index < 0:
            if p.decomposed:
                entries[lay.layer_id] = (p.kind, p.ranks, lay.weight_shape)
            else:
                entries[lay.layer_id] = ("skip", None, lay.weight_shape)
                reasons[lay.layer_id] = p.reason or "not decomposed"
                causes[lay.layer_id] = p.cause or SkipCause.PLAN
            fixed += int(p.macs_after or p.macs_before or 0)
            continue
        covered.append((lay, im))
    budget = math.floor(fraction * total) - fixed
    candidates: list[list[RankCandidate]] = []
    with ActivationCache(original, batches, "original", opts.memory_bytes) as cache:
        for step, (lay, geo) in enumerate(covered):
            if progress is not None:
                progress(lay.layer_id, step, len(covered))
            per_sample = max(1, math.ceil(opts.rows / max(count, 1))) if geo.conv else None
            acc = _Accumulator(geo, per_sample, np.random.default_rng([opts.seed, lay.node_index]))
            for x, y in cache.values([lay.inputs[0], lay.outputs[0]]):
                acc.add(x, y)
            weight = read_weight(lay.weight_name) if lay.weight_name else np.zeros(0)
            candidates.append(_candidates(lay, geo, acc.stats, weight, opts.input_rank_points))
    if progress is not None and covered:
        progress(covered[-1][0].layer_id, len(covered), len(covered))
    if allocator is None:
        alloc = allocate_macs(candidates, max(budget, 0))
    else:
        alloc = allocator([lay for lay, _ in covered], candidates, max(budget, 0))
    if not alloc.met:
        least = fixed + sum(min(c.macs for c in cs) for cs in candidates)
        raise UsageError(
            f"--ranks data:{fraction:g}: cannot keep the MACs at {fraction:g} of the original ({total}); "
            f"the least this model can reach is {least / max(total, 1):.3f} of it (rank 1 everywhere, and "
            f"{fixed} MACs in layers that are not decomposed or use the fallback plan); use a larger fraction"
        )
    chosen: dict[str, RankCandidate] = {}
    for (lay, _), c in zip(covered, alloc.choice, strict=True):
        chosen[lay.layer_id] = c
        if c.kind == "original":
            entries[lay.layer_id] = ("skip", None, lay.weight_shape)
            causes[lay.layer_id] = SkipCause.BUDGET
            reasons[lay.layer_id] = (f"kept by --ranks data:{fraction:g}: decomposing it costs more output error "
                                     "per MAC saved than the layers that were decomposed")
        else:
            entries[lay.layer_id] = (c.kind, c.ranks, lay.weight_shape)
    policy = f"data:{fraction:g}"
    return DataRankSelection(PlannedRanks(entries, policy, reasons=reasons, policy=policy, causes=causes), chosen,
                             max(budget, 0), alloc.macs, fixed, total)
