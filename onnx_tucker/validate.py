"""Run the original and the compressed model in onnxruntime (CPU) and compare their outputs."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx

from .errors import ValidationError
from .graph import graph_input_names
from .io import PROTOBUF_LIMIT


@dataclass(frozen=True)
class OutputComparison:
    name: str
    shape: tuple[int, ...]
    max_abs_error: float
    max_abs_reference: float
    max_rel_error: float  # max|a - b| / max|a|: scale-free, robust to near-zero entries
    cosine: float
    top1_agreement: float | None  # for class-score shaped outputs [N, C]
    top5_agreement: float | None

    def passes(self, rtol: float) -> bool:
        return self.max_abs_error <= rtol * self.max_abs_reference


@dataclass(frozen=True)
class ValidationReport:
    samples: int
    seed: int
    input_shapes: Mapping[str, tuple[int, ...]]
    outputs: tuple[OutputComparison, ...]
    rtol: float | None  # the tolerance checked, None: metrics reported only

    @property
    def passing_rtol(self) -> float:
        """The smallest rtol that would have passed."""
        return max((o.max_rel_error for o in self.outputs), default=0.0)

    @property
    def passed(self) -> bool:
        return self.rtol is None or all(o.passes(self.rtol) for o in self.outputs)

    @property
    def status(self) -> str:
        if self.rtol is None:
            return "measured"
        return "passed" if self.passed else "failed"


def _session(model: onnx.ModelProto | str | os.PathLike[str], what: str, tmpdir: str):  # type: ignore[no-untyped-def]
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    try:
        if isinstance(model, onnx.ModelProto):
            if model.ByteSize() > PROTOBUF_LIMIT:
                from .io import save_model

                path = os.path.join(tmpdir, f"{what}.onnx")
                save_model(model, path, external_data=True)
                return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
            return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        return ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - onnxruntime raises several unrelated exception types
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValidationError(
            f"the {what} model does not load in onnxruntime ({msg}); use --no-validate to skip validation"
        ) from None


def random_inputs(
    model: onnx.ModelProto, input_shapes: Mapping[str, tuple[int, ...]], rng: np.random.Generator
) -> dict[str, np.ndarray]:
    by_name = {i.name: i for i in model.graph.input}
    feeds = {}
    for name in graph_input_names(model):
        elem = by_name[name].type.tensor_type.elem_type
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem))
        shape = input_shapes[name]
        if np.issubdtype(dtype, np.floating):
            feeds[name] = rng.standard_normal(shape).astype(dtype)
        elif dtype == np.bool_:
            feeds[name] = rng.random(shape) < 0.5
        else:
            feeds[name] = rng.integers(0, 10, size=shape).astype(dtype)
    return feeds


def compare_outputs(name: str, ref: np.ndarray, new: np.ndarray) -> OutputComparison:
    a = np.asarray(ref, dtype=np.float64)
    b = np.asarray(new, dtype=np.float64)
    if a.shape != b.shape:
        raise ValidationError(f"output '{name}' changed shape {a.shape} -> {b.shape}; please report this")
    diff = np.abs(a - b)
    max_abs = float(diff.max()) if diff.size else 0.0
    max_ref = float(np.abs(a).max()) if a.size else 0.0
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    cosine = float(np.dot(a.ravel(), b.ravel()) / (na * nb)) if na > 0 and nb > 0 else float(na == nb)
    top1 = top5 = None
    if a.ndim == 2 and a.shape[1] > 1:
        top1 = float(np.mean(np.argmax(a, axis=1) == np.argmax(b, axis=1)))
        if a.shape[1] > 5:
            ref5 = np.argsort(-a, axis=1)[:, :5]
            top5 = float(np.mean([np.argmax(b[i]) in ref5[i] for i in range(a.shape[0])]))
    rel = max_abs / max_ref if max_ref > 0 else (0.0 if max_abs == 0 else float("inf"))
    return OutputComparison(name, tuple(a.shape), max_abs, max_ref, rel, cosine, top1, top5)


def validate_models(
    original: onnx.ModelProto | str | os.PathLike[str],
    compressed: onnx.ModelProto | str | os.PathLike[str],
    input_shapes: Mapping[str, tuple[int, ...]],
    samples: int = 8,
    seed: int = 0,
    rtol: float | None = None,
) -> ValidationReport:
    """Feed `samples` seeded random inputs to both models; compare every output."""
    ref_proto = original if isinstance(original, onnx.ModelProto) else onnx.load(str(original), load_external_data=False)
    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory(prefix="onnx-tucker-") as tmp:
        s0 = _session(original, "original", tmp)
        s1 = _session(compressed, "compressed", tmp)
        names = [o.name for o in s0.get_outputs()]
        new_names = [o.name for o in s1.get_outputs()]
        if names != new_names:
            raise ValidationError(f"the compressed model's outputs {new_names} differ from the original's {names}")
        refs: list[list[np.ndarray]] = [[] for _ in names]
        news: list[list[np.ndarray]] = [[] for _ in names]
        for _ in range(samples):
            feeds = random_inputs(ref_proto, input_shapes, rng)
            try:
                r0 = s0.run(names, feeds)
                r1 = s1.run(names, feeds)
            except Exception as e:  # noqa: BLE001
                raise ValidationError(f"onnxruntime failed to run the models ({str(e).splitlines()[0]}); "
                                      "check --input-shape or use --no-validate") from None
            for k in range(len(names)):
                refs[k].append(np.asarray(r0[k]))
                news[k].append(np.asarray(r1[k]))
    outputs = []
    for k, name in enumerate(names):
        axis_ok = refs[k][0].ndim >= 1
        a = np.concatenate(refs[k], axis=0) if axis_ok else np.stack(refs[k])
        b = np.concatenate(news[k], axis=0) if axis_ok else np.stack(news[k])
        outputs.append(compare_outputs(name, a, b))
    return ValidationReport(samples, seed, dict(input_shapes), tuple(outputs), rtol)
