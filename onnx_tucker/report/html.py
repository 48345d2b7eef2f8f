"""The mobile report as one self-contained HTML file: tables and inline SVG plots, no external
resource, no script (it opens from a pull request attachment or an e-mail as it is)."""

from __future__ import annotations

from collections.abc import Sequence
from html import escape
from typing import TYPE_CHECKING

from ..mobile.results import MobileReport
from . import mobile as m
from .svg import hbar_chart, scatter_chart

if TYPE_CHECKING:
    from ..quantize import FourWayReport, QuantizeResult

STYLE = """
body { font-family: system-ui, sans-serif; margin: 24px; color: #1b1f23; max-width: 1240px; }
h1 { font-size: 22px; } h2 { font-size: 17px; margin-top: 28px; border-bottom: 1px solid #d0d7de; padding-bottom: 4px; }
table { border-collapse: collapse; font-size: 13px; margin: 8px 0; }
th, td { border: 1px solid #d0d7de; padding: 3px 8px; text-align: right; vertical-align: top; }
td { white-space: nowrap; } td.note { white-space: normal; }
th { background: #f3f5f7; } td:first-child, th:first-child { text-align: left; }
td.note { text-align: left; color: #57606a; max-width: 420px; }
tr.skip td { color: #8b949e; }
.bad { color: #b42318; font-weight: 600; } .good { color: #1a7f37; font-weight: 600; }
.verdict { padding: 8px 12px; border-left: 4px solid #1f77b4; background: #f6f8fa; }
.verdict.bad { border-color: #b42318; }
ul.findings { font-size: 13px; }
p.meta { color: #57606a; font-size: 13px; } .plots { display: flex; flex-wrap: wrap; gap: 18px; }
"""


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], cls: str = "", row_classes: Sequence[str] | None = None,
           note_cols: Sequence[int] = ()) -> str:
    out = [f"<table class='{cls}'><thead><tr>" + "".join(f"<th>{escape(h)}</th>" for h in header) + "</tr></thead><tbody>"]
    for i, row in enumerate(rows):
        rc = row_classes[i] if row_classes else ""
        cells = []
        for j, c in enumerate(row):
            klass = "note" if j in note_cols else ("bad" if c.startswith("failed") or c.startswith("not installed") else "")
            cells.append(f"<td class='{klass}'>{escape(c)}</td>" if klass else f"<td>{escape(c)}</td>")
        out.append(f"<tr class='{rc}'>" + "".join(cells) + "</tr>")
    out.append("</tbody></table>")
    return "\n".join(out)


def _plots(rep: MobileReport) -> list[str]:
    layers = [p for p in rep.plan.layers if p.macs_before is not None]
    plots = []
    if layers:
        plots.append(hbar_chart(
            "MACs per layer (millions)", [p.name for p in layers],
            [("before", [(p.macs_before or 0) / 1e6 for p in layers]),
             ("after", [((p.macs_after if p.macs_after is not None else p.macs_before) or 0) / 1e6 for p in layers])],
        ))
    in_pts, out_pts = [], []
    for p in rep.plan.decomposed:
        w = p.weight_shape or ()
        if not p.ranks or len(w) < 2:
            continue
        if p.kind == "tucker2" and len(p.ranks) >= 2:
            out_pts.append((float(w[0]), float(p.ranks[0]), f"{p.name}: output channels {w[0]} -> rank {p.ranks[0]}"))
            in_pts.append((float(w[1]), float(p.ranks[1]), f"{p.name}: input channels {w[1]} -> rank {p.ranks[1]}"))
        elif p.kind == "tucker1":
            out_pts.append((float(w[0]), float(p.ranks[0]), f"{p.name}: output channels {w[0]} -> rank {p.ranks[0]}"))
        elif p.kind == "tucker1-in":  # the input mode only
            in_pts.append((float(w[1]), float(p.ranks[0]), f"{p.name}: input channels {w[1]} -> rank {p.ranks[0]}"))
        elif p.kind == "spatial-svd" and len(w) == 4:  # the rank of the (S*kh) x (T*kw) rearrangement
            side = float(min(w[1] * w[2], w[0] * w[3]))
            out_pts.append((side, float(p.ranks[0]), f"{p.name} (spatial SVD): min(S*kh, T*kw) {side:g} -> rank {p.ranks[0]}"))
        else:  # svd: the rank against the smaller side of the matrix
            side = float(min(w[0], w[1]))
            out_pts.append((side, float(p.ranks[0]), f"{p.name} (SVD): min dimension {side:g} -> rank {p.ranks[0]}"))
    if in_pts or out_pts:
        plots.append(scatter_chart("Chosen ranks against channel counts",
                                   [("output mode (R4, SVD rank)", out_pts), ("input mode (R3)", in_pts)],
                                   "channels", "rank"))
    timed = [r for r in rep.runtimes if r.timing is not None]
    if timed:
        plots.append(hbar_chart(
            f"Latency per runtime (median ms, {rep.threads} thread(s))",
            [f"{r.name} ({m.speedup(r.timing.speedup)})" for r in timed if r.timing is not None],
            [("original", [r.timing.original_median for r in timed if r.timing is not None]),
             ("compressed", [r.timing.compressed_median for r in timed if r.timing is not None])],
            unit=" ms",
        ))
    return plots


