"""The tables a user reads in the terminal (rich `Table`s; the CLI prints them)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from rich.table import Table
from rich.text import Text

from ..calibration.calibrate import CalibrationSummary
from ..calibration.memory import CalibrationEstimate
from ..planning.budget import BudgetCheck, BudgetOutcome
from ..planning.latency import LatencySummary
from ..planning.planner import CompressionPlan
from ..planning.stage import PlanResult
from ..results import CompressionResult, ModelTotals
from ..runtime.bench import LatencyReport
from ..runtime.validate import ValidationReport
from ..training.config import FinetuneResult
from . import fmt

if TYPE_CHECKING:
    from ..training.lossaware import LossWeights


def layer_table(plan: CompressionPlan, title: str = "Layers") -> Table:
    timed = any(p.time_before_ms is not None for p in plan.layers)
    t = Table(title=title, title_justify="left", show_lines=False)
    cols = [("layer", "left"), ("kind", "left"), ("weight", "right"), ("EVBMF", "right"), ("ranks", "right"),
            ("params", "right"), ("MACs", "right"), ("MAC gain", "right")]
    if timed:  # --latency-aware: measured alone in the runtime, next to the predicted MAC gain
        cols += [("time ms", "right"), ("time gain", "right")]
    cols += [("rel. err", "right"), ("note", "left")]
    for col, just in cols:
        t.add_column(col, justify=just, overflow="fold", no_wrap=col != "note")  # type: ignore[arg-type]
    for p in plan.layers:
        row = [
            p.name,
            p.kind,
            "x".join(map(str, p.weight_shape)) if p.weight_shape else "-",
            fmt.ranks(p.evbmf_ranks),
            fmt.ranks(p.ranks) if p.decomposed else "-",
            f"{fmt.fmt_int(p.params_before)} -> {fmt.fmt_int(p.params_after)}" if p.params_before is not None else "-",
            f"{fmt.fmt_int(p.macs_before)} -> {fmt.fmt_int(p.macs_after)}" if p.macs_before is not None else "-",
            fmt.ratio(p.macs_before, p.macs_after) if p.decomposed else "-",
        ]
        if timed:
            row += [fmt.times(p.time_before_ms, p.time_after_ms), fmt.speedup(p.time_speedup)]
        row += [f"{p.rel_error:.3f}" if p.rel_error is not None else "-", p.reason or ""]
        t.add_row(*row, style=None if p.decomposed else "dim")
    return t


def budget_line(b: BudgetOutcome) -> Text:
    """What a --target allocation chose."""
    if b.metric == "latency" and b.method == "data":
        return Text(
            f"Target {b.target}: the layers' summed time alone in the runtime {b.before:.3f} -> {b.after:.3f} ms = "
            f"{b.achieved:.3f} of the original (per-layer timings), allocated on the calibration data's output errors "
            f"and the measured time of each layer's timed chains, at MACs {b.macs_fraction or 0:.3f} of the original; "
            f"{b.layers_decomposed} of {b.layers_considered} layers decomposed."
        )
    if b.metric == "latency":
        return Text(
            f"Target {b.target}: the layers' summed time alone in the runtime {b.before:.3f} -> {b.after:.3f} ms = "
            f"{b.achieved:.3f} of the original (predicted from per-layer timings) at MACs {b.macs_fraction or 0:.3f} of "
            f"the original, the least compression that meets it ({b.evaluations} allocations timed, bisection); "
            f"{b.layers_decomposed} of {b.layers_considered} layers allocated a decomposition."
        )
    if b.metric == "agreement":
        held = "-" if b.held_out is None else f"{100 * b.held_out:.2f}%"
        return Text(
            f"Target {b.target}: top-1 agreement with the original {100 * b.after:.2f}% on {b.search_samples} search samples, "
            f"{held} on {b.held_out_samples} held-out samples, at MACs {b.macs_fraction or 0:.3f} of the original (the most "
            f"compression found by bisection; {b.evaluations} model evaluations); {b.layers_decomposed} of "
            f"{b.layers_considered} layers decomposed."
        )
    what = "MACs (Conv/Gemm/MatMul)" if b.metric == "macs" else "parameters (all float initializers)"
    return Text(
        f"Target {b.target}: allocated {what} {fmt.fmt_int(int(b.before))} -> {fmt.fmt_int(int(b.after))} = {b.achieved:.4f} "
        f"of the original (met within one rank step of {b.step}); {b.layers_decomposed} of {b.layers_considered} layers "
        f"decomposed, ranks granted greedily where they win back the most kernel energy per unit of {b.metric} "
        f"({b.steps} steps)."
    )


def mac_budget_line(b: BudgetCheck) -> Text:
    """--ranks data:F: the budget the ranks were allocated for, met or (plainly) missed and by how much."""
    head = (f"MAC budget {b.option}: at most {fmt.fmt_int(b.macs_budget)} MACs ({b.fraction:g} of "
            f"{fmt.fmt_int(b.macs_before)}); the plan has {fmt.fmt_int(b.macs_after)} = {b.achieved:.3f} of the original")
    if b.params_budget is not None and b.params_after is not None:
        head += (f"; at most {fmt.fmt_int(b.params_budget)} parameters ({b.params_fraction:g} of "
                 f"{fmt.fmt_int(b.params_before)}), the plan has {fmt.fmt_int(b.params_after)} = "
                 f"{b.params_achieved or 0:.3f} of the original")
    if b.met:
        return Text(head + " (met).")
    if b.over == 0:  # the parameters missed
        over = b.params_over / b.params_budget if b.params_budget else float("inf")
        return Text(f"BUDGET MISSED: {head}, {fmt.fmt_int(b.params_over)} parameters ({100 * over:.1f}%) over the "
                    f"budget: {b.cause}.", style="bold")
    over = b.over / b.macs_budget if b.macs_budget else float("inf")
    return Text(f"BUDGET MISSED: {head}, {fmt.fmt_int(b.over)} MACs ({100 * over:.1f}%) over the budget: {b.cause}. "
                "Use a smaller F, or leave out --latency-aware, to meet it.", style="bold")


def layer_timing_line(s: LatencySummary) -> Text:
    """How the per-layer times were measured and how well they add up to a whole-model profile."""
    where = RUNTIME_LABELS.get(s.runtime, s.runtime)
    text = (f"Per-layer timing: {where}, {s.threads} thread{'s' if s.threads != 1 else ''}, each layer and its "
            f"chain alone, interleaved medians; {s.measured} pairs timed for {s.lookups} asked (cached per shape); "
            + ("the plan file's kinds and ranks replay as they are (--plan): timed, not re-selected."
               if s.timed_only else f"a chain is kept at x{s.min_speedup:g} or faster."))
    ratio = s.profile_ratio
    if ratio is not None:
        text += (f" Sum of {s.layers_summed} isolated layer times {s.isolated_ms:.3f} ms vs {s.profiled_ms:.3f} ms in a "
                 f"whole-model profile ({s.profile_runs} runs): x{ratio:.2f}"
                 + (f"; the model also spends {s.layout_ms:.3f} ms in NCHWc reorders" if s.layout_ms else "") + ".")
    a = s.allocation
    if a is not None:
        budget = (f"MACs {fmt.fmt_int(a.macs_after)} of at most {fmt.fmt_int(a.macs_budget)} ({a.macs_after / max(a.macs_before, 1):.3f} "
                  "of the original)" if a.macs_budget is not None else
                  f"time {a.time_after_ms:.3f} ms of at most {a.budget_ms or 0:.3f} ms")
        text += (f" Allocated on the data and the measured time ({a.option}): {a.timed} chains timed at ranks in multiples "
                 f"of {a.multiple} on the layers' error/MAC hulls (at most {a.most_per_layer} per layer); {a.layers_paying} "
                 f"of {a.layers} layers have a chain at x{a.min_speedup:g} or faster, {a.layers_decomposed} decomposed; "
                 f"{budget}; summed layer time {a.time_before_ms:.3f} -> {a.time_after_ms:.3f} ms"
                 + (f" (x{a.speedup:.2f})" if a.speedup else "") + ".")
    return Text(text)


# --latency-runtime: where the per-layer times come from
RUNTIME_LABELS = {"ort": "onnxruntime CPU", "ort-mobile": "onnxruntime, ORT format (mobile settings)", "mnn": "MNN"}


def summary_table(totals: ModelTotals | dict[str, int], latency: tuple[float, float] | None = None) -> Table:
    d = totals if isinstance(totals, dict) else totals.__dict__
    t = Table(title="Summary", title_justify="left")
    for col in ("", "before", "after", "ratio"):
        t.add_column(col, justify="left" if not col else "right")
    t.add_row("parameters", fmt.fmt_int(d["params_before"]), fmt.fmt_int(d["params_after"]), fmt.ratio(d["params_before"], d["params_after"]))
    t.add_row("MACs (Conv/Gemm/MatMul)", fmt.fmt_int(d["macs_before"]), fmt.fmt_int(d["macs_after"]), fmt.ratio(d["macs_before"], d["macs_after"]))
    if "size_before" in d:
        t.add_row("file size", fmt.fmt_bytes(d["size_before"]), fmt.fmt_bytes(d["size_after"]), fmt.ratio(d["size_before"], d["size_after"]))
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


def validation_table(v: ValidationReport) -> Table:
    what = f"{v.samples} seeded random inputs, seed {v.seed}" if v.source == "random" else f"{v.samples} samples of {v.source}"
    title = f"Validation in onnxruntime ({what}): {v.status}"
    if v.accuracy_before is not None and v.accuracy_after is not None:
        title += f"; top-1 accuracy {100 * v.accuracy_before:.2f}% -> {100 * v.accuracy_after:.2f}%"
    if v.rtol is not None:
        title += f" at rtol {v.rtol:g}"
    t = Table(title=title, title_justify="left", caption=v.agreement_note, caption_justify="left")
    nonfinite = bool(v.nonfinite)
    agree = ("top-1 agree", "top-5 agree") if v.agreement_note is None else ("top-1 on noise", "top-5 on noise")
    cols = ["output", "shape", "max abs err", "max rel err", "cosine", *agree]
    if nonfinite:  # NaN / Inf counts, original / compressed: the reason validation failed
        cols.append("NaN/Inf orig | new")
    for col in cols:
        t.add_column(col, justify="left" if col == "output" else "right")
    for o in v.outputs:
        row = [
            o.name,
            "x".join(map(str, o.shape)),
            f"{o.max_abs_error:.3g}",
            f"{o.max_rel_error:.3g}",
            f"{o.cosine:.6f}",
            "-" if o.top1_agreement is None else f"{100 * o.top1_agreement:.1f}%",
            "-" if o.top5_agreement is None else f"{100 * o.top5_agreement:.1f}%",
        ]
        if nonfinite:
            row.append(f"{o.nan_original}/{o.inf_original} | {o.nan_compressed}/{o.inf_compressed}")
        t.add_row(*row, style=None if o.finite else "bold red")
    return t


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def calibration_table(result: CompressionResult) -> Table | None:
    """Per refit layer (compress --calibrate): its output error on the calibration data, before -> after."""
    rows = [(p, result.layer_calibration[p.name]) for p in result.plan.layers if p.name in result.layer_calibration]
    if not rows:
        return None
    t = Table(title="Calibration (layer output error on the calibration data)", title_justify="left")
    for col in ("layer", "refit", "rows", "error before", "error after", "note"):
        t.add_column(col, justify="left" if col in ("layer", "refit", "note") else "right")
    for p, c in rows:
        t.add_row(p.name, c.method, str(c.rows), "-" if c.error_before is None else f"{c.error_before:.4f}",
                  "-" if c.error_after is None else f"{c.error_after:.4f}", c.note or "")
    return t


def calibration_line(c: CalibrationSummary) -> Text:
    """The whole model after calibration, on the held-out samples of the calibration file."""
    held = "no held-out samples (the file has no more than --calibration-samples)" if not c.held_out else (
        f"on {c.held_out} held-out samples, top-1 agreement with the original "
        f"{_pct(c.top1_agreement_before)} -> {_pct(c.top1_agreement_after)}, "
        f"cosine {c.cosine_before:.4f} -> {c.cosine_after:.4f}")
    text = f"Calibration: refit on {c.samples} samples in {c.seconds:.1f} s; {held}"
    if c.channel_weights is not None:
        w = c.channel_weights
        unweighted = f"; {len(w.missing)} unweighted ({next(iter(w.missing.values()))}, ...)" if w.missing else ""
        text += (f"\nRefit weights: {len(w.weights)} layers' output channels weighted by the Fisher information "
                 f"({w.loss}, {w.images} images x {w.draws} draws, {w.seconds:.1f} s){unweighted}")
    if c.blocks:
        kept = [b for b in c.blocks if b.kept]
        gain = "" if not kept else (
            f", held-out block error {sum(b.error_before for b in kept) / len(kept):.4f} -> "
            f"{sum(b.error_after for b in kept) / len(kept):.4f} on those (mean)")
        text += (f"\nRefine: {len(kept)} of {len(c.blocks)} blocks improved on held-out calibration images and kept "
                 f"their new factors{gain}; {sum(b.seconds for b in c.blocks):.0f} s")
    return Text(text)


def finetune_line(f: FinetuneResult) -> Text:
    """compress --finetune: the training run in one line (its held-out data: --val-data or --val-split)."""
    acc = f"accuracy {_pct(f.accuracy_before)} -> {_pct(f.accuracy_after)}" if f.accuracy_before is not None else ""
    agree = (f"agreement with the original {_pct(f.agreement_before)} -> {_pct(f.agreement_after)}"
             if f.agreement_before is not None else "")
    held = "; ".join(x for x in (acc, agree) if x) or "no held-out metric"
    parts = (f"; {len(f.segments)} convertible part(s) trained around {'; '.join(f.untrained_ops)}"
             if f.segments else "")
    return Text(f"Fine-tuning: {f.mode}, {f.epochs} epoch(s), {f.steps} steps, {f.seconds:.0f} s on {f.device}, "
                f"best epoch {f.best_epoch} ({f.best_metric}); on {f.val_samples} held-out samples: {held}{parts}")


def segment_start_line(d: Mapping[str, Any]) -> str:
    """Subgraph fine-tuning: the part about to train (progress event "segment")."""
    layers = ", ".join(d["layers"])
    return (f"part {d['index']} of {d['count']}: {d['nodes']} node(s) from {d['first']} to {d['last']} (decomposed: "
            f"{layers}), {d['trainable']:,} weights trained on {d['samples']} samples; in: {', '.join(d['inputs'])}; "
            f"matched to the original at: {', '.join(d['outputs'])}")


def segments_table(f: FinetuneResult) -> Table:
    """Subgraph fine-tuning: what each part trained and how far its outputs moved towards the original's."""
    t = Table(title=f"Trained parts (the rest runs as it was: {'; '.join(f.untrained_ops)})", title_justify="left")
    for col in ("part", "nodes", "decomposed layers", "matched at", "weights", "samples", "loss before", "loss after",
                "best epoch", "ORT vs torch", "time"):
        t.add_column(col, justify="left" if col in ("decomposed layers", "matched at") else "right")
    for k, s in enumerate(f.segments, 1):
        t.add_row(str(k), f"{s.nodes} ({s.first_node} .. {s.last_node})", ", ".join(s.layers), ", ".join(s.outputs),
                  f"{s.trainable_params:,}", str(s.images), _num(s.loss_before), _num(s.loss_after),
                  "-" if s.best_epoch is None else str(s.best_epoch), f"{s.max_rel_error:.1e}", f"{s.seconds:.0f} s")
    return t


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.4g}"


