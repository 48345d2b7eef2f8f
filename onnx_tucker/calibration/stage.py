"""The calibration stages as plain functions over a `SourceModel`.

`data_ranks(source, config)`: under `--ranks data:F` (or `--target macs:F` with `--calibrate`) the
ranks chosen on the calibration data, as a plan to replay (`rankselect`); `calibrate(source, ...)`:
`compress --calibrate`, the factors refit in place on the data (`calibrate`), as a frozen
`CalibrationResult`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from ..config import CompressionConfig, RankPolicy
from ..graph.rewrite import Replacement
from ..graph.source import SourceModel
from ..ops.layer import Layer
from ..planning.planner import CompressionPlan, PlannedRanks, plan_layer
from ..planning.stage import data_fraction
from ..runtime.validate import dynamic_batch
from ..types import EventProgress, StepProgress
from .calibrate import (
    CalibrationOptions,
    CalibrationSummary,
    LayerCalibration,
    batches_of,
    calibrate_from_config,
    calibration_data,
)
from .memory import CalibrationEstimate, plan_calibration
from .rankselect import DataRankOptions, select_ranks_data

if TYPE_CHECKING:
    import onnx

    from ..data import DataSet


def data_ranks(source: SourceModel, config: CompressionConfig, progress: StepProgress | None = None,
               events: EventProgress | None = None) -> PlannedRanks | None:
    """The ranks chosen on `config.calibrate` for the MAC fraction of `--ranks data:F` (the layers the
    error model does not cover keep the EVBMF plan); None when the options ask for no such choice."""
    fraction = data_fraction(config)
    if fraction is None:
        return None
    assert config.calibrate is not None
    fallback_cfg = replace(config, ranks=RankPolicy("vbmf"))
    fallback = [plan_layer(lay, source.read_weight, fallback_cfg) for lay in source.layers]
    source.materialize()  # onnxruntime runs the original: its weights in memory
    used, _ = calibration_data(config.calibrate, source.model, config.calibration_samples, config.seed, config.preprocess)
    memory = config.calibration.calibration_memory_bytes
    opts = DataRankOptions(seed=config.seed, memory_bytes=memory)
    est = _estimate("rank choice", source, list(source.layers), used, memory, opts.max_width)
    batches = batches_of(used, source.model, source.input_shapes, est.batch)  # checks the data first
    if events is not None:
        events("calibration-estimate", {"estimate": est})
    del used
    selection = select_ranks_data(source.model, list(source.layers), fallback, batches, fraction, source.read_weight,
                                  opts, progress)
    return selection.planned


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

    layers, summary = calibrate_from_config(source.model, compressed, replacements, plan, source.input_shapes, config,
                                            progress, read_weight=source.read_weight, batch_size=sized,
                                            memory_bytes=memory, started=started)
    return CalibrationResult(layers, summary)
