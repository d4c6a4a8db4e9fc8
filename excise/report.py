"""Report: metrics per model (``before`` / ``after`` / ``oracle`` ...), probe results, plots.

The typed results a report carries live here too: :class:`Curve` (one model's forget recall along
an attack's budget) and :class:`AttackCurves` (one attack's curves, one per model, on a shared
axis), :class:`GridPoint` (one attack setting: learning rate and seed) and :class:`AttackGrid`
(every setting an attack ran at, the attacker-hygiene grid). They stay typed up to the writers,
which serialise them (``to_dict``); :func:`grids_record` / :func:`grids_from_record` keep every
field of attack grids (per-fact hits included) for the cache of verified results.
"""

from __future__ import annotations

import json
import math
from html import escape
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from excise.io import atomic_write_text

# metric name -> (label, higher is better?) for display; unknown metrics are shown as they are
MAX_LISTED = 300  # facts per split report.md lists (metrics.json keeps every one)

METRIC_LABELS = {
    "forget_recall": "forget recall",
    "retain_recall": "retain recall",
    "holdout_recall": "holdout recall",
    "shared_recall": "shared knowledge",
    "paraphrase_recall": "forget, paraphrased",
    "neighbor_recall": "neighbor recall",
    "same_template_recall": "same-template neighbors",
    "same_template_prompts": "same-template prompts (count)",
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
    "attack_relearn_gap": "attack: relearn, worst gap vs oracle",
    "attack_benign_gap": "attack: benign relearn, worst gap vs oracle",
    "attack_refit_gap": "attack: probe refit, worst gap vs oracle",
    "attack_sae_gap": "attack: SAE steering, worst gap vs oracle",
    "attack_quantize_gap": "attack: quantization, worst gap vs oracle",
    "attack_paraphrase_gap": "attack: paraphrase, worst gap vs oracle",
    "attack_incontext": "attack: in-context relearning (peak)",
    "attack_lens": "attack: logit lens (peak)",
    "attack_incontext_gap": "attack: in-context relearning, worst gap vs oracle",
    "attack_lens_gap": "attack: logit lens, worst gap vs oracle",
    "params_changed": "parameters changed (fraction)",
}


@dataclass(frozen=True)
class Curve:
    """Forget recall of one model along an attack's budget axis: ``y[i]`` at budget ``x[i]``.
    ``aux`` holds further series on the same axis (e.g. recall on the part the attack trained
    on), each as long as ``x``. ``hits[i]`` (optional) is the per-fact correctness behind
    ``y[i]`` and ``groups[i]`` the person (owner) of each of those facts: what the verdict's
    per-person bootstrap resamples. They stay in memory (``to_dict`` leaves them out)."""

    x: tuple
    y: tuple[float, ...]
    xlabel: str
    ylabel: str = "forget recall"
    aux: Mapping[str, tuple[float, ...]] = field(default_factory=dict)
    hits: tuple[tuple[bool, ...], ...] = ()
    groups: tuple[tuple, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "x", tuple(self.x))
        object.__setattr__(self, "y", tuple(self.y))
        object.__setattr__(self, "aux", {k: tuple(v) for k, v in self.aux.items()})
        object.__setattr__(self, "hits", tuple(tuple(bool(v) for v in h) for h in self.hits))
        object.__setattr__(self, "groups", tuple(tuple(g) for g in self.groups))
        if len(self.x) != len(self.y):
            raise ValueError(f"Curve {self.xlabel!r}: {len(self.x)} budgets x but "
                             f"{len(self.y)} values y")
        for k, v in self.aux.items():
            if len(v) != len(self.x):
                raise ValueError(f"Curve {self.xlabel!r}: aux series {k!r} has {len(v)} values "
                                 f"for {len(self.x)} budgets")
        if self.hits or self.groups:
            if not len(self.hits) == len(self.groups) == len(self.x):
                raise ValueError(f"Curve {self.xlabel!r}: per-fact hits for {len(self.hits)} "
                                 f"and groups for {len(self.groups)} budgets; give one of each "
                                 f"per budget ({len(self.x)})")
            bad = [i for i, (h, g) in enumerate(zip(self.hits, self.groups)) if len(h) != len(g)]
            if bad:
                raise ValueError(f"Curve {self.xlabel!r}: at budget {self.x[bad[0]]!r} "
                                 f"{len(self.hits[bad[0]])} hits but "
                                 f"{len(self.groups[bad[0]])} groups")

    @property
    def peak(self) -> float:
        """The highest forget recall anywhere along the curve."""
        return max(self.y)


