"""One adapter per runtime: how to convert an ONNX file to its format, and how to run the result.

Adapters run inside the child process (`child.py`); each imports its runtime's package only in its
methods, so the parent never loads a native runtime. An adapter is named in a job by its import
path ("onnx_tucker.mobile.adapters:MNNAdapter"), which lets tests plug in their own (one that
crashes, say) without touching this registry.

Every `load` returns a callable that takes one batch (input name -> array, in the model's input
order) and returns the outputs in the ONNX model's output order; the parent reshapes outputs whose
size matches the reference (ncnn drops the batch axis).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

Feeds = Mapping[str, np.ndarray]
RunFn = Callable[[Feeds], list[np.ndarray]]


class ConversionFailed(Exception):
    """The runtime's converter refused the model; the message is what it said."""


class Adapter:
    name = ""
    label = ""
    modules: tuple[str, ...] = ()  # import names that must be installed
    install = ""  # the pip command that installs it
    file_format = ""

    def installed(self) -> bool:
        return all(importlib.util.find_spec(m) is not None for m in self.modules)

    def version(self) -> str | None:
        from importlib.metadata import PackageNotFoundError, version

        for dist in self.install.split()[2:3]:
            try:
                return version(dist)
            except PackageNotFoundError:
                return None
        return None

    def convert(self, onnx_path: str, workdir: str, input_shapes: Mapping[str, Sequence[int]]) -> tuple[list[str], dict[str, Any]]:
        """Files of the converted model (their sizes are its size) and extra facts (JSON-able)."""
        raise NotImplementedError

    def load(self, files: Sequence[str], threads: int, input_names: Sequence[str], output_names: Sequence[str]) -> RunFn:
        raise NotImplementedError

    # A runtime with its own INT8 quantizer (MNN's mnnquant) names it here; the four-way comparison then
    # builds that runtime's INT8 rows with it from the FP32 model, on the onnxruntime quantizer's
    # calibration samples, instead of converting the QDQ file.
    quantizer: str | None = None

    # The quantizer's activation-calibration methods to try, in order: the next one when one fails.
    quantize_methods: tuple[str, ...] = ()

    def quantize(self, files: Sequence[str], workdir: str, calibration: str, input_names: Sequence[str],
                 method: str | None = None) -> tuple[list[str], dict[str, Any]]:
        """The converted FP32 model `files` quantized by the runtime's own tool on the samples in the
        .npz `calibration` (one array per input, samples on axis 0) with `method` (one of
        `quantize_methods`; None: the first): the INT8 files and facts."""
        raise NotImplementedError

    def bench_fn(self, files: Sequence[str], threads: int, input_names: Sequence[str], output_names: Sequence[str],
                 feeds: Feeds) -> Callable[[], object]:
        """One inference on fixed `feeds`, to time (per-layer timing): by default a whole `load` run;
        runtimes whose `load` copies outputs slowly set the inputs once and time only the run."""
        run = self.load(files, threads, input_names, output_names)
        return lambda: run(feeds)


def import_ort_tool(module: str) -> Any:
    """`onnxruntime.tools.<module>` without torch: the package's __init__ imports torch (4 s) when it
    is installed, for a PyTorch export helper none of these tools need. A stand-in for that helper
    is registered for the import only, then removed, so a later real import still gets the real one."""
    helper = "onnxruntime.tools.pytorch_export_helpers"
    if "onnxruntime.tools" not in sys.modules and helper not in sys.modules:
        import types

        stub = types.ModuleType(helper)
        stub.infer_input_info = None  # type: ignore[attr-defined]
        sys.modules[helper] = stub
        try:
            importlib.import_module("onnxruntime.tools")
        finally:
            del sys.modules[helper]
    return importlib.import_module(f"onnxruntime.tools.{module}")


def _ort_run(path: str, threads: int, output_names: Sequence[str]) -> RunFn:
    from ..ort import inference_session, session_options

    sess = inference_session(path, session_options(threads))
    names = list(output_names)
    return lambda feeds: [np.asarray(a) for a in sess.run(names, dict(feeds))]


class OrtAdapter(Adapter):
    name = "ort"
    label = "onnxruntime CPU"
    modules = ("onnxruntime",)
    install = "pip install onnxruntime"
    file_format = "ONNX"

    def convert(self, onnx_path, workdir, input_shapes):  # type: ignore[no-untyped-def]
        return [onnx_path], {}  # nothing to convert: the ONNX file itself

    def load(self, files, threads, input_names, output_names):  # type: ignore[no-untyped-def]
        return _ort_run(files[0], threads, output_names)


