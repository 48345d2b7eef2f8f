"""Planning: which layers to decompose, how, and at which ranks.

Input: the `Layer`s found in the graph and a way to read their weights; output: a frozen
`CompressionPlan`. Pure numpy: no protobuf here.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from enum import Enum
from pathlib import Path

import numpy as np

from ..config import CompressionConfig, RankPolicy, compile_pattern, kind_list
from ..errors import PlanError
from ..numerics.evbmf import EVBMFEstimate, evbmf_from_singular_values, singular_values
from ..numerics.spectral import LayerSpectra
from ..ops.base import MODE_NAMES, OpHandler
from ..ops.layer import Layer
from ..ops.registry import handler_for

PLAN_FORMAT_VERSION = 1
KINDS = ("tucker2", "tucker1", "tucker1-in", "svd", "spatial-svd", "cp", "skip")


class SkipCause(str, Enum):
    """Why a layer is kept as it is, as a code: what code decides on (`LayerPlan.reason` is the same in
    words, for people, and never matched). Set where the reason is decided."""

    MODEL = "model"  # the node can never be decomposed (`Layer.skip_reason`: op, operands, weight, place)
    PLAN = "plan"  # the plan replayed (--plan, or a --target / --ranks data allocation) keeps it
    INCLUDE = "include"  # the name does not match --include
    EXCLUDE = "exclude"  # the name matches --exclude
    NON_FINITE = "non-finite"  # NaN/Inf in the weight
    RANK_ZERO = "rank-zero"  # EVBMF rank 0: the weights look like noise
    NO_GAIN = "no-gain"  # the chain would not have fewer parameters or MACs
    FULL_RANK = "full-rank"  # the ranks are full: nothing to gain
    SHARED_WEIGHT = "shared-weight"  # the weight's sharers cannot share one factorisation
    SLOWER = "slower"  # --latency-aware / --min-speedup: the chain does not pay in the runtime
    BUDGET = "budget"  # a whole-model allocation (--target, --ranks data) keeps it, or leaves it out


@dataclass(frozen=True)
class LayerPlan:
    """One layer's decision. Ranks are (R4, R3) for tucker2, (R4,) for tucker1, (R3,) for tucker1-in,
    (R,) for svd, spatial-svd and cp."""

    name: str
    op_type: str
    kind: str
    weight_shape: tuple[int, ...] | None = None
    evbmf_ranks: tuple[int, ...] | None = None
    ranks: tuple[int, ...] | None = None
    sigma2: tuple[float, ...] | None = None
    params_before: int | None = None
    params_after: int | None = None
    macs_before: int | None = None
    macs_after: int | None = None
    rel_error: float | None = None
    reason: str | None = None  # why skipped (kind == "skip"), or a note on the rank policy
    cause: SkipCause | None = None  # why skipped, as a code (set with the reason of every skip)
    policy: str = ""  # how the ranks were reached: "vbmf", "ratio:0.5", "plan file", "rank0:min-rank", ...
    # Measured in the runtime (--latency-aware): medians of the original node and of the chain, timed
    # interleaved in isolation at the layer's input shape. For a layer kept because the chain did not
    # pay, `time_after_ms` is the best variant tried.
    time_before_ms: float | None = None
    time_after_ms: float | None = None

    @property
    def decomposed(self) -> bool:
        return self.kind != "skip"

    @property
    def time_speedup(self) -> float | None:
        """Measured time before / after (None when not timed)."""
        if self.time_before_ms is None or not self.time_after_ms:
            return None
        return self.time_before_ms / self.time_after_ms


@dataclass(frozen=True)
class CompressionPlan:
    layers: tuple[LayerPlan, ...]
    config: CompressionConfig = field(default_factory=CompressionConfig)
    # Float parameters of the whole model (biases, BN, every layer): set by the plan stage so that the
    # plan's totals count what `compress` counts, not only the planned layers' weights.
    model_params: int | None = None
    # What replays, only: the budget search, its MAC check and the layer timing are outcomes of the plan
    # stage (`planning.stage.PlanResult`, then `CompressionResult`).

    @property
    def decomposed(self) -> tuple[LayerPlan, ...]:
        return tuple(p for p in self.layers if p.decomposed)

    def totals(self) -> dict[str, int]:
        """Parameters and MACs before and after (kept layers count as before). Parameters: the whole
        model's when `model_params` is known (what `compress` reports), else the planned layers' weights."""
        known = [p for p in self.layers if p.params_before is not None]
        with_macs = [p for p in known if p.macs_before is not None]
        params_before = sum(p.params_before or 0 for p in known)
        params_after = sum(p.params_after or 0 for p in known)
        if self.model_params is not None:  # the rest of the model (biases, BN, ...) is unchanged
            params_before, params_after = self.model_params, self.model_params - (params_before - params_after)
        return {
            "params_before": params_before,
            "params_after": params_after,
            "macs_before": sum(p.macs_before or 0 for p in with_macs),
            "macs_after": sum(p.macs_after if p.macs_after is not None else (p.macs_before or 0) for p in with_macs),
        }

    def to_dict(self) -> dict[str, object]:
        return {
            "format": "onnx-tucker-plan",
            "version": PLAN_FORMAT_VERSION,
            "config": self.config.to_dict(),
            "layers": [_layer_to_dict(p) for p in self.layers],
        }

    def to_json(self) -> str:
        """The plan file's text (`--save-plan`; `--plan` replays it)."""
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the plan file atomically."""
        from ..graph.save import write_text_atomic

        write_text_atomic(path, self.to_json())


def _layer_to_dict(p: LayerPlan) -> dict[str, object]:
    d = asdict(p)
    for k in ("weight_shape", "evbmf_ranks", "ranks", "sigma2"):
        if d[k] is not None:
            d[k] = list(d[k])
    d["cause"] = None if p.cause is None else p.cause.value
    return d


@dataclass(frozen=True)
class PlannedRanks:
    """The entries of a plan file that replay: layer name -> (kind, ranks, weight shape)."""

    entries: dict[str, tuple[str, tuple[int, ...] | None, tuple[int, ...] | None]]
    source: str
    # Why a layer is skipped (default: "skipped in the plan file"), and the policy the plan records.
    reasons: dict[str, str] = field(default_factory=dict)
    policy: str = "plan file"
    # The cause of each reason given (default: `SkipCause.PLAN`).
    causes: dict[str, SkipCause] = field(default_factory=dict)
    # Per layer, the policy that chose its ranks when not `policy` (a data plan's fallback layers), and a
    # note on a decomposed layer's ranks (its plan's `reason`).
    policies: dict[str, str] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)


def _whole_numbers(values: object) -> tuple[int, ...]:
    """Ranks and shapes as the plan file lists them; 8.7 (or "8", or true) is refused, never truncated."""
    if not isinstance(values, list):
        raise TypeError(values)
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int | float) or not float(v).is_integer():
            raise ValueError(v)
        out.append(int(v))
    return tuple(out)


def load_plan_file(path: str | os.PathLike[str]) -> PlannedRanks:
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        raise PlanError(f"{p}: plan file not found; write one with --save-plan") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PlanError(f"{p}: not a readable plan file ({e}); write one with --save-plan") from None
    # Each check says what is actually wrong: a missing 'layers' list is not a missing 'format' key.
    if not isinstance(data, dict) or data.get("format") != "onnx-tucker-plan":
        raise PlanError(f"{p}: not an onnx-tucker plan (no 'format': 'onnx-tucker-plan'); write one with --save-plan")
    # No 'version' (a hand-written plan) reads as the current one; any other version is refused, not guessed at.
    version = data.get("version", PLAN_FORMAT_VERSION)
    if version != PLAN_FORMAT_VERSION or isinstance(version, bool):
        raise PlanError(f"{p}: plan format version {version!r} is not known (this onnx-tucker reads version "
                        f"{PLAN_FORMAT_VERSION}); write the plan again with --save-plan, or use the onnx-tucker that wrote it")
    if "layers" not in data:
        raise PlanError(f"{p}: the plan has no 'layers' list; write the plan again with --save-plan")
    if not isinstance(data["layers"], list):
        raise PlanError(f"{p}: 'layers' is a {type(data['layers']).__name__}, not a list of layer entries; "
                        "write the plan again with --save-plan")
    entries: dict[str, tuple[str, tuple[int, ...] | None, tuple[int, ...] | None]] = {}
    for item in data["layers"]:
        try:
            name, kind = str(item["name"]), str(item["kind"])
            ranks = _whole_numbers(item["ranks"]) if item.get("ranks") is not None else None
            shape = _whole_numbers(item["weight_shape"]) if item.get("weight_shape") is not None else None
        except (KeyError, TypeError, ValueError, AttributeError):
            raise PlanError(f"{p}: malformed layer entry {item!r}; ranks and weight_shape must be lists of whole numbers: "
                            "write the plan again with --save-plan") from None
        if kind not in KINDS or (kind != "skip" and (not ranks or min(ranks) < 1)):
            raise PlanError(f"{p}: layer '{name}' has kind {kind!r} / ranks {ranks}; expected a kind of {KINDS} with ranks >= 1")
        entries[name] = (kind, ranks, shape)
    return PlannedRanks(entries, str(p))


@dataclass(frozen=True)
class _Spectrum:
    s: np.ndarray
    shape: tuple[int, int]

    def evbmf(self) -> EVBMFEstimate:
        return evbmf_from_singular_values(self.s, self.shape)


def _rank_by_policy(spec: _Spectrum, policy: RankPolicy, est: EVBMFEstimate) -> int:
    full = min(spec.shape)
    if policy.method == "vbmf":
        return est.rank
    if policy.method == "full":
        return full
    if policy.method == "ratio":
        assert policy.value is not None
        return max(1, math.ceil(policy.value * full))
    assert policy.method == "energy" and policy.value is not None
    energy = np.cumsum(spec.s**2)
    if energy[-1] <= 0:
        return 0
    return int(np.searchsorted(energy / energy[-1], policy.value - 1e-12) + 1)


def _adjust(rank: int, dim: int, cfg: CompressionConfig) -> int:
    if cfg.ranks.method == "full":
        return rank
    r = math.ceil(rank * cfg.rank_scale - 1e-9) if cfg.rank_scale != 1.0 else rank
    r = max(r, cfg.min_rank or 0)
    if cfg.round_to > 1 and r > 0:
        r = math.ceil(r / cfg.round_to) * cfg.round_to
    return min(r, dim)


# Planning in three steps (check_plan_covers, plan_layer per layer, finish_plan), so that the caller can
# decompose each layer right after planning it (api: one weight in memory at a time, layers in parallel
# with --jobs, the Gram matrices shared).


def check_plan_covers(layers: list[Layer], planned: PlannedRanks | None) -> None:
    """Refuse a plan file naming layers this model does not have."""
    if planned is not None:
        names = {lay.layer_id for lay in layers}
        missing = sorted(set(planned.entries) - names)
        if missing:
            raise PlanError(
                f"{planned.source}: layer '{missing[0]}' is not in this model ({len(missing)} plan layers missing); "
                "the plan was made for another model: run without --plan or re-plan with --save-plan"
            )


def plan_layer(
    layer: Layer,
    read_weight: Callable[[str], np.ndarray],
    config: CompressionConfig,
    planned: PlannedRanks | None = None,
    spectra: LayerSpectra | None = None,
) -> LayerPlan:
    """One layer's plan; `spectra` keeps the eigendecompositions for `decompose_layer`."""
    include = compile_pattern(config.include, "--include")
    exclude = compile_pattern(config.exclude, "--exclude")
    return _plan_one(layer, read_weight, config, include, exclude, planned, spectra)


