"""The fused engine of the fine-tuning and steering attacks (probes.attacks, ``engine="fused"``).

It must compute what the serial path (the handle, TransformerLens) computes: the same logits and
losses to float precision, the same gradients, and on the tiny organism the same curves (every
per-fact hit identical) for relearning, benign relearning and SAE steering. Where it does not
apply (hooks, a handle subclass, another architecture) it must step aside.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from excise.handle import TLHandle
from excise.train import Optim, Sampler, train
from excise.fused import engine_for, fused_forward, fused_hits, fused_loss
from probes import attacks as A

# short budgets of the tiny organism's settings (tests/test_probes.py FAST)
CFG = A.AttackConfig(relearn_steps=10, relearn_lr=3e-3, benign_steps=10, benign_lr=3e-3,
                     eval_every=5, sae_attack_steps=10, sae_steps=300, grid="single",
                     engine="serial")


def _data(tiny, tiny_request):
    facts = list(tiny_request.forget) + list(tiny_request.retain)
    return tiny.model.encode(facts)


def test_fused_logits_loss_and_gradients_match_the_handle(tiny, tiny_request):
    m = A._trainable_clone(tiny.model)
    data = _data(tiny, tiny_request)
    fwd = fused_forward(m, data[:8].trim().tokens)
    assert fwd is not None
    params = m.named_parameters()
    b = data[Sampler(0).rows(len(data), 48)]
    with torch.no_grad():
        want = m.logits(b.trim().tokens)
        got = fwd(params, b.trim().tokens)
    assert (got - want).abs().max() < 1e-4
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    ref = m.loss(b.trim())
    g_ref = torch.autograd.grad(ref, list(params.values()))
    loss = fused_loss(fwd, params, b)  # rows packed
    g = torch.autograd.grad(loss, list(params.values()))
    assert float(loss) == pytest.approx(float(ref), rel=1e-5)
    for name, x, y in zip(params, g, g_ref):
        assert torch.allclose(x, y, rtol=1e-3, atol=1e-6), name
    assert torch.equal(fused_hits(fwd, params, b), A.fact_hits(m, b))


def test_fused_attention_both_forms_equal_the_handle(tiny, monkeypatch):
    """Attention runs as batched matmuls up to ``_MATH_ATTENTION_MAX_T`` positions and through
    torch's kernel beyond: both give the handle's logits (a random model with room for 96
    positions, rows of 20 and of 80 tokens), and the two forms agree with each other."""
    import excise.fused as fused_mod
    from excise.organism import PRESETS, build_model

    model = build_model(PRESETS["tiny"], len(tiny.tokenizer), n_ctx=96)
    h = TLHandle(model, tiny.tokenizer)
    kernel_calls = []
    real = fused_mod.F.scaled_dot_product_attention
    monkeypatch.setattr(fused_mod.F, "scaled_dot_product_attention",
                        lambda *a, **k: kernel_calls.append(a[0].shape[2]) or real(*a, **k))
    fwd = fused_forward(h)
    gen = torch.Generator().manual_seed(0)
    for T in (20, 80):
        tokens = torch.randint(1, len(tiny.tokenizer), (3, T), generator=gen)
        with torch.no_grad():
            assert (fwd(h.named_parameters(), tokens) - h.logits(tokens)).abs().max() < 1e-4
    assert set(kernel_calls) == {80} and 80 > fused_mod._MATH_ATTENTION_MAX_T >= 20
    q, k, v = torch.randn(3, 2, 4, 12, 8, generator=gen)
    mask = torch.full((12, 12), float("-inf")).triu_(1)
    a = fused_mod._causal_attention(q, k, v, 0.3, mask)
    assert torch.allclose(a, fused_mod._causal_attention(q, k, v, 0.3, None), atol=1e-6)


def test_fused_kept_positions_equal_the_full_logits_there(tiny, tiny_request):
    """``keep``: the last block runs at the kept positions only; the logits there equal the
    full forward's, with a hook on an earlier block and on the last one (which sees every
    position, so the cut comes after it)."""
    m = A._trainable_clone(tiny.model)
    data = _data(tiny, tiny_request)
    fwd = fused_forward(m, data[:8].trim().tokens)
    params = m.named_parameters()
    b = data[Sampler(1).rows(len(data), 40)].trim()
    keep = torch.rand(b.tokens.shape, generator=torch.Generator().manual_seed(0)) < 0.3
    n = m.model.cfg.n_layers

    def shift(x, site):
        return x + 0.5 * x.roll(1, dims=-1)

    for hooks in (None, {"blocks.0.resid_post": shift}, {f"blocks.{n - 1}.resid_post": shift}):
        with torch.no_grad():
            full = fwd(params, b.tokens, hooks)
            kept = fwd(params, b.tokens, hooks, keep)
        assert kept.shape == (int(keep.sum()), full.shape[-1])
        assert (kept - full[keep]).abs().max() < 1e-5, hooks


def test_fused_training_losses_follow_the_serial_ones(tiny, tiny_request):
    data = _data(tiny, tiny_request)
    runs = []
    for engine in ("serial", "fused"):
        m = A._trainable_clone(tiny.model)
        fwd = engine_for(m, engine, data)
        params = m.named_parameters()
        s = Sampler(3)

        def loss(_, m=m, fwd=fwd, params=params, s=s):
            b = data[s.rows(len(data), 64)]
            return m.loss(b.trim()) if fwd is None else fused_loss(fwd, params, b)

        runs.append(train(loss, params, steps=15, optim=Optim("adamw", lr=3e-3),
                          max_grad_norm=1.0).losses)
    assert runs[0] == pytest.approx(runs[1], rel=1e-4, abs=1e-5)
    assert runs[0][-1] != runs[0][0]  # it trained


@pytest.mark.parametrize("attack", ["relearn", "benign"])
def test_fused_finetune_curves_equal_serial(attack, tiny, tiny_request, tiny_oracle):
    for model in (tiny.model, tiny_oracle):
        fn = getattr(A, attack)
        serial = fn(model, tiny_request, CFG)
        fused = fn(model, tiny_request, dataclasses.replace(CFG, engine="fused"))
        assert fused.hits == serial.hits
        assert fused.y == serial.y and fused.x == serial.x
        assert fused.aux == serial.aux


def test_fused_quantization_reads_equal_serial(tiny, tiny_request, tiny_oracle):
    cfg = dataclasses.replace(CFG, quant_bits=(8, 2))  # 2 bits: hits change
    for model in (tiny.model, tiny_oracle):
        serial = A.quantize(model, tiny_request, cfg)
        fused = A.quantize(model, tiny_request, dataclasses.replace(cfg, engine="fused"))
        assert fused.hits == serial.hits and fused.aux == serial.aux and fused.x == serial.x
        assert serial.aux["retain recall"][-1] < serial.aux["retain recall"][0]


def test_fused_sae_steering_equals_serial(tiny, tiny_request):
    kit = A.steering_kit(tiny.model, tiny_request, CFG)
    serial = A.sae_steer(tiny.model, tiny_request, kit[0], kit[1], CFG, kit[2])
    fused = A.sae_steer(tiny.model, tiny_request, kit[0], kit[1],
                        dataclasses.replace(CFG, engine="fused"), kit[2])
    assert fused.hits == serial.hits and fused.aux == serial.aux


def test_fused_engine_steps_aside(tiny, tiny_request):
    data = _data(tiny, tiny_request)
    tokens = data[:4].trim().tokens
    assert fused_forward(tiny.model, tokens) is not None
    hooked = tiny.model.clone()
    hooked.add_persistent_hook("blocks.0.resid_post", lambda x, site: x * 0.5)
    assert fused_forward(hooked, tokens) is None

    class Filtered(TLHandle):  # a subclass may compute something else
        pass

    assert fused_forward(Filtered(tiny.model.model, tiny.tokenizer), tokens) is None
    other = tiny.model.clone()
    other.model.cfg.act_fn = "silu"
    assert fused_forward(other, tokens) is None
    with pytest.raises(ValueError, match="engine"):
        A.AttackConfig(engine="vmap")
    m = A._trainable_clone(tiny.model)
    fwd = fused_forward(m, tokens)
    with pytest.raises(ValueError, match="resid_post"):
        fwd(m.named_parameters(), tokens, {"blocks.0.mlp.post": lambda x, s: x})


def test_fused_packed_rows_equal_each_row_run_alone(tiny, tiny_request):
    """With ``keep`` the rows are packed (each cut after its last kept position, no padding in
    the per-position layers): every kept logit equals the one of its row run alone, unpadded,
    through the full forward - rows of different lengths, one with nothing kept, and the
    gradient of the loss equal to the handle's."""
    m = A._trainable_clone(tiny.model)
    data = _data(tiny, tiny_request)
    fwd = fused_forward(m, data[:8].trim().tokens)
    params = m.named_parameters()
    b = data[Sampler(2).rows(len(data), 24)].trim()
    assert len(set(b.lengths.tolist())) > 2  # rows of several lengths, padded
    keep = torch.zeros_like(b.target_mask)
    keep[:, :-1] = b.target_mask[:, 1:]
    keep[3] = False
    keep[5, 1] = True  # an early position too
    with torch.no_grad():
        got = fwd(params, b.tokens, None, keep)
        want = torch.cat([fwd(params, b.tokens[i:i + 1, :int(b.lengths[i])])[0][
            keep[i, :int(b.lengths[i])]] for i in range(len(b))])
    assert got.shape == want.shape == (int(keep.sum()), want.shape[-1])
    assert (got - want).abs().max() < 1e-5
    none = fwd(params, b.tokens, None, torch.zeros_like(keep))
    assert none.shape == (0, want.shape[-1])


