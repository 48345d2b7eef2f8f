"""tools/real_scoring.py (the real-model benchmark's scores) against hand-computed arrays: top-k and
agreement from logits, BT.601 luma PSNR with its border, and the super-resolution geometry (even
crop, x1/2 downscale, 7-pixel padding, centre crop of the output). Synthetic arrays only, so it
always runs; the one check on the shared model skips when ../shared/data or scikit-image is absent."""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


def _scoring():  # noqa: ANN202 - a module loaded from tools/
    spec = importlib.util.spec_from_file_location("real_scoring", ROOT / "tools" / "real_scoring.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


rs = _scoring()

LOGITS = np.array([
    [0.1, 0.5, 0.4, 0.0],   # ranking 1, 2, 0, 3
    [3.0, 2.0, 1.0, 0.0],   # 0, 1, 2, 3
    [0.2, 0.2, 0.1, 0.3],   # 3, then a tie of 0 and 1, then 2
])
LABELS = np.array([2, 2, 1])


@pytest.mark.parametrize(("k", "hits"), [(1, [0, 0, 0]), (2, [1, 0, 1]), (3, [1, 1, 1]), (4, [1, 1, 1])])
def test_topk_by_hand(k: int, hits: list[int]) -> None:
    # Row 2: label 1 ties with class 0 behind class 3; one class strictly above, so it is in the top 2.
    assert rs.topk_hits(LOGITS, LABELS, k).astype(int).tolist() == hits
    assert rs.topk_accuracy(LOGITS, LABELS, k) == pytest.approx(sum(hits) / 3)


def test_topk_refuses_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="need"):
        rs.topk_hits(LOGITS, LABELS[:2], 1)


def test_top1_agreement_by_hand() -> None:
    other = np.array([[0.0, 1.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]])  # argmax 1, 1, 3
    assert rs.top1_agreement(LOGITS, other) == pytest.approx(2 / 3)  # rows 0 and 2 agree
    assert rs.top1_agreement(LOGITS, LOGITS) == 1.0


def test_luma_is_bt601_studio_range() -> None:
    assert rs.luma_bt601(np.zeros(3)) == pytest.approx(16.0)
    assert rs.luma_bt601(np.ones(3)) == pytest.approx(235.0)
    assert rs.luma_bt601(np.array([1.0, 0.0, 0.0])) == pytest.approx(16 + 65.481)


@pytest.mark.parametrize("delta", [0.01, 0.1])
def test_psnr_of_a_uniform_grey_error_by_hand(delta: float) -> None:
    hr = np.full((20, 24, 3), 0.25)
    sr = hr + delta  # every channel up by delta: luma up by delta * (65.481 + 128.553 + 24.966)
    want = 20 * math.log10(255 / (delta * 219.0))
    assert rs.psnr_y(sr, hr) == pytest.approx(want, rel=1e-12)


def test_psnr_ignores_the_border_and_only_it() -> None:
    rng = np.random.default_rng(0)
    hr = rng.uniform(0, 1, (16, 16, 3))
    sr = hr.copy()
    sr[:4] = 0.0
    sr[:, -4:] = 1.0  # errors only in the 4-pixel border
    assert rs.psnr_y(sr, hr) == math.inf
    sr[8, 8, 1] += 0.5  # one interior pixel: MSE = (0.5 * 128.553)^2 / 64 interior pixels
    assert rs.psnr_y(sr, hr) == pytest.approx(10 * math.log10(255**2 * 64 / (0.5 * 128.553) ** 2), rel=1e-12)
    assert rs.psnr_y(sr, hr, border=0) < rs.psnr_y(sr, hr)


def test_superres_pair_crops_to_even_then_halves() -> None:
    photo = np.random.default_rng(1).integers(0, 256, (11, 8, 3), dtype=np.uint8)
    lr, hr = rs.superres_pair(photo)
    assert hr.shape == (10, 8, 3) and lr.shape == (5, 4, 3) and lr.dtype == np.uint8
    assert np.array_equal(hr, photo[:10])
    flat = np.full((12, 6, 3), 77, dtype=np.uint8)  # bicubic of a constant image is the constant
    assert np.array_equal(rs.superres_pair(flat)[0], np.full((6, 3, 3), 77))
    grey_lr, grey_hr = rs.superres_pair(np.full((4, 4), 9, dtype=np.uint8))  # grey photos become RGB
    assert grey_lr.shape == (2, 2, 3) and grey_hr.shape == (4, 4, 3)


def test_superres_geometry_with_a_nearest_neighbour_model() -> None:
    """A fake x2 model (nearest neighbour on the padded input): the centre crop of its output is the
    nearest-neighbour x2 of the unpadded image, so the 7-pixel pad and the crop offset are right."""
    lr = np.random.default_rng(2).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    x = rs.superres_input(lr)
    assert x.shape == (1, 3, 5 + 14, 7 + 14) and x.dtype == np.float32
    assert np.array_equal(x[0, :, 0, 0], lr[0, 0] / np.float32(255))  # edge replicate
    out = rs.upscale(lambda t: np.repeat(np.repeat(t, 2, axis=2), 2, axis=3) * 1.5 - 0.2, lr)
    want = np.clip(np.repeat(np.repeat(lr / np.float32(255), 2, axis=0), 2, axis=1) * 1.5 - 0.2, 0, 1)
    assert out.shape == (10, 14, 3) and np.allclose(out, want) and out.min() >= 0 and out.max() <= 1


