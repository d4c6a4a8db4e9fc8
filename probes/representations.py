"""Representation probes: leave-one-out "memorized vs not" probes per depth (PGA's
cross-sequence protocol) and linear-CKA drift per layer.

Both read ``blocks.{L}.resid_post`` at the last prompt token - the position that must produce the
answer.
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
from probes.behaviour import first_target_positions


def depth_sites(model: ModelHandle) -> list[str]:
    return [f"blocks.{L}.resid_post" for L in range(model.n_layers)]


@torch.inference_mode()
def last_prompt_states(model: ModelHandle, facts: Sequence[Fact], sites: Sequence[str],
                       batch_size: int = 256) -> dict[str, Tensor]:
    """``{site: [n, d]}`` activations at the last prompt token of every fact."""
    out: dict[str, list[Tensor]] = {s: [] for s in sites}
    for b in model.encode(list(facts)).chunks(batch_size):
        acts = model.run_with_cache(b.tokens, sites)
        pos = first_target_positions(b) - 1
        rows = torch.arange(len(b), device=pos.device)
        for s in sites:
            a = acts[s]
            out[s].append(a[rows.to(a.device), pos.to(a.device)].float().cpu())
    return {s: torch.cat(v) for s, v in out.items()}


def _sample(facts: Sequence[Fact], n: int, seed: int) -> list[Fact]:
    facts = list(facts)
    if len(facts) <= n:
        return facts
    return random.Random(seed).sample(facts, n)


def probe_data(request: ForgetRequest, max_per_class: int = 150,
               seed: int = 0) -> tuple[list[Fact], Tensor]:
    """Balanced facts and labels: forget (memorized, 1) vs holdout (never trained, 0)."""
    n = min(len(request.forget), len(request.holdout), max_per_class)
    if n < 2:
        raise ValueError(f"loo_probe needs at least 2 forget and 2 holdout facts, have "
                         f"{len(request.forget)} and {len(request.holdout)}")
    pos = _sample(request.forget, n, seed)
    neg = _sample(request.holdout, n, seed + 1)
    y = torch.cat([torch.ones(len(pos)), torch.zeros(len(neg))])
    return pos + neg, y


def loo_probe(model: ModelHandle, facts: Sequence[Fact], y: Tensor, lam: float = 10.0,
              logistic: bool = True, by: str = "person", n_null: int = 20,
              seed: int = 0) -> dict[str, list[float]]:
    """Leave-one-out accuracy per depth: ridge (closed form, exact) and logistic (exact batched
    refits). ``by="person"`` leaves out all of one person's facts at a time - a person's facts
    share identity features, so leaving out single sequences would let the probe recognise the
    person instead of a memorization signature; ``by="sequence"`` is PGA's plain protocol
    (logistic then uses the approximate one-Newton-step LOO). Features are standardised with
    label-free statistics. ``balanced`` (the headline number) is a class-balanced ridge probe
    refitted per left-out group: plain LOO reads below chance when there is no signal (the
    intercept shifts away from the left-out class); ``ridge`` (closed form) and ``logistic`` are
    the plain estimators, kept for comparison.

    ``null`` / ``null_hi`` are the mean and 95th percentile of the balanced probe's accuracy with
    the labels permuted across groups (:func:`probes.stats.group_permutation_null`, ``n_null``
    permutations): the protocol's own chance level on these activations. A signature exists at a
    depth only where ``balanced`` exceeds ``null_hi``."""
    if by not in ("person", "sequence"):
        raise ValueError(f"by={by!r}: choose 'person' or 'sequence'")
    groups = torch.tensor([f.person if f.person >= 0 else 10**6 + i
                           for i, f in enumerate(facts)])
    sites = depth_sites(model)
    acts = last_prompt_states(model, facts, sites)
    out: dict[str, list[float]] = {"balanced": [], "null": [], "null_hi": [], "ridge": [],
                                   "logistic": []}
    g = groups if by == "person" else torch.arange(len(y))
    for s in sites:
        x = acts[s].double()
        x = (x - x.mean(0)) / x.std(0).clamp(min=1e-6)
        out["balanced"].append(stats.balanced_group_loo_accuracy(x, y, g, lam))
        if n_null:
            null = stats.group_permutation_null(x, y, g, lam, n_null, seed)
            out["null"].append(float(null.mean()))
            out["null_hi"].append(float(torch.quantile(null, 0.95)))
        for kind in ("ridge", "logistic") if logistic else ("ridge",):
            if by == "person":
                out[kind].append(stats.group_loo_accuracy(x, y, groups, kind, lam))
            else:
                out[kind].append(stats.loo_probe_accuracy(x, y, kind, lam))
    return {k: v for k, v in out.items() if v}


def drift_facts(request: ForgetRequest, max_n: int = 150, seed: int = 0) -> dict[str, list[Fact]]:
    return {"forget": _sample(request.forget, max_n, seed),
            "retain": _sample(request.retain, max_n, seed)}


def cka_per_layer(model: ModelHandle, reference: ModelHandle,
                  facts: Sequence[Fact]) -> list[float]:
    """Linear CKA between ``model`` and ``reference`` at every depth on the same prompts."""
    sites = depth_sites(model)
    a = last_prompt_states(model, facts, sites)
    b = last_prompt_states(reference, facts, sites)
    return [stats.linear_cka(a[s], b[s]) for s in sites]
