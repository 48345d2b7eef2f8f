"""INT8 after low-rank (issue 18): static post-training quantization with onnxruntime's own quantizer.

`quantize_int8(model, data, config, chains)`: onnxruntime's pre-processing, then `quantize_static`
(QDQ, per-channel INT8 weights, INT8 activations calibrated on a `DataSet`), the SQNR of every
decomposed chain against FP32, chains kept in FP32 by pattern or by SQNR; a frozen `QuantizeResult`.
`compare_models(...)`: original FP32 / INT8 and compressed FP32 / INT8 side by side (`FourWayReport`).
The only package that imports `onnxruntime.quantization` (tests/test_boundaries.py).
"""

from .compare import FourWayReport, ModelRow, compare_models
from .stage import ChainError, QuantizeResult, check_float_model, quantize_int8

__all__ = ["ChainError", "FourWayReport", "ModelRow", "QuantizeResult", "check_float_model", "compare_models",
           "quantize_int8"]
