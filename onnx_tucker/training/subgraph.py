"""Subgraph fine-tuning: the pieces `finetune` uses when some nodes of a compressed model have no
onnx2torch converter (run.py drives it).

Instead of refusing the whole model, each convertible segment around its decomposed layers
(graph/subgraph.py) is trained on its own: its inputs are the compressed model's tensors computed in
onnxruntime (every earlier segment already trained), its targets the original model's tensors of the
same names, the loss the distillation loss of `finetune` (train.py). The trained weights are written back
into the compressed ONNX model's initializers in place: the rest of the model stays bit-identical, and
nothing is re-exported. Each written segment is checked in onnxruntime against its torch module.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from ..data import DataSet
from ..errors import ModelLoadError, UsageError
from ..graph import torchready
from ..graph.probe import ElementTypes, Segment, extract_segment, prepare_for_torch
from ..graph.subgraph import SegmentSpec, convertible_segments, nodes_named
from ..runtime.activations import ActivationCache
from ..runtime.validate import compare_outputs
from .convert import FACTOR_MODULE, import_torch
from .segment import Bound, bind_parameters, segment_module

TARGET_PREFIX = "target:"  # the targets ride in the same DataSet as the segment's inputs, under these keys
SAMPLE_BATCH = 32
MAX_BYTES = 2 << 30  # inputs + targets of one segment held for training; fewer samples beyond


def _is_factor(name: str) -> bool:
    return bool(FACTOR_MODULE.search(name))


def layer_of(node_name: str) -> str:
    """The decomposed layer a factor node belongs to ('stage1/conv/tucker_core' -> 'stage1/conv')."""
    return FACTOR_MODULE.sub("", node_name.replace(".", "/")) or node_name


@dataclass(frozen=True)
class Plan:
    """What subgraph fine-tuning will do: the unconvertible nodes (index -> 'Op-version'), the segments,
    and the decomposed layers no segment holds (their factor nodes cannot be converted themselves)."""

    bad: dict[int, str]
    segments: list[SegmentSpec]
    left_out: tuple[str, ...]


def plan(student: onnx.ModelProto, supported: torchready.Supported, source: str,
         input_dims: Mapping[str, Sequence[int]] | None = None) -> Plan:
    """Empty `bad` (and no segments) when the whole model converts."""
    bad = torchready.unconvertible_nodes(student, supported)
    if bad and not torchready.normalize(student, supported, source, input_dims)[1]:
        bad = {}  # the torch-readiness pass rewrites what the raw graph's nodes lacked
    if not bad:
        return Plan({}, [], ())
    factors = nodes_named(student, _is_factor)
    segments = convertible_segments(student, bad, factors)
    nodes = student.graph.node
    left = tuple(dict.fromkeys(layer_of(nodes[i].name) for i in factors if i in bad))
    return Plan(bad, segments, left)


def untrained_ops(student: onnx.ModelProto, bad: Mapping[int, str]) -> tuple[str, ...]:
    nodes = student.graph.node
    return tuple(f"{label} (node '{nodes[i].name or i}')" for i, label in sorted(bad.items()))


def refuse_without_teacher(source: str, bad: Mapping[int, str]) -> ModelLoadError:
    ops = ", ".join(dict.fromkeys(bad.values()))
    return ModelLoadError(
        f"{source}: no torch converter trains through {ops} ({len(bad)} node(s)); give --teacher ORIG.onnx to fine-tune "
        "the convertible parts around the decomposed layers by distillation from the original's tensors, or "
        "replace those ops"
    )


def _extract(student: onnx.ModelProto, spec: SegmentSpec, types: ElementTypes) -> Segment:
    graph_inputs = {v.name for v in student.graph.input}  # already inputs of the extracted model
    known = types.of([n for n in spec.inputs if n not in graph_inputs])
    return extract_segment(student, list(spec.outputs), known, types=types)


@dataclass
class SegmentData:
    """One segment ready to train: its ONNX model (nodes renamed n0, n1, ...), the data inputs in the
    module's order, the matched outputs (by position among the segment's outputs), the trainable nodes,
    and the training / held-out samples (inputs and targets under TARGET_PREFIX keys)."""

    spec: SegmentSpec
    seg: Segment
    feeds: list[str]
    outputs: list[str]  # every output of the segment, in the module's order
    matched: list[int]  # those the original has (the targets), by position in `outputs`
    owned: dict[str, tuple[str, ...]]
    trainable: set[str]
    train: DataSet
    val: DataSet | None
    notes: list[str]

    @property
    def target_names(self) -> list[str]:
        return [self.outputs[k] for k in self.matched]

    @property
    def keys(self) -> list[str]:
        return [*self.feeds, *(TARGET_PREFIX + n for n in self.target_names)]


def _stack(values: Any, names: Sequence[str]) -> dict[str, np.ndarray]:
    parts: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for batch in values:
        for n, v in zip(names, batch, strict=True):
            parts[n].append(np.asarray(v))
    return {n: np.concatenate(v) for n, v in parts.items()}


def _samples(student_cache: ActivationCache, teacher_cache: ActivationCache, feeds: Sequence[str],
             targets: Sequence[str], count: int) -> dict[str, np.ndarray]:
    xs = _stack(student_cache.values(feeds), feeds)
    ys = _stack(teacher_cache.values(targets), targets)
    out = {n: xs[n][:count] for n in feeds}
    out.update({TARGET_PREFIX + n: ys[n][:count] for n in targets})
    return out


def segment_data(student: onnx.ModelProto, teacher: onnx.ModelProto, spec: SegmentSpec, train: DataSet,
                 val: DataSet | None, train_all: bool, types: ElementTypes, max_bytes: int = MAX_BYTES) -> SegmentData:
    """The segment `spec` of `student` extracted and its samples computed (module docstring)."""
    seg = _extract(student, spec, types)
    factor_positions = [k for k, n in enumerate(seg.model.graph.node) if _is_factor(n.name.replace(".", "/"))]
    feeds, owned = prepare_for_torch(seg)
    names = list(owned)
    trainable = set(names) if train_all else {names[k] for k in factor_positions}
    teacher_has = {o for n in teacher.graph.node for o in n.output} | {v.name for v in teacher.graph.input}
    outputs = [*seg.outputs, *seg.live_out]
    matched = [k for k, o in enumerate(outputs) if o in teacher_has]
    notes: list[str] = []
    if not matched:
        raise ModelLoadError(
            f"segment {seg.model.graph.node[0].name}..: none of its outputs ({', '.join(outputs)}) is a tensor of the "
            "original model, so there is nothing to distil it towards; please report this"
        )
    unmatched = [o for k, o in enumerate(outputs) if k not in matched]
    if unmatched:
        notes.append(f"outputs {', '.join(unmatched)} are not in the original model: not matched, free to move")
    targets = [outputs[k] for k in matched]
    # Bytes per sample, from one sample, to cap what is held.
    probe = [{k: v[:1] for k, v in train.inputs.items()}]
    with ActivationCache(student, probe, "compressed") as sc, ActivationCache(teacher, probe, "original") as tc:
        one = _samples(sc, tc, feeds, targets, 1)
    per = sum(a.nbytes for a in one.values())
    total = train.count + (val.count if val is not None else 0)
    fit = max(2, max_bytes // max(per, 1))
    n_train, n_val = train.count, val.count if val is not None else 0
    if total > fit:
        n_val = min(n_val, max(1, fit // 10)) if n_val else 0
        n_train = max(1, fit - n_val)
        notes.append(f"its tensors take {per / 2**20:.1f} MiB per sample: trained on {n_train} of {train.count} samples "
                     f"(held out: {n_val}) to stay within {max_bytes / 2**30:.0f} GiB")
    parts = [train.select(slice(0, n_train))] + ([val.select(slice(0, n_val))] if val is not None and n_val else [])
    batches = [b for p in parts for b in p.batches(SAMPLE_BATCH)]
    with ActivationCache(student, batches, "compressed") as sc, ActivationCache(teacher, batches, "original") as tc:
        arrays = _samples(sc, tc, feeds, targets, n_train + n_val)
    labels = None
    tr = DataSet(train.path, {k: v[:n_train] for k, v in arrays.items()}, labels, kind="tensors")
    va = DataSet(train.path, {k: v[n_train:] for k, v in arrays.items()}, labels, kind="tensors") if n_val else None
    return SegmentData(spec, seg, feeds, outputs, matched, owned, trainable, tr, va, notes)


def segment_modules(data: SegmentData, source: str) -> tuple[Any, Any, Bound, torchready.Normalized]:
    """(student, teacher, the bound parameters, the normalisation): the student runs the segment on the
    first len(feeds) inputs and returns its matched outputs; the teacher returns the targets, which follow
    the inputs (both take every key of the DataSet, in `data.keys` order)."""
    torch = import_torch()
    dims = {n: data.train.inputs[n].shape for n in data.feeds}
    module, norm = segment_module(data.seg.model, dims, source)
    bound = bind_parameters(module, data.seg.model, data.owned, data.trainable)
    n_feeds, matched = len(data.feeds), list(data.matched)

    class SegmentStudent(torch.nn.Module):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            super().__init__()
            self.segment = module

        def forward(self, *args: Any) -> tuple[Any, ...]:
            outs = self.segment(*args[:n_feeds])
            outs = outs if isinstance(outs, (tuple, list)) else (outs,)
            return tuple(outs[k] for k in matched)

    class Targets(torch.nn.Module):  # type: ignore[misc, name-defined]
        def forward(self, *args: Any) -> tuple[Any, ...]:
            return tuple(args[n_feeds:])

    return SegmentStudent().eval(), Targets().eval(), bound, norm


def check_written(student: onnx.ModelProto, data: SegmentData, module: Any, rtol: float, count: int = 8) -> float:
    """The segment extracted again from `student` (trained weights written) run in onnxruntime against the
    trained torch module on a few samples: the worst relative error of its matched outputs."""
    import onnxruntime as ort

    from ..ort import session_options

    torch = import_torch()
    seg = _extract(student, data.spec, ElementTypes(student))
    prepare_for_torch(seg)  # drops the graph inputs it does not read
    sess = ort.InferenceSession(seg.model.SerializeToString(), session_options(), providers=["CPUExecutionProvider"])
    ds = data.val if data.val is not None else data.train
    feeds = {n: ds.inputs[n][:count] for n in data.feeds}
    got = sess.run(data.target_names, feeds)
    with torch.no_grad():
        ref = module(*[torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in data.feeds])
    worst = 0.0
    for name, r, o in zip(data.target_names, ref, got, strict=True):
        worst = max(worst, compare_outputs(name, r.detach().cpu().numpy(), o).max_rel_error)
    return worst


@dataclass(frozen=True)
class FullStats:
    accuracy: float | None
    agreement: float | None


def full_model_stats(student: onnx.ModelProto, teacher: onnx.ModelProto, ds: DataSet, label_output: int | None,
                     batch: int = 64) -> FullStats:
    """Top-1 accuracy (labels) and agreement with the original of the whole compressed model, in onnxruntime."""
    import onnxruntime as ort

    from ..ort import session_options

    if label_output is None:
        return FullStats(None, None)
    s = ort.InferenceSession(student.SerializeToString(), session_options(), providers=["CPUExecutionProvider"])
    t = ort.InferenceSession(teacher.SerializeToString(), session_options(), providers=["CPUExecutionProvider"])
    s_name = s.get_outputs()[label_output].name
    t_name = t.get_outputs()[label_output].name
    agree = correct = 0
    for start in range(0, ds.count, batch):
        feeds = {k: v[start : start + batch] for k, v in ds.inputs.items()}
        ps = s.run([s_name], feeds)[0].argmax(1)
        pt = t.run([t_name], feeds)[0].argmax(1)
        agree += int((ps == pt).sum())
        if ds.labels is not None:
            correct += int((ps == ds.labels[start : start + batch]).sum())
    n = max(ds.count, 1)
    return FullStats(correct / n if ds.labels is not None else None, agree / n)


def class_output(student: onnx.ModelProto) -> int | None:
    """The first graph output declared [N, C] with C > 1 (class scores), or None."""
    for k, v in enumerate(student.graph.output):
        dims = v.type.tensor_type.shape.dim
        if len(dims) == 2 and dims[1].HasField("dim_value") and dims[1].dim_value > 1:
            return k
    return None


def factor_layers(data: SegmentData, student: onnx.ModelProto) -> tuple[str, ...]:
    nodes = student.graph.node
    return tuple(dict.fromkeys(layer_of(nodes[i].name) for i in data.spec.factor_nodes))


def spans(student: onnx.ModelProto, spec: SegmentSpec) -> tuple[str, str]:
    nodes = student.graph.node
    first, last = nodes[spec.nodes[0]], nodes[spec.nodes[-1]]
    return first.name or f"#{spec.nodes[0]} {first.op_type}", last.name or f"#{spec.nodes[-1]} {last.op_type}"


def check_plan(source: str, p: Plan, world: int, resume: bool) -> None:
    if world > 1:
        raise UsageError(f"{source}: subgraph fine-tuning ({len(p.bad)} node(s) onnx2torch cannot convert) runs in one "
                         "process; run it without torchrun")
    if resume:
        raise UsageError(f"--resume: {source} is fine-tuned by segments (ops onnx2torch cannot convert), which keeps no "
                         "checkpoint; run without --resume")
    if not p.segments:
        what = f"; its decomposed layers {', '.join(p.left_out)} are themselves unconvertible" if p.left_out else ""
        raise ModelLoadError(f"{source}: no convertible part of the model holds a decomposed layer{what}; nothing to "
                         "fine-tune (compress it first, or fine-tune it in its own framework)")
