"""Subgraph fine-tuning (issue 20 item 3): a compressed model with an op onnx2torch cannot convert is
fine-tuned part by part around it, by distillation towards the original's tensors; only the parts it
names are trained, everything else stays bit-identical, and without a teacher it is refused in one line."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.helpers import _finish, _init, he_normal, run_ort, save

torch = pytest.importorskip("torch")
if importlib.util.find_spec("onnx2torch") is None:
    pytest.skip("onnx2torch is not installed (pip install -e '.[finetune]')", allow_module_level=True)

import onnx_tucker as ot  # noqa: E402
from onnx_tucker.config import RankPolicy  # noqa: E402
from onnx_tucker.errors import ModelLoadError, UsageError  # noqa: E402
from onnx_tucker.graph.subgraph import convertible_segments  # noqa: E402
from onnx_tucker.training import FinetuneConfig  # noqa: E402
from onnx_tucker.training import convert as ftc  # noqa: E402
from onnx_tucker.training import subgraph as sg  # noqa: E402

torch.set_num_threads(1)


def _model_with_shrink(seed: int = 0) -> onnx.ModelProto:
    """x [N,3,8,8] -> conv1 -> Relu -> conv2 -> Shrink (no converter; lambd 0, bias 0: the identity) ->
    conv3 -> Relu -> GAP -> Flatten -> fc = logits [N,10]."""
    rng = np.random.default_rng(seed)
    inits = [_init("w1", he_normal(rng, (16, 3, 3, 3))), _init("b1", (0.1 * rng.standard_normal(16)).astype(np.float32)),
             _init("w2", he_normal(rng, (24, 16, 3, 3))), _init("b2", (0.1 * rng.standard_normal(24)).astype(np.float32)),
             _init("w3", he_normal(rng, (24, 24, 3, 3))), _init("b3", (0.1 * rng.standard_normal(24)).astype(np.float32)),
             _init("fw", he_normal(rng, (10, 24))), _init("fb", np.zeros(10, np.float32))]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["h1"], name="conv1", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["h1"], ["a1"], name="relu1"),
        helper.make_node("Conv", ["a1", "w2", "b2"], ["h2"], name="conv2", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Shrink", ["h2"], ["s2"], name="odd", lambd=0.0, bias=0.0),
        helper.make_node("Conv", ["s2", "w3", "b3"], ["h3"], name="conv3", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["h3"], ["a3"], name="relu3"),
        helper.make_node("GlobalAveragePool", ["a3"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fw", "fb"], ["logits"], name="fc", transB=1),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])
    return _finish(nodes, [x], [y], inits, name="with_shrink")


@pytest.fixture()
def pair(tmp_path: Path) -> tuple[Path, Path, Path]:
    orig = save(_model_with_shrink(), tmp_path / "m.onnx")
    comp = tmp_path / "m.tucker.onnx"
    ot.compress(orig, ot.CompressionConfig(ranks=RankPolicy.parse("ratio:0.3"), validate=False), output=comp)
    x = np.random.default_rng(3).standard_normal((96, 3, 8, 8)).astype(np.float32)
    data = tmp_path / "d.npz"
    np.savez(data, x=x)
    return orig, comp, data


def _inits(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def test_onnx2torch_really_refuses_shrink() -> None:
    """The premise: the whole model cannot convert (else the test would not test the segment path)."""
    with pytest.raises(Exception, match="Shrink"):
        ftc.to_torch(_model_with_shrink(), "m.onnx")


def test_segments_are_the_convertible_parts_on_each_side(pair: tuple[Path, Path, Path]) -> None:
    _, comp, _ = pair
    model = onnx.load(comp)
    p = sg.plan(model, ftc.supported_ops(), "m.tucker.onnx")
    assert list(p.bad.values()) == ["Shrink-9"], p.bad
    names = [[model.graph.node[i].name for i in s.nodes] for s in p.segments]
    assert len(names) == 2, names
    odd = next(i for i, n in enumerate(model.graph.node) if n.op_type == "Shrink")
    first, second = p.segments
    assert max(first.nodes) < odd < min(second.nodes)
    assert "h2" in first.outputs and second.inputs == ("s2",)
    # every factor node is in exactly one segment
    factors = {i for i, n in enumerate(model.graph.node) if ftc.FACTOR_MODULE.search(n.name.replace(".", "/"))}
    assert factors == set(first.factor_nodes) | set(second.factor_nodes)


def test_segments_never_leave_and_come_back() -> None:
    """Convexity: a convertible node after the bad one that feeds a node before... cannot exist; a diamond
    around a bad node puts its two sides in different segments (levels)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])
    nodes = [helper.make_node("Relu", ["x"], ["a"], name="f/tucker_first"),
             helper.make_node("Shrink", ["a"], ["b"], name="odd"),
             helper.make_node("Add", ["a", "b"], ["y"], name="g/tucker_last")]
    model = _finish(nodes, [x], [y], [])
    segs = convertible_segments(model, {1}, [0, 2])
    assert [s.nodes for s in segs] == [(0,), (2,)]
    assert segs[1].inputs == ("a", "b")


