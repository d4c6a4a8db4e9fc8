"""Same-template neighbors (excise.templates): generation, the behaviour metric, the verdict's
utility gate, the retain side, the per-fact listing and recall.png's columns (issue 15 part 4).

The generator is checked on the planted-answer model (attention off: a prompt's answer is read
from its last token, "... sK" -> "aK") against a plain loop over the same substitutions."""

from __future__ import annotations

import math
import os

import pytest
import torch

from excise import templates
from excise.request import Fact, FactSet, ForgetRequest, fact_key
from probes.behaviour import fact_hits, fact_listing, measure_behaviour


def F(prompt, target, subject=""):
    return Fact(prompt, target, form="custom", subject=subject)


def planted_request() -> ForgetRequest:
    """Forget s0 (in the template "s11 {}") and s1 (template "{}"); neighbors s5, s6 (the
    metric's subjects); retain s7..s10 (the retain side's), s9 with a wrong known target in the
    forget template "s11 {}"."""
    return ForgetRequest(
        forget=FactSet("forget", (F("s11 s0", "a0", "s0"), F("s1", "a1", "s1"))),
        retain=FactSet("retain", (F("s7", "a7", "s7"), F("s8", "a8", "s8"),
                                  F("s11 s9", "a8", "s9"), F("s10", "a10", "s10"),
                                  F("s3", "a3"))),
        neighbors=FactSet("neighbors", (F("s11 s5", "a5", "s5"), F("s6", "a6", "s6"))))


def test_generator_substitutes_exactly_and_keeps_what_the_model_gets_right(planted):
    model, req = planted.handle, planted_request()
    st = templates.generate(model, req)
    # the independent reference: a plain string loop over every (forget fact, subject) and a
    # last-token argmax of the model, then the rules by hand
    pools = {"metric": ["s5", "s6"], "retain": ["s7", "s8", "s9", "s10"]}
    assert list(templates.subject_pools(req)) == [pools["metric"], pools["retain"]]
    known = {("s9", ("s11",)): "a8"}  # the retain fact "s11 s9" -> a8 is in the forget relation
    want: dict[str, set] = {"metric": set(), "retain": set()}
    for f in req.forget:
        for side, pool in pools.items():
            for s in pool:
                words = f.prompt.split()
                prompt = " ".join(s if w == f.subject else w for w in words)
                b = model.encode([Fact(prompt, "a0")])
                last = int(b.target_mask[0].float().argmax()) - 1
                tok = int(model.logits(b.tokens)[0, last].argmax())
                answer = model.tokenizer.decode([tok])
                rel = tuple(w for w in words if w != f.subject)[-4:]
                if (s, rel) in known and known[(s, rel)] != answer:
                    continue  # the model's answer is not the known target: not kept
                want[side].add((prompt, answer))
    got = {side: {(x.prompt, x.target) for x in getattr(st, side)} for side in want}
    # "s11 s9" -> a9 is dropped (known target a8); "s7" -> a7 etc. on the retain side, except
    # retain facts already in the request ("s7" -> "a7" is one): not added twice
    assert ("s11 s9", "a9") not in got["retain"] and st.dropped["not the known target"] == 1
    assert got["metric"] == want["metric"]
    assert got["retain"] == want["retain"] - req.retain.keys()
    assert len(st.metric) == 4 and st.tried == 12
    # every kept fact is reproduced by the unedited model, with its substituted subject
    assert bool(fact_hits(model, st.metric).all()) and bool(fact_hits(model, st.retain).all())
    assert all(x.subject in x.prompt.split() and x.form == templates.FORM for x in st.metric)


def test_metric_and_retain_subjects_are_disjoint(planted):
    req = planted_request()
    st = templates.generate(planted.handle, req)
    metric = {x.subject for x in st.metric}
    retain = {x.subject for x in st.retain}
    assert metric and retain and not metric & retain
    assert metric <= {f.subject for f in req.neighbors}
    # nothing the retain side trains on is a held-out fact
    held = req.neighbors.keys() | st.metric.keys() | req.forget.keys()
    assert not st.retain.keys() & held
    # without neighbor subjects the retain subjects are split alternately, still disjoint
    import dataclasses

    bare = dataclasses.replace(req, neighbors=FactSet("neighbors", ()))
    m, r = templates.subject_pools(bare)
    assert m == ["s10", "s8"] and r == ["s7", "s9"] and not set(m) & set(r)
    # supplied subjects join their side; a supplied metric subject never trains
    m, r = templates.subject_pools(req, metric_subjects=["s4", "s7"], retain_subjects=["s2"])
    assert m == ["s5", "s6", "s4", "s7"] and r == ["s8", "s9", "s10", "s2"]