def finish_plan(layers: list[Layer], plans: list[LayerPlan], config: CompressionConfig) -> CompressionPlan:
    """The plan of the whole model from its layers' plans (checks across layers: shared weights)."""
    return CompressionPlan(layers=tuple(_one_factorisation_per_weight(layers, plans)), config=config)


def _plan_one(layer, read_weight, cfg, include, exclude, planned, spectra=None) -> LayerPlan:  # type: ignore[no-untyped-def]
    base = LayerPlan(name=layer.layer_id, op_type=layer.op_type, kind="skip", weight_shape=layer.weight_shape)
    if layer.skip_reason:
        return replace(base, reason=layer.skip_reason, cause=SkipCause.MODEL)
    handler = handler_for(layer)
    params0, macs0 = handler.cost(layer, "original")
    base = replace(base, params_before=params0, macs_before=macs0, params_after=params0, macs_after=macs0)
    if planned is not None:
        entry = planned.entries.get(layer.layer_id)
        if entry is None:
            return replace(base, reason=planned.reasons.get(layer.layer_id, f"not in the plan file {planned.source}"),
                           cause=planned.causes.get(layer.layer_id, SkipCause.PLAN))
        kind, ranks, shape = entry
        if shape is not None and tuple(shape) != tuple(layer.weight_shape or ()):
            raise PlanError(
                f"{planned.source}: layer '{layer.layer_id}' has weight shape {tuple(layer.weight_shape or ())} "
                f"in the model but {tuple(shape)} in the plan; the plan was made for another model"
            )
        if kind == "skip":
            return replace(base, reason=planned.reasons.get(layer.layer_id, "skipped in the plan file"),
                           policy=planned.policies.get(layer.layer_id, planned.policy),
                           cause=planned.causes.get(layer.layer_id, SkipCause.PLAN))
        if kind not in handler.kinds(layer):
            raise PlanError(
                f"{planned.source}: layer '{layer.layer_id}' ({conv_shape_hint(layer)}) cannot be decomposed as "
                f"{kind}; use one of {', '.join(handler.kinds(layer))} or skip (was the plan edited by hand?)"
            )
    if include is not None and not include.search(layer.layer_id):
        return replace(base, reason=f"name does not match --include {cfg.include!r}", cause=SkipCause.INCLUDE)
    if exclude is not None and exclude.search(layer.layer_id):
        return replace(base, reason=f"name matches --exclude {cfg.exclude!r}", cause=SkipCause.EXCLUDE)

    weight = read_weight(layer.weight_name)
    if not np.all(np.isfinite(weight)):
        bad = int(np.size(weight) - np.count_nonzero(np.isfinite(weight)))
        return replace(base, reason=f"weight holds {bad} NaN/Inf values; fix the model (layer left as is)",
                       cause=SkipCause.NON_FINITE)
    if planned is not None:
        kind = planned.entries[layer.layer_id][0]
    else:  # --kind: the first listed that the layer allows, else the handler's default
        allowed = handler.kinds(layer)
        kind = next((k for k in kind_list(cfg.kind) or () if k in allowed), None) or \
            handler.default_kind(layer, cfg.min_tucker2_channels)
    blocks = handler.blocks(layer, weight)
    groups = len(blocks)
    if groups > 1:
        # Replaying a plan, the ranks are the plan's: the spectra only report EVBMF (a `data:F` policy
        # ranks nothing from a spectrum).
        mats, specs, ests = _grouped_spectra(handler, blocks, kind, cfg.ranks if planned is None else RankPolicy("vbmf"))
    else:
        mats = handler.matrices(blocks[0], kind)
        specs = [
            _Spectrum(spectra.eigen(i, m).singular_values if spectra is not None else singular_values(m), (m.shape[0], m.shape[1]))
            for i, m in enumerate(mats)
        ]
        ests = [sp.evbmf() for sp in specs]
    dims = [m.shape[0] for m in mats]  # the channel dimension each rank applies to
    caps = [min(m.shape) for m in mats]  # a rank above the unfolding's rank adds nothing
    limits = handler.rank_limits(tuple(blocks[0].shape), kind)
    if limits is not None:  # CP: ranks up to its exact bound, above any one unfolding's
        dims, caps = list(limits), list(limits)
    base = replace(base, evbmf_ranks=tuple(e.rank for e in ests), sigma2=tuple(e.sigma2 for e in ests))

    if planned is not None:
        ranks = planned.entries[layer.layer_id][1]
        assert ranks is not None
        if len(ranks) != len(mats) or any(r > d for r, d in zip(ranks, dims, strict=True)):
            raise PlanError(
                f"{planned.source}: layer '{layer.layer_id}' ranks {ranks} do not fit {kind} of weight "
                f"{layer.weight_shape}; the plan was made for another model"
            )
        policy = planned.policies.get(layer.layer_id, planned.policy)
    else:
        raw = [_rank_by_policy(sp, cfg.ranks, e) for sp, e in zip(specs, ests, strict=True)]
        if limits is not None and cfg.ranks.method in ("full", "ratio"):  # of the kind's own rank bound
            share = cfg.ranks.value if cfg.ranks.method == "ratio" and cfg.ranks.value is not None else 1.0
            raw = [max(1, math.ceil(share * c)) for c in limits]
        policy = str(cfg.ranks)
        if min(raw) == 0 and cfg.min_rank is None:
            which = " and ".join(f"{n} mode" for n, r in zip(MODE_NAMES[kind], raw, strict=True) if r == 0)
            return replace(
                base,
                reason=f"EVBMF rank 0 on the {which}: the weights look like noise; kept as is (--min-rank N forces a rank)",
                policy="rank0:kept",
                cause=SkipCause.RANK_ZERO,
            )
        if min(raw) == 0:
            policy += ";rank0:min-rank"
        ranks = tuple(min(_adjust(r, d, cfg), c) for r, d, c in zip(raw, dims, caps, strict=True))
        ranks = tuple(max(r, 1) for r in ranks)

    if kind == "tucker2" and cfg.ranks.method != "full" and planned is None and ranks[1] >= caps[1]:
        # No saving on the input mode: the first 1x1 would be S -> S. Tucker-1 is strictly cheaper.
        kind, ranks, caps = "tucker1", (ranks[0],), caps[:1]
        base = replace(base, evbmf_ranks=base.evbmf_ranks[:1], sigma2=base.sigma2[:1])  # type: ignore[index]
        policy += ";input mode full -> tucker1"
    elif kind == "tucker2" and cfg.ranks.method != "full" and planned is None and ranks[0] >= caps[0]:
        # The mirror: no saving on the output mode, the last 1x1 would be a T x T rotation that the core
        # absorbs. Tucker-1 on the input mode is the same approximation without it.
        kind, ranks, caps = "tucker1-in", (ranks[1],), caps[1:]
        base = replace(base, evbmf_ranks=base.evbmf_ranks[1:], sigma2=base.sigma2[1:])  # type: ignore[index]
        policy += ";output mode full -> tucker1-in"
    if groups > 1:
        policy += f";ranks per group (group={groups})"
    params1, macs1 = handler.cost(layer, kind, ranks)
    plan = replace(base, kind=kind, ranks=ranks, params_after=params1, macs_after=macs1, policy=policy,
                   reason=planned.notes.get(layer.layer_id) if planned is not None else None)
    if cfg.ranks.method == "full" or planned is not None:
        return plan
    grows = []
    if params1 >= params0:
        grows.append(f"params {params0} -> {params1}")
    if macs0 is not None and macs1 is not None and macs1 >= macs0:
        grows.append(f"MACs {macs0} -> {macs1}")
    if grows:
        return replace(
            base,
            ranks=ranks,
            policy=policy,
            reason=f"no gain at ranks {ranks} as {kind}: " + ", ".join(grows) + "; kept as is",
            cause=SkipCause.NO_GAIN,
        )
    if all(r >= c for r, c in zip(ranks, caps, strict=True)):
        return replace(base, ranks=ranks, policy=policy, reason=f"full rank {ranks}: nothing to gain; kept as is",
                       cause=SkipCause.FULL_RANK)
    return plan


