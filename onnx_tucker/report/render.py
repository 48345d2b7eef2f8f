"""Rendering plans and results: one table function, one JSON function, one Markdown function.

Algorithms never format output; everything a user reads is built here from the frozen results.
"""

from __future__ import annotations

import json
import math
from typing import Any

from rich.console import Console
from rich.table import Table

from ..api import CompressionResult, ModelTotals
from ..plan.planner import CompressionPlan, LayerPlan
from ..runtime.bench import LatencyReport
from ..runtime.validate import ValidationReport


def _fmt_int(n: int | None) -> str:
    if n is None:
        return "?"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def _fmt_bytes(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def _ratio(a: int | None, b: int | None) -> str:
    if a is None or b is None or b == 0:
        return "?"
    return f"x{a / b:.2f}"


def _ranks(r: tuple[int, ...] | None) -> str:
    return "-" if not r else "/".join(map(str, r))


def plan_totals(plan: CompressionPlan) -> dict[str, int]:
    known = [p for p in plan.layers if p.params_before is not None]
    return {
        "params_before": sum(p.params_before or 0 for p in known),
        "params_after": sum(p.params_after or 0 for p in known),
        "macs_before": sum(p.macs_before or 0 for p in known),
        "macs_after": sum((p.macs_after if p.macs_after is not None else p.macs_before) or 0 for p in known),
    }


def layer_table(plan: CompressionPlan, title: str = "Layers") -> Table:
    t = Table(title=title, title_justify="left", show_lines=False)
    for col, just in (
        ("layer", "left"),
        ("kind", "left"),
        ("weight", "left"),
        ("EVBMF", "right"),
        ("ranks", "right"),
        ("params", "right"),
        ("MACs", "right"),
        ("rel. err", "right"),
        ("note", "left"),
    ):
        t.add_column(col, justify=just, overflow="fold", no_wrap=col != "note")  # type: ignore[arg-type]
    for p in plan.layers:
        t.add_row(
            p.name,
            p.kind,
            "x".join(map(str, p.weight_shape)) if p.weight_shape else "-",
            _ranks(p.evbmf_ranks),
            _ranks(p.ranks) if p.decomposed else "-",
            f"{_fmt_int(p.params_before)} -> {_fmt_int(p.params_after)}" if p.params_before is not None else "-",
            f"{_fmt_int(p.macs_before)} -> {_fmt_int(p.macs_after)}" if p.macs_before is not None else "-",
            f"{p.rel_error:.3f}" if p.rel_error is not None else "-",
            p.reason or "",
            style=None if p.decomposed else "dim",
        )
    return t


def summary_table(totals: ModelTotals | dict[str, int], latency: tuple[float, float] | None = None) -> Table:
    d = totals if isinstance(totals, dict) else totals.__dict__
    t = Table(title="Summary", title_justify="left")
    for col in ("", "before", "after", "ratio"):
        t.add_column(col, justify="left" if not col else "right")
    t.add_row("parameters", _fmt_int(d["params_before"]), _fmt_int(d["params_after"]), _ratio(d["params_before"], d["params_after"]))
    t.add_row("MACs (Conv/Gemm/MatMul)", _fmt_int(d["macs_before"]), _fmt_int(d["macs_after"]), _ratio(d["macs_before"], d["macs_after"]))
    if "size_before" in d:
        t.add_row("file size", _fmt_bytes(d["size_before"]), _fmt_bytes(d["size_after"]), _ratio(d["size_before"], d["size_after"]))
    if latency is not None:
        t.add_row("latency (ms, median)", f"{latency[0]:.2f}", f"{latency[1]:.2f}", f"x{latency[0] / latency[1]:.2f}")
    return t


def latency_table(r: LatencyReport) -> Table:
    t = Table(
        title=f"Latency in onnxruntime CPU ({r.threads} thread{'s' if r.threads != 1 else ''}, {r.warmup} warm-up, "
        f"{r.runs} interleaved runs each)",
        title_justify="left",
    )
    for col in ("", "median ms", "p90 ms"):
        t.add_column(col, justify="left" if not col else "right")
    t.add_row("original", f"{r.original_median:.3f}", f"{r.original_p90:.3f}")
    t.add_row("compressed", f"{r.compressed_median:.3f}", f"{r.compressed_p90:.3f}")
    t.add_row("speed-up (ratio of medians)", f"x{r.speedup:.2f}", "")
    return t


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


def validation_table(v: ValidationReport) -> Table:
    what = f"{v.samples} seeded random inputs, seed {v.seed}" if v.source == "random" else f"{v.samples} samples of {v.source}"
    title = f"Validation in onnxruntime ({what}): {v.status}"
    if v.accuracy_before is not None and v.accuracy_after is not None:
        title += f"; top-1 accuracy {100 * v.accuracy_before:.2f}% -> {100 * v.accuracy_after:.2f}%"
    if v.rtol is not None:
        title += f" at rtol {v.rtol:g}"
    t = Table(title=title, title_justify="left")
    for col in ("output", "shape", "max abs err", "max rel err", "cosine", "top-1 agree", "top-5 agree"):
        t.add_column(col, justify="left" if col == "output" else "right")
    for o in v.outputs:
        t.add_row(
            o.name,
            "x".join(map(str, o.shape)),
            f"{o.max_abs_error:.3g}",
            f"{o.max_rel_error:.3g}",
            f"{o.cosine:.6f}",
            "-" if o.top1_agreement is None else f"{100 * o.top1_agreement:.1f}%",
            "-" if o.top5_agreement is None else f"{100 * o.top5_agreement:.1f}%",
        )
    return t


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def calibration_table(plan: CompressionPlan) -> Table | None:
    """Per refit layer (compress --calibrate): its output error on the calibration data, before -> after."""
    rows = [p for p in plan.layers if p.calibration is not None]
    if not rows:
        return None
    t = Table(title="Calibration (layer output error on the calibration data)", title_justify="left")
    for col in ("layer", "refit", "rows", "error before", "error after", "note"):
        t.add_column(col, justify="left" if col in ("layer", "refit", "note") else "right")
    for p in rows:
        c = p.calibration
        assert c is not None
        t.add_row(p.name, c.method, str(c.rows), "-" if c.error_before is None else f"{c.error_before:.4f}",
                  "-" if c.error_after is None else f"{c.error_after:.4f}", c.note or "")
    return t


def print_result(
    result: CompressionResult | CompressionPlan,
    console: Console,
    verbose: bool = False,
    latency: LatencyReport | None = None,
) -> None:
    """The tables a user sees: per-layer, summary, validation (and latency when measured)."""
    plan = result if isinstance(result, CompressionPlan) else result.plan
    console.print(layer_table(plan))
    cal = calibration_table(plan)
    if cal is not None:
        console.print(cal)
    if isinstance(result, CompressionPlan):
        console.print(summary_table(plan_totals(plan)))
        return
    lat = (latency.original_median, latency.compressed_median) if latency is not None else None
    console.print(summary_table(result.totals, lat))
    c = result.calibration
    if c is not None:
        held = "no held-out samples (the file has no more than --calibration-samples)" if not c.held_out else (
            f"on {c.held_out} held-out samples, top-1 agreement with the original "
            f"{_pct(c.top1_agreement_before)} -> {_pct(c.top1_agreement_after)}, "
            f"cosine {c.cosine_before:.4f} -> {c.cosine_after:.4f}")
        console.print(f"Calibration: refit on {c.samples} samples in {c.seconds:.1f} s; {held}", markup=False)
    if result.validation is not None:
        console.print(validation_table(result.validation))
    if latency is not None:
        console.print(latency_table(latency))


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def layer_dict(p: LayerPlan) -> dict[str, Any]:
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
        "calibration": None if p.calibration is None else dict(p.calibration.__dict__),
    }


