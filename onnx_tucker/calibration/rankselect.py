"""Ranks chosen with calibration data (`--ranks data:F --calibrate DATA`): the whole model keeps a
fraction F of its MACs, spent where the original layers' *outputs on the data* lose least.

One walk over the original model's layers in graph order (`ActivationCache`: about one onnxruntime
pass) accumulates, per layer, the statistics its error curves need (`numerics.rankalloc`), which give
the error at every rank (Tucker-1 / SVD) or rank pair (Tucker-2, input ranks on a grid); the MAC
budget is then allocated across layers, "keep the layer" being one candidate. The result replays
through the planner like a plan file (`PlannedRanks`), and `--calibrate` then refits the chosen
factors as usual. With `--target params:G` the model's float parameters are kept within G too, the
two budgets allocated together (`numerics.paramalloc.allocate_macs_and_params`).

What each layer needs (`_covered` says how the error model reads it):
- Tucker-1 / SVD, any layer: the output Gram only (T x T per group), no width limit;
- Tucker-2 of a Conv: the input im2col's Gram when S*k fits `DataRankOptions.max_width` (exact);
  the same Gram prices a 2-D conv's spatial SVD at every rank (`rankalloc.spatial_svd_tails`: the
  1 x k factor refit on the k x 1 factor's output, that factor from the kernel's singular vectors or
  data-aware, whichever the data favour, as calibration does), on the same hull as Tucker-2 / -1;
  and Tucker-1-in (1x1 S->R3 then the k x k R3->T) at every input rank (`rankalloc.tucker1_in_tails`:
  the core refit on the 1x1 factor's output, that factor data-aware or the input mode's HOSVD);
  and an ungrouped conv's CP at a grid of ranks (`cp_tails`: each rank's ALS factors as decomposed,
  the last 1x1 refit on the depthwise factor's output, as calibration does);
  wider, two passes over the layer's input: the channel moment (S x S), then the im2col of the
  data-aware first factor's output at the largest grid input rank (capped to fit the width), which
  also price Tucker-1-in up to that rank;
- grouped convs group by group, every group at the same ranks (docs/grouped-convs.md);
- ConvTranspose: the output Gram, and for Tucker-2's input rank the input channel moment with the
  kernel's input-mode Gram (`rankalloc.additive_tucker2_grid`, an approximation);
- MatMul with a constant left operand (y = A @ X): the columns of y are the targets;
- a matrix layer with fewer calibration rows than outputs (a VGG FC7: 4096 outputs, 256 images): its
  output Gram has rank < T and would price every rank above the row count at zero error, so the
  output covariance is shrunk towards the weight's W W^T (Ledoit-Wolf, `rankalloc.shrunk_moment`).
Calibration refits most layers, and their curves count data-aware factors (what the refit reaches);
a layer it does not refit (`OpHandler.refits`: ConvTranspose, A @ X today) keeps its weight-space
factors, and its curves count those on the data (outputs and inputs projected on the weight's own
singular vectors). On waifu2x (`data:0.5`, 64 crops) data-aware curves put its unrefit ConvTranspose
at input rank 12, 27.3 dB; counting the factors as built keeps it, 34.8 dB (original 35.28 dB).
Layers outside it (MACs unknown, ruled out by the user or the weights) keep the weight-space plan of
`fallback` (EVBMF by default); every such layer's plan says why, and each layer's `policy` says which
chose its ranks (`data:F`, or the fallback's policy followed by `;data:F fallback`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np

from ..config import kind_list
from ..errors import UsageError
from ..numerics.paramalloc import MacParamAllocation, allocate_macs_and_params
from ..numerics.rankalloc import (
    Allocation,
    NormMoments,
    RankCandidate,
    additive_tucker2_grid,
    allocate_macs,
    combine_groups,
    eigenbasis_tail,
    input_projection_tail,
    nested_block_tails,
    nested_tucker2_tails,
    output_basis,
    output_space_tail,
    projection_tail,
    rank_grid,
    shrunk_moment,
    spatial_svd_tails,
    tucker1_in_tails,
    tucker2_tails,
)
from ..numerics.refit import (
    DEFAULT_RIDGE,
    GramStats,
    MomentStats,
    channel_moment,
    conv_out_spatial,
    conv_pads_begin,
    data_aware_basis,
    im2col,
    kernel_input_grams,
    sample_positions,
    scatter_reception,
)
from ..numerics.tucker import cp, leading_left_vectors, spatial_unfold, unfold
from ..ops.layer import Im2col, Layer
from ..ops.registry import find_handler, handler_for
from ..planning.planner import LayerPlan, PlannedRanks, SkipCause
from ..runtime.activations import ActivationCache
from .sensitivity import LayerSensitivity

if TYPE_CHECKING:  # annotations only: the stages take models from the graph layer
    import onnx

# Plans the user (--include / --exclude) or the weights (NaN/Inf) rule out: data ranks leave them alone.
RULED_OUT = frozenset({SkipCause.INCLUDE, SkipCause.EXCLUDE, SkipCause.NON_FINITE})

# Per batch, the values of the asked-for tensors (`ActivationCache.values`; asked once per pass).
Values = Callable[[Sequence[str]], Iterable[Sequence[np.ndarray]]]


@dataclass(frozen=True)
class DataRankOptions:
    # Output positions sampled per layer over the calibration set (ResNet-20, 500 images: 16384 and 32768
    # rows gave the same top-1 within noise; the Gram products are half the work).
    rows: int = 16384
    # Widest Gram built (columns): a Tucker-2 whose input im2col S*k is at most this gets the exact grid
    # (512 x 3x3 = 4608 fits; a 6144^2 float64 Gram is 302 MB); a wider one two passes, its largest grid
    # input rank R3 capped so that R3*k fits. Tucker-1 / SVD need the output Gram only: no cap there.
    max_width: int = 6144
    input_rank_points: int = 12  # Tucker-2 input ranks tried per layer
    seed: int = 0
    memory_bytes: int = 512 << 20  # activations kept in memory between layers (the rest: on disk)
    ridge: float = DEFAULT_RIDGE
    kind: str | None = None  # --kind K[,K...]: the only decompositions offered where a layer allows one (None: all)
    cp_rank_points: int = 4  # CP ranks priced per layer (one ALS each)
    # ALS work per layer, sum over the priced ranks of T*S*k*R (each sweep's GEMMs are ~6x that in
    # flops, 40 sweeps): the grid stops at the rank that fits, so a 1024 x 512 x 3x3 layer is not
    # minutes of ALS per rank (~90 ns per unit measured at 256 x 256 x 3x3, rank 400, 2 cores).
    # 2e8: every layer of the CIFAR ResNets priced up to its MAC cap. Not applied under --kind cp.
    cp_max_work: float = 2e8


@dataclass(frozen=True)
class Coverage:
    """How the error model reads one layer on data."""

    mode: str  # "im2col" (Conv), "rows" (Gemm, MatMul X @ W), "columns" (MatMul A @ X), "scatter" (ConvTranspose)
    groups: int
    inputs: int  # per group: input channels, or K
    outputs: int  # per group: output channels, or N (M for A @ X)
    taps: int = 1  # kernel taps
    # The kernel's geometry: a Conv's im2col; for a ConvTranspose its kernel, strides, pads, dilations
    # and auto_pad (what `refit.scatter_reception` reads).
    im: Im2col | None = None
    tucker2: bool = False  # Tucker-2 candidates too (a spatial kernel)
    spatial: bool = False  # spatial-SVD candidates too (a 2-D kernel, both sides > 1; exact im2col path only)
    mirror: bool = False  # Tucker-1-in candidates too (a spatial kernel, more than one input channel per group)
    cp: bool = False  # CP candidates too (a spatial kernel, ungrouped; exact im2col path only)
    output_padding: tuple[int, ...] = ()  # ConvTranspose
    # Calibration refits the factors (the curves count data-aware factors); otherwise the weight-space
    # factors stay as built and the curves count theirs on the data.
    refit: bool = True
    # Fewer calibration rows than outputs (a matrix layer refit): the output covariance is shrunk
    # towards the weight's (`rankalloc.shrunk_moment`), which reads the weight.
    shrink: bool = False

    @property
    def reads_weight(self) -> bool:
        """Whether the curves need the kernel (Tucker-2's input-mode Gram, the factors as built, or the
        shrinkage target)."""
        return self.tucker2 or not self.refit or self.shrink

    @property
    def data_input(self) -> int:
        """The node input holding the data (the other one is the weight)."""
        return 1 if self.mode == "columns" else 0

    @property
    def one_rank_kind(self) -> str:
        if self.mode in ("im2col", "scatter") and (self.taps > 1 or self.mode == "scatter"):
            return "tucker1"
        return "svd"


def _covered(layer: Layer) -> Coverage | str:
    """How the error model reads the layer (its handler says), or why it cannot."""
    handler = find_handler(layer.op_type)
    w = layer.weight_shape
    if handler is None or w is None or not layer.inputs or not layer.outputs:
        return f"no data error model for {layer.op_type} layers"
    if handler.weight_on_left(layer):
        if len(w) != 2:
            return f"W @ X with a {len(w)}-D constant W"
        return Coverage("columns", 1, w[1], w[0], refit=handler.refits(layer))
    geo = handler.scatter(layer)
    if geo is not None:
        g = geo.groups
        out_pad = layer.attrs.get("output_padding")
        return Coverage("scatter", g, geo.width // geo.taps, geo.outputs // g, geo.taps, geo,
                        tucker2=geo.taps > 1 and "tucker2" in handler.kinds(layer),
                        output_padding=tuple(int(v) for v in out_pad) if isinstance(out_pad, (list, tuple)) else (),
                        refit=handler.refits(layer))
    im = handler.im2col(layer)
    if im is None:
        return f"no data error model for {layer.op_type} layers of weight {tuple(w)}"
    if im.conv:
        g = im.groups
        return Coverage("im2col", g, im.width // im.taps, im.outputs // g, im.taps, im,
                        tucker2=im.taps > 1 and "tucker2" in handler.kinds(layer),
                        spatial="spatial-svd" in handler.kinds(layer), mirror="tucker1-in" in handler.kinds(layer),
                        cp="cp" in handler.kinds(layer))
    return Coverage("rows", 1, im.width, im.outputs, 1, im)


# The note of a layer whose curves count the weight-space factors (calibration does not refit it).
_AS_BUILT = "not refit: ranks on the error of the weight-space factors on the data"


@dataclass(frozen=True)
class LayerCurves:
    """A layer's relative errors: `one_rank[R]` (Tucker-1 / SVD, R = 0..T per group) and, for Tucker-2,
    `grid[R3][R4]`; `note` says how they were reached when not exactly (two passes, an estimate, the
    factors as built)."""

    one_rank: np.ndarray
    grid: Mapping[int, np.ndarray] = field(default_factory=dict)
    note: str = ""
    spatial: np.ndarray | None = None  # spatial SVD at R = 0..cap (ranks whose MACs stay under the original's)
    mirror: np.ndarray | None = None  # Tucker-1-in at R3 = 0..cap (likewise)
    cp: Mapping[int, float] = field(default_factory=dict)  # CP at a grid of ranks (each its own ALS)


def _too_few_rows(layer: Layer, cov: Coverage, count: int) -> bool:
    """Whether a refit matrix layer has fewer rows (samples times the other output dims) than outputs:
    its output Gram then has rank < T and would price every rank above the row count at zero error
    whatever the layer (a VGG FC7, 4096 outputs, on 256 images), so its curves shrink the Gram."""
    if cov.mode not in ("rows", "columns") or not cov.refit:
        return False  # factors as built: their error on the data is an estimate at any row count
    shape = layer.output_shape or ()
    dims = shape[1:-1] if cov.mode == "rows" else (shape[-1:] if shape else ())
    per_sample = math.prod(int(d) for d in dims if d) if all(d for d in dims) else 1
    return count * per_sample < cov.outputs


def _output_prior(block: np.ndarray, mode: str) -> np.ndarray:
    """W W^T in output space (T x T): the outputs' covariance were the inputs white. `block`: K x N
    for X @ W ("rows"), M x K for A @ X ("columns")."""
    b = np.asarray(block)
    return np.asarray(b.T @ b if mode == "rows" else b @ b.T, dtype=np.float64)


def _pixels(a: np.ndarray, n_idx: np.ndarray, coords: np.ndarray) -> np.ndarray:
    """Rows (m, channels) of an N x C x ... tensor at the sampled positions."""
    return a[(n_idx, slice(None)) + tuple(coords.T)]


def _split(rows: np.ndarray, groups: int) -> list[np.ndarray]:
    per = rows.shape[1] // groups
    return [rows[:, k * per : (k + 1) * per] for k in range(groups)]


def layer_curves(layer: Layer, cov: Coverage, values: Values, weight: np.ndarray, count: int,
                 options: DataRankOptions | None = None, bias: np.ndarray | None = None) -> LayerCurves:
    """The error curves of `layer` on the data `values` yields (`count` samples in all). `weight`
    (and `bias`, for a layer not refit) are read when `cov.reads_weight`."""
    opts = options or DataRankOptions()
    x_name, y_name = layer.inputs[cov.data_input], layer.outputs[0]
    intercept = bool(layer.bias_name)
    g, s, t, kk = cov.groups, cov.inputs, cov.outputs, cov.taps
    per_sample = max(1, math.ceil(opts.rows / max(count, 1)))

    def rng() -> np.random.Generator:  # the same positions in every pass
        return np.random.default_rng([opts.seed, max(layer.node_index, 0)])

    ranks3 = rank_grid(s, opts.input_rank_points)[:-1] or [1]

    def one_rank(outs: Sequence[MomentStats]) -> tuple[np.ndarray, list[tuple[np.ndarray, float]]]:
        parts = [output_space_tail(o, intercept) for o in outs]
        return combine_groups([p[0] for p in parts], [p[1] for p in parts]), parts

    if cov.mode == "im2col" and cov.tucker2:
        assert cov.im is not None
        grams = kernel_input_grams(weight, g)
        mirror_cap = _mirror_cap(layer, cov) if cov.mirror else 0
        if s * kk <= opts.max_width:
            cp_ranks = _cp_ranks(layer, cov, opts) if cov.cp else []
            blocks = handler_for(layer).blocks(layer, weight) if cov.spatial or mirror_cap or cp_ranks else []
            return _conv_exact(cov, values, x_name, y_name, grams, ranks3, intercept, per_sample, rng, opts,
                               blocks, _spatial_cap(layer, cov) if cov.spatial else 0, mirror_cap, cp_ranks)
        return _conv_two_pass(cov, values, x_name, y_name, grams, ranks3, intercept, per_sample, rng, opts, mirror_cap)

    outs = [MomentStats(t) for _ in range(g)]
    norms = NormMoments(t) if cov.shrink else None
    moments = [MomentStats(s) for _ in range(g)] if cov.mode == "scatter" and cov.tucker2 else []
    gen = rng()
    shapes: tuple[tuple[int, ...], tuple[int, ...]] | None = None  # ConvTranspose: (input, output) spatial
    for batch in values([x_name, y_name] if moments else [y_name]):
        y = np.asarray(batch[-1])
        if cov.mode == "rows":
            rows = y.reshape(-1, t)
        elif cov.mode == "columns":
            rows = np.swapaxes(y, -1, -2).reshape(-1, t)
        else:
            rows = _pixels(y, *sample_positions(gen, y.shape[0], y.shape[2:], per_sample))
        for o, part in zip(outs, _split(rows, g), strict=True):
            o.add(part)
        if norms is not None:
            norms.add(rows)
        if moments:
            x = np.asarray(batch[0])
            shapes = (x.shape[2:], y.shape[2:])
            for m, part in zip(moments, _split(_pixels(x, *sample_positions(gen, x.shape[0], x.shape[2:], per_sample)), g), strict=True):
                m.add(part)
    blocks = handler_for(layer).blocks(layer, weight) if cov.reads_weight else []  # Conv layout (T_g, S_g, k...)
    shrunk_note = ""
    if norms is not None:  # one group: a matrix layer
        rows_seen = outs[0].n
        outs[0], a = shrunk_moment(outs[0], norms, _output_prior(blocks[0], cov.mode), intercept)
        shrunk_note = (f"{rows_seen} calibration rows for {t} outputs: output covariance shrunk towards the "
                       f"weight's (Ledoit-Wolf intensity {a:.2f}); more samples make it the data's alone")
    curve, parts = one_rank(outs)
    if not cov.refit:
        # The factors stay as built (HOSVD / truncated SVD): the outputs less the bias, projected on
        # the weight's leading output-mode singular vectors; normalised by the same output energy.
        b = np.zeros(t * g) if bias is None else np.asarray(bias, dtype=np.float64).reshape(-1)
        projected = []
        for k, (o, block) in enumerate(zip(outs, blocks, strict=True)):
            bk = b[k * t : (k + 1) * t]
            raw = o.zz - np.outer(bk, o.sum_z) - np.outer(o.sum_z, bk) + o.n * np.outer(bk, bk)
            projected.append(projection_tail(raw, output_basis(block)))
        parts = [(tail, energy) for tail, (_, energy) in zip(projected, parts, strict=True)]
        curve = combine_groups(projected, [e for _, e in parts])
    if not moments:
        return LayerCurves(curve, note=shrunk_note or ("" if cov.refit else _AS_BUILT))
    # Input rank of a ConvTranspose: the input projection's error per input pixel (data-aware when the
    # layer is refit, the HOSVD input factor's otherwise), in the units of the output Gram (its rows
    # are output pixels), added to the output rank's error. Each input pixel
    # writes k taps; per output pixel k * `scatter_reception` of them land (k / prod(strides) away
    # from the borders): the input error per output pixel is that fraction of the per-input-pixel one.
    assert cov.im is not None and shapes is not None
    im = cov.im
    ratio = scatter_reception(shapes[0], shapes[1], im.kernel, im.strides, im.dilations, im.pads, im.auto_pad,
                              cov.output_padding)
    tails = {r3: np.zeros(t + 1) for r3 in ranks3}
    input_tail = input_projection_tail if cov.refit else eigenbasis_tail  # data-aware, or the HOSVD input factor
    for m, o, (out_tail, _), block in zip(moments, outs, parts, blocks, strict=True):
        per_pixel = m.zz / max(m.n, 1)
        in_tail = input_tail(per_pixel, kernel_input_grams(block)[0]) * o.n * ratio
        for r3, v in additive_tucker2_grid(out_tail, in_tail, ranks3).items():
            tails[r3] += v
    energy = sum(p[1] for p in parts)
    grid = {r3: v / energy if energy > 0 else np.zeros_like(v) for r3, v in tails.items()}
    return LayerCurves(curve, grid, "input rank: additive estimate" + ("" if cov.refit else f"; {_AS_BUILT}"))


def _conv_rows(cov: Coverage, x: np.ndarray, out_spatial: Sequence[int], gen: np.random.Generator,
               per_sample: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(im2col rows, sample index, output coordinates) at positions sampled over the output."""
    im = cov.im
    assert im is not None
    n_idx, coords = sample_positions(gen, x.shape[0], out_spatial, per_sample)
    pads = conv_pads_begin(x.shape[2:], out_spatial, im.kernel, im.strides, im.dilations, im.pads, im.auto_pad)
    return im2col(x, n_idx, coords, im.kernel, im.strides, pads, im.dilations), n_idx, coords


