"""Run the original and the compressed model in onnxruntime (CPU) and compare their outputs."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import onnx

from ..errors import ValidationError
from ..graph import torchready
from ..graph.irmodel import IRModel
from ..graph.protos import first_line, graph_input_names
from ..types import StepProgress
from .session import ort_session, session_folder

if TYPE_CHECKING:
    from ..data import DataSet

DEFAULT_RANDOM_SAMPLES = 8
Progress = StepProgress  # (step, samples done, samples in all)
# Said wherever class agreement on random inputs is shown: it compares two models' classes on noise.
RANDOM_AGREEMENT_NOTE = ("random inputs: top-1/top-5 agreement compares the two models' classes on noise and is "
                         "not accuracy; give --data (with labels) for accuracy before/after")


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
    # Non-finite values counted in each model's output: any of them fails validation, whatever the
    # tolerance (two all-NaN outputs "agree" perfectly and mean nothing).
    nan_original: int = 0
    inf_original: int = 0
    nan_compressed: int = 0
    inf_compressed: int = 0

    @property
    def finite(self) -> bool:
        return not (self.nan_original or self.inf_original or self.nan_compressed or self.inf_compressed)

    @property
    def nonfinite_text(self) -> str:
        """e.g. "output 'y' is not finite: original 80 NaN / 0 Inf, compressed 80 NaN / 0 Inf of 80 values"."""
        size = int(np.prod(self.shape)) if self.shape else 1
        return (f"output '{self.name}' is not finite: original {self.nan_original} NaN / {self.inf_original} Inf, "
                f"compressed {self.nan_compressed} NaN / {self.inf_compressed} Inf of {size} values")

    def passes(self, rtol: float | None) -> bool:
        return self.finite and (rtol is None or self.max_abs_error <= rtol * self.max_abs_reference)


@dataclass(frozen=True)
class ValidationReport:
    samples: int
    seed: int
    input_shapes: Mapping[str, tuple[int, ...]]
    outputs: tuple[OutputComparison, ...]
    rtol: float | None  # the tolerance checked, None: metrics reported only
    source: str = "random"  # "random", or the path of the user's .npz data
    # Top-1 accuracy against the labels in the data file (first output), original and compressed.
    accuracy_before: float | None = None
    accuracy_after: float | None = None

    @property
    def passing_rtol(self) -> float:
        """The smallest rtol that would have passed."""
        return max((o.max_rel_error for o in self.outputs), default=0.0)

    @property
    def agreement_note(self) -> str | None:
        """What class agreement means here: None on real data, a plain warning on random inputs."""
        return RANDOM_AGREEMENT_NOTE if self.source == "random" else None

    @property
    def nonfinite(self) -> tuple[OutputComparison, ...]:
        """The outputs with a NaN or Inf in either model (each fails validation)."""
        return tuple(o for o in self.outputs if not o.finite)

    @property
    def passed(self) -> bool:
        return all(o.passes(self.rtol) for o in self.outputs)

    @property
    def status(self) -> str:
        if self.rtol is None and not self.nonfinite:
            return "measured"
        return "passed" if self.passed else "failed"

    @property
    def problem(self) -> str | None:
        """Why validation failed, in words (None when it passed): the non-finite outputs first."""
        if self.passed:
            return None
        if self.nonfinite:
            return "; ".join(o.nonfinite_text for o in self.nonfinite)
        return f"max relative output error {self.passing_rtol:.3g} > --rtol {self.rtol:g}"

    @property
    def fix(self) -> str:
        """What to do about `problem`."""
        if self.nonfinite:
            return ("a model that computes NaN/Inf cannot be validated: fix the weights or inputs that produce them "
                    "(see the per-layer reasons), or --no-validate to write it anyway")
        return "raise --rtol, or keep more rank: --rank-scale / --ranks energy:F"


def _run(session, names: list[str], feeds: Mapping[str, np.ndarray], what: str) -> list[np.ndarray]:  # type: ignore[no-untyped-def]
    try:
        return list(session.run(names, feeds))
    except Exception as e:  # noqa: BLE001 - onnxruntime raises several unrelated exception types
        msg = first_line(e)
        hint = "the input model itself does not run there" if what == "original" else "please report this"
        raise ValidationError(
            f"onnxruntime failed to run the {what} model ({msg}); {hint}: check --input-shape, or use --no-validate"
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
    counts = (int(np.isnan(a).sum()), int(np.isinf(a).sum()), int(np.isnan(b).sum()), int(np.isinf(b).sum()))
    # Non-finite values where the original has the same ones (a layer with NaN weights kept as is)
    # are agreement, not error; a NaN or Inf the original does not have is an infinite error.
    same = (np.isnan(a) & np.isnan(b)) | (np.isinf(a) & (a == b))
    if same.any():
        a, b = np.where(same, 0.0, a), np.where(same, 0.0, b)
    diff = np.abs(a - b)
    diff[~np.isfinite(diff)] = np.inf
    max_abs = float(diff.max()) if diff.size else 0.0
    max_ref = float(np.abs(a).max()) if a.size else 0.0
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    cosine = float(np.dot(a.ravel(), b.ravel()) / (na * nb)) if na > 0 and nb > 0 else float(na == nb)
    top1 = top5 = None
    if a.ndim == 2 and a.shape[1] > 1 and not any(counts):  # argmax of NaN scores means nothing
        top1 = float(np.mean(np.argmax(a, axis=1) == np.argmax(b, axis=1)))
        if a.shape[1] > 5:
            ref5 = np.argsort(-a, axis=1)[:, :5]
            top5 = float(np.mean([np.argmax(b[i]) in ref5[i] for i in range(a.shape[0])]))
    rel = max_abs / max_ref if max_ref > 0 else (0.0 if max_abs == 0 else float("inf"))
    return OutputComparison(name, tuple(a.shape), max_abs, max_ref, rel, cosine, top1, top5,
                            *counts)


def dynamic_batch(model: onnx.ModelProto) -> bool:
    by_name = {i.name: i for i in model.graph.input}
    for n in graph_input_names(model):
        dims = by_name[n].type.tensor_type.shape.dim
        if not dims or dims[0].HasField("dim_value") and dims[0].dim_value > 0:
            return False
    return True


CHUNK_BYTES = 8 << 20


def data_batches(
    data: DataSet, input_shapes: Mapping[str, tuple[int, ...]], model: onnx.ModelProto
) -> list[dict[str, np.ndarray]]:
    """Split the data along the batch axis: for a dynamic batch, chunks of up to 256 samples and
    `CHUNK_BYTES` of input (onnxruntime's activations grow with the chunk: 256 images of 224 x 224
    through Darknet Tiny took 3.3 GB; 13 at a time, under 1 GB); else the model's batch."""
    from ..errors import UsageError

    first = next(iter(input_shapes.values()))
    batch = first[0] if first else 1
    dynamic = dynamic_batch(model)
    if dynamic:
        per_sample = sum(int(a[:1].nbytes) for a in data.inputs.values()) or 1
        batch = max(1, min(256, data.count, CHUNK_BYTES // per_sample))  # the last chunk may be smaller
        input_shapes = {n: (batch, *s[1:]) for n, s in input_shapes.items()}
    batches = data.batches(batch, whole=not dynamic)  # a fixed batch takes whole batches only
    for feeds in batches:
        for n, a in feeds.items():
            if a.shape[1:] != tuple(input_shapes[n][1:]) or (not dynamic and a.shape[0] != batch):
                raise UsageError(
                    f"--data {data.path}: samples of '{n}' have shape {a.shape[1:]}, the model expects "
                    f"{tuple(input_shapes[n][1:])}; fix the data or --input-shape"
                )
    if not batches:
        raise UsageError(f"--data {data.path}: fewer samples ({data.count}) than the batch size {batch}")
    return batches


def validate_models(
    original: onnx.ModelProto | str | os.PathLike[str],
    compressed: onnx.ModelProto | IRModel | str | os.PathLike[str],
    input_shapes: Mapping[str, tuple[int, ...]],
    samples: int | None = None,
    seed: int = 0,
    rtol: float | None = None,
    data: DataSet | None = None,
    progress: Progress | None = None,
    *,
    reference: onnx.ModelProto | None = None,
) -> ValidationReport:
    """Feed `samples` seeded random inputs (or the user's `data`) to both models; compare every output.
    `progress("validation", done, total)` after each batch (samples). `reference`: the original as
    already loaded, when `original` is its file (its inputs shape the data; the file is not parsed again)."""
    if reference is not None:
        ref_proto = reference
    elif isinstance(original, onnx.ModelProto):
        ref_proto = original
    else:
        ref_proto = onnx.load(str(original), load_external_data=False)
    rng = np.random.default_rng(seed)
    if data is not None:
        batches = data_batches(data, input_shapes, ref_proto)
    else:
        batches = [random_inputs(ref_proto, input_shapes, rng) for _ in range(samples or DEFAULT_RANDOM_SAMPLES)]
    with session_folder() as tmp:
        hint = "use --no-validate to skip validation"
        s0 = ort_session(original, "original", tmpdir=tmp, hint=hint)
        s1 = ort_session(compressed, "compressed", tmpdir=tmp, hint=hint)
        names = [o.name for o in s0.get_outputs()]
        new_names = [o.name for o in s1.get_outputs()]
        if names != new_names:
            raise ValidationError(f"the compressed model's outputs {new_names} differ from the original's {names}")
        refs: list[list[np.ndarray]] = [[] for _ in names]
        news: list[list[np.ndarray]] = [[] for _ in names]
        total, done = sum(next(iter(f.values())).shape[0] for f in batches), 0
        if progress is not None:
            progress("validation", 0, total)
        for feeds in batches:
            r0 = _run(s0, names, feeds, "original")
            r1 = _run(s1, names, feeds, "compressed")
            for k in range(len(names)):
                refs[k].append(np.asarray(r0[k]))
                news[k].append(np.asarray(r1[k]))
            done += next(iter(feeds.values())).shape[0]
            if progress is not None:
                progress("validation", done, total)
    outputs = []
    # Batches are joined on each output's batch axis by its declared shape: 1 for a time-first sequence
    # [T, N, C] (a CRNN's scores), whose batches of different sizes cannot be joined on the time axis.
    axes = torchready.batch_axes(torchready.io_shapes(ref_proto), graph_input_names(ref_proto), names)
    for k, name in enumerate(names):
        nd = refs[k][0].ndim
        axis = axes.get(name, 0) if axes.get(name, 0) < nd else 0
        a = np.concatenate(refs[k], axis=axis) if nd >= 1 else np.stack(refs[k])
        b = np.concatenate(news[k], axis=axis) if nd >= 1 else np.stack(news[k])
        outputs.append(compare_outputs(name, a, b))
        if k == 0 and data is not None and data.labels is not None and a.ndim == 2:
            labels = data.labels[: a.shape[0]]
            acc0 = float(np.mean(np.argmax(a, axis=1) == labels))
            acc1 = float(np.mean(np.argmax(b, axis=1) == labels))
    if data is None or data.labels is None or not outputs or outputs[0].top1_agreement is None:
        acc0 = acc1 = None  # type: ignore[assignment]
    count = sum(next(iter(f.values())).shape[0] for f in batches)
    return ValidationReport(
        count, seed, dict(input_shapes), tuple(outputs), rtol,
        source="random" if data is None else data.path, accuracy_before=acc0, accuracy_after=acc1,
    )
