#!/usr/bin/env python3
"""Synthetic big models with realistic weights, for the scale benchmarks (never shipped, never in tests).

Models:
- ``vgg16``: VGG-16 (13 convs + 3 FC, ReLU, max-pool, Flatten, Gemm transB=1 as PyTorch exports it),
  opset 17, IR 8, input ``input`` [N, 3, 224, 224] with a dynamic batch, output ``logits`` [N, 1000].
  138 M parameters, a 528 MiB file.
- ``vgg16 --image-size 512``: the same network on 512x512 inputs, so FC6 reads 512*16*16 = 131072 features
  (537 M parameters in FC6 alone, a 2.3 GB model): written with external data (``OUT.data``).
- ``googlenet`` / ``resnet50``: ``light_inception_v1`` / ``light_resnet50`` from the onnx wheel
  (onnx/backend/test/data/light/, opset 9, IR 3), whose parameters are ``ConstantOfShape(0.02)``
  nodes: each is replaced by an initializer with realistic values, the shape initializers and the
  graph inputs duplicating initializers are removed and IR is raised to 4.

Realistic weights (after ../shared/notes/prototype-findings.md section 1): a conv kernel
T x S x k x k is ``G x_1 (Q_T diag(s)) x_2 (Q_S diag(s))`` with G Gaussian, Q random orthogonal and
power-law values ``s_i = 1 / (1 + i)``; an FC weight is ``U diag(s) V^T`` with the same power law.
Both get isotropic Gaussian noise of 0.3 x the signal rms and are scaled to He's std sqrt(2 / fan_in).
The FC low-rank part is built from thin factors (rank <= 512: beyond that the power law is far below
the noise), so no SVD or square orthogonal matrix of a 4096 x 25088 weight is ever formed; the FC is
generated in row blocks, which keeps memory flat for the multi-GB variant. Biases and BN means are
N(0, 0.05^2), BN scales and variances U(0.5, 1.5). Every tensor has its own seed: a model is the same
bytes on every run.

    python tools/make_synthetic.py vgg16 /tmp/vgg16.onnx
    python tools/make_synthetic.py vgg16 /tmp/vgg16_512.onnx --image-size 512
    python tools/make_synthetic.py resnet50 /tmp/resnet50.onnx
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import scipy.linalg
from onnx import TensorProto, helper, numpy_helper

NOISE = 0.3  # noise rms relative to the signal rms
FC_SIGNAL_RANK = 512
PROTOBUF_LIMIT = 2**31 - 2**24
VGG16_CONVS = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


# ------------------------------------------------------------------------------------------ weights


def _rng(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, index])


def _orthonormal(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    """n x k with orthonormal columns, random: the Q of a Gaussian matrix.

    CholeskyQR2 (Q = X R^-1 with R from the Cholesky factor of X^T X, done twice) instead of
    Householder QR: all BLAS-3, 10-50x faster here on tall matrices, and orthonormal to ~1e-15
    for a Gaussian X (condition number ~ n).
    """
    q = rng.standard_normal((n, k))
    for _ in range(2):
        r = np.linalg.cholesky(q.T @ q).T
        q = scipy.linalg.solve_triangular(r, q.T, trans="T").T
    return q


def _power_law(n: int) -> np.ndarray:
    return 1.0 / (1.0 + np.arange(n))


def conv_weight(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """T x S x k... kernel: power-law spectra on both channel modes, noise, He scale (float32)."""
    t, s = shape[0], shape[1]
    g = rng.standard_normal(shape)
    a_out = _orthonormal(rng, t, t) * _power_law(t)
    a_in = _orthonormal(rng, s, s) * _power_law(s)
    k = np.einsum("tT,sS,TS...->ts...", a_out, a_in, g, optimize=True)
    rms = float(np.sqrt(np.mean(k * k)))
    k += rng.standard_normal(shape) * (NOISE * rms)
    fan_in = int(np.prod(shape[1:]))
    k *= np.sqrt(2.0 / fan_in) / float(np.std(k))
    return k.astype(np.float32)


def fc_rows(rng: np.random.Generator, n_out: int, n_in: int, block: int = 512):
    """Yield the n_out x n_in weight (Gemm transB=1 layout) in row blocks, float32.

    The signal U diag(s) V^T has rank <= 512 and unit-norm factors, so its rms is known in closed
    form and every block can be scaled without a second pass.
    """
    r = min(n_out, n_in, FC_SIGNAL_RANK)
    s = _power_law(r)
    u = (_orthonormal(rng, n_out, r) * s).astype(np.float32)
    v_t = np.ascontiguousarray(_orthonormal(rng, n_in, r).T.astype(np.float32))
    rms = float(np.sqrt(np.sum(s * s) / (n_out * n_in)))
    scale = np.float32(np.sqrt(2.0 / n_in) / (rms * np.sqrt(1.0 + NOISE**2)))
    noise = np.float32(NOISE * rms)
    for i in range(0, n_out, block):
        rows = u[i : i + block] @ v_t
        rows += rng.standard_normal(rows.shape, dtype=np.float32) * noise
        rows *= scale
        yield rows


def fc_weight(rng: np.random.Generator, n_out: int, n_in: int) -> np.ndarray:
    return np.concatenate(list(fc_rows(rng, n_out, n_in)), axis=0)


def small_param(rng: np.random.Generator, name: str, shape: tuple[int, ...]) -> np.ndarray:
    """Biases, BN parameters: by the usual Caffe2 / PyTorch name suffixes."""
    lower = name.lower()
    if any(x in lower for x in ("_s_0", "scale", "_riv", "var")):
        return rng.uniform(0.5, 1.5, shape).astype(np.float32)
    return (rng.standard_normal(shape) * 0.05).astype(np.float32)


# ---------------------------------------------------------------------------------------- writing


class _ExternalWriter:
    """Tensors appended to one data file as they are made: memory stays at one tensor block."""

    def __init__(self, data_path: Path) -> None:
        self.path = data_path
        self.f = open(data_path, "wb")  # noqa: SIM115 - closed in close()

    def tensor(self, name: str, shape: tuple[int, ...], blocks) -> TensorProto:  # type: ignore[no-untyped-def]
        pad = (-self.f.tell()) % 4096
        self.f.write(b"\0" * pad)
        offset = self.f.tell()
        for b in blocks:
            self.f.write(np.ascontiguousarray(b, dtype="<f4").tobytes())
        length = self.f.tell() - offset
        t = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=list(shape))
        t.data_location = TensorProto.EXTERNAL
        for k, v in (("location", self.path.name), ("offset", str(offset)), ("length", str(length))):
            e = t.external_data.add()
            e.key, e.value = k, v
        return t

    def close(self) -> None:
        self.f.close()


def vgg16(out: Path, image_size: int = 224, classes: int = 1000, fc_width: int = 4096, seed: int = 0) -> Path:
    """VGG-16 as PyTorch exports it; external data when the weights exceed protobuf's 2 GB."""
    if image_size % 32:
        raise SystemExit("--image-size must be a multiple of 32")
    n_params = 0
    cin = 3
    for c in VGG16_CONVS:
        if c != "M":
            n_params += int(c) * cin * 9 + int(c)
            cin = int(c)
    feat = 512 * (image_size // 32) ** 2
    fcs = [(fc_width, feat), (fc_width, fc_width), (classes, fc_width)]
    n_params += sum(a * b + a for a, b in fcs)
    external = n_params * 4 > PROTOBUF_LIMIT
    writer = _ExternalWriter(out.with_name(out.name + ".data")) if external else None

    def weight(name: str, shape: tuple[int, ...], index: int) -> TensorProto:
        rng = _rng(seed, index)
        if len(shape) == 4:
            blocks = [conv_weight(rng, shape)]
        else:
            blocks = fc_rows(rng, shape[0], shape[1])
        if writer is not None and int(np.prod(shape)) >= 1024:
            return writer.tensor(name, shape, blocks)
        return numpy_helper.from_array(np.concatenate(list(blocks), axis=0), name)

    nodes, inits = [], []
    x, cin, idx, stage, sub = "input", 3, 0, 1, 1
    for c in VGG16_CONVS:
        if c == "M":
            y = f"pool{stage}"
            nodes.append(helper.make_node("MaxPool", [x], [y], name=y, kernel_shape=[2, 2], strides=[2, 2]))
            x, stage, sub = y, stage + 1, 1
            continue
        name = f"conv{stage}_{sub}"
        idx += 1
        inits.append(weight(f"{name}.weight", (int(c), cin, 3, 3), idx))
        inits.append(numpy_helper.from_array(small_param(_rng(seed, 1000 + idx), "b", (int(c),)), f"{name}.bias"))
        nodes.append(helper.make_node("Conv", [x, f"{name}.weight", f"{name}.bias"], [name], name=name,
                                      kernel_shape=[3, 3], pads=[1, 1, 1, 1]))
        nodes.append(helper.make_node("Relu", [name], [f"{name}_relu"], name=f"{name}_relu"))
        x, cin, sub = f"{name}_relu", int(c), sub + 1
    nodes.append(helper.make_node("Flatten", [x], ["flat"], name="flatten", axis=1))
    x = "flat"
    for j, (n_out, n_in) in enumerate(fcs):
        name = f"fc{6 + j}"
        idx += 1
        inits.append(weight(f"{name}.weight", (n_out, n_in), idx))
        inits.append(numpy_helper.from_array(small_param(_rng(seed, 1000 + idx), "b", (n_out,)), f"{name}.bias"))
        y = "logits" if j == len(fcs) - 1 else name
        nodes.append(helper.make_node("Gemm", [x, f"{name}.weight", f"{name}.bias"], [y], name=name, transB=1))
        if j < len(fcs) - 1:
            nodes.append(helper.make_node("Relu", [y], [f"{name}_relu"], name=f"{name}_relu"))
            y = f"{name}_relu"
        x = y
    graph = helper.make_graph(
        nodes,
        "vgg16",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, image_size, image_size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="make_synthetic")
    model.ir_version = 8
    if writer is not None:
        writer.close()
    onnx.checker.check_model(model) if not external else None
    _write(model, out)
    return out


def materialise_light(kind: str, out: Path, seed: int = 0) -> Path:
    """light_inception_v1 (GoogLeNet) or light_resnet50 with realistic weights instead of 0.02s."""
    name = {"googlenet": "light_inception_v1", "resnet50": "light_resnet50"}[kind]
    src = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light" / f"{name}.onnx"
    model = onnx.load(str(src))
    g = model.graph
    shapes = {t.name: tuple(int(v) for v in numpy_helper.to_array(t)) for t in g.initializer if t.data_type == TensorProto.INT64}
    new_inits: list[TensorProto] = []
    keep_nodes = []
    used_shapes: set[str] = set()
    for i, node in enumerate(g.node):
        if node.op_type == "ConstantOfShape" and node.input and node.input[0] in shapes:
            shape = shapes[node.input[0]]
            used_shapes.add(node.input[0])
            rng = _rng(seed, i)
            if len(shape) == 4:
                arr = conv_weight(rng, shape)
            elif len(shape) == 2:
                arr = fc_weight(rng, shape[0], shape[1])
            else:
                arr = small_param(rng, node.output[0], shape)
            new_inits.append(numpy_helper.from_array(arr, node.output[0]))
            continue
        keep_nodes.append(node)
    # The float initializers already present (biases, BN statistics) get the usual distributions too.
    kept_inits = []
    for j, t in enumerate(g.initializer):
        if t.name in used_shapes:
            continue
        if t.data_type == TensorProto.FLOAT and len(t.dims) == 1 and t.dims[0] > 1:
            t = numpy_helper.from_array(small_param(_rng(seed, 100000 + j), t.name, tuple(t.dims)), t.name)
        kept_inits.append(t)
    init_names = {t.name for t in kept_inits} | {t.name for t in new_inits}
    # IR 3 lists every initializer as a graph input: drop those of the removed shape tensors too (left
    # behind, they were real, unused graph inputs that MNN and pnnx reject).
    inputs = [i for i in g.input if i.name not in init_names and i.name not in used_shapes]
    del g.node[:]
    g.node.extend(keep_nodes)
    del g.initializer[:]
    g.initializer.extend(kept_inits + new_inits)
    del g.input[:]
    g.input.extend(inputs)
    model.ir_version = 4
    onnx.checker.check_model(model)
    _write(model, out)
    return out


def _write(model: onnx.ModelProto, out: Path) -> None:
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(model.SerializeToString())
    os.replace(tmp, out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", choices=["vgg16", "googlenet", "resnet50"])
    ap.add_argument("out", type=Path)
    ap.add_argument("--image-size", type=int, default=224, help="vgg16 only: input side (FC6 grows with its square)")
    ap.add_argument("--fc-width", type=int, default=4096, help="vgg16 only: width of FC6 / FC7")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    if args.model == "vgg16":
        vgg16(args.out, args.image_size, fc_width=args.fc_width, seed=args.seed)
    else:
        materialise_light(args.model, args.out, args.seed)
    size = args.out.stat().st_size
    data = args.out.with_name(args.out.name + ".data")
    if data.exists():
        size += data.stat().st_size
    print(f"wrote {args.out} ({size / 2**20:.0f} MiB) in {time.perf_counter() - t0:.1f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
