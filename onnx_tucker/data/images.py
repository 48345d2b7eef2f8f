"""Preprocessing: what a pixel becomes (8-bit pixels from images or from an .npz -> the model's
float input: resize, shorter side, centre crop, channel order, scale, mean / std, NCHW / NHWC), as
`config.Preprocess` declares it. Images are decoded with Pillow, imported only when there are any."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..config import Preprocess
from ..errors import UsageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".pbm", ".tif", ".tiff", ".webp", ".gif")

Dim = int | str | None  # a fixed size, or a symbolic / unknown one


def layout_of(shape: Sequence[Dim], pre: Preprocess) -> str:
    if pre.layout != "auto":
        return pre.layout
    if len(shape) == 4 and shape[1] not in (1, 3, 4) and shape[3] in (1, 3, 4):
        return "nhwc"
    return "nchw"


def pixels_to_input(a: np.ndarray, key: str, name: str, shape: Sequence[Dim], pre: Preprocess, path: Path, option: str,
            dtype: np.dtype) -> np.ndarray:
    """Integer .npz pixels (0-255) -> float model input: times scale / 255, then mean / std per channel."""
    if pre.scale is None:
        raise UsageError(
            f"{option} {path}: array '{key}' holds integers ({a.dtype}) but model input '{name}' takes {dtype}; "
            "declare what a pixel of 255 becomes with --scale 1 (pixels / 255) or --scale 255 (raw 0-255), "
            "or save float arrays that are already the model's input"
        )
    if a.size and (int(a.min()) < 0 or int(a.max()) > 255):
        raise UsageError(
            f"{option} {path}: array '{key}' ({a.dtype}) has values from {int(a.min())} to {int(a.max())}, "
            "not 8-bit pixels (0-255) that --scale reads; save float arrays that are already the model's input"
        )
    x = a.astype(np.float32) * np.float32(pre.pixel_scale / 255.0)
    if pre.mean is not None or pre.std is not None:
        if a.ndim == 4:
            axis = 1 if layout_of(shape, pre) == "nchw" else 3
        elif a.ndim == 3:  # N, H, W: one channel
            axis = None
        else:
            raise UsageError(f"{option} {path}: array '{key}' has {a.ndim} dims; --mean / --std need images "
                             "(N,C,H,W, N,H,W,C or N,H,W)")
        nch = 1 if axis is None else a.shape[axis]
        for what, v in (("--mean", pre.mean), ("--std", pre.std)):
            if v is not None and len(v) not in (1, nch):
                raise UsageError(f"{what} has {len(v)} values but array '{key}' of {path} has {nch} channels; give 1 or {nch}")
        bshape = [1] * a.ndim
        if axis is not None:
            bshape[axis] = -1
        if pre.mean is not None:
            x -= np.asarray(pre.mean, np.float32).reshape(bshape)
        if pre.std is not None:
            x /= np.asarray(pre.std, np.float32).reshape(bshape)
    return x.astype(dtype, copy=False)


def normalise_images(x: np.ndarray, shape: Sequence[Dim], pre: Preprocess, dtype: np.dtype) -> np.ndarray:
    """Decoded N x H x W x C pixels (0-255, float32) -> the model's input: scale, mean / std, layout, dtype."""
    x *= np.float32(pre.pixel_scale / 255.0)
    nch = x.shape[3]
    for what, v in (("--mean", pre.mean), ("--std", pre.std)):
        if v is not None and len(v) not in (1, nch):
            raise UsageError(f"{what} has {len(v)} values but the images have {nch} channels; give 1 or {nch}")
    if pre.mean is not None:
        x -= np.asarray(pre.mean, np.float32)
    if pre.std is not None:
        x /= np.asarray(pre.std, np.float32)
    if len(shape) == 3:
        x = x[..., 0]
    elif layout_of(shape, pre) == "nchw":
        x = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    return x.astype(dtype, copy=False)


def _shorter_to(im, n: int):  # type: ignore[no-untyped-def]
    """The shorter side to n, the longer in proportion (truncated, as torchvision's Resize(n))."""
    from PIL import Image

    w, h = im.size
    size = (n, int(n * h / w)) if w <= h else (int(n * w / h), n)
    return im if size == (w, h) else im.resize(size, Image.Resampling.BILINEAR)


def _centre_crop(im, crop: tuple[int, int], p: Path, option: str):  # type: ignore[no-untyped-def]
    w, h = im.size
    ch, cw = crop
    if ch > h or cw > w:
        raise UsageError(f"{option} {p}: image is {h}x{w}, smaller than --crop {ch},{cw}; "
                         "resize it first with --resize-shorter, or crop less")
    top, left = int(round((h - ch) / 2.0)), int(round((w - cw) / 2.0))  # torchvision's CenterCrop
    return im.crop((left, top, left + cw, top + ch))


def decode_images(paths: list[Path], mode: str, target: tuple[int, int] | None, fixed: tuple[int, ...] | None,
            option: str, pre: Preprocess | None = None) -> np.ndarray:
    """N x H x W x C float32 pixels, 0-255."""
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:
        raise UsageError(f"{option}: reading images needs Pillow; pip install pillow (or give a .npz)") from None
    out: np.ndarray | None = None
    first: Path | None = None
    for i, p in enumerate(paths):
        try:
            with Image.open(p) as im:
                im = im.convert(mode)
                if target is not None and im.size != (target[1], target[0]):
                    im = im.resize((target[1], target[0]), Image.Resampling.BILINEAR)
                if pre is not None and pre.resize_shorter is not None:
                    im = _shorter_to(im, pre.resize_shorter)
                if pre is not None and pre.crop is not None:
                    im = _centre_crop(im, pre.crop, p, option)
                a = np.asarray(im, dtype=np.uint8)
                if pre is not None and pre.channel_order == "bgr" and a.ndim == 3 and a.shape[2] >= 3:
                    a = a[:, :, [2, 1, 0, *range(3, a.shape[2])]]
        except (UnidentifiedImageError, OSError, ValueError) as e:
            why = "not an image Pillow can read" if isinstance(e, UnidentifiedImageError) else (str(e) or type(e).__name__)
            raise UsageError(f"{option} {p}: unreadable image ({why}); remove or replace the file") from None
        if a.ndim == 2:
            a = a[:, :, None]
        if out is None:
            if target is None and fixed is not None and a.shape[:2] != fixed:
                raise UsageError(
                    f"{option} {p}: image is {a.shape[0]}x{a.shape[1]} but the model takes {fixed[0]}x{fixed[1]}; "
                    f"resize with --size {fixed[0]},{fixed[1]}"
                )
            out = np.empty((len(paths), *a.shape), np.float32)
            first = p
        elif a.shape != out.shape[1:]:
            raise UsageError(
                f"{option} {p}: image is {a.shape[0]}x{a.shape[1]}, {first} is {out.shape[1]}x{out.shape[2]}; "
                "resize them all with --size H,W"
            )
        out[i] = a
    assert out is not None
    return out
