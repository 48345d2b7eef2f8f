"""The mobile stage as one plain function: a loaded pair in, a frozen `MobileReport` out (issue 10).

`mobile_measure` converts, runs and times both models in each mobile runtime and compares every
output with the original in onnxruntime; the caller (`api.mobile_report`) gives the plan and writes
the report files.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from ..config import BenchConfig, CompressionConfig
from ..graph.fold import float_parameter_count
from ..graph.protos import size_on_disk
from ..graph.qdq import float_view, has_qdq
from ..graph.source import ModelPair
from ..planning.planner import CompressionPlan
from ..results import ModelTotals
from ..types import StepProgress
from .build import run_runtimes
from .inputs import mobile_inputs, model_macs
from .results import MobileReport


def mobile_measure(
    original: str, compressed: str, pair: ModelPair, config: CompressionConfig, bench: BenchConfig,
    names: Sequence[str], plan_of: Callable[[], tuple[CompressionPlan, str]], timeout: float, rtol: float,
    progress: StepProgress | None = None,
) -> MobileReport:
    """Each runtime of `names` on both files (`pair`: the two models loaded, and the input shapes);
    `plan_of()`: the per-layer plan to show and where it came from (asked once the inputs are read)."""
    orig, comp, shapes = pair.original, pair.compressed, pair.input_shapes
    inputs, batch_size = mobile_inputs(orig, shapes, config)
    layers, plan_source = plan_of()
    comp_nodes = {(n.name, n.op_type) for n in comp.graph.node}
    mismatch = tuple(p.name for p in layers.layers if p.decomposed and (p.name, p.op_type) in comp_nodes)
    plan_totals = layers.totals()
    counted = float_view(comp, saturate=False) if has_qdq(comp) else comp  # an INT8 (QDQ) model: its weights and layers counted
    totals = ModelTotals(
        params_before=float_parameter_count(orig), params_after=float_parameter_count(counted),
        macs_before=plan_totals["macs_before"], macs_after=model_macs(counted, shapes),
        size_before=size_on_disk(original, orig), size_after=size_on_disk(compressed, comp),
    )
    results = run_runtimes(names, original, compressed, inputs, batch_size, tuple(o.name for o in orig.graph.output),
                           shapes, bench.threads, bench.warmup, bench.runs, timeout, progress)
    return MobileReport(
        original_path=original, compressed_path=compressed, input_shapes=shapes,
        source="random" if (config.data or config.calibrate) is None else str(config.data or config.calibrate),
        samples=inputs.count,
        seed=config.seed, threads=bench.threads, totals=totals, plan=layers, plan_source=plan_source,
        plan_mismatch=mismatch, runtimes=results, rtol=rtol, labels=inputs.labels is not None,
    )
