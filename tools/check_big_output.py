"""An output over 2 GB, end to end (issue 7): compress the 2.29 GB VGG-16 at 512x512 at full rank.

Makes `vgg16_512.onnx` with tools/make_synthetic.py when missing (external data, 2.29 GB), runs
`onnx-tucker compress vgg16_512.onnx OUT --ranks full --no-validate` in a fresh process (wall time,
peak RSS from wait4), and checks the result: OUT plus `OUT.data` exist, `onnx.checker` passes on the
path, peak RSS is below 2.5x the larger of input and output. `--validate` / `--bench` also run
`onnx-tucker validate` / `bench` on the pair (each a fresh process, timed the same way). Everything it
wrote is deleted afterwards unless --keep.

    python tools/check_big_output.py --work-dir /tmp/big
    python tools/check_big_output.py --work-dir /tmp/big --validate --bench --keep
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _timed(cmd: list[str]) -> tuple[float, int, str]:
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    text = proc.stdout.read().decode()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"failed (exit {code}): {' '.join(cmd)}\n{text.strip()}")
    return wall, usage.ru_maxrss * 1024, text.strip()


def _size(path: Path) -> int:
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work-dir", type=Path, default=Path("/tmp/onnx-tucker-big"))
    ap.add_argument("--ranks", default="full")
    ap.add_argument("--validate", action="store_true", help="also run `onnx-tucker validate` on the pair")
    ap.add_argument("--bench", action="store_true", help="also run `onnx-tucker bench` on the pair")
    ap.add_argument("--keep", action="store_true", help="keep the models afterwards")
    args = ap.parse_args()
    work: Path = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    src, out = work / "vgg16_512.onnx", work / "vgg16_512.tucker.onnx"
    py = sys.executable
    made = not src.exists()
    try:
        if made:
            subprocess.run([py, str(ROOT / "tools" / "make_synthetic.py"), "vgg16", str(src), "--image-size", "512"], check=True)
        cli = [py, "-m", "onnx_tucker.cli"]
        wall, rss, _ = _timed([*cli, "compress", str(src), str(out), "--ranks", args.ranks, "--no-validate", "--quiet"])
        import onnx

        onnx.checker.check_model(str(out))
        size_in, size_out = _size(src), _size(out)
        bound = 2.5 * max(size_in, size_out)
        print(f"compress --ranks {args.ranks}: {wall:.1f} s, peak RSS {rss / 2**30:.2f} GiB; "
              f"input {size_in / 1e9:.2f} GB, output {size_out / 1e9:.2f} GB (OUT.data: "
              f"{out.with_name(out.name + '.data').exists()}); peak / max(in, out) = {rss / max(size_in, size_out):.2f} "
              f"({'within' if rss < bound else 'OVER'} the 2.5x bound)")
        for cmd, wanted in (("validate", args.validate), ("bench", args.bench)):
            if wanted:
                extra = ["--runs", "3", "--warmup", "1"] if cmd == "bench" else ["--samples", "1"]
                w, r, text = _timed([*cli, cmd, str(src), str(out), *extra])
                print(f"{cmd}: {w:.1f} s, peak RSS {r / 2**30:.2f} GiB\n{text}")
        if rss >= bound:
            raise SystemExit(1)
    finally:
        if not args.keep:
            for p in (out, out.with_name(out.name + ".data")) + ((src, src.with_name(src.name + ".data")) if made else ()):
                if p.exists():
                    p.unlink()
            if made and not any(work.iterdir()):
                shutil.rmtree(work)


if __name__ == "__main__":
    main()