def pool_curves(curves: Sequence[Curve]) -> Curve:
    """Several runs of one attack on one model (the same budgets) as one curve: at each budget
    the recall over every fact the runs measured there (their hits and groups concatenated; the
    runs' values weighted by how many facts each measured), ``aux`` series averaged."""
    first = curves[0]
    if len(curves) == 1:
        return first
    bad = [c.x for c in curves if c.x != first.x]
    if bad:
        raise ValueError(f"pool_curves: budgets {list(first.x)} and {list(bad[0])} differ; "
                         f"only runs of one attack setting's axis can be pooled")
    n = len(first.x)
    with_hits = all(c.hits for c in curves)
    if with_hits:
        w = [[len(c.hits[j]) for c in curves] for j in range(n)]
        y = tuple(sum(c.y[j] * k for c, k in zip(curves, w[j])) / max(sum(w[j]), 1)
                  for j in range(n))
        hits = tuple(sum((c.hits[j] for c in curves), ()) for j in range(n))
        groups = tuple(sum((c.groups[j] for c in curves), ()) for j in range(n))
    else:
        y = tuple(sum(c.y[j] for c in curves) / len(curves) for j in range(n))
        hits, groups = (), ()
    aux = {k: tuple(sum(c.aux[k][j] for c in curves) / len(curves) for j in range(n))
           for k in first.aux if all(k in c.aux for c in curves)}
    return Curve(first.x, y, first.xlabel, first.ylabel, aux, hits, groups)


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

    def gap(self, label: str, reference: str = "oracle") -> tuple[float, object]:
        """The largest ``label`` minus ``reference`` recall at equal budget, and that budget."""
        e, o = self.curves[label].y, self.curves[reference].y
        gaps = [x - y for x, y in zip(e, o)]
        i = max(range(len(gaps)), key=gaps.__getitem__)
        return gaps[i], self.x[i]


@dataclass(frozen=True)
class GridPoint:
    """One setting of an attack, run identically on every model: the learning rate (None for
    attacks without one) and the seed, the curves it produced, and whether it wrecks the unedited
    model (``flagged``: the original's held-out recall under this setting falls more than the
    attack config's ``flag_drop`` below its un-attacked value - kept and counted, never
    dropped)."""

    lr: float | None
    seed: int | None
    curves: AttackCurves
    flagged: bool = False
    pooled: tuple[int, ...] = ()  # the seeds pooled into this point (AttackGrid.pooled)

    def to_dict(self) -> dict:
        out = {"lr": self.lr, "seed": self.seed, "flagged": self.flagged,
               "curves": self.curves.to_dict()}
        return out | ({"pooled": list(self.pooled)} if self.pooled else {})


