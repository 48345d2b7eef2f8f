"""Calibration that scales (issue 15 item 1): streaming statistics equal a direct computation, the
first factor's matrix-free solve equals the direct one, and memory stays flat as the data grows."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.numpy_helper
import pytest

from onnx_tucker.numerics.refit import GramStats, fit_first_given_rest, residual


@pytest.mark.parametrize("d,t,batches", [(5, 3, 1), (17, 9, 4), (40, 2, 7)])
def test_gram_stats_streamed_equal_stacked(d: int, t: int, batches: int) -> None:
    rng = np.random.default_rng(d)
    ps = [rng.normal(size=(int(rng.integers(1, 30)), d)).astype(np.float32) for _ in range(batches)]
    ys = [rng.normal(size=(p.shape[0], t)) for p in ps]
    st = GramStats(d, t)
    for p, y in zip(ps, ys, strict=True):
        st.add(p, y)
        _ = st.pp  # reading between batches must not disturb the accumulation
    p, y = np.vstack(ps).astype(np.float64), np.vstack(ys)
    assert st.n == p.shape[0]
    np.testing.assert_allclose(st.pp, p.T @ p, rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(st.py, p.T @ y, rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(st.yy, y.T @ y, rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(st.sum_p, p.sum(0), rtol=1e-12, atol=1e-9)
    assert np.array_equal(st.pp, st.pp.T)


def test_gram_stats_projected_then_added() -> None:
    """Statistics derived without data (`projected`) and then accumulated on stay exact."""
    rng = np.random.default_rng(1)
    p, y = rng.normal(size=(50, 6)), rng.normal(size=(50, 2))
    f = rng.normal(size=(6, 3))
    st = GramStats(6, 2)
    st.add(p[:30], y[:30])
    pr = st.projected(f)
    pr.add(p[30:] @ f, y[30:])
    q = p @ f
    np.testing.assert_allclose(pr.pp, q.T @ q, rtol=1e-10)
    np.testing.assert_allclose(pr.py, q.T @ y, rtol=1e-10)
    np.testing.assert_allclose(pr.yy, y.T @ y, rtol=1e-10)


@pytest.mark.parametrize("intercept", [False, True])
def test_first_factor_matrix_free_equals_direct(intercept: bool) -> None:
    rng = np.random.default_rng(3)
    s, kk, r, t, m = 6, 4, 3, 5, 400
    x = rng.normal(size=(m, s * kk)) @ rng.normal(size=(s * kk, s * kk)) * 0.3 + 0.1
    y = rng.normal(size=(m, t))
    st = GramStats(s * kk, t)
    st.add(x, y)
    w = rng.normal(size=(r * kk, t))
    direct = fit_first_given_rest(st, w, r, kk, intercept, max_direct=10**9)
    start = rng.normal(size=(r, s))
    free = fit_first_given_rest(st, w, r, kk, intercept, start=start, max_direct=1, cg_iters=500)
    np.testing.assert_allclose(free, direct, rtol=1e-5, atol=1e-7)

    def err(a: np.ndarray) -> float:
        return residual(st.projected_channels(a, kk), w)

    # Few iterations from a start: never worse than the start.
    few = fit_first_given_rest(st, w, r, kk, False, start=start, max_direct=1, cg_iters=2)
    assert err(few) <= err(start) * (1 + 1e-9)


_CHILD = """
import sys
import numpy as np
import onnx
import onnx.numpy_helper
from onnx_tucker import api
from onnx_tucker.config import CompressionConfig
from tests.helpers import make_small_cnn

count, memory, path = int(sys.argv[1]), sys.argv[2], sys.argv[3]
model = make_small_cnn(c1=16, c2=32, spatial=(64, 64), batch="N", low_rank=True)
np.savez(path, x=np.random.default_rng(count).random((count, 3, 64, 64), dtype=np.float32))
cfg = CompressionConfig(ranks="data:0.5", calibrate=path, calibration_samples=count, validate=False,
                        calibration_memory=memory)
