"""Fact-lookup localization ("Mechanistic Unlearning: Robust Knowledge Unlearning and Editing via
Mechanistic Localization", Guo et al. 2024): MLP neurons scored by their causal effect at the
*subject's* tokens, where an attribute is looked up, rather than at the final position, where it
is read out. The paper reports that edits of output-tracing units are undone by relearning and
edits of fact-lookup units resist it.

The effect of unit ``u`` (a neuron of ``blocks.L.mlp.post``, or a head of ``blocks.L.attn.z``,
its output vector before ``W_O``) on fact ``x`` is the change of the fact's target
log-probability ``m(x)`` (mean over its target tokens) when the unit's activation at the chosen
positions ``P(x)`` only is replaced by a baseline ``b_u``, every other position and unit left
as they are::

    delta_u(x) = m(x | a_u[t] := b_u for t in P(x)) - m(x)

``mode="exact"`` runs those patches for real (the facts repeated along the batch dimension, each
copy patching another unit); ``mode="attribution"`` takes the first-order estimate (attribution
patching) from one forward and one backward pass per batch of facts::

    delta_u(x) ~ sum over t in P(x) of  dm(x)/da_u[t] . (b_u - a_u[t])

``positions``: ``"subject"`` (``Batch.subject_mask``, the lookup - the default), ``"last"``
(the final prompt position, where the answer is read out: the output-tracing variant) or
``"all"`` (every position after BOS that predicts a later token). ``baseline``:
``"retain_mean"`` (the unit's mean activation over the retain facts at the same kind of
positions) or ``"zero"``.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from excise.checks import check_choice, check_facts, check_finite, check_number
from excise.handle import Batch, ModelHandle
from excise.importance import Importance
from excise.request import Fact, FactSet, ForgetRequest
from locate._common import base_meta, check_inputs, neuron_or_head_sites

MODES = ("attribution", "exact")
POSITIONS = ("subject", "last", "all")
BASELINES = ("retain_mean", "zero")
CONTRASTS = ("ratio", "difference", "none")


def fact_lookup(model: ModelHandle, request: ForgetRequest,
                sites: str | Sequence[str] | None = None, *, mode: str = "attribution",
                positions: str = "subject", baseline: str = "retain_mean",
                contrast: str = "ratio", eps: float = 1e-2, batch_size: int = 32,
                max_rows: int = 1024, progress: bool = False) -> Importance:
    """Per-unit causal effect of patching the unit at the subject's tokens (see the module).

    ``sites``: ``blocks.L.mlp.post`` (default: every layer's MLP neurons, the units the paper
    localizes) and/or ``blocks.L.attn.z`` (heads only when asked: one score per head, its whole
    output vector patched). At the subject, the last block's units reach no target and score
    zero. For every unit, ``F`` is the mean of ``|delta_u(x)|`` over the forget facts and ``R``
    the same over the retain facts (``request.retain``; with ``positions="subject"``, the retain
    facts whose subject is found in the prompt - retain text has none). The score contrasts them
    as the other locate methods do:

    ``contrast="ratio"``       ``F / (R + eps * mean R)``  (``mean R`` over every scored unit;
                               ``mean F`` where every ``R`` is zero)
    ``contrast="difference"``  ``F - R``
    ``contrast="none"``        ``F``

    so a unit that matters for every fact is not picked. ``parts``: ``forget`` (F), ``retain``
    (R) and ``effect`` (the signed mean of ``delta_u`` over the forget facts: negative where the
    patch lowers the forget answers). ``mode="exact"`` runs up to ``max_rows`` patched copies
    per forward, (forget + retain facts) x units rows in all: a reference for small models and
    subsets; ``"attribution"`` costs about one training step per batch. A forget fact whose
    subject is not found in its prompt is refused under ``positions="subject"`` (give every fact
    a ``subject``, or use ``positions="last"``)."""
    check_choice("fact_lookup", "mode", mode, MODES)
    check_choice("fact_lookup", "positions", positions, POSITIONS)
    check_choice("fact_lookup", "baseline", baseline, BASELINES)
    check_choice("fact_lookup", "contrast", contrast, CONTRASTS)
    check_number("fact_lookup", "eps", eps, low=0)
    check_number("fact_lookup", "max_rows", max_rows, low=1, integer=True)
    check_inputs("fact_lookup", model, batch_size=batch_size)
    names = neuron_or_head_sites(model, sites, "fact_lookup", why="it patches neurons or heads")
    check_facts(request.forget, "fact_lookup")
    check_facts(request.retain, "fact_lookup")
    forget = _encode(model, request.forget, positions, refuse=True)
    retain = _encode(model, request.retain, positions, refuse=False)
    base = _baseline(model, retain, names, positions, baseline, batch_size)
    run = _exact if mode == "exact" else _attribution
    d_f = run(model, forget, names, positions, base, batch_size, max_rows, progress, "forget")
    d_r = run(model, retain, names, positions, base, batch_size, max_rows, progress, "retain")
    f = {s: d_f[s].abs().mean(0) for s in names}
    r = {s: d_r[s].abs().mean(0) for s in names}
    if contrast == "ratio":
        scale = float(torch.cat([v.reshape(-1) for v in r.values()]).mean())
        if scale == 0:  # no unit moves a retain fact: the floor comes from the forget side
            scale = float(torch.cat([v.reshape(-1) for v in f.values()]).mean())
        scores = {s: f[s] / (r[s] + eps * scale + 1e-30) for s in names}
    elif contrast == "difference":
        scores = {s: f[s] - r[s] for s in names}
    else:
        scores = dict(f)
    meta = base_meta(model, request, mode=mode, positions=positions, baseline=baseline,
                     contrast=contrast, eps=eps, batch_size=batch_size,
                     n_forget_scored=len(forget), n_retain_scored=len(retain),
                     unit_axes=model.unit_axes(names))
    return Importance("fact_lookup", scores, meta,
                      {"forget": f, "retain": r, "effect": {s: d_f[s].mean(0) for s in names}})


# ------------------------------------------------------------------------------------------------
# facts and positions
# ------------------------------------------------------------------------------------------------
def position_mask(b: Batch, positions: str) -> Tensor:
    """``[n, T]`` bool: the token positions a unit is patched at. ``"subject"``: the subject's
    tokens; ``"last"``: the last prompt token (it predicts the first target token); ``"all"``:
    every position after BOS that predicts a later token."""
    if positions == "subject":
        return b.subject_mask.clone()
    T = b.tokens.shape[1]
    if positions == "last":
        m = torch.zeros_like(b.target_mask)
        m[torch.arange(len(b), device=m.device), b.target_mask.int().argmax(1) - 1] = True
        return m
    t = torch.arange(T, device=b.lengths.device)[None, :]
    return (t >= 1) & (t < b.lengths[:, None] - 1)


def _encode(model: ModelHandle, facts: FactSet, positions: str, refuse: bool) -> Batch:
    """The facts as one Batch; under ``positions="subject"`` without the facts whose subject is
    not found in the prompt - refused for the forget set (``refuse``), dropped from the retain
    set (which must keep at least one)."""
    b = model.encode(list(facts))
    if positions != "subject":
        return b
    has = b.subject_mask.any(1)
    if bool(has.all()):
        return b
    missing = [f for f, h in zip(facts, has.tolist()) if not h]
    if refuse or not bool(has.any()):
        f: Fact = missing[0]
        which = "" if f.subject else " (it has no subject)"
        raise ValueError(
            f"fact_lookup(positions='subject'): {len(missing)} of {len(facts)} {facts.name} "
            f"facts have no subject tokens, e.g. {f.prompt!r} -> {f.target!r} with subject "
            f"{f.subject!r}{which}: give every fact the words of its prompt that name its "
            f"subject (Fact.subject, the JSONL 'subject' field), or use positions='last' or "
            f"'all'")
    return b[torch.nonzero(has).flatten()]


def _score(model: ModelHandle, b: Batch, hooks) -> Tensor:
    """``[n]``: each fact's mean log-probability of its target tokens."""
    lp = model.token_logprobs(b, hooks)
    m = b.target_mask[:, 1:].to(lp.device)
    return lp.sum(1) / m.sum(1).clamp(min=1)


