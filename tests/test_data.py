"""The shared data loader (data/load.py, data/images.py): image folders with and without classes, .npz, and
every bad input as one clear error line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

PIL = pytest.importorskip("PIL")
from PIL import Image  # noqa: E402

from onnx_tucker.config import parse_floats, parse_size  # noqa: E402
from onnx_tucker.data import Preprocess, load_data  # noqa: E402
from onnx_tucker.errors import UsageError  # noqa: E402

SHAPE = {"x": [None, 3, 6, 5]}  # N, C, H, W


def _png(path: Path, arr: np.ndarray) -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return arr


def _img(rng: np.random.Generator, h: int = 6, w: int = 5, c: int = 3) -> np.ndarray:
    return rng.integers(0, 256, size=(h, w, c) if c > 1 else (h, w), dtype=np.uint8)


@pytest.fixture()
def class_folder(tmp_path: Path) -> tuple[Path, dict[str, tuple[int, np.ndarray]]]:
    """zebra/ (2 images) and ant/ (3 images): sorted names give ant=0, zebra=1 whatever the order made."""
    rng = np.random.default_rng(0)
    truth = {}
    for cls, label, n in (("zebra", 1, 2), ("ant", 0, 3)):
        for i in range(n):
            p = tmp_path / "data" / cls / f"{i:02d}.png"
            truth[f"{cls}/{p.name}"] = (label, _png(p, _img(rng)))
    (tmp_path / "data" / "ant" / "notes.txt").write_text("not an image")  # ignored: not an image suffix
    return tmp_path / "data", truth


def test_class_folder_labels_follow_sorted_folder_names(class_folder: tuple[Path, dict]) -> None:
    root, truth = class_folder
    ds = load_data(root, ["x"], SHAPE)
    assert ds.kind == "classes" and ds.classes == ("ant", "zebra") and ds.count == 5
    assert ds.labels is not None and ds.labels.tolist() == [0, 0, 0, 1, 1]
    x = ds.inputs["x"]
    assert x.shape == (5, 3, 6, 5) and x.dtype == np.float32
    # Files are read in sorted order within each class: sample k is that file's pixels / 255, CHW.
    order = sorted(k for k in truth if k.startswith("ant")) + sorted(k for k in truth if k.startswith("zebra"))
    for k, key in enumerate(order):
        label, arr = truth[key]
        assert ds.labels[k] == label
        np.testing.assert_allclose(x[k], arr.transpose(2, 0, 1) / 255.0, atol=1e-6)


def test_mean_std_and_nhwc(class_folder: tuple[Path, dict]) -> None:
    root, truth = class_folder
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.5)
    ds = load_data(root, ["x"], {"x": [None, 6, 5, 3]}, preprocess=Preprocess(mean=mean, std=std))  # auto: NHWC
    arr = truth["ant/00.png"][1]
    np.testing.assert_allclose(ds.inputs["x"][0], (arr / 255.0 - np.array(mean)) / np.array(std), atol=1e-5)


def test_flat_folder_has_no_labels_and_grey_for_one_channel(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    arrs = [_png(tmp_path / f"{i}.png", _img(rng)) for i in range(4)]
    ds = load_data(tmp_path, ["x"], {"x": [None, 1, 6, 5]})
    assert ds.kind == "flat" and ds.labels is None and ds.inputs["x"].shape == (4, 1, 6, 5)
    grey = np.asarray(Image.fromarray(arrs[2]).convert("L"), np.float32) / 255.0
    np.testing.assert_allclose(ds.inputs["x"][2, 0], grey, atol=1e-6)


def test_size_resizes_every_image(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    _png(tmp_path / "a.png", _img(rng, 10, 7))
    _png(tmp_path / "b.png", _img(rng, 4, 9))
    ds = load_data(tmp_path, ["x"], {"x": [None, 3, "h", "w"]}, preprocess=Preprocess(size=(8, 8)))
    assert ds.inputs["x"].shape == (2, 3, 8, 8)


def test_npz_with_labels_and_a_single_unnamed_array(tmp_path: Path) -> None:
    x = np.arange(2 * 3 * 6 * 5, dtype=np.float64).reshape(2, 3, 6, 5)
    np.savez(tmp_path / "d.npz", images=x, labels=np.array([4, 1]))
    ds = load_data(tmp_path / "d.npz", ["x"], SHAPE, {"x": np.dtype(np.float32)})
    assert ds.kind == "npz" and ds.labels.tolist() == [4, 1] and ds.inputs["x"].dtype == np.float32
    np.testing.assert_array_equal(ds.inputs["x"], x.astype(np.float32))


def test_limit_spreads_over_classes(class_folder: tuple[Path, dict]) -> None:
    root, _ = class_folder
    ds = load_data(root, ["x"], SHAPE, limit=2)
    assert ds.labels.tolist() == [0, 1]


def test_parsers() -> None:
    assert parse_size("32") == (32, 32) and parse_size("24,32") == (24, 32)
    assert parse_floats("0.5, 0.25", "--mean") == (0.5, 0.25)
    with pytest.raises(UsageError, match="--size"):
        parse_size("big")
    with pytest.raises(UsageError, match="--mean"):
        parse_floats("a,b", "--mean")


def _bad(tmp_path: Path, case: str) -> Path:
    rng = np.random.default_rng(3)
    root = tmp_path / case
    if case == "missing":
        return root
    root.mkdir()
    if case == "empty":
        return root
    if case == "empty_class":
        _png(root / "cat" / "0.png", _img(rng))
        (root / "dog").mkdir()
    elif case == "unreadable":
        _png(root / "0.png", _img(rng))
        (root / "1.png").write_bytes(b"\x89PNG but not really")
    elif case == "sizes":
        _png(root / "0.png", _img(rng))
        _png(root / "1.png", _img(rng, 7, 5))
    elif case == "model_size":
        _png(root / "0.png", _img(rng, 9, 9))
    elif case == "mixed":
        _png(root / "0.png", _img(rng))
        _png(root / "cls" / "0.png", _img(rng))
    elif case == "npz_name":
        root = tmp_path / "bad.npz"
        np.savez(root, a=np.zeros((2, 3, 6, 5)), b=np.zeros((2, 1)))
    elif case == "npz_count":
        root = tmp_path / "bad.npz"
        np.savez(root, x=np.zeros((2, 3, 6, 5)), labels=np.zeros(3, np.int64))
    elif case == "not_npz":
        root = tmp_path / "bad.npz"
        root.write_text("hello")
    return root


@pytest.mark.parametrize(
    ("case", "needle"),
    [
        ("missing", "no such file or folder"),
        ("empty", "holds no images"),
        ("empty_class", "class folder 'dog' holds no images"),
        ("unreadable", "unreadable image"),
        ("sizes", "resize them all with --size"),
        ("model_size", "the model takes 6x5"),
        ("mixed", "mixes images and sub-folders"),
        ("npz_name", "no array for model input 'x'"),
        ("npz_count", "same non-zero first axis"),
        ("not_npz", "not a readable .npz"),
    ],
)
def test_bad_data_is_one_usage_error_line(tmp_path: Path, case: str, needle: str) -> None:
    path = _bad(tmp_path, case)
    with pytest.raises(UsageError) as e:
        load_data(path, ["x"], SHAPE)
    msg = str(e.value)
    assert needle in msg and "\n" not in msg and msg.startswith("--data ")


def test_validate_reads_an_image_folder(tmp_path: Path) -> None:
    """`onnx-tucker validate --data FOLDER` goes through the same loader (fixture: 1 x 28 x 28 input)."""
    from typer.testing import CliRunner

    from onnx_tucker.cli import app

    fixture = Path(__file__).resolve().parents[1] / "fixtures" / "fmnist_vgg.onnx"
    rng = np.random.default_rng(4)
    for cls in ("a", "b"):
        for i in range(3):
            _png(tmp_path / "imgs" / cls / f"{i}.png", _img(rng, 28, 28, 1))
    res = CliRunner().invoke(app, ["validate", str(fixture), str(fixture), "--data", str(tmp_path / "imgs"),
                                   "--rtol", "1e-6", "--report", str(tmp_path / "r.json")])
    assert res.exit_code == 0, res.output
    import json

    v = json.loads((tmp_path / "r.json").read_text())["validation"]
    assert v["samples"] == 6


def test_compress_calibrates_on_an_image_folder_with_the_shared_preprocessing(tmp_path: Path) -> None:
    """`compress --calibrate FOLDER --mean M --std S` reads images through the shared loader with the same
    options `finetune` and `validate` take (and the config records them)."""
    import json

    from typer.testing import CliRunner

    from onnx_tucker.cli import app

    fixture = Path(__file__).resolve().parents[1] / "fixtures" / "fmnist_vgg.onnx"
    rng = np.random.default_rng(5)
    for i in range(8):
        _png(tmp_path / "imgs" / f"{i}.png", _img(rng, 28, 28, 1))
    out, rep = tmp_path / "out.onnx", tmp_path / "r.json"
    res = CliRunner().invoke(app, ["compress", str(fixture), str(out), "--calibrate", str(tmp_path / "imgs"),
                                   "--mean", "0.5", "--std", "0.25", "--no-validate", "--report", str(rep), "-q"])
    assert res.exit_code == 0, res.output
    r = json.loads(rep.read_text())
    assert r["config"]["preprocess"]["mean"] == [0.5] and r["config"]["preprocess"]["std"] == [0.25]
    assert r["calibration"]["samples"] == 8
    res = CliRunner().invoke(app, ["compress", str(fixture), str(tmp_path / "o2.onnx"), "--calibrate",
                                   str(tmp_path / "imgs"), "--std", "0", "-q"])
    assert res.exit_code != 0 and "--std" in res.output and not (tmp_path / "o2.onnx").exists()