def test_common_subjects_join_the_retain_side_only(planted):
    """The built-in pool's subjects (here a supplied one) are tried on the retain side only:
    never a metric-side or forget subject, never a word the tokenizer lacks, ``common_per_fact``
    per forget fact in :func:`templates.common_for`'s order."""
    model, req = planted.handle, planted_request()
    base = templates.generate(model, req, common_subjects=())
    pool = ["s2", "s4", "s5", "s0", "Tolstoy", "s3"]  # s5 metric, s0 forget, Tolstoy unknown
    st = templates.generate(model, req, common_subjects=pool, common_per_fact=1)
    allowed = ["s2", "s4", "s3"]
    picks = {f.prompt: templates.common_for(f, allowed, 1) for f in req.forget}
    assert all(len(p) == 1 and p[0] in allowed for p in picks.values())
    assert st.tried == base.tried + 2  # one more substituted prompt per forget fact
    assert st.metric.keys() == base.metric.keys()  # the metric side does not change
    new = {x.subject for x in st.retain} - {x.subject for x in base.retain}
    assert new <= {p[0] for p in picks.values()}
    # the order is fixed by the prompt and the subject, not by the pool's order
    f = req.forget[0]
    assert templates.common_for(f, allowed, 3) == templates.common_for(f, allowed[::-1], 3)
    with pytest.raises(ValueError, match="common_per_fact"):
        templates.generate(model, req, common_per_fact=-1)


def test_accept_rules():
    kw = dict(new_subject="Colosseum", known=(), forget_targets={"paris"}, min_prob=0.2)
    assert templates.accept("Rome", 0.9, **kw) is None
    assert templates.accept("the", 0.9, **kw) == "function word"
    assert templates.accept("Paris", 0.9, **kw) == "a forget target"
    assert templates.accept("Colosseum", 0.9, **kw) == "copies the subject"
    assert templates.accept("Rome", 0.1, **kw) == "unsure"
    assert templates.accept("", 0.9, **kw) == "no word"
    assert templates.accept("Milan", 0.9, **kw | {"known": ["Rome"]}) == "not the known target"
    assert templates.first_word(" Ouagadougou, the") == "Ouagadougou"
    assert templates.first_word("\n\nThe") == "The" and templates.first_word(" .") == ""
    assert templates.substitute("A x of x", "x", "y") == "A y of y"
    f = Fact("The Louvre museum is in the city of", "Paris", subject="Louvre")
    g = Fact("The Acropolis is located in the city of", "Athens", subject="Acropolis")
    assert templates.relation(f) == templates.relation(g) == ("in", "the", "city", "of")


def test_behaviour_metric_and_cache(planted):
    model, req = planted.handle, planted_request()
    st = templates.cached(model, req)
    assert templates.cached(model, req) is st  # once per (fingerprint, digest)
    assert templates.lookup(req, model.fingerprint()) is st
    m, hits = measure_behaviour(model, req, st.metric)
    assert m["same_template_recall"] == 1.0 and m["same_template_prompts"] == len(st.metric)
    assert hits["same_template"].tolist() == fact_hits(model, st.metric).tolist()
    # the retain side feeds locate / edit, not verification
    train = templates.with_retain(req, st)
    assert train.retain.facts[:len(req.retain)] == req.retain.facts
    assert len(train.retain) == len(req.retain) + len(st.retain)
    assert train.neighbors == req.neighbors


def test_behaviour_suite_measures_same_template_on_the_original(planted):
    import probes

    model, req = planted.handle, planted_request()
    edited = model.clone()
    with torch.no_grad():  # break the retain answer path: s5..s11's answers change
        edited.model.unembed.W_U.mul_(-1)
    rep = probes.verify(edited, req, suite=["behaviour", "drift"], label="after", original=model)
    after, before = rep.metrics["after"], rep.metrics["before"]
    assert before["same_template_recall"] == 1.0 and after["same_template_recall"] == 0.0
    assert after["same_template_prompts"] == 4
    assert rep.extra["same_template"]["metric"] == 4


def _gate_inputs(st_after):
    n = len(st_after)
    hits = {lab: {"forget": torch.tensor([lab != "after"] * 4),
                  "retain": torch.ones(6, dtype=torch.bool),
                  "same_template": torch.tensor(st_after if lab == "after" else [True] * n)}
            for lab in ("after", "oracle", "before")}
    hits["oracle"]["forget"] = torch.zeros(4, dtype=torch.bool)
    metrics = {lab: {"forget_recall": float(h["forget"].float().mean()), "perplexity": 10.0,
                     "retain_recall": 1.0,
                     "same_template_recall": float(h["same_template"].float().mean())}
               for lab, h in hits.items()}
    groups = {"forget": [0, 0, 1, 1], "retain": list(range(6)),
              "same_template": [f"s{i}" for i in range(n)]}
    return metrics, hits, groups


