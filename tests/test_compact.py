"""Short names and shared constants for INT8 files (graph/compact.py, issue 18's size target).

The compacted model computes exactly what the quantizer's model computes (bit-identical outputs in
onnxruntime), keeps the graph's input and output names, the layers' node names and the names a subgraph
reads, shares identical initializers, and is smaller; `--quantize-keep-names` keeps the quantizer's names."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_tucker.graph.compact import compact_names
from onnx_tucker.quantize.layertime import quantize_tiny
from tests.helpers import run_ort


def _conv_chain(seed: int = 0) -> onnx.ModelProto:
    """x -> Conv 1x1 (8->4) -> Conv 3x3 (4->4) -> Relu -> Conv 1x1 (4->8) -> y, long exporter-style names."""
    rng = np.random.default_rng(seed)
    shapes = {"first": (4, 8, 1, 1), "core": (4, 4, 3, 3), "last": (8, 4, 1, 1)}
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), f"/block/layer.{k}/weight")
             for k, s in shapes.items()]
    nodes = [
        helper.make_node("Conv", ["x", "/block/layer.first/weight"], ["/block/layer.first/Conv_output_0"],
                         name="/block/layer.first/Conv"),
        helper.make_node("Conv", ["/block/layer.first/Conv_output_0", "/block/layer.core/weight"],
                         ["/block/layer.core/Conv_output_0"], name="/block/layer.core/Conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["/block/layer.core/Conv_output_0"], ["/block/Relu_output_0"], name="/block/Relu"),
        helper.make_node("Conv", ["/block/Relu_output_0", "/block/layer.last/weight"], ["y"],
                         name="/block/layer.last/Conv"),
    ]
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 6, 6])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _feeds(seed: int = 1) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal((1, 8, 6, 6)).astype(np.float32)}


@pytest.mark.parametrize("seed", [0, 1])
def test_a_quantized_chain_computes_the_same_bits_in_a_smaller_file(seed: int) -> None:
    q = quantize_tiny(_conv_chain(seed), seed)
    c = compact_names(q)
    onnx.checker.check_model(c, full_check=True)
    before, after = run_ort(q, _feeds()), run_ort(c, _feeds())
    assert np.array_equal(before["y"], after["y"])
    assert c.ByteSize() < 0.8 * q.ByteSize()  # the quantizer's names are most of so small a file
    assert [i.name for i in c.graph.input] == ["x"] and [o.name for o in c.graph.output] == ["y"]
    convs = [n.name for n in c.graph.node if n.op_type == "Conv"]
    assert convs == [n.name for n in q.graph.node if n.op_type == "Conv"]  # the layers keep their names
    assert len(convs) == 3
    tensors = {t for n in c.graph.node for t in (*n.input, *n.output)} - {"x", "y", ""}
    assert tensors and all(len(t) <= 4 for t in tensors)
    assert [n.op_type for n in c.graph.node] == [n.op_type for n in q.graph.node]  # the same nodes, in order


def test_identical_initializers_become_one() -> None:
    """Two activations of the same quantization parameters share one scale and one zero point."""
    scale = numpy_helper.from_array(np.array(0.05, np.float32), "a_scale")
    zero = numpy_helper.from_array(np.array(3, np.int8), "a_zero_point")
    scale2 = numpy_helper.from_array(np.array(0.05, np.float32), "b_scale")
    zero2 = numpy_helper.from_array(np.array(3, np.int8), "b_zero_point")
    other = numpy_helper.from_array(np.array(0.07, np.float32), "c_scale")
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "a_scale", "a_zero_point"], ["xq"], name="quant_a"),
        helper.make_node("DequantizeLinear", ["xq", "b_scale", "b_zero_point"], ["xd"], name="dequant_b"),
        helper.make_node("Mul", ["xd", "c_scale"], ["y"], name="scale_out"),
    ]
    graph = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [5])],
                              [scale, zero, scale2, zero2, other])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    c = compact_names(m)
    assert len(c.graph.initializer) == 3  # a/b scale one, a/b zero point one, c its own
    q, dq, mul = c.graph.node
    assert dq.input[1] == q.input[1] and dq.input[2] == q.input[2] and mul.input[1] != q.input[1]
    assert (q.name, dq.name, mul.name) == ("q0", "q1", "scale_out")  # the quantizer's nodes short, the rest kept
    x = {"x": np.linspace(-1, 1, 5, dtype=np.float32)}
    assert np.array_equal(run_ort(m, x)["y"], run_ort(c, x)["y"])


def test_names_a_subgraph_reads_are_kept() -> None:
    """An If branch reads `w` and `h` of the main graph by name: those are not renamed."""
    w = numpy_helper.from_array(np.full((3,), 2.0, np.float32), "outer_weight_with_a_long_name")
    then_g = helper.make_graph([helper.make_node("Mul", ["hidden_tensor_long_name", "outer_weight_with_a_long_name"], ["t"])],
                               "then", [], [helper.make_tensor_value_info("t", TensorProto.FLOAT, [3])])
    else_g = helper.make_graph([helper.make_node("Neg", ["hidden_tensor_long_name"], ["e"])],
                               "else", [], [helper.make_tensor_value_info("e", TensorProto.FLOAT, [3])])
    nodes = [
        helper.make_node("Relu", ["x"], ["hidden_tensor_long_name"], name="relu"),
        helper.make_node("If", ["cond"], ["y"], name="branch", then_branch=then_g, else_branch=else_g),
    ]
    graph = helper.make_graph(nodes, "if", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3]),
                                            helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])], [w])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    c = compact_names(m)
    assert c.graph.node[0].output[0] == "hidden_tensor_long_name"
    assert c.graph.initializer[0].name == "outer_weight_with_a_long_name"
    x = np.array([-1.0, 0.5, 2.0], np.float32)
    for cond in (True, False):
        feeds = {"x": x, "cond": np.array(cond)}
        assert np.array_equal(run_ort(m, feeds)["y"], run_ort(c, feeds)["y"])
