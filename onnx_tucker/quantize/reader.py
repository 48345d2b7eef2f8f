"""onnxruntime's `CalibrationDataReader` over the batches of one `DataSet` (the refit's data)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from onnxruntime.quantization import CalibrationDataReader


class DataSetReader(CalibrationDataReader):  # type: ignore[misc]
    """Feeds the batches in order, once; `rewind()` starts again (onnxruntime reads them once per call)."""

    def __init__(self, batches: Sequence[Mapping[str, np.ndarray]]) -> None:
        self._batches = [dict(b) for b in batches]
        self._next = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._next >= len(self._batches):
            return None
        self._next += 1
        return self._batches[self._next - 1]

    def rewind(self) -> None:
        self._next = 0

    def __len__(self) -> int:
        return len(self._batches)
