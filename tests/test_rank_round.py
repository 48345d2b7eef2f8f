"""`--round-to N` with `--ranks data:F` (issue 18): the data-chosen ranks are rounded inside the
allocation (`rankselect.round_candidates`), so every rank is a multiple of N or the layer's full rank,
never above it, and the MAC budget is still met."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_tucker import api
from onnx_tucker.calibration.rankselect import Coverage, round_candidates
from onnx_tucker.config import CompressionConfig, RankPolicy
from onnx_tucker.numerics.rankalloc import RankCandidate
from onnx_tucker.ops.layer import Layer
from onnx_tucker.ops.registry import handler_for
from tests.helpers import he_normal

# (out, in, k): a 3x3 stem, two 3x3 convs wide enough for rounding to matter, a 1x1.
_CONVS = [(24, 3, 3), (40, 24, 3), (56, 40, 3), (36, 56, 1)]


def _cnn(rng: np.random.Generator) -> onnx.ModelProto:
    nodes, inits, x = [], [], "x"
    for i, (o, c, k) in enumerate(_CONVS):
        w = he_normal(rng, (o, c, k, k))
        # Low-rank-ish weights plus noise: the data curves have a real knee, not a flat spectrum.
        u = rng.standard_normal((o, 6)) @ rng.standard_normal((6, c * k * k))
        w = (0.5 * w + 0.5 * u.reshape(w.shape) / np.sqrt(c * k * k)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"W{i}"))
        y = f"c{i}"
        nodes.append(helper.make_node("Conv", [x, f"W{i}"], [y], name=f"conv{i}", kernel_shape=[k, k],
                                      pads=[k // 2] * 4))
        x = f"r{i}"
        nodes.append(helper.make_node("Relu", [y], [x]))
    nodes[-1] = helper.make_node("Relu", [f"c{len(_CONVS) - 1}"], ["y"])
    graph = helper.make_graph(nodes, "m", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 12, 12])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", _CONVS[-1][0], 12, 12])],
                              initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _full(kind: str, ranks: list[int], o: int, c: int, k: int) -> tuple[int, ...]:
    if kind == "tucker2":
        return (o, c)
    if kind == "tucker1":
        return (o,)
    return (min(o, c * k * k),)


def _layers(tmp_path: Path, rng: np.random.Generator, round_to: int, fraction: float) -> tuple[list[dict], dict]:
    model = _cnn(rng)
    cal = tmp_path / "cal.npz"
    np.savez(cal, x=rng.random((48, 3, 12, 12)).astype(np.float32))
    report = tmp_path / f"r{round_to}.json"
    api.compress(model, CompressionConfig(ranks=RankPolicy.parse(f"data:{fraction}"), calibrate=str(cal),
                                          validate=False, round_to=round_to), report=report)
    doc = json.loads(report.read_text())
    return doc["layers"], doc["totals"]


@pytest.mark.parametrize("fraction", [0.5, 0.3])
def test_data_ranks_follow_round_to_and_keep_the_budget(tmp_path: Path, fraction: float) -> None:
    """round-to 8: every decomposed layer's ranks are multiples of 8 or that rank's full value (never
    above it); the model's MACs stay within the budget, and at most 8 % of the original's MACs under it.
    The allocation stops at its first point within budget (within one hull step, rankalloc.greedy_walk),
    and rounded steps are coarser: here data:0.3 reaches 0.269 unrounded, 0.240 rounded to 8; data:0.5
    0.500 both. Unrounded, the same data give ranks that are not multiples of 8."""
    layers, totals = _layers(tmp_path, np.random.default_rng(0), 8, fraction)
    dims = {f"conv{i}": d for i, d in enumerate(_CONVS)}
    decomposed = [lp for lp in layers if lp["kind"] != "skip"]
    assert decomposed, layers
    for lp in decomposed:
        o, c, k = dims[lp["name"]]
        full = _full(lp["kind"], lp["ranks"], o, c, k)
        for r, f in zip(lp["ranks"], full, strict=True):
            assert 1 <= r <= f and (r % 8 == 0 or r == f), (lp["name"], lp["kind"], lp["ranks"], full)
    before, after = totals["macs_before"], totals["macs_after"]
    assert after <= fraction * before, (after, before)
    assert after >= (fraction - 0.08) * before, (after / before, fraction)
    plain, _ = _layers(tmp_path, np.random.default_rng(0), 1, fraction)
    assert any(r % 8 for lp in plain if lp["kind"] != "skip" for r in lp["ranks"]), plain  # the test can fail


def test_rounded_candidates_never_exceed_full_rank_and_keep_the_least_error() -> None:
    """Tucker-2 input ranks on a grid (5, 7 -> 8; 10 -> 16, capped at 12 inputs): the rounded point keeps
    the error of the largest rank below it (an upper bound), and its MACs are recounted."""
    lay = Layer("c", "Conv", 0, weight_name="W", weight_shape=(20, 12, 3, 3), inputs=("x", "W"), outputs=("y",),
                input_shape=(1, 12, 8, 8), output_shape=(1, 20, 8, 8))
    cov = Coverage("im2col", 1, 12, 20, taps=9, tucker2=True)
    cands = [RankCandidate("original", (), 1000, 0.0),
             RankCandidate("tucker2", (3, 5), 10, 0.5), RankCandidate("tucker2", (3, 7), 11, 0.4),
             RankCandidate("tucker2", (19, 10), 12, 0.1), RankCandidate("tucker1", (17,), 13, 0.2)]
    out = {(c.kind, c.ranks): c for c in round_candidates(lay, cov, cands, 8)}
    assert set(out) == {("original", ()), ("tucker2", (8, 8)), ("tucker2", (20, 12)), ("tucker1", (20,))}
    assert out[("tucker2", (8, 8))].error == 0.4
    assert out[("tucker2", (8, 8))].macs == handler_for(lay).cost(lay, "tucker2", (8, 8))[1]  # recounted
    assert out[("tucker2", (8, 8))].macs == 12 * 8 * 64 + (8 * 8 * 9 + 8 * 20) * 64