def int8_html(q: QuantizeResult | None, four: FourWayReport | None) -> list[str]:
    """The INT8 sections (issue 18): the four-way table (the rows `report.quantize` builds for the terminal,
    JSON and Markdown), the runtime findings, a latency plot per runtime, and the per-chain SQNR."""
    from . import quantize as qr

    four_title, chain_title = qr._titles(q, four)
    body: list[str] = []
    if four is not None:
        body.append("<h2>INT8: four-way comparison</h2>")
        body.append(f"<p class='meta'>{escape(four_title)}.</p>")
        body.append(_table(qr.four_way_header(four), qr.four_way_rows(four), "fourway"))
        findings = qr.runtime_findings(four)
        if findings:
            body.append("<ul class='findings'>" + "".join(f"<li class='{'bad' if 'NOT' in f or 'cannot' in f or 'slower' in f else ''}'>"
                                         f"{escape(f)}</li>" for f in findings) + "</ul>")
        labels = ["onnxruntime CPU"] + [c.label for c in four.runtimes]
        series = []
        for r in four.rows:
            vals: list[float | None] = [r.latency_ms]
            for c in four.runtimes:
                cell = c.cell(r.name)
                vals.append(cell.latency_ms if cell is not None else None)
            series.append((r.name, vals))
        if any(v is not None for _, vs in series for v in vs):
            body.append("<div class='plots'>" + hbar_chart("Latency per runtime (median ms; no bar: failed)", labels,
                                                         series, unit=" ms", width=900) + "</div>")
    if q is not None:
        body.append("<h2>INT8 per chain</h2>")
        body.append(f"<p class='meta'>{escape(chain_title)}.</p>")
        body.append(_table(qr.CHAIN_HEADER, qr.chain_rows(q), "chains", note_cols=(5,)))
        body += [f"<p class='meta'>Note: {escape(n)}.</p>" for n in q.notes]
    return body


def quantize_html(q: QuantizeResult | None, four: FourWayReport | None, title: str = "onnx-tucker INT8 report") -> str:
    """`quantize --html`: the INT8 sections alone, as one self-contained page."""
    return (f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'><title>{escape(title)}</title>"
            f"<style>{STYLE}</style></head><body>\n<h1>{escape(title)}</h1>\n" + "\n".join(int8_html(q, four))
            + "\n</body></html>\n")


def mobile_html(rep: MobileReport, int8: tuple[QuantizeResult | None, FourWayReport | None] | None = None) -> str:
    """The mobile report; `int8`: the INT8 step's result and four-way comparison, shown after the
    whole-model table (`compress --quantize int8 --mobile-report`)."""
    body = ["<h1>onnx-tucker mobile report</h1>"]
    body += [f"<p class='meta'>{escape(line)}</p>" for line in m.intro_lines(rep)]
    body.append("<h2>Whole model</h2>")
    body.append(_table(m.WHOLE_HEADER, m.whole_model_rows(rep), "whole"))
    if int8 is not None:
        body += int8_html(*int8)
    body.append("<h2>Validation per runtime</h2>")
    body.append(_table(m.runtime_header(rep), m.runtime_rows(rep), "runtimes", note_cols=(2,)))
    for r in rep.runtimes:
        a = r.ort_mobile
        if a is None:
            continue
        body.append("<h2>ORT mobile: NNAPI and CoreML partitions</h2>")
        worse = a.failure or any(g.what != "ops" for g in a.regressions)
        body.append(f"<p class='verdict{' bad' if worse else ''}'>{escape(m.verdict(a))}</p>")
        body.append(_table(m.PARTITION_HEADER, m.partition_rows(a), "partitions", note_cols=(8,)))
        body.append(f"<p class='meta'>{escape(m.PARTITION_NOTE)}</p>")
        body.append(f"<p class='meta'>Operators of a reduced build: original {escape(', '.join(a.original_ops) or '-')}; "
                    f"added by the compressed model: {escape(m.added_ops_text(a))}.</p>")
    body.append("<h2>Plots</h2><div class='plots'>")
    body += _plots(rep)
    body.append("</div>")
    body.append("<h2>Layers</h2>")
    body.append(_table(m.LAYER_HEADER, m.layer_rows(rep), "layers",
                       row_classes=["" if p.decomposed else "skip" for p in rep.plan.layers], note_cols=(8,)))
    return ("<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'><title>onnx-tucker mobile report</title>"
            f"<style>{STYLE}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")
