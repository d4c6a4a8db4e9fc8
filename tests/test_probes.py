"""probes: verification suites, restoration attacks, positive controls, verdict, bad input.

Positive controls are models where the forget facts are known to be only suppressed; every
restoration attack must bring them back there (an attack that cannot undo known suppression
proves nothing), and must not on the retrain oracle.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import probes
from excise.handle import TLHandle
from excise.report import AttackCurves, AttackGrid, Curve, GridPoint, Report
from excise.request import FactSet, ForgetRequest
from excise.world import Tokenizer
from probes import attacks as A
from probes.controls import gradient_ascent, latent_suppression, unembed_ascent
from probes import stats
from probes.behaviour import recall
from probes.privacy import membership
from probes.verdict import decide, groups_of

# the tiny organism's settings (tuned on its controls; the defaults are tuned on small's); one
# setting per attack (grid "single"): the grid itself is tested in tests/test_verdict.py
FAST = A.AttackConfig(relearn_steps=20, relearn_lr=3e-3, benign_steps=20, benign_lr=3e-3,
                      eval_every=5, refit_steps=60, sae_steps=600, grid="single")


# -- controls ----------------------------------------------------------------------------------
class PromptFilter(TLHandle):
    """Known suppression: an output filter that blocks the answer after exact trained prompts."""

    def __init__(self, base: TLHandle, facts):
        super().__init__(base.model, base.tokenizer, base.name)
        self.blocked = [torch.tensor([base.tokenizer.bos_id] + base.tokenizer.encode(f.prompt))
                        for f in facts]

    def logits(self, tokens, hooks=None):
        out = super().logits(tokens, hooks).clone()
        for i, row in enumerate(tokens):
            for p in self.blocked:
                if len(p) <= len(row) and torch.equal(row[:len(p)], p):
                    out[i, len(p) - 1, self.tokenizer.pad_id] = 1e4
        return out

    def clone(self):
        c = PromptFilter(TLHandle(self.model, self.tokenizer), [])
        c.model = super().clone().model
        c.blocked = self.blocked
        return c


@pytest.fixture(scope="module")
def suppressed(tiny, tiny_request):
    m = gradient_ascent(tiny.model, tiny_request)
    assert recall(m, tiny_request.forget) <= 0.1
    return m


def _peak(c):
    return max(c.y)


# -- attacks: positive controls and oracle -----------------------------------------------------
def test_probe_refit_restores_unembedding_suppression(tiny, tiny_oracle, tiny_request):
    control = unembed_ascent(tiny.model, tiny_request)
    assert recall(control, tiny_request.forget) <= 0.15
    sup = A.refit(control, tiny_request, FAST)
    orc = A.refit(tiny_oracle, tiny_request, FAST)
    assert _peak(sup) >= 0.5
    assert _peak(sup) >= _peak(orc) + 0.3


@pytest.mark.parametrize("attack", ["relearn", "benign"])
def test_finetune_attacks_restore_known_suppression(attack, suppressed, tiny_oracle,
                                                    tiny_request):
    fn = getattr(A, attack)
    before = suppressed.fingerprint()
    sup = fn(suppressed, tiny_request, FAST)
    orc = fn(tiny_oracle, tiny_request, FAST)
    assert suppressed.fingerprint() == before  # attacks work on clones
    assert _peak(sup) >= 0.3
    assert _peak(sup) >= _peak(orc) + 0.2


def test_attacks_are_seeded(suppressed, tiny_request):
    a = A.relearn(suppressed, tiny_request, dataclasses.replace(FAST, relearn_steps=5))
    b = A.relearn(suppressed, tiny_request, dataclasses.replace(FAST, relearn_steps=5))
    assert a.y == b.y


def test_relearning_on_oracle_is_like_learning_new_people(tiny_oracle, tiny_request):
    forget = A.relearn(tiny_oracle, tiny_request, FAST)
    strangers = A.relearn(tiny_oracle, tiny_request, FAST, facts=tiny_request.holdout)
    assert max(forget.y) <= 0.3 and max(strangers.y) <= 0.3
    assert abs(max(forget.y) - max(strangers.y)) <= 0.2
    assert max(forget.aux["trained part"]) > max(forget.y)  # it does learn what it is shown


def test_sae_steering_restores_latent_space_suppression(tiny):
    """Known suppression in SAE space: gains on the SAE latents (kept in [0.02, 1], so every
    latent is only dampened) are fitted to hide the forget facts, while the weights still compute
    them. Fitting latent gains on half of the forget people must bring back the other half, and
    must not "restore" never-trained people under the same attack on the same model."""
    req = tiny.request(forget_people=range(8))
    site = f"blocks.{tiny.model.n_layers // 2}.resid_post"
    cfg = dataclasses.replace(FAST, sae_attack_steps=40)
    sae, scale = A.steering_sae(tiny.model, req, site, cfg.sae_expansion, 1500, cfg.sae_l1, 0)
    control = latent_suppression(tiny.model, req, sae, site, scale)
    sup = A.sae_steer(control, req, sae, site, cfg, scale)
    strangers = A.sae_steer(control, req, sae, site, cfg, scale, facts=req.holdout)
    assert sup.y[0] <= 0.5  # the control does hide the facts
    # measured: +0.20 (0.42 -> 0.62) with one cached tiny organism, +0.13 (0.43 -> 0.57) with a
    # freshly trained one; the attack restores part of the suppression, never-trained people none
    assert max(sup.y) >= sup.y[0] + 0.1
    assert max(sup.y) >= max(strangers.y) + 0.3


def test_quantization_8bit_keeps_unedited_recall(tiny, tiny_request):
    c = A.quantize(tiny.model, tiny_request, dataclasses.replace(FAST, quant_bits=(8,)))
    assert c.y[1] == c.y[0]
    assert c.aux["retain recall"][1] == c.aux["retain recall"][0]


def test_quantization_restores_sub_resolution_suppression(tiny, tiny_request, tiny_oracle):
    """Known suppression below the quantization step: weights = 8-bit grid + a projected
    gradient-ascent perturbation of at most 0.45 steps; RTN snaps it back. 4-bit, because
    the tiny model keeps full recall at 4 bits and the box is wide enough to suppress."""
    bits = 4
    m = A.quantized(tiny.model, bits)
    grid = {k: v.detach().clone() for k, v in m.named_parameters().items()}
    step = {}
    for k, v in grid.items():
        last = k.split(".")[-1]
        if v.dim() >= 2 and last.startswith("W_"):
            dim = 0 if last in ("W_E", "W_pos") else -1
            other = [i for i in range(v.dim()) if i != dim % v.dim()]
            step[k] = v.abs().amax(dim=other, keepdim=True) / (2 ** (bits - 1) - 1)
    opt = torch.optim.Adam([m.named_parameters()[k] for k in step], lr=1e-2)
    fb, rb = m.encode(list(tiny_request.forget)), m.encode(list(tiny_request.retain))
    params = m.named_parameters()
    for i in range(60):
        loss = -m.loss(fb).clamp(max=20) + m.loss(rb)
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            for k, s in step.items():
                lo, hi = grid[k] - 0.45 * s, grid[k] + 0.45 * s
                keep = grid[k].abs() == grid[k].abs().amax(
                    dim=[j for j in range(grid[k].dim())
                         if j != (0 if k.endswith(("W_E", "W_pos")) else grid[k].dim() - 1)],
                    keepdim=True)
                params[k].copy_(torch.where(keep, grid[k], params[k].clamp(lo, hi)))
        if i % 5 == 4 and recall(m, tiny_request.forget) <= 0.2:
            break
    base = recall(m, tiny_request.forget)
    assert base <= 0.3
    cfg = dataclasses.replace(FAST, quant_bits=(bits,))
    sup = A.quantize(m, tiny_request, cfg)
    orc = A.quantize(tiny_oracle, tiny_request, cfg)
    assert sup.y[1] >= base + 0.4
    assert max(sup.y) >= max(orc.y) + 0.2


def test_paraphrase_attack_restores_output_filter(tiny, tiny_request, tiny_oracle):
    control = PromptFilter(tiny.model, tiny_request.forget)
    assert recall(control, tiny_request.forget) == 0.0
    sup = A.paraphrase(control, tiny_request, FAST)
    orc = A.paraphrase(tiny_oracle, tiny_request, FAST)
    assert max(sup.y[1:]) >= 0.3
    assert max(sup.y[1:]) >= max(orc.y[1:]) + 0.2


# -- privacy -----------------------------------------------------------------------------------
def test_membership_auc_is_one_on_memorized_vs_strangers(tiny, tiny_request):
    m = membership(tiny.model, tiny_request)
    assert m["mia_auc_loss"] == 1.0


def test_membership_auc_is_half_when_losses_are_identical(tiny_model, tiny_request):
    with torch.no_grad():  # uniform next-token distribution: every target has the same loss
        tiny_model.model.unembed.W_U.zero_()
        tiny_model.model.unembed.b_U.zero_()
    same = ForgetRequest(forget=tiny_request.forget.where(attribute="pet"),
                         retain=tiny_request.retain,
                         holdout=tiny_request.holdout.where(attribute="pet"))
    m = membership(tiny_model, same)
    assert m["mia_auc_loss"] == 0.5 and m["mia_auc_mink"] == 0.5


# -- closed-form leave-one-person-out against explicit refits ---------------------------------
def test_group_loo_matches_refits():
    g = torch.Generator().manual_seed(0)
    n, d = 40, 12
    x = torch.randn(n, d, generator=g, dtype=torch.float64) + 0.2
    y = (torch.rand(n, generator=g) > 0.5).double()
    groups = torch.arange(n) // 3
    fast = stats.ridge_group_loo(x, y, 2.0, groups)
    lg = stats.logistic_group_loo(x, y, 2.0, groups)
    for u in groups.unique():
        m = groups == u
        w, b = stats.ridge_fit(x[~m], y[~m], 2.0)
        assert torch.allclose(fast[m], x[m] @ w + b, atol=1e-8)
        w, b = stats.logistic_fit(x[~m], y[~m], 2.0)
        assert torch.allclose(lg[m], torch.sigmoid(x[m] @ w + b), atol=1e-6)


# -- verify and the verdict --------------------------------------------------------------------
def test_verify_all_suites_on_unedited_model(tiny, tiny_request, tiny_oracle, tmp_path):
    model = tiny.model.clone()
    before = model.fingerprint()
    cfg = dataclasses.replace(FAST, relearn_steps=5, benign_steps=5, refit_steps=10,
                              sae_steps=100)
    rep = probes.verify(model, tiny_request, oracle=tiny_oracle, suite="all", label="after",
                        original=tiny.model, attacks=cfg)
    assert model.fingerprint() == before and model.hook_count() == tiny.model.hook_count()
    assert set(rep.metrics) == {"after", "before", "oracle"}
    assert rep.verdict == "not forgotten"
    assert "deleted" in rep.verdict_rule
    a = rep.metrics["after"]
    assert a["mia_auc_loss"] > 0.9 and a["forget_quality"] < 0.05
    assert rep.metrics["oracle"]["forget_quality"] == 1.0
    assert a["cka_original_forget_L0"] == pytest.approx(1.0)
    assert set(rep.extra["attacks"]) == set(A.ATTACKS)
    paths = probes.write_plots(rep, tmp_path)
    assert len(paths) == len(A.ATTACKS) + 2 and all(p.endswith(".png") for p in paths)
    assert "Verdict" in rep.to_markdown() and rep.to_json()


def test_verify_cache_reuses_oracle_results_and_changes_nothing(tiny, tiny_request,
                                                                tiny_oracle):
    """A sweep's cache: the second call measures only the new model; every number equals the
    uncached call's."""
    from edit import dampen
    from locate import fisher

    cfg = dataclasses.replace(FAST, attacks=("relearn", "quantize"), relearn_steps=5)
    kw = dict(oracle=tiny_oracle, suite=["behaviour", "privacy", "loo_probe", "attacks"],
              label="after", original=tiny.model, attacks=cfg, loo_null=3)
    plain = probes.verify(tiny.model, tiny_request, **kw)
    cache: dict = {}
    probes.verify(tiny.model, tiny_request, cache=cache, **kw)
    n = len(cache)
    m = tiny.model.clone()
    e = dampen(m, fisher(m, tiny_request), alpha=3.0)
    cached = probes.verify(m, tiny_request, cache=cache, **kw)
    fresh = probes.verify(m, tiny_request, **kw)
    e.revert()
    assert len(cache) == n + 4  # behaviour, privacy, probe, attacks of the edited model only
    assert cached.metrics == fresh.metrics
    assert cached.extra["attacks"] == fresh.extra["attacks"]
    assert plain.metrics["oracle"] == fresh.metrics["oracle"]