class OrtMobileAdapter(Adapter):
    """ORT format (what the onnxruntime-mobile packages load), converted by onnxruntime's own tool,
    which also writes the operator list a reduced build needs."""

    name = "ort-mobile"
    label = "onnxruntime mobile (ORT format)"
    modules = ("onnxruntime",)
    install = "pip install onnxruntime"
    file_format = "ORT"

    def convert(self, onnx_path, workdir, input_shapes):  # type: ignore[no-untyped-def]
        import contextlib
        import io

        tool = import_ort_tool("convert_onnx_models_to_ort")
        out = Path(workdir)
        with contextlib.redirect_stdout(io.StringIO()):  # the tool prints a line per step
            tool.convert_onnx_models_to_ort(Path(onnx_path), output_dir=out, target_platform="arm",
                                            optimization_styles=[tool.OptimizationStyle.Fixed])
        ort_files = sorted(out.glob("*.ort"))
        if not ort_files:
            raise ConversionFailed("convert_onnx_models_to_ort wrote no .ort file")
        ops: list[str] = []
        for config in out.glob("*.config"):
            for line in config.read_text().splitlines():
                parts = line.strip().split(";")
                if len(parts) >= 3 and not line.startswith("#"):
                    domain = parts[0]
                    ops += [f"{domain}:{op}" if domain not in ("ai.onnx", "") else op for op in parts[2].split(",") if op]
        return [str(ort_files[0])], {"required_ops": sorted(set(ops))}

    def load(self, files, threads, input_names, output_names):  # type: ignore[no-untyped-def]
        return _ort_run(files[0], threads, output_names)


