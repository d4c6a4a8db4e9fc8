"""locate.subnetwork: on a hand-built model whose forget answers need two planted neurons (the
lookup and the readout neurons of test_fact_lookup's model), the learned mask switches exactly
those off first and keeps the head every fact needs; the weights never change and never get a
gradient; the same seed gives the same scores; the step-averaged score equals the masks of
shorter runs averaged by hand; the forget terms equal a per-token loop; bad input is refused with
an error naming it."""

from __future__ import annotations

import pytest
import torch

import locate
from excise.sites import Unit
from test_fact_lookup import LOOKUP, READOUT, _unit, lookup_model


@pytest.fixture(scope="module")
def lookup():
    return lookup_model()


def test_the_planted_neurons_are_switched_off_first(lookup):
    h, req = lookup
    fp = h.fingerprint()
    imp = locate.subnetwork(h, req, ["blocks.*.mlp.post", "blocks.1.attn.z"])
    assert "subnetwork" in locate.METHODS
    assert set(imp.top(2).units) == {_unit(LOOKUP), _unit(READOUT)}
    # head 0 of block 1 copies every subject to the last position: retain needs it
    assert float(imp.parts["mask"]["blocks.1.attn.z"][0]) > 0.9
    assert imp.scores["blocks.1.attn.z"].shape == (2,)
    # the mask it learned, made hard, lowers the forget answers and leaves the retain ones
    off = {s: (lambda m: (lambda x, _s: x * (m[:, None] if x.dim() == 4 else m)))(
        (imp.parts["mask"][s] > 0.5).float()) for s in imp.scores}
    # (once the lookup neuron is off the readout neuron has nothing to read: one may stay on)
    gone = {Unit(s, tuple(int(i) for i in idx)) for s, m in imp.parts["mask"].items()
            for idx in torch.nonzero(m <= 0.5)}
    assert gone and gone <= {_unit(LOOKUP), _unit(READOUT)}

    def answer(facts, hooks=None):
        b = h.encode(list(facts))
        return h.token_logprobs(b, hooks).sum() / b.target_mask.sum()

    with torch.no_grad():
        assert float(answer(req.forget, off)) < float(answer(req.forget)) - 0.5
        assert float(answer(req.retain, off)) == pytest.approx(float(answer(req.retain)),
                                                               abs=1e-5)
    # the weights: unchanged, no gradient, no hook left behind
    assert h.fingerprint() == fp and h.hook_count() == 0
    assert all(p.grad is None for p in h.model.parameters())


def test_same_seed_same_scores_another_seed_other_draws(tiny, tiny_request):
    kw = dict(steps=5, batch_size=8)
    a = locate.subnetwork(tiny.model, tiny_request, seed=3, **kw)
    b = locate.subnetwork(tiny.model, tiny_request, seed=3, **kw)
    c = locate.subnetwork(tiny.model, tiny_request, seed=4, **kw)
    for s in a.scores:
        assert torch.equal(a.scores[s], b.scores[s])
    assert any(not torch.equal(a.scores[s], c.scores[s]) for s in a.scores)


def test_mean_score_is_the_average_of_the_masks_before_each_step(tiny, tiny_request):
    """``score="mean"`` over n steps = the mean of 1 - m before steps 1..n, read from runs of
    0..n-1 steps with ``score="final"`` (same seed: the same batches in the same order)."""
    kw = dict(batch_size=8, seed=2, init=1.0)
    n = 4
    mean = locate.subnetwork(tiny.model, tiny_request, steps=n, score="mean", **kw)
    finals = [locate.subnetwork(tiny.model, tiny_request, steps=j, score="final", **kw)
              for j in range(1, n)]
    for s, v in mean.scores.items():
        start = 1 - torch.sigmoid(torch.full_like(v, 1.0))
        by_hand = (start + sum(f.scores[s] for f in finals)) / n
        torch.testing.assert_close(v, by_hand, rtol=1e-5, atol=1e-6)
    assert mean.meta["score"] == "mean" and finals[0].meta["score"] == "final"


def test_forget_terms_match_a_per_token_loop():
    from locate.subnetwork import _forget_term

    lp = torch.log(torch.tensor([[0.9, 1e-5, 0.3], [2e-4, 0.5, 1e-9]]))
    floor = -8.0
    want_floor = [[max(float(x), floor) for x in row] for row in lp]
    want_bounded = [[-torch.log(1 - torch.exp(x)).item() for x in row] for row in lp]
    torch.testing.assert_close(_forget_term(lp, "floor", floor), torch.tensor(want_floor))
    torch.testing.assert_close(_forget_term(lp, "bounded", floor), torch.tensor(want_bounded))


def test_bad_options_are_refused(lookup):
    h, req = lookup
    for kw, msg in ((dict(steps=0), "steps=0 is out of range"),
                    (dict(steps=2.5), "steps=2.5 is out of range"),
                    (dict(lr=0.0), "lr=0.0 is out of range"),
                    (dict(keep=-1.0), "keep=-1.0 is out of range"),
                    (dict(sparsity=float("nan")), "sparsity=nan is out of range"),
                    (dict(batch_size=0), "batch_size=0 is out of range"),
                    (dict(floor=0.0), "floor=0.0 is out of range"),
                    (dict(objective="ascent"), "unknown objective 'ascent'"),
                    (dict(score="last"), "unknown score 'last'")):
        with pytest.raises(ValueError, match=f"subnetwork: {msg}"):
            locate.subnetwork(h, req, **kw)
    with pytest.raises(ValueError, match="subnetwork cannot score site 'blocks.1.resid_post'"):
        locate.subnetwork(h, req, "blocks.1.resid_post")
