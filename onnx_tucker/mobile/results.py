"""The frozen results of a mobile validation report; the report package renders them."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # annotations only: the child process imports this package and must start fast
    from ..planning.planner import CompressionPlan
    from ..results import ModelTotals
    from ..runtime.validate import OutputComparison


def _pct(xs: tuple[float, ...], q: float) -> float:
    return float(np.percentile(xs, q)) if xs else float("nan")


@dataclass(frozen=True)
class Timing:
    """Latency of both models in one runtime: `warmup` untimed runs, then `runs` of each, interleaved."""

    threads: int
    warmup: int
    runs: int
    original_ms: tuple[float, ...]
    compressed_ms: tuple[float, ...]

    @property
    def original_median(self) -> float:
        return _pct(self.original_ms, 50)

    @property
    def compressed_median(self) -> float:
        return _pct(self.compressed_ms, 50)

    @property
    def original_p10(self) -> float:
        return _pct(self.original_ms, 10)

    @property
    def original_p90(self) -> float:
        return _pct(self.original_ms, 90)

    @property
    def compressed_p10(self) -> float:
        return _pct(self.compressed_ms, 10)

    @property
    def compressed_p90(self) -> float:
        return _pct(self.compressed_ms, 90)

    @property
    def speedup(self) -> float:
        """original / compressed median: > 1 when the compressed model is faster."""
        c = self.compressed_median
        return self.original_median / c if c > 0 else float("inf")


@dataclass(frozen=True)
class ModelRun:
    """One model (original or compressed) in one runtime.

    `failure`: what went wrong, as the runtime said it (converter message, "crashed (signal 11,
    SIGSEGV)", "timed out after 60 s"), None when it converted and ran. `failed_step`: convert, run.
    `outputs`: each output against the ORIGINAL model in onnxruntime CPU; `fidelity`: against the
    same model in onnxruntime CPU (does the runtime compute this model correctly?)."""

    converted: bool
    ran: bool
    failure: str | None = None
    failed_step: str | None = None
    size_bytes: int | None = None
    convert_seconds: float | None = None
    outputs: tuple[OutputComparison, ...] = ()
    fidelity: tuple[OutputComparison, ...] = ()
    accuracy: float | None = None  # top-1 against the labels of --data

    @property
    def max_rel_error(self) -> float | None:
        return max((o.max_rel_error for o in self.outputs), default=None) if self.outputs else None

    @property
    def fidelity_rel_error(self) -> float | None:
        return max((o.max_rel_error for o in self.fidelity), default=None) if self.fidelity else None

    @property
    def top1_agreement(self) -> float | None:
        return self.outputs[0].top1_agreement if self.outputs else None

    @property
    def top5_agreement(self) -> float | None:
        return self.outputs[0].top5_agreement if self.outputs else None

    @property
    def cosine(self) -> float | None:
        return min((o.cosine for o in self.outputs), default=None) if self.outputs else None


@dataclass(frozen=True)
class PartitionInfo:
    """What an ORT mobile execution provider (NNAPI, CoreML) would take of a model, from
    onnxruntime's usability checker. `fixed_shapes`: analysed as if the dynamic dims were fixed."""

    ep: str
    fixed_shapes: bool
    nodes: int
    supported_nodes: int
    partitions: int
    unsupported_ops: tuple[str, ...]
    suitability: str  # YES / MAYBE / NO, the checker's verdict

    @property
    def coverage(self) -> float:
        return self.supported_nodes / self.nodes if self.nodes else 0.0


@dataclass(frozen=True)
class Regression:
    """One way the compressed model is less mobile-friendly than the original."""

    what: str  # "coverage", "partitions", "suitability", "ops"
    where: str  # EP name, or "reduced build"
    before: str
    after: str


