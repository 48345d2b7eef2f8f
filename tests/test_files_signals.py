"""Files and signals (issue 16, items 9 and 10).

* SIGTERM is handled like Ctrl-C: temporary files removed, OUT untouched, one error line, exit 143,
  in `compress` and in `finetune` (its checkpoint's temporary file too). Checked on a real process,
  stopped by a real signal while it is writing.
* What a hard kill leaves (SIGKILL) is recognisable by name and removed by the next run to the same OUT.
* Outputs honour the umask like a plain write (0666 & ~umask), and a replaced file keeps its mode.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from onnx_tucker.cli import app
from onnx_tucker.graph import save as tio_save
from tests.helpers import make_small_cnn, save

runner = CliRunner()
ROOT = Path(__file__).resolve().parent.parent


def _tmp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.endswith(".tmp")]


# ---- item 9: SIGTERM on a real process -------------------------------------------------------------

# Runs the CLI with one hook: the first write of a temporary file under OUT's folder (an fsync in
# compress, torch.save of the checkpoint in finetune) touches MARK and sleeps, so the test can
# send SIGTERM while a temporary file exists.
DRIVER = textwrap.dedent("""
    import os, sys, time
    out_dir, mark, hook, args = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]

    def stall():
        open(mark, "w").close()
        time.sleep(120)

    if hook == "fsync":
        real = os.fsync
        def fsync(fd):
            if os.readlink(f"/proc/self/fd/{fd}").startswith(out_dir):
                stall()
            return real(fd)
        os.fsync = fsync
    else:
        import torch
        def save_stalls(obj, f, *a, **k):
            stall()
        torch.save = save_stalls
    from onnx_tucker.cli import main
    sys.argv = ["onnx-tucker", *args]
    main()
