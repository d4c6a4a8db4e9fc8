"""Unit -> parameter mapping and selection defaults shared by the edit methods.

Every method validates its input (:mod:`excise.checks`, and :func:`check_inputs`: finite
weights, an Importance computed on this model) *before* touching the model, so a bad call raises
a ``ValueError`` that names the culprit and leaves the weights as they were.
"""

from __future__ import annotations

import hashlib

import torch
from torch import Tensor

from excise.checks import check_units, need_request
from excise.handle import ModelHandle
from excise.importance import Importance
from excise.sites import PARAM_UNITS, Selection, layer_of
from excise.train import TrainResult

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


def flat_indices(shape, idxs) -> Tensor:
    """:func:`flat_index` of every index tuple in ``idxs`` at once (row-major, one tensor
    product instead of a Python loop per element: a selection can hold a tenth of a model's
    weights)."""
    if len(shape) == 0 or any(len(ix) != len(shape) for ix in idxs):
        return torch.tensor([flat_index(shape, ix) for ix in idxs], dtype=torch.long)
    strides = torch.ones(len(shape), dtype=torch.long)
    for d in range(len(shape) - 2, -1, -1):
        strides[d] = strides[d + 1] * shape[d + 1]
    return (torch.tensor(idxs, dtype=torch.long).reshape(len(idxs), len(shape))
            * strides).sum(1)


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
            out.setdefault(site, []).append(flat_indices(model.parameter(site).shape, idxs))
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
        # the bytes hashed where they lie (no copy of the tensor)
        h.update(s.detach().float().cpu().contiguous().view(torch.uint8).numpy())
    return h.hexdigest()[:16]


def target_positions(batch) -> Tensor:
    """``[n, T]`` bool: positions whose logits predict a target token."""
    m = torch.zeros_like(batch.target_mask)
    m[:, :-1] = batch.target_mask[:, 1:]
    return m


def real_positions(batch) -> Tensor:
    t = torch.arange(batch.tokens.shape[1], device=batch.lengths.device)
    return t[None, :] < batch.lengths[:, None]


# -- units -> slices, shared by the training methods (finetune, reinit, distill) ---------------
def unit_slices(method: str, model: ModelHandle, importance: Importance | None,
                units: Selection | str | None, top: int | float
                ) -> tuple[Selection | None, dict[str, Tensor]]:
    """The selection (``None`` for ``units="all"``) and the flat parameter indices it owns:
    ``units="all"`` is every parameter of the model (the global reference); a Selection, or
    None (the ``top`` units of ``importance``), owns the slices of :func:`param_slices`."""
    if isinstance(units, str):
        if units != "all":
            raise ValueError(f"{method}: units={units!r}; pass a Selection, None (top units "
                             f"of the importance) or 'all'")
        return None, {s: torch.arange(p.numel()) for s, p in model.named_parameters().items()}
    selection = default_units(method, importance, units, top)
    return selection, param_slices(method, model, selection)


# -- fresh initialisation and shrink-and-perturb -----------------------------------------------
def init_std(model: ModelHandle, site: str) -> float:
    """The standard deviation a fresh weight matrix (``W_*``) of this model is drawn with: the
    model's recorded ``initializer_range`` (TransformerLens ``cfg`` with ``init_mode="gpt2"``,
    N(0, initializer_range) for every ``W_*``; a Hugging Face ``config``), else the current
    standard deviation of the tensor itself."""
    cfg = getattr(model.model, "cfg", None) or getattr(model.model, "config", None)
    std = getattr(cfg, "initializer_range", None)
    if (getattr(cfg, "init_mode", "gpt2") == "gpt2" and isinstance(std, (int, float))
            and not isinstance(std, bool) and std > 0):
        return float(std)
    return float(model.parameter(site).detach().double().std())


def fresh_values(model: ModelHandle, site: str, n: int, generator: torch.Generator) -> Tensor:
    """``n`` values drawn like a fresh initialisation of parameter ``site``: weight matrices
    (``W_*``) N(0, :func:`init_std`); norm scales (``...ln*.w``) 1; biases and norm offsets 0
    (TransformerLens' initialisation; norms stored as an offset from 1 would want 0 - they
    belong to no neuron or head, so only ``units="all"`` touches them)."""
    p = model.parameter(site)
    last = site.rsplit(".", 1)[-1]
    if last.startswith("W_"):
        return (torch.randn(n, generator=generator) * init_std(model, site)).to(p.dtype)
    return torch.full((n,), 1.0 if last == "w" else 0.0, dtype=p.dtype)


