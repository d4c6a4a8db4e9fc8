"""excise.train: the one training loop and the batch sampler, against plain hand-written loops;
Batch.trim; the hook-kind registry (duplicates refused)."""

from __future__ import annotations

import pytest
import torch

from excise.edits import HOOK_KINDS, HookSpec, register_hook_kind
from excise.handle import Batch
from excise.train import Optim, Sampler, TrainResult, train, using_threads


def _problem(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(40, 5, generator=g)
    y = x @ torch.randn(5, 3, generator=g) + 0.1 * torch.randn(40, 3, generator=g)
    W = torch.randn(5, 3, generator=g)
    b = torch.zeros(3)
    return x, y, W, b


def _loss(x, y, W, b, rows):
    return ((x[rows] @ W + b - y[rows]) ** 2).mean()


def test_train_equals_a_plain_loop():
    """AdamW + schedule + mask + clipping + epoch batches: bit-identical to the loop written
    out by hand in the documented order (zero_grad, backward, mask, clip, step, schedule)."""
    x, y, W0, b0 = _problem()
    mask = torch.rand(5, 3, generator=torch.Generator().manual_seed(1)) > 0.5
    sched = lambda s: min(1.0, (s + 1) / 3) * max(0.05, 1 - s / 25)  # noqa: E731

    # reference
    W, b = W0.clone().requires_grad_(True), b0.clone().requires_grad_(True)
    gen = torch.Generator().manual_seed(7)
    opt = torch.optim.AdamW([W, b], lr=0.05, betas=(0.9, 0.98), weight_decay=0.01)
    lr = torch.optim.lr_scheduler.LambdaLR(opt, sched)
    perm, pos, ref_losses = torch.randperm(40, generator=gen), 0, []
    for _ in range(25):
        if pos + 16 > 40:
            perm, pos = torch.randperm(40, generator=gen), 0
        rows = perm[pos:pos + 16]
        pos += 16
        loss = _loss(x, y, W, b, rows)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        W.grad.mul_(mask)
        torch.nn.utils.clip_grad_norm_([W, b], 0.5)
        opt.step()
        lr.step()
        ref_losses.append(float(loss.detach()))

    # the loop
    W2, b2 = W0.clone().requires_grad_(True), b0.clone().requires_grad_(True)
    batches = Sampler(7).epochs(40, 16)
    res = train(lambda _: _loss(x, y, W2, b2, next(batches)), {"W": W2, "b": b2}, steps=25,
                optim=Optim("adamw", lr=0.05, betas=(0.9, 0.98), weight_decay=0.01),
                schedule=sched, masks={"W": mask}, max_grad_norm=0.5)
    assert torch.equal(W, W2) and torch.equal(b, b2)
    assert list(res.losses) == ref_losses and res.steps == 25 and not res.stopped_early
    assert len(res.seconds) == 25 and all(t >= 0 for t in res.seconds)


def test_gradients_reach_the_trained_tensors_only():
    """Training ``W`` of a loss that also depends on ``V`` (which requires grad, like a user's
    model weights under a trained mask) leaves ``V`` and its ``.grad`` untouched, and ``W``
    ends bit-identical to a plain ``backward()`` loop (mask and clipping in place)."""
    x, y, W0, _ = _problem(3)
    V = torch.randn(5, 3, generator=torch.Generator().manual_seed(4)).requires_grad_(True)
    V0 = V.detach().clone()
    mask = torch.rand(5, 3, generator=torch.Generator().manual_seed(5)) > 0.3

    def loss_of(W):
        return ((x @ (W + V) - y) ** 2).mean() + (W ** 2).sum() * 1e-2 + W.sum()

    W = W0.clone().requires_grad_(True)
    opt = torch.optim.Adam([W], lr=0.05)
    for _ in range(8):
        loss = loss_of(W)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        W.grad.mul_(mask)
        torch.nn.utils.clip_grad_norm_([W], 0.3)
        opt.step()
    V.grad = None

    W2 = W0.clone().requires_grad_(True)
    train(lambda _: loss_of(W2), {"W": W2}, steps=8, optim=Optim("adam", lr=0.05),
          masks={"W": mask}, max_grad_norm=0.3)
    assert torch.equal(W, W2)
    assert V.grad is None and torch.equal(V.detach(), V0)


def test_two_trained_tensors_sharing_one_incoming_gradient_keep_their_own():
    """``(W1 + W2)`` hands both tensors the same incoming gradient; masking ``W1``'s in place
    must not mask ``W2``'s (each trained tensor owns its gradient), and an unused trained
    tensor stays as it was."""
    W1 = torch.ones(2, 3, requires_grad=True)
    W2 = torch.ones(2, 3, requires_grad=True)
    unused = torch.ones(4, requires_grad=True)
    train(lambda _: ((W1 + W2) * torch.arange(6.).reshape(2, 3)).sum(),
          {"W1": W1, "W2": W2, "unused": unused}, steps=1, optim=Optim("sgd", lr=0.1),
          masks={"W1": torch.zeros(2, 3)})
    assert torch.equal(W1.detach(), torch.ones(2, 3))
    assert torch.allclose(W2.detach(), 1 - 0.1 * torch.arange(6.).reshape(2, 3))
    assert torch.equal(unused.detach(), torch.ones(4)) and unused.grad is None


@pytest.mark.parametrize("start", [(False, False), (True, True), (True, False)])
def test_deterministic_restores_the_callers_setting(start):
    """Inside: deterministic algorithms on (warn-only unless the caller had them strict) and
    uninitialised memory not filled; after: the caller's three settings exactly, also when
    the body raises."""
    import torch.utils.deterministic as det

    from excise.train import deterministic

    prev = (torch.are_deterministic_algorithms_enabled(),
            torch.is_deterministic_algorithms_warn_only_enabled(), det.fill_uninitialized_memory)
    try:
        torch.use_deterministic_algorithms(start[0], warn_only=start[1])
        before = (torch.are_deterministic_algorithms_enabled(),
                  torch.is_deterministic_algorithms_warn_only_enabled(),
                  det.fill_uninitialized_memory)
        with pytest.raises(RuntimeError, match="inside"):
            with deterministic():
                assert torch.are_deterministic_algorithms_enabled()
                if start == (True, False):
                    assert not torch.is_deterministic_algorithms_warn_only_enabled()
                raise RuntimeError("inside")
        assert (torch.are_deterministic_algorithms_enabled(),
                torch.is_deterministic_algorithms_warn_only_enabled(),
                det.fill_uninitialized_memory) == before
    finally:
        torch.use_deterministic_algorithms(prev[0], warn_only=prev[1])
        det.fill_uninitialized_memory = prev[2]


def test_same_seed_same_weights_at_two_threads(tiny, tiny_request):
    """Training every weight of a transformer (the embedding's backward is an indexed add) at
    two threads twice from the same start gives bit-identical weights, and the caller's
    deterministic-algorithms setting is restored afterwards. Without deterministic algorithms
    the embedding came out 1.5e-8 apart after one step."""
    batch = tiny.model.encode(list(tiny_request.retain)[:64])

    def run():
        m = tiny.model.clone()
        params = m.named_parameters()
        for p in params.values():
            p.requires_grad_(True)
        sampler = Sampler(0)
        with using_threads(2):
            train(lambda _: m.loss(batch[sampler.rows(len(batch), 32)]), params, steps=3,
                  optim=Optim("adam", lr=1e-3))
        return {n: p.detach().clone() for n, p in params.items()}

    before = torch.are_deterministic_algorithms_enabled()
    a, b = run(), run()
    assert torch.are_deterministic_algorithms_enabled() == before
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not torch.equal(a["embed.W_E"], tiny.model.named_parameters()["embed.W_E"])


def test_masked_elements_stay_bit_identical_under_adam():
    x, y, W0, b0 = _problem(2)
    W = W0.clone().requires_grad_(True)
    mask = torch.zeros(5, 3, dtype=torch.bool)
    mask[1, 2] = mask[4, 0] = True
    train(lambda _: _loss(x, y, W, b0, torch.arange(40)), {"W": W}, steps=10,
          optim=Optim("adam", lr=0.1), masks={"W": mask})
    assert torch.equal(W.detach()[~mask], W0[~mask])
    assert not torch.equal(W.detach()[mask], W0[mask])


@pytest.mark.parametrize("name", ["adam", "sgd"])
def test_optimizers_equal_torch(name):
    x, y, W0, b0 = _problem(3)
    W = W0.clone().requires_grad_(True)
    opt = torch.optim.Adam([W], lr=0.01) if name == "adam" else torch.optim.SGD([W], lr=0.01)
    for _ in range(5):
        loss = _loss(x, y, W, b0, torch.arange(40))
        opt.zero_grad()
        loss.backward()
        opt.step()
    W2 = W0.clone().requires_grad_(True)
    train(lambda _: _loss(x, y, W2, b0, torch.arange(40)), [W2], steps=5, optim=Optim(name, 0.01))
    assert torch.equal(W, W2)


@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_fused_optimizer_equals_torchs_fused_kernel_and_follows_the_loop(name):
    """``Optim(fused=True)`` is torch's fused kernel, bit for bit; the loop takes the same steps
    up to float rounding. Refused for other optimizers and non-bool values."""
    x, y, W0, b0 = _problem(7)
    cls = torch.optim.Adam if name == "adam" else torch.optim.AdamW
    W = W0.clone().requires_grad_(True)
    opt = cls([W], lr=0.01, weight_decay=0.1, fused=True)
    for _ in range(5):
        loss = _loss(x, y, W, b0, torch.arange(40))
        opt.zero_grad()
        loss.backward()
        opt.step()
    got = {}
    for fused in (True, False):
        W2 = W0.clone().requires_grad_(True)
        train(lambda _: _loss(x, y, W2, b0, torch.arange(40)), [W2], steps=5,
              optim=Optim(name, 0.01, weight_decay=0.1, fused=fused))
        got[fused] = W2.detach()
    assert Optim(name, fused=True).build([W]).defaults["fused"] is True
    assert not Optim(name).build([W]).defaults["fused"]
    assert torch.equal(W.detach(), got[True])
    assert torch.allclose(got[True], got[False], atol=1e-6) and not torch.equal(got[True], W0)
    for bad in (dict(name="sgd", fused=True), dict(name="lbfgs", fused=True),
                dict(name="adam", fused=1)):
        with pytest.raises(ValueError, match="fused="):
            Optim(**bad)


def test_lbfgs_equals_a_closure_step():
    x, y, W0, b0 = _problem(4)
    W = W0.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([W], max_iter=30, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = _loss(x, y, W, b0, torch.arange(40))
        loss.backward()
        return loss

    opt.step(closure)
    W2 = W0.clone().requires_grad_(True)
    res = train(lambda _: _loss(x, y, W2, b0, torch.arange(40)), [W2], steps=1,
                optim=Optim("lbfgs", lr=1.0, max_iter=30, line_search="strong_wolfe"))
    assert torch.equal(W, W2) and res.steps == 1


def test_eval_callback_every_k_after_the_last_and_early_stop():
    x, y, W0, b0 = _problem(5)
    W = W0.clone().requires_grad_(True)
    seen = []

    def evaluate(done):
        seen.append((done, torch.is_grad_enabled()))

    train(lambda _: _loss(x, y, W, b0, torch.arange(40)), [W], steps=12, evaluate=evaluate,
          eval_every=5)
    assert seen == [(5, False), (10, False), (12, False)]
    res = train(lambda _: _loss(x, y, W, b0, torch.arange(40)), [W], steps=12,
                evaluate=lambda done: done >= 10, eval_every=5)
    assert res.steps == 10 and res.stopped_early
    res = train(lambda _: _loss(x, y, W, b0, torch.arange(40)), [W], steps=10,
                evaluate=lambda done: done >= 10, eval_every=5)
    assert res.steps == 10 and not res.stopped_early  # stopping at the last step is not early
    assert isinstance(res, TrainResult)


def test_train_runs_with_grad_even_inside_no_grad():
    x, y, W0, b0 = _problem(6)
    W = W0.clone().requires_grad_(True)
    with torch.no_grad():
        train(lambda _: _loss(x, y, W, b0, torch.arange(40)), [W], steps=2)
    assert not torch.equal(W.detach(), W0)


def test_train_refuses_bad_settings():
    W = torch.zeros(3, requires_grad=True)
    frozen = torch.zeros(3)
    loss = lambda _: (W ** 2).sum()  # noqa: E731
    with pytest.raises(ValueError, match="unknown optimizer 'adagrad'.*adamw"):
        Optim("adagrad")
    with pytest.raises(ValueError, match="lr=0"):
        Optim("adam", lr=0)
    with pytest.raises(ValueError, match="lbfgs.*weight_decay"):
        Optim("lbfgs", weight_decay=0.1)
    with pytest.raises(ValueError, match="line_search='wolfe'"):
        Optim("lbfgs", line_search="wolfe")
    with pytest.raises(ValueError, match="'1' does not require grad"):
        train(loss, [W, frozen], steps=1)
    with pytest.raises(ValueError, match="steps=0"):
        train(loss, [W], steps=0)
    with pytest.raises(ValueError, match="no parameters"):
        train(loss, [], steps=1)
    with pytest.raises(ValueError, match="eval_every=None"):
        train(loss, [W], steps=1, evaluate=lambda d: None)
    with pytest.raises(ValueError, match=r"mask for 'W' has shape \(2,\)"):
        train(loss, {"W": W}, steps=1, masks={"W": torch.ones(2, dtype=torch.bool)})
    with pytest.raises(ValueError, match="'V', which is not among"):
        train(loss, {"W": W}, steps=1, masks={"V": torch.ones(3, dtype=torch.bool)})
    with pytest.raises(ValueError, match="max_grad_norm=0"):
        train(loss, [W], steps=1, max_grad_norm=0)


# -- the sampler -------------------------------------------------------------------------------
def test_sampler_draws_like_plain_generator_calls():
    s = Sampler(3)
    g = torch.Generator().manual_seed(3)
    assert torch.equal(s.rows(10, 4), torch.randperm(10, generator=g)[:4])
    assert torch.equal(s.with_replacement(10, 6), torch.randint(0, 10, (6,), generator=g))
    # mixed: training rows, then mix rows numbered after them, ratio x as many
    rows = s.mixed(6, 20, 4, 0.5)
    ref = torch.cat([torch.randperm(6, generator=g)[:4], 6 + torch.randperm(20, generator=g)[:2]])
    assert torch.equal(rows, ref)
    # no training rows: a full batch of mix rows
    assert torch.equal(s.mixed(0, 20, 5, 1.0), torch.randperm(20, generator=g)[:5])
    with pytest.raises(ValueError, match="empty batch"):
        s.mixed(0, 0, 5, 1.0)


def test_sampler_epochs_cover_each_row_once_per_epoch():
    it = Sampler(0).epochs(10, 3)
    first = torch.cat([next(it) for _ in range(3)])  # 9 rows of the first epoch, 1 skipped
    assert len(set(first.tolist())) == 9
    nxt = next(it)  # a new permutation: the 10th row would overrun a batch of 3
    g = torch.Generator().manual_seed(0)
    torch.randperm(10, generator=g)
    assert torch.equal(nxt, torch.randperm(10, generator=g)[:3])
    big = Sampler(0).epochs(4, 10)
    assert sorted(next(big).tolist()) == [0, 1, 2, 3]


def test_batch_trim_cuts_padding_only():
    b = Batch(torch.arange(20).view(4, 5), torch.ones(4, 5, dtype=torch.bool),
              torch.zeros(4, 5, dtype=torch.bool), torch.tensor([2, 3, 1, 3]))
    t = b.trim()
    assert t.tokens.shape == (4, 3) and torch.equal(t.tokens, b.tokens[:, :3])
    assert torch.equal(t.lengths, b.lengths)
    assert [c.tokens.shape[1] for c in b.chunks(2)] == [3, 3]


# -- hook kinds --------------------------------------------------------------------------------
def test_hook_kind_registry_refuses_duplicates():
    assert {"rank_one", "sae_latents"} <= set(HOOK_KINDS)
    with pytest.raises(ValueError, match="'rank_one' is already registered"):
        register_hook_kind("rank_one")(lambda site, params, tensors: None)
    name = "test-double-only"
    try:
        def factory(site, params, tensors):
            return lambda x, s: 2 * x

        register_hook_kind(name)(factory)
        register_hook_kind(name)(factory)  # the same factory again (a re-run cell) is fine
        assert HookSpec(name, "blocks.0.mlp.out").build()(torch.ones(2), "").tolist() == [2, 2]
        with pytest.raises(ValueError, match=f"'{name}' is already registered"):
            register_hook_kind(name)(lambda site, params, tensors: None)
    finally:
        HOOK_KINDS.pop(name, None)
    with pytest.raises(ValueError, match="non-empty string"):
        register_hook_kind("")


def test_using_threads_sets_and_restores_the_count():
    before = torch.get_num_threads()
    with using_threads(1) as n:
        assert n == 1 and torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with using_threads(None) as n:  # the process's own setting, untouched
        assert n == before
    with pytest.raises(RuntimeError), using_threads(1):
        raise RuntimeError("inside")
    assert torch.get_num_threads() == before  # restored after an error too
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="threads="):
            with using_threads(bad):
                pass
