"""The mobile validation report as JSON, Markdown and terminal tables (HTML: `html.py`).

Every number shown is formatted by the helpers below from the frozen `MobileReport`, so the
Markdown, the HTML and the terminal show the same values as the JSON (rounded the same way).
"""

from __future__ import annotations

import json
from typing import Any

from rich.table import Table

from ..mobile.results import MobileReport, ModelRun, OrtMobileAnalysis, Regression, RuntimeResult, Timing
from ..runtime.validate import RANDOM_AGREEMENT_NOTE
from . import fmt
from .data import _clean, layer_dict


# ---- shared formatting ---------------------------------------------------------------------------------
def ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def err(v: float | None) -> str:
    return "-" if v is None else f"{v:.3g}"


def pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def speedup(v: float | None) -> str:
    return "-" if v is None else f"x{v:.2f}"


def size(v: int | None) -> str:
    return "-" if v is None else fmt.fmt_bytes(v)


def run_status(r: ModelRun | None) -> str:
    if r is None:
        return "-"
    if r.failure is None:
        return "ok"
    return f"failed at {r.failed_step}: {r.failure}"


def runtime_status(r: RuntimeResult) -> str:
    if r.status == "not installed":
        return f"not installed ({r.install})"
    if r.status == "ok":
        return "ok"
    both = r.fails_on_original_too
    where = "fails on the original too" if both else "fails on the compressed model only" if both is False else "fails"
    return where


def regression_text(g: Regression) -> str:
    if g.what == "ops":
        return f"a reduced build needs new operators: {g.after}"
    names = {"coverage": "nodes taken", "partitions": "partitions", "suitability": "checker verdict"}
    return f"{g.where}: {names[g.what]} {g.before} -> {g.after}"


def added_ops_text(a: OrtMobileAnalysis) -> str:
    """The operators the compressed model adds to a reduced build, each one the original has only fused
    marked as such (a Tucker chain's first 1x1 has no activation to fuse with)."""
    fused = a.fused_in_original
    return ", ".join(f"{op} (in the original only fused with its activation, as {fused[op]})" if op in fused else op
                     for op in a.added_ops) or "none"


def verdict(a: OrtMobileAnalysis) -> str:
    if a.failure:
        return f"not analysed: {a.failure}"
    eps = [g for g in a.regressions if g.what != "ops"]
    ops = "" if not a.added_ops else (f" A reduced ORT build needs {len(a.added_ops)} more operator kernel(s): "
                                       f"{added_ops_text(a)}.")
    if not eps:
        return "The compressed model is as mobile-friendly as the original for NNAPI and CoreML (coverage, partitions)." + ops
    return "The compressed model is LESS mobile-friendly than the original: " + "; ".join(regression_text(g) for g in eps) + "." + ops


# ---- JSON ----------------------------------------------------------------------------------------------
def _outputs(r: ModelRun) -> list[dict[str, Any]]:
    return [o.__dict__ | {"shape": list(o.shape)} for o in r.outputs]


def run_dict(r: ModelRun | None) -> dict[str, Any] | None:
    if r is None:
        return None
    return {
        "converted": r.converted, "ran": r.ran, "failure": r.failure, "failed_step": r.failed_step,
        "size_bytes": r.size_bytes, "convert_seconds": r.convert_seconds,
        "max_rel_error": r.max_rel_error, "cosine": r.cosine, "top1_agreement": r.top1_agreement,
        "top5_agreement": r.top5_agreement, "fidelity_rel_error": r.fidelity_rel_error, "accuracy": r.accuracy,
        "outputs": _outputs(r),
    }


def timing_dict(t: Timing | None) -> dict[str, Any] | None:
    if t is None:
        return None
    return {
        "threads": t.threads, "warmup": t.warmup, "runs": t.runs,
        "original_median_ms": t.original_median, "original_p10_ms": t.original_p10, "original_p90_ms": t.original_p90,
        "compressed_median_ms": t.compressed_median, "compressed_p10_ms": t.compressed_p10,
        "compressed_p90_ms": t.compressed_p90, "speedup": t.speedup,
    }


