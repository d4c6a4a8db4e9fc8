"""The verdict: deleted / suppressed / damaged / not forgotten / inconclusive, with the rule
that produced it.

The rule (:class:`Rule`, written into every report by :meth:`Rule.text`) compares the model with
the retrain oracle - a model that never saw the forget data, the reference of acceptable utility
and of forgetting - and with the original:

1. **damaged** when the utility gate fails: retain, shared-knowledge and (where the request has
   them) neighbor and same-template neighbor (``excise.templates``) recall each at least
   ``utility`` (98%) of the oracle's or of the original's,
   perplexity on general text at most ``1 + perplexity`` (1.07) times the oracle's or the
   original's. Damage is never deletion. Both are references of acceptable utility - what
   retraining gives, what the user had - and their gap is at least the retraining's own seed
   noise (calibration, ``excise.app.calibrate``: on ``tiny``, forgetting people 4..7, the
   original's perplexity is 5% above its oracle's - against the oracle alone, under the earlier
   2% slack, the original itself read "damaged"), so a model within tolerance of either is not
   damaged. The perplexity slack is that seed noise too: on ``small`` a retrain oracle reads up
   to 1.061x the larger of another training seed's oracle's and the original's perplexity
   (``bench/retrain_noise.py``: validation people 10..19 of both worlds and 50..59 of world 0,
   3-4 training seeds; 1.057x on world 0's people 100..109, not used to choose), so under the
   earlier 1.02 a second retraining read damaged (the ``small`` calibration); 0.07 is the
   validation worst rounded up to the next hundredth.
   Damage the gate is for shows in recall first: every known-damaged model of the calibrations
   failed retain recall, none the perplexity gate (0.82-1.03x their references). On held-out
   people 100..109 one second retrain read 1.109x against one of its two reference oracles:
   the slack does not cover retraining's noise on every request (``docs/results.md``).
2. **not forgotten** unless forget recall is credibly below the original's by more than
   ``margin``.
3. **deleted** when forget recall is credibly within ``margin`` of the oracle's, the membership
   AUC (loss, forget vs holdout) within ``mia`` of the oracle's *on either side* (a model that
   over-forgets is as detectable as one that remembers; with per-fact scores a paired per-person
   bootstrap of the AUC difference that fails when it is credibly outside the band - with 4
   forget people on ``tiny`` two retrain oracles' AUCs differ by 0.12, so a point estimate
   would be decided by which people were drawn), and under every restoration attack the
   worst gap above the oracle over the attack's whole grid (learning rates x budgets, each
   learning rate's seeds pooled - for the attacks that split the forget people the seeds are
   complementary folds, so each learning rate's curve covers every forget person - in-context
   relearning, without a learning rate, pools its two folds the same way; flagged
   settings included) is credibly at most ``tolerance``. Where the ``loo_probe`` suite
   ran (it is optional: ``suite: all`` runs it) and its positive control passes on this
   request - the original's best-depth leave-one-person-out probe accuracy (forget vs holdout
   facts) above the 95th percentile of its best-depth permutation null, so the probe can see
   these facts at all - "deleted" also needs the model's best-depth accuracy at or below the
   larger of its own best-depth null's 95th percentile and the oracle's best-depth accuracy +
   ``tolerance`` (:func:`probe_check`). Where the control fails the check is recorded as not
   used and decides nothing.
4. **suppressed** when one of those checks credibly fails - the evidence points the other
   way: forget recall or an attack's worst gap with its lower bound above ``margin`` /
   ``tolerance``, the membership AUC credibly outside the band, the probe above its limit.
5. **inconclusive** otherwise: no check credibly fails, but some bound straddles its margin -
   the request's people cannot decide at this confidence. "Suppressed" is a claim that
   information is left, and it needs evidence as "deleted" does: a second retrain oracle of
   ``tiny`` (8 forget people) whose worst relearning gap is 0.083 with a 90% interval
   [0.067, 0.178] is not evidence of suppression (the calibration, ``bench/calibrate.py``,
   read it "suppressed" before this outcome existed). More forget people, or oracles, decide.

"Credibly" is a paired per-person bootstrap (:func:`probes.stats.group_bootstrap`): people are
resampled with replacement, the same resample on both models; a comparison passes on the
one-sided ``confidence`` (90%) bound in the direction of the claim - an upper bound for "no more
than", a lower bound for "at least" - so every claim needs evidence, and a gap decided by one
person out of five does not pass. Each deletion check records ``ok`` (credibly passes) and
``fails`` (credibly fails); both false is an open check.

**Models with no retrain oracle** (real facts learned in pretraining) are judged against the
comparator instead (:func:`decide_comparator`, :meth:`Rule.text_comparator`): facts the model
never knew (the request's holdout split, screened as not known or fictitious), attacked exactly
as the forget facts (``probes.attacks.run_comparator_grid``: same halves, settings and grid, on
the original). The gate is taken against the original alone; "deleted" needs forget recall
credibly within ``margin`` of the original's recall of the never-known facts, the membership
AUC (loss, forget vs never-known) not credibly outside ``mia`` of 0.5 (the forget facts read
like never-known ones), and under every attack the worst gap of the model's held-out-half
curve above the comparator's, point by point over the whole grid (each learning rate's seeds
pooled), credibly at most
``tolerance``. The two curves are measured on different facts, so those bootstraps are
unpaired: the forget people and the never-known facts' subjects are resampled independently
(:func:`two_sample_bootstrap`). The probe clause is the same, without the oracle: the model's
best-depth accuracy at or below its own best-depth null's 95th percentile (the forget facts
read like the never-known ones). The organism's rule (with an oracle) is unchanged.

Issue 8's bar (forget <= oracle + 2 pt, MIA within 0.05, relearning <= oracle + 5 pt, <= 1% of
parameters) is reported beside the verdict (:func:`bar`), point estimates as before.

To judge any model (a second oracle, a distilled model, a control): ``probes.verify(model,
request, oracle=oracle, original=original, suite="verdict", label=name, cache=shared)`` - with
one ``shared`` dict across the models of a request, the oracle's and the original's behaviour,
privacy and attack grids are measured once. :func:`decide` applies the rule to numbers already
measured (metrics, per-fact hits, attack grids and, optionally, the probe's best-depth numbers).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from excise.checks import check_positive
from excise.report import AttackGrid
from probes.stats import Bootstrap, group_bootstrap, resample_counts

# the verdicts a model's answer can be (a known-answer model is expected to get one of them)
ANSWERS = ("deleted", "suppressed", "damaged", "not forgotten")
# and the rule's fifth outcome, where the request's people cannot decide between them
VERDICTS = ANSWERS + ("inconclusive",)
# the same verdicts, the most favourable to the model first (probes.verify.against_oracles)
FAVOURABLE = ("deleted", "inconclusive", "suppressed", "not forgotten", "damaged")
# the checks besides the attacks that a deleted verdict needs, against a retrain oracle
ORACLE_CHECKS = ("forget_vs_oracle", "mia_vs_oracle", "probe")

# the utility gate: behaviour split -> its recall metric (neighbors and same-template neighbors
# only where the request has them); perplexity is gated on its own
GATE_SPLITS = {"retain": "retain_recall", "shared": "shared_recall",
               "neighbors": "neighbor_recall", "same_template": "same_template_recall"}


@dataclass(frozen=True)
class Rule:
    """The verdict rule's settings (see the module docstring).

    ``margin``: forget-recall slack against the oracle (deleted) and the original (not
    forgotten). ``tolerance``: slack on every attack's worst gap over the oracle. ``utility``:
    the fraction of the oracle's retain / shared / neighbor recall the gate needs.
    ``perplexity``: the relative perplexity increase over the oracle's the gate allows. ``mia``:
    the largest membership-AUC difference from the oracle's, either side. ``confidence``: the
    one-sided bootstrap level; ``n_boot`` resamples, seeded by ``seed``."""

    margin: float = 0.05
    tolerance: float = 0.1
    utility: float = 0.98
    perplexity: float = 0.07
    mia: float = 0.05
    confidence: float = 0.9
    n_boot: int = 2000
    seed: int = 0

    def __post_init__(self):
        for name in ("margin", "tolerance", "perplexity", "mia"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < 1:
                raise ValueError(f"{name}={v!r}: must be a number in [0, 1)")
        if isinstance(self.utility, bool) or not 0 < self.utility <= 1:
            raise ValueError(f"utility={self.utility!r}: must be in (0, 1] (a fraction of the "
                             f"oracle's recall)")
        if isinstance(self.confidence, bool) or not 0.5 <= self.confidence < 1:
            raise ValueError(f"confidence={self.confidence!r}: must be in [0.5, 1)")
        check_positive("n_boot", self.n_boot)

    def text(self, attacks: Sequence[str] = ()) -> str:
        att = ", ".join(attacks) if attacks else "none were run"
        c = f"{self.confidence:.0%}"
        probe = self._probe_text(f"the larger of its own best-depth null p95 and the oracle's "
                                 f"best-depth accuracy + {self.tolerance:g}")
        return (
            f"Reference: the retrain oracle (never saw the forget data) for utility and "
            f"forgetting, the original for 'not forgotten'. Recall comparisons are paired "
            f"per-person bootstraps ({self.n_boot} resamples of the people with replacement, the "
            f"same people on both models, seed {self.seed}); a comparison passes on the "
            f"one-sided {c} bound in the direction of the claim. "
            f"'damaged' if the utility gate fails: retain, shared-knowledge and (where the "
            f"request has them) neighbor and same-template neighbor recall each >= "
            f"{self.utility:g} x the oracle's or the "
            f"original's (lower {c} bound of model - {self.utility:g} x reference >= 0 for "
            f"either) and perplexity on general text <= {1 + self.perplexity:g} x the "
            f"oracle's or the original's; "
            f"else 'not forgotten' unless forget recall is below the original's by more than "
            f"{self.margin:g} (lower {c} bound of original - model > {self.margin:g}); "
            f"else 'deleted' if forget recall <= oracle + {self.margin:g} (upper {c} bound of "
            f"model - oracle), MIA AUC (loss, forget vs holdout) within {self.mia:g} of the "
            f"oracle's on either side (over-forgetting fails too; where per-fact scores are "
            f"known, a paired bootstrap over forget and holdout people: fails when the "
            f"difference is credibly outside, its {c} lower bound above {self.mia:g} or upper "
            f"bound below -{self.mia:g}), and under every restoration attack "
            f"({att}) the worst gap of forget recall above the oracle's at equal budget over "
            f"the attack's whole grid (every learning rate and budget, each learning rate's "
            f"seeds pooled: complementary folds of the forget people, in-context relearning's "
            f"two folds too; settings flagged for "
            f"wrecking the original included) has upper {c} bound <= {self.tolerance:g}"
            f"{probe}; "
            f"{self._open_text()}")

    def _open_text(self) -> str:
        """The rule's last clause: suppressed on evidence, else inconclusive."""
        c = f"{self.confidence:.0%}"
        return (f"else 'suppressed' if one of these checks credibly fails (forget recall or an "
                f"attack's worst gap with its lower {c} bound above {self.margin:g} / "
                f"{self.tolerance:g}, the membership AUC credibly outside, the probe above its "
                f"limit); else 'inconclusive' (no check credibly fails but some bound straddles "
                f"its margin: the request's people cannot decide at {c}).")

    def _probe_text(self, limit: str) -> str:
        """The probe clause of the deletion rule (:func:`probe_check`)."""
        return (f", and - only where the loo_probe suite ran and its positive control passes "
                f"on the original (its best-depth leave-one-person-out probe accuracy, forget "
                f"vs holdout facts, above the 95th percentile of its best-depth permutation "
                f"null, each permutation's largest accuracy over depths) - the model's "
                f"best-depth probe accuracy at or below {limit} (where the control fails, the "
                f"probe decides nothing)")

    def text_comparator(self, attacks: Sequence[str] = ()) -> str:
        """The rule for a model with no retrain oracle (:func:`decide_comparator`)."""
        att = ", ".join(attacks) if attacks else "none were run"
        c = f"{self.confidence:.0%}"
        return (
            f"No retrain oracle: the reference for forgetting is the comparator - facts the "
            f"model never knew (the request's holdout split), attacked on the original exactly "
            f"as the forget facts (the same split in halves by person or subject, the same "
            f"settings and grid); the reference for utility and 'not forgotten' is the "
            f"original. Comparisons on the same facts are paired per-person bootstraps, "
            f"comparisons of the forget facts with the never-known facts are unpaired (the "
            f"forget people and the never-known subjects resampled independently); "
            f"{self.n_boot} resamples, seed {self.seed}; a comparison passes on the one-sided "
            f"{c} bound in the direction of the claim. "
            f"'damaged' if the utility gate fails: retain, shared-knowledge and (where the "
            f"request has them) neighbor and same-template neighbor recall each >= "
            f"{self.utility:g} x the original's "
            f"(lower {c} bound of model - {self.utility:g} x original >= 0) and perplexity on "
            f"general text <= {1 + self.perplexity:g} x the original's; "
            f"else 'not forgotten' unless forget recall is below the original's by more than "
            f"{self.margin:g} (lower {c} bound of original - model > {self.margin:g}); "
            f"else 'deleted' if forget recall <= the original's recall of the never-known "
            f"facts + {self.margin:g} (upper {c} bound), the membership AUC (loss, forget vs "
            f"never-known facts) not credibly outside 0.5 +- {self.mia:g} (its {c} lower bound "
            f"<= {0.5 + self.mia:g} and upper bound >= {0.5 - self.mia:g}: the forget facts "
            f"read like facts never known, over-forgetting fails too), and under every "
            f"restoration attack ({att}) the worst gap of the model's held-out-half recall "
            f"above the comparator's held-out-half recall at equal budget over the attack's "
            f"whole grid (every learning rate and budget, each learning rate's seeds pooled; "
            f"settings flagged for wrecking the original included) has upper {c} bound <= "
            f"{self.tolerance:g}"
            f"{self._probe_text('its own best-depth null p95')}; "
            f"{self._open_text()}")