def validation_dict(v: ValidationReport | None) -> dict[str, Any] | None:
    if v is None:
        return None
    return {
        "status": v.status,
        "passed": v.passed,
        "rtol": v.rtol,
        "passing_rtol": v.passing_rtol,
        "samples": v.samples,
        "seed": v.seed,
        "source": v.source,
        "accuracy_before": v.accuracy_before,
        "accuracy_after": v.accuracy_after,
        "input_shapes": {k: list(s) for k, s in v.input_shapes.items()},
        "outputs": [o.__dict__ | {"shape": list(o.shape)} for o in v.outputs],
    }


def result_dict(result: CompressionResult | CompressionPlan, latency: LatencyReport | None = None) -> dict[str, Any]:
    """The JSON report: top-level keys `layers`, `totals`, `validation`, `latency` (and `config`, `model`)."""
    if isinstance(result, CompressionPlan):
        totals: dict[str, Any] = plan_totals(result)
        totals |= {"params_ratio": _r(totals["params_before"], totals["params_after"]),
                   "macs_ratio": _r(totals["macs_before"], totals["macs_after"])}
        return _clean({"layers": [layer_dict(p) for p in result.layers], "totals": totals, "validation": None,
                       "config": result.config.to_dict()})
    t = result.totals
    totals = dict(t.__dict__) | {"params_ratio": t.params_ratio, "macs_ratio": t.macs_ratio, "size_ratio": t.size_ratio}
    return _clean(
        {
            "layers": [layer_dict(p) for p in result.plan.layers],
            "totals": totals,
            "validation": validation_dict(result.validation),
            "latency": latency_dict(latency),
            "calibration": None if result.calibration is None else dict(result.calibration.__dict__),
            "config": result.plan.config.to_dict(),
            "model": {
                "input": result.input_path,
                "output": result.output_path,
                "decomposed_layers": result.decomposed_layers,
                "seconds": result.seconds,
            },
        }
    )