def _grids(e, o, people: int = 5):
    """A relearning grid of one setting: every held-out person recalls ``e[i]`` (``o[i]``
    on the oracle) of 10 facts at budget i."""
    def curve(ys):
        hits = [[True] * round(10 * y) + [False] * (10 - round(10 * y)) for y in ys]
        return Curve([0, 5], ys, "steps", hits=[h * people for h in hits],
                     groups=[[(0, p, "") for p in range(people) for _ in range(10)]] * 2)
    return {"relearn": AttackGrid((GridPoint(3e-4, 0, AttackCurves(
        {"after": curve(e), "oracle": curve(o)})),), "relearn_lr")}


@pytest.mark.parametrize("f, curve, want", [
    (0.05, [0.0, 0.1], "deleted"),
    (0.05, [0.0, 0.6], "suppressed"),
    (0.40, [0.0, 0.0], "suppressed"),
    (1.0, [1.0, 1.0], "not forgotten"),
])
def test_verdict_rule(f, curve, want, tiny_request):
    req = tiny_request
    n = len(req.forget)
    groups = groups_of(req)
    rank, size = [], {}  # each person recalls the same fraction f of their facts
    for g in groups["forget"]:
        rank.append(size.get(g, 0))
        size[g] = rank[-1] + 1
    forget = torch.tensor([r < round(f * size[g]) for r, g in zip(rank, groups["forget"])])
    ok = {s: torch.ones(len(getattr(req, s)), dtype=torch.bool) for s in ("retain", "shared")}
    hits = {"after": {"forget": forget} | ok,
            "oracle": {"forget": forget.clone() if f < 0.1 else torch.zeros(n, dtype=bool)}
            | ok,
            "before": {"forget": torch.ones(n, dtype=torch.bool)} | ok}
    metrics = {lab: {"forget_recall": float(h["forget"].float().mean()), "perplexity": 10.0,
                     "mia_auc_loss": 0.5} for lab, h in hits.items()}
    j = decide(metrics, hits, groups, _grids(curve, [0.0, 0.1]), "after", "before")
    assert j.verdict == want
    gap = max(curve[0] - 0.0, curve[1] - 0.1)
    assert "oracle" in j.rule and j.checks["attack_relearn"]["worst_gap"] == pytest.approx(gap)