@dataclass(frozen=True)
class Judgement:
    """The verdict, the rule's text, every check it made (``checks[name]["ok"]`` and the
    numbers behind it) and issue 8's bar beside it (``bar[condition]["ok"]``: True / False, or
    None when not measured)."""

    verdict: str
    rule: str
    checks: dict[str, dict[str, Any]] = field(default_factory=dict)
    bar: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"verdict": self.verdict, "rule": self.rule, "checks": self.checks,
                "bar": self.bar}


def _hits(hits: Mapping, label: str, split: str) -> torch.Tensor | None:
    h = hits.get(label, {}).get(split)
    return None if h is None else torch.as_tensor(h)


def _compare(hits, groups, split: str, a: str, b: str, rule: Rule,
             scale: float = 1.0) -> Bootstrap:
    """Bootstrap of mean(a) - scale * mean(b) on ``split``, resampling its people."""
    ha, hb = _hits(hits, a, split), _hits(hits, b, split)
    if ha is None or hb is None:
        missing = a if ha is None else b
        raise ValueError(f"the verdict needs per-fact {split} hits of {missing!r}; have "
                         f"{sorted(hits)} (the behaviour suite records them)")
    g = list(groups[split])
    if not len(ha) == len(hb) == len(g):
        raise ValueError(f"{split}: {len(ha)} hits of {a!r}, {len(hb)} of {b!r} and {len(g)} "
                         f"groups: the comparison is paired, the same facts on both models")
    return group_bootstrap(ha, hb, g, scale=scale, n_boot=rule.n_boot, seed=rule.seed)