api.compress(model, cfg)
"""


def _peak_rss_of_compress(tmp_path, count: int, memory: str) -> int:  # type: ignore[no-untyped-def]
    """Peak RSS (bytes) of a child process running `compress --ranks data:0.5 --calibrate` on `count`
    random 3 x 64 x 64 images (RSS, not tracemalloc: onnxruntime allocates the activations)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = dict(os.environ, TMPDIR=str(tmp_path), PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(count), memory, str(tmp_path / f"cal{count}.npz")],
                            env=env, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, proc.stderr.read().decode() if proc.stderr else ""
    return int(usage.ru_maxrss) * 1024


@pytest.mark.slow  # two child processes per case, ~40 s on 2 cores
@pytest.mark.parametrize("memory,flat", [("32M", True), ("4G", False)])
def test_memory_stays_flat_as_the_calibration_set_grows(tmp_path, memory: str, flat: bool) -> None:  # type: ignore[no-untyped-def]
    """Under --calibration-memory, 4x the images costs their own bytes (48 KB each), not 4x the cached
    activations (two 16 x 64 x 64 float tensors at the frontier: 512 KB an image, 230 MB more for 450
    more images); with room for everything in memory (the control) the growth is there. The spill
    folder is gone afterwards."""
    small = _peak_rss_of_compress(tmp_path, 150, memory)
    big = _peak_rss_of_compress(tmp_path, 600, memory)
    growth = big - small
    data_growth = 450 * 3 * 64 * 64 * 4
    if flat:
        assert growth < 2 * data_growth + (24 << 20), growth
    else:
        assert growth > 100 << 20, growth  # the test can tell the difference
    assert not list(tmp_path.glob("onnx-tucker-activations-*"))


