"""The one container of user data: `DataSet`, samples on the first axis of every input array.

Every stage that reads data (validation, the agreement search, calibration, fine-tuning, the mobile
report) holds one, and every seeded selection of samples goes through `split_indices`, so that a
seed picks the same samples wherever it is used. numpy only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np

Size = int | float  # a count of samples, or a fraction of them


def split_indices(count: int, seed: int, *sizes: Size) -> tuple[np.ndarray, ...]:
    """Consecutive pieces of one seeded permutation of `count` samples, each sorted (the file order is
    kept within a piece): one piece per size (an int: that many samples, a float: that fraction of
    `count`, rounded, at least one), then the rest. Pieces past the end are empty."""
    order = np.random.default_rng(seed).permutation(count)
    pieces, start = [], 0
    for s in sizes:
        n = max(1, int(round(count * s))) if isinstance(s, float) and s > 0 else int(s)
        pieces.append(np.sort(order[start : start + n]))
        start += n
    return (*pieces, np.sort(order[start:]))


@dataclass(frozen=True)
class DataSet:
    """Samples on the first axis of every array of `inputs` (one per model input, in the model's
    order); `labels` int64 class ids or None; `classes` the class folder names in label order (image
    folders with one sub-folder per class only); `kind`: npz | classes | flat | random."""

    path: str
    inputs: Mapping[str, np.ndarray]
    labels: np.ndarray | None = None
    classes: tuple[str, ...] | None = None
    kind: str = "npz"

    @property
    def count(self) -> int:
        return int(next(iter(self.inputs.values())).shape[0])

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.inputs)

    def select(self, index: np.ndarray | slice) -> DataSet:
        """These samples (indices or a slice), labels with them."""
        return replace(self, inputs={k: v[index] for k, v in self.inputs.items()},
                       labels=None if self.labels is None else self.labels[index])

    def split(self, seed: int, *sizes: Size) -> tuple[DataSet, ...]:
        """One DataSet per size, then the rest, as `split_indices(count, seed, *sizes)` picks them."""
        return tuple(self.select(i) for i in split_indices(self.count, seed, *sizes))

    def without_labels(self) -> DataSet:
        return replace(self, labels=None)

    def batches(self, n: int, whole: bool = False) -> list[dict[str, np.ndarray]]:
        """Consecutive feeds of `n` samples each; the last may be smaller, unless `whole` (then dropped)."""
        stop = self.count - n + 1 if whole else self.count
        return [{k: v[start : start + n] for k, v in self.inputs.items()} for start in range(0, stop, n)]

    def stacked(self, n: int) -> dict[str, np.ndarray]:
        """The whole batches of `n` samples stacked on a new first axis (the remainder dropped)."""
        k = self.count // n
        return {name: a[: k * n].reshape(k, n, *a.shape[1:]) for name, a in self.inputs.items()}


def from_batches(batches: Sequence[Mapping[str, np.ndarray]], path: str = "random") -> DataSet:
    """Feeds of equal batches (random inputs, say) as one DataSet: their samples one after the other."""
    names = list(batches[0])
    return DataSet(path, {n: np.concatenate([b[n] for b in batches]) for n in names}, None, None, "random")
