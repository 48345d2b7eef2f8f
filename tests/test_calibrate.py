"""Calibration (`compress --calibrate`, issue 11): refitting decomposed layers on data.

Every check measures layer outputs in onnxruntime (or solves the least-squares problem directly in
numpy), independently of the Gram algebra in `numerics.refit` that the implementation uses.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

from onnx_tucker.calibration.calibrate import CalibrationOptions, calibrate_model, calibration_batches
from onnx_tucker.cli import app
from onnx_tucker.config import CompressionConfig, RankPolicy
from onnx_tucker.graph.probe import expose_outputs, factor_chain, read_initializer, write_initializers
from onnx_tucker.graph.rewrite import Replacement, apply_replacements
from onnx_tucker.graph.source import SourceModel
from onnx_tucker.numerics import refit
from onnx_tucker.ops.layer import LayerFactors
from onnx_tucker.planning.decompose import decompose_layer
from onnx_tucker.planning.stage import plan_and_decompose
from tests.helpers import (
    he_normal,
    make_conv_model,
    make_gemm_model,
    make_matmul_model,
    make_small_cnn,
    random_orthonormal,
    run_ort,
    save,
)

ALL_ROWS = CalibrationOptions(rows=10**9)  # every output position: the refit sees exactly what we measure


# ---- helpers ------------------------------------------------------------------------------------

def _decomposed(model: onnx.ModelProto, config: CompressionConfig):  # type: ignore[no-untyped-def]
    source = SourceModel.load(model, config.input_shapes)
    d = plan_and_decompose(source, config)
    return source, d.plan, d.replacements


def _tensor(model: onnx.ModelProto, name: str, feeds: dict[str, np.ndarray]) -> np.ndarray:
    if name in feeds:
        return feeds[name]
    return run_ort(expose_outputs(model, [name]), feeds)[name]


def _layer_error(orig: onnx.ModelProto, model: onnx.ModelProto, node_index: int, feeds: dict[str, np.ndarray]) -> float:
    """||y_model - y_orig|| / ||y_orig|| of one replaced layer's output, its input taken from `model`."""
    y_name = orig.graph.node[node_index].output[0]
    a = _tensor(orig, y_name, feeds).astype(np.float64)
    b = _tensor(model, y_name, feeds).astype(np.float64)
    return float(np.linalg.norm(b - a) / np.linalg.norm(a))


def _with_layer_from(model: onnx.ModelProto, other: onnx.ModelProto, y_name: str, n: int) -> onnx.ModelProto:
    """`model` with one layer's factors and bias replaced by their values in `other`."""
    out = copy.deepcopy(model)
    chain = factor_chain(out, y_name, n)
    assert chain is not None
    names = [*chain.weights, *([chain.bias] if chain.bias else [])]
    write_initializers(out, {k: read_initializer(other, k) for k in names})
    return out


def _npz(tmp_path: Path, name: str, **arrays: np.ndarray) -> Path:
    path = tmp_path / name
    np.savez(path, **arrays)  # type: ignore[arg-type]
    return path


def _batches(feeds: dict[str, np.ndarray], size: int = 16) -> list[dict[str, np.ndarray]]:
    n = next(iter(feeds.values())).shape[0]
    return [{k: v[i : i + size] for k, v in feeds.items()} for i in range(0, n, size)]


# ---- numerics -----------------------------------------------------------------------------------

