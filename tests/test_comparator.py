"""Issue 15 part 2: attacks on a model with no oracle - the comparator (never-known facts split
and attacked as the forget facts), the attacks that need no training (in-context relearning,
the logit lens) and the verdict's no-oracle branch."""

from __future__ import annotations

import dataclasses
import math
import random

import pytest
import torch

import probes
from excise.report import AttackCurves, AttackGrid, Curve, GridPoint
from excise.request import owner
from probes import attacks as A
from probes.verdict import Rule, decide, two_sample_bootstrap


def _halves(facts, fraction: float, seed: int):
    """The split by owner written out: owners sorted, shuffled by ``Random(seed)``, the first
    round(fraction * n) (at least 1, at most n - 1) train, the rest are held out."""
    owners = sorted({owner(f) for f in facts})
    random.Random(seed).shuffle(owners)
    k = max(1, min(len(owners) - 1, round(fraction * len(owners))))
    return set(owners[:k]), set(owners[k:])


def test_comparator_is_split_exactly_as_the_forget_facts(tiny, tiny_request):
    """The comparator's in-context and relearning curves are measured on the held-out half of
    the never-known facts, split by the same rule, fraction and seed as the forget facts."""
    cfg = A.AttackConfig(attacks=("incontext", "relearn"), relearn_steps=1, eval_every=1,
                         relearn_fraction=0.5, seed=3, grid="single", icl_shots=(0, 1))
    creq = A.comparator_request(tiny_request)
    assert list(creq.forget) == list(tiny_request.holdout)
    assert not len(creq.holdout) and not len(creq.paraphrase)
    assert list(creq.retain) == list(tiny_request.retain)
    for req in (tiny_request, creq):
        _, held = _halves(req.forget, 0.5, 3)
        want = [owner(f) for f in req.forget if owner(f) in held]
        for curve in (A.incontext(tiny.model, req, cfg), A.relearn(tiny.model, req, cfg)):
            assert all(list(g) == want for g in curve.groups)
    grids = A.run_comparator_grid(tiny.model, tiny_request, cfg)
    _, held = _halves(tiny_request.holdout, 0.5, 3)
    for g in grids.values():
        c = g.points[0].curves.curves["_"]
        assert all({tuple(x) for x in grp} == held for grp in c.groups)


def test_incontext_prompts_are_the_specified_tokens(tiny, tiny_request):
    """Every in-context prompt is [BOS] + (shot prompt, shot target) for the last shots of the
    first k of the seeded order that fit the context + the held-out prompt + its target."""
    model, tok = tiny.model, tiny.model.tokenizer
    cfg = A.AttackConfig(icl_shots=(0, 1, 2, 8), seed=1, icl_sep="\n")
    prompts, held, used = A.incontext_prompts(model, tiny_request, cfg)
    a, b = tiny_request.forget.split(cfg.relearn_fraction, seed=1)
    pool = list(a)
    random.Random(1).shuffle(pool)
    assert held == list(b)
    for i, k in enumerate(cfg.icl_shots):
        batch = model.encode(prompts[k])
        for r, f in enumerate(held):
            shots = pool[:k]
            while True:  # the slow way: the string written out, then drop shots until it fits
                text = ""
                for s in shots:
                    text = text + s.prompt + " " + s.target + "\n"
                ids = [tok.bos_id]
                for s in shots:
                    ids += tok.encode(s.prompt) + tok.encode(s.target)
                ids += tok.encode(f.prompt) + tok.encode(f.target)
                if len(ids) <= model.n_ctx or not shots:
                    break
                shots = shots[1:]
            assert prompts[k][r].prompt == text + f.prompt
            assert (prompts[k][r].target, prompts[k][r].person) == (f.target, f.person)
            assert batch.tokens[r, :len(ids)].tolist() == ids
            assert used[i][r] == len(shots)
    assert max(used[-1]) < 8  # the organism's 32-token context caps the shots
    # the curve's hits are the greedy answers on those prompts
    curve = A.incontext(model, tiny_request, cfg)
    for i, k in enumerate(cfg.icl_shots):
        batch = model.encode(prompts[k])
        with torch.no_grad():
            pred = model.logits(batch.tokens).argmax(-1)[:, :-1]
        m = batch.target_mask[:, 1:]
        want = ((pred == batch.tokens[:, 1:]) | ~m).all(1)
        assert list(curve.hits[i]) == want.tolist()


def test_logit_lens_last_layer_is_the_models_own_greedy_answer(tiny, tiny_request):
    model = tiny.model
    facts = list(tiny_request.forget) + list(tiny_request.holdout)[:20]
    fs = type(tiny_request.forget)
    req = dataclasses.replace(tiny_request, forget=fs("forget", tuple(facts)),
                              holdout=fs("holdout", ()))
    curve = A.lens(model, req)
    assert list(curve.x) == list(range(model.n_layers))
    want, first_rank = [], []
    with torch.no_grad():
        for f in facts:  # one fact at a time, read from the model's own final logits
            b = model.encode([f])
            logits = model.logits(b.tokens)[0]
            pos = b.target_mask[0].nonzero()[:, 0]
            want.append(all(int(logits[p - 1].argmax()) == int(b.tokens[0, p]) for p in pos))
            lp = logits[pos[0] - 1]
            first_rank.append(int((lp > lp[b.tokens[0, pos[0]]]).sum()) + 1)
    assert list(curve.hits[-1]) == want
    assert 0 < sum(want) < len(want)  # both kinds present: the comparison can fail
    assert curve.aux["median rank"][-1] == float(torch.tensor(first_rank).float().median())