def test_behaviour_through_the_fused_engine_equals_the_handle(tiny, tiny_request, tiny_oracle):
    """``measure_behaviour(engine="fused")``: every split's per-fact hits identical and the
    perplexity equal to float precision on the original and the oracle; per-token
    log-probabilities equal the handle's at every target (zero elsewhere); a model with a hook
    is read through the handle (its hook applies)."""
    from excise.fused import fused_token_logprobs
    from probes.behaviour import fact_hits, measure_behaviour, perplexity

    for model in (tiny.model, tiny_oracle):
        m_s, h_s = measure_behaviour(model, tiny_request)
        m_f, h_f = measure_behaviour(model, tiny_request, engine="fused")
        assert h_s.keys() == h_f.keys()
        for split in h_s:
            assert torch.equal(h_s[split], h_f[split]), split
        for k in m_s:
            assert m_f[k] == pytest.approx(m_s[k], rel=1e-5, nan_ok=True), k
    enc = tiny.model.encode_texts(list(tiny_request.general)[:24])
    fwd = fused_forward(tiny.model, enc[:8].trim().tokens)
    with torch.no_grad():
        got = fused_token_logprobs(fwd, tiny.model.named_parameters(), enc)
        b = enc.trim()
        want = tiny.model.token_logprobs(b)
    assert got.shape == want.shape and (got - want).abs().max() < 1e-4
    assert torch.all(got[~b.target_mask[:, 1:]] == 0) and torch.all(got <= 0)
    hooked = tiny.model.clone()
    hooked.add_persistent_hook("blocks.0.resid_post", lambda x, site: x * 0.0)
    facts = list(tiny_request.retain)
    assert torch.equal(fact_hits(hooked, facts, engine="fused"), fact_hits(hooked, facts))
    assert perplexity(hooked, tiny_request.general, engine="fused") == pytest.approx(
        perplexity(hooked, tiny_request.general), rel=1e-6)
    assert perplexity(hooked, tiny_request.general) != pytest.approx(
        perplexity(tiny.model, tiny_request.general), rel=1e-3)
    with pytest.raises(ValueError, match="engine"):
        fact_hits(tiny.model, facts, engine="vmap")


