"""The JSON report: one dict per result, built from the frozen results only."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from typing import Any

from ..calibration.calibrate import CalibrationSummary, LayerCalibration
from ..planning.budget import BudgetCheck, BudgetOutcome
from ..planning.latency import LatencySummary
from ..planning.planner import CompressionPlan, LayerPlan
from ..planning.stage import PlanResult
from ..results import CompressionResult, ratio
from ..runtime.bench import LatencyReport
from ..runtime.validate import ValidationReport


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def layer_dict(p: LayerPlan, calibration: LayerCalibration | None = None) -> dict[str, Any]:
    """One layer of the JSON report: its plan, and its refit when `compress --calibrate` ran."""
    return {
        "name": p.name,
        "op_type": p.op_type,
        "kind": p.kind,
        "weight_shape": list(p.weight_shape) if p.weight_shape else None,
        "evbmf_ranks": list(p.evbmf_ranks) if p.evbmf_ranks else None,
        "ranks": list(p.ranks) if p.ranks and p.decomposed else None,
        "sigma2": list(p.sigma2) if p.sigma2 else None,
        "params_before": p.params_before,
        "params_after": p.params_after,
        "macs_before": p.macs_before,
        "macs_after": p.macs_after,
        "rel_error": p.rel_error,
        "policy": p.policy,
        "reason": p.reason,
        "cause": None if p.cause is None else p.cause.value,
        "calibration": None if calibration is None else dict(calibration.__dict__),
        "time_before_ms": p.time_before_ms,
        "time_after_ms": p.time_after_ms,
        "time_speedup": p.time_speedup,
    }


def target_dict(b: BudgetOutcome | None) -> dict[str, Any] | None:
    """--target: what the whole-model allocation chose."""
    return None if b is None else dict(b.__dict__) | {"achieved": b.achieved}


def mac_budget_dict(b: BudgetCheck | None) -> dict[str, Any] | None:
    """--ranks data:F: the MAC budget the ranks were allocated for, and whether the plan as applied meets it."""
    if b is None:
        return None
    out = dict(b.__dict__) | {"achieved": b.achieved, "met": b.met, "over": b.over, "cause": b.cause}
    if b.params_budget is None:  # without --target params:G the keys are as before
        return {k: v for k, v in out.items() if not k.startswith("params_")}
    return out | {"params_achieved": b.params_achieved, "params_over": b.params_over}


def layer_timing_dict(s: LatencySummary | None) -> dict[str, Any] | None:
    """--latency-aware: how the layers were timed and how their sum compares with a whole-model profile."""
    if s is None:
        return None
    out = dict(s.__dict__) | {"profile_ratio": s.profile_ratio}
    if s.allocation is not None:
        out["allocation"] = asdict(s.allocation) | {"speedup": s.allocation.speedup}
    return out


def validation_dict(v: ValidationReport | None) -> dict[str, Any] | None:
    if v is None:
        return None
    return {
        "status": v.status,
        "passed": v.passed,
        "rtol": v.rtol,
        "passing_rtol": v.passing_rtol,
        "problem": v.problem,  # why it failed (non-finite outputs first), None when it passed
        "samples": v.samples,
        "seed": v.seed,
        "source": v.source,
        "agreement_note": v.agreement_note,  # set on random inputs: their class agreement is not accuracy
        "accuracy_before": v.accuracy_before,
        "accuracy_after": v.accuracy_after,
        "input_shapes": {k: list(s) for k, s in v.input_shapes.items()},
        "outputs": [o.__dict__ | {"shape": list(o.shape)} for o in v.outputs],
    }


def latency_dict(r: LatencyReport | None) -> dict[str, Any] | None:
    if r is None:
        return None
    return {
        "threads": r.threads,
        "warmup": r.warmup,
        "runs": r.runs,
        "input_shapes": {k: list(v) for k, v in r.input_shapes.items()},
        "original_median_ms": r.original_median,
        "original_p90_ms": r.original_p90,
        "compressed_median_ms": r.compressed_median,
        "compressed_p90_ms": r.compressed_p90,
        "speedup": r.speedup,
    }


def calibration_dict(c: CalibrationSummary | None) -> dict[str, Any] | None:
    """compress --calibrate: the summary, with `blocks` (--refine) one dict per block."""
    if c is None:
        return None
    out = dict(c.__dict__)
    out["blocks"] = [dict(b.__dict__) for b in c.blocks]
    w = c.channel_weights
    out["channel_weights"] = None if w is None else {
        "method": "fisher", "loss": w.loss, "images": w.images, "draws": w.draws, "seconds": w.seconds,
        "floor": w.floor, "layers": len(w.weights), "missing": dict(w.missing)}
    return out


def result_dict(result: CompressionResult | PlanResult | CompressionPlan, latency: LatencyReport | None = None) -> dict[str, Any]:
    """The JSON report: top-level keys `layers`, `totals`, `validation`, `latency` (and `config`, `model`)."""
    if isinstance(result, CompressionPlan):
        result = PlanResult(result)
    if isinstance(result, PlanResult):
        totals: dict[str, Any] = result.totals()
        totals |= {"params_ratio": ratio(totals["params_before"], totals["params_after"]),
                   "macs_ratio": ratio(totals["macs_before"], totals["macs_after"])}
        return _clean({"layers": [layer_dict(p) for p in result.layers], "totals": totals, "validation": None,
                       "target": target_dict(result.budget), "mac_budget": mac_budget_dict(result.budget_check),
                       "layer_timing": layer_timing_dict(result.layer_timing),
                       "config": result.config.to_dict()})
    t = result.totals
    totals = dict(t.__dict__) | {"params_ratio": t.params_ratio, "macs_ratio": t.macs_ratio, "size_ratio": t.size_ratio}
    return _clean(
        {
            "layers": [layer_dict(p, result.layer_calibration.get(p.name)) for p in result.plan.layers],
            "totals": totals,
            "validation": validation_dict(result.validation),
            "latency": latency_dict(latency if latency is not None else result.latency),
            "calibration": calibration_dict(result.calibration),
            "finetune": None if result.finetune is None else result.finetune.to_dict(),
            "target": target_dict(result.budget),
            "mac_budget": mac_budget_dict(result.budget_check),
            "layer_timing": layer_timing_dict(result.layer_timing),
            "config": result.plan.config.to_dict(),
            **_quantize_keys(result),
            "model": {
                "input": result.input_path,
                "output": result.output_path,
                "decomposed_layers": result.decomposed_layers,
                "seconds": result.seconds,
            },
        }
    )


def _quantize_keys(result: CompressionResult) -> dict[str, Any]:
    """`quantize` and `comparison` (compress --quantize int8 [--quantize-compare]; report/quantize.py), else null."""
    if result.quantize is None:
        return {"quantize": None, "comparison": None}
    from .quantize import four_way_dict, quantize_dict

    return {"quantize": quantize_dict(result.quantize), "comparison": four_way_dict(result.comparison)}


def result_json(result: CompressionResult | PlanResult | CompressionPlan, latency: LatencyReport | None = None) -> str:
    """`result_dict` as indented JSON text (what `--report FILE` writes)."""
    return json.dumps(result_dict(result, latency), indent=2) + "\n"
