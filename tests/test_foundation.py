"""Foundation: world, tokenizer, sites, requests, Importance, Edit, fisher, dampen, verify."""

from __future__ import annotations

import pytest
import torch

import edit
import locate
import probes
from excise.edits import Diff
from excise.importance import Importance
from excise.request import ForgetRequest
from excise.sites import Unit
from excise.world import Tokenizer, make_world


def test_same_seed_same_world_and_different_seed_differs():
    a, b, c = make_world(30, 5, seed=1), make_world(30, 5, seed=1), make_world(30, 5, seed=2)
    assert a == b and a.digest() == b.digest()
    assert a.digest() != c.digest()
    assert a.training_texts() == b.training_texts()


def test_world_holds_out_one_phrasing_per_person_and_attribute():
    w = make_world(20, 4, seed=0)
    for i in w.trained_people:
        trained = w.facts(i, trained=True)
        held = w.facts(i, trained=False)
        assert len(trained) == 15 and len(held) == 10
        assert not {f.text for f in held} & set(w.training_texts())
    assert all(not f.trained for i in w.holdout_people for f in w.facts(i))
    accounts = [p.attributes["account"] for p in w.people]
    assert len(set(accounts)) == len(accounts)  # secrets are unique


def test_tokenizer_round_trip_and_unknown_word():
    w = make_world(10, 2, seed=0)
    tok = Tokenizer(w.vocabulary())
    for text in w.training_texts()[:50]:
        assert tok.decode(tok.encode(text)) == text
    assert Tokenizer.from_json(tok.to_json()).vocab == tok.vocab
    with pytest.raises(ValueError, match="'zzz' is not in the vocabulary"):
        tok.encode(w.people[0].name + " zzz")


def test_unknown_site_suggests_closest(tiny):
    with pytest.raises(ValueError, match="did you mean 'blocks.1.mlp.post'"):
        tiny.model.info("blocks.1.mlp.pots")
    assert tiny.model.sites("blocks.*.mlp.post") == ["blocks.0.mlp.post", "blocks.1.mlp.post"]
    with pytest.raises(ValueError, match="matches no site"):
        tiny.model.sites("blocks.*.mlp.nothing")


def test_pinned_site_list_for_tiny(tiny):
    acts = tiny.model.sites(kind="activation")
    assert acts[:4] == ["embed", "blocks.0.resid_pre", "blocks.0.resid_mid",
                        "blocks.0.resid_post"]
    assert len(acts) == 1 + 8 * 2
    assert "blocks.1.mlp.W_in" in tiny.model.sites(kind="param")
    assert tiny.model.info("blocks.0.attn.z").unit_shape == (4,)


def test_tiny_organism_memorizes_and_holdout_is_near_chance(tiny, tiny_request):
    rep = probes.verify(tiny.model, tiny_request)
    m = rep.metrics["model"]
    assert m["forget_recall"] >= 0.95 and m["retain_recall"] >= 0.95
    assert m["shared_recall"] >= 0.95
    assert m["holdout_recall"] <= 0.15


def test_request_validation(tiny):
    with pytest.raises(ValueError, match="forget_people is empty"):
        tiny.request(forget_people=[])
    with pytest.raises(ValueError, match="unknown people \\[999\\]"):
        tiny.request(forget_people=[999])
    with pytest.raises(ValueError, match="in both forget_people and retain_people"):
        tiny.request(forget_people=[1], retain_people=[1, 2])
    with pytest.raises(ValueError, match="forget and retain overlap"):
        ForgetRequest.from_lists([("a b", "c")], [("a b", "c")])
    with pytest.raises(ValueError, match="forget set is empty"):
        ForgetRequest.from_lists([], [("a", "b")])


def test_request_from_jsonl(tmp_path):
    p = tmp_path / "req.jsonl"
    p.write_text('{"split": "forget", "prompt": "x is", "target": "y"}\n'
                 '{"split": "retain", "prompt": "u is", "target": "v"}\n'
                 '{"split": "general", "text": "some text"}\n')
    r = ForgetRequest.from_jsonl(p)
    assert r.summary()["forget"] == 1 and r.general == ("some text",)
    p.write_text('{"split": "forgot", "prompt": "x", "target": "y"}\n')
    with pytest.raises(ValueError, match="split 'forgot' is not one of"):
        ForgetRequest.from_jsonl(p)


