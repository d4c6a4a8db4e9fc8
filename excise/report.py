"""Report: metrics per model (``before`` / ``after`` / ``oracle`` ...), probe results, plots.

The typed results a report carries live here too: :class:`Curve` (one model's forget recall along
an attack's budget) and :class:`AttackCurves` (one attack's curves, one per model, on a shared
axis). They stay typed up to the writers, which serialise them (``to_dict``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from excise.io import atomic_write_text

# metric name -> (label, higher is better?) for display; unknown metrics are shown as they are
METRIC_LABELS = {
    "forget_recall": "forget recall",
    "retain_recall": "retain recall",
    "holdout_recall": "holdout recall",
    "shared_recall": "shared knowledge",
    "paraphrase_recall": "forget, paraphrased",
    "neighbor_recall": "neighbor recall",
    "perplexity": "perplexity (general text)",
    "forget_statement_recall": "forget, statements",
    "forget_question_recall": "forget, questions",
    "paraphrase_statement_recall": "forget, paraphrased statements",
    "paraphrase_question_recall": "forget, paraphrased questions",
    "truth_ratio_forget": "truth ratio (forget)",
    "forget_quality": "forget quality (KS p vs oracle)",
    "kl_oracle_forget": "KL to oracle (forget)",
    "kl_oracle_retain": "KL to oracle (retain)",
    "forget_recall_gap": "forget recall - oracle",
    "retain_recall_gap": "retain recall - oracle",
    "paraphrase_recall_gap": "paraphrase recall - oracle",
    "mia_auc_loss": "MIA AUC (loss)",
    "mia_auc_mink": "MIA AUC (min-k%)",
    "privleak": "PrivLeak vs oracle",
    "exposure_forget": "canary exposure (forget)",
    "exposure_holdout": "canary exposure (holdout)",
    "exposure_max": "canary exposure (max)",
    "loo_chance": "LOO probe class balance",
    "loo_gap_max": "LOO probe max(accuracy - permutation null)",
    "attack_relearn": "attack: relearn (peak)",
    "attack_benign": "attack: benign relearn (peak)",
    "attack_refit": "attack: probe refit (peak)",
    "attack_sae": "attack: SAE steering (peak)",
    "attack_quantize": "attack: quantization (peak)",
    "attack_paraphrase": "attack: paraphrase (peak)",
}


@dataclass(frozen=True)
class Curve:
    """Forget recall of one model along an attack's budget axis: ``y[i]`` at budget ``x[i]``.
    ``aux`` holds further series on the same axis (e.g. recall on the part the attack trained
    on), each as long as ``x``."""

    x: tuple
    y: tuple[float, ...]
    xlabel: str
    ylabel: str = "forget recall"
    aux: Mapping[str, tuple[float, ...]] = field(default_factory=dict)

    def __post_init__(self):
        object.__setattr__(self, "x", tuple(self.x))
        object.__setattr__(self, "y", tuple(self.y))
        object.__setattr__(self, "aux", {k: tuple(v) for k, v in self.aux.items()})
        if len(self.x) != len(self.y):
            raise ValueError(f"Curve {self.xlabel!r}: {len(self.x)} budgets x but "
                             f"{len(self.y)} values y")
        for k, v in self.aux.items():
            if len(v) != len(self.x):
                raise ValueError(f"Curve {self.xlabel!r}: aux series {k!r} has {len(v)} values "
                                 f"for {len(self.x)} budgets")

    @property
    def peak(self) -> float:
        """The highest forget recall anywhere along the curve."""
        return max(self.y)


@dataclass(frozen=True)
class AttackCurves:
    """One attack run with identical settings on several models: ``curves[label]`` is each
    model's :class:`Curve`; every curve shares the budget axis."""

    curves: Mapping[str, Curve]

    def __post_init__(self):
        if not self.curves:
            raise ValueError("AttackCurves needs at least one model's curve")
        xs = {lab: c.x for lab, c in self.curves.items()}
        first = next(iter(xs))
        bad = [lab for lab, x in xs.items() if x != xs[first]]
        if bad:
            raise ValueError(f"attack curves of {first!r} and {bad[0]!r} have different "
                             f"budgets: {list(xs[first])} vs {list(xs[bad[0]])}")

    @property
    def _last(self) -> Curve:
        return list(self.curves.values())[-1]

    @property
    def x(self) -> tuple:
        return self._last.x

    @property
    def xlabel(self) -> str:
        return self._last.xlabel

    @property
    def ylabel(self) -> str:
        return self._last.ylabel

    def to_dict(self) -> dict:
        """``{"x", "xlabel", "ylabel", "curves": {label: y}, "aux": {series: {label: values}}}``
        - the form metrics.json stores."""
        aux: dict[str, dict[str, list]] = {}
        for lab, c in self.curves.items():
            for k, v in c.aux.items():
                aux.setdefault(k, {})[lab] = list(v)
        return {"x": list(self.x), "xlabel": self.xlabel, "ylabel": self.ylabel,
                "curves": {lab: list(c.y) for lab, c in self.curves.items()}, "aux": aux}