def mode_energies(layer: Layer, weight: np.ndarray, kind: str, spectra: LayerSpectra | None = None) -> list[np.ndarray]:
    """Per factorised mode of `kind`: the squared singular values of its matrix (summed over the groups
    of a grouped layer, which all get the same rank), descending, divided by the weight's squared norm.
    What a rank budget trades: truncating mode m at r loses sum(e[m][r:]) of the energy (HOSVD bound).
    `spectra`: the planner's eigendecompositions, reused for single-group layers."""
    handler = handler_for(layer)
    blocks = handler.blocks(layer, weight)
    total: list[np.ndarray] = []
    for g, block in enumerate(blocks):
        for m, mat in enumerate(handler.matrices(block, kind)):
            sv = spectra.eigen(m, mat).singular_values if spectra is not None and g == 0 and len(blocks) == 1 else singular_values(mat)
            e = np.sort(np.asarray(sv, dtype=np.float64) ** 2)[::-1]
            if g == 0:
                total.append(e)
            else:
                total[m] = total[m] + e
    norm = float(np.sum(total[0])) if total else 0.0
    return [e / norm if norm > 0 else e for e in total]


def _grouped_spectra(
    handler: OpHandler, weights: list[np.ndarray], kind: str, policy: RankPolicy
) -> tuple[list[np.ndarray], list[_Spectrum], list[EVBMFEstimate]]:
    """Spectra of a grouped conv, chosen per mode over its groups.

    Every group gets the same ranks, so the factors are block-diagonal (grouped convs themselves):
    per mode, the group whose rank under `policy` is largest decides; the EVBMF estimate reported is
    the largest over the groups. Returns group 0's matrices (all groups have the same shapes).
    """
    blocks = [handler.matrices(w, kind) for w in weights]
    specs: list[_Spectrum] = []
    ests: list[EVBMFEstimate] = []
    for mode in range(len(blocks[0])):
        cands = [_Spectrum(singular_values(b[mode]), (b[mode].shape[0], b[mode].shape[1])) for b in blocks]
        found = [(sp, sp.evbmf()) for sp in cands]
        specs.append(max(found, key=lambda f: _rank_by_policy(f[0], policy, f[1]))[0])
        ests.append(max((e for _, e in found), key=lambda e: e.rank))
    return blocks[0], specs, ests


