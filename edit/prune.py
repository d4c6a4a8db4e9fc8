"""Pruning: zero or mean-ablate neurons, attention heads or individual weights (as in MANU, and
TinyMem's neuron-level localization and removal).

- A neuron (``blocks.L.mlp.post[j]``) owns column ``j`` of ``W_in``, ``b_in[j]`` and row ``j`` of
  ``W_out``; a head (``blocks.L.attn.z[h]``) owns ``W_Q/W_K/W_V/W_O[h]`` and ``b_Q/b_K/b_V[h]``
  (:data:`excise.sites.PARAM_UNITS`). ``weights="all"`` zeroes all of them, ``"out"`` only the
  output weights (``W_out`` row / ``W_O[h]``) - the unit still computes but writes nothing.
- A parameter-element unit (``blocks.L.mlp.W_in[i, j]``) is set to zero.
- ``mode="mean"`` replaces a neuron's (head's) output by its mean over ``request.retain``: the
  unit's weights are zeroed and the constant it would have written, ``mean_j * W_out[j]``
  (``mean_h @ W_O[h]``), is baked into the output bias ``b_out`` (``b_O``). This equals a mean
  ablation hook on ``mlp.post`` / ``attn.z`` exactly (up to float rounding), and stays a weight
  edit, so it saves, re-applies and exports like any other.
"""

from __future__ import annotations

import torch

from edit._common import (check_inputs, default_units, importance_digest, param_slices,
                          real_positions)
from excise.checks import check_choice, check_number, need_request
from excise.edits import Edit, weight_edit
from excise.handle import ModelHandle
from excise.importance import Importance
from excise.sites import Selection, layer_of

MODES = ("zero", "mean")
WEIGHTS = ("all", "out")


def prune(model: ModelHandle, importance: Importance | None = None,
          units: Selection | None = None, *, top: int | float = 0.05, mode: str = "zero",
          weights: str = "all", request=None, batch_size: int = 256) -> Edit:
    """Zero (``mode="zero"``) or mean-ablate (``mode="mean"``, needs ``request``) ``units``
    (default: the ``top`` neurons/heads of ``importance``). Returns the applied Edit.

    SAE latents (units at ``blocks.L.<site>.sae``, e.g. from ``locate.sae``) are ablated by a
    hook that removes their decoder contribution at the base site (``edit.sae_latents``)."""
    check_inputs("prune", model, importance)
    sae_sites = [s for s in (units.sites() if units is not None else
                             (importance.sites if importance is not None else []))
                 if s.endswith(".sae")]
    if sae_sites:
        if mode != "zero":
            raise ValueError("prune: SAE latents can only be zeroed (mode='zero')")
        from edit.sae_latents import ablate_latents

        return ablate_latents(model, importance, units, top)
    check_choice("prune", "mode", mode, MODES)
    check_choice("prune", "weights", weights, WEIGHTS)
    check_number("prune", "batch_size", batch_size, low=1, integer=True)
    units = default_units("prune", importance, units, top)
    slices = param_slices("prune", model, units, weights)
    new = {s: (idx, torch.zeros(idx.numel(), dtype=model.parameter(s).dtype))
           for s, idx in slices.items()}
    params = {"mode": mode, "weights": weights, "importance": importance_digest(importance)}
    if mode == "mean":
        req = need_request("prune", request, "to compute mean activations (mode='mean')")
        if any(model.info(s).kind == "param" for s in units.sites()):
            raise ValueError("prune(mode='mean') ablates neurons or heads; parameter-element "
                             "units can only be zeroed (mode='zero')")
        biases = {site: f"blocks.{layer_of(site)}." + ("attn.b_O" if site.endswith("attn.z")
                                                        else "mlp.b_out")
                  for site in units.sites()}
        missing = [b for b in biases.values() if b not in model.site_table()]
        if missing:
            raise ValueError(f"prune(mode='mean') folds the ablated units' mean output into the "
                             f"output bias, and this model has no {missing[0]!r} (e.g. Llama / "
                             f"Gemma layers have no biases); use mode='zero', or a hook "
                             f"(edit.project) to pin an activation")
        means = _mean_activations(model, req, units.sites(), batch_size)
        for site, idxs in units.by_site().items():
            rows = torch.tensor([ix[0] for ix in idxs])
            head, b = site.endswith("attn.z"), biases[site]
            w = model.unit_out_weights(site.replace("mlp.pre", "mlp.post"))[rows].double()
            m = means[site][rows].double()
            shift = torch.einsum("hd,hdm->m", m, w) if head else m @ w
            bias = model.parameter(b).detach().reshape(-1)
            idx = torch.arange(bias.numel())
            if b in new:  # two sites of one layer (mlp.pre and mlp.post) share b_out
                shift = shift + (new[b][1].double() - bias.double())
            new[b] = (idx, (bias.double() + shift).to(bias.dtype))
        params["request"] = req.digest()
    return weight_edit(model, "prune", params, units, new)


@torch.no_grad()
def _mean_activations(model: ModelHandle, request, sites: list[str],
                      batch_size: int) -> dict[str, torch.Tensor]:
    """Mean activation per unit over the real token positions of ``request.retain``:
    ``mlp.post``/``mlp.pre`` sites -> ``[d_mlp]`` (post-activation), ``attn.z`` -> ``[heads,
    d_head]``."""
    grab = sorted({s.replace("mlp.pre", "mlp.post") for s in sites})
    total: dict[str, torch.Tensor] = {}
    count = 0
    for b in model.encode(list(request.retain)).chunks(batch_size):
        acts = model.run_with_cache(b.tokens, grab)
        m = real_positions(b)
        count += int(m.sum())
        for s in grab:
            v = acts[s][m.to(acts[s].device)].double().sum(0)
            total[s] = total.get(s, 0) + v
    means = {s: total[s] / max(1, count) for s in grab}
    return {s: means[s.replace("mlp.pre", "mlp.post")] for s in sites}