@dataclass(frozen=True)
class AttackGrid:
    """Every setting one attack ran at (the attacker-hygiene grid: learning rates x seeds, the
    same on every model). ``param``: the config field the grid varies (e.g. ``relearn_lr``;
    None for attacks without a learning rate, which run once)."""

    points: tuple[GridPoint, ...]
    param: str | None = None

    def __post_init__(self):
        object.__setattr__(self, "points", tuple(self.points))
        if not self.points:
            raise ValueError("AttackGrid needs at least one setting")
        labels = [tuple(p.curves.curves) for p in self.points]
        bad = [lab for lab in labels if lab != labels[0]]
        if bad:
            raise ValueError(f"every setting of an attack grid runs on the same models; got "
                             f"{list(labels[0])} and {list(bad[0])}")

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(self.points[0].curves.curves)

    def pooled(self) -> "AttackGrid":
        """One point per learning rate: its settings (seeds) pooled. Each model's recall at a
        budget is then taken over every fact the pooled settings measured there (the seeds of
        a person-splitting attack are complementary folds: every forget person held out once;
        for an attack measured on the whole forget set, the mean over its seeds). A pooled
        point is flagged when any of its settings is; a learning rate run once keeps its
        point."""
        by_lr: dict = {}
        for p in self.points:
            by_lr.setdefault(p.lr, []).append(p)
        points = []
        for lr, ps in by_lr.items():
            if len(ps) == 1:
                points.append(ps[0])
                continue
            curves = AttackCurves({lab: pool_curves([p.curves.curves[lab] for p in ps])
                                   for lab in ps[0].curves.curves})
            seeds = tuple(p.seed for p in ps if p.seed is not None)
            points.append(GridPoint(lr, None, curves, any(p.flagged for p in ps), seeds))
        return AttackGrid(tuple(points), self.param)

    def worst(self, label: str, reference: str = "oracle") -> GridPoint:
        """The pooled point (:meth:`pooled`) with the largest ``label`` minus ``reference`` gap
        (the first of ties); without a ``reference`` curve, the one where ``label`` recovers
        most."""
        points = self.pooled().points
        if reference in self.labels:
            return max(points, key=lambda p: p.curves.gap(label, reference)[0])
        return max(points, key=lambda p: p.curves.curves[label].peak)

    def worst_gap(self, label: str, reference: str = "oracle") -> float:
        """The largest gap of the pooled grid (:meth:`pooled`): over learning rates and
        budgets, each learning rate's seeds pooled."""
        return max(p.curves.gap(label, reference)[0] for p in self.pooled().points)

    def worst_setting_gap(self, label: str, reference: str = "oracle") -> float:
        """The largest gap of any single setting (one seed), every budget: what one run of
        the attack showed at its luckiest - reported, not what the verdict reads."""
        return max(p.curves.gap(label, reference)[0] for p in self.points)

    def peak(self, label: str) -> float:
        """``label``'s highest recall anywhere on the grid."""
        return max(p.curves.curves[label].peak for p in self.points)

    def rows(self, label: str, reference: str = "oracle") -> list[dict]:
        """The compact table: per setting the gap (``label`` - ``reference``, worst budget),
        each model's peak recall, and the flag."""
        out = []
        for p in self.points:
            c = p.curves.curves
            row: dict[str, Any] = {"lr": p.lr, "seed": p.seed}
            if reference in c:
                row["gap"], row["at"] = p.curves.gap(label, reference)
            row |= {f"peak {lab}": c[lab].peak for lab in c}
            row["flagged"] = p.flagged
            out.append(row)
        return out

    def to_dict(self) -> dict:
        return {"param": self.param, "points": [p.to_dict() for p in self.points]}


def grids_record(grids: Mapping[str, AttackGrid]) -> dict:
    """Every field of ``{attack: AttackGrid}`` as plain JSON types - the per-fact hits and
    their owners included, which ``to_dict`` leaves out - so :func:`grids_from_record` gives
    back grids equal to these (what :class:`probes.store.AttackStore` keeps on disk)."""
    def curve(c: Curve) -> dict:
        return {"x": list(c.x), "y": list(c.y), "xlabel": c.xlabel, "ylabel": c.ylabel,
                "aux": {k: list(v) for k, v in c.aux.items()},
                "hits": [list(h) for h in c.hits], "groups": [list(g) for g in c.groups]}

    return {name: {"param": g.param, "points": [
        {"lr": p.lr, "seed": p.seed, "flagged": p.flagged,
         "curves": {lab: curve(c) for lab, c in p.curves.curves.items()}} for p in g.points]}
        for name, g in grids.items()}


