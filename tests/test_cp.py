"""CP (Lebedev et al. 2015) of a conv kernel as 1x1 S->R, depthwise k x k R->R, 1x1 R->T (issue 19).

Exact at its rank bound in onnxruntime over strides, pads (asymmetric too), dilations and auto_pad;
the ALS recovers a low-CP-rank kernel (tensorly's parafac as the oracle of the error); its cost
against the tensors the chain computes; calibration refits its last 1x1 and is never worse; a plan
file replays; fine-tuning sees its three factors as trainable factors.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnx_tucker import api
from onnx_tucker.calibration.calibrate import CalibrationOptions, calibrate_model
from onnx_tucker.config import CompressionConfig, RankPolicy
from onnx_tucker.graph.probe import expose_outputs
from onnx_tucker.graph.rewrite import apply_replacements
from onnx_tucker.graph.source import SourceModel
from onnx_tucker.numerics.tucker import cp, cp_rank_bound, reconstruct_cp
from onnx_tucker.ops.conv import balance_cp
from onnx_tucker.planning.stage import plan_and_decompose
from tests.helpers import (
    CONV_CONFIGS_2D,
    assert_outputs_close,
    initializer,
    make_conv_model,
    make_small_cnn,
    node_attrs,
    replace_ranks,
    run_ort,
)

CP = CompressionConfig(ranks=RankPolicy("full"), kind="cp", validate=False)
UNGROUPED = [c for c in CONV_CONFIGS_2D if int(c.get("group", 1)) == 1]  # type: ignore[call-overload]


@pytest.mark.parametrize("kw", UNGROUPED, ids=[str(i) for i in range(len(UNGROUPED))])
def test_full_rank_cp_is_the_original_conv_in_onnxruntime(kw: dict) -> None:
    args = dict(T=8, S=6, spatial=(11, 10), seed=1) | kw
    model = make_conv_model(**args)  # type: ignore[arg-type]
    res = api.compress(model, CP)
    (lp,) = res.plan.layers
    kh, kw_ = args.get("kernel", (3, 3))  # type: ignore[misc]
    r = cp_rank_bound(8, 6, kh * kw_)
    assert lp.kind == "cp" and lp.ranks == (r,)
    nodes = list(res.model.graph.node)
    assert [initializer(res.model, n.input[1]).shape for n in nodes] == [(r, 6, 1, 1), (r, 1, kh, kw_), (8, r, 1, 1)]
    assert node_attrs(nodes[1]).get("group") == r and node_attrs(nodes[0]).get("group", 1) == 1
    assert assert_outputs_close(model, res.model, rtol=2e-5, batch=int(args.get("batch", 1))) < 2e-5  # type: ignore[call-overload]


def test_grouped_and_1d_convs() -> None:
    """A grouped conv is never offered CP (its depthwise step would need groups of groups); a 1-D conv is."""
    res = api.compress(make_conv_model(T=8, S=6, group=2), CP)
    assert res.plan.layers[0].kind != "cp"
    w = np.random.default_rng(0).standard_normal((5, 4, 3))
    f = cp(w, cp_rank_bound(5, 4, 3))
    np.testing.assert_allclose(reconstruct_cp(f, w.shape), w, atol=1e-10)


def test_als_recovers_a_low_cp_rank_kernel_and_matches_tensorly() -> None:
    tl = pytest.importorskip("tensorly")
    from tensorly.decomposition import parafac

    rng = np.random.default_rng(3)
    t, s, k, r = 24, 16, 9, 6
    a, b, c = rng.standard_normal((t, r)), rng.standard_normal((s, r)), rng.standard_normal((k, r))
    clean = np.einsum("tr,sr,kr->tsk", a, b, c)
    noisy = clean + 1e-3 * np.linalg.norm(clean) / np.sqrt(clean.size) * rng.standard_normal(clean.shape)
    f = cp(noisy.reshape(t, s, 3, 3), r, iters=300, tol=1e-9)
    assert f.out.shape == (t, r) and f.inp.shape == (s, r) and f.taps.shape == (k, r)
    assert f.rel_error is not None and f.rel_error < 3e-3  # the noise level
    np.testing.assert_allclose(f.rel_error, np.linalg.norm(reconstruct_cp(f, noisy.shape) - noisy) / np.linalg.norm(noisy))
    # A generic kernel at a reduced rank: no worse than tensorly's parafac (same rank, SVD start) by more than 5 %.
    w = rng.standard_normal((t, s, k))
    ours = cp(w, 8, iters=300, tol=1e-9).rel_error
    cpt = parafac(tl.tensor(w), 8, init="svd", n_iter_max=200, tol=1e-9)
    theirs = np.linalg.norm(tl.cp_to_tensor(cpt) - w) / np.linalg.norm(w)
    assert ours is not None and ours <= theirs * 1.05
    # Components come by decreasing weight, with even scales across the three factors.
    norms = [np.linalg.norm(x, axis=0) for x in (f.out, f.inp, f.taps)]
    np.testing.assert_allclose(norms[0], norms[1], rtol=1e-9)
    assert np.all(np.diff(norms[0] * norms[1] * norms[2]) <= 1e-9)


@pytest.mark.parametrize("kw", [dict(), dict(strides=(2, 2), pads=(1, 1, 1, 1)), dict(auto_pad="VALID", kernel=(5, 3))])
def test_cost_is_the_arithmetic_of_the_tensors_the_chain_computes(kw: dict) -> None:
    """Parameters = the written factors; MACs = each factor's weight size x the pixels of the tensor it
    writes (the first 1x1 at the input resolution), read from onnxruntime."""
    args = dict(T=16, S=12, spatial=(13, 11), batch=2) | kw
    model = make_conv_model(**args)  # type: ignore[arg-type]
    res = api.compress(model, replace_ranks(CP, "ratio:0.2"))
    (lp,) = res.plan.layers
    assert lp.kind == "cp"
    nodes = list(res.model.graph.node)
    feeds = {"x": np.zeros((2, 12, 13, 11), np.float32)}
    outs = run_ort(expose_outputs(res.model, [nodes[0].output[0], nodes[1].output[0], "y"]), feeds)
    px = [int(np.prod(outs[n.output[0]].shape[2:])) for n in nodes]
    sizes = [initializer(res.model, n.input[1]).size for n in nodes]
    assert lp.params_after == sum(sizes)
    assert px[0] == 13 * 11 and px[1] == px[2]
    assert lp.macs_after == 2 * sum(s * p for s, p in zip(sizes, px, strict=True))


def test_calibration_refits_the_last_factor_exactly_and_never_worse() -> None:
    rng = np.random.default_rng(0)
    model = make_conv_model(T=8, S=8, strides=(2, 2), pads=(1, 0, 2, 1), spatial=(9, 9))
    x = rng.standard_normal((48, 8, 9, 9)).astype(np.float32)
    batches = [{"x": x[i : i + 1]} for i in range(48)]
    want = np.concatenate([run_ort(model, b)["y"] for b in batches[:6]])

    def err(m: onnx.ModelProto) -> float:
        got = np.concatenate([run_ort(m, b)["y"] for b in batches[:6]])
        return float(np.linalg.norm(got - want) / np.linalg.norm(want))

    source = SourceModel.load(model, CP.input_shapes)
    reps = plan_and_decompose(source, CP).replacements
    (i, rep), = reps.items()
    arrs = list(rep.factors.arrays)
    arrs[2] = arrs[2] + 0.5 * np.std(arrs[2]) * rng.standard_normal(arrs[2].shape)  # the last 1x1 knocked off
    bad = {i: type(rep)(rep.layer, type(rep.factors)(rep.factors.kind, tuple(arrs), rep.factors.rel_error))}
    comp = apply_replacements(model, bad)
    assert err(comp) > 0.1
    found = calibrate_model(model, comp, bad, batches, CalibrationOptions(rows=10**9))
    assert err(comp) < 1e-3 and "CP" in (found["conv"].note or "")
    reps = plan_and_decompose(SourceModel.load(model, CP.input_shapes), replace_ranks(CP, "ratio:0.1")).replacements
    assert len(reps) == 1
    one_shot = apply_replacements(model, reps)
    for method in ("last", "full"):
        comp = copy.deepcopy(one_shot)
        found = calibrate_model(model, comp, reps, batches, CalibrationOptions(method=method, rows=10**9))
        assert err(comp) <= err(one_shot) * (1 + 1e-6)
        c = found["conv"]
        assert c.error_after is not None and c.error_before is not None and c.error_after <= c.error_before


def test_balance_keeps_the_product_and_evens_the_scales() -> None:
    rng = np.random.default_rng(1)
    first, mid, last = rng.standard_normal((5, 4, 1, 1)), rng.standard_normal((5, 1, 3, 3)) * 100, rng.standard_normal((6, 5, 1, 1)) / 100
    out = balance_cp([first, mid, last])

    def kernel(f: np.ndarray, m: np.ndarray, la: np.ndarray) -> np.ndarray:
        return np.einsum("tr,rs,rk->tsk", la[:, :, 0, 0], f[:, :, 0, 0], m.reshape(5, -1))

    np.testing.assert_allclose(kernel(*out), kernel(first, mid, last), rtol=1e-10)
    n = [np.linalg.norm(out[0].reshape(5, -1), axis=1), np.linalg.norm(out[1].reshape(5, -1), axis=1),
         np.linalg.norm(out[2][:, :, 0, 0], axis=0)]
    np.testing.assert_allclose(n[0], n[1], rtol=1e-10)
    np.testing.assert_allclose(n[1], n[2], rtol=1e-10)


def test_a_cp_plan_file_replays(tmp_path: Path) -> None:
    model = make_conv_model(T=16, S=12, pads=(1, 1, 1, 1), spatial=(10, 10))
    plan_path = tmp_path / "plan.json"
    first = api.compress(model, replace_ranks(CP, "ratio:0.2"))
    plan_path.write_text(first.plan.to_json())
    again = api.compress(model, CompressionConfig(plan_file=str(plan_path), validate=False))
    assert [(lp.kind, lp.ranks) for lp in again.plan.layers] == [(lp.kind, lp.ranks) for lp in first.plan.layers]
    assert first.plan.layers[0].kind == "cp"


def test_data_ranks_price_cp_as_the_refit_of_its_last_factor() -> None:
    """The data path's CP candidates: each error is the least-squares refit of the last 1x1 (and the
    bias) on the decomposed front's output, computed directly on the same rows."""
    from onnx_tucker.calibration.rankselect import cp_tails
    from onnx_tucker.numerics.refit import GramStats, im2col
    from tests.helpers import single_layer_candidates

    rng = np.random.default_rng(2)
    model = make_conv_model(T=12, S=10, pads=(1, 1, 1, 1), spatial=(8, 8), batch="N")  # type: ignore[arg-type]
    cov, curves, cands = single_layer_candidates(model, rng.standard_normal((16, 10, 8, 8)).astype(np.float32))
    assert cov.cp and curves.cp and {c.ranks for c in cands if c.kind == "cp"} == {(r,) for r in curves.cp}
    w = np.asarray(initializer(model, "W"), dtype=np.float64)
    x = rng.standard_normal((16, 10, 8, 8))
    y = np.stack([run_ort(model, {"x": x[i : i + 1].astype(np.float32)})["y"][0] for i in range(16)]).astype(np.float64)
    n_idx, coords = np.repeat(np.arange(16), 64), np.array([(i, j) for i in range(8) for j in range(8)] * 16)
    p = im2col(x, n_idx, coords, (3, 3), (1, 1), (1, 1), (1, 1))
    yr = y[(n_idx, slice(None), coords[:, 0], coords[:, 1])]
    stats = GramStats(p.shape[1], 12)
    stats.add(p, yr)
    tails = cp_tails(stats, w, [5, 20], True, 0.0)
    for r, tail in tails.items():
        f = cp(w, r)
        z = p @ np.einsum("sr,kr->skr", f.inp, f.taps).reshape(-1, r)
        z1 = np.concatenate([z, np.ones((z.shape[0], 1))], axis=1)
        coef, *_ = np.linalg.lstsq(z1, yr, rcond=None)
        direct = float(np.sum((yr - z1 @ coef) ** 2))
        np.testing.assert_allclose(tail, direct, rtol=1e-5, atol=1e-8 * float(np.sum(yr**2)))
    assert tails[20] < tails[5]