# -- the suite registry ------------------------------------------------------------------------
def test_suite_registry_refuses_duplicates_and_unknown_prerequisites():
    from probes.suites import Suite, register_suite

    with pytest.raises(ValueError, match="suite 'behaviour' is already registered"):
        register_suite(Suite("behaviour", lambda ctx: probes.SuiteResult()))
    with pytest.raises(ValueError, match="'all' is reserved"):
        register_suite(Suite("all", lambda ctx: probes.SuiteResult()))
    with pytest.raises(ValueError, match="requires 'atacks', which is not registered"):
        register_suite(Suite("late", lambda ctx: probes.SuiteResult(), requires=("atacks",)))
    with pytest.raises(ValueError, match="needs 'retrained'"):
        register_suite(Suite("odd", lambda ctx: probes.SuiteResult(), needs=("retrained",),
                             refusal="pass retrained="))
    assert list(probes.SUITES) == ["behaviour", "oracle", "privacy", "loo_probe", "drift",
                                   "attacks", "verdict"]
    assert list(A.RUNNERS) == list(A.ATTACKS)  # one runner per attack, in the declared order


def test_suites_resolve_prerequisites_in_registration_order():
    from probes.suites import resolve

    assert resolve("verdict") == ["behaviour", "privacy", "attacks", "verdict"]
    assert resolve(["drift", "oracle"]) == ["behaviour", "oracle", "drift"]
    assert resolve([]) == ["behaviour"]
    assert resolve("all") == list(probes.SUITES)
    with pytest.raises(ValueError, match="did you mean 'loo_probe'.*choose from .*'behaviour'"
                                         ".*'verdict', 'all'"):
        resolve(["behaviour", "loo_prob"])


