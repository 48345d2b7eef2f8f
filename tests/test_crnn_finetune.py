"""A CRNN (convs -> bidirectional LSTM -> per-step class scores [T, N, C]) through compress and finetune
(issue 20's CRNN figure): the time-first output is distilled by KL per time step, not the scale-free MSE;
validation on data joins its batches on the output's batch axis; the LSTM's default zero state as torch's exporter writes it (Shape -> ... -> ConstantOfShape) does not
pin the batch, and the fine-tuned export keeps the batch dynamic on the output's axis 1. Tiny model,
torch-exported as a real CRNN would be: seconds."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnx
import pytest

from tests.helpers import run_ort

torch = pytest.importorskip("torch")
if importlib.util.find_spec("onnx2torch") is None:
    pytest.skip("onnx2torch is not installed (pip install -e '.[finetune]')", allow_module_level=True)

import onnx_tucker as ot  # noqa: E402
from onnx_tucker.config import RankPolicy  # noqa: E402
from onnx_tucker.graph import torchready  # noqa: E402
from onnx_tucker.training import FinetuneConfig  # noqa: E402
from onnx_tucker.training.train import loss_terms, sequence_outputs  # noqa: E402

torch.set_num_threads(1)
CLASSES, STEPS = 7, 8


class _Crnn(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        c = torch.nn
        self.cnn = c.Sequential(c.Conv2d(1, 16, 3, padding=1), c.ReLU(), c.MaxPool2d(2, 2),
                                c.Conv2d(16, 32, 3, padding=1), c.ReLU(), c.MaxPool2d((4, 1), (4, 1)),
                                c.Conv2d(32, 32, 3, padding=1), c.ReLU(), c.MaxPool2d((2, 1), (2, 1)))
        self.rnn = c.LSTM(32, 12, bidirectional=True)
        self.fc = c.Linear(24, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.cnn(x).squeeze(2).permute(2, 0, 1)  # [N, C, 1, T] -> [T, N, C]
        return self.fc(self.rnn(f)[0])


def _crnn(path: Path) -> Path:
    torch.manual_seed(0)
    net = _Crnn().eval()
    torch.onnx.export(net, (torch.randn(1, 1, 16, 2 * STEPS),), str(path), dynamo=False, opset_version=17,
                      input_names=["image"], output_names=["logits"],
                      dynamic_axes={"image": {0: "N"}, "logits": {1: "N"}})
    return path


def test_sequence_outputs_are_the_time_first_class_scores() -> None:
    shapes = {"x": ["N", 1, 32, 128], "seq": [32, "N", 37], "boxes": ["N", 84, 8400], "cls": ["N", 10],
              "one": [32, "N", 1]}
    outs = ["seq", "boxes", "cls", "one"]
    assert torchready.batch_axes(shapes, ["x"], outs) == {"seq": 1, "boxes": 0, "cls": 0, "one": 1}
    assert sequence_outputs(shapes, ["x"], outs) == frozenset({0})
    # No symbol on the input: the output's only dynamic dim is its batch.
    assert torchready.batch_axes({"x": [None, 3], "y": [5, None, 4]}, ["x"], ["y"]) == {"y": 1}
    assert torchready.batch_axes({"x": [1, 3], "y": [1, None, 4]}, ["x"], ["y"]) == {"y": 0}  # a static batch


def test_a_sequence_is_distilled_by_kl_per_time_step() -> None:
    rng = np.random.default_rng(0)
    t = rng.standard_normal((STEPS, 3, CLASSES)).astype(np.float32)
    s = rng.standard_normal((STEPS, 3, CLASSES)).astype(np.float32)
    cfg = FinetuneConfig(temperature=2.0)
    got = float(loss_terms([torch.from_numpy(s)], [torch.from_numpy(t)], None, cfg, None, sequences=frozenset({0})))

    def log_softmax(z: np.ndarray) -> np.ndarray:
        z = z.astype(np.float64) / 2.0
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))

    lt, ls = log_softmax(t), log_softmax(s)
    want = float((np.exp(lt) * (lt - ls)).sum(-1).mean()) * 4.0  # mean over steps and samples, x T^2
    assert got == pytest.approx(want, rel=1e-5)
    mse = float(loss_terms([torch.from_numpy(s)], [torch.from_numpy(t)], None, cfg, None))
    assert mse == pytest.approx(float(np.mean((s - t) ** 2) / np.mean(t**2)), rel=1e-5)  # not a sequence: as before


def test_crnn_compresses_finetunes_and_keeps_a_dynamic_batch(tmp_path: Path) -> None:
    orig = _crnn(tmp_path / "crnn.onnx")
    x = np.random.default_rng(1).random((96, 1, 16, 2 * STEPS)).astype(np.float32)
    data = tmp_path / "lines.npz"
    np.savez(data, image=x)
    comp = tmp_path / "c.onnx"
    ot.compress(orig, ot.CompressionConfig(ranks=RankPolicy.parse("ratio:0.5"), validate=False), output=comp)
    # Validation on data joins its batches (256 + 44 here) on the output's batch axis, 1, not on time.
    many = tmp_path / "many.npz"
    np.savez(many, image=np.random.default_rng(2).random((300, 1, 16, 2 * STEPS)).astype(np.float32))
    rep = ot.validate(orig, comp, ot.ValidationConfig(data=str(many)))
    assert [o.shape for o in rep.outputs] == [(STEPS, 300, CLASSES)] and rep.samples == 300
    out = tmp_path / "ft.onnx"
    cfg = FinetuneConfig(epochs=2, optimizer="adam", lr=2e-3, batch_size=16, augment=False, use_labels=False,
                         val_split=0.25, threads=1)
    r = ot.finetune(comp, out, data, teacher=orig, config=cfg)
    assert r.mode == "distill"
    assert all(h.val_loss is not None and 0 < h.val_loss < 1 for h in r.history)  # a per-step KL: small
    model = onnx.load(out)
    assert [n.op_type for n in model.graph.node].count("LSTM") == 1
    assert torchready.io_shapes(model)["logits"][1] == "batch"  # the batch on the output's axis 1, T fixed
    for n in (1, 5, 17):  # batches other than the traced one run, and equal the trained model's outputs
        feeds = {"image": x[:n]}
        got = run_ort(model, feeds)["logits"]
        assert got.shape == (STEPS, n, CLASSES)
        one = np.concatenate([run_ort(model, {"image": x[i : i + 1]})["logits"] for i in range(n)], axis=1)
        np.testing.assert_allclose(got, one, rtol=1e-4, atol=1e-5)
    # Distillation moved the student towards the teacher on the held-out inputs' per-step distributions.
    t, s0, s1 = (run_ort(onnx.load(p), {"image": x[-24:]})["logits"] for p in (orig, comp, out))
    top = t.argmax(2)
    assert (s1.argmax(2) == top).mean() >= (s0.argmax(2) == top).mean()
