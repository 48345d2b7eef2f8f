"""Writing models and reports atomically; the input is never overwritten.

Every output goes to a temporary file in its own folder and is renamed into place only when
everything has been written (`OutputBatch`), so a failure (disk full, Ctrl-C, SIGTERM) leaves no
half-written file and a pre-existing output untouched.

Temporary files are named `.OUT.onnx-tucker-PID.XXXXXXXX.tmp`: what a hard kill (SIGKILL, power
loss) leaves behind is recognised by the next run to the same OUT and removed once its process is
gone. Outputs get the mode a plain `open(path, "w")` would give (0666 & ~umask), and a file being
replaced keeps its own mode.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import stat
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import onnx

from ..errors import ModelSaveError, UsageError
from .irmodel import IRModel
from .protos import PROTOBUF_LIMIT, serialized_size

log = logging.getLogger("onnx_tucker")

# Tensors at least this big go to the external data file when a model is saved with external data.
EXTERNAL_THRESHOLD = 1024



# ---- temporary files: recognisable by name, with the final file's mode -----------------------------
TEMP_TAG = "onnx-tucker"
_LEGACY_TEMP = re.compile(r"[a-z0-9_]{8}\.tmp")  # mkstemp's names before temps carried a pid
_reported: set[Path] = set()  # legacy leftovers already named once in this process


def current_umask() -> int:
    """The process umask, read without changing it where /proc allows (os.umask sets it to read it)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def output_mode(final: Path) -> int:
    """The mode `final` should get: its own when it exists (replacing keeps it), else 0666 & ~umask."""
    try:
        return stat.S_IMODE(os.stat(final).st_mode)
    except OSError:
        return 0o666 & ~current_umask()


def make_temp(final: Path) -> str:
    """A new empty temporary file beside `final`, named after it and this process, with its final mode
    (mkstemp makes 0600). Raises OSError."""
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.{TEMP_TAG}-{os.getpid()}.", suffix=".tmp",
                               dir=final.resolve().parent)
    try:
        os.fchmod(fd, output_mode(final))
    finally:
        os.close(fd)
    return tmp


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: someone else's process
        return True
    return True


def remove_stale_temps(final: Path) -> list[Path]:
    """Remove the temporary files an onnx-tucker run that was killed (SIGKILL) left beside `final`:
    ours by name, and their process gone. Older, pid-less leftovers are only reported."""
    parent = final.resolve().parent
    prefix = f".{final.name}."
    removed = []
    try:
        found = [parent / e.name for e in os.scandir(parent) if e.name.startswith(prefix) and e.name.endswith(".tmp")]
    except OSError:
        return []
    for p in sorted(found):
        rest = p.name[len(prefix):]
        m = re.fullmatch(rf"{TEMP_TAG}-(\d+)\.[^/]+\.tmp", rest)
        if m is None:
            if _LEGACY_TEMP.fullmatch(rest) and p not in _reported:
                _reported.add(p)
                log.warning("note: %s looks like a temporary file of an interrupted onnx-tucker run; "
                            "delete it if no run is writing %s", p, final)
            continue
        pid = int(m[1])
        if pid == os.getpid() or _alive(pid):
            continue  # this run's own, or a run still writing
        try:
            p.unlink()
        except OSError:
            continue
        removed.append(p)
        log.warning("note: removed %s, left by an onnx-tucker run (pid %d) that was killed before it finished", p, pid)
    return removed


# ---- writing ------------------------------------------------------------------------------------


def check_output_path(
    output: str | os.PathLike[str], input_path: str | os.PathLike[str] | None, label: str = "OUT"
) -> Path:
    """Refuse an output that would overwrite the input or cannot be created, before any work.
    `label` names the option the path came from ("OUT", "--report", ...) in the message."""
    out = Path(output)
    where = f"{out}" if label == "OUT" else f"{label} {out}"  # OUT is the positional argument itself
    if input_path is not None:
        inp = Path(input_path)
        same = out.resolve() == inp.resolve()
        if not same and out.exists() and inp.exists():
            with contextlib.suppress(OSError):
                same = os.path.samefile(out, inp)  # a hard link to the input
        if same:
            raise UsageError(f"{where}: output is the input file {inp}; refusing to overwrite it: choose another {label} path")
    if out.is_dir():
        name = "model.tucker.onnx" if label == "OUT" else f"out{out.suffix or '.json'}"
        raise UsageError(f"{where}: is a folder; give a file name such as {out / name}")
    parent = out.resolve().parent
    if parent.exists() and not parent.is_dir():
        raise UsageError(f"{where}: {parent} is a file, not a folder; choose another {label} path")
    if not parent.is_dir():
        raise UsageError(f"{where}: the folder {parent} does not exist; create it first (mkdir -p {parent})")
    if not os.access(parent, os.W_OK):
        raise ModelSaveError(f"{where}: the folder {parent} is not writable; choose another {label} path")
    remove_stale_temps(out)
    return out


def check_output_paths(
    input_path: str | os.PathLike[str] | None, outputs: Mapping[str, str | os.PathLike[str] | None]
) -> None:
    """Every output (label -> path; None: not asked for) is writable, is not the input, and no two
    outputs are the same file. Labels name the option in messages ("OUT", "--report", ...)."""
    taken: dict[Path, str] = {}
    for label, path in outputs.items():
        if path is None:
            continue
        p = check_output_path(path, input_path, label)
        other = taken.get(p.resolve())
        if other is not None:
            raise UsageError(f"{label} {p}: the same file as {other}; give each output its own path")
        taken[p.resolve()] = label