def _r(a: int, b: int) -> float | None:
    return a / b if b else None


def result_json(result: CompressionResult | CompressionPlan, latency: LatencyReport | None = None) -> str:
    return json.dumps(result_dict(result, latency), indent=2) + "\n"


def result_markdown(result: CompressionResult, latency: LatencyReport | None = None) -> str:
    """A Markdown report (the tables a user pastes into a review before shipping)."""
    t = result.totals
    lines = [
        "# onnx-tucker report",
        "",
        f"Input `{result.input_path}` -> output `{result.output_path}`; {result.decomposed_layers} layers decomposed.",
        "",
        "| | before | after | ratio |",
        "|---|---:|---:|---:|",
        f"| parameters | {_fmt_int(t.params_before)} | {_fmt_int(t.params_after)} | {_ratio(t.params_before, t.params_after)} |",
        f"| MACs | {_fmt_int(t.macs_before)} | {_fmt_int(t.macs_after)} | {_ratio(t.macs_before, t.macs_after)} |",
        f"| file size | {_fmt_bytes(t.size_before)} | {_fmt_bytes(t.size_after)} | {_ratio(t.size_before, t.size_after)} |",
    ]
    if latency is not None:
        lines.append(
            f"| latency, median ms ({latency.threads} thread(s), onnxruntime CPU) | {latency.original_median:.3f} | "
            f"{latency.compressed_median:.3f} | x{latency.speedup:.2f} |"
        )
    lines += [
        "",
        "| layer | kind | weight | EVBMF | ranks | params | MACs | rel. err | note |",
        "|---|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for p in result.plan.layers:
        lines.append(
            f"| `{p.name}` | {p.kind} | {'x'.join(map(str, p.weight_shape or ())) or '-'} | {_ranks(p.evbmf_ranks)} | "
            f"{_ranks(p.ranks) if p.decomposed else '-'} | {_fmt_int(p.params_before)} -> {_fmt_int(p.params_after)} | "
            f"{_fmt_int(p.macs_before)} -> {_fmt_int(p.macs_after)} | "
            f"{'-' if p.rel_error is None else f'{p.rel_error:.3f}'} | {p.reason or ''} |"
        )
    v = result.validation
    if v is not None:
        what = f"{v.samples} random inputs, seed {v.seed}" if v.source == "random" else f"{v.samples} samples of `{v.source}`"
        acc = ""
        if v.accuracy_before is not None and v.accuracy_after is not None:
            acc = f"; top-1 accuracy {100 * v.accuracy_before:.2f}% -> {100 * v.accuracy_after:.2f}%"
        lines += ["", f"Validation ({what}): **{v.status}**{acc}", "",
                  "| output | max abs err | max rel err | cosine | top-1 agree |", "|---|---:|---:|---:|---:|"]
        for o in v.outputs:
            top1 = "-" if o.top1_agreement is None else f"{100 * o.top1_agreement:.1f}%"
            lines.append(f"| `{o.name}` | {o.max_abs_error:.3g} | {o.max_rel_error:.3g} | {o.cosine:.6f} | {top1} |")
    return "\n".join(lines) + "\n"
