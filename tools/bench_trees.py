"""Time `onnx-tucker compress` from two (or more) source trees, interleaved run by run (a benchmark).

Each run is a fresh process with PYTHONPATH set to one tree (`tools/bench_compress.py`'s `run_once`:
wall time, peak RSS from wait4); the trees take turns, so a busy machine slows them alike. Prints the
per-run figures and the medians.

    python tools/bench_trees.py /tmp/vgg16.onnx --trees ../wt-base . --runs 3 -- --no-validate
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_compress import run_once  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path)
    ap.add_argument("--trees", nargs="+", type=Path, required=True)
    ap.add_argument("--runs", type=int, default=3)
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)
    args = ap.parse_args(argv[:cut])
    extra = argv[cut + 1 :]
    results: dict[Path, list[tuple[float, int]]] = {t: [] for t in args.trees}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.runs):
            for tree in args.trees:
                os.environ["PYTHONPATH"] = str(tree.resolve())
                wall, rss = run_once(args.model, extra, tmp)
                results[tree].append((wall, rss))
                print(f"run {i + 1} {tree}: {wall:.2f} s, peak RSS {rss / 2**20:.0f} MiB", flush=True)
    print("| tree | runs | median s | median peak RSS MiB | max peak RSS MiB |")
    print("|---|---:|---:|---:|---:|")
    for tree, rs in results.items():
        print(f"| {tree} | {len(rs)} | {statistics.median(w for w, _ in rs):.2f} | "
              f"{statistics.median(r for _, r in rs) / 2**20:.0f} | {max(r for _, r in rs) / 2**20:.0f} |")


if __name__ == "__main__":
    main()
