"""Small helpers every locate method shares: the checks each runs first (:func:`check_inputs`:
finite weights, a positive batch size), site resolution with clear errors, metadata. (The
other input checks live in :mod:`excise.checks`.)"""

from __future__ import annotations

from typing import Sequence

from torch import Tensor

from excise.checks import check_number
from excise.handle import ModelHandle
from excise.request import ForgetRequest

# the neuron / head sites (one unit = one neuron or one head)
UNIT_SITES = ("blocks.*.mlp.post", "blocks.*.attn.z")


def check_inputs(method: str, model: ModelHandle, *, batch_size=None) -> None:
    """What every locate method checks before it runs: the model's weights are finite (a NaN
    weight would give an Importance of NaN or zeros that looks computed) and ``batch_size``
    is a positive integer."""
    if batch_size is not None:
        check_number(method, "batch_size", batch_size, low=1, integer=True)
    model.check_finite(method)


def resolve_sites(model: ModelHandle, sites: str | Sequence[str] | None, default,
                  method: str, *, kinds: Sequence[str] = ("activation",),
                  suffixes: Sequence[str] | None = None, why: str = "") -> list[str]:
    """Expand ``sites`` (globs allowed; ``None`` -> ``default``) and check that ``method`` can
    score every one of them. Unknown names raise the handle's "did you mean" error; a site of
    the wrong kind raises ``ValueError`` naming the site and what the method accepts."""
    pattern = default if sites is None else sites
    if isinstance(pattern, (list, tuple)) and not pattern:
        raise ValueError(f"{method}: the list of sites is empty")
    names = model.sites(pattern)
    if not names:
        raise ValueError(f"{method}: no site matches {pattern!r}")
    for s in names:
        info = model.info(s)
        ok = info.kind in kinds and (suffixes is None or s == "embed" and "embed" in suffixes
                                     or any(s.endswith("." + x) for x in suffixes))
        if not ok:
            accepted = ", ".join(f"blocks.L.{x}" for x in suffixes) if suffixes else \
                " or ".join(f"{k} sites" for k in kinds)
            raise ValueError(f"{method} cannot score site {s!r} (a {info.kind} site); "
                             f"it scores {accepted}" + (f" - {why}" if why else ""))
    return names


def neuron_or_head_sites(model: ModelHandle, sites: str | Sequence[str] | None, method: str,
                         why: str) -> list[str]:
    """:func:`resolve_sites` for a method that scores MLP neurons (``blocks.L.mlp.post``, the
    default: every layer's) and / or heads (``blocks.L.attn.z``)."""
    return resolve_sites(model, sites, "blocks.*.mlp.post", method,
                         suffixes=("mlp.post", "attn.z"), why=why)


def base_meta(model: ModelHandle, request: ForgetRequest, **config) -> dict:
    return {"model": model.fingerprint(), "request": request.digest(),
            "n_forget": len(request.forget), "n_retain": len(request.retain)} | config


def unit_names(scores: dict[str, Tensor]) -> dict[str, float]:
    """``{"blocks.1.mlp.post[5]": score, ...}`` for 1-D per-site score tensors."""
    out = {}
    for site, s in scores.items():
        for i, v in enumerate(s.reshape(-1).tolist()):
            out[f"{site}[{i}]"] = v
    return out
