"""The README's examples run as tests: every `onnx-tucker` command line and the Python example."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def _commands() -> list[str]:
    cmds = []
    for block in _blocks("bash"):
        for line in block.splitlines():
            # The set-up line chains `pip install -e . && onnx-tucker ...`: test the tool's part.
            for part in line.split("&&"):
                part = part.split("#")[0].strip()
                if part.startswith("onnx-tucker "):
                    cmds.append(part)
    return cmds


def test_readme_starts_with_the_two_setup_commands() -> None:
    first_two = _blocks("bash")[:2]
    assert "onnx-tucker compress fixtures/" in first_two[0]
    assert "pytest" in first_two[1]
    ci = (ROOT / ".ci" / "run").read_text()
    assert "python3 -m venv .venv" in ci
    assert first_two[1].split("activate &&", 1)[1].strip() in ci


@pytest.mark.parametrize("cmd", _commands())
def test_readme_command(cmd: str, tmp_path: Path) -> None:
    args = shlex.split(cmd.replace("/tmp/", f"{tmp_path}/"))
    # Commands may depend on earlier ones (a saved plan, a compressed model): run those first.
    for earlier in _commands():
        if earlier == cmd:
            break
        produced = [a for a in shlex.split(earlier.replace("/tmp/", f"{tmp_path}/")) if a.startswith(str(tmp_path))]
        if any(p in args for p in produced):
            subprocess.run([sys.executable, "-m", "onnx_tucker.cli", *shlex.split(earlier.replace("/tmp/", f"{tmp_path}/"))[1:]],
                           cwd=ROOT, check=True, capture_output=True)
    proc = subprocess.run([sys.executable, "-m", "onnx_tucker.cli", *args[1:]], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr


def test_readme_python_example(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    (code,) = _blocks("python")
    monkeypatch.chdir(ROOT)
    exec(compile(code.replace("/tmp/", f"{tmp_path}/"), "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert re.search(r"MACs x\d+\.\d", out)
    assert (tmp_path / "fm_api.onnx").is_file()


def test_readme_first_command_shows_real_accuracy(tmp_path: Path) -> None:
    # Issue 16 item 7b: the shipped labelled sample, not random inputs: top-1 accuracy before -> after.
    first = _commands()[0]
    assert "--data fixtures/fmnist_test_500.npz" in first
    args = shlex.split(first.replace("/tmp/", f"{tmp_path}/"))
    proc = subprocess.run([sys.executable, "-m", "onnx_tucker.cli", *args[1:]], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())
    assert "500 samples of fixtures/fmnist_test_500.npz" in text
    m = re.search(r"top-1 accuracy (\d+\.\d+)% -> (\d+\.\d+)%", text)
    assert m is not None, text
    assert float(m.group(1)) > 88.0  # the fixture's 93 % on the full test set, on 500 of its images
    assert "on noise" not in text
