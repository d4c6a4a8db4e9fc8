"""The sweep (excise.app.sweep): which setting a pair keeps, which pairs are pruned, the bar, the
config it reads, the registry dispatch, the compact records, and `excise sweep` end to end."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest

from excise.app import sweep
from excise.config import ConfigError
from excise.organism import oracle_or_oracles

ROOT = Path(__file__).resolve().parent.parent
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


# -- the config --------------------------------------------------------------------------------


def test_sweep_yaml_is_the_protocol_behind_the_published_results():
    """configs/sweep.yaml generates exactly the screen recorded in docs/results/sweep.json:
    the same (locate, recipe, setting) rows in the same order, the same pairs skipped."""
    cfg = sweep.load_config(ROOT / "configs" / "sweep.yaml")
    res = json.loads((ROOT / "docs" / "results" / "sweep.json").read_text())
    recorded = [(r["locate"], r["edit"], r["hp"]) for r in res["screen"]["rows"]]
    skipped = [(s["locate"], s["edit"]) for s in res["screen"]["skipped"]]
    assert list(cfg.locate) == list(dict.fromkeys(r[0] for r in recorded if r[0]))
    assert cfg.validation == tuple(range(150, 160)) and cfg.seeds == tuple(res["seeds"])
    assert list(cfg.splits) == res["splits"]
    # causal tracing records no forget / retain statistics; SAE latents are not weights
    assert [(lo, r.name) for lo in cfg.locate for r in cfg.local
            if (lo == "causal_trace" and r.needs) or (lo == "sae" and not r.latents)] == skipped
    generated = [(lo, r.name, hp) for lo in cfg.locate for r in cfg.local
                 if (lo, r.name) not in skipped for hp in r.grid]
    generated += [(None, r.name, hp) for r in cfg.baselines for hp in r.grid]
    assert generated == recorded
    assert [cfg.people(s, 1) for s in cfg.splits] == [range(50, 52), range(50, 60),
                                                       range(50, 70)]


@pytest.mark.parametrize("change, message", [
    ({"recipes": {"x": {"apply": [{"edit": "dampn"}], "grid": [{}]}}},
     "unknown edit method 'dampn'; choose one of"),
    ({"recipes": {"x": {"apply": [{"edit": "dampen"}], "grid": [{"alpah": 5.0}]}}},
     "did you mean 'alpha'"),
    ({"recipes": {"x": {"apply": [{"edit": "noise", "hp": {"s": "scale"}},
                                  {"edit": "dampen", "hp": {}}], "grid": [{"s": 1.0, "z": 2}]}}},
     "key 'z' is taken by no step"),
    ({"recipes": {"x": {"apply": [{"edit": "noise"}, {"edit": "dampen"}], "grid": [{}]}}},
     "say which grid keys each step takes"),
    ({"recipes": {"x": {"aply": [], "grid": [{}]}}}, "did you mean 'apply'"),
    ({"locate": {"fishr": {}}}, "unknown method 'fishr'"),
    ({"locate": {"fisher": {"estimatr": "batch"}}}, "did you mean 'estimator'"),
    ({"validation": {"first": 0, "people": 2}}, "must never be reported"),
    ({"validation": {"first": 30, "people": 2}}, "people [30, 31] do not exist"),
    ({"splits": {"forget05": 0}}, "number of people"),
    ({"seed": "x"}, "seed='x'"),
    ({"finalist": 2}, "did you mean 'finalists'"),
    ({"oracles": 0}, "oracles=0: must be an integer >= 1"),
    ({"oracles": 2, "suite": "behaviour"}, "several retrain oracles serve the verdict only"),
])
def test_bad_sweep_config_is_refused_naming_the_valid_choices(change, message):
    raw = {"organism": {"preset": "tiny"}, "validation": {"first": 20, "people": 2},
           "locate": {"grad_ratio": {}}, "splits": {"forget05": 3}, "seeds": [0],
           "stride": 3, "recipes": {"dampen": {"apply": [{"edit": "dampen"}],
                                               "grid": [{"alpha": 5.0}]}}}
    raw.update(change)
    with pytest.raises(ConfigError) as e:
        sweep.build_config(raw)
    assert message in str(e.value)


# -- the registry dispatch ---------------------------------------------------------------------


class _Edit:
    def __init__(self, log, name):
        self.log, self.name, self.manifest = log, name, {"params_changed": 0}

    def revert(self):
        self.log.append(("revert", self.name))


def _fake_registry(log, fail=()):
    import edit

    def make(name):
        def fn(model, importance=None, units=None, **kw):
            if name in fail:
                raise ValueError(f"{name} failed")
            log.append((name, importance, units, kw))
            return _Edit(log, name)

        fn.__signature__ = inspect.signature(edit.METHODS[name])
        return fn

    return {"edit": {n: make(n) for n in edit.METHODS}}


def test_recipes_dispatch_through_the_edit_registry():
    cfg = sweep.load_config(ROOT / "configs" / "sweep.yaml")
    log: list = []
    regs = _fake_registry(log)
    req, imp = object(), object()
    sweep.apply_recipe("model", req, imp, cfg.recipes["noise+finetune"], cfg.recipes[
        "noise+finetune"].grid[1], regs)
    assert log == [("noise", imp, None, {"top": 0.001, "scale": 3.0}),
                   ("finetune", imp, None, {"method": "gd", "top": 32, "steps": 30, "lr": 0.01,
                                            "request": req, "progress": False})]
    log.clear()
    sweep.apply_recipe("model", req, None, cfg.recipes["global npo"],
                       {"steps": 20, "lr": 0.0002}, regs)
    assert log == [("finetune", None, "all", {"method": "npo", "steps": 20, "lr": 0.0002,
                                              "request": req, "progress": False})]
    log.clear()
    sweep.apply_recipe("model", req, imp, cfg.recipes["dampen"], {"alpha": 5.0, "lam": 1.0},
                       regs)  # dampen takes no request
    assert log == [("dampen", imp, None, {"alpha": 5.0, "lam": 1.0})]


def test_a_failing_step_reverts_the_steps_before_it():
    cfg = sweep.load_config(ROOT / "configs" / "sweep.yaml")
    log: list = []
    recipe = cfg.recipes["noise+finetune"]
    with pytest.raises(ValueError, match="finetune failed"):
        sweep.apply_recipe("model", object(), object(), recipe, recipe.grid[0],
                           _fake_registry(log, fail=("finetune",)))
    assert [e[0] for e in log] == ["noise", "revert"]


def test_applicable_reads_the_importance_not_the_method_name():
    cfg = sweep.load_config(ROOT / "configs" / "sweep.yaml")

    class Imp:
        def __init__(self, sites, parts, method="m"):
            self.scores, self.parts, self.method = dict.fromkeys(sites), parts, method

    latents = Imp(["blocks.1.resid_post.sae"], None)
    assert sweep.applicable(cfg.recipes["prune"], latents, cfg.local) is None
    assert "only latent ablation (prune)" in sweep.applicable(cfg.recipes["dampen"], latents,
                                                              cfg.local)
    no_parts = Imp(["blocks.0.mlp.post"], {}, "causal_trace")
    assert "forget and retain" in sweep.applicable(cfg.recipes["dampen"], no_parts)
    assert sweep.applicable(cfg.recipes["dampen"],
                            Imp(["blocks.0.mlp.W_in"], {"forget": 1, "retain": 1})) is None


# -- compact records ---------------------------------------------------------------------------


def test_records_are_compact_and_rounded():
    res = {"preset": "tiny", "x": 1 / 3, "nan": float("nan"), "big": 16285.2534,
           "rows": [{"a": 0.1234567891, "b": [1.0, 2.5]}, {"a": 2.0, "b": []}],
           "screen": {"base": {"p": 27.904423537880668}, "rows": [{"f": 0.5}, {"f": 1e-13}]}}
    text = sweep.dumps_records(res)
    back = json.loads(text)
    assert back["x"] == 0.3333333 and back["nan"] is None and back["big"] == 16285.25
    assert back["rows"][0] == {"a": 0.1234568, "b": [1.0, 2.5]}
    assert back["screen"]["base"]["p"] == 27.90442 and back["screen"]["rows"][1]["f"] == 1e-13
    lines = text.splitlines()
    assert not any(line.startswith(" ") for line in lines)  # no indent
    assert '{"a":0.1234568,"b":[1.0,2.5]},' in lines  # one record per line
    assert '{"f":0.5},' in lines


def test_excise_sweep_on_the_tiny_organism_writes_its_records(tmp_path, tiny, tiny_oracle):
    """`excise sweep` end to end: the tiny organism, two cheap recipes on one locate method,
    one split (people 0..2, whose oracle the fixtures trained) and one seed, behaviour only."""
    from typer.testing import CliRunner

    from excise.app.cli import app

    out = tmp_path / "sweep"
    r = CliRunner().invoke(app, ["sweep", str(ROOT / "configs" / "sweep-tiny.yaml"), "--set",
                                 "seeds=[0]", "--out", str(out), "--quiet"])
    assert r.exit_code == 0, r.output
    assert "finalists:" in r.output and "records:" in r.output
    res = json.loads((out / "sweep.json").read_text())
    scr = json.loads((out / "screen.json").read_text())
    assert res["preset"] == "tiny" and res["splits"] == ["forget05"] and res["seeds"] == [0]
    assert scr == res["screen"]
    screened = [(x["locate"], x["edit"], x["hp"]) for x in scr["rows"]]
    assert screened == [("grad_ratio", "dampen", {"alpha": 5.0, "lam": 1.0}),
                        ("grad_ratio", "dampen", {"alpha": 10.0, "lam": 1.0}),
                        ("grad_ratio", "prune", {"top": 8})]
    assert 1 <= len(res["finalists"]) <= 2
    assert len(res["rows"]) == len(res["finalists"])  # 1 split x 1 seed
    base = scr["base"]
    for row in res["rows"]:
        assert row["split"] == "forget05" and row["seed"] == 0
        assert set(row["metrics"]) == {"after", "before", "oracle"}
        assert row["metrics"]["before"]["forget_recall"] == 1.0
        assert row["metrics"]["after"]["forget_recall"] <= 1.0
        assert row["bar"] is None  # behaviour only: the bar's privacy / probe / attack inputs
        assert row["relearn_gap"] is None
        assert 0 < row["params"] < 0.1
    kept = {(x["locate"], x["edit"]) for x in res["kept"]}
    assert kept == {("grad_ratio", "dampen"), ("grad_ratio", "prune")}
    assert base["forget_recall"] == 1.0
    text = (out / "sweep.json").read_text()
    assert not any(line.startswith(" ") for line in text.splitlines())


def test_sweep_oracles_train_at_successive_seeds():
    """``oracles: N`` judges the finalists against N retrain oracles: the organism's seed, then
    + 1, ...; one oracle stays a single model (the verdict as before)."""
    raw = {"organism": {"preset": "tiny"}, "validation": {"first": 20, "people": 2},
           "locate": {"grad_ratio": {}}, "splits": {"forget05": 3}, "seeds": [0],
           "stride": 3, "recipes": {"dampen": {"apply": [{"edit": "dampen"}],
                                               "grid": [{"alpha": 5.0}]}}}
    assert sweep.build_config(raw).oracles == 1
    assert sweep.build_config(raw | {"oracles": 3}).oracles == 3

    class Org:
        seed = 7

        def oracle(self, req, train_seed=None):
            return ("oracle", req, train_seed)

    assert oracle_or_oracles(Org(), "r", 1) == ("oracle", "r", None)
    assert oracle_or_oracles(Org(), "r", 3) == [("oracle", "r", None), ("oracle", "r", 8),
                                                ("oracle", "r", 9)]


def test_run_subject_oracles_follow_the_seed_of_what_they_retrain():
    """``verify.oracles: N`` in ``excise run``: the organism's seed, then + 1, ...; a fine-tune
    (``spec.seed``) the same way; one oracle stays a single model."""
    from excise.app.pipeline import Subject
    from excise.finetuned import Finetuned
    from excise.organism import Organism

    class Req:
        def forget_people(self):
            return [0]

    class Org:
        preset = type("P", (), {"seed": 4})()
        seed = Organism.seed

        def oracle(self, req, train_seed=None):
            return train_seed

    class FT:
        spec = type("S", (), {"seed": 2})()
        seed = Finetuned.seed
        oracle = Org.oracle

    assert Subject(None, Req(), Org()).oracle(n=1) is None  # the organism's own seed
    assert Subject(None, Req(), Org()).oracle(n=3) == [None, 5, 6]
    assert Subject(None, Req(), FT()).oracle(n=2) == [None, 3]
    assert Subject(None, Req(), Org()).oracle(wanted=False, n=3) is None