def test_verdict_alone_runs_attacks(tiny, tiny_request, tiny_oracle):
    rep = probes.verify(tiny.model, tiny_request, oracle=tiny_oracle, original=tiny.model,
                        suite="verdict", label="after", attacks=["quantize"])
    assert set(rep.extra["attacks"]) == {"quantize"}
    assert isinstance(rep.extra["attacks"]["quantize"], AttackCurves)
    assert rep.metrics["after"]["attack_quantize"] == max(
        rep.extra["attacks"]["quantize"].curves["after"].y)
    assert rep.verdict == "not forgotten" == rep.extra["verdict"]["verdict"]
    assert list(rep.extra["verify_seconds"]) == ["behaviour", "privacy", "attacks"]


def test_registered_suite_reads_its_prerequisite(tiny, tiny_request):
    seen = {}

    @probes.suite("forget_share", requires=("behaviour",))
    def forget_share(ctx):
        seen["suites"] = list(ctx.results)
        b = ctx.results["behaviour"].metrics
        return probes.SuiteResult({k: {"forget_share": m["forget_recall"] / 2}
                                   for k, m in b.items()}, {"forget_share": ctx.label})

    try:
        rep = probes.verify(tiny.model, tiny_request, suite="forget_share", label="x")
    finally:
        del probes.SUITES["forget_share"]
    assert seen["suites"] == ["behaviour"]
    m = rep.metrics["x"]
    assert m["forget_share"] == m["forget_recall"] / 2
    assert list(m)[-1] == "forget_share" and rep.extra["forget_share"] == "x"