def grid_bootstrap(grid: AttackGrid, label: str, rule: Rule,
                   reference: str = "oracle") -> Bootstrap | None:
    """Paired per-person bootstrap of the worst ``label`` - ``reference`` gap over the pooled
    grid (:meth:`AttackGrid.pooled`: every learning rate's seeds pooled, every budget): one
    resample of the people serves every setting. None when a curve carries no per-fact hits."""
    a, b, groups, rows = [], [], [], []
    for p in grid.points:
        e, o = p.curves.curves[label], p.curves.curves[reference]
        if not e.hits or not o.hits:
            return None
        for j in range(len(e.x)):
            if e.groups[j] != o.groups[j]:
                raise ValueError(f"attack setting lr {p.lr} seed {p.seed}, budget {e.x[j]!r}: "
                                 f"{label!r} and {reference!r} were measured on different facts;"
                                 f" every model runs the same setting on the same people")
            a += e.hits[j]
            b += o.hits[j]
            groups += e.groups[j]
            rows += [(p.lr, j)] * len(e.hits[j])  # a learning rate's seeds pooled
    return group_bootstrap(torch.tensor(a), torch.tensor(b), groups, rows, n_boot=rule.n_boot,
                           seed=rule.seed)


def auc_bootstrap(scores_a: tuple, scores_b: tuple, pos_groups: Sequence,
                  neg_groups: Sequence, n_boot: int = 2000, seed: int = 0) -> Bootstrap:
    """Paired bootstrap of ``AUC(a) - AUC(b)``, each the membership AUC of ``(positive scores,
    negative scores)`` (forget vs holdout facts, the same facts on both models). The people of
    each class are resampled with replacement (positives and negatives independently, the same
    draw for both models). Vectorised: the pairwise comparisons are summed per (positive person,
    negative person) once; each resample is two matrix products with its draw counts."""
    (pa, na), (pb, nb) = scores_a, scores_b
    pa, na, pb, nb = (torch.as_tensor(x, dtype=torch.float64).reshape(-1)
                      for x in (pa, na, pb, nb))
    if not (len(pa) == len(pb) == len(pos_groups) and len(na) == len(nb) == len(neg_groups)):
        raise ValueError(f"auc_bootstrap: {len(pa)} / {len(pb)} positive scores for "
                         f"{len(pos_groups)} groups, {len(na)} / {len(nb)} negative for "
                         f"{len(neg_groups)}: the comparison is paired, the same facts on both")

    def wins(p: torch.Tensor, n: torch.Tensor) -> torch.Tensor:  # [P, N]: 1, 0.5 (tie), 0
        d = p[:, None] - n[None, :]
        return (d > 0).double() + 0.5 * (d == 0).double()

    gp = {g: i for i, g in enumerate(dict.fromkeys(pos_groups))}
    gn = {g: i for i, g in enumerate(dict.fromkeys(neg_groups))}
    ip = torch.zeros(len(gp), len(pa), dtype=torch.float64)
    ip[[gp[g] for g in pos_groups], torch.arange(len(pa))] = 1
    jn = torch.zeros(len(gn), len(na), dtype=torch.float64)
    jn[[gn[g] for g in neg_groups], torch.arange(len(na))] = 1
    G = ip @ (wins(pa, na) - wins(pb, nb)) @ jn.T  # [groups+, groups-]
    n_p, n_n = ip.sum(1), jn.sum(1)
    est = float(G.sum() / (len(pa) * len(na)))
    cp = resample_counts(len(gp), n_boot, seed)
    cn = resample_counts(len(gn), n_boot, seed + 1)
    samples = ((cp @ G) * cn).sum(1) / ((cp @ n_p) * (cn @ n_n))
    return Bootstrap(est, samples, len(gp) + len(gn))


