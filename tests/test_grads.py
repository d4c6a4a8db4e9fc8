"""The shared gradient pass (locate._grads): statistics streamed per parameter as backward
finishes it, float32 whatever the model's dtype, only the asked-for ones kept, and a cache
entry serving any subset of what it holds. Checked against the all-at-once reference (every
gradient from one ``torch.autograd.grad``, then squared / summed) bit for bit."""

from __future__ import annotations

import pytest
import torch

from locate import _grads
from locate._grads import StatsCache, gradient_stats


def _reference(h, facts, sites, batch_size, stats):
    """All gradients of each batch at once (``autograd.grad``), accumulated with the same
    float32 operations: the statistics before streaming."""
    params = [s for s in sites if h.info(s).kind == "param"]
    acts_sites = [s for s in sites if h.info(s).kind == "activation"]
    sq, ab, n = {}, {}, 0
    for b in h.encode(list(facts)).chunks(batch_size):
        acts = {}
        loss = h.loss(b, hooks={s: lambda x, s_: acts.__setitem__(s_, x) for s in acts_sites},
                      per_example=True).mean()
        grads = torch.autograd.grad(loss, [h.parameter(s) for s in params] +
                                    [acts[s] for s in acts_sites])
        for s, g in zip(params + acts_sites, grads):
            if s in acts:
                g = (g * acts[s].detach()).sum(1)
                g = g.sum(-1) if g.dim() == 3 else g
                g = g.sum(0)
            g = g.float()
            if "sq" in stats:
                sq[s] = g * g if s not in sq else sq[s].addcmul_(g, g)
            if "abs" in stats:
                ab[s] = g.abs() if s not in ab else ab[s].add_(g.abs())
        n += 1
    return {s: v / n for s, v in sq.items()}, {s: v / n for s, v in ab.items()}


def _models():
    from conftest import make_planted

    yield "planted", make_planted().handle, make_planted().request
    pytest.importorskip("transformers")
    from test_hf import tiny, tiny_request

    yield "gemma3", tiny("gemma3"), tiny_request()  # tied embedding / unembedding


@pytest.mark.parametrize("which", ["planted", "gemma3"])
def test_streamed_stats_equal_all_at_once_reference_bit_for_bit(which):
    name, h, req = next((m for m in _models() if m[0] == which))
    sites = h.sites(kind="param")[:5] + h.sites("blocks.*.mlp.post") + h.sites(kind="param")[-2:]
    ref_sq, ref_abs = _reference(h, req.keep, sites, 2, ("sq", "abs"))
    got = gradient_stats(h, req.keep, sites, batch_size=2)
    for s in sites:
        assert torch.equal(got.sq[s], ref_sq[s]), s
        assert torch.equal(got.abs[s], ref_abs[s]), s
        assert got.sq[s].dtype == torch.float32 and got.sq[s].device == ref_sq[s].device


def test_each_gradient_is_reduced_as_backward_finishes_it(planted, monkeypatch):
    """Streaming: every parameter's gradient is added to the statistics before backward computes
    the next ones (the all-at-once pass computed every gradient before reading any), and a
    caller's ``.grad`` is left as it was, with no hook left behind."""
    h, req = planted.handle, planted.request
    sites = h.sites(kind="param")
    params = [h.parameter(s) for s in sites]
    before = torch.full_like(params[1], 7.0)
    params[1].grad = before
    events = []
    real = _grads._accumulate

    def spy(*args, **kw):
        events.append("reduce")
        return real(*args, **kw)

    monkeypatch.setattr(_grads, "_accumulate", spy)
    handles = [p.register_hook(lambda g: events.append("grad")) for p in params]
    try:
        gradient_stats(h, req.keep, sites, batch_size=3, stats=("sq",))
    finally:
        for k in handles:
            k.remove()
    in_flight, worst = 0, 0
    for e in events:
        in_flight += 1 if e == "grad" else -1
        worst = max(worst, in_flight)
    assert len(sites) > 10 and events.count("reduce") == events.count("grad") > 0
    assert worst <= 2, f"{worst} gradients waited to be reduced"
    assert params[1].grad is before and all(p.grad is None for p in params if p is not params[1])
    assert all(not getattr(p, "_post_accumulate_grad_hooks", None) for p in params)


def test_half_precision_model_gets_float32_statistics_of_its_own_gradients(planted):
    h = planted.handle.clone()
    for p in h.model.parameters():
        p.data = p.data.to(torch.bfloat16)
    sites = ["blocks.1.mlp.W_in", "blocks.1.mlp.b_in", "blocks.1.mlp.post"]
    ref_sq, ref_abs = _reference(h, planted.request.forget, sites, 2, ("sq", "abs"))
    got = gradient_stats(h, planted.request.forget, sites, batch_size=2)
    for s in sites:
        assert got.sq[s].dtype == torch.float32 and got.abs[s].dtype == torch.float32
        assert torch.equal(got.sq[s], ref_sq[s]) and torch.equal(got.abs[s], ref_abs[s]), s


def test_only_asked_statistics_are_kept_and_the_cache_serves_subsets(planted):
    h, req = planted.handle, planted.request
    sites = h.sites("blocks.*.mlp.W_in")
    cache = StatsCache()
    sq = gradient_stats(h, req.keep, sites, stats=("sq",), cache=cache)
    assert sq.abs == {} and cache.hits == 0
    ab = gradient_stats(h, req.keep, sites, stats=("abs",), cache=cache)  # adds |g| to the entry
    assert ab.sq == {} and cache.hits == 0 and len(cache.entries) == 1
    both = gradient_stats(h, req.keep, sites, cache=cache)
    assert cache.hits == 1
    fresh = gradient_stats(h, req.keep, sites)
    for s in sites:
        assert both.sq[s] is sq.sq[s] and both.abs[s] is ab.abs[s]
        assert torch.equal(both.sq[s], fresh.sq[s]) and torch.equal(both.abs[s], fresh.abs[s])
    again = gradient_stats(h, req.keep, sites, stats=("abs",), cache=cache)
    assert cache.hits == 2 and again.sq == {} and again.abs[sites[0]] is ab.abs[sites[0]]


def test_frozen_parameter_is_named(planted):
    h = planted.handle.clone()
    h.parameter("blocks.0.mlp.W_out").requires_grad_(False)
    with pytest.raises(ValueError, match=r"parameter site 'blocks.0.mlp.W_out' does not "
                                         r"require grad"):
        gradient_stats(h, planted.request.forget, ["blocks.0.mlp.W_in", "blocks.0.mlp.W_out"])


def test_statistics_are_the_same_run_after_run_at_two_threads(tiny, tiny_request):
    """At two threads the embedding's backward adds with unordered atomics unless
    deterministic algorithms are on: gradient statistics of ``embed.W_E`` (every locate method
    built on them, then every edit that reads them) came out differently from run to run."""
    prev = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        runs = [gradient_stats(tiny.model, tiny_request.retain, ["embed.W_E"],
                               batch_size=64).sq["embed.W_E"] for _ in range(8)]
    finally:
        torch.set_num_threads(prev)
    assert all(torch.equal(runs[0], r) for r in runs[1:])
    assert not torch.are_deterministic_algorithms_enabled()  # the caller's setting, restored