def test_two_sample_bootstrap_matches_a_slow_loop():
    a = [1, 1, 0, 1, 0, 1, 1, 0]
    ga = ["p", "p", "q", "q", "r", "r", "s", "s"]
    ra = [0, 1, 0, 1, 0, 1, 0, 1]
    b = [0, 1, 0, 0, 1, 0]
    gb = ["x", "x", "y", "y", "z", "z"]
    rb = [0, 1, 0, 1, 0, 1]
    bs = two_sample_bootstrap(a, ga, b, gb, ra, rb, n_boot=50, seed=7)
    ca = probes.stats.resample_counts(4, 50, 7)
    cb = probes.stats.resample_counts(3, 50, 8)
    for r in range(50):
        best = -math.inf
        for row in (0, 1):
            sa = na = sb = nb = 0.0
            for v, g, rr in zip(a, ga, ra):
                if rr == row:
                    w = float(ca[r, "pqrs".index(g)])
                    sa, na = sa + w * v, na + w
            for v, g, rr in zip(b, gb, rb):
                if rr == row:
                    w = float(cb[r, "xyz".index(g)])
                    sb, nb = sb + w * v, nb + w
            if na and nb:
                best = max(best, sa / na - sb / nb)
        assert float(bs.samples[r]) == pytest.approx(best, abs=1e-12)
    assert bs.estimate == pytest.approx(max(3 / 4 - 1 / 3, 2 / 4 - 1 / 3))


def _verdict_inputs(recovered: float):
    """Hand-made numbers of a request with 80 forget people and 80 never-known subjects (40 of
    each held out by the attack): the model forgot everything; under the attack its held-out
    recall climbs to ``recovered`` while the comparator's climbs to 0.2."""
    fg = [f"f{i}" for i in range(80)]
    hg = [f"h{i}" for i in range(80)]
    rg = [f"r{i}" for i in range(20)]
    zeros, ones = [False] * 80, [True] * 20

    def curve(level: float, groups) -> Curve:
        n = len(groups)
        hits = [[False] * n, [i < round(level * n) for i in range(n)]]
        return Curve((0, 10), (0.0, sum(hits[1]) / n), "steps",
                     hits=hits, groups=[groups, groups])

    held_f, held_h = fg[40:], hg[40:]
    grid = AttackGrid((GridPoint(1e-3, 0, AttackCurves({
        "after": curve(recovered, held_f), "before": curve(1.0, held_f),
        "comparator": curve(0.2, held_h)})),), "relearn_lr")
    metrics = {"after": {"forget_recall": 0.0, "retain_recall": 1.0, "perplexity": 20.0,
                         "mia_auc_loss": 0.5},
               "before": {"forget_recall": 1.0, "retain_recall": 1.0, "perplexity": 20.0,
                          "mia_auc_loss": 0.9}}
    hits = {"after": {"forget": zeros, "retain": ones, "holdout": zeros},
            "before": {"forget": [True] * 80, "retain": ones, "holdout": zeros}}
    groups = {"forget": fg, "retain": rg, "holdout": hg}
    scores = {"after": ([0.0] * 80, [0.0] * 80)}
    return metrics, hits, groups, {"relearn": grid}, scores


@pytest.mark.parametrize("recovered, verdict", [(0.1, "deleted"), (1.0, "suppressed")])
def test_no_oracle_verdict_on_hand_made_numbers(recovered, verdict):
    metrics, hits, groups, grids, scores = _verdict_inputs(recovered)
    j = decide(metrics, hits, groups, grids, "after", "before", Rule(n_boot=500),
               scores=scores)
    assert j.verdict == verdict
    assert j.rule.startswith("No retrain oracle")
    assert j.checks["attack_relearn"]["ok"] is (verdict == "deleted")
    assert j.checks["attack_relearn"]["worst_gap"] == pytest.approx(max(0.0, recovered - 0.2))
    assert j.checks["forget_vs_never_known"]["ok"] and j.checks["mia_vs_never_known"]["ok"]
    # the same numbers with an oracle (its curve = the comparator's) take the oracle's rule
    g = grids["relearn"]
    c = dict(g.points[0].curves.curves)
    oracle = c.pop("comparator")
    with pytest.raises(ValueError, match="different facts"):  # the oracle's rule is paired
        decide(metrics | {"oracle": metrics["after"]},
               hits | {"oracle": hits["after"]}, groups,
               {"relearn": AttackGrid((GridPoint(1e-3, 0, AttackCurves(
                   c | {"oracle": oracle})),), "relearn_lr")}, "after", "before",
               Rule(n_boot=200))