def two_sample_bootstrap(a, groups_a: Sequence, b, groups_b: Sequence, rows_a=None,
                         rows_b=None, *, n_boot: int = 2000, seed: int = 0) -> Bootstrap:
    """Unpaired bootstrap of ``max over rows [mean(a) - mean(b)]`` where ``a`` and ``b`` are
    measured on different items (the forget facts and the never-known facts): the groups of
    ``a`` and those of ``b`` are resampled with replacement independently (seeds ``seed`` and
    ``seed + 1``), each draw the same for every row. ``rows_*``: a row label per item (e.g.
    (setting, budget) of an attack curve; default: one row); rows where either side drew no
    item are skipped."""
    def cells(v, groups, rows):
        v = torch.as_tensor(v, dtype=torch.float64).reshape(-1)
        rows = [0] * len(v) if rows is None else list(rows)
        if not len(v) == len(groups) == len(rows) or not len(v):
            raise ValueError(f"two_sample_bootstrap: {len(v)} values, {len(groups)} groups and "
                             f"{len(rows)} row labels; give one of each per item (at least one)")
        return v, list(groups), rows

    a, ga, ra = cells(a, groups_a, rows_a)
    b, gb, rb = cells(b, groups_b, rows_b)
    rid = {r: i for i, r in enumerate(dict.fromkeys(ra + rb))}

    def sums(v, groups, rows):  # [G, R] sums and counts per (group, row)
        gid = {g: i for i, g in enumerate(dict.fromkeys(groups))}
        flat = torch.tensor([gid[g] * len(rid) + rid[r] for g, r in zip(groups, rows)])
        s = torch.zeros(len(gid) * len(rid), dtype=torch.float64).index_add_(0, flat, v)
        n = torch.zeros(len(gid) * len(rid), dtype=torch.float64).index_add_(
            0, flat, torch.ones_like(v))
        return s.reshape(len(gid), -1), n.reshape(len(gid), -1)

    sa, na = sums(a, ga, ra)
    sb, nb = sums(b, gb, rb)

    def stat(wa, wb):  # group weights [K, Ga], [K, Gb] -> [K]
        da, db = wa @ na, wb @ nb
        ok = (da > 0) & (db > 0)
        diff = (wa @ sa) / da.clamp(min=1e-300) - (wb @ sb) / db.clamp(min=1e-300)
        return torch.where(ok, diff, torch.full_like(diff, -math.inf)).amax(1)

    est = float(stat(torch.ones(1, len(sa), dtype=torch.float64),
                     torch.ones(1, len(sb), dtype=torch.float64))[0])
    samples = stat(resample_counts(len(sa), n_boot, seed),
                   resample_counts(len(sb), n_boot, seed + 1))
    return Bootstrap(est, samples, len(sa) + len(sb))


def comparator_bootstrap(grid: AttackGrid, label: str, rule: Rule,
                         reference: str = "comparator") -> Bootstrap | None:
    """Unpaired bootstrap (:func:`two_sample_bootstrap`) of the worst ``label`` - ``reference``
    gap over the pooled grid (every learning rate's seeds pooled, every budget), the two curves
    measured on different facts. None when a curve carries no per-fact hits."""
    parts: dict[str, tuple[list, list, list]] = {label: ([], [], []), reference: ([], [], [])}
    for p in grid.points:
        for lab, (v, g, r) in parts.items():
            c = p.curves.curves[lab]
            if not c.hits:
                return None
            for j in range(len(c.x)):
                v += c.hits[j]
                g += c.groups[j]
                r += [(p.lr, j)] * len(c.hits[j])  # a learning rate's seeds pooled
    (a, ga, ra), (b, gb, rb) = parts[label], parts[reference]
    return two_sample_bootstrap(a, ga, b, gb, ra, rb, n_boot=rule.n_boot, seed=rule.seed)


