"""Ablation of SAE latents ("Sparse-Autoencoder-Guided Internal Representation Unlearning";
"Suppression or Deletion"): at the SAE's base site, each selected latent's contribution
``z_j * W_dec[j] / scale`` is removed from the activation (``gain=0``) or rescaled (``gain``).

The hook stores only the selected latents' encoder columns, decoder rows and the SAE's decoder
bias, so the edit saves and re-applies like any other hook edit (kind ``sae_latents``); nothing
of the SAE object is pickled.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from excise.edits import Edit, HookSpec, register_hook_kind
from excise.handle import HookFn, ModelHandle
from excise.importance import Importance
from excise.sites import Selection


@register_hook_kind("sae_latents")
def _sae_latents_hook(site: str, params: dict, tensors: dict) -> HookFn:
    w_enc = tensors["W_enc"].detach().clone()  # [d_in, k]
    b_enc = tensors["b_enc"].detach().clone()  # [k]
    w_dec = tensors["W_dec"].detach().clone()  # [k, d_in]
    b_dec = tensors["b_dec"].detach().clone()  # [d_in]
    scale = float(params["scale"])
    gain = float(params["gain"])
    sub = bool(params.get("apply_b_dec_to_input", True))

    def fn(x: Tensor, _site: str) -> Tensor:
        xs = x * scale
        if sub:
            xs = xs - b_dec
        z = torch.relu(xs @ w_enc + b_enc)  # [..., k] the selected latents
        return x + (gain - 1.0) * (z @ w_dec) / scale

    return fn


def latent_spec(sae, scale: float, site: str, latents: list[int], gain: float) -> HookSpec:
    """The hook spec that rescales ``latents`` of a sae-lens SAE read at ``site``."""
    idx = torch.tensor(sorted(latents))
    flag = bool(getattr(sae.cfg, "apply_b_dec_to_input", True))
    return HookSpec("sae_latents", site, {"scale": scale, "gain": gain,
                                          "apply_b_dec_to_input": flag},
                    {"W_enc": sae.W_enc.detach()[:, idx].float(),
                     "b_enc": sae.b_enc.detach()[idx].float(),
                     "W_dec": sae.W_dec.detach()[idx].float(),
                     "b_dec": sae.b_dec.detach().float()})


def load_sae(path: str | Path):
    """A sae-lens SAE saved by ``locate.sae`` (safetensors + cfg.json) and its input scale."""
    from sae_lens import StandardTrainingSAE

    path = Path(path)
    meta_file = path / "excise.json"
    if not meta_file.exists():
        raise ValueError(f"no SAE saved by excise at {path}")
    return StandardTrainingSAE.load_from_disk(path).eval(), \
        float(json.loads(meta_file.read_text())["input_scale"])


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
        d_sae = sae_model.W_enc.shape[1]
        bad = [ix[0] for ix in idxs if not 0 <= ix[0] < d_sae]
        if bad:
            raise ValueError(f"sae latent edit: latents {bad[:5]} out of range for {site} "
                             f"(d_sae={d_sae})")
        specs.append(latent_spec(sae_model, s, base, [ix[0] for ix in idxs], gain))
    params = {"gain": gain, "latents": len(units)}
    return Edit(model, "prune", params, units, hook_specs=specs).apply()
