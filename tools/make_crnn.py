"""A project-trained CRNN text-line recogniser (issue 20's CRNN figure; not a test, not a downloaded model).

No pip wheel found holds a conv + LSTM CRNN in ONNX (PP-OCRv4's recogniser is SVTR), so this tool makes
one, seeded: it renders text lines with Pillow (DejaVu Sans if installed, else Pillow's default font;
random strings of digits and lowercase letters, 4-10 characters, random size, offset, grey levels and
noise; grayscale 32 x 128, pixels in [0, 1]), trains a small CRNN on them with their texts (6 convs
with BatchNorm / ReLU / MaxPool down to height 1, a bidirectional LSTM, a Linear to 36 characters +
the CTC blank, CTC loss) on the CPU, prints greedy-CTC accuracy on held-out lines, and exports it with
`torch.onnx.export(dynamo=False, opset_version=17)`: the graph holds a real ONNX `LSTM` node; input
`image` [N, 1, 32, 128], output `logits` [T=32, N, 37] (time first, raw scores; blank = class 0).

It also writes, for `compress --calibrate` and `finetune --data ... --no-labels`, an .npz of unlabeled
lines (key `image`), and an .npz of held-out lines with their texts (keys `image`, `texts`):

    python tools/make_crnn.py --out /tmp/crnn --steps 720 --lines 4000
    # /tmp/crnn/crnn.onnx, /tmp/crnn/lines.npz (4000 unlabeled), /tmp/crnn/heldout.npz (20 + texts)

Everything is seeded (--seed); torch runs on one thread (--threads).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

CHARS = "0123456789abcdefghijklmnopqrstuvwxyz"
H, W = 32, 128
FONT_PATHS = ("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
              "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf")


def _font(size: int):  # type: ignore[no-untyped-def]
    from PIL import ImageFont

    for p in FONT_PATHS:
        if Path(p).exists():
            return ImageFont.truetype(p, size)
    return ImageFont.load_default(size=size)


class Renderer:
    """Seeded text lines: `render(n)` -> (images [n, 1, H, W] float32 in [0, 1], texts)."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.fonts = {s: _font(s) for s in range(16, 23)}

    def line(self) -> tuple[np.ndarray, str]:
        from PIL import Image, ImageDraw

        rng = self.rng
        text = "".join(rng.choice(list(CHARS), size=int(rng.integers(4, 11))))
        size = int(rng.integers(16, 23))
        while True:
            font = self.fonts[size]
            x0, y0, x1, y1 = font.getbbox(text)
            if x1 - x0 <= W - 4 or size == 16:
                break
            size -= 1
        bg = int(rng.integers(170, 256))
        fg = int(rng.integers(0, max(1, bg - 120)))
        img = Image.new("L", (W, H), color=bg)
        dx = int(rng.integers(0, max(1, W - (x1 - x0) - 1)))
        dy = int(rng.integers(-1, 2)) + (H - (y1 - y0)) // 2
        ImageDraw.Draw(img).text((dx - x0, dy - y0), text, fill=fg, font=font)
        a = np.asarray(img, dtype=np.float32) / 255.0
        a = a + rng.normal(0.0, float(rng.uniform(0.0, 0.06)), a.shape).astype(np.float32)
        return np.clip(a, 0.0, 1.0), text

    def render(self, n: int) -> tuple[np.ndarray, list[str]]:
        pairs = [self.line() for _ in range(n)]
        return np.stack([p[0] for p in pairs])[:, None], [p[1] for p in pairs]


