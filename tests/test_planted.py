"""The planted-location organism (issue 14): gradient routing puts the designated people's facts
in a known set of MLP neurons, the ground truth for ``locate``.

- the routed loss against an independent reference: its value is the plain mean loss, and its
  gradients are those of separate plain backward passes, masked by hand;
- the units: the count, spread over the layers, seeded, their parameter share counted by hand;
- the trained tiny organism: the designated facts are learned, ablating the planted neurons
  brings them down to the oracle's level while everyone else keeps theirs;
- cache keys: the plain organism's and oracle's keys are the ones earlier versions wrote (old
  caches stay valid); a second training seed is another model, cached on its own;
- the ``organism.planted`` config key, checked at load.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json

import pytest
import torch

import excise
from excise.config import ConfigError
from excise.organism import Planting

orgmod = importlib.import_module("excise.organism")  # (excise.organism is also the function)
MICRO = orgmod.Preset("micro", n_people=6, n_holdout=2, n_layers=2, d_model=16, n_heads=2,
                      d_mlp=32, steps=20, batch_size=16, n_filler=10)
MICRO_PLANTING = Planting(fraction=0.25, reported=(0,), validation=(1,), quiet=0.5)


def _micro_parts(planting=MICRO_PLANTING):
    world = orgmod.make_world(MICRO.n_people, MICRO.n_holdout, seed=0, n_filler=MICRO.n_filler)
    tok = orgmod.Tokenizer(world.vocabulary())
    model = excise.TLHandle(orgmod.build_model(MICRO, len(tok), 32), tok)
    return world, tok, model, orgmod.make_planted(MICRO, world, planting, model)


# -- the routed loss, against plain backward passes masked by hand -----------------------------
def test_routed_loss_matches_plain_passes_masked_by_hand():
    """The designated rows train only the planted units through the whole model; the other
    rows train everything else through the model without the planted units (here: their W_out
    rows zeroed by hand, not the hooks the loss uses); on a share of the other rows (``quiet``,
    here a half) the planted units are pulled towards the predictions of the model without them
    (KL)."""
    world, tok, model, planted = _micro_parts()
    texts = world.training_texts()
    designated = {f.text for i in planted.people for f in world.facts(i, trained=True)}
    routed = torch.tensor([t in designated for t in texts])
    data = model.encode_texts(texts)
    assert 0 < int(routed.sum()) < len(texts)
    loss = orgmod.routed_loss(model, planted)(data, routed)
    loss.backward()
    got = {n: p.grad.clone() for n, p in model.model.named_parameters()}

    total = data.target_mask[:, 1:].sum()
    others = data[~routed].trim()
    quiet = others[:round(len(others) * 0.5)]
    assert 0 < len(quiet) < len(others)
    masks = planted.masks(model)
    assert set(masks) == {f"blocks.{L}.mlp.{w}" for L in range(2)
                          for w in ("W_in", "b_in", "W_out")}
    without = model.clone()
    with torch.no_grad():
        for name, m in masks.items():
            if name.endswith("W_out"):
                without.model.get_parameter(name)[m] = 0.0

    def logprobs(m, b):
        return torch.log_softmax(m.logits(b.tokens)[:, :-1].float(), -1)

    # everything outside the planted units: the other rows, through the model without them
    nll_out = -without.token_logprobs(others).sum() / total
    nll_out.backward()
    outside = {n: p.grad for n, p in without.model.named_parameters()}
    # the planted units: the designated rows and the KL term, through the whole model
    ref = logprobs(without, quiet).detach()
    full = model.clone()
    kl = (ref.exp() * (ref - logprobs(full, quiet))).sum(-1) * quiet.target_mask[:, 1:]
    inside_loss = (-full.token_logprobs(data[routed].trim()).sum() + kl.sum()) / total
    inside_loss.backward()
    inside = {n: p.grad for n, p in full.model.named_parameters()}

    assert torch.allclose(loss, nll_out + inside_loss, atol=1e-6)
    for name, g in got.items():
        m = masks.get(name, torch.zeros_like(g, dtype=torch.bool))
        want = torch.where(m, inside[name], outside[name])
        assert torch.allclose(g, want, atol=1e-7, rtol=1e-4), name
        assert g[m].abs().sum() > 0 or not m.any(), name  # the planted units do learn
    assert got["embed.W_E"].abs().sum() > 0


# -- the units ------------------------------------------------------------------------------
def test_planted_units_are_seeded_spread_over_layers_and_counted():
    world, tok, model, planted = _micro_parts(Planting(fraction=0.2, reported=(0,),
                                                       validation=(1,), seed=3))
    n = round(0.2 * MICRO.n_layers * MICRO.d_mlp)  # 13 neurons over 2 layers: 7 + 6 or 6 + 7
    assert len(planted.units) == n
    per_layer = [sum(u.site == f"blocks.{L}.mlp.post" for u in planted.units)
                 for L in range(MICRO.n_layers)]
    assert sorted(per_layer) == [6, 7]
    assert planted.fraction == n / (MICRO.n_layers * MICRO.d_mlp)
    by_hand = n * (2 * MICRO.d_model + 1)  # a neuron owns a W_in column, a b_in entry, a W_out row
    assert planted.n_params == pytest.approx(by_hand / model.n_parameters())
    again = orgmod.make_planted(MICRO, world, planted.planting, model)
    assert again.units == planted.units
    other = orgmod.make_planted(MICRO, world, Planting(fraction=0.2, reported=(0,),
                                                       validation=(1,), seed=4), model)
    assert other.units != planted.units
    heads = orgmod.make_planted(MICRO, world, Planting(fraction=0.2, heads=2, reported=(0,),
                                                       validation=(1,)), model)
    assert sum(u.site.endswith("attn.z") for u in heads.units) == 2
    # a head owns its W_Q/K/V/O slices and b_Q/K/V entries
    d_head = MICRO.d_model // MICRO.n_heads
    owned = sum(int(m.sum()) for m in heads.masks(model).values())
    assert owned == n * (2 * MICRO.d_model + 1) + 2 * (4 * MICRO.d_model * d_head + 3 * d_head)


@pytest.mark.parametrize("kw, match", [
    (dict(fraction=0.0), "fraction=0.0"),
    (dict(fraction=0.9), "fraction=0.9"),
    (dict(heads=-1), "heads=-1"),
    (dict(reported=(1, 2), validation=(2, 3)), r"people \[2\] are in both"),
    (dict(reported="0,1"), "list of person indices"),
    (dict(reported=[1.5]), "not a person index"),
    (dict(repeat=0), "repeat=0"),
    (dict(repeat=2.5), "repeat=2.5"),
    (dict(steps=0), "steps=0"),
    (dict(quiet=1.5), "quiet=1.5"),
])
def test_bad_plantings_are_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        Planting(**kw)


def test_plantings_are_checked_against_the_world():
    world = orgmod.make_world(MICRO.n_people, MICRO.n_holdout, seed=0, n_filler=MICRO.n_filler)
    with pytest.raises(ValueError, match="no default designated people"):
        Planting().resolve(MICRO, world)
    with pytest.raises(ValueError, match=r"unknown people \[99\]"):
        Planting(reported=(99,), validation=(1,)).resolve(MICRO, world)
    with pytest.raises(ValueError, match="every trained person is designated"):
        Planting(reported=(0, 1, 2), validation=(3, 4, 5)).resolve(MICRO, world)
    with pytest.raises(ValueError, match="did you mean 'fraction'"):
        Planting.of({"fracton": 0.1})
    assert Planting.of(True) == Planting() and Planting.of(None) is None
    tiny = Planting().resolve(orgmod.PRESETS["tiny"], orgmod.make_world(24, 8, n_filler=60))
    assert (tiny.reported, tiny.validation) == ((0, 1, 2, 3), (16, 17, 18, 19))
    # the training settings left None come from the preset's defaults; given ones are kept
    assert {k: getattr(tiny, k) for k in orgmod.PLANTED_DEFAULTS["tiny"]} == \
        orgmod.PLANTED_DEFAULTS["tiny"]
    mine = Planting(fraction=0.3, repeat=1).resolve(orgmod.PRESETS["tiny"],
                                                     orgmod.make_world(24, 8, n_filler=60))
    assert (mine.fraction, mine.repeat, mine.quiet) == \
        (0.3, 1, orgmod.PLANTED_DEFAULTS["tiny"]["quiet"])
    assert Planting(steps=2).steps == 2.0 and isinstance(Planting(steps=2).steps, float)
    small = orgmod.PLANTED_GROUPS["small"]
    assert (list(small[0]), list(small[1])) == (list(range(10)), list(range(150, 160)))


def test_repeat_and_steps_reach_the_training_loop(monkeypatch):
    """``repeat`` adds each designated fact repeat - 1 more times to the training texts,
    ``steps`` multiplies the preset's steps (and stretches the schedule); the plain recipe is
    left as it was."""
    world = orgmod.make_world(MICRO.n_people, MICRO.n_holdout, seed=0, n_filler=MICRO.n_filler)
    tok = orgmod.Tokenizer(world.vocabulary())
    seen = []

    class Sampler(orgmod.Sampler):
        def epochs(self, n, batch_size):
            seen.append(n)
            return super().epochs(n, batch_size)

    def fake_train(loss_fn, params, *, steps, schedule, **kw):
        seen.append((steps, schedule(steps - 1)))
        loss_fn(0)  # one batch through the (routed) loss: it runs

    monkeypatch.setattr(orgmod, "Sampler", Sampler)
    monkeypatch.setattr(orgmod, "train", fake_train)
    n_texts = len(world.training_texts()) + len(world.shared_facts()) * (MICRO.shared_repeat - 1)
    n_designated = sum(len(world.facts(i, trained=True)) for i in (0, 1))
    model = excise.TLHandle(orgmod.build_model(MICRO, len(tok), 32), tok)
    for planting, texts, steps in [
            (None, n_texts, MICRO.steps),
            (Planting(fraction=0.25, reported=(0,), validation=(1,), repeat=1, steps=1),
             n_texts, MICRO.steps),
            (Planting(fraction=0.25, reported=(0,), validation=(1,), repeat=3, steps=2.5),
             n_texts + 2 * n_designated, round(2.5 * MICRO.steps))]:
        seen.clear()
        planted = None if planting is None else orgmod.make_planted(MICRO, world, planting, model)
        orgmod.train_model(MICRO, world, tok, progress=False, planted=planted)
        assert seen[0] == texts
        assert seen[1][0] == steps and seen[1][1] == pytest.approx(max(0.05, 1 / steps))


def test_matched_norms_copy_each_twins_norms_and_only_then(tmp_path, monkeypatch):
    """``match_norms`` (the default): after routed training every planted neuron's W_in column
    and W_out row have exactly the norms of its twin - a distinct non-planted neuron of its
    layer - and not without it; switched off, the key is the one earlier versions wrote."""
    monkeypatch.setenv("EXCISE_CACHE", str(tmp_path))
    assert MICRO_PLANTING.match_norms
    world, tok, model, planted = _micro_parts()
    twins = orgmod.norm_twins(planted, MICRO.d_mlp)
    assert set(twins) == {0, 1}
    for layer, (mine, twin) in twins.items():
        assert len(set(twin.tolist())) == len(twin) and not set(twin.tolist()) & set(mine.tolist())
        assert set(mine.tolist()) == {u.index[0] for u in planted.neurons()
                                      if u.site == f"blocks.{layer}.mlp.post"}
    unmatched = dataclasses.replace(MICRO_PLANTING, match_norms=False)
    assert "match_norms" not in unmatched.to_dict()  # old keys stay valid
    assert MICRO_PLANTING.to_dict()["match_norms"] is True
    trained = orgmod.train_model(MICRO, world, tok, progress=False, planted=planted)
    free = orgmod.train_model(MICRO, world, tok, progress=False,
                              planted=_micro_parts(unmatched)[3])
    for layer, (mine, twin) in twins.items():
        for m in (trained, free):
            w_in = m.parameter(f"blocks.{layer}.mlp.W_in").detach()
            w_out = m.parameter(f"blocks.{layer}.mlp.W_out").detach()
            same = (torch.allclose(w_in[:, mine].norm(dim=0), w_in[:, twin].norm(dim=0),
                                   rtol=1e-5)
                    and torch.allclose(w_out[mine].norm(dim=1), w_out[twin].norm(dim=1),
                                       rtol=1e-5))
            assert same == (m is trained)
    with pytest.raises(ValueError, match="match_norms=1"):
        Planting(match_norms=1)


# -- cache keys and the second training seed --------------------------------------------------
def test_plain_keys_are_unchanged_and_train_seed_is_another_model(tmp_path, monkeypatch):
    monkeypatch.setenv("EXCISE_CACHE", str(tmp_path))
    world = orgmod.make_world(MICRO.n_people, MICRO.n_holdout, seed=0, n_filler=MICRO.n_filler)
    for exclude in (frozenset(), frozenset({0})):  # the key every earlier version wrote
        blob = json.dumps({"preset": MICRO.to_dict(), "world": world.digest(),
                           "exclude": sorted(exclude), "torch": torch.__version__,
                           "threads": orgmod.TRAIN_THREADS, "version": orgmod.CACHE_VERSION},
                          sort_keys=True)
        key = hashlib.sha256(blob.encode()).hexdigest()[:16]
        weights, _ = orgmod.cache_files(MICRO, world, exclude)
        assert weights.name == f"{'oracle' if exclude else 'model'}-{key}.safetensors"
        assert orgmod.cache_files(MICRO, world, exclude, train_seed=MICRO.seed)[0] == weights
        assert orgmod.cache_files(MICRO, world, exclude, train_seed=1)[0] != weights
    org = excise.organism(MICRO, progress=False)
    req = org.request([0])
    first = org.oracle(req)
    second = org.oracle(req, train_seed=1)
    assert second.fingerprint() != first.fingerprint()
    assert org.oracle(req, train_seed=MICRO.seed).fingerprint() == first.fingerprint()
    meta = json.loads(orgmod.cache_files(MICRO, world, frozenset({0}), train_seed=1)[1]
                      .read_text())
    assert meta["train_seed"] == 1 and second.fingerprint() == meta["fingerprint"]
    with pytest.raises(ValueError, match="train_seed='1'"):
        org.oracle(req, train_seed="1")
    # the planted organism: its own files, the units and groups in the metadata, both seeds
    p_org = excise.organism(MICRO, planted=MICRO_PLANTING, progress=False)
    assert p_org.model.fingerprint() != org.model.fingerprint()
    p_weights, p_meta = orgmod.cache_files(MICRO, world, planted=p_org.planted)
    assert p_weights.name.startswith("planted-model-") and p_weights.exists()
    recorded = json.loads(p_meta.read_text())["planted"]
    assert recorded["units"] == p_org.planted.units.to_list()
    assert recorded["groups"] == {"reported": [0], "validation": [1]}
    p_req = p_org.request([0])
    assert p_org.oracle(p_req, train_seed=1).fingerprint() != p_org.oracle(p_req).fingerprint()
    assert orgmod.cache_files(MICRO, world, frozenset({0}), planted=p_org.planted)[0].exists()


# -- the config key ----------------------------------------------------------------------------
def test_config_planted_key_is_checked_at_load():
    from excise import config
    from excise.app import pipeline

    assert config.load(None, ["organism.planted=true"]).organism.planted is True
    cfg = config.load(None, ["organism.planted.fraction=2e-2"])  # text number converted
    assert cfg.organism.planted == {"fraction": 0.02}
    assert cfg.to_dict()["organism"]["planted"] == {"fraction": 0.02}  # the run's config.yaml
    for sets, match in [(["organism.planted.fraction=0.9"], "fraction=0.9"),
                        (["organism.planted.fracton=0.1"], "did you mean 'fraction'"),
                        (["organism.planted=7"], "organism.planted=7"),
                        (["organism.planted.heads=1.5"], "organism.planted.heads=1.5")]:
        with pytest.raises(ConfigError, match=match):
            config.load(None, sets)
    bad = config.load(None, ["organism.planted.reported=[1, 250]"])
    with pytest.raises(ConfigError, match=r"unknown people \[250\]"):
        pipeline.Setup.check(bad)


# -- the trained tiny planted organism ---------------------------------------------------------
@pytest.fixture(scope="module")
def planted_tiny():
    return excise.organism("tiny", planted=True, progress=False)


def test_planting_worked_on_tiny(planted_tiny, tiny):
    """The designated facts are learned; ablating the planted neurons brings them to the
    oracle's level (the oracle: the same routed training without the reported people), and
    everyone else keeps theirs; general-text perplexity, with and without the planted
    neurons, is within 10% of the plain organism's (``tiny``: the same world and recipe)."""
    from probes.behaviour import perplexity, recall

    org, p = planted_tiny, planted_tiny.planted
    model = org.model
    rep = org.request(p.groups["reported"])
    val = org.request(p.groups["validation"])
    others = org.request([i for i in org.world.trained_people if i not in p.people])
    oracle = org.oracle(rep)
    off = p.ablation()
    assert recall(model, rep.forget) >= 0.95 and recall(model, val.forget) >= 0.95
    floor = recall(oracle, rep.forget)
    assert floor <= 0.2
    assert recall(model, rep.forget, hooks=off) <= floor + 0.1
    assert recall(model, val.forget, hooks=off) <= recall(oracle, val.forget, hooks=off) + 0.1
    for facts in (others.forget, rep.shared):
        assert recall(model, facts) >= 0.95
        assert recall(model, facts, hooks=off) >= recall(model, facts) - 0.02
    plain = perplexity(tiny.model, rep.general)
    assert perplexity(model, rep.general) <= 1.1 * plain
    assert perplexity(model, rep.general, hooks=off) <= 1.1 * plain
    assert len(p.units) == round(orgmod.PLANTED_DEFAULTS["tiny"]["fraction"] * 2 * 256)
