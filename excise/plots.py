"""Plots with one look. Every function returns its Axes (or Figure) and never calls ``show()``;
matplotlib is imported only when a plot is drawn."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Sequence

import torch

if TYPE_CHECKING:
    from excise.importance import Importance

CMAP = "viridis"
DIVERGING = "RdBu_r"


def _plt():
    import matplotlib

    if matplotlib.get_backend().lower() not in ("agg",) and not _in_notebook():
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _in_notebook() -> bool:
    try:
        from IPython import get_ipython

        return get_ipython() is not None
    except ImportError:
        return False


def _axes(ax, figsize=(8, 4)):
    if ax is not None:
        return ax
    plt = _plt()
    fig, ax = plt.subplots(figsize=figsize, constrained_layout=True)
    return ax


def importance_heatmap(imp: "Importance", ax=None, component: str | None = None, log: bool = True,
                       max_units: int = 1024):
    """Layer x unit map. Parameter scores are first aggregated into neurons/heads. Shows the
    component (``mlp.post``, ``attn.z``, ``resid_post`` ...) with the most sites, or the one
    named by ``component``."""
    _plt()  # matplotlib, imported only when a plot is asked for
    view = imp.by_unit() if any(_is_param(s) for s in imp.scores) else imp
    groups: dict[str, dict[int, torch.Tensor]] = {}
    for site, s in view.scores.items():
        m = re.match(r"blocks\.(\d+)\.(.+)", site)
        if m:
            groups.setdefault(m.group(2), {})[int(m.group(1))] = s.float().reshape(-1)
    if not groups:
        raise ValueError(f"Importance({imp.method!r}) has no per-layer sites to draw")
    if component is None:
        component = max(groups, key=lambda c: (len(groups[c]), c == "mlp.post"))
    if component not in groups:
        raise ValueError(f"no sites for component {component!r}; have {sorted(groups)}")
    layers = sorted(groups[component])
    width = max(v.numel() for v in groups[component].values())
    mat = torch.full((len(layers), width), float("nan"))
    for i, L in enumerate(layers):
        v = groups[component][L]
        mat[i, :v.numel()] = v
    if width > max_units:  # pool columns so very wide sites stay legible
        k = -(-width // max_units)
        pad = k * max_units - width
        mat = torch.nn.functional.pad(mat, (0, pad), value=float("nan"))
        mat = mat.reshape(len(layers), max_units, k).nan_to_num(0).amax(-1)
    if log:
        mat = torch.log10(mat.clamp(min=1e-12))
    ax = _axes(ax, (9, 1.2 + 0.5 * len(layers)))
    im = ax.imshow(mat.numpy(), aspect="auto", cmap=CMAP, interpolation="nearest")
    ax.set_yticks(range(len(layers)), [f"L{L}" for L in layers])
    ax.set_xlabel(f"unit ({component})")
    ax.set_ylabel("layer")
    ax.set_title(f"{imp.method} importance" + (" (log10)" if log else ""))
    ax.figure.colorbar(im, ax=ax, shrink=0.8)
    return ax


def top_units_bar(imp: "Importance", ax=None, k: int = 20):
    """Horizontal bars for the ``k`` highest-scoring units."""
    view = imp.by_unit() if any(_is_param(s) for s in imp.scores) else imp
    sel = view.top(k)
    vals = [view.score_of(u) for u in sel]
    ax = _axes(ax, (7, 0.3 * len(vals) + 1))
    ax.barh(range(len(vals))[::-1], vals, color="#3b6ea8")
    ax.set_yticks(range(len(vals))[::-1], [str(u) for u in sel], fontsize=7)
    ax.set_xlabel("score")
    ax.set_title(f"{imp.method}: top {len(vals)} units")
    return ax


# the recall metrics of recall.png, in the order they are drawn
RECALL_KEYS = ("forget_recall", "paraphrase_recall", "retain_recall", "neighbor_recall",
               "same_template_recall", "holdout_recall", "shared_recall")


def recall_keys(metrics: dict[str, dict[str, float]]) -> list[str]:
    """The recall metrics (:data:`RECALL_KEYS`) some model measured with a finite value: a
    split the request does not have (an empty holdout or shared set) is left out."""
    import math

    return [k for k in RECALL_KEYS
            if any(isinstance(m.get(k), (int, float)) and math.isfinite(m[k])
                   for m in metrics.values())]


def metrics_bars(metrics: dict[str, dict[str, float]], keys: Sequence[str], ax=None):
    """Grouped bars of recall-type metrics for several models (before / after / oracle)."""
    import numpy as np

    ax = _axes(ax, (8, 3.5))
    labels = list(metrics)
    x = np.arange(len(keys))
    w = 0.8 / max(1, len(labels))
    for i, lab in enumerate(labels):
        ax.bar(x + i * w, [metrics[lab].get(k, float("nan")) for k in keys], w, label=lab)
    ax.set_xticks(x + w * (len(labels) - 1) / 2, [k.replace("_", " ") for k in keys],
                  rotation=20, fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=8)
    ax.set_title("recall by split")
    return ax


def save(ax_or_fig, path) -> str:
    fig = getattr(ax_or_fig, "figure", ax_or_fig)
    from excise.io import atomic_write_bytes
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    atomic_write_bytes(path, buf.getvalue())
    _plt().close(fig)
    return str(path)


def _is_param(site: str) -> bool:
    last = site.split(".")[-1]
    return last.startswith(("W_", "b_")) or last in ("w", "b")
