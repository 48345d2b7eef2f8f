"""INT8 results (issue 18): the four-way comparison and the per-chain SQNR, as terminal tables, JSON
and Markdown. The rows of each table are built once (`four_way_rows`, `chain_rows`) and every format
renders those same cells, so the terminal, JSON and Markdown say the same."""

from __future__ import annotations

import json
import math
from typing import Any

from rich.table import Table
from rich.text import Text

from ..quantize import FourWayReport, QuantizeResult
from . import fmt

FOUR_WAY_HEADER = ("model", "accuracy", "top-1 agreement", "output SQNR dB", "cosine", "size", "size ratio",
                   "latency ms", "latency ratio")
CHAIN_HEADER = ("chain", "nodes", "SQNR dB (alone)", "SQNR dB (cumulative)", "precision", "reason")


def _db(v: float | None) -> str:
    if v is None:
        return "-"
    return "exact" if math.isinf(v) and v > 0 else f"{v:.1f}"


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f}%"


def _finite(v: float | None) -> float | None:
    return None if v is None or not math.isfinite(v) else v


def four_way_header(rep: FourWayReport) -> tuple[str, ...]:
    """FOUR_WAY_HEADER, then two columns per deploy runtime: its latency and the ratio against the FP32 original there."""
    extra = [h for c in rep.runtimes for h in (f"{_short(c.name)} ms", f"{_short(c.name)} ratio")]
    return FOUR_WAY_HEADER + tuple(extra)


def _short(runtime: str) -> str:
    return {"ort-mobile": "ORT format", "mnn": "MNN", "ncnn": "ncnn"}.get(runtime, runtime)


def _ratio(ref: float | None, v: float | None) -> str:
    return "-" if v is None or ref is None or v <= 0 else f"x{ref / v:.2f}"


def four_way_rows(rep: FourWayReport) -> list[tuple[str, ...]]:
    """One row per model; ratios against the first (the FP32 original): size and latency x (first / this),
    in onnxruntime CPU and in each deploy runtime (a cell that failed: `failed (step)`, the reason in
    `runtime_findings`)."""
    ref = rep.rows[0]
    out: list[tuple[str, ...]] = []
    for r in rep.rows:
        lat = "-" if r.latency_ms is None else f"{r.latency_ms:.3f}"
        cells = [r.name, _pct(r.accuracy), _pct(r.top1_agreement), _db(r.sqnr_db), f"{r.cosine:.6f}",
                 fmt.fmt_bytes(r.size_bytes), f"x{ref.size_bytes / r.size_bytes:.2f}", lat,
                 _ratio(ref.latency_ms, r.latency_ms)]
        for col in rep.runtimes:
            c, base = col.cell(r.name), col.cell(ref.name)
            if col.status == "not installed" or c is None:
                cells += ["not installed" if col.status == "not installed" else "-", "-"]
            elif c.failure is not None:
                cells += [f"failed ({c.failed_step})", "-"]
            else:
                ms = "-" if c.latency_ms is None else f"{c.latency_ms:.3f}"
                if c.quantizer is not None:  # the runtime's own quantizer made this INT8 model, not the QDQ file
                    ms += f" ({c.quantizer.split(',')[0]} {_own_method(c.quantizer)})".replace(" )", ")")
                cells += [ms, _ratio(base.latency_ms if base else None, c.latency_ms)]
        out.append(tuple(cells))
    return out


def _own_method(words: str) -> str:
    """'mnnquant, KL activations, ...' -> 'KL'."""
    parts = words.split(", ")
    return parts[1].split()[0] if len(parts) > 1 and parts[1].endswith("activations") else ""


def runtime_cell_number(text: str) -> float:
    """A runtime latency cell back to its number: '1.234' or '1.234 (mnnquant KL)'."""
    return float(text.split()[0])


