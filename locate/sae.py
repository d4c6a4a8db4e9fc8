"""Sparse-autoencoder latents that fire on forget data but not on retain data ("Sparse-Autoencoder-
Guided Internal Representation Unlearning"; "Suppression or Deletion").

Pass a trained sae-lens SAE (``sae=``), or let :func:`train_sae` train a sae-lens
``StandardTrainingSAE`` on the model's activations at the site - with sae-lens' own training
step (``training_forward_pass``: MSE + decoder-norm-weighted L1) on activations collected from
the request's facts (our word-level tokenizer does not fit sae-lens' text pipeline). Trained SAEs
are cached under ``excise.organism.cache_dir() / "sae"`` in sae-lens' format (safetensors +
``cfg.json``, plus ``excise.json`` with the input scale), keyed by model fingerprint, site,
training data and configuration.

Score per latent: mean activation on forget / (mean activation on retain + eps), on site
``blocks.L.<base>.sae``. ``parts`` keeps both means; ``meta["sae_path"]`` where the SAE lives.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Sequence

import torch
from torch import Tensor

from excise.handle import ModelHandle
from excise.importance import Importance
from excise.request import FactSet, ForgetRequest
from locate._common import base_meta, check_facts, check_finite, resolve_sites
from locate.activations import position_mask

_BASE_SUFFIXES = ("resid_pre", "resid_mid", "resid_post", "mlp.out", "attn.out", "mlp.post",
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


def sae(model: ModelHandle, request: ForgetRequest, sites: str | Sequence[str] | None = None,
        *, sae=None, expansion: int = 8, l1: float = 2.0, steps: int = 1500,
        batch_tokens: int = 256, lr: float = 1e-3, seed: int = 0, positions: str = "all",
        eps: float = 1e-2, batch_size: int = 64, progress: bool = False) -> Importance:
    """Latents of an SAE at ``sites`` scored by forget-vs-retain activation.

    ``sites``: the base activation site(s), e.g. ``"blocks.1.resid_post"`` (``".sae"`` may be
    appended); default the residual stream after the middle block. ``sae``: a sae-lens SAE for
    that one site (its ``encode`` is used as is); otherwise one is trained or loaded from the
    cache with the given ``expansion``, ``l1``, ``steps``, ``batch_tokens``, ``lr``, ``seed``."""
    if isinstance(sites, str):
        sites = [sites]
    if sites is not None:
        sites = [s[:-4] if s.endswith(".sae") else s for s in sites]
    mid = (_n_layers(model) - 1) // 2
    names = resolve_sites(model, sites, [f"blocks.{mid}.resid_post"], "sae",
                          suffixes=_BASE_SUFFIXES,
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
            d_in = getattr(getattr(sae, "cfg", None), "d_in", None)
            if d_in is not None and d_in != model.info(site).unit_shape[0]:
                raise ValueError(f"sae: the SAE reads d_in={d_in} but site {site!r} carries "
                                 f"{model.info(site).unit_shape[0]} dimensions")
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


def _n_layers(model: ModelHandle) -> int:
    return len(model.sites("blocks.*.resid_post"))


def _activations(model: ModelHandle, facts: FactSet, site: str, positions: str,
                 batch_size: int) -> Tensor:
    """``[tokens, d]`` activations at ``site`` over the chosen positions of ``facts``."""
    out = []
    batch = model.encode(list(facts))
    with torch.inference_mode():
        for b in batch.chunks(batch_size):
            a = model.run_with_cache(b.tokens, [site])[site]
            out.append(a[position_mask(b, positions).to(a.device)].float().cpu())
    acts = torch.cat(out)
    if acts.shape[0] == 0:
        raise ValueError(f"sae: no token positions of kind {positions!r} in {facts.name!r}")
    check_finite(acts, "activations", site, "sae")
    return acts


def _latent_means(model, sae_model, scale: float, facts: FactSet, site: str, positions: str,
                  batch_size: int) -> Tensor:
    acts = _activations(model, facts, site, positions, batch_size) * scale
    with torch.inference_mode():
        lat = sae_model.encode(acts.to(getattr(sae_model, "device", "cpu")))
    check_finite(lat, "SAE latents", site, "sae")
    return lat.float().mean(0).cpu()


def _cache_key(model: ModelHandle, facts: FactSet, site: str, cfg: SAETrainConfig) -> str:
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
    feed the SAE ``activation * input_scale``."""
    from sae_lens import StandardTrainingSAE, StandardTrainingSAEConfig
    from sae_lens.saes.sae import TrainStepInput

    from excise.organism import cache_dir

    resolve_sites(model, site, site, "sae", suffixes=_BASE_SUFFIXES)
    path = cache_dir() / "sae" / f"{site}-{_cache_key(model, facts, site, cfg)}"
    if cache and (path / "excise.json").exists():
        meta = json.loads((path / "excise.json").read_text())
        sae_model = StandardTrainingSAE.load_from_disk(path)
        return sae_model.eval(), float(meta["input_scale"]), path
    acts = _activations(model, facts, site, "all", 256)
    d_in = acts.shape[1]
    scale = float(d_in ** 0.5 / acts.norm(dim=1).mean().clamp(min=1e-12))
    acts = acts * scale
    torch.manual_seed(cfg.seed)
    scfg = StandardTrainingSAEConfig(d_in=d_in, d_sae=cfg.expansion * d_in,
                                     l1_coefficient=cfg.l1, dtype="float32", device="cpu")
    sae_model = StandardTrainingSAE(scfg)
    with torch.no_grad():  # start the decoder bias at the data mean
        sae_model.b_dec.copy_(acts.mean(0))
    opt = torch.optim.Adam(sae_model.parameters(), lr=cfg.lr, betas=(0.9, 0.999))
    g = torch.Generator().manual_seed(cfg.seed)
    from tqdm.auto import tqdm

    for step in tqdm(range(cfg.steps), desc=f"sae ({site})", disable=not progress,
                     leave=False):
        idx = torch.randint(0, acts.shape[0], (cfg.batch_tokens,), generator=g)
        out = sae_model.training_forward_pass(TrainStepInput(
            sae_in=acts[idx], coefficients={"l1": cfg.l1}, dead_neuron_mask=None,
            n_training_steps=step, is_logging_step=False))
        if not torch.isfinite(out.loss):
            raise ValueError(f"sae: training loss became non-finite at step {step} on site "
                             f"{site!r}; lower lr or l1")
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
    sae_model.eval()
    if cache:
        path.mkdir(parents=True, exist_ok=True)
        sae_model.save_model(path)
        (path / "excise.json").write_text(json.dumps(
            {"input_scale": scale, "site": site, "model": model.fingerprint(),
             "train": cfg.to_dict(), "n_tokens": int(acts.shape[0]),
             "final_mse": float(out.losses["mse_loss"].detach()),
             "final_l0": float((out.feature_acts.detach() > 0).float().sum(-1).mean())}, indent=1))
    return sae_model, scale, path
