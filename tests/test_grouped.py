"""Grouped convs: per-group Tucker-2 / Tucker-1 / SVD with block-diagonal (grouped) factors.

Ranks are per group and the same in every group (per mode, the largest any group asks for), costs
count every group, the usual gain rule applies, and the rewrite keeps `group` on every node of the
chain. Depthwise convs are kept with a reason. Why grouped convs are decomposed at all:
docs/grouped-convs.md (measured).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
import pytest

import onnx_tucker as ot
from onnx_tucker import CompressionConfig, RankPolicy
from onnx_tucker.errors import PlanError
from tests.helpers import (
    assert_outputs_close,
    initializer,
    low_rank_kernel,
    make_conv_model,
    node_attrs,
)


def grouped_weight(ranks: list[tuple[int, int]], tg: int, sg: int, kernel: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """One low-rank kernel per group, with that group's Tucker ranks (r_out, r_in), stacked on axis 0."""
    rng = np.random.default_rng(seed)
    return np.concatenate([low_rank_kernel(rng, tg, sg, kernel, ro, ri) for ro, ri in ranks])


def only(plan: ot.CompressionPlan) -> ot.LayerPlan:
    (lp,) = plan.layers
    return lp


def test_ranks_are_per_group_and_the_largest_over_the_groups() -> None:
    w = grouped_weight([(6, 3), (4, 5)], tg=16, sg=12, kernel=(3, 3))
    model = make_conv_model(T=32, S=24, group=2, weight=w, pads=(1, 1, 1, 1), spatial=(8, 8))
    res = ot.compress(model, CompressionConfig(samples=2))
    lp = only(res.plan)
    assert lp.kind == "tucker2" and lp.ranks == (6, 5) and lp.evbmf_ranks == (6, 5)
    assert "ranks per group (group=2)" in lp.policy
    # Block-diagonal factors: 1x1 24 -> 2*5 (group 2), core 10 -> 12 (group 2), 1x1 12 -> 32 (group 2).
    nodes = list(res.model.graph.node)
    assert [node_attrs(n)["group"] for n in nodes] == [2, 2, 2]
    shapes = [initializer(res.model, n.input[1]).shape for n in nodes]
    assert shapes == [(10, 12, 1, 1), (12, 5, 3, 3), (32, 6, 1, 1)]
    # The kernel is exactly low-rank per group (plus 1% noise): the outputs barely move.
    assert lp.rel_error is not None and lp.rel_error < 0.03
    assert_outputs_close(model, res.model, rtol=0.05)


def test_costs_count_every_group() -> None:
    w = grouped_weight([(4, 3)] * 4, tg=8, sg=6, kernel=(3, 3))
    model = make_conv_model(T=32, S=24, group=4, weight=w, strides=(2, 2), pads=(1, 1, 1, 1), spatial=(10, 10))
    res = ot.compress(model, CompressionConfig(validate=False))
    lp = only(res.plan)
    assert lp.kind == "tucker2" and lp.ranks == (4, 3)
    G, T, sg, k, r4, r3, in_px, out_px = 4, 32, 6, 9, 4, 3, 100, 25
    assert lp.params_before == T * sg * k and lp.macs_before == T * sg * k * out_px
    first, rest = G * sg * r3, G * r3 * r4 * k + r4 * T
    assert lp.params_after == first + rest
    assert lp.macs_after == first * in_px + rest * out_px  # the first 1x1 runs before the stride
    # ... and the parameters counted are the ones written.
    written = sum(math.prod(initializer(res.model, n.input[1]).shape) for n in res.model.graph.node)
    assert written == lp.params_after


def test_full_rank_grouped_chain_reproduces_outputs_for_each_kind() -> None:
    base = dict(T=12, S=9, group=3, pads=(1, 0, 2, 1), strides=(1, 2), spatial=(7, 8))
    for kernel, kind in (((3, 3), "tucker2"), ((1, 1), "svd")):
        model = make_conv_model(kernel=kernel, **base)  # type: ignore[arg-type]
        res = ot.compress(model, CompressionConfig(ranks=RankPolicy("full"), samples=2))
        assert only(res.plan).kind == kind and res.validation is not None and res.validation.passed
    # Tucker-1 where the conv has few input channels in all (2 groups of 2 = 4 < 8).
    model = make_conv_model(T=8, S=4, group=2, pads=(1, 1, 1, 1))
    res = ot.compress(model, CompressionConfig(ranks=RankPolicy("full"), samples=2))
    assert only(res.plan).kind == "tucker1" and res.validation is not None and res.validation.passed
    assert [node_attrs(n)["group"] for n in res.model.graph.node] == [2, 2]