@torch.no_grad()
def _baseline(model: ModelHandle, retain: Batch, sites: list[str], positions: str,
              baseline: str, batch_size: int) -> dict[str, Tensor]:
    """Per site the value a patched unit takes: ``[d_mlp]`` for neurons, ``[heads, d_head]`` for
    heads - zero, or the mean over the retain facts' positions of the chosen kind."""
    # on the device of the unit's own layer (a sharded model's layers differ), float64 sums
    out_w = {s: model.unit_out_weights(s) for s in sites}
    if baseline == "zero":
        return {s: torch.zeros(w.shape[:-1], device=w.device) for s, w in out_w.items()}
    total = {s: torch.zeros(w.shape[:-1], dtype=torch.float64, device=w.device)
             for s, w in out_w.items()}
    count = 0
    for b in retain.chunks(batch_size):
        m = position_mask(b, positions)
        acts = model.run_with_cache(b.tokens, sites)
        for s in sites:
            a = acts[s]
            total[s] += a[m.to(a.device)].double().sum(0).to(total[s].device)
        count += int(m.sum())
    return {s: (total[s] / max(1, count)).float() for s in sites}


# ------------------------------------------------------------------------------------------------
# the two estimators: {site: [facts, units]} signed effects
# ------------------------------------------------------------------------------------------------
def _attribution(model: ModelHandle, batch: Batch, sites: list[str], positions: str,
                 base: dict[str, Tensor], batch_size: int, max_rows: int, progress: bool,
                 name: str) -> dict[str, Tensor]:
    """One forward and one backward per batch of facts: ``grad . (baseline - activation)``
    summed over each fact's patched positions (and a head's ``d_head``)."""
    from tqdm.auto import tqdm

    out: dict[str, list[Tensor]] = {s: [] for s in sites}
    chunks = list(batch.chunks(batch_size))
    for b in tqdm(chunks, desc=f"fact_lookup attribution ({name})", disable=not progress,
                  leave=False):
        acts: dict[str, Tensor] = {}

        def keep(x, site):
            if not x.requires_grad:  # frozen weights upstream: a leaf is enough here
                x = x.detach().requires_grad_(True)
            acts[site] = x
            return x

        with torch.enable_grad():
            score = _score(model, b, {s: keep for s in sites})
            grads = torch.autograd.grad(score.sum(), [acts[s] for s in sites],
                                        allow_unused=True)
        m = position_mask(b, positions)
        for s, g in zip(sites, grads):
            a = acts[s].detach()
            if g is None:  # nothing downstream of this site reads the targets
                g = torch.zeros_like(a)
            # the patched value as the model holds it, the difference taken in float32
            e = g.float() * (base[s].to(a.device, a.dtype).float() - a.float())  # [n, T, u(, dh)]
            if e.dim() == 4:
                e = e.sum(-1)
            e = (e * m.to(e.device)[:, :, None]).sum(1)  # over the patched positions
            check_finite(e, "effect estimates", s, "fact_lookup")
            out[s].append(e.cpu())
    return {s: torch.cat(v) for s, v in out.items()}


