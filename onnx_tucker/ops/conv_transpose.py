"""ConvTranspose (decoders, segmentation heads, super-resolution): Tucker-2 or Tucker-1.

Weight C_in x C_out/group x k... (input channels first, unlike Conv). The weight is factorised in
Conv's layout (C_out x C_in/group x k..., per group), so the numerics are Conv's; only the core is
laid out again as a ConvTranspose weight. The chain: 1x1 Conv C_in->R_in at the input resolution;
core ConvTranspose R_in->R_out with the original strides, pads, dilations, output_padding,
output_shape and auto_pad; 1x1 Conv R_out->C_out at the output resolution carrying the bias.
Tucker-1 drops the first 1x1 (for a 1x1 kernel it is the SVD of the layer). Grouped layers are
decomposed group by group; every node keeps the group.
"""

from __future__ import annotations

import numpy as np

from .conv import SPATIAL_ATTRS, ConvHandler
from .layer import Im2col, Layer, LayerFactors


def _swap_channel_axes(w: np.ndarray, groups: int) -> np.ndarray:
    """A grouped (G*A) x B x k... weight as (G*B) x A x k...: the two channel axes swapped per group.
    Maps ConvTranspose's layout to Conv's and back."""
    a, b = w.shape[0] // groups, w.shape[1]
    return w.reshape(groups, a, b, *w.shape[2:]).swapaxes(1, 2).reshape(groups * b, a, *w.shape[2:])


class ConvTransposeHandler(ConvHandler):
    op_type = "ConvTranspose"
    runtime_kernels = ("ConvTranspose",)
    spatial_attrs = (*SPATIAL_ATTRS, "output_padding", "output_shape")
    spatial_op = "ConvTranspose"
    rank_words = "C_in x C_out/group x k..."
    kind_word = "transposed conv"
    grouped_axis_word = "input"

    def in_channels_per_group(self, layer: Layer) -> int:
        assert layer.weight_shape is not None
        return layer.weight_shape[0] // max(self.groups(layer), 1)

    def input_channels(self, layer: Layer) -> int:
        assert layer.weight_shape is not None
        return layer.weight_shape[0]

    def out_channels(self, layer: Layer) -> int:
        assert layer.weight_shape is not None
        return layer.weight_shape[1] * self.groups(layer)

    def kinds(self, layer: Layer) -> tuple[str, ...]:
        return ("tucker2", "tucker1")

    def default_kind(self, layer: Layer, min_tucker2_channels: int) -> str:
        if self.kernel_size(layer) == 1:
            return "tucker1"  # core 1x1 ConvTranspose C_in->R + 1x1 Conv R->C_out: the layer's SVD
        return "tucker2" if self.input_channels(layer) >= min_tucker2_channels else "tucker1"

    def blocks(self, layer: Layer, weight: np.ndarray) -> list[np.ndarray]:
        g = self.groups(layer)
        per = weight.shape[0] // g
        return [np.swapaxes(weight[i * per : (i + 1) * per], 0, 1) for i in range(g)]

    def to_layout(self, layer: Layer, kind: str, arrays: tuple[np.ndarray, ...]) -> tuple[np.ndarray, ...]:
        core = 1 if kind == "tucker2" else 0
        out = list(arrays)
        out[core] = _swap_channel_axes(arrays[core], self.groups(layer))
        return tuple(out)

    def factorisation_key(self, layer: Layer) -> tuple[object, ...]:
        return (self.op_type, self.groups(layer))

    def auto_pads(self, size: int | None, kernel: int, stride: int, dilation: int, output_padding: int,
                  upper: bool) -> tuple[int, int] | None:
        # Output size * stride: total = output_padding + span - stride whatever the size, the odd pixel at
        # the end for SAME_UPPER (the ONNX spec; onnxruntime agrees, tests/test_torchready_exporters.py).
        total = output_padding + (kernel - 1) * dilation + 1 - stride
        if total < 0:
            return None
        small, big = total // 2, total - total // 2
        return (small, big) if upper else (big, small)

    def im2col(self, layer: Layer) -> Im2col | None:
        # A transposed conv scatters each input pixel over a kernel window: its output is not a
        # matrix product of input rows, so calibration and data-driven ranks do not cover it.
        return None

    def pointwise_last(self, layer: Layer, factors: LayerFactors) -> bool:
        return len(factors.arrays) > 1  # Tucker-1 and -2 chains end in the 1x1 Conv R_out -> C_out

    def scatter(self, layer: Layer) -> Im2col | None:
        return self.kernel_geometry(layer)

    def cost(self, layer: Layer, kind: str, ranks: tuple[int, ...] = ()) -> tuple[int, int | None]:
        # A transposed conv does C_in x C_out/group x k MACs per *input* pixel; the core runs there
        # too, the last 1x1 at the output resolution.
        T, S, G, k = self.out_channels(layer), self.in_channels_per_group(layer), self.groups(layer), self.kernel_size(layer)
        in_px, out_px, batch = self.pixels(layer)
        if kind == "original":
            params = S * T * k
            return params, None if in_px is None else params * in_px * batch
        if kind == "tucker2":
            r4, r3 = ranks
            at_input, last = G * S * r3 + G * r3 * r4 * k, r4 * T
        elif kind == "tucker1":
            (r4,) = ranks
            at_input, last = G * S * r4 * k, r4 * T
        else:
            raise ValueError(kind)
        macs = None if in_px is None or out_px is None else batch * (at_input * in_px + last * out_px)
        return at_input + last, macs


HANDLER = ConvTransposeHandler()
