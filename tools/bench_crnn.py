"""CRNN benchmark (issue 20's CRNN figure; not a test): a text-line recogniser compressed at x2 MACs on
unlabeled lines, then distilled from the original on them (no labels); strings read by greedy CTC
decoding, in onnxruntime, on the 20 held-out lines (and 500 more for a steadier count): how many each
model reads exactly as the original does, and how many it reads right.

The CRNN is the project's own (tools/make_crnn.py: trained here on Pillow-rendered lines, seeded; no
conv + LSTM CRNN was found in a wheel); it is made when --work has none. Every step is the CLI in a
fresh process; the exact commands are recorded with the rows appended to --results.

    python tools/bench_crnn.py --work /tmp/crnn --results tools/results/crnn.jsonl
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_crnn import edit_distance, greedy  # noqa: E402


def read(model: Path, x: np.ndarray, threads: int) -> list[str]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return [s for i in range(0, len(x), 100) for s in greedy(sess.run(None, {name: x[i : i + 100]})[0])]


def _run(cmd: list[str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"failed ({p.returncode}): {shlex.join(cmd)}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return time.perf_counter() - t0, p.stdout + p.stderr


def _cli(cmd: list[str]) -> str:
    return "onnx-tucker " + " ".join(shlex.quote(c) for c in cmd[3:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/crnn"), help="holds (or gets) crnn.onnx, lines.npz, heldout.npz")
    ap.add_argument("--ranks", default="data:0.5")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--lr", default="3e-4")
    ap.add_argument("--temperature", default="1")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--extra", default="", help="extra arguments for `finetune` (quoted)")
    ap.add_argument("--tag", default="", help="suffix for this configuration's output names and rows")
    ap.add_argument("--threads", type=int, default=1, help="torch and onnxruntime threads")
    ap.add_argument("--results", type=Path, default=None, help="append the rows (JSON lines) here")
    args = ap.parse_args()

    w = args.work
    orig, lines, held = w / "crnn.onnx", w / "lines.npz", w / "heldout.npz"
    if not (orig.exists() and lines.exists() and held.exists()):
        make = [sys.executable, str(Path(__file__).with_name("make_crnn.py")), "--out", str(w), "--threads", str(args.threads)]
        print("making the CRNN:", shlex.join(make), flush=True)
        subprocess.run(make, check=True)
    made = json.loads((w / "crnn.json").read_text())
    py = [sys.executable, "-m", "onnx_tucker.cli"]
    tag = f".{args.tag}" if args.tag else ""
    stem = "crnn." + args.ranks.replace(":", "") + tag
    comp, ft, report = w / f"{stem}.onnx", w / f"{stem}.ft.onnx", w / f"{stem}.json"
    c_cmd = [*py, "compress", str(orig), str(comp), "--ranks", args.ranks, "--calibrate", str(lines), "--report", str(report)]
    c_s, _ = _run(c_cmd)
    totals = json.loads(report.read_text())["totals"]
    f_cmd = [*py, "finetune", str(comp), str(ft), "--data", str(lines), "--teacher", str(orig), "--no-labels",
             "--no-augment", "--optimizer", "adam", "--lr", args.lr, "--temperature", args.temperature,
             "--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--torch-threads", str(args.threads),
             *shlex.split(args.extra)]
    f_s, out = _run(f_cmd)
    print(out[-1500:])

    h = np.load(held)
    tests = {"heldout": (h["image"], [str(t) for t in h["texts"]])}
    if (w / "test500.npz").exists():
        t5 = np.load(w / "test500.npz")
        tests["test500"] = (t5["image"], [str(t) for t in t5["texts"]])
    reads = {k: {m: read(p, x, args.threads) for m, p in (("original", orig), ("compressed", comp), ("distilled", ft))}
             for k, (x, _) in tests.items()}
    rows = []
    for m, wall, cmd in (("original", made.get("train_s"), None), ("compressed", c_s, _cli(c_cmd)), ("distilled", f_s, _cli(f_cmd))):
        row: dict[str, object] = {"model": "crnn", "tag": args.tag, "ranks": args.ranks, "row": m,
                                  "distill_lines": int(np.load(lines)["image"].shape[0]), "macs_ratio": None if m == "original" else
                                  totals["macs_before"] / totals["macs_after"], "wall_s": None if wall is None else round(float(wall), 1),
                                  "command": cmd}
        for k, (_, texts) in tests.items():
            got, ref = reads[k][m], reads[k]["original"]
            row[f"{k}_lines"] = len(texts)
            row[f"{k}_same"] = sum(a == b for a, b in zip(got, ref, strict=True))
            row[f"{k}_right"] = sum(a == b for a, b in zip(got, texts, strict=True))
            row[f"{k}_chars"] = 1.0 - sum(edit_distance(t, g) for g, t in zip(got, texts, strict=True)) / sum(len(t) for t in texts)
        rows.append(row)
    rows[0]["command"] = "python tools/make_crnn.py " + " ".join(
        f"--{k.replace('_', '-')} {made[k]}" for k in ("seed", "steps", "lr", "train_lines", "lines") if k in made)
    for r in rows:
        print(json.dumps(r))
    for k, (_, texts) in tests.items():
        print(f"\n{k}: {len(texts)} lines")
        print("| model | same as the original | right | characters right | wall time |")
        print("|---|---:|---:|---:|---:|")
        for r in rows:
            print(f"| {r['row']} | {r[f'{k}_same']}/{len(texts)} | {r[f'{k}_right']}/{len(texts)} | {100 * float(r[f'{k}_chars']):.1f} % "  # type: ignore[arg-type]
                  f"| {r['wall_s']} s |")
    if "heldout" in reads:
        texts = tests["heldout"][1]
        for i, t in enumerate(texts):
            o, c, d = (reads["heldout"][m][i] for m in ("original", "compressed", "distilled"))
            if not (o == c == d == t):
                print(f"  line {i}: true {t!r}, original {o!r}, compressed {c!r}, distilled {d!r}")
    if args.results is not None:
        with open(args.results, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