def test_privacy_through_the_fused_engine_equals_the_handle(tiny, tiny_request):
    """Membership scores (loss and min-k%) and secret exposures read through the fused forward
    equal the handle's to float precision."""
    from probes.privacy import exposure_metrics, membership_scores

    for split in (tiny_request.forget, tiny_request.holdout):
        for a, b in zip(membership_scores(tiny.model, split),
                        membership_scores(tiny.model, split, engine="fused")):
            assert a.shape == b.shape and torch.allclose(a, b, atol=1e-5)
    want = exposure_metrics(tiny.model, tiny_request)
    got = exposure_metrics(tiny.model, tiny_request, engine="fused")
    assert "exposure_forget" in want and got.keys() == want.keys()
    for k in want:
        assert got[k] == pytest.approx(want[k], rel=1e-5), k


# -- several settings at once (AttackConfig.workers) ---------------------------------------------
def _flat(grids):
    return {name: [(p.lr, p.seed, {k: (c.x, c.y, c.hits, c.aux)
                                   for k, c in p.curves.curves.items()})
                   for p in g.points] for name, g in grids.items()}


def test_grid_in_workers_equals_one_setting_at_a_time(tiny, tiny_request, tiny_oracle):
    """Two settings at once, each at one thread, give exactly what one setting at a time gives at
    one thread - every curve, hit and aux value; the caller's thread count and
    deterministic-algorithms setting come back unchanged (completion order: the next test)."""
    cfg = dataclasses.replace(CFG, engine="fused", grid="quick",
                              attacks=("relearn", "benign", "refit", "sae", "quantize"))
    kit = A.steering_kit(tiny.model, tiny_request, CFG)
    models = {"after": tiny.model, "oracle": tiny_oracle}
    prev = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    try:
        torch.set_num_threads(1)
        alone = A.run_grid(models, tiny_request, dataclasses.replace(cfg, workers=1), kit=kit)
        torch.set_num_threads(2)
        assert A.grid_workers(models, cfg, 100) == 2  # auto: one per thread on the fused CPU path
        both = A.run_grid(models, tiny_request, cfg, kit=kit)
        assert (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()) == \
            (2, prev[1])
    finally:
        torch.set_num_threads(prev[0])
    assert _flat(both) == _flat(alone)
    assert len(both["relearn"].points) == 4  # 2 learning rates x 2 seeds


