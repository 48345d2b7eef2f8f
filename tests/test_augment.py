"""Training-time augmentation for distillation on few images (issue 20's Darknet task): random resized
crops (`--crop-scale`) against torch's bilinear resize, mixup (`--mixup`) of inputs and of the
labelled loss, and the options' refusals."""

from __future__ import annotations

import numpy as np
import pytest

from onnx_tucker.errors import UsageError
from onnx_tucker.training import FinetuneConfig
from onnx_tucker.training.train import Batches, _interpolation, _resized_crops

torch = pytest.importorskip("torch")
torch.set_num_threads(1)


@pytest.mark.parametrize("n", [1, 7, 32])
def test_interpolation_over_the_whole_axis_is_the_identity(n: int) -> None:
    np.testing.assert_allclose(_interpolation(n, 0, n, n), np.eye(n, dtype=np.float32), atol=1e-6)


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("shape", [(24, 24), (20, 33)])
def test_resized_crop_equals_torch_bilinear_of_the_crop(layout: str, shape: tuple[int, int]) -> None:
    h, w = shape
    rng = np.random.default_rng(3)
    x = rng.standard_normal((4, 3, h, w)).astype(np.float32)
    xin = x if layout == "nchw" else x.transpose(0, 2, 3, 1).copy()
    out = _resized_crops(xin, layout, np.random.default_rng(11), 0.2)
    out = out if layout == "nchw" else out.transpose(0, 3, 1, 2)
    # Replay the draws to find each crop, then resize it with torch.
    r = np.random.default_rng(11)
    import math

    for i in range(len(x)):
        ch, cw = h, w
        for _ in range(10):
            area = h * w * r.uniform(0.2, 1.0)
            aspect = math.exp(r.uniform(math.log(3 / 4), math.log(4 / 3)))
            tw, th = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            if 0 < tw <= w and 0 < th <= h:
                ch, cw = th, tw
                break
        y0, x0 = int(r.integers(0, h - ch + 1)), int(r.integers(0, w - cw + 1))
        flip = r.random() < 0.5
        crop = torch.from_numpy(x[i : i + 1, :, y0 : y0 + ch, x0 : x0 + cw].copy())
        ref = torch.nn.functional.interpolate(crop, size=(h, w), mode="bilinear", align_corners=False)[0].numpy()
        if flip:
            ref = ref[:, :, ::-1]
        np.testing.assert_allclose(out[i], ref, atol=1e-5)
        assert (ch, cw) != (h, w) or i >= 0  # a real crop was drawn at least sometimes (checked below)
    assert not np.allclose(out, x) and not np.allclose(out, x[..., ::-1])


def test_resized_crop_of_the_whole_square_image_is_it_or_its_mirror() -> None:
    x = np.random.default_rng(0).standard_normal((6, 2, 16, 16)).astype(np.float32)
    out = _resized_crops(x, "nchw", np.random.default_rng(1), 1.0)
    for a, b in zip(out, x, strict=True):
        assert np.allclose(a, b, atol=1e-6) or np.allclose(a, b[:, :, ::-1], atol=1e-6)


def test_mixup_mixes_every_float_input_alike_and_reports_how() -> None:
    rng = np.random.default_rng(0)
    a = rng.standard_normal((10, 3, 8, 8)).astype(np.float32)
    b = rng.standard_normal((10, 5)).astype(np.float32)
    ids = np.arange(10, dtype=np.int64)[:, None]
    labels = np.arange(10) % 3
    batches = Batches({"a": a, "b": b, "ids": ids}, labels, 10, {"a": None, "b": None, "ids": None}, mixup=1.0)
    (xs, ys, mix), = list(batches.iterate(np.random.default_rng(5), True))
    assert mix is not None
    perm, lam = mix
    order = ys  # labels are arange % 3: recover the batch order from the int ids instead
    src = xs["ids"][:, 0]
    np.testing.assert_array_equal(labels[src], order)
    np.testing.assert_allclose(xs["a"], lam * a[src] + (1 - lam) * a[src][perm], atol=1e-6)
    np.testing.assert_allclose(xs["b"], lam * b[src] + (1 - lam) * b[src][perm], atol=1e-6)
    # without augmentation (evaluation) nothing is mixed
    (xs2, _, mix2), = list(batches.iterate(None, False))
    assert mix2 is None and np.array_equal(xs2["a"], a)


def test_mixed_labelled_loss_is_the_weighted_pair_of_cross_entropies() -> None:
    from onnx_tucker.training.train import loss_terms

    logits = torch.randn(6, 4)
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    perm = torch.tensor([5, 4, 3, 2, 1, 0])
    cfg = FinetuneConfig(threads=1)
    got = loss_terms([logits], None, y, cfg, 0, (perm, 0.3))
    F = torch.nn.functional
    want = 0.3 * F.cross_entropy(logits, y) + 0.7 * F.cross_entropy(logits, y[perm])
    assert float(abs(got - want)) < 1e-6
    assert float(abs(got - F.cross_entropy(logits, y))) > 1e-4


@pytest.mark.parametrize("kw, flag", [({"crop_scale": 0.0}, "--crop-scale"), ({"crop_scale": 1.5}, "--crop-scale"),
                                      ({"mixup": -1.0}, "--mixup"), ({"mixup": float("nan")}, "--mixup")])
def test_bad_augmentation_options_are_refused(kw: dict[str, float], flag: str) -> None:
    with pytest.raises(UsageError, match=flag):
        FinetuneConfig(**kw)  # type: ignore[arg-type]
