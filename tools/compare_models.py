"""Compare two ONNX models structurally: nodes (op, attributes, wiring, names), initializer values.

    python tools/compare_models.py A.onnx B.onnx [A2.onnx B2.onnx ...]

Used to show that a refactor changes no compressed model: prints one line per pair, "same" or the
differences (nodes, initializer values, then what differs only in order, value_info or header
fields). Exit code 1 when nodes or initializer values differ.
"""

from __future__ import annotations

import sys

import numpy as np
import onnx
from onnx import helper, numpy_helper


def _node_key(n: onnx.NodeProto) -> tuple[object, ...]:
    attrs = tuple(sorted((a.name, repr(helper.get_attribute_value(a))) for a in n.attribute))
    return (n.name, n.op_type, n.domain, tuple(n.input), tuple(n.output), attrs)


def compare(a_path: str, b_path: str) -> tuple[list[str], list[str]]:
    """(differences that matter, differences in order / metadata only)."""
    a, b = onnx.load(a_path), onnx.load(b_path)
    hard: list[str] = []
    soft: list[str] = []
    na, nb = [_node_key(n) for n in a.graph.node], [_node_key(n) for n in b.graph.node]
    if sorted(na, key=repr) != sorted(nb, key=repr):
        sa, sb = set(na), set(nb)
        hard.append(f"nodes differ: {len(sa - sb)} only in A (e.g. {next(iter(sa - sb), None)}), "
                    f"{len(sb - sa)} only in B (e.g. {next(iter(sb - sa), None)})")
    elif na != nb:
        soft.append("node order differs")
    ia = {t.name: t for t in a.graph.initializer}
    ib = {t.name: t for t in b.graph.initializer}
    if set(ia) != set(ib):
        hard.append(f"initializer names differ: only A {sorted(set(ia) - set(ib))[:3]}, only B {sorted(set(ib) - set(ia))[:3]}")
    worst = 0.0
    for name in set(ia) & set(ib):
        x, y = numpy_helper.to_array(ia[name]), numpy_helper.to_array(ib[name])
        if x.dtype != y.dtype or x.shape != y.shape:
            hard.append(f"initializer {name}: {x.dtype}{x.shape} vs {y.dtype}{y.shape}")
        elif not np.array_equal(x, y, equal_nan=True):
            worst = max(worst, float(np.max(np.abs(x.astype(np.float64) - y))))
            hard.append(f"initializer {name}: values differ (max abs {worst:.3g})")
    if [t.name for t in a.graph.initializer] != [t.name for t in b.graph.initializer]:
        soft.append("initializer order differs")
    if [v.name for v in a.graph.value_info] != [v.name for v in b.graph.value_info]:
        soft.append(f"value_info differs ({len(a.graph.value_info)} vs {len(b.graph.value_info)} entries)")
    if [i.name for i in a.graph.input] != [i.name for i in b.graph.input]:
        hard.append("graph inputs differ")
    if [o.name for o in a.graph.output] != [o.name for o in b.graph.output]:
        hard.append("graph outputs differ")
    for field in ("ir_version", "producer_name", "producer_version", "domain", "model_version", "doc_string"):
        if getattr(a, field) != getattr(b, field):
            soft.append(f"{field}: {getattr(a, field)!r} vs {getattr(b, field)!r}")
    if list(a.opset_import) != list(b.opset_import):
        hard.append("opset imports differ")
    if a.SerializeToString() == b.SerializeToString():
        return [], []
    if not hard and not soft:
        soft.append("bytes differ (field encoding only)")
    return hard, soft


def main(argv: list[str]) -> int:
    if len(argv) < 2 or len(argv) % 2:
        print(__doc__)
        return 2
    bad = 0
    for a, b in zip(argv[::2], argv[1::2], strict=True):
        hard, soft = compare(a, b)
        status = "DIFFERENT" if hard else ("same nodes and values" if soft else "byte-identical")
        print(f"{status}: {a} vs {b}" + ("" if not hard + soft else " -- " + "; ".join(hard + soft)))
        bad += bool(hard)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
