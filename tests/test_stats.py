"""Tests for probes/stats.py: every check compares against an independent,
plainly written reference (loops, brute force, explicit refits)."""

import math
import os
import sys

import pytest
import torch

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from probes import stats  # noqa: E402
from probes.stats import (  # noqa: E402
    auc,
    exposure,
    forget_quality,
    linear_cka,
    logistic_fit,
    logistic_loo,
    loo_probe_accuracy,
    min_k_prob,
    privleak,
    ridge_fit,
    ridge_loo,
    ridge_loo_accuracy,
    truth_ratio,
)

F64 = torch.float64


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _probe_data(n, d, seed=0, noise=0.5, pm=False):
    g = _gen(seed)
    x = torch.randn(n, d, generator=g, dtype=F64) + 0.3  # non-zero mean exercises the intercept
    w = torch.randn(d, generator=g, dtype=F64) / math.sqrt(d)
    y = (x @ w + noise * torch.randn(n, generator=g, dtype=F64) > 0.3).to(F64)
    if pm:
        y = 2 * y - 1
    return x, y


# ------------------------------------------------------------------ ridge ---
@pytest.mark.parametrize("n,d", [(40, 8), (30, 60)])  # primal (d < n) and dual (d > n)
@pytest.mark.parametrize("pm", [False, True])
def test_ridge_loo_matches_explicit_refits(n, d, pm):
    x, y = _probe_data(n, d, seed=n + d, pm=pm)
    lam = 0.7
    fast = ridge_loo(x, y, lam)
    slow = torch.empty(n, dtype=F64)
    for i in range(n):
        keep = torch.arange(n) != i
        w, b = ridge_fit(x[keep], y[keep], lam)
        slow[i] = x[i] @ w + b
    assert (fast - slow).abs().max().item() <= 1e-6
    # and accuracy agrees with the refit predictions
    thr = 0.0 if pm else 0.5
    ref_acc = ((slow > thr) == (y > thr)).double().mean().item()
    assert ridge_loo_accuracy(x, y, lam) == pytest.approx(ref_acc)


@pytest.mark.parametrize("n,d", [(25, 5), (12, 30)])
def test_ridge_fit_matches_augmented_normal_equations(n, d):
    # Independent solution: [x, 1] system with penalty diag(lam, ..., lam, 0).
    x, y = _probe_data(n, d, seed=3)
    lam = 0.9
    a = torch.cat([x, torch.ones(n, 1, dtype=F64)], 1)
    pen = torch.full((d + 1,), lam, dtype=F64)
    pen[-1] = 0
    theta = torch.linalg.solve(a.T @ a + torch.diag(pen), a.T @ y)
    w, b = ridge_fit(x, y, lam)
    assert torch.allclose(w, theta[:-1], atol=1e-9)
    assert abs(b.item() - theta[-1].item()) < 1e-9


def test_ridge_label_codings_agree():
    x, y01 = _probe_data(50, 10, seed=5)
    ypm = 2 * y01 - 1
    # free intercept => the {-1,1} fit is an affine map of the {0,1} fit
    assert torch.allclose(ridge_loo(x, ypm, 2.0), 2 * ridge_loo(x, y01, 2.0) - 1, atol=1e-10)
    assert ridge_loo_accuracy(x, y01, 2.0) == ridge_loo_accuracy(x, ypm, 2.0)
    assert loo_probe_accuracy(x, y01, "ridge", 2.0) == ridge_loo_accuracy(x, y01, 2.0)


# --------------------------------------------------------------- logistic ---
def _logistic_refit_loop(x, y, lam):
    n = x.shape[0]
    out = torch.empty(n, dtype=F64)
    for i in range(n):
        keep = torch.arange(n) != i
        w, b = logistic_fit(x[keep], y[keep], lam)
        out[i] = torch.sigmoid(x[i] @ w + b)
    return out


def test_logistic_fit_is_stationary():
    x, y = _probe_data(60, 7, seed=11)
    lam = 0.5
    w, b = logistic_fit(x, y, lam)
    p = torch.sigmoid(x @ w + b)
    assert (x.T @ (p - y) + lam * w).abs().max().item() < 1e-9  # dL/dw = 0
    assert abs((p - y).sum().item()) < 1e-9  # dL/db = 0 (unpenalised)
    # {-1,+1} labels give the same fit
    w2, b2 = logistic_fit(x, 2 * y - 1, lam)
    assert torch.allclose(w, w2) and torch.allclose(b, b2)


@pytest.mark.parametrize("n,d", [(30, 5), (16, 40)])  # d > n exercises the row-space reduction
def test_logistic_exact_loo_matches_refit_loop(n, d):
    x, y = _probe_data(n, d, seed=n * d)
    lam = 1.0
    fast = logistic_loo(x, y, lam, exact=True)
    slow = _logistic_refit_loop(x, y, lam)
    assert (fast - slow).abs().max().item() <= 1e-6