@pytest.mark.parametrize("train", ["factors", "all"])
def test_trains_only_the_parts_it_names(pair: tuple[Path, Path, Path], tmp_path: Path, train: str) -> None:
    orig, comp, data = pair
    out = tmp_path / "ft.onnx"
    cfg = FinetuneConfig(epochs=3, batch_size=16, optimizer="adam", lr=3e-3, threads=1, train=train)
    r = ot.finetune(comp, out, data, teacher=orig, config=cfg)
    assert len(r.segments) == 2 and r.untrained_ops and "Shrink-9" in r.untrained_ops[0]
    before, after = onnx.load(comp), onnx.load(out)
    assert [n.op_type for n in before.graph.node] == [n.op_type for n in after.graph.node]
    a0, a1 = _inits(before), _inits(after)
    changed = {k for k in a0 if not np.array_equal(a0[k], a1[k])}
    assert changed, "nothing trained"
    # Which initializers the trained parts may change: their nodes' (factor nodes' only with --train factors).
    model = before
    p = sg.plan(model, ftc.supported_ops(), "m")
    allowed = set()
    for s in p.segments:
        for i in (s.factor_nodes if train == "factors" else s.nodes):
            allowed |= set(model.graph.node[i].input) & set(a0)
    assert changed <= allowed, changed - allowed
    for s in r.segments:
        assert s.loss_after is not None and s.loss_before is not None and s.loss_after <= s.loss_before + 1e-12
        assert s.max_rel_error <= cfg.rtol and s.layers
    # The whole model still runs and its agreement is reported, measured in onnxruntime.
    x = np.load(data)["x"][:4]
    assert run_ort(after, {"x": x})["logits"].shape == (4, 10)
    assert r.agreement_before is not None and r.agreement_after is not None


def test_distillation_moves_the_model_towards_the_original(pair: tuple[Path, Path, Path], tmp_path: Path) -> None:
    orig, comp, data = pair
    out = tmp_path / "ft.onnx"
    cfg = FinetuneConfig(epochs=6, batch_size=16, optimizer="adam", lr=3e-3, threads=1, val_split=0.25)
    ot.finetune(comp, out, data, teacher=orig, config=cfg)
    x = np.random.default_rng(9).standard_normal((64, 3, 8, 8)).astype(np.float32)  # fresh samples
    ref = run_ort(onnx.load(orig), {"x": x})["logits"]

    def err(path: Path) -> float:
        y = run_ort(onnx.load(path), {"x": x})["logits"]
        return float(np.sum((y - ref) ** 2) / np.sum(ref**2))

    assert err(out) < 0.8 * err(comp), (err(out), err(comp))


def _detector_with_nms(seed: int = 0) -> onnx.ModelProto:
    """x [N,3,8,8] -> conv1 -> Relu -> conv2 (5 channels) -> [N,5,64]: boxes [N,64,4] and scores [N,1,64] ->
    NonMaxSuppression -> selected indices (the only output)."""
    rng = np.random.default_rng(seed)
    inits = [_init("w1", he_normal(rng, (16, 3, 3, 3))), _init("w2", he_normal(rng, (5, 16, 3, 3))),
             _init("shape", np.array([0, 5, 64], np.int64)), _init("s0", np.array([0], np.int64)),
             _init("s4", np.array([4], np.int64)), _init("s5", np.array([5], np.int64)),
             _init("ax", np.array([1], np.int64)), _init("keep", np.array([10], np.int64)),
             _init("iou", np.array([0.5], np.float32)), _init("thr", np.array([-1e9], np.float32))]
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["h1"], name="conv1", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["h1"], ["a1"], name="relu1"),
        helper.make_node("Conv", ["a1", "w2"], ["h2"], name="conv2", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Reshape", ["h2", "shape"], ["r"], name="flat"),
        helper.make_node("Slice", ["r", "s0", "s4", "ax"], ["b4"], name="boxes_part"),
        helper.make_node("Transpose", ["b4"], ["boxes"], name="boxes", perm=[0, 2, 1]),
        helper.make_node("Slice", ["r", "s4", "s5", "ax"], ["scores"], name="scores"),
        helper.make_node("NonMaxSuppression", ["boxes", "scores", "keep", "iou", "thr"], ["idx"], name="nms"),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])
    y = helper.make_tensor_value_info("idx", TensorProto.INT64, [None, 3])
    return _finish(nodes, [x], [y], inits, name="detector")


