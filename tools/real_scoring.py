"""Scoring for the real-model benchmark (tools/bench_real.py), exactly as ../shared/data/README.md
defines it, kept apart so tests and other tools can import it (numpy and Pillow only; scikit-image
only for its sample photos, imported when they are asked for).

Classifiers: top-k accuracy from logits and top-1 agreement between two models' logits. A label is
in the top k when fewer than k classes score strictly higher than it (ties count for the label,
so the result does not depend on how a sort breaks them).

Super-resolution (the waifu2x x2 model): the high-resolution reference is the photo cropped to even
height and width; the low-resolution input its bicubic x1/2 downscale (Pillow); the input is padded
by 7 pixels on each side (edge replicate), run, the centre 2h x 2w of the output kept and clipped to
[0, 1]. Score: PSNR on BT.601 luma in studio range (Y = 16 + 65.481 R + 128.553 G + 24.966 B for
RGB in [0, 1], peak 255), a 4-pixel border ignored, averaged over the five scikit-image photos. With
these definitions the shared model scores 35.28 dB and plain bicubic upscaling 32.85 dB, the
README's figures (the full-range luma 0.299 R + 0.587 G + 0.114 B would give 33.96 dB, resizing
before cropping to even sizes 34.28 dB).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

SUPERRES_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry")
SUPERRES_PAD = 7  # pixels of edge-replicate padding on each side of the low-resolution input
SUPERRES_BORDER = 4  # pixels of the x2 result left out of the PSNR on each side
SUPERRES_PSNR_DB = 35.28  # the shared model's score (README), which the benchmark reproduces
BICUBIC_PSNR_DB = 32.85

_BT601 = np.array([65.481, 128.553, 24.966])


# ---- classifiers --------------------------------------------------------------------------------


def topk_hits(logits: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """Per sample: is its label among the k highest scores (fewer than k classes strictly higher)?"""
    logits = np.asarray(logits)
    labels = np.asarray(labels, dtype=np.int64)
    if logits.ndim != 2 or labels.shape != (logits.shape[0],):
        raise ValueError(f"logits {logits.shape} and labels {labels.shape}: need (N, C) and (N,)")
    own = logits[np.arange(len(labels)), labels]
    return np.sum(logits > own[:, None], axis=1) < k


def topk_accuracy(logits: np.ndarray, labels: np.ndarray, k: int = 1) -> float:
    return float(np.mean(topk_hits(logits, labels, k))) if len(labels) else float("nan")


def top1_agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Fraction of samples on which two models' highest-scoring classes are the same."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"logits {a.shape} and {b.shape}: need two (N, C) arrays of one shape")
    return float(np.mean(np.argmax(a, axis=1) == np.argmax(b, axis=1))) if len(a) else float("nan")


# ---- super-resolution ---------------------------------------------------------------------------


def luma_bt601(rgb: np.ndarray) -> np.ndarray:
    """BT.601 studio-range luma (16..235 on a 0..255 scale) of RGB in [0, 1], channels last."""
    rgb = np.asarray(rgb, dtype=np.float64)
    if rgb.shape[-1] != 3:
        raise ValueError(f"image of shape {rgb.shape}: need RGB with channels last")
    return 16.0 + rgb @ _BT601


def psnr_y(result: np.ndarray, reference: np.ndarray, border: int = SUPERRES_BORDER) -> float:
    """PSNR (dB, peak 255) of the luma of `result` against `reference` (both H x W x 3 RGB in [0, 1]),
    `border` pixels left out on each side. Identical images give inf."""
    if np.shape(result) != np.shape(reference):
        raise ValueError(f"result {np.shape(result)} and reference {np.shape(reference)} differ in shape")
    ya, yb = luma_bt601(result), luma_bt601(reference)
    if border:
        ya, yb = ya[border:-border, border:-border], yb[border:-border, border:-border]
    mse = float(np.mean((ya - yb) ** 2))
    return float("inf") if mse == 0 else 10.0 * float(np.log10(255.0**2 / mse))


def superres_pair(photo: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(low-resolution input, high-resolution reference), both uint8 H x W x 3: the photo cropped to
    even sides, and its bicubic x1/2 downscale with Pillow."""
    from PIL import Image

    photo = np.asarray(photo)
    if photo.ndim == 2:
        photo = np.stack([photo] * 3, axis=-1)
    photo = np.ascontiguousarray(photo[..., :3], dtype=np.uint8)
    h, w = photo.shape[0] // 2, photo.shape[1] // 2
    hr = np.ascontiguousarray(photo[: 2 * h, : 2 * w])
    lr = np.asarray(Image.fromarray(hr).resize((w, h), Image.Resampling.BICUBIC))
    return lr, hr


