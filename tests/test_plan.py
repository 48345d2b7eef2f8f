"""Planning: skip reasons, rank policies and their adjustments, the gain rule, MAC counts, plan files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import onnx_tucker as ot
from onnx_tucker import CompressionConfig, PlanError, RankPolicy, UsageError
from onnx_tucker.numerics.tucker import unfold
from onnx_tucker.ops import layer_cost
from onnx_tucker.ops.layer import Layer
from tests.helpers import (
    assert_outputs_close,
    low_rank_kernel,
    low_rank_plus_noise,
    make_conv_model,
    make_gemm_model,
    make_matmul_model,
    make_small_cnn,
    save,
)


def plan_of(model: onnx.ModelProto, **kw: object) -> ot.CompressionPlan:
    return ot.plan(model, CompressionConfig(**kw))  # type: ignore[arg-type]


def only(plan: ot.CompressionPlan) -> ot.LayerPlan:
    (lp,) = plan.layers
    return lp


@pytest.fixture(scope="module")
def lowrank_conv() -> tuple[onnx.ModelProto, np.ndarray]:
    """64 x 48 x 3 x 3 conv with Tucker ranks (12, 10): EVBMF says (12, 10), 8 x 8 map, pads 1."""
    w = low_rank_kernel(np.random.default_rng(0), 64, 48, (3, 3), 12, 10)
    return make_conv_model(T=64, S=48, weight=w, pads=(1, 1, 1, 1), spatial=(8, 8)), w


# ---- skip reasons -------------------------------------------------------------------------------

def test_grouped_conv_decomposed_per_group() -> None:
    # Grouped convs are decomposed group by group (tests/test_grouped.py, docs/grouped-convs.md).
    lp = only(plan_of(make_conv_model(T=8, S=8, group=2), ranks=RankPolicy("full")))
    assert lp.kind == "tucker2" and lp.decomposed
    assert "ranks per group (group=2)" in lp.policy


def test_depthwise_conv_skipped_with_reason() -> None:
    lp = only(plan_of(make_conv_model(T=8, S=8, group=8)))
    assert lp.kind == "skip" and "depthwise" in lp.reason


def test_non_constant_weight_skipped_with_reason() -> None:
    lp = only(plan_of(make_conv_model(weight_as_input=True)))
    assert lp.kind == "skip" and "run time" in lp.reason


def test_matmul_with_constant_left_operand_skipped_with_reason() -> None:
    w = helper.make_tensor("A", TensorProto.FLOAT, [6, 4], np.ones(24, dtype=np.float32))
    node = helper.make_node("MatMul", ["A", "x"], ["y"], name="mm")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [6, 5])], initializer=[w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    lp = only(plan_of(model))
    assert lp.kind == "skip" and "left operand" in lp.reason


def test_exclude_and_include_skip_with_reason(lowrank_conv) -> None:  # type: ignore[no-untyped-def]
    model, _ = lowrank_conv
    assert only(plan_of(model)).decomposed  # the baseline is decomposed: the skips below are real
    lp = only(plan_of(model, exclude="^con"))
    assert lp.kind == "skip" and "--exclude" in lp.reason and "^con" in lp.reason
    lp = only(plan_of(model, include="fc"))
    assert lp.kind == "skip" and "--include" in lp.reason
    assert only(plan_of(model, include="conv")).decomposed


def test_include_exclude_select_layers_by_name() -> None:
    p = plan_of(make_small_cnn(low_rank=True), include="conv", exclude="1$")
    assert [lp.name for lp in p.decomposed] == ["conv2"]
    reasons = {lp.name: lp.reason for lp in p.layers}
    assert "--exclude" in reasons["conv1"] and "--include" in reasons["fc"]


def test_rank_zero_skipped_with_reason() -> None:
    """Pure-noise weights: EVBMF rank 0, the layer is kept and the reason says so."""
    lp = only(plan_of(make_conv_model(T=32, S=32, seed=3)))
    assert lp.kind == "skip"
    assert lp.evbmf_ranks == (0, 0)
    assert "rank 0" in lp.reason and "--min-rank" in lp.reason


def test_min_rank_turns_rank_zero_into_n() -> None:
    lp = only(plan_of(make_conv_model(T=32, S=32, seed=3, pads=(1, 1, 1, 1)), min_rank=4))
    assert lp.kind == "tucker2" and lp.ranks == (4, 4)
    assert "rank0:min-rank" in lp.policy


def test_no_gain_skipped_with_reason() -> None:
    """Gemm 40 x 24 at full rank 24: r (K + N) = 1536 > 960 parameters."""
    w = low_rank_plus_noise(np.random.default_rng(1), (40, 24), 5, sigma=0.01)
    lp = only(plan_of(make_gemm_model(K=40, N=24, weight=w), ranks=RankPolicy.parse("ratio:1")))
    assert lp.kind == "skip"
    assert "no gain" in lp.reason and "params 960 -> 1536" in lp.reason
    assert lp.params_after == lp.params_before  # a kept layer costs what it cost


def test_every_skipped_layer_has_a_reason() -> None:
    model = make_small_cnn()  # random weights: EVBMF judges several layers to be noise
    layers = plan_of(model).layers
    assert any(not lp.decomposed for lp in layers)  # not vacuous: there are skips to explain
    for lp in layers:
        assert lp.decomposed or lp.reason, lp


def test_every_skip_carries_its_cause_beside_the_reason(tmp_path: Path) -> None:
    """`LayerPlan.cause` is the reason as a code, set with it (issue 17): the words stay for people,
    code decides on the code. It reaches the JSON report and the plan file."""
    from onnx_tucker.planning.planner import SkipCause

    cases = [
        (make_conv_model(T=8, S=8, group=8), {}, SkipCause.MODEL, "depthwise"),
        (make_conv_model(T=32, S=32, seed=3), {}, SkipCause.RANK_ZERO, "rank 0"),
        (make_gemm_model(K=40, N=24, weight=low_rank_plus_noise(np.random.default_rng(1), (40, 24), 5, sigma=0.01)),
         {"ranks": RankPolicy.parse("ratio:1")}, SkipCause.NO_GAIN, "no gain"),
        (make_small_cnn(low_rank=True), {"exclude": "."}, SkipCause.EXCLUDE, "--exclude"),
        (make_small_cnn(low_rank=True), {"include": "nothing"}, SkipCause.INCLUDE, "--include"),
    ]
    for model, kw, cause, words in cases:
        for lp in plan_of(model, **kw).layers:
            assert lp.kind == "skip" and lp.cause is cause and words in (lp.reason or ""), (cause, lp)
    p = plan_of(make_small_cnn(low_rank=True), include="conv", exclude="1$")
    assert {lp.name: lp.cause for lp in p.layers} == {"conv1": SkipCause.EXCLUDE, "conv2": None, "fc": SkipCause.INCLUDE}
    # The JSON report and the plan file carry it as a string; a replayed skip says it came from the plan.
    model = save(make_small_cnn(low_rank=True), tmp_path / "m.onnx")
    res = ot.compress(model, CompressionConfig(exclude="1$", validate=False), tmp_path / "out.onnx")
    res.plan.save(tmp_path / "plan.json")
    layers = {d["name"]: d for d in json.loads((tmp_path / "plan.json").read_text())["layers"]}
    assert layers["conv1"]["cause"] == "exclude" and layers["conv2"]["cause"] is None
    from onnx_tucker.report.data import layer_dict

    assert [layer_dict(lp)["cause"] for lp in res.plan.layers] == [layers[lp.name]["cause"] for lp in res.plan.layers]
    replayed = ot.plan(model, CompressionConfig(plan_file=str(tmp_path / "plan.json")))
    assert {lp.name: lp.cause for lp in replayed.layers}["conv1"] is SkipCause.PLAN


def test_exclude_pattern_skips_exactly_the_named_layer() -> None:
    """An anchored --exclude keeps that one layer (with the pattern in its reason) and leaves every
    other layer planned exactly as without it."""
    model = make_small_cnn(low_rank=True)
    base = {lp.name: lp for lp in plan_of(model).layers}
    assert set(base) == {"conv1", "conv2", "fc"} and all(lp.decomposed for lp in base.values())
    p = {lp.name: lp for lp in plan_of(model, exclude="^conv2$").layers}
    assert p["conv2"].kind == "skip" and not p["conv2"].decomposed
    assert "--exclude" in p["conv2"].reason and "^conv2$" in p["conv2"].reason
    for name in ("conv1", "fc"):
        assert p[name].decomposed and not p[name].reason
        assert (p[name].kind, p[name].ranks) == (base[name].kind, base[name].ranks)
    # The exclusion is the stated reason even where EVBMF alone would also have skipped the layer.
    noisy = {lp.name: lp for lp in plan_of(make_small_cnn(), exclude="^conv2$").layers}
    assert "--exclude" in noisy["conv2"].reason and "--exclude" not in noisy["conv1"].reason


# ---- rank policies ------------------------------------------------------------------------------

def test_vbmf_ranks_are_the_true_tucker_ranks(lowrank_conv) -> None:  # type: ignore[no-untyped-def]
    lp = only(plan_of(lowrank_conv[0]))
    assert lp.kind == "tucker2" and lp.evbmf_ranks == (12, 10) and lp.ranks == (12, 10)
    assert lp.policy == "vbmf"
    assert len(lp.sigma2) == 2 and all(s > 0 for s in lp.sigma2)


@pytest.mark.parametrize("f", [0.1, 0.3, 0.55])
def test_ratio_rank_is_ceil_of_fraction_of_dimension(lowrank_conv, f: float) -> None:  # type: ignore[no-untyped-def]
    lp = only(plan_of(lowrank_conv[0], ranks=RankPolicy.parse(f"ratio:{f}")))
    assert lp.ranks == (math.ceil(f * 64), math.ceil(f * 48))
    assert lp.policy == f"ratio:{f:g}"


@pytest.mark.parametrize("f", [0.5, 0.8, 0.95])
def test_energy_rank_keeps_fraction_of_energy(lowrank_conv, f: float) -> None:  # type: ignore[no-untyped-def]
    model, w = lowrank_conv
    expected = []
    for mode in (0, 1):
        s = np.linalg.svd(unfold(w.astype(np.float64), mode), compute_uv=False)
        frac = np.cumsum(s**2) / np.sum(s**2)
        r = int(np.argmax(frac >= f - 1e-12)) + 1  # the smallest rank holding fraction f
        assert frac[r - 1] >= f and (r == 1 or frac[r - 2] < f)
        expected.append(r)
    lp = only(plan_of(model, ranks=RankPolicy.parse(f"energy:{f}")))
    assert lp.ranks == tuple(expected)


def test_energy_rank_on_matrix() -> None:
    big = np.zeros((40, 30))
    big[:5, :5] = np.diag([4.0, 3.0, 2.0, 1.0, 0.5])  # singular values, known exactly
    # energies 16, 9, 4, 1, 0.25 of 30.25: 25/30.25 = 0.826 at rank 2, 29/30.25 = 0.959 at rank 3
    model = make_gemm_model(K=40, N=30, weight=big)
    assert only(plan_of(model, ranks=RankPolicy.parse("energy:0.8"))).ranks == (2,)
    assert only(plan_of(model, ranks=RankPolicy.parse("energy:0.9"))).ranks == (3,)
    assert only(plan_of(model, ranks=RankPolicy.parse("energy:0.96"))).ranks == (4,)


@pytest.mark.parametrize(("scale", "expected"), [(1.5, (18, 15)), (0.5, (6, 5)), (1.25, (15, 13)), (0.01, (1, 1))])
def test_rank_scale_multiplies_and_rounds_up(lowrank_conv, scale: float, expected: tuple[int, int]) -> None:  # type: ignore[no-untyped-def]
    assert only(plan_of(lowrank_conv[0], rank_scale=scale)).ranks == expected


@pytest.mark.parametrize(("min_rank", "expected"), [(5, (12, 10)), (11, (12, 11)), (20, (20, 20))])
def test_min_rank_is_a_floor(lowrank_conv, min_rank: int, expected: tuple[int, int]) -> None:  # type: ignore[no-untyped-def]
    assert only(plan_of(lowrank_conv[0], min_rank=min_rank)).ranks == expected


@pytest.mark.parametrize(("round_to", "expected"), [(1, (12, 10)), (4, (12, 12)), (8, (16, 16)), (5, (15, 10))])
def test_round_to_rounds_up_to_multiple(lowrank_conv, round_to: int, expected: tuple[int, int]) -> None:  # type: ignore[no-untyped-def]
    assert only(plan_of(lowrank_conv[0], round_to=round_to)).ranks == expected


def test_round_to_is_capped_at_dimension() -> None:
    """T = 20: rounding 4 up to 32 would exceed it; the output rank stops at 20, the input rank at 32 < S.
    A full output rank leaves nothing to the last 1x1: the planner writes the mirror, Tucker-1-in at 32."""
    w = low_rank_kernel(np.random.default_rng(4), 20, 48, (3, 3), 4, 10)
    model = make_conv_model(T=20, S=48, weight=w, pads=(1, 1, 1, 1), spatial=(6, 6))
    assert only(plan_of(model)).ranks == (4, 10)
    lp = only(plan_of(model, round_to=32))
    assert lp.kind == "tucker1-in" and lp.ranks == (32,) and "output mode full" in lp.policy
    w2 = low_rank_plus_noise(np.random.default_rng(5), (40, 24), 5, sigma=0.01)
    gemm = make_gemm_model(K=40, N=24, weight=w2)
    assert only(plan_of(gemm, round_to=32)).ranks == (24,)  # min(K, N); no gain, but capped


def test_rank_scale_and_round_to_compose(lowrank_conv) -> None:  # type: ignore[no-untyped-def]
    # 12 * 1.5 = 18 -> 24, 10 * 1.5 = 15 -> 16
    assert only(plan_of(lowrank_conv[0], rank_scale=1.5, round_to=8)).ranks == (24, 16)


def test_full_ranks_ignore_adjustments_and_gain(lowrank_conv) -> None:  # type: ignore[no-untyped-def]
    lp = only(plan_of(lowrank_conv[0], ranks=RankPolicy("full"), round_to=7, rank_scale=0.5))
    assert lp.kind == "tucker2" and lp.ranks == (64, 48)
    assert lp.params_after > lp.params_before  # decomposed although it grows


def test_rank_policy_parse() -> None:
    assert RankPolicy.parse("vbmf") == RankPolicy("vbmf")
    assert RankPolicy.parse("full") == RankPolicy("full")
    assert RankPolicy.parse("ratio:0.25") == RankPolicy("ratio", 0.25)
    assert RankPolicy.parse("energy:1") == RankPolicy("energy", 1.0)
    for bad in ("ratio:0", "ratio:1.5", "energy:-1", "ratio:x", "svd", "ratio:"):
        with pytest.raises(UsageError):
            RankPolicy.parse(bad)


# ---- the gain rule and MAC counts ---------------------------------------------------------------

def _tucker2_cost(T: int, S: int, k: int, r4: int, r3: int, in_px: int, out_px: int) -> tuple[int, int]:
    """Written out here, independent of cost.py: first 1x1 at the input resolution, the rest at the output's."""
    params = S * r3 + r3 * r4 * k + r4 * T
    return params, S * r3 * in_px + (r3 * r4 * k + r4 * T) * out_px


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("f", [0.3, 0.6, 0.75, 0.8, 0.9])
def test_decomposed_only_if_params_and_macs_both_drop(stride: int, f: float) -> None:
    T = S = 64
    model = make_conv_model(T=T, S=S, pads=(1, 1, 1, 1), strides=(stride, stride), spatial=(16, 16), seed=5)
    lp = only(plan_of(model, ranks=RankPolicy.parse(f"ratio:{f}")))
    r = math.ceil(f * 64)
    out_px = (16 // stride) ** 2
    params0, macs0 = T * S * 9, T * S * 9 * out_px
    params1, macs1 = _tucker2_cost(T, S, 9, r, r, 256, out_px)
    assert (lp.params_before, lp.macs_before) == (params0, macs0)
    gains = params1 < params0 and macs1 < macs0
    assert lp.decomposed == gains, (lp, params1, macs1)
    if gains:
        assert (lp.params_after, lp.macs_after) == (params1, macs1)
    else:
        assert "no gain" in lp.reason


def test_strided_layer_where_only_macs_grow_is_skipped() -> None:
    """EVBMF ranks (56, 56) on a stride-2 64x64 conv: fewer params but more MACs (the first 1x1
    runs at 4x the output's pixels), so under the default policy the layer is kept."""
    w = low_rank_kernel(np.random.default_rng(6), 64, 64, (3, 3), 56, 56)
    model = make_conv_model(T=64, S=64, weight=w, pads=(1, 1, 1, 1), strides=(2, 2), spatial=(16, 16))
    lp = only(plan_of(model))
    assert lp.evbmf_ranks == (56, 56)
    params1, macs1 = _tucker2_cost(64, 64, 9, 56, 56, 256, 64)
    assert params1 < 64 * 64 * 9 < macs1 / 64  # the premise: params drop, MACs grow
    assert lp.kind == "skip"
    assert "MACs" in lp.reason and "params" not in lp.reason
    # The same weights without the stride gain on both counts and are decomposed.
    flat = make_conv_model(T=64, S=64, weight=w, pads=(1, 1, 1, 1), spatial=(16, 16))
    assert only(plan_of(flat)).kind == "tucker2"


def _layer(op: str, wshape: tuple[int, ...], in_shape: tuple[int, ...], out_shape: tuple[int, ...], **attrs: object) -> Layer:
    return Layer(layer_id="l", op_type=op, node_index=0, weight_name="W", weight_shape=wshape, weight_dtype="float32",
                 attrs=attrs, input_shape=in_shape, output_shape=out_shape)


def test_cost_strided_3x3_tucker2_uses_input_resolution_for_first_1x1() -> None:
    lay = _layer("Conv", (64, 32, 3, 3), (2, 32, 16, 16), (2, 64, 8, 8), strides=[2, 2])
    assert layer_cost(lay, "original") == (64 * 32 * 9, 2 * 64 * 32 * 9 * 64)
    params, macs = layer_cost(lay, "tucker2", (16, 8))
    assert params == 32 * 8 + 8 * 16 * 9 + 16 * 64
    assert macs == 2 * (32 * 8 * 256 + (8 * 16 * 9 + 16 * 64) * 64)


def test_cost_strided_1x1_svd_runs_at_output_resolution() -> None:
    lay = _layer("Conv", (64, 32, 1, 1), (1, 32, 16, 16), (1, 64, 8, 8), strides=[2, 2])
    assert layer_cost(lay, "original") == (2048, 2048 * 64)
    assert layer_cost(lay, "svd", (10,)) == (10 * 96, 10 * 96 * 64)


def test_cost_tucker1_and_fc() -> None:
    conv = _layer("Conv", (16, 3, 3, 3), (1, 3, 32, 32), (1, 16, 32, 32))
    assert layer_cost(conv, "tucker1", (6,)) == (6 * 27 + 16 * 6, (6 * 27 + 16 * 6) * 1024)
    gemm = _layer("Gemm", (10, 40), (4, 40), (4, 10), transB=1)  # stored N x K
    assert layer_cost(gemm, "original") == (400, 1600)
    assert layer_cost(gemm, "svd", (3,)) == (150, 600)
    mm = _layer("MatMul", (40, 10), (2, 3, 40), (2, 3, 10))
    assert layer_cost(mm, "svd", (3,)) == (150, 900)


def test_plan_mac_counts_use_inferred_resolutions() -> None:
    """Through the whole planner: a stride-2 3x3 and a stride-2 1x1 in one model."""
    rng = np.random.default_rng(7)
    w = low_rank_kernel(rng, 32, 16, (3, 3), 6, 5)
    model = make_conv_model(T=32, S=16, weight=w, strides=(2, 2), pads=(1, 1, 1, 1), spatial=(12, 12))
    lp = only(plan_of(model))
    assert lp.ranks == (6, 5)
    assert lp.macs_after == _tucker2_cost(32, 16, 9, 6, 5, 144, 36)[1]
    w1 = low_rank_plus_noise(rng, (32, 16), 4, sigma=0.001).astype(np.float32).reshape(32, 16, 1, 1)
    model1 = make_conv_model(T=32, S=16, kernel=(1, 1), weight=w1, strides=(2, 2), spatial=(12, 12))
    lp1 = only(plan_of(model1))
    assert lp1.kind == "svd" and lp1.ranks == (4,)
    assert lp1.macs_after == 4 * (16 + 32) * 36


def test_small_first_conv_gets_tucker1() -> None:
    lp = only(plan_of(make_conv_model(T=16, S=3, pads=(1, 1, 1, 1)), ranks=RankPolicy.parse("ratio:0.25")))
    assert lp.kind == "tucker1" and lp.ranks == (4,)


# ---- plan files ---------------------------------------------------------------------------------

def test_save_plan_then_plan_replays_exactly(tmp_path: Path) -> None:
    model = make_small_cnn(low_rank=True)
    first = ot.compress(model, CompressionConfig(validate=False, rank_scale=1.3, round_to=2))
    path = tmp_path / "plan.json"
    first.plan.save(path)
    data = json.loads(path.read_text())
    assert data["format"] == "onnx-tucker-plan" and len(data["layers"]) == 3

    # A different rank policy on replay: the plan file wins.
    again = ot.compress(model, CompressionConfig(validate=False, ranks=RankPolicy.parse("ratio:0.9"), plan_file=str(path)))
    assert [(lp.name, lp.kind, lp.ranks) for lp in again.plan.layers] == [
        (lp.name, lp.kind, lp.ranks) for lp in first.plan.layers
    ]
    assert any(lp.decomposed for lp in again.plan.layers)
    assert all(lp.policy == "plan file" for lp in again.plan.decomposed)
    assert again.model.SerializeToString() == first.model.SerializeToString()


def test_cli_save_plan_then_plan_replays_exactly(tmp_path: Path) -> None:
    """The same round trip through the command line flags --save-plan / --plan / --report."""
    from typer.testing import CliRunner

    from onnx_tucker.cli import app

    src = save(make_small_cnn(low_rank=True), tmp_path / "cnn.onnx")
    runner = CliRunner()
    r1 = runner.invoke(app, ["compress", str(src), str(tmp_path / "a.onnx"), "--rank-scale", "1.5", "--quiet",
                             "--save-plan", str(tmp_path / "plan.json"), "--report", str(tmp_path / "a.json")])
    assert r1.exit_code == 0, r1.output
    r2 = runner.invoke(app, ["compress", str(src), str(tmp_path / "b.onnx"), "--ranks", "ratio:0.9", "--quiet",
                             "--plan", str(tmp_path / "plan.json"), "--report", str(tmp_path / "b.json")])
    assert r2.exit_code == 0, r2.output
    a, b = (json.loads((tmp_path / f).read_text())["layers"] for f in ("a.json", "b.json"))
    assert [(x["name"], x["kind"], x["ranks"]) for x in a] == [(x["name"], x["kind"], x["ranks"]) for x in b]
    assert any(x["ranks"] for x in a)
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()


def test_plan_file_ranks_are_applied(tmp_path: Path) -> None:
    """Edited ranks in a plan file are used as written (and a 'skip' entry keeps the layer)."""
    model = make_small_cnn(low_rank=True)
    p = plan_of(model)
    data = p.to_dict()
    for item in data["layers"]:  # type: ignore[union-attr]
        if item["name"] == "conv2":
            item["kind"], item["ranks"] = "tucker2", [3, 2]
        if item["name"] == "fc":
            item["kind"], item["ranks"] = "skip", None
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(data))
    replay = {lp.name: lp for lp in plan_of(model, plan_file=str(path)).layers}
    assert replay["conv2"].kind == "tucker2" and replay["conv2"].ranks == (3, 2)
    assert replay["fc"].kind == "skip" and "plan file" in replay["fc"].reason


