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

Memory (``W``: the weights' bytes; ``P``: the fraction of the parameters scored). Statistics
are float32 whatever the model's dtype, on the device of the parameter (or activation) they
describe, and only the asked-for ones are accumulated (``stats``: ``fisher`` reads ``"sq"``,
``grad_ratio`` and ``circuit`` read ``"abs"``): per statistic ``P x W`` for a float32 model,
``2 P x W`` for a bfloat16 one; a method's forget and retain passes keep two such sets (fisher:
2x an fp32 model's bytes, 4x a bf16 one's, when every parameter is scored). Under the batch
estimator each parameter's gradient is added to the statistics the moment backward has finished
it (a post-accumulate hook), then dropped - a site's first gradient is squared in place and
becomes its accumulator - so no full set of gradients lives beside the statistics. Measured on
Gemma 3 270M (``bench/memory.py``'s harness; one pass, 14 facts, the MLP weights, P = 0.26): peak
0.54 W -> 0.27 W in float32 and 0.85 W -> 0.58 W in bfloat16 against the all-at-once pass; every
parameter in bfloat16: 3.55 W -> 2.68 W. Every parameter in float32 stays at 2.26 W: Gemma ties
its embedding to the unembedding (63% of its weights), and backward holds the unembedding's
gradient until the embedding's arrives and sums them - three embedding-sized tensors at once,
whatever is done with the result. The per-example estimator on parameter sites
(``torch.func.vmap``) materialises ``batch_size`` per-example gradients at once (``batch_size``
x the scored weights); lower ``batch_size`` there to bound it. Activation sites cost one value
per unit.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor

from excise.handle import Batch, ModelHandle
from excise.request import FactSet
from excise.train import deterministic

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

    def get(self, key: tuple, stats: Sequence[str] = STATS) -> GradStats | None:
        """The entry under ``key`` when it holds every statistic in ``stats`` (then counted as
        a hit), restricted to those; None otherwise."""
        s = self.entries.get(key)
        if s is None or any(not getattr(s, k) for k in stats):
            return None
        self.hits += 1
        return GradStats(s.sq if "sq" in stats else {}, s.abs if "abs" in stats else {}, s.n)

    def put(self, key: tuple, stats: GradStats) -> None:
        """Store ``stats`` under ``key``, keeping the statistics an earlier entry there holds
        and ``stats`` lacks (a fisher pass then a grad_ratio pass: both kinds, each computed
        once)."""
        old = self.entries.get(key)
        if old is not None:
            stats = GradStats(stats.sq or old.sq, stats.abs or old.abs, stats.n)
        self.entries[key] = stats


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
    not given: it hashes every weight), the facts, sites, estimator, reduction and batch size;
    an entry serves any request for statistics it holds. Statistics are float32 tensors on the
    device of their site's parameter (activation sites: where the gradient arrived)."""
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
               reduction if estimator == "batch" else "fact", batch_size)
        if (hit := cache.get(key, stats)) is not None:
            return hit
    param_sites = [s for s in sites if model.info(s).kind == "param"]
    act_sites = [s for s in sites if model.info(s).kind == "activation"]
    other = [s for s in sites if s not in param_sites and s not in act_sites]
    if other:
        raise ValueError(f"gradient methods score parameter and activation sites; "
                         f"{other[0]!r} is a {model.info(other[0]).kind} site")
    params = {s: model.parameter(s) for s in param_sites}
    frozen = [s for s, p in params.items() if not p.requires_grad]
    if frozen:
        raise ValueError(f"parameter site {frozen[0]!r} does not require grad (frozen): "
                         f"gradient statistics need requires_grad=True on every scored "
                         f"parameter ({len(frozen)} frozen)")
    # accumulators start at a site's first gradient (sites that never get one: zeros)
    sq: dict[str, Tensor] | None = {} if "sq" in stats else None
    ab: dict[str, Tensor] | None = {} if "abs" in stats else None
    batch = model.encode(list(facts))
    n_batches = 0
    from tqdm.auto import tqdm

    chunks = list(batch.chunks(batch_size))
    # deterministic algorithms: at two threads the embedding's backward (an indexed add)
    # otherwise sums in an unordered way, and the same request gave statistics of embed.W_E
    # that differed in the last bits from run to run
    with deterministic():
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
                # parameters: reduced into the statistics as backward finishes each one
                _streamed_backward(loss, params, [acts[s] for s in act_sites], sq, ab)
                for s in act_sites:
                    g, acts[s].grad = acts[s].grad, None
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
            if s not in acc:  # never got a gradient
                dev = params[s].device if s in params else model.device
                acc[s] = torch.zeros(model.info(s).unit_shape, device=dev)
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
        cache.put(key, out)
    return out


def _accumulate(sq: dict | None, ab: dict | None, site: str, g: Tensor,
                per_row: bool = False, owned: bool = False) -> None:
    """Add ``g`` (summed over its first axis when ``per_row``) to the asked-for statistics
    (``None``: not asked for), accumulated in float32 on ``g``'s device (a site's first
    gradient allocates its accumulator there). ``owned``: nobody else holds ``g`` (a gradient
    backward has just handed over), so it may be overwritten: a site's first squared (or
    absolute) gradient is then computed in place and becomes the accumulator, no second copy."""
    g = g.float()  # no copy for a float32 model
    if per_row:
        if sq is not None:
            g2 = (g * g).sum(0)
            sq[site] = g2 if site not in sq else sq[site].add_(g2)
        if ab is not None:
            a = g.abs().sum(0)
            ab[site] = a if site not in ab else ab[site].add_(a)
        return
    first_sq = sq is not None and site not in sq
    if sq is not None and not first_sq:
        sq[site].addcmul_(g, g)
    if ab is not None:
        a = g.abs_() if owned and not first_sq else g.abs()  # g still to square: keep it
        ab[site] = a if site not in ab else ab[site].add_(a)
    if first_sq:
        sq[site] = torch.mul(g, g, out=g) if owned else g * g


def _streamed_backward(loss: Tensor, params: dict[str, Tensor], extra: list[Tensor],
                       sq: dict | None, ab: dict | None) -> None:
    """``loss.backward()`` into ``params`` (site -> parameter) and the non-leaf tensors
    ``extra`` (their ``.grad`` is set), nothing else. Each parameter's gradient is added to the
    statistics by a post-accumulate hook the moment backward has finished it, then dropped
    (``p.grad = None``): at most the gradients backward has in flight live at once, never the
    whole set. A parameter's ``.grad`` from before is put back afterwards, untouched."""
    sites_of: dict[int, list[str]] = {}
    unique: dict[int, Tensor] = {}
    for s, p in params.items():
        sites_of.setdefault(id(p), []).append(s)  # tied weights: one gradient, several sites
        unique[id(p)] = p

    def reduce(p: Tensor) -> None:
        g, p.grad = p.grad, None
        names = sites_of[id(p)]
        for s in names:  # a gradient read by one site only is that site's to overwrite
            _accumulate(sq, ab, s, g.detach(), owned=len(names) == 1)

    saved = {k: p.grad for k, p in unique.items()}
    handles = []
    try:
        for p in unique.values():
            p.grad = None
            handles.append(p.register_post_accumulate_grad_hook(reduce))
        torch.autograd.backward(loss, inputs=list(unique.values()) + extra)
    finally:
        for h in handles:
            h.remove()
        for k, p in unique.items():
            p.grad = saved[k]


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
