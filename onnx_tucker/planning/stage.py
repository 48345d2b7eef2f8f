"""The plan stage as plain functions: a `SourceModel` in, a frozen result out.

`plan_and_decompose(source, config, ...)` plans every layer and decomposes the ones that gain
(`Decomposition`: the `PlanResult` and each replaced node's factors); `layer_timer` and
`latency_summary` are the per-layer timing of `--latency-aware` / `--target latency:F`;
`agreement_evaluator` measures a candidate plan under `--target agreement:F`. The plan holds only
what replays; what the stage found on the way (the budget search, the MAC check, the timing
bookkeeping) is beside it in the `PlanResult`, and goes on into `CompressionResult`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from ..config import BudgetTarget, CompressionConfig
from ..data import load_for_model
from ..errors import OnnxTuckerError, UsageError
from ..graph.fold import float_parameter_count
from ..graph.protos import opset_version
from ..graph.rewrite import Replacement, rewrite
from ..graph.source import SourceModel
from ..numerics.spectral import LayerSpectra, single_threaded_lapack
from ..ops.layer import Layer, LayerFactors
from ..ops.registry import handler_for
from ..runtime.layertime import OrtLayerTimer, profile_layer_times, profiled_layer_ms
from ..runtime.validate import validate_models
from ..types import StepProgress
from .budget import (
    LATENCY_SEARCH_STEPS,
    BudgetCheck,
    BudgetOutcome,
    Evaluator,
    agreement_budget_plan,
    budget_plan,
    check_mac_budget,
    latency_budget_plan,
)
from .decompose import decompose_layer
from .latency import (
    DEFAULT_ROUND_MULTIPLES,
    CachedLayerTimer,
    LatencySummary,
    LayerTimer,
    measure_plan,
    select_by_latency,
)
from .planner import (
    CompressionPlan,
    LayerPlan,
    PlannedRanks,
    check_plan_covers,
    finish_plan,
    load_plan_file,
    plan_layer,
)


@dataclass(frozen=True)
class PlanResult:
    """What `plan()` returns: the plan (what replays) and what planning found beside it.

    Reads like the plan (`layers`, `config`, `totals()`, `to_json()`, ...), so code written against
    `plan()` returning a `CompressionPlan` keeps working."""

    plan: CompressionPlan
    budget: BudgetOutcome | None = None  # --target: what the whole-model allocation chose (planning/budget.py)
    budget_check: BudgetCheck | None = None  # --ranks data:F (or --target macs:F with --calibrate): MACs vs. budget
    layer_timing: LatencySummary | None = None  # --latency-aware: how the layers were timed (planning/latency.py)

    @property
    def layers(self) -> tuple[LayerPlan, ...]:
        return self.plan.layers

    @property
    def config(self) -> CompressionConfig:
        return self.plan.config

    @property
    def model_params(self) -> int | None:
        return self.plan.model_params

    @property
    def decomposed(self) -> tuple[LayerPlan, ...]:
        return self.plan.decomposed

    def totals(self) -> dict[str, int]:
        return self.plan.totals()

    def to_dict(self) -> dict[str, object]:
        return self.plan.to_dict()

    def to_json(self) -> str:
        return self.plan.to_json()

    def save(self, path: str) -> None:
        self.plan.save(path)


@dataclass(frozen=True)
class Decomposition:
    """`plan_and_decompose`'s result: the plan stage's result and, per replaced node index, its factors."""

    planned: PlanResult
    replacements: Mapping[int, Replacement] = field(repr=False)

    @property
    def plan(self) -> CompressionPlan:
        return self.planned.plan


def data_fraction(config: CompressionConfig) -> float | None:
    """The MAC fraction to allocate on the calibration data: `--ranks data:F`, or `--target macs:F` with
    `--calibrate` (with --latency-aware too: then on the measured time as well); else None."""
    if config.ranks.method == "data":
        return config.ranks.value
    t = config.target
    if t is not None and t.metric == "macs" and config.calibrate:
        return t.fraction
    return None


def data_allocated(config: CompressionConfig) -> bool:
    """Whether the ranks are allocated on the calibration data (calibration/stage.py `data_selection`):
    a MAC fraction (`data_fraction`), `--target latency:F --calibrate` (on measured time too), or
    `--target agreement:F --calibrate` (searched on calibrated candidates)."""
    t = config.target
    searched = t is not None and t.metric in ("latency", "agreement") and bool(config.calibrate) and not config.plan_file
    return data_fraction(config) is not None or searched


def plan_and_decompose(
    source: SourceModel, config: CompressionConfig, progress: StepProgress | None = None,
    timer: LayerTimer | None = None, evaluator: Evaluator | None = None, planned: PlannedRanks | None = None,
) -> Decomposition:
    """Plan every layer and decompose the ones that gain, one layer at a time (or `config.jobs` at once).

    Each layer is planned and decomposed in one go: its weight is read once, the Gram matrices and
    their eigendecompositions computed for EVBMF are reused for the factors (`LayerSpectra`), and all
    of it is dropped before the next layer, so at most `jobs` weights are in memory beside the model.
    Layers run in threads (numpy/LAPACK release the GIL); the results are assembled in graph order and
    are identical to a serial run. Layers whose weight feeds other nodes are decomposed afterwards,
    once the whole plan has decided whether they can share one factorisation. `timer` (with
    `config.latency_aware`): each planned decomposition is timed against the original layer and kept
    only where it pays (`planning.latency.select_by_latency`); layers then run one at a time, so that
    no decomposition runs beside a timing. `planned`: ranks to replay (by default the plan file's, if any;
    `calibration.stage.data_ranks` gives the `--ranks data:F` ones). The plan's `model_params` count
    every float parameter of the model (what `compress` reports).
    """
    if planned is None and config.plan_file:
        planned = load_plan_file(config.plan_file)
    layers = list(source.layers)
    check_plan_covers(layers, planned)
    read_weight = source.read_weight
    budget = None
    if config.target is not None and not data_allocated(config):  # replayed like a plan file's ranks
        with single_threaded_lapack():
            planned, budget = _budget_plan(source, config, config.target, timer, evaluator, progress)

    def work(layer: Layer) -> tuple[LayerPlan, LayerFactors | None]:
        weights: dict[str, np.ndarray] = {}

        def read_once(name: str) -> np.ndarray:
            if name not in weights:
                weights[name] = read_weight(name)
            return weights[name]

        spectra = LayerSpectra()
        lp = plan_layer(layer, read_once, config, planned, spectra)
        if timer is not None and config.plan_file:
            lp = measure_plan(layer, lp, timer)  # --plan replays exactly: time it, never re-select
        elif timer is not None:
            lp = select_by_latency(layer, lp, timer, config.min_speedup, _round_multiples(config))
        factors = None
        if lp.decomposed and not layer.shared_weight:
            factors = decompose_layer(layer, lp, read_once(layer.weight_name or ""), config.hooi_iters, spectra)
        return lp, factors

    total = len(layers)
    results: list[tuple[LayerPlan, LayerFactors | None]] = []
    if progress is not None and total:
        progress(layers[0].layer_id, 0, total)
    with single_threaded_lapack():  # the same thread counts for every --jobs: identical results
        if config.jobs > 1 and total > 1 and timer is None:
            with ThreadPoolExecutor(max_workers=config.jobs, thread_name_prefix="onnx-tucker") as pool:
                for i, res in enumerate(pool.map(work, layers)):
                    results.append(res)
                    if progress is not None:
                        progress(layers[min(i + 1, total - 1)].layer_id, i + 1, total)
        else:
            for i, layer in enumerate(layers):
                results.append(work(layer))
                if progress is not None:
                    progress(layers[min(i + 1, total - 1)].layer_id, i + 1, total)

    plan = finish_plan(layers, [lp for lp, _ in results], config)
    fraction = data_fraction(config) if planned is not None and not config.plan_file else None
    budget_check = None
    if fraction is not None:  # allocated for a MAC budget: does the plan, as applied, still meet it?
        option = f"--ranks {config.ranks}" if config.ranks.method == "data" else f"--target {config.target}"
        t = config.target
        if t is not None and t.metric == "params" and config.ranks.method == "data":  # both budgets
            budget_check = check_mac_budget(f"{option} --target {t}", fraction, plan.layers, t.fraction,
                                            float_parameter_count(source.model, source.index.folder))
        else:
            budget_check = check_mac_budget(option, fraction, plan.layers)
    replacements: dict[int, Replacement] = {}
    shared: dict[tuple[object, ...], LayerFactors] = {}
    new_plans: list[LayerPlan] = []
    for layer, lp, (_, factors) in zip(layers, plan.layers, results, strict=True):
        if not lp.decomposed:
            new_plans.append(lp)
            continue
        if factors is None:
            # Layers sharing a weight (and the way it is factorised) share one decomposition.
            key = (layer.weight_name or "", lp.kind, lp.ranks or (), handler_for(layer).factorisation_key(layer))
            factors = shared.get(key)
            if factors is None:
                factors = decompose_layer(layer, lp, read_weight(layer.weight_name or ""), config.hooi_iters)
                shared[key] = factors
        replacements[layer.node_index] = Replacement(layer, factors)
        new_plans.append(replace(lp, rel_error=factors.rel_error))
    # Parameters as `compress` counts them (every float parameter), so inspect and compress agree.
    plan = replace(plan, layers=tuple(new_plans), model_params=float_parameter_count(source.model, source.index.folder))
    return Decomposition(PlanResult(plan, budget, budget_check), replacements)


def _budget_plan(
    source: SourceModel, config: CompressionConfig, target: BudgetTarget, timer: LayerTimer | None,
    evaluator: Evaluator | None = None, progress: StepProgress | None = None,
) -> tuple[PlannedRanks, BudgetOutcome]:
    """Ranks for the whole model meeting `target` (planning/budget.py), as a plan to replay."""
    layers, read_weight = list(source.layers), source.read_weight
    if target.metric == "agreement":
        samples = (0, 0)
        if evaluator is None:
            evaluator, samples = agreement_evaluator(source, config, progress)
        return agreement_budget_plan(layers, read_weight, config, target, evaluator, samples)
    if target.metric == "latency":
        assert timer is not None
        inner = getattr(timer, "inner", timer)
        measure_original = getattr(inner, "measure_original", None)
        return latency_budget_plan(layers, read_weight, config, target, timer, measure_original)
    # params: every float parameter of the model counts (biases, BN, ...); macs: the layers' MACs.
    total = float_parameter_count(source.model, source.index.folder) if target.metric == "params" else None
    return budget_plan(layers, read_weight, config, target, total, timer)


# Refits a candidate's compressed model (an onnx.ModelProto) in place before it is measured (--calibrate):
# the model, its replacements and its plan (calibration/agreement.py gives it; planning does not import
# calibration).
Refit = Callable[[Any, Mapping[int, Replacement], CompressionPlan], None]


def agreement_evaluator(source: SourceModel, config: CompressionConfig,
                        progress: StepProgress | None = None, refit: Refit | None = None) -> tuple[Evaluator, tuple[int, int]]:
    """Top-1 agreement of a candidate plan's model with the original on one half of `config.data`
    (split at random with `config.seed`: folders sorted by class would give class-disjoint halves),
    and the (search, held-out) sample counts. `progress("agreement search", evaluations done, at most)`
    after each model evaluation. `refit`: applied to each candidate model before it is measured."""
    assert config.data is not None
    data = load_for_model(config.data, source.model, config.samples)
    if data.count < 2:
        raise UsageError(f"--data {config.data}: {data.count} sample(s); --target agreement:F needs at least 2 (half held out)")
    search, held_out = data.split(config.seed, data.count // 2)
    halves = {"search": search, "held-out": held_out}
    plain = replace(config, target=None, plan_file=None, latency_aware=False, validate=False)
    source.materialize()  # onnxruntime runs the original from memory below
    most, done = LATENCY_SEARCH_STEPS + 2, [0]  # the bisection's bound (planning/budget.py)
    if progress is not None:
        progress("agreement search", 0, most)

    def evaluate(planned: PlannedRanks, which: str) -> float:
        d = plan_and_decompose(source, plain, planned=planned)
        model = rewrite(source.model, d.replacements, source.base_dir, source.index).to_proto()
        source.materialize(model)
        if refit is not None:
            refit(model, d.replacements, d.plan)
        v = validate_models(source.runnable, model, source.input_shapes, data=halves[which], reference=source.model)
        top1 = v.outputs[0].top1_agreement if v.outputs else None
        if v.nonfinite:
            raise OnnxTuckerError(f"--target agreement: {v.nonfinite[0].nonfinite_text} on --data {config.data}; "
                                  "fix the model's weights or the data (agreement of NaN scores means nothing)")
        if top1 is None:
            raise UsageError(f"--target agreement: the model's first output {v.outputs[0].name!r} is not class scores "
                             "(samples x classes); agreement needs a classifier")
        done[0] += 1
        if progress is not None:
            progress("agreement search", min(done[0], most), most)
        return top1

    return evaluate, (search.count, held_out.count)


def _round_multiples(config: CompressionConfig) -> tuple[int, ...]:
    """The rank multiples latency-aware selection tries: --round-to when given, else 8 and 16."""
    return (config.round_to,) if config.round_to > 1 else DEFAULT_ROUND_MULTIPLES


def times_layers(config: CompressionConfig) -> bool:
    """Whether the options time layers: --latency-aware, or --target latency:F."""
    return config.latency_aware or (config.target is not None and config.target.metric == "latency")


def layer_timer(source: SourceModel, config: CompressionConfig, timer: LayerTimer | None = None) -> CachedLayerTimer | None:
    """The cached per-layer timer latency-aware selection uses (onnxruntime unless one is given); None
    when the options time nothing."""
    if not times_layers(config):
        return None
    inner = timer if timer is not None else OrtLayerTimer(opset_version(source.model), config.threads, seed=config.seed)
    return CachedLayerTimer(inner)


def latency_summary(source: SourceModel, config: CompressionConfig, timer: CachedLayerTimer,
                    profile_runs: int) -> LatencySummary:
    """The timer's bookkeeping and, in onnxruntime, the sum of every layer's isolated original time
    against the kernels of a whole-model profile of the original (`profile_runs` runs; 0: none)."""
    summary = LatencySummary(config.threads, config.min_speedup, timer.measured, timer.lookups,
                             timed_only=bool(config.plan_file), runtime=config.latency_runtime)
    inner = timer.inner
    # The whole-model profile is onnxruntime's own (NCHWc layout included): it checks "ort" timings only.
    if not isinstance(inner, OrtLayerTimer) or getattr(inner, "runtime", "ort") != "ort" or profile_runs < 1:
        return summary
    times = [inner.measure_original(lay) for lay in source.layers if lay.weight_shape is not None and lay.node_index >= 0]
    isolated = [t for t in times if t is not None]
    profile = profile_layer_times(source.runnable, source.model, source.input_shapes, config.threads, profile_runs,
                                  config.seed)
    profiled, layout = profiled_layer_ms(profile)
    return replace(summary, isolated_ms=float(sum(isolated)), profiled_ms=profiled, layout_ms=layout,
                   profile_runs=profile_runs, layers_summed=len(isolated))

