"""Comparison with the retrain oracle (TOFU): truth ratio, forget quality, KL, recall gaps.

Perturbed (false) answers are built TOFU-style from the world itself: for a fact about attribute
``a`` they are other values of ``a`` that occur anywhere in the request (other people's cities,
jobs, account numbers ...), never the true one. Facts without an attribute draw from every target.
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
from probes.behaviour import target_logprobs


def perturbed_answers(request: ForgetRequest, facts: Sequence[Fact], m: int = 5,
                      seed: int = 0) -> list[list[str]]:
    """``m`` false answers per fact, drawn from the values of the same attribute."""
    pools: dict[str, set[str]] = {}
    for split in (request.forget, request.retain, request.holdout, request.neighbors):
        for f in split:
            pools.setdefault(f.attribute, set()).add(f.target)
    everything = set().union(*pools.values())
    rng = random.Random(seed)
    out = []
    for f in facts:
        pool = sorted((pools.get(f.attribute) if f.attribute else everything) - {f.target})
        if not pool:
            raise ValueError(f"no false answers for {f.prompt!r} (attribute {f.attribute!r}): "
                             f"the request holds no other value of that attribute")
        out.append(rng.sample(pool, m) if len(pool) >= m else [rng.choice(pool) for _ in range(m)])
    return out


def mean_logprob(model: ModelHandle, facts: Sequence[Fact]) -> Tensor:
    """Length-normalised target log-probability per fact ``[n]``."""
    lp, n = target_logprobs(model, facts)
    return lp / n.clamp(min=1)


def truth_ratios(model: ModelHandle, facts: Sequence[Fact], false: list[list[str]]) -> Tensor:
    """TOFU truth ratio per fact (small = the model prefers the true answer) ``[n]``."""
    facts = list(facts)
    true = mean_logprob(model, facts)
    alt = [Fact(f.prompt, a, f.person, f.attribute, f.form, f.template, f.trained, f.subject)
           for f, alts in zip(facts, false) for a in alts]
    fl = mean_logprob(model, alt).reshape(len(facts), -1)
    return stats.truth_ratio(true, fl)


@torch.inference_mode()
def kl_to(model: ModelHandle, reference: ModelHandle, facts: Sequence[Fact],
          batch_size: int = 256) -> float:
    """Mean KL(reference || model) of the next-token distribution at target positions
    (teacher forced)."""
    total, count = 0.0, 0
    for b in model.encode(list(facts)).chunks(batch_size):
        lp = torch.log_softmax(model.logits(b.tokens)[:, :-1].float(), -1)
        lq = torch.log_softmax(reference.logits(b.tokens)[:, :-1].float(), -1)
        kl = (lq.exp() * (lq - lp)).sum(-1)  # [n, T-1]
        m = b.target_mask[:, 1:].to(kl.device)
        total += float(kl[m].sum())
        count += int(m.sum())
    return total / max(1, count)


def oracle_metrics(models: dict[str, ModelHandle], oracle: ModelHandle, request: ForgetRequest,
                   behaviour: dict[str, dict[str, float]], n_false: int = 5,
                   seed: int = 0) -> dict[str, dict[str, float]]:
    """Truth ratio, forget quality (KS p-value vs the oracle's truth ratios), KL to the oracle on
    forget and retain prompts, and recall gaps, for every model in ``models`` and the oracle."""
    facts = list(request.forget)
    false = perturbed_answers(request, facts, n_false, seed)
    tr_oracle = truth_ratios(oracle, facts, false)
    out: dict[str, dict[str, float]] = {"oracle": {
        "truth_ratio_forget": float(tr_oracle.mean()), "forget_quality": 1.0,
        "kl_oracle_forget": 0.0, "kl_oracle_retain": 0.0}}
    retain = list(request.retain)[:: max(1, len(request.retain) // 500)]
    for label, model in models.items():
        tr = truth_ratios(model, facts, false)
        m = {"truth_ratio_forget": float(tr.mean()),
             "forget_quality": stats.forget_quality(tr, tr_oracle),
             "kl_oracle_forget": kl_to(model, oracle, facts),
             "kl_oracle_retain": kl_to(model, oracle, retain)}
        for k in ("forget_recall", "retain_recall", "paraphrase_recall"):
            if k in behaviour.get(label, {}) and k in behaviour.get("oracle", {}):
                m[f"{k}_gap"] = behaviour[label][k] - behaviour["oracle"][k]
        out[label] = m
    return out