def runtime_findings(rep: FourWayReport) -> list[str]:
    """In words, per deploy runtime: what failed and why, and whether compressed INT8 is faster than
    original INT8 there (said plainly where it is not)."""
    lines: list[str] = []
    for col in rep.runtimes:
        label = _short(col.name)
        if col.status == "not installed":
            lines.append(f"{label}: not installed ({col.install})")
            continue
        for c in col.cells:
            if c.failure is not None:
                lines.append(f"{label} cannot {c.failed_step} {c.model}: {c.failure}")
        own = [c for c in col.cells if c.quantizer is not None and c.failure is None]
        for c in own:
            got = ", ".join(w for w in (f"top-1 agreement {_pct(c.top1_agreement)}" if c.top1_agreement is not None else "",
                                        f"output SQNR {_db(c.sqnr_db)} dB" if c.sqnr_db is not None else "",
                                        f"accuracy {_pct(c.accuracy)}" if c.accuracy is not None else "") if w)
            lines.append(f"{label} INT8 ({c.quantizer}) for {c.model}: {label}'s own quantizer on the FP32 model, "
                         f"calibrated on the onnxruntime quantizer's samples (the QDQ file is not what ran); {got} "
                         f"(agreement and SQNR against the FP32 original in onnxruntime CPU) on {col.samples} samples")
        a, b = col.cell("original INT8"), col.cell("compressed INT8")
        if a and b and a.latency_ms and b.latency_ms:
            x = a.latency_ms / b.latency_ms
            lines.append(f"{label}: compressed INT8 is {'faster' if x > 1 else 'NOT faster'} than original INT8 "
                         f"(x{x:.2f}: {b.latency_ms:.3f} ms against {a.latency_ms:.3f} ms)")
        f, q = col.cell("original FP32"), col.cell("original INT8")
        if f and q and f.latency_ms and q.latency_ms and q.latency_ms > f.latency_ms:
            why = ("; the ORT file is optimised for arm (target_platform='arm': NHWC QLinearConv between Transposes), "
                   "which an x86 host runs slowly" if col.name == "ort-mobile" else "")
            lines.append(f"{label}: INT8 is slower than FP32 there (original: {q.latency_ms:.3f} ms against "
                         f"{f.latency_ms:.3f} ms{why})")
    return lines


def chain_rows(q: QuantizeResult) -> list[tuple[str, ...]]:
    return [(c.name, str(len(c.nodes)), _db(c.sqnr_db), _db(c.cumulative_sqnr_db), "INT8" if c.quantized else "FP32",
             c.fp32_reason or "") for c in q.chains]


def four_way_dict(rep: FourWayReport | None) -> dict[str, Any] | None:
    if rep is None:
        return None
    return {
        "samples": rep.samples, "source": rep.source, "output": rep.output, "threads": rep.threads,
        "warmup": rep.warmup, "runs": rep.runs,
        "models": [{"name": r.name, "path": r.path, "size_bytes": r.size_bytes, "accuracy": r.accuracy,
                    "top1_agreement": r.top1_agreement, "sqnr_db": _finite(r.sqnr_db), "cosine": r.cosine,
                    "max_rel_error": r.max_rel_error, "latency_ms": r.latency_ms, "latency_p90_ms": r.latency_p90_ms}
                   for r in rep.rows],
        "runtimes": [{"name": c.name, "label": c.label, "version": c.version, "status": c.status, "install": c.install,
                      "threads": c.threads, "warmup": c.warmup, "runs": c.runs, "samples": c.samples,
                      "models": [{"name": m.model, "size_bytes": m.size_bytes, "latency_ms": m.latency_ms,
                                  "latency_p90_ms": m.latency_p90_ms, "top1_agreement": m.top1_agreement,
                                  "failure": m.failure, "failed_step": m.failed_step, "quantizer": m.quantizer,
                                  "sqnr_db": m.sqnr_db, "accuracy": m.accuracy} for m in c.cells]}
                     for c in rep.runtimes],
        "findings": runtime_findings(rep),
    }