def build(hidden: int = 96):  # type: ignore[no-untyped-def]
    import torch
    from torch import nn

    def block(i: int, o: int, pool: tuple[int, int] | None) -> list[nn.Module]:
        layers: list[nn.Module] = [nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU()]
        return layers + ([nn.MaxPool2d(pool, pool)] if pool else [])

    class CRNN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.cnn = nn.Sequential(*block(1, 16, (2, 2)), *block(16, 32, (2, 2)), *block(32, 64, None),
                                     *block(64, 64, (2, 1)), *block(64, 128, (2, 1)), *block(128, 128, (2, 1)))
            self.rnn = nn.LSTM(128, hidden, bidirectional=True)
            self.fc = nn.Linear(2 * hidden, len(CHARS) + 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            f = self.cnn(x).squeeze(2).permute(2, 0, 1)  # [N, C, 1, T] -> [T, N, C]
            y, _ = self.rnn(f)
            return self.fc(y)  # [T, N, classes]

    return CRNN()


def greedy(logits: np.ndarray) -> list[str]:
    """Greedy CTC decoding of [T, N, C] scores (blank 0): best class per step, repeats merged, blanks dropped."""
    best = logits.argmax(axis=2).T  # [N, T]
    out = []
    for row in best:
        s, prev = [], 0
        for c in row:
            if c != prev and c != 0:
                s.append(CHARS[c - 1])
            prev = c
        out.append("".join(s))
    return out


def edit_distance(a: str, b: str) -> int:
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


def _accuracy(pred: list[str], texts: list[str]) -> tuple[float, float]:
    """(exact strings, character accuracy = 1 - edit distance / true length, pooled)."""
    strings = float(np.mean([p == t for p, t in zip(pred, texts, strict=True)]))
    errors = sum(edit_distance(t, p) for p, t in zip(pred, texts, strict=True))
    return strings, 1.0 - errors / sum(len(t) for t in texts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("/tmp/crnn"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=720, help="Adam steps (about 8 minutes on one CPU thread)")
    ap.add_argument("--train-lines", type=int, default=20000, help="labelled lines rendered for training (cycled)")
    ap.add_argument("--lines", type=int, default=4000, help="unlabeled lines for calibration / distillation")
    ap.add_argument("--heldout", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3, help="Adam, cosine to 0 over --steps (2e-3 stalls at all-blank)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    # Separate seeded streams: training lines, unlabeled lines, held-out lines, the accuracy check.
    xtr, ytr = Renderer(args.seed).render(args.train_lines)
    xul, _ = Renderer(args.seed + 1).render(args.lines)
    xho, yho = Renderer(args.seed + 2).render(args.heldout)
    xte, yte = Renderer(args.seed + 3).render(500)
    print(f"rendered {len(xtr) + len(xul) + len(xho) + len(xte)} lines in {time.perf_counter() - t0:.1f} s")

    model = build()
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    ctc = torch.nn.CTCLoss(blank=0, zero_infinity=True)
    targets = [torch.tensor([CHARS.index(c) + 1 for c in t]) for t in ytr]
    rng = np.random.default_rng(args.seed)
    t1 = time.perf_counter()
    step = 0
    while step < args.steps:
        idx = rng.choice(len(xtr), size=args.batch_size, replace=False)
        for g in opt.param_groups:  # cosine decay over the steps
            g["lr"] = args.lr * 0.5 * (1.0 + np.cos(np.pi * step / args.steps))
        model.train()
        logp = model(torch.from_numpy(xtr[idx])).log_softmax(2)
        tg = [targets[i] for i in idx]
        loss = ctc(logp, torch.cat(tg), torch.full((len(idx),), logp.shape[0], dtype=torch.long),
                   torch.tensor([len(t) for t in tg]))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
        step += 1
        if step % 100 == 0:
            model.eval()
            with torch.no_grad():
                s, c = _accuracy(greedy(model(torch.from_numpy(xte[:200])).numpy()), yte[:200])
            print(f"step {step} ({time.perf_counter() - t1:.0f} s): ctc {loss.item():.3f}, held-out strings {s:.1%}, chars {c:.1%}",
                  flush=True)
    train_s = time.perf_counter() - t1
    model.eval()
    with torch.no_grad():
        s_te, c_te = _accuracy(greedy(model(torch.from_numpy(xte)).numpy()), yte)
        s_ho, c_ho = _accuracy(greedy(model(torch.from_numpy(xho)).numpy()), yho)
    path = args.out / "crnn.onnx"
    torch.onnx.export(model, (torch.from_numpy(xho[:1]),), str(path), dynamo=False, opset_version=17,
                      input_names=["image"], output_names=["logits"],
                      dynamic_axes={"image": {0: "N"}, "logits": {1: "N"}})
    np.savez(args.out / "lines.npz", image=xul)
    np.savez(args.out / "heldout.npz", image=xho, texts=np.array(yho))
    np.savez(args.out / "test500.npz", image=xte, texts=np.array(yte))
    info = {"steps": step, "train_s": round(train_s, 1), "test500_strings": s_te, "test500_chars": c_te,
            "heldout_strings": s_ho, "heldout_chars": c_ho, "seed": args.seed, "lr": args.lr,
            "train_lines": args.train_lines, "lines": args.lines}
    (args.out / "crnn.json").write_text(json.dumps(info) + "\n")
    print(json.dumps(info))
    print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB), {args.out / 'lines.npz'}, {args.out / 'heldout.npz'}")


if __name__ == "__main__":
    main()
