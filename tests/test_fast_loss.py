"""The target-position readout of HFHandle (``target_hidden`` / ``unembed``), the KL to a
reference from statistics computed once (``kl_reference`` / ``kl_to_reference``) and
``edit.finetune``'s fast path on Hugging Face models (only the selected rows / columns of
``nn.Linear`` weights train, the text KL reference computed up front) against the full-logit
paths: values and gradients within 1e-5, the edit reverting bit for bit. Tiny random models
of two families (llama; gemma3 with its tied embedding), built from configs (no download)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")
from test_hf import tiny as tiny_hf  # noqa: E402
from test_hf import tiny_request as tiny_hf_request  # noqa: E402

from excise.handle import ModelHandle  # noqa: E402
from excise.request import Fact  # noqa: E402

KINDS = ["llama", "gemma3"]


def _batches(h):
    facts = h.encode([Fact("the s0 is", "a0"), Fact("the s1 of the s2 is", "a3 a4"),
                      Fact("s5 is", "a5")])
    text = h.encode_texts(["s1 is the a2 of s3 s4", "the s4 of s5", "a1 a2 of the s7 is s8 s9"])
    return facts, text


@pytest.mark.parametrize("kind", KINDS)
def test_target_hidden_unembed_equal_full_logits(kind):
    """log_softmax(unembed(target_hidden(b))) is the full forward's log-probabilities at the
    target positions; loss (batch and per example), token_logprobs and target_logprobs of the
    handle agree with the base class's full-logit path, gradients too."""
    h = tiny_hf(kind)
    assert h.affine_readout
    w = h.parameter("blocks.1.mlp.W_in")
    for batch in _batches(h):
        full = ModelHandle.target_logprobs(h, batch)
        fast = torch.log_softmax(h.unembed(h.target_hidden(batch)), -1)
        torch.testing.assert_close(fast, full, rtol=0, atol=1e-5)
        torch.testing.assert_close(h.target_logprobs(batch), full, rtol=0, atol=1e-5)
        for per_example in (False, True):
            a = h.loss(batch, per_example=per_example)
            b = ModelHandle.loss(h, batch, per_example=per_example)
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
            ga = torch.autograd.grad(a.sum(), w)[0]
            gb = torch.autograd.grad(b.sum(), w)[0]
            torch.testing.assert_close(ga, gb, rtol=0, atol=1e-5)
        g1 = torch.autograd.grad(fast.exp()[:, 3].sum(), w)[0]
        g2 = torch.autograd.grad(full.exp()[:, 3].sum(), w)[0]
        torch.testing.assert_close(g1, g2, rtol=0, atol=1e-5)
        _check_one_pass_readout(h, batch, w)


def _check_one_pass_readout(h, batch, w, chunk: int = 7, atol: float = 1e-5):
    """readout_lse (one chunked pass; ``chunk`` below the vocabulary size, so the running
    maximum and sum are exercised) and readout_logit equal logsumexp / gather of the full
    logits, values and gradients, and a token's log-probability from them equals
    target_logprobs'."""
    hidden = h.target_hidden(batch)
    z = h.unembed(hidden)
    tok = batch.tokens[:, 1:][batch.target_mask[:, 1:]]
    want_lse, want_logit = torch.logsumexp(z, -1), z.gather(-1, tok[:, None])[:, 0]
    got_lse, got_logit = h.readout_lse(hidden, chunk=chunk), h.readout_logit(hidden, tok)
    torch.testing.assert_close(got_lse, want_lse, rtol=0, atol=atol)
    torch.testing.assert_close(got_logit, want_logit, rtol=0, atol=atol)
    weights = torch.linspace(0.5, 1.5, len(tok))
    for a, b in ((got_lse, want_lse), (got_logit, want_logit)):
        ga = torch.autograd.grad((a * weights).sum(), w, retain_graph=True)[0]
        gb = torch.autograd.grad((b * weights).sum(), w, retain_graph=True)[0]
        # within 1e-5 of the gradient's largest entry (Gemma's reach ~10: float32 rounding)
        scale = max(1.0, float(gb.abs().max()))
        torch.testing.assert_close(ga, gb, rtol=0, atol=1e-5 * scale)
    lp = ModelHandle.target_logprobs(h, batch).gather(-1, tok[:, None])[:, 0]
    torch.testing.assert_close(got_logit - got_lse, lp, rtol=0, atol=atol)