def test_superres_psnr_of_an_exact_model_is_float32_exact_and_bicubic_is_finite() -> None:
    rng = np.random.default_rng(3)
    photos = [("a", rng.integers(0, 256, (20, 18, 3), dtype=np.uint8))]
    lr, hr = rs.superres_pair(photos[0][1])

    def oracle(x: np.ndarray) -> np.ndarray:  # returns the reference itself, placed where the crop looks
        y = np.zeros((1, 3, x.shape[2] * 2, x.shape[3] * 2), np.float32)
        y[0, :, 14:-14, 14:-14] = hr.transpose(2, 0, 1) / 255.0
        return y

    mean, per = rs.superres_psnr(oracle, photos)
    assert mean > 140 and list(per) == ["a"]  # float32 rounding of /255 only
    assert 5 < rs.bicubic_psnr(photos)[0] < 60


@pytest.mark.data
def test_shared_superres_model_scores_the_readme_figure() -> None:
    model = SHARED / "superres" / "waifu2x_upconv7_photo_x2.onnx"
    if not model.is_file():
        pytest.skip(f"{model} not found (../shared/data)")
    pytest.importorskip("skimage")
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    photos = rs.superres_photos(["chelsea"])  # one photo keeps it quick; odd width (451) crops to 450
    assert rs.superres_psnr(lambda x: sess.run(None, {name: x})[0], photos)[0] == pytest.approx(36.56, abs=0.01)
    assert rs.bicubic_psnr(photos)[0] == pytest.approx(35.18, abs=0.01)


@pytest.fixture
def tools_modules(monkeypatch: pytest.MonkeyPatch):  # noqa: ANN201 - a loader of tools/ scripts
    """Import tools/NAME.py as the scripts import each other (tools/ on sys.path); sys.path and the
    modules they import are put back afterwards."""
    import sys

    monkeypatch.setattr(sys, "path", [str(ROOT / "tools"), *sys.path])
    before = set(sys.modules)

    def load(name: str):  # noqa: ANN202
        return importlib.import_module(name)

    yield load
    for name in set(sys.modules) - before:
        if getattr(sys.modules[name], "__file__", None) and Path(sys.modules[name].__file__).parent == ROOT / "tools":
            del sys.modules[name]


def _row(model: str, row: str, **fields: object) -> dict[str, object]:
    base: dict[str, object] = {"model": model, "row": row, "command": "" if row == "original" else f"onnx-tucker compress {row}",
                               "eval_limit": None, "label": model, "status": "ok", "error": None, "machine": {"cpu": "x"}}
    return {**base, **fields}


def test_bench_real_page_is_what_results_tables_regenerates(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            tools_modules) -> None:  # noqa: ANN001
    """The page tools/bench_real.py writes must pass tests/test_readme.py's check: its marked table is
    exactly what tools/results_tables.py renders from the same rows (the last row per model and row)."""
    bench, tables = tools_modules("bench_real"), tools_modules("results_tables")
    totals = {"macs_ratio": 2.0, "params_ratio": 1.85}
    lat = {"ort": {"status": "ok", "original_ms": 7.3, "compressed_ms": 6.5, "speedup": 1.12},
           "mnn": {"status": "failed", "failure": "crashed (signal 11, SIGSEGV)", "speedup": None}}
    rows = [
        _row("darknet", "data:0.5", totals=totals, metrics={"top1": 0.1, "top5": 0.2, "agreement": 0.1}),  # replaced below
        _row("darknet", "original", metrics={"top1": 0.655, "top5": 0.867, "images": 1000}),
        _row("darknet", "data:0.5", totals=totals, metrics={"top1": 0.384, "top5": 0.657, "agreement": 0.45},
             runtimes=lat, wall_s=273.0, peak_rss_mb=2900.0, layers={"total": 16, "data_path": 8, "not_data_path": []}),
        _row("waifu2x", "evbmf", totals=totals, metrics={"psnr": 30.0, "psnr_delta": -5.28}),
        _row("resnet50", "data:0.5", status="failed", error="m.onnx: compress failed (exit -11): boom"),
    ]
    results = tmp_path / "real_models.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in rows))
    page = tmp_path / "real-models.md"
    bench.write_markdown(page, rows, results, "python tools/bench_real.py")
    text = page.read_text()
    monkeypatch.setattr(tables, "RESULTS", tmp_path)
    assert tables.regenerate(text) == text
    table = tables.real_models_table(rows)
    assert "38.4 % / 65.7 %" in table and "10.0 %" not in table  # the rerun replaced the first row
    assert "| 7.30 ms |" in table and "| x1.12 |" in table and "| failed |" in table  # original ms; MNN crashed
    assert "failed: (exit -11): boom" in table and "| 8/16 |" in table and "30.00 dB (-5.28)" in table
    assert table.index("original") < table.index("data:0.5") < table.index("waifu2x")
    assert "mnn: crashed (signal 11, SIGSEGV)" in text and "resnet50 `data:0.5`: compress failed" in text
