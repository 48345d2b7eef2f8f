"""One loader for user data, shared by validate, finetune and calibration.

DATA is one of:
- an image folder with one sub-folder per class (torchvision's ImageFolder layout): labels are the
  indices of the sorted sub-folder names;
- a flat folder of images (no labels);
- an `.npz` with one array per model input (named as the input, or any single array for a
  single-input model), samples on the first axis, and optionally `labels` (int class ids).

Images are decoded with Pillow, converted to RGB (or to grey when the model takes one channel),
resized to `size` when one is given (otherwise every image must already have the same size: the
model's when its spatial dims are fixed), scaled to [0, 1], normalised with `mean` / `std`, and
laid out as NCHW or NHWC. Everything returned is plain numpy: the model is described by its input
names, shapes and dtypes, never by a protobuf.
"""

from __future__ import annotations

import os
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


def parse_floats(text: str | None, option: str) -> tuple[float, ...] | None:
    if text is None or text == "":
        return None
    try:
        return tuple(float(v) for v in text.replace(" ", "").split(","))
    except ValueError:
        raise UsageError(f"{option} {text}: not a comma-separated list of numbers, e.g. 0.485,0.456,0.406") from None


def parse_size(text: str | None) -> tuple[int, int] | None:
    if text is None or text == "":
        return None
    try:
        v = [int(s) for s in text.replace("x", ",").split(",")]
    except ValueError:
        raise UsageError(f"--size {text}: not a size; give N or H,W (e.g. 32 or 224,224)") from None
    if len(v) == 1:
        v = v * 2
    if len(v) != 2 or min(v) < 1:
        raise UsageError(f"--size {text}: give N or H,W with positive numbers")
    return (v[0], v[1])


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
    return _load_npz(p, input_names, input_dtypes, limit, option)


# ---- .npz ---------------------------------------------------------------------------------------


def _load_npz(
    path: Path, names: Sequence[str], dtypes: Mapping[str, np.dtype] | None, limit: int | None, option: str
) -> DataSet:
    try:
        with np.load(str(path), allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except FileNotFoundError:
        raise UsageError(f"{option} {path}: no such file") from None
    except (OSError, ValueError) as e:
        raise UsageError(f"{option} {path}: not a readable .npz file ({e}); save one with numpy.savez") from None
    labels = arrays.pop("labels", None)
    if len(names) == 1 and names[0] not in arrays and len(arrays) == 1:
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
        inputs[n] = a.astype(dtypes[n], copy=False) if dtypes and n in dtypes else a
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
    x = _decode(paths, mode, target, fixed, option)
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


def _decode(paths: list[Path], mode: str, target: tuple[int, int] | None, fixed: tuple[int, ...] | None,
            option: str) -> np.ndarray:
    """N x H x W x C float32 in [0, 1]."""
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
                a = np.asarray(im, dtype=np.uint8)
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
    out *= np.float32(1.0 / 255.0)
    return out