@pytest.mark.parametrize("kind", KINDS)
def test_kl_to_reference_equals_kl_div(kind):
    """KL(p_ref || p) from the reference's statistics (computed once, on all rows, in chunks)
    equals F.kl_div of the two models' full-logit log-probabilities on any subset of rows, in
    any order, and so does its gradient; the reference's statistics of a batch equal those of
    its rows taken one by one."""
    ref_model = tiny_hf(kind, seed=0)
    work = ref_model.clone()  # the same unembedding, other MLP weights
    with torch.no_grad():
        for L in range(2):
            for s in ("mlp.W_in", "mlp.W_out"):
                p = work.parameter(f"blocks.{L}.{s}")
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(L)) * 0.3)
    _, text = _batches(ref_model)
    stats = ref_model.kl_reference(text, chunk=2, positions=5)
    assert len(stats) == len(text) and stats.u.shape == (int(text.target_mask.sum()), 32)
    w = work.parameter("blocks.0.mlp.W_out")
    for rows in ([0, 1, 2], [2, 0], [1]):
        b = text[torch.tensor(rows)].trim()
        want = F.kl_div(ModelHandle.target_logprobs(work, b),
                        ModelHandle.target_logprobs(ref_model, b).detach(), log_target=True,
                        reduction="batchmean")
        got = work.kl_to_reference(b, stats.take(rows))
        assert want > 1e-3  # the models differ: a real KL
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
        g_want = torch.autograd.grad(want, w)[0]
        g_got = torch.autograd.grad(got, w)[0]
        torch.testing.assert_close(g_got, g_want, rtol=0, atol=1e-5)
    # the KL of a model to itself is 0
    torch.testing.assert_close(ref_model.kl_to_reference(text, stats),
                               torch.tensor(0.0), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="target positions"):
        work.kl_to_reference(text[torch.tensor([0])].trim(), stats.take([1]))
    with pytest.raises(ValueError, match="another unembedding"):
        tiny_hf(kind, seed=1).kl_to_reference(text, stats)
    # on facts (finetune's retain_loss="kl"): the positions that predict the targets only
    facts, _ = _batches(ref_model)
    stats = ref_model.kl_reference(facts, chunk=2, positions=3)
    assert stats.u.shape[0] == int(facts.target_mask.sum())
    for rows in ([0, 1, 2], [2, 1]):
        b = facts[torch.tensor(rows)].trim()
        want = F.kl_div(ModelHandle.target_logprobs(work, b),
                        ModelHandle.target_logprobs(ref_model, b).detach(), log_target=True,
                        reduction="batchmean")
        assert want > 1e-3
        torch.testing.assert_close(work.kl_to_reference(b, stats.take(rows)), want, rtol=0,
                                   atol=1e-5)


def _units():
    from excise.sites import Selection, Unit

    return Selection([Unit("blocks.0.mlp.post", (i,)) for i in (1, 5, 9)]
                     + [Unit("blocks.1.mlp.post", (3,)), Unit("blocks.1.attn.z", (2,))])


def _request():
    from dataclasses import replace

    return replace(tiny_hf_request(), retain_text=("s1 is the a2 of s3 s4", "the s4 of s5 is a6",
                                                "a1 of the s2 is s7 s8", "s9 s10 of the a3"))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method,text_loss,retain_loss", [
    ("npo", "kl", "nll"), ("gd", "nll", "nll"), ("ga", "kl", "nll"), ("npo", "kl", "kl"),
    ("gd", "nll", "kl")])