def test_workers_run_at_once_on_their_own_copies_at_one_thread(tiny, tiny_request):
    """Two workers really run two settings at the same time (a barrier only both can pass), each
    at one thread on its own copy of the model and of the SAE kit; tasks that finish in reverse
    order still come back in task order."""
    import threading
    import time

    barrier = threading.Barrier(2, timeout=60)
    seen = []
    kit = (torch.nn.Linear(2, 2), "blocks.0.resid_post", 1.0)

    def runner(model, request, cfg, k):
        barrier.wait()  # raises BrokenBarrierError unless two tasks are in here at once
        seen.append((torch.get_num_threads(), model is tiny.model, k[0] is kit[0],
                     threading.current_thread() is threading.main_thread()))
        time.sleep(0.3 if cfg.seed == 0 else 0.0)  # the first task finishes last
        return A.Curve([0], [float(cfg.seed)], "x", "y")

    prev = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        grid = A.run_grid({"after": tiny.model}, tiny_request,
                          A.AttackConfig(attacks=("relearn",), grid="quick", workers=2),
                          runners={"relearn": runner}, kit=kit)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(prev)
    assert [p.curves.curves["after"].y[0] for p in grid["relearn"].points] == [0.0, 1.0, 0.0, 1.0]
    assert seen and all(s == (1, False, False, False) for s in seen)


def test_grid_workers_rule_and_errors(tiny, tiny_request):
    models = {"after": tiny.model}
    prev = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert A.grid_workers(models, A.AttackConfig(engine="serial"), 10) == 1
        assert A.grid_workers(models, A.AttackConfig(), 1) == 1  # never more than the tasks
        assert A.grid_workers(models, A.AttackConfig(workers=3), 10) == 3
        torch.set_num_threads(1)
        assert A.grid_workers(models, A.AttackConfig(), 10) == 1
    finally:
        torch.set_num_threads(prev)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="workers="):
            A.AttackConfig(workers=bad)


def test_a_failing_setting_fails_the_grid_at_once_and_restores_the_settings(tiny, tiny_request):
    """A setting that fails stops the grid: its error is raised while the slow setting beside
    it finishes, the queued ones never start, and the caller's threads and deterministic
    setting come back."""
    import time

    calls = []

    def runner(model, request, cfg, kit):
        calls.append((cfg.relearn_lr, cfg.seed))
        if (cfg.relearn_lr, cfg.seed) == (3e-4, 1):
            raise RuntimeError("setting lr 3e-4 seed 1 broke")
        time.sleep(0.5)
        return A.Curve([0], [0.0], "x", "y")

    cfg = A.AttackConfig(attacks=("relearn",), grid="full", workers=2)  # 6 lrs x 2 seeds
    prev = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),
            torch.is_deterministic_algorithms_warn_only_enabled())
    try:
        torch.set_num_threads(2)
        with pytest.raises(RuntimeError, match="lr 3e-4 seed 1 broke"):
            A.run_grid({"after": tiny.model}, tiny_request, cfg, runners={"relearn": runner})
        assert (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),
                torch.is_deterministic_algorithms_warn_only_enabled()) == (2, *prev[1:])
    finally:
        torch.set_num_threads(prev[0])
    # settings run in grid order, two at a time: (1e-5, 0) and (1e-5, 1) first, ...; the failure
    # of the 8th setting leaves at most one more started beside the running one
    assert len(calls) <= 10 < len(cfg.settings("relearn"))