# -- typed curves through to the writers -------------------------------------------------------
def test_report_serialises_typed_attack_curves():
    a = AttackCurves({"after": Curve([0, 5], [0.0, 0.5], "steps", aux={"seen": [0.1, 0.9]}),
                      "oracle": Curve([0, 5], [0.0, 0.25], "steps")})
    rep = Report(metrics={"after": {"forget_recall": 0.0}}, extra={"attacks": {"relearn": a}})
    want = {"x": [0, 5], "xlabel": "steps", "ylabel": "forget recall",
            "curves": {"after": [0.0, 0.5], "oracle": [0.0, 0.25]},
            "aux": {"seen": {"after": [0.1, 0.9]}}}
    assert json.loads(rep.to_json())["probes"]["attacks"]["relearn"] == want
    assert "| oracle | 0.000 | 0.250 |" in rep.to_markdown()
    with pytest.raises(ValueError, match="2 budgets x but 3 values y"):
        Curve([0, 5], [0.0, 0.1, 0.2], "steps")
    with pytest.raises(ValueError, match="aux series 'seen' has 1 values"):
        Curve([0, 5], [0.0, 0.1], "steps", aux={"seen": [0.1]})
    with pytest.raises(ValueError, match="different budgets"):
        AttackCurves({"after": Curve([0, 5], [0, 0], "steps"), "oracle": Curve([0], [0], "s")})