def result_tables(
    result: CompressionResult | PlanResult | CompressionPlan, latency: LatencyReport | None = None
) -> list[Table | Text]:
    """What a result shows in reading order: per-layer, calibration, summary, validation, latency."""
    if isinstance(result, CompressionPlan):
        result = PlanResult(result)
    plan = result.plan
    timing: list[Table | Text] = [budget_line(result.budget)] if result.budget is not None else []
    timing += [mac_budget_line(result.budget_check)] if result.budget_check is not None else []
    timing += [layer_timing_line(result.layer_timing)] if result.layer_timing is not None else []
    if isinstance(result, PlanResult):
        return [layer_table(plan), *timing, summary_table(plan.totals())]
    latency = latency if latency is not None else result.latency
    lat = (latency.original_median, latency.compressed_median) if latency is not None else None
    tables: list[Table | Text] = [layer_table(plan), *timing]
    cal = calibration_table(result)
    if cal is not None:
        tables.append(cal)
    tables.append(summary_table(result.totals, lat))
    if result.calibration is not None:
        tables.append(calibration_line(result.calibration))
    if result.finetune is not None:
        tables.append(finetune_line(result.finetune))
    if result.validation is not None:
        tables.append(validation_table(result.validation))
    if latency is not None:
        tables.append(latency_table(latency))
    if result.quantize is not None:  # compress --quantize int8
        from .quantize import quantize_tables

        tables += quantize_tables(result.quantize, result.comparison)
    return tables