def ort_mobile_dict(a: OrtMobileAnalysis | None) -> dict[str, Any] | None:
    if a is None:
        return None

    def parts(ps):  # type: ignore[no-untyped-def]
        return [p.__dict__ | {"unsupported_ops": list(p.unsupported_ops), "coverage": p.coverage} for p in ps]

    return {
        "original": parts(a.original), "compressed": parts(a.compressed),
        "original_ops": list(a.original_ops), "compressed_ops": list(a.compressed_ops), "added_ops": list(a.added_ops),
        "regressions": [g.__dict__ for g in a.regressions], "verdict": verdict(a), "failure": a.failure,
    }


def runtime_dict(r: RuntimeResult, rtol: float) -> dict[str, Any]:
    return {
        "name": r.name, "label": r.label, "status": r.status, "summary": runtime_status(r), "passed": r.passed(rtol),
        "version": r.version, "install": r.install, "format": r.file_format,
        "fails_on_original_too": r.fails_on_original_too,
        "original": run_dict(r.original), "compressed": run_dict(r.compressed),
        "latency": timing_dict(r.timing), "latency_failure": r.timing_failure, "ort_mobile": ort_mobile_dict(r.ort_mobile),
    }


def mobile_dict(rep: MobileReport) -> dict[str, Any]:
    """Top-level keys: models, inputs, totals, layers, runtimes."""
    t = rep.totals
    return _clean({
        "models": {"original": rep.original_path, "compressed": rep.compressed_path, "plan_source": rep.plan_source,
                   "plan_mismatch": list(rep.plan_mismatch)},
        "inputs": {"source": rep.source, "samples": rep.samples, "seed": rep.seed, "labels": rep.labels,
                   "input_shapes": {k: list(v) for k, v in rep.input_shapes.items()}, "threads": rep.threads,
                   "rtol": rep.rtol, "agreement_note": RANDOM_AGREEMENT_NOTE if rep.source == "random" else None},
        "totals": dict(t.__dict__) | {"params_ratio": t.params_ratio, "macs_ratio": t.macs_ratio, "size_ratio": t.size_ratio},
        "layers": [layer_dict(p) for p in rep.plan.layers],
        "runtimes": [runtime_dict(r, rep.rtol) for r in rep.runtimes],
        "failed_runtimes": list(rep.failed_runtimes),
    })


def mobile_json(rep: MobileReport) -> str:
    return json.dumps(mobile_dict(rep), indent=2) + "\n"


# ---- rows shared by Markdown, HTML and the terminal -------------------------------------------------------
WHOLE_HEADER = ("", "before", "after", "ratio")


def whole_model_rows(rep: MobileReport) -> list[tuple[str, str, str, str]]:
    """The paper-style table: parameters, MACs, file size, then size and latency per runtime."""
    t = rep.totals
    rows = [
        ("parameters", fmt.fmt_int(t.params_before), fmt.fmt_int(t.params_after), fmt.ratio(t.params_before, t.params_after)),
        ("MACs", fmt.fmt_int(t.macs_before), fmt.fmt_int(t.macs_after), fmt.ratio(t.macs_before, t.macs_after)),
        ("ONNX file", size(t.size_before), size(t.size_after), fmt.ratio(t.size_before, t.size_after)),
    ]
    for r in rep.runtimes:
        o, c = r.original, r.compressed
        if o is not None and c is not None and (o.size_bytes or c.size_bytes) and r.name != "ort":
            rows.append((f"{r.label} file", size(o.size_bytes), size(c.size_bytes), fmt.ratio(o.size_bytes, c.size_bytes)))
    for r in rep.runtimes:
        if r.timing is not None:
            tm = r.timing
            rows.append((f"{r.label} latency, ms ({tm.threads} thread{'s' if tm.threads > 1 else ''})",
                         ms(tm.original_median), ms(tm.compressed_median), speedup(tm.speedup)))
    return rows