def _one_factorisation_per_weight(layers: list[Layer], plans: list[LayerPlan]) -> list[LayerPlan]:
    """Layers sharing a weight are decomposed together with one set of factors, or not at all.

    Decomposing only some of them (or at different ranks) would keep the original weight and add
    factors next to it: the model would grow. Such groups are all kept as is, with the reason.
    """
    groups: dict[str, list[int]] = {}
    for k, lay in enumerate(layers):
        if lay.weight_name:
            groups.setdefault(lay.weight_name, []).append(k)
    out = list(plans)
    for weight, members in groups.items():
        if len(members) < 2 or not any(plans[k].decomposed for k in members):
            continue
        ways = {(plans[k].kind, plans[k].ranks, handler_for(layers[k]).factorisation_key(layers[k])) for k in members}
        if len(ways) == 1:
            continue  # all decomposed the same way: the rewrite shares one set of factors
        how = ", ".join(
            f"'{plans[k].name}' "
            + (f"{plans[k].kind} {plans[k].ranks}" if plans[k].decomposed else f"kept ({plans[k].reason})")
            + handler_for(layers[k]).factorisation_note(layers[k])
            for k in members
        )
        for k in members:
            if plans[k].decomposed:
                p = plans[k]
                out[k] = replace(
                    p,
                    kind="skip",
                    params_after=p.params_before,
                    macs_after=p.macs_before,
                    reason=f"weight '{weight}' is shared by {len(members)} layers that cannot share one "
                    f"factorisation ({how}); decomposing only some would add factors next to the kept "
                    "weight: kept as is",
                    cause=SkipCause.SHARED_WEIGHT,
                )
    return out


def conv_shape_hint(layer: Layer) -> str:
    """For messages: 'Conv 64x32x3x3' or 'Gemm 256x1152'."""
    return f"{layer.op_type} " + "x".join(map(str, layer.weight_shape or ()))


__all__ = [
    "CompressionPlan",
    "LayerPlan",
    "PlannedRanks",
    "SkipCause",
    "check_plan_covers",
    "finish_plan",
    "load_plan_file",
    "mode_energies",
    "plan_layer",
]
