"""The float view of a QDQ (INT8) model: what it computes, with the quantization taken out, for counting.

A QDQ model's layers read their weights through DequantizeLinear and their activations through
QuantizeLinear -> DequantizeLinear pairs, so the counts of a float model (parameters: constant float
tensors; MACs: layers with a constant weight) see no weights in it. `float_view(model)` folds each
DequantizeLinear of a constant into a float initializer (`(q - zero_point) * scale`, per axis) and
drops each activation pair (readers of the DequantizeLinear read the QuantizeLinear's input), so
`report` counts the INT8 model's parameters and MACs as those of the float model it stands for.
Only for counting: the view is never run or written.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from .optypes import is_op, is_quantize


def has_qdq(model: onnx.ModelProto) -> bool:
    return any(is_quantize(n) for n in model.graph.node)


def _dequantize(q: np.ndarray, scale: np.ndarray, zero: np.ndarray | None, axis: int) -> np.ndarray:
    q64 = q.astype(np.float64)
    if scale.ndim == 1 and q.ndim > 0 and scale.size > 1:  # per-axis
        shape = [1] * q.ndim
        shape[axis % q.ndim] = scale.size
        s, z = scale.reshape(shape), (zero.reshape(shape) if zero is not None else 0)
    else:
        s, z = scale, (zero if zero is not None else 0)
    return ((q64 - np.asarray(z, dtype=np.float64)) * s).astype(np.float32)


def float_view(model: onnx.ModelProto, saturate: bool = True) -> onnx.ModelProto:
    """`model` with constant DequantizeLinear folded and QuantizeLinear -> DequantizeLinear pairs made Clips
    (`saturate` False: Identities, so that the parameter count sees no clip bounds)."""
    g = model.graph
    consts = {t.name: t for t in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    clips: dict[int, onnx.NodeProto] = {}
    folded: list[onnx.TensorProto] = []
    drop: set[int] = set()
    for k, n in enumerate(g.node):
        if not is_op(n, "DequantizeLinear"):
            continue
        if n.input[0] in consts and all(i in consts for i in n.input[1:] if i):
            axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
            zero = numpy_helper.to_array(consts[n.input[2]]) if len(n.input) > 2 and n.input[2] else None
            arr = _dequantize(numpy_helper.to_array(consts[n.input[0]]), numpy_helper.to_array(consts[n.input[1]]),
                              zero, axis)
            folded.append(numpy_helper.from_array(arr, n.output[0]))
            drop.add(k)
            continue
        q = producer.get(n.input[0])
        if q is not None and is_op(q, "QuantizeLinear") and not saturate:
            clips[k] = onnx.helper.make_node("Identity", [q.input[0]], [n.output[0]], name=f"{n.name}__identity")
        elif q is not None and is_op(q, "QuantizeLinear") and all(i in consts for i in q.input[1:3] if i):
            scale = float(numpy_helper.to_array(consts[q.input[1]]).reshape(-1)[0])
            zt = consts.get(q.input[2]) if len(q.input) > 2 and q.input[2] else None
            zero = numpy_helper.to_array(zt) if zt is not None else np.zeros((), np.uint8)
            info = np.iinfo(zero.dtype)
            z = float(zero.reshape(-1)[0])
            lo, hi = f"{n.output[0]}__clip_min", f"{n.output[0]}__clip_max"
            folded += [numpy_helper.from_array(np.array((info.min - z) * scale, np.float32), lo),
                       numpy_helper.from_array(np.array((info.max - z) * scale, np.float32), hi)]
            clips[k] = onnx.helper.make_node("Clip", [q.input[0], lo, hi], [n.output[0]], name=f"{n.name}__clip")
    used = {i for k, n in enumerate(g.node) if k not in drop for i in (clips[k] if k in clips else n).input}
    drop |= {k for k, n in enumerate(g.node) if is_op(n, "QuantizeLinear") and not (set(n.output) & used)}
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.node[:]
    graph_outputs = {o.name for o in g.output}
    for k, n in enumerate(g.node):
        if k in drop:
            continue
        m = out.graph.node.add()
        m.CopyFrom(clips.get(k, n))
    reads = {i for n in out.graph.node for i in n.input} | graph_outputs
    kept = [t for t in g.initializer if t.name in reads] + [t for t in folded if t.name in reads]
    del out.graph.initializer[:]
    out.graph.initializer.extend(kept)
    return out
