"""Noise injection into the top-ranked parameters (GRIN-style: "gradient-ratio-based influence
estimation, then noise injection").

Each selected element ``w`` becomes ``w + sigma * n`` with ``n ~ N(0, 1)`` drawn from a seeded
generator (same seed, same model -> bit-identical edit). ``relative="std"``: ``sigma = scale *
std(parameter)`` (the std of the whole parameter tensor the element belongs to);
``relative="abs"``: ``sigma = scale * |w|``.
"""

from __future__ import annotations

import torch

from edit._common import check_inputs, default_units, importance_digest, param_slices
from excise.checks import check_choice, check_number
from excise.edits import Edit, weight_edit
from excise.handle import ModelHandle
from excise.importance import Importance
from excise.sites import Selection

RELATIVE = ("std", "abs")


def noise(model: ModelHandle, importance: Importance | None = None,
          units: Selection | None = None, *, top: int | float = 0.002, scale: float = 1.0,
          relative: str = "std", seed: int = 0) -> Edit:
    """Add seeded Gaussian noise to ``units`` (default: the ``top`` parameter elements of
    ``importance``; neuron/head units expand to their parameter slices)."""
    check_number("noise", "scale", scale, low=0, low_open=True)
    check_choice("noise", "relative", relative, RELATIVE)
    check_number("noise", "seed", seed, low=0, integer=True)
    check_inputs("noise", model, importance)
    units = default_units("noise", importance, units, top, level="element")
    slices = param_slices("noise", model, units)
    gen = torch.Generator().manual_seed(seed)
    new = {}
    for site in sorted(slices):
        idx = slices[site]
        p = model.parameter(site).detach()
        w = p.reshape(-1)[idx.to(p.device)].double()
        if relative == "std":
            sigma = scale * (float(p.double().std()) if p.numel() > 1 else abs(float(p)))
        else:
            sigma = scale * w.abs()
        n = torch.randn(idx.numel(), generator=gen, dtype=torch.float64)  # CPU: same draws
        new[site] = (idx, (w + sigma * n.to(w.device)).to(p.dtype))  # on every device
    return weight_edit(model, "noise", {"scale": scale, "relative": relative, "seed": seed,
                                        "importance": importance_digest(importance)}, units, new)