def grids_from_record(record: Mapping[str, Any]) -> dict[str, AttackGrid]:
    """The grids :func:`grids_record` wrote (raises on a record of another shape). JSON has no
    tuples: budgets and fact owners (``(0, person, "")``) come back as tuples."""
    def tuples(v):
        return tuple(tuples(x) for x in v) if isinstance(v, list) else v

    def curve(c: Mapping[str, Any]) -> Curve:
        return Curve(tuples(c["x"]), c["y"], c["xlabel"], c["ylabel"], c["aux"], c["hits"],
                     tuples(c["groups"]))

    return {name: AttackGrid(tuple(
        GridPoint(p["lr"], p["seed"], AttackCurves({lab: curve(c) for lab, c in
                                                     p["curves"].items()}), p["flagged"])
        for p in g["points"]), g["param"]) for name, g in record.items()}


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

    def verdict_text(self, label: str = "verdict") -> str:
        """``{label}: X``, and for each check left open (its interval straddles its limit) the
        interval and, where known, about how many forget people would decide it at the same gap
        (``probes.verdict.people_to_decide``)."""
        if not self.verdict:
            return ""
        checks = (self.extra.get("verdict") or {}).get("checks") or {}
        opened = []
        for k, c in checks.items():
            if check_outcome(c) != "open":
                continue
            if "upper" not in c or "lower" not in c:  # open without an interval: say why
                opened.append(f"{k} ({c['why']})" if c.get("why") else k)
                continue
            need = c.get("people_to_decide")
            opened.append(f"{k} [{c['lower']:.3f}, {c['upper']:.3f}]"
                          + (f" vs {c['limit']:g}" if "limit" in c else "")
                          + (f": about {need} forget people would decide it at this gap"
                             if need else ""))
        return f"{label}: {self.verdict}" + (f" (open: {'; '.join(opened)})" if opened else "")

    def to_markdown(self, title: str = "excise report") -> str:
        rows = self.table()
        md = [f"# {title}", ""]
        if self.verdict:
            md += [f"**{self.verdict_text('Verdict')}**", "",
                   f"Rule: {self.verdict_rule}", ""]
        md += ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
        md += ["| " + " | ".join(r) + " |" for r in rows[1:]]
        attacks = self.extra.get("attacks") or {}
        if attacks:
            md += ["", "## Restoration attacks (forget recall along each attack)", ""]
            if self.extra.get("attack_grid"):
                ref = "the oracle"
                if self.extra.get("attack_reference"):
                    ref = f"the {self.extra['attack_reference']}"
                md += [f"Each attack at its setting with the worst gap above {ref} (the "
                       "whole grid is below).", ""]
            for name, a in attacks.items():
                md += [f"**{name}** ({a.xlabel})", "",
                       "| model | " + " | ".join(str(x) for x in a.x) + " |",
                       "|---|" + "---|" * len(a.x)]
                md += [f"| {lab} | " + " | ".join(_fmt(float(v)) for v in c.y) + " |"
                       for lab, c in a.curves.items()]
                md += [""]
        table = self.grid_table()
        if table:
            md += [""] if md[-1] else []
            md += ["## Attack grid (every setting, run identically on every model)", ""]
            md += ["| " + " | ".join(table[0]) + " |", "|" + "---|" * len(table[0])]
            md += ["| " + " | ".join(r) + " |" for r in table[1:]]
            md += [""]
        verdict = self.extra.get("verdict") or {}
        if verdict.get("checks"):
            md += [""] if md[-1] else []
            md += ["## Verdict checks", ""]
            md += [f"- {k}: {check_outcome(c)} "
                   + ", ".join(f"{kk}={_fmt(vv)}" for kk, vv in c.items()
                               if kk not in ("ok", "used"))
                   for k, c in verdict["checks"].items()]
        oracles = self.extra.get("oracles") or []
        if oracles:
            md += ["", "## Against each retrain oracle (training seeds)", ""]
            md += [f"- oracle {o['index'] + 1}: {o['verdict']}"
                   + (" (this report)" if o.get("chosen") else "")
                   + (f"; failed: {', '.join(o['failed'])}" if o.get("failed") else "")
                   + (f"; open: {', '.join(o['open'])}" if o.get("open") else "")
                   for o in oracles]
        if verdict.get("bar"):
            md += ["", "## Issue 8's bar (beside the verdict)", ""]
            md += [f"- {k}: {_yes(c['ok'])} (value {_fmt(c['value'])})"
                   for k, c in verdict["bar"].items()]
        facts = self.extra.get("facts") or {}
        if facts:
            md += ["", "## Every fact, by split", "",
                   "Greedy answer (first tokens) and target probability per model; "
                   "`ok` where greedy decoding reproduces the target.", ""]
            for split in facts:
                rows = self.fact_table(split)
                md += [f"**{split}** ({len(rows) - 1} facts)", ""]
                md += ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
                md += ["| " + " | ".join(_cell(c) for c in r) + " |"
                       for r in rows[1:1 + MAX_LISTED]]
                if len(rows) - 1 > MAX_LISTED:  # an organism's thousands of retain facts
                    md += ["", f"({len(rows) - 1 - MAX_LISTED} more: metrics.json, "
                               f"probes.facts.{split})"]
                md += [""]
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

    def fact_table(self, split: str) -> list[list[str]]:
        """The per-fact listing of one split (``extra["facts"]``, see :func:`facts_by_split`)
        as rows of text: prompt, target, then per model its greedy answer and target
        probability; header first."""
        rows = (self.extra.get("facts") or {}).get(split, [])
        labels = [k for k in (rows[0] if rows else {}) if k not in ("prompt", "target")]
        head = ["prompt", "target"]
        for lab in labels:
            head += [f"{lab} answer", f"{lab} p(target)"]
        out = [head]
        for r in rows:
            line = [r["prompt"], r["target"]]
            for lab in labels:
                v = r[lab]
                line += [repr(v["answer"]) + (" ok" if v["hit"] else ""), f"{v['p_target']:.3g}"]
            out.append(line)
        return out

    def grid_table(self) -> list[list[str]]:
        """The attack grid as rows of text: attack, learning rate, seed, worst gap above the
        oracle (and its budget), each model's peak recall, flagged; header first. Empty when
        the report has no grid."""
        grids = self.extra.get("attack_grid") or {}
        if not grids:
            return []
        labels = next(iter(grids.values())).labels
        label = labels[0]  # the model under test comes first
        # the reference: the oracle, or without one the comparator (never-known facts)
        ref = "comparator" if "oracle" not in labels and "comparator" in labels else "oracle"
        head = ["attack", "lr", "seed", f"worst gap ({label} - {ref})", "at"]
        head += [f"peak {lab}" for lab in labels] + ["flagged"]
        out = [head]
        for name, g in grids.items():
            for r in g.rows(label, ref):
                out.append([name, "-" if r["lr"] is None else f"{r['lr']:g}",
                            "-" if r["seed"] is None else str(r["seed"]),
                            _fmt(r.get("gap")), str(r.get("at", "-"))]
                           + [_fmt(r[f"peak {lab}"]) for lab in labels]
                           + ["yes" if r["flagged"] else ""])
        return out

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        atomic_write_text(folder / "metrics.json", self.to_json())
        atomic_write_text(folder / "report.md", self.to_markdown())

    def _repr_html_(self) -> str:
        def html(rows: list[list[str]]) -> str:
            head = "".join(f"<th>{c}</th>" for c in rows[0])
            body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>"
                           for r in rows[1:])
            return f"<table><tr>{head}</tr>{body}</table>"

        v = f"<p><b>{escape(self.verdict_text('Verdict'))}</b></p>" if self.verdict else ""
        grid = self.grid_table()
        g = f"<p>Attack grid</p>{html(grid)}" if grid else ""
        f = "".join(f"<p>{escape(split)}</p>"
                    + html([[escape(c) for c in r]
                            for r in self.fact_table(split)[:1 + MAX_LISTED]])
                    for split in self.extra.get("facts") or {})
        return f"{v}{html(self.table())}{g}{f}"