def test_cp_pricing_stops_at_its_als_work_budget_unless_cp_is_asked_for() -> None:
    """`DataRankOptions.cp_max_work` bounds the ALS work of the priced CP grid (sum of T*S*k*R); under
    --kind cp alone the grid reaches the MAC cap whatever the work."""
    from onnx_tucker.calibration.rankselect import DataRankOptions, _covered, _cp_ranks

    source = SourceModel.load(make_small_cnn(batch="N", c1=12, c2=16, spatial=(8, 8)), None)
    lay = next(x for x in source.layers if x.layer_id == "conv2")
    cov = _covered(lay)
    full = _cp_ranks(lay, cov, DataRankOptions())
    size = float(np.prod(lay.weight_shape))
    capped = _cp_ranks(lay, cov, DataRankOptions(cp_max_work=size * 2.5 * max(full) / 3))
    assert full and capped and max(capped) < max(full)
    assert sum(size * r for r in capped) <= size * 2.5 * max(full) / 3 * 1.01
    assert _cp_ranks(lay, cov, DataRankOptions(cp_max_work=1.0)) == []
    assert _cp_ranks(lay, cov, DataRankOptions(cp_max_work=1.0, kind="cp")) == full
    assert _cp_ranks(lay, cov, DataRankOptions(kind="tucker2,spatial-svd")) == []
