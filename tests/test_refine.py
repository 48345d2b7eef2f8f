"""Block-wise recovery on calibration data (`compress --calibrate DATA --refine`, training/refine.py):
blocks end at residual Adds, a block keeps new factors only when its held-out error falls, and it
finds a known better solution."""

from __future__ import annotations

import importlib.util
from typing import Any

import numpy as np
import pytest

pytest.importorskip("torch")
# Presence only: importing onnx2torch directly imports a torchvision that fails beside a CPU torch build.
if importlib.util.find_spec("onnx2torch") is None:
    pytest.skip("onnx2torch is not installed (pip install -e '.[finetune]')", allow_module_level=True)

from onnx_tucker import api  # noqa: E402
from onnx_tucker.calibration import calibrate as cal  # noqa: E402
from onnx_tucker.config import CompressionConfig  # noqa: E402
from onnx_tucker.graph.probe import factor_chain, node_io, read_initializer, write_initializers  # noqa: E402
from onnx_tucker.training.refine import RefineOptions, blocks_of, refine_blocks  # noqa: E402
from tests.helpers import make_small_cnn, run_ort  # noqa: E402


def _corrupting(captured: dict[str, Any], scale: float):  # type: ignore[no-untyped-def]
    """A stand-in for the layer-wise refit: noise on every factor (a start with a known better
    solution: at full rank, the original weights), and the walk's arguments captured."""

    def fake(original, compressed, replacements, batches, *args, **kwargs):  # type: ignore[no-untyped-def]
        rng = np.random.default_rng(0)
        for i, rep in replacements.items():
            chain = factor_chain(compressed, node_io(original, i)[1], len(rep.factors.arrays))
            assert chain is not None
            values = {}
            for w in chain.weights:
                a = read_initializer(compressed, w)
                values[w] = a + scale * np.abs(a).mean() * rng.standard_normal(a.shape)
            write_initializers(compressed, values)
        captured.update(original=original, compressed=compressed, replacements=dict(replacements), batches=batches)
        return {}

    return fake


def _relative_output_error(a: Any, b: Any, x: np.ndarray) -> float:
    (k,) = run_ort(a, {"x": x})
    ya, yb = run_ort(a, {"x": x})[k], run_ort(b, {"x": x})[k]
    return float(np.sum((ya - yb) ** 2) / np.sum(ya**2))


def test_refine_recovers_a_known_better_solution(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Full-rank factors with noise on them: the original weights reproduce the block exactly, and the
    refine gets most of the way there, on held-out images too."""
    model = make_small_cnn(batch="N", classes=10)
    rng = np.random.default_rng(1)
    x = rng.random((96, 3, 16, 16), dtype=np.float32)
    np.savez(tmp_path / "cal.npz", x=x)
    captured: dict[str, Any] = {}
    monkeypatch.setattr(cal, "calibrate_model", _corrupting(captured, 0.3))
    res = api.compress(model, CompressionConfig(ranks="full", validate=False, calibrate=str(tmp_path / "cal.npz"),
                                                refine=True, refine_steps=300))
    blocks = res.calibration.blocks
    assert blocks and all(b.kept for b in blocks), blocks
    for b in blocks:
        assert b.error_after < 0.5 * b.error_before, b
    # The start (noise only, no refine) for comparison, on fresh images.
    captured2: dict[str, Any] = {}
    monkeypatch.setattr(cal, "calibrate_model", _corrupting(captured2, 0.3))
    start = api.compress(model, CompressionConfig(ranks="full", validate=False, calibrate=str(tmp_path / "cal.npz")))
    fresh = rng.random((16, 3, 16, 16), dtype=np.float32)
    assert _relative_output_error(model, res.model, fresh) < 0.5 * _relative_output_error(model, start.model, fresh)


def test_a_block_that_gets_worse_keeps_its_factors(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A learning rate that diverges: every block's held-out error rises, so no block keeps new
    factors and the model's weights are exactly those of the refit."""
    model = make_small_cnn(batch="N", classes=10)
    x = np.random.default_rng(2).random((64, 3, 16, 16), dtype=np.float32)
    np.savez(tmp_path / "cal.npz", x=x)
    captured: dict[str, Any] = {}
    monkeypatch.setattr(cal, "calibrate_model", _corrupting(captured, 0.01))
    res = api.compress(model, CompressionConfig(ranks="full", validate=False, calibrate=str(tmp_path / "cal.npz")))
    comp = captured["compressed"]
    before = {t.name: read_initializer(comp, t.name).copy() for t in comp.graph.initializer}
    blocks = refine_blocks(captured["original"], comp, captured["replacements"], captured["batches"],
                           RefineOptions(steps=20, lr=50.0))
    assert blocks and not any(b.kept for b in blocks)
    assert all(b.error_after >= b.error_before for b in blocks)
    for t in comp.graph.initializer:
        np.testing.assert_array_equal(read_initializer(comp, t.name), before[t.name])
    assert res.model is comp


def _residual_block(C: int = 8, seed: int = 0):  # type: ignore[no-untyped-def]
    """x -> conv1 -> Relu -> conv2 -> Add(x) -> Relu -> conv3 -> y: a ResNet basic block, BN folded."""
    from onnx import TensorProto, helper

    from tests.helpers import _finish, _init, he_normal

    rng = np.random.default_rng(seed)
    inits = [_init(f"W{i}", he_normal(rng, (C, C, 3, 3))) for i in (1, 2, 3)]
    conv = {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}
    nodes = [
        helper.make_node("Conv", ["x", "W1"], ["c1"], name="conv1", **conv),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "W2"], ["c2"], name="conv2", **conv),
        helper.make_node("Add", ["c2", "x"], ["s"], name="add"),
        helper.make_node("Relu", ["s"], ["r2"], name="relu2"),
        helper.make_node("Conv", ["r2", "W3"], ["y"], name="conv3", **conv),
    ]
    vi = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", C, 8, 8]) for n in ("x", "y")]
    return _finish(nodes, vi[:1], vi[1:], inits)


def test_blocks_end_at_the_residual_add(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The layer whose output only feeds an Add closes its block, whose target is the Add's output; the
    refine runs through such a block (the skip input is fed to it) and stays never worse."""
    from onnx_tucker.graph.model import find_layers, infer_shapes
    from onnx_tucker.graph.rewrite import Replacement
    from onnx_tucker.ops.registry import handler_for

    model = _residual_block()
    reps = {}
    for lay in find_layers(model, infer_shapes(model, {})):
        assert lay.weight_name is not None
        f = handler_for(lay).decompose(lay, "tucker2", (4, 4), read_initializer(model, lay.weight_name))
        reps[lay.node_index] = Replacement(lay, f)
    assert blocks_of(model, reps, window=3) == [([0, 2], "s"), ([5], "y")]
    np.savez(tmp_path / "cal.npz", x=np.random.default_rng(3).standard_normal((64, 8, 8, 8)).astype(np.float32))
    res = api.compress(model, CompressionConfig(ranks="ratio:0.5", validate=False, calibrate=str(tmp_path / "cal.npz"),
                                                refine=True, refine_steps=50))
    blocks = res.calibration.blocks
    assert [b.targets[0] for b in blocks] == ["s", "y"], blocks
    assert all(b.kept == (b.error_after < b.error_before) for b in blocks)


def test_refine_needs_calibration_data() -> None:
    from onnx_tucker.errors import UsageError

    with pytest.raises(UsageError, match="--refine.*--calibrate"):
        CompressionConfig(refine=True)
