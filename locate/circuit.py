"""Conflict-guided circuit localisation (CLUE, "Conflict-guided Localization for LLM Unlearning
Framework"): attribute a forget metric and a retain metric to nodes (neurons and heads), threshold
each into a circuit, and let weighted MaxSAT (:mod:`locate.sat`, RC2) decide which units to edit:
forget-important, not retain-critical.

Node attribution is attribution patching against zero ablation: for each example the effect of a
multiplicative gate on the unit, ``sum over positions of activation . d loss / d activation``,
averaged in magnitude over the set (the forget metric is the forget-set loss, the retain metric
the retain-set loss; retain statistics are shared with ``fisher`` / ``grad_ratio`` through
``cache``).

The returned ``Importance`` scores each unit by its forget attribution where the resolution edits
it and 0 elsewhere; ``parts`` keeps both attributions (``forget``, ``retain``); ``meta`` keeps the
labels (``forget_only`` / ``retain_only`` / ``shared``; unlabelled units are ``none``), the edit
set and solver statistics. :func:`circuit_selection` turns it into a labelled ``Selection``.
If the hard constraints conflict, :class:`locate.sat.Conflict` is raised; its ``core`` names the
clashing constraints by unit (``must_edit:blocks.1.mlp.post[5]``, ``protect:...``).

Memory: the statistics are per unit (neurons, heads), float32 - negligible next to the weights,
whatever their dtype; no parameter gradient is computed. The peak is one batch's forward
activations and their gradients at the scored sites (batch x tokens x width), plus the MaxSAT
instance (a few clauses per unit); ``bench/memory.py`` measures it.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch

from excise.handle import ModelHandle
from excise.importance import Importance
from excise.request import ForgetRequest
from excise.sites import Selection, Unit
from locate._common import UNIT_SITES, base_meta, check_inputs, resolve_sites, unit_names
from locate._grads import STATS, StatsCache, gradient_stats
from locate.sat import Conflict, resolve


def circuit(model: ModelHandle, request: ForgetRequest, sites: str | Sequence[str] | None = None,
            *, top_fraction: float = 0.1, forget_threshold: float | None = None,
            retain_threshold: float | None = None, protect_retain: bool = True,
            protect_threshold: float | None = None, must_edit: Iterable[str] = (),
            must_keep: Iterable[str] = (), min_forget_coverage: int = 0,
            max_edit: int | None = None, batch_size: int = 32, cache: StatsCache | None = None,
            progress: bool = False) -> Importance:
    """Forget and retain circuits over neurons / heads, resolved by weighted MaxSAT.

    ``sites``: activation sites (default every ``mlp.post`` and ``attn.z``). Circuit thresholds,
    ``protect_*``, ``must_edit`` / ``must_keep`` (unit names such as ``"blocks.1.mlp.post[5]"``),
    ``min_forget_coverage`` and ``max_edit`` are passed to :func:`locate.sat.resolve`."""
    check_inputs("circuit", model, batch_size=batch_size)
    names = resolve_sites(model, sites, list(UNIT_SITES), "circuit",
                          why="node attribution needs activation sites (neurons, heads, "
                              "residual dimensions)")
    # only |g| is read; a shared retain cache also gets g^2 from the same pass
    f = gradient_stats(model, request.forget, names, estimator="example", stats=("abs",),
                       batch_size=batch_size, progress=progress, desc="circuit (forget)")
    r = gradient_stats(model, request.keep, names, estimator="example",
                       stats=STATS if cache is not None else ("abs",),
                       batch_size=batch_size, cache=cache, progress=progress,
                       desc="circuit (retain)")
    fa = {s: f.abs[s].reshape(-1) for s in names}
    ra = {s: r.abs[s].reshape(-1) for s in names}
    try:
        res = resolve(unit_names(fa), unit_names(ra), top_fraction=top_fraction,
                      forget_threshold=forget_threshold, retain_threshold=retain_threshold,
                      protect_retain=protect_retain, protect_threshold=protect_threshold,
                      must_edit=must_edit, must_keep=must_keep,
                      min_forget_coverage=min_forget_coverage, max_edit=max_edit)
    except Conflict as e:
        raise Conflict(e.core, f"circuit: the constraints cannot all hold - "
                               f"unsatisfiable core: {', '.join(e.core)}") from None
    edited = set(res.edit)
    scores = {}
    for s in names:
        mask = torch.tensor([f"{s}[{i}]" in edited for i in range(fa[s].numel())],
                            device=fa[s].device)
        scores[s] = torch.where(mask, fa[s], torch.zeros_like(fa[s])).reshape(f.abs[s].shape)
    labels = {u: lab for u, lab in res.labels.items() if lab != "none"}
    counts = {k: sum(1 for v in res.labels.values() if v == k)
              for k in ("forget_only", "retain_only", "shared", "none")}
    meta = base_meta(model, request, top_fraction=top_fraction, protect_retain=protect_retain,
                     edit=list(res.edit), labels=labels, label_counts=counts, cost=res.cost,
                     solve_seconds=round(res.solve_seconds, 4), n_vars=res.n_vars,
                     n_hard=res.n_hard, n_soft=res.n_soft)
    return Importance("circuit", scores, meta,
                      {"forget": {s: f.abs[s] for s in names}, "retain": {s: r.abs[s]
                                                                          for s in names}})


def circuit_selection(imp: Importance, which: str = "labels") -> Selection:
    """A labelled ``Selection`` from a ``circuit`` Importance: ``which="labels"`` every unit of
    either circuit with its label (``forget_only`` / ``retain_only`` / ``shared``);
    ``which="edit"`` the units the resolution edits, labelled with their circuit label, best
    first."""
    if "labels" not in imp.meta or "edit" not in imp.meta:
        raise ValueError(f"Importance({imp.method!r}) holds no circuit resolution; "
                         f"use locate.circuit")
    labels = imp.meta["labels"]
    if which == "edit":
        names = list(imp.meta["edit"])
    elif which == "labels":
        names = sorted(labels, key=lambda u: (("forget_only", "shared", "retain_only")
                                              .index(labels[u]), u))
    else:
        raise ValueError(f"circuit_selection(which={which!r}): choose 'labels' or 'edit'")
    return Selection(tuple(Unit.parse(u) for u in names),
                     tuple(labels.get(u, "none") for u in names), f"circuit[{which}]")
