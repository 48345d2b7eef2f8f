"""`python -m onnx_tucker.training COMPRESSED OUT --data ...` = `onnx-tucker finetune ...` (for torchrun).

An entry point running another one: the CLI is run as a program (`python -m onnx_tucker.cli finetune`),
not imported, so the training package depends on no CLI code (tests/test_boundaries.py)."""

import runpy
import sys

if __name__ == "__main__":
    sys.argv = [sys.argv[0], "finetune", *sys.argv[1:]]
    runpy.run_module("onnx_tucker.cli", run_name="__main__", alter_sys=True)  # the app resolves its annotations in sys.modules["__main__"]