def superres_input(lr: np.ndarray, pad: int = SUPERRES_PAD) -> np.ndarray:
    """The model input of a uint8 low-resolution image: [1, 3, h + 2 pad, w + 2 pad] float32 in [0, 1]."""
    x = np.asarray(lr, dtype=np.float32) / 255.0
    x = np.pad(x, ((pad, pad), (pad, pad), (0, 0)), mode="edge")
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])


def superres_output(y: np.ndarray, h: int, w: int) -> np.ndarray:
    """The centre 2h x 2w of a model output [1, 3, H, W], clipped to [0, 1], as H x W x 3."""
    y = np.asarray(y)
    if y.ndim != 4 or y.shape[0] != 1 or y.shape[1] != 3 or y.shape[2] < 2 * h or y.shape[3] < 2 * w:
        raise ValueError(f"output of shape {y.shape}: need [1, 3, >= {2 * h}, >= {2 * w}]")
    top, left = (y.shape[2] - 2 * h) // 2, (y.shape[3] - 2 * w) // 2
    return np.clip(y[0, :, top : top + 2 * h, left : left + 2 * w].transpose(1, 2, 0), 0.0, 1.0)


def upscale(run: Callable[[np.ndarray], np.ndarray], lr: np.ndarray) -> np.ndarray:
    """The x2 result (2h x 2w x 3 in [0, 1]) of a model `run(input) -> output` on a uint8 image."""
    h, w = lr.shape[:2]
    return superres_output(run(superres_input(lr)), h, w)


def superres_photos(names: Sequence[str] = SUPERRES_PHOTOS) -> list[tuple[str, np.ndarray]]:
    """The scikit-image sample photos (shipped in its wheel: `pip install scikit-image`)."""
    try:
        import skimage.data
    except ImportError as e:
        raise SystemExit("the super-resolution score needs scikit-image's sample photos: pip install scikit-image") from e
    return [(n, np.asarray(getattr(skimage.data, n)())) for n in names]


def superres_psnr(run: Callable[[np.ndarray], np.ndarray],
                  photos: Sequence[tuple[str, np.ndarray]] | None = None) -> tuple[float, dict[str, float]]:
    """(mean PSNR, PSNR per photo) of a x2 model over the photos (default: the README's five)."""
    per: dict[str, float] = {}
    for name, photo in superres_photos() if photos is None else photos:
        lr, hr = superres_pair(photo)
        per[name] = psnr_y(upscale(run, lr), hr.astype(np.float64) / 255.0)
    return float(np.mean(list(per.values()))), per


def bicubic_psnr(photos: Sequence[tuple[str, np.ndarray]] | None = None) -> tuple[float, dict[str, float]]:
    """The same score for plain bicubic x2 upscaling (Pillow): the floor a network must beat."""
    from PIL import Image

    per: dict[str, float] = {}
    for name, photo in superres_photos() if photos is None else photos:
        lr, hr = superres_pair(photo)
        up = Image.fromarray(lr).resize((hr.shape[1], hr.shape[0]), Image.Resampling.BICUBIC)
        per[name] = psnr_y(np.asarray(up, dtype=np.float64) / 255.0, hr.astype(np.float64) / 255.0)
    return float(np.mean(list(per.values()))), per
