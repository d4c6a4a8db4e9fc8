"""Positive controls of the leave-one-out probe: canaries in the organism's training stream
(exact exposure counts, the plain organism untouched), the probe's features and its null, and the
verbatim-passage control on Gemma 3 270M (slow)."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from excise.world import Canaries, make_world
from probes import stats
from probes.privacy import membership_scores
from probes.representations import (_standardise, canary_control, depth_sites,
                                    last_prompt_states, probe_control, sequence_states,
                                    verbatim_pairs)

orgmod = importlib.import_module("excise.organism")  # (excise.organism is also the function)
ROOT = Path(__file__).resolve().parent.parent
MICRO = orgmod.Preset("micro", n_people=6, n_holdout=2, n_layers=1, d_model=16, n_heads=2,
                      d_mlp=32, steps=200, batch_size=16, n_filler=10)
SPEC = Canaries(per_count=2, n_unseen=3)


def _micro():
    world = make_world(MICRO.n_people, MICRO.n_holdout, seed=0, n_filler=MICRO.n_filler)
    return world, orgmod.Tokenizer(world.vocabulary())


def _stream(monkeypatch, canaries):
    """Every batch the organism's training draws (decoded texts per step), without training."""
    world, tok = _micro()
    steps: list[list[str]] = []

    def record(self, batch):
        steps.append([tok.decode(batch.tokens[r, 1:int(batch.lengths[r])])
                      for r in range(len(batch))])
        return torch.zeros((), requires_grad=True)

    def fake_train(loss_fn, params, *, steps, **kw):
        for s in range(steps):
            loss_fn(s)

    monkeypatch.setattr(orgmod.TLHandle, "loss", record)
    monkeypatch.setattr(orgmod, "train", fake_train)
    # the serial steps draw through TLHandle.loss (the plain recipe's fused steps draw the same
    # batches from the same sampler, through fused_loss)
    orgmod.train_model(MICRO, world, tok, progress=False, canaries=canaries, engine="serial")
    return world, steps


def test_canary_exposures_are_exact_in_the_training_stream(monkeypatch):
    world, plain = _stream(monkeypatch, None)
    _, with_canaries = _stream(monkeypatch, SPEC)
    facts = SPEC.facts(world)
    assert sorted(facts) == [0, 1, 4, 16, 64]
    assert [len(facts[c]) for c in (0, 1, 4, 16, 64)] == [3, 2, 2, 2, 2]
    seen = Counter(t for batch in with_canaries for t in batch)
    for count, group in facts.items():
        for f in group:
            assert seen[f.text] == count, (f.text, count, seen[f.text])
    # every other row is the plain organism's, batch for batch
    canary_texts = {f.text for g in facts.values() for f in g}
    assert len(plain) == len(with_canaries) == MICRO.steps
    for a, b in zip(plain, with_canaries):
        assert a == [t for t in b if t not in canary_texts]
    # the canaries are never training texts and their prompts are distinct
    assert not canary_texts & set(world.training_texts())
    prompts = [f.prompt for g in facts.values() for f in g]
    assert len(set(prompts)) == len(prompts)
    # the same stream again: deterministic
    _, again = _stream(monkeypatch, SPEC)
    assert again == with_canaries


def _reference_key(preset, world) -> str:
    """The plain organism's cache key as it was before canaries existed (its documented
    fields, hashed as JSON)."""
    blob = {"preset": dataclasses.asdict(preset), "world": world.digest(), "exclude": [],
            "torch": torch.__version__, "threads": orgmod.TRAIN_THREADS,
            "version": orgmod.CACHE_VERSION}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


@pytest.mark.parametrize("name", ["tiny", "small"])
def test_default_cache_key_is_unchanged_by_the_canary_option(name, tmp_path, monkeypatch):
    monkeypatch.setenv("EXCISE_CACHE", str(tmp_path))
    preset = orgmod.PRESETS[name]
    world = make_world(preset.n_people, preset.n_holdout, seed=preset.seed,
                       n_filler=preset.n_filler)
    weights, meta = orgmod.cache_files(preset, world)
    assert weights.name == f"model-{_reference_key(preset, world)}.safetensors"
    assert orgmod.cache_files(preset, world, canaries=None) == (weights, meta)
    with_c = orgmod.cache_files(preset, world, canaries=Canaries())
    other = orgmod.cache_files(preset, world, canaries=Canaries(seed=1))
    assert with_c[0].name.startswith("canaries-model-")
    assert len({weights, with_c[0], other[0]}) == 3
    # the plain rows the sampler walks through are the same with or without the option
    assert orgmod.training_texts(preset, world) == (
        world.training_texts() + [f.text for f in world.shared_facts()]
        * (preset.shared_repeat - 1))


def test_canaries_refuse_bad_settings():
    with pytest.raises(ValueError, match="counts"):
        Canaries(counts=(1, 1))
    with pytest.raises(ValueError, match="per_count"):
        Canaries(per_count=0)
    with pytest.raises(ValueError, match="did you mean 'per_count'"):
        Canaries.of({"per_cout": 3})
    with pytest.raises(ValueError, match="cannot be combined"):
        orgmod.organism("tiny", planted=True, canaries=True, progress=False)
    assert Canaries.of(True) == Canaries() and Canaries.of(None) is None
    assert Canaries.of({"counts": [64, 1]}).counts == (1, 64)