def test_numerics_refit_imports_no_onnx() -> None:
    """The numerics module loads with onnx and onnxruntime made unimportable."""
    path = Path(refit.__file__)
    code = (
        "import sys, importlib.util\n"
        "sys.modules['onnx'] = None; sys.modules['onnxruntime'] = None\n"
        f"spec = importlib.util.spec_from_file_location('refit_alone', {str(path)!r})\n"
        "m = importlib.util.module_from_spec(spec); sys.modules['refit_alone'] = m; spec.loader.exec_module(m)\n"
        "assert not any(k.split('.')[0] in ('onnx', 'onnxruntime') and sys.modules[k] is not None for k in sys.modules)\n"
        "print(m.GramStats(2, 1).d)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "2"


def test_ridge_and_residual_match_a_direct_solve(rng: np.random.Generator) -> None:
    p = rng.standard_normal((500, 12)) + 3.0
    y = p @ rng.standard_normal((12, 5)) + 0.3 * rng.standard_normal((500, 5)) - 1.0
    st = refit.GramStats(12, 5)
    for i in range(0, 500, 37):  # uneven batches: accumulation is exact
        st.add(p[i : i + 37], y[i : i + 37])
    w, b = refit.fit_ridge(st, intercept=True, ridge=0.0)
    design = np.hstack([p, np.ones((500, 1))])
    direct = np.linalg.lstsq(design, y, rcond=None)[0]
    np.testing.assert_allclose(w, direct[:12], rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(b, direct[12], rtol=1e-7, atol=1e-9)
    w2, b2 = rng.standard_normal((12, 5)), rng.standard_normal(5)
    assert refit.residual(st, w2, b2) == pytest.approx(float(np.sum((y - p @ w2 - b2) ** 2)), rel=1e-9)
    # The documented ridge rule shrinks the solution, and the bias is never penalised.
    w3, _ = refit.fit_ridge(st, intercept=True, ridge=10.0)
    assert np.linalg.norm(w3) < np.linalg.norm(w)


def test_reduced_rank_regression_is_the_rank_constrained_optimum(rng: np.random.Generator) -> None:
    p = rng.standard_normal((800, 10))
    y = p @ rng.standard_normal((10, 7)) + 0.5 * rng.standard_normal((800, 7))
    st = refit.GramStats(10, 7)
    st.add(p, y)
    front, last, b = refit.fit_reduced_rank(st, 3, intercept=True, ridge=0.0)
    assert front.shape == (10, 3) and last.shape == (3, 7)
    rss = refit.residual(st, front @ last, b)
    # Direct: project the OLS fit on the top-3 principal directions of the fitted values.
    pc, yc = p - p.mean(0), y - y.mean(0)
    w = np.linalg.lstsq(pc, yc, rcond=None)[0]
    v = np.linalg.svd(pc @ w, full_matrices=False)[2][:3].T
    direct = float(np.sum((yc - pc @ w @ v @ v.T) ** 2))
    assert rss == pytest.approx(direct, rel=1e-8)
    # ... and no other rank-3 map does better (truncated SVD of W, random ones).
    u, s, vt = np.linalg.svd(w)
    assert rss <= float(np.sum((yc - pc @ (u[:, :3] * s[:3]) @ vt[:3]) ** 2)) + 1e-9
    for _ in range(5):
        other = rng.standard_normal((10, 3)) @ rng.standard_normal((3, 7))
        assert rss <= float(np.sum((yc - pc @ other) ** 2))


@pytest.mark.parametrize(
    "kw",
    [
        dict(kernel=(3, 3), strides=(2, 2), pads=(1, 0, 1, 2), dilations=(1, 2)),
        dict(kernel=(3, 3), group=2, auto_pad="SAME_UPPER", strides=(2, 2), spatial=(8, 7)),
        dict(kernel=(2, 3), auto_pad="SAME_LOWER", spatial=(6, 6)),
        dict(kernel=(3,), strides=(2,), pads=(1, 1), spatial=(11,)),
    ],
)
def test_im2col_reproduces_onnxruntime_conv(kw: dict, rng: np.random.Generator) -> None:
    model = make_conv_model(T=6, S=4, bias=False, batch=2, **kw)  # type: ignore[arg-type]
    x = rng.standard_normal((2, 4, *kw.get("spatial", (9,) * len(kw["kernel"])))).astype(np.float32)
    y = run_ort(model, {"x": x})["y"]
    w = read_initializer(model, "W").astype(np.float64)
    g = kw.get("group", 1)
    node = {a.name: onnx.helper.get_attribute_value(a) for a in model.graph.node[0].attribute}
    nd = len(kw["kernel"])
    pads = refit.conv_pads_begin(x.shape[2:], y.shape[2:], kw["kernel"], node.get("strides", [1] * nd),
                                 node.get("dilations", [1] * nd), node.get("pads"),
                                 node.get("auto_pad", b"NOTSET").decode())
    n_idx, coords = refit.sample_positions(rng, 2, y.shape[2:], 5)
    for k in range(g):
        cols = refit.im2col(x[:, k * 4 // g : (k + 1) * 4 // g], n_idx, coords, kw["kernel"],
                            node.get("strides", [1] * nd), pads, node.get("dilations", [1] * nd))
        wk = w[k * 6 // g : (k + 1) * 6 // g].reshape(6 // g, -1)
        want = y[(n_idx, slice(k * 6 // g, (k + 1) * 6 // g), *coords.T)]
        np.testing.assert_allclose(cols @ wk.T, want, rtol=1e-4, atol=1e-4)


def test_gram_memory_does_not_grow_with_the_data(rng: np.random.Generator) -> None:
    def peak(batches: int) -> int:
        st = refit.GramStats(64, 32)
        tracemalloc.start()
        for _ in range(batches):
            st.add(rng.standard_normal((256, 64)).astype(np.float32), rng.standard_normal((256, 32)).astype(np.float32))
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return top

    small, large = peak(4), peak(40)
    assert large < 1.5 * small, (small, large)


# ---- whole models -------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["last", "joint", "full"])
def test_refit_never_increases_a_layer_error(method: str, rng: np.random.Generator) -> None:
    """Each layer's output error with its input from the calibrated model, after vs. before its refit
    (its weight-space factors put back); and the errors the refit reports are the measured ones."""
    model = make_small_cnn(batch="N", c1=12, c2=16, spatial=(8, 8), seed=3)
    cfg = CompressionConfig(ranks=RankPolicy.parse("ratio:0.4"), validate=False)
    prep, plan, reps = _decomposed(model, cfg)
    assert {r.factors.kind for r in reps.values()} == {"tucker1", "tucker2", "svd"}
    one_shot = apply_replacements(model, reps)
    calibrated = copy.deepcopy(one_shot)
    x = np.maximum(rng.standard_normal((96, 3, 8, 8)), -0.5).astype(np.float32)
    found = calibrate_model(model, calibrated, reps, _batches({"x": x}), CalibrationOptions(method=method, rows=10**9))
    feeds = {"x": x}
    improved = 0
    for i, rep in reps.items():
        y_name = model.graph.node[i].output[0]
        after = _layer_error(model, calibrated, i, feeds)
        before = _layer_error(model, _with_layer_from(calibrated, one_shot, y_name, len(rep.factors.arrays)), i, feeds)
        assert after <= before * (1 + 1e-5) + 1e-7, (rep.layer.layer_id, before, after)
        c = found[rep.layer.layer_id]
        assert c.error_before == pytest.approx(before, rel=2e-3, abs=1e-5)
        assert c.error_after == pytest.approx(after, rel=2e-3, abs=1e-5)
        improved += after < 0.9 * before
        assert c.method in ({"last"} if method == "last" else {"last", "joint", "data", "alt"}) | {"kept"}
    assert improved >= 2


def test_full_rank_decomposition_with_refit_reproduces_the_original(rng: np.random.Generator) -> None:
    model = make_small_cnn(batch="N", c1=8, c2=12, spatial=(8, 8))
    x = rng.standard_normal((40, 3, 8, 8)).astype(np.float32)
    cfg = CompressionConfig(ranks=RankPolicy.parse("full"), validate=False)
    prep, plan, reps = _decomposed(model, cfg)
    assert reps
    comp = apply_replacements(model, reps)
    calibrate_model(model, comp, reps, _batches({"x": x}), ALL_ROWS)
    np.testing.assert_allclose(run_ort(comp, {"x": x})["logits"], run_ort(model, {"x": x})["logits"], rtol=1e-4, atol=1e-4)


def _perturbed(reps: dict[int, Replacement], rng: np.random.Generator, only_last: bool) -> dict[int, Replacement]:
    """The same factors with the core and last ones (or the last only) badly off: a start the refit must fix."""
    out = {}
    for i, r in reps.items():
        arrs = list(r.factors.arrays)
        start = len(arrs) - 1 if only_last else (1 if r.factors.kind == "tucker2" else 0)
        for j in range(start, len(arrs)):
            arrs[j] = arrs[j] + 0.5 * np.std(arrs[j]) * rng.standard_normal(arrs[j].shape)
        out[i] = Replacement(r.layer, LayerFactors(r.factors.kind, tuple(arrs), r.factors.rel_error))
    return out


@pytest.mark.parametrize(
    "kw",
    [
        dict(T=8, S=8, strides=(2, 2), pads=(1, 1, 1, 1), dilations=(1, 2), group=2, spatial=(9, 9)),
        dict(T=6, S=12, strides=(2, 1), auto_pad="SAME_UPPER", spatial=(8, 10)),
        dict(T=8, S=8, kernel=(1, 1), strides=(2, 2), group=4, spatial=(6, 6)),
    ],
)
@pytest.mark.parametrize("method", ["last", "joint"])
def test_grouped_and_strided_convs_refit_exactly_at_full_rank(kw: dict, method: str, rng: np.random.Generator) -> None:
    """Full-rank factors knocked off (core and last perturbed): the refit finds the exact layer again,
    which it can only do when im2col respects strides, pads, dilations and groups."""
    model = make_conv_model(batch=1, **kw)  # type: ignore[arg-type]
    cfg = CompressionConfig(ranks=RankPolicy.parse("full"), validate=False, min_tucker2_channels=2)
    prep, plan, reps = _decomposed(model, cfg)
    assert len(reps) == 1
    bad = _perturbed(reps, rng, method == "last")
    comp = apply_replacements(model, bad)
    x = rng.standard_normal((48, *prep.input_shapes["x"][1:])).astype(np.float32)
    i = next(iter(reps))
    before = _layer_error(model, comp, i, {"x": x[:1]})
    found = calibrate_model(model, comp, bad, _batches({"x": x}, 1), CalibrationOptions(method=method, rows=10**9))
    assert before > 0.1
    errs = [_layer_error(model, comp, i, {"x": x[j : j + 1]}) for j in range(0, 48, 7)]
    assert max(errs) < 1e-3, (found, errs)


@pytest.mark.parametrize("kind", ["gemm", "gemm-transA", "gemm-beta0", "matmul"])
def test_fc_refit_reaches_the_least_squares_optimum(kind: str, rng: np.random.Generator) -> None:
    """SVD of Gemm / MatMul, method "last": the last factor and the bias are the least-squares fit of
    the original outputs on (x @ first factor), computed here directly."""
    if kind == "matmul":
        model, shape = make_matmul_model(K=16, N=12, lead=(64,)), (64, 16)
    else:
        model = make_gemm_model(K=16, N=12, trans_b=1, rows=64, trans_a=int(kind == "gemm-transA"),
                                beta=0.0 if kind == "gemm-beta0" else 0.5)
        shape = (16, 64) if kind == "gemm-transA" else (64, 16)
    cfg = CompressionConfig(ranks=RankPolicy.parse("ratio:0.25"), validate=False)
    prep, plan, reps = _decomposed(model, cfg)
    (i, rep), = reps.items()
    comp = apply_replacements(model, reps)
    xs = [rng.standard_normal(shape).astype(np.float32) for _ in range(3)]
    found = calibrate_model(model, comp, reps, [{"x": x} for x in xs], CalibrationOptions(method="last"))
    assert found[rep.layer.layer_id].method == "last"
    rows = np.concatenate([x.T if kind == "gemm-transA" else x for x in xs]).astype(np.float64)
    ys = np.concatenate([run_ort(model, {"x": x})["y"] for x in xs]).astype(np.float64)
    q = rows @ rep.factors.arrays[0]
    design = np.hstack([q, np.ones((len(q), 1))]) if kind in ("gemm", "gemm-transA") else q  # beta 0: C unused
    coef = np.linalg.lstsq(design, ys, rcond=None)[0]
    best = float(np.linalg.norm(design @ coef - ys) / np.linalg.norm(ys))
    got = float(np.linalg.norm(np.concatenate([run_ort(comp, {"x": x})["y"] for x in xs]) - ys) / np.linalg.norm(ys))
    assert got == pytest.approx(best, rel=1e-3, abs=1e-5)


def test_a_reachable_target_is_recovered_with_a_data_aware_first_factor(rng: np.random.Generator) -> None:
    """The input only spans 4 of 16 channels and the kernel = a rank-(4, 4) Tucker-2 on that subspace +
    a large part on the other channels (which the data never excites). Weight-space HOSVD at ranks
    (4, 4) chases the large part; the refit with a data-aware first factor reproduces the layer."""
    s, t, q = 16, 12, 4
    e = random_orthonormal(rng, s, q)  # the input subspace
    core = rng.standard_normal((q, q, 3, 3))
    u_out = random_orthonormal(rng, t, q)
    planted = np.einsum("ab,bcij,dc->adij", u_out, core, e)  # T x S x 3 x 3, input mode in span(e)
    other = (np.eye(s) - e @ e.T) @ random_orthonormal(rng, s, 8)
    noise = 3.0 * np.einsum("abij,cb->acij", he_normal(rng, (t, 8, 3, 3)), other)
    w = (planted + noise).astype(np.float32)
    model = make_conv_model(T=t, S=s, weight=w, pads=(1, 1, 1, 1), spatial=(8, 8), batch=1)
    x = np.einsum("sq,nqhw->nshw", e, rng.standard_normal((64, q, 8, 8))).astype(np.float32)
    cfg = CompressionConfig(ranks=RankPolicy.parse("full"), validate=False)
    prep, plan, reps = _decomposed(model, cfg)
    (i, rep), = reps.items()
    reps = {i: Replacement(rep.layer, decompose_layer(rep.layer, _ranks(plan.layers[0], (q, q)), w))}
    comp = apply_replacements(model, reps)
    assert _layer_error(model, comp, i, {"x": x[:1]}) > 0.3
    found = calibrate_model(model, comp, reps, _batches({"x": x}, 1), ALL_ROWS)
    assert found[rep.layer.layer_id].method in ("data", "alt")  # alt starts from the data-aware fit
    errs = [_layer_error(model, comp, i, {"x": x[j : j + 1]}) for j in range(0, 64, 9)]
    assert max(errs) < 1e-3, (found, errs)


def _ranks(lp, ranks):  # type: ignore[no-untyped-def]
    from dataclasses import replace

    return replace(lp, kind="tucker2", ranks=ranks)


def test_input_comes_from_the_compressed_model(rng: np.random.Generator) -> None:
    """conv2's refit (method "last") equals the least-squares fit on conv2's input taken from the
    *calibrated* model (asymmetric), and beats a fit on the original model's input (symmetric)."""
    model = make_small_cnn(batch="N", c1=12, c2=16, spatial=(8, 8), seed=5)
    cfg = CompressionConfig(ranks=RankPolicy.parse("ratio:0.3"), validate=False, include="conv")
    prep, plan, reps = _decomposed(model, cfg)
    comp = apply_replacements(model, reps)
    x = rng.standard_normal((64, 3, 8, 8)).astype(np.float32)
    calibrate_model(model, comp, reps, _batches({"x": x}), CalibrationOptions(method="last", rows=10**9))
    i2 = next(i for i, r in reps.items() if r.layer.layer_id == "conv2")
    f = reps[i2].factors
    assert f.kind == "tucker2"
    y = _tensor(model, "h2", {"x": x}).astype(np.float64)

    def design(a: np.ndarray) -> np.ndarray:  # im2col of the first factor's output, times the core
        z = np.einsum("rs,nshw->nrhw", f.arrays[0][:, :, 0, 0], a.astype(np.float64))
        n_idx, coords = refit.sample_positions(rng, a.shape[0], y.shape[2:], None)
        cols = refit.im2col(z, n_idx, coords, (3, 3), (2, 2), (1, 1), (1, 1))
        q = cols @ f.arrays[1].reshape(f.arrays[1].shape[0], -1).T
        return np.hstack([q, np.ones((len(q), 1))])

    target = np.moveaxis(y, 1, -1).reshape(-1, y.shape[1])
    d_comp, d_orig = design(_tensor(comp, "a1", {"x": x})), design(_tensor(model, "a1", {"x": x}))
    asym = np.linalg.lstsq(d_comp, target, rcond=None)[0]
    sym = np.linalg.lstsq(d_orig, target, rcond=None)[0]
    err = lambda coef: float(np.linalg.norm(d_comp @ coef - target) / np.linalg.norm(target))  # noqa: E731
    got = _layer_error(model, comp, i2, {"x": x})
    assert got == pytest.approx(err(asym), rel=1e-3)
    # The two fits differ measurably here, so the check above tells them apart.
    assert got < 0.995 * err(sym), (got, err(asym), err(sym))


# ---- the command line and bad input -------------------------------------------------------------

runner = CliRunner()


def test_cli_calibrate_writes_the_refit_into_the_report(tmp_path: Path, rng: np.random.Generator) -> None:
    src = save(make_small_cnn(batch="N", c1=12, c2=16, spatial=(8, 8)), tmp_path / "m.onnx")
    data = _npz(tmp_path, "cal.npz", x=rng.standard_normal((64, 3, 8, 8)).astype(np.float32))
    out, rep = tmp_path / "o.onnx", tmp_path / "r.json"
    res = runner.invoke(app, ["compress", str(src), str(out), "--ranks", "ratio:0.4", "--calibrate", str(data),
                              "--calibration-samples", "48", "--report", str(rep), "-q"])
    assert res.exit_code == 0, res.output
    layers = [entry for entry in json.loads(rep.read_text())["layers"] if entry["calibration"]]
    assert layers and all(entry["calibration"]["rows"] > 0 for entry in layers)
    assert all(entry["calibration"]["error_after"] <= entry["calibration"]["error_before"] + 1e-9 for entry in layers)
    report = json.loads(rep.read_text())
    assert report["config"]["calibration_samples"] == 48
    summary = report["calibration"]  # the 16 samples beyond --calibration-samples measure the whole model
    assert summary["samples"] == 48 and summary["held_out"] == 16
    assert summary["cosine_after"] > summary["cosine_before"]
    assert 0 <= summary["top1_agreement_after"] <= 1
    onnx.checker.check_model(onnx.load(str(out)))


@pytest.mark.parametrize(
    "arrays, code, words",
    [
        (dict(x=np.zeros((8, 4, 8, 8), np.float32)), 2, "--calibrate"),  # 4 channels, model has 3
        (dict(image=np.zeros((8, 3, 8, 8), np.float32), other=np.zeros(8)), 2, "no array for model input 'x'"),
        # issue 16 item 4: a data error, found before any work (was exit 1, "tensor ... not finite")
        (dict(x=np.full((8, 3, 8, 8), np.nan, np.float32)), 2, "bad.npz: array 'x' has 1,536 NaN"),
    ],
)
def test_bad_calibration_data_is_one_line_and_writes_nothing(tmp_path: Path, arrays: dict, code: int, words: str) -> None:
    src = save(make_small_cnn(batch="N", c1=12, c2=16, spatial=(8, 8)), tmp_path / "m.onnx")
    data = _npz(tmp_path, "bad.npz", **arrays)
    out, rep = tmp_path / "o.onnx", tmp_path / "r.json"
    before = sorted(p.name for p in tmp_path.iterdir())
    res = runner.invoke(app, ["compress", str(src), str(out), "--ranks", "ratio:0.4", "--calibrate", str(data),
                              "--report", str(rep)])
    assert res.exit_code == code, res.output
    err = res.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err and words in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_calibration_batches_checks_shapes_before_any_work(tmp_path: Path) -> None:
    model = make_small_cnn(batch="N", spatial=(8, 8))
    path = _npz(tmp_path, "c.npz", x=np.zeros((10, 3, 9, 8), np.float32))
    from onnx_tucker.errors import UsageError

    with pytest.raises(UsageError, match="--calibrate"):
        calibration_batches(str(path), model, {"x": (1, 3, 8, 8)}, None)


def _residual_block(c: int = 8, seed: int = 0) -> onnx.ModelProto:
    """x -> convA -> Relu -> r; y = convB(r) + r: convB's output only feeds the Add."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(he_normal(rng, (c, c, 3, 3)), "WA"),
             numpy_helper.from_array(he_normal(rng, (c, c, 3, 3)), "WB"),
             numpy_helper.from_array((0.1 * rng.standard_normal(c)).astype(np.float32), "BB")]
    nodes = [
        helper.make_node("Conv", ["x", "WA"], ["a"], name="convA", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "WB", "BB"], ["b"], name="convB", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["b", "r"], ["y"], name="add"),
    ]
    graph = helper.make_graph(nodes, "res", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", c, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", c, 6, 6])], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_residual_compensation_fits_the_sum_not_the_branch(rng: np.random.Generator) -> None:
    """With compensation, convB aims at the original Add output given the compressed skip branch, so
    the block's output error drops below what refitting convB to its own output gives."""
    model = _residual_block()
    cfg = CompressionConfig(ranks=RankPolicy.parse("ratio:0.4"), validate=False)
    prep, plan, reps = _decomposed(model, cfg)
    assert {r.layer.layer_id for r in reps.values()} == {"convA", "convB"}
    x = rng.standard_normal((64, 8, 6, 6)).astype(np.float32)
    want = run_ort(model, {"x": x})["y"]
    errs = {}
    for residual in (False, True):
        comp = apply_replacements(model, reps)
        found = calibrate_model(model, comp, reps, _batches({"x": x}),
                                CalibrationOptions(method="joint", rows=10**9, residual=residual))
        assert found["convB"].compensated_for == ("r" if residual else None)
        assert found["convA"].compensated_for is None
        errs[residual] = float(np.linalg.norm(run_ort(comp, {"x": x})["y"] - want) / np.linalg.norm(want))
    assert errs[True] < 0.99 * errs[False], errs  # the least-squares optimum of the sum; equal without it


def test_calibration_samples_are_a_seeded_random_subset(tmp_path: Path) -> None:
    model = make_small_cnn(batch="N", spatial=(8, 8))
    x = np.arange(100, dtype=np.float32)[:, None, None, None] * np.ones((1, 3, 8, 8), np.float32)
    path = _npz(tmp_path, "c.npz", x=x)
    ids = lambda b: sorted(int(v) for c in b for v in c["x"][:, 0, 0, 0])  # noqa: E731
    a = ids(calibration_batches(str(path), model, {"x": (1, 3, 8, 8)}, 20, batch=8, seed=1))
    assert len(a) == 20 and a != list(range(20)) and max(a) > 50  # not the first 20 (sorted files)
    assert a == ids(calibration_batches(str(path), model, {"x": (1, 3, 8, 8)}, 20, batch=8, seed=1))
    assert a != ids(calibration_batches(str(path), model, {"x": (1, 3, 8, 8)}, 20, batch=8, seed=2))


def test_too_few_samples_for_a_layer_keep_its_factors_with_a_reason(rng: np.random.Generator) -> None:
    """3 samples give the FC layer 3 rows, fewer than its rank: its weight-space factors stay, and
    the report says why; the convs (many pixels per sample) are still refit."""
    model = make_small_cnn(batch="N", c1=12, c2=16, spatial=(8, 8))
    cfg = CompressionConfig(ranks=RankPolicy.parse("ratio:0.5"), validate=False)
    prep, plan, reps = _decomposed(model, cfg)
    one_shot = apply_replacements(model, reps)
    comp = copy.deepcopy(one_shot)
    found = calibrate_model(model, comp, reps, [{"x": rng.standard_normal((3, 3, 8, 8)).astype(np.float32)}])
    fc = found["fc"]
    assert fc.method == "kept" and fc.rows == 3 and "use more samples" in (fc.note or "")
    fc_chain = factor_chain(one_shot, "logits", 2)
    assert fc_chain is not None
    for name in fc_chain.weights:
        np.testing.assert_array_equal(read_initializer(comp, name), read_initializer(one_shot, name))
    assert found["conv2"].method != "kept"


# ---- the activation cache behind the layer walk ---------------------------------------------------

def _three_block_model(c: int = 4, seed: int = 0) -> onnx.ModelProto:
    """x -> A -> relu -> B (+ skip) -> relu -> C: every conv weight is an initializer we can change."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(he_normal(rng, (c, c, 3, 3)), f"W{k}") for k in "ABC"]
    nodes = [
        helper.make_node("Conv", ["x", "WA"], ["a"], name="A", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a"], ["ra"], name="reluA"),
        helper.make_node("Conv", ["ra", "WB"], ["b"], name="B", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["b", "ra"], ["s"], name="add"),
        helper.make_node("Relu", ["s"], ["rs"], name="reluS"),
        helper.make_node("Conv", ["rs", "WC"], ["y"], name="C", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
    ]
    graph = helper.make_graph(nodes, "three", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", c, 5, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", c, 5, 5])], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_activation_cache_matches_fresh_runs_through_a_walk_with_changing_weights(rng: np.random.Generator) -> None:
    """The calibration walk: ask for a layer's input, change that layer's weights, invalidate, go on.
    Every answer equals a fresh onnxruntime run of the model as it is then, and each step runs one
    segment (not the whole prefix again)."""
    from onnx_tucker.runtime.activations import ActivationCache

    model = _three_block_model()
    x = rng.standard_normal((10, 4, 5, 5)).astype(np.float32)
    batches = _batches({"x": x}, size=4)
    cache = ActivationCache(model, batches)
    for name, weight, produced in (("ra", "WA", ["a"]), ("rs", "WB", ["b"]), ("y", "WC", ["y"])):
        got = np.concatenate([v[0] for v in cache.values([name, "x"])])
        assert np.allclose(got, _tensor(model, name, {"x": x}), rtol=1e-5, atol=1e-6)  # batch sizes differ
        assert np.array_equal(np.concatenate([v[1] for v in cache.values([name, "x"])]), x)
        write_initializers(model, {weight: 2.0 * read_initializer(model, weight)})
        cache.invalidate(produced)
    assert cache.runs == 3  # one segment per request; the repeated request ran nothing
    # After B changed, a tensor downstream of it is recomputed with the new weights.
    got = np.concatenate([v[0] for v in cache.values(["s"])])
    assert np.allclose(got, _tensor(model, "s", {"x": x}), rtol=1e-5, atol=1e-5)


def test_activation_cache_over_its_budget_still_answers_correctly(rng: np.random.Generator) -> None:
    from onnx_tucker.runtime.activations import ActivationCache

    model = _three_block_model()
    x = rng.standard_normal((6, 4, 5, 5)).astype(np.float32)
    cache = ActivationCache(model, _batches({"x": x}, size=3), budget_bytes=0)
    for name in ("ra", "s", "y"):
        got = np.concatenate([v[0] for v in cache.values([name])])
        assert np.allclose(got, _tensor(model, name, {"x": x}), rtol=1e-5, atol=1e-6)
        assert cache.nbytes == 0


def test_balance_chain_keeps_the_product_and_evens_the_scales(rng: np.random.Generator) -> None:
    first = 1e-3 * rng.standard_normal((4, 6, 1, 1))
    core = 1e3 * rng.standard_normal((5, 4, 3, 3))
    last = rng.standard_normal((7, 5, 1, 1))
    out = refit.balance_chain([first, core, last], sweeps=20)

    def product(ws: list[np.ndarray]) -> np.ndarray:  # the chain as one (7, 6, 3, 3) kernel
        return np.einsum("to,oikl,is->tskl", ws[2][:, :, 0, 0], ws[1], ws[0][:, :, 0, 0])

    assert np.allclose(product(out), product([first, core, last]), rtol=1e-9, atol=1e-12)
    for a, b in zip(out, out[1:], strict=False):  # per channel: writer's norm == reader's norm
        na = np.linalg.norm(a.reshape(a.shape[0], -1), axis=1)
        nb = np.linalg.norm(np.moveaxis(b, 1, 0).reshape(b.shape[1], -1), axis=1)
        assert np.allclose(na, nb, rtol=1e-3)
    assert max(np.abs(w).max() for w in out) < 1e-2 * np.abs(core).max()


def test_first_factor_given_the_rest_is_the_least_squares_optimum(rng: np.random.Generator) -> None:
    """`fit_first_given_rest` against a direct least-squares solve over vec(A) (one row per pixel and
    output channel), and the alternation it enables never increases the residual."""
    n, s, kk, r, t = 300, 5, 4, 3, 6
    x = rng.standard_normal((n, s, kk))
    w = rng.standard_normal((r * kk, t))
    y = rng.standard_normal((n, t)) + x.reshape(n, -1) @ rng.standard_normal((s * kk, t))
    stats = refit.GramStats(s * kk, t)
    stats.add(x.reshape(n, -1), y)
    got = refit.fit_first_given_rest(stats, w, r, kk, False, ridge=1e-12)
    feats = np.einsum("rkt,nsk->ntrs", w.reshape(r, kk, t), x).reshape(n * t, r * s)
    want = np.linalg.lstsq(feats, y.reshape(-1), rcond=None)[0].reshape(r, s)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-8)
    # Alternating with the reduced-rank step: the residual only falls.
    first = rng.standard_normal((r, s))
    last_rss = np.inf
    for _ in range(4):
        proj = stats.projected(np.kron(first, np.eye(kk)).T)
        front, last, b = refit.fit_reduced_rank(proj, 2, False, ridge=1e-12)
        rss = refit.residual(proj, front @ last, b)
        assert rss <= last_rss * (1 + 1e-9)
        last_rss = rss
        first = refit.fit_first_given_rest(stats, front @ last, r, kk, False, ridge=1e-12)


def test_projected_channels_equals_the_kronecker_projection(rng: np.random.Generator) -> None:
    s, kk, t, r = 6, 4, 5, 3
    stats = refit.GramStats(s * kk, t)
    stats.add(rng.standard_normal((200, s * kk)), rng.standard_normal((200, t)))
    a = rng.standard_normal((r, s))
    want, got = stats.projected(np.kron(a, np.eye(kk)).T), stats.projected_channels(a, kk)
    for name in ("pp", "py", "sum_p"):
        np.testing.assert_allclose(getattr(got, name), getattr(want, name), rtol=1e-10, atol=1e-9)


# ---- the handler owns the geometry (issue 17 item 5) ------------------------------------------------

@pytest.mark.parametrize(
    "kw",
    [
        dict(kernel=(3, 3), strides=(2, 2), pads=(1, 0, 1, 2), dilations=(1, 2)),
        dict(kernel=(3, 3), group=2, auto_pad="SAME_UPPER", strides=(2, 2), spatial=(8, 7)),
        dict(kernel=(3,), strides=(2,), pads=(1, 1), spatial=(11,)),
    ],
)
def test_the_handlers_im2col_reproduces_onnxruntime_conv(kw: dict, rng: np.random.Generator) -> None:
    """The layer's geometry as its handler gives it (`OpHandler.im2col`), fed to `numerics.refit.im2col`,
    and the weight laid out per group, give the conv's output at sampled positions."""
    from onnx_tucker.graph.model import find_layers, infer_shapes
    from onnx_tucker.ops.registry import handler_for

    model = make_conv_model(T=6, S=4, bias=False, batch=2, **kw)  # type: ignore[arg-type]
    x = rng.standard_normal((2, 4, *kw.get("spatial", (9,) * len(kw["kernel"])))).astype(np.float32)
    y = run_ort(model, {"x": x})["y"]
    (layer,) = find_layers(model, infer_shapes(model, {}))
    im = handler_for(layer).im2col(layer)
    assert im is not None and im.conv and im.groups == kw.get("group", 1) and im.outputs == 6
    pads = refit.conv_pads_begin(x.shape[2:], y.shape[2:], im.kernel, im.strides, im.dilations, im.pads, im.auto_pad)
    n_idx, coords = refit.sample_positions(rng, 2, y.shape[2:], 5)
    w = read_initializer(model, "W").astype(np.float64)
    s_g, t_g = 4 // im.groups, 6 // im.groups
    for k in range(im.groups):
        cols = refit.im2col(x[:, k * s_g : (k + 1) * s_g], n_idx, coords, im.kernel, im.strides, pads, im.dilations)
        assert cols.shape[1] == im.width
        want = y[(n_idx, slice(k * t_g, (k + 1) * t_g), *coords.T)]
        np.testing.assert_allclose(cols @ w[k * t_g : (k + 1) * t_g].reshape(t_g, -1).T, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["tucker2", "tucker1"])
def test_refit_blocks_round_trip_the_factor_layout(kind: str) -> None:
    """`refit_blocks` then `from_refit_blocks` gives the factors back, per handler and kind (grouped too)."""
    from onnx_tucker.graph.model import find_layers, infer_shapes
    from onnx_tucker.ops.registry import handler_for

    for model in (make_conv_model(T=8, S=8, group=2), make_conv_model(T=8, S=6)):
        (layer,) = find_layers(model, infer_shapes(model, {}))
        h = handler_for(layer)
        f = h.decompose(layer, kind, (2, 2) if kind == "tucker2" else (2,), read_initializer(model, "W"))
        back = h.from_refit_blocks(layer, f, h.refit_blocks(layer, f))
        assert [a.shape for a in back] == [a.shape for a in f.arrays]
        for a, b in zip(back, f.arrays, strict=True):
            np.testing.assert_array_equal(a, np.asarray(b, dtype=np.float64))


def test_a_conv_transpose_refits_only_its_last_factor_and_says_so(rng: np.random.Generator) -> None:
    """Its handler gives no im2col (this used to fail inside the regression with a shape error, then was
    kept): the chain's last 1x1 conv is refit on its own input, with a note; the front factors stay."""
    from tests.test_conv_transpose import make_convt_model

    model = make_convt_model(cin=8, cout=8)
    _, _, reps = _decomposed(model, CompressionConfig(ranks=RankPolicy("ratio", 0.5), validate=False))
    comp = apply_replacements(model, reps)
    before = {t.name: t.SerializeToString() for t in comp.graph.initializer}
    found = calibrate_model(model, comp, reps, [{"x": rng.standard_normal((1, 8, 5, 5)).astype(np.float32)}])
    (cal,) = found.values()
    assert cal.method == "last" and cal.note is not None and "only the last 1x1 conv refit" in cal.note
    assert cal.error_after is not None and cal.error_before is not None and cal.error_after < cal.error_before
    after = {t.name: t.SerializeToString() for t in comp.graph.initializer}
    changed = {n for n in before if before[n] != after[n]}
    last = comp.graph.node[-1]
    assert changed and changed <= {last.input[1], *last.input[2:]}


def test_save_plan_after_calibrate_holds_only_what_replays(tmp_path: Path, rng: np.random.Generator) -> None:
    """issue 17: the refit is a result, not part of the plan: `--save-plan` writes no calibration, the report
    keeps it per layer, and the saved plan replays the same ranks."""
    src = save(make_small_cnn(batch="N", c1=12, c2=16, spatial=(8, 8)), tmp_path / "m.onnx")
    data = _npz(tmp_path, "cal.npz", x=rng.standard_normal((32, 3, 8, 8)).astype(np.float32))
    plan_file, rep = tmp_path / "p.json", tmp_path / "r.json"
    res = runner.invoke(app, ["compress", str(src), str(tmp_path / "o.onnx"), "--ranks", "ratio:0.4", "--calibrate",
                              str(data), "--save-plan", str(plan_file), "--report", str(rep), "-q"])
    assert res.exit_code == 0, res.output
    saved = json.loads(plan_file.read_text())
    assert all("calibration" not in entry for entry in saved["layers"])
    assert any(entry["calibration"] for entry in json.loads(rep.read_text())["layers"])
    replayed = runner.invoke(app, ["inspect", str(src), "--plan", str(plan_file), "--report", str(tmp_path / "i.json")])
    assert replayed.exit_code == 0, replayed.output
    ranks = {e["name"]: e["ranks"] for e in json.loads((tmp_path / "i.json").read_text())["layers"]}
    assert ranks == {e["name"]: e["ranks"] for e in json.loads(rep.read_text())["layers"]}
