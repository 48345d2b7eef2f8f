"""Fine-tuning (issue 8): graph normalisation for onnx2torch, the ONNX -> torch -> ONNX round trip,
which weights a step changes, distillation on class-score and non-class outputs, resume after
Ctrl-C, and every bad input as one error line with nothing written. Tiny models: seconds each."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.helpers import _finish, _init, he_normal, make_small_cnn, run_ort, save

torch = pytest.importorskip("torch")
# Only checked for presence: importing onnx2torch directly would import torchvision, which fails next to a
# CPU torch build ("torchvision::nms does not exist"); onnx_tucker.training imports it behind a stub.
if importlib.util.find_spec("onnx2torch") is None:
    pytest.skip("onnx2torch is not installed (pip install -e '.[finetune]')", allow_module_level=True)

import onnx_tucker as ot  # noqa: E402
from onnx_tucker.config import RankPolicy  # noqa: E402
from onnx_tucker.errors import ModelLoadError  # noqa: E402
from onnx_tucker.graph import torchready  # noqa: E402
from onnx_tucker.training import FinetuneConfig, FinetuneInterrupted  # noqa: E402
from onnx_tucker.training import convert as ftc  # noqa: E402

torch.set_num_threads(1)


# ---- models and data ----------------------------------------------------------------------------

def _compressed(tmp_path: Path, model: onnx.ModelProto, ratio: str = "ratio:0.5", name: str = "m",
                exclude: str | None = None) -> tuple[Path, Path]:
    orig = save(model, tmp_path / f"{name}.onnx")
    out = tmp_path / f"{name}.tucker.onnx"
    ot.compress(orig, ot.CompressionConfig(ranks=RankPolicy.parse(ratio), validate=False, exclude=exclude), output=out)
    return orig, out


def _two_output_model(seed: int = 0) -> onnx.ModelProto:
    """x [N,3,8,8] -> conv1 -> Relu -> conv2 = feat [N,16,8,8] (not class scores) -> GAP -> fc = logits [N,10]."""
    rng = np.random.default_rng(seed)
    inits = [_init("w1", he_normal(rng, (16, 3, 3, 3))), _init("w2", he_normal(rng, (16, 16, 3, 3))),
             _init("b2", (0.1 * rng.standard_normal(16)).astype(np.float32)),
             _init("fw", he_normal(rng, (10, 16))), _init("fb", np.zeros(10, np.float32))]
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["h"], name="conv1", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["h"], ["a"], name="relu"),
        helper.make_node("Conv", ["a", "w2", "b2"], ["feat"], name="conv2", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("GlobalAveragePool", ["feat"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fw", "fb"], ["logits"], name="fc", transB=1),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])
    outs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10]),
            helper.make_tensor_value_info("feat", TensorProto.FLOAT, ["N", 16, 8, 8])]
    return _finish(nodes, [x], outs, inits, name="two_outputs")


def _legacy_model() -> onnx.ModelProto:
    """Opset 9, batch fixed to 1: Conv -> Dropout -> Identity -> Reshape to [1, -1] -> Slice-1 -> Gemm (old exporters)."""
    rng = np.random.default_rng(5)
    inits = [_init("w", he_normal(rng, (8, 3, 3, 3))), _init("shape", np.array([1, -1], np.int64)),
             _init("fw", he_normal(rng, (4, 200))), _init("fb", np.zeros(4, np.float32))]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv", kernel_shape=[3, 3]),
        helper.make_node("Dropout", ["c"], ["d"], name="drop", ratio=0.5),
        helper.make_node("Identity", ["d"], ["i"], name="ident"),
        helper.make_node("Reshape", ["i", "shape"], ["r"], name="reshape"),
        helper.make_node("Slice", ["r"], ["s"], name="slice", axes=[1], starts=[0], ends=[200]),
        helper.make_node("Gemm", ["s", "fw", "fb"], ["y"], name="fc", transB=1),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    return _finish(nodes, [x], [y], inits, opset=9, ir_version=4)


def _npz(path: Path, n: int = 64, shape: tuple[int, ...] = (3, 16, 16), classes: int | None = 10, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    arrays = {"x": rng.standard_normal((n, *shape)).astype(np.float32)}
    if classes:
        arrays["labels"] = rng.integers(0, classes, n)
    np.savez(path, **arrays)
    return path


def _weights_in_order(model: onnx.ModelProto) -> list[np.ndarray]:
    g = model.graph
    inits = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    # A bias-free Gemm comes back from torch as MatMul with the matrix transposed: compare as stored.
    return [inits[n.input[1]] for n in g.node if n.op_type in ("Conv", "Gemm", "MatMul") and n.input[1] in inits]


# ---- graph normalisation --------------------------------------------------------------------------

def test_normalisation_makes_a_legacy_graph_convertible_with_equal_outputs() -> None:
    model = _legacy_model()
    supported = ftc.supported_ops()
    assert torchready.unsupported_ops(model, supported) == ["Dropout-7", "Slice-1"]  # what onnx2torch lacks as is
    norm, bad = torchready.normalize(model, supported)
    assert bad == []
    ops = [n.op_type for n in norm.model.graph.node]
    assert "Dropout" not in ops and "Identity" not in ops and norm.opset == 13 and norm.source_opset == 9
    shape = next(numpy_helper.to_array(t) for t in norm.model.graph.initializer if t.name.startswith("shape_dynamic"))
    assert shape.tolist() == [0, -1]
    assert norm.model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    onnx.checker.check_model(norm.model)
    x1 = np.random.default_rng(0).standard_normal((1, 3, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(run_ort(norm.model, {"x": x1})["y"], run_ort(model, {"x": x1})["y"], rtol=1e-6, atol=1e-6)
    # Any batch now works, in onnxruntime and in torch, sample by sample equal to the original.
    x3 = np.random.default_rng(1).standard_normal((3, 3, 8, 8)).astype(np.float32)
    y3 = run_ort(norm.model, {"x": x3})["y"]
    module, _ = ftc.to_torch(model, "legacy.onnx")
    with torch.no_grad():
        t3 = module(torch.from_numpy(x3)).numpy()
    for i in range(3):
        ref = run_ort(model, {"x": x3[i : i + 1]})["y"][0]
        np.testing.assert_allclose(y3[i], ref, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(t3[i], ref, rtol=1e-4, atol=1e-5)


def test_unsupported_ops_are_named_in_one_line(tmp_path: Path) -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])
    nodes = [helper.make_node("Hardmax", ["x"], ["h"]), helper.make_node("LpNormalization", ["h"], ["y"])]
    model = _finish(nodes, [x], [y], [])
    with pytest.raises(ModelLoadError) as e:
        ftc.to_torch(model, "odd.onnx")
    msg = str(e.value)
    assert "Hardmax-13" in msg and "LpNormalization-1" in msg and "\n" not in msg and msg.startswith("odd.onnx: ")


# ---- round trip, trainable weights ------------------------------------------------------------------

def test_round_trip_keeps_outputs_and_structure_before_training(tmp_path: Path) -> None:
    _, comp = _compressed(tmp_path, make_small_cnn(batch="N", low_rank=True))
    model = onnx.load(comp)
    ops_before = [n.op_type for n in model.graph.node]
    assert ops_before.count("Conv") > 2  # the Tucker chains are there to keep
    module, norm = ftc.to_torch(model, str(comp))
    x = np.random.default_rng(0).standard_normal((3, 3, 16, 16)).astype(np.float32)
    exported = ftc.export(module, {"x": x[:2]}, ["x"], ["logits"], norm.opset, True)
    assert [i.name for i in exported.graph.input] == ["x"] and [o.name for o in exported.graph.output] == ["logits"]
    assert torchready.weight_structure(exported) == torchready.weight_structure(model)
    # Same layers in the same order; a bias-free Gemm (the first SVD factor) comes back as MatMul.
    def layers(ops: list[str]) -> list[str]:
        return ["FC" if o in ("Gemm", "MatMul") else o for o in ops if o in ("Conv", "Gemm", "MatMul")]

    assert layers([n.op_type for n in exported.graph.node]) == layers(ops_before)
    ref = run_ort(model, {"x": x})["logits"]
    got = run_ort(exported, {"x": x})["logits"]  # batch 3 while exported at 2: the batch stays dynamic
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("train", ["factors", "all"])
def test_one_step_changes_exactly_the_trainable_weights(tmp_path: Path, train: str) -> None:
    # conv1 stays whole while conv2 and fc are decomposed.
    orig, comp = _compressed(tmp_path, make_small_cnn(batch="N", low_rank=True), exclude="^conv1$")
    out = tmp_path / "ft.onnx"
    cfg = FinetuneConfig(epochs=1, max_steps=1, lr=0.05, train=train, val_split=0, augment=False, threads=1)
    r = ot.finetune(comp, out, _npz(tmp_path / "d.npz"), config=cfg)
    assert r.steps == 1 and out.exists()
    before, after = onnx.load(comp), onnx.load(out)
    names = [n.name for n in before.graph.node if n.op_type in ("Conv", "Gemm")]
    wb, wa = _weights_in_order(before), _weights_in_order(after)
    assert len(wb) == len(wa) == len(names)
    factor = [bool(ftc.FACTOR_MODULE.search(n)) for n in names]
    assert any(factor) and not all(factor)
    for name, is_factor, b, a in zip(names, factor, wb, wa, strict=True):
        a = a.T if a.shape != b.shape else a  # Gemm may come back stored the other way round
        changed = not np.array_equal(a, b)
        assert changed == (is_factor or train == "all"), name
    assert r.trainable_params < r.total_params if train == "factors" else r.trainable_params == r.total_params


def test_same_seed_same_model(tmp_path: Path) -> None:
    _, comp = _compressed(tmp_path, make_small_cnn(batch="N", low_rank=True))
    data = _npz(tmp_path / "d.npz")
    cfg = FinetuneConfig(epochs=1, max_steps=3, lr=0.01, threads=1, seed=3)
    ot.finetune(comp, tmp_path / "a.onnx", data, config=cfg)
    ot.finetune(comp, tmp_path / "b.onnx", data, config=cfg)
    for a, b in zip(_weights_in_order(onnx.load(tmp_path / "a.onnx")), _weights_in_order(onnx.load(tmp_path / "b.onnx")), strict=True):
        np.testing.assert_array_equal(a, b)


# ---- distillation -------------------------------------------------------------------------------

def _kl(t: np.ndarray, s: np.ndarray, T: float = 4.0) -> float:
    def log_softmax(z: np.ndarray) -> np.ndarray:
        z = z / T - (z / T).max(1, keepdims=True)
        return z - np.log(np.exp(z).sum(1, keepdims=True))

    lt, ls = log_softmax(t.astype(np.float64)), log_softmax(s.astype(np.float64))
    return float((np.exp(lt) * (lt - ls)).sum(1).mean())


def test_distillation_lowers_the_loss_on_class_and_non_class_outputs(tmp_path: Path) -> None:
    orig, comp = _compressed(tmp_path, _two_output_model(), ratio="ratio:0.5")
    data = _npz(tmp_path / "d.npz", n=256, shape=(3, 8, 8), classes=None)
    out = tmp_path / "ft.onnx"
    cfg = FinetuneConfig(epochs=6, optimizer="adam", lr=2e-3, schedule="constant", batch_size=32, augment=False,
                         val_split=0.25, threads=1)
    r = ot.finetune(comp, out, data, teacher=orig, config=cfg)
    assert r.mode == "distill" and r.best_metric == "val_loss"
    x = np.random.default_rng(9).standard_normal((128, 3, 8, 8)).astype(np.float32)  # fresh inputs
    t, s0, s1 = (run_ort(onnx.load(p), {"x": x}) for p in (orig, comp, out))
    kl0, kl1 = _kl(t["logits"], s0["logits"]), _kl(t["logits"], s1["logits"])
    mse0 = float(np.mean((t["feat"] - s0["feat"]) ** 2))
    mse1 = float(np.mean((t["feat"] - s1["feat"]) ** 2))
    assert kl0 > 1e-3 and kl1 < 0.3 * kl0, (kl0, kl1)  # measured: 0.0146 -> 0.0013 (8 epochs)
    assert mse1 < 0.8 * mse0, (mse0, mse1)  # measured: 1.07 -> 0.65
    losses = [h.val_loss for h in r.history]
    assert all(b < a for a, b in zip(losses, losses[1:], strict=False)) and r.best_epoch == len(losses)


def test_labels_and_teacher_combine_and_history_is_per_epoch(tmp_path: Path) -> None:
    orig, comp = _compressed(tmp_path, make_small_cnn(batch="N", low_rank=True))
    cfg = FinetuneConfig(epochs=2, optimizer="adam", lr=1e-3, threads=1)
    r = ot.finetune(comp, tmp_path / "o.onnx", _npz(tmp_path / "d.npz"), teacher=orig, config=cfg)
    assert r.mode == "labels+distill" and r.best_metric == "val_accuracy"
    assert [h.epoch for h in r.history] == [1, 2] and all(h.val_accuracy is not None for h in r.history)
    assert r.export_max_rel_error <= 1e-4 and r.val_samples == 6 and r.train_samples == 58


# ---- interrupt and resume -------------------------------------------------------------------------

def test_ctrl_c_keeps_the_checkpoint_and_resume_finishes(tmp_path: Path) -> None:
    _, comp = _compressed(tmp_path, make_small_cnn(batch="N", low_rank=True))
    data, out = _npz(tmp_path / "d.npz"), tmp_path / "o.onnx"
    cfg = FinetuneConfig(epochs=3, batch_size=16, lr=0.01, threads=1)

    def stop_in_epoch_2(kind: str, d: dict) -> None:
        if kind == "step" and d["epoch"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(FinetuneInterrupted, match="rerun with --resume") as e:
        ot.finetune(comp, out, data, config=cfg, progress=stop_in_epoch_2)
    assert e.value.exit_code == 130
    assert not out.exists() and (tmp_path / "o.onnx.finetune.pt").exists()
    r = ot.finetune(comp, out, data, config=FinetuneConfig(epochs=3, batch_size=16, lr=0.01, threads=1, resume=True))
    assert out.exists() and [h.epoch for h in r.history] == [1, 2, 3]
    # Resuming continues the same run: the same weights as an uninterrupted one with the same seed.
    ot.finetune(comp, tmp_path / "straight.onnx", data, config=cfg)
    for a, b in zip(_weights_in_order(onnx.load(out)), _weights_in_order(onnx.load(tmp_path / "straight.onnx")), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


# ---- bad input: one error line, exit != 0, nothing written -----------------------------------------

def _cli(args: list[str]) -> tuple[int, str]:
    from typer.testing import CliRunner

    from onnx_tucker.cli import app

    res = CliRunner().invoke(app, ["finetune", *args])
    return res.exit_code, res.output


@pytest.fixture()
def pair(tmp_path: Path) -> tuple[Path, Path]:
    return _compressed(tmp_path, make_small_cnn(batch="N", low_rank=True))


def _teacher_other_input(tmp_path: Path) -> Path:
    m = make_small_cnn(batch="N", low_rank=True)
    m.graph.input[0].name = "image"
    m.graph.node[0].input[0] = "image"
    return save(m, tmp_path / "other.onnx")


def _teacher_other_classes(tmp_path: Path) -> Path:
    return save(make_small_cnn(batch="N", classes=7), tmp_path / "seven.onnx")


@pytest.mark.parametrize(
    ("case", "code", "needle"),
    [
        ("no_data", 2, "no such file or folder"),
        ("empty_folder", 2, "holds no images"),
        ("npz_shape", 2, "the model expects (3, 16, 16)"),
        ("npz_name", 2, "no array for model input 'x'"),
        ("no_labels_no_teacher", 2, "give --teacher"),
        ("teacher_inputs", 2, "do not match the student's"),
        ("teacher_outputs", 2, "output 'logits' has shape"),
        ("label_range", 2, "out of range"),
        ("unsupported", 1, "Hardmax"),
        ("resume_missing", 2, "no checkpoint"),
        ("out_is_input", 2, "refusing to overwrite"),
        ("bad_option", 2, "--optimizer rmsprop"),
    ],
)
def test_bad_input_one_line_nothing_written(tmp_path: Path, pair: tuple[Path, Path], case: str, code: int, needle: str) -> None:
    orig, comp = pair
    out = tmp_path / "out.onnx"
    data = _npz(tmp_path / "d.npz", n=8)
    args = [str(comp), str(out), "--data", str(data), "--max-steps", "1", "--threads", "1"]
    if case == "no_data":
        args[3] = str(tmp_path / "nowhere")
    elif case == "empty_folder":
        (tmp_path / "empty").mkdir()
        args[3] = str(tmp_path / "empty")
    elif case == "npz_shape":
        args[3] = str(_npz(tmp_path / "s.npz", shape=(3, 12, 12)))
    elif case == "npz_name":
        np.savez(tmp_path / "n.npz", a=np.zeros((4, 3, 16, 16), np.float32), b=np.zeros((4, 2), np.float32))
        args[3] = str(tmp_path / "n.npz")
    elif case == "no_labels_no_teacher":
        args[3] = str(_npz(tmp_path / "u.npz", classes=None))
    elif case == "teacher_inputs":
        args += ["--teacher", str(_teacher_other_input(tmp_path))]
    elif case == "teacher_outputs":
        args += ["--teacher", str(_teacher_other_classes(tmp_path))]
    elif case == "label_range":
        args[3] = str(_npz(tmp_path / "l.npz", classes=50))
    elif case == "unsupported":
        m = onnx.load(comp)
        m.graph.node.append(helper.make_node("Hardmax", ["logits"], ["hm"], name="hm"))
        m.graph.output.append(helper.make_tensor_value_info("hm", TensorProto.FLOAT, ["N", 10]))
        args[0] = str(save(m, tmp_path / "hm.onnx"))
    elif case == "resume_missing":
        args += ["--resume"]
    elif case == "out_is_input":
        args[1] = str(comp)
    elif case == "bad_option":
        args += ["--optimizer", "rmsprop"]
    before = sorted(p.name for p in tmp_path.iterdir())
    rc, output = _cli(args)
    assert rc == code, output
    lines = [ln for ln in output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], output
    after = sorted(p.name for p in tmp_path.iterdir())
    assert after == before  # no OUT, no checkpoint, no temporary file


def test_cuda_asked_for_but_absent(tmp_path: Path, pair: tuple[Path, Path]) -> None:
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    _, comp = pair
    rc, output = _cli([str(comp), str(tmp_path / "o.onnx"), "--data", str(_npz(tmp_path / "d.npz")), "--device", "cuda"])
    assert rc == 2 and "torch sees no CUDA device" in output and not (tmp_path / "o.onnx").exists()


def test_cli_happy_path_reports_epochs(tmp_path: Path, pair: tuple[Path, Path]) -> None:
    import json

    orig, comp = pair
    out, rep = tmp_path / "o.onnx", tmp_path / "r.json"
    rc, output = _cli([str(comp), str(out), "--data", str(_npz(tmp_path / "d.npz")), "--teacher", str(orig),
                       "--epochs", "2", "--optimizer", "adam", "--threads", "1", "--report", str(rep)])
    assert rc == 0, output
    assert "epoch 1/2" in output and "epoch 2/2" in output and "wrote" in output
    full = json.loads(rep.read_text())
    assert list(full) == ["finetune"]  # what `finetune --help` promises for --report
    d = full["finetune"]
    assert d["epochs"] == 2 and len(d["history"]) == 2 and d["mode"] == "labels+distill"
    assert out.exists() and onnx.load(out).graph.output[0].name == "logits"


def test_a_broken_torchvision_is_stubbed(tmp_path: Path) -> None:
    """PyPI's torchvision next to a local CPU torch fails at import; onnx2torch only needs it for NMS/RoiAlign."""
    import subprocess
    import sys

    tv = tmp_path / "site" / "torchvision"
    tv.mkdir(parents=True)
    (tv / "__init__.py").write_text('raise RuntimeError("operator torchvision::nms does not exist")\n')
    save(make_small_cnn(batch="N"), tmp_path / "m.onnx")
    code = ("import onnx; from onnx_tucker.training import convert; "
            f"m, _ = convert.to_torch(onnx.load(r'{tmp_path / 'm.onnx'}'), 'm'); "
            "import torchvision; print('stub' if getattr(torchvision, '__onnx_tucker_stub__', False) else 'real')")
    root = Path(__file__).resolve().parents[1]
    env = {**__import__("os").environ, "PYTHONPATH": f"{tmp_path / 'site'}:{root}"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().endswith("stub")


def test_an_epoch_that_hurts_never_reaches_out(tmp_path: Path) -> None:
    """Held-out labels = the model's own predictions (100 % to start); training labels are wrong on
    purpose, so every epoch is worse and OUT keeps the starting weights (best epoch 0)."""
    model = make_small_cnn(batch="N", low_rank=True)
    src = save(model, tmp_path / "m.onnx")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((96, 3, 16, 16)).astype(np.float32)
    pred = np.argmax(run_ort(model, {"x": x})["logits"], axis=1)
    np.savez(tmp_path / "train.npz", x=x[:64], labels=(pred[:64] + 1) % 10)
    np.savez(tmp_path / "val.npz", x=x[64:], labels=pred[64:])
    cfg = FinetuneConfig(epochs=2, lr=0.05, threads=1, augment=False)
    r = ot.finetune(src, tmp_path / "o.onnx", tmp_path / "train.npz", val_data=tmp_path / "val.npz", config=cfg)
    assert r.accuracy_before == 1.0 and all(h.val_accuracy < 1.0 for h in r.history), r.history
    assert r.best_epoch == 0 and r.accuracy_after == 1.0
    for a, b in zip(_weights_in_order(onnx.load(tmp_path / "o.onnx")), _weights_in_order(model), strict=True):
        np.testing.assert_allclose(a if a.shape == b.shape else a.T, b, rtol=1e-6, atol=1e-7)


def test_the_papers_schedule_divides_the_rate_by_ten(tmp_path: Path) -> None:
    _, comp = _compressed(tmp_path, make_small_cnn(batch="N", low_rank=True))
    cfg = FinetuneConfig(epochs=3, optimizer="sgd", schedule="step", step_epochs=2, threads=1)
    r = ot.finetune(comp, tmp_path / "o.onnx", _npz(tmp_path / "d.npz"), config=cfg)
    assert [h.lr for h in r.history] == pytest.approx([1e-3, 1e-3, 1e-4])


def test_train_factors_needs_a_compressed_model(tmp_path: Path) -> None:
    src = save(make_small_cnn(batch="N"), tmp_path / "m.onnx")
    rc, output = _cli([str(src), str(tmp_path / "o.onnx"), "--data", str(_npz(tmp_path / "d.npz")), "--train", "factors"])
    assert rc == 2 and "has no decomposed layers" in output and not (tmp_path / "o.onnx").exists()


# ---- compress --finetune: the paper's whole pipeline in one run -------------------------------------

def test_compress_finetune_runs_the_whole_pipeline_and_reports_it(tmp_path: Path) -> None:
    """compress -> (calibrate) -> fine-tune -> validate -> write, one command: OUT is the fine-tuned model
    (same node structure as the plain compressed one, weights changed), the report has its section, and no
    temporary file is left beside OUT."""
    import json

    from typer.testing import CliRunner

    from onnx_tucker.cli import app

    src = save(make_small_cnn(batch="N"), tmp_path / "m.onnx")  # full-rank weights: ratio:0.5 loses something
    data = _npz(tmp_path / "d.npz", n=256, classes=None)  # no labels: distillation from the original only
    out, rep, plain = tmp_path / "out.onnx", tmp_path / "r.json", tmp_path / "plain.onnx"
    ot.compress(src, ot.CompressionConfig(ranks=RankPolicy.parse("ratio:0.5"), validate=False), output=plain)
    res = CliRunner().invoke(app, ["compress", str(src), str(out), "--ranks", "ratio:0.5", "--finetune", str(data),
                                   "--teacher-is-original", "--epochs", "2", "--batch-size", "16", "--optimizer", "adam", "--lr", "2e-3",
                                   "--device", "cpu", "--report", str(rep)])
    assert res.exit_code == 0, res.output
    assert "Fine-tuning: distill, 2 epoch(s)" in res.output
    r = json.loads(rep.read_text())
    assert r["finetune"]["epochs"] == 2 and r["finetune"]["mode"] == "distill" and r["finetune"]["best_epoch"] >= 1
    assert r["finetune"]["output_path"] is None and r["model"]["output"] == str(out)
    a, b = onnx.load(out), onnx.load(plain)
    assert torchready.weight_structure(a) == torchready.weight_structure(b)  # the Tucker chains stay
    x = np.random.default_rng(3).standard_normal((4, 3, 16, 16)).astype(np.float32)
    assert not np.allclose(run_ort(a, {"x": x})["logits"], run_ort(b, {"x": x})["logits"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.npz", "m.onnx", "out.onnx", "plain.onnx", "r.json"]


def test_compress_teacher_is_original_needs_finetune(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from onnx_tucker.cli import app

    src = save(make_small_cnn(batch="N"), tmp_path / "m.onnx")
    res = CliRunner().invoke(app, ["compress", str(src), str(tmp_path / "o.onnx"), "--teacher-is-original"])
    assert res.exit_code != 0 and "--finetune" in res.output and not (tmp_path / "o.onnx").exists()


# ---- distributed: torchrun, DistributedDataParallel ------------------------------------------------

@pytest.mark.slow
def test_two_process_cpu_run_under_torchrun(tmp_path: Path) -> None:
    """`torchrun --nproc_per_node 2 -m onnx_tucker.training ...` (gloo on CPU): each process trains on half
    the batches with gradients averaged, one writes OUT and the report, and the result records 2 processes."""
    import json
    import os
    import subprocess
    import sys

    if not torch.distributed.is_available():
        pytest.skip("this torch build has no torch.distributed")
    _, comp = _compressed(tmp_path, make_small_cnn(batch="N", low_rank=True))
    data, out, rep = _npz(tmp_path / "d.npz", n=80), tmp_path / "o.onnx", tmp_path / "r.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           "-m", "onnx_tucker.training", str(comp), str(out), "--data", str(data), "--epochs", "1",
           "--batch-size", "8", "--device", "cpu", "--threads", "1", "--val-split", "0.1", "--report", str(rep)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    d = json.loads(rep.read_text())["finetune"]
    assert d["world_size"] == 2
    assert d["train_samples"] == 72 and d["steps"] == 9 // 2  # 9 batches of 8: 4 per process, the odd one dropped
    assert out.exists() and not list(tmp_path.glob("o.onnx.tmp*"))
    np.testing.assert_allclose(run_ort(onnx.load(out), {"x": np.zeros((2, 3, 16, 16), np.float32)})["logits"].shape, (2, 10))
