"""The leave-one-out probe as a verdict input (probes.verdict.probe_check) and its best-depth null
(probes.representations.loo_probe_states).

The rule's inputs are built by hand (the helpers of test_verdict / test_comparator: everything
else says "deleted"), so only the probe can change the answer; the best-depth null is checked
against a plain loop over permutations, depths and left-out people written here; one test runs
the suites end to end on the tiny organism.
"""

from __future__ import annotations

import pytest
import torch

import probes
from probes import representations as R
from probes.stats import balanced_ridge_fit
from probes.verdict import Rule, decide, probe_check
from test_comparator import _verdict_inputs
from test_verdict import RULE, _inputs


def _probe(original=(0.9, 0.65), model=(0.5, 0.66), oracle=0.5, label="after",
           original_label="before") -> dict:
    """Best-depth probe numbers ``(best, null_hi)`` per model, as probes.suites.probe_inputs
    gives them; ``oracle``: the oracle's best (None: no oracle)."""
    out = {original_label: {"best": original[0], "depth": 2, "null": 0.55,
                            "null_hi": original[1]},
           label: {"best": model[0], "depth": 1, "null": 0.55, "null_hi": model[1]}}
    if oracle is not None:
        out["oracle"] = {"best": oracle, "depth": 0, "null": 0.55, "null_hi": 0.66}
    return out


def _decide(probe, **kw):
    metrics, hits, groups, grids = _inputs(**kw)
    return decide(metrics, hits, groups, grids, "after", "before", RULE, probe=probe)


# -- with a retrain oracle ---------------------------------------------------------------------
def test_without_the_probe_nothing_changes():
    j = _decide(None)
    assert j.verdict == "deleted" and "probe" not in j.checks
    assert "loo_probe suite ran" in j.rule  # the clause is in the rule, conditionally


def test_failed_control_does_not_block_deletion():
    """The original reads at its null: the probe cannot see these facts, so even a model far
    above its own null is not held to it."""
    j = _decide(_probe(original=(0.6, 0.65), model=(0.95, 0.66)))
    c = j.checks["probe"]
    assert j.verdict == "deleted"
    assert c["used"] is False and c["ok"] is None
    assert "cannot see this request's facts" in c["why"] and "0.600" in c["why"]
    # at the null p95 exactly is not above it: the control needs best > null_hi
    j = _decide(_probe(original=(0.65, 0.65), model=(0.95, 0.66)))
    assert j.verdict == "deleted" and j.checks["probe"]["used"] is False


@pytest.mark.parametrize("model, oracle, verdict, reference", [
    ((0.8, 0.66), 0.5, "suppressed", "own null p95"),   # above its null and oracle + 0.1
    ((0.8, 0.66), 0.625, "suppressed", "oracle + 0.1"),  # above both, the oracle's the larger
    ((0.625, 0.625), 0.5, "deleted", "own null p95"),    # at its own null p95
    ((0.7, 0.625), 0.625, "deleted", "oracle + 0.1"),    # above its null, within the oracle's
    ((0.75, 0.625), None, "suppressed", "own null p95"),  # oracle not measured: the null only
])
def test_passed_control_decides_deletion(model, oracle, verdict, reference):
    j = _decide(_probe(model=model, oracle=oracle))
    c = j.checks["probe"]
    assert j.verdict == verdict
    assert c["used"] is True and c["ok"] is (verdict == "deleted")
    assert c["reference"] == reference
    assert c["limit"] == pytest.approx(max(model[1], -1 if oracle is None else oracle + 0.1))
    # every other check passed: the probe alone moved the verdict
    assert all(v["ok"] for k, v in j.checks.items() if k != "probe")


def test_probe_never_rescues_a_damaged_or_unforgotten_model():
    assert _decide(_probe(model=(0.5, 0.66)), retain=0.85).verdict == "damaged"
    assert _decide(_probe(model=(0.5, 0.66)), forget=1.0).verdict == "not forgotten"
    # and a failing probe does not hide an attack that restores the facts
    j = _decide(_probe(model=(0.5, 0.66)), relearn=[[1, 1, 1, 0, 0]] * 5)
    assert j.verdict == "suppressed" and j.checks["probe"]["ok"]


def test_probe_that_did_not_measure_is_not_used():
    p = _probe()
    p.pop("after")
    c = _decide(p).checks["probe"]
    assert c["used"] is False and "'after'" in c["why"]
    p = _probe()
    p["before"]["null_hi"] = None  # the suite ran with loo_null=0
    j = _decide(p)
    assert j.verdict == "deleted" and "loo_null=0" in j.checks["probe"]["why"]
    assert probe_check(None, "after", "before") is None


# -- without an oracle (the comparator rule) ---------------------------------------------------
def _decide_comparator(probe):
    metrics, hits, groups, grids, scores = _verdict_inputs(0.1)
    return decide(metrics, hits, groups, grids, "after", "before", Rule(n_boot=500),
                  scores=scores, probe=probe)


