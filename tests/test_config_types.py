"""The library takes the CLI's spellings (issue 16 item 6): `CompressionConfig(ranks="data:0.5")` and
the other parsed fields accept the text the command line takes, and any other wrong type is one
UsageError naming the field and the type it wants (before: a bare AttributeError deep inside)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

import onnx_tucker as ot
from onnx_tucker.config import BudgetTarget, CompressionConfig, Preprocess, RankPolicy
from onnx_tucker.errors import UsageError
from tests.helpers import make_small_cnn


@pytest.mark.parametrize(("text", "policy"), [
    ("vbmf", RankPolicy("vbmf")), ("full", RankPolicy("full")), ("ratio:0.5", RankPolicy("ratio", 0.5)),
    ("energy:0.9", RankPolicy("energy", 0.9)),
])
def test_ranks_as_text_is_parsed(text: str, policy: RankPolicy) -> None:
    assert CompressionConfig(ranks=text).ranks == policy  # type: ignore[arg-type]


def test_data_ranks_as_text_with_calibration_data() -> None:
    cfg = CompressionConfig(ranks="data:0.5", calibrate=Path("cal.npz"))  # type: ignore[arg-type]
    assert cfg.ranks == RankPolicy("data", 0.5) and cfg.calibrate == "cal.npz"
    with pytest.raises(UsageError, match="data:0.5.*need the data; add --calibrate"):
        CompressionConfig(ranks="data:0.5")  # type: ignore[arg-type]


def test_target_and_shapes_and_paths_as_text() -> None:
    cfg = CompressionConfig(target="macs:0.3", input_shapes=["x:1,3,16,16"], data=Path("d.npz"),  # type: ignore[arg-type]
                            calibrate=Path("c.npz"), seed=np.int64(3), rank_scale=np.float32(1.5), samples=np.int32(4))
    assert cfg.target == BudgetTarget("macs", 0.3)
    assert cfg.input_shapes == (("x", (1, 3, 16, 16)),)
    assert (cfg.data, cfg.calibrate) == ("d.npz", "c.npz")
    assert CompressionConfig(plan_file=Path("p.json")).plan_file == "p.json"  # type: ignore[arg-type]
    assert type(cfg.seed) is int and type(cfg.rank_scale) is float and type(cfg.samples) is int
    json.dumps(cfg.to_dict())  # numpy scalars and paths no longer reach the JSON report
    for shapes in ("x:1,3,16,16", {"x": (1, 3, 16, 16)}, [("x", [1, 3, 16, 16])]):
        assert CompressionConfig(input_shapes=shapes).input_shapes == (("x", (1, 3, 16, 16)),)  # type: ignore[arg-type]


def test_preprocess_as_text_or_dict() -> None:
    assert Preprocess(size=32, mean="0.5,0.5,0.5", std=[0.25]) == Preprocess((32, 32), (0.5, 0.5, 0.5), (0.25,))  # type: ignore[arg-type]
    assert CompressionConfig(preprocess={"size": "24,32"}).preprocess.size == (24, 32)  # type: ignore[arg-type]


@pytest.mark.parametrize(("kwargs", "pattern"), [
    ({"ranks": 0.5}, r"CompressionConfig\(ranks=0.5\): expected a RankPolicy or its CLI spelling, not float; pass e.g. ranks='ratio:0.5'"),
    ({"ranks": "ratio:2"}, r"--ranks ratio:2: ratio must be in \(0, 1\]"),
    ({"ranks": RankPolicy("ratio", 2.0)}, r"ratio must be in \(0, 1\]"),
    ({"ranks": RankPolicy("foo")}, r"RankPolicy\('foo', None\): not a rank policy; use RankPolicy\('vbmf'\)"),
    ({"ranks": RankPolicy("ratio")}, r"not a rank policy"),
    ({"target": 0.3}, r"CompressionConfig\(target=0.3\): expected a BudgetTarget, its CLI spelling or None, not float"),
    ({"target": BudgetTarget("macs", 3.0)}, r"--target macs:3: the fraction must be in \(0, 1\)"),
    ({"target": "macs:nan"}, r"agreement:F"),
    ({"input_shapes": ["1,3,16,16"]}, r"--input-shape 1,3,16,16: not NAME:D0,D1"),
    ({"input_shapes": [("x", "1,3")]}, r"not a \(name, dims\) pair of a str and ints"),
    ({"input_shapes": 5}, r"CompressionConfig\(input_shapes=5\): expected NAME:D0,D1,... strings or \(name, dims\) pairs"),
    ({"preprocess": "32"}, r"CompressionConfig\(preprocess='32'\): expected a Preprocess or a dict of its fields, not str"),
    ({"preprocess": {"sizes": 3}}, r"preprocess=.*; give the fields size, mean, std, layout"),
    ({"data": 3}, r"CompressionConfig\(data=3\): expected a path \(str or os.PathLike\) or None, not int"),
    ({"include": 3}, r"CompressionConfig\(include=3\): expected a regular expression"),
    ({"rank_scale": "1.5"}, r"CompressionConfig\(rank_scale='1.5'\): expected a float, not str; pass e.g. rank_scale=1.5"),
    ({"samples": 2.5}, r"CompressionConfig\(samples=2.5\): expected an int or None, not float"),
    ({"threads": True}, r"CompressionConfig\(threads=True\): expected an int, not bool"),
    ({"validate": "no"}, r"CompressionConfig\(validate='no'\): expected a bool, not str"),
])
def test_wrong_types_are_one_usage_error(kwargs: dict, pattern: str) -> None:
    with pytest.raises(UsageError) as info:
        CompressionConfig(**kwargs)
    msg = str(info.value)
    assert re.search(pattern, msg), msg
    assert "\n" not in msg and "; " in msg


def test_preprocess_wrong_types() -> None:
    with pytest.raises(UsageError, match=r"Preprocess\(size=2.5\): expected N, \(H, W\)"):
        Preprocess(size=2.5)  # type: ignore[arg-type]
    with pytest.raises(UsageError, match=r"--mean a,b: not a comma-separated list"):
        Preprocess(mean="a,b")  # type: ignore[arg-type]


def test_the_api_runs_with_text_options(tmp_path: Path) -> None:
    plan = ot.plan(make_small_cnn(low_rank=True), CompressionConfig(ranks="ratio:0.5", validate=False))  # type: ignore[arg-type]
    assert plan.config.ranks == RankPolicy("ratio", 0.5) and plan.decomposed


def test_bench_config_types() -> None:
    assert ot.BenchConfig(threads=np.int64(2)).threads == 2
    with pytest.raises(UsageError, match=r"BenchConfig\(runs='20'\): expected an int, not str"):
        ot.BenchConfig(runs="20")  # type: ignore[arg-type]
