"""Conv (1-D, 2-D, 3-D, grouped): Tucker-2, Tucker-1, or SVD of a 1x1 kernel.

Weight T x S x k... (S: input channels per group). The chain (the paper's Tucker-2 layer):
1x1 S->R3 at the input resolution, stride 1, no pads; the core R3->R4 with the original strides,
pads, dilations and auto_pad; 1x1 R4->T carrying the original bias. Tucker-1 drops the first 1x1
(few input channels, as for the first RGB conv); its mirror Tucker-1-in drops the last 1x1 instead (a
1x1 S->R3 at the input resolution, then the k x k core R3->T carrying the strides, pads, dilations,
auto_pad and the bias: the input mode compressed, for many input channels and few output ones); an
SVD-split 1x1 conv carries its stride on the first factor. Spatial SVD (AIMET's; 2-D kernels with kh, kw > 1) is a kh x 1 conv S->R carrying the
height's stride, pads and dilation, then a 1 x kw conv R->T carrying the width's and the bias: exact
at full rank (padding a column of the intermediate is padding the input's column), the intermediate
at (output height x input width). CP (Lebedev et al. 2015; ungrouped convs) treats the spatial modes
as one mode of k taps: a 1x1 S->R at the input resolution, a depthwise k x k R->R (group R) carrying
the strides, pads, dilations and auto_pad, a 1x1 R->T carrying the bias; exact at rank
min(S*k, T*k, T*S). A grouped conv is decomposed group by group (docs/grouped-convs.md): every node of the
chain keeps the original `group`; depthwise convs (one input channel per group) are kept.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from ..numerics.refit import balance_chain, spatial_basis, spatial_front
from ..numerics.spectral import LayerSpectra
from ..numerics.tucker import even_scales
from .base import LABELS, Fresh, OpHandler, prod, tensor_factor_shapes, tensor_factors
from .layer import COPY, Chain, Im2col, Layer, LayerFactors, NodeSpec, RefitBlock

# Attributes of the replaced node that the spatial step of the chain keeps (in the node's order).
SPATIAL_ATTRS = ("strides", "pads", "dilations", "auto_pad")


def _ints(v: object, n: int, default: int) -> tuple[int, ...]:
    """An ints attribute as a tuple; absent or empty: `default` n times."""
    return tuple(int(x) for x in v) if isinstance(v, (list, tuple)) and v else (default,) * n


class ConvHandler(OpHandler):
    op_type = "Conv"
    runtime_kernels: tuple[str, ...] = ("Conv", "FusedConv")
    weight_either_side = False
    spatial_attrs: tuple[str, ...] = SPATIAL_ATTRS
    rank_words = "T x S x k..."

    # ---- recognising ---------------------------------------------------------------------------
    def skip_reason(self, layer: Layer, bias_reason: str | None) -> str | None:
        wshape = layer.weight_shape or ()
        if len(wshape) < 3:
            return f"{self.op_type} weight has rank {len(wshape)}; expected {self.rank_words}"
        group = int(layer.attrs.get("group", 1))  # type: ignore[call-overload]
        # Depthwise layers have a single input channel per group: no channel mode left to factorise.
        if group != 1 and self.in_channels_per_group(layer) == 1:
            return (
                f"depthwise {self.kind_word} (group={group}): one input channel per group leaves no channel "
                "mode to factorise; kept as is"
            )
        if group < 1 or wshape[self.grouped_axis] % group:
            return (
                f"grouped {self.kind_word} (group={group}): {wshape[self.grouped_axis]} {self.grouped_axis_word} "
                f"channels do not split into {group} groups"
            )
        if layer.bias_name is not None and bias_reason is not None:
            return f"bias '{layer.bias_name}' is {bias_reason}: a {self.op_type} bias must be constant"
        return None

    kind_word = "conv"
    grouped_axis = 0  # the weight axis holding every group's channels
    grouped_axis_word = "output"

    def in_channels_per_group(self, layer: Layer) -> int:
        assert layer.weight_shape is not None
        return layer.weight_shape[1]

    def input_channels(self, layer: Layer) -> int:
        """Input channels of the whole layer (all groups)."""
        return self.in_channels_per_group(layer) * self.groups(layer)

    def out_channels(self, layer: Layer) -> int:
        assert layer.weight_shape is not None
        return layer.weight_shape[0]

    def input_mismatch(self, layer: Layer) -> tuple[str, int, int] | None:
        w, x = layer.weight_shape, layer.input_shape
        if w is None or x is None or not x or len(w) < 3:
            return None
        if len(x) != len(w):
            return "rank", len(x), len(w)
        if x[1] is not None and x[1] != self.input_channels(layer):
            return "channels", x[1], self.input_channels(layer)
        return None

    # ---- factorising ---------------------------------------------------------------------------
    def groups(self, layer: Layer) -> int:
        return int(layer.attrs.get("group", 1))  # type: ignore[call-overload]

    def kernel_size(self, layer: Layer) -> int:
        assert layer.weight_shape is not None
        return math.prod(layer.weight_shape[2:])

    def kinds(self, layer: Layer) -> tuple[str, ...]:
        if self.kernel_size(layer) == 1:
            return ("svd", "tucker2", "tucker1")
        # Tucker-1-in (the 1x1 S->R projection then the k x k R->T) wants a spatial kernel (of a 1x1
        # conv it is the SVD, offered already) and more than one input channel per group (else the
        # projection is 1 -> R, never smaller); 1-D, 2-D and 3-D alike, as Tucker-1.
        mirror = ("tucker1-in",) if self.in_channels_per_group(layer) > 1 else ()
        # CP's depthwise step needs its own group count: ungrouped layers only.
        cp = ("cp",) if self.groups(layer) == 1 else ()
        if self.spatial_separable(layer):
            return ("tucker2", "tucker1", *mirror, "spatial-svd", *cp)
        return ("tucker2", "tucker1", *mirror, *cp)

    def spatial_separable(self, layer: Layer) -> bool:
        """A 2-D kernel with both sides > 1: spatial SVD applies (a k x 1 or 1 x k kernel has nothing to split)."""
        w = layer.weight_shape or ()
        return len(w) == 4 and w[2] > 1 and w[3] > 1

    def default_kind(self, layer: Layer, min_tucker2_channels: int) -> str:
        if self.kernel_size(layer) == 1:
            return "svd"
        # Grouped convs count all their input channels: a per-group Tucker-2 of ResNeXt's 4-channel
        # groups ran 1.5x faster than the original where Tucker-1 ran no faster (docs/grouped-convs.md).
        return "tucker2" if self.input_channels(layer) >= min_tucker2_channels else "tucker1"

    def blocks(self, layer: Layer, weight: np.ndarray) -> list[np.ndarray]:
        g = self.groups(layer)
        if g == 1:
            return [weight]
        per = weight.shape[0] // g
        return [weight[i * per : (i + 1) * per] for i in range(g)]

    def factor_block(
        self, kind: str, ranks: tuple[int, ...], block: np.ndarray, hooi_iters: int, spectra: LayerSpectra | None
    ) -> tuple[tuple[np.ndarray, ...], float]:
        return tensor_factors(kind, ranks, block, hooi_iters, spectra)

    def block_factor_shapes(self, kind: str, ranks: tuple[int, ...], block_shape: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
        return tensor_factor_shapes(kind, ranks, block_shape)

    def factorisation_key(self, layer: Layer) -> tuple[object, ...]:
        return (self.groups(layer),)

    def factorisation_note(self, layer: Layer) -> str:
        g = self.groups(layer)
        return f" group={g}" if g > 1 else ""

    def pixels(self, layer: Layer) -> tuple[int | None, int | None, int]:
        """(input pixels, output pixels, batch) of one image, None where unknown."""
        out_px = prod(layer.output_shape[2:]) if layer.output_shape else None
        in_px = prod(layer.input_shape[2:]) if layer.input_shape else None
        batch = layer.output_shape[0] if layer.output_shape and layer.output_shape[0] else 1
        return in_px, out_px, batch

    def cost(self, layer: Layer, kind: str, ranks: tuple[int, ...] = ()) -> tuple[int, int | None]:
        # In a Tucker-2 chain the first 1x1 runs at the *input* resolution and the stride sits on the
        # core; an SVD-split 1x1 conv carries its stride on the first factor, so both factors run at
        # the output resolution.
        T, S, G, k = self.out_channels(layer), self.in_channels_per_group(layer), self.groups(layer), self.kernel_size(layer)
        in_px, out_px, batch = self.pixels(layer)
        if kind == "original":
            params = T * S * k
            return params, None if out_px is None else params * out_px * batch
        if kind == "tucker2":
            r4, r3 = ranks
            first, rest = G * S * r3, G * r3 * r4 * k + r4 * T
            macs = None if out_px is None or in_px is None else batch * (first * in_px + rest * out_px)
            return first + rest, macs
        if kind == "spatial-svd":
            # kh x 1 (S -> R per group) at (output height x input width), 1 x kw (R -> T) at the output.
            assert layer.weight_shape is not None
            kh, kw = layer.weight_shape[2], layer.weight_shape[3]
            (r,) = ranks
            vertical, horizontal = G * r * S * kh, T * r * kw
            mid = self.intermediate_pixels(layer)
            macs = None if out_px is None or mid is None else batch * (vertical * mid + horizontal * out_px)
            return vertical + horizontal, macs
        if kind == "cp":
            # 1x1 (S -> R) at the input resolution, depthwise k taps and 1x1 (R -> T) at the output's.
            (r,) = ranks
            first, rest = S * r, r * k + r * T
            macs = None if out_px is None or in_px is None else batch * (first * in_px + rest * out_px)
            return first + rest, macs
        if kind == "tucker1-in":
            # 1x1 (S -> R3 per group) at the input resolution, the core (R3 -> T per group) at the output's.
            (r3,) = ranks
            first, core = G * S * r3, r3 * T * k
            macs = None if out_px is None or in_px is None else batch * (first * in_px + core * out_px)
            return first + core, macs
        if kind == "tucker1":
            (r4,) = ranks
            params = G * r4 * S * k + r4 * T
        elif kind == "svd":
            (r,) = ranks
            params = r * (G * S * k + T)
        else:
            raise ValueError(kind)
        return params, None if out_px is None else params * out_px * batch

    def intermediate_pixels(self, layer: Layer) -> int | None:
        """Pixels of a spatial-SVD chain's intermediate: the output's height by the input's width."""
        out, inp = layer.output_shape, layer.input_shape
        if not out or not inp or len(out) != 4 or len(inp) != 4 or not out[2] or not inp[3]:
            return None
        return int(out[2]) * int(inp[3])

    def export_signature(self, weight_shape: tuple[int, ...]) -> tuple[str, tuple[int, ...]]:
        return self.op_type, weight_shape

    # ---- calibrating (statistics of the layer on data) ------------------------------------------
    def im2col(self, layer: Layer) -> Im2col | None:
        return self.kernel_geometry(layer)

    def kernel_geometry(self, layer: Layer) -> Im2col | None:
        """The kernel, strides, pads, dilations, auto_pad and channels per group, as an `Im2col` (a
        Conv's im2col; a ConvTranspose's scatter, `ConvTransposeHandler.scatter`)."""
        w = layer.weight_shape
        if w is None or len(w) < 3:
            return None
        nd, a = len(w) - 2, layer.attrs
        return Im2col(
            self.in_channels_per_group(layer) * self.kernel_size(layer), self.out_channels(layer), self.groups(layer),
            tuple(int(k) for k in w[2:]), _ints(a.get("strides"), nd, 1), _ints(a.get("dilations"), nd, 1),
            _ints(a.get("pads"), 2 * nd, 0) if a.get("pads") else None, str(a.get("auto_pad", "NOTSET")),
        )

    def refit_front(self, layer: Layer, factors: LayerFactors) -> str | None:
        if factors.kind == "cp":
            return ("CP: the last 1x1 and the bias refit on the depthwise factor's output (the 1x1 and depthwise "
                    "factors as decomposed; a free im2col front would not split into them)")
        if factors.kind == "spatial-svd":
            return ("spatial SVD: the 1 x k factor and the bias refit on the k x 1 factor's output (that factor as "
                    "decomposed, or data-aware under 'data'; a free im2col front would not split into two convs)")
        return None

    def refit_blocks(self, layer: Layer, factors: LayerFactors) -> list[RefitBlock]:
        # Chain [first (Tucker-2)], core (the spatial step), last: per group, the core as im2col
        # columns x R and the last 1x1 as R x T_g.
        a = [np.asarray(x, dtype=np.float64) for x in factors.arrays]
        g = self.groups(layer)
        if factors.kind == "spatial-svd":
            return [(None, vf, hf) for vf, hf in spatial_refit_blocks(a[0], a[1], g)]
        if factors.kind == "cp":
            # y = p @ front @ last on the im2col p (columns (s, taps)): front[(s, tap), r] = B[s, r] C[tap, r].
            r = a[0].shape[0]
            front = np.einsum("rs,rk->skr", a[0].reshape(r, -1), a[1].reshape(r, -1)).reshape(-1, r)
            return [(None, front, a[2].reshape(a[2].shape[0], r).T)]
        if factors.kind == "tucker1-in":
            # The first 1x1 (R3 x S_g), the core as im2col columns x T_g, and an identity last factor
            # (T_g x T_g) that `from_refit_blocks` folds back into the core: refit like Tucker-2's
            # first factor and core (data-aware first factor, joint least squares of the core).
            r3, t = a[0].shape[0] // g, a[1].shape[0] // g
            return [(a[0][k * r3 : (k + 1) * r3].reshape(r3, -1), a[1][k * t : (k + 1) * t].reshape(t, -1).T, np.eye(t))
                    for k in range(g)]
        first = a[0] if factors.kind == "tucker2" else None
        core, last = (a[1], a[2]) if factors.kind == "tucker2" else (a[0], a[1])
        r, t = core.shape[0] // g, last.shape[0] // g
        blocks: list[RefitBlock] = []
        for k in range(g):
            fi = None
            if first is not None:
                r3 = first.shape[0] // g
                fi = first[k * r3 : (k + 1) * r3].reshape(r3, -1)
            blocks.append((fi, core[k * r : (k + 1) * r].reshape(r, -1).T, last[k * t : (k + 1) * t].reshape(t, r).T))
        return blocks

    def from_refit_blocks(self, layer: Layer, factors: LayerFactors, blocks: list[RefitBlock]) -> list[np.ndarray]:
        old = list(factors.arrays)
        if factors.kind == "spatial-svd":
            t, r, _, kw = old[1].shape
            tg = t // len(blocks)
            verticals = [spatial_basis(fr, kw).reshape(old[0].shape[0] // len(blocks), *old[0].shape[1:]) for _, fr, _ in blocks]
            lasts = [la.reshape(r, kw, tg).transpose(2, 0, 1)[:, :, None, :] for _, _, la in blocks]
            return [np.concatenate(verticals), np.concatenate(lasts)]
        if factors.kind == "cp":  # the front as it was, the refit last 1x1
            ((_, _, la),) = blocks
            return [old[0], old[1], la.T.reshape((la.shape[1], *old[2].shape[1:]))]
        if factors.kind == "tucker1-in":  # the last factor folded into the core
            first = np.concatenate([fi for fi, _, _ in blocks]).reshape(old[0].shape)  # type: ignore[arg-type]
            folded = [(fr @ la).T.reshape((la.shape[1], *old[1].shape[1:])) for _, fr, la in blocks]
            return [first, np.concatenate(folded)]
        core_old = old[1] if factors.kind == "tucker2" else old[0]
        last_old = old[-1]
        cores = [fr.T.reshape((fr.shape[1], *core_old.shape[1:])) for _, fr, _ in blocks]
        lasts = [la.T.reshape((la.shape[1], *last_old.shape[1:])) for _, _, la in blocks]
        arrays = [np.concatenate(cores), np.concatenate(lasts)]
        if factors.kind == "tucker2":
            firsts = [fi for fi, _, _ in blocks]
            arrays.insert(0, np.concatenate(firsts).reshape(old[0].shape))  # type: ignore[arg-type]
        return arrays

    def balance(self, layer: Layer, arrays: list[np.ndarray]) -> list[np.ndarray]:
        if len(arrays) == 3 and arrays[1].shape[1] == 1 and arrays[0].shape[0] == arrays[1].shape[0] > 1:
            return balance_cp(arrays)  # a depthwise middle: one scale per component, not per channel pair
        # Grouped chains are left as they are: balancing works on whole factors, not per group.
        return balance_chain(arrays) if self.groups(layer) == 1 else list(arrays)

    # ---- rewriting -----------------------------------------------------------------------------
    spatial_op = "Conv"  # the op of the chain's spatial step

    def spatial_step(self, kind: str, j: int) -> bool:
        return (kind in ("tucker2", "tucker1-in", "cp") and j == 1) or (kind in ("tucker1", "svd") and j == 0)

    def split_attrs(self, layer: Layer, axis: int) -> list[tuple[str, object]]:
        """A spatial-SVD factor's attributes: the replaced node's strides, pads and dilations on
        spatial `axis` (0: height, 1: width), the identity on the other; auto_pad as it was (a 1-tap,
        stride-1 axis pads nothing under SAME_* or VALID)."""
        a = layer.attrs
        out: list[tuple[str, object]] = []
        for name in ("strides", "dilations"):
            if a.get(name):
                v = _ints(a.get(name), 2, 1)
                out.append((name, [v[0], 1] if axis == 0 else [1, v[1]]))
        if a.get("pads"):
            p = _ints(a.get("pads"), 4, 0)
            out.append(("pads", [p[0], 0, p[2], 0] if axis == 0 else [0, p[1], 0, p[3]]))
        if "auto_pad" in a:
            out.append(("auto_pad", COPY))
        return out

    def chain(self, layer: Layer, factors: LayerFactors, weights: list[str], fresh: Fresh, opset: int) -> Chain:
        base = layer.node_name or layer.outputs[0]
        kind = factors.kind
        if kind == "spatial-svd":
            return self._spatial_chain(layer, factors, weights, fresh, base)
        labels = LABELS[kind][: len(weights)]
        x = layer.inputs[0]
        bias = (layer.bias_name,) if layer.bias_name else ()
        mids = [fresh(f"{base}/{label}/out") for label in labels[:-1]]
        ins, outs = [x, *mids], [*mids, layer.outputs[0]]
        nd = factors.arrays[0].ndim - 2
        nodes = []
        for j, label in enumerate(labels):
            arr = factors.arrays[j]
            if self.spatial_step(kind, j):
                op = self.spatial_op
                attrs: list[tuple[str, object]] = [(a, COPY) for a in layer.attrs if a in self.spatial_attrs]
                attrs.append(("kernel_shape", list(arr.shape[2:])))
            else:
                op, attrs = "Conv", [("kernel_shape", [1] * nd)]
            if self.groups(layer) != 1:  # block-diagonal factors: every node keeps the group
                attrs.append(("group", COPY))
            elif kind == "cp" and j == 1:  # the depthwise step: one group per component
                attrs.append(("group", int(arr.shape[0])))
            last = j == len(labels) - 1
            nodes.append(NodeSpec(op, (ins[j], weights[j], *(bias if last else ())), (outs[j],),
                                  fresh(f"{base}/{label}"), tuple(attrs)))
        return Chain(tuple(nodes))

    def _spatial_chain(self, layer: Layer, factors: LayerFactors, weights: list[str], fresh: Fresh, base: str) -> Chain:
        labels = LABELS["spatial-svd"]
        mid = fresh(f"{base}/{labels[0]}/out")
        bias = (layer.bias_name,) if layer.bias_name else ()
        group = [("group", COPY)] if self.groups(layer) != 1 else []
        nodes = []
        for j, (src, dst, extra) in enumerate(((layer.inputs[0], mid, ()), (mid, layer.outputs[0], bias))):
            attrs = [*self.split_attrs(layer, j), ("kernel_shape", list(factors.arrays[j].shape[2:])), *group]
            nodes.append(NodeSpec("Conv", (src, weights[j], *extra), (dst,), fresh(f"{base}/{labels[j]}"), tuple(attrs)))
        return Chain(tuple(nodes))


def balance_cp(arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
    """A CP chain (1x1 S->R, depthwise R, 1x1 R->T) with each component's three factors at equal norms
    (their product unchanged), as `balance_chain` does for chains of full convs."""
    first, mid, last = (np.asarray(x, dtype=np.float64) for x in arrays)
    r = first.shape[0]
    a, b, c = even_scales(first.reshape(r, -1).T, mid.reshape(r, -1).T, np.moveaxis(last, 1, 0).reshape(r, -1).T)
    out = [a.T.reshape(first.shape), b.T.reshape(mid.shape), np.moveaxis(c.T.reshape((r, last.shape[0], *last.shape[2:])), 0, 1)]
    return [o.astype(np.asarray(x).dtype) for o, x in zip(out, arrays, strict=True)]


def spatial_refit_blocks(vertical: np.ndarray, horizontal: np.ndarray, groups: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """A spatial-SVD chain per group as y = p @ front @ last on the layer's im2col p (columns (s, i, j)):
    front = (V kron I_kw)^T, d x (R*kw), the k x 1 factor applied to every width tap, columns (r, j)
    rank-major; last (R*kw) x T_g the 1 x k factor."""
    rg = vertical.shape[0] // groups
    t, _, _, kw = horizontal.shape
    tg = t // groups
    out = []
    for k in range(groups):
        front = spatial_front(vertical[k * rg : (k + 1) * rg, :, :, 0].reshape(rg, -1), kw)  # R x (S kh) inside
        h = horizontal[k * tg : (k + 1) * tg, :, 0, :]  # T_g x R x kw
        out.append((front, h.transpose(1, 2, 0).reshape(rg * kw, tg)))
    return out


HANDLER = ConvHandler()