def _spatial_cap(layer: Layer, cov: Coverage) -> int:
    """The largest spatial-SVD rank worth pricing: below the rearranged kernel's rank and the original's MACs."""
    assert cov.im is not None and layer.weight_shape is not None
    handler = handler_for(layer)
    per_rank = int(handler.cost(layer, "spatial-svd", (1,))[1] or 0)  # MACs are linear in the rank
    macs0 = int(handler.cost(layer, "original")[1] or 0)
    kh, kw = cov.im.kernel
    top = min(cov.inputs * kh, cov.outputs * kw)
    return min(top, (macs0 - 1) // per_rank) if per_rank > 0 else 0


def _mirror_cap(layer: Layer, cov: Coverage) -> int:
    """The largest Tucker-1-in rank worth pricing: below the input channels and the original's MACs."""
    handler = handler_for(layer)
    per_rank = int(handler.cost(layer, "tucker1-in", (1,))[1] or 0)  # MACs are linear in the rank
    macs0 = int(handler.cost(layer, "original")[1] or 0)
    return min(cov.inputs, (macs0 - 1) // per_rank) if per_rank > 0 else 0


def _cp_ranks(layer: Layer, cov: Coverage, opts: DataRankOptions) -> list[int]:
    """The CP ranks priced: a grid up to the largest whose MACs stay under the original's (each rank
    is its own ALS, so a grid of `DataRankOptions.cp_rank_points`, not every rank), and whose ALS
    work fits `DataRankOptions.cp_max_work` unless --kind asks for CP alone."""
    handler = handler_for(layer)
    per_rank = int(handler.cost(layer, "cp", (1,))[1] or 0)  # MACs are linear in the rank
    macs0 = int(handler.cost(layer, "original")[1] or 0)
    assert layer.weight_shape is not None
    forced = set(kind_list(opts.kind) or ()) & set(handler.kinds(layer))
    if forced and "cp" not in forced:  # --kind without cp: not priced (each rank is an ALS)
        return []
    bound = (handler.rank_limits(tuple(layer.weight_shape), "cp") or (0,))[0]
    top = min(bound, (macs0 - 1) // per_rank) if per_rank > 0 else 0
    if forced != {"cp"}:  # offered beside the others: within the ALS work budget
        unit = float(np.prod(layer.weight_shape)) * (opts.cp_rank_points + 1) / 2  # work per unit of top
        top = min(top, int(opts.cp_max_work / unit))
    if top < 1 or opts.cp_rank_points < 1:
        return []
    return [int(r) for r in np.unique(np.round(np.linspace(top / opts.cp_rank_points, top, opts.cp_rank_points)).astype(int)) if r >= 1]


def cp_tails(stats: GramStats, block: np.ndarray, ranks: Sequence[int], intercept: bool, ridge: float) -> dict[int, float]:
    """Squared errors of CP at each rank: the 1x1 and depthwise factors as decomposed (`tucker.cp`, as
    `decompose` builds them), the last 1x1 and the bias the ridge least squares fit on the data (what
    calibration refits): regressors z = p @ front, front[(s, tap), r] = inp[s, r] taps[tap, r]."""
    out: dict[int, float] = {}
    for r in ranks:
        f = cp(np.asarray(block, dtype=np.float64), r)
        front = np.einsum("sr,kr->skr", f.inp, f.taps).reshape(-1, f.inp.shape[1])
        out[r] = float(nested_block_tails(stats.projected(front), front.shape[1], intercept, ridge)[-1])
    return out


def mirror_tails(stats: GramStats, block: np.ndarray, kernel_gram: np.ndarray, rank: int, intercept: bool,
                 ridge: float) -> dict[str, np.ndarray]:
    """One group's Tucker-1-in squared errors at ranks 0..`rank`, by how the 1x1 factor is chosen:
    "weights" (the input mode's leading singular vectors, as decomposed; calibration's `joint` refits the
    core on it) and "data" (data-aware, `refit.data_aware_basis` on the channel moment against the
    kernel's input-mode Gram, as Tucker-2's first factor and calibration's "data" candidate)."""
    kk = stats.d // int(block.shape[1])
    bases = {"weights": leading_left_vectors(unfold(np.asarray(block, dtype=np.float64), 1), rank).T,
             "data": data_aware_basis(channel_moment(stats, kk), kernel_gram, rank, ridge)}
    return {name: tucker1_in_tails(stats, b, kk, intercept, ridge) for name, b in bases.items()}


def spatial_tails(stats: GramStats, block: np.ndarray, rank: int, intercept: bool, ridge: float) -> dict[str, np.ndarray]:
    """One group's spatial-SVD squared errors at ranks 0..`rank`, by how the k x 1 factor is chosen:
    "weights" (the rearranged kernel's leading singular vectors, as decomposed) and "data" (data-aware,
    `refit.data_aware_basis` on the (channel, row tap) moment, as calibration's "data" candidate)."""
    kw = int(block.shape[3])
    m = spatial_unfold(np.asarray(block, dtype=np.float64))
    bases = {"weights": leading_left_vectors(m, rank).T,
             "data": data_aware_basis(channel_moment(stats, kw), m @ m.T, rank, ridge)}
    return {name: spatial_svd_tails(stats, b, kw, intercept, ridge) for name, b in bases.items()}


def _conv_exact(cov: Coverage, values: Values, x_name: str, y_name: str, grams: list[np.ndarray], ranks3: list[int],
                intercept: bool, per_sample: int, rng: Callable[[], np.random.Generator],
                opts: DataRankOptions, blocks: Sequence[np.ndarray] = (), spatial_cap: int = 0,
                mirror_cap: int = 0, cp_ranks: Sequence[int] = ()) -> LayerCurves:
    """One pass: the im2col Gram per group (width S*k), the exact grid; with `blocks` (the kernel per
    group) and a `spatial_cap` >= 1, the spatial SVD's curve up to that rank from the same Gram; with a
    `mirror_cap` >= 1, Tucker-1-in's likewise."""
    g, s, t, kk = cov.groups, cov.inputs, cov.outputs, cov.taps
    stats = [GramStats(s * kk, t) for _ in range(g)]
    gen = rng()
    for x, y in values([x_name, y_name]):
        p, n_idx, coords = _conv_rows(cov, np.asarray(x), np.asarray(y).shape[2:], gen, per_sample)
        yr = _pixels(np.asarray(y), n_idx, coords)
        for st, pg, yg in zip(stats, _split(p, g), _split(yr, g), strict=True):
            st.add(pg.astype(np.float64), yg.astype(np.float64))
    parts = [output_space_tail(MomentStats.of_targets(st), intercept) for st in stats]
    energies = [e for _, e in parts]
    curve = combine_groups([tl for tl, _ in parts], energies)
    per_group = [tucker2_tails(st, gr, kk, ranks3, intercept, opts.ridge) for st, gr in zip(stats, grams, strict=True)]
    grid = {r3: combine_groups([pg[r3] for pg in per_group], energies) for r3 in ranks3}
    spatial = None
    if blocks and spatial_cap >= 1:
        tails = [spatial_tails(st, b, spatial_cap, intercept, opts.ridge) for st, b in zip(stats, blocks, strict=True)]
        # Calibration keeps whichever k x 1 factor fits better over all the groups: so does the curve.
        spatial = np.minimum(*(combine_groups([t[name] for t in tails], energies) for name in ("weights", "data")))
    mirror = None
    if blocks and mirror_cap >= 1:
        mt = [mirror_tails(st, b, gr, mirror_cap, intercept, opts.ridge) for st, b, gr in zip(stats, blocks, grams, strict=True)]
        # Calibration keeps whichever 1x1 factor (with its core refit) fits better: so does the curve.
        mirror = np.minimum(*(combine_groups([t[name] for t in mt], energies) for name in ("weights", "data")))
    cp_curve: dict[int, float] = {}
    if blocks and cp_ranks and g == 1:
        energy = float(sum(energies))
        cp_curve = {r: v / energy if energy > 0 else 0.0 for r, v in cp_tails(stats[0], blocks[0], cp_ranks, intercept, opts.ridge).items()}
    return LayerCurves(curve, grid, spatial=spatial, mirror=mirror, cp=cp_curve)


def _conv_two_pass(cov: Coverage, values: Values, x_name: str, y_name: str, grams: list[np.ndarray], ranks3: list[int],
                   intercept: bool, per_sample: int, rng: Callable[[], np.random.Generator],
                   opts: DataRankOptions, mirror_cap: int = 0) -> LayerCurves:
    """Im2col wider than `max_width`: pass 1 the input channel moment (S x S per group) at the sampled
    receptive fields; pass 2, at the same positions, the im2col statistics of the data-aware first
    factor's output for the largest grid input rank (capped so R3*k fits the width). The grid at the
    smaller ranks is exact (their first factors are leading rows of the largest); ranks above the cap
    are left out. With a `mirror_cap` >= 1, Tucker-1-in (data-aware 1x1 factor) at every rank up to the
    smaller of it and that largest rank, from the same statistics (nested regressors)."""
    g, s, t, kk = cov.groups, cov.inputs, cov.outputs, cov.taps
    im = cov.im
    assert im is not None
    cap = max(1, opts.max_width // kk)
    kept = [r for r in ranks3 if r <= cap]
    if len(kept) < len(ranks3):  # the widest input rank that fits, in place of the ones left out
        kept.append(min(cap, s - 1))
    kept = sorted(set(kept))
    r_max = kept[-1]
    moments = [MomentStats(s) for _ in range(g)]
    gen = rng()
    spatial: list[tuple[int, ...]] = []
    for (x,) in values([x_name]):
        x = np.asarray(x)
        out_sp = conv_out_spatial(x.shape[2:], im.kernel, im.strides, im.dilations, im.pads, im.auto_pad)
        spatial.append(out_sp)
        p, _, _ = _conv_rows(cov, x, out_sp, gen, per_sample)
        for m, pg in zip(moments, _split(p, g), strict=True):
            # Rows (position, offset) x channel: the moment over the receptive fields' taps, as `channel_moment`.
            m.add(pg.reshape(-1, s, kk).transpose(0, 2, 1).reshape(-1, s))
    firsts = [data_aware_basis(m.zz / kk, gr, r_max, opts.ridge) for m, gr in zip(moments, grams, strict=True)]
    stats = [GramStats(r_max * kk, t) for _ in range(g)]
    gen = rng()
    for i, (x, y) in enumerate(values([x_name, y_name])):
        x, y = np.asarray(x), np.asarray(y)
        if i >= len(spatial) or tuple(y.shape[2:]) != spatial[i]:
            raise RuntimeError(f"{y_name}: output shape {y.shape} is not the {spatial[i:i + 1]} the conv's attributes give")
        p, n_idx, coords = _conv_rows(cov, x, spatial[i], gen, per_sample)
        yr = _pixels(y, n_idx, coords)
        for st, a, pg, yg in zip(stats, firsts, _split(p, g), _split(yr, g), strict=True):
            # One GEMM: rows (position, offset) x channel times A^T, back to columns (rank, offset).
            taps = pg.reshape(-1, s, kk).transpose(0, 2, 1).reshape(-1, s).astype(np.float64)
            z = (taps @ a.T).reshape(-1, kk, r_max).transpose(0, 2, 1).reshape(-1, r_max * kk)
            st.add(z, yg.astype(np.float64))
    parts = [output_space_tail(MomentStats.of_targets(st), intercept) for st in stats]
    energies = [e for _, e in parts]
    curve = combine_groups([tl for tl, _ in parts], energies)
    per_group = [nested_tucker2_tails(st, kk, kept, intercept, opts.ridge) for st in stats]
    grid = {r3: combine_groups([pg[r3] for pg in per_group], energies) for r3 in kept}
    mirror = None
    if mirror_cap >= 1:
        top = min(mirror_cap, r_max)
        mirror = combine_groups([nested_block_tails(st.leading(top * kk), kk, intercept, opts.ridge) for st in stats], energies)
    return LayerCurves(curve, grid, f"im2col {s * kk} wide: two passes, input ranks up to {r_max}", mirror=mirror)


def _candidates(layer: Layer, cov: Coverage, curves: LayerCurves, forced: str | None = None) -> list[RankCandidate]:
    handler = handler_for(layer)
    _, macs0 = handler.cost(layer, "original")
    out = [RankCandidate("original", (), int(macs0 or 0), 0.0)]
    kind = cov.one_rank_kind
    top = cov.outputs if kind == "tucker1" else min(cov.inputs * cov.taps, cov.outputs)
    for r in range(1, top + 1):
        out.append(RankCandidate(kind, (r,), int(handler.cost(layer, kind, (r,))[1] or 0), float(curves.one_rank[r])))
    for r3, errs in curves.grid.items():
        for r4 in range(1, cov.outputs + 1):
            macs = int(handler.cost(layer, "tucker2", (r4, r3))[1] or 0)
            out.append(RankCandidate("tucker2", (r4, r3), macs, float(errs[r4])))
    if curves.spatial is not None:
        for r in range(1, len(curves.spatial)):
            macs = int(handler.cost(layer, "spatial-svd", (r,))[1] or 0)
            out.append(RankCandidate("spatial-svd", (r,), macs, float(curves.spatial[r])))
    if curves.mirror is not None:
        for r in range(1, len(curves.mirror)):
            macs = int(handler.cost(layer, "tucker1-in", (r,))[1] or 0)
            out.append(RankCandidate("tucker1-in", (r,), macs, float(curves.mirror[r])))
    for r, err in curves.cp.items():
        out.append(RankCandidate("cp", (r,), int(handler.cost(layer, "cp", (r,))[1] or 0), float(err)))
    allowed = set(kind_list(forced) or ()) & set(handler.kinds(layer))
    if allowed:  # --kind: those kinds only, where the layer allows one
        only = [c for c in out if c.kind == "original" or c.kind in allowed]
        if len(only) > 1:
            return only
    return out


def rank_caps(cov: Coverage, kind: str, cands: Sequence[RankCandidate]) -> tuple[int, ...]:
    """Each rank's full value for `kind` on this layer (what `_candidates` enumerates up to): Tucker-1 /
    SVD their one rank's top, Tucker-2 (outputs, inputs per group), spatial SVD and Tucker-1-in the
    largest enumerated."""
    if kind == "tucker2":
        return (cov.outputs, cov.inputs)
    if kind == cov.one_rank_kind:
        return (cov.outputs if kind == "tucker1" else min(cov.inputs * cov.taps, cov.outputs),)
    return (max((c.ranks[0] for c in cands if c.kind == kind), default=1),)


def round_candidates(layer: Layer, cov: Coverage, cands: Sequence[RankCandidate], multiple: int) -> list[RankCandidate]:
    """`--round-to N` inside the allocation: every rank rounded up to a multiple of N, capped at its full
    value (`rank_caps`: never above it), the MACs recounted at the rounded ranks. Each rounded point's
    error is the least error among the candidates that round to it: the error at the largest enumerated
    ranks at or below it, so exact where the rounded ranks were enumerated (every Tucker-1 / SVD rank)
    and an upper bound where not (Tucker-2 input ranks between grid points: the error falls with rank).
    The allocation then walks the hull of the rounded points only, and meets its budget as before."""
    if multiple <= 1:
        return list(cands)
    handler = handler_for(layer)
    best: dict[tuple[str, tuple[int, ...]], RankCandidate] = {}
    caps_of: dict[str, tuple[int, ...]] = {}
    for c in cands:
        if c.kind == "original":
            best[(c.kind, c.ranks)] = c
            continue
        if c.kind not in caps_of:
            caps_of[c.kind] = rank_caps(cov, c.kind, cands)
        caps = caps_of[c.kind]
        ranks = tuple(min(math.ceil(r / multiple) * multiple, cap) for r, cap in zip(c.ranks, caps, strict=True))
        key = (c.kind, ranks)
        old = best.get(key)
        if old is None or c.error < old.error:
            macs = old.macs if old is not None else int(handler.cost(layer, c.kind, ranks)[1] or 0)
            best[key] = RankCandidate(c.kind, ranks, macs, c.error)
    return list(best.values())


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
    # Per layer left to the fallback plan (not ruled out by the model itself): why the data path did not take it.
    fallback: Mapping[str, str] = field(default_factory=dict)
    notes: Mapping[str, str] = field(default_factory=dict)  # per covered layer, how its curves were reached when not exactly
    # Per covered layer, its candidates and note: the sensitivity table (`sensitivity.py`), and whether
    # they were computed on the data now (False: read from a table).
    sensitivity: Mapping[str, LayerSensitivity] = field(default_factory=dict)
    walked: bool = True
    # Per decomposed covered layer offered more than one kind: the chosen kind's error and each other
    # kind's least error at no more MACs (`kind_note`).
    kinds: Mapping[str, str] = field(default_factory=dict)
    # `--target params:G` with data:F: the parameter budget of the covered layers and what they spend,
    # the parameters outside them (the fallback plans as applied, biases, BN, ...) and the model's whole
    # float parameter count (what G is a fraction of); None without it.
    params_fraction: float | None = None
    budget_params: int | None = None
    params: int | None = None
    fixed_params: int = 0
    total_params: int | None = None


def _fallback_reason(lay: Layer, p: LayerPlan, cov: Coverage | str) -> str | None:
    """Why the data path leaves the layer to its fallback plan (None: it takes it)."""
    if lay.skip_reason or lay.node_index < 0:
        return lay.skip_reason or "inside a subgraph"
    if p.cause in RULED_OUT:
        return p.reason or str(p.cause)
    if p.macs_before is None:
        return "its MACs are unknown (shapes not inferred; --input-shape fixes them), so the MAC budget cannot count it"
    return cov if isinstance(cov, str) else None


def _fallback_policy(p: LayerPlan, fraction: float) -> str:
    # The planner appends the per-group note itself when it replays the entry.
    head = ";".join(part for part in (p.policy or "vbmf").split(";") if not part.startswith("ranks per group"))
    return f"{head};data:{fraction:g} fallback"


def _walk(original: onnx.ModelProto, covered: Sequence[tuple[Layer, Coverage]], batches: Sequence[Mapping[str, np.ndarray]],
          count: int, read_weight: Callable[[str], np.ndarray], opts: DataRankOptions,
          progress: Callable[[str, int, int], None] | None, notes: dict[str, str]) -> list[list[RankCandidate]]:
    """The one walk over the original: each covered layer's candidates (`notes` gains how its curves
    were reached when not exactly)."""
    candidates: list[list[RankCandidate]] = []
    with ActivationCache(original, batches, "original", opts.memory_bytes) as cache:
        rate = ""
        for step, (lay, cov) in enumerate(covered):
            if progress is not None:  # the bar shows the layer and the speed of the one before
                progress(lay.layer_id + rate, step, len(covered))
            t0 = time.perf_counter()
            # Only Tucker-2 and the layers not refit read the kernel: a wide FC layer's weight is not touched.
            weight = read_weight(lay.weight_name) if lay.weight_name and cov.reads_weight else np.zeros(0)
            bias = read_weight(lay.bias_name) if lay.bias_name and not cov.refit else None
            curves = layer_curves(lay, cov, cache.values, weight, count, opts, bias)
            if curves.note:
                notes[lay.layer_id] = curves.note
            candidates.append(_candidates(lay, cov, curves, opts.kind))
            rate = f" ({count / max(time.perf_counter() - t0, 1e-9):.0f} img/s)"
    if progress is not None and covered:
        progress(covered[-1][0].layer_id, len(covered), len(covered))
    return candidates


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
    cached: Mapping[str, LayerSensitivity] | None = None,
    round_to: int = 1,
    error_weights: Mapping[str, float] | None = None,
    params_fraction: float | None = None,
    total_params: int | None = None,
) -> DataRankSelection:
    """Kinds and ranks for every layer so the model keeps `fraction` of its MACs (see the module
    docstring). `fallback`: the weight-space plan of each layer (same order as `layers`), used for the
    layers the error model does not cover and for the ones it may not touch (skipped, excluded).
    `allocator`: how the candidates are allocated (default `allocate_macs`; see `Allocator`).
    `cached`: a sensitivity table for these layers and data (`sensitivity.read_table`): when it has
    every covered layer, its candidates are used and the original is not walked.
    `round_to`: `--round-to N`, applied inside the allocation (`round_candidates`); the table keeps the
    candidates as measured. `error_weights`: per layer, a factor on its candidates' errors for the
    allocation only (`--loss-aware`: training/lossaware.py); the notes and the table keep the errors as measured.
    `params_fraction` (`--target params:G`): the model's float parameters (`total_params`, every float
    parameter: biases, BN, ... count against it unchanged) are kept within that fraction too, the MACs
    and parameters allocated together (`paramalloc.allocate_macs_and_params`; no `allocator` then)."""
    opts = options or DataRankOptions()
    count = sum(int(next(iter(b.values())).shape[0]) for b in batches)
    total = sum(int(p.macs_before or 0) for p in fallback)
    covered: list[tuple[Layer, Coverage]] = []
    fixed = 0
    fixed_params = 0  # params of the layers outside the error model, as their fallback plan applies them
    covered_params0: list[int] = []  # each covered layer's weight as it is
    entries: dict[str, tuple[str, tuple[int, ...] | None, tuple[int, ...] | None]] = {}
    reasons: dict[str, str] = {}
    causes: dict[str, SkipCause] = {}
    policies: dict[str, str] = {}
    notes: dict[str, str] = {}
    why_fallback: dict[str, str] = {}
    for lay, p in zip(layers, fallback, strict=True):
        cov = _covered(lay)
        why = _fallback_reason(lay, p, cov)
        if why is None:
            assert isinstance(cov, Coverage)
            covered.append((lay, replace(cov, shrink=_too_few_rows(lay, cov, count))))
            covered_params0.append(int(p.params_before or 0))
            continue
        # Layers the user or the model rule out, and the ones the error model does not cover, keep
        # their weight-space plan (decomposed or not), saying why.
        own = lay.skip_reason is not None or p.cause in RULED_OUT  # the plan's own reason says it all
        if not own:
            why_fallback[lay.layer_id] = why
            policies[lay.layer_id] = _fallback_policy(p, fraction)
        if p.decomposed:
            entries[lay.layer_id] = (p.kind, p.ranks, lay.weight_shape)
            if not own:
                notes[lay.layer_id] = f"ranks from the {p.policy.split(';')[0] or 'fallback'} plan, not the data: {why}"
        else:
            entries[lay.layer_id] = ("skip", None, lay.weight_shape)
            reasons[lay.layer_id] = (p.reason or "not decomposed") + ("" if own else f" (not chosen on the data: {why})")
            causes[lay.layer_id] = p.cause or SkipCause.PLAN
        fixed += int(p.macs_after or p.macs_before or 0)
        fixed_params -= int(p.params_before or 0) - int(p.params_after if p.params_after is not None else p.params_before or 0)
    budget = math.floor(fraction * total) - fixed
    budget_params: int | None = None
    if params_fraction is not None:
        if total_params is None:
            raise ValueError("params_fraction needs total_params")
        if allocator is not None:
            raise ValueError("a MAC and parameter budget allocates on its own: no allocator")
        # As the report counts them: the whole model's less what the layers' plans save.
        fixed_params += total_params - sum(covered_params0)
        budget_params = math.floor(params_fraction * total_params) - fixed_params
    candidates: list[list[RankCandidate]] = []
    walked = not (cached is not None and all(lay.layer_id in cached for lay, _ in covered))
    if walked:
        candidates = _walk(original, covered, batches, count, read_weight, opts, progress, notes)
    else:
        assert cached is not None
        for lay, _ in covered:
            candidates.append(list(cached[lay.layer_id].candidates))
            if cached[lay.layer_id].note:
                notes[lay.layer_id] = cached[lay.layer_id].note
    table = {lay.layer_id: LayerSensitivity(tuple(cs), notes.get(lay.layer_id, ""))
             for (lay, _), cs in zip(covered, candidates, strict=True)}
    if round_to > 1:
        candidates = [round_candidates(lay, cov, cs, round_to) for (lay, cov), cs in zip(covered, candidates, strict=True)]
    measured = candidates
    if error_weights:
        candidates = [[replace(c, error=c.error * error_weights.get(lay.layer_id, 1.0)) for c in cs]
                      for (lay, _), cs in zip(covered, candidates, strict=True)]
    both: MacParamAllocation | None = None
    if budget_params is not None:
        def params_of(i: int, c: RankCandidate) -> int:
            if c.kind == "original":
                return covered_params0[i]
            lay = covered[i][0]
            return int(handler_for(lay).cost(lay, c.kind, c.ranks)[0])

        both = allocate_macs_and_params(candidates, max(budget, 0), budget_params, params_of)
        alloc = Allocation(both.choice, both.macs, max(budget, 0), both.met or both.least_params is not None)
    elif allocator is None:
        alloc = allocate_macs(candidates, max(budget, 0))
    else:
        alloc = allocator([lay for lay, _ in covered], candidates, max(budget, 0))
    if error_weights:  # back to the errors as measured
        alloc = replace(alloc, choice=tuple(_as_measured(c, cs) for c, cs in zip(alloc.choice, measured, strict=True)))
        candidates = measured
        for lay, _ in covered:
            w = error_weights.get(lay.layer_id)
            if w is not None:
                notes[lay.layer_id] = "; ".join(x for x in (notes.get(lay.layer_id), f"loss-aware weight {w:.3g}") if x)
    if not alloc.met:
        least = fixed + sum(min(c.macs for c in cs) for cs in candidates)
        raise UsageError(
            f"--ranks data:{fraction:g}: cannot keep the MACs at {fraction:g} of the original ({total}); "
            f"the least this model can reach is {least / max(total, 1):.3f} of it (rank 1 everywhere, and "
            f"{fixed} MACs in layers that are not decomposed or use the fallback plan); use a larger fraction"
        )
    if both is not None and not both.met:
        assert params_fraction is not None and total_params is not None and both.least_params is not None
        least_p = fixed_params + both.least_params
        raise UsageError(
            f"--ranks data:{fraction:g} --target params:{params_fraction:g}: cannot keep the parameters at "
            f"{params_fraction:g} of the original ({total_params}) with the MACs at {fraction:g}; the least found at "
            f"that MAC fraction is {least_p / max(total_params, 1):.3f} of it ({least_p} parameters, {fixed_params} of them "
            "outside the decomposed layers' weights: biases, normalisation, layers not chosen on the data); use a larger G or F"
        )
    chosen: dict[str, RankCandidate] = {}
    kinds: dict[str, str] = {}
    for (lay, _), c, cands in zip(covered, alloc.choice, candidates, strict=True):
        chosen[lay.layer_id] = c
        note = kind_note(c, cands)
        if note:
            kinds[lay.layer_id] = note
        if c.kind == "original":
            entries[lay.layer_id] = ("skip", None, lay.weight_shape)
            causes[lay.layer_id] = SkipCause.BUDGET
            reasons[lay.layer_id] = (
                f"kept by --ranks data:{fraction:g}: decomposing it costs more output error per MAC saved than the "
                "layers that were decomposed" if params_fraction is None else
                f"kept by --ranks data:{fraction:g} --target params:{params_fraction:g}: within both budgets (MACs and "
                "parameters), decomposing it costs more output error per MAC and parameter saved than the layers "
                "that were decomposed")
        else:
            entries[lay.layer_id] = (c.kind, c.ranks, lay.weight_shape)
    policy = f"data:{fraction:g}"
    merged = {k: "; ".join(v for v in (notes.get(k), kinds.get(k)) if v) for k in {*notes, *kinds}}
    planned = PlannedRanks(entries, policy, reasons=reasons, policy=policy, causes=causes, policies=policies,
                           notes={k: v for k, v in merged.items() if entries[k][0] != "skip"})
    return DataRankSelection(planned, chosen, max(budget, 0), alloc.macs, fixed, total, why_fallback, notes,
                             sensitivity=table, walked=walked, kinds=kinds, params_fraction=params_fraction,
                             budget_params=budget_params, params=None if both is None else both.params,
                             fixed_params=fixed_params if both is not None else 0, total_params=total_params)


def _as_measured(choice: RankCandidate, measured: Sequence[RankCandidate]) -> RankCandidate:
    """The measured candidate a weighted choice stands for (same kind and ranks; an allocator may have
    replaced the MACs, e.g. with a time, which it keeps)."""
    for c in measured:
        if c.kind == choice.kind and c.ranks == choice.ranks:
            return replace(choice, error=c.error)
    return choice


def output_channel_axis(cov: Coverage) -> int:
    """The axis of a covered layer's output that holds its channels (the T of its curves)."""
    return {"rows": -1, "columns": -2}.get(cov.mode, 1)


def output_channels(layers: Sequence[Layer]) -> list[tuple[str, str, int]]:
    """(layer id, output tensor, channel axis) of each layer the error model covers: what
    `--loss-aware` weighs (training/lossaware.py)."""
    found = []
    for lay in layers:
        cov = _covered(lay)
        if isinstance(cov, Coverage) and lay.outputs:
            found.append((lay.layer_id, lay.outputs[0], output_channel_axis(cov)))
    return found


def kind_note(chosen: RankCandidate, cands: Sequence[RankCandidate]) -> str:
    """"kind chosen on the data: spatial-svd (8,) error 0.012; at no more MACs tucker2 0.020, tucker1 0.031"
    (relative squared output errors), or "" when the layer is kept or had one kind only."""
    if chosen.kind == "original":
        return ""
    others = []
    for kind in dict.fromkeys(c.kind for c in cands if c.kind not in ("original", chosen.kind)):
        errs = [c.error for c in cands if c.kind == kind and c.macs <= chosen.macs]
        others.append(f"{kind} {min(errs):.3g}" if errs else f"{kind} none")
    if not others:
        return ""
    return (f"kind chosen on the data: {chosen.kind} {chosen.ranks} error {chosen.error:.3g}; "
            f"at no more MACs {', '.join(others)}")
