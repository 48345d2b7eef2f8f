"""`python -m onnx_tucker.training COMPRESSED OUT --data ...` = `onnx-tucker finetune ...` (for torchrun).

An entry point: nothing imports it, so its import of the CLI closes no cycle (tests/test_boundaries.py
counts `__main__` modules as nodes of their own)."""

import sys

from ..cli import main

if __name__ == "__main__":
    sys.argv = [sys.argv[0], "finetune", *sys.argv[1:]]
    main()
