"""The verdict's calibration (excise.app.calibrate): known-answer models land on the diagonal.

The pieces that could be wrong are tested on their own: the ascent-until-damaged stopping rule
(against a rerun that stops one measurement earlier), the confusion table (hand-made rows), the
distillation data (retain plus shared sentences, never a forget fact) and the refusals.

``test_calibration_end_to_end_on_the_cheap_cells`` runs the calibration on the cells that need
no training beyond the shared tiny fixtures (forget people 0, 1, 2): the original and the damaged
model, with a cheaper grid than the bench's - ``grid="single"`` and two attacks (relearning,
quantization) instead of bench/calibrate.py's ``full`` grid of every attack - to stay within
~20 s. ``test_calibration_lands_on_the_diagonal`` runs every case (``slow``: it trains a second
oracle and the planted organism and its oracle, minutes on 2 cores); it is a strict xfail while
the calibration has cells off the diagonal (see docs/results/calibration.md).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from excise.app import calibrate as C
from probes.behaviour import recall
from probes.verdict import ANSWERS, VERDICTS


def _row(case, got, seed=0):
    return C.Row(case, C.EXPECTED[case], got, seed, (1, 2), {}, (), 0.0, 0.0)


def test_confusion_counts_expected_by_got():
    cal = C.Calibration((_row("retrain", "deleted"), _row("distill", "suppressed"),
                         _row("original", "not forgotten"), _row("retrain", "deleted", 1)),
                        "tiny", (0, 1), "single")
    t = cal.confusion()
    assert set(t) == set(ANSWERS) and all(set(v) == set(VERDICTS) for v in t.values())
    assert "inconclusive" in VERDICTS and "inconclusive" not in t
    assert t["deleted"]["deleted"] == 2 and t["deleted"]["suppressed"] == 1
    assert t["not forgotten"]["not forgotten"] == 1
    assert sum(sum(v.values()) for v in t.values()) == 4
    assert not cal.diagonal and [r.case for r in cal.off_diagonal] == ["distill"]
    assert cal.to_dict()["diagonal"] is False


def test_every_case_expects_a_verdict_and_every_verdict_is_expected():
    assert set(C.EXPECTED.values()) == set(ANSWERS)
    assert C.CASES == tuple(C.EXPECTED)


@pytest.mark.parametrize("teacher, want", [("original", "original"), ("oracle", "oracle-4")])
def test_distill_teacher_is_the_original_or_an_unseen_retrain_oracle(monkeypatch, teacher, want):
    """The distill case learns from the original; its control (``distill_teacher="oracle"``)
    from a retrain oracle at training seed s + 1 - never one of the reference oracles (s, s + 2,
    ...), which would judge a copy of themselves."""
    class Fake:
        def __init__(self, name):
            self.name = name

        def clone(self):
            return Fake(self.name + " (clone)")

    class Org:
        model = Fake("original")
        preset = type("P", (), {"seed": 3})()

        def oracle(self, request, train_seed=None):
            return Fake(f"oracle-{train_seed}")

    taught, labels, schedules = [], [], []
    monkeypatch.setattr(C.edit, "distill",
                        lambda m, **kw: (taught.append(m.name), labels.append(kw["labels"]),
                                         schedules.append(kw["schedule"])))
    monkeypatch.setattr(C, "distill_request", lambda r: r)
    (case, model, _), = C.plain_cases(Org(), "request", 3, C.Knobs(distill_teacher=teacher),
                                      None, ("distill",), lambda _: None)
    assert case == "distill" and taught == [f"{want} (clone)"] and model.name == taught[0]
    # the known-deleted case learns the teacher's greedy answers on facts; soft on request
    assert labels == ["hard_facts"]
    list(C.plain_cases(Org(), "request", 3, C.Knobs(distill_labels="soft"), None,
                       ("distill",), lambda _: None))
    assert labels == ["hard_facts", "soft"]
    with pytest.raises(ValueError, match="distill_labels"):
        C.Knobs(distill_labels="argmax")
    # its learning-rate schedule: constant (tiny's table) unless the knobs say linear
    list(C.plain_cases(Org(), "request", 3, C.Knobs(distill_schedule="linear"), None,
                       ("distill",), lambda _: None))
    assert schedules == ["constant", "constant", "linear"]
    with pytest.raises(ValueError, match="distill_schedule.*linear"):
        C.Knobs(distill_schedule="cosine")


def test_controls_are_built_as_the_knobs_say(monkeypatch):
    """Every ascent control of the calibration gets the knobs' step budget, ``keep``, objective
    and text keeping (default: the margin, the KL), and the planted case's reinit the knobs'
    text loss; bad knob values are refused, naming the field."""
    seen = {}
    for name in ("gradient_ascent", "unembed_ascent", "last_block_ascent"):
        monkeypatch.setattr(C.controls, name,
                            lambda m, r, _n=name, **kw: seen.setdefault(_n, kw) and m)

    class Org:
        model = "original"

    cases = ("ascent_all", "ascent_unembed", "ascent_last")
    built = list(C.plain_cases(Org(), "request", 0, C.Knobs(), None, cases, lambda _: None))
    assert [c for c, *_ in built] == list(cases) and len(seen) == 3
    assert all(kw == {"steps": 100, "keep": 10.0, "keep_text": True, "objective": "margin",
                      "text": "kl"} for kw in seen.values())
    seen.clear()
    list(C.plain_cases(Org(), "request", 0, C.Knobs(control_objective="ascent",
                                                    control_text="nll"),
                       None, ("ascent_unembed",), lambda _: None))
    assert seen["unembed_ascent"]["objective"] == "ascent"
    assert seen["unembed_ascent"]["text"] == "nll"
    assert C.Knobs().reinit_text_loss == "kl" and C.Knobs().reinit_shared
    for field, bad in (("control_objective", "hinge"), ("control_text", "mse"),
                       ("reinit_text_loss", "l2")):
        with pytest.raises(ValueError, match=field):
            C.Knobs(**{field: bad})


def test_the_latent_control_hides_through_the_sae_the_knobs_name(monkeypatch):
    """The latent-gains control: the steering attack's SAE and the controls' steps unless the
    knobs name its own SAE (layer, width: trained as the attack's would be, on the original)
    and steps; bad values are refused, naming the field."""
    seen, trained = {}, []
    monkeypatch.setattr(C.controls, "latent_suppression",
                        lambda m, r, sae, site, scale, **kw: seen.update(kit=(sae, site, scale),
                                                                         **kw) or m)
    monkeypatch.setattr(C.A, "steering_kit",
                        lambda src, req, cfg: trained.append(cfg) or ("own", "site", 2.0))

    class Org:
        model = "original"

    attack_kit, cfg = ("attack sae", "blocks.1.resid_post", 1.0), C.A.AttackConfig()
    assert C.latent_kit("original", "request", cfg, C.Knobs(), attack_kit) is attack_kit
    assert C.latent_kit("original", "request", cfg, C.Knobs(latent_steps=300),
                        attack_kit) is attack_kit
    assert not trained  # nothing trained when the attack's SAE serves
    list(C.plain_cases(Org(), "request", 0, C.Knobs(), attack_kit, ("latent_gains",),
                       lambda _: None))
    assert seen["kit"] == attack_kit and seen["steps"] == 100
    # no attack kit to share: the attack's own SAE is trained, with the attack's settings
    C.latent_kit("original", "request", cfg, C.Knobs(), None)
    assert trained == [cfg]
    knobs = C.Knobs(latent_layer=0, latent_expansion=32, latent_steps=300)
    kit = C.latent_kit("original", "request", cfg, knobs, attack_kit)
    assert kit == ("own", "site", 2.0) and len(trained) == 2
    assert trained[1] == dataclasses.replace(cfg, sae_layer=0, sae_expansion=32)
    C.latent_kit("original", "request", cfg, C.Knobs(latent_layer=1))
    assert trained[2] == dataclasses.replace(cfg, sae_layer=1)
    list(C.plain_cases(Org(), "request", 0, knobs, kit, ("latent_gains",), lambda _: None))
    assert seen["kit"] == kit and seen["steps"] == 300 and seen["keep"] == 10.0
    # which SAEs the calibration builds: the attack's only where it runs the SAE attack, the
    # control's only where the latent-gains case is built
    trained.clear()
    with_sae = dataclasses.replace(cfg, attacks=("relearn", "sae"))
    without = dataclasses.replace(cfg, attacks=("relearn",))
    assert C.sae_kits("original", "request", without, knobs, ("original",)) == (None, None)
    assert not trained
    assert C.sae_kits("original", "request", with_sae, C.Knobs(), ("latent_gains",)) == \
        (("own", "site", 2.0),) * 2 and trained == [with_sae]  # one SAE serves both
    trained.clear()
    a, c = C.sae_kits("original", "request", without, knobs, ("latent_gains",))
    assert a is None and c == ("own", "site", 2.0) and len(trained) == 1
    assert trained[0].sae_layer == 0
    for field, bad in (("latent_layer", -1), ("latent_expansion", 0), ("latent_steps", 2.5),
                       ("latent_steps", True)):
        with pytest.raises(ValueError, match=field):
            C.Knobs(**{field: bad})


def test_the_latent_control_hides_tiny_facts_through_block_0_not_the_last(tiny, tiny_request):
    """Why tiny's calibration gives the latent-gains control its own SAE: through the steering
    attack's SAE (the last block's output) 100 steps of gains leave most forget facts recalled;
    through a 4x wider SAE on block 0's output the same budget hides most of them, with retain
    and shared recall kept and the organism untouched."""
    from probes.behaviour import behaviour_metrics

    before = tiny.model.fingerprint()
    cfg = C.A.AttackConfig()
    knobs = C.Knobs(latent_layer=0, latent_expansion=4 * cfg.sae_expansion)
    out = {}
    for name, k in (("attack", C.Knobs()), ("own", knobs)):
        kit = C.latent_kit(tiny.model, tiny_request, cfg, k)
        (_, model, _), = C.plain_cases(tiny, tiny_request, 0, k, kit, ("latent_gains",),
                                       lambda _: None)
        out[name] = behaviour_metrics(model, tiny_request)
    assert tiny.model.fingerprint() == before
    assert out["own"]["forget_recall"] <= 0.5
    assert out["attack"]["forget_recall"] >= out["own"]["forget_recall"] + 0.2
    assert out["own"]["retain_recall"] >= 0.98 and out["own"]["shared_recall"] >= 0.98


def test_damage_stops_at_the_first_measurement_below_the_threshold(tiny, tiny_request):
    before = tiny.model.fingerprint()
    m, steps = C.damage(tiny.model, tiny_request, 0.9, every=5)
    assert recall(m, tiny_request.retain) < 0.9 <= recall(tiny.model, tiny_request.retain)
    assert steps % 5 == 0 and steps > 5  # more than one measurement: the rule is exercised
    assert tiny.model.fingerprint() == before  # the organism is untouched
    # the same ascent stopped one measurement earlier had not got there yet
    with pytest.raises(ValueError, match="stayed >= 0.9 after"):
        C.damage(tiny.model, tiny_request, 0.9, every=5, max_steps=steps - 5)
    with pytest.raises(ValueError, match="below=1.5"):
        C.damage(tiny.model, tiny_request, 1.5)


def test_distillation_data_is_retain_and_shared_never_forget(tiny_request):
    req = C.distill_request(tiny_request)
    shared = {f.text for f in tiny_request.shared}
    assert shared <= set(req.retain_text)
    assert set(tiny_request.retain_text) <= set(req.retain_text)
    forget = {f.text for f in tiny_request.forget} | {f.text for f in tiny_request.paraphrase}
    assert not forget & set(req.retain_text)
    assert req.forget == tiny_request.forget and req.retain == tiny_request.retain


def test_bad_calibration_inputs_are_refused():
    with pytest.raises(ValueError, match="unknown case 'deleted'"):
        C.calibrate("tiny", cases=("deleted",))
    with pytest.raises(ValueError, match="grid"):
        C.calibrate("tiny", grid="huge")
    with pytest.raises(ValueError, match="seeds is empty"):
        C.calibrate("tiny", seeds=())
    with pytest.raises(ValueError, match="distill_teacher"):
        C.Knobs(distill_teacher="teacher")


def test_calibration_end_to_end_on_the_cheap_cells(tiny, tiny_request, tiny_oracle):
    """The calibration wiring on the cells that need no extra training (the tiny fixtures'
    organism and oracle), with two cheap attacks at one setting: the original is not
    forgotten, the ascent-until-damaged model is damaged, and the rows carry what the report
    shows."""
    seen = []
    cal = C.calibrate("tiny", seeds=(0,), grid="single", people=(0, 1, 2),
                      cases=("original", "ascent_until_damaged"), on_row=seen.append,
                      knobs=C.Knobs(oracles=1),
                      attacks={"attacks": ["relearn", "quantize"], "relearn_steps": 10,
                               "eval_every": 5})
    assert [r.case for r in cal.rows] == ["original", "ascent_until_damaged"] == \
        [r.case for r in seen]
    assert cal.diagonal, [(r.case, r.got, r.failed) for r in cal.off_diagonal]
    damaged = cal.rows[1]
    assert damaged.metrics["retain"] < 0.9 and "utility_retain" in damaged.failed
    assert damaged.people == (0, 1, 2) and damaged.metrics["relearn_gap"] is not None
    assert cal.confusion()["damaged"]["damaged"] == 1


def test_controls_keeping_utility_hide_the_facts_and_keep_retain(tiny, tiny_request):
    """The calibration's known-suppressed models must pass the utility gate: ascent with the
    descent on retain data weighted up (``keep``) and the shared facts and retain text kept
    (``keep_text``) hides the forget facts as the plain control does, with retain recall and
    shared knowledge intact, where the plain control loses retain facts."""
    from probes import controls
    from probes.behaviour import behaviour_metrics

    before = tiny.model.fingerprint()
    plain = behaviour_metrics(controls.gradient_ascent(tiny.model, tiny_request, steps=100),
                              tiny_request)
    kept = behaviour_metrics(controls.gradient_ascent(tiny.model, tiny_request, steps=100,
                                                      keep=10, keep_text=True), tiny_request)
    assert tiny.model.fingerprint() == before
    assert kept["forget_recall"] <= 0.05 and plain["forget_recall"] <= 0.05
    assert kept["retain_recall"] >= 0.98 and kept["shared_recall"] >= 0.98
    assert kept["retain_recall"] > plain["retain_recall"]
    with pytest.raises(ValueError, match="keep=0"):
        controls.gradient_ascent(tiny.model, tiny_request, keep=0)


def test_last_block_ascent_hides_the_facts_in_the_last_block_alone(tiny, tiny_request):
    """The last-block control (a known-suppressed case of the calibration): it hides the forget
    facts with retain and shared recall kept, changes no parameter outside the last block (the
    earlier block, embeddings and unembedding bit-identical), leaves the model passed in
    unchanged, and refuses a block count the model does not have."""
    from probes import controls
    from probes.behaviour import behaviour_metrics

    before = tiny.model.fingerprint()
    m = controls.last_block_ascent(tiny.model, tiny_request, keep=10, keep_text=True)
    assert tiny.model.fingerprint() == before
    got = behaviour_metrics(m, tiny_request)
    assert got["forget_recall"] <= 0.1
    assert got["retain_recall"] >= 0.98 and got["shared_recall"] >= 0.98
    last = f"blocks.{tiny.model.n_layers - 1}."
    new, old = m.named_parameters(), tiny.model.named_parameters()
    changed = {n for n in old if not torch.equal(new[n].detach(), old[n].detach())}
    assert changed and all(n.startswith(last) for n in changed)
    for bad in (0, tiny.model.n_layers + 1, True):
        with pytest.raises(ValueError, match="blocks="):
            controls.last_block_ascent(tiny.model, tiny_request, blocks=bad)


def test_margin_objective_is_the_hinge_written_out(tiny, tiny_request):
    """``hide_loss(objective="margin")`` on a padded batch equals a plain loop over the facts one
    at a time (no padding): log-softmax at the last prompt token, the answer's first token
    against the best other token, ``relu(own - other + margin)``, averaged; ``"ascent"`` is minus
    the clamped mean token loss; an unknown objective is refused, naming the choices."""
    from probes import controls

    facts = list(tiny_request.forget)[:7] + list(tiny_request.retain.facts)[:5]
    m = tiny.model
    with torch.no_grad():
        batch = m.encode(facts)
        for margin in (0.0, 1.0, 3.0):
            want = []
            for f in facts:
                one = m.encode([f])
                t = int(one.target_mask[0].float().argmax())  # first target token
                lp = torch.log_softmax(m.logits(one.tokens)[0, t - 1].float(), -1)
                answer = int(one.tokens[0, t])
                other = torch.cat([lp[:answer], lp[answer + 1:]]).max()
                want.append(torch.relu(lp[answer] - other + margin))
            got = controls.hide_loss(m, batch, objective="margin", margin=margin)
            assert torch.allclose(got, torch.stack(want).mean(), atol=1e-5), margin
        assert torch.equal(controls.hide_loss(m, batch), -m.loss(batch).clamp(max=20))
    with pytest.raises(ValueError, match="objective.*margin"):
        controls.unembed_ascent(m, tiny_request, objective="hinge")


def test_text_kept_by_kl_is_the_kl_from_the_model_before_training(tiny, tiny_request):
    """``text="kl"`` keeps the retain text by the KL from the model's distributions taken before
    the first step: zero for the unchanged model; after the unembedding moves, the mean over
    the text's target positions of ``sum_v p_before (log p_before - log p_now)``, written out
    per position in the test."""
    from probes import controls

    m = tiny.model.clone()
    tb = m.encode_texts(list(tiny_request.retain_text)[:6])
    keeper = controls._text_keeper(m, tb, "kl")
    with torch.no_grad():
        assert abs(float(keeper(None))) < 1e-6
        before = [torch.log_softmax(m.logits(tb.tokens[i:i + 1])[0].float(), -1)
                  for i in range(len(tb))]
        w = m.named_parameters()["unembed.W_U"]
        w.add_(0.05 * torch.randn(w.shape, generator=torch.Generator().manual_seed(0)))
        terms = []
        for i in range(len(tb)):
            now = torch.log_softmax(m.logits(tb.tokens[i:i + 1])[0].float(), -1)
            for t in range(tb.tokens.shape[1] - 1):
                if tb.target_mask[i, t + 1]:
                    p = before[i][t]
                    terms.append((p.exp() * (p - now[t])).sum())
        assert torch.allclose(keeper(None), torch.stack(terms).mean(), atol=1e-5)
        assert float(keeper(None)) > 1e-4


def test_unembedding_control_hides_the_facts_under_the_margin_objective(tiny, tiny_request):
    """The unembedding-only control (a known-suppressed case of the calibration) hides the forget
    facts with retain and shared recall and general-text perplexity kept when it pushes each
    answer just below the best other token and keeps the text by its KL from the original;
    raising the loss to its clamp with the text's loss kept instead (the old control), same
    steps and weights, hides less and costs general text more (here: forget 0.07 vs 0.20,
    perplexity 1.01x vs 4.3x the original's). Only ``unembed.*`` changes; bad ``text`` is
    refused."""
    from probes import controls
    from probes.behaviour import behaviour_metrics

    kw = {"keep": 10, "keep_text": True, "steps": 100}
    before = tiny.model.fingerprint()
    new = controls.unembed_ascent(tiny.model, tiny_request, objective="margin", text="kl", **kw)
    old = controls.unembed_ascent(tiny.model, tiny_request, **kw)
    assert tiny.model.fingerprint() == before
    got, was = behaviour_metrics(new, tiny_request), behaviour_metrics(old, tiny_request)
    base = behaviour_metrics(tiny.model, tiny_request)
    assert got["forget_recall"] <= 0.1 < was["forget_recall"]
    assert got["retain_recall"] >= 0.97 and got["shared_recall"] >= 0.98
    assert got["perplexity"] <= 1.05 * base["perplexity"] < was["perplexity"]
    after, orig = new.named_parameters(), tiny.model.named_parameters()
    changed = {n for n in orig if not torch.equal(after[n].detach(), orig[n].detach())}
    assert changed and all(n.startswith("unembed.") for n in changed)
    with pytest.raises(ValueError, match="text.*kl"):
        controls.unembed_ascent(tiny.model, tiny_request, keep_text=True, text="mse")


def test_reference_oracles_never_train_at_the_retrain_case_seed():
    class Org:
        def __init__(self, seed):
            self.seed = seed

        def oracle(self, req, train_seed=None):
            return train_seed

    said = []
    assert C.oracles_for(Org(0), "r", 1, said.append) == [None]
    # 4 = 3 + 1 trains the retrain case; None = the organism's own seed
    assert C.oracles_for(Org(3), "r", 3, said.append) == [None, 5, 6]
    assert 1 not in C.oracles_for(Org(0), "r", 4, said.append)
    assert said[1:4] == [f"seed 3: retrain oracle, training seed {s}" for s in (3, 5, 6)]


def test_verify_against_several_oracles_takes_the_most_favourable(tiny, tiny_request,
                                                                   tiny_oracle):
    """Judged against two references - the original posing as an oracle, and the real retrain
    oracle - the retrain oracle itself is deleted against itself and not against the
    original; the report is the favourable one and lists both verdicts. The model's own
    measurements are reused across the two (one cache)."""
    import probes

    kw = dict(suite="verdict", label="model", grid="single", seed=0,
              attacks={"attacks": ["relearn", "quantize"], "relearn_steps": 10,
                       "eval_every": 5})
    model = tiny_oracle.clone()  # the retrain oracle under test (verify refuses the object
    rep = probes.verify(model, tiny_request, oracle=[tiny.model, tiny_oracle],  # itself)
                        original=tiny.model, **kw)
    per = rep.extra["oracles"]
    assert [o["index"] for o in per] == [0, 1] and len(per) == 2
    assert per[0]["verdict"] != "deleted" and "mia_vs_oracle" in per[0]["failed"]
    assert not set(per[0]["failed"]) & set(per[0]["open"])  # credibly failed, or open
    assert per[1]["verdict"] == "deleted" and rep.verdict == "deleted"
    assert [o["chosen"] for o in per] == [False, True]
    assert rep.verdict_rule.startswith("Judged against 2 retrain oracles")
    md = rep.to_markdown()
    assert "- oracle 2: deleted (this report)" in md and "- oracle 1: " in md
    with pytest.raises(ValueError, match=r"oracle=\[\]"):
        probes.verify(model, tiny_request, oracle=[], original=tiny.model, **kw)
    with pytest.raises(ValueError, match="serve the verdict only"):
        probes.verify(model, tiny_request, oracle=[tiny_oracle, tiny_oracle],
                      suite="behaviour")


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="calibration finding (docs/results/calibration.md, "
                   "second run: 7 of 16 on the diagonal): known-deleted models read suppressed "
                   "- forget-recall and worst-attack gaps between retrainings of different seeds "
                   "(0.03-0.08) sit at the rule's margins, and the bootstrap of the worst gap "
                   "over the grid is biased upward; the unembedding and SAE-gain controls cannot "
                   "hide the facts on tiny with utility kept")
def test_calibration_lands_on_the_diagonal(tiny, tiny_request, tiny_oracle):
    """Every case, one seed, grid 'single' (minutes: it trains a second oracle and the planted
    organism with its oracle)."""
    cal = C.calibrate("tiny", seeds=(0,), grid="single", people=(0, 1, 2))
    assert {r.case for r in cal.rows} == set(C.CASES)
    off = [(r.case, r.got, r.failed) for r in cal.off_diagonal]
    assert cal.diagonal, off


def test_gate_reference_is_the_oracle_or_the_original():
    """Calibration finding: on tiny the original's perplexity is 5% above its oracle's, and
    against the oracle alone (under the earlier 2% slack) the original read "damaged". The gate
    accepts utility within tolerance of either reference; a model worse than both is still
    damaged. Here the original sits 10%, past today's slack, above the oracle."""
    import torch

    from probes.verdict import Rule, decide

    people = [p for p in range(5) for _ in range(10)]
    ones, zeros = torch.ones(50, dtype=torch.bool), torch.zeros(50, dtype=torch.bool)
    groups = {s: people for s in ("forget", "retain", "shared")}

    def judge(ppl: float, retain: torch.Tensor, label: str = "after"):
        metrics = {"oracle": {"forget_recall": 0.0, "perplexity": 20.0, "mia_auc_loss": 0.5},
                   "original": {"forget_recall": 1.0, "perplexity": 22.0, "mia_auc_loss": 1.0},
                   label: {"forget_recall": 1.0, "perplexity": ppl, "mia_auc_loss": 1.0}}
        hits = {"oracle": {"forget": zeros, "retain": ones, "shared": ones},
                "original": {"forget": ones, "retain": ones, "shared": ones},
                label: {"forget": ones, "retain": retain, "shared": ones}}
        return decide(metrics, hits, groups, {}, label, "original", Rule(n_boot=500))

    # the original's own numbers: 10% above the oracle's perplexity, past the slack against
    # the oracle alone (then it read damaged), within it against the original
    assert 22.0 / 20.0 > 1 + Rule().perplexity
    j = judge(22.0, ones)
    assert j.verdict == "not forgotten" and j.checks["utility_perplexity"]["ok"]
    assert j.checks["utility_perplexity"]["reference"] == "original"
    worse = 22.0 * (1 + Rule().perplexity) * 1.01  # worse than both references
    assert judge(worse, ones).verdict == "damaged"
    broken = ones.clone()
    broken[:10] = False  # one person of five lost: retain 0.8 against 1.0 for both
    assert judge(22.0, broken).verdict == "damaged"


def test_auc_bootstrap_matches_a_plain_loop():
    """The vectorised paired AUC bootstrap against resampling people by hand."""
    import torch

    from probes.stats import auc, resample_counts
    from probes.verdict import auc_bootstrap

    g = torch.Generator().manual_seed(0)
    pg = [i // 5 for i in range(20)]        # 4 forget people, 5 facts each
    ng = [10 + i // 6 for i in range(30)]   # 5 holdout people, 6 facts each
    a = (torch.randn(20, generator=g) + 1, torch.randn(30, generator=g))
    b = (torch.randn(20, generator=g), torch.randn(30, generator=g))
    bs = auc_bootstrap(a, b, pg, ng, n_boot=50, seed=3)
    assert bs.estimate == pytest.approx(auc(*a) - auc(*b))
    cp, cn = resample_counts(4, 50, 3), resample_counts(5, 50, 4)
    for r in range(50):
        ip = [i for i in range(20) for _ in range(int(cp[r, pg[i]]))]
        jn = [j for j in range(30) for _ in range(int(cn[r, ng[j] - 10]))]
        want = auc(a[0][ip], a[1][jn]) - auc(b[0][ip], b[1][jn])
        assert float(bs.samples[r]) == pytest.approx(want, abs=1e-12)


def test_step_sampler_covers_every_row_and_repeats_a_step():
    """The controls' descent batches (``probes.controls.step_sampler``): all rows when they fit;
    otherwise ``size`` distinct rows per step, the same rows for the same step and seed, and
    over the steps every row - a fixed sample would leave the rest out for good."""
    import torch

    from excise.handle import Batch
    from probes.controls import step_sampler

    n = 50
    tokens = torch.arange(n).repeat_interleave(4).view(n, 4)
    lengths = torch.tensor([2 + i % 3 for i in range(n)])
    mask = torch.zeros(n, 4, dtype=torch.bool)
    rows = Batch(tokens, mask, mask, lengths)
    assert step_sampler(rows, n, 0)(7) is rows
    draw = step_sampler(rows, 8, seed=3)
    seen = set()
    for step in range(100):
        b = draw(step)
        ids = b.tokens[:, 0].tolist()
        assert len(b) == 8 == len(set(ids))
        assert b.tokens.shape[1] == int(b.lengths.max())   # trimmed to its longest row
        assert torch.equal(lengths[ids], b.lengths)
        seen.update(ids)
    assert seen == set(range(n))
    assert draw(5).tokens.equal(step_sampler(rows, 8, seed=3)(5).tokens)
    assert not draw(5).tokens.equal(draw(6).tokens)
    assert not draw(5).tokens.equal(step_sampler(rows, 8, seed=4)(5).tokens)
