"""Gradient ratio (GRIN, "LLM Unlearning using Gradient Ratio-Based Influence Estimation and
Noise Injection"): a parameter matters for the forget set and not for the rest when its forget
gradient is large and its retain gradient small,

    score = mean|grad_forget| / (mean|grad_retain| + eps)

per parameter element, or - with ``unit=True`` - per neuron / head after summing each unit's
parameters (:meth:`excise.importance.Importance.by_unit`). The raw forget and retain magnitudes
are kept in ``Importance.parts`` (under ``forget`` / ``retain``). Retain-side gradients come from
the same shared pass as ``fisher`` and are reused through ``cache``.

Memory (``W``: the weights' bytes; ``P``: the fraction of the parameters scored, 1 by default):
with ``unit=False`` the Importance holds score, forget and retain magnitude per scored
parameter in float32 - ``3 P x`` an fp32 model's bytes (``6 P x`` a bfloat16 model's); with
``unit=True`` one value per unit (negligible). The passes accumulate gradient statistics in
float32, streamed per parameter (:mod:`locate._grads`), and keep them until the scores are
computed; ``bench/memory.py`` measures the peak.
"""

from __future__ import annotations

from typing import Sequence

import torch

from excise.handle import ModelHandle
from excise.importance import Importance
from excise.request import ForgetRequest
from locate._common import base_meta, check_inputs, resolve_sites
from locate._grads import STATS, StatsCache, gradient_stats


def grad_ratio(model: ModelHandle, request: ForgetRequest, sites: str | Sequence[str] | None = None,
               *, unit: bool = False, eps: float = 1e-3, batch_size: int = 32,
               cache: StatsCache | None = None, progress: bool = False) -> Importance:
    """|grad forget| / (|grad retain| + eps) per parameter (``unit=False``) or per neuron/head.

    ``sites``: parameter sites (default: every parameter) and/or activation sites (one score
    per neuron/head/dimension, from the gradient of a gate on the unit). ``eps`` is relative to
    the mean retain magnitude, so it does not depend on the model's scale.
    """
    check_inputs("grad_ratio", model, batch_size=batch_size)
    names = resolve_sites(model, sites, model.sites(kind="param"), "grad_ratio",
                          kinds=("param", "activation"))
    # only |g| is read; a shared retain cache also gets g^2 from the same pass (fisher reuses it)
    f = gradient_stats(model, request.forget, names, batch_size=batch_size, progress=progress,
                       stats=("abs",), desc="grad_ratio (forget)")
    r = gradient_stats(model, request.keep, names, batch_size=batch_size, cache=cache,
                       stats=STATS if cache is not None else ("abs",), progress=progress,
                       desc="grad_ratio (retain)")
    forget, retain = dict(f.abs), dict(r.abs)
    axes = {"unit_axes": model.unit_axes(names)}
    if unit:
        forget = Importance("grad_ratio", forget, axes).by_unit("sum").scores
        retain = Importance("grad_ratio", retain, axes).by_unit("sum").scores
        forget, retain = dict(forget), {s: retain[s] for s in forget}
    # statistics live where their parameters do (a sharded model's on several devices)
    scale = float(torch.stack([v.float().mean().cpu() for v in retain.values()]).mean())
    floor = eps * scale + 1e-30
    scores = {s: forget[s] / (retain[s] + floor) for s in forget}
    return Importance("grad_ratio", scores,
                      base_meta(model, request, unit=unit, eps=eps, batch_size=batch_size)
                      | ({} if unit else axes),
                      {"forget": forget, "retain": retain})