def test_no_oracle_verdict_refuses_without_never_known_facts():
    metrics, hits, groups, grids, scores = _verdict_inputs(0.1)
    hits["before"].pop("holdout")
    with pytest.raises(ValueError, match="never-known facts"):
        decide(metrics, hits, groups, grids, "after", "before", Rule(n_boot=100))


def test_verify_without_oracle_runs_the_comparator(tiny, tiny_request):
    """The whole path on tiny: no oracle, the request's holdout (never-trained people) is the
    comparator; every attack has its curve and the verdict uses the no-oracle rule."""
    cfg = A.AttackConfig(attacks=("incontext", "lens", "paraphrase"), grid="single",
                         icl_shots=(0, 1, 2))
    rep = probes.verify(tiny.model.clone(), tiny_request, original=tiny.model,
                        suite="verdict", label="after", attacks=cfg, n_boot=200)
    assert rep.verdict == "not forgotten"
    assert rep.verdict_rule.startswith("No retrain oracle")
    for name in cfg.attacks:
        assert set(rep.extra["attacks"][name].curves) == {"after", "before", "comparator"}
        assert rep.metrics["after"][f"attack_{name}_comparator"] < 0.2
    assert "comparator" in rep.extra["attack_reference"]


def test_no_oracle_verdict_on_a_tiny_hf_gemma(tmp_path):
    """The real-model path on a tiny random Gemma 3 layout: no oracle, never-known facts as the
    comparator, relearning on the MLP weights only; the report and its plots are written."""
    pytest.importorskip("transformers")
    from test_hf import tiny as tiny_hf
    from test_hf_methods import _quiet
    from test_hf_methods import request as hf_request

    h = tiny_hf("gemma3")
    req = hf_request()
    fp = {k: p.detach().clone() for k, p in h.named_parameters().items()}
    cfg = dict(attacks=["relearn", "incontext", "lens", "paraphrase"], relearn_steps=2,
               relearn_batch=4, eval_every=1, train_sites=["blocks.*.mlp.*"],
               icl_shots=[0, 1, 2])
    rep = _quiet(probes.verify, h.clone(), req, original=h, suite="verdict", label="after",
                 attacks=cfg, grid="single", n_boot=200)
    assert rep.verdict in probes.verdict.VERDICTS
    assert rep.verdict_rule.startswith("No retrain oracle")
    g = rep.extra["attack_grid"]["relearn"]
    assert set(g.labels) == {"after", "before", "comparator"}
    small = A.AttackConfig(grid="small").settings("relearn")
    assert [c.relearn_lr for c in small] == list(A.GRIDS["small"]["lrs"]["relearn"])
    assert all(torch.equal(p, fp[k]) for k, p in h.named_parameters().items())
    # relearning trained the MLP weights only
    m = A._trainable_clone(h, ("blocks.*.mlp.*",))
    grads = {k for k, p in m.named_parameters().items() if p.requires_grad}
    assert grads and all(".mlp." in k for k in grads)
    paths = probes.write_plots(rep, tmp_path)
    assert {f"attack_{n}.png" for n in cfg["attacks"]} <= {p.rsplit("/", 1)[-1] for p in paths}
    md = rep.to_markdown()
    assert "worst gap (after - comparator)" in md and "never-known" in md


def test_incontext_runs_both_folds_and_pools_every_forget_person(tiny, tiny_request):
    """With a grid of two seeds, in-context relearning runs the complementary folds: the second
    shows the part the first held out and holds out the part it showed, so the pooled curve
    measures every forget fact once; at 0 shots its hits are the plain greedy answers."""
    from probes.behaviour import fact_hits

    cfg = A.AttackConfig(attacks=("incontext",), grid="quick", seed=4, icl_shots=(0, 2))
    settings = cfg.settings("incontext")
    assert [(c.seed, c.fold) for c in settings] == [(4, 0), (5, 1)]
    assert A.AttackConfig(grid="single").settings("incontext")[0].fold == 0
    assert len(A.AttackConfig(grid="single").settings("incontext")) == 1
    (_, held0, _), (_, held1, _) = (A.incontext_prompts(tiny.model, tiny_request, c)
                                    for c in settings)
    assert {owner(f) for f in held0}.isdisjoint({owner(f) for f in held1})
    assert sorted(map(str, held0 + held1)) == sorted(map(str, tiny_request.forget))
    grid = A.run_grid({"after": tiny.model}, tiny_request, cfg)["incontext"]
    assert [(p.lr, p.seed) for p in grid.points] == [(None, 4), (None, 5)]
    (pooled,) = grid.pooled().points
    assert pooled.pooled == (4, 5)
    c = pooled.curves.curves["after"]
    plain = fact_hits(tiny.model, held0 + held1)
    assert list(c.hits[0]) == [bool(h) for h in plain]
    assert c.y[0] == pytest.approx(sum(map(bool, plain)) / len(plain))
    # the verdict's check names the pooled folds where it found the worst gap
    from probes.verdict import _where
    assert _where(grid, "after", "after").startswith("seeds 4, 5 pooled, in-context examples")
