"""Sparse autoencoders on a model's activations: training, the cache, loading, latent edits.

:func:`train_sae` trains a sae-lens ``StandardTrainingSAE`` on the activations at one site over
a set of facts (every token after BOS), with sae-lens' own training step
(``training_forward_pass``: MSE + decoder-norm-weighted L1) on the shared loop
(:func:`excise.train.train`); our word-level tokenizer does not fit sae-lens' text pipeline, so
the activations are collected here. Inputs are scaled to mean norm ``sqrt(d_in)``: feed the SAE
``activation * input_scale``.

Trained SAEs are cached under ``excise.organism.cache_dir() / "sae"`` in sae-lens' format
(safetensors + ``cfg.json``, plus ``excise.json`` with the input scale and the sha256 of both
files), keyed by model fingerprint, site, training data and configuration; :func:`load_sae`
reads one back and refuses files that fail their checksum. :func:`train_sae` retrains a cached
SAE that fails its check (a :class:`~excise.io.CacheWarning` names it) and holds a file lock
while it trains and writes, so a second process waits and then loads the first one's SAE.

An SAE fits one site: :func:`check_sae_fits` (used wherever an SAE is attached to a site)
refuses one whose input width differs from the site's, naming both.

Users: ``locate.sae`` (latents that fire on forget, not retain), the SAE-steering attack and the
latent-suppression control in ``probes``, and the ``sae_latents`` hook edit
(:func:`latent_spec`; the hook kind itself is registered in ``excise.edits``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from excise.edits import HookSpec
from excise.handle import Batch, ModelHandle
from excise.io import CacheWarning, checksum_problem, file_lock, file_sha256, partial_dir
from excise.request import FactSet
from excise.train import Optim, Sampler, train

# activation sites an SAE can read: one d-vector per token
SAE_SITES = ("resid_pre", "resid_mid", "resid_post", "mlp.out", "attn.out", "mlp.post",
             "mlp.pre")


@dataclass(frozen=True)
class SAETrainConfig:
    expansion: int = 8  # d_sae = expansion x d_in
    l1: float = 2.0  # L1 coefficient (inputs are scaled to mean norm sqrt(d_in))
    steps: int = 1500
    batch_tokens: int = 256
    lr: float = 1e-3
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def check_sae_site(model: ModelHandle, site: str, who: str = "sae") -> None:
    """``ValueError`` unless ``site`` is an activation site an SAE can read."""
    info = model.info(site)  # unknown names raise with a suggestion
    if info.kind != "activation" or not any(site.endswith("." + x) for x in SAE_SITES):
        raise ValueError(f"{who} cannot read site {site!r} (a {info.kind} site); an SAE reads "
                         f"one activation vector per token at "
                         f"{', '.join(f'blocks.L.{x}' for x in SAE_SITES)}")


def sae_width(sae, who: str = "sae") -> tuple[int, int]:
    """``(d_in, d_sae)`` of a sae-lens style SAE, from its encoder ``W_enc [d_in, d_sae]``."""
    w = getattr(sae, "W_enc", None)
    if not isinstance(w, Tensor) or w.ndim != 2:
        raise ValueError(f"{who}: the SAE given ({type(sae).__name__}) has no encoder matrix "
                         f"W_enc [d_in, d_sae]; pass a sae-lens SAE")
    return int(w.shape[0]), int(w.shape[1])


def check_sae_fits(model: ModelHandle, sae, site: str, who: str = "sae") -> None:
    """``ValueError`` unless ``sae`` can be attached at ``site`` of ``model``: an activation
    site an SAE reads, carrying as many dimensions as the SAE reads (both widths named)."""
    check_sae_site(model, site, who)
    d_in, d_sae = sae_width(sae, who)
    have = int(model.info(site).unit_shape[0])
    if d_in != have:
        raise ValueError(f"{who}: the SAE reads d_in={d_in} dimensions (d_sae={d_sae} latents) "
                         f"but site {site!r} carries {have}; an SAE fits only the site (and "
                         f"model) it was trained on")


def real_tokens(b: Batch) -> Tensor:
    """Every real (not padding) token after BOS: ``[n, T]`` bool."""
    real = torch.arange(b.tokens.shape[1], device=b.lengths.device)[None, :] < b.lengths[:, None]
    real[:, 0] = False
    return real


def token_activations(model: ModelHandle, facts: FactSet, site: str, *, batch_size: int = 256,
                      positions: Callable[[Batch], Tensor] = real_tokens,
                      who: str = "sae") -> Tensor:
    """``[tokens, d]`` float32 activations at ``site`` over the ``positions(batch)`` of
    ``facts`` (default: every real token after BOS), on the CPU. ``ValueError`` naming ``who``
    when no position is chosen or an activation is not finite."""
    out = []
    batch = model.encode(list(facts))
    with torch.inference_mode():
        for b in batch.chunks(batch_size):
            a = model.run_with_cache(b.tokens, [site])[site]
            out.append(a[positions(b).to(a.device)].float().cpu())
    acts = torch.cat(out)
    if acts.shape[0] == 0:
        raise ValueError(f"{who}: no token positions chosen in {facts.name!r} at {site!r}")
    if not torch.isfinite(acts).all():
        bad = int((~torch.isfinite(acts)).sum())
        raise ValueError(f"{who}: {bad} non-finite activations at site {site!r} (the model "
                         f"overflowed, or its weights hold NaN/inf?)")
    return acts


def cache_key(model: ModelHandle, facts: FactSet, site: str, cfg: SAETrainConfig) -> str:
    h = hashlib.sha256()
    h.update(model.fingerprint().encode())
    h.update(site.encode())
    h.update(json.dumps(cfg.to_dict(), sort_keys=True).encode())
    for f in facts:
        h.update(f"{f.prompt}\x00{f.target}\x01".encode())
    return h.hexdigest()[:16]


def train_sae(model: ModelHandle, facts: FactSet, site: str,
              cfg: SAETrainConfig = SAETrainConfig(), *, cache: bool = True,
              progress: bool = False):
    """Train (or load from the cache) a sae-lens ``StandardTrainingSAE`` on ``site``'s
    activations over ``facts`` (every token after BOS). Returns ``(sae, input_scale, path)``:
    feed the SAE ``activation * input_scale``.

    The SAE's initialisation draws from torch's global generator, seeded with ``cfg.seed``
    (sae-lens builds its weights that way); batches come from a private seeded
    :class:`~excise.train.Sampler`.

    The SAE trains and is returned on the model's device (:attr:`ModelHandle.device`; a cached
    one is moved there), with float32 weights whatever the model's dtype: it reads the
    activations cast to float32 (an SAE is small next to its model, and its training and its
    reconstruction error are where the precision matters)."""
    from excise.organism import cache_dir

    check_sae_site(model, site)
    path = cache_dir() / "sae" / f"{site}-{cache_key(model, facts, site, cfg)}"
    if not cache:
        sae_model, scale, _ = _train_sae(model, facts, site, cfg, progress)
        return sae_model, scale, path
    # one process trains and writes an entry; a second waits here, then loads its result
    with file_lock(path.parent / f"{path.name}.lock"):
        if path.exists():
            try:
                sae_model, scale = load_sae(path, device=model.device)
                return sae_model, scale, path
            except ValueError as e:
                warnings.warn(f"the cached SAE fails its check and is retrained: {e}",
                              CacheWarning, stacklevel=2)
        sae_model, scale, info = _train_sae(model, facts, site, cfg, progress)
        _save_sae(sae_model, path, info)
    return sae_model, scale, path


def _train_sae(model: ModelHandle, facts: FactSet, site: str, cfg: SAETrainConfig,
               progress: bool):
    """Train one SAE: ``(sae, input_scale, info for excise.json)``."""
    from sae_lens import StandardTrainingSAE, StandardTrainingSAEConfig
    from sae_lens.saes.sae import TrainStepInput

    device = model.device
    acts = token_activations(model, facts, site).to(device)
    d_in = acts.shape[1]
    scale = float(d_in ** 0.5 / acts.norm(dim=1).mean().clamp(min=1e-12))
    acts = acts * scale
    torch.manual_seed(cfg.seed)
    scfg = StandardTrainingSAEConfig(d_in=d_in, d_sae=cfg.expansion * d_in,
                                     l1_coefficient=cfg.l1, dtype="float32", device=str(device))
    sae_model = StandardTrainingSAE(scfg)
    with torch.no_grad():  # start the decoder bias at the data mean
        sae_model.b_dec.copy_(acts.mean(0))
    sampler = Sampler(cfg.seed)
    last = {}

    def loss(step: int) -> Tensor:
        idx = sampler.with_replacement(acts.shape[0], cfg.batch_tokens)
        out = sae_model.training_forward_pass(TrainStepInput(
            sae_in=acts[idx], coefficients={"l1": cfg.l1}, dead_neuron_mask=None,
            n_training_steps=step, is_logging_step=False))
        if not torch.isfinite(out.loss):
            raise ValueError(f"sae: training loss became non-finite at step {step} on site "
                             f"{site!r}; lower lr or l1")
        last["out"] = out
        return out.loss

    train(loss, dict(sae_model.named_parameters()), steps=cfg.steps,
          optim=Optim("adam", lr=cfg.lr, betas=(0.9, 0.999)), progress=progress,
          desc=f"sae ({site})")
    sae_model.eval()
    out = last["out"]
    info = {"input_scale": scale, "site": site, "model": model.fingerprint(),
            "train": cfg.to_dict(), "n_tokens": int(acts.shape[0]),
            "final_mse": float(out.losses["mse_loss"].detach()),
            "final_l0": float((out.feature_acts.detach() > 0).float().sum(-1).mean())}
    return sae_model, scale, info


SAE_FILES = ("sae_weights.safetensors", "cfg.json")  # what sae-lens' save_model writes


def _save_sae(sae_model, path: Path, info: dict) -> None:
    """Write the SAE (sae-lens' files, then ``excise.json`` with their sha256) into a hidden
    folder beside ``path`` and rename it into place: an interrupted write is never a cache."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_dir(path, f".{path.name}.partial-")
    try:
        sae_model.save_model(tmp)
        sums = {name: file_sha256(tmp / name) for name in SAE_FILES}
        (tmp / "excise.json").write_text(json.dumps(info | {"sha256": sums}, indent=1))
        if path.exists():
            shutil.rmtree(path)
        os.rename(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_sae(path: str | Path, device: str | torch.device | None = None):
    """A sae-lens SAE saved by :func:`train_sae` (safetensors + cfg.json) and its input scale:
    ``(sae, input_scale)``, in eval mode, on ``device`` (None: where sae-lens loads it, the
    CPU). ``ValueError`` naming the file when one is missing, unreadable or fails the checksum
    recorded when it was saved."""
    from sae_lens import StandardTrainingSAE

    path = Path(path)
    meta_file = path / "excise.json"
    if not meta_file.exists():
        raise ValueError(f"no SAE saved by excise at {path} (missing {meta_file.name})")
    try:
        meta = json.loads(meta_file.read_text())
        scale = float(meta["input_scale"])
        sums = meta.get("sha256") or {}
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{meta_file} is unreadable ({type(e).__name__}: {e})") from None
    for name in SAE_FILES:
        problem = checksum_problem(path / name, sums.get(name) if isinstance(sums, dict)
                                   else None)
        if problem:
            raise ValueError(f"{path / name}: {problem}")
    sae_model = StandardTrainingSAE.load_from_disk(path).eval()
    return (sae_model if device is None else sae_model.to(device)), scale


def latent_spec(sae, scale: float, site: str, latents: list[int], gain: float) -> HookSpec:
    """The saveable hook (kind ``sae_latents``) that rescales ``latents`` of a sae-lens SAE
    read at ``site`` by ``gain``: only those latents' encoder columns, decoder rows and the
    decoder bias are stored, nothing of the SAE object."""
    idx = torch.tensor(sorted(latents))
    flag = bool(getattr(sae.cfg, "apply_b_dec_to_input", True))
    return HookSpec("sae_latents", site, {"scale": scale, "gain": gain,
                                          "apply_b_dec_to_input": flag},
                    {"W_enc": sae.W_enc.detach()[:, idx].float(),
                     "b_enc": sae.b_enc.detach()[idx].float(),
                     "W_dec": sae.W_dec.detach()[idx].float(),
                     "b_dec": sae.b_dec.detach().float()})
