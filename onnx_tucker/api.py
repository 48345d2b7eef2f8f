"""The pipeline as library calls, composed from the public stage functions; the library's writes.

`compress()` is what `onnx-tucker compress` runs, `plan()` is `onnx-tucker inspect`, `validate()`,
`bench()` and `mobile_report()` the commands of those names. Each stage takes what an earlier one
returned (`graph.source.SourceModel` in, a frozen result out) and the model stays in memory from load
to write. This module owns every write: each function checks its output paths before any work and
writes its files atomically, together (`graph.save.OutputBatch`).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import onnx

from .calibration.stage import CalibrationResult, calibrate, data_selection
from .config import BenchConfig, CompressionConfig, QuantizeConfig, ValidationConfig
from .data import load_for_model
from .errors import UsageError
from .graph.fold import float_parameter_count
from .graph.irmodel import IRModel
from .graph.model import lowest_float_eps
from .graph.protos import opset_version, serialized_size, size_on_disk
from .graph.save import OutputBatch, check_output_paths, write_text_atomic
from .graph.source import ModelLike, SourceModel, load_pair, rewrite_source
from .planning.budget import Evaluator
from .planning.latency import LayerTimer
from .planning.planner import CompressionPlan, PlannedRanks, load_plan_file
from .planning.stage import (
    Decomposition,
    PlanResult,
    data_allocated,
    latency_summary,
    layer_timer,
    plan_and_decompose,
    times_layers,
)
from .report import latency_dict, result_json, result_markdown, validation_dict
from .results import CompressionResult, ModelTotals
from .runtime.bench import LatencyReport, measure_latency
from .runtime.validate import ValidationReport, validate_models
from .training.config import FinetuneStep
from .types import EventProgress, StepProgress

PathLike = str | os.PathLike[str]
Progress = StepProgress  # (layer name, done, total)
PROFILE_RUNS = 10  # whole-model profiler runs the per-layer timings are checked against


def _planned(source: SourceModel, config: CompressionConfig, progress: Progress | None,
             timer: LayerTimer | None, evaluator: Evaluator | None, profile_runs: int,
             events: EventProgress | None = None) -> Decomposition:
    """The plan stage as `plan` and `compress` run it: the ranks to replay (a plan file's, or the ones
    chosen on the calibration data), every layer planned and decomposed, the layer timing summed up."""
    if config.calibration.loss_aware and not data_allocated(config):
        raise UsageError("--loss-aware weights the layers when the ranks are allocated on the calibration data; "
                         "use --ranks data:F (or --target macs:F / latency:F) with --calibrate, or leave out --loss-aware")
    if timer is None and config.latency_runtime != "ort" and times_layers(config):  # --latency-runtime: elsewhere
        from .mobile.layertime import layer_timer_for

        if config.latency_runtime == "ort-int8":  # issue 18: the INT8 chains' times (quantize/layertime.py)
            from .quantize.layertime import OrtInt8LayerTimer

            timer = OrtInt8LayerTimer(opset_version(source.model), config.threads, seed=config.seed)
        else:
            timer = layer_timer_for(config.latency_runtime, opset_version(source.model), config.threads, config.seed)
    cached = layer_timer(source, config, timer)
    chosen = None if config.plan_file else data_selection(source, config, progress, cached, evaluator, events)
    ranks: PlannedRanks | None = load_plan_file(config.plan_file) if config.plan_file else None
    if chosen is not None:
        ranks = chosen.planned
    d = plan_and_decompose(source, config, progress, cached, evaluator, ranks)
    if chosen is not None and chosen.budget is not None:  # --target latency:F --calibrate: allocated on the data
        d = replace(d, planned=replace(d.planned, budget=chosen.budget))
    if cached is None:
        return d
    summary = latency_summary(source, config, cached, profile_runs)
    if chosen is not None and chosen.timing is not None:
        summary = replace(summary, allocation=chosen.timing)
    return replace(d, planned=replace(d.planned, layer_timing=summary))


def plan(
    model_or_path: ModelLike,
    config: CompressionConfig | None = None,
    progress: Progress | None = None,
    *,
    save_plan: PathLike | None = None,
    report: PathLike | None = None,
    timer: LayerTimer | None = None,
    profile_runs: int = PROFILE_RUNS,
    evaluator: Evaluator | None = None,
    events: EventProgress | None = None,
) -> PlanResult:
    """The plan `compress` would apply (ranks, costs and kernel errors), without rewriting anything;
    `.plan` is what replays, beside it what the options measured (`budget`, `budget_check`, `layer_timing`).
    `save_plan` / `report`: also write the plan file / the JSON report (atomically, together).
    `timer`: how layers are timed under `config.latency_aware` (default: onnxruntime CPU, which is
    then also checked against a whole-model profile of `profile_runs` runs). `evaluator`: how a candidate
    plan's agreement is measured under `--target agreement:F` (default: onnxruntime on `config.data`).
    `events("calibration-estimate", {"estimate": CalibrationEstimate})` before each calibration walk
    (the work and memory it will take; `report.tables.calibration_estimate_line` renders it), and
    `events("loss-weights", {"weights": LossWeights})` under `--loss-aware` (`loss_weights_line`)."""
    config = config or CompressionConfig()
    in_path = None if isinstance(model_or_path, onnx.ModelProto) else str(model_or_path)
    check_output_paths(in_path, {"--save-plan": save_plan, "--report": report,
                                 "--sensitivity": config.calibration.sensitivity})
    source = SourceModel.load(model_or_path, config.input_shapes)
    result = _planned(source, config, progress, timer, evaluator, profile_runs, events).planned
    with OutputBatch() as batch:
        if save_plan is not None:
            batch.add_text(save_plan, result.to_json())
        if report is not None:
            batch.add_text(report, result_json(result))
        batch.commit()
    return result


def compress(
    model_or_path: ModelLike,
    config: CompressionConfig | None = None,
    output: PathLike | None = None,
    progress: Progress | None = None,
    *,
    bench: BenchConfig | None = None,
    save_plan: PathLike | None = None,
    report: PathLike | None = None,
    markdown: PathLike | None = None,
    timer: LayerTimer | None = None,
    profile_runs: int = PROFILE_RUNS,
    evaluator: Evaluator | None = None,
    finetune: FinetuneStep | None = None,
    finetune_progress: EventProgress | None = None,
    events: EventProgress | None = None,
    quantize: QuantizeConfig | None = None,
) -> CompressionResult:
    """Compress a model; write it to `output` unless validation fails.

    `quantize` (`--quantize int8`): then quantize the compressed (calibrated, fine-tuned) model to INT8 on
    the calibration data (`config.calibrate`, else `config.data`); OUT is the INT8 model, `result.quantize`
    says how it went, `result.comparison` holds the four-way table under `quantize.compare`.

    `finetune`: fine-tune the compressed (and calibrated) model before validating and writing it
    (torch + onnx2torch, imported only then); `result.finetune` says how it went.

    `bench`: also time both models in onnxruntime (`result.latency`). `save_plan`, `report`, `markdown`:
    also write the plan file, the JSON report, the Markdown report. Every path is checked before any
    work (never the input, no two outputs the same file); all files appear together or not at all.
    A model in which no layer is decomposed is still written (unchanged); check
    `result.decomposed_layers`. When validation fails the model is not written (`output_path` is None;
    the side files are, so the user can see why) and `result.validation_error()` says so.
    `timer`, `profile_runs`, `evaluator`, `events`: as for `plan`.
    """
    config = config or CompressionConfig()
    t0 = time.perf_counter()
    in_path = None if isinstance(model_or_path, onnx.ModelProto) else str(model_or_path)
    check_output_paths(in_path, {"OUT": output, "--save-plan": save_plan, "--report": report, "--markdown": markdown,
                                 "--sensitivity": config.calibration.sensitivity})
    q_step = _QuantizeStep.before(config, quantize)  # issue 18: refused before any work
    if q_step is not None and config.round_to == 1 and q_step.q.round_to > 1:
        config = replace(config, round_to=int(q_step.q.round_to))  # INT8 kernels want multiples of 4 (docs/int8.md)
    source = SourceModel.load(model_or_path, config.input_shapes)
    if q_step is not None:
        q_step.check(source)
    d = _planned(source, config, progress, timer, evaluator, profile_runs, events)
    planned, p = d.planned, d.plan
    rewritten = rewrite_source(source, d.replacements)
    replacements = d.replacements if config.calibrate else {}
    del d  # the factor arrays live on in the compressed model
    new_model, skeleton = rewritten.model, rewritten.skeleton
    del rewritten
    calibration = CalibrationResult()
    if config.calibrate:  # refit the factors on data, in place, before validating and writing
        if isinstance(new_model, IRModel):
            raise UsageError(f"--calibrate {config.calibrate}: the compressed model is over 2 GB, which calibration "
                             "cannot run in memory; compress without --calibrate")
        calibration = calibrate(source, new_model, replacements, p, config, progress, events)
        del replacements
    finetuned = None
    if finetune is not None:
        if isinstance(new_model, IRModel):
            raise UsageError(f"--finetune {finetune.data}: the compressed model is over 2 GB, which fine-tuning cannot "
                             "load; compress first, then run `onnx-tucker finetune` on the written model")
        new_model, finetuned = _finetune_step(source, new_model, finetune, finetune_progress)
        skeleton = new_model

    if q_step is not None:  # --quantize int8: OUT is the INT8 model; the FP32 skeleton keeps counting parameters
        new_model = q_step.run(source, new_model, p, bench)

    validation = None
    if config.validate:
        # Real data whenever given: without --data, the --calibrate images (random inputs say nothing of accuracy).
        # (capped as calibration is, so that a big folder costs no more than the refit read)
        real = config.data or config.calibrate
        limit = config.samples if config.data or config.samples else config.calibration_samples
        data = load_for_model(real, source.model, limit, config.preprocess) if real else None
        # onnxruntime reads the original from its file (its weights were loaded lazily: no copy of them).
        validation = validate_models(
            source.runnable, new_model, source.input_shapes, config.samples, config.seed,
            config.effective_rtol(lowest_float_eps(source.model)), data, progress, reference=source.model,
        )
    latency = None
    if bench is not None:
        latency = measure_latency(source.runnable, new_model, source.model, source.input_shapes, bench.threads,
                                  bench.warmup, bench.runs, config.seed)
    plan_totals = p.totals()
    totals = ModelTotals(
        params_before=p.model_params or 0,
        params_after=float_parameter_count(skeleton),
        macs_before=plan_totals["macs_before"],
        macs_after=plan_totals["macs_after"],
        size_before=size_on_disk(in_path, source.model) if in_path else serialized_size(source.model),
        size_after=new_model.estimated_size() if isinstance(new_model, IRModel) else serialized_size(new_model),
    )
    passed = validation is None or validation.passed
    result = CompressionResult(
        plan=p, model=new_model, totals=totals, validation=validation, input_path=in_path,
        output_path=str(output) if output is not None and passed else None, seconds=time.perf_counter() - t0,
        latency=latency, requested_output=str(output) if output is not None else None,
        calibration=calibration.summary, finetune=finetuned, layer_calibration=calibration.layers,
        budget=planned.budget, budget_check=planned.budget_check, layer_timing=planned.layer_timing,
        quantize=q_step.result if q_step else None, comparison=q_step.comparison if q_step else None,
    )
    with OutputBatch() as batch:
        if result.output_path is not None:
            batch.add_model(new_model, result.output_path, in_path)
        if save_plan is not None:
            batch.add_text(save_plan, p.to_json())
        if report is not None:
            batch.add_text(report, result_json(result))
        if markdown is not None:
            batch.add_text(markdown, result_markdown(result))
        batch.commit()
    return result


def _finetune_step(source: SourceModel, compressed: onnx.ModelProto, step: FinetuneStep,
                   progress: EventProgress | None) -> tuple[onnx.ModelProto, Any]:
    """`compress --finetune`: the in-memory compressed model through `training.finetune_model` (no file
    between; no checkpoint: the run is part of this command), the fine-tuned model back."""
    from .training import finetune_model

    source.materialize()  # the teacher (the original) runs in torch: its weights in memory
    teacher = source.model if step.teacher_is_original else None
    cfg = replace(step.config, checkpoint=None, resume=False)
    model, res = finetune_model(compressed, step.data, teacher=teacher, val_data=step.val_data, config=cfg,
                                progress=progress, source="(compressed in memory)",
                                teacher_source=source.path or "(original in memory)")
    return model, replace(res, output_path=None, checkpoint="")


def bench(
    original: ModelLike,
    compressed: ModelLike,
    config: BenchConfig | CompressionConfig | None = None,
    bench_config: BenchConfig | None = None,
    *,
    report: PathLike | None = None,
) -> LatencyReport:
    """Latency of both models in onnxruntime CPU, interleaved (see `runtime.bench`), as `config` (a
    BenchConfig: threads, runs, input shapes and seed) says; `report`: write it as JSON too. The first
    form, `bench(a, b, CompressionConfig, BenchConfig)`, takes the shapes and seed from the former."""
    if isinstance(config, CompressionConfig):
        b = replace(bench_config or BenchConfig(), inputs=config.validation.inputs)
    else:
        b = config or bench_config or BenchConfig()
    for path in _paths(original, compressed):
        check_output_paths(path, {"--report": report})
    pair = load_pair(original, compressed, dict(b.inputs.input_shapes))
    latency = measure_latency(pair.runnable_original, pair.runnable_compressed, pair.original, pair.input_shapes,
                              b.threads, b.warmup, b.runs, b.inputs.seed)
    if report is not None:
        write_text_atomic(report, json.dumps({"latency": latency_dict(latency)}, indent=2) + "\n")
    return latency


def validate(
    original: ModelLike,
    compressed: ModelLike,
    config: ValidationConfig | CompressionConfig | None = None,
    *,
    report: PathLike | None = None,
    progress: Progress | None = None,
) -> ValidationReport:
    """Compare two models with the same inputs and outputs on seeded random inputs (or `config.data`),
    as `config` (a ValidationConfig; a CompressionConfig gives its own) says; `report`: write the
    comparison as JSON too. Check `.passed`: a failed comparison is a result.
    `progress("validation", samples done, in all)` after each batch."""
    full_rank = isinstance(config, CompressionConfig) and config.ranks.method == "full"
    v_cfg = config.validation if isinstance(config, CompressionConfig) else config or ValidationConfig()
    for path in _paths(original, compressed):
        check_output_paths(path, {"--report": report})
    pair = load_pair(original, compressed, dict(v_cfg.input_shapes))
    data = load_for_model(v_cfg.data, pair.original, v_cfg.samples, v_cfg.preprocess) if v_cfg.data else None
    v = validate_models(
        pair.runnable_original, pair.runnable_compressed, pair.input_shapes, v_cfg.samples, v_cfg.seed,
        v_cfg.effective_rtol(lowest_float_eps(pair.original), full_rank), data, progress, reference=pair.original,
    )
    if report is not None:
        write_text_atomic(report, json.dumps({"validation": validation_dict(v)}, indent=2) + "\n")
    return v


def _paths(*models: ModelLike) -> list[str]:
    return [str(m) for m in models if not isinstance(m, onnx.ModelProto)]


def mobile_report(
    original: PathLike,
    compressed: PathLike,
    config: CompressionConfig | None = None,
    *,
    runtimes: str | list[str] | tuple[str, ...] | None = None,
    bench_config: BenchConfig | None = None,
    timeout: float = 120.0,
    rtol: float = 1e-2,
    layer_plan: CompressionPlan | PlanResult | None = None,
    html: PathLike | None = None,
    markdown: PathLike | None = None,
    report: PathLike | None = None,
    json_path: PathLike | None = None,
    progress: Progress | None = None,
    int8: tuple[Any, Any] | None = None,
):  # type: ignore[no-untyped-def]
    """Convert, run and time both models in each mobile runtime and compare every output with the
    original in onnxruntime; return a `mobile.MobileReport` and write the requested report files
    (HTML, Markdown, JSON) atomically, together.

    `report`: the JSON report (`json_path` is its old name, still accepted).
    `runtimes`: names (ort, ort-mobile, mnn, ncnn) or "ort,mnn"; a runtime that is not installed is
    listed as such. `config`: input shapes, samples, seed, `data` (+ `preprocess` for image
    folders), `plan_file` (the per-layer table; else the original is re-planned
    with `config`). `layer_plan`: the plan itself, when the caller has it. `timeout`: seconds a runtime may take
    to convert and run one model, and to time both. `rtol`: a runtime passes when it computes the compressed model
    within this max relative error of onnxruntime (`report.failed_runtimes`: the ones that did not).
    A runtime that fails is a finding in the report, never an exception. `progress(runtime, done, in all)`
    before each runtime runs (and once at the end). `int8`: (QuantizeResult, FourWayReport) of
    `compress --quantize int8`, shown in the HTML report's INT8 sections.
    """
    from .mobile.build import parse_runtimes
    from .mobile.stage import mobile_measure
    from .report.html import mobile_html
    from .report.mobile import mobile_json, mobile_markdown

    config = config or CompressionConfig()
    b = bench_config or BenchConfig()
    if not timeout > 0:
        raise UsageError(f"--timeout {timeout}: must be > 0 seconds; e.g. --timeout 120")
    if report is not None and json_path is not None and Path(report) != Path(json_path):
        raise UsageError(f"report={report} and json_path={json_path}: two paths for the one JSON report; give report only")
    json_path = report if report is not None else json_path
    names = parse_runtimes(runtimes)
    for path in (original, compressed):
        check_output_paths(path, {"--html": html, "--markdown": markdown, "--report": json_path})
    pair = load_pair(original, compressed, dict(config.input_shapes), lazy=False)

    def plan_of() -> tuple[CompressionPlan, str]:
        if layer_plan is not None:
            return (layer_plan.plan if isinstance(layer_plan, PlanResult) else layer_plan), "as compressed"
        where = f"plan file {config.plan_file}" if config.plan_file else "re-planned from the original with the given options"
        return plan(original, replace(config, validate=False)).plan, where

    rep = mobile_measure(str(original), str(compressed), pair, config, b, names, plan_of, timeout, rtol, progress)
    with OutputBatch() as batch:
        if html is not None:
            batch.add_text(html, mobile_html(rep, int8))
        if markdown is not None:
            batch.add_text(markdown, mobile_markdown(rep))
        if json_path is not None:
            batch.add_text(json_path, mobile_json(rep))
        batch.commit()
    return rep


# ---- INT8 after low-rank (issue 18): `compress --quantize int8` and `quantize` --------------------------


class _QuantizeStep:
    """`compress --quantize int8`: the options checked before any work, the INT8 step after the refit and
    fine-tuning, on the data the refit used (`calibration_data`: the same seeded selection), else `--data`."""

    def __init__(self, config: CompressionConfig, q: QuantizeConfig) -> None:
        from .config import quantize_data_option

        self.config, self.q = config, q
        self.path, self.option = quantize_data_option(config.calibrate, config.data)
        self.result: Any = None
        self.comparison: Any = None

    @classmethod
    def before(cls, config: CompressionConfig, q: QuantizeConfig | None) -> _QuantizeStep | None:
        if q is None or not q.enabled:
            if q is not None and (q.exclude is not None or q.min_sqnr is not None or q.compare):
                raise UsageError("--quantize-exclude / --quantize-min-sqnr / --quantize-compare: only with "
                                 "--quantize int8; add it, or leave them out")
            return None
        from .quantize.compare import deploy_runtimes

        deploy_runtimes(q.runtimes)  # an unknown runtime: the usage error before any work
        return cls(config, q)

    def check(self, source: SourceModel) -> None:
        from .quantize import check_float_model

        check_float_model(source.model, source.path or "model")

    def data(self, source: SourceModel) -> Any:
        from .calibration.calibrate import calibration_data

        c = self.config
        if self.option == "--calibrate":
            return calibration_data(self.path, source.model, c.calibration_samples, c.seed, c.preprocess)[0]
        return load_for_model(self.path, source.model, c.samples, c.preprocess)

    def run(self, source: SourceModel, compressed: Any, plan: CompressionPlan, bench: BenchConfig | None) -> Any:
        from .quantize import compare_models, quantize_int8

        if isinstance(compressed, IRModel):
            raise UsageError("--quantize int8: the compressed model is over 2 GB, which onnxruntime's quantizer "
                             "cannot load; compress without --quantize")
        source.materialize()
        where = source.path or "model"
        data = self.data(source)
        chains = [lp.name for lp in plan.decomposed] or [lay.layer_id for lay in source.layers]
        self.result = quantize_int8(compressed, data, self.q, chains, source.input_shapes,
                                    data_option=self.option, source=f"{where} (compressed)")
        if self.q.compare:
            original = quantize_int8(source.model, data, self.q, [lay.layer_id for lay in source.layers],
                                     source.input_shapes, data_option=self.option, source=where)
            c = self.config
            shown = load_for_model(c.data, source.model, c.samples, c.preprocess) if c.data else data
            self.comparison = compare_models(
                [("original FP32", source.model, source.path), ("original INT8", original.model, None),
                 ("compressed FP32", compressed, None), ("compressed INT8", self.result.model, None)],
                shown, source.input_shapes, bench or BenchConfig(), c.seed, self.q.runtimes, calibration=data,
                runtime_samples=self.q.runtime_samples)
        return self.result.model


def quantize(
    model_or_path: ModelLike,
    output: PathLike | None = None,
    config: CompressionConfig | None = None,
    quantize: QuantizeConfig | None = None,
    *,
    bench: BenchConfig | None = None,
    report: PathLike | None = None,
    markdown: PathLike | None = None,
    html: PathLike | None = None,
) -> Any:
    """`onnx-tucker quantize`: the uncompressed model to INT8 (the reference `compress --quantize int8` is
    compared with), calibrated on `config.calibrate` (else `config.data`: input shapes, samples, seed and
    preprocessing from `config` too), every layer a chain of its own; FP32 and INT8 compared on the data
    (latency as `bench` says). Writes OUT, the JSON report and the Markdown report atomically, together.
    Returns a `quantize.QuantizeRun`."""
    from .config import quantize_data_option
    from .quantize import check_float_model, compare_models, quantize_int8
    from .quantize.compare import QuantizeRun
    from .report.quantize import quantize_json, quantize_markdown

    config = config or CompressionConfig()
    q = replace(quantize or QuantizeConfig(), quantize="int8")
    in_path = None if isinstance(model_or_path, onnx.ModelProto) else str(model_or_path)
    check_output_paths(in_path, {"OUT": output, "--report": report, "--markdown": markdown, "--html": html})
    path, option = quantize_data_option(config.calibrate, config.data, "quantize")
    from .quantize.compare import deploy_runtimes

    deploy_runtimes(q.runtimes)
    source = SourceModel.load(model_or_path, config.input_shapes)
    check_float_model(source.model, in_path or "model")
    source.materialize()
    step = _QuantizeStep(config, q)
    data = step.data(source)
    result = quantize_int8(source.model, data, q, [lay.layer_id for lay in source.layers], source.input_shapes,
                           data_option=option, source=in_path or "model")
    shown = load_for_model(config.data, source.model, config.samples, config.preprocess) if config.data else data
    comparison = compare_models([("original FP32", source.model, in_path), ("original INT8", result.model, None)],
                                shown, source.input_shapes, bench or BenchConfig(), config.seed, q.runtimes,
                                calibration=data, runtime_samples=q.runtime_samples)
    run = QuantizeRun(result, comparison, in_path, str(output) if output is not None else None)
    with OutputBatch() as batch:
        if output is not None:
            batch.add_model(result.model, output, in_path)
        if report is not None:
            batch.add_text(report, quantize_json(result, comparison))
        if markdown is not None:
            batch.add_text(markdown, "# onnx-tucker quantize\n\n" + quantize_markdown(result, comparison))
        if html is not None:
            from .report.html import quantize_html

            batch.add_text(html, quantize_html(result, comparison, "onnx-tucker quantize"))
        batch.commit()
    return run
