"""Weight parameters and multiply-accumulates of a layer, before and after decomposition.

Biases are left out: they are carried over unchanged.

MACs are counted at the real resolutions: in a Tucker-2 chain the first 1x1 runs at the *input*
resolution and the stride sits on the core; an SVD-split 1x1 conv carries its stride on the first
factor, so both factors run at the output resolution. Unknown shapes give `None` MACs.

Grouped convs (group G) are decomposed group by group with the same ranks in every group; their
ranks are per group and every factor is itself a grouped conv (block-diagonal), see `decompose`.
"""

from __future__ import annotations

import math

from .layer import Layer


def _prod(dims: tuple[int | None, ...] | None) -> int | None:
    if dims is None or any(d is None for d in dims):
        return None
    return math.prod(int(d) for d in dims if d is not None)


def conv_groups(layer: Layer) -> int:
    """The Conv's `group` attribute (1 for every other op)."""
    if layer.op_type != "Conv":
        return 1
    return int(layer.attrs.get("group", 1))  # type: ignore[call-overload]


def gemm_dims(layer: Layer) -> tuple[int, int]:
    """(K, N) of the weight as used: y = x @ W_eff with W_eff K x N."""
    assert layer.weight_shape is not None
    a, b = layer.weight_shape[0], layer.weight_shape[1]
    if layer.op_type == "Gemm" and int(layer.attrs.get("transB", 0)):  # type: ignore[call-overload]
        return b, a
    return a, b


def _rows(layer: Layer) -> int | None:
    """How many weight-vector products a Gemm / MatMul does (batch rows)."""
    shape = layer.output_shape
    if shape is None or len(shape) == 0:
        return None
    return _prod(shape[:-1]) if len(shape) > 1 else 1


def layer_cost(layer: Layer, kind: str, ranks: tuple[int, ...] = ()) -> tuple[int, int | None]:
    """(parameters, MACs) of `layer` decomposed as `kind` ("original", "tucker2", "tucker1", "svd")."""
    assert layer.weight_shape is not None
    if layer.op_type == "Conv":
        T, S = layer.weight_shape[0], layer.weight_shape[1]  # S: input channels per group
        G = conv_groups(layer)
        k = math.prod(layer.weight_shape[2:])
        out_px = _prod(layer.output_shape[2:]) if layer.output_shape else None
        in_px = _prod(layer.input_shape[2:]) if layer.input_shape else None
        batch = layer.output_shape[0] if layer.output_shape and layer.output_shape[0] else 1
        if kind == "original":
            params = T * S * k
            macs = None if out_px is None else params * out_px * batch
        elif kind == "tucker2":
            r4, r3 = ranks
            first, rest = G * S * r3, G * r3 * r4 * k + r4 * T
            params = first + rest
            macs = None if out_px is None or in_px is None else batch * (first * in_px + rest * out_px)
        elif kind == "tucker1":
            (r4,) = ranks
            params = G * r4 * S * k + r4 * T
            macs = None if out_px is None else params * out_px * batch
        elif kind == "svd":
            (r,) = ranks
            params = r * (G * S * k + T)
            macs = None if out_px is None else params * out_px * batch
        else:
            raise ValueError(kind)
        return params, macs
    K, N = gemm_dims(layer)
    rows = _rows(layer)
    if kind == "original":
        params = K * N
    elif kind == "svd":
        (r,) = ranks
        params = r * (K + N)
    else:
        raise ValueError(kind)
    return params, None if rows is None else params * rows