def test_logistic_exact_loo_chunking_is_consistent():
    x, y = _probe_data(20, 6, seed=2)
    full = logistic_loo(x, y, 1.0, exact=True)
    chunked = logistic_loo(x, y, 1.0, exact=True, max_batch_bytes=1)  # one problem per chunk
    assert (full - chunked).abs().max().item() <= 1e-10


def test_logistic_approx_loo_close_to_exact():
    x, y = _probe_data(200, 5, seed=7)
    lam = 1.0
    approx = logistic_loo(x, y, lam)
    exact = logistic_loo(x, y, lam, exact=True)
    diff = (approx - exact).abs().max().item()
    print(f"ALO vs exact LOO max |dp| = {diff:.2e}")
    assert diff < 1e-2
    # the approximation is not the trivial in-sample prediction
    w, b = logistic_fit(x, y, lam)
    insample = torch.sigmoid(x @ w + b)
    assert (insample - exact).abs().max().item() > 10 * diff
    acc = loo_probe_accuracy(x, y, "logistic", lam)
    assert acc == pytest.approx(((exact > 0.5).double() == y).double().mean().item(), abs=0.02)


# -------------------------------------------------------------------- auc ---
def test_auc_extremes():
    pos = torch.tensor([3.0, 4.0, 5.0])
    neg = torch.tensor([0.0, 1.0, 2.0])
    assert auc(pos, neg) == 1.0
    assert auc(neg, pos) == 0.0
    same = torch.tensor([1.0, 1.0, 1.0, 1.0])
    assert auc(same, same[:2]) == 0.5
    s = torch.randn(50, generator=_gen(1))
    assert auc(s, s) == pytest.approx(0.5)


def test_auc_matches_bruteforce_with_ties():
    g = _gen(4)
    pos = torch.randint(0, 15, (137,), generator=g).double() + 0.5  # many ties
    neg = torch.randint(0, 12, (91,), generator=g).double()
    neg[:10] = 3.5
    diff = pos[:, None] - neg[None, :]
    ref = ((diff > 0).double() + 0.5 * (diff == 0).double()).mean().item()
    assert auc(pos, neg) == pytest.approx(ref, abs=1e-12)
    pos2, neg2 = torch.randn(80, generator=g) + 0.5, torch.randn(60, generator=g)
    d2 = pos2[:, None] - neg2[None, :]
    assert auc(pos2, neg2) == pytest.approx((d2 > 0).double().mean().item(), abs=1e-12)


def test_privleak_and_exposure():
    assert privleak(0.6, 0.5) == pytest.approx(0.2)
    assert privleak(0.5, 0.5) == 0.0
    e = exposure(torch.tensor([1, 2, 1024]), 1024)
    assert torch.allclose(e, torch.tensor([10.0, 9.0, 0.0], dtype=F64))
    with pytest.raises(ValueError):
        exposure(torch.tensor([0]), 10)


# ------------------------------------------------------------------ min-k ---
def test_min_k_prob_matches_row_loop():
    g = _gen(9)
    n, t = 12, 23
    lp = -torch.rand(n, t, generator=g, dtype=F64) * 5
    mask = torch.rand(n, t, generator=g) > 0.3
    mask[0] = False
    mask[0, 4] = True  # single masked token
    mask[1] = True
    for k in (0.05, 0.2, 0.3, 0.5, 1.0):
        out = min_k_prob(lp, mask, k)
        for i in range(n):
            vals = sorted(lp[i][mask[i]].tolist())
            m = max(1, math.ceil(round(k * len(vals), 9)))
            assert out[i].item() == pytest.approx(sum(vals[:m]) / m, abs=1e-12)
    # k = 1 is the plain masked mean; empty rows are NaN
    masked_mean = (lp * mask).sum(1) / mask.sum(1)
    assert torch.allclose(min_k_prob(lp, mask, 1.0), masked_mean)
    empty = torch.zeros(1, t, dtype=torch.bool)
    assert torch.isnan(min_k_prob(lp[:1], empty))[0]


# --------------------------------------------------------------- TOFU ---
def test_truth_ratio_formulas():
    true_lp = torch.tensor([-0.5, -2.0], dtype=F64)
    false_lp = torch.tensor([[-1.0, -3.0], [-2.0, -2.0]], dtype=F64)
    geo = truth_ratio(true_lp, false_lp)
    assert torch.allclose(geo, torch.tensor([math.exp(-2.0 + 0.5), 1.0], dtype=F64))
    ari = truth_ratio(true_lp, false_lp, reduction="arithmetic")
    ref0 = (math.exp(-1.0) + math.exp(-3.0)) / 2 / math.exp(-0.5)
    assert torch.allclose(ari, torch.tensor([ref0, 1.0], dtype=F64))
    assert (ari >= geo - 1e-15).all()  # AM >= GM


