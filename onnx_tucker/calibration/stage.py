"""The calibration stages as plain functions over a `SourceModel`.

`data_ranks(source, config)`: under `--ranks data:F` (or `--target macs:F` with `--calibrate`) the
ranks chosen on the calibration data, as a plan to replay (`rankselect`); `data_selection` the same
with what was measured, on the layers' measured time too under `--latency-aware` or `--target
latency:F --calibrate` (`latency_alloc`); `calibrate(source, ...)`:
`compress --calibrate`, the factors refit in place on the data (`calibrate`), as a frozen
`CalibrationResult`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from ..config import CompressionConfig, RankPolicy
from ..errors import UsageError
from ..graph.fold import float_parameter_count
from ..graph.rewrite import Replacement
from ..graph.save import write_text_atomic
from ..graph.source import SourceModel
from ..ops.layer import Layer
from ..planning.budget import BudgetOutcome, Evaluator, agreement_budget_plan
from ..planning.latency import DEFAULT_ROUND_MULTIPLES, TimedAllocation
from ..planning.planner import CompressionPlan, PlannedRanks, plan_layer
from ..planning.stage import agreement_evaluator, data_allocated, data_fraction
from ..runtime.validate import dynamic_batch
from ..types import EventProgress, LayerTimer, StepProgress
from .agreement import CapturingAllocator, data_plan_at
from .calibrate import (
    CalibrationOptions,
    CalibrationSummary,
    LayerCalibration,
    batches_of,
    calibrate_from_config,
    calibration_data,
)
from .latency_alloc import SIMD_MULTIPLE, LatencyAllocator
from .memory import CalibrationEstimate, plan_calibration
from .rankselect import DataRankOptions, DataRankSelection, output_channels, select_ranks_data
from .sensitivity import read_table, table_json, table_key

if TYPE_CHECKING:
    import numpy as np
    import onnx

    from ..data import DataSet
    from ..training.lossaware import ChannelWeights, LossWeights


def data_ranks(source: SourceModel, config: CompressionConfig, progress: StepProgress | None = None,
               events: EventProgress | None = None) -> PlannedRanks | None:
    """The ranks chosen on `config.calibrate` for the MAC fraction of `--ranks data:F` (the layers the
    error model does not cover keep the EVBMF plan); None when the options ask for no such choice."""
    chosen = data_selection(source, config, progress, events=events)
    return None if chosen is None else chosen.planned


@dataclass(frozen=True)
class DataRanks:
    """`data_selection`'s result: the ranks to replay and, when the allocation timed the layers, what
    it measured (`timing`) and, under `--target latency:F`, the target's outcome (`budget`)."""

    planned: PlannedRanks
    timing: TimedAllocation | None = None
    budget: BudgetOutcome | None = None


def data_selection(source: SourceModel, config: CompressionConfig, progress: StepProgress | None = None,
                   timer: LayerTimer | None = None, evaluator: Evaluator | None = None,
                   events: EventProgress | None = None) -> DataRanks | None:
    """The ranks chosen on `config.calibrate`: for the MAC fraction of `--ranks data:F` (or `--target
    macs:F`), on the measured time of each layer too when `timer` is given and `--latency-aware` is on
    (latency_alloc.py); for `--target latency:F`, on the measured time against that time budget; for
    `--target agreement:F`, by the agreement search on calibrated candidates (agreement.py; `evaluator`
    measures a candidate plan instead, as for `api.plan`). None when the options ask for no such choice."""
    if not data_allocated(config):
        return None
    assert config.calibrate is not None
    target = config.target
    by_time = target is not None and target.metric == "latency"
    fraction = data_fraction(config)
    fallback_cfg = replace(config, ranks=RankPolicy("vbmf"), target=None)
    fallback = [plan_layer(lay, source.read_weight, fallback_cfg) for lay in source.layers]
    source.materialize()  # onnxruntime runs the original: its weights in memory
    memory = config.calibration.calibration_memory_bytes
    opts = DataRankOptions(seed=config.seed, memory_bytes=memory, kind=config.kind)
    used, _ = calibration_data(config.calibrate, source.model, config.calibration_samples, config.seed, config.preprocess)
    est = _estimate("rank choice", source, list(source.layers), used, memory, opts.max_width)
    batches = batches_of(used, source.model, source.input_shapes, est.batch)  # checks the data first
    del used
    if events is not None:
        events("calibration-estimate", {"estimate": est})
    table_path = config.calibration.sensitivity
    key = table_key(source.model.SerializeToString(), batches, opts) if table_path else ""
    cached = read_table(table_path, key) if table_path else None

    def keep_table(selection: DataRankSelection) -> None:  # written when computed now, read next time
        if table_path and selection.walked:
            write_text_atomic(table_path, table_json(key, selection.sensitivity))

    weights = loss_aware_weights(source, config, batches) if config.calibration.loss_aware else None
    if events is not None and weights is not None:
        events("loss-weights", {"weights": weights})
    error_weights = None if weights is None else weights.weights
    if target is not None and target.metric == "agreement":
        captured = CapturingAllocator()  # the curves once; the search re-allocates them per fraction
        selection = select_ranks_data(source.model, list(source.layers), fallback, batches, 1.0, source.read_weight,
                                      opts, progress, allocator=captured, cached=cached, round_to=config.round_to,
                                      error_weights=error_weights)
        keep_table(selection)
        del batches
        plan_at, least = data_plan_at(selection, captured, target)
        samples = (0, 0)
        if evaluator is None:
            def refit(model: onnx.ModelProto, replacements: Mapping[int, Replacement], plan: CompressionPlan) -> None:
                calibrate(source, model, replacements, plan, config)

            evaluator, samples = agreement_evaluator(source, config, progress, refit=refit)
        planned, outcome = agreement_budget_plan(list(source.layers), source.read_weight, config, target, evaluator,
                                                 samples, plan_at=plan_at, least=least)
        return DataRanks(planned, budget=replace(outcome, method="data"))
    allocator = None
    if timer is not None and (by_time or config.latency_aware):
        option = f"--ranks {config.ranks}" if config.ranks.method == "data" else f"--target {target}"
        multiples = (config.round_to,) if config.round_to > 1 else DEFAULT_ROUND_MULTIPLES
        allocator = LatencyAllocator(
            list(source.layers), fallback, timer, mode="latency" if by_time else "macs",
            fraction=target.fraction if by_time and target is not None else float(fraction or 1.0), option=option,
            min_speedup=config.min_speedup, multiple=config.round_to if config.round_to > 1 else SIMD_MULTIPLE,
            runtime=config.latency_runtime, round_multiples=multiples,
            measure_original=getattr(getattr(timer, "inner", timer), "measure_original", None), progress=progress)
    elif by_time:
        raise UsageError(f"--target {target} --calibrate: the layers must be timed; give a timer (the api's `timer`)")
    by_params = target is not None and target.metric == "params" and config.ranks.method == "data"
    if by_params and allocator is not None:  # CompressionConfig refuses it too; the api may be given a timer
        raise UsageError(f"--ranks {config.ranks} --target {target} with --latency-aware: not supported")
    selection = select_ranks_data(source.model, list(source.layers), fallback, batches,
                                  1.0 if by_time else float(fraction or 1.0), source.read_weight,
                                  opts, progress, allocator=allocator, cached=cached, round_to=config.round_to,
                                  error_weights=error_weights,
                                  params_fraction=target.fraction if by_params and target is not None else None,
                                  total_params=float_parameter_count(source.model, source.index.folder) if by_params else None)
    keep_table(selection)
    if allocator is None:
        return DataRanks(selection.planned)
    return DataRanks(allocator.annotate(selection.planned), allocator.result, allocator.outcome(str(target)))


