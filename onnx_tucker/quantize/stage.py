"""Static INT8 post-training quantization of a float model with onnxruntime's quantizer.

`quantize_int8(model, data, config, layers)`: the model refused if it is quantized already; then in a
temporary folder onnxruntime's pre-processing (`quant_pre_process`: shape inference and its basic
graph optimisations) and `quantize_static` (QDQ format, per-channel INT8 weights, INT8 activations
whose ranges are calibrated on `data` by `config.method`), nodes matching `--quantize-exclude` kept in
FP32. Each chain of `layers` (the decomposed layers, or every layer of an uncompressed model) is then
measured on the data: its SQNR alone (the INT8 chain fed the FP32 chain input, against the FP32 chain
output: which chains quantize badly) and cumulative (its output in the INT8 model against the FP32
model's). Under `--quantize-min-sqnr DB` the chains below DB are kept in FP32 and the model quantized
again, the reason recorded. Last, unless `--quantize-keep-names`, the quantizer's long tensor names are
shortened and identical constants shared (`graph/compact.py`: the same computation, a smaller file). Failures name the node and op (`QuantizeError`, exit code 2).
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import re
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx

from ..config import QuantizeConfig
from ..data import DataSet
from ..errors import QuantizeError, first_line
from ..graph.compact import compact_names
from ..graph.optypes import is_op, is_quantize
from ..ops.registry import is_quantized_layer
from ..runtime.session import ort_session
from ..runtime.validate import data_batches
from .chains import Chain, SqnrSum, excluded_nodes, find_chains
from .reader import DataSetReader

SQNR_SAMPLES = 256  # calibration samples the SQNR is measured on (the first ones of the data)


@dataclass(frozen=True)
class ChainError:
    """One chain's quantization error on the calibration data, in dB (inf: exact). `sqnr_db`: the INT8
    chain alone, fed the FP32 chain input; `cumulative_sqnr_db`: its output in the INT8 model against
    the FP32 model (every earlier chain's error included). `fp32_reason`: why it is kept in FP32."""

    name: str
    nodes: tuple[str, ...]
    output: str
    sqnr_db: float | None
    cumulative_sqnr_db: float | None
    fp32_reason: str | None = None

    @property
    def quantized(self) -> bool:
        return self.fp32_reason is None


@dataclass(frozen=True)
class QuantizeResult:
    """The INT8 model (QDQ) and how it was made and how far it is from FP32 on the calibration data."""

    model: onnx.ModelProto = field(repr=False)
    method: str
    data: str  # the path of the calibration data
    data_option: str  # --calibrate or --data
    samples: int  # calibration samples
    sqnr_samples: int
    chains: tuple[ChainError, ...]
    fp32_nodes: tuple[str, ...]  # nodes_to_exclude as given to onnxruntime
    output_sqnr_db: Mapping[str, float]  # each model output, INT8 against FP32
    qdq_nodes: int  # QuantizeLinear + DequantizeLinear nodes in the INT8 model
    seconds: float
    notes: tuple[str, ...] = ()

    @property
    def fp32_chains(self) -> tuple[ChainError, ...]:
        return tuple(c for c in self.chains if not c.quantized)


def check_float_model(model: onnx.ModelProto, source: str) -> None:
    """Refuse a model that is quantized already (QuantizeLinear/DequantizeLinear, QLinearConv, ConvInteger,
    ...), naming the first such node: quantizing it again would stack a second set of scales."""
    for node in model.graph.node:
        if is_quantize(node) or is_quantized_layer(node.op_type):
            raise QuantizeError(
                f"{source}: node '{node.name or node.output[0]}' ({node.op_type}) is quantized already; --quantize int8 "
                "quantizes float models only: give the FP32 model")


def _ort_quiet():  # type: ignore[no-untyped-def]
    """onnxruntime's quantizer logs (and prints) progress and warnings; the report says what matters."""
    stack = contextlib.ExitStack()
    stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    stack.callback(root.setLevel, level)
    return stack


def _failed_node(model: onnx.ModelProto, message: str) -> onnx.NodeProto | None:
    """The node an onnxruntime error names (by node name, else by a tensor it reads or writes)."""
    named = [n for n in model.graph.node if n.name and n.name in message]
    if named:
        return max(named, key=lambda n: len(n.name))
    tensors = [(t, n) for n in model.graph.node for t in (*n.output, *n.input) if t and t in message]
    return max(tensors, key=lambda p: len(p[0]))[1] if tensors else None


def _quantizer_error(model: onnx.ModelProto, e: BaseException, what: str) -> QuantizeError:
    msg = first_line(e)
    node = _failed_node(model, str(e))
    if node is None:
        return QuantizeError(f"{what}: onnxruntime's quantizer failed ({msg}); keep the failing layers in FP32 with "
                             "--quantize-exclude REGEX, or run without --quantize")
    name = node.name or node.output[0]
    return QuantizeError(f"{what}: onnxruntime's quantizer failed on node '{name}' ({node.op_type}): {msg}; keep it in "
                         f"FP32 with --quantize-exclude '{re.escape(name)}'")


def _pre_process(src: str, dst: str) -> str | None:
    """onnxruntime's pre-processing; a model its symbolic shape inference refuses gets onnx's (the note)."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        with _ort_quiet():
            quant_pre_process(src, dst)
        return None
    except Exception as e:  # noqa: BLE001 - onnxruntime raises several unrelated exception types
        with _ort_quiet():
            quant_pre_process(src, dst, skip_symbolic_shape=True)
        return f"onnxruntime's symbolic shape inference failed ({first_line(e)}); onnx's shape inference was used"


# The entropy calibration's histogram: 2048 bins (onnxruntime's own default for percentile) searched for
# the threshold whose 256 quantized levels (INT8's) lose the least KL divergence (TensorRT's method).
ENTROPY_BINS = 2048
ENTROPY_QUANTIZED_BINS = 256


def equal_batches(batches: Sequence[Mapping[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """`batches` as batches of one size: onnxruntime's histogram calibrators (entropy, percentile) stack
    every batch's activations into one array and fail on a last, shorter batch ("setting an array element
    with a sequence ... inhomogeneous shape"; onnxruntime issue #18792). Uneven batches are split into
    single samples; the samples and their order are unchanged."""
    sizes = {int(next(iter(b.values())).shape[0]) for b in batches}
    if len(sizes) <= 1:
        return [dict(b) for b in batches]
    return [{k: v[i:i + 1] for k, v in b.items()} for b in batches for i in range(int(next(iter(b.values())).shape[0]))]


def _quantize(pre_path: str, out_path: str, batches: Sequence[Mapping[str, np.ndarray]], method: str,
              exclude: Sequence[str]) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    if method != "minmax":
        batches = equal_batches(batches)
    with _ort_quiet(), tempfile.TemporaryDirectory(prefix="onnx-tucker-calib-") as tmp:
        cache = _entropy_ranges(pre_path, batches, tmp) if method == "entropy" else None
        quantize_static(pre_path, out_path, DataSetReader(batches), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                        calibrate_method=methods[method], nodes_to_exclude=list(exclude),
                        extra_options={"CalibTensorRangeSymmetric": False}, calibration_cache_path=cache)


def _entropy_ranges(pre_path: str, batches: Sequence[Mapping[str, np.ndarray]], tmp: str) -> str:
    """The entropy calibration's ranges, in a calibration cache `quantize_static` reads. Through
    `quantize_static` alone onnxruntime's entropy calibrator histograms each tensor in 128 bins and searches
    thresholds over 128 quantized bins: one candidate, the whole range, so "entropy" wrote byte for byte the
    minmax model (measured on Darknet Tiny, onnxruntime 1.32). Its own calibrator, given ENTROPY_BINS and
    ENTROPY_QUANTIZED_BINS, does the KL search it is named for."""
    from pathlib import Path

    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator, save_tensors_data
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    calibrator = create_calibrator(
        Path(pre_path), sorted(set(QLinearOpsRegistry) | set(QDQRegistry)),
        augmented_model_path=os.path.join(tmp, "augmented.onnx"), calibrate_method=CalibrationMethod.Entropy,
        extra_options={"symmetric": False, "num_bins": ENTROPY_BINS, "num_quantized_bins": ENTROPY_QUANTIZED_BINS})
    calibrator.collect_data(DataSetReader(batches))
    path = os.path.join(tmp, "entropy-ranges.json")
    save_tensors_data(calibrator.compute_data(), path)
    return path


def _with_outputs(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    for n in names:
        if n not in have:
            m.graph.output.append(onnx.helper.make_empty_tensor_value_info(n))
            have.add(n)
    return m


def _chain_outputs(fp32: onnx.ModelProto, int8: onnx.ModelProto, chains: Sequence[Chain]
                   ) -> tuple[dict[str, str], dict[str, str]]:
    """Each chain's output tensor in the INT8 model and the FP32 tensor it stands for. The INT8 one is
    what the next layer reads: the chain's last node's output after its QuantizeLinear/DequantizeLinear
    pair, when it has one (the quantizer drops a following Relu, whose clipping the quantization's
    range then does, and names the last node's output after the Relu's: the FP32 tensor of that name)."""
    int8_nodes = {n.name: n for n in int8.graph.node}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for n in int8.graph.node:
        for t in n.input:
            readers.setdefault(t, []).append(n)
    fp32_tensors = {t for n in fp32.graph.node for t in n.output}
    q_out, fp_out = {}, {}
    for c in chains:
        last = int8_nodes.get(c.nodes[-1])
        if last is None:
            continue
        y = last.output[0]
        dq = next((d for q in readers.get(y, []) if is_op(q, "QuantizeLinear")
                   for d in readers.get(q.output[0], []) if is_op(d, "DequantizeLinear")), None)
        q_out[c.name] = dq.output[0] if dq is not None else y
        fp_out[c.name] = q_out[c.name] if q_out[c.name] in fp32_tensors else y
    return q_out, fp_out


def _chain_errors(fp32: onnx.ModelProto, int8: onnx.ModelProto, chains: Sequence[Chain],
                  batches: Sequence[Mapping[str, np.ndarray]], reasons: Mapping[str, str]
                  ) -> tuple[list[ChainError], dict[str, float]]:
    """Each chain's SQNR alone and cumulative, and each model output's, summed over `batches`."""
    q_out, fp_out = _chain_outputs(fp32, int8, chains)
    fp32_tensors = {t for n in fp32.graph.node for t in n.output} | {i.name for i in fp32.graph.input}
    measured = [c for c in chains if c.name in q_out and fp_out[c.name] in fp32_tensors and c.input in fp32_tensors]
    model_outputs = [o.name for o in fp32.graph.output]
    wanted = sorted({fp_out[c.name] for c in measured} | {c.input for c in measured})
    s_fp = ort_session(_with_outputs(fp32, wanted).SerializeToString(), "FP32 (pre-processed)")
    s_q = ort_session(_with_outputs(int8, [q_out[c.name] for c in measured]).SerializeToString(), "INT8")
    typed = onnx.shape_inference.infer_shapes(int8)
    known = {v.name for v in (*typed.graph.value_info, *typed.graph.output, *typed.graph.input)}
    for c in measured:  # DequantizeLinear outputs onnx's inference leaves untyped: float, shape unknown
        if q_out[c.name] not in known:
            typed.graph.value_info.append(onnx.helper.make_tensor_value_info(q_out[c.name], onnx.TensorProto.FLOAT, None))
    extractor = onnx.utils.Extractor(typed)
    alone: dict[str, object] = {}
    for c in measured:
        try:
            sub = extractor.extract_model([c.input], [q_out[c.name]])
            alone[c.name] = ort_session(sub.SerializeToString(), f"INT8 chain {c.name}")
        except Exception:  # noqa: BLE001 - a chain that does not cut out alone keeps its cumulative SQNR only
            alone[c.name] = None
    fp_names = [o.name for o in s_fp.get_outputs()]
    q_names = [o.name for o in s_q.get_outputs()]
    single = {c.name: SqnrSum() for c in measured}
    total = {c.name: SqnrSum() for c in measured}
    outputs = {n: SqnrSum() for n in model_outputs}
    for feeds in batches:
        ref = dict(zip(fp_names, s_fp.run(fp_names, dict(feeds)), strict=True))
        new = dict(zip(q_names, s_q.run(q_names, dict(feeds)), strict=True))
        for n in model_outputs:
            outputs[n].add(ref[n], new[n])
        for c in measured:
            total[c.name].add(ref[fp_out[c.name]], new[q_out[c.name]])
            sess = alone[c.name]
            if sess is not None:
                got = sess.run(None, {c.input: ref[c.input]})[0]  # type: ignore[attr-defined]
                single[c.name].add(ref[fp_out[c.name]], got)
    errors = []
    for c in chains:
        ok = c in measured
        errors.append(ChainError(c.name, c.nodes, fp_out.get(c.name, c.output),
                                 single[c.name].db if ok and alone[c.name] is not None else None,
                                 total[c.name].db if ok else None, reasons.get(c.name)))
    return errors, {n: s.db for n, s in outputs.items()}


def quantize_int8(model: onnx.ModelProto, data: DataSet, config: QuantizeConfig, layers: Sequence[str],
                  input_shapes: Mapping[str, tuple[int, ...]], *, data_option: str = "--data",
                  source: str = "model") -> QuantizeResult:
    """`model` (float, in memory) quantized to INT8 on `data`; `layers`: the chains to measure (layer names)."""
    t0 = time.perf_counter()
    check_float_model(model, source)
    if model.ByteSize() > (2 << 30) - (1 << 20):
        raise QuantizeError(f"{source}: the model is over 2 GB, which onnxruntime's quantizer cannot load in one "
                            "protobuf; quantize a smaller model")
    batches = data_batches(data, input_shapes, model)
    sqnr_batches, taken = [], 0
    for b in batches:
        if taken >= SQNR_SAMPLES:
            break
        sqnr_batches.append(b)
        taken += next(iter(b.values())).shape[0]
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="onnx-tucker-int8-") as tmp:
        src, pre_path, out_path = (os.path.join(tmp, f) for f in ("fp32.onnx", "pre.onnx", "int8.onnx"))
        onnx.save(model, src)
        try:
            note = _pre_process(src, pre_path)
        except Exception as e:  # noqa: BLE001
            raise _quantizer_error(model, e, f"{source}: pre-processing") from None
        if note:
            notes.append(note)
        pre = onnx.load(pre_path)
        chains = find_chains(pre, layers)
        fp32_nodes, by_pattern = excluded_nodes(pre, chains, config.exclude)
        reasons = {c: f"--quantize-exclude {config.exclude!r} matches it" for c in by_pattern}

        def run(exclude: set[str]) -> onnx.ModelProto:
            try:
                _quantize(pre_path, out_path, batches, config.method, sorted(exclude))
                q = onnx.load(out_path)
                ort_session(q.SerializeToString(), "INT8")  # loads in onnxruntime, or the error names a node
            except QuantizeError:
                raise
            except Exception as e:  # noqa: BLE001 - onnxruntime raises several unrelated exception types
                raise _quantizer_error(pre, e, source) from None
            return q

        int8 = run(fp32_nodes)
        errors, out_sqnr = _chain_errors(pre, int8, chains, sqnr_batches, reasons)
        if config.min_sqnr is not None:
            low = [c for c in errors if c.quantized and c.sqnr_db is not None and c.sqnr_db < config.min_sqnr]
            if low:
                for c in low:
                    reasons[c.name] = f"SQNR {c.sqnr_db:.1f} dB < --quantize-min-sqnr {config.min_sqnr:g} dB"
                    fp32_nodes |= set(c.nodes)
                before = {c.name: c.sqnr_db for c in low}
                int8 = run(fp32_nodes)
                errors, out_sqnr = _chain_errors(pre, int8, chains, sqnr_batches, reasons)
                notes.append(f"{len(low)} chain(s) below {config.min_sqnr:g} dB kept in FP32: "
                             + ", ".join(f"{n} ({db:.1f} dB)" for n, db in before.items()))
    if not config.keep_names:  # after the chain errors, which find the chains by the quantizer's names
        before = int8.ByteSize()
        int8 = compact_names(int8)
        notes.append(f"tensor names shortened and identical constants shared: {before / 1e6:.2f} -> "
                     f"{int8.ByteSize() / 1e6:.2f} MB (--quantize-keep-names keeps the quantizer's names)")
    qdq = sum(1 for n in int8.graph.node if is_quantize(n))
    return QuantizeResult(int8, config.method, data.path, data_option, data.count, taken, tuple(errors),
                          tuple(sorted(fp32_nodes)), out_sqnr, qdq, time.perf_counter() - t0, tuple(notes))


def finite_or_none(v: float | None) -> float | None:
    return None if v is None or not math.isfinite(v) else v
