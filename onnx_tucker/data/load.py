"""Every loader of user data (validate, the agreement search, calibration, fine-tuning, the mobile report).

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
`mean` / `std`, and laid out as NCHW or NHWC. Everything returned is plain numpy: the model is
described by its input names, shapes and dtypes (`*_for_model` reads them through the graph layer).

`open_data` lists DATA (an image folder's files, an .npz's arrays) and checks it against the model's
inputs; its `read(index)` gives a `DataSet` of those samples, decoding only the images chosen.
`load_data` is both at once.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..config import Preprocess
from ..errors import UsageError
from .dataset import DataSet, Size, split_indices
from .images import IMAGE_EXTENSIONS, Dim, decode_images, layout_of, normalise_images, pixels_to_input

if TYPE_CHECKING:
    import onnx


@dataclass(frozen=True)
class DataFile:
    """DATA listed and checked against the model's inputs, its images not decoded yet: the sample
    count, labels and classes, and `read(index)` for the samples themselves."""

    path: str
    count: int
    labels: np.ndarray | None
    classes: tuple[str, ...] | None
    kind: str  # npz | classes | flat
    _read: Callable[[np.ndarray | None], DataSet] = field(repr=False, compare=False)

    def read(self, index: np.ndarray | None = None) -> DataSet:
        """Every sample, or these (indices into the file's sample order)."""
        return self._read(None if index is None else np.asarray(index))

    def split(self, seed: int, *sizes: Size) -> tuple[DataSet, ...]:
        """`DataSet.split` of the whole file, reading only the pieces asked for (not the rest)."""
        return tuple(self.read(i) for i in split_indices(self.count, seed, *sizes)[: len(sizes)])


def open_data(
    path: str | os.PathLike[str],
    input_names: Sequence[str],
    input_shapes: Mapping[str, Sequence[Dim]],
    input_dtypes: Mapping[str, np.dtype] | None = None,
    preprocess: Preprocess | None = None,
    limit: int | None = None,
    option: str = "--data",
) -> DataFile:
    """List DATA for a model with these inputs (shapes include the batch axis; dims may be None / str)."""
    p = Path(path)
    if not p.exists():
        raise UsageError(f"{option} {p}: no such file or folder; give an image folder or a .npz file")
    if p.is_dir():
        return _open_folder(p, input_names, input_shapes, input_dtypes, preprocess or Preprocess(), limit, option)
    return _open_npz(p, input_names, input_shapes, input_dtypes, preprocess or Preprocess(), limit, option)


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
    return open_data(path, input_names, input_shapes, input_dtypes, preprocess, limit, option).read()


def open_for_model(path: str | os.PathLike[str], model: onnx.ModelProto, limit: int | None = None,
                   preprocess: Preprocess | None = None, option: str = "--data") -> DataFile:
    """`open_data` for the inputs `model` declares (unknown dims None)."""
    from ..graph.protos import input_specs  # the graph layer reads the protobuf; data/ stays numpy only

    names, shapes, dtypes = input_specs(model)
    return open_data(path, names, shapes, dtypes, preprocess, limit, option)


def load_for_model(path: str | os.PathLike[str], model: onnx.ModelProto, limit: int | None = None,
                   preprocess: Preprocess | None = None, option: str = "--data") -> DataSet:
    """User data for `model`: a .npz with an array per model input (named as the input, or any single
    array for a single-input model) and optionally `labels` (int class ids), or an image folder (one
    sub-folder per class, or a flat folder); first axis = samples."""
    return open_for_model(path, model, limit, preprocess, option).read()


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


def _open_npz(
    path: Path, names: Sequence[str], shapes: Mapping[str, Sequence[Dim]], dtypes: Mapping[str, np.dtype] | None,
    pre: Preprocess, limit: int | None, option: str,
) -> DataFile:
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
            a = pixels_to_input(a, keys[n], n, shapes.get(n, ()), pre, path, option, np.dtype(want))
        else:
            # Integer data for an integer input (token ids, indices) is passed through as it is.
            _check_finite(a, keys[n], path, option)
            a = a.astype(want, copy=False) if want is not None else a
        inputs[n] = a
    ds = DataSet(str(path), inputs, None if labels is None else labels[:limit].astype(np.int64), None, "npz")
    # Read, converted and checked whole (NaN anywhere is refused): `read` only selects.
    return DataFile(ds.path, ds.count, ds.labels, None, "npz", lambda index: ds if index is None else ds.select(index))


# ---- image folders ------------------------------------------------------------------------------


def _images_in(folder: Path) -> list[Path]:
    return sorted(f for f in folder.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)


def _open_folder(
    folder: Path,
    names: Sequence[str],
    shapes: Mapping[str, Sequence[Dim]],
    dtypes: Mapping[str, np.dtype] | None,
    pre: Preprocess,
    limit: int | None,
    option: str,
) -> DataFile:
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
    layout = layout_of(shape, pre)
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
    dtype = dtypes.get(name, np.dtype(np.float32)) if dtypes else np.dtype(np.float32)
    label_array = np.asarray(labels, np.int64) if kind == "classes" else None

    def read(index: np.ndarray | None) -> DataSet:
        # Only the chosen files are decoded (a seeded subset of a big folder costs what the subset costs).
        chosen = paths if index is None else [paths[i] for i in index]
        x = normalise_images(decode_images(chosen, mode, target, fixed, option, pre), shape, pre, dtype)
        chosen_labels = None if label_array is None or index is None else label_array[index]
        return DataSet(str(folder), {name: x}, label_array if index is None else chosen_labels, classes, kind)

    return DataFile(str(folder), len(paths), label_array, classes, kind, read)
