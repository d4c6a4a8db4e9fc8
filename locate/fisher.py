"""Diagonal Fisher information on forget vs retain - the importance behind Selective Synaptic
Dampening ("Fast Machine Unlearning Without Retraining Through Selective Synaptic Dampening",
Foster et al.), also used by FILA/VILA and FIT.

Fisher of a parameter (or unit) is the mean squared gradient of the target-token loss. The score
is the forget-to-retain ratio ``F_forget / (F_retain + eps)``: high where a parameter matters for
the forget set and little for everything else. ``reduction`` says how a batch's loss averages
its target tokens: per fact (default) or over all tokens, as SSD's code does on a causal LM.
The raw ``forget`` and ``retain`` Fisher are kept in ``Importance.parts`` for SSD.

Memory (``W``: the weights' bytes; ``P``: the fraction of the parameters scored, 1 by default):
the Importance holds three float32 tensors per scored parameter - score, forget and retain
Fisher - ``3 P x`` an fp32 model's bytes (``6 P x`` a bfloat16 model's). The passes keep only
the two sums (2x fp32, 4x bf16; no |g| accumulators) and stream each gradient into them as
backward finishes it (:mod:`locate._grads`), so the result itself is the peak, except where tied
weights make backward hold more (Gemma's embedding; ``bench/memory.py`` measures it).
"""

from __future__ import annotations

from typing import Sequence

import torch

from excise.checks import check_choice
from excise.handle import ModelHandle
from excise.importance import Importance
from excise.request import ForgetRequest
from locate._common import check_inputs
from locate._grads import ESTIMATORS, REDUCTIONS, StatsCache, gradient_stats


def fisher(model: ModelHandle, request: ForgetRequest, sites: str | Sequence[str] | None = None,
           *, estimator: str = "batch", reduction: str = "fact", batch_size: int = 32,
           eps: float = 1e-8, cache: StatsCache | None = None, progress: bool = False
           ) -> Importance:
    """Diagonal Fisher of ``request.forget`` against ``request.keep`` (retain facts + retain text).

    ``sites``: parameter sites (default: every parameter) and/or activation sites (one score per
    neuron / head / dimension). ``estimator``: ``"batch"`` (squared gradient of each batch's loss,
    averaged over batches - SSD's ``calc_importance``) or ``"example"`` (mean of per-example
    squared gradients - the empirical Fisher).

    ``reduction`` - how a batch's loss averages its target tokens (``estimator="batch"``):

    - ``"fact"`` (default): each fact's mean token loss, averaged over the batch's facts. Every
      fact weighs the same whatever its target's length, as every sample does in SSD, which was
      written for classifiers (one label per sample); the per-example estimator and the batch
      size 1 give the same per-fact weighting, so the default does not drift with batch size.
    - ``"token"``: the mean over every target token of the batch - exactly SSD's own
      ``calc_importance`` run on a causal LM (its cross-entropy over a batch's flattened
      tokens), at any batch size; a fact with a 4-token target weighs 4 times one with 1.

    The two agree at batch size 1 and when every target has the same length. Retain-side
    statistics are read from / stored in ``cache``.
    """
    check_choice("fisher", "estimator", estimator, ESTIMATORS)
    check_choice("fisher", "reduction", reduction, REDUCTIONS)
    check_inputs("fisher", model, batch_size=batch_size)
    site_list = model.sites(sites if sites is not None else "*", kind=None if sites else "param")
    fp = model.fingerprint()  # the Importance's model, and the retain cache's key
    kw = dict(estimator=estimator, reduction=reduction, batch_size=batch_size, stats=("sq",),
              fingerprint=fp, progress=progress)
    f = gradient_stats(model, request.forget, site_list, desc="fisher (forget)", **kw)
    r = gradient_stats(model, request.keep, site_list, cache=cache, desc="fisher (retain)", **kw)
    # statistics live where their parameters do (a sharded model's on several devices)
    scale = torch.stack([v.mean().cpu() for v in r.sq.values()]).mean()
    floor = eps * float(scale) + 1e-30
    scores = {}
    for s in site_list:
        d = r.sq[s] + floor
        scores[s] = torch.div(f.sq[s], d, out=d)
    return Importance("fisher", scores,
                      {"estimator": estimator, "reduction": reduction, "batch_size": batch_size,
                       "eps": eps, "model": fp, "request": request.digest(),
                       "n_forget": f.n, "n_retain": r.n,
                       "unit_axes": model.unit_axes(site_list)},
                      {"forget": f.sq, "retain": r.sq})
