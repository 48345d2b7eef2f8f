"""The pipeline as library calls: load -> plan -> decompose -> rewrite -> validate -> save.

`compress()` is what `onnx-tucker compress` runs, `plan()` is `onnx-tucker inspect`, `validate()` and
`bench()` the commands of those names. The library owns every write: each function checks its output
paths before any work and writes its files atomically, together (`graph.save.OutputBatch`).
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from .calibration.calibrate import LayerCalibration, calibrate_from_config, calibration_batches
from .calibration.rankselect import DataRankOptions, select_ranks_data
from .config import BenchConfig, BudgetTarget, CompressionConfig, RankPolicy, ValidationConfig
from .data import load_for_model
from .errors import ModelLoadError, OnnxTuckerError, UsageError
from .graph import lazyload
from .graph.fold import float_parameter_count
from .graph.irmodel import IRModel
from .graph.load import check_model, load_model
from .graph.model import ModelIndex, find_layers, infer_shapes, lowest_float_eps, resolve_input_shapes
from .graph.protos import opset_version, serialized_size, size_on_disk
from .graph.rewrite import Replacement, check_rewrite, rewrite
from .graph.save import OutputBatch, check_output_paths, write_text_atomic
from .numerics.spectral import LayerSpectra, single_threaded_lapack
from .ops.layer import Layer, LayerFactors
from .ops.registry import find_handler, handler_for
from .planning.budget import (
    LATENCY_SEARCH_STEPS,
    BudgetOutcome,
    Evaluator,
    agreement_budget_plan,
    budget_plan,
    check_mac_budget,
    latency_budget_plan,
)
from .planning.decompose import decompose_layer
from .planning.latency import (
    DEFAULT_ROUND_MULTIPLES,
    CachedLayerTimer,
    LatencySummary,
    LayerTimer,
    measure_plan,
    select_by_latency,
)
from .planning.planner import (
    CompressionPlan,
    LayerPlan,
    PlannedRanks,
    check_plan_covers,
    finish_plan,
    load_plan_file,
    plan_layer,
)
from .report import latency_dict, result_json, result_markdown, validation_dict
from .results import CompressionResult, ModelTotals
from .runtime.bench import LatencyReport, measure_latency
from .runtime.layertime import OrtLayerTimer, profile_layer_times, profiled_layer_ms
from .runtime.validate import ValidationReport, validate_models
from .training.config import FinetuneResult, FinetuneStep
from .types import StepProgress

ModelLike = onnx.ModelProto | str | os.PathLike[str]
PathLike = str | os.PathLike[str]
Progress = StepProgress  # (layer name, done, total)
PROFILE_RUNS = 10  # whole-model profiler runs the per-layer timings are checked against


@dataclass(frozen=True)
class _Prepared:
    model: onnx.ModelProto
    path: str | None
    input_shapes: dict[str, tuple[int, ...]]
    layers: list[Layer]
    index: ModelIndex
    # Set when the model was loaded lazily: its big Conv/Gemm/MatMul weights are still in the file
    # (external data relative to this folder) and are read one at a time (see `lazyload`).
    base_dir: str | None = None

    def materialize(self, model: onnx.ModelProto) -> None:
        """Load the weights still in the file into `model` (before onnxruntime or the user sees it)."""
        if self.base_dir is not None:
            lazyload.materialize(model, self.base_dir)


def _prepare(model_or_path: ModelLike, config: CompressionConfig) -> _Prepared:
    if isinstance(model_or_path, onnx.ModelProto):
        model, path = model_or_path, None
    else:
        path = str(model_or_path)
        model = load_model(path, lazy=True)
    source = path or "model"
    if path is None:
        model = check_model(model, source)  # load_model ran the same checks on a file
    input_shapes = resolve_input_shapes(model, dict(config.input_shapes), source)
    shapes = infer_shapes(model, input_shapes)
    index = ModelIndex(model)
    layers = find_layers(model, shapes, index)
    _check_weight_shapes(layers, source)
    base_dir = str(Path(path).resolve().parent) if path is not None else None
    return _Prepared(model, path, input_shapes, layers, index, base_dir)


def _check_weight_shapes(layers: list[Layer], source: str) -> None:
    """A weight that does not fit its input makes onnxruntime fail at run time (neither onnx.checker
    nor shape inference notices): say so before planning, naming the node."""
    for lay in layers:
        if find_handler(lay.op_type) is None or lay.weight_shape is None:
            continue
        found = handler_for(lay).input_mismatch(lay)
        if found is not None:
            what, have, want = found
            w, x = lay.weight_shape, lay.input_shape or ()
            raise ModelLoadError(
                f"{source}: node '{lay.layer_id}' ({lay.op_type}) has weight {list(w)} expecting input {what} {want}, "
                f"but its input {list(x)} has {have}; the model is inconsistent (onnxruntime would fail at run "
                "time): re-export it"
            )


def _weight_reader(prep: _Prepared) -> Callable[[str], np.ndarray]:
    read_lock = threading.Lock()

    def read_weight(name: str) -> np.ndarray:
        t = prep.index.initializers.get(name)
        if t is not None and prep.base_dir is not None and lazyload.is_external(t):
            return lazyload.read_weight(t, prep.base_dir)
        with read_lock:  # protobuf reads and constant folding stay on one thread at a time
            return prep.index.constant_value(name)

    return read_weight


def _planned_ranks(prep: _Prepared, config: CompressionConfig, progress: Progress | None) -> PlannedRanks | None:
    """The ranks to replay: a plan file's, or under `--ranks data:F` the ones chosen on the calibration
    data (calibration/rankselect.py; the other layers keep the EVBMF plan); None: plan by the policy (or
    by `--target`, which `_plan_and_decompose` allocates)."""
    if config.plan_file:
        return load_plan_file(config.plan_file)
    fraction = _data_fraction(config)
    if fraction is None:
        return None
    assert config.calibrate is not None
    read_weight = _weight_reader(prep)
    fallback_cfg = replace(config, ranks=RankPolicy("vbmf"))
    fallback = [plan_layer(lay, read_weight, fallback_cfg) for lay in prep.layers]
    prep.materialize(prep.model)  # onnxruntime runs the original: its weights in memory
    batches = calibration_batches(config.calibrate, prep.model, prep.input_shapes, config.calibration_samples,
                                  seed=config.seed, preprocess=config.preprocess)
    selection = select_ranks_data(prep.model, prep.layers, fallback, batches, fraction, read_weight,
                                  DataRankOptions(seed=config.seed), progress)
    return selection.planned


def _data_fraction(config: CompressionConfig) -> float | None:
    """The MAC fraction to allocate on the calibration data: `--ranks data:F`, or `--target macs:F` with
    `--calibrate` (and without per-layer timing, which allocates on its own); else None."""
    if config.ranks.method == "data":
        return config.ranks.value
    t = config.target
    if t is not None and t.metric == "macs" and config.calibrate and not config.latency_aware:
        return t.fraction
    return None


def _plan_and_decompose(
    prep: _Prepared, config: CompressionConfig, progress: Progress | None, timer: LayerTimer | None = None,
    evaluator: Evaluator | None = None, planned: PlannedRanks | None = None,
) -> tuple[CompressionPlan, dict[int, Replacement]]:
    """Plan every layer and decompose the ones that gain, one layer at a time (or `config.jobs` at once).

    Each layer is planned and decomposed in one go: its weight is read once, the Gram matrices and
    their eigendecompositions computed for EVBMF are reused for the factors (`LayerSpectra`), and all
    of it is dropped before the next layer, so at most `jobs` weights are in memory beside the model.
    Layers run in threads (numpy/LAPACK release the GIL); the results are assembled in graph order and
    are identical to a serial run. Layers whose weight feeds other nodes are decomposed afterwards,
    once the whole plan has decided whether they can share one factorisation. `timer` (with
    `config.latency_aware`): each planned decomposition is timed against the original layer and kept
    only where it pays (`planning.latency.select_by_latency`); layers then run one at a time, so that
    no decomposition runs beside a timing. `planned`: ranks to replay (`_planned_ranks`; by default
    the plan file's, if any).
    """
    if planned is None and config.plan_file:
        planned = load_plan_file(config.plan_file)
    layers = prep.layers
    check_plan_covers(layers, planned)
    read_weight = _weight_reader(prep)
    budget = None
    if config.target is not None and _data_fraction(config) is None:  # replayed like a plan file's ranks
        with single_threaded_lapack():
            planned, budget = _budget_plan(prep, config, config.target, read_weight, timer, evaluator, progress)

    def work(layer: Layer) -> tuple[LayerPlan, LayerFactors | None]:
        weights: dict[str, np.ndarray] = {}

        def read_once(name: str) -> np.ndarray:
            if name not in weights:
                weights[name] = read_weight(name)
            return weights[name]

        spectra = LayerSpectra()
        lp = plan_layer(layer, read_once, config, planned, spectra)
        if timer is not None and config.plan_file:
            lp = measure_plan(layer, lp, timer)  # --plan replays exactly: time it, never re-select
        elif timer is not None:
            lp = select_by_latency(layer, lp, timer, config.min_speedup, _round_multiples(config))
        factors = None
        if lp.decomposed and not layer.shared_weight:
            factors = decompose_layer(layer, lp, read_once(layer.weight_name or ""), config.hooi_iters, spectra)
        return lp, factors

    total = len(layers)
    results: list[tuple[LayerPlan, LayerFactors | None]] = []
    if progress is not None and total:
        progress(layers[0].layer_id, 0, total)
    with single_threaded_lapack():  # the same thread counts for every --jobs: identical results
        if config.jobs > 1 and total > 1 and timer is None:
            with ThreadPoolExecutor(max_workers=config.jobs, thread_name_prefix="onnx-tucker") as pool:
                for i, res in enumerate(pool.map(work, layers)):
                    results.append(res)
                    if progress is not None:
                        progress(layers[min(i + 1, total - 1)].layer_id, i + 1, total)
        else:
            for i, layer in enumerate(layers):
                results.append(work(layer))
                if progress is not None:
                    progress(layers[min(i + 1, total - 1)].layer_id, i + 1, total)

    plan = finish_plan(layers, [lp for lp, _ in results], config)
    fraction = _data_fraction(config) if planned is not None and not config.plan_file else None
    if fraction is not None:  # allocated for a MAC budget: does the plan, as applied, still meet it?
        option = f"--ranks {config.ranks}" if config.ranks.method == "data" else f"--target {config.target}"
        plan = replace(plan, budget_check=check_mac_budget(option, fraction, plan.layers))
    replacements: dict[int, Replacement] = {}
    shared: dict[tuple[object, ...], LayerFactors] = {}
    new_plans: list[LayerPlan] = []
    for layer, lp, (_, factors) in zip(layers, plan.layers, results, strict=True):
        if not lp.decomposed:
            new_plans.append(lp)
            continue
        if factors is None:
            # Layers sharing a weight (and the way it is factorised) share one decomposition.
            key = (layer.weight_name or "", lp.kind, lp.ranks or (), handler_for(layer).factorisation_key(layer))
            factors = shared.get(key)
            if factors is None:
                factors = decompose_layer(layer, lp, read_weight(layer.weight_name or ""), config.hooi_iters)
                shared[key] = factors
        replacements[layer.node_index] = Replacement(layer, factors)
        new_plans.append(replace(lp, rel_error=factors.rel_error))
    return replace(plan, layers=tuple(new_plans), budget=budget), replacements


def _budget_plan(
    prep: _Prepared, config: CompressionConfig, target: BudgetTarget, read_weight: Callable[[str], np.ndarray],
    timer: LayerTimer | None, evaluator: Evaluator | None = None, progress: Progress | None = None,
) -> tuple[PlannedRanks, BudgetOutcome]:
    """Ranks for the whole model meeting `target` (planning/budget.py), as a plan to replay."""
    if target.metric == "agreement":
        samples = (0, 0)
        if evaluator is None:
            evaluator, samples = _agreement_evaluator(prep, config, progress)
        return agreement_budget_plan(prep.layers, read_weight, config, target, evaluator, samples)
    if target.metric == "latency":
        assert timer is not None
        inner = getattr(timer, "inner", timer)
        measure_original = inner.measure_original if isinstance(inner, OrtLayerTimer) else None
        return latency_budget_plan(prep.layers, read_weight, config, target, timer, measure_original)
    # params: every float parameter of the model counts (biases, BN, ...); macs: the layers' MACs.
    total = float_parameter_count(prep.model, prep.index.folder) if target.metric == "params" else None
    return budget_plan(prep.layers, read_weight, config, target, total, timer)


def _agreement_evaluator(prep: _Prepared, config: CompressionConfig,
                         progress: Progress | None = None) -> tuple[Evaluator, tuple[int, int]]:
    """Top-1 agreement of a candidate plan's model with the original on one half of `config.data`
    (split at random with `config.seed`: folders sorted by class would give class-disjoint halves).
    `progress("agreement search", evaluations done, at most)` after each model evaluation."""
    assert config.data is not None
    data = load_for_model(config.data, prep.model, config.samples)
    if data.count < 2:
        raise UsageError(f"--data {config.data}: {data.count} sample(s); --target agreement:F needs at least 2 (half held out)")
    search, held_out = data.split(config.seed, data.count // 2)
    halves = {"search": search, "held-out": held_out}
    plain = replace(config, target=None, plan_file=None, latency_aware=False, validate=False)
    prep.materialize(prep.model)  # onnxruntime runs the original from memory below
    most, done = LATENCY_SEARCH_STEPS + 2, [0]  # the bisection's bound (planning/budget.py)
    if progress is not None:
        progress("agreement search", 0, most)

    def evaluate(planned: PlannedRanks, which: str) -> float:
        _, replacements = _plan_and_decompose(prep, plain, None, None, None, planned)
        model = rewrite(prep.model, replacements, prep.base_dir).to_proto()
        prep.materialize(model)
        v = validate_models(prep.path or prep.model, model, prep.input_shapes, data=halves[which])
        top1 = v.outputs[0].top1_agreement if v.outputs else None
        if v.nonfinite:
            raise OnnxTuckerError(f"--target agreement: {v.nonfinite[0].nonfinite_text} on --data {config.data}; "
                                  "fix the model's weights or the data (agreement of NaN scores means nothing)")
        if top1 is None:
            raise UsageError(f"--target agreement: the model's first output {v.outputs[0].name!r} is not class scores "
                             "(samples x classes); agreement needs a classifier")
        done[0] += 1
        if progress is not None:
            progress("agreement search", min(done[0], most), most)
        return top1

    return evaluate, (search.count, held_out.count)


def _round_multiples(config: CompressionConfig) -> tuple[int, ...]:
    """The rank multiples latency-aware selection tries: --round-to when given, else 8 and 16."""
    return (config.round_to,) if config.round_to > 1 else DEFAULT_ROUND_MULTIPLES


def _layer_timer(prep: _Prepared, config: CompressionConfig, timer: LayerTimer | None) -> CachedLayerTimer | None:
    """The cached per-layer timer latency-aware selection uses (onnxruntime unless one is given)."""
    if not config.latency_aware and not (config.target is not None and config.target.metric == "latency"):
        return None
    inner = timer if timer is not None else OrtLayerTimer(opset_version(prep.model), config.threads, seed=config.seed)
    return CachedLayerTimer(inner)


def _latency_summary(
    prep: _Prepared, config: CompressionConfig, timer: CachedLayerTimer, profile_runs: int
) -> LatencySummary:
    """The timer's bookkeeping and, in onnxruntime, the sum of every layer's isolated original time
    against the kernels of a whole-model profile of the original."""
    summary = LatencySummary(config.threads, config.min_speedup, timer.measured, timer.lookups,
                             timed_only=bool(config.plan_file))
    inner = timer.inner
    if not isinstance(inner, OrtLayerTimer) or profile_runs < 1:
        return summary
    times = [inner.measure_original(lay) for lay in prep.layers if lay.weight_shape is not None and lay.node_index >= 0]
    isolated = [t for t in times if t is not None]
    profile = profile_layer_times(prep.path or prep.model, prep.model, prep.input_shapes, config.threads, profile_runs, config.seed)
    profiled, layout = profiled_layer_ms(profile)
    return replace(summary, isolated_ms=float(sum(isolated)), profiled_ms=profiled, layout_ms=layout,
                   profile_runs=profile_runs, layers_summed=len(isolated))


def _finetune_step(original: onnx.ModelProto, in_path: str | None, compressed: onnx.ModelProto, step: FinetuneStep,
                   progress: Callable[[str, Any], None] | None) -> tuple[onnx.ModelProto, FinetuneResult]:
    """`compress --finetune`: the in-memory compressed model through `finetune()` in a private temporary
    folder (its checkpoint included), the fine-tuned model back in memory."""
    import tempfile

    from .training import finetune as run_finetune

    with tempfile.TemporaryDirectory(prefix="onnx-tucker-finetune-") as tmp:
        src = Path(tmp) / "compressed.onnx"
        onnx.save(compressed, str(src))
        teacher: str | None = None
        if step.teacher_is_original:
            teacher = in_path
            if teacher is None:
                teacher = str(Path(tmp) / "original.onnx")
                onnx.save(original, teacher)
        out = Path(tmp) / "finetuned.onnx"
        cfg = replace(step.config, checkpoint=str(Path(tmp) / "finetune.pt"), resume=False)
        res = run_finetune(src, out, step.data, teacher=teacher, val_data=step.val_data, config=cfg, progress=progress)
        model = onnx.load(str(out))
    return model, replace(res, input_path="(compressed in memory)", output_path=None, checkpoint="")


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
) -> CompressionPlan:
    """The plan `compress` would apply (ranks, costs and kernel errors), without rewriting anything.
    `save_plan` / `report`: also write the plan file / the JSON report (atomically, together).
    `timer`: how layers are timed under `config.latency_aware` (default: onnxruntime CPU, which is
    then also checked against a whole-model profile of `profile_runs` runs). `evaluator`: how a candidate
    plan's agreement is measured under `--target agreement:F` (default: onnxruntime on `config.data`)."""
    config = config or CompressionConfig()
    in_path = None if isinstance(model_or_path, onnx.ModelProto) else str(model_or_path)
    check_output_paths(in_path, {"--save-plan": save_plan, "--report": report})
    prep = _prepare(model_or_path, config)
    layer_timer = _layer_timer(prep, config, timer)
    p, _ = _plan_and_decompose(prep, config, progress, layer_timer, evaluator, _planned_ranks(prep, config, progress))
    # Parameters as `compress` counts them (every float parameter), so inspect and compress agree.
    p = replace(p, model_params=float_parameter_count(prep.model, prep.index.folder))
    if layer_timer is not None:
        p = replace(p, latency=_latency_summary(prep, config, layer_timer, profile_runs))
    with OutputBatch() as batch:
        if save_plan is not None:
            batch.add_text(save_plan, p.to_json())
        if report is not None:
            batch.add_text(report, result_json(p))
        batch.commit()
    return p


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
    finetune_progress: Callable[[str, Any], None] | None = None,
) -> CompressionResult:
    """Compress a model; write it to `output` unless validation fails.

    `finetune`: fine-tune the compressed (and calibrated) model before validating and writing it
    (torch + onnx2torch, imported only then); `result.finetune` says how it went.

    `bench`: also time both models in onnxruntime (`result.latency`). `save_plan`, `report`, `markdown`:
    also write the plan file, the JSON report, the Markdown report. Every path is checked before any
    work (never the input, no two outputs the same file); all files appear together or not at all.
    A model in which no layer is decomposed is still written (unchanged); check
    `result.decomposed_layers`. When validation fails the model is not written (`output_path` is None;
    the side files are, so the user can see why) and `result.validation_error()` says so.
    `timer`, `profile_runs`, `evaluator`: as for `plan`.
    """
    config = config or CompressionConfig()
    t0 = time.perf_counter()
    in_path = None if isinstance(model_or_path, onnx.ModelProto) else str(model_or_path)
    check_output_paths(in_path, {"OUT": output, "--save-plan": save_plan, "--report": report, "--markdown": markdown})
    prep = _prepare(model_or_path, config)
    layer_timer = _layer_timer(prep, config, timer)
    p, replacements = _plan_and_decompose(prep, config, progress, layer_timer, evaluator,
                                          _planned_ranks(prep, config, progress))
    params_before = float_parameter_count(prep.model, prep.index.folder)
    p = replace(p, model_params=params_before)  # the plan's totals count what the summary below counts
    if layer_timer is not None:
        p = replace(p, latency=_latency_summary(prep, config, layer_timer, profile_runs))
    rewritten = rewrite(prep.model, replacements, prep.base_dir)
    if not config.calibrate:
        del replacements  # the factor arrays live on in `rewritten` (wrapped, not copied)
    new_model: onnx.ModelProto | IRModel
    if rewritten.over_protobuf_limit():
        # Too big for one protobuf: stays an onnx-ir model, written straight from its arrays (and the
        # input's file) as external data; checked and counted through a skeleton without the weights.
        skeleton = rewritten.skeleton()
        check_rewrite(prep.model, skeleton)
        new_model = rewritten
    else:
        new_model = skeleton = rewritten.to_proto()
        check_rewrite(prep.model, new_model)
        # Weights kept as they were come back from the file now (most are gone when decomposed).
        prep.materialize(new_model)
    calibration = None
    layer_calibration: dict[str, LayerCalibration] = {}
    if config.calibrate:  # refit the factors on data, in place, before validating and writing
        if isinstance(new_model, IRModel):
            raise UsageError(
                f"--calibrate {config.calibrate}: the compressed model is over 2 GB, which calibration cannot "
                "run in memory; compress without --calibrate"
            )
        prep.materialize(prep.model)
        layer_calibration, calibration = calibrate_from_config(prep.model, new_model, replacements, p, prep.input_shapes,
                                                               config, progress)
        del replacements
    finetuned = None
    if finetune is not None:
        if isinstance(new_model, IRModel):
            raise UsageError(f"--finetune {finetune.data}: the compressed model is over 2 GB, which fine-tuning cannot "
                             "load; compress first, then run `onnx-tucker finetune` on the written model")
        prep.materialize(prep.model)
        new_model, finetuned = _finetune_step(prep.model, in_path, new_model, finetune, finetune_progress)
        skeleton = new_model

    validation = None
    # onnxruntime reads the original from its file (its weights were loaded lazily: no copy of them).
    original = in_path or prep.model
    if config.validate:
        # Real data whenever given: without --data, the --calibrate images (random inputs say nothing of accuracy).
        # (capped as calibration is, so that a big folder costs no more than the refit read)
        real = config.data or config.calibrate
        limit = config.samples if config.data or config.samples else config.calibration_samples
        data = load_for_model(real, prep.model, limit, config.preprocess) if real else None
        validation = validate_models(
            original, new_model, prep.input_shapes, config.samples, config.seed, config.effective_rtol(lowest_float_eps(prep.model)), data,
            progress,
        )
    latency = None
    if bench is not None:
        latency = measure_latency(
            original, new_model, prep.model, prep.input_shapes, bench.threads, bench.warmup, bench.runs, config.seed
        )
    plan_totals = p.totals()
    totals = ModelTotals(
        params_before=params_before,
        params_after=float_parameter_count(skeleton),
        macs_before=plan_totals["macs_before"],
        macs_after=plan_totals["macs_after"],
        size_before=size_on_disk(in_path, prep.model) if in_path else serialized_size(prep.model),
        size_after=new_model.estimated_size() if isinstance(new_model, IRModel) else serialized_size(new_model),
    )
    passed = validation is None or validation.passed
    result = CompressionResult(
        plan=p,
        model=new_model,
        totals=totals,
        validation=validation,
        input_path=in_path,
        output_path=str(output) if output is not None and passed else None,
        seconds=time.perf_counter() - t0,
        latency=latency,
        requested_output=str(output) if output is not None else None,
        calibration=calibration,
        finetune=finetuned,
        layer_calibration=layer_calibration,
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


def _load_pair(
    original: ModelLike, compressed: ModelLike, input_shapes: tuple[tuple[str, tuple[int, ...]], ...]
) -> tuple[onnx.ModelProto, onnx.ModelProto, dict[str, tuple[int, ...]]]:
    """Both models (loaded and checked when given as paths) and the original's resolved input shapes.

    Loaded lazily (big weights stay in their files): the models are only checked and read for their
    inputs here; onnxruntime gets the files themselves (`_runnable`), so a pair over 2 GB costs no
    protobuf copy of its weights."""
    orig = original if isinstance(original, onnx.ModelProto) else load_model(original, lazy=True)
    comp = compressed if isinstance(compressed, onnx.ModelProto) else load_model(compressed, lazy=True)
    source = "model" if isinstance(original, onnx.ModelProto) else str(original)
    _check_same_signature(orig, comp, source, "the compressed model" if isinstance(compressed, onnx.ModelProto) else str(compressed))
    return orig, comp, resolve_input_shapes(orig, dict(input_shapes), source)


def _runnable(given: ModelLike, loaded: onnx.ModelProto) -> ModelLike:
    """What onnxruntime loads: the file when one was given (its weights were loaded lazily)."""
    return loaded if isinstance(given, onnx.ModelProto) else str(given)


def _paths(*models: ModelLike) -> list[str]:
    return [str(m) for m in models if not isinstance(m, onnx.ModelProto)]


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
    orig, comp, shapes = _load_pair(original, compressed, b.inputs.input_shapes)
    latency = measure_latency(
        _runnable(original, orig), _runnable(compressed, comp), orig, shapes, b.threads, b.warmup, b.runs, b.inputs.seed
    )
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
    orig, comp, shapes = _load_pair(original, compressed, v_cfg.input_shapes)
    data = load_for_model(v_cfg.data, orig, v_cfg.samples, v_cfg.preprocess) if v_cfg.data else None
    v = validate_models(
        _runnable(original, orig), _runnable(compressed, comp), shapes, v_cfg.samples, v_cfg.seed,
        v_cfg.effective_rtol(lowest_float_eps(orig), full_rank), data, progress,
    )
    if report is not None:
        write_text_atomic(report, json.dumps({"validation": validation_dict(v)}, indent=2) + "\n")
    return v


# ---- the mobile validation report (issue 10) --------------------------------------------------------


Signature = list[tuple[str, int, tuple[int | None, ...]]]


def _signature(model: onnx.ModelProto) -> tuple[Signature, Signature]:
    """(inputs, outputs) as (name, element type, dims; None for a symbolic or unknown one): what must
    match between a model and its compressed version (compression changes none of it)."""
    from .graph.protos import graph_input_names

    real = set(graph_input_names(model))

    def sig(values) -> Signature:  # type: ignore[no-untyped-def]
        return [(v.name, v.type.tensor_type.elem_type,
                 tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
                       for d in v.type.tensor_type.shape.dim))
                for v in values]

    return sig([i for i in model.graph.input if i.name in real]), sig(model.graph.output)