def _where(grid: AttackGrid, label: str, reference: str = "oracle") -> str:
    p = grid.worst(label, reference)
    _, at = p.curves.gap(label, reference)
    parts = [] if p.lr is None else [f"lr {p.lr:g}"]
    if p.pooled:  # in-context relearning's folds are pooled without a learning rate
        parts.append(f"seeds {', '.join(map(str, p.pooled))} pooled")
    elif p.lr is not None:
        parts.append(f"seed {p.seed}")
    return "".join(f"{x}, " for x in parts) + f"{p.curves.xlabel} = {at}"


def decide(metrics: Mapping[str, Mapping[str, float]], hits: Mapping[str, Mapping],
           groups: Mapping[str, Sequence], grids: Mapping[str, AttackGrid], label: str,
           original_label: str, rule: Rule = Rule(),
           params_changed: float | None = None,
           scores: Mapping[str, tuple] | None = None,
           probe: Mapping[str, Mapping[str, Any]] | None = None) -> Judgement:
    """Apply the rule to ``label`` beside ``"oracle"`` and ``original_label``.

    ``metrics[model]``: behaviour metrics (``perplexity``; ``mia_auc_loss`` from the privacy
    suite). ``hits[model][split]``: per-fact correctness (``[n]`` bool) of the behaviour splits
    (forget, retain, shared, neighbors), ``groups[split]`` the person (owner) of each fact.
    ``grids[attack]``: each attack's grid with curves for ``label``, ``"oracle"`` and (for the
    flags) the original. ``params_changed``: the fraction of weights the edit changed (issue 8's
    bar; None: not known). ``scores[model]``: per-fact membership scores ``(forget, holdout)``
    (the privacy suite records them); with them the membership check is a paired per-person
    bootstrap of the AUC difference (``groups["forget"]``, ``groups["holdout"]``), without them
    the point estimate decides. ``probe[model]``: the leave-one-out probe's best-depth numbers
    (``best``, ``depth``, ``null``, ``null_hi``; ``probes.suites.probe_inputs`` reads them from
    the ``loo_probe`` suite), None where it did not run: the ``probe`` check
    (:func:`probe_check`)."""
    if "oracle" not in metrics and any("comparator" in g.labels for g in grids.values()):
        return decide_comparator(metrics, hits, groups, grids, label, original_label, rule,
                                 params_changed, scores, probe=probe)
    for need in (label, "oracle", original_label):
        if need not in metrics or "forget_recall" not in metrics[need]:
            raise ValueError(f"the verdict needs forget recall of {need!r}; have "
                             f"{sorted(metrics)} (pass oracle= and original= to verify)")
    lvl = rule.confidence
    m, o, z = metrics[label], metrics["oracle"], metrics[original_label]
    checks: dict[str, dict[str, Any]] = {}

    # 1. the utility gate, against the oracle or the original (whichever the model is closer
    #    to: both are acceptable utility; see the module docstring)
    for split, key in GATE_SPLITS.items():
        if _hits(hits, label, split) is None or not len(_hits(hits, label, split)):
            continue  # neighbors only where the request has them
        refs = [r for r in ("oracle", original_label) if _hits(hits, r, split) is not None]
        lows = {r: _compare(hits, groups, split, label, r, rule, scale=rule.utility).lower(lvl)
                for r in refs}
        ref = max(refs, key=lambda r: lows[r])
        checks[f"utility_{split}"] = {
            "model": m.get(key), "oracle": o.get(key), "original": z.get(key),
            "reference": ref, "lower": lows[ref], "ok": lows[ref] >= 0,
            "need": f"lower bound of model - {rule.utility:g} x reference >= 0 (the oracle "
                    f"or the original)"}
    pm, po = m.get("perplexity", math.nan), o.get("perplexity", math.nan)
    pz = z.get("perplexity", math.nan)
    ref_ppl = max((v for v in (po, pz) if math.isfinite(v) and v > 0), default=math.nan)
    if math.isfinite(pm) and math.isfinite(ref_ppl):  # a request without general text
        ratio = pm / ref_ppl                            # has no perplexity to gate
        checks["utility_perplexity"] = {
            "model": pm, "oracle": po, "original": pz, "ratio": ratio,
            "reference": "oracle" if ref_ppl == po else original_label,
            "ok": ratio <= 1 + rule.perplexity,
            "need": f"model / the larger of the oracle's and the original's <= "
                    f"{1 + rule.perplexity:g}"}
    gate = all(c["ok"] for k, c in checks.items() if k.startswith("utility_"))

    # 2. did it forget at all (against the original)
    bs = _compare(hits, groups, "forget", original_label, label, rule)
    lo = bs.lower(lvl)
    checks["forgot"] = {"model": m["forget_recall"], "original": z["forget_recall"],
                        "drop": bs.estimate, "lower": lo, "ok": lo > rule.margin,
                        "need": f"lower bound of original - model > {rule.margin:g}"}

    # 3. deletion: forget recall, membership, attacks, against the oracle
    bs = _compare(hits, groups, "forget", label, "oracle", rule)
    hi = bs.upper(lvl)
    checks["forget_vs_oracle"] = {"model": m["forget_recall"], "oracle": o["forget_recall"],
                                  "gap": bs.estimate, "lower": bs.lower(lvl), "upper": hi,
                                  "ok": hi <= rule.margin, "fails": bs.lower(lvl) > rule.margin,
                                  "limit": rule.margin, "people": bs.n_groups,
                                  "need": f"upper bound of model - oracle <= {rule.margin:g}"}
    am, ao = m.get("mia_auc_loss"), o.get("mia_auc_loss")
    if am is None or ao is None or math.isnan(am) or math.isnan(ao):
        checks["mia_vs_oracle"] = {"ok": False, "fails": False,
                                   "why": "membership AUC not measured (the privacy suite "
                                          "needs the request's holdout split)"}
    elif scores and label in scores and "oracle" in scores and "holdout" in groups:
        bs = auc_bootstrap(scores[label], scores["oracle"], groups["forget"], groups["holdout"],
                           rule.n_boot, rule.seed)
        lo, hi = bs.lower(lvl), bs.upper(lvl)
        checks["mia_vs_oracle"] = {
            "model": am, "oracle": ao, "diff": am - ao, "lower": lo, "upper": hi,
            "ok": lo <= rule.mia and hi >= -rule.mia,
            "need": f"model - oracle not credibly outside +-{rule.mia:g} (lower bound <= "
                    f"{rule.mia:g} and upper bound >= -{rule.mia:g})"}
    else:
        checks["mia_vs_oracle"] = {"model": am, "oracle": ao, "diff": am - ao,
                                   "ok": abs(am - ao) <= rule.mia,
                                   "need": f"|model - oracle| <= {rule.mia:g}"}
    pc = probe_check(probe, label, original_label, rule, oracle="oracle")
    if pc is not None:
        checks["probe"] = pc
    for name, g in grids.items():
        checks[f"attack_{name}"] = _attack_check(
            g, label, grid_bootstrap(g, label, rule), rule, "oracle",
            f"upper bound of the worst gap <= {rule.tolerance:g}")
    v = verdict_of(gate, checks, ORACLE_CHECKS)
    people_to_decide(checks)  # (decide_comparator does not: its forget interval is unpaired)
    return Judgement(v, rule.text(list(grids)), checks,
                     bar(metrics, grids, label, params_changed))


