"""Figures for a verification report: attack curves (model vs oracle), per-depth probe accuracy,
representation drift. Each function returns its Axes and never calls ``show()``."""

from __future__ import annotations

from pathlib import Path

from excise import plots as P

_STYLE = {"oracle": dict(color="#2a9d4b", ls="--"), "before": dict(color="#888888", ls=":"),
          "original": dict(color="#888888", ls=":"),
          # never-known facts attacked alike on the original (models without an oracle)
          "comparator": dict(color="#2a9d4b", ls="-.")}


def _style(label: str, i: int) -> dict:
    return _STYLE.get(label, dict(color=["#c0392b", "#3b6ea8", "#8e44ad"][i % 3], ls="-"))


def _finish(ax, ylim, xlabel: str, ylabel: str, title: str, legend: int):
    ax.set_ylim(*ylim)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=legend)
    return ax


def attack_curve(report, name: str, ax=None):
    """Forget recall along one attack's budget, one line per model (``report.extra["attacks"]
    [name]``, an :class:`excise.report.AttackCurves`)."""
    a = report.extra["attacks"][name]
    ax = P._axes(ax, (5, 3.2))
    x = list(range(len(a.x)))
    numeric = all(isinstance(v, (int, float)) for v in a.x)
    for i, (label, c) in enumerate(a.curves.items()):
        shown = "comparator (never-known facts)" if label == "comparator" else label
        ax.plot(list(c.x) if numeric else x, list(c.y), marker="o", label=shown,
                **_style(label, i))
    if not numeric:
        ax.set_xticks(x, [str(v) for v in a.x], fontsize=8)
    return _finish(ax, (-0.03, 1.03), a.xlabel, a.ylabel, f"attack: {name}", 8)


def loo_probe_plot(report, ax=None):
    """Leave-one-out probe accuracy per depth, one line per model and probe kind."""
    d = report.extra["loo_probe"]
    ax = P._axes(ax, (5, 3.2))
    for i, (label, res) in enumerate(d["curves"].items()):
        st = _style(label, i)
        if "null" in res and "null_hi" in res:
            ax.fill_between(d["depths"], res["null"], res["null_hi"], color=st["color"],
                            alpha=0.12, label=f"{label} (permutation null, mean..95%)")
        for kind, accs in res.items():
            if kind.startswith("null"):
                continue
            ax.plot(d["depths"], accs, marker="o" if kind == "balanced" else "s",
                    alpha=1.0 if kind == "balanced" else 0.4, color=st["color"], ls=st["ls"],
                    label=f"{label} ({kind})")
    ax.axhline(d["chance"], color="k", lw=0.8, alpha=0.5, label="class balance")
    return _finish(ax, (0.3, 1.03), "layer (resid_post, last prompt token)",
                   "leave-one-out accuracy", "memorized-vs-not probe", 7)


def drift_plot(report, ax=None):
    d = report.extra["drift"]
    ax = P._axes(ax, (5, 3.2))
    for i, (label, res) in enumerate(d["curves"].items()):
        for key, vals in res.items():
            if key.endswith("/forget") and not (label == "oracle" and key.startswith("oracle")):
                ax.plot(d["depths"], vals, marker="o", label=f"{label} vs {key.split('/')[0]}",
                        **_style(label, i))
    return _finish(ax, (0, 1.03), "layer", "linear CKA (forget prompts)",
                   "representation drift", 7)


def write_plots(report, folder) -> list[str]:
    """Save every figure the report has data for into ``folder``; returns the paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in report.extra.get("attacks", {}):
        paths.append(P.save(attack_curve(report, name), folder / f"attack_{name}.png"))
    if "loo_probe" in report.extra:
        paths.append(P.save(loo_probe_plot(report), folder / "loo_probe.png"))
    if "drift" in report.extra:
        paths.append(P.save(drift_plot(report), folder / "drift.png"))
    return paths