def test_default_kind_counts_all_input_channels() -> None:
    """ResNeXt-like 4-channel groups: 32 input channels in all, so Tucker-2 (measured faster there)."""
    w = grouped_weight([(2, 2)] * 8, tg=4, sg=4, kernel=(3, 3))
    model = make_conv_model(T=32, S=32, group=8, weight=w, pads=(1, 1, 1, 1), spatial=(6, 6))
    lp = only(ot.plan(model, CompressionConfig()))
    assert lp.kind == "tucker2" and lp.ranks == (2, 2)
    assert lp.params_after is not None and lp.params_before is not None and lp.params_after < lp.params_before


def test_no_gain_keeps_grouped_conv_with_reason() -> None:
    model = make_conv_model(T=8, S=8, group=2, pads=(1, 1, 1, 1))
    lp = only(ot.plan(model, CompressionConfig(ranks=RankPolicy("ratio", 1.0))))
    assert not lp.decomposed and lp.reason is not None
    assert lp.reason.startswith("no gain") or lp.reason.startswith("full rank"), lp.reason


def test_depthwise_conv_is_kept_with_reason() -> None:
    for T in (8, 16):  # multiplier 1 and 2
        lp = only(ot.plan(make_conv_model(T=T, S=8, group=8), CompressionConfig(ranks=RankPolicy("full"))))
        assert not lp.decomposed
        assert lp.reason == "depthwise conv (group=8): one input channel per group leaves no channel mode to factorise; kept as is"


def test_plan_file_replays_grouped_ranks(tmp_path: Path) -> None:
    w = grouped_weight([(6, 3), (4, 5)], tg=16, sg=12, kernel=(3, 3))
    model = make_conv_model(T=32, S=24, group=2, weight=w, pads=(1, 1, 1, 1), spatial=(8, 8))
    first = ot.plan(model, CompressionConfig())
    path = tmp_path / "plan.json"
    first.save(path)
    again = only(ot.plan(model, CompressionConfig(ranks=RankPolicy("ratio", 0.9), plan_file=str(path))))
    assert (again.kind, again.ranks) == ("tucker2", (6, 5))
    # Ranks beyond a group's channels (12 input channels per group) do not fit.
    data = path.read_text().replace('"ranks": [\n        6,\n        5\n      ]', '"ranks": [\n        6,\n        13\n      ]')
    assert data != path.read_text()
    path.write_text(data)
    with pytest.raises(PlanError, match="do not fit"):
        ot.plan(model, CompressionConfig(plan_file=str(path)))


def test_hooi_iterations_apply_per_group() -> None:
    model = make_conv_model(T=16, S=16, group=2, pads=(1, 1, 1, 1), seed=3)
    cfg = dict(ranks=RankPolicy("ratio", 0.5), min_rank=1, validate=False)
    plain = only(ot.compress(model, CompressionConfig(**cfg)).plan)  # type: ignore[arg-type]
    hooi = only(ot.compress(model, CompressionConfig(hooi_iters=3, **cfg)).plan)  # type: ignore[arg-type]
    assert plain.ranks == hooi.ranks and plain.rel_error is not None and hooi.rel_error is not None
    assert hooi.rel_error <= plain.rel_error + 1e-12


def test_grouped_conv_in_opset_7_ir_3_model() -> None:
    """Old models (IR 3, weights listed as inputs) keep their IR version and list the new factors."""
    model = make_conv_model(T=8, S=8, group=2, pads=(1, 1, 1, 1), opset=7, ir_version=3)
    res = ot.compress(model, CompressionConfig(ranks=RankPolicy("full"), samples=2))
    assert only(res.plan).decomposed and res.validation is not None and res.validation.passed
    assert res.model.ir_version == 3
    assert {t.name for t in res.model.graph.initializer} <= {i.name for i in res.model.graph.input}
    onnx.checker.check_model(res.model)