def _same(a: Signature, b: Signature) -> bool:
    """Same names, types and ranks, and the same size wherever both models fix a dimension."""
    return len(a) == len(b) and all(
        na == nb and ta == tb and len(da) == len(db) and all(x is None or y is None or x == y for x, y in zip(da, db, strict=True))
        for (na, ta, da), (nb, tb, db) in zip(a, b, strict=True))


def _check_same_signature(orig: onnx.ModelProto, comp: onnx.ModelProto, original: str, compressed: str) -> None:
    """Two unrelated models (another network, another input size) are a usage error, said before any run."""
    for what, a, b in zip(("inputs", "outputs"), _signature(orig), _signature(comp), strict=True):
        if not _same(a, b):
            def show(s: Signature) -> str:
                return ", ".join(
                    f"{n} ({onnx.TensorProto.DataType.Name(t).lower()} [{','.join('?' if d is None else str(d) for d in ds)}])"
                    for n, t, ds in s) or "none"

            raise UsageError(
                f"{compressed}: its {what} [{show(b)}] differ from those of {original} [{show(a)}]; "
                "give the compressed version of that very model"
            )


def mobile_report(
    original: PathLike,
    compressed: PathLike,
    config: CompressionConfig | None = None,
    *,
    runtimes: str | list[str] | tuple[str, ...] | None = None,
    bench_config: BenchConfig | None = None,
    timeout: float = 120.0,
    rtol: float = 1e-2,
    layer_plan: CompressionPlan | None = None,
    html: PathLike | None = None,
    markdown: PathLike | None = None,
    report: PathLike | None = None,
    json_path: PathLike | None = None,
    progress: Progress | None = None,
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
    before each runtime runs (and once at the end).
    """
    from .mobile.build import parse_runtimes, run_runtimes
    from .mobile.inputs import mobile_inputs, model_macs
    from .mobile.results import MobileReport
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
    orig = load_model(original)
    comp = load_model(compressed)
    _check_same_signature(orig, comp, str(original), str(compressed))
    shapes = resolve_input_shapes(orig, dict(config.input_shapes), str(original))
    inputs, batch_size = mobile_inputs(orig, shapes, config)
    given = layer_plan is not None
    layers = layer_plan if layer_plan is not None else plan(original, replace(config, validate=False))
    plan_source = ("as compressed" if given else f"plan file {config.plan_file}" if config.plan_file
                   else "re-planned from the original with the given options")
    comp_nodes = {(n.name, n.op_type) for n in comp.graph.node}
    mismatch = tuple(p.name for p in layers.layers if p.decomposed and (p.name, p.op_type) in comp_nodes)
    plan_totals = layers.totals()
    totals = ModelTotals(
        params_before=float_parameter_count(orig), params_after=float_parameter_count(comp),
        macs_before=plan_totals["macs_before"], macs_after=model_macs(comp, shapes),
        size_before=size_on_disk(original, orig), size_after=size_on_disk(compressed, comp),
    )
    results = run_runtimes(names, str(original), str(compressed), inputs, batch_size,
                           tuple(o.name for o in orig.graph.output), shapes, b.threads, b.warmup, b.runs, timeout, progress)
    rep = MobileReport(
        original_path=str(original), compressed_path=str(compressed), input_shapes=shapes,
        source="random" if (config.data or config.calibrate) is None else str(config.data or config.calibrate),
        samples=inputs.count,
        seed=config.seed, threads=b.threads, totals=totals, plan=layers, plan_source=plan_source,
        plan_mismatch=mismatch, runtimes=results, rtol=rtol, labels=inputs.labels is not None,
    )
    with OutputBatch() as batch:
        if html is not None:
            batch.add_text(html, mobile_html(rep))
        if markdown is not None:
            batch.add_text(markdown, mobile_markdown(rep))
        if json_path is not None:
            batch.add_text(json_path, mobile_json(rep))
        batch.commit()
    return rep
