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
from ..planning.planner import CompressionPlan, PlannedRanks, plan_layer
from ..planning.stage import data_fraction
from ..types import StepProgress
from .calibrate import CalibrationSummary, LayerCalibration, calibrate_from_config, calibration_batches
from .rankselect import DataRankOptions, select_ranks_data

if TYPE_CHECKING:
    import onnx


def data_ranks(source: SourceModel, config: CompressionConfig, progress: StepProgress | None = None) -> PlannedRanks | None:
    """The ranks chosen on `config.calibrate` for the MAC fraction of `--ranks data:F` (the layers the
    error model does not cover keep the EVBMF plan); None when the options ask for no such choice."""
    fraction = data_fraction(config)
    if fraction is None:
        return None
    assert config.calibrate is not None
    fallback_cfg = replace(config, ranks=RankPolicy("vbmf"))
    fallback = [plan_layer(lay, source.read_weight, fallback_cfg) for lay in source.layers]
    source.materialize()  # onnxruntime runs the original: its weights in memory
    batches = calibration_batches(config.calibrate, source.model, source.input_shapes, config.calibration_samples,
                                  seed=config.seed, preprocess=config.preprocess)
    selection = select_ranks_data(source.model, list(source.layers), fallback, batches, fraction, source.read_weight,
                                  DataRankOptions(seed=config.seed), progress)
    return selection.planned


@dataclass(frozen=True)
class CalibrationResult:
    """Each refit layer's `LayerCalibration` by layer name, and the whole model on held-out samples."""

    layers: Mapping[str, LayerCalibration] = field(default_factory=dict)
    summary: CalibrationSummary | None = None


def calibrate(source: SourceModel, compressed: onnx.ModelProto, replacements: Mapping[int, Replacement],
              plan: CompressionPlan, config: CompressionConfig, progress: StepProgress | None = None) -> CalibrationResult:
    """`compress --calibrate`: refit the factors of `compressed` (modified in place) on `config.calibrate`."""
    source.materialize()
    layers, summary = calibrate_from_config(source.model, compressed, replacements, plan, source.input_shapes, config,
                                            progress, read_weight=source.read_weight)
    return CalibrationResult(layers, summary)
