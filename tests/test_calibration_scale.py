"""Calibration that scales (issue 15 item 1): streaming statistics equal a direct computation, the
first factor's matrix-free solve equals the direct one, and memory stays flat as the data grows."""

from __future__ import annotations

import numpy as np
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
