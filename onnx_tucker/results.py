"""The frozen results the library returns and the report renders."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .calibration.calibrate import CalibrationSummary, LayerCalibration
from .errors import OnnxTuckerError
from .planning.budget import BudgetCheck, BudgetOutcome
from .planning.latency import LatencySummary
from .planning.planner import CompressionPlan
from .runtime.bench import LatencyReport
from .runtime.validate import ValidationReport
from .training.config import FinetuneResult


def ratio(before: float, after: float) -> float:
    """before / after: how many times smaller (or faster); inf when `after` is 0."""
    return before / after if after else float("inf")


@dataclass(frozen=True)
class ModelTotals:
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    size_before: int
    size_after: int

    @property
    def params_ratio(self) -> float:
        return ratio(self.params_before, self.params_after)

    @property
    def macs_ratio(self) -> float:
        return ratio(self.macs_before, self.macs_after)

    @property
    def size_ratio(self) -> float:
        return ratio(self.size_before, self.size_after)


@dataclass(frozen=True)
class CompressionResult:
    plan: CompressionPlan
    # The compressed onnx.ModelProto; over 2 GB (too big for one protobuf) a `graph.irmodel.IRModel`
    # (`.model` the onnx_ir.Model, `.to_proto()`), which `graph.save` writes with external data.
    model: Any = field(repr=False)
    totals: ModelTotals
    validation: ValidationReport | None
    input_path: str | None = None
    output_path: str | None = None
    seconds: float = 0.0
    latency: LatencyReport | None = None  # when measured (`compress(..., bench=BenchConfig())`)
    requested_output: str | None = None  # where the model was to be written (None: not asked to write)
    calibration: CalibrationSummary | None = None  # compress --calibrate: the whole model on held-out data
    finetune: FinetuneResult | None = None  # compress --finetune: the training run (its paths are temporary)
    # compress --calibrate: each refit layer's output error before/after, by layer name (not in the
    # plan: a plan holds only what replays, so `--save-plan` writes no calibration results).
    layer_calibration: Mapping[str, LayerCalibration] = field(default_factory=dict)
    # Outcomes of the plan stage (`planning.stage.PlanResult`; a plan holds only what replays):
    budget: BudgetOutcome | None = None  # --target: what the whole-model allocation chose
    budget_check: BudgetCheck | None = None  # --ranks data:F (or --target macs:F with --calibrate): MACs vs. budget
    layer_timing: LatencySummary | None = None  # --latency-aware: how the layers were timed
    # compress --quantize int8 (issue 18): the INT8 step (`quantize.QuantizeResult`: `model` is then the INT8
    # model) and, with --quantize-compare, the four models side by side (`quantize.FourWayReport`)
    quantize: Any = None
    comparison: Any = None

    @property
    def decomposed_layers(self) -> int:
        return len(self.plan.decomposed)

    def validation_error(self) -> OnnxTuckerError | None:
        """The error to raise when validation failed (the model was then not written), else None."""
        v = self.validation
        if v is None or v.passed:
            return None
        where = self.input_path or "model"
        out = f"{self.requested_output} was not written" if self.requested_output else "nothing was written"
        return OnnxTuckerError(f"{where}: validation failed: {v.problem}; {out} ({v.fix})")