@pytest.mark.parametrize("original, model, verdict, used", [
    ((0.6, 0.65), (0.95, 0.66), "deleted", False),    # control fails: not used
    ((0.9, 0.65), (0.75, 0.66), "suppressed", True),   # above its own null p95
    ((0.9, 0.65), (0.66, 0.66), "deleted", True),      # at it
])
def test_comparator_rule_reads_the_model_against_its_own_null(original, model, verdict, used):
    j = _decide_comparator(_probe(original=original, model=model, oracle=None))
    c = j.checks["probe"]
    assert j.rule.startswith("No retrain oracle") and "loo_probe suite ran" in j.rule
    assert j.verdict == verdict
    assert c["used"] is used and c["ok"] is (None if not used else verdict == "deleted")
    if used:
        assert c["limit"] == model[1] and c["reference"] == "own null p95"
    assert _decide_comparator(None).verdict == "deleted"


# -- the best-depth null against a plain loop --------------------------------------------------
def _slow_best_null(states, y, groups, lam, n_perm, seed):
    """Per permutation (labels shuffled across people, as probes.stats.group_permutation_null
    draws them), per depth, leave each person out, refit the class-balanced ridge probe on the
    rest, classify the person's rows; then the largest accuracy over depths."""
    gen = torch.Generator().manual_seed(seed)
    ids = sorted(set(groups.tolist()))
    label = {g: float(y[groups == g][0]) for g in ids}
    xs = []
    for s in states:
        s = s.double()
        xs.append((s - s.mean(0)) / s.std(0))
    per_depth = torch.zeros(len(states), n_perm, dtype=torch.float64)
    for k in range(n_perm):
        order = torch.randperm(len(ids), generator=gen).tolist()
        relabel = {g: label[ids[order[i]]] for i, g in enumerate(ids)}
        t = torch.tensor([relabel[int(g)] for g in groups], dtype=torch.float64)
        for d, x in enumerate(xs):
            correct = 0
            for g in ids:
                out = groups == g
                w, b = balanced_ridge_fit(x[~out], t[~out], lam)
                correct += int(((x[out] @ w + b > 0.5).double() == t[out]).sum())
            per_depth[d, k] = correct / len(t)
    return per_depth, per_depth.amax(0)


def test_best_depth_null_matches_a_plain_loop():
    gen = torch.Generator().manual_seed(0)
    people, per, d = 12, 3, 5
    groups = torch.arange(people).repeat_interleave(per)
    y = (groups < people // 2).double()
    states = [torch.randn(len(y), d, generator=gen) for _ in range(3)]
    states[1][:, 0] += 3.0 * y  # a strong signal at depth 1
    res = R.loo_probe_states(states, y, groups, lam=1.0, logistic=False, n_null=12, seed=4)
    per_depth, best = _slow_best_null(states, y, groups, 1.0, 12, 4)
    assert torch.allclose(res.null_samples, per_depth, atol=1e-12)
    assert res.best_null == pytest.approx(float(best.mean()))
    assert res.best_null_hi == pytest.approx(float(torch.quantile(best, 0.95)))
    assert res.best_null_hi >= max(res.curves["null_hi"]) - 1e-12  # the max's null is wider
    assert res.best == max(res.curves["balanced"])
    assert res.best_depth == 1 and res.best > res.best_null_hi
    assert res.curves["null"] == pytest.approx(per_depth.mean(1).tolist())
    none = R.loo_probe_states(states, y, groups, lam=1.0, logistic=False, n_null=0)
    assert none.null_samples is None and none.best_null is None and "null" not in none.curves
    with pytest.raises(ValueError, match=r"\[depths, n_perm\]"):
        R.best_depth_null(torch.zeros(3))


# -- end to end on the tiny organism -----------------------------------------------------------
def test_verdict_reads_the_probe_where_the_suite_ran(tiny, tiny_request, tiny_oracle):
    """suite=["loo_probe", "verdict"]: the probe's best-depth numbers reach the rule; the
    verdict suite does not start requiring the probe."""
    kw = dict(oracle=tiny_oracle, original=tiny.model, grid="single", label="retrained",
              attacks={"attacks": ["quantize"]}, loo_logistic=False, n_boot=200)
    cache: dict = {}
    rep = probes.verify(tiny_oracle.clone(), tiny_request, suite=["loo_probe", "verdict"],
                        cache=cache, **kw)
    m, c = rep.metrics, rep.extra["verdict"]["checks"]["probe"]
    for lab in ("retrained", "original", "oracle"):
        assert m[lab]["loo_best"] == max(rep.extra["loo_probe"]["curves"][lab]["balanced"])
        assert m[lab]["loo_best_null"] <= m[lab]["loo_best_null_hi"]
    assert c["original"] == m["original"]["loo_best"]
    assert c["used"] is (m["original"]["loo_best"] > m["original"]["loo_best_null_hi"])
    without = probes.verify(tiny_oracle.clone(), tiny_request, suite="verdict", cache=cache,
                            **kw)
    assert "loo_probe" not in without.extra and "probe" not in without.extra["verdict"]["checks"]
    if not c["used"]:
        assert rep.verdict == without.verdict