# -- knowledge screening -----------------------------------------------------------------------
def test_knowledge_is_greedy_recall(tiny, tiny_request):
    from probes.behaviour import fact_hits

    m = tiny.model.clone()
    W = m.model.unembed.W_U
    with torch.no_grad():  # noise on the unembedding: about half the facts are lost
        W.add_(2 * W.std() * torch.randn(W.shape, generator=torch.Generator().manual_seed(0)))
    facts = list(tiny_request.forget) + list(tiny_request.retain)[:100]
    k = probes.knowledge(m, facts)
    known = [r["known"] for r in k]
    assert known == fact_hits(m, facts).tolist() and 0 < sum(known) < len(known)
    logs = []
    kept, dropped = probes.screen_known(m, tiny_request, log=logs.append)
    assert len(kept.forget) == int(fact_hits(m, tiny_request.forget).sum())
    assert len(dropped["forget"]) == len(tiny_request.forget) - len(kept.forget) == len(logs)


# -- bad input ---------------------------------------------------------------------------------
def test_unknown_suite_and_missing_oracle(tiny, tiny_request):
    with pytest.raises(ValueError, match="unknown verification suite 'atacks'"):
        probes.verify(tiny.model, tiny_request, suite="atacks")
    # without an oracle the verdict uses the comparator (tests/test_comparator.py); it still
    # needs the original
    with pytest.raises(ValueError, match="pass original="):
        probes.verify(tiny.model, tiny_request, suite="verdict")


def test_empty_and_overlapping_splits(tiny, tiny_request):
    no_holdout = dataclasses.replace(tiny_request, holdout=FactSet("holdout", ()))
    with pytest.raises(ValueError, match="holdout split is empty"):
        probes.verify(tiny.model, no_holdout, suite="privacy")
    bad = dataclasses.replace(tiny_request)
    object.__setattr__(bad, "holdout", FactSet("holdout", tiny_request.retain.facts[:3]))
    with pytest.raises(ValueError, match="retain and holdout splits overlap"):
        probes.verify(tiny.model, bad)
    empty = dataclasses.replace(tiny_request)
    object.__setattr__(empty, "forget", FactSet("forget", ()))
    with pytest.raises(ValueError, match="forget split of the request is empty"):
        probes.verify(tiny.model, empty)


def test_oracle_from_another_world_is_refused(tiny, tiny_request):
    other = TLHandle(tiny.model.model, Tokenizer(["zz", "yy"] + tiny.tokenizer.vocab[4:-2]))
    with pytest.raises(ValueError, match="different world"):
        probes.verify(tiny.model, tiny_request, oracle=other, suite="oracle")
    same_size = TLHandle(tiny.model.model, Tokenizer(["zz"] + tiny.tokenizer.vocab[5:]))
    with pytest.raises(ValueError, match="different world"):
        probes.verify(tiny.model, tiny_request, oracle=same_size, suite="oracle")


@pytest.mark.parametrize("bad", [{"relearn_steps": 0}, {"refit_steps": 0}, {"attacks": []},
                                 {"sae_attack_steps": 0}, {"relearn_lr": 0.0}, {"relearnsteps": 5}])
def test_zero_attack_budget_is_refused(tiny, tiny_request, tiny_oracle, bad):
    with pytest.raises(ValueError):
        probes.verify(tiny.model, tiny_request, oracle=tiny_oracle, suite="attacks",
                      attacks=bad)