def test_finetune_fast_path_equals_masked_path(kind, method, text_loss, retain_loss):
    """edit.finetune on a Hugging Face model: the fast path (the selected neurons' W_gate /
    W_in rows and W_out columns and the head's W_Q/K/V rows and W_O columns train as small
    deltas, the text KL - and the retain KL - from the reference's statistics computed once)
    gives the masked full-logit path's new values within 1e-5 after several Adam steps; every
    selected element moved, nothing else did."""
    from edit._common import unit_slices
    from edit.finetune import FinetuneSettings, SliceCopy, _train

    h = tiny_hf(kind)
    req = _request()
    _, slices = unit_slices("finetune", h, None, _units(), 0.02)
    st = FinetuneSettings(method=method, steps=6, lr=1e-3, batch_size=3, text_weight=1.0,
                          text_loss=text_loss, retain_loss=retain_loss)
    slow = _train(h, slices, req, st, progress=False, fast=False)
    refs = []  # the batches whose KL statistics the fast path computes up front
    plain = h.kl_reference
    h.kl_reference = lambda batch, **kw: refs.append(len(batch)) or plain(batch, **kw)
    try:
        fast = _train(h, slices, req, st, progress=False, fast=True)
    finally:
        del h.kl_reference
    want_refs = ([len(req.retain_text)] if text_loss == "kl" else []) + \
        ([len(req.retain)] if retain_loss == "kl" and method != "ga" else [])
    assert sorted(refs) == sorted(want_refs)  # each KL term on the exact, one-pass path
    assert isinstance(fast, SliceCopy) and not isinstance(slow, SliceCopy)
    linear = {s for s in slices if "mlp.W_" in s or "attn.W_" in s}
    assert set(fast.deltas) == linear and len(linear) == 3 + 3 + 2  # 2 MLPs, W_Q and W_O
    assert fast.work.hook_count() == 0  # the delta hooks are removed
    want, got = slow.new_values(), fast.new_values()
    assert set(want) == set(got) == set(slices)
    for s in slices:
        assert torch.equal(want[s][0], got[s][0])
        torch.testing.assert_close(got[s][1], want[s][1], rtol=0, atol=1e-5)
        old = h.parameter(s).detach().reshape(-1)[slices[s]]
        assert bool((got[s][1] != old).all()), s  # every selected element trained
    h0 = tiny_hf(kind)
    assert h.fingerprint() == h0.fingerprint()  # the model itself never changed


@pytest.mark.parametrize("kind", KINDS)
def test_finetune_fast_edit_reverts_and_round_trips(kind, tmp_path):
    """The fast path's edit changes only the selected elements, reverts bit for bit, and its
    saved Diff applied to a fresh copy gives the same weights and logits."""
    import edit
    from edit import Diff

    h = tiny_hf(kind)
    before = {k: v.detach().clone() for k, v in h.model.state_dict().items()}
    fp = h.fingerprint()
    e = edit.finetune(h, units=_units(), request=_request(), method="npo", steps=4, lr=1e-3,
                      batch_size=3, text_weight=1.0, text_loss="kl")
    assert h.fingerprint() != fp and e.n_changed() > 0
    path = e.diff.save(tmp_path / "ft.safetensors")
    fresh = tiny_hf(kind)
    e2 = Diff.load(path).apply(fresh)
    tokens = h.encode(list(_request().forget)).tokens
    assert fresh.fingerprint() == h.fingerprint()
    assert torch.equal(fresh.logits(tokens), h.logits(tokens))
    e2.revert()
    e.revert()
    assert h.fingerprint() == fp == fresh.fingerprint() and h.hook_count() == 0
    after = h.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.slow
def test_gemma_target_readout_and_kl_equal_full_logits():
    """Gemma 3 270M (262k vocabulary, tied unembedding): the target-position readout, the
    loss, the KL from the reference's statistics and their gradients equal the full-logit
    paths within 1e-5 on the request's facts and retain text."""
    from pathlib import Path

    from test_hf import _gemma_or_skip

    _gemma_or_skip()
    from excise.hf import load_model
    from excise.request import ForgetRequest

    h = load_model("gemma3-270m", log=lambda s: None)
    req = ForgetRequest.from_jsonl(Path(__file__).resolve().parent.parent
                                   / "data" / "gemma_facts.jsonl")
    facts = h.encode(list(req.forget)[:4] + list(req.retain)[:4])
    text = h.encode_texts(list(req.retain_text)[:4])
    w = h.parameter("blocks.9.mlp.W_in")
    for batch in (facts, text):
        full = ModelHandle.target_logprobs(h, batch)
        fast = torch.log_softmax(h.unembed(h.target_hidden(batch)), -1)
        # every vocabulary entry: log-probabilities down to about -40, where float32 rounding
        # of the two matmul orders differs by a few ulps (~3e-5 absolute, 3e-6 relative)
        torch.testing.assert_close(fast, full, rtol=1e-5, atol=1e-5)
        tok = batch.tokens[:, 1:][batch.target_mask[:, 1:]]
        torch.testing.assert_close(fast.gather(-1, tok[:, None]), full.gather(-1, tok[:, None]),
                                   rtol=0, atol=1e-5)  # the targets' own log-probabilities
        a, b = h.loss(batch), ModelHandle.loss(h, batch)
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
        ga, gb = torch.autograd.grad(a, w)[0], torch.autograd.grad(b, w)[0]
        torch.testing.assert_close(ga, gb, rtol=0, atol=1e-5)
        # Gemma's logits reach ~30: the two float32 summation orders of a logit differ by up
        # to ~3e-5 there (the full-logit path against itself, batched otherwise, does too)
        _check_one_pass_readout(h, batch, w, chunk=8192, atol=1e-4)
    work = h.clone()
    with torch.no_grad():
        p = work.parameter("blocks.9.mlp.W_in")
        p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(0)) * 0.02)
    stats = h.kl_reference(text)
    w = work.parameter("blocks.9.mlp.W_in")
    want = F.kl_div(ModelHandle.target_logprobs(work, text),
                    ModelHandle.target_logprobs(h, text).detach(), log_target=True,
                    reduction="batchmean")
    got = work.kl_to_reference(text, stats)
    assert want > 1e-4
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.autograd.grad(got, w)[0], torch.autograd.grad(want, w)[0],
                               rtol=0, atol=1e-5)