RUNTIME_HEADER = ("runtime", "model", "status", "size", "max rel err vs ORT original", "cosine", "top-1 agree",
                  "top-5 agree", "accuracy", "max rel err vs same model in ORT", "median ms", "p10-p90 ms")


def runtime_header(rep: MobileReport) -> tuple[str, ...]:
    """RUNTIME_HEADER, its agreement columns marked as such on random inputs (not accuracy)."""
    if rep.source != "random":
        return RUNTIME_HEADER
    return RUNTIME_HEADER[:6] + ("top-1 agree on noise", "top-5 agree on noise") + RUNTIME_HEADER[8:]


def runtime_rows(rep: MobileReport) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = []
    for r in rep.runtimes:
        if r.status == "not installed":
            rows.append((r.label, "-", runtime_status(r), *("-",) * (len(RUNTIME_HEADER) - 3)))
            continue
        tm = r.timing
        for role, m in (("original", r.original), ("compressed", r.compressed)):
            med = p = "-"
            if tm is not None:
                med = ms(tm.original_median if role == "original" else tm.compressed_median)
                lo, hi = (tm.original_p10, tm.original_p90) if role == "original" else (tm.compressed_p10, tm.compressed_p90)
                p = f"{ms(lo)}-{ms(hi)}"
            rows.append((
                r.label, role, run_status(m), size(m.size_bytes if m else None), err(m.max_rel_error if m else None),
                "-" if m is None or m.cosine is None else f"{m.cosine:.6f}", pct(m.top1_agreement if m else None),
                pct(m.top5_agreement if m else None), pct(m.accuracy if m else None),
                err(m.fidelity_rel_error if m else None), med, p,
            ))
    return rows


LAYER_HEADER = ("layer", "op", "kind", "weight", "ranks (out/in)", "params", "MACs", "rel. err", "note")


def layer_rows(rep: MobileReport) -> list[tuple[str, ...]]:
    return [(
        p.name, p.op_type, p.kind, "x".join(map(str, p.weight_shape or ())) or "-",
        fmt.ranks(p.ranks) if p.decomposed else "-",
        f"{fmt.fmt_int(p.params_before)} -> {fmt.fmt_int(p.params_after)}",
        f"{fmt.fmt_int(p.macs_before)} -> {fmt.fmt_int(p.macs_after)}",
        "-" if p.rel_error is None else f"{p.rel_error:.3f}", p.reason or "",
    ) for p in rep.plan.layers]


PARTITION_HEADER = ("EP", "shapes", "original: nodes taken", "partitions", "verdict", "compressed: nodes taken",
                    "partitions", "verdict", "unsupported ops (compressed)")


PARTITION_NOTE = ("Shapes 'as is': what the EP takes of the model as exported (a dynamic dim keeps a node off "
                  "NNAPI and CoreML); 'fixed': once the shapes are fixed (python -m "
                  "onnxruntime.tools.make_dynamic_shape_fixed). From onnxruntime's usability checker.")


def partition_rows(a: OrtMobileAnalysis) -> list[tuple[str, ...]]:
    before = {(p.ep, p.fixed_shapes): p for p in a.original}
    rows: list[tuple[str, ...]] = []
    for c in a.compressed:
        b = before.get((c.ep, c.fixed_shapes))
        rows.append((
            c.ep, "fixed" if c.fixed_shapes else "as is",
            "-" if b is None else f"{b.supported_nodes}/{b.nodes} ({pct(b.coverage)})", "-" if b is None else str(b.partitions),
            "-" if b is None else b.suitability,
            f"{c.supported_nodes}/{c.nodes} ({pct(c.coverage)})", str(c.partitions), c.suitability,
            ", ".join(c.unsupported_ops) or "-",
        ))
    return rows


