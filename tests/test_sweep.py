"""bench/sweep.py's rules: which setting a pair keeps, which pairs are pruned, the bar."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "sweep", Path(__file__).resolve().parent.parent / "bench" / "sweep.py")
sweep = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sweep)

BASE = {"retain_recall": 1.0, "shared_recall": 1.0, "perplexity": 20.0}


def _row(loc, ed, hp, forget, retain=1.0, ppl=20.0, params=0.001):
    m = {"retain_recall": retain, "shared_recall": 1.0, "perplexity": ppl}
    pen = sweep.bar_penalty(m, BASE, params)
    return {"locate": loc, "edit": ed, "hp": hp, "forget": forget, "retain": retain,
            "shared": 1.0, "ppl": ppl, "params": params, "penalty": pen,
            "score": forget + 2 * pen}


def test_bar_penalty_is_zero_only_inside_the_bar():
    assert sweep.bar_penalty({"retain_recall": 0.98, "shared_recall": 0.99,
                              "perplexity": 20.4}, BASE, 0.01) == 0
    assert sweep.bar_penalty({"retain_recall": 0.97, "shared_recall": 1.0,
                              "perplexity": 20.0}, BASE, 0.0) > 0
    assert sweep.bar_penalty({"retain_recall": 1.0, "shared_recall": 1.0,
                              "perplexity": 20.5}, BASE, 0.0) > 0
    assert sweep.bar_penalty({"retain_recall": 1.0, "shared_recall": 1.0,
                              "perplexity": 20.0}, BASE, 0.02) > 0


def test_choose_keeps_lowest_feasible_forget_and_prunes_dominated_pairs():
    rows = [
        _row("fisher", "dampen", {"alpha": 3}, forget=0.1, retain=0.80),  # infeasible
        _row("fisher", "dampen", {"alpha": 10}, forget=0.6),  # feasible: kept
        _row("fisher", "prune", {"top": 2}, forget=0.9),  # dominated by fisher+dampen
        _row("sae", "prune", {"top": 2}, forget=0.5, retain=0.9),  # infeasible only: kept
        _row(None, "global ga", {"lr": 1}, forget=0.9, params=1.0),
        {"locate": "activations", "edit": "dampen", "hp": {}, "error": "no parameter"},
    ]
    kept, finalists = sweep.choose({"rows": rows}, n_finalists=5)
    assert kept[("fisher", "dampen")]["hp"] == {"alpha": 10}
    assert kept[("sae", "prune")]["forget"] == 0.5
    names = [(f["locate"], f["edit"]) for f in finalists]
    assert ("fisher", "prune") not in names  # dominated on validation
    assert ("fisher", "dampen") in names and ("sae", "prune") in names
    assert names[-1] == (None, "global ga")  # the global baselines always stay, as references
    _, capped = sweep.choose({"rows": rows}, n_finalists=1)
    assert [(f["locate"], f["edit"]) for f in capped] == [("fisher", "dampen"),
                                                           (None, "global ga")]


def test_bar_checks_each_condition():
    def row(**after):
        a = {"forget_recall": 0.1, "retain_recall": 1.0, "shared_recall": 1.0,
             "perplexity": 20.0, "mia_auc_loss": 0.5} | after
        b = {"forget_recall": 1.0, "retain_recall": 1.0, "shared_recall": 1.0,
             "perplexity": 20.0, "mia_auc_loss": 1.0}
        o = {"forget_recall": 0.1, "retain_recall": 1.0, "shared_recall": 1.0,
             "perplexity": 20.0, "mia_auc_loss": 0.5}
        return {"metrics": {"after": a, "before": b, "oracle": o}, "params": 0.005,
                "loo_gap": {"after": 0.0}, "relearn_gap": 0.0}

    assert all(sweep.bar_checks(row()).values())
    for change, key in [({"forget_recall": 0.13}, "forget <= oracle + 2pt"),
                        ({"retain_recall": 0.97}, "retain >= 98%"),
                        ({"perplexity": 20.5}, "ppl within 2%"),
                        ({"mia_auc_loss": 0.56}, "MIA within 0.05 of oracle")]:
        checks = sweep.bar_checks(row(**change))
        assert not checks[key] and sum(not v for v in checks.values()) == 1
    r = row()
    r["relearn_gap"] = 0.06
    assert not sweep.bar_checks(r)["relearn <= oracle + 5pt"]
    r = row()
    r["params"] = 0.011
    assert not sweep.bar_checks(r)["<= 1% params"]


@pytest.mark.parametrize("bad", [{"edit": "unknown"}])
def test_apply_edit_rejects_unknown_edit(bad):
    with pytest.raises(ValueError):
        sweep.apply_edit(None, None, None, bad["edit"], {})
