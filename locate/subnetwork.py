"""Knowledge-critical subnetworks ("Discovering Knowledge-Critical Subnetworks in Pretrained
Language Models", Bayazit et al. 2024): learn a soft mask over units whose removal makes the
model lose the forget facts while it keeps the retain set, then rank the units by how far the
mask switched them off.

Every unit ``u`` (a neuron of ``blocks.L.mlp.post``, a head of ``blocks.L.attn.z``) gets a
logit ``l_u``; its activation is multiplied by ``m_u = sigmoid(l_u)`` (all start near 1). Adam
minimises, over batches of forget facts and of ``request.keep`` (retain facts and retain text)::

    forget term   +   keep * retain NLL   +   sparsity * mean(1 - m)

The forget term (``objective``) is, over the forget facts' target tokens, the mean of
``max(log p, floor)`` (``"floor"``, the default: it drives each answer down to ``e**floor`` and
stops there) or of ``-log(1 - p)`` (``"bounded"``, the form of the first version: it stops
pushing once a target is merely unlikely). The score of a unit is how far the mask switched it
off, ``1 - m_u``, averaged over the training steps (``score="mean"``, the default) or read at the
last step (``"final"``). Where several units hold a fact together, no single ablation shows it -
each alone is redundant - but the mask has to switch the whole group off to reach the forget
term's floor; this is why a mask finds a distributed location that one-unit-at-a-time effects
(``fact_lookup``, ``causal_trace``) and gradients at the trained optimum (``fisher``,
``grad_ratio``) miss. The weights never change and never receive a gradient.

Why the floor and the mean: on the planted organism's validation people (``bench/planted.py``;
the reported people were never used to choose), the bounded term reaches its floor once most of
the planted neurons are off, and from then on nothing separates the rest of the planted neurons
from units switched off along the way (units the facts pass through but that do not store them:
with the planted neurons off, switching them back on does not bring an answer back). Driving
the answers to ``e**-8`` makes the mask switch off the whole stored location, and averaging over
the steps ranks units by how early and how far they went, not by the last step's saturation.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from excise.checks import check_choice, check_facts, check_number
from excise.handle import Batch, ModelHandle
from excise.importance import Importance
from excise.request import ForgetRequest
from excise.train import Optim, Sampler, train
from locate._common import base_meta, check_inputs, neuron_or_head_sites


def subnetwork(model: ModelHandle, request: ForgetRequest,
               sites: str | Sequence[str] | None = None, *, steps: int = 200, lr: float = 0.1,
               keep: float = 30.0, sparsity: float = 1.0, init: float = 3.0,
               objective: str = "floor", floor: float = -8.0, score: str = "mean",
               batch_size: int = 64, seed: int = 0, progress: bool = False) -> Importance:
    """Rank units by a learned removal mask (see the module).

    ``sites``: ``blocks.L.mlp.post`` (default: every layer's neurons) and/or ``blocks.L.attn.z``
    (one mask per head). ``steps`` Adam steps at learning rate ``lr`` on mask logits that start
    at ``init`` (``sigmoid(3) = 0.95``); each step reads ``batch_size`` forget facts and
    ``batch_size`` rows of ``request.keep``, drawn with ``seed``. ``keep`` weighs the retain NLL,
    ``sparsity`` the mean removed fraction (larger: fewer units switched off); ``objective``,
    ``floor`` and ``score`` as in the module. The defaults were chosen on the planted organism's
    validation people (bench/planted.py). ``parts``: ``mask`` (the final ``sigmoid(l)``);
    ``meta["final"]``: the three terms at the last step."""
    check_number("subnetwork", "steps", steps, low=1, integer=True)
    check_number("subnetwork", "lr", lr, low=0, low_open=True)
    check_number("subnetwork", "keep", keep, low=0)
    check_number("subnetwork", "sparsity", sparsity, low=0)
    check_number("subnetwork", "init", init)
    check_choice("subnetwork", "objective", objective, OBJECTIVES)
    check_number("subnetwork", "floor", floor, high=0, high_open=True)
    check_choice("subnetwork", "score", score, SCORES)
    check_inputs("subnetwork", model, batch_size=batch_size)
    names = neuron_or_head_sites(model, sites, "subnetwork", why="it masks neurons or heads")
    check_facts(request.forget, "subnetwork")
    check_facts(request.keep, "subnetwork")
    forget, kept = model.encode(list(request.forget)), model.encode(list(request.keep))
    logits = {s: torch.full(model.info(s).unit_shape, float(init),
                            device=model.unit_out_weights(s).device, requires_grad=True)
              for s in names}
    hooks = {s: _masked(logits[s]) for s in names}
    sampler = Sampler(seed)
    terms = {}
    removed = {s: torch.zeros_like(v.detach()) for s, v in logits.items()}  # summed over steps
    seen = [0]

    def loss_fn(_step: int) -> Tensor:
        fb, kb = _draw(forget, batch_size, sampler), _draw(kept, batch_size, sampler)
        terms["forget"] = _mean(_forget_term(model.token_logprobs(fb, hooks), objective, floor),
                                fb)
        terms["retain"] = model.loss(kb, hooks)
        off = {s: 1 - torch.sigmoid(v) for s, v in logits.items()}
        for s, v in off.items():
            removed[s] += v.detach()
        seen[0] += 1
        terms["removed"] = torch.cat([v.reshape(-1) for v in off.values()]).mean()
        return terms["forget"] + keep * terms["retain"] + sparsity * terms["removed"]

    # the loop trains the mask logits alone: no gradient reaches the model's weights
    train(loss_fn, logits, steps=steps, optim=Optim("adam", lr=lr), progress=progress,
          desc="subnetwork")
    mask = {s: torch.sigmoid(v.detach()).float().cpu() for s, v in logits.items()}
    scores = ({s: (v / seen[0]).float().cpu() for s, v in removed.items()} if score == "mean"
              else {s: 1 - m for s, m in mask.items()})
    meta = base_meta(model, request, steps=steps, lr=lr, keep=keep, sparsity=sparsity,
                     init=init, objective=objective, floor=floor, score=score,
                     batch_size=batch_size, seed=seed,
                     final={k: float(v.detach()) for k, v in terms.items()},
                     unit_axes=model.unit_axes(names))
    return Importance("subnetwork", scores, meta, {"mask": mask})


OBJECTIVES = ("floor", "bounded")
SCORES = ("mean", "final")


def _forget_term(logprobs: Tensor, objective: str, floor: float) -> Tensor:
    """Per target token: ``max(log p, floor)`` or ``-log(1 - p)`` (see the module)."""
    if objective == "floor":
        return logprobs.clamp(min=floor)
    return -torch.log1p(-logprobs.exp().clamp(max=1 - 1e-6))


def _masked(logit: Tensor):
    """A hook that scales each unit's activation by ``sigmoid(logit)`` (neurons: the last axis;
    heads: the head axis of ``[n, T, heads, d_head]``)."""
    def hook(x, site):
        m = torch.sigmoid(logit).to(x.device, x.dtype)
        return x * (m[:, None] if x.dim() == 4 else m)
    return hook


def _draw(b: Batch, n: int, sampler: Sampler) -> Batch:
    """``n`` rows of ``b`` without replacement (all of them, in order, when ``b`` is smaller)."""
    return b if len(b) <= n else b[sampler.rows(len(b), n)]


def _mean(per_token: Tensor, b: Batch) -> Tensor:
    """Mean over the target tokens of ``[n, T-1]`` values (zero elsewhere)."""
    m = b.target_mask[:, 1:].to(per_token.device)
    return (per_token * m).sum() / m.sum().clamp(min=1)