""")


def _terminate_mid_write(tmp_path: Path, hook: str, args: list[str]) -> subprocess.CompletedProcess[str]:
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    mark = tmp_path / "mark"
    out_dir = str((tmp_path / "out").resolve())
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, str(driver), out_dir, str(mark), hook, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 240
        while not mark.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the run never reached its write"
            time.sleep(0.05)
        assert _tmp_files(tmp_path / "out"), "no temporary file while writing"
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    driver.unlink()
    mark.unlink()
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def _one_error_line(stderr: str, progress: tuple[str, ...] = ()) -> str:
    """The only error line, after any progress lines starting with one of `progress`."""
    assert "Traceback" not in stderr, stderr
    lines = [ln for ln in stderr.splitlines() if ln.strip() and not (progress and ln.startswith(progress))]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def test_sigterm_during_compress_cleans_up_and_exits_143(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    inp = save(make_small_cnn(low_rank=True), tmp_path / "m.onnx")
    out = tmp_path / "out" / "m.tucker.onnx"
    out.write_bytes(b"previous OUT")
    res = _terminate_mid_write(tmp_path, "fsync", ["compress", str(inp), str(out), "--samples", "2",
                                                  "--report", str(tmp_path / "out" / "r.json")])
    assert res.returncode == 143, res.stderr
    line = _one_error_line(res.stderr)
    assert "terminated (SIGTERM)" in line and "no partial output" in line
    assert not _tmp_files(tmp_path), "temporary files left behind"
    assert out.read_bytes() == b"previous OUT" and not (tmp_path / "out" / "r.json").exists()


def test_sigterm_during_finetune_checkpoint_cleans_up_and_exits_143(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    if importlib.util.find_spec("onnx2torch") is None:  # not imported: it imports a torchvision that may be broken
        pytest.skip("onnx2torch is not installed (pip install -e '.[finetune]')")
    (tmp_path / "out").mkdir()
    m = make_small_cnn(batch="N", low_rank=True)
    inp = save(m, tmp_path / "m.onnx")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.standard_normal((16, 3, 16, 16)).astype(np.float32), labels=rng.integers(0, 10, 16))
    out = tmp_path / "out" / "ft.onnx"
    res = _terminate_mid_write(tmp_path, "torch.save", ["finetune", str(inp), str(out), "--data", str(tmp_path / "d.npz"),
                                                       "--epochs", "1", "--batch-size", "8", "--threads", "1"])
    assert res.returncode == 143, res.stderr
    line = _one_error_line(res.stderr, progress=("finetune: ", "warning: ", "speed: ", "note: "))
    assert "terminated (SIGTERM) during epoch 1" in line and "nothing was written to OUT" in line
    assert line.endswith("no epoch finished"), line  # the checkpoint being written when it stopped is not there
    assert not _tmp_files(tmp_path), "the checkpoint's temporary file was left behind"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == []


# ---- item 9: leftovers of a hard kill --------------------------------------------------------------


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_a_killed_runs_temporary_file_is_removed_by_the_next_run(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    inp = save(make_small_cnn(low_rank=True), tmp_path / "m.onnx")
    out = tmp_path / "m.tucker.onnx"
    stale = tmp_path / f".m.tucker.onnx.onnx-tucker-{_dead_pid()}.k2j4x9a1.tmp"
    live = tmp_path / ".m.tucker.onnx.onnx-tucker-1.abcdefgh.tmp"  # pid 1 is alive: another run, left alone
    other = tmp_path / f".other.onnx.onnx-tucker-{_dead_pid()}.abcdefgh.tmp"  # another OUT's: not ours to judge
    legacy = tmp_path / ".m.tucker.onnx.a1b2c3d4.tmp"  # an older version's name: no pid, so only reported
    for p in (stale, live, other, legacy):
        p.write_bytes(b"half a model")
    with caplog.at_level("WARNING", logger="onnx_tucker"):
        res = runner.invoke(app, ["compress", str(inp), str(out), "--samples", "2"])
    assert res.exit_code == 0, res.stderr
    assert not stale.exists() and live.exists() and other.exists() and out.exists()
    assert any(str(stale) in r.getMessage() and "killed" in r.getMessage() for r in caplog.records)
    assert legacy.exists() and [r for r in caplog.records if str(legacy) in r.getMessage()]


def test_temporary_files_are_named_after_out_and_the_process(tmp_path: Path) -> None:
    tmp = Path(tio_save.make_temp(tmp_path / "ckpt.pt"))
    assert tmp.name.startswith(f".ckpt.pt.onnx-tucker-{os.getpid()}.") and tmp.name.endswith(".tmp")
    # The finetune checkpoint path goes through the same check: a dead run's checkpoint temp is removed.
    stale = tmp_path / f".ckpt.pt.onnx-tucker-{_dead_pid()}.zzzzzzzz.tmp"
    stale.write_bytes(b"")
    assert tio_save.remove_stale_temps(tmp_path / "ckpt.pt") == [stale]
    assert tmp.exists()  # this process's own temp file is never taken for a leftover


# ---- item 10: modes --------------------------------------------------------------------------------


@pytest.fixture()
def umask() -> Iterator[None]:
    old = os.umask(0o022)
    os.umask(old)
    yield
    os.umask(old)


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


@pytest.mark.parametrize(("mask", "want"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_outputs_honour_the_umask(tmp_path: Path, umask: None, mask: int, want: int) -> None:
    inp = save(make_small_cnn(low_rank=True), tmp_path / "m.onnx")
    os.umask(mask)
    outs = [tmp_path / "o.onnx", tmp_path / "r.json", tmp_path / "p.json", tmp_path / "r.md"]
    res = runner.invoke(app, ["compress", str(inp), str(outs[0]), "--samples", "2", "--report", str(outs[1]),
                              "--save-plan", str(outs[2]), "--markdown", str(outs[3])])
    assert res.exit_code == 0, res.stderr
    assert {p.name: oct(_mode(p)) for p in outs} == {p.name: oct(want) for p in outs}
    json.loads(outs[1].read_text())


def test_replacing_a_file_keeps_its_mode(tmp_path: Path, umask: None) -> None:
    inp = save(make_small_cnn(low_rank=True), tmp_path / "m.onnx")
    out, rep = tmp_path / "o.onnx", tmp_path / "r.json"
    for p, mode in ((out, 0o640), (rep, 0o604)):
        p.write_bytes(b"old")
        p.chmod(mode)
    os.umask(0o077)
    res = runner.invoke(app, ["compress", str(inp), str(out), "--samples", "2", "--report", str(rep)])
    assert res.exit_code == 0, res.stderr
    assert (_mode(out), _mode(rep)) == (0o640, 0o604)
    assert out.read_bytes() != b"old"


def test_external_data_and_checkpoints_get_the_same_modes(tmp_path: Path, umask: None) -> None:
    from onnx_tucker.training.run import _save_checkpoint

    os.umask(0o022)
    out = tmp_path / "big.onnx"
    tio_save.save_model(make_small_cnn(low_rank=True), out, external_data=True)
    assert _mode(out) == _mode(tmp_path / "big.onnx.data") == 0o644

    class FakeTorch:
        @staticmethod
        def save(state: object, f: str) -> None:
            Path(f).write_bytes(b"state")

    ckpt = tmp_path / "o.onnx.finetune.pt"
    _save_checkpoint(FakeTorch, ckpt, {})
    assert _mode(ckpt) == 0o644
    ckpt.chmod(0o600)  # a user who locked it down: the next epoch's checkpoint stays locked down
    _save_checkpoint(FakeTorch, ckpt, {})
    assert _mode(ckpt) == 0o600 and not _tmp_files(tmp_path)