@dataclass
class Report:
    metrics: dict[str, dict[str, float]]  # model label -> metric -> value
    request: dict = field(default_factory=dict)
    edit: dict = field(default_factory=dict)
    # probe results (per-depth accuracy, drift ...); ``extra["attacks"]``: attack name ->
    # AttackCurves, kept typed until a writer serialises it
    extra: dict = field(default_factory=dict)
    verdict: str | None = None
    verdict_rule: str = ""
    plots: list[str] = field(default_factory=list)

    def merge(self, other: "Report", rename: dict[str, str] | None = None) -> "Report":
        rename = rename or {}
        for k, v in other.metrics.items():
            self.metrics[rename.get(k, k)] = v
        self.extra.update(other.extra)
        return self

    def to_dict(self) -> dict:
        d = {k: v for k, v in self.metrics.items()}
        d["edit"] = self.edit
        d["request"] = self.request
        if self.extra:
            d["probes"] = _plain(self.extra)
        if self.verdict:
            d["verdict"] = {"verdict": self.verdict, "rule": self.verdict_rule}
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=_clean) + "\n"

    def table(self) -> list[list[str]]:
        cols = list(self.metrics)
        names = []
        for m in self.metrics.values():
            names.extend(k for k in m if k not in names)
        rows = [["metric"] + cols]
        for n in names:
            rows.append([METRIC_LABELS.get(n, n)] + [_fmt(self.metrics[c].get(n)) for c in cols])
        return rows

    def summary_text(self) -> str:
        rows = self.table()
        w = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w[i]) if i == 0 else c.rjust(w[i]) for i, c in enumerate(r))
                 for r in rows]
        lines.insert(1, "  ".join("-" * x for x in w))
        return "\n".join(lines)

    def to_markdown(self, title: str = "excise report") -> str:
        rows = self.table()
        md = [f"# {title}", ""]
        if self.verdict:
            md += [f"**Verdict: {self.verdict}**", "", f"Rule: {self.verdict_rule}", ""]
        md += ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
        md += ["| " + " | ".join(r) + " |" for r in rows[1:]]
        attacks = self.extra.get("attacks") or {}
        if attacks:
            md += ["", "## Restoration attacks (forget recall along each attack)", ""]
            for name, a in attacks.items():
                md += [f"**{name}** ({a.xlabel})", "",
                       "| model | " + " | ".join(str(x) for x in a.x) + " |",
                       "|---|" + "---|" * len(a.x)]
                md += [f"| {lab} | " + " | ".join(_fmt(float(v)) for v in c.y) + " |"
                       for lab, c in a.curves.items()]
                md += [""]
        checks = (self.extra.get("verdict") or {}).get("checks")
        if checks:
            md += ["## Verdict checks", ""]
            md += [f"- {k}: {'pass' if c['ok'] else 'FAIL'} "
                   + ", ".join(f"{kk}={_fmt(vv)}" for kk, vv in c.items() if kk != "ok")
                   for k, c in checks.items()]
        if self.edit:
            md += ["", "## Edit", ""]
            md += [f"- **{k}**: {v}" for k, v in self.edit.items()]
        if self.request:
            md += ["", "## Request", ""]
            md += [f"- {k}: {v}" for k, v in self.request.items()]
        if self.plots:
            md += ["", "## Plots", ""]
            md += [f"![{Path(p).stem}]({p})" for p in self.plots]
        return "\n".join(md) + "\n"

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        atomic_write_text(folder / "metrics.json", self.to_json())
        atomic_write_text(folder / "report.md", self.to_markdown())

    def _repr_html_(self) -> str:
        rows = self.table()
        head = "".join(f"<th>{c}</th>" for c in rows[0])
        body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows[1:])
        v = f"<p><b>Verdict: {self.verdict}</b></p>" if self.verdict else ""
        return f"{v}<table><tr>{head}</tr>{body}</table>"


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return f"{v:.3f}" if abs(v) < 100 else f"{v:.1f}"
    return str(v)


def _plain(o: Any) -> Any:
    """``o`` with every typed result (anything with ``to_dict``) replaced by its dict form."""
    if hasattr(o, "to_dict"):
        return o.to_dict()
    if isinstance(o, dict):
        return {k: _plain(v) for k, v in o.items()}
    if isinstance(o, list):
        return [_plain(v) for v in o]
    if isinstance(o, tuple):
        return tuple(_plain(v) for v in o)
    return o


def _clean(o):
    if isinstance(o, float) and math.isnan(o):
        return None
    return str(o)