def _write_error(target: Path, e: OSError) -> ModelSaveError:
    reason = e.strerror or str(e) or type(e).__name__
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = "free some disk space or choose another folder"
    elif e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        fix = "choose a writable folder"
    else:
        fix = "check the folder"
    return ModelSaveError(f"{target}: could not write ({reason}); nothing was written: {fix}")


class OutputBatch:
    """Files that appear together or not at all: each is written to a temporary file beside its
    final path, and all are renamed into place by `commit()`.

    Used as a context manager, leaving the block with an exception (disk full, Ctrl-C) deletes
    every temporary file; outputs that existed before stay byte-identical.
    """

    def __init__(self) -> None:
        self._staged: list[tuple[str, Path]] = []  # (temporary file, final path)

    def __enter__(self) -> OutputBatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.discard()

    def _temp(self, final: Path) -> str:
        try:
            tmp = make_temp(final)
        except OSError as e:
            raise _write_error(final, e) from None
        self._staged.append((tmp, final))
        return tmp

    def _write(self, final: Path, chunks: Iterator[bytes] | list[bytes]) -> None:
        tmp = self._temp(final)
        try:
            with open(tmp, "wb") as f:
                for chunk in chunks:
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            raise _write_error(final, e) from None

    def add_text(self, path: str | os.PathLike[str], text: str) -> Path:
        out = Path(path)
        parent = out.resolve().parent
        if not parent.is_dir():
            raise UsageError(f"{out}: the folder {parent} does not exist; create it first (mkdir -p {parent})")
        self._write(out, [text.encode("utf-8")])
        return out

    def add_model(
        self,
        model: onnx.ModelProto | IRModel,
        output: str | os.PathLike[str],
        input_path: str | os.PathLike[str] | None = None,
        external_data: bool | None = None,
    ) -> Path:
        """Stage `model` for `output`; with external data, its weights go to `<OUT name>.data` beside it.

        `external_data=None`: only when the model is too big for one protobuf (over 2 GB). An
        `IRModel` (the rewrite's result) is written straight from its tensors: numpy factors with
        `ndarray.tofile`, weights still in the input file copied file to file (copy_file_range)."""
        out = check_output_path(output, input_path)
        if external_data is not None:
            use_external = external_data
        elif isinstance(model, IRModel):
            use_external = model.over_protobuf_limit()
        else:
            use_external = serialized_size(model) > PROTOBUF_LIMIT
        if not use_external:
            proto = model.to_proto(model.loaded_tensors()) if isinstance(model, IRModel) else model
            self._write(out, [proto.SerializeToString()])
            return out
        data_path = out.with_name(out.name + ".data")
        if input_path is not None:
            check_output_path(data_path, input_path)
        tmp_data = self._temp(data_path)
        irm = model if isinstance(model, IRModel) else IRModel(model)  # wraps the tensors, copies none
        try:
            payload = _write_external_data(irm, Path(tmp_data), data_path.name).SerializeToString()
        except OSError as e:
            raise _write_error(data_path, e) from None
        self._write(out, [payload])
        return out

    def commit(self) -> None:
        """Rename every staged file into place, data files before the models that point at them."""
        staged, self._staged = self._staged, []
        try:
            while staged:
                tmp, final = staged[0]
                os.replace(tmp, final)
                staged.pop(0)
        except OSError as e:
            self._staged = staged
            raise _write_error(staged[0][1], e) from None

    def discard(self) -> None:
        for tmp, _ in self._staged:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        self._staged = []


def _write_external_data(model: IRModel, tmp_data: Path, location: str) -> onnx.ModelProto:
    """Write the initializers' data to `tmp_data` with onnx-ir (every external one, and every one of
    at least EXTERNAL_THRESHOLD bytes), and return the model as protobuf pointing at `location` (the
    data file's final name beside the model). No second copy of any weight is held."""
    import onnx_ir as ir

    chosen = [(name, t) for name, t in model.initializer_tensors()
              if isinstance(t, ir.ExternalTensor) or t.nbytes >= EXTERNAL_THRESHOLD]
    written = ir.external_data.convert_tensors_to_external(
        [t for _, t in chosen], base_dir=str(tmp_data.parent), relative_path=tmp_data.name
    )
    with open(tmp_data, "rb+") as f:
        os.fsync(f.fileno())
    refs = {
        name: ir.ExternalTensor(location, offset=e.offset, length=e.length, dtype=e.dtype, shape=e.shape, name=name)
        for (name, _), e in zip(chosen, written, strict=True)
    }
    return model.to_proto(refs)


def save_model(
    model: onnx.ModelProto | IRModel,
    output: str | os.PathLike[str],
    input_path: str | os.PathLike[str] | None = None,
    external_data: bool | None = None,
) -> Path:
    """Write `model` atomically to `output` (temp file in the same folder, then rename).

    Models too big for one protobuf (or `external_data=True`) are written with their weights in
    `<OUT name>.data` beside OUT, also atomically. The input is never overwritten.
    """
    with OutputBatch() as batch:
        out = batch.add_model(model, output, input_path, external_data)
        batch.commit()
    return out


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """Write a text file (report, plan) atomically: temp file in the same folder, then rename."""
    with OutputBatch() as batch:
        out = batch.add_text(path, text)
        batch.commit()
    return out

