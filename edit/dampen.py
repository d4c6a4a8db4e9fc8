"""Selective Synaptic Dampening (SSD; Foster et al., "Fast Machine Unlearning Without Retraining
Through Selective Synaptic Dampening").

For each parameter with forget Fisher ``F_f`` and retain Fisher ``F_r``: if ``F_f > alpha * F_r``
the parameter is specialised to the forget set and is scaled by
``beta = min(lambda * F_r / F_f, 1)``; every other parameter is left alone.
"""

from __future__ import annotations

import torch

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


def dampen(model: ModelHandle, importance: Importance, units: Selection | None = None, *,
           alpha: float = 10.0, lam: float = 1.0) -> Edit:
    """Apply SSD using the forget/retain Fisher in ``importance.parts`` (from ``locate.fisher``).

    ``units`` optionally restricts dampening to a Selection of parameter elements (SSD's rule
    still decides which of them change). Returns the applied, reversible :class:`Edit`."""
    if not (alpha > 0 and lam >= 0) or alpha != alpha or lam != lam:
        raise ValueError(f"dampen: need alpha > 0 and lambda >= 0, got alpha={alpha}, "
                         f"lambda={lam}")
    parts = importance.parts
    if "forget" not in parts or "retain" not in parts:
        raise ValueError(f"dampen needs forget and retain Fisher in Importance.parts; "
                         f"{importance.method!r} has parts {sorted(parts)} - use locate.fisher")
    if units is not None and len(units) == 0:
        raise ValueError("dampen: the selection is empty")
    allowed = None
    if units is not None:
        allowed = {}
        for site, idxs in units.by_site().items():
            if site not in parts["forget"]:
                raise ValueError(f"selected unit at site {site!r} has no Fisher in this "
                                 f"Importance (sites: {list(parts['forget'])[:4]}...)")
            shape = parts["forget"][site].shape
            flat = torch.tensor([int(torch.tensor(ix).dot(_strides(shape))) for ix in idxs])
            allowed[site] = flat
    new = {}
    for site in parts["forget"]:
        if model.info(site).kind != "param":
            continue
        if allowed is not None and site not in allowed:
            continue
        idx, beta = ssd_factors(parts["forget"][site], parts["retain"][site], alpha, lam)
        if allowed is not None:
            keep = torch.isin(idx, allowed[site])
            idx, beta = idx[keep], beta[keep]
        if idx.numel() == 0:
            continue
        p = model.parameter(site).detach().reshape(-1)
        new[site] = (idx, (p[idx].double() * beta).to(p.dtype))
    if not new:
        raise ValueError(f"dampen(alpha={alpha}) selects no parameter: no forget Fisher exceeds "
                         f"alpha x retain Fisher; lower alpha")
    return weight_edit(model, "dampen", {"alpha": alpha, "lambda": lam,
                                         "importance": importance.method}, units, new)


def _strides(shape) -> torch.Tensor:
    st, acc = [], 1
    for d in reversed(shape):
        st.append(acc)
        acc *= d
    return torch.tensor(list(reversed(st)))
