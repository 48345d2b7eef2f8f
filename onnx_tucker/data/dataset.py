"""One loader for user data, shared by validate, finetune and calibration.

DATA is one of:
- an image folder with one sub-folder per class (torchvision's ImageFolder layout): labels are the
  indices of the sorted sub-folder names;
- a flat folder of images (no labels);
- an `.npz` with one array per model input (named as the input, or any single array for a
  single-input model), samples on the first axis, and optionally `labels` (int class ids). Float
  arrays are the model's input as they are; integer arrays for a float input are 8-bit pixels and
  need `scale` declared (then as images: times scale / 255, mean / std); integer arrays for an
  integer input pass through. NaN / Inf anywhere is refused up front.

Images are decoded with Pillow, converted to RGB (or to grey when the model takes one channel),
resized to `size` when one is given (otherwise every image must already have the same size: the
model's when its spatial dims are fixed), scaled to [0, `scale`] (default [0, 1]), normalised with
`mean` / `std`, and laid out as NCHW or NHWC. Everything returned is plain numpy: the model is described by its input
names, shapes and dtypes, never by a protobuf.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import Preprocess  # noqa: F401 - defined with the options, used here
from ..errors import UsageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".pbm", ".tif", ".tiff", ".webp", ".gif")

Dim = int | str | None  # a fixed size, or a symbolic / unknown one


@dataclass(frozen=True)
class DataSet:
    """Samples on the first axis of every array; `labels` int64 or None; `classes` the class
    folder names in label order (image-folder layout only)."""

    path: str
    inputs: Mapping[str, np.ndarray]
    labels: np.ndarray | None
    classes: tuple[str, ...] | None = None
    kind: str = "npz"  # npz | classes | flat

    @property
    def count(self) -> int:
        return int(next(iter(self.inputs.values())).shape[0])

    def take(self, index: np.ndarray | slice) -> DataSet:
        return DataSet(
            self.path, {k: v[index] for k, v in self.inputs.items()},
            None if self.labels is None else self.labels[index], self.classes, self.kind,
        )


def load_data(
    path: str | os.PathLike[str],
    input_names: Sequence[str],
    input_shapes: Mapping[str, Sequence[Dim]],
    input_dtypes: Mapping[str, np.dtype] | None = None,
    preprocess: Preprocess | None = None,
    limit: int | None = None,
    option: str = "--data",
) -> DataSet:
    """Load DATA for a model with these inputs (shapes include the batch axis; dims may be None / str)."""
    p = Path(path)
    if not p.exists():
        raise UsageError(f"{option} {p}: no such file or folder; give an image folder or a .npz file")
    if p.is_dir():
        return _load_folder(p, input_names, input_shapes, input_dtypes, preprocess or Preprocess(), limit, option)
    return _load_npz(p, input_names, input_shapes, input_dtypes, preprocess or Preprocess(), limit, option)


# ---- .npz ---------------------------------------------------------------------------------------

_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # a zip with members / an empty zip (np.savez writes zips)
_NPY_MAGIC = b"\x93NUMPY"


def _read_npz(path: Path, option: str) -> dict[str, np.ndarray]:
    """Every array of the archive, or one UsageError line saying what is wrong with the file."""
    import zipfile
    import zlib

    try:
        with open(path, "rb") as f:
            head = f.read(6)
    except FileNotFoundError:
        raise UsageError(f"{option} {path}: no such file") from None
    except OSError as e:
        raise UsageError(f"{option} {path}: cannot read the file ({e.strerror or e}); check its permissions") from None
    if head.startswith(_NPY_MAGIC):
        raise UsageError(f"{option} {path}: a single .npy array, not an .npz archive; save it with "
                         "numpy.savez(FILE, INPUT_NAME=array)")
    if not head.startswith(_ZIP_MAGIC):
        # Checked here: numpy would take any other bytes for a pickle and advise allow_pickle.
        raise UsageError(f"{option} {path}: not a readable .npz file (not a zip archive); save one with numpy.savez")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with np.load(str(path), allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
    except ValueError as e:
        if "pickle" in str(e):
            raise UsageError(f"{option} {path}: an array holds Python objects, not numbers; "
                             "save numeric arrays with numpy.savez") from None
        raise UsageError(f"{option} {path}: a damaged .npz file ({_one_line(e)}); write it again with numpy.savez") from None
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, KeyError) as e:
        raise UsageError(f"{option} {path}: a truncated or damaged .npz file ({_one_line(e)}); "
                         "write it again with numpy.savez") from None


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:120] or type(e).__name__


def _pixels(a: np.ndarray, key: str, name: str, shape: Sequence[Dim], pre: Preprocess, path: Path, option: str,
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
            axis = 1 if _layout(shape, pre) == "nchw" else 3
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


def _check_finite(a: np.ndarray, key: str, path: Path, option: str) -> None:
    """NaN / Inf in the data would surface later as a diverged loss or a numerics error far from the cause."""
    if a.dtype.kind not in "fc":
        return
    bad = ~np.isfinite(a)
    if bad.any():
        nan = int(np.isnan(a).sum())
        raise UsageError(
            f"{option} {path}: array '{key}' has {nan:,} NaN and {int(bad.sum()) - nan:,} Inf value(s) "
            f"(of {a.size:,}), in {int(bad.reshape(len(a), -1).any(axis=1).sum()) if a.ndim else 1} sample(s); "
            "fix or drop those samples"
        )


def _load_npz(
    path: Path, names: Sequence[str], shapes: Mapping[str, Sequence[Dim]], dtypes: Mapping[str, np.dtype] | None,
    pre: Preprocess, limit: int | None, option: str,
) -> DataSet:
    arrays = _read_npz(path, option)
    labels = arrays.pop("labels", None)
    keys = {n: n for n in names}  # model input -> its array's name in the file
    if len(names) == 1 and names[0] not in arrays and len(arrays) == 1:
        keys = {names[0]: next(iter(arrays))}
        arrays = {names[0]: next(iter(arrays.values()))}
    missing = [n for n in names if n not in arrays]
    if missing:
        raise UsageError(
            f"{option} {path}: no array for model input '{missing[0]}'; the file has {sorted(arrays) or 'none'}: "
            "name one array per input (and optionally 'labels')"
        )
    counts = {arrays[n].shape[0] if arrays[n].ndim else 0 for n in names}
    if len(counts) != 1 or 0 in counts or (labels is not None and labels.shape[0] not in counts):
        raise UsageError(f"{option} {path}: arrays (and labels) must share the same non-zero first axis (samples)")
    if labels is not None and (labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer)):
        raise UsageError(f"{option} {path}: 'labels' must be a 1-D array of integer class ids")
    inputs = {}
    for n in names:
        a = arrays[n][:limit]
        want = dtypes.get(n) if dtypes else None
        if a.dtype.kind not in "biuf":
            raise UsageError(f"{option} {path}: array '{keys[n]}' is {a.dtype}, not numbers; save numeric arrays")
        if want is not None and a.dtype.kind in "biu" and np.dtype(want).kind == "f":
            a = _pixels(a, keys[n], n, shapes.get(n, ()), pre, path, option, np.dtype(want))
        else:
            # Integer data for an integer input (token ids, indices) is passed through as it is.
            _check_finite(a, keys[n], path, option)
            a = a.astype(want, copy=False) if want is not None else a
        inputs[n] = a
    return DataSet(str(path), inputs, None if labels is None else labels[:limit].astype(np.int64), None, "npz")


# ---- image folders ------------------------------------------------------------------------------


def _images_in(folder: Path) -> list[Path]:
    return sorted(f for f in folder.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)


def _layout(shape: Sequence[Dim], pre: Preprocess) -> str:
    if pre.layout != "auto":
        return pre.layout
    if len(shape) == 4 and shape[1] not in (1, 3, 4) and shape[3] in (1, 3, 4):
        return "nhwc"
    return "nchw"


def _load_folder(
    folder: Path,
    names: Sequence[str],
    shapes: Mapping[str, Sequence[Dim]],
    dtypes: Mapping[str, np.dtype] | None,
    pre: Preprocess,
    limit: int | None,
    option: str,
) -> DataSet:
    if len(names) != 1:
        raise UsageError(
            f"{option} {folder}: an image folder feeds one input but the model has {len(names)} "
            f"({', '.join(names)}); give a .npz with one array per input"
        )
    name = names[0]
    shape = list(shapes[name])
    if len(shape) not in (3, 4):
        raise UsageError(
            f"{option} {folder}: model input '{name}' has {len(shape)} dims; images need a 4-D "
            "(N,C,H,W / N,H,W,C) or 3-D (N,H,W) input: give a .npz instead"
        )
    try:
        entries = sorted(folder.iterdir())
    except OSError as e:
        raise UsageError(f"{option} {folder}: cannot list the folder ({e.strerror or e}); check its permissions") from None
    subdirs = [e for e in entries if e.is_dir() and not e.name.startswith(".")]
    files = [e for e in entries if e.is_file() and e.suffix.lower() in IMAGE_EXTENSIONS]
    if subdirs and files:
        raise UsageError(
            f"{option} {folder}: mixes images and sub-folders; use one sub-folder per class, or a flat folder of images"
        )
    if subdirs:
        paths: list[Path] = []
        labels: list[int] = []
        for k, sub in enumerate(subdirs):
            imgs = _images_in(sub)
            if not imgs:
                raise UsageError(
                    f"{option} {sub}: class folder '{sub.name}' holds no images ({', '.join(IMAGE_EXTENSIONS[:5])}, ...); "
                    "add images or remove the folder"
                )
            paths += imgs
            labels += [k] * len(imgs)
        classes: tuple[str, ...] | None = tuple(s.name for s in subdirs)
        kind = "classes"
    elif files:
        paths, labels, classes, kind = files, [], None, "flat"
    else:
        raise UsageError(f"{option} {folder}: the folder holds no images and no class sub-folders; check the path")
    if limit is not None and limit < len(paths):
        # An even spread over the classes, not the first class only.
        pick = np.linspace(0, len(paths) - 1, limit).round().astype(int) if kind == "classes" else np.arange(limit)
        paths = [paths[i] for i in pick]
        labels = [labels[i] for i in pick] if labels else []
    layout = _layout(shape, pre)
    if len(shape) == 3:
        channels: Dim = 1
        hw = shape[1:3]
    elif layout == "nchw":
        channels, hw = shape[1], shape[2:4]
    else:
        channels, hw = shape[3], shape[1:3]
    if isinstance(channels, int) and channels not in (1, 3, 4):
        raise UsageError(
            f"{option} {folder}: model input '{name}' has {channels} channels ({layout}); images give 1 or 3: "
            "check --layout, or give a .npz"
        )
    mode = "L" if channels == 1 else ("RGBA" if channels == 4 else "RGB")
    target = pre.size
    fixed = tuple(int(d) for d in hw if isinstance(d, int)) if all(isinstance(d, int) and d > 0 for d in hw) else None
    if target is not None and fixed is not None and tuple(target) != fixed:
        raise UsageError(f"{option} {folder}: --size {target[0]},{target[1]} but model input '{name}' is {fixed[0]}x{fixed[1]}")
    if pre.crop is not None and fixed is not None and tuple(pre.crop) != fixed:
        raise UsageError(f"{option} {folder}: --crop {pre.crop[0]},{pre.crop[1]} but model input '{name}' is "
                         f"{fixed[0]}x{fixed[1]}; crop to {fixed[0]},{fixed[1]}")
    x = _decode(paths, mode, target, fixed, option, pre)
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
    elif layout == "nchw":
        x = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    dtype = dtypes.get(name, np.dtype(np.float32)) if dtypes else np.dtype(np.float32)
    return DataSet(str(folder), {name: x.astype(dtype, copy=False)},
                   np.asarray(labels, np.int64) if kind == "classes" else None, classes, kind)


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


def _decode(paths: list[Path], mode: str, target: tuple[int, int] | None, fixed: tuple[int, ...] | None,
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
