"""Mobile runtimes: convert the original and the compressed model to the formats phones run
(ONNX Runtime mobile's ORT format, MNN, ncnn), run and time both there, and compare every output
with the original model in onnxruntime CPU.

Each native runtime runs in a child process (`child.py`) with a timeout: a converter that refuses
a model, a loader that segfaults or a run that hangs becomes a finding in the report, never the end
of the tool. The runtimes' Python packages are imported only inside their adapters (`adapters.py`),
in that child. `build.run_runtimes` is the entry point; `onnx_tucker.mobile_report` the
library call that also writes the report files.

The results live in `mobile.results`; nothing is imported here, so the child process, which runs
`onnx_tucker.mobile.child`, starts without scipy, onnx or the planner.
"""
