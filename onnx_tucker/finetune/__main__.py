"""`python -m onnx_tucker.finetune COMPRESSED OUT --data ...` = `onnx-tucker finetune ...`."""

import sys

from ..cli import main

if __name__ == "__main__":
    sys.argv = [sys.argv[0], "finetune", *sys.argv[1:]]
    main()
