"""Shared checks and unit -> parameter mapping for the edit methods.

Every method validates its input here *before* touching the model, so a bad call raises a
``ValueError`` that names the culprit and leaves the weights as they were.
"""

from __future__ import annotations

import hashlib
import math
from typing import Sequence

import torch
from torch import Tensor

from excise.handle import ModelHandle
from excise.importance import Importance
from excise.request import ForgetRequest
from excise.sites import PARAM_UNITS, Selection, Unit, layer_of

# activation sites whose units own parameter slices (mlp.pre neurons are the mlp.post neurons)
UNIT_SITES = ("mlp.post", "mlp.pre", "attn.z")
OUTPUT_WEIGHTS = ("mlp.W_out", "attn.W_O")


def check_number(method: str, name: str, value, *, low: float | None = None,
                 high: float | None = None, low_open: bool = False, integer: bool = False,
                 high_open: bool = False) -> None:
    """Raise ``ValueError`` unless ``value`` is a finite number in the given range."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok and integer:
        ok = isinstance(value, int)
    if ok:
        ok = math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        lo = "" if low is None else f"{'>' if low_open else '>='} {low}"
        hi = "" if high is None else f"{'<' if high_open else '<='} {high}"
        rng = " and ".join(x for x in (lo, hi) if x) or "finite"
        kind = "an integer" if integer else "a number"
        raise ValueError(f"{method}: {name}={value!r} is out of range; {name} must be {kind} "
                         f"{rng}")


def check_choice(method: str, name: str, value, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{method}: unknown {name} {value!r}; choose one of {list(choices)}")


def need_request(method: str, request, why: str) -> ForgetRequest:
    if not isinstance(request, ForgetRequest):
        raise ValueError(f"{method} needs request= (a ForgetRequest) {why}; got "
                         f"{type(request).__name__}")
    return request


def default_units(method: str, importance: Importance | None, units: Selection | None,
                  top: int | float, level: str = "unit") -> Selection:
    """``units`` if given, else the ``top`` units of ``importance``: neurons/heads
    (``by_unit("mean")``, level ``"unit"``) or individual elements (level ``"element"``)."""
    if units is not None:
        if not isinstance(units, Selection):
            raise ValueError(f"{method}: units must be a Selection (or None to take the top "
                             f"units of the importance), got {type(units).__name__}")
        return units
    if importance is None:
        raise ValueError(f"{method}: give units= (a Selection) or an Importance to take the "
                         f"top {top!r} units from")
    if level == "unit":
        try:
            return importance.by_unit("mean").top(top)
        except ValueError as e:
            if "maps to units" not in str(e):
                raise
    return importance.top(top)


def check_units(method: str, model: ModelHandle, units: Selection) -> None:
    """Every unit names an existing site and an index inside it; the selection is not empty."""
    if len(units) == 0:
        raise ValueError(f"{method}: the selection is empty; nothing to edit")
    for site, idxs in units.by_site().items():
        info = model.info(site)  # unknown site -> ValueError with suggestions
        shape = info.unit_shape
        for ix in idxs:
            if len(ix) != len(shape) or any(not 0 <= i < n for i, n in zip(ix, shape)):
                raise ValueError(f"{method}: unit {Unit(site, ix)} does not exist in this model; "
                                 f"{site} has unit shape {tuple(shape)} (valid indices "
                                 f"{_ranges(shape)})")


def _ranges(shape) -> str:
    return "[" + ", ".join(f"0..{n - 1}" for n in shape) + "]"


def flat_index(shape, ix: tuple[int, ...]) -> int:
    out = 0
    for i, n in zip(ix, shape):
        out = out * n + i
    return out


def param_slices(method: str, model: ModelHandle, units: Selection,
                 weights: str = "all") -> dict[str, Tensor]:
    """Flat parameter indices owned by ``units``: parameter-element units are themselves;
    neurons (``mlp.post`` / ``mlp.pre``) and heads (``attn.z``) own the slices listed in
    :data:`excise.sites.PARAM_UNITS` (``weights="out"``: only their output weights)."""
    check_units(method, model, units)
    out: dict[str, list[Tensor]] = {}
    for site, idxs in units.by_site().items():
        info = model.info(site)
        if info.kind == "param":
            shape = model.parameter(site).shape
            out.setdefault(site, []).append(torch.tensor([flat_index(shape, ix) for ix in idxs]))
            continue
        L = layer_of(site)
        short = site.split(".", 2)[2] if L is not None else site
        if info.kind != "activation" or short not in UNIT_SITES:
            raise ValueError(f"{method}: units at {site!r} own no parameters; select neurons "
                             f"('blocks.L.mlp.post'), heads ('blocks.L.attn.z') or parameter "
                             f"elements ('blocks.L.mlp.W_in')")
        unit = "mlp.post" if short == "mlp.pre" else short
        rows = torch.tensor([ix[0] for ix in idxs])
        found = False
        for suffix, usite, _ in PARAM_UNITS:
            if usite != unit or (weights == "out" and suffix not in OUTPUT_WEIGHTS):
                continue
            psite = f"blocks.{L}.{suffix}"
            if psite not in model.site_table():
                continue
            hit = model.unit_axis(psite)  # the unit's axis in this backend's layout
            if hit is None or hit[0] != f"blocks.{L}.{unit}":
                continue
            axis, group = hit[1], (hit[2] if len(hit) > 2 else 1)
            found = True
            p = model.parameter(psite)
            grid = torch.arange(p.numel()).view(p.shape)
            along = (rows[:, None] * group + torch.arange(group)).reshape(-1)
            out.setdefault(psite, []).append(grid.index_select(axis, along).reshape(-1))
        if not found:
            raise ValueError(f"{method}: this model's backend ({type(model).__name__}) keeps "
                             f"no per-unit parameter slices for {site!r}; select neurons or "
                             f"parameter elements")
    return {s: torch.unique(torch.cat(v)) for s, v in out.items()}


def importance_digest(importance: Importance | None) -> str:
    """Identity of an Importance for an edit's manifest key (same scores -> same digest)."""
    if importance is None:
        return ""
    h = hashlib.sha256(importance.method.encode())
    for site, s in importance.scores.items():
        h.update(site.encode())
        h.update(s.detach().float().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def target_positions(batch) -> Tensor:
    """``[n, T]`` bool: positions whose logits predict a target token."""
    m = torch.zeros_like(batch.target_mask)
    m[:, :-1] = batch.target_mask[:, 1:]
    return m


def real_positions(batch) -> Tensor:
    return torch.arange(batch.tokens.shape[1])[None, :] < batch.lengths[:, None]
