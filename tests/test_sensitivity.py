"""The per-layer sensitivity table (`--sensitivity FILE`, calibration/sensitivity.py): computed once,
it reproduces the allocation it was computed for and gives another budget without walking the model;
another model, data or options recompute it."""

from __future__ import annotations

import json

import numpy as np
import pytest

from onnx_tucker import api
from onnx_tucker.calibration import rankselect
from onnx_tucker.config import CompressionConfig
from onnx_tucker.errors import UsageError
from tests.helpers import make_small_cnn


def _plan(model, cal: str, fraction: float, table: str | None, seed: int = 0):  # type: ignore[no-untyped-def]
    cfg = CompressionConfig(ranks=f"data:{fraction}", calibrate=cal, calibration_samples=40, sensitivity=table, seed=seed)
    return api.plan(model, cfg).plan


def _ranks(plan) -> list[tuple[str, str, tuple[int, ...] | None]]:  # type: ignore[no-untyped-def]
    return [(lp.name, lp.kind, lp.ranks) for lp in plan.layers]


@pytest.fixture
def setup(tmp_path):  # type: ignore[no-untyped-def]
    model = make_small_cnn(batch="N", classes=10, low_rank=True)
    cal = tmp_path / "cal.npz"
    np.savez(cal, x=np.random.default_rng(0).random((40, 3, 16, 16), dtype=np.float32))
    return model, str(cal), str(tmp_path / "sens.json")


def test_the_table_reproduces_its_allocation_and_others_without_a_walk(setup, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    model, cal, table = setup
    fresh = {f: _ranks(_plan(model, cal, f, None)) for f in (0.6, 0.4)}
    assert _ranks(_plan(model, cal, 0.6, table)) == fresh[0.6]  # computed and written
    doc = json.loads(open(table).read())
    assert doc["format"].startswith("onnx-tucker sensitivity") and doc["layers"]

    def no_walk(*a, **k):  # type: ignore[no-untyped-def]
        raise AssertionError("the original was walked although the table has every layer")

    monkeypatch.setattr(rankselect, "_walk", no_walk)
    assert _ranks(_plan(model, cal, 0.6, table)) == fresh[0.6]  # the allocation it was computed for
    assert _ranks(_plan(model, cal, 0.4, table)) == fresh[0.4]  # another budget, free


def test_other_data_or_options_recompute_the_table(setup, tmp_path) -> None:  # type: ignore[no-untyped-def]
    model, cal, table = setup
    _plan(model, cal, 0.6, table)
    key = json.loads(open(table).read())["key"]
    other = tmp_path / "other.npz"
    np.savez(other, x=np.random.default_rng(1).random((40, 3, 16, 16), dtype=np.float32))
    _plan(model, str(other), 0.6, table)
    key2 = json.loads(open(table).read())["key"]
    _plan(model, cal, 0.6, table, seed=3)
    key3 = json.loads(open(table).read())["key"]
    _plan(make_small_cnn(batch="N", classes=10, low_rank=True, seed=5), cal, 0.6, table)
    key4 = json.loads(open(table).read())["key"]
    assert len({key, key2, key3, key4}) == 4


def test_a_file_that_is_not_a_table_is_refused_and_kept(setup) -> None:  # type: ignore[no-untyped-def]
    model, cal, table = setup
    with open(table, "w") as f:
        f.write('{"something": "else"}')
    with pytest.raises(UsageError, match="--sensitivity .*cannot read it as a sensitivity table"):
        _plan(model, cal, 0.6, table)
    assert open(table).read() == '{"something": "else"}'