@dataclass(frozen=True)
class OrtMobileAnalysis:
    """ORT mobile readiness of both models: partitions per EP (as is and with fixed shapes), the
    operators each needs in a reduced build, the ones the compressed model adds."""

    original: tuple[PartitionInfo, ...]
    compressed: tuple[PartitionInfo, ...]
    original_ops: tuple[str, ...]
    compressed_ops: tuple[str, ...]
    failure: str | None = None

    @property
    def added_ops(self) -> tuple[str, ...]:
        return tuple(sorted(set(self.compressed_ops) - set(self.original_ops)))

    @property
    def fused_in_original(self) -> dict[str, str]:
        """Added operators the original has only fused with its activation (Conv there as
        com.microsoft:FusedConv): still a kernel of their own in a reduced build, but not a new kind of layer."""
        return {op: f for op in self.added_ops for f in self.original_ops if f.split(":")[-1] == f"Fused{op}"}

    @property
    def regressions(self) -> tuple[Regression, ...]:
        found: list[Regression] = []
        rank = {"NO": 0, "MAYBE": 1, "YES": 2}
        before = {(p.ep, p.fixed_shapes): p for p in self.original}
        for a in self.compressed:
            b = before.get((a.ep, a.fixed_shapes))
            if b is None:
                continue
            where = f"{a.ep}{' (fixed shapes)' if a.fixed_shapes else ''}"
            if a.coverage < b.coverage - 1e-9:
                found.append(Regression("coverage", where, f"{b.supported_nodes}/{b.nodes}", f"{a.supported_nodes}/{a.nodes}"))
            if a.partitions > b.partitions:
                found.append(Regression("partitions", where, str(b.partitions), str(a.partitions)))
            if rank.get(a.suitability, 0) < rank.get(b.suitability, 0):
                found.append(Regression("suitability", where, b.suitability, a.suitability))
        if self.added_ops:
            found.append(Regression("ops", "reduced build", ", ".join(self.original_ops), ", ".join(self.added_ops)))
        return tuple(found)


@dataclass(frozen=True)
class RuntimeResult:
    """One runtime: `status` is "ok" (both models converted and ran), "failed" (see the ModelRuns),
    or "not installed" (`install` is the pip command)."""

    name: str
    label: str
    status: str
    file_format: str = ""
    version: str | None = None
    install: str | None = None
    original: ModelRun | None = None
    compressed: ModelRun | None = None
    timing: Timing | None = None
    timing_failure: str | None = None
    ort_mobile: OrtMobileAnalysis | None = None

    @property
    def installed(self) -> bool:
        return self.status != "not installed"

    @property
    def fails_on_original_too(self) -> bool | None:
        """For a runtime that fails on the compressed model: does it fail on the original as well?"""
        if self.compressed is None or self.compressed.failure is None or self.original is None:
            return None
        return self.original.failure is not None

    def passed(self, rtol: float) -> bool:
        """Both models converted and ran, and the runtime computes the compressed model as
        onnxruntime does (max relative error <= rtol). Timing failures do not count."""
        c = self.compressed
        if self.status != "ok" or c is None or not c.ran:
            return False
        err = c.fidelity_rel_error
        return err is None or err <= rtol


@dataclass(frozen=True)
class MobileReport:
    original_path: str
    compressed_path: str
    input_shapes: Mapping[str, tuple[int, ...]]
    source: str  # "random" or the --data path
    samples: int
    seed: int
    threads: int
    totals: ModelTotals
    plan: CompressionPlan
    plan_source: str  # "plan file <path>" or "re-planned"
    plan_mismatch: tuple[str, ...]  # layers the plan decomposes that the compressed model still has as they were
    runtimes: tuple[RuntimeResult, ...]
    rtol: float
    labels: bool = False

    def runtime(self, name: str) -> RuntimeResult | None:
        return next((r for r in self.runtimes if r.name == name), None)

    @property
    def failed_runtimes(self) -> tuple[str, ...]:
        """Listed runtimes that did not pass (not installed ones included): what --strict checks."""
        return tuple(r.name for r in self.runtimes if not r.passed(self.rtol))


@dataclass(frozen=True)
class RuntimeCell:
    """One model of a many-model comparison (the four-way INT8 table) in one runtime: converted size,
    median / p90 latency, top-1 agreement with the reference model in onnxruntime CPU; `failure` (and
    `failed_step`: convert, run, time) as the runtime said it, None when it converted, ran and was timed."""

    model: str
    size_bytes: int | None = None
    latency_ms: float | None = None
    latency_p90_ms: float | None = None
    top1_agreement: float | None = None
    failure: str | None = None
    failed_step: str | None = None  # convert, quantize, run, time
    # Set when the runtime's own quantizer made this INT8 model from the FP32 one (not the QDQ file):
    # what it was, in words ("mnnquant, KL activations, MAX_ABS weights, 64 calibration samples").
    quantizer: str | None = None
    sqnr_db: float | None = None  # first output against the reference model in onnxruntime CPU
    accuracy: float | None = None  # top-1 against the labels, when the data has them


@dataclass(frozen=True)
class RuntimeColumn:
    """One runtime across the models of a comparison; `status`: ok, failed (some cell says why), not installed."""

    name: str
    label: str
    status: str
    cells: tuple[RuntimeCell, ...] = ()
    version: str | None = None
    install: str | None = None
    threads: int = 1
    warmup: int = 0
    runs: int = 0
    samples: int = 0  # the samples every model ran on there (agreement, SQNR, accuracy)

    def cell(self, model: str) -> RuntimeCell | None:
        return next((c for c in self.cells if c.model == model), None)