def test_standardise_keeps_every_ridge_prediction():
    """Rows rotated into their own span (d > n) give the plain standardised fit's predictions."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(30, 200, generator=g, dtype=torch.float64)
    y = (torch.rand(30, generator=g) > 0.5).double()
    plain = (x - x.mean(0)) / x.std(0)
    small = _standardise(x)
    assert small.shape == (30, 30)
    for out in (torch.arange(30) == 3, torch.arange(30) < 5):
        w, b = stats.balanced_ridge_fit(plain[~out], y[~out], 10.0)
        w2, b2 = stats.balanced_ridge_fit(small[~out], y[~out], 10.0)
        torch.testing.assert_close(small[out] @ w2 + b2, plain[out] @ w + b)


def test_sequence_features_against_a_loop(tiny):
    m = tiny.model
    facts = tiny.request([0]).forget.facts[:5]
    sites = depth_sites(m)
    last = sequence_states(m, facts, sites, "last")
    mean = sequence_states(m, facts, sites, "mean")
    pmean = sequence_states(m, facts, sites, "prompt_mean")
    tmean = sequence_states(m, facts, sites, "target_mean")
    ref = last_prompt_states(m, facts, sites)
    for s in sites:
        torch.testing.assert_close(last[s], ref[s])
    for i, f in enumerate(facts):  # one fact at a time, positions counted by hand
        n_prompt = len(f.prompt.split())
        n_all = n_prompt + len(f.target.split())
        acts = m.run_with_cache(m.encode([f]).tokens, sites)
        for s in sites:
            torch.testing.assert_close(mean[s][i], acts[s][0, 1:1 + n_all].mean(0))
            torch.testing.assert_close(pmean[s][i], acts[s][0, 1:1 + n_prompt].mean(0))
            # the positions predicting the target: the last prompt token .. the one before the
            # last target token (BOS at 0, the prompt at 1..n_prompt)
            torch.testing.assert_close(tmean[s][i], acts[s][0, n_prompt:n_all].mean(0))
    with pytest.raises(ValueError, match="choose one of"):
        sequence_states(m, facts, sites, "max")


def test_probe_control_reads_a_known_signal_and_its_null(tiny):
    """Questions vs statements differ at the last prompt token: the probe reads them far above
    its null. Two halves of one kind of fact (one per person: a person's facts share the name,
    which a probe leaving out single sequences would recognise): it reads its null. The null of
    the maximum over depths is the per-permutation maximum, recomputed here."""
    def pet(i, form):
        return next(f for f in tiny.world.facts(i, trained=True)
                    if f.attribute == "pet" and f.form == form)

    q = [pet(i, "question") for i in range(12)]
    st = [pet(i, "statement") for i in range(12, 24)]
    pc = probe_control(tiny.model, q, st, n_null=20)
    assert pc.n == (12, 12) and len(pc.acc) == tiny.model.n_layers
    assert pc.best >= 0.95 and pc.passes()
    same = probe_control(tiny.model, [pet(i, "statement") for i in range(0, 24, 2)],
                         [pet(i, "statement") for i in range(1, 24, 2)], n_null=20)
    assert not same.passes(), same
    acts = last_prompt_states(tiny.model, q + st, depth_sites(tiny.model))
    y = torch.cat([torch.ones(12), torch.zeros(12)])
    nulls = torch.stack([stats.group_permutation_null(_standardise(a), y, torch.arange(24),
                                                      10.0, 20, 0) for a in acts.values()])
    assert pc.best_null == pytest.approx(float(nulls.amax(0).mean()))
    assert pc.null == pytest.approx([float(v) for v in nulls.mean(1)])
    with pytest.raises(ValueError, match="at least 2 members"):
        probe_control(tiny.model, q[:1], st)


def test_canary_control_on_the_plain_organism(tiny):
    """The canary control's table on the model that never saw a canary (the plain organism is the
    control's oracle): one row per count, its probe the one probe_control gives, membership AUC
    from the per-canary losses, no canary's secret recalled."""
    facts = Canaries(per_count=6, n_unseen=8, counts=(1, 64)).facts(tiny.world)
    rows = canary_control(tiny.model, facts, n_null=10)
    assert [r["count"] for r in rows] == [1, 64]
    for r in rows:
        pc = probe_control(tiny.model, facts[r["count"]], facts[0], n_null=10)
        assert r["probe"] == pc.to_dict() and r["acc"] == pc.best
        assert r["recall"] == 0.0
        pos = membership_scores(tiny.model, facts[r["count"]])[0]
        neg = membership_scores(tiny.model, facts[0])[0]
        assert r["mia_auc"] == pytest.approx(float((pos[:, None] > neg[None]).double().mean()
                                                   + 0.5 * (pos[:, None] == neg[None]).double()
                                                   .mean()))
    with pytest.raises(ValueError, match="never-seen"):
        canary_control(tiny.model, {1: facts[1]})


# ------------------------------------------------------------------ Gemma 3 270M (slow)
@pytest.mark.slow
def test_gemma_verbatim_control():
    """Passages Gemma completes verbatim vs novel passages of the same style: the probe reads at
    least 0.1 above its permutation null's mean and above its 95th percentile (the null of the
    best depth), at the last prompt token and over the whole passage."""
    from excise import gemma
    from excise.hf import load_model

    ok, why = gemma.available()
    if not ok:
        pytest.skip(f"Gemma 3 270M test skipped: {why}")

    m = load_model("gemma3-270m", log=lambda s: None)
    rows = [json.loads(line) for line in (ROOT / "data" / "verbatim.jsonl").open()]
    verbatim, novel = verbatim_pairs(m, rows)
    assert len(verbatim) >= 30
    # measured: last 0.707 (null 0.565, p95 0.683), mean 0.841 (null 0.561, p95 0.646)
    for feature in ("last", "mean"):
        pc = probe_control(m, verbatim, novel, n_null=100, feature=feature)
        assert pc.passes(0.1), pc.to_dict()