def perturbed(model: ModelHandle, slices: dict[str, Tensor], alpha: float,
              seed: int) -> dict[str, Tensor]:
    """Shrink-and-perturb of the elements in ``slices``: ``(1 - alpha) * theta + alpha *
    fresh`` per element, ``fresh`` from :func:`fresh_values` (drawn from one generator seeded
    with ``seed``, sites in sorted order); ``alpha = 1`` is a fresh initialisation. Returns the
    new values at each site's indices (the model is not changed), on the parameter's device
    and in its dtype (mixed in float32 or wider)."""
    g = torch.Generator().manual_seed(seed)  # CPU draws: the same values on every device
    out = {}
    for site in sorted(slices):
        idx = slices[site]
        p = model.parameter(site).detach()
        fresh = fresh_values(model, site, idx.numel(), g).to(p.device)
        if alpha == 1:
            out[site] = fresh
        else:
            acc = torch.promote_types(p.dtype, torch.float32)
            old = p.reshape(-1)[idx.to(p.device)].to(acc)
            out[site] = ((1 - alpha) * old + alpha * fresh.to(acc)).to(p.dtype)
    return out


# -- a private, masked copy to train ----------------------------------------------------------
class MaskedCopy:
    """A private copy of ``model`` whose parameters in ``slices`` train and nothing else:
    ``params`` (site -> the copy's parameter, requiring grad) and ``masks`` (site -> bool,
    True at the slice) for :func:`excise.train.train`. ``start`` (site -> values at the
    slice's indices) is written into the copy first (a re-initialisation, a perturbation).
    ``result``: the :class:`~excise.train.TrainResult` of the training run, once trained
    (``edit.finetune``, ``reinit``, ``distill``)."""

    def __init__(self, model: ModelHandle, slices: dict[str, Tensor],
                 start: dict[str, Tensor] | None = None):
        self.slices = slices
        self.work = model.clone()
        named = self.work.named_parameters()
        self.masks = {}
        for s, idx in slices.items():
            m = torch.zeros(named[s].numel(), dtype=torch.bool)
            m[idx] = True
            self.masks[s] = m.view(named[s].shape).to(named[s].device)
        for s, p in named.items():
            p.requires_grad_(s in self.masks)
        if start:
            with torch.no_grad():
                for s, values in start.items():
                    p = named[s]
                    p.view(-1)[slices[s].to(p.device)] = values.to(p.device, p.dtype)
        self.params = {s: named[s] for s in self.masks}
        self.result: TrainResult | None = None  # what training it did (set by the trainer)

    def new_values(self) -> dict[str, tuple[Tensor, Tensor]]:
        """``{site: (indices, trained values)}`` for :func:`excise.edits.weight_edit`."""
        return {s: (idx, self.params[s].detach().reshape(-1)[idx])
                for s, idx in self.slices.items()}


def keep_text_loss(kind: str, work: ModelHandle, reference: ModelHandle, batch) -> Tensor:
    """The term that keeps a batch as it was - general text, or retain facts (``finetune``'s
    ``retain_loss``): ``"nll"`` - the batch's NLL under ``work``; ``"kl"`` -
    ``KL(p_reference || p_work)`` of the next-token distribution at every target position
    (``reference`` run without gradients)."""
    import torch.nn.functional as F

    if kind == "nll":
        return work.loss(batch)
    with torch.no_grad():
        ref_lp = reference.target_logprobs(batch)
    return F.kl_div(work.target_logprobs(batch), ref_lp, log_target=True, reduction="batchmean")


def start_unit_edit(method: str, model: ModelHandle, importance: Importance | None,
                    units, top, request, why: str, settings: dict, alpha: float | None, seed: int
                    ) -> tuple:
    """The common start of the edits that re-train units on retain data (reinit, distill):
    the request (``why`` it is needed), the inputs checked, the units' slices, the manifest
    parameters, and a :class:`MaskedCopy` whose slices start perturbed by ``alpha``
    (:func:`perturbed`). Returns ``(request, selection, copy, params)``."""
    req = need_request(method, request, why)
    check_inputs(method, model, importance)
    selection, slices = unit_slices(method, model, importance, units, top)
    params = settings | {"units": "all" if selection is None else "selection",
                         "request": req.digest(), "importance": importance_digest(importance)}
    copy = MaskedCopy(model, slices, start=perturbed(model, slices, alpha, seed))
    return req, selection, copy, params

