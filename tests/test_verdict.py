"""The verdict rule (probes.verdict) and the attacker-hygiene grid (probes.attacks.run_grid).

Most tests build the rule's inputs by hand (per-fact hits per person, attack grids), so the right
answer is known; the bootstrap is checked against a plain loop over resamples written here; two
tests run the rule end to end on the tiny organism (the original is "not forgotten", the oracle
judged against itself is "deleted"), and the grid on the tiny organism runs identical settings on
every model.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

import probes
from excise.report import AttackCurves, AttackGrid, Curve, GridPoint, Report
from probes import attacks as A
from probes.stats import group_bootstrap, resample_counts
from probes.verdict import VERDICTS, Rule, decide

RULE = Rule(n_boot=2000, seed=0)


# -- the bootstrap against a plain loop -------------------------------------------------------
def _slow_bootstrap(a, b, groups, rows, scale, n_boot, seed):
    """Resample the groups with replacement (the helper's documented draws), rebuild the data
    from the drawn groups' items, take the mean difference per row and the largest row."""
    order = list(dict.fromkeys(groups))
    draws = torch.randint(len(order), (n_boot, len(order)),
                          generator=torch.Generator().manual_seed(seed))
    out = []
    for r in range(n_boot):
        per_row: dict = {}
        for gi in draws[r].tolist():
            g = order[gi]
            for i in range(len(a)):
                if groups[i] == g:
                    per_row.setdefault(rows[i], []).append((float(a[i]), float(b[i])))
        diffs = []
        for items in per_row.values():
            ma = sum(x for x, _ in items) / len(items)
            mb = sum(y for _, y in items) / len(items)
            diffs.append(ma - scale * mb)
        out.append(max(diffs))
    return torch.tensor(out, dtype=torch.float64)


def test_group_bootstrap_matches_a_plain_loop():
    g = torch.Generator().manual_seed(1)
    n = 60
    a = (torch.rand(n, generator=g) > 0.4).float()
    b = (torch.rand(n, generator=g) > 0.7).float()
    people = [f"p{int(i)}" for i in torch.randint(0, 7, (n,), generator=g)]
    rows = [int(i) for i in torch.randint(0, 3, (n,), generator=g)]
    fast = group_bootstrap(a, b, people, rows, scale=0.9, n_boot=300, seed=5)
    slow = _slow_bootstrap(a, b, people, rows, 0.9, 300, 5)
    assert torch.allclose(fast.samples, slow, atol=1e-12)
    assert fast.upper(0.9) == pytest.approx(float(torch.quantile(slow, 0.9)))
    assert fast.lower(0.9) == pytest.approx(float(torch.quantile(slow, 0.1)))
    plain = max(
        sum(float(a[i]) for i in range(n) if rows[i] == r) / rows.count(r)
        - 0.9 * sum(float(b[i]) for i in range(n) if rows[i] == r) / rows.count(r)
        for r in set(rows))
    assert fast.estimate == pytest.approx(plain)
    assert fast.n_groups == len(set(people))
    counts = resample_counts(7, 300, 5)
    assert counts.shape == (300, 7) and bool((counts.sum(1) == 7).all())


def test_group_bootstrap_without_rows_is_a_difference_of_means():
    a = torch.tensor([1.0, 1.0, 0.0, 1.0])
    b = torch.tensor([0.0, 1.0, 0.0, 0.0])
    bs = group_bootstrap(a, b, [0, 0, 1, 2], n_boot=50)
    assert bs.estimate == pytest.approx(0.75 - 0.25)
    same = group_bootstrap(a, a, [0, 0, 1, 2], n_boot=50)
    assert bool((same.samples == 0).all()) and same.upper(0.9) == 0.0
    with pytest.raises(ValueError, match="matching non-empty"):
        group_bootstrap(a, b[:3], [0, 0, 1, 2])


# -- constructed inputs ------------------------------------------------------------------------
def _people_hits(per_person: list[list[int]]) -> tuple[list[bool], list[tuple]]:
    hits, groups = [], []
    for p, facts in enumerate(per_person):
        hits += [bool(v) for v in facts]
        groups += [(0, p, "")] * len(facts)
    return hits, groups


def _curve(budgets: list[list[list[int]]], xs=None) -> Curve:
    """A curve from per-budget, per-person hit lists."""
    hs, gs = zip(*(_people_hits(b) for b in budgets))
    xs = list(range(len(budgets))) if xs is None else xs
    return Curve(xs, [sum(h) / len(h) for h in hs], "steps", hits=hs, groups=gs)


def _flat(n_people: int, n_facts: int, correct: int) -> list[list[int]]:
    return [[1] * correct + [0] * (n_facts - correct) for _ in range(n_people)]


def _grid(edited: list[list[list[int]]], oracle, original=None, lr=1e-3, seed=0,
          flagged=False) -> GridPoint:
    curves = {"after": _curve(edited), "oracle": _curve(oracle)}
    if original is not None:
        curves["before"] = _curve(original)
    return GridPoint(lr, seed, AttackCurves(curves), flagged)


def _inputs(forget=0.0, retain=1.0, shared=1.0, ppl=1.0, mia=0.55, relearn=None,
            n_people=5):
    """Metrics, per-fact hits and groups of three models: the oracle (forget recall 0, retain
    and shared 1, perplexity 20, MIA AUC 0.55), the original (remembers everything) and the model
    under test ("after") with the given recall fractions (of 20 facts per person), perplexity
    ratio and MIA AUC. ``relearn``: the after-model's held-out recall per person under relearning
    (5 facts per person; the oracle recovers nothing)."""
    n = 20

    def split(frac):
        return _people_hits(_flat(n_people, n, round(frac * n)))

    hits, metrics = {}, {}
    for lab, (f, r, s, p, m) in {"oracle": (0.0, 1.0, 1.0, 1.0, 0.55),
                                 "before": (1.0, 1.0, 1.0, 0.98, 1.0),
                                 "after": (forget, retain, shared, ppl, mia)}.items():
        hs = {"forget": split(f), "retain": split(r), "shared": split(s)}
        hits[lab] = {k: torch.tensor(v[0]) for k, v in hs.items()}
        metrics[lab] = {"forget_recall": float(hits[lab]["forget"].float().mean()),
                        "retain_recall": float(hits[lab]["retain"].float().mean()),
                        "shared_recall": float(hits[lab]["shared"].float().mean()),
                        "perplexity": 20.0 * p, "mia_auc_loss": m}
    groups = {k: split(0.0)[1] for k in ("forget", "retain", "shared")}
    rl = relearn if relearn is not None else [[0] * 5] * n_people
    zero = [[0] * 5] * n_people
    grids = {"relearn": AttackGrid((_grid([zero, rl], [zero, zero]),), "relearn_lr")}
    return metrics, hits, groups, grids


def _decide(metrics, hits, groups, grids, rule=RULE, **kw):
    return decide(metrics, hits, groups, grids, "after", "before", rule, **kw)


@pytest.mark.parametrize("kw, want", [
    ({}, "deleted"),
    ({"relearn": [[1, 1, 1, 0, 0]] * 5}, "suppressed"),   # relearning brings back 0.6
    ({"forget": 0.3}, "suppressed"),                       # forgot some, not all
    ({"retain": 0.85}, "damaged"),                         # forgot, broke retain
    ({"ppl": 1.10}, "damaged"),                            # perplexity 10% above the oracle's
    ({"ppl": 1.061}, "deleted"),   # a second retraining's perplexity on small (seed noise)
    ({"shared": 0.9}, "damaged"),
    ({"forget": 1.0}, "not forgotten"),
    ({"forget": 0.97}, "not forgotten"),                   # within the margin of the original
])
def test_every_verdict_is_reachable(kw, want):
    j = _decide(*_inputs(**kw))
    assert j.verdict == want
    assert j.verdict in VERDICTS
    assert "damaged" in j.rule and "bootstrap" in j.rule and "oracle" in j.rule


def test_over_forgotten_model_with_broken_utility_is_damaged_not_deleted():
    """Issue 14: global NPO forgot everything (recall at the oracle's, no attack brings it back)
    but lost retain recall (0.89) - the old rule called it deleted."""
    j = _decide(*_inputs(forget=0.0, retain=0.89))
    assert j.verdict == "damaged"
    assert j.checks["forget_vs_oracle"]["ok"] and j.checks["attack_relearn"]["ok"]
    assert not j.checks["utility_retain"]["ok"]


@pytest.mark.parametrize("auc, ok", [(0.55, True), (0.59, True), (0.62, False), (0.07, False),
                                     (0.51, True), (0.48, False)])
def test_membership_check_is_two_sided(auc, ok):
    """AUC far below the oracle's (over-forgetting: the forget facts now look *less* familiar
    than strangers) fails as surely as AUC far above it."""
    j = _decide(*_inputs(mia=auc))
    assert j.checks["mia_vs_oracle"]["ok"] == ok
    assert j.verdict == ("deleted" if ok else "suppressed")


def test_a_gap_decided_by_one_person_out_of_five_does_not_pass():
    """Two models with the same mean relearning gap (0.08, under the 0.1 tolerance): spread
    evenly over the five held-out people it passes; carried by one person it does not - the
    upper bound of the bootstrap sees that resampling that person twice doubles the gap."""
    even = [[1, 1] + [0] * 23] * 5                       # every person 2 of 25 back: 0.08
    one = [[1] * 10 + [0] * 15] + [[0] * 25] * 4         # one person 10 of 25 back: 0.08
    zero = [[0] * 25] * 5
    out = {}
    for name, edited in (("even", even), ("one", one)):
        metrics, hits, groups, _ = _inputs()
        grids = {"relearn": AttackGrid((_grid([zero, edited], [zero, zero]),), "relearn_lr")}
        out[name] = _decide(metrics, hits, groups, grids)
        assert out[name].checks["attack_relearn"]["worst_gap"] == pytest.approx(0.08)
    assert out["even"].checks["attack_relearn"]["ok"] and out["even"].verdict == "deleted"
    assert out["one"].checks["attack_relearn"]["upper"] > 0.1
    # ... nor is it evidence of suppression: its lower bound is under the tolerance too
    assert out["one"].checks["attack_relearn"]["lower"] <= 0.1
    assert not out["one"].checks["attack_relearn"]["fails"]
    assert out["one"].verdict == "inconclusive"


def test_forget_recall_needs_evidence_to_match_the_oracle():
    """Forget recall 0.05 above the oracle's, one fact of every person, is at the margin and
    passes; 0.04 above it, carried by one person out of five, does not."""
    metrics, hits, groups, grids = _inputs()
    for per_person, ok in (([[1] + [0] * 19] * 5, True),
                           ([[1] * 4 + [0] * 16] + [[0] * 20] * 4, False)):
        h = torch.tensor(_people_hits(per_person)[0])
        hits["after"]["forget"] = h
        metrics["after"]["forget_recall"] = float(h.float().mean())
        j = _decide(metrics, hits, groups, grids)
        assert j.checks["forget_vs_oracle"]["ok"] == ok
        assert not j.checks["forget_vs_oracle"]["fails"]
        assert j.verdict == ("deleted" if ok else "inconclusive")
    assert j.checks["forget_vs_oracle"]["gap"] == pytest.approx(0.04)


def _slow_outcome(gaps_per_person: list[float], limit: float, level: float = 0.9,
                  n_boot: int = 2000, seed: int = 0) -> str:
    """The three outcomes of one interval check by a plain loop: resample the people (the
    helper's documented draws), take the mean gap of each resample, read the one-sided bounds."""
    counts = resample_counts(len(gaps_per_person), n_boot, seed)
    means = sorted(sum(c * g for c, g in zip(row.tolist(), gaps_per_person)) / len(gaps_per_person)
                   for row in counts)
    lo = float(torch.quantile(torch.tensor(means, dtype=torch.float64), 1 - level))
    hi = float(torch.quantile(torch.tensor(means, dtype=torch.float64), level))
    return "pass" if hi <= limit else "fail" if lo > limit else "open"


@pytest.mark.parametrize("back, want", [
    ([2, 2, 2, 2, 2], "deleted"),          # 0.08 everywhere: credibly under 0.1
    ([10, 0, 0, 0, 0], "inconclusive"),    # 0.08 on one person: straddles 0.1
    ([6, 6, 0, 0, 0], "inconclusive"),     # 0.096 on two people
    ([8, 8, 8, 0, 0], "suppressed"),       # 0.192 on three: credibly above 0.1
    ([5, 5, 5, 5, 5], "suppressed"),       # 0.2 everywhere
])
def test_an_attack_check_has_three_outcomes_as_a_plain_loop_reads_them(back, want):
    """Relearning brings back ``back[p]`` of 25 facts of each held-out person (the oracle
    nothing): "deleted" needs the upper bound under the tolerance, "suppressed" the lower bound
    above it, and in between the verdict says it cannot decide; the outcome matches a plain
    bootstrap loop over the per-person gaps."""
    zero = [[0] * 25] * 5
    edited = [[1] * b + [0] * (25 - b) for b in back]
    metrics, hits, groups, _ = _inputs()
    grids = {"relearn": AttackGrid((_grid([zero, edited], [zero, zero]),), "relearn_lr")}
    j = _decide(metrics, hits, groups, grids)
    assert j.verdict == want
    slow = _slow_outcome([b / 25 for b in back], 0.1)
    assert slow == {"deleted": "pass", "inconclusive": "open", "suppressed": "fail"}[want]
    c = j.checks["attack_relearn"]
    assert (c["ok"], c["fails"]) == {"pass": (True, False), "open": (False, False),
                                     "fail": (False, True)}[slow]
    md = Report(metrics=metrics, extra={"verdict": j.to_dict()}).to_markdown()
    word = {"pass": "pass", "open": "open", "fail": "FAIL"}[slow]
    assert f"- attack_relearn: {word} " in md


def test_a_credible_failure_decides_over_an_open_check():
    """One open check (forget recall carried by one person) and one credible failure
    (relearning brings 0.6 back everywhere): suppressed - the failure is evidence."""
    metrics, hits, groups, _ = _inputs(relearn=[[1, 1, 1, 0, 0]] * 5)
    h = torch.tensor(_people_hits([[1] * 4 + [0] * 16] + [[0] * 20] * 4)[0])
    hits["after"]["forget"] = h
    metrics["after"]["forget_recall"] = float(h.float().mean())
    zero = [[0] * 5] * 5
    grids = {"relearn": AttackGrid((_grid([zero, [[1, 1, 1, 0, 0]] * 5], [zero, zero]),),
                                   "relearn_lr")}
    j = _decide(metrics, hits, groups, grids)
    assert not j.checks["forget_vs_oracle"]["ok"] and not j.checks["forget_vs_oracle"]["fails"]
    assert j.checks["attack_relearn"]["fails"]
    assert j.verdict == "suppressed"


def test_verdict_uses_the_worst_gap_over_the_whole_grid_flagged_settings_included():
    """Three settings; only one (a learning rate that also wrecks the original: flagged) brings
    the forget facts back. The verdict reads that setting: flagged settings count."""
    metrics, hits, groups, _ = _inputs()
    zero = [[0] * 5] * 5
    back = [[1, 1, 1, 1, 0]] * 5
    knows, wrecked = [[1] * 5] * 5, [[0, 0, 1, 1, 1]] * 5
    points = (_grid([zero, zero], [zero, zero], [knows, knows], lr=1e-4, seed=0),
              _grid([zero, back], [zero, zero], [knows, wrecked], lr=3e-3, seed=1),
              _grid([zero, zero], [zero, zero], [knows, knows], lr=1e-4, seed=1))
    grid = A.flag({"relearn": AttackGrid(points, "relearn_lr")}, "before", 0.1)
    assert [p.flagged for p in grid["relearn"].points] == [False, True, False]
    j = _decide(metrics, hits, groups, grid)
    c = j.checks["attack_relearn"]
    assert c["worst_gap"] == pytest.approx(0.8) and "lr 0.003, seed 1" in c["at"]
    assert c["settings"] == 3 and c["flagged"] == 1 and not c["ok"]
    assert j.verdict == "suppressed"
    assert grid["relearn"].worst("after").lr == 3e-3
    # without the flagged setting the same model would pass: it is what decides
    kept = {"relearn": AttackGrid(points[::2], "relearn_lr")}
    assert _decide(metrics, hits, groups, kept).verdict == "deleted"
    # the report shows every setting, the flagged one marked
    rep = Report(metrics=metrics, extra={"attack_grid": grid, "verdict": j.to_dict()})
    table = rep.grid_table()
    assert len(table) == 4 and table[2][-1] == "yes" and table[1][-1] == ""
    md = rep.to_markdown()
    assert "## Attack grid" in md and "| relearn | 0.003 | 1 | 0.800 |" in md
    assert "Issue 8's bar" in md and "relearn <= oracle + 5pt: FAIL" in md


def _fold_curve(per_person: dict[int, list[list[int]]]) -> Curve:
    """A curve over budgets from ``{person: [hits at budget 0, hits at budget 1, ...]}``."""
    people = sorted(per_person)
    n = len(per_person[people[0]])
    hs = [[bool(v) for p in people for v in per_person[p][j]] for j in range(n)]
    gs = [[(0, p, "") for p in people for _ in per_person[p][j]] for j in range(n)]
    return Curve(list(range(n)), [sum(h) / len(h) for h in hs], "steps", hits=hs, groups=gs)


def test_a_learning_rates_folds_are_pooled_as_a_plain_loop_pools_them():
    """Two complementary folds at lr 1e-3 (people 0-3 held out, then 4-7) and one setting at
    lr 1e-2. In fold 0 person 0 comes back fully (5 of 5) and person 2 one fact in 5: that one
    run's gap is 6 / 20 = 0.3, the learning rate's over all eight people 6 / 40 = 0.15 - what
    the verdict reads. The bootstrap resamples the people over the pooled rows exactly as a
    plain loop over the pooled facts does."""
    zero = [0] * 5
    fold0 = {0: [zero, [1] * 5], 1: [zero, zero], 2: [zero, [1, 0, 0, 0, 0]], 3: [zero, zero]}
    fold1 = {p: [zero, zero] for p in range(4, 8)}
    other = {p: [zero, [1, 0, 0, 0, 0] if p == 5 else zero] for p in range(4, 8)}
    none0, none1 = ({p: [zero, zero] for p in ps} for ps in (range(4), range(4, 8)))
    points = (GridPoint(1e-3, 0, AttackCurves({"after": _fold_curve(fold0),
                                               "oracle": _fold_curve(none0)})),
              GridPoint(1e-3, 1, AttackCurves({"after": _fold_curve(fold1),
                                               "oracle": _fold_curve(none1)})),
              GridPoint(1e-2, 2, AttackCurves({"after": _fold_curve(other),
                                               "oracle": _fold_curve(none1)})))
    grid = AttackGrid(points, "relearn_lr")
    # a plain loop: per learning rate and budget, every fact its runs measured, then the max
    plain = {}
    for lr in (1e-3, 1e-2):
        for j in range(2):
            a = [h for p in points if p.lr == lr for h in p.curves.curves["after"].hits[j]]
            o = [h for p in points if p.lr == lr for h in p.curves.curves["oracle"].hits[j]]
            plain[lr, j] = sum(a) / len(a) - sum(o) / len(o)
    assert max(plain.values()) == pytest.approx(0.15)  # (5 + 1) of 40 at lr 1e-3
    assert grid.worst_gap("after") == pytest.approx(0.15)
    assert grid.worst_setting_gap("after") == pytest.approx(0.3)
    pooled = grid.pooled()
    assert [(p.lr, p.seed, p.pooled) for p in pooled.points] == [(1e-3, None, (0, 1)),
                                                                 (1e-2, 2, ())]
    assert pooled.points[0].curves.curves["after"].y == (0.0, pytest.approx(0.15))
    assert grid.worst("after").pooled == (0, 1)
    # the verdict's interval: the same resamples of the eight people over the pooled rows
    from probes.verdict import grid_bootstrap

    bs = grid_bootstrap(grid, "after", Rule(n_boot=200, seed=0))
    assert bs.estimate == pytest.approx(0.15)
    a, b, groups, rows = [], [], [], []
    for p in points:
        e, o = p.curves.curves["after"], p.curves.curves["oracle"]
        for j in range(2):
            a += e.hits[j]
            b += o.hits[j]
            groups += e.groups[j]
            rows += [(p.lr, j)] * len(e.hits[j])
    slow = _slow_bootstrap(torch.tensor(a, dtype=torch.float64),
                           torch.tensor(b, dtype=torch.float64), groups, rows, 1.0, 200, 0)
    assert torch.allclose(bs.samples, slow, atol=1e-12)
    bs = grid_bootstrap(grid, "after", RULE)
    metrics, hits, hgroups, _ = _inputs()
    c = _decide(metrics, hits, hgroups, {"relearn": grid}).checks["attack_relearn"]
    assert c["worst_gap"] == pytest.approx(0.15) and "seeds 0, 1 pooled" in c["at"]
    assert c["upper"] == pytest.approx(bs.upper(RULE.confidence))


def test_the_seeds_of_a_person_splitting_attack_are_complementary_folds(tiny_request):
    cfg = A.AttackConfig(grid="full", seed=7)
    settings = cfg.settings("relearn")
    assert [(c.seed, c.fold) for c in settings[:4]] == [(7, 0), (8, 1), (7, 0), (8, 1)]
    (a0, b0), (a1, b1) = (A._split_people(tiny_request.forget, c, "relearning")
                          for c in settings[:2])
    assert set(a1.facts) == set(b0.facts) and set(b1.facts) == set(a0.facts)
    assert not set(b0.facts) & set(b1.facts) and len(b0) and len(b1)
    assert a0.facts == tiny_request.forget.split(0.5, seed=7)[0].facts
    # a fourth seed would be fold 1 of the split drawn with seed + 2
    a3, b3 = A._split_people(tiny_request.forget, A.AttackConfig(seed=10, fold=1), "relearning")
    x, y = tiny_request.forget.split(0.5, seed=9)
    assert (a3.facts, b3.facts) == (y.facts, x.facts)
    with pytest.raises(ValueError, match="fold=2"):
        A.AttackConfig(fold=2)


def test_issue8_bar_is_reported_beside_the_verdict():
    j = _decide(*_inputs(forget=0.0), params_changed=0.004)
    assert {k: c["ok"] for k, c in j.bar.items()} == {
        "forget <= oracle + 2pt": True, "MIA within 0.05 of oracle": True,
        "relearn <= oracle + 5pt": True, "<= 1% params": True}
    j = _decide(*_inputs(forget=0.0, mia=0.62))
    assert j.bar["MIA within 0.05 of oracle"]["ok"] is False
    assert j.bar["<= 1% params"]["ok"] is None  # not measured


def test_rule_settings_are_checked():
    with pytest.raises(ValueError, match="confidence=1.5"):
        Rule(confidence=1.5)
    with pytest.raises(ValueError, match="utility=0"):
        Rule(utility=0)
    with pytest.raises(ValueError, match="grid='huge'.*quick"):
        probes.VerifySettings(grid="huge")
    with pytest.raises(ValueError, match="grid='huge'"):
        A.AttackConfig(grid="huge")


# -- the grid on real models -------------------------------------------------------------------
def test_grid_runs_identical_settings_on_every_model(tiny, tiny_request, tiny_oracle,
                                                     monkeypatch):
    seen: dict = {}
    real = A.RUNNERS["relearn"]

    def spy(model, request, cfg, kit):
        seen.setdefault((cfg.relearn_lr, cfg.seed), []).append(
            (model.fingerprint(), dataclasses.asdict(cfg)))
        return real(model, request, cfg, kit)

    monkeypatch.setitem(A.RUNNERS, "relearn", spy)
    cfg = A.AttackConfig(attacks=("relearn", "quantize"), relearn_steps=4, relearn_batch=16,
                         eval_every=2, grid="quick", seed=3)
    models = {"after": tiny.model.clone(), "oracle": tiny_oracle, "before": tiny.model}
    grids = A.run_grid(models, tiny_request, cfg, reference="before")
    g = grids["relearn"]
    lrs = A.GRIDS["quick"]["lrs"]["relearn"]
    assert [(p.lr, p.seed) for p in g.points] == [(lr, s) for lr in lrs for s in (3, 4)]
    assert len(lrs) >= 2 and A.GRIDS["quick"]["seeds"] >= 2 and A.GRIDS["full"]["seeds"] >= 2
    assert set(seen) == {(p.lr, p.seed) for p in g.points}
    for key, runs in seen.items():  # one run per model, every setting identical
        assert len(runs) == 3 and all(r[1] == runs[0][1] for r in runs)
        assert len({r[0] for r in runs}) == 2  # the model and the original share weights here
    for p in g.points:  # the same held-out people on every model
        cs = list(p.curves.curves.values())
        assert all(c.groups == cs[0].groups and c.x == cs[0].x for c in cs)
    assert [(p.lr, p.seed) for p in grids["quantize"].points] == [(None, None)]
    # the unedited model judged against itself: no gap anywhere
    assert g.worst_gap("before", "after") == 0.0


def test_verdict_end_to_end_on_the_tiny_organism(tiny, tiny_request, tiny_oracle):
    """The original is 'not forgotten'; the oracle judged against itself is 'deleted' (every
    comparison is exact: gaps of 0, bounds of 0)."""
    kw = dict(oracle=tiny_oracle, original=tiny.model, suite="verdict", grid="single",
              attacks={"attacks": ["relearn", "quantize"], "relearn_steps": 4,
                       "eval_every": 2})
    cache: dict = {}
    rep = probes.verify(tiny.model, tiny_request, label="after", cache=cache, **kw)
    assert rep.verdict == "not forgotten"
    assert not rep.extra["verdict"]["checks"]["forgot"]["ok"]
    assert rep.metrics["after"]["params_changed"] == 0.0
    rep = probes.verify(tiny_oracle.clone(), tiny_request, label="retrained", cache=cache,
                        **kw)
    assert rep.verdict == "deleted", rep.extra["verdict"]["checks"]
    checks = rep.extra["verdict"]["checks"]
    assert checks["attack_relearn"]["upper"] == 0.0 and checks["forget_vs_oracle"]["upper"] == 0
    assert set(rep.extra["attack_grid"]["relearn"].labels) == {"retrained", "oracle",
                                                                "original"}
    assert rep.extra["verdict"]["bar"]["<= 1% params"]["ok"] is False  # a retrain: all weights


def test_config_and_sweep_check_the_grid():
    """verify.grid (and excise verify --grid, which sets it) is checked when the config loads,
    before any model is built; so is the sweep's grid."""
    from excise import config as C
    from excise.app import pipeline, sweep

    regs = pipeline.registries()
    cfg = C.load(None, ["verify.grid=full"], regs)
    assert cfg.verify.params["grid"] == "full"
    with pytest.raises(C.ConfigError, match="grid='huge': choose one of .*'quick', 'full'"):
        C.load(None, ["verify.grid=huge"], regs)
    with pytest.raises(C.ConfigError, match="confidence=2"):
        C.load(None, ["verify.confidence=2"], regs)
    raw = C.read_yaml(Path(__file__).resolve().parent.parent / "configs" / "sweep-tiny.yaml")
    assert sweep.build_config(raw | {"grid": "quick"}, regs).grid == "quick"
    assert sweep.build_config(raw, regs).grid == "full"
    with pytest.raises(C.ConfigError, match="grid='huge'"):
        sweep.build_config(raw | {"grid": "huge"}, regs)


def test_cli_verify_grid_is_checked_before_any_model(tmp_path):
    from typer.testing import CliRunner

    from excise.app.cli import app

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("organism: {preset: tiny}\nrequest: {forget_people: 3}\n")
    (run / "edit.safetensors").write_bytes(b"")  # never read: the config is refused first
    r = CliRunner().invoke(app, ["verify", str(run), "--grid", "huge", "--quiet"])
    assert r.exit_code == 2, r.output
    assert "grid='huge': choose one of" in r.output
    assert not (run / "verify").exists()


def test_gate_skips_what_the_request_does_not_measure():
    """No general text (perplexity NaN) and no neighbors: those parts of the gate are not
    checked, the rest still decides."""
    metrics, hits, groups, grids = _inputs()
    for lab in metrics:
        metrics[lab]["perplexity"] = float("nan")
    j = _decide(metrics, hits, groups, grids)
    assert j.verdict == "deleted" and "utility_perplexity" not in j.checks
    assert "utility_neighbors" not in j.checks and "utility_retain" in j.checks


def test_gate_reads_same_template_neighbors_where_the_request_has_them():
    metrics, hits, groups, grids = _inputs()
    full, most = _people_hits(_flat(5, 20, 20)), _people_hits(_flat(5, 20, 16))
    groups["neighbors"] = full[1]
    for lab in hits:
        hits[lab]["neighbors"] = torch.tensor((most if lab == "after" else full)[0])
    j = _decide(metrics, hits, groups, grids)
    assert not j.checks["utility_neighbors"]["ok"] and j.verdict == "damaged"


def _replicated_bootstrap(back: list[int], copies: int, n_facts: int = 25):
    """The bootstrap of a relearning gap (the oracle recovers nothing) over ``copies`` x the
    people of ``back`` (person p recovers ``back[p]`` of ``n_facts``): the same people again,
    so the gap stays and only the number of people grows."""
    hits, groups = [], []
    for r in range(copies):
        for p, b in enumerate(back):
            hits += [1.0] * b + [0.0] * (n_facts - b)
            groups += [(r, p)] * n_facts
    return group_bootstrap(torch.tensor(hits), None, groups, n_boot=2000, seed=0)


@pytest.mark.parametrize("back, decided", [
    ([8, 6, 0, 0, 0, 4, 0, 2, 0, 0], "pass"),   # gap 0.08 < 0.1: more people would pass it
    ([25, 5, 0, 0, 5, 0, 0, 5, 0, 0], "fail"),  # gap 0.16 > 0.1: more people would fail it
])
def test_people_to_decide_an_open_check_matches_a_bootstrap_over_more_people(back, decided):
    """The estimate of how many people would decide an open check, against the bootstrap itself
    run over the same people copied: below half the estimate the check is still open, at 1.3x
    it is decided the way the gap points."""
    from probes.verdict import people_needed

    n = len(back)
    bs = _replicated_bootstrap(back, 1)
    lo, hi = bs.lower(0.9), bs.upper(0.9)
    assert lo <= 0.1 < hi  # open at 10 people
    need = people_needed(bs.estimate, lo, hi, 0.1, n)
    assert need is not None and need > n
    few = _replicated_bootstrap(back, max(1, int(0.5 * need) // n))
    assert few.lower(0.9) <= 0.1 < few.upper(0.9)
    many = _replicated_bootstrap(back, -(-int(1.3 * need) // n))
    assert (many.upper(0.9) <= 0.1) if decided == "pass" else (many.lower(0.9) > 0.1)
    assert people_needed(0.1, 0.05, 0.15, 0.1, n) is None  # on the limit: nothing decides it
    assert people_needed(0.02, 0.0, 0.08, 0.1, n) is None  # not open


def test_an_open_check_says_how_many_people_would_decide_it():
    """Relearning brings back 0.08 of one person's facts out of five: open. The check carries
    the estimate and the run's verdict line names it; decided checks carry none."""
    zero = [[0] * 25] * 5
    metrics, hits, groups, _ = _inputs()
    back = [[1] * 10 + [0] * 15] + [[0] * 25] * 4
    grids = {"relearn": AttackGrid((_grid([zero, back], [zero, zero]),), "relearn_lr")}
    j = _decide(metrics, hits, groups, grids)
    assert j.verdict == "inconclusive"
    c = j.checks["attack_relearn"]
    assert c["people_to_decide"] > 5 and c["limit"] == 0.1
    assert "people_to_decide" not in j.checks["forget_vs_oracle"]  # passed
    report = Report(metrics=metrics, verdict=j.verdict, extra={"verdict": j.to_dict()})
    line = report.verdict_text()
    assert line.startswith("verdict: inconclusive (open: attack_relearn [")
    assert f"about {c['people_to_decide']} forget people" in line
    j = _decide(*_inputs())
    assert j.verdict == "deleted"
    assert Report(metrics=metrics, verdict=j.verdict,
                  extra={"verdict": j.to_dict()}).verdict_text() == "verdict: deleted"


def test_verdict_text_names_every_open_check_as_the_checks_hold_it():
    """The verdict line from checks written by hand: an open interval check with its limit and
    estimate (stop 51's other world: gap 0.03, [0.007, 0.053] over 20 people, margin 0.05), an
    open check without an interval (its reason instead), and checks that pass, fail or carry no
    interval at all (the probe, a point MIA) - only the open ones are named."""
    from probes.verdict import people_to_decide

    checks = {
        "forget_vs_oracle": {"gap": 0.03, "lower": 0.00667, "upper": 0.05333, "limit": 0.05,
                             "people": 20, "ok": False, "fails": False},
        "mia_vs_oracle": {"ok": False, "fails": False, "why": "membership AUC not measured"},
        "probe": {"model": 0.47, "ok": True, "used": False},
        "attack_relearn": {"gap": 0.02, "lower": -0.01, "upper": 0.05, "limit": 0.1,
                           "people": 20, "ok": True, "fails": False},
        "attack_lens": {"worst_gap": 0.3, "ok": False, "fails": True, "why": "no interval"},
    }
    people_to_decide(checks)
    assert checks["forget_vs_oracle"]["people_to_decide"] == 28  # ceil(20 (0.02333/0.02)^2)
    assert all("people_to_decide" not in c for k, c in checks.items() if k != "forget_vs_oracle")
    report = Report(metrics={}, verdict="inconclusive", extra={"verdict": {"checks": checks}})
    line = report.verdict_text()
    assert line == ("verdict: inconclusive (open: forget_vs_oracle [0.007, 0.053] vs 0.05: about "
                    "28 forget people would decide it at this gap; mia_vs_oracle (membership "
                    "AUC not measured))")
    assert Report(metrics={}, verdict="inconclusive").verdict_text() == "verdict: inconclusive"
    assert Report(metrics={}).verdict_text() == ""
