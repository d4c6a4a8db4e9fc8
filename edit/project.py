"""Rank-one activation projection (PGA-style: remove or align one direction per depth).

At each chosen site (a ``d_model``-wide activation: ``blocks.L.mlp.out``, ``blocks.L.attn.out``,
``blocks.L.resid_*``, ``embed``) one unit direction ``u`` is edited:

- ``mode="remove"``: ``x <- x - (x.u) u`` - the model can no longer write/read along ``u`` there;
- ``mode="align"``: ``x <- x + (c - x.u) u`` with ``c`` the mean of ``x.u`` over
  ``request.retain`` - every input looks like an average retain input along ``u``.

``u`` comes from the forget-vs-retain mean difference (``direction="mean_diff"``), a logistic
probe separating forget from retain activations (``"probe"``), or is given (a tensor for one
site, or ``{site: tensor}``). Activations are read at the positions that predict target tokens.

The edit is a hook edit (a saveable :class:`excise.edits.HookSpec` of kind ``"rank_one"``), or
with ``bake=True`` a weight edit that folds the projection into the weights writing the site:

- ``mlp.out``: ``W_out <- W_out (I - u u^T)``, ``b_out <- b_out (I - u u^T) (+ c u)``;
- ``attn.out``: the same on ``W_O[h]`` for every head and on ``b_O``;
- ``embed``: ``W_E <- W_E (I - u u^T) (+ c u)``.

These equal the hook form exactly (a linear map applied to the output of an affine map), up to
float rounding. **Where baking cannot equal the hook:** ``resid_pre/mid/post`` is the *sum* of
every earlier writer (embeddings and every earlier attention and MLP output). Projecting all of
them removes ``u`` from the stream at that depth, but it also removes ``u`` from the inputs of
every intermediate block, which the hook leaves alone - so the two differ, and ``bake=True``
at a residual site is refused. Nor can a projection be moved across a LayerNorm (its centring
and per-token rescaling are not linear in ``x``), which is why the bake only rewrites the
writer of the site and never a reader after a LayerNorm.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import Tensor

from edit._common import (check_inputs, default_units, importance_digest, real_positions,
                          target_positions)
from excise.checks import check_choice, check_number, check_units, need_request
from excise.edits import Edit, HookSpec, weight_edit
from excise.handle import ModelHandle
from excise.importance import Importance
from excise.sites import Selection, layer_of
from excise.train import Optim, train

MODES = ("remove", "align")
DIRECTIONS = ("mean_diff", "probe")
POSITIONS = ("target", "subject", "all")
BAKEABLE = ("mlp.out", "attn.out", "embed")


def project(model: ModelHandle, importance: Importance | None = None,
            units: Selection | None = None, *, request=None,
            sites: str | Sequence[str] | None = None, top: int | float = 0.01,
            direction: str | Tensor | Mapping[str, Tensor] = "mean_diff", mode: str = "remove",
            bake: bool = False, positions: str = "target", batch_size: int = 256,
            probe_l2: float = 1e-3) -> Edit:
    """Rank-one projection at ``sites`` (default: the output of the blocks holding ``units``,
    themselves the ``top`` units of ``importance`` when not given). Returns the applied Edit:
    hooks, or weights with ``bake=True``."""
    check_choice("project", "mode", mode, MODES)
    check_choice("project", "positions", positions, POSITIONS)
    check_number("project", "batch_size", batch_size, low=1, integer=True)
    check_number("project", "probe_l2", probe_l2, low=0)
    check_inputs("project", model, importance)
    if not isinstance(bake, bool):
        raise ValueError(f"project: bake must be True or False, got {bake!r}")
    site_list = _resolve_sites(model, importance, units, sites, top)
    if bake:
        bad = [s for s in site_list if _short(s) not in BAKEABLE]
        if bad:
            raise ValueError(f"project(bake=True) cannot fold a projection at {bad[0]!r} into "
                             f"weights (a residual site sums every earlier writer, and "
                             f"projecting them also changes the inputs of the blocks in between);"
                             f" bakeable sites end in {list(BAKEABLE)}, or use bake=False")
        for s in site_list:
            model.site_writers(s)  # refuses what this backend cannot fold
    if isinstance(direction, str):
        check_choice("project", "direction", direction, DIRECTIONS)
    dirs = _directions(model, site_list, direction, request, batch_size, probe_l2, positions)
    c = {}
    if mode == "align":
        req = need_request("project", request, "to find the retain mean along u (mode='align')")
        c = _retain_offsets(model, req, dirs, batch_size, positions)
    params = {"sites": site_list, "mode": mode, "bake": bake, "positions": positions,
              "direction": direction if isinstance(direction, str) else "given",
              "importance": importance_digest(importance)}
    if request is not None:
        params["request"] = request.digest()
    if not isinstance(direction, str):  # identify given directions (the edit's key)
        params["direction_digest"] = HookSpec("rank_one", site_list[0], {},
                                              {s: dirs[s].float() for s in site_list}).digest()
    if bake:
        new = {}
        for s in site_list:
            new.update(_bake(model, s, dirs[s], c.get(s)))
        return weight_edit(model, "project", params, units, new)
    specs = [HookSpec("rank_one", s, {"mode": mode},
                      {"u": dirs[s].float()} | ({"c": c[s].float()} if mode == "align" else {}))
             for s in site_list]
    return Edit(model, "project", params, units, hook_specs=specs).apply()


def _short(site: str) -> str:
    return site.split(".", 2)[2] if layer_of(site) is not None else site


def _resolve_sites(model, importance, units, sites, top) -> list[str]:
    if sites is not None:
        out = model.sites(sites)
    else:
        if units is None and importance is None:
            raise ValueError("project: give sites=, units= or an Importance to choose the "
                             "depths to project at")
        sel = default_units("project", importance, units, top)
        check_units("project", model, sel)
        out = []
        for s in sel.sites():
            info = model.info(s)
            L = layer_of(s)
            short = _short(s)
            if info.unit_shape == (model.info("embed").unit_shape[0],) and info.kind == \
                    "activation" and short not in ("mlp.pre", "mlp.post"):
                site = s
            elif L is not None and (short.startswith("mlp.")):
                site = f"blocks.{L}.mlp.out"
            elif L is not None and short.startswith("attn."):
                site = f"blocks.{L}.attn.out"
            else:
                raise ValueError(f"project: cannot place a projection for units at {s!r}; "
                                 f"give sites= (e.g. 'blocks.1.mlp.out')")
            if site not in out:
                out.append(site)
    d_model = model.info("embed").unit_shape
    for s in out:
        info = model.info(s)
        if info.kind != "activation" or info.unit_shape != d_model:
            raise ValueError(f"project: site {s!r} is not a d_model-wide activation; choose "
                             f"resid_pre/resid_mid/resid_post, attn.out, mlp.out or embed")
    if not out:
        raise ValueError("project: no site to project at")
    return out


@torch.no_grad()
def _collect(model: ModelHandle, facts, sites: list[str], batch_size: int,
             positions: str = "target") -> dict[str, Tensor]:
    """Activations at the target-predicting (``"target"``), subject (``"subject"``; facts
    without a subject contribute their target positions) or all real (``"all"``) positions:
    ``{site: [N, d_model]}``."""
    out: dict[str, list[Tensor]] = {s: [] for s in sites}
    for b in model.encode(list(facts)).chunks(batch_size):
        acts = model.run_with_cache(b.tokens, sites)
        m = target_positions(b)
        if positions == "subject":
            has = b.subject_mask.any(1, keepdim=True)
            m = torch.where(has, b.subject_mask, m)
        elif positions == "all":
            m = real_positions(b)
        for s in sites:
            out[s].append(acts[s][m.to(acts[s].device)].double())
    return {s: torch.cat(v) for s, v in out.items()}


def _directions(model, sites, direction, request, batch_size, l2,
                positions) -> dict[str, Tensor]:
    d = model.info("embed").unit_shape[0]
    if isinstance(direction, Tensor):
        if len(sites) != 1:
            raise ValueError(f"project: one direction tensor given for {len(sites)} sites "
                             f"{sites}; pass {{site: tensor}}")
        direction = {sites[0]: direction}
    if isinstance(direction, Mapping):
        missing = [s for s in sites if s not in direction]
        extra = [s for s in direction if s not in sites]
        if missing or extra:
            raise ValueError(f"project: directions given for {sorted(direction)} but sites are "
                             f"{sites}")
        out = {}
        for s in sites:
            u = torch.as_tensor(direction[s]).double().reshape(-1)
            if u.numel() != d or not torch.isfinite(u).all() or float(u.norm()) == 0:
                raise ValueError(f"project: direction for {s} must be a finite non-zero vector "
                                 f"of length {d}, got shape {tuple(u.shape)}")
            out[s] = u / u.norm()
        return out
    req = need_request("project", request, f"to compute direction={direction!r}")
    f = _collect(model, req.forget, sites, batch_size, positions)
    r = _collect(model, req.retain, sites, batch_size, positions)
    out = {}
    for s in sites:
        if direction == "mean_diff":
            u = f[s].mean(0) - r[s].mean(0)
        else:
            u = _logistic_probe(f[s], r[s], l2)
        if not torch.isfinite(u).all() or float(u.norm()) == 0:
            raise ValueError(f"project: the {direction} direction at {s} is zero or non-finite "
                             f"(forget and retain activations do not differ there)")
        out[s] = u / u.norm()
    return out


def _logistic_probe(pos: Tensor, neg: Tensor, l2: float, steps: int = 100) -> Tensor:
    """Weights of an L2-regularised logistic regression separating ``pos`` from ``neg``
    (standardised inputs, balanced classes, L-BFGS from zero: deterministic)."""
    x = torch.cat([pos, neg])
    f64 = {"dtype": torch.float64, "device": x.device}  # fitted where the activations are
    y = torch.cat([torch.ones(len(pos), **f64), torch.zeros(len(neg), **f64)])
    wts = torch.where(y > 0, 0.5 / len(pos), 0.5 / len(neg))
    mu, sd = x.mean(0), x.std(0).clamp(min=1e-6)
    z = (x - mu) / sd
    w = torch.zeros(x.shape[1], **f64, requires_grad=True)
    b = torch.zeros((), **f64, requires_grad=True)

    def loss(_step: int) -> Tensor:
        logit = z @ w + b
        return (torch.nn.functional.binary_cross_entropy_with_logits(logit, y, reduction="none")
                * wts).sum() + l2 * (w ** 2).sum()

    # one L-BFGS step of up to ``steps`` iterations (full batch: the loss draws nothing)
    train(loss, [w, b], steps=1, optim=Optim("lbfgs", lr=1.0, max_iter=steps,
                                             line_search="strong_wolfe"))
    return (w / sd).detach()  # back to the raw activation basis


def _retain_offsets(model, request, dirs, batch_size, positions) -> dict[str, Tensor]:
    r = _collect(model, request.retain, list(dirs), batch_size, positions)
    return {s: (r[s] @ dirs[s].to(r[s].device)).mean() for s in dirs}


def _bake(model: ModelHandle, site: str, u: Tensor, c: Tensor | None) -> dict:
    """Fold ``x <- x - (x.u) u (+ c u)`` into the weights writing ``site``
    (``model.site_writers``: each weight is projected along its d_model axis)."""
    writers = model.site_writers(site)
    if c is not None and not any(const for _, _, const in writers):
        raise ValueError(f"project(mode='align', bake=True) adds c*u through an output bias, and "
                         f"{site!r} has none in this model; use bake=False (a hook)")
    new = {}
    for name, axis, const in writers:
        p = model.parameter(name).detach()
        w = p.double().movedim(axis, -1)
        uu = u.to(p.device, torch.float64)
        w = w - (w @ uu)[..., None] * uu
        if c is not None and const:
            w = w + c.to(p.device, torch.float64) * uu
        new[name] = (torch.arange(p.numel()), w.movedim(-1, axis).reshape(-1).to(p.dtype))
    return new