def probe_check(probe: Mapping[str, Mapping[str, Any]] | None, label: str,
                original_label: str, rule: Rule = Rule(),
                oracle: str | None = "oracle") -> dict[str, Any] | None:
    """The leave-one-out probe's part of the deletion rule; None when the probe did not run.

    ``probe[model]``: ``best`` (the largest balanced leave-one-person-out accuracy over depths,
    forget vs holdout facts), ``depth``, and ``null_hi`` (the 95th percentile of that model's
    best-depth permutation null: each permutation's largest accuracy over depths).

    Positive control, on this request: the original - which knows the forget facts - must read
    above its own ``null_hi``. Where it does not, the probe cannot see these facts, and an
    edited model reading at its null would prove nothing: the check is recorded with ``"used":
    False``, ``ok`` None and why, and decides nothing.

    Where the control passes, the model must read at or below ``limit``: with an oracle the
    larger of its own ``null_hi`` and the oracle's ``best`` + ``rule.tolerance``; without one
    (or where the probe did not measure it) its own ``null_hi``. Why the larger of the two: the
    oracle - retraining without the forget people, the reference of deletion - may itself read
    above its null (the forget and holdout people can differ in ways a probe sees without any
    memory of the facts), and a model that reads like retraining is as deleted as retraining
    makes it, so holding it to the null alone would call the oracle itself "suppressed"; a
    model at its null has nothing left to read, whatever the oracle reads. ``tolerance`` is the
    slack every attack gap gets. Both numbers are point estimates: the permutation null is the
    comparison's own uncertainty (no bootstrap)."""
    if probe is None:
        return None
    need = ("where the original reads above its best-depth null p95: model best <= "
            + (f"max(its best-depth null p95, oracle best + {rule.tolerance:g})" if oracle
               else "its best-depth null p95"))
    missing = [k for k in (original_label, label)
               if k not in probe or probe[k].get("best") is None]
    if missing:
        return {"used": False, "ok": None, "need": need,
                "why": f"the probe did not measure {missing[0]!r} (have {sorted(probe)})"}
    z, m = probe[original_label], probe[label]
    if z.get("null_hi") is None or m.get("null_hi") is None:
        return {"used": False, "ok": None, "need": need,
                "why": "the probe ran without a permutation null (loo_null=0): its control "
                       "cannot be read"}
    c: dict[str, Any] = {"model": m["best"], "depth": m.get("depth"), "null_hi": m["null_hi"],
                         "original": z["best"], "original_depth": z.get("depth"),
                         "original_null_hi": z["null_hi"]}
    if not z["best"] > z["null_hi"]:
        return c | {"used": False, "ok": None, "need": need,
                    "why": f"the probe reads at its null on the original (best {z['best']:.3f} "
                           f"vs null p95 {z['null_hi']:.3f}): it cannot see this request's "
                           f"facts"}
    limit, ref = m["null_hi"], "own null p95"
    if oracle and probe.get(oracle, {}).get("best") is not None:
        o = probe[oracle]["best"]
        c["oracle"] = o
        if o + rule.tolerance > limit:
            limit, ref = o + rule.tolerance, f"oracle + {rule.tolerance:g}"
    return c | {"limit": limit, "reference": ref, "used": True, "ok": m["best"] <= limit,
                "need": need}


