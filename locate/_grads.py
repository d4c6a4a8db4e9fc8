"""Shared gradient statistics: one backward pass per batch feeds every gradient-based method.

``gradient_stats`` returns, for each requested site, the mean squared gradient (diagonal Fisher)
and the mean absolute gradient of the target-token loss, under a per-batch or per-example
estimator. Parameter sites get one statistic per element; activation sites one per unit (neuron,
head, residual dimension): the gradient of a multiplicative gate on the unit, summed over
positions (activation x gradient).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor

from excise.handle import Batch, ModelHandle
from excise.request import FactSet

ESTIMATORS = ("batch", "example")


@dataclass
class GradStats:
    sq: dict[str, Tensor]  # site -> mean squared gradient (Fisher)
    abs: dict[str, Tensor]  # site -> mean |gradient|
    n: int  # examples seen


@dataclass
class StatsCache:
    """Retain-side statistics reused across requests and methods. Hold one in your session and
    pass it as ``cache=``; entries are keyed by model fingerprint, data, sites and estimator, so
    an edited model never reads the statistics of the original."""

    entries: dict[tuple, GradStats] = field(default_factory=dict)
    hits: int = 0

    def get(self, key: tuple) -> GradStats | None:
        s = self.entries.get(key)
        if s is not None:
            self.hits += 1
        return s


def _facts_digest(facts: FactSet) -> str:
    h = hashlib.sha256()
    for f in facts:
        h.update(f"{f.prompt}\x00{f.target}\x01".encode())
    return h.hexdigest()[:16]


def _unit_reduce(g: Tensor, act: Tensor) -> Tensor:
    """Gradient of the loss with respect to a multiplicative gate on each unit (gate = 1):
    ``sum over positions of activation * gradient`` -> ``[n, *unit_shape]``. A silent unit
    gets zero, whatever its output weights."""
    ga = (g * act.detach()).sum(1)  # over positions
    if ga.dim() == 3:  # attn.z: [n, heads, d_head] -> one gate per head
        ga = ga.sum(-1)
    return ga


def gradient_stats(model: ModelHandle, facts: FactSet, sites: Sequence[str], *,
                   estimator: str = "batch", batch_size: int = 32,
                   cache: StatsCache | None = None, progress: bool = False,
                   desc: str = "gradients") -> GradStats:
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; choose one of {list(ESTIMATORS)}")
    if len(facts) == 0:
        raise ValueError(f"the {facts.name!r} fact set is empty: nothing to compute "
                         f"gradients on")
    key = None
    if cache is not None:  # the fingerprint hashes every weight: only when a cache is used
        key = (model.fingerprint(), _facts_digest(facts), tuple(sites), estimator, batch_size)
        if (hit := cache.get(key)) is not None:
            return hit
    param_sites = [s for s in sites if model.info(s).kind == "param"]
    act_sites = [s for s in sites if model.info(s).kind == "activation"]
    other = [s for s in sites if s not in param_sites and s not in act_sites]
    if other:
        raise ValueError(f"gradient methods score parameter and activation sites; "
                         f"{other[0]!r} is a {model.info(other[0]).kind} site")
    params = {s: model.parameter(s) for s in param_sites}
    sq = {s: torch.zeros(model.info(s).unit_shape) for s in sites}
    ab = {s: torch.zeros(model.info(s).unit_shape) for s in sites}
    batch = model.encode(list(facts))
    n_batches = 0
    from tqdm.auto import tqdm

    chunks = list(batch.chunks(batch_size))
    for b in tqdm(chunks, desc=desc, disable=not progress, leave=False):
        acts: dict[str, Tensor] = {}

        def keep(x, site):
            acts[site] = x

        hooks = {s: keep for s in act_sites}
        if estimator == "batch" or not param_sites:
            loss_ex = model.loss(b, hooks=hooks, per_example=True)  # [n]
            loss = loss_ex.mean() if estimator == "batch" else loss_ex.sum()
            inputs = [params[s] for s in param_sites] + [acts[s] for s in act_sites]
            grads = torch.autograd.grad(loss, inputs, allow_unused=True)
            for s, g in zip(param_sites, grads[:len(param_sites)]):
                if g is None:
                    continue
                g = g.detach()
                sq[s].addcmul_(g, g)
                ab[s].add_(g.abs())
            for s, g in zip(act_sites, grads[len(param_sites):]):
                if g is None:
                    continue
                u = _unit_reduce(g.detach(), acts[s])  # [n, units]
                if estimator == "batch":
                    u = u.sum(0) / len(b)  # gradient of the batch-mean loss
                    sq[s] += u ** 2
                    ab[s] += u.abs()
                else:
                    sq[s] += (u ** 2).sum(0)
                    ab[s] += u.abs().sum(0)
            n_batches += 1
        else:
            _per_example_params(model, b, params, act_sites, sq, ab)
    for s in sites:
        if not torch.isfinite(sq[s]).all():
            raise ValueError(f"non-finite gradients at site {s!r} on the {facts.name!r} set "
                             f"(the model's loss overflowed?)")
        denom = n_batches if estimator == "batch" else len(batch)
        sq[s] /= denom
        ab[s] /= denom
    stats = GradStats(sq, ab, len(batch))
    if cache is not None:
        cache.entries[key] = stats
    return stats


def _per_example_params(model: ModelHandle, b: Batch, params: dict[str, Tensor],
                        act_sites: list[str], sq: dict, ab: dict) -> None:
    """Per-example parameter gradients with torch.func (vmap over examples) of the handle's
    functional loss (``ValueError`` from backends that have none)."""
    from torch.func import grad, vmap

    loss_one = model.functional_loss()
    names = list(params)
    sub = {k: params[k].detach() for k in names}
    g = vmap(grad(loss_one), in_dims=(None, 0, 0))(sub, b.tokens, b.target_mask)
    for s in names:
        sq[s] += (g[s] ** 2).sum(0)
        ab[s] += g[s].abs().sum(0)
    if act_sites:
        acts: dict[str, Tensor] = {}

        def keep(x, site):
            acts[site] = x

        loss = model.loss(b, hooks={s: keep for s in act_sites}, per_example=True).sum()
        grads = torch.autograd.grad(loss, [acts[s] for s in act_sites], allow_unused=True)
        for s, gr in zip(act_sites, grads):
            if gr is not None:
                u = _unit_reduce(gr.detach(), acts[s])
                sq[s] += (u ** 2).sum(0)
                ab[s] += u.abs().sum(0)
