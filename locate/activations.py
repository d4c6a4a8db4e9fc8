"""Activation statistics on forget vs retain, scaled by output-weight norm - the important-neuron
selection of MANU and TinyMem's activation-based localisation.

For every neuron (``blocks.L.mlp.post``) or head (``blocks.L.attn.z``, the head's output vector
``z`` before ``W_O``) the mean magnitude of its activation is taken over the chosen token
positions of the forget facts and of the retain facts. A unit is important when it is much more
active on forget than on retain *and* can write something: the statistic is multiplied by the
unit's output-weight norm (the row of ``W_out``, or the head's slice of ``W_O``), so a unit that
fires but writes nothing scores nothing.

``stat="ratio"``  mean|a|_forget / (mean|a|_retain + eps)
``stat="z"``      (mean|a|_forget - mean|a|_retain) / pooled standard deviation
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from excise.checks import check_choice, check_facts, check_finite
from excise.handle import Batch, ModelHandle
from excise.importance import Importance
from excise.request import FactSet, ForgetRequest
from locate._common import UNIT_SITES, base_meta, check_inputs, resolve_sites

STATS = ("ratio", "z")
POSITIONS = ("all", "predict", "subject")


def activations(model: ModelHandle, request: ForgetRequest,
                sites: str | Sequence[str] | None = None, *, stat: str = "ratio",
                positions: str = "all", eps: float = 1e-2, batch_size: int = 64,
                progress: bool = False) -> Importance:
    """Forget-vs-retain activation magnitude per neuron / head, times its output-weight norm.

    ``positions``: ``"all"`` (every token after BOS), ``"predict"`` (positions whose next token
    is part of the target) or ``"subject"`` (the subject's tokens; all tokens where a fact has
    no subject). ``eps`` is relative to the site's mean retain magnitude.
    ``Importance.parts`` keeps the raw mean magnitudes (``forget``, ``retain``)."""
    check_choice("activations", "stat", stat, STATS)
    check_inputs("activations", model, batch_size=batch_size)
    check_choice("activations", "positions", positions, POSITIONS)
    names = resolve_sites(model, sites, list(UNIT_SITES), "activations",
                          suffixes=("mlp.post", "attn.z"),
                          why="it needs units with output weights (neurons or heads)")
    check_facts(request.forget, "activations")
    check_facts(request.retain, "activations")
    f = _magnitudes(model, request.forget, names, positions, batch_size, progress)
    r = _magnitudes(model, request.keep, names, positions, batch_size, progress)
    scores, parts_f, parts_r = {}, {}, {}
    for s in names:
        (mf, vf), (mr, vr) = f[s], r[s]
        if stat == "ratio":
            floor = eps * float(mr.mean()) + 1e-12
            raw = mf / (mr + floor)
        else:
            raw = (mf - mr) / torch.sqrt((vf + vr) / 2 + 1e-12)
        scores[s] = raw * _out_norm(model, s)
        parts_f[s], parts_r[s] = mf, mr
    return Importance("activations", scores,
                      base_meta(model, request, stat=stat, positions=positions, eps=eps),
                      {"forget": parts_f, "retain": parts_r})


def _out_norm(model: ModelHandle, site: str) -> Tensor:
    """Norm of what each unit writes: the ``W_out`` row of a neuron, the ``W_O`` slice of a head."""
    return model.unit_out_weights(site).float().flatten(1).norm(dim=1)


def position_mask(b: Batch, positions: str) -> Tensor:
    """Which token positions to read, ``[n, T]`` bool."""
    real = torch.arange(b.tokens.shape[1], device=b.lengths.device)[None, :] < b.lengths[:, None]
    real[:, 0] = False  # BOS
    if positions == "all":
        return real
    if positions == "predict":
        m = torch.zeros_like(real)
        m[:, :-1] = b.target_mask[:, 1:]
        return m
    has = b.subject_mask.any(1, keepdim=True)
    return torch.where(has, b.subject_mask, real)


def _magnitudes(model: ModelHandle, facts: FactSet, sites: list[str], positions: str,
                batch_size: int, progress: bool) -> dict[str, tuple[Tensor, Tensor]]:
    """Per unit: mean and variance of the activation magnitude over the chosen positions."""
    from tqdm.auto import tqdm

    s1 = {s: torch.zeros(model.info(s).unit_shape, dtype=torch.float64) for s in sites}
    s2 = {s: torch.zeros(model.info(s).unit_shape, dtype=torch.float64) for s in sites}
    n = 0
    batch = model.encode(list(facts))
    chunks = list(batch.chunks(batch_size))
    for b in tqdm(chunks, desc=f"activations ({facts.name})", disable=not progress,
                  leave=False):
        m = position_mask(b, positions)
        with torch.inference_mode():
            cache = model.run_with_cache(b.tokens, sites)
            for s in sites:
                a = cache[s].float()
                mag = a.norm(dim=-1) if a.dim() == 4 else a.abs()  # heads: |z| per head
                check_finite(mag, "activations", s, "activations")
                sel = mag[m.to(mag.device)].double().cpu()  # [positions, units]
                s1[s] += sel.sum(0)
                s2[s] += (sel ** 2).sum(0)
        n += int(m.sum())
    if n == 0:
        raise ValueError(f"activations: no token positions of kind {positions!r} in the "
                         f"{facts.name!r} set")
    out = {}
    for s in sites:
        mean = s1[s] / n
        var = (s2[s] / n - mean ** 2).clamp(min=0)
        out[s] = (mean.float(), var.float())
    return out