def _attack_check(g: AttackGrid, label: str, bs, rule: Rule, reference: str,
                  need: str) -> dict[str, Any]:
    """One attack's deletion check: the worst gap of ``label`` above ``reference`` over the
    grid, and the bootstrap's upper bound ``bs`` (None: no per-fact hits, no interval)."""
    c: dict[str, Any] = {"worst_gap": g.worst_gap(label, reference),
                         "at": _where(g, label, reference)}
    if reference != "oracle":
        c["reference"] = reference
    c |= {"settings": len(g.points), "flagged": sum(p.flagged for p in g.points)}
    if bs is None:  # no interval: the point estimate can show a failure, never a pass
        c |= {"ok": False, "fails": c["worst_gap"] > rule.tolerance,
              "why": "no per-fact hits on the curves: no interval"}
    else:
        c |= {"gap": bs.estimate, "lower": bs.lower(rule.confidence),
              "upper": bs.upper(rule.confidence), "limit": rule.tolerance,
              "people": bs.n_groups,
              "ok": bs.upper(rule.confidence) <= rule.tolerance,
              "fails": bs.lower(rule.confidence) > rule.tolerance}
    return c | {"need": need}


def people_needed(gap: float, lower: float, upper: float, limit: float, n: int) -> int | None:
    """About how many people would decide an open one-sided check ("gap <= limit", its
    bootstrap interval ``[lower, upper]`` over ``n`` people straddling ``limit``) at the same
    gap: a bootstrap interval's half-width shrinks as 1/sqrt(people), so the side of the
    interval facing the limit reaches it at ``n * (half-width / distance)^2`` people - the
    upper bound falls to the limit where ``gap < limit`` (it would pass), the lower bound rises
    to it where ``gap > limit`` (it would credibly fail); at least ``n + 1``. None where the
    gap sits on the limit (no number of people decides it), the interval does not straddle it,
    a number is not finite or ``n`` is not positive. "Half-width": the distance from the gap
    to the bound facing the limit."""
    if not all(map(math.isfinite, (gap, lower, upper, limit))) or not n > 0:
        return None
    if not lower <= limit < upper or gap == limit:
        return None
    # the bound facing the limit lies beyond it, so both distances are positive
    width, dist = (upper - gap, limit - gap) if gap < limit else (gap - lower, gap - limit)
    return max(n + 1, math.ceil(n * (width / dist) ** 2))


def people_to_decide(checks: Mapping[str, dict]) -> None:
    """Annotate every open check (neither ``ok`` nor ``fails``) that has a paired interval over
    ``people`` people, its ``gap`` and its ``limit`` with ``people_to_decide``
    (:func:`people_needed`): what "the request's people cannot decide" would take, an estimate
    at the same gap, not a promise. Against a retrain oracle only: without one the forget
    interval is unpaired, over the forget people and the never-known facts at once."""
    for c in checks.values():
        if c.get("ok") or c.get("fails", True):
            continue
        if all(k in c for k in ("gap", "lower", "upper", "limit", "people")):
            c["people_to_decide"] = people_needed(c["gap"], c["lower"], c["upper"],
                                                  c["limit"], c["people"])


def verdict_of(gate: bool, checks: Mapping[str, Mapping], deletion: Sequence[str]) -> str:
    """The rule's order: damaged (gate), not forgotten, deleted (every check named in
    ``deletion`` and every attack passes; a check marked ``"used": False`` - the probe where
    its control fails - decides nothing), suppressed (one of them credibly fails: its
    ``fails``, or for a check without that field - a point check - not ``ok``), else
    inconclusive."""
    if not gate:
        return "damaged"
    if not checks["forgot"]["ok"]:
        return "not forgotten"
    used = [c for k, c in checks.items()
            if (k in deletion or k.startswith("attack_")) and c.get("used", True)]
    if all(c["ok"] for c in used):
        return "deleted"
    if any(c.get("fails", not c["ok"]) for c in used):
        return "suppressed"
    return "inconclusive"