def loss_weights_line(w: LossWeights) -> str:
    """One line after `--loss-aware` measured its layer weights: how, on what, and their spread."""
    vals = sorted(w.weights.values())
    spread = f"weights {vals[0]:.3g} .. {vals[-1]:.3g} (mean 1)" if vals else "no layers"
    missing = f"; {len(w.missing)} layer(s) at weight 1: {next(iter(w.missing.values()))}" if w.missing else ""
    change = "KL of the class distribution" if w.loss == "kl" else "relative squared error of the outputs"
    how = (f"the {change} under a projection of each layer's output" if w.method == "probe"
           else f"a diagonal Fisher estimate ({change}, {w.draws} draws)")
    return f"loss-aware: {len(w.weights)} layers weighted by {how}, on {w.images} images in {w.seconds:.0f} s; {spread}{missing}"


def calibration_estimate_line(e: CalibrationEstimate) -> str:
    """One line before a calibration walk starts: what it reads, how, and the memory it will hold."""
    def gb(n: int) -> str:
        return f"{n / 2**30:.1f} GB"

    spill = f", {gb(e.spill_bytes)} to TMPDIR" if e.spill_bytes else ""
    avail = f" of {gb(e.available_bytes)} available" if e.available_bytes is not None else ""
    return (f"{e.what}: {e.layers} layers on {e.images} images of {e.input_size} in batches of {e.batch} "
            f"({e.gmacs_per_pass:.3g} GMACs per pass); activations {gb(e.activation_bytes)} "
            f"({gb(e.cache_bytes)} in memory{spill}); widest statistics {e.stats_width} wide; "
            f"expected peak {gb(e.peak_bytes)}{avail}")