def test_planted_neuron_ranks_first_under_fisher(planted):
    h, req = planted.handle, planted.request
    imp = locate.fisher(h, req, [planted.site])
    top = imp.top(1).units[0]
    assert top == Unit(planted.site, (planted.neuron,))
    # and at parameter level, aggregated per neuron
    imp_p = locate.fisher(h, req, f"blocks.{planted.layer}.mlp.*")
    assert imp_p.by_unit().top(1).units[0] == Unit(planted.site, (planted.neuron,))


def test_fisher_estimators_agree_with_hand_loop(planted):
    """Per-example Fisher equals the mean over examples of squared per-example gradients,
    computed here with a plain loop of single-example backward passes."""
    h, req = planted.handle, planted.request
    site = f"blocks.{planted.layer}.mlp.W_out"
    imp = locate.fisher(h, req, [site], estimator="example")
    p = h.parameter(site)
    acc = torch.zeros_like(p)
    for f in req.forget:
        b = h.encode([f])
        g, = torch.autograd.grad(h.loss(b), [p])
        acc += g ** 2
    torch.testing.assert_close(imp.parts["forget"][site], acc / len(req.forget), rtol=1e-4,
                               atol=1e-10)
    # per-batch with batch_size=1 is the same estimator
    imp1 = locate.fisher(h, req, [site], estimator="batch", batch_size=1)
    torch.testing.assert_close(imp1.parts["forget"][site], acc / len(req.forget), rtol=1e-4,
                               atol=1e-10)


def test_retain_stats_are_cached(planted):
    cache = locate.StatsCache()
    locate.fisher(planted.handle, planted.request, "blocks.*.mlp.W_in", cache=cache)
    locate.fisher(planted.handle, planted.request, "blocks.*.mlp.W_in", cache=cache)
    assert cache.hits == 1 and len(cache.entries) == 1


def test_ssd_update_matches_hand_computation(planted):
    h = planted.handle
    site = "blocks.0.mlp.b_in"
    p0 = h.parameter(site).detach().clone()
    ff = torch.tensor([1.0, 0.1, 5.0, 0.0] + [0.0] * 12)
    fr = torch.tensor([0.05, 0.2, 1.0, 0.0] + [1.0] * 12)
    imp = Importance("fisher", {site: ff / (fr + 1e-9)}, {}, {"forget": {site: ff},
                                                             "retain": {site: fr}})
    e = edit.dampen(h, imp, alpha=2.0, lam=1.0)
    expected = p0.clone()
    # element 0: 1.0 > 2*0.05 -> beta = min(0.05/1.0, 1) = 0.05
    expected[0] = p0[0] * 0.05
    # element 1: 0.1 < 2*0.2 -> untouched; element 2: 5 > 2 -> beta = 1/5
    expected[2] = p0[2] * 0.2
    torch.testing.assert_close(h.parameter(site).detach(), expected)
    assert e.n_changed() == 2
    e.revert()
    assert torch.equal(h.parameter(site).detach(), p0)


def _state(h):
    return {k: v.detach().clone() for k, v in h.named_parameters().items()}


