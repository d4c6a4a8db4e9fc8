"""Ablation of SAE latents ("Sparse-Autoencoder-Guided Internal Representation Unlearning";
"Suppression or Deletion"): at the SAE's base site, each selected latent's contribution
``z_j * W_dec[j] / scale`` is removed from the activation (``gain=0``) or rescaled (``gain``).

The hook stores only the selected latents' encoder columns, decoder rows and the SAE's decoder
bias (``excise.sae.latent_spec``), so the edit saves and re-applies like any other hook edit: its
kind ``sae_latents`` is registered in the core (``excise.edits``), and a saved edit loads in a
process that never imported ``edit``. Nothing of the SAE object is pickled.
"""

from __future__ import annotations

from excise.edits import Edit
from excise.handle import ModelHandle
from excise.importance import Importance
from excise.sae import check_sae_fits, latent_spec, load_sae
from excise.sites import Selection


def ablate_latents(model: ModelHandle, importance: Importance | None, units: Selection | None,
                   top: int | float, gain: float = 0.0, sae=None, scale: float = 1.0) -> Edit:
    """Rescale the selected SAE latents (units at ``blocks.L.<site>.sae``) by ``gain``."""
    if not gain >= 0 or gain == 1.0:
        raise ValueError(f"sae latent edit: gain={gain}; need gain >= 0 and != 1 "
                         f"(0 removes the latents)")
    if units is None:
        if importance is None:
            raise ValueError("sae latent edit: give units= or an Importance from locate.sae")
        units = importance.top(top)
    if len(units) == 0:
        raise ValueError("sae latent edit: the selection is empty; nothing to edit")
    specs = []
    for site, idxs in units.by_site().items():
        if not site.endswith(".sae"):
            raise ValueError(f"sae latent edit: unit site {site!r} is not an SAE site "
                             f"('blocks.L.resid_post.sae')")
        base = site[:-4]
        model.info(base)  # unknown base sites raise with a suggestion
        sae_model, s = sae, scale
        if sae_model is None:
            paths = (importance.meta.get("sae_path") or {}) if importance is not None else {}
            if not paths.get(site):
                raise ValueError(f"sae latent edit: no SAE for {site!r}; pass sae= or use an "
                                 f"Importance from locate.sae (which records its SAE)")
            sae_model, s = load_sae(paths[site])
        check_sae_fits(model, sae_model, base, "sae latent edit")  # widths, before attaching
        d_sae = sae_model.W_enc.shape[1]
        bad = [ix[0] for ix in idxs if not 0 <= ix[0] < d_sae]
        if bad:
            raise ValueError(f"sae latent edit: latents {bad[:5]} out of range for {site} "
                             f"(d_sae={d_sae})")
        specs.append(latent_spec(sae_model, s, base, [ix[0] for ix in idxs], gain))
    params = {"gain": gain, "latents": len(units)}
    return Edit(model, "prune", params, units, hook_specs=specs).apply()