def test_plan_for_another_model_raises(tmp_path: Path) -> None:
    path = tmp_path / "plan.json"
    plan_of(make_small_cnn(low_rank=True)).save(path)
    with pytest.raises(PlanError, match="another model"):
        plan_of(make_conv_model(node_name="other"), plan_file=str(path))
    # Same layer names, other weight shapes.
    with pytest.raises(PlanError, match="another model"):
        plan_of(make_small_cnn(c1=8, c2=24, low_rank=True), plan_file=str(path))


def test_plan_with_impossible_ranks_raises(tmp_path: Path) -> None:
    model = make_small_cnn(low_rank=True)
    data = plan_of(model).to_dict()
    for item in data["layers"]:  # type: ignore[union-attr]
        if item["name"] == "conv2":
            item["kind"], item["ranks"] = "tucker2", [99, 2]
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(PlanError):
        plan_of(model, plan_file=str(path))


@pytest.mark.parametrize(("layer", "kind", "ranks"), [("conv2", "svd", [4]), ("fc", "tucker2", [2, 2]), ("fc", "tucker1", [2])])
def test_plan_with_kind_the_layer_cannot_take_raises(tmp_path: Path, layer: str, kind: str, ranks: list[int]) -> None:
    """A hand-edited kind the rewrite cannot build: a clear PlanError, not a broken model or a crash."""
    model = make_small_cnn(low_rank=True)
    data = plan_of(model).to_dict()
    for item in data["layers"]:  # type: ignore[union-attr]
        if item["name"] == layer:
            item["kind"], item["ranks"] = kind, ranks
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(data))
    with pytest.raises(PlanError, match=f"'{layer}'.*cannot be decomposed as {kind}"):
        ot.compress(model, CompressionConfig(validate=False, plan_file=str(path)))