def _patch(units: Tensor, pos: Tensor, value: Tensor, skip: int = 0):
    """A hook for ``skip + len(units) * n`` rows, the first ``skip`` left as they are, then
    unit-major (row ``skip + j * n + i`` = fact ``i`` with unit ``units[j]`` patched): sets that
    unit to ``value[unit]`` at the positions ``pos[i]``."""
    n = pos.shape[0]

    def hook(x, site):
        rows = torch.arange(skip, x.shape[0], device=x.device)
        u = units.to(x.device).repeat_interleave(n)
        p = pos.to(x.device).repeat(len(units), 1)  # [rows, T]
        cur = x[rows, :, u]  # [rows, T] (neurons) or [rows, T, d_head] (heads)
        new = value.to(x.device, x.dtype)[u][:, None]  # [rows, 1(, d_head)]
        if cur.dim() == 3:
            p = p[..., None]
        x = x.clone()
        x[rows, :, u] = torch.where(p, new, cur)
        return x
    return hook


@torch.no_grad()
def _exact(model: ModelHandle, batch: Batch, sites: list[str], positions: str,
           base: dict[str, Tensor], batch_size: int, max_rows: int, progress: bool,
           name: str) -> dict[str, Tensor]:
    """Real patches: each batch of facts is repeated once per unit of a chunk of units, every
    copy patching its own unit at its fact's positions, plus one unpatched copy the effects are
    taken against; ``max_rows`` rows per forward."""
    from tqdm.auto import tqdm

    out: dict[str, list[Tensor]] = {s: [] for s in sites}
    chunks = list(batch.chunks(batch_size))
    for b in tqdm(chunks, desc=f"fact_lookup exact ({name})", disable=not progress,
                  leave=False):
        n = len(b)
        pos = position_mask(b, positions)
        per = max(1, max_rows // n - 1)  # units per forward, besides the clean copy
        for s in sites:
            n_units = base[s].shape[0]
            cols = []
            for start in range(0, n_units, per):
                units = torch.arange(start, min(n_units, start + per))
                k = len(units) + 1
                rep = Batch(b.tokens.repeat(k, 1), b.target_mask.repeat(k, 1),
                            b.subject_mask.repeat(k, 1), b.lengths.repeat(k))
                # the first copy unpatched, in the same forward: a unit without effect reads an
                # exact zero (the numerics of a matmul can change with the number of rows)
                m = _score(model, rep, {s: _patch(units, pos, base[s], skip=n)}).view(k, n)
                cols.append((m[1:] - m[:1]).T)  # [n, units]
            e = torch.cat(cols, 1).float()
            check_finite(e, "effects", s, "fact_lookup")
            out[s].append(e.cpu())
    return {s: torch.cat(v) for s, v in out.items()}