def quantize_dict(q: QuantizeResult | None) -> dict[str, Any] | None:
    if q is None:
        return None
    return {
        "method": q.method, "format": "QDQ", "weights": "int8 per-channel", "activations": "int8",
        "data": q.data, "data_option": q.data_option, "samples": q.samples, "sqnr_samples": q.sqnr_samples,
        "qdq_nodes": q.qdq_nodes, "fp32_nodes": list(q.fp32_nodes), "seconds": q.seconds, "notes": list(q.notes),
        "output_sqnr_db": {k: _finite(v) for k, v in q.output_sqnr_db.items()},
        "chains": [{"name": c.name, "nodes": list(c.nodes), "output": c.output, "sqnr_db": _finite(c.sqnr_db),
                    "cumulative_sqnr_db": _finite(c.cumulative_sqnr_db), "precision": "int8" if c.quantized else "fp32",
                    "fp32_reason": c.fp32_reason} for c in q.chains],
    }


def quantize_json(q: QuantizeResult | None, rep: FourWayReport | None) -> str:
    """What `quantize --report` writes (keys: quantize, comparison)."""
    return json.dumps({"quantize": quantize_dict(q), "comparison": four_way_dict(rep)}, indent=2) + "\n"


def _titles(q: QuantizeResult | None, rep: FourWayReport | None) -> tuple[str, str]:
    four = ""
    if rep is not None:
        lat = f"; latency onnxruntime CPU, {rep.threads} thread(s), batch 1, {rep.runs} interleaved runs" if rep.threads else ""
        if rep.runtimes:
            lat += ("; then in " + ", ".join(c.label for c in rep.runtimes)
                    + f" (same threads, the models interleaved in each, {rep.runs} runs; ratios against the FP32 original there)")
        four = f"FP32 and INT8 against the FP32 original ({rep.samples} samples of {rep.source}, output {rep.output}{lat})"
    chains = ""
    if q is not None:
        out = ", ".join(f"{k} {_db(v)} dB" for k, v in q.output_sqnr_db.items())
        chains = (f"INT8 ({q.method}, QDQ, per-channel weights; calibrated on {q.samples} samples of {q.data_option} "
                  f"{q.data}): output SQNR {out}; per chain on {q.sqnr_samples} samples")
    return four, chains


def _rich(title: str, header: tuple[str, ...], rows: list[tuple[str, ...]]) -> Table:
    t = Table(title=title, title_justify="left")
    for i, col in enumerate(header):
        t.add_column(col, justify="left" if i == 0 or col in ("precision", "reason") else "right")
    for r in rows:
        t.add_row(*r)
    return t


def quantize_tables(q: QuantizeResult | None, rep: FourWayReport | None) -> list[Table | Text]:
    four, chains = _titles(q, rep)
    out: list[Table | Text] = []
    if q is not None:
        out.append(_rich(chains, CHAIN_HEADER, chain_rows(q)))
        out += [Text(f"note: {n}") for n in q.notes]
    if rep is not None:
        out.append(_rich(four, four_way_header(rep), four_way_rows(rep)))
        out += [Text(f"finding: {n}") for n in runtime_findings(rep)]
    return out


def _md(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"]
    return lines + ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]


def quantize_markdown(q: QuantizeResult | None, rep: FourWayReport | None, heading: str = "##") -> str:
    four, chains = _titles(q, rep)
    lines: list[str] = []
    if rep is not None:
        lines += [f"{heading} Four-way comparison", "", four + ".", "", *_md(four_way_header(rep), four_way_rows(rep)), ""]
        lines += [f"- {n}" for n in runtime_findings(rep)] + ([""] if rep.runtimes else [])
    if q is not None:
        lines += [f"{heading} INT8 per chain", "", chains + ".", "", *_md(CHAIN_HEADER, chain_rows(q)), ""]
        lines += [f"Note: {n}." for n in q.notes]
    return "\n".join(lines).rstrip() + "\n"