def test_plan_file_may_tucker_a_1x1_conv(tmp_path: Path) -> None:
    """Tucker-2 of a 1x1 conv (three 1x1 convs) is a valid, if unusual, hand-written plan."""
    model = make_conv_model(T=8, S=12, kernel=(1, 1), strides=(2, 2))
    data = {"format": "onnx-tucker-plan", "version": 1,
            "layers": [{"name": "conv", "kind": "tucker2", "ranks": [8, 8], "weight_shape": [8, 12, 1, 1]}]}
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(data))
    res = ot.compress(model, CompressionConfig(validate=False, plan_file=str(path)))
    assert res.plan.layers[0].kind == "tucker2" and res.plan.layers[0].ranks == (8, 8)
    assert len(res.model.graph.node) == 3
    assert_outputs_close(model, res.model)


@pytest.mark.parametrize("content", ["not json", "{}", '{"format": "onnx-tucker-plan", "layers": [{"kind": "svd"}]}'])
def test_malformed_plan_file_raises(tmp_path: Path, content: str) -> None:
    path = tmp_path / "plan.json"
    path.write_text(content)
    with pytest.raises(PlanError):
        plan_of(make_matmul_model(), plan_file=str(path))


def test_missing_plan_file_raises(tmp_path: Path) -> None:
    with pytest.raises(PlanError, match="not found"):
        plan_of(make_matmul_model(), plan_file=str(tmp_path / "nope.json"))