def test_forget_quality_ks():
    g = _gen(12)
    a = torch.rand(200, generator=g, dtype=F64)
    assert forget_quality(a, a.clone()) == pytest.approx(1.0)
    b = torch.rand(200, generator=g, dtype=F64)
    assert forget_quality(a, b) > 1e-3  # same distribution: not rejected
    assert forget_quality(a, b + 0.5) < 1e-10  # shifted: rejected


# -------------------------------------------------------------------- CKA ---
@pytest.mark.parametrize("n,d", [(100, 10), (20, 64)])  # feature form and Gram form
def test_linear_cka_properties(n, d):
    g = _gen(n + d)
    x = torch.randn(n, d, generator=g, dtype=F64)
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=F64))
    assert linear_cka(x, 3.7 * x @ q) == pytest.approx(1.0, abs=1e-10)
    y = torch.randn(n, 7, generator=g, dtype=F64)
    c = linear_cka(x, y)
    assert 0.0 < c < 0.5 if n > d else 0.0 < c < 1.0 - 1e-3
    # non-isotropic scaling is *not* an invariance
    s = torch.ones(d, dtype=F64)
    s[0] = 50.0
    assert linear_cka(x, x * s) < 0.99
    # symmetric, and both computational forms agree (compare against Gram form directly)
    assert linear_cka(x, y) == pytest.approx(linear_cka(y, x), abs=1e-12)
    xc, yc = x - x.mean(0), y - y.mean(0)
    kx, ky = xc @ xc.T, yc @ yc.T
    ref = ((kx * ky).sum() / (kx.norm() * ky.norm())).item()
    assert c == pytest.approx(ref, abs=1e-12)


def test_balanced_ridge_matches_weighted_normal_equations():
    """Independent reference: the weighted normal equations of [x, 1] with a penalty on w only."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(40, 5, generator=g, dtype=torch.float64)
    y = (torch.rand(40, generator=g) < 0.3).to(torch.float64)
    lam = 0.7
    w, b = stats.balanced_ridge_fit(x, y, lam)
    n1, n0 = y.sum(), 40 - y.sum()
    c = torch.where(y > 0.5, 0.5 / n1, 0.5 / n0)
    a = torch.cat([x, torch.ones(40, 1, dtype=torch.float64)], 1)
    pen = torch.diag(torch.tensor([lam / 40] * 5 + [0.0], dtype=torch.float64))
    sol = torch.linalg.solve(a.T @ (c[:, None] * a) + pen, a.T @ (c * y))
    torch.testing.assert_close(torch.cat([w, b.reshape(1)]), sol, rtol=1e-9, atol=1e-10)


def test_balanced_group_loo_removes_the_below_chance_artifact():
    g = torch.Generator().manual_seed(0)
    n_groups, per = 30, 10
    groups = torch.arange(n_groups).repeat_interleave(per)
    y = (groups < n_groups // 2).to(torch.float64)  # one label per group, balanced
    plain, balanced = [], []
    for seed in range(5):
        x = torch.randn(len(y), 8, generator=g, dtype=torch.float64)  # no signal at all
        plain.append(stats.group_loo_accuracy(x, y, groups, "ridge", lam=10.0))
        balanced.append(stats.balanced_group_loo_accuracy(x, y, groups, lam=10.0))
    assert sum(plain) / 5 < 0.45  # the artifact: plain LOO reads below chance
    assert abs(sum(balanced) / 5 - 0.5) < 0.1  # balanced reads chance
    x = torch.randn(len(y), 8, generator=g, dtype=torch.float64)
    x[:, 0] += 3 * (2 * y - 1)  # a real signal is still found
    assert stats.balanced_group_loo_accuracy(x, y, groups, lam=1.0) > 0.95


def test_group_permutation_null_finds_the_clustered_chance_level():
    """With people-clustered rows and no class signal, the permutation null centres where the real
    labels' reading lands (not at 0.5); a planted class direction reads far above the null."""
    from probes.stats import balanced_group_loo_accuracy, group_permutation_null

    g = torch.Generator().manual_seed(0)
    n_groups, per, d = 24, 6, 20
    centres = torch.randn(n_groups, d, generator=g, dtype=torch.float64) * 3
    groups = torch.arange(n_groups).repeat_interleave(per)
    x = centres[groups] + 0.3 * torch.randn(n_groups * per, d, generator=g, dtype=torch.float64)
    y = (groups % 2).to(torch.float64)
    null = group_permutation_null(x, y, groups, 1.0, n_perm=30, seed=1)
    assert null.shape == (30,)
    real = balanced_group_loo_accuracy(x, y, groups, 1.0)
    assert abs(real - float(null.mean())) < 3 * float(null.std()) + 0.05
    x_sig = x.clone()
    x_sig[:, 0] += 8 * (2 * y - 1)
    assert balanced_group_loo_accuracy(x_sig, y, groups, 1.0) > float(torch.quantile(null, 0.95))
    with pytest.raises(ValueError, match="one class"):
        group_permutation_null(x, y, torch.zeros_like(groups), 1.0, n_perm=2)


