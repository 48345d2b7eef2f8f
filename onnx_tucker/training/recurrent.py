"""onnx2torch converters for ONNX `LSTM` and `GRU` (which onnx2torch lacks), registered on import.

Imported by `convert.import_onnx2torch` only (torch is loaded by then). One layer per node, as ONNX
has it: forward, reverse (the sequence flipped in time around a forward layer) or bidirectional; the
ONNX gate orders (LSTM i,o,f,c; GRU z,r,h) are laid out as torch's (i,f,c,o; r,z,n); the node's
initial states are inputs of the module (zeros from a `ConstantOfShape`, the default state as torch's
exporter writes it, are dropped: the module's own zeros follow the batch); `layout` 0 (time first) and
1 (batch first). An LSTM and a GRU with `linear_before_reset=1` become `nn.LSTM` / `nn.GRU`, which torch's exporter writes back as
ONNX `LSTM` / `GRU` nodes; a GRU with `linear_before_reset=0` (ONNX's default, which torch's GRU
cannot compute) is a loop over time in ONNX's own gate layout, exported as the ops it unrolls to.
Refused, with the node and the reason: `sequence_lens`, peepholes, `clip`, `input_forget`, activations
other than the defaults, and weights that are not constants.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch
from onnx import helper
from onnx2torch.node_converters.registry import add_converter
from onnx2torch.onnx_graph import OnnxGraph
from onnx2torch.onnx_node import OnnxNode
from onnx2torch.utils.common import OnnxMapping, OnnxToTorchModule, OperationConverterResult, get_const_value
from torch import nn

from ..errors import ModelLoadError
from ..graph import optypes


@dataclass(frozen=True)
class Cell:
    """What one recurrent op is: its gates' order (ONNX's stacked blocks, in torch's order), its default
    activations, its torch layer, whether it carries a cell state."""

    order: tuple[int, ...]
    activations: tuple[str, ...]
    layer: type
    has_cell: bool


LSTM_CELL = Cell(order=(0, 2, 3, 1), activations=("sigmoid", "tanh", "tanh"), layer=nn.LSTM, has_cell=True)  # i,o,f,c -> i,f,c,o
GRU_CELL = Cell(order=(1, 0, 2), activations=("sigmoid", "tanh"), layer=nn.GRU, has_cell=False)  # z,r,h -> r,z,n


def _refuse(node: OnnxNode, why: str) -> ModelLoadError:
    return ModelLoadError(f"node '{node.proto.name or node.output_values[0]}' ({node.operation_type}): {why}; "
                          "fine-tuning cannot convert it (export the model without it, or fine-tune in its own framework)")


def _text(v: Any) -> Any:
    return v.decode() if isinstance(v, bytes) else v


def _attrs(node: OnnxNode) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for a in node.proto.attribute:
        v = helper.get_attribute_value(a)
        out[a.name] = [_text(x) for x in v] if isinstance(v, list) else _text(v)
    return out


def _const(node: OnnxNode, graph: OnnxGraph, index: int, what: str) -> np.ndarray | None:
    names = node.input_values
    if index >= len(names) or not names[index]:
        return None
    try:
        value = get_const_value(names[index], graph)
    except KeyError:
        raise _refuse(node, f"its {what} '{names[index]}' is computed, not a constant") from None
    return np.asarray(value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else value, dtype=np.float32)


def _is_zero_state(name: str, graph: OnnxGraph) -> bool:
    """Whether the state input `name` is zeros made by a `ConstantOfShape` (value 0 or none), as
    torch's exporter writes an `nn.LSTM` / `nn.GRU` called without states: Shape(X) -> Gather(batch) ->
    Concat -> ConstantOfShape. That is the op's default state, and dropping it keeps the batch dynamic
    (onnx2torch's ConstantOfShape makes its shape a Python constant when traced, so the export would
    hold zeros of the sample's batch size)."""
    try:
        producer, _ = graph.value_as_node_output(name)
    except KeyError:
        return False
    if not optypes.is_op(producer.proto, *optypes.FILL_OPS):
        return False
    value = producer.attributes.get("value")
    return value is None or not np.any(value.to_numpy())


def _gates(w: np.ndarray, cell: Cell) -> np.ndarray:
    """Rows of stacked gates (ONNX order) -> torch's order; works on W / R (gates x ...) and on biases."""
    blocks = np.split(w, len(cell.order), axis=0)
    return np.concatenate([blocks[k] for k in cell.order], axis=0)


class OnnxRecurrent(nn.Module, OnnxToTorchModule):
    """One ONNX LSTM / GRU node: (X, initial_h?, initial_c?) -> (Y, Y_h[, Y_c]) in ONNX's shapes."""

    def __init__(self, has_cell: bool, layer: nn.Module, hidden: int, directions: int, reverse: bool, batch_first: bool,
                 has_h0: bool, has_c0: bool, outputs: int):
        super().__init__()
        self.has_cell, self.layer, self.hidden, self.directions = has_cell, layer, hidden, directions
        self.reverse, self.batch_first, self.has_h0, self.has_c0, self.outputs = reverse, batch_first, has_h0, has_c0, outputs

    def forward(self, x: torch.Tensor, *states: torch.Tensor) -> Any:
        if self.batch_first:  # ONNX layout 1: X [batch, seq, in], states [batch, dirs, H]
            x = x.transpose(0, 1)
            states = tuple(s.transpose(0, 1) for s in states)
        h0 = states[0] if self.has_h0 else None
        c0 = states[1 if self.has_h0 else 0] if self.has_c0 else None
        if self.reverse:
            x = torch.flip(x, [0])
        batch = x.shape[1]
        if self.has_cell:
            if h0 is not None or c0 is not None:
                zeros = x.new_zeros(self.directions, batch, self.hidden)
                y, (h, c) = self.layer(x, (zeros if h0 is None else h0, zeros if c0 is None else c0))
            else:
                y, (h, c) = self.layer(x)
        else:
            y, h = self.layer(x) if h0 is None else self.layer(x, h0)
            c = h
        if self.reverse:
            y = torch.flip(y, [0])
        # unflatten, not reshape(seq, batch, ...): traced sizes would be written as constants of the sample's
        y = y.unflatten(2, (self.directions, self.hidden)).transpose(1, 2)  # [seq, dirs, batch, H]
        if self.batch_first:
            y, h, c = y.permute(2, 0, 1, 3), h.transpose(0, 1), c.transpose(0, 1)
        return (y, h, c)[: self.outputs] if self.outputs > 1 else y


class GruResetAfter(nn.Module):
    """A GRU layer with ONNX's `linear_before_reset=0`: h~ = tanh(W_h x + R_h (r * h) + b); weights in ONNX's
    layout (gates z, r, h). Called like `nn.GRU`: (x [seq, batch, in], h0 [dirs, batch, H]?) -> (y, h_n)."""

    def __init__(self, w: np.ndarray, r: np.ndarray, b: np.ndarray):
        super().__init__()
        self.directions, self.hidden = w.shape[0], r.shape[-1]
        self.W, self.R = nn.Parameter(torch.from_numpy(w.copy())), nn.Parameter(torch.from_numpy(r.copy()))
        self.B = nn.Parameter(torch.from_numpy(b.copy()))

    def forward(self, x: torch.Tensor, h0: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        H = self.hidden
        if h0 is None:
            h0 = x.new_zeros(self.directions, x.shape[1], H)
        ys, hs = [], []
        for d in range(self.directions):
            w, r, wb, rb = self.W[d], self.R[d], self.B[d, : 3 * H], self.B[d, 3 * H :]
            seq = x if d == 0 else torch.flip(x, [0])
            gx = seq @ w.t() + wb  # [seq, batch, 3H]: every step's input part at once
            h, out = h0[d], []
            for t in range(seq.shape[0]):
                g = gx[t]
                z = torch.sigmoid(g[:, :H] + h @ r[:H].t() + rb[:H])
                rr = torch.sigmoid(g[:, H : 2 * H] + h @ r[H : 2 * H].t() + rb[H : 2 * H])
                n = torch.tanh(g[:, 2 * H :] + (rr * h) @ r[2 * H :].t() + rb[2 * H :])
                h = (1 - z) * n + z * h
                out.append(h)
            y = torch.stack(out)
            ys.append(y if d == 0 else torch.flip(y, [0]))
            hs.append(h)
        return torch.cat(ys, dim=-1), torch.stack(hs)


def _convert(node: OnnxNode, graph: OnnxGraph, cell: Cell) -> OperationConverterResult:
    a = _attrs(node)
    direction = a.get("direction", "forward")
    directions = 2 if direction == "bidirectional" else 1
    names = node.input_values
    if len(names) > 4 and names[4]:
        raise _refuse(node, "sequence_lens (sequences of different lengths in one batch) is not supported")
    if cell.has_cell and len(names) > 7 and names[7]:
        p = _const(node, graph, 7, "peephole weight")
        if p is not None and np.any(p):
            raise _refuse(node, "peephole connections (input P) have no torch equivalent")
    for attr in ("clip", "activation_alpha", "activation_beta"):
        if attr in a:
            raise _refuse(node, f"the attribute {attr} is not supported")
    if a.get("input_forget", 0):
        raise _refuse(node, "input_forget=1 (coupled input and forget gates) is not supported")
    acts = tuple(s.lower() for s in a.get("activations", ()))
    if acts and acts != cell.activations * directions:
        raise _refuse(node, f"activations {list(a['activations'])} are not the defaults {list(cell.activations)}")
    w, r = _const(node, graph, 1, "input weight W"), _const(node, graph, 2, "recurrence weight R")
    if w is None or r is None:
        raise _refuse(node, "its weights W and R are missing")
    gates, hidden = len(cell.order), int(a["hidden_size"]) if "hidden_size" in a else int(r.shape[-1])
    if w.shape[0] != directions or w.shape[1] != gates * hidden or r.shape != (directions, gates * hidden, hidden):
        raise _refuse(node, f"weights W {w.shape} and R {r.shape} do not match hidden_size {hidden} and direction {direction}")
    b = _const(node, graph, 3, "bias B")
    if b is None:
        b = np.zeros((directions, 2 * gates * hidden), np.float32)
    h0_name = names[5] if len(names) > 5 and names[5] else ""
    c0_name = names[6] if cell.has_cell and len(names) > 6 and names[6] else ""
    h0_name, c0_name = ("" if n and _is_zero_state(n, graph) else n for n in (h0_name, c0_name))
    if not cell.has_cell and not a.get("linear_before_reset", 0):
        layer: nn.Module = GruResetAfter(w, r, b)
    else:
        layer = cell.layer(w.shape[2], hidden, bidirectional=directions == 2)
        with torch.no_grad():
            for d in range(directions):
                sfx = "_reverse" if d else ""
                getattr(layer, f"weight_ih_l0{sfx}").copy_(torch.from_numpy(_gates(w[d], cell)))
                getattr(layer, f"weight_hh_l0{sfx}").copy_(torch.from_numpy(_gates(r[d], cell)))
                getattr(layer, f"bias_ih_l0{sfx}").copy_(torch.from_numpy(_gates(b[d, : gates * hidden], cell)))
                getattr(layer, f"bias_hh_l0{sfx}").copy_(torch.from_numpy(_gates(b[d, gates * hidden :], cell)))
    outputs = len(node.output_values)
    module = OnnxRecurrent(cell.has_cell, layer, hidden, directions, direction == "reverse", bool(a.get("layout", 0)),
                           bool(h0_name), bool(c0_name), outputs)
    inputs = tuple(n for n in (names[0], h0_name, c0_name) if n)
    return OperationConverterResult(torch_module=module, onnx_mapping=OnnxMapping(inputs=inputs, outputs=node.output_values))


for _version in (7, 14):
    add_converter(operation_type="LSTM", version=_version)(partial(_convert, cell=LSTM_CELL))
for _version in (3, 7, 14):
    add_converter(operation_type="GRU", version=_version)(partial(_convert, cell=GRU_CELL))
