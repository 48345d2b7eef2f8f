"""The per-layer sensitivity table of data-driven ranks (`--ranks data:F --calibrate DATA --sensitivity
FILE`): every covered layer's candidates (kind, ranks, MACs, calibrated error), the output of the one
walk over the original that rank choice costs, kept in a JSON file so that another MAC budget (or
`--latency-aware`, or `inspect` before `compress`) allocates from it without walking again.

The table is keyed by what its numbers depend on: the model (its serialised bytes, weights included),
the calibration feeds actually used (their bytes, after preprocessing and the seeded subset) and the
rank-choice options (rows, seed, grid, width cap, ridge). A file whose key differs (other model, data
or options) is recomputed and rewritten, and the plan says so; a file that cannot be read as a table
is an error naming it (it is not overwritten: it may be something else).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..errors import UsageError
from ..numerics.rankalloc import RankCandidate

FORMAT = "onnx-tucker sensitivity 1"


@dataclass(frozen=True)
class LayerSensitivity:
    candidates: tuple[RankCandidate, ...]
    note: str = ""


def table_key(model_bytes: bytes, batches: Sequence[Mapping[str, np.ndarray]], options: object) -> str:
    """sha256 of the model, the feeds (names, dtypes, shapes, bytes) and the options' fields."""
    h = hashlib.sha256()
    h.update(hashlib.sha256(model_bytes).digest())
    for b in batches:
        for name in sorted(b):
            a = np.ascontiguousarray(b[name])
            h.update(f"{name}|{a.dtype.str}|{a.shape}".encode())
            h.update(a.tobytes())
    h.update(json.dumps(asdict(options), sort_keys=True, default=str).encode())  # type: ignore[call-overload]
    return h.hexdigest()


def read_table(path: str, key: str) -> Mapping[str, LayerSensitivity] | None:
    """The table in `path` when its key is `key`; None when the file is absent or its key differs."""
    p = Path(path)
    if not p.exists():
        return None
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
        if doc.get("format") != FORMAT:
            raise ValueError(f"not a sensitivity table (format {doc.get('format')!r})")
        if doc.get("key") != key:
            return None
        return {
            name: LayerSensitivity(tuple(RankCandidate(str(k), tuple(int(r) for r in ranks), int(m), float(e))
                                         for k, ranks, m, e in entry["candidates"]), str(entry.get("note", "")))
            for name, entry in doc["layers"].items()
        }
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise UsageError(f"--sensitivity {path}: cannot read it as a sensitivity table ({e}); give a new file name, "
                         "or delete it to have it written again") from None


def table_json(key: str, layers: Mapping[str, LayerSensitivity]) -> str:
    doc = {
        "format": FORMAT,
        "key": key,
        "layers": {
            name: {"note": s.note, "candidates": [[c.kind, list(c.ranks), c.macs, c.error] for c in s.candidates]}
            for name, s in layers.items()
        },
    }
    return json.dumps(doc, separators=(",", ":")) + "\n"
