"""Fine-tuning inputs checked before training and messages that say what happened (issue 16 items 4, 5,
8 and 14): NaN data is a data error, not a learning rate; a real divergence names the rate it used; a
teacher that cannot take the student's input is refused up front, outputs paired by position are named;
no or a tiny held-out split is said; torch threads are their own option and the speed shows early."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from tests.helpers import make_small_cnn, save

torch = pytest.importorskip("torch")
if importlib.util.find_spec("onnx2torch") is None:
    pytest.skip("onnx2torch is not installed (pip install -e '.[finetune]')", allow_module_level=True)

import onnx_tucker as ot  # noqa: E402
from onnx_tucker.config import RankPolicy  # noqa: E402
from onnx_tucker.training import config as ftconfig  # noqa: E402

torch.set_num_threads(1)


def _pair(tmp: Path) -> tuple[Path, Path]:
    orig = save(make_small_cnn(batch="N", low_rank=True), tmp / "m.onnx")
    comp = tmp / "m.tucker.onnx"
    ot.compress(orig, ot.CompressionConfig(ranks=RankPolicy.parse("ratio:0.5"), validate=False), output=comp)
    return orig, comp


def _npz(path: Path, n: int = 16, classes: int | None = 10, nan: bool = False) -> Path:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, 3, 16, 16)).astype(np.float32)
    if nan:
        x[n // 2, 1, 3, 4] = np.nan
    arrays = {"x": x}
    if classes:
        arrays["labels"] = rng.integers(0, classes, n)
    np.savez(path, **arrays)
    return path


def _cli(*args: str) -> tuple[int, str, str]:
    from typer.testing import CliRunner

    from onnx_tucker.cli import app

    r = CliRunner().invoke(app, list(args))
    return r.exit_code, r.stdout, r.stderr


def _one_error(code: int, err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "; " in lines[0], err
    assert "Traceback" not in err
    return lines[0]


def test_a_nan_pixel_is_a_data_error_not_a_learning_rate(tmp_path: Path) -> None:
    _, comp = _pair(tmp_path)
    data = _npz(tmp_path / "d.npz", nan=True)
    before = sorted(p.name for p in tmp_path.iterdir())
    code, _, err = _cli("finetune", str(comp), str(tmp_path / "o.onnx"), "--data", str(data), "--torch-threads", "1")
    line = _one_error(code, err)
    assert code == 2, err
    assert "--data" in line and "d.npz" in line and "'x' has 1 NaN" in line and "--lr" not in line
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_a_true_divergence_names_the_rate_the_step_used(tmp_path: Path) -> None:
    _, comp = _pair(tmp_path)
    data = _npz(tmp_path / "d.npz")
    # cosine over 2 steps: step 1 at 1e30 blows the weights up, step 2 (at 5e29) sees the loss diverge,
    # and after it the scheduler's rate is 0 (what the message printed before).
    code, _, err = _cli("finetune", str(comp), str(tmp_path / "o.onnx"), "--data", str(data), "--lr", "1e30",
                        "--max-steps", "2", "--batch-size", "8", "--val-split", "0", "--no-augment",
                        "--torch-threads", "1", "-q")
    line = _one_error(code, err)
    assert code == 1
    assert "at learning rate 5e+29" in line and "it is 1e+30" in line and "now 0" not in line
    assert not (tmp_path / "o.onnx").exists()


def _teacher_grey(tmp: Path) -> Path:
    return save(make_small_cnn(in_ch=1, batch="N"), tmp / "grey.onnx")


def test_a_teacher_with_another_input_shape_is_refused_before_training(tmp_path: Path) -> None:
    _, comp = _pair(tmp_path)
    teacher = _teacher_grey(tmp_path)
    data = _npz(tmp_path / "d.npz")
    before = sorted(p.name for p in tmp_path.iterdir())
    code, out, err = _cli("finetune", str(comp), str(tmp_path / "o.onnx"), "--data", str(data), "--teacher", str(teacher),
                          "--torch-threads", "1")
    line = _one_error(code, err)
    assert code == 2 and "--teacher" in line and "grey.onnx" in line
    assert "input 'x' is [N, 1, 16, 16]" in line and "the student's [N, 3, 16, 16]" in line
    assert "finetune:" not in out + err  # nothing started
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_outputs_paired_by_position_are_named(tmp_path: Path) -> None:
    _, comp = _pair(tmp_path)
    m = make_small_cnn(batch="N", low_rank=True)
    old = m.graph.output[0].name
    m.graph.output[0].name = "scores"
    for node in m.graph.node:
        node.output[:] = ["scores" if o == old else o for o in node.output]
    teacher = save(m, tmp_path / "renamed.onnx")
    rep = tmp_path / "r.json"
    code, _, err = _cli("finetune", str(comp), str(tmp_path / "o.onnx"), "--data", str(_npz(tmp_path / "d.npz")),
                        "--teacher", str(teacher), "--max-steps", "1", "--torch-threads", "1", "--report", str(rep))
    assert code == 0, err
    assert f"outputs paired by position: student '{old}' <- teacher 'scores'" in err
    assert any("paired by position" in n for n in json.loads(rep.read_text())["finetune"]["notes"])


def test_one_image_without_held_out_data_says_the_figure_is_on_training_data(tmp_path: Path) -> None:
    _, comp = _pair(tmp_path)
    code, _, err = _cli("finetune", str(comp), str(tmp_path / "o.onnx"), "--data", str(_npz(tmp_path / "d.npz", n=1)),
                        "--max-steps", "1", "--torch-threads", "1")
    assert code == 0, err
    assert "warning: no held-out data (1 sample(s) cannot be split, no --val-data)" in err
    assert "on the training data (no held-out data): accuracy" in err


def test_a_tiny_held_out_split_is_warned_about(tmp_path: Path) -> None:
    _, comp = _pair(tmp_path)
    r = ot.finetune(comp, tmp_path / "o.onnx", _npz(tmp_path / "d.npz", n=40),
                    config=ot.FinetuneConfig(max_steps=1, threads=1))
    assert r.val_samples == 4
    assert any(n.startswith("warning: only 4 held-out sample(s) (--val-split 0.1 of 40)") for n in r.notes), r.notes


def test_torch_threads_is_its_own_option_and_the_speed_shows_early(tmp_path: Path) -> None:
    _, comp = _pair(tmp_path)
    data = _npz(tmp_path / "d.npz", n=64)
    code, _, err = _cli("finetune", str(comp), str(tmp_path / "o.onnx"), "--data", str(data), "--batch-size", "8",
                        "--epochs", "1", "--val-split", "0", "--torch-threads", "1", "--device", "cpu")
    assert code == 0, err
    speed = [ln for ln in err.splitlines() if ln.startswith("speed: ")]
    assert len(speed) == 1 and "img/s after 5 steps" in speed[0] and "per epoch" in speed[0], err
    assert "torch threads 1 (--torch-threads" in speed[0]
    epoch = next(i for i, ln in enumerate(err.splitlines()) if ln.startswith("epoch 1/1"))
    assert err.splitlines().index(speed[0]) < epoch  # before the epoch ends


def test_finetunes_old_threads_still_works_hidden_and_conflicts_are_refused(tmp_path: Path) -> None:
    _, comp = _pair(tmp_path)
    data = _npz(tmp_path / "d.npz")
    rep = tmp_path / "r.json"
    code, _, err = _cli("finetune", str(comp), str(tmp_path / "o.onnx"), "--data", str(data), "--threads", "1",
                        "--max-steps", "1", "--report", str(rep), "-q")
    assert code == 0, err
    assert json.loads(rep.read_text())["finetune"]["torch_threads"] == 1
    code, _, err = _cli("finetune", str(comp), str(tmp_path / "p.onnx"), "--data", str(data), "--threads", "1",
                        "--torch-threads", "2")
    assert code == 2 and "--torch-threads only" in _one_error(code, err)
    code, out, _ = _cli("finetune", "--help")
    assert "--torch-threads" in out and "--threads" not in out.replace("--torch-threads", "")
    code, out, _ = _cli("compress", "--help")
    assert "--torch-threads" in out and "onnxruntime intra-op threads" in " ".join(out.split())


def test_compress_torch_threads_needs_finetune(tmp_path: Path) -> None:
    orig, _ = _pair(tmp_path)
    code, _, err = _cli("compress", str(orig), str(tmp_path / "o.onnx"), "--torch-threads", "1")
    assert code == 2 and "--torch-threads" in _one_error(code, err)


@pytest.mark.parametrize(("load", "want"), [(0.1, 2), (0.6, 1), (1.2, 1), (7.0, 1)])
def test_the_default_thread_count_leaves_busy_cores_alone(monkeypatch: pytest.MonkeyPatch, load: float, want: int) -> None:
    monkeypatch.setattr(ftconfig, "usable_cpus", lambda: 2)
    monkeypatch.setattr(ftconfig.os, "getloadavg", lambda: (load, load, load))
    threads, why = ftconfig.default_torch_threads()
    assert threads == want and "2 CPU(s)" in why and f"load {load:.1f}" in why


def test_the_default_is_recorded_in_the_result(tmp_path: Path) -> None:
    _, comp = _pair(tmp_path)
    r = ot.finetune(comp, None, _npz(tmp_path / "d.npz"), config=ot.FinetuneConfig(max_steps=1))
    assert 1 <= r.torch_threads <= ftconfig.usable_cpus()
    onnx.checker.check_model(onnx.load(comp))


def test_finetune_takes_uint8_pixels_only_with_a_declared_scale(tmp_path: Path) -> None:
    _, comp = _pair(tmp_path)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "u8.npz", x=rng.integers(0, 256, (8, 3, 16, 16)).astype(np.uint8), labels=rng.integers(0, 10, 8))
    args = ["finetune", str(comp), str(tmp_path / "o.onnx"), "--data", str(tmp_path / "u8.npz"), "--max-steps", "1",
            "--torch-threads", "1", "-q"]
    code, _, err = _cli(*args)
    assert code == 2 and "holds integers (uint8)" in _one_error(code, err) and "--scale" in err
    assert not (tmp_path / "o.onnx").exists()
    code, _, err = _cli(*args, "--scale", "1")
    assert code == 0, err