def loss_aware_weights(source: SourceModel, config: CompressionConfig,
                       batches: Sequence[Mapping[str, np.ndarray]]) -> LossWeights:
    """`--loss-aware`: each covered layer's weight in the allocation (training/lossaware.py; torch)."""
    from ..training.config import default_torch_threads
    from ..training.lossaware import LayerTensor, loss_weights  # torch: imported only here

    tensors = [LayerTensor(*t) for t in output_channels(list(source.layers))]
    return loss_weights(source.model, tensors, batches, source=source.path or "model", seed=config.seed, method=config.calibration.loss_aware_method,
                        threads=default_torch_threads()[0])


def refit_channel_weights(source: SourceModel, config: CompressionConfig, layers: Sequence[Layer],
                          batches: Sequence[Mapping[str, np.ndarray]]) -> ChannelWeights:
    """`--refit-weights fisher`: the refit layers' per-channel weights (training/lossaware.py; torch)."""
    from ..training.config import default_torch_threads
    from ..training.lossaware import LayerTensor, channel_weights  # torch: imported only here

    tensors = [LayerTensor(*t) for t in output_channels(list(layers))]
    return channel_weights(source.model, tensors, batches, source=source.path or "model", seed=config.seed,
                           threads=default_torch_threads()[0])


def _estimate(what: str, source: SourceModel, layers: list[Layer], used: DataSet, memory: int,
              max_width: int) -> CalibrationEstimate:
    """The walk's batch size and cost (`memory.plan_calibration`); a static batch dim fixes the batch."""
    static = None if dynamic_batch(source.model) else max(1, min(int(s[0]) for s in source.input_shapes.values()))
    data_bytes = sum(int(a.nbytes) for a in used.inputs.values())
    size = "x".join(str(d) for d in next(iter(source.input_shapes.values()), ())[1:]) or "?"
    return plan_calibration(what, layers, source.shapes, used.count, memory, data_bytes, max_width, static, size)


@dataclass(frozen=True)
class CalibrationResult:
    """Each refit layer's `LayerCalibration` by layer name, and the whole model on held-out samples."""

    layers: Mapping[str, LayerCalibration] = field(default_factory=dict)
    summary: CalibrationSummary | None = None


def calibrate(source: SourceModel, compressed: onnx.ModelProto, replacements: Mapping[int, Replacement],
              plan: CompressionPlan, config: CompressionConfig, progress: StepProgress | None = None,
              events: EventProgress | None = None) -> CalibrationResult:
    """`compress --calibrate`: refit the factors of `compressed` (modified in place) on `config.calibrate`."""
    source.materialize()
    memory = config.calibration.calibration_memory_bytes

    def sized(used: DataSet) -> int:
        layers = [replacements[i].layer for i in sorted(replacements)]
        return _estimate("refit", source, layers, used, memory, CalibrationOptions().max_width).batch

    def started(used: DataSet, batch: int) -> None:  # the data passed its checks
        if events is not None:
            layers = [replacements[i].layer for i in sorted(replacements)]
            events("calibration-estimate", {"estimate": _estimate("refit", source, layers, used, memory,
                                                                  CalibrationOptions().max_width)})

    weights = None
    if config.calibration.refit_weights == "fisher":
        def weights(batches: Sequence[Mapping[str, np.ndarray]]) -> ChannelWeights:
            return refit_channel_weights(source, config, [replacements[i].layer for i in sorted(replacements)], batches)

    layers, summary = calibrate_from_config(source.model, compressed, replacements, plan, source.input_shapes, config,
                                            progress, read_weight=source.read_weight, batch_size=sized,
                                            memory_bytes=memory, started=started, channel_weights=weights)
    return CalibrationResult(layers, summary)