def test_a_detector_with_nms_trains_the_part_before_it(tmp_path: Path) -> None:
    orig = save(_detector_with_nms(), tmp_path / "det.onnx")
    comp = tmp_path / "det.tucker.onnx"
    ot.compress(orig, ot.CompressionConfig(ranks=RankPolicy.parse("ratio:0.3"), validate=False), output=comp)
    data = tmp_path / "d.npz"
    np.savez(data, x=np.random.default_rng(4).standard_normal((48, 3, 8, 8)).astype(np.float32))
    r = ot.finetune(comp, tmp_path / "ft.onnx", data, teacher=orig,
                    config=FinetuneConfig(epochs=2, batch_size=16, optimizer="adam", lr=3e-3, threads=1))
    assert len(r.segments) == 1 and "NonMaxSuppression" in r.untrained_ops[0]
    assert r.segments[0].outputs == ("h2",)  # the last decomposed layer's output: the part ends there
    out = run_ort(onnx.load(tmp_path / "ft.onnx"), {"x": np.load(data)["x"][:2]})
    assert out["idx"].ndim == 2 and out["idx"].shape[1] == 3


def test_without_a_teacher_it_is_refused_in_one_line(pair: tuple[Path, Path, Path], tmp_path: Path) -> None:
    _, comp, _ = pair
    x = np.random.default_rng(3).standard_normal((32, 3, 8, 8)).astype(np.float32)
    data = tmp_path / "lab.npz"
    np.savez(data, x=x, labels=np.arange(32) % 10)
    out = tmp_path / "ft.onnx"
    with pytest.raises(ModelLoadError) as e:
        ot.finetune(comp, out, data, config=FinetuneConfig(epochs=1, threads=1))
    msg = str(e.value)
    assert "Shrink" in msg and "--teacher" in msg and "\n" not in msg
    assert not out.exists()


def test_resume_is_refused(pair: tuple[Path, Path, Path], tmp_path: Path) -> None:
    orig, comp, data = pair
    ckpt = tmp_path / "c.pt"
    ckpt.write_bytes(b"x")
    with pytest.raises(UsageError, match="--resume"):
        ot.finetune(comp, tmp_path / "o.onnx", data, teacher=orig,
                    config=FinetuneConfig(epochs=1, threads=1, resume=True, checkpoint=str(ckpt)))


def test_cli_names_the_parts(pair: tuple[Path, Path, Path], tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from onnx_tucker.cli import app

    orig, comp, data = pair
    out = tmp_path / "ft.onnx"
    res = CliRunner().invoke(app, ["finetune", str(comp), str(out), "--data", str(data), "--teacher", str(orig),
                                   "--epochs", "1", "--batch-size", "16", "--torch-threads", "1"])
    assert res.exit_code == 0, res.output
    text = res.output
    assert "part 1 of 2" in text and "part 2 of 2" in text and "Shrink" in text, text
    assert out.exists()


def test_a_constant_computed_outside_a_part_is_no_input_of_it() -> None:
    """A Constant node's output (no batch dim) read by a part is pulled into it, not fed (ResNet's option-A
    shortcuts read pads from Constant nodes)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])
    nodes = [helper.make_node("Constant", [], ["c"], name="c", value=numpy_helper.from_array(np.ones(4, np.float32))),
             helper.make_node("Shrink", ["x"], ["a"], name="odd"),
             helper.make_node("Add", ["a", "c"], ["y"], name="g/tucker_last")]
    model = _finish(nodes, [x], [y], [])
    (seg,) = convertible_segments(model, {1}, [2])
    assert seg.inputs == ("a",)


def test_every_kind_s_factor_nodes_are_recognised() -> None:
    """Fine-tuning (--train factors, the parts of subgraph fine-tuning) finds a decomposed layer by its node
    names: every kind's labels must match, spatial SVD's too (once they did not)."""
    from onnx_tucker.ops.base import LABELS

    for kind, labels in LABELS.items():
        for label in labels:
            for name in (f"layer1/conv/{label}", f"/conv1/Conv/{label}", f"a/{label}_2", f"a/{label}.1"):
                assert ftc.FACTOR_MODULE.search(name), (kind, name)
    assert not ftc.FACTOR_MODULE.search("layer1/conv/Relu")