def test_memory_is_checked_before_any_work(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Calibration that cannot fit is one line naming the part that does not fit and the option that
    shrinks it, exit 2, before onnxruntime runs, nothing written."""
    from typer.testing import CliRunner

    from onnx_tucker.calibration import memory
    from onnx_tucker.cli import app
    from tests.helpers import make_small_cnn, save

    model = save(make_small_cnn(batch="N", low_rank=True), tmp_path / "m.onnx")
    np.savez(tmp_path / "cal.npz", x=np.random.default_rng(0).random((40, 3, 16, 16), dtype=np.float32))
    monkeypatch.setattr(memory, "available_memory", lambda: 1000)
    res = CliRunner().invoke(app, ["compress", str(model), str(tmp_path / "out.onnx"), "--ranks", "data:0.5",
                                   "--calibrate", str(tmp_path / "cal.npz")])
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: rank choice: needs about "), lines
    assert "available" in lines[0] and ("--calibration" in lines[0] or "--exclude" in lines[0]), lines[0]
    assert not (tmp_path / "out.onnx").exists()


def test_plan_calibration_sizes_the_batch_and_names_what_does_not_fit() -> None:
    from onnx_tucker.calibration.memory import plan_calibration
    from onnx_tucker.errors import UsageError

    shapes = {"x": (1, 3, 224, 224), "a": (1, 64, 112, 112), "b": (1, 256, 56, 56)}
    per_image = 4 * (64 * 112 * 112 + 256 * 56 * 56 + 3 * 224 * 224)
    est = plan_calibration("refit", [], shapes, 256, 2 << 30, 10, 4096, available=None)
    assert est.batch == max(1, min(64, (2 << 30) // 8 // per_image))
    assert est.cache_bytes <= 2 << 30 and est.spill_bytes == est.activation_bytes - (2 << 30)
    assert plan_calibration("refit", [], shapes, 256, 2 << 30, 10, 4096, batch=1, available=None).batch == 1
    with pytest.raises(UsageError, match=r"the largest part is the calibration images .*--calibration-samples"):
        plan_calibration("refit", [], shapes, 256, 1 << 20, 30 << 30, 4096, available=8 << 30)


@pytest.mark.parametrize("group,bias", [(1, True), (2, True), (1, False)])
def test_conv_transpose_last_factor_refits_to_the_least_squares_optimum(tmp_path, group: int, bias: bool) -> None:  # type: ignore[no-untyped-def]
    """A ConvTranspose chain (issue 15 item 2): its last 1x1 conv and bias are refit per pixel on the
    chain's own input, to the least-squares optimum computed directly on every output pixel; never worse
    than the one-shot factors."""
    from onnx_tucker import api
    from onnx_tucker.config import CompressionConfig
    from onnx_tucker.graph.probe import expose_outputs, factor_chain
    from tests.helpers import run_ort
    from tests.test_conv_transpose import make_convt_model

    model = make_convt_model(cin=8, cout=8, kernel=(3, 3), group=group, bias=bias, strides=[2, 2], pads=[1, 1, 1, 1])
    x = np.random.default_rng(1).standard_normal((12, 1, 8, 5, 5)).astype(np.float32)
    np.savez(tmp_path / "cal.npz", x=x.reshape(12, 8, 5, 5))
    plain = CompressionConfig(ranks="ratio:0.4", validate=False)
    one_shot = api.compress(model, plain).model
    calibrated = api.compress(model, CompressionConfig(ranks="ratio:0.4", validate=False,
                                                       calibrate=str(tmp_path / "cal.npz"))).model
    out = one_shot.graph.output[0].name
    chain = factor_chain(one_shot, out, 3 if op_kinds(one_shot) == 3 else 2)
    assert chain is not None and chain.last_input
    probe = expose_outputs(one_shot, [chain.last_input])
    zs = np.concatenate([run_ort(probe, {"x": xi})[chain.last_input] for xi in x])  # (12, R, H, W)
    ys = np.concatenate([run_ort(model, {"x": xi})[out] for xi in x])
    t, r = ys.shape[1] // group, zs.shape[1] // group
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in calibrated.graph.initializer}
    got_w = inits[chain.weights[-1]].astype(np.float64)
    got_b = inits[chain.bias].astype(np.float64) if chain.bias else None
    for k in range(group):
        zk = zs[:, k * r : (k + 1) * r].transpose(0, 2, 3, 1).reshape(-1, r).astype(np.float64)
        yk = ys[:, k * t : (k + 1) * t].transpose(0, 2, 3, 1).reshape(-1, t).astype(np.float64)
        a = np.hstack([zk, np.ones((zk.shape[0], 1))]) if bias else zk
        sol = np.linalg.lstsq(a, yk, rcond=None)[0]
        np.testing.assert_allclose(got_w[k * t : (k + 1) * t, :, 0, 0], sol[:r].T, rtol=2e-3, atol=2e-4)
        if bias:
            assert got_b is not None
            np.testing.assert_allclose(got_b[k * t : (k + 1) * t], sol[r], rtol=2e-3, atol=2e-4)

    def err(m: onnx.ModelProto) -> float:
        got = np.concatenate([run_ort(m, {"x": xi})[out] for xi in x])
        return float(np.linalg.norm(got - ys) / np.linalg.norm(ys))

    assert err(calibrated) < err(one_shot)


def op_kinds(model) -> int:  # type: ignore[no-untyped-def]
    """Nodes in the (one-layer) compressed model: 3 for a Tucker-2 chain, 2 for Tucker-1."""
    return len(model.graph.node)


def test_conv_transpose_full_rank_refit_reproduces_the_original(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from onnx_tucker import api
    from onnx_tucker.config import CompressionConfig
    from tests.helpers import run_ort
    from tests.test_conv_transpose import make_convt_model

    model = make_convt_model(cin=6, cout=4, kernel=(4, 4), strides=[2, 2], pads=[1, 1, 1, 1])
    x = np.random.default_rng(2).standard_normal((10, 6, 5, 5)).astype(np.float32)
    np.savez(tmp_path / "cal.npz", x=x)
    res = api.compress(model, CompressionConfig(ranks="full", validate=False, calibrate=str(tmp_path / "cal.npz")))
    (lc,) = res.layer_calibration.values()
    assert lc.method in ("last", "kept") and lc.error_after is not None and lc.error_after < 1e-3
    for xi in x[:3]:
        a, b = run_ort(model, {"x": xi[None]}), run_ort(res.model, {"x": xi[None]})
        (k,) = a
        np.testing.assert_allclose(b[k], a[k], rtol=1e-4, atol=1e-4)


def test_a_matrix_layer_with_fewer_rows_than_outputs_is_ranked_on_a_shrunk_gram(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """With 8 calibration rows for 30 outputs the output Gram has rank 8 and prices every rank above 8
    at zero error (the allocator would take rank 8 as free); on the Gram shrunk towards the weight's,
    every rank above the row count still lowers the error. The layer is ranked on the data and says why."""
    from dataclasses import replace

    from onnx_tucker import api
    from onnx_tucker.calibration.rankselect import _covered, layer_curves
    from onnx_tucker.config import CompressionConfig
    from onnx_tucker.graph.model import find_layers, infer_shapes
    from tests.helpers import make_gemm_model, random_orthonormal, run_ort

    rng = np.random.default_rng(0)
    w = random_orthonormal(rng, 40, 30) @ np.diag(np.geomspace(1.0, 0.02, 30)) @ random_orthonormal(rng, 30, 30).T
    model = make_gemm_model(K=40, N=30, rows=8, weight=w)
    x = rng.standard_normal((8, 40)).astype(np.float32)
    y = run_ort(model, {"x": x})["y"]
    (layer,) = find_layers(model, infer_shapes(model, {}))
    cov = _covered(layer)
    assert not isinstance(cov, str)

    def values(names):  # type: ignore[no-untyped-def]
        assert list(names) == ["y"]
        return [[y]]

    raw = layer_curves(layer, cov, values, w, 8).one_rank
    shrunk = layer_curves(layer, replace(cov, shrink=True), values, w, 8)
    assert np.all(raw[8:] < 1e-9)  # the rank-8 Gram: zero error from rank 8 on
    assert shrunk.one_rank[8] > 1e-3 and np.all(np.diff(shrunk.one_rank[8:]) < 0)
    assert "8 calibration rows for 30 outputs: output covariance shrunk" in shrunk.note

    np.savez(tmp_path / "cal.npz", x=x)
    res = api.plan(make_gemm_model(K=40, N=30, rows=1, weight=w),
                   CompressionConfig(ranks="data:0.5", calibrate=str(tmp_path / "cal.npz"), calibration_samples=8))
    (fc,) = res.plan.layers
    assert "fallback" not in (fc.policy or "") and fc.kind == "svd", (fc.policy, fc.kind)
    assert "8 calibration rows for 30 outputs: output covariance shrunk" in (fc.reason or ""), fc.reason


def _gaussian_rows(n: int, t: int, seed: int, white: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows y = W x + b with x white or not (K = 3t inputs): (rows, W W^T, the true covariance)."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((t, 3 * t)) * np.geomspace(1, 0.05, t)[:, None]
    scale = np.ones(3 * t) if white else rng.permutation(np.geomspace(3, 0.1, 3 * t))  # the inputs' std
    y = (rng.standard_normal((n, 3 * t)) * scale) @ w.T + rng.standard_normal(t)
    return y, w @ w.T, (w * scale**2) @ w.T


@pytest.mark.parametrize("n,t", [(8, 40), (30, 40), (2000, 20)])
@pytest.mark.parametrize("intercept", [True, False])
def test_shrunk_moment_intensity_is_ledoit_wolf_and_keeps_the_trace(n: int, t: int, intercept: bool) -> None:
    from onnx_tucker.numerics.rankalloc import NormMoments, shrunk_moment
    from onnx_tucker.numerics.refit import MomentStats

    y, prior, _ = _gaussian_rows(n, t, seed=n + t, white=False)  # the prior is not the truth
    out, norms = MomentStats(t), NormMoments(t)
    for part in np.array_split(y, 3):
        out.add(part)
        norms.add(part)
    shrunk, a = shrunk_moment(out, norms, prior, intercept)
    z = y - y.mean(0) if intercept else y
    s = z.T @ z / n
    f = prior * np.trace(s) / np.trace(prior)
    noise = np.sum([np.sum((np.outer(r, r) - s) ** 2) for r in z]) / n**2  # the direct formula
    expected = min(1.0, min(noise, np.sum((s - f) ** 2)) / np.sum((s - f) ** 2))
    assert a == pytest.approx(expected, rel=1e-8)
    c = shrunk.centred(intercept) / n
    np.testing.assert_allclose(c, (1 - a) * s + a * f, rtol=1e-8, atol=1e-10)
    assert np.trace(c) == pytest.approx(np.trace(s))
    assert np.linalg.eigvalsh(c).min() > -1e-9 * np.trace(s)
    assert (a > 0.3) if n < t else (a < 0.1)  # few rows: mostly the prior; many: the data's


@pytest.mark.parametrize("seed", range(4))
def test_shrunk_gram_is_closer_to_the_truth_than_the_sample_gram_on_few_rows(seed: int) -> None:
    """The point of shrinking: on 10 rows of 60 outputs the shrunk covariance estimates the true one
    better than the rank-10 sample covariance (here the prior is the truth's shape)."""
    from onnx_tucker.numerics.rankalloc import NormMoments, shrunk_moment
    from onnx_tucker.numerics.refit import MomentStats

    y, prior, truth = _gaussian_rows(10, 60, seed)
    out, norms = MomentStats(60), NormMoments(60)
    out.add(y)
    norms.add(y)
    shrunk, _ = shrunk_moment(out, norms, prior, True)
    err_sample = np.linalg.norm(out.centred(True) / 10 - truth)
    err_shrunk = np.linalg.norm(shrunk.centred(True) / 10 - truth)
    assert err_shrunk < 0.8 * err_sample, (err_shrunk, err_sample)


@pytest.mark.slow  # a 4148-wide Gram on 4608 rows: ~10 s
def test_a_layer_wider_than_the_old_cap_refits_to_the_least_squares_optimum(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A 3x3 conv over 460 channels reads an im2col 4140 wide (over the old 4096 cap, which refit only
    the last factor): its Tucker-1 chain is now refit jointly, to the reduced-rank least-squares optimum
    computed directly on every output position of the same data."""
    from onnx_tucker import api
    from onnx_tucker.config import CompressionConfig
    from onnx_tucker.numerics.refit import GramStats, fit_reduced_rank, im2col, residual, sample_positions
    from tests.helpers import make_conv_model, run_ort

    s, t, n = 460, 8, 72
    model = make_conv_model(T=t, S=s, kernel=(3, 3), pads=[1, 1, 1, 1], spatial=(8, 8), seed=3)
    x = np.random.default_rng(4).standard_normal((n, s, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "cal.npz", x=x)
    cfg = CompressionConfig(ranks="ratio:0.5", min_tucker2_channels=10**6, validate=False,
                            calibrate=str(tmp_path / "cal.npz"), calibration_samples=n)
    res = api.compress(model, cfg)
    (lp,) = res.plan.decomposed
    (cal,) = res.layer_calibration.values()
    assert lp.kind == "tucker1" and cal.method == "joint", (lp.kind, cal)
    y = np.concatenate([run_ort(model, {"x": xi[None]})["y"] for xi in x]).astype(np.float64)
    got = np.concatenate([run_ort(res.model, {"x": xi[None]})["y"] for xi in x]).astype(np.float64)
    n_idx, coords = sample_positions(np.random.default_rng(0), n, (8, 8), None)  # every position
    st = GramStats(s * 9, t)
    st.add(im2col(x.astype(np.float64), n_idx, coords, (3, 3), (1, 1), (1, 1), (1, 1)),
           y[(n_idx, slice(None)) + tuple(coords.T)])
    front, last, b = fit_reduced_rank(st, lp.ranks[0], True)
    optimum = residual(st, front @ last, b)
    achieved = float(np.sum((got - y) ** 2))
    assert achieved <= optimum * 1.001 + 1e-9, (achieved, optimum)
    assert achieved >= optimum * 0.98  # the same problem: not better than its optimum (up to the ridge)