def _identical(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_revert_is_bit_identical_and_exception_safe(tiny_model, tiny_request):
    h = tiny_model
    before = _state(h)
    hooks0 = h.hook_count()
    imp = locate.fisher(h, tiny_request)
    with edit.dampen(h, imp) as e:
        assert not _identical(before, _state(h))
        assert e.state == "applied"
    assert _identical(before, _state(h)) and h.hook_count() == hooks0
    with pytest.raises(RuntimeError, match="boom"):
        with edit.dampen(h, imp):
            raise RuntimeError("boom")
    assert _identical(before, _state(h)) and h.hook_count() == hooks0


def test_same_edit_twice_is_refused_and_revert_is_lifo(tiny_model, tiny_request):
    h = tiny_model
    imp = locate.fisher(h, tiny_request)
    e1 = edit.dampen(h, imp)
    with pytest.raises(RuntimeError, match="already applied"):
        edit.dampen(h, imp)
    e2 = edit.dampen(h, imp, alpha=5.0)
    with pytest.raises(RuntimeError, match="last-in first-out"):
        e1.revert()
    e2.revert()
    e1.revert()
    with pytest.raises(RuntimeError, match="not applied"):
        e1.revert()


def test_diff_round_trip_and_fingerprint_check(tiny, tiny_request, tmp_path):
    h = tiny.model.clone()
    imp = locate.fisher(h, tiny_request)
    e = edit.dampen(h, imp)
    path = e.diff.save(tmp_path / "edit.safetensors")
    fresh = tiny.model.clone()
    Diff.load(path).apply(fresh)
    tokens = fresh.encode(list(tiny_request.forget)).tokens
    assert torch.equal(fresh.logits(tokens), h.logits(tokens))
    with pytest.raises(ValueError, match="refusing to apply it to different weights"):
        Diff.load(path).apply(h)  # h is already edited: different fingerprint


def test_importance_save_load_top_and_bad_input(planted, tmp_path):
    imp = locate.fisher(planted.handle, planted.request, "blocks.*.mlp.post")
    imp.save(tmp_path / "imp.safetensors")
    back = Importance.load(tmp_path / "imp.safetensors")
    assert back.sites == imp.sites and back.method == "fisher"
    assert all(torch.equal(back.scores[s], imp.scores[s]) for s in imp.sites)
    assert len(imp.top(3)) == 3 and len(imp.top(0.5)) == 16
    with pytest.raises(ValueError, match="fraction must be in"):
        imp.top(1.5)
    with pytest.raises(ValueError, match="non-finite"):
        Importance("x", {"a": torch.tensor([1.0, float("nan")])})


def test_top_and_flat_indices_match_plain_per_element_loops():
    """``Importance.top`` reads units back per site in one unravel, ``flat_indices`` (what
    ``param_slices`` ravels parameter elements with) in one product: both equal a plain loop
    over the elements, in the ranking's order, on scores of 0-d to 3-d sites with ties."""
    from edit._common import flat_index, flat_indices

    g = torch.Generator().manual_seed(0)
    scores = {"a": torch.randint(0, 5, (7, 3, 4), generator=g).float(),
              "b": torch.randint(0, 5, (11,), generator=g).float(),
              "c": torch.tensor(9.0), "d": torch.randint(0, 5, (5, 6), generator=g).float()}
    imp = Importance("x", scores)
    got = imp.top(0.6).units
    flat = torch.cat([s.reshape(-1) for s in scores.values()])
    order = torch.sort(flat, descending=True, stable=True).indices[:len(got)].tolist()
    want, where = [], [(s, t.numel(), t.shape) for s, t in scores.items()]
    for i in order:  # the plain loop: walk the sites, unravel one index at a time
        for site, n, shape in where:
            if i < n:
                ix = []
                for d in reversed(shape):
                    ix.insert(0, i % d)
                    i //= d
                want.append(Unit(site, tuple(ix) if shape else (i,)))
                break
            i -= n
    assert list(got) == want and {u.site for u in got} == set(scores)
    for site, _, shape in where:
        idxs = [u.index for u in got if u.site == site]
        assert flat_indices(shape, idxs).tolist() == [flat_index(shape, ix) for ix in idxs]


def test_same_seed_same_metrics(tiny, tiny_request):
    runs = []
    for _ in range(2):
        h = tiny.model.clone()
        imp = locate.fisher(h, tiny_request)
        with edit.dampen(h, imp):
            runs.append(probes.verify(h, tiny_request).metrics)
    assert runs[0] == runs[1]


def test_dampen_lowers_forget_recall_on_tiny(tiny, tiny_request, tiny_oracle):
    h = tiny.model.clone()
    before = probes.verify(h, tiny_request, oracle=tiny_oracle).metrics
    imp = locate.fisher(h, tiny_request)
    with edit.dampen(h, imp):
        after = probes.verify(h, tiny_request).metrics["model"]
    assert after["forget_recall"] < before["model"]["forget_recall"] - 0.3
    assert before["oracle"]["forget_recall"] < 0.3  # the oracle never learned them
    assert before["oracle"]["retain_recall"] > 0.9
