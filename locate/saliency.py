"""Forget saliency of each weight: how much the forget facts' loss would rise if the weight were
removed - Optimal Brain Damage's saliency ("Optimal Brain Damage", LeCun, Denker & Solla 1990)
read on the forget set, the weight-saliency idea of SalUn ("SalUn: Empowering Machine
Unlearning via Gradient-based Weight Saliency", Fan et al. 2024).

The score of a parameter element is ``1/2 * F_forget * theta^2``: the second-order estimate of
the forget loss's rise when ``theta`` is set to zero, with the diagonal Fisher of the forget
facts (the mean squared gradient, :func:`locate.fisher`'s forget part) standing in for the
Hessian's diagonal. It asks where the forget facts' answers *depend* on the weights, not where
they depend more than the retain facts do (``fisher``'s ratio): an edit that re-draws the
selected weights and then restores the retain behaviour by training on retain data
(``edit.distill`` / ``edit.reinit``) repairs the retain side itself, and what it must reach is
every weight the forget answers lean on. On the small organism, re-drawing the top 10% of the
weights by this score outside the LayerNorms and distilling the retain behaviour back
(``configs/saliency.yaml``) is the localized recipe the verdict calls deleted on every request of
the 5% split under the full attack grid, against the more favourable of two retrain oracles,
inconclusive on another world (docs/results.md, "Deletion vs fraction touched", with the other
scores screened).

One gradient pass over the forget facts (no retain pass); parameter sites only.
"""

from __future__ import annotations

from typing import Sequence

from excise.checks import check_choice
from excise.handle import ModelHandle
from excise.importance import Importance
from excise.request import ForgetRequest
from locate._common import base_meta, check_inputs, resolve_sites
from locate._grads import REDUCTIONS, gradient_stats


def saliency(model: ModelHandle, request: ForgetRequest, sites: str | Sequence[str] | None = None,
             *, reduction: str = "fact", batch_size: int = 32, progress: bool = False
             ) -> Importance:
    """``1/2 * F_forget * theta^2`` per parameter element of ``sites`` (parameter sites, globs
    allowed; default every parameter). ``reduction``: how a batch's loss averages its target
    tokens, as in :func:`locate.fisher` (``"fact"``: each fact's mean token loss). The forget
    Fisher is kept in ``Importance.parts["forget"]``."""
    check_choice("saliency", "reduction", reduction, REDUCTIONS)
    check_inputs("saliency", model, batch_size=batch_size)
    names = resolve_sites(model, sites, model.sites(kind="param"), "saliency", kinds=("param",))
    f = gradient_stats(model, request.forget, names, reduction=reduction, batch_size=batch_size,
                       stats=("sq",), progress=progress, desc="saliency (forget)")
    weights = model.named_parameters()
    scores = {s: 0.5 * f.sq[s] * weights[s].detach().to(f.sq[s].dtype) ** 2 for s in names}
    return Importance("saliency", scores,
                      base_meta(model, request, reduction=reduction, batch_size=batch_size)
                      | {"n_forget": f.n, "unit_axes": model.unit_axes(names)},
                      {"forget": dict(f.sq)})
