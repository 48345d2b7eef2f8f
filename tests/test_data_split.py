"""One DataSet, one seeded selection (data/dataset.py): `split` / `batches`, and the samples each former
helper picks, pinned to what it picked before the helpers were merged into `DataSet.split`
(training's --val-split, the agreement search's halves, calibration's --calibration-samples subset and
its held-out samples), so accuracies and calibrated models do not move."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from onnx_tucker.calibration import calibrate
from onnx_tucker.calibration.calibrate import calibration_batches, calibration_data
from onnx_tucker.data import DataSet, split_indices
from onnx_tucker.training.run import SPLIT_SEED_OFFSET
from tests.helpers import make_small_cnn


def _ids(n: int) -> DataSet:
    """Sample k holds the value k (and label 100 + k): a selection reads back as a list of ints."""
    x = np.arange(n, dtype=np.float32)[:, None, None, None] * np.ones((1, 3, 8, 8), np.float32)
    return DataSet("d.npz", {"x": x}, np.arange(n, dtype=np.int64) + 100)


def _values(ds: DataSet | None) -> list[int] | None:
    return None if ds is None else [int(round(float(v))) for v in ds.inputs["x"][:, 0, 0, 0]]


def test_split_cuts_one_seeded_permutation_into_sorted_pieces() -> None:
    a, b, rest = split_indices(50, 3, 10, 0.2)
    assert (len(a), len(b), len(rest)) == (10, 10, 30)
    assert all((np.diff(p) > 0).all() for p in (a, b, rest))  # sorted: the file order within a piece
    assert sorted(np.concatenate([a, b, rest]).tolist()) == list(range(50))
    assert split_indices(50, 3, 10)[0].tolist() == a.tolist()  # the same seed, the same first piece
    first, last = _ids(5).split(0, 100)  # past the end: all, then nothing
    assert first.count == 5 and last.count == 0
    ds = _ids(9)
    picked, _ = ds.split(1, 4)
    assert picked.labels is not None and (picked.labels - 100).tolist() == _values(picked)  # labels follow


def test_batches_are_consecutive_and_whole_drops_the_remainder() -> None:
    ds = _ids(10)
    assert [_values(DataSet("", b)) for b in ds.batches(4)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert [_values(DataSet("", b)) for b in ds.batches(4, whole=True)] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert ds.stacked(4)["x"].shape == (2, 4, 3, 8, 8)


# ---- the selections of the former helpers, pinned (computed with the code before the merge) ----------


@pytest.mark.parametrize(("n", "share", "seed", "val"), [
    (37, 0.2, 0, [1, 6, 10, 18, 25, 30, 31]),
    (10, 0.25, 3, [1, 9]),
    (2, 0.5, 1, [1]),
])
def test_finetune_val_split_holds_out_the_samples_it_always_did(n: int, share: float, seed: int, val: list[int]) -> None:
    """training/run.py's former `_split`: permutation(seed + 7919), the first round(n * share) held out."""
    held, train = _ids(n).split(seed + SPLIT_SEED_OFFSET, share)
    assert _values(held) == val
    assert _values(train) == sorted(set(range(n)) - set(val))


@pytest.mark.parametrize(("n", "seed", "search"), [(9, 0, [2, 4, 5, 6]), (12, 5, [1, 2, 3, 4, 9, 11])])
def test_agreement_search_halves_are_the_ones_it_always_used(n: int, seed: int, search: list[int]) -> None:
    """api.py's agreement evaluator: permutation(seed), the first n // 2 searched on, the rest held out."""
    first, held_out = _ids(n).split(seed, n // 2)
    assert _values(first) == search
    assert _values(held_out) == sorted(set(range(n)) - set(search))


def _npz(tmp_path: Path, n: int) -> str:
    path = tmp_path / f"c{n}.npz"
    np.savez(path, x=_ids(n).inputs["x"])
    return str(path)


def test_calibration_subset_and_held_out_samples_are_the_ones_they_always_were(tmp_path: Path) -> None:
    """calibration's former `_load_calibration`: permutation(seed), `limit` for the refit, the next
    HELD_OUT (500) held out."""
    model = make_small_cnn(batch="N", spatial=(8, 8))
    used, held = calibration_data(_npz(tmp_path, 30), model, 7, 2)
    assert _values(used) == [7, 12, 15, 16, 18, 24, 26]
    assert _values(held) == sorted(set(range(30)) - {7, 12, 15, 16, 18, 24, 26})
    assert used.labels is None and held is not None and held.labels is None
    used, held = calibration_data(_npz(tmp_path, 530), model, 12, 0)
    picked = [85, 90, 124, 167, 209, 219, 326, 399, 413, 461, 492, 498]
    left_out = {7, 29, 73, 78, 104, 115, 176, 184, 191, 287, 302, 315, 351, 377, 425, 487, 496, 504}
    assert _values(used) == picked
    assert _values(held) == sorted(set(range(530)) - set(picked) - left_out)
    ids = sorted(int(v) for b in calibration_batches(_npz(tmp_path, 30), model, {"x": (1, 3, 8, 8)}, 7, batch=3, seed=2)
                 for v in b["x"][:, 0, 0, 0])
    assert ids == [7, 12, 15, 16, 18, 24, 26]
    used, held = calibration_data(_npz(tmp_path, 30), model, 30, 2)  # no more samples than the limit: all
    assert _values(used) == list(range(30)) and held is None


def _class_folder(root: Path, per_class: int = 8) -> Path:
    """a/, b/, c/ with `per_class` images each; image k (in the loader's order) is all pixels k."""
    from PIL import Image

    k = 0
    for c in ("a", "b", "c"):
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(np.full((8, 8, 3), k, np.uint8)).save(root / c / f"{i:02d}.png")
            k += 1
    return root


def _pixels(ds: DataSet | None) -> list[int] | None:
    return None if ds is None else [int(round(float(v) * 255)) for v in ds.inputs["x"][:, 0, 0, 0]]


def test_calibration_from_an_image_folder_picks_the_same_images_and_decodes_only_those(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("PIL")
    from onnx_tucker.data import load

    model = make_small_cnn(batch="N", spatial=(8, 8))
    root = _class_folder(tmp_path / "imgs")
    used, held = calibration_data(str(root), model, 5, 4)
    assert _pixels(used) == [0, 9, 11, 16, 20]  # as when the whole folder was decoded first
    assert _pixels(held) == sorted(set(range(24)) - {0, 9, 11, 16, 20})
    decoded: list[Path] = []
    real = load.decode_images

    def counting(paths, *args, **kwargs):  # type: ignore[no-untyped-def]
        decoded.extend(paths)
        return real(paths, *args, **kwargs)

    monkeypatch.setattr(load, "decode_images", counting)
    monkeypatch.setattr(calibrate, "HELD_OUT", 4)
    (root / "c" / "99.png").write_bytes(b"not a png")  # never chosen below: never opened
    used, held = calibration_data(str(root), model, 5, 4)
    assert used.count == 5 and held is not None and held.count == 4
    assert len(decoded) == 9  # of 25 files: only the refit's and the held-out ones