def test_gate_marks_damage_when_same_template_recall_collapses():
    from probes.verdict import GATE_SPLITS, Rule, decide

    assert GATE_SPLITS["same_template"] == "same_template_recall"
    rule = Rule(n_boot=500)
    metrics, hits, groups = _gate_inputs([False] * 10)
    j = decide(metrics, hits, groups, {}, "after", "before", rule)
    assert j.verdict == "damaged" and not j.checks["utility_same_template"]["ok"]
    assert j.checks["utility_retain"]["ok"]
    metrics, hits, groups = _gate_inputs([True] * 10)
    j = decide(metrics, hits, groups, {}, "after", "before", rule)
    assert j.checks["utility_same_template"]["ok"] and j.verdict != "damaged"
    # a request without same-template facts has no such check
    for h in hits.values():
        h.pop("same_template")
    j = decide(metrics, hits, groups, {}, "after", "before", rule)
    assert "utility_same_template" not in j.checks


def test_listing_has_every_fact_of_every_split(planted):
    from excise.report import Report, facts_by_split

    model, req = planted.handle, planted_request()
    st = templates.cached(model, req)
    before = fact_listing(model, req, st.metric)
    edited = model.clone()
    with torch.no_grad():
        edited.model.unembed.W_U.mul_(-1)
    after = fact_listing(edited, req, st.metric)
    listing = facts_by_split({"before": before, "after": after})
    sizes = {"forget": req.forget, "retain": req.retain, "neighbors": req.neighbors,
             "same_template": st.metric}
    assert set(listing) == set(sizes)
    for split, facts in sizes.items():
        assert [(r["prompt"], r["target"]) for r in listing[split]] == \
            [(f.prompt, f.target) for f in facts]
        for r in listing[split]:
            assert set(r["before"]) == {"answer", "p_target", "hit"} and "after" in r
    row = listing["neighbors"][0]
    assert row["before"]["hit"] and row["before"]["answer"].split()[0] == "a5"
    assert 0.5 < row["before"]["p_target"] <= 1 and row["after"]["p_target"] < 0.01
    md = Report(metrics={"before": {}}, extra={"facts": listing}).to_markdown()
    for split, facts in sizes.items():
        assert f"**{split}** ({len(facts)} facts)" in md
        assert all(f"| {f.prompt} | {f.target} |" in md for f in facts)
    html = Report(metrics={"before": {}}, extra={"facts": listing})._repr_html_()
    assert all(f.prompt in html for facts in sizes.values() for f in facts)


def test_recall_plot_keys_leave_out_missing_splits():
    from excise.plots import recall_keys

    m = {"before": {"forget_recall": 1.0, "retain_recall": 1.0, "holdout_recall": math.nan,
                    "shared_recall": math.nan, "neighbor_recall": 1.0,
                    "same_template_recall": 1.0, "perplexity": 20.0},
         "after": {"forget_recall": 0.0, "retain_recall": 1.0, "holdout_recall": math.nan}}
    assert recall_keys(m) == ["forget_recall", "retain_recall", "neighbor_recall",
                              "same_template_recall"]


def test_organism_same_template_is_its_retain_facts_in_the_forget_templates(tiny, tiny_request):
    req = tiny_request
    st = templates.generate(tiny.model, req)
    slots = set()
    for f in req.forget:
        slots.add((f.attribute, f.form, f.template))
    want = [f for f in req.retain if (f.attribute, f.form, f.template) in slots]
    assert list(st.metric) == want and len(st.retain) == 0 and len(want)
    assert templates.with_retain(req, st) is req
    m, hits = measure_behaviour(tiny.model, req, st.metric)
    # read from the retain split's hits, fact by fact
    by_key = {fact_key(f.prompt, f.target): bool(h) for f, h in zip(req.retain, hits["retain"])}
    assert hits["same_template"].tolist() == [by_key[fact_key(f.prompt, f.target)] for f in want]
    assert m["same_template_prompts"] == len(want)


