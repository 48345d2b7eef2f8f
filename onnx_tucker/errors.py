"""One exception hierarchy for everything onnx-tucker reports to a user.

Every message is meant to be shown as-is on one line: it names the file or node, the problem,
and the fix. The CLI maps `UsageError` to exit code 2 and every other `OnnxTuckerError` to 1.
"""

from __future__ import annotations


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (the one-line form every error here is shown in)."""
    text = str(e).strip().splitlines()
    return text[0].strip() if text else type(e).__name__


class OnnxTuckerError(Exception):
    """Base class: a problem the user can act on (never a bug in onnx-tucker)."""

    exit_code = 1


class UsageError(OnnxTuckerError):
    """An option or argument that does not parse or contradicts another one."""

    exit_code = 2


class ModelLoadError(OnnxTuckerError):
    """The input file is missing, unreadable, not ONNX, truncated or structurally invalid."""


class ModelSaveError(OnnxTuckerError):
    """The output could not be written (folder missing, not writable, disk full, ...)."""


class PlanError(OnnxTuckerError):
    """A plan (or a plan file) does not match the model it is applied to."""


class RewriteError(OnnxTuckerError):
    """The rewritten graph failed onnx.checker or could not be built."""


class ValidationError(OnnxTuckerError):
    """The model could not be run in onnxruntime for validation (not: outputs differ)."""


class QuantizeError(UsageError):
    """`--quantize int8` / `quantize`: the model cannot be quantized as given (already quantized, or
    onnxruntime's quantizer refuses a node); exit code 2, as for every input the command does not take."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised by the CLI's handler where Ctrl-C's KeyboardInterrupt would be: every clean-up
    that runs on Ctrl-C runs on `kill` too (temporary files removed, OUT untouched); exit code 143."""

    exit_code = 143
