"""Time `onnx-tucker compress` end to end on one or more models (a benchmark, not a test).

Each run is a fresh process (`python -m onnx_tucker.cli compress IN OUT --quiet ...`), so the
figures include interpreter start-up, imports, load, planning, decomposition, rewrite, validation
(unless --no-validate is passed through) and the atomic save; peak RSS comes from wait4().

    python tools/bench_compress.py fixtures/fmnist_vgg.onnx ../shared/data/cifar10-resnets/resnet56.onnx
    python tools/bench_compress.py --runs 5 MODEL.onnx -- --no-validate --ranks ratio:0.25
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


def compress_command(model: Path, extra: list[str], out_dir: str) -> tuple[list[str], str]:
    """The child's command line and the model it writes (`OUT_DIR/STEM.tucker.onnx`)."""
    out = os.path.join(out_dir, model.stem + ".tucker.onnx")
    return [sys.executable, "-m", "onnx_tucker.cli", "compress", str(model), out, "--quiet", *extra], out


def run_once(model: Path, extra: list[str], out_dir: str, timeout: float | None = None) -> tuple[float, int]:
    """(wall seconds, peak RSS bytes) of one `compress` in a fresh process; SystemExit with the
    child's stderr when it fails (a signal reads as a negative exit code) or runs past `timeout`."""
    cmd, _ = compress_command(model, extra, out_dir)
    # stderr to a file, not a pipe nobody reads while the child runs (a long one would block it).
    with tempfile.TemporaryFile() as err_file:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err_file)
        timer = threading.Timer(timeout, proc.kill) if timeout is not None else None
        if timer is not None:
            timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            if timer is not None:
                timer.cancel()
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        err_file.seek(0)
        err = err_file.read().decode(errors="replace")
    if proc.returncode != 0:
        late = f" (killed after the {timeout:g} s timeout)" if timeout is not None and wall >= timeout else ""
        raise SystemExit(f"{model}: compress failed (exit {proc.returncode}{late}): {err.strip()}")
    return wall, usage.ru_maxrss * 1024  # ru_maxrss is in KiB on Linux


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", type=Path)
    ap.add_argument("--runs", type=int, default=3, help="timed runs per model (median reported)")
    argv = sys.argv[1:]
    # Everything after "--" goes to `compress` (argparse would take it for more model paths).
    cut = argv.index("--") if "--" in argv else len(argv)
    args, extra = ap.parse_known_args(argv[:cut])
    extra += argv[cut + 1 :]
    import numpy
    import onnx
    import onnxruntime

    print(
        f"# {platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}, numpy {numpy.__version__}, "
        f"onnx {onnx.__version__}, onnxruntime {onnxruntime.__version__}; extra args: {' '.join(extra) or '-'}"
    )
    print("| model | file MB | runs | median s | min s | max s | peak RSS MB |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            if not model.is_file():
                print(f"| {model} | missing | - | - | - | - | - |")
                continue
            results = [run_once(model, extra, tmp) for _ in range(args.runs)]
            walls = [w for w, _ in results]
            rss = max(r for _, r in results)
            print(
                f"| {model.name} | {model.stat().st_size / 1e6:.2f} | {args.runs} | {statistics.median(walls):.2f} | "
                f"{min(walls):.2f} | {max(walls):.2f} | {rss / 1e6:.0f} |"
            )


if __name__ == "__main__":
    main()
