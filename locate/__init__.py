"""locate: where does the model keep what the request asks to forget?

Every method takes a model handle and a ForgetRequest (plus the sites to score, globs allowed)
and returns an :class:`excise.importance.Importance`:

=================  =========================================================================
``fisher``         diagonal Fisher, forget vs retain (SSD)
``grad_ratio``     |grad forget| / (|grad retain| + eps) per parameter or unit (GRIN)
``activations``    forget-vs-retain activation magnitude x output-weight norm (MANU, TinyMem)
``causal_trace``   ROME causal tracing (exact, batched) + per-unit attribution patching
``attribution``    attribution patching alone (two forwards, one backward)
``sae``            sparse-autoencoder latents firing on forget, not retain (sae-lens)
``circuit``        forget / retain circuits resolved by weighted MaxSAT (CLUE)
``fact_lookup``    effect of patching each neuron at the subject's tokens (Guo et al. 2024)
``subnetwork``     a learned mask that removes the forget facts, keeps retain (Bayazit et al.)
``saliency``       forget loss's rise if a weight were removed, F_forget theta^2 / 2 (OBD, SalUn)
=================  =========================================================================

Scripts name a parameter-level selection as ``METHOD:FRACTION[:SITES]`` (:func:`parse_select`,
e.g. ``saliency:0.1:blocks.*.mlp.*+unembed.*``: the top 10% of those sites' elements by
``saliency``).

Notebook helpers: :func:`trace` / :class:`Trace` (causal-trace heatmaps), :func:`compare`
(agreement between methods), :func:`circuit_selection` (labelled Selection from ``circuit``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

from excise.importance import Importance
from locate._grads import StatsCache
from locate.activations import activations
from locate.causal_trace import Trace, attribution, causal_trace, trace, traces
from locate.circuit import circuit, circuit_selection
from locate.fact_lookup import fact_lookup
from locate.fisher import fisher
from locate.grad_ratio import grad_ratio
from locate.sae import sae
from locate.saliency import saliency
from locate.subnetwork import subnetwork

METHODS = {"fisher": fisher, "grad_ratio": grad_ratio, "activations": activations,
           "causal_trace": causal_trace, "attribution": attribution, "sae": sae,
           "circuit": circuit, "fact_lookup": fact_lookup, "subnetwork": subnetwork,
           "saliency": saliency}


def parse_select(spec: str, model=None) -> tuple[str, float, list[str] | None] | None:
    """``"all"`` -> None; ``"METHOD:FRACTION[:SITES]"`` -> ``(method, fraction, sites)``: the top
    ``fraction`` of a locate method's scores (``Importance.top(fraction, sites)``), ``sites``
    parameter site patterns joined by ``+`` (None: every site). With ``model``, the sites are
    checked against its parameters. Raises ValueError naming the bad part and the choices."""
    if spec == "all":
        return None
    method, _, rest = spec.partition(":")
    frac, _, where = rest.partition(":")
    try:
        fraction = float(frac)
    except ValueError:
        fraction = -1.0
    if method not in METHODS or not 0 < fraction < 1 or (":" in rest and not where):
        raise ValueError(f"select {spec!r}: give 'all' or METHOD:FRACTION[:SITES], METHOD one of "
                         f"{sorted(METHODS)}, FRACTION in (0, 1), SITES parameter site patterns "
                         f"joined by '+' (leave ':SITES' out for every site)")
    sites = where.split("+") if where else None
    if sites and model is not None:
        from excise.sites import expand
        try:
            expand(sites, list(model.named_parameters()))
        except ValueError as e:
            raise ValueError(f"select {spec!r}: {e}") from None
    return method, fraction, sites


def compare(importances: Sequence[Importance] | Mapping[str, Importance],
            k: int | float = 0.01) -> dict[str, dict[str, dict[str, float]]]:
    """Pairwise agreement of several Importances over their common sites.

    Returns ``{"spearman": M, "topk_jaccard": M}`` where ``M[a][b]`` is the value for methods
    ``a`` and ``b`` (names: the mapping's keys, or each Importance's method). Parameter-level
    importances are aggregated to neurons / heads first so that they meet activation-level
    ones. Pairs without a common site get NaN. Draw one with ``locate.plots.agreement_matrix``."""
    items = dict(importances) if isinstance(importances, Mapping) else \
        {imp.method: imp for imp in importances}
    if len(items) < 2:
        raise ValueError(f"compare needs at least two Importances, got {len(items)}")
    if isinstance(importances, Sequence) and len(items) != len(importances):
        raise ValueError("compare: two Importances share a method name; pass a dict "
                         "{name: importance}")
    views = {n: _unit_view(imp) for n, imp in items.items()}
    out = {"spearman": {}, "topk_jaccard": {}}
    for a in views:
        for key in out:
            out[key][a] = {}
        for b in views:
            if a == b:
                r = {"spearman": 1.0, "topk_jaccard": 1.0}
            else:
                try:
                    r = views[a].compare(views[b], k)
                except ValueError:
                    r = {"spearman": float("nan"), "topk_jaccard": float("nan")}
            for key in out:
                out[key][a][b] = r[key]
    return out


def _unit_view(imp: Importance) -> Importance:
    from excise.sites import unit_of_param

    if any(unit_of_param(s) for s in imp.scores):
        return imp.by_unit()
    return imp


def run_plots(imp: Importance, model, request, folder) -> list[str]:
    """Method-specific figures for a pipeline run folder; returns the written paths.
    Methods that trace (``causal_trace``, ``attribution``) write ``causal_trace.png``."""
    from excise import plots

    folder = Path(folder)
    out = []
    if "trace" in imp.meta:
        t = Trace.from_dict(imp.meta["trace"])
        axes = t.plot()
        out.append(plots.save(axes[0], folder / "causal_trace.png"))
    return out


__all__ = ["METHODS", "StatsCache", "Trace", "activations", "attribution", "causal_trace",
           "circuit", "circuit_selection", "compare", "fact_lookup", "fisher", "grad_ratio",
           "run_plots", "sae", "saliency", "subnetwork", "trace", "traces"]
