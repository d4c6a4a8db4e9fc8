"""Diagonal Fisher information on forget vs retain - the importance behind Selective Synaptic
Dampening ("Fast Machine Unlearning Without Retraining Through Selective Synaptic Dampening",
Foster et al.), also used by FILA/VILA and FIT.

Fisher of a parameter (or unit) is the mean squared gradient of the target-token loss. The score
is the forget-to-retain ratio ``F_forget / (F_retain + eps)``: high where a parameter matters for
the forget set and little for everything else. The raw ``forget`` and ``retain`` Fisher are kept in
``Importance.parts`` for SSD.
"""

from __future__ import annotations

from typing import Sequence

import torch

from excise.handle import ModelHandle
from excise.importance import Importance
from excise.request import ForgetRequest
from locate._common import check_inputs
from locate._grads import StatsCache, gradient_stats


def fisher(model: ModelHandle, request: ForgetRequest, sites: str | Sequence[str] | None = None,
           *, estimator: str = "batch", batch_size: int = 32, eps: float = 1e-8,
           cache: StatsCache | None = None, progress: bool = False) -> Importance:
    """Diagonal Fisher of ``request.forget`` against ``request.keep`` (retain facts + retain text).

    ``sites``: parameter sites (default: every parameter) and/or activation sites (one score per
    neuron / head / dimension). ``estimator``: ``"batch"`` (squared gradient of each batch's mean
    loss, averaged over batches - as in SSD) or ``"example"`` (mean of per-example squared
    gradients - the empirical Fisher). Retain-side statistics are read from / stored in ``cache``.
    """
    check_inputs("fisher", model, batch_size=batch_size)
    site_list = model.sites(sites if sites is not None else "*", kind=None if sites else "param")
    f = gradient_stats(model, request.forget, site_list, estimator=estimator,
                       batch_size=batch_size, progress=progress, desc="fisher (forget)")
    r = gradient_stats(model, request.keep, site_list, estimator=estimator,
                       batch_size=batch_size, cache=cache, progress=progress,
                       desc="fisher (retain)")
    scale = torch.stack([v.mean() for v in r.sq.values()]).mean()
    floor = eps * float(scale) + 1e-30
    scores = {s: f.sq[s] / (r.sq[s] + floor) for s in site_list}
    return Importance("fisher", scores,
                      {"estimator": estimator, "batch_size": batch_size, "eps": eps,
                       "model": model.fingerprint(), "request": request.digest(),
                       "n_forget": f.n, "n_retain": r.n,
                       "unit_axes": model.unit_axes(site_list)},
                      {"forget": f.sq, "retain": r.sq})
