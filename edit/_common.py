"""Unit -> parameter mapping and selection defaults shared by the edit methods.

Every method validates its input (:mod:`excise.checks`, and :func:`check_inputs`: finite
weights, an Importance computed on this model) *before* touching the model, so a bad call raises
a ``ValueError`` that names the culprit and leaves the weights as they were.
"""

from __future__ import annotations

import hashlib

import torch
from torch import Tensor

from excise.checks import check_units
from excise.handle import ModelHandle
from excise.importance import Importance
from excise.sites import PARAM_UNITS, Selection, layer_of

# activation sites whose units own parameter slices (mlp.pre neurons are the mlp.post neurons)
UNIT_SITES = ("mlp.post", "mlp.pre", "attn.z")
OUTPUT_WEIGHTS = ("mlp.W_out", "attn.W_O")


def check_inputs(method: str, model: ModelHandle, importance: Importance | None) -> None:
    """What every edit method checks before it computes anything: the model's weights are
    finite, and ``importance`` (when given) was computed on this model - see
    :func:`check_importance_model`."""
    model.check_finite(method)
    if importance is not None:
        check_importance_model(method, model, importance)


def check_importance_model(method: str, model: ModelHandle, importance: Importance) -> None:
    """Refuse an Importance computed on other weights than the model being edited.

    Locate methods record the weights' fingerprint in ``importance.meta["model"]``. It is
    accepted when it is the model's current fingerprint, or the fingerprint the model had
    before one of the edits now applied to it (``edit_stack``): an Importance located on a
    model and then used for a second edit stacked on the first (noise then finetune, as GRIN
    does) still describes this model's history. ``sequential`` locates on the edited weights,
    which is the current fingerprint. An Importance without a recorded fingerprint (built by
    hand) is not checked."""
    want = importance.meta.get("model") if isinstance(importance, Importance) else None
    if not isinstance(want, str) or not want:
        return
    history = [e.fingerprint_before for e in model.edit_stack]
    if want in history:
        return
    have = model.fingerprint()
    if want == have:
        return
    stacked = (f" nor before any of the {len(history)} edit(s) applied to it"
               f" ({', '.join(str(h) for h in history)})" if history else "")
    raise ValueError(f"{method}: the Importance ({importance.method!r}) was computed on a model "
                     f"with fingerprint {want}, but the model being edited "
                     f"({model.name or type(model).__name__}) has fingerprint {have}{stacked}: "
                     f"its scores describe other weights. Locate again on this model "
                     f"(locate.{importance.method}(model, request)), or edit the model it was "
                     f"computed on")


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
