"""Sparse-autoencoder latents that fire on forget data but not on retain data ("Sparse-Autoencoder-
Guided Internal Representation Unlearning"; "Suppression or Deletion").

Pass a trained sae-lens SAE (``sae=``), or let the core's :func:`excise.sae.train_sae` train
(or load from its cache) a sae-lens ``StandardTrainingSAE`` on the model's activations at the
site over the request's retain and forget facts.

Score per latent: mean activation on forget / (mean activation on retain + eps), on site
``blocks.L.<base>.sae``. ``parts`` keeps both means; ``meta["sae_path"]`` where the SAE lives.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from excise.checks import check_facts, check_finite
from excise.handle import ModelHandle
from excise.importance import Importance
from excise.request import FactSet, ForgetRequest
from excise.sae import (SAE_SITES, SAETrainConfig, check_sae_fits, token_activations,
                        train_sae)
from locate._common import base_meta, check_inputs, resolve_sites
from locate.activations import position_mask


def sae(model: ModelHandle, request: ForgetRequest, sites: str | Sequence[str] | None = None,
        *, sae=None, expansion: int = 8, l1: float = 2.0, steps: int = 1500,
        batch_tokens: int = 256, lr: float = 1e-3, seed: int = 0, positions: str = "all",
        eps: float = 1e-2, batch_size: int = 64, progress: bool = False) -> Importance:
    """Latents of an SAE at ``sites`` scored by forget-vs-retain activation.

    ``sites``: the base activation site(s), e.g. ``"blocks.1.resid_post"`` (``".sae"`` may be
    appended); default the residual stream after the middle block. ``sae``: a sae-lens SAE for
    that one site (its ``encode`` is used as is); otherwise one is trained or loaded from the
    cache with the given ``expansion``, ``l1``, ``steps``, ``batch_tokens``, ``lr``, ``seed``."""
    check_inputs("sae", model, batch_size=batch_size)
    if isinstance(sites, str):
        sites = [sites]
    if sites is not None:
        sites = [s[:-4] if s.endswith(".sae") else s for s in sites]
    mid = (model.n_layers - 1) // 2
    names = resolve_sites(model, sites, [f"blocks.{mid}.resid_post"], "sae",
                          suffixes=SAE_SITES,
                          why="an SAE reads one activation vector per token")
    if sae is not None and len(names) != 1:
        raise ValueError(f"sae: a user-supplied SAE fits one site; got {len(names)} sites")
    check_facts(request.forget, "sae")
    check_facts(request.retain, "sae")
    cfg = SAETrainConfig(expansion, l1, steps, batch_tokens, lr, seed)
    scores, pf, pr, paths = {}, {}, {}, {}
    for site in names:
        if sae is not None:
            model_sae, scale, path = sae, 1.0, ""
            check_sae_fits(model, sae, site, "sae")  # both widths named
        else:
            train_facts = FactSet("sae-train", request.retain.facts + request.forget.facts)
            model_sae, scale, path = train_sae(model, train_facts, site, cfg, progress=progress)
        mf = _latent_means(model, model_sae, scale, request.forget, site, positions, batch_size)
        mr = _latent_means(model, model_sae, scale, request.retain, site, positions, batch_size)
        floor = eps * float(mr.mean()) + 1e-12
        key = f"{site}.sae"
        scores[key], pf[key], pr[key], paths[key] = mf / (mr + floor), mf, mr, str(path)
    return Importance("sae", scores,
                      base_meta(model, request, positions=positions, eps=eps,
                                sae_path=paths, train=None if sae is not None else
                                cfg.to_dict()),
                      {"forget": pf, "retain": pr})


def _activations(model: ModelHandle, facts: FactSet, site: str, positions: str,
                 batch_size: int) -> Tensor:
    """``[tokens, d]`` activations at ``site`` over the chosen positions of ``facts``."""
    return token_activations(model, facts, site, batch_size=batch_size,
                             positions=lambda b: position_mask(b, positions))


def _latent_means(model, sae_model, scale: float, facts: FactSet, site: str, positions: str,
                  batch_size: int) -> Tensor:
    acts = _activations(model, facts, site, positions, batch_size) * scale
    w = sae_model.W_enc  # (checked by sae_width): the SAE reads on its own device and dtype
    with torch.inference_mode():
        lat = sae_model.encode(acts.to(w.device, w.dtype))
    check_finite(lat, "SAE latents", site, "sae")
    return lat.float().mean(0).cpu()
