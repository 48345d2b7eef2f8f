"""Loading and saving ONNX models: clear errors for bad files, atomic writes, input never overwritten.

One of the two modules (with `graph`) that touch ONNX protobuf.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from .errors import ModelLoadError, ModelSaveError, UsageError

# Protobuf refuses to serialise a message over 2 GiB; stay clearly below it.
PROTOBUF_LIMIT = 2**31 - 2**24


def load_model(path: str | os.PathLike[str]) -> onnx.ModelProto:
    """Read an ONNX model (with its external data) or raise ModelLoadError naming file and fix."""
    p = Path(path)
    if not p.exists():
        raise ModelLoadError(f"{p}: no such file; check the path")
    if p.is_dir():
        raise ModelLoadError(f"{p}: is a folder, not an ONNX file; pass the .onnx file inside it")
    size = p.stat().st_size
    if size == 0:
        raise ModelLoadError(f"{p}: the file is empty (0 bytes); re-export the model")
    try:
        model = onnx.load(str(p), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError) as e:
        raise ModelLoadError(
            f"{p}: not a readable ONNX model (protobuf parse failed: {_first_line(e)}); "
            "the file is truncated or not ONNX: re-export or re-download it"
        ) from None
    except OSError as e:
        raise ModelLoadError(f"{p}: cannot read the file ({e.strerror}); check its permissions") from None
    if not model.HasField("graph") or (len(model.graph.node) == 0 and len(model.graph.output) == 0):
        raise ModelLoadError(
            f"{p}: parsed as protobuf but holds no ONNX graph (is it really an .onnx model?); "
            "re-export the model"
        )
    if not model.opset_import and model.ir_version >= 3:
        raise ModelLoadError(f"{p}: the model declares no opset_import; re-export it with an opset")
    _load_external_data(model, p)
    return model


def _load_external_data(model: onnx.ModelProto, path: Path) -> None:
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    base = path.resolve().parent
    for tensor in _get_all_tensors(model):
        if not uses_external_data(tensor):
            continue
        info = {e.key: e.value for e in tensor.external_data}
        location = info.get("location", "")
        target = (base / location).resolve()
        if os.path.isabs(location) or not target.is_relative_to(base):
            raise ModelLoadError(
                f"{path}: tensor '{tensor.name}' points at external data '{location}' outside the "
                "model's folder; refused for safety: move the data file next to the model"
            )
        if not target.is_file():
            raise ModelLoadError(
                f"{path}: external data file '{location}' for tensor '{tensor.name}' is missing; "
                "copy it next to the model"
            )
    try:
        onnx.load_external_data_for_model(model, str(base))
    except (OSError, ValueError, onnx.checker.ValidationError) as e:
        raise ModelLoadError(f"{path}: cannot read external data ({_first_line(e)}); check the data files") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def check_output_path(output: str | os.PathLike[str], input_path: str | os.PathLike[str] | None) -> Path:
    """Refuse an output that would overwrite the input or cannot be created, before any work."""
    out = Path(output)
    if input_path is not None:
        inp = Path(input_path)
        same = out.resolve() == inp.resolve()
        if not same and out.exists():
            with contextlib.suppress(OSError):
                same = os.path.samefile(out, inp)
        if same:
            raise UsageError(
                f"{out}: output is the input file; refusing to overwrite it: choose another OUT path"
            )
    if out.is_dir():
        raise UsageError(f"{out}: is a folder; give a file name such as {out / 'model.tucker.onnx'}")
    parent = out.resolve().parent
    if not parent.is_dir():
        raise UsageError(f"{out}: the folder {parent} does not exist; create it first (mkdir -p {parent})")
    if not os.access(parent, os.W_OK):
        raise ModelSaveError(f"{out}: the folder {parent} is not writable; choose another OUT path")
    return out


def serialized_size(model: onnx.ModelProto) -> int:
    return model.ByteSize()


def save_model(
    model: onnx.ModelProto,
    output: str | os.PathLike[str],
    input_path: str | os.PathLike[str] | None = None,
    external_data: bool | None = None,
) -> Path:
    """Write `model` atomically to `output` (temp file in the same folder, then rename).

    Models too big for one protobuf (or `external_data=True`) are written with their weights in
    `<OUT name>.data` beside OUT, also atomically. The input is never overwritten.
    """
    out = check_output_path(output, input_path)
    use_external = external_data if external_data is not None else serialized_size(model) > PROTOBUF_LIMIT
    parent = out.resolve().parent
    tmp_model = tmp_data = None
    try:
        fd, tmp_model = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=parent)
        os.close(fd)
        if use_external:
            data_name = out.name + ".data"
            fd, tmp_data = tempfile.mkstemp(prefix=f".{data_name}.", suffix=".tmp", dir=parent)
            os.close(fd)
            os.unlink(tmp_data)  # onnx appends to the location; start from a missing file
            proto = _with_external_data(model, os.path.basename(tmp_data))
            onnx.save(proto, tmp_model)
            # The data file name recorded in the model must be the final one.
            _rename_external_location(tmp_model, os.path.basename(tmp_data), data_name)
            os.replace(tmp_data, parent / data_name)
            tmp_data = None
        else:
            with open(tmp_model, "wb") as f:
                f.write(model.SerializeToString())
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp_model, out)
        tmp_model = None
    except OSError as e:
        raise ModelSaveError(f"{out}: could not write the model ({e.strerror or e}); nothing was written") from None
    finally:
        for t in (tmp_model, tmp_data):
            if t is not None:
                with contextlib.suppress(OSError):
                    os.unlink(t)
    return out


def _with_external_data(model: onnx.ModelProto, location: str) -> onnx.ModelProto:
    from onnx.external_data_helper import convert_model_to_external_data

    proto = onnx.ModelProto()
    proto.CopyFrom(model)
    convert_model_to_external_data(proto, all_tensors_to_one_file=True, location=location, size_threshold=1024)
    return proto


def _rename_external_location(model_path: str, old: str, new: str) -> None:
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    m = onnx.load(model_path, load_external_data=False)
    for t in _get_all_tensors(m):
        if uses_external_data(t):
            for e in t.external_data:
                if e.key == "location" and e.value == old:
                    e.value = new
    with open(model_path, "wb") as f:
        f.write(m.SerializeToString())


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """Write a text file (report, plan) atomically: temp file in the same folder, then rename."""
    out = Path(path)
    parent = out.resolve().parent
    if not parent.is_dir():
        raise UsageError(f"{out}: the folder {parent} does not exist; create it first (mkdir -p {parent})")
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=parent)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, out)
        tmp = None
    except OSError as e:
        raise ModelSaveError(f"{out}: could not write ({e.strerror or e}); nothing was written") from None
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    return out