def test_batched_group_loo_equals_a_refit_per_group_and_permutation():
    """balanced_group_loo_many (per-group Gram matrices, one batched solve per fold) against the
    plain loop: one balanced_ridge_fit refitted per left-out group, for the true labels and 12
    permutations across groups; groups of unequal sizes, non-contiguous ids, rows shuffled, and
    a batch of one label row at a time (chunking)."""
    from probes.stats import (balanced_group_loo_accuracy, balanced_group_loo_many,
                              group_loo_with_null)

    g = torch.Generator().manual_seed(3)
    sizes = torch.tensor([3, 5, 4, 1, 2, 6, 3, 4, 7, 5, 2, 4])
    gid = torch.repeat_interleave(torch.arange(len(sizes)), sizes)
    order = torch.randperm(len(gid), generator=g)
    groups = (gid * 7 + 2)[order]
    per_group = torch.tensor([1, 0, 1, 1, 0, 0, 1, 0, 1, 0, 0, 1], dtype=torch.float64)
    y = per_group[gid][order]
    x = torch.randn(len(y), 9, generator=g, dtype=torch.float64)
    x[:, 0] += 0.7 * (2 * y - 1)
    perms = torch.stack([y] + [per_group[torch.randperm(len(sizes), generator=g)][gid][order]
                               for _ in range(12)])
    loop = torch.tensor([balanced_group_loo_accuracy(x, t, groups, 2.0) for t in perms],
                        dtype=torch.float64)
    assert 0.6 < loop[0] < 1.0  # a signal, read imperfectly: predictions of both kinds matter
    torch.testing.assert_close(balanced_group_loo_many(x, perms, groups, 2.0), loop, rtol=0,
                               atol=0)
    torch.testing.assert_close(balanced_group_loo_many(x, perms, groups, 2.0, chunk_mb=1e-9),
                               loop, rtol=0, atol=0)
    real, null = group_loo_with_null(x, y, groups, 2.0, n_perm=12, seed=5)
    assert null.shape == (12,)
    with pytest.MonkeyPatch.context() as mp:  # Gram matrices "too large": the loop instead
        mp.setattr(stats, "GROUP_GRAM_MB", 0.0)
        real_loop, null_loop = group_loo_with_null(x, y, groups, 2.0, n_perm=12, seed=5)
    assert real == real_loop == loop[0] and torch.equal(null, null_loop)
    torch.testing.assert_close(balanced_group_loo_many(x, 2 * perms - 1, groups, 2.0), loop,
                               rtol=0, atol=0)  # {-1, +1} labels read as the loop reads them
    with pytest.raises(ValueError, match="labels"):
        balanced_group_loo_many(x, 2 * perms, groups, 2.0)
    mixed = perms.clone()
    row = int((gid[order] == 8).nonzero()[0])  # a row of the group of 7
    mixed[0, row] = 1 - mixed[0, row]  # one row of a group in the other class
    with pytest.raises(ValueError, match="one class"):
        balanced_group_loo_many(x, mixed, groups, 2.0)


def test_batched_solves_survive_threads():
    """A batched LU on the CPU at two threads makes MKL fail or hang (two 151 x 151 identities
    are enough on torch 2.13); stats.solve / stats.inverse run such batches at one thread.
    Run in a subprocess with a timeout, so a hang fails the test instead of stalling it."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import torch
        from probes import stats
        torch.set_num_threads(2)
        g = torch.Generator().manual_seed(0)
        for n in (151, 257):
            a = torch.eye(n, dtype=torch.float64).repeat(3, 1, 1)
            a = a + 0.01 * torch.randn(a.shape, generator=g, dtype=torch.float64)
            b = torch.randn(3, n, 2, generator=g, dtype=torch.float64)
            x = stats.solve(a, b)
            assert torch.allclose(a @ x, b, atol=1e-10), n
            assert torch.allclose(stats.inverse(a) @ a, torch.eye(n, dtype=torch.float64),
                                  atol=1e-10), n
            assert torch.get_num_threads() == 2
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
    assert "DLASWP" not in out.stderr
