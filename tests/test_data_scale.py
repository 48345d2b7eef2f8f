"""Integer data and `--scale` (issue 16 item 3), non-finite and damaged data files (item 4).

Integer arrays for a float model input are 8-bit pixels: refused unless `--scale` says what a
pixel of 255 becomes, then converted as images are (times scale / 255, then mean / std). Integer
arrays for an integer input pass through. The conversions are checked against hand-computed arrays.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from PIL import Image
from typer.testing import CliRunner

from onnx_tucker.cli import app
from onnx_tucker.config import Preprocess
from onnx_tucker.data import load_data
from onnx_tucker.errors import UsageError
from tests.helpers import make_small_cnn, save

F32 = {"x": np.dtype(np.float32)}
NCHW = {"x": [None, 3, 2, 2]}
runner = CliRunner()


def _u8(path: Path, shape: tuple[int, ...] = (2, 3, 2, 2)) -> np.ndarray:
    a = np.arange(int(np.prod(shape)), dtype=np.uint8).reshape(shape) * 10
    np.savez(path, x=a)
    return a


def test_integer_pixels_are_refused_until_the_scale_is_declared(tmp_path: Path) -> None:
    _u8(tmp_path / "d.npz")
    with pytest.raises(UsageError) as e:
        load_data(tmp_path / "d.npz", ["x"], NCHW, F32)
    msg = str(e.value)
    assert msg.startswith("--data ") and "d.npz" in msg and "'x' holds integers (uint8)" in msg
    assert "--scale 1" in msg and "--scale 255" in msg and "\n" not in msg


def test_scale_1_divides_by_255_and_255_keeps_raw_values(tmp_path: Path) -> None:
    a = _u8(tmp_path / "d.npz")
    one = load_data(tmp_path / "d.npz", ["x"], NCHW, F32, Preprocess(scale=1)).inputs["x"]
    raw = load_data(tmp_path / "d.npz", ["x"], NCHW, F32, Preprocess(scale=255)).inputs["x"]
    assert one.dtype == np.float32 and raw.dtype == np.float32
    np.testing.assert_allclose(one, a.astype(np.float64) / 255, rtol=1e-6)
    np.testing.assert_array_equal(raw, a.astype(np.float32))
    # pixel 30 at [0, 0, 1, 1] (3 * 10), by hand: 30 / 255
    assert one[0, 0, 1, 1] == pytest.approx(30 / 255, rel=1e-6)


def test_mean_and_std_apply_per_channel_after_the_scale(tmp_path: Path) -> None:
    a = _u8(tmp_path / "d.npz")
    pre = Preprocess(mean=(0.1, 0.2, 0.3), std=(0.5, 0.25, 2.0), scale=1)
    x = load_data(tmp_path / "d.npz", ["x"], NCHW, F32, pre).inputs["x"]
    # sample 1, channel 2, pixel (0, 1): index 1*12 + 2*4 + 1 = 21 -> 210
    assert a[1, 2, 0, 1] == 210
    assert x[1, 2, 0, 1] == pytest.approx((210 / 255 - 0.3) / 2.0, rel=1e-6)
    m = np.array([0.1, 0.2, 0.3]).reshape(1, 3, 1, 1)
    s = np.array([0.5, 0.25, 2.0]).reshape(1, 3, 1, 1)
    np.testing.assert_allclose(x, (a / 255 - m) / s, rtol=1e-5, atol=1e-6)


def test_nhwc_integer_pixels_take_the_channel_last(tmp_path: Path) -> None:
    a = _u8(tmp_path / "d.npz", (2, 2, 2, 3))
    x = load_data(tmp_path / "d.npz", ["x"], {"x": [None, 2, 2, 3]}, F32,
                  Preprocess(mean=(0, 0, 100), scale=255)).inputs["x"]
    np.testing.assert_array_equal(x, a.astype(np.float32) - np.array([0, 0, 100], np.float32))


def test_integer_input_models_get_their_integers_unchanged(tmp_path: Path) -> None:
    ids = np.array([[1, 5, 7], [2, 0, 9]], np.int64)
    np.savez(tmp_path / "ids.npz", tokens=ids)
    ds = load_data(tmp_path / "ids.npz", ["tokens"], {"tokens": [None, 3]}, {"tokens": np.dtype(np.int64)})
    assert ds.inputs["tokens"].dtype == np.int64
    np.testing.assert_array_equal(ds.inputs["tokens"], ids)


def test_values_beyond_8_bits_are_not_taken_for_pixels(tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", x=np.full((2, 3, 2, 2), 4095, np.int16))
    with pytest.raises(UsageError, match="from 4095 to 4095, not 8-bit pixels"):
        load_data(tmp_path / "d.npz", ["x"], NCHW, F32, Preprocess(scale=1))


def test_image_folders_follow_the_scale_too(tmp_path: Path) -> None:
    px = np.array([[[0, 51, 255], [102, 0, 0]], [[1, 2, 3], [4, 5, 6]]], np.uint8)  # 2 x 2 x 3
    (tmp_path / "imgs").mkdir()
    Image.fromarray(px).save(tmp_path / "imgs" / "a.png")
    default = load_data(tmp_path / "imgs", ["x"], NCHW, F32).inputs["x"]
    raw = load_data(tmp_path / "imgs", ["x"], NCHW, F32, Preprocess(scale=255)).inputs["x"]
    np.testing.assert_allclose(default[0], px.transpose(2, 0, 1) / 255, rtol=1e-6)
    np.testing.assert_array_equal(raw[0], px.transpose(2, 0, 1).astype(np.float32))


def test_nan_and_inf_are_counted_per_array_and_sample(tmp_path: Path) -> None:
    x = np.zeros((5, 3, 2, 2), np.float32)
    x[1, 0, 0, 0] = np.nan
    x[3, 2, 1, 1] = -np.inf
    x[3, 1, 1, 1] = np.inf
    np.savez(tmp_path / "d.npz", x=x)
    with pytest.raises(UsageError) as e:
        load_data(tmp_path / "d.npz", ["x"], NCHW, F32, option="--val-data")
    assert str(e.value).startswith("--val-data ") and "'x' has 1 NaN and 2 Inf value(s) (of 60), in 2 sample(s)" in str(e.value)


def test_compress_calibrates_on_uint8_pixels_as_on_the_same_floats(tmp_path: Path) -> None:
    """`--scale 1` on uint8 pixels reaches compress --calibrate: the same model as float pixels / 255."""
    inp = save(make_small_cnn(low_rank=True), tmp_path / "m.onnx")
    px = np.random.default_rng(0).integers(0, 256, (6, 3, 16, 16)).astype(np.uint8)
    np.savez(tmp_path / "u8.npz", x=px)
    np.savez(tmp_path / "f32.npz", x=px.astype(np.float32) * np.float32(1 / 255))  # as the loader computes it
    outs = []
    for name, extra in (("u8", ["--scale", "1"]), ("f32", [])):
        out = tmp_path / f"{name}.onnx"
        r = runner.invoke(app, ["compress", str(inp), str(out), "--calibrate", str(tmp_path / f"{name}.npz"),
                                "--no-validate", "-q", *extra])
        assert r.exit_code == 0, r.output
        outs.append(onnx.load(out).graph)
    a, b = ([onnx.numpy_helper.to_array(t) for t in g.initializer] for g in outs)
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)


def test_validate_takes_integer_pixels_with_scale_and_integer_inputs_without(tmp_path: Path) -> None:
    m = save(make_small_cnn(), tmp_path / "m.onnx")
    _u8(tmp_path / "d.npz", (2, 3, 16, 16))
    r = runner.invoke(app, ["validate", str(m), str(m), "--data", str(tmp_path / "d.npz"), "--scale", "1", "-q"])
    assert r.exit_code == 0, r.output
    # A model whose input is int64 (an embedding-like Gather): integer data is legitimate, no --scale.
    table = helper.make_tensor("table", TensorProto.FLOAT, [10, 4], np.arange(40, dtype=np.float32).tolist())
    g = helper.make_graph([helper.make_node("Gather", ["table", "ids"], ["y"], name="g")], "emb",
                          [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 3])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, 4])], [table])
    emb = save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), tmp_path / "e.onnx")
    np.savez(tmp_path / "ids.npz", ids=np.array([[1, 2, 3], [9, 8, 7]], np.int64))
    r = runner.invoke(app, ["validate", str(emb), str(emb), "--data", str(tmp_path / "ids.npz"), "-q"])
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize("name", ["calibrate_one_nan", "calibrate_all_inf", "calibrate_truncated_npz",
                                  "calibrate_random_bytes_npz"])
def test_bad_data_in_a_real_process_prints_one_line_and_no_warning(name: str, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """pytest records Python warnings itself, so only a real process shows what a terminal would."""
    import subprocess
    import sys

    from tests.test_bad_inputs import CASES, snapshot

    c = CASES[name](tmp_path, monkeypatch)
    before = snapshot(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "onnx_tucker.cli", *c.args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "data.npz" in lines[0], proc.stderr
    assert "Warning" not in proc.stderr + proc.stdout and "Traceback" not in proc.stderr
    assert "pickle" not in proc.stderr  # numpy's advice for bytes it took for a pickle
    assert snapshot(tmp_path) == before


# ---- issue 15 build item 4: --resize-shorter, --crop, --channel-order (image folders) ---------------


def _folder(tmp: Path, px: np.ndarray) -> Path:
    (tmp / "imgs").mkdir()
    Image.fromarray(px).save(tmp / "imgs" / "a.png")
    return tmp / "imgs"


def _raw(folder: Path, shape: list, pre: Preprocess) -> np.ndarray:
    """The decoded image as H x W x C pixels (scale 255: raw values), from the NCHW input."""
    from dataclasses import replace

    x = load_data(folder, ["x"], {"x": shape}, F32, replace(pre, scale=255)).inputs["x"]
    return x[0].transpose(1, 2, 0)


def test_channel_order_bgr_reverses_the_channels(tmp_path: Path) -> None:
    px = np.array([[[10, 20, 30], [40, 50, 60]]], np.uint8)  # 1 x 2, RGB
    got = _raw(_folder(tmp_path, px), [None, 3, 1, 2], Preprocess(channel_order="bgr"))
    np.testing.assert_array_equal(got, np.array([[[30, 20, 10], [60, 50, 40]]], np.float32))


def test_crop_takes_the_centre(tmp_path: Path) -> None:
    px = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)
    got = _raw(_folder(tmp_path, px), [None, 3, 2, 2], Preprocess(crop=(2, 2)))
    # rows (4-2)/2 = 1.., cols (6-2)/2 = 2..: px[1:3, 2:4], by hand
    want = np.array([[[24, 25, 26], [27, 28, 29]], [[42, 43, 44], [45, 46, 47]]], np.float32)
    np.testing.assert_array_equal(got, want)


def test_resize_shorter_keeps_the_aspect_ratio(tmp_path: Path) -> None:
    # 2 x 4 -> shorter side 1 -> 1 x 2. Pillow's bilinear at factor 2 is a triangle of half-width 2:
    # rows (0.5, 1.5 from the centre 1.0) weigh alike; columns 0.5, 1.5, 2.5 from the centre 1.0 weigh
    # 0.75, 0.75, 0.25 (and for the centre 3.0: 0.25, 0.75, 0.75 on columns 1..3), / 1.75.
    px = np.zeros((2, 4, 3), np.uint8)
    px[:, :2] = [[[0, 0, 0], [100, 0, 0]], [[100, 100, 0], [200, 100, 4]]]
    px[:, 2:] = 80
    cols = px.astype(np.float64).mean(axis=0)  # [50,50,0], [150,50,2], 80, 80
    left = (0.75 * cols[0] + 0.75 * cols[1] + 0.25 * cols[2]) / 1.75  # 97.1, 54.3, 12.3
    right = (0.25 * cols[1] + 0.75 * cols[2] + 0.75 * cols[3]) / 1.75  # 90, 75.7, 68.9
    got = _raw(_folder(tmp_path, px), [None, 3, "h", "w"], Preprocess(resize_shorter=1))
    assert got.shape == (1, 2, 3)
    np.testing.assert_array_equal(got, np.round([[left, right]]).astype(np.float32))
    np.testing.assert_array_equal(got, np.array([[[97, 54, 12], [90, 76, 69]]], np.float32))


def test_resize_shorter_then_crop_as_imagenet_evaluates(tmp_path: Path) -> None:
    px = np.full((6, 9, 3), 7, np.uint8)
    px[1:5, 2:7] = 200  # 6 x 9 -> shorter 4 -> 4 x 6 -> crop 2 x 2 of the centre: all inside the block
    got = _raw(_folder(tmp_path, px), [None, 3, 2, 2], Preprocess(resize_shorter=4, crop=(2, 2)))
    assert got.shape == (2, 2, 3)
    np.testing.assert_array_equal(got, np.full((2, 2, 3), 200, np.float32))


@pytest.mark.parametrize(("extra", "needle"), [
    (["--crop", "3,3"], "--crop 3,3 but model input 'x' is 16x16"),
    (["--size", "16", "--crop", "16"], "--size with --resize-shorter / --crop"),
    (["--channel-order", "grb"], "--channel-order grb: not a channel order"),
    (["--resize-shorter", "0"], "--resize-shorter 0: give a positive size"),
    (["--crop", "a"], "--crop a: not a size"),
])
def test_bad_preprocessing_options_are_one_line(tmp_path: Path, extra: list[str], needle: str) -> None:
    m = save(make_small_cnn(), tmp_path / "m.onnx")
    folder = _folder(tmp_path, np.zeros((16, 16, 3), np.uint8))
    r = runner.invoke(app, ["validate", str(m), str(m), "--data", str(folder), *extra])
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.exit_code == 2 and len(lines) == 1 and needle in lines[0], r.stderr


def test_crop_larger_than_the_image_says_so(tmp_path: Path) -> None:
    folder = _folder(tmp_path, np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(UsageError, match="image is 4x4, smaller than --crop 8,8"):
        load_data(folder, ["x"], {"x": [None, 3, 8, 8]}, F32, Preprocess(crop=(8, 8)))
