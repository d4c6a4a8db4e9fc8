"""Shared gradient statistics: one backward pass per batch feeds every gradient-based method.

``gradient_stats`` returns, for each requested site, the mean squared gradient (diagonal Fisher)
and/or the mean absolute gradient of the target-token loss, under a per-batch or per-example
estimator. Parameter sites get one statistic per element; activation sites one per unit (neuron,
head, residual dimension): the gradient of a multiplicative gate on the unit (one gate shared by
the rows of a batch), summed over positions (activation x gradient).

A batch's loss (``estimator="batch"``) averages its target tokens per ``reduction``: ``"fact"``
- each fact's mean token loss, averaged over the facts (every fact weighs the same, whatever its
target's length) - or ``"token"`` - the mean over every target token of the batch (a fact
weighs by its number of target tokens; SSD's ``calc_importance`` on a causal LM). They agree at
batch size 1 and when all targets have the same length. ``estimator="example"`` takes each
fact's own mean token loss (batches of one: both reductions are the same).
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
REDUCTIONS = ("fact", "token")
STATS = ("sq", "abs")


@dataclass
class GradStats:
    sq: dict[str, Tensor]  # site -> mean squared gradient (Fisher); empty when not asked for
    abs: dict[str, Tensor]  # site -> mean |gradient|; empty when not asked for
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
                   estimator: str = "batch", reduction: str = "fact", batch_size: int = 32,
                   stats: Sequence[str] = STATS, cache: StatsCache | None = None,
                   fingerprint: str | None = None, progress: bool = False,
                   desc: str = "gradients") -> GradStats:
    """Gradient statistics of ``facts`` at ``sites``: ``stats`` picks which (``"sq"``: mean
    squared gradient, ``"abs"``: mean absolute gradient; only those are accumulated).
    ``cache``: read / store the result, keyed by the model's ``fingerprint`` (computed here when
    not given: it hashes every weight), the facts, sites, estimator, reduction, batch size and
    statistics."""
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; choose one of {list(ESTIMATORS)}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; choose one of {list(REDUCTIONS)}")
    stats = tuple(stats)
    if not stats or any(k not in STATS for k in stats):
        raise ValueError(f"stats {list(stats)!r}: choose one or more of {list(STATS)}")
    if len(facts) == 0:
        raise ValueError(f"the {facts.name!r} fact set is empty: nothing to compute "
                         f"gradients on")
    key = None
    if cache is not None:
        key = (fingerprint or model.fingerprint(), _facts_digest(facts), tuple(sites), estimator,
               reduction if estimator == "batch" else "fact", batch_size, stats)
        if (hit := cache.get(key)) is not None:
            return hit
    param_sites = [s for s in sites if model.info(s).kind == "param"]
    act_sites = [s for s in sites if model.info(s).kind == "activation"]
    other = [s for s in sites if s not in param_sites and s not in act_sites]
    if other:
        raise ValueError(f"gradient methods score parameter and activation sites; "
                         f"{other[0]!r} is a {model.info(other[0]).kind} site")
    params = {s: model.parameter(s) for s in param_sites}
    # accumulators start at a site's first gradient (sites that never get one: zeros)
    sq: dict[str, Tensor] | None = {} if "sq" in stats else None
    ab: dict[str, Tensor] | None = {} if "abs" in stats else None
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
            if estimator == "batch" and reduction == "token":
                loss = model.loss(b, hooks=hooks)  # mean over every target token
            else:
                loss_ex = model.loss(b, hooks=hooks, per_example=True)  # [n]
                loss = loss_ex.mean() if estimator == "batch" else loss_ex.sum()
            inputs = [params[s] for s in param_sites] + [acts[s] for s in act_sites]
            grads = torch.autograd.grad(loss, inputs, allow_unused=True)
            for s, g in zip(param_sites, grads[:len(param_sites)]):
                if g is not None:
                    _accumulate(sq, ab, s, g.detach())
            for s, g in zip(act_sites, grads[len(param_sites):]):
                if g is None:
                    continue
                u = _unit_reduce(g.detach(), acts[s])  # [n, units]
                if estimator == "batch":  # the gate of a unit is shared by the batch's rows
                    _accumulate(sq, ab, s, u.sum(0))
                else:
                    _accumulate(sq, ab, s, u, per_row=True)
            n_batches += 1
        else:
            _per_example_params(model, b, params, act_sites, sq, ab)
    denom = n_batches if estimator == "batch" else len(batch)
    for name, acc in (("squared", sq), ("absolute", ab)):
        if acc is None:
            continue
        for s in sites:
            if s not in acc:
                acc[s] = torch.zeros(model.info(s).unit_shape)
                continue
            # one reduction; only a sum that is not finite gets an element-wise look
            if not bool(torch.isfinite(acc[s].sum())) and not bool(torch.isfinite(acc[s]).all()):
                raise ValueError(f"non-finite {name} gradients at site {s!r} on the "
                                 f"{facts.name!r} set (the model's loss overflowed?)")
            if denom != 1:
                acc[s] /= denom
    out = GradStats({} if sq is None else {s: sq[s] for s in sites},
                    {} if ab is None else {s: ab[s] for s in sites}, len(batch))
    if cache is not None:
        cache.entries[key] = out
    return out


def _accumulate(sq: dict | None, ab: dict | None, site: str, g: Tensor,
                per_row: bool = False) -> None:
    """Add ``g`` (summed over its first axis when ``per_row``) to the asked-for statistics
    (``None``: not asked for), accumulated in float32 on the CPU."""
    g = g.float().cpu()  # no copy for a float32 CPU model
    if sq is not None:
        if per_row:
            g2 = (g * g).sum(0)
            sq[site] = g2 if site not in sq else sq[site].add_(g2)
        else:
            sq[site] = g * g if site not in sq else sq[site].addcmul_(g, g)
    if ab is not None:
        a = g.abs().sum(0) if per_row else g.abs()
        ab[site] = a if site not in ab else ab[site].add_(a)


def _per_example_params(model: ModelHandle, b: Batch, params: dict[str, Tensor],
                        act_sites: list[str], sq: dict | None, ab: dict | None) -> None:
    """Per-example parameter gradients with torch.func (vmap over examples) of the handle's
    functional loss (``ValueError`` from backends that have none)."""
    from torch.func import grad, vmap

    loss_one = model.functional_loss()
    names = list(params)
    sub = {k: params[k].detach() for k in names}
    g = vmap(grad(loss_one), in_dims=(None, 0, 0))(sub, b.tokens, b.target_mask)
    for s in names:
        _accumulate(sq, ab, s, g[s], per_row=True)
    if act_sites:
        acts: dict[str, Tensor] = {}

        def keep(x, site):
            acts[site] = x

        loss = model.loss(b, hooks={s: keep for s in act_sites}, per_example=True).sum()
        grads = torch.autograd.grad(loss, [acts[s] for s in act_sites], allow_unused=True)
        for s, gr in zip(act_sites, grads):
            if gr is not None:
                _accumulate(sq, ab, s, _unit_reduce(gr.detach(), acts[s]), per_row=True)