def intro_lines(rep: MobileReport) -> list[str]:
    shapes = ", ".join(f"{k} {'x'.join(map(str, v))}" for k, v in rep.input_shapes.items())
    what = (f"{rep.samples} seeded random samples (seed {rep.seed})" if rep.source == "random"
            else f"{rep.samples} samples of {rep.source}" + (" (with labels)" if rep.labels else ""))
    lines = [
        f"Original {rep.original_path}, compressed {rep.compressed_path}; inputs {shapes}; {what}; "
        f"latency at {rep.threads} thread(s), interleaved runs.",
        f"Per-layer table: {rep.plan_source}.",
    ]
    if rep.source == "random":
        lines.append(f"Note: {RANDOM_AGREEMENT_NOTE}.")
    if rep.plan_mismatch:
        lines.append(f"Warning: the plan decomposes {len(rep.plan_mismatch)} layer(s) the compressed model still has "
                     f"unchanged ({', '.join(rep.plan_mismatch[:3])}{', ...' if len(rep.plan_mismatch) > 3 else ''}): "
                     "pass the plan it was made with (--plan).")
    failed = rep.failed_runtimes
    lines.append(f"Runtimes that did not pass (converted and ran both models, compressed within max rel err "
                 f"{rep.rtol:g} of onnxruntime): {', '.join(failed)}." if failed else "Every runtime listed passed.")
    return lines


# ---- Markdown ------------------------------------------------------------------------------------------
def _md_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    def cell(s: str) -> str:
        return s.replace("|", "\\|")

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return lines


def mobile_markdown(rep: MobileReport) -> str:
    lines = ["# onnx-tucker mobile report", ""]
    lines += [ln for x in intro_lines(rep) for ln in (x, "")]
    lines += ["## Whole model", ""] + _md_table(WHOLE_HEADER, whole_model_rows(rep))  # type: ignore[arg-type]
    lines += ["", "## Validation per runtime", ""] + _md_table(runtime_header(rep), runtime_rows(rep))
    for r in rep.runtimes:
        if r.ort_mobile is not None:
            lines += ["", "## ORT mobile: NNAPI / CoreML", "", f"**{verdict(r.ort_mobile)}**", ""]
            lines += _md_table(PARTITION_HEADER, partition_rows(r.ort_mobile))
            lines += ["", PARTITION_NOTE]
            if r.ort_mobile.added_ops:
                lines += ["", f"Operators the compressed model adds: {added_ops_text(r.ort_mobile)}"]
    lines += ["", "## Layers", ""] + _md_table(LAYER_HEADER, layer_rows(rep))
    return "\n".join(lines) + "\n"


# ---- terminal ------------------------------------------------------------------------------------------
# Columns of words rather than numbers: left-justified, so a narrow terminal may fold them (report/console.py).
_TEXT_COLUMNS = {"status", "verdict", "unsupported ops (compressed)", "note"}


def _rich(title: str, header: tuple[str, ...], rows: list[tuple[str, ...]]) -> Table:
    t = Table(title=title, title_justify="left")
    for i, col in enumerate(header):
        t.add_column(col, justify="left" if i == 0 or col in _TEXT_COLUMNS else "right", overflow="fold")
    for row in rows:
        t.add_row(*row)
    return t


def mobile_tables(rep: MobileReport) -> list[Any]:
    tables: list[Any] = [_rich("Whole model", WHOLE_HEADER, whole_model_rows(rep))]  # type: ignore[arg-type]
    header = runtime_header(rep)
    short = header[:5] + header[6:7] + header[9:11]
    rows = [r[:5] + r[6:7] + r[9:11] for r in runtime_rows(rep)]
    tables.append(_rich("Validation per runtime", short, rows))
    for r in rep.runtimes:
        if r.ort_mobile is not None:
            tables.append(_rich("ORT mobile: NNAPI / CoreML", PARTITION_HEADER, partition_rows(r.ort_mobile)))
            tables.append(verdict(r.ort_mobile))
    return tables