class MNNAdapter(Adapter):
    name = "mnn"
    label = "MNN"
    modules = ("MNN",)
    install = "pip install mnn"
    file_format = "MNN"

    def convert(self, onnx_path, workdir, input_shapes):  # type: ignore[no-untyped-def]
        # The converter itself (`_tools`), not `MNN.tools.mnnconvert`: that wrapper imports a logger
        # which runs `pip install aliyun-log-python-sdk` and sends usage data to Alibaba's servers.
        import _tools  # type: ignore[import-not-found]

        target = str(Path(workdir) / (Path(onnx_path).stem + ".mnn"))
        _tools.mnnconvert(["mnnconvert", "-f", "ONNX", "--modelFile", onnx_path, "--MNNModel", target, "--bizCode", "onnx-tucker"])
        if not Path(target).is_file() or Path(target).stat().st_size == 0:
            raise ConversionFailed("mnnconvert wrote no model")
        return [target], {}

    quantizer = "mnnquant"
    # mnnquant's feature_quantize_method: KL (its default), then EMA, which MNN 3.6.1 runs where KL
    # crashes (Darknet Tiny: SIGSEGV after "fake quant weights done"); weights MAX_ABS per channel.
    quantize_methods = ("KL", "EMA")
    weight_method = "MAX_ABS"

    def quantize(self, files, workdir, calibration, input_names, method=None):  # type: ignore[no-untyped-def]
        """mnnquant on the .mnn file. Its calibration reader takes image files only for a 4-D input (its
        "sequence" input type is for 3-D inputs), so each sample is written as an 8-bit PPM image and
        the config's mean / normal (per channel) map the pixels back to the sample's values; the largest
        difference that encoding leaves is a fact of the result (0 when the samples were 8-bit images
        normalised per channel, as the CIFAR, Fashion-MNIST and photo folders are)."""
        import json

        import _tools  # type: ignore[import-not-found]

        feature_method = method or self.quantize_methods[0]
        if len(input_names) != 1:
            raise ConversionFailed(f"mnnquant calibrates one image input; the model has {len(input_names)} inputs")
        with np.load(calibration) as z:
            x = np.asarray(z[input_names[0]], dtype=np.float32)
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ConversionFailed(f"mnnquant calibrates from images: it needs an NCHW input with 1 or 3 channels, "
                                   f"the calibration samples have shape {list(x.shape[1:])}")
        folder = Path(workdir) / f"mnnquant-images-{feature_method}"
        folder.mkdir()
        lo, hi = x.min(axis=(0, 2, 3)).astype(np.float64), x.max(axis=(0, 2, 3)).astype(np.float64)
        normal = np.where(hi > lo, (hi - lo) / 255.0, 1.0)
        mean = -lo / normal
        pixels = np.clip(np.round(x / normal[None, :, None, None] + mean[None, :, None, None]), 0, 255).astype(np.uint8)
        error = float(np.max(np.abs((pixels - mean[None, :, None, None]) * normal[None, :, None, None] - x)))
        h, w = x.shape[2], x.shape[3]
        for i, sample in enumerate(pixels):
            rgb = np.repeat(sample, 3, axis=0) if sample.shape[0] == 1 else sample
            (folder / f"{i:05d}.ppm").write_bytes(b"P6\n%d %d\n255\n" % (w, h) + rgb.transpose(1, 2, 0).tobytes())
        config = {"format": "GRAY" if x.shape[1] == 1 else "RGB", "mean": mean.tolist(), "normal": normal.tolist(),
                  "width": w, "height": h, "path": str(folder) + os.sep, "used_image_num": len(x),
                  "feature_quantize_method": feature_method, "weight_quantize_method": self.weight_method}
        config_path = Path(workdir) / f"mnnquant-{feature_method}.json"
        config_path.write_text(json.dumps(config))
        target = str(Path(workdir) / (Path(files[0]).stem + f".int8-{feature_method}.mnn"))
        # The binding itself: MNN 3.6's `mnnquant` script passes three strings where the binding takes an
        # argv list (std::length_error), and its logger installs a package and sends usage data.
        _tools.mnnquant(["mnnquant", files[0], target, str(config_path)])
        if not Path(target).is_file() or Path(target).stat().st_size == 0:
            raise ConversionFailed("mnnquant wrote no model")
        return [target], {"quantizer": self.quantizer, "feature_quantize_method": feature_method,
                          "weight_quantize_method": self.weight_method, "calibration_samples": len(x),
                          "image_encoding_max_error": error}

    def load(self, files, threads, input_names, output_names):  # type: ignore[no-untyped-def]
        import MNN  # type: ignore[import-not-found]

        interp = MNN.Interpreter(files[0])
        interp.setSessionMode(9)  # Session_Release: no debug copies
        session = interp.createSession({"numThread": threads})
        inputs = interp.getSessionInputAll(session)
        missing = [n for n in input_names if n not in inputs]
        if missing:
            raise RuntimeError(f"MNN model has no input {missing[0]} (has {sorted(inputs)})")

        def run(feeds: Feeds) -> list[np.ndarray]:
            for name in input_names:
                arr = np.ascontiguousarray(feeds[name], dtype=np.float32)
                t = inputs[name]
                if tuple(t.getShape()) != arr.shape:
                    interp.resizeTensor(t, arr.shape)
                    interp.resizeSession(session)
                host = MNN.Tensor(arr.shape, MNN.Halide_Type_Float, arr, MNN.Tensor_DimensionType_Caffe)
                t.copyFrom(host)
            interp.runSession(session)
            outs = interp.getSessionOutputAll(session)
            result = []
            for name in output_names:
                o = outs[name]
                shape = tuple(o.getShape())
                host = MNN.Tensor(shape, MNN.Halide_Type_Float, np.zeros(shape, np.float32), MNN.Tensor_DimensionType_Caffe)
                o.copyToHostTensor(host)
                result.append(np.array(host.getData(), dtype=np.float32).reshape(shape))
            return result

        return run

    def bench_fn(self, files, threads, input_names, output_names, feeds):  # type: ignore[no-untyped-def]
        import MNN  # type: ignore[import-not-found]

        interp = MNN.Interpreter(files[0])
        interp.setSessionMode(9)
        session = interp.createSession({"numThread": threads})
        inputs = interp.getSessionInputAll(session)
        hosts = []  # MNN keeps pointers to the host tensors' data
        for name in input_names:
            arr = np.ascontiguousarray(feeds[name], dtype=np.float32)
            if tuple(inputs[name].getShape()) != arr.shape:
                interp.resizeTensor(inputs[name], arr.shape)
                interp.resizeSession(session)
            hosts.append(MNN.Tensor(arr.shape, MNN.Halide_Type_Float, arr, MNN.Tensor_DimensionType_Caffe))
            inputs[name].copyFrom(hosts[-1])
        return lambda: interp.runSession(session)


def _pnnx_binary() -> str | None:
    spec = importlib.util.find_spec("pnnx")
    if spec is None or not spec.submodule_search_locations:
        return shutil.which("pnnx")
    exe = Path(list(spec.submodule_search_locations)[0]) / "pnnx"
    return str(exe) if exe.is_file() else shutil.which("pnnx")