def decide_comparator(metrics: Mapping[str, Mapping[str, float]], hits: Mapping[str, Mapping],
                      groups: Mapping[str, Sequence], grids: Mapping[str, AttackGrid],
                      label: str, original_label: str, rule: Rule = Rule(),
                      params_changed: float | None = None,
                      scores: Mapping[str, tuple] | None = None,
                      reference: str = "comparator",
                      probe: Mapping[str, Mapping[str, Any]] | None = None) -> Judgement:
    """Apply the no-oracle rule (:meth:`Rule.text_comparator`) to ``label`` beside
    ``original_label`` and the comparator: the never-known facts (the request's holdout split,
    ``hits[original_label]["holdout"]``) and their attack curves (``reference`` in every grid).
    Arguments as :func:`decide`; ``scores[label]``: the model's per-fact membership scores
    ``(forget, never-known)``; ``probe``: as :func:`decide`'s, read without an oracle (the
    model at or below its own best-depth null)."""
    for need in (label, original_label):
        if need not in metrics or "forget_recall" not in metrics[need]:
            raise ValueError(f"the verdict needs forget recall of {need!r}; have "
                             f"{sorted(metrics)} (pass original= to verify)")
    never = _hits(hits, original_label, "holdout")
    if never is None or not len(never) or not len(groups.get("holdout", ())):
        raise ValueError("a verdict without a retrain oracle needs never-known facts: the "
                         "request's holdout split (facts the model does not produce, or "
                         "fictitious ones), measured on the original by the behaviour suite")
    bad = [n for n, g in grids.items() if reference not in g.labels]
    if bad:
        raise ValueError(f"attack {bad[0]!r} has no {reference!r} curves (labels "
                         f"{list(grids[bad[0]].labels)}); without an oracle every attack runs "
                         f"on the comparator too (probes.attacks.run_comparator_grid)")
    lvl = rule.confidence
    m, z = metrics[label], metrics[original_label]
    checks: dict[str, dict[str, Any]] = {}

    # 1. the utility gate, against the original
    for split, key in GATE_SPLITS.items():
        h = _hits(hits, label, split)
        if h is None or not len(h) or _hits(hits, original_label, split) is None:
            continue
        lo = _compare(hits, groups, split, label, original_label, rule,
                      scale=rule.utility).lower(lvl)
        checks[f"utility_{split}"] = {
            "model": m.get(key), "original": z.get(key), "reference": original_label,
            "lower": lo, "ok": lo >= 0,
            "need": f"lower bound of model - {rule.utility:g} x original >= 0"}
    pm, pz = m.get("perplexity", math.nan), z.get("perplexity", math.nan)
    if math.isfinite(pm) and math.isfinite(pz) and pz > 0:
        checks["utility_perplexity"] = {
            "model": pm, "original": pz, "ratio": pm / pz, "reference": original_label,
            "ok": pm / pz <= 1 + rule.perplexity,
            "need": f"model / original <= {1 + rule.perplexity:g}"}
    gate = all(c["ok"] for k, c in checks.items() if k.startswith("utility_"))

    # 2. did it forget at all (against the original)
    bs = _compare(hits, groups, "forget", original_label, label, rule)
    checks["forgot"] = {"model": m["forget_recall"], "original": z["forget_recall"],
                        "drop": bs.estimate, "lower": bs.lower(lvl),
                        "ok": bs.lower(lvl) > rule.margin,
                        "need": f"lower bound of original - model > {rule.margin:g}"}

    # 3. deletion: against the never-known facts
    bs = two_sample_bootstrap(_hits(hits, label, "forget"), list(groups["forget"]), never,
                              list(groups["holdout"]), n_boot=rule.n_boot, seed=rule.seed)
    checks["forget_vs_never_known"] = {
        "model": m["forget_recall"], "never_known": float(never.float().mean()),
        "gap": bs.estimate, "lower": bs.lower(lvl), "upper": bs.upper(lvl),
        "ok": bs.upper(lvl) <= rule.margin, "fails": bs.lower(lvl) > rule.margin,
        "need": f"upper bound of model forget recall - original's never-known recall <= "
                f"{rule.margin:g}"}
    am = m.get("mia_auc_loss")
    if am is None or math.isnan(am):
        checks["mia_vs_never_known"] = {"ok": False, "fails": False,
                                        "why": "membership AUC not measured (the privacy "
                                               "suite needs the request's holdout split)"}
    elif scores and label in scores:
        pos, neg = (torch.as_tensor(x).reshape(-1) for x in scores[label])
        half = (torch.zeros(len(pos)), torch.zeros(len(neg)))  # every pair a tie: AUC 0.5
        bs = auc_bootstrap(scores[label], half, groups["forget"], groups["holdout"],
                           rule.n_boot, rule.seed)
        lo, hi = bs.lower(lvl), bs.upper(lvl)
        checks["mia_vs_never_known"] = {
            "model": am, "reference": 0.5, "diff": am - 0.5, "lower": lo, "upper": hi,
            "ok": lo <= rule.mia and hi >= -rule.mia,
            "need": f"model AUC - 0.5 not credibly outside +-{rule.mia:g}"}
    else:
        checks["mia_vs_never_known"] = {"model": am, "reference": 0.5, "diff": am - 0.5,
                                        "ok": abs(am - 0.5) <= rule.mia,
                                        "need": f"|model AUC - 0.5| <= {rule.mia:g}"}
    pc = probe_check(probe, label, original_label, rule, oracle=None)
    if pc is not None:
        checks["probe"] = pc
    for name, g in grids.items():
        checks[f"attack_{name}"] = _attack_check(
            g, label, comparator_bootstrap(g, label, rule, reference), rule, reference,
            f"upper bound of the worst gap above the comparator <= {rule.tolerance:g}")
    v = verdict_of(gate, checks, ("forget_vs_never_known", "mia_vs_never_known", "probe"))
    return Judgement(v, rule.text_comparator(list(grids)), checks,
                     {"(issue 8's bar needs a retrain oracle)": {"value": params_changed,
                                                                 "ok": None}})


def bar(metrics: Mapping[str, Mapping[str, float]], grids: Mapping[str, AttackGrid],
        label: str, params_changed: float | None = None) -> dict[str, dict[str, Any]]:
    """Issue 8's bar, point estimates: forget <= oracle + 2 pt, membership AUC within 0.05 of
    the oracle's, relearning (worst gap over its grid) <= oracle + 5 pt, <= 1% of parameters.
    ``ok`` is None where the input was not measured."""
    m, o = metrics[label], metrics["oracle"]
    f = m["forget_recall"] - o["forget_recall"]
    am, ao = m.get("mia_auc_loss"), o.get("mia_auc_loss")
    mia = None if am is None or ao is None else am - ao
    rl = grids["relearn"].worst_gap(label) if "relearn" in grids else None
    return {
        "forget <= oracle + 2pt": {"value": f, "ok": f <= 0.02},
        "MIA within 0.05 of oracle": {"value": mia,
                                      "ok": None if mia is None else abs(mia) <= 0.05},
        "relearn <= oracle + 5pt": {"value": rl, "ok": None if rl is None else rl <= 0.05},
        "<= 1% params": {"value": params_changed,
                         "ok": None if params_changed is None else params_changed <= 0.01},
    }


def groups_of(request) -> dict[str, list]:
    """The person (owner) of every fact of each behaviour split: what the bootstrap resamples."""
    from excise.request import owner

    return {split: [owner(f) for f in getattr(request, split)]
            for split in ("forget", "retain", "holdout", "shared", "paraphrase", "neighbors")}


def params_changed(model, original) -> float:
    """The fraction of weights of ``model`` that differ from ``original``'s (same layout)."""
    a, b = model.named_parameters(), original.named_parameters()
    n = changed = 0
    with torch.no_grad():
        for k, p in a.items():
            q = b[k]
            n += p.numel()
            changed += int((p != q.to(p.device)).sum())
    return changed / max(1, n)
