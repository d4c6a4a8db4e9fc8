"""Privacy: membership inference (loss and min-k% probability), PrivLeak, canary exposure.

Membership AUC compares forget facts (members, if still remembered) with holdout facts (people the
model never saw). A model that never trained on the forget people sits at 0.5; PrivLeak (MUSE)
reports the AUC relative to the retrain oracle's. Canary exposure (Carlini et al.) ranks each
forget person's true account number among alternative secrets - every secret in the request plus
random ones of the same digit format - by target log-probability.
"""

from __future__ import annotations

import random
from typing import Sequence

import torch
from torch import Tensor

from excise.handle import ModelHandle
from excise.request import ForgetRequest
from excise.request import Fact
from probes import stats
from probes.behaviour import token_logprobs_reader


@torch.inference_mode()
def membership_scores(model: ModelHandle, facts: Sequence[Fact], k: float = 0.2,
                      batch_size: int = 256, engine: str = "serial") -> tuple[Tensor, Tensor]:
    """Per fact: (negative mean target loss, min-k% probability); higher = more member-like.
    ``engine`` as :func:`probes.behaviour.fact_hits`."""
    neg_loss, mink = [], []
    enc = model.encode(list(facts))
    read = token_logprobs_reader(model, engine, enc)
    for b in enc.chunks(batch_size):
        lp = read(b)  # [n, T-1]
        m = b.target_mask[:, 1:].to(lp.device)
        neg_loss.append(lp.sum(1) / m.sum(1).clamp(min=1))
        mink.append(stats.min_k_prob(lp, m, k))
    return torch.cat(neg_loss), torch.cat(mink)


def membership(model: ModelHandle, request: ForgetRequest, k: float = 0.2,
               scores: tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]] | None = None
               ) -> dict[str, float]:
    """Membership-inference AUC of forget (positive) vs holdout (negative) facts. ``scores``:
    :func:`membership_scores` of the forget and the holdout facts at this ``k``, where the
    caller has them already (no second forward pass)."""
    (fl, fk), (hl, hk) = scores or (membership_scores(model, request.forget, k),
                                    membership_scores(model, request.holdout, k))
    return {"mia_auc_loss": stats.auc(fl, hl), "mia_auc_mink": stats.auc(fk, hk)}


def _one_per_person(facts: Sequence[Fact]) -> list[Fact]:
    seen, out = set(), []
    for f in sorted(facts, key=lambda f: (f.form != "statement", f.template)):
        key = f.person if f.person >= 0 else f.prompt
        if key not in seen:
            seen.add(key)
            out.append(f)
    return out


def secret_candidates(request: ForgetRequest, n_candidates: int = 256,
                      seed: int = 0) -> list[str]:
    """Every account number in the request plus random ones of the same format."""
    secrets = sorted({f.target for s in (request.forget, request.retain, request.holdout,
                                         request.neighbors) for f in s
                      if f.attribute == "account"})
    if not secrets:
        return []
    n_digits = len(secrets[0].split())
    rng = random.Random(seed)
    pool = list(secrets)
    have = set(pool)
    while len(pool) < n_candidates and len(have) < 10 ** n_digits:
        s = " ".join(rng.choice("0123456789") for _ in range(n_digits))
        if s not in have:
            have.add(s)
            pool.append(s)
    return pool


@torch.inference_mode()
def exposures(model: ModelHandle, facts: Sequence[Fact], candidates: Sequence[str],
              engine: str = "serial") -> Tensor:
    """Exposure of each fact's true secret among ``candidates`` (which must contain it); the
    forward (``engine``) chosen and checked once, not per fact."""
    out, read = [], None
    for f in facts:
        cands = [c for c in candidates if c != f.target] + [f.target]
        enc = model.encode([Fact(f.prompt, c) for c in cands])
        read = read or token_logprobs_reader(model, engine, enc)
        lp = torch.cat([read(b).sum(1) for b in enc.chunks(512)])  # summed target log-probs
        true = lp[-1]
        rank = 1 + (lp[:-1] > true).sum() + 0.5 * (lp[:-1] == true).sum()
        out.append(stats.exposure(rank.double(), len(cands)))
    return torch.stack(out) if out else torch.zeros(0, dtype=torch.float64)


def exposure_metrics(model: ModelHandle, request: ForgetRequest, n_candidates: int = 256,
                     seed: int = 0, engine: str = "serial") -> dict[str, float]:
    """Mean exposure of forget and holdout secrets (one prompt per person)."""
    cands = secret_candidates(request, n_candidates, seed)
    fa = _one_per_person([f for f in request.forget if f.attribute == "account"])
    if not cands or not fa:
        return {}
    ha = _one_per_person([f for f in request.holdout if f.attribute == "account"])[:len(fa)]
    m = {"exposure_forget": float(exposures(model, fa, cands, engine).mean()),
         "exposure_max": float(torch.log2(torch.tensor(float(len(cands)))))}
    if ha:
        m["exposure_holdout"] = float(exposures(model, ha, cands, engine).mean())
    return m


def privacy_metrics(model: ModelHandle, request: ForgetRequest, n_candidates: int = 256,
                    k: float = 0.2, seed: int = 0,
                    scores: tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]] | None = None,
                    engine: str = "serial") -> dict[str, float]:
    """Membership AUCs (:func:`membership`, from ``scores`` where given) and canary exposure
    (``engine`` as :func:`probes.behaviour.fact_hits`)."""
    return (membership(model, request, k, scores)
            | exposure_metrics(model, request, n_candidates, seed, engine))


def add_privleak(metrics: dict[str, dict[str, float]]) -> None:
    """PrivLeak of every model against the oracle's loss-based AUC (in place)."""
    if "oracle" not in metrics or "mia_auc_loss" not in metrics["oracle"]:
        return
    ref = metrics["oracle"]["mia_auc_loss"]
    for label, m in metrics.items():
        if "mia_auc_loss" in m:
            m["privleak"] = stats.privleak(m["mia_auc_loss"], ref)