class NcnnAdapter(Adapter):
    """pnnx converts (its default: weights stored as fp16), ncnn runs. ncnn has no batch axis: one
    sample per run, inputs fed by position (in0, in1, ...), outputs read by position (out0, ...)."""

    name = "ncnn"
    label = "ncnn (via pnnx)"
    modules = ("ncnn", "pnnx")
    install = "pip install ncnn pnnx"
    file_format = "ncnn .param + .bin (fp16 weights)"

    def version(self) -> str | None:
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version("ncnn")
        except PackageNotFoundError:
            return None

    def convert(self, onnx_path, workdir, input_shapes):  # type: ignore[no-untyped-def]
        exe = _pnnx_binary()
        if exe is None:
            raise ConversionFailed("the pnnx converter is not installed (pip install pnnx)")
        local = Path(workdir) / "model.onnx"
        shutil.copyfile(onnx_path, local)  # pnnx writes its files next to the model
        shapes = ",".join("[" + ",".join(str(d) for d in s) + "]" for s in input_shapes.values())
        proc = subprocess.run([exe, str(local), f"inputshape={shapes}"], cwd=workdir, capture_output=True, text=True)
        param, binary = Path(workdir) / "model.ncnn.param", Path(workdir) / "model.ncnn.bin"
        if proc.returncode != 0 or not param.is_file() or not binary.is_file():
            text = (proc.stderr + proc.stdout).strip().splitlines()
            errors = [ln for ln in text if any(w in ln.lower() for w in ("error", "not support", "unsupported", "fail"))]
            raise ConversionFailed("pnnx: " + ((errors or text or [f"exit code {proc.returncode}"])[-1]).strip())
        # The param file names layers ncnn does not implement as pnnx ops (`Tensor.slice`, ...); a
        # load would fail (and the next extract crash): say which, as the converter's finding.
        return [str(param), str(binary)], {}

    def load(self, files, threads, input_names, output_names):  # type: ignore[no-untyped-def]
        import ncnn  # type: ignore[import-not-found]

        net = ncnn.Net()
        net.opt.num_threads = threads
        if net.load_param(files[0]) != 0:
            raise RuntimeError("ncnn could not load the .param file")
        if net.load_model(files[1]) != 0:
            raise RuntimeError("ncnn could not load the .bin file")
        unknown = _unknown_ncnn_layers(files[0])
        if unknown:
            raise RuntimeError(f"ncnn lacks layer(s) {', '.join(unknown)} (network graph not ready)")
        in_names, out_names = net.input_names(), net.output_names()

        def run(feeds: Feeds) -> list[np.ndarray]:
            ex = net.create_extractor()
            mats = []  # the Mats must outlive extract(): ncnn keeps pointers to their data
            for i, name in enumerate(input_names):
                arr = np.ascontiguousarray(feeds[name], dtype=np.float32)
                if arr.shape[0] != 1:
                    raise RuntimeError(f"ncnn runs one sample at a time; input '{name}' has batch {arr.shape[0]}")
                mats.append(ncnn.Mat(np.ascontiguousarray(arr[0])))
                ex.input(in_names[i], mats[-1])
            result = []
            for k in range(len(output_names)):
                ret, out = ex.extract(out_names[k])
                if ret != 0:
                    raise RuntimeError(f"ncnn extract of output {k} failed ({ret})")
                result.append(np.array(out, dtype=np.float32)[None])
            return result

        return run


def _unknown_ncnn_layers(param_path: str) -> list[str]:
    """Layer types in a .param file that ncnn cannot create (pnnx writes ops it could not map as
    their PyTorch names, e.g. `Tensor.slice`)."""
    import ncnn  # type: ignore[import-not-found]

    unknown = []
    lines = Path(param_path).read_text().splitlines()[2:]
    for line in lines:
        kind = line.split()[0] if line.strip() else ""
        if kind and kind not in unknown and ncnn.layer_to_index(kind) < 0:
            unknown.append(kind)
    return unknown


# The registry: runtime name -> adapter import path. Order is the report's order.
ADAPTERS: dict[str, str] = {
    "ort": f"{__name__}:OrtAdapter",
    "ort-mobile": f"{__name__}:OrtMobileAdapter",
    "mnn": f"{__name__}:MNNAdapter",
    "ncnn": f"{__name__}:NcnnAdapter",
}


def load_adapter(path: str) -> Adapter:
    module, _, attr = path.partition(":")
    cls = getattr(importlib.import_module(module), attr)
    return cls()


def python_path() -> str:
    """PYTHONPATH for a child process: the parent's sys.path, so it imports this same onnx_tucker."""
    return os.pathsep.join(p for p in sys.path if p)
