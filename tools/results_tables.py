#!/usr/bin/env python3
"""The docs' benchmark tables, regenerated from the committed rows in tools/results/*.jsonl.

A table that comes from rows sits between two marker comments in a docs page:

    <!-- results-table: latency.jsonl -->
    | ... the generated Markdown table ... |
    <!-- /results-table -->

`python tools/results_tables.py` rewrites every such table from its rows; `--check` only says which
tables differ (exit 1), which is what tests/test_readme.py asserts, so a table cannot drift from the
rows it claims to show. Tables whose numbers are not kept as rows stay hand-written and name their
source in the text. What the rows do not record (which code version a run used, a footnote) is kept
here, beside the renderer, keyed by the row's position or name.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "tools" / "results"
DOCS = ROOT / "docs"
MARKER = re.compile(r"(<!-- results-table: (?P<name>[\w.]+) -->\n)(?P<body>.*?)(<!-- /results-table -->)", re.S)

Row = dict[str, object]


def _rows(name: str) -> list[Row]:
    return [json.loads(line) for line in (RESULTS / name).read_text().splitlines() if line.strip()]


def _table(header: list[str], align: str, body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return "\n".join(lines) + "\n"


def _x(v: object) -> str:
    return f"x{float(v):.2f}"  # type: ignore[arg-type]


def _pct(v: object) -> str:
    return f"{100 * float(v):.2f} %"  # type: ignore[arg-type]


# ---- latency.jsonl: tools/bench_latency.py ---------------------------------------------------------

_LAT_MODELS = {"resnet20": "CIFAR ResNet-20", "resnet56": "CIFAR ResNet-56", "googlenet": "GoogLeNet (synthetic)",
               "resnet50": "ResNet-50 (synthetic)", "vgg16": "VGG-16 (synthetic)"}


def _variant_order(variant: str) -> int:
    if variant.startswith("default"):
        return 0
    if variant == "--latency-aware":
        return 1
    if variant.startswith("--target macs:"):
        return 3 if "--latency-aware" in variant else 2
    return 4


def latency_table(rows: list[Row]) -> str:
    models = list(_LAT_MODELS)
    rows = sorted(rows, key=lambda r: (models.index(str(r["model"])), _variant_order(str(r["variant"]))))
    body = []
    for r in rows:
        timed = r["isolated_ms"] is not None
        body.append([
            _LAT_MODELS[str(r["model"])], f"`{r['variant']}`", str(r["decomposed"]), _x(r["macs_ratio"]),
            f"{float(r['original_ms']):.2f} -> {float(r['compressed_ms']):.2f}",  # type: ignore[arg-type]
            _x(r["latency_ratio"]), f"{float(r['quotient']):.2f}",  # type: ignore[arg-type]
            str(r["reverted"]) if timed else "-",
            _x(float(r["isolated_ms"]) / float(r["profiled_ms"])) if timed else "-",  # type: ignore[arg-type]
        ])
    header = ["model", "variant", "layers decomposed", "MACs", "latency ms (median)", "latency ratio",
              "latency / MAC ratio", "reverted by timing", "isolated sum / profile"]
    return _table(header, "llrrrrrrr", body)


# ---- calibrate.jsonl: tools/bench_calibrate.py -----------------------------------------------------

# Which refit each run used (the rows do not record it), by row number in the file (1-based): the
# first run predates the alternation sweeps; 3 sweeps were the default until the last two rows.
_CAL_RUNS = [(range(1, 10), "no alternation"), (range(10, 19), "3 sweeps"), (range(19, 21), "1 sweep (default), idle machine")]


def _cal_run(i: int) -> str:
    return next(label for span, label in _CAL_RUNS if i in span)


def _policy(p: str) -> str:
    if p.startswith("vbmf x"):
        return f"EVBMF x {float(p[6:]):.2f}"
    kind, _, f = p.partition(":")
    return f"`{kind}:{float(f):.3g}`"


def calibrate_table(rows: list[Row]) -> str:
    models = list(dict.fromkeys(str(r["model"]) for r in rows))
    numbered = sorted(enumerate(rows, 1), key=lambda ir: (models.index(str(ir[1]["model"])), float(ir[1]["target_ratio"])))  # type: ignore[arg-type]
    body = [[
        f"{str(r['model']).removesuffix('.onnx')} ({_pct(r['original'])})", f"x{float(r['target_ratio']):g}",  # type: ignore[arg-type]
        _policy(str(r["policy"])), _x(r["macs_ratio"]), _x(r["params_ratio"]), str(r["cal_images"]),
        _pct(r["one_shot"]), _pct(r["calibrated"]), f"{float(r['wall_s']):.0f} s", _cal_run(i),  # type: ignore[arg-type]
    ] for i, r in numbered]
    header = ["model (original top-1)", "MAC target", "policy", "MACs", "params", "calibration images",
              "one-shot", "calibrated", "wall time", "refit"]
    return _table(header, "lllrrrrrrl", body)


# ---- finetune_*.jsonl: tools/bench_finetune.py -----------------------------------------------------

# Footnotes the rows cannot carry: (†) run before the epoch-0 rule existed.
_FT_NOTES = {("finetune_resnet20.jsonl", "control.adam3"), ("finetune_fmnist.jsonl", "control.adam1"),
             ("finetune_fmnist.jsonl", "control.adam1lr5e-4")}
_FT_KINDS = {"labels": "labels", "distill": "distillation only (`--teacher --no-labels`)",
             "both": "labels + distillation (`--teacher`, alpha 0.5)",
             "control": "control: the *original* fine-tuned with labels"}


def _recipe(command: str) -> str:
    args = shlex.split(command)

    def opt(name: str, default: str | None = None) -> str | None:
        return args[args.index(name) + 1] if name in args else default

    optimizer = opt("--optimizer", "sgd")
    lr = opt("--lr", "2e-3" if optimizer == "adam" else "1e-3")
    text = f"{'Adam' if optimizer == 'adam' else 'SGD'} {lr} {opt('--schedule', 'cosine')}, {opt('--epochs', '3')} ep"
    temperature = opt("--temperature")
    return text + (f", `--temperature {temperature}`" if temperature else "")


def _history(r: Row) -> str:
    hist = r.get("val_history") or []
    assert isinstance(hist, list)
    if not hist:
        return "-"
    accuracy = hist[0][0] is not None
    values = ", ".join(f"{100 * (h[0] if accuracy else h[1]):.1f}" for h in hist)
    return ("acc " if accuracy else "agreement ") + values


def finetune_table(rows: list[Row], name: str) -> str:
    seen: set[tuple[str, str, object]] = set()
    body = []
    models = {Path(str(r["model"])).name for r in rows}
    for r in rows:
        model, row = Path(str(r["model"])).name, str(r["row"])
        if row in ("original", "compressed"):
            if (model, row, r["top1"]) in seen:
                continue  # every variant run repeats the two reference rows
            seen.add((model, row, r["top1"]))
        totals = r["totals"]
        assert isinstance(totals, dict)
        compressed = row != "original" and not row.startswith("control")
        if row == "original":
            label = "original"
        elif row == "compressed":
            label = "compressed, before fine-tuning"
        else:
            label = f"{_FT_KINDS[row.split('.')[0]]}; {_recipe(str(r['command']))}"
        label += " (†)" if (name, row) in _FT_NOTES else ""
        wall = f"{float(r['wall_s']):.0f} s" if "wall_s" in r else "-"  # type: ignore[arg-type]
        cells = [label, _pct(r["top1"]), _x(totals["macs_ratio"]) if compressed else "x1",
                 _x(totals["params_ratio"]) if compressed else "x1", wall,
                 str(r["best_epoch"]) if "best_epoch" in r else "-", _history(r)]
        body.append(([model.removesuffix(".onnx")] if len(models) > 1 else []) + cells)
    header = ["run", "top-1 (test)", "MACs", "params", "fine-tuning wall time", "best epoch", "held-out per epoch"]
    align = "lrrrrrl"
    if len(models) > 1:
        header, align = ["model", *header], "l" + align
    return _table(header, align, body)


# ---- real_models.jsonl: tools/bench_real.py --------------------------------------------------------

_REAL_MODELS = ("darknet", "waifu2x", "resnet56", "resnet50", "vgg16")
_REAL_ROWS = ("original", "data:0.67", "data:0.5", "data:0.33", "data:0.67+lat", "data:0.5+lat", "data:0.33+lat", "evbmf")
_REAL_RUNTIMES = ("ort", "ort-mobile", "mnn")


def real_models_latest(rows: list[Row]) -> list[Row]:
    """The last row of each (model, row) in file order (a rerun replaces a row), in table order."""
    last: dict[tuple[str, str], Row] = {}
    for r in rows:
        last[(str(r["model"]), str(r["row"]))] = r

    def order(key: tuple[str, str]) -> tuple[int, str, int, str]:
        m, row = key
        return (_REAL_MODELS.index(m) if m in _REAL_MODELS else len(_REAL_MODELS), m,
                _REAL_ROWS.index(row) if row in _REAL_ROWS else len(_REAL_ROWS), row)

    return [last[k] for k in sorted(last, key=order)]


def _real_row_label(row: str) -> str:
    if row == "original":
        return "original"
    if row == "evbmf":
        return "EVBMF (default ranks)"
    policy, _, flag = row.partition("+")
    return f"`--ranks {policy} --calibrate`" + (" `--latency-aware`" if flag == "lat" else "")


def _real_score(r: Row) -> tuple[str, str]:
    """(score, top-1 agreement) cells."""
    m = r.get("metrics") or {}
    assert isinstance(m, dict)
    n = f" (n={r['eval_limit']})" if r.get("eval_limit") else ""
    if "psnr" in m:
        delta = "" if r["row"] == "original" else f" ({float(m['psnr_delta']):+.2f})"
        return f"{float(m['psnr']):.2f} dB{delta}", "-"
    if "top1" in m:
        score = f"{100 * float(m['top1']):.1f} %" + (f" / {100 * float(m['top5']):.1f} %" if r["model"] == "darknet" else "")
        agree = "-" if r["row"] == "original" else f"{100 * float(m['agreement']):.1f} %"
        return score + n, agree
    return "-", "-"


def real_models_table(rows: list[Row]) -> str:
    latest = real_models_latest(rows)
    original_ms: dict[tuple[str, str], float] = {}
    for r in latest:
        rts = r.get("runtimes") or {}
        assert isinstance(rts, dict)
        for name, x in rts.items():
            if x.get("original_ms") is not None:
                original_ms.setdefault((str(r["model"]), name), float(x["original_ms"]))
    body = []
    for r in latest:
        model, row = str(r["model"]), str(r["row"])
        label = str(r.get("label") or model)
        if r["status"] != "ok":
            error = str(r.get("error") or "?").splitlines()[0].split("compress failed", 1)[-1].strip(" :")
            body.append([label, _real_row_label(row), "-", "-", "failed: " + error[:120],
                         "-", "-", "-", "-", "-", "-", "-"])
            continue
        score, agree = _real_score(r)
        t = r.get("totals") or {}
        assert isinstance(t, dict)
        macs, params = (_x(t["macs_ratio"]), _x(t["params_ratio"])) if t else ("x1", "x1")
        rts = r.get("runtimes") or {}
        assert isinstance(rts, dict)
        lat = []
        for name in _REAL_RUNTIMES:
            if row == "original":
                ms = original_ms.get((model, name))
                lat.append("-" if ms is None else f"{ms:.2f} ms")
            else:
                x = rts.get(name)
                lat.append("-" if x is None else _x(x["speedup"]) if x.get("speedup") is not None else "failed")
        wall = f"{float(r['wall_s']):.0f} s" if r.get("wall_s") is not None else "-"  # type: ignore[arg-type]
        rss = f"{float(r['peak_rss_mb']) / 1024:.2f} GB" if r.get("peak_rss_mb") is not None else "-"  # type: ignore[arg-type]
        lay = r.get("layers") or {}
        assert isinstance(lay, dict)
        data = f"{lay['data_path']}/{lay['total']}" if lay and row.startswith("data") else "-"
        body.append([label, _real_row_label(row), macs, params, score, agree, *lat, wall, rss, data])
    header = ["model", "row", "MACs", "params", "top-1 (/ top-5) or PSNR", "top-1 agreement", "ORT CPU", "ORT format",
              "MNN", "compress", "peak RSS", "data path"]
    return _table(header, "llrrrrrrrrrr", body)


def int8_table(rows: list[Row]) -> str:
    """tools/bench_int8.py (issue 18): the four models of each row against the FP32 original; latency in
    onnxruntime CPU and in each deploy runtime the row measured (ORT format, MNN: `comparison.runtimes`)."""
    labels = {"resnet56": "CIFAR ResNet-56", "darknet": "Darknet Tiny", "fmnist": "Fashion-MNIST fixture"}
    short = {"ort-mobile": "ORT format", "mnn": "MNN", "ncnn": "ncnn"}
    names = list(dict.fromkeys(str(rt["name"]) for r in rows for rt in r["comparison"].get("runtimes", [])))  # type: ignore[attr-defined]
    body = []
    for r in rows:
        c = r["comparison"]
        assert isinstance(c, dict)
        ref = c["models"][0]
        cols = {str(rt["name"]): rt for rt in c.get("runtimes", [])}
        for m in c["models"]:
            acc = "-" if m["accuracy"] is None else f"{100 * m['accuracy']:.2f}%"
            sq = "exact" if m["sqnr_db"] is None else f"{m['sqnr_db']:.1f}"
            label = labels.get(str(r["model"]), str(r["model"]))
            if r.get("params_fraction") is not None:
                label += f" (params:{r['params_fraction']:g})"
            cells = [label, m["name"], acc, f"{100 * m['top1_agreement']:.2f}%",
                     sq, f"{m['size_bytes'] / 1e6:.2f} MB", f"x{ref['size_bytes'] / m['size_bytes']:.2f}",
                     f"{m['latency_ms']:.3f}", f"x{ref['latency_ms'] / m['latency_ms']:.2f}"]
            for n in names:
                rt = cols.get(n)
                cell = next((x for x in rt["models"] if x["name"] == m["name"]), None) if rt else None
                base = next((x for x in rt["models"] if x["name"] == ref["name"]), None) if rt else None
                if cell is None:
                    cells += ["-", "-"]
                elif cell["failure"]:
                    cells += [f"failed ({cell['failed_step']})", "-"]
                else:
                    ratio = (f"x{base['latency_ms'] / cell['latency_ms']:.2f}" if base and base["latency_ms"] else "-")
                    own = " (mnnquant)" if cell.get("quantizer") else ""  # MNN's own quantizer, not the QDQ file
                    cells += [f"{cell['latency_ms']:.3f}{own}", ratio]
            body.append([*cells, f"{r['wall_s']} s"])
    header = ["model", "row", "accuracy", "top-1 agreement", "output SQNR dB", "size", "size ratio", "ORT CPU ms",
              "latency ratio", *[h for n in names for h in (f"{short.get(n, n)} ms", f"{short.get(n, n)} ratio")],
              "compress + quantize"]
    return _table(header, "ll" + "r" * (len(header) - 2), body)


def int8_mnn_table(rows: list[Row]) -> str:
    """tools/bench_int8.py rows with MNN's own quantizer in the MNN column: per model, MNN FP32 against MNN
    INT8 (mnnquant, on the onnxruntime quantizer's calibration samples) and onnxruntime's INT8 (QDQ, CPU),
    original and compressed. MNN agreement / SQNR / accuracy on the comparison's first samples, against the
    FP32 original in onnxruntime CPU; latency ratios against the FP32 original in the same runtime."""
    labels = {"resnet56": "CIFAR ResNet-56", "darknet": "Darknet Tiny", "fmnist": "Fashion-MNIST fixture"}
    body = []
    for r in rows:
        c = r["comparison"]
        assert isinstance(c, dict)
        mnn = next((rt for rt in c.get("runtimes", []) if rt["name"] == "mnn"), None)
        if mnn is None:
            continue
        cells_by = {m["name"]: m for m in mnn["models"]}
        ort_by = {m["name"]: m for m in c["models"]}
        base, ort_base = cells_by.get("original FP32"), ort_by["original FP32"]
        for name in ("original FP32", "original INT8", "compressed FP32", "compressed INT8"):
            m, o = cells_by.get(name), ort_by.get(name)
            if m is None or o is None:
                continue
            label = labels.get(str(r["model"]), str(r["model"]))
            q = str(m.get("quantizer") or "")
            method = q.split(", ")[1].split()[0] if q.count(", ") and q.split(", ")[1].endswith("activations") else ""
            what = f"{name} (mnnquant {method})".replace(" )", ")") if q else name
            if m["failure"]:
                mnn_cells = [f"failed ({m['failed_step']})", "-", "-", "-", "-", "-"]
            else:
                sq = "exact" if m.get("sqnr_db") is None and m["top1_agreement"] == 1.0 else (
                    "-" if m.get("sqnr_db") is None else f"{m['sqnr_db']:.1f}")
                ratio = f"x{base['latency_ms'] / m['latency_ms']:.2f}" if base and base["latency_ms"] and m["latency_ms"] else "-"
                mnn_cells = ["-" if m.get("accuracy") is None else _pct(m["accuracy"]), _pct(m["top1_agreement"]), sq,
                             f"{m['size_bytes'] / 1e6:.2f} MB", f"{m['latency_ms']:.3f}", ratio]
            ort_sq = "exact" if o["sqnr_db"] is None else f"{o['sqnr_db']:.1f}"
            body.append([label, what, *mnn_cells, _pct(o["accuracy"]) if o["accuracy"] is not None else "-",
                         _pct(o["top1_agreement"]), ort_sq, f"x{ort_base['latency_ms'] / o['latency_ms']:.2f}"])
    header = ["model", "row", "MNN accuracy", "MNN top-1 agreement", "MNN output SQNR dB", "MNN size", "MNN ms",
              "MNN latency ratio", "ORT CPU accuracy", "ORT CPU top-1 agreement", "ORT CPU SQNR dB", "ORT CPU latency ratio"]
    return _table(header, "ll" + "r" * (len(header) - 2), body)


def refine_table(rows: list[Row]) -> str:
    """tools/bench_calibrate.py rows with `--policies data data+refine` (agreement column)."""
    body = [[str(r["model"]).removesuffix(".onnx"), f"`{r['policy']}`" + (f" ({r['refine_steps']} steps)" if r.get("refine_steps") else ""),
             _x(r["macs_ratio"]), str(r["cal_images"]), _pct(r["original"]), _pct(r["calibrated"]), _pct(r["agreement"]),
             f"{float(r['wall_s']):.0f} s", str(r["test_images"])] for r in rows]
    header = ["model", "policy", "MACs", "calibration images", "original", "top-1", "top-1 agreement", "wall time", "test images"]
    return _table(header, "llrrrrrrr", body)


# ---- coverage_finetune.jsonl: tools/finetune_coverage.py ---------------------------------------------

def _short_change(c: str) -> str:
    return re.sub(r" \((from|their|all but|the batch|onnx2torch)[^)]*\)", "", c)


def coverage_table(rows: list[Row]) -> str:
    body = []
    for r in rows:
        yes = "yes" if r["converts"] else "**no**"
        err = r.get("round_trip_max_rel")
        what = "; ".join(_short_change(str(c)) for c in r.get("normalisation", []) or []) or "-"  # type: ignore[union-attr]
        if not r["exports"]:
            what = "refused: " + str(r.get("refused", "")).split(": ", 1)[-1]
        body.append([str(r["model"]), f"{r['producer'] or '?'}, {r['opset']}", yes, "yes" if r["trains"] else "-",
                     "yes" if r["exports"] else "-", "-" if err is None else f"{float(err):.1e}", what])  # type: ignore[arg-type]
    return _table(["model", "exporter, opset", "converts", "trains 1 epoch", "exports", "round-trip max rel err",
                   "normalised / refused"], "llllrrl", body)


# ---- crnn.jsonl: tools/bench_crnn.py ------------------------------------------------------------------

def crnn_table(rows: list[Row]) -> str:
    """One line per model and rank policy; the original once (every run reads the same original)."""
    body, seen = [], set()
    for r in rows:
        if r["row"] == "original":
            if "original" in seen:
                continue
            seen.add("original")
            what, macs = "original (project-trained, tools/make_crnn.py)", "-"
        else:
            what = f"`{r['ranks']}` calibrated" + (", + distilled (no labels)" if r["row"] == "distilled" else "")
            macs = _x(r["macs_ratio"])
        n, m = int(r["heldout_lines"]), int(r["test500_lines"])  # type: ignore[call-overload]
        body.append([what, macs, f"**{r['heldout_same']}/{n}**", f"{r['heldout_right']}/{n}",
                     f"{r['test500_same']}/{m}", f"{r['test500_right']}/{m}", _pct(r["test500_chars"]),
                     "-" if r["wall_s"] is None else f"{float(r['wall_s']):.0f} s"])  # type: ignore[arg-type]
    header = ["model", "MACs (Conv, MatMul)", "20 held-out: read as the original", "20 held-out: right", "500 more: as the original",
              "500 more: right", "500 more: characters right", "wall time"]
    return _table(header, "llrrrrrr", body)


RENDERERS: dict[str, Callable[[list[Row]], str]] = {
    "crnn.jsonl": crnn_table,
    "calibrate_refine_resnet56.jsonl": refine_table,
    "coverage_finetune.jsonl": coverage_table,
    "latency.jsonl": latency_table,
    "calibrate.jsonl": calibrate_table,
    "real_models.jsonl": real_models_table,
    "int8.jsonl": int8_table,
    "int8_mnnquant.jsonl": int8_mnn_table,
}


def render(name: str) -> str:
    """The Markdown table for tools/results/NAME."""
    if name.startswith("finetune_"):
        return finetune_table(_rows(name), name)
    return RENDERERS[name](_rows(name))


def regenerate(text: str) -> str:
    """`text` with every marked table replaced by what its rows give."""
    return MARKER.sub(lambda m: m.group(1) + render(m.group("name")) + m.group(4), text)


def pages() -> list[Path]:
    return [p for p in sorted(DOCS.glob("*.md")) if MARKER.search(p.read_text(encoding="utf-8"))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="only report tables that differ from their rows (exit 1)")
    args = ap.parse_args()
    stale = []
    for page in pages():
        old = page.read_text(encoding="utf-8")
        new = regenerate(old)
        if new != old:
            stale.append(page.relative_to(ROOT))
            if not args.check:
                page.write_text(new, encoding="utf-8")
    for page in stale:
        print(f"{page}: {'differs from' if args.check else 'regenerated from'} tools/results")
    return 1 if stale and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
