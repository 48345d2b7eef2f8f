"""The Markdown report: the tables a user pastes into a review before shipping."""

from __future__ import annotations

from ..results import CompressionResult
from ..runtime.bench import LatencyReport
from . import fmt


def result_markdown(result: CompressionResult, latency: LatencyReport | None = None) -> str:
    """A Markdown report (the tables a user pastes into a review before shipping)."""
    t = result.totals
    latency = latency if latency is not None else result.latency
    lines = [
        "# onnx-tucker report",
        "",
        f"Input `{result.input_path}` -> output `{result.output_path}`; {result.decomposed_layers} layers decomposed.",
        "",
        "| | before | after | ratio |",
        "|---|---:|---:|---:|",
        f"| parameters | {fmt.fmt_int(t.params_before)} | {fmt.fmt_int(t.params_after)} | {fmt.ratio(t.params_before, t.params_after)} |",
        f"| MACs | {fmt.fmt_int(t.macs_before)} | {fmt.fmt_int(t.macs_after)} | {fmt.ratio(t.macs_before, t.macs_after)} |",
        f"| file size | {fmt.fmt_bytes(t.size_before)} | {fmt.fmt_bytes(t.size_after)} | {fmt.ratio(t.size_before, t.size_after)} |",
    ]
    if latency is not None:
        lines.append(
            f"| latency, median ms ({latency.threads} thread(s), onnxruntime CPU) | {latency.original_median:.3f} | "
            f"{latency.compressed_median:.3f} | x{latency.speedup:.2f} |"
        )
    timed = any(p.time_before_ms is not None for p in result.plan.layers)
    lines += [
        "",
        "| layer | kind | weight | EVBMF | ranks | params | MACs |" + (" time ms | time gain |" if timed else "") + " rel. err | note |",
        "|---|---|---|---:|---:|---:|---:|" + ("---:|---:|" if timed else "") + "---:|---|",
    ]
    for p in result.plan.layers:
        time_cells = f" {fmt.times(p.time_before_ms, p.time_after_ms)} | {fmt.speedup(p.time_speedup)} |" if timed else ""
        lines.append(
            f"| `{p.name}` | {p.kind} | {'x'.join(map(str, p.weight_shape or ())) or '-'} | {fmt.ranks(p.evbmf_ranks)} | "
            f"{fmt.ranks(p.ranks) if p.decomposed else '-'} | {fmt.fmt_int(p.params_before)} -> {fmt.fmt_int(p.params_after)} | "
            f"{fmt.fmt_int(p.macs_before)} -> {fmt.fmt_int(p.macs_after)} |{time_cells} "
            f"{'-' if p.rel_error is None else f'{p.rel_error:.3f}'} | {p.reason or ''} |"
        )
    v = result.validation
    if v is not None:
        what = f"{v.samples} random inputs, seed {v.seed}" if v.source == "random" else f"{v.samples} samples of `{v.source}`"
        acc = ""
        if v.accuracy_before is not None and v.accuracy_after is not None:
            acc = f"; top-1 accuracy {100 * v.accuracy_before:.2f}% -> {100 * v.accuracy_after:.2f}%"
        agree = "top-1 agree" if v.agreement_note is None else "top-1 agree on noise"
        lines += ["", f"Validation ({what}): **{v.status}**{acc}", ""]
        lines += [f"Note: {v.agreement_note}.", ""] if v.agreement_note else []
        lines += [f"| output | max abs err | max rel err | cosine | {agree} |", "|---|---:|---:|---:|---:|"]
        for o in v.outputs:
            top1 = "-" if o.top1_agreement is None else f"{100 * o.top1_agreement:.1f}%"
            lines.append(f"| `{o.name}` | {o.max_abs_error:.3g} | {o.max_rel_error:.3g} | {o.cosine:.6f} | {top1} |")
        lines += ["", *(f"**Failed:** {o.nonfinite_text}." for o in v.nonfinite)] if v.nonfinite else []
    if result.quantize is not None:  # compress --quantize int8
        from .quantize import quantize_markdown

        lines += ["", quantize_markdown(result.quantize, result.comparison).rstrip()]
    return "\n".join(lines) + "\n"