def facts_by_split(listings: Mapping[str, Mapping[str, list[dict]]]) -> dict[str, list[dict]]:
    """Per-model fact listings (``{label: {split: [{"prompt", "target", "answer", "p_target",
    "hit"}]}}``, ``probes.behaviour.fact_listing``) as one listing by split: ``{split:
    [{"prompt", "target", label: {"answer", "p_target", "hit"}, ...}]}``. The models must list
    the same facts in the same order."""
    out: dict[str, list[dict]] = {}
    for label, by_split in listings.items():
        for split, rows in by_split.items():
            have = out.setdefault(split, [{"prompt": r["prompt"], "target": r["target"]}
                                          for r in rows])
            if [(h["prompt"], h["target"]) for h in have] != \
                    [(r["prompt"], r["target"]) for r in rows]:
                raise ValueError(f"facts_by_split: {label!r} lists other {split} facts than "
                                 f"the models before it; every model lists the same facts")
            for h, r in zip(have, rows):
                h[label] = {k: r[k] for k in ("answer", "p_target", "hit")}
    return out


def _cell(c: str) -> str:
    """Text for a Markdown table cell: pipes escaped, line breaks as spaces."""
    return c.replace("|", "\\|").replace("\n", " ")


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return f"{v:.3f}" if abs(v) < 100 else f"{v:.1f}"
    return str(v)


def check_outcome(c: dict) -> str:
    """A verdict check's outcome: "not used" (a check whose precondition failed, e.g. the probe
    where its control fails - the verdict ignores it), "pass" (credibly passes), "FAIL"
    (credibly fails; a check without ``fails`` - a point check - fails when not ``ok``) or
    "open" (its interval straddles the margin: neither)."""
    if c.get("used") is False:
        return "not used"
    if c.get("ok"):
        return "pass"
    return "FAIL" if c.get("fails", True) else "open"


def _yes(ok) -> str:
    return "not measured" if ok is None else ("pass" if ok else "FAIL")


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