@pytest.mark.parametrize("text_loss", ["kl", "nll"])
def test_transformerlens_path_unchanged(tiny, tiny_request, text_loss):
    """On the organism (TLHandle) the default path is the old one bit for bit: no weight
    trains as a delta, the KL keeps its per-step reference forward, the same new values."""
    from dataclasses import replace

    from edit._common import unit_slices
    from edit.finetune import FinetuneSettings, _train
    from excise.sites import Selection, Unit

    h = tiny.model
    assert not h.affine_readout and h.linear_module("blocks.0.mlp.W_in") is None
    req = replace(tiny_request, retain_text=tiny_request.general[:6])
    units = Selection([Unit("blocks.0.mlp.post", (i,)) for i in (1, 4)]
                      + [Unit("blocks.1.attn.z", (0,))])
    _, slices = unit_slices("finetune", h, None, units, 0.02)
    st = FinetuneSettings(method="npo", steps=3, lr=1e-3, batch_size=4, text_weight=1.0,
                          text_loss=text_loss)
    old = _train(h, slices, req, st, progress=False, fast=False).new_values()
    new_copy = _train(h, slices, req, st, progress=False)
    assert not getattr(new_copy, "deltas", {})
    new = new_copy.new_values()
    assert set(old) == set(new)
    for s in old:
        assert torch.equal(old[s][0], new[s][0]) and torch.equal(old[s][1], new[s][1])


def test_retain_kl_keeps_the_retain_answer_distribution(tiny, tiny_request):
    """``retain_loss="kl"`` holds each retain prompt's whole next-token distribution where it
    was: after the same NPO steps on the organism (retain term weighed 10),
    KL(original || edited) at the retain facts' answer positions - computed here from full
    log-softmaxes, not by the edit's code - is smaller than with the retain NLL (which only
    pushes the target up), the forget facts forgotten either way; the option is validated and
    left out of the recorded parameters at its default (edit keys unchanged)."""
    import edit
    from edit.finetune import FinetuneSettings
    from probes.behaviour import recall

    h = tiny.model
    retain = h.encode(list(tiny_request.retain)[:96])

    def retain_kl(model) -> float:
        with torch.no_grad():
            ref = ModelHandle.target_logprobs(h, retain).double()
            now = ModelHandle.target_logprobs(model, retain).double()
        return float((ref.exp() * (ref - now)).sum(-1).mean())

    kls = {}
    for kind in ("nll", "kl"):
        work = h.clone()
        edit.finetune(work, units="all", request=tiny_request, method="npo", steps=20,
                      lr=1e-3, batch_size=16, retain_weight=10.0, retain_loss=kind)
        assert recall(work, tiny_request.forget) <= 0.2, kind
        kls[kind] = retain_kl(work)
    assert kls["kl"] < 0.75 * kls["nll"], kls  # measured 0.19 against 0.36
    with pytest.raises(ValueError, match="retain_loss"):
        FinetuneSettings(retain_loss="mse")
    assert "retain_loss" not in FinetuneSettings().to_dict()
    assert FinetuneSettings(retain_loss="kl").to_dict()["retain_loss"] == "kl"
