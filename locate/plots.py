"""locate's own figures, drawn with excise's look (``excise.plots``): the ROME-style causal-trace
heatmap and the method-agreement matrix. Every function returns Axes and never calls ``show()``;
matplotlib is imported only when a plot is drawn."""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping

from excise.plots import CMAP, _axes, _plt

if TYPE_CHECKING:
    from locate.causal_trace import Trace

_TITLES = {"resid_post": "residual stream", "resid_pre": "residual stream (pre)",
           "resid_mid": "residual stream (mid)", "mlp.out": "MLP output",
           "attn.out": "attention output"}


def causal_trace_heatmap(trace: "Trace", component: str | None = None, ax=None,
                         effect: bool | None = None):
    """Positions (rows) x layers (columns), colour = answer probability after restoring that
    state, as in ROME's figures. Subject positions are starred. ``effect`` shows the indirect
    effect (minus the corrupted probability) instead; default: probabilities for one prompt,
    effects for an aggregate. ``component=None`` draws every component side by side and
    returns the list of Axes."""
    if component is None:
        comps = list(trace.components)
        if ax is None:
            plt = _plt()
            fig, axes = plt.subplots(1, len(comps), figsize=(3.6 * len(comps) + 1,
                                                               1.2 + 0.32 * len(trace.labels)),
                                     constrained_layout=True, squeeze=False)
            ax = list(axes[0])
        elif not isinstance(ax, (list, tuple)) or len(ax) != len(comps):
            raise ValueError(f"component=None draws {len(comps)} panels; pass ax as a list of "
                             f"{len(comps)} Axes or choose a component")
        for a, c in zip(ax, comps):
            causal_trace_heatmap(trace, c, ax=a, effect=effect)
        return ax
    if effect is None:
        effect = trace.n_prompts > 1
    m = trace.effect(component) if effect else trace.component(component)  # [layer, pos]
    ax = _axes(ax, (5, 1.2 + 0.32 * len(trace.labels)))
    im = ax.imshow(m.T.numpy(), aspect="auto", cmap=CMAP, interpolation="nearest")
    labels = [f"{lab}*" if i in trace.subject else lab for i, lab in enumerate(trace.labels)]
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.set_xticks(range(trace.n_layers), [str(L) for L in range(trace.n_layers)], fontsize=8)
    ax.set_xlabel("layer" + (f" (window {trace.window})" if trace.window > 1 and
                             not component.startswith("resid") else ""))
    what = "effect" if effect else "p(answer)"
    who = f"{trace.n_prompts} prompts" if trace.n_prompts > 1 else repr(trace.answer)
    ax.set_title(f"restore {_TITLES.get(component, component)}\n{what}, {who}, "
                 f"{trace.mode}", fontsize=9)
    cb = ax.figure.colorbar(im, ax=ax, shrink=0.8)
    cb.set_label(f"corrupted {trace.low:.2f} / clean {trace.high:.2f}", fontsize=7)
    return ax


def agreement_matrix(matrix: Mapping[str, Mapping[str, float]], ax=None,
                     metric: str = "spearman"):
    """Method x method matrix of one agreement metric (from :func:`locate.compare`)."""
    import numpy as np

    names = list(matrix)
    m = np.array([[matrix[a][b] for b in names] for a in names], dtype=float)
    ax = _axes(ax, (1.5 + 0.8 * len(names), 1.2 + 0.7 * len(names)))
    lo = -1.0 if metric == "spearman" else 0.0
    im = ax.imshow(m, cmap=CMAP, vmin=lo, vmax=1.0)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    for i in range(len(names)):
        for j in range(len(names)):
            if m[i, j] == m[i, j]:
                ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if m[i, j] < (lo + 1) / 2 else "black")
    ax.set_title(f"method agreement ({metric.replace('_', ' ')})", fontsize=9)
    ax.figure.colorbar(im, ax=ax, shrink=0.8)
    return ax
