"""The pipeline as library calls: load -> plan -> decompose -> rewrite -> validate -> save.

`compress()` is what `onnx-tucker compress` runs; `plan()` is `onnx-tucker inspect`.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from .config import CompressionConfig
from .errors import ModelLoadError
from .graph import lazyload
from .graph.fold import float_parameter_count
from .graph.load import check_model, load_model
from .graph.model import ModelIndex, find_layers, infer_shapes, resolve_input_shapes
from .graph.rewrite import Replacement, apply_replacements
from .graph.save import check_output_path, save_model
from .numerics.spectral import LayerSpectra, single_threaded_lapack
from .ops.layer import Layer, LayerFactors, factorised_as
from .plan.calibrate import CalibrationSummary, calibrate_from_config
from .plan.decompose import decompose_layer
from .plan.planner import (
    CompressionPlan,
    LayerPlan,
    check_plan_covers,
    finish_plan,
    load_plan_file,
    plan_layer,
)
from .runtime.bench import LatencyReport, measure_latency
from .runtime.validate import ValidationReport, load_validation_data, validate_models

ModelLike = onnx.ModelProto | str | os.PathLike[str]
Progress = Callable[[str, int, int], None]  # (layer name, done, total)


@dataclass(frozen=True)
class ModelTotals:
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    size_before: int
    size_after: int

    @staticmethod
    def _ratio(a: int, b: int) -> float:
        return a / b if b else float("inf")

    @property
    def params_ratio(self) -> float:
        return self._ratio(self.params_before, self.params_after)

    @property
    def macs_ratio(self) -> float:
        return self._ratio(self.macs_before, self.macs_after)

    @property
    def size_ratio(self) -> float:
        return self._ratio(self.size_before, self.size_after)


@dataclass(frozen=True)
class CompressionResult:
    plan: CompressionPlan
    model: onnx.ModelProto = field(repr=False)
    totals: ModelTotals
    validation: ValidationReport | None
    input_path: str | None = None
    output_path: str | None = None
    seconds: float = 0.0
    calibration: CalibrationSummary | None = None  # compress --calibrate: the whole model on held-out data

    @property
    def decomposed_layers(self) -> int:
        return len(self.plan.decomposed)


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
        w, x = lay.weight_shape, lay.input_shape
        if w is None or x is None or not x:
            continue
        what, have, want = "", None, None
        if lay.op_type == "Conv" and len(w) >= 3:
            if len(x) != len(w):
                what, have, want = "rank", len(x), len(w)
            elif x[1] is not None:
                what, have, want = "channels", x[1], w[1] * int(lay.attrs.get("group", 1))  # type: ignore[call-overload]
        elif lay.op_type == "Gemm" and len(w) == 2 and len(x) == 2:
            k = x[0] if int(lay.attrs.get("transA", 0)) else x[1]  # type: ignore[call-overload]
            what, have, want = "K", k, w[1] if int(lay.attrs.get("transB", 0)) else w[0]  # type: ignore[call-overload]
        elif lay.op_type == "MatMul" and len(w) == 2:
            what, have, want = "K", x[-1], w[0]
        if have is not None and have != want:
            raise ModelLoadError(
                f"{source}: node '{lay.layer_id}' ({lay.op_type}) has weight {list(w)} expecting input {what} {want}, "
                f"but its input {list(x)} has {have}; the model is inconsistent (onnxruntime would fail at run "
                "time): re-export it"
            )


def _plan_and_decompose(
    prep: _Prepared, config: CompressionConfig, progress: Progress | None
) -> tuple[CompressionPlan, dict[int, Replacement]]:
    """Plan every layer and decompose the ones that gain, one layer at a time (or `config.jobs` at once).

    Each layer is planned and decomposed in one go: its weight is read once, the Gram matrices and
    their eigendecompositions computed for EVBMF are reused for the factors (`LayerSpectra`), and all
    of it is dropped before the next layer, so at most `jobs` weights are in memory beside the model.
    Layers run in threads (numpy/LAPACK release the GIL); the results are assembled in graph order and
    are identical to a serial run. Layers whose weight feeds other nodes are decomposed afterwards,
    once the whole plan has decided whether they can share one factorisation.
    """
    planned = load_plan_file(config.plan_file) if config.plan_file else None
    layers = prep.layers
    check_plan_covers(layers, planned)
    read_lock = threading.Lock()

    def read_weight(name: str) -> np.ndarray:
        t = prep.index.initializers.get(name)
        if t is not None and prep.base_dir is not None and lazyload.is_external(t):
            try:
                return lazyload.read_array(t, prep.base_dir)  # straight from the file, one copy
            except (TypeError, ValueError):  # exotic dtypes (bfloat16, ...): onnx's own reader
                return numpy_helper.to_array(t, prep.base_dir)
        with read_lock:  # protobuf reads and constant folding stay on one thread at a time
            return prep.index.constant_value(name)

    def work(layer: Layer) -> tuple[LayerPlan, LayerFactors | None]:
        weights: dict[str, np.ndarray] = {}

        def read_once(name: str) -> np.ndarray:
            if name not in weights:
                weights[name] = read_weight(name)
            return weights[name]

        spectra = LayerSpectra()
        lp = plan_layer(layer, read_once, config, planned, spectra)
        factors = None
        if lp.decomposed and not layer.shared_weight:
            factors = decompose_layer(layer, lp, read_once(layer.weight_name or ""), config.hooi_iters, spectra)
        return lp, factors

    total = len(layers)
    results: list[tuple[LayerPlan, LayerFactors | None]] = []
    if progress is not None and total:
        progress(layers[0].layer_id, 0, total)
    with single_threaded_lapack():  # the same thread counts for every --jobs: identical results
        if config.jobs > 1 and total > 1:
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
    replacements: dict[int, Replacement] = {}
    shared: dict[tuple[object, ...], LayerFactors] = {}
    new_plans: list[LayerPlan] = []
    for layer, lp, (_, factors) in zip(layers, plan.layers, results, strict=True):
        if not lp.decomposed:
            new_plans.append(lp)
            continue
        if factors is None:
            # Layers sharing a weight (and the way it is factorised) share one decomposition.
            key = (layer.weight_name or "", lp.kind, lp.ranks or (), factorised_as(layer))
            factors = shared.get(key)
            if factors is None:
                factors = decompose_layer(layer, lp, read_weight(layer.weight_name or ""), config.hooi_iters)
                shared[key] = factors
        replacements[layer.node_index] = Replacement(layer, factors)
        new_plans.append(replace(lp, rel_error=factors.rel_error))
    return replace(plan, layers=tuple(new_plans)), replacements


def _float_params(model: onnx.ModelProto) -> int:
    # Counts folded weights too (ConstantOfShape, Cast, ...), each constant once as the graph reads it.
    return float_parameter_count(model)


def plan(model_or_path: ModelLike, config: CompressionConfig | None = None, progress: Progress | None = None) -> CompressionPlan:
    """The plan `compress` would apply (ranks, costs and kernel errors), without rewriting anything."""
    config = config or CompressionConfig()
    prep = _prepare(model_or_path, config)
    p, _ = _plan_and_decompose(prep, config, progress)
    return p


def compress(
    model_or_path: ModelLike,
    config: CompressionConfig | None = None,
    output: str | os.PathLike[str] | None = None,
    progress: Progress | None = None,
) -> CompressionResult:
    """Compress a model; write it to `output` (atomically) unless validation fails.

    A model in which no layer is decomposed is still written (unchanged); check
    `result.decomposed_layers`. When validation fails the result is returned with
    `output_path=None` and nothing is written.
    """
    config = config or CompressionConfig()
    t0 = time.perf_counter()
    in_path = None if isinstance(model_or_path, onnx.ModelProto) else str(model_or_path)
    if output is not None:
        check_output_path(output, in_path)
    prep = _prepare(model_or_path, config)
    p, replacements = _plan_and_decompose(prep, config, progress)
    new_model = apply_replacements(prep.model, replacements)
    # Weights kept as they were come back from the file now (most are gone when decomposed).
    prep.materialize(new_model)
    calibration = None
    if config.calibrate:  # refit the factors on data, in place, before validating and writing
        prep.materialize(prep.model)
        p, calibration = calibrate_from_config(prep.model, new_model, replacements, p, prep.input_shapes, config, progress)

    report = None
    if config.validate:
        prep.materialize(prep.model)
        data = load_validation_data(config.data, prep.model, config.samples) if config.data else None
        report = validate_models(
            prep.model, new_model, prep.input_shapes, config.samples, config.seed, config.effective_rtol, data
        )
    known = [lp for lp in p.layers if lp.macs_before is not None]
    size_before = Path(in_path).stat().st_size if in_path else prep.model.ByteSize()
    totals = ModelTotals(
        params_before=float_parameter_count(prep.model, prep.index.folder),  # reuses the folded shapes
        params_after=_float_params(new_model),
        macs_before=sum(lp.macs_before or 0 for lp in known),
        macs_after=sum(lp.macs_after if lp.macs_after is not None else (lp.macs_before or 0) for lp in known),
        size_before=size_before,
        size_after=new_model.ByteSize(),
    )
    written = None
    if output is not None and (report is None or report.passed):
        written = str(save_model(new_model, output, in_path))
    return CompressionResult(
        plan=p,
        model=new_model,
        totals=totals,
        validation=report,
        input_path=in_path,
        output_path=written,
        seconds=time.perf_counter() - t0,
        calibration=calibration,
    )


def _load_pair(
    original: ModelLike, compressed: ModelLike, config: CompressionConfig
) -> tuple[onnx.ModelProto, onnx.ModelProto, dict[str, tuple[int, ...]]]:
    """Both models (loaded and checked when given as paths) and the original's resolved input shapes."""
    orig = original if isinstance(original, onnx.ModelProto) else load_model(original)
    comp = compressed if isinstance(compressed, onnx.ModelProto) else load_model(compressed)
    source = "model" if isinstance(original, onnx.ModelProto) else str(original)
    return orig, comp, resolve_input_shapes(orig, dict(config.input_shapes), source)


def bench(
    original: ModelLike,
    compressed: ModelLike,
    config: CompressionConfig | None = None,
    threads: int = 1,
    warmup: int = 5,
    runs: int = 20,
) -> LatencyReport:
    """Latency of both models in onnxruntime CPU, interleaved (see `onnx_tucker.bench`)."""
    config = config or CompressionConfig()
    orig, comp, shapes = _load_pair(original, compressed, config)
    return measure_latency(orig, comp, orig, shapes, threads, warmup, runs, config.seed)


def validate(
    original: ModelLike,
    compressed: ModelLike,
    config: CompressionConfig | None = None,
) -> ValidationReport:
    """Compare two models with the same inputs and outputs on seeded random inputs."""
    config = config or CompressionConfig()
    orig, comp, shapes = _load_pair(original, compressed, config)
    data = load_validation_data(config.data, orig, config.samples) if config.data else None
    return validate_models(orig, comp, shapes, config.samples, config.seed, config.effective_rtol, data)