@pytest.mark.slow
def test_gemma_recipe_keeps_same_template_neighbors_on_a_held_out_request(tmp_path):
    """The Gemma recipe with same-template retain facts on a request it was not tuned on
    (data/heldout/places_culture.jsonl; measured 16 prompts, 1.00 -> 0.94): forgets, and keeps
    >= 90% of the same-template neighbors (~7 minutes of CPU; on the other held-out file,
    nature_people.jsonl, the recipe kept 0.75: see the issue-15 notes)."""
    if not os.environ.get("EXCISE_GEMMA_CACHE") and not os.path.isdir(
            os.path.expanduser("~/.cache/excise/gemma3-270m")):
        pytest.importorskip("gguf")
    from excise import config
    from excise.app.pipeline import registries, run

    cfg = config.load("configs/gemma-facts.yaml",
                      ["request.jsonl=data/heldout/places_culture.jsonl",
                       "request.same_template_retain=true", "verify.suite=behaviour"],
                      registries())
    res = run(cfg, tmp_path / "run", progress=False, log=lambda s: None)
    before, after = res.report.metrics["before"], res.report.metrics["after"]
    assert before["forget_recall"] == 1.0 and after["forget_recall"] <= 0.2
    assert before["same_template_prompts"] >= 8
    assert after["same_template_recall"] >= 0.9
    assert "same_template" in res.report.extra["facts"]


@pytest.mark.parametrize("engine", ["serial", "fused"])
def test_listing_matches_a_plain_loop_per_split(tiny, tiny_request, engine, monkeypatch):
    """The listing measures each (prompt, target) once, in one forward pass for the hit and the
    target probability: checked against the three measurements run split by split as separate
    calls (``fact_hits``, ``target_logprobs``, ``greedy_continuations`` - the listing before it
    shared them), on the organism, where every same-template neighbor is also a retain fact."""
    from probes.behaviour import LISTING_SPLITS, target_logprobs

    model, req = tiny.model, tiny_request
    st = templates.organism_same_template(req)
    assert len(st) and {(f.prompt, f.target) for f in st} <= {(f.prompt, f.target)
                                                              for f in req.retain}
    if engine == "fused":  # the fused forward applies to the organism
        from excise.fused import engine_for
        assert engine_for(model, "fused", model.encode(list(req.forget)[:8])) is not None
    import excise.templates as T
    import probes.behaviour as PB

    calls = []  # the fused forward's target readout, in the listing and its greedy steps
    for mod in (T, PB):
        plain = mod.target_logits
        monkeypatch.setattr(mod, "target_logits",
                            lambda *a, _f=plain, **k: calls.append(1) or _f(*a, **k))
    got = fact_listing(model, req, st, engine=engine)
    assert bool(calls) == (engine == "fused")
    monkeypatch.undo()
    for split in LISTING_SPLITS:
        facts = list(st) if split == "same_template" else list(getattr(req, split))
        if not facts:
            assert split not in got
            continue
        hits = fact_hits(model, facts, 64).tolist()
        lp, _ = target_logprobs(model, facts, 64)
        texts, _ = templates.greedy_continuations(model, [f.prompt for f in facts], 3, 64,
                                                  dummy=facts[0].target)
        rows = got[split]
        assert [(r["prompt"], r["target"]) for r in rows] == [(f.prompt, f.target)
                                                             for f in facts]
        assert [r["hit"] for r in rows] == hits
        assert [r["answer"] for r in rows] == [(t.strip().splitlines() or [""])[0]
                                               for t in texts]
        want = torch.tensor(lp.tolist(), dtype=torch.float64).exp()
        have = torch.tensor([r["p_target"] for r in rows], dtype=torch.float64)
        assert torch.allclose(have, want, rtol=1e-4, atol=1e-9), split
    assert any(r["hit"] for r in got["retain"]) and not all(r["hit"] for r in got["holdout"])


def test_greedy_continuations_fused_equals_serial(tiny, tiny_request, monkeypatch):
    """Greedy continuations through the fused forward (which the test sees called) are the
    handle's, and the engine is validated even for no prompts."""
    import excise.templates as T

    model = tiny.model
    calls = []
    plain = T.target_logits
    monkeypatch.setattr(T, "target_logits", lambda *a, **k: calls.append(1) or plain(*a, **k))
    facts = list(tiny_request.forget)[:40] + list(tiny_request.holdout)[:40]
    prompts, dummy = [f.prompt for f in facts], facts[0].target
    a, pa = templates.greedy_continuations(model, prompts, 3, 16, dummy=dummy)
    b, pb = templates.greedy_continuations(model, prompts, 3, 16, dummy=dummy, engine="fused")
    assert a == b and torch.allclose(torch.tensor(pa), torch.tensor(pb), rtol=1e-4)
    assert len(calls) == 3 * math.ceil(len(prompts) / 16)  # fused: every step of every chunk
    assert len(set(a)) > 1  # not one answer for every prompt
    for few in (prompts, []):
        with pytest.raises(ValueError, match="engine='fast'"):
            templates.greedy_continuations(model, few, 3, 16, dummy=dummy, engine="fast")
    with pytest.raises(ValueError, match="engine='fast'"):
        fact_listing(model, tiny_request, engine="fast")
