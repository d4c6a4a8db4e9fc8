"""Selective Synaptic Dampening (SSD; Foster et al., "Fast Machine Unlearning Without Retraining
Through Selective Synaptic Dampening").

For each parameter with forget Fisher ``F_f`` and retain Fisher ``F_r``: if ``F_f > alpha * F_r``
the parameter is specialised to the forget set and is scaled by
``beta = min(lambda * F_r / F_f, 1)``; every other parameter is left alone.
"""

from __future__ import annotations

import torch

from edit._common import check_inputs, importance_digest, param_slices
from excise.checks import check_number
from excise.edits import Edit, weight_edit
from excise.handle import ModelHandle
from excise.importance import Importance
from excise.sites import Selection


def ssd_factors(f_forget: torch.Tensor, f_retain: torch.Tensor, alpha: float,
                lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat indices selected by SSD and their dampening factors ``beta``."""
    ff = f_forget.reshape(-1).double()
    fr = f_retain.reshape(-1).double()
    idx = torch.nonzero(ff > alpha * fr).flatten()
    beta = torch.clamp(lam * fr[idx] / ff[idx], max=1.0)
    return idx, beta


def dampen(model: ModelHandle, importance: Importance | None = None,
           units: Selection | None = None, *, alpha: float = 10.0, lam: float = 1.0) -> Edit:
    """Apply SSD using the forget/retain Fisher in ``importance.parts`` (from ``locate.fisher``).

    ``units`` optionally restricts dampening to a Selection of parameter elements, or of
    neurons / heads (their parameter slices); SSD's rule still decides which of them change.
    Returns the applied, reversible :class:`Edit`."""
    check_number("dampen", "alpha", alpha, low=0, low_open=True)
    check_number("dampen", "lam", lam, low=0)
    if importance is None:
        raise ValueError("dampen needs an Importance with forget and retain Fisher in its "
                         "parts (from locate.fisher)")
    check_inputs("dampen", model, importance)
    parts = importance.parts
    if "forget" not in parts or "retain" not in parts:
        raise ValueError(f"dampen needs forget and retain Fisher in Importance.parts; "
                         f"{importance.method!r} has parts {sorted(parts)} - use locate.fisher")
    allowed = None
    if units is not None:
        allowed = param_slices("dampen", model, units)
        missing = [s for s in allowed if s not in parts["forget"]]
        if missing:
            raise ValueError(f"selected units own parameter {missing[0]!r}, which has no "
                             f"Fisher in this Importance (sites: {list(parts['forget'])[:4]}...)")
    new = {}
    for site in parts["forget"]:
        if model.info(site).kind != "param":
            continue
        if allowed is not None and site not in allowed:
            continue
        idx, beta = ssd_factors(parts["forget"][site], parts["retain"][site], alpha, lam)
        if allowed is not None:
            keep = torch.isin(idx, allowed[site].to(idx.device))
            idx, beta = idx[keep], beta[keep]
        if idx.numel() == 0:
            continue
        p = model.parameter(site).detach().reshape(-1)
        new[site] = (idx, (p[idx.to(p.device)].double() * beta.to(p.device)).to(p.dtype))
    if not new:
        raise ValueError(f"dampen(alpha={alpha}) selects no parameter: no forget Fisher exceeds "
                         f"alpha x retain Fisher" + (" within the selected units" if units
                                                     else "") + "; lower alpha")
    return weight_edit(model, "dampen", {"alpha": alpha, "lambda": lam,
                                         "importance": importance.method,
                                         "importance_digest": importance_digest(importance)},
                       units, new)
