"""Pure tensor statistics for unlearning verification.

Everything here is side-effect free and works on torch tensors (any device);
computations that need precision are done in float64 internally.  Functions
returning a scalar summary return a Python ``float``; per-sample statistics are
returned as float64 tensors.

Contents
--------
Membership / leakage
    auc, privleak, min_k_prob, exposure
TOFU
    truth_ratio, forget_quality
Representation similarity
    linear_cka
Leave-one-out (LOO) linear probes
    ridge_fit, ridge_loo, ridge_loo_accuracy,
    logistic_fit, logistic_loo, loo_probe_accuracy
Confidence intervals
    resample_counts, group_bootstrap (paired, resampling groups such as people), Bootstrap

Conventions for the linear probes
---------------------------------
Both probes have an *unpenalised* intercept ``b`` and an L2 penalty on ``w``:

    ridge:     min_{w,b}  sum_i (y_i - x_i.w - b)^2            + lam * ||w||^2
    logistic:  min_{w,b}  sum_i [softplus(z_i) - t_i z_i]      + lam/2 * ||w||^2,
               z_i = x_i.w + b,  t_i in {0, 1}

Labels may be given as {0, 1} or {-1, +1}.  Ridge regresses on the labels as
given (the two codings give affinely-equivalent fits because the intercept is
free, so LOO accuracies agree); logistic maps them to {0, 1}.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from excise.train import using_threads

__all__ = [
    "solve",
    "inverse",
    "auc",
    "min_k_prob",
    "truth_ratio",
    "forget_quality",
    "privleak",
    "exposure",
    "linear_cka",
    "ridge_fit",
    "ridge_loo",
    "ridge_loo_accuracy",
    "logistic_fit",
    "logistic_loo",
    "loo_probe_accuracy",
    "ridge_group_loo",
    "logistic_group_loo",
    "group_loo_accuracy",
    "Bootstrap",
    "resample_counts",
    "group_bootstrap",
]

_F64 = torch.float64


def _lapack_threads(a: Tensor) -> int | None:
    """One thread for a batched solve on the CPU (see :func:`solve`), else None (as set)."""
    return 1 if a.ndim > 2 and a.is_cpu and torch.get_num_threads() > 1 else None


def solve(a: Tensor, b: Tensor) -> Tensor:
    """``torch.linalg.solve(a, b)``, safe for batches on the CPU. A batched LU on the CPU at
    more than one torch thread factors the batch's matrices in parallel, each inside MKL's own
    threads, and MKL then fails ("Parameter 6 was incorrect on entry to DLASWP") or never
    returns (pytorch/pytorch#141358, #142815; torch 2.13: two 151 x 151 identities at two
    threads). Every probe's solve goes through here; batched CPU solves run at one thread."""
    with using_threads(_lapack_threads(a)):
        return torch.linalg.solve(a, b)


def inverse(a: Tensor) -> Tensor:
    """``torch.linalg.inv(a)`` with :func:`solve`'s guard for batches on the CPU."""
    with using_threads(_lapack_threads(a)):
        return torch.linalg.inv(a)


def _f64(x) -> Tensor:
    t = torch.as_tensor(x)
    return t.to(_F64)


# -- Membership inference / leakage ----------------------------------------------------------------
def _average_ranks(s: Tensor) -> Tensor:
    """1-based ranks of ``s`` ([N]) with ties given their average rank. O(N log N)."""
    sorted_s, order = torch.sort(s)  # [N], [N]
    _, inv, counts = torch.unique_consecutive(sorted_s, return_inverse=True, return_counts=True)
    counts = counts.to(_F64)  # [G]
    ends = torch.cumsum(counts, 0)  # [G] 1-based rank of the last element in each tie group
    avg = ends - (counts - 1.0) / 2.0  # [G] average rank of the group
    ranks = torch.empty_like(s)
    ranks[order] = avg[inv]
    return ranks  # [N]


def auc(pos: Tensor, neg: Tensor) -> float:
    """ROC AUC = P(pos > neg) + 0.5 * P(pos == neg), via Mann-Whitney ranks.

    pos: [n_pos] scores of the positive class (for MIA: members / forget set,
         score = -loss so that *higher* means "more likely member").
    neg: [n_neg] scores of the negative class (non-members / holdout).
    O((n_pos + n_neg) log(n_pos + n_neg)).
    """
    pos = _f64(pos).reshape(-1)  # [p]
    neg = _f64(neg).reshape(-1)  # [q]
    n_pos, n_neg = pos.numel(), neg.numel()
    if n_pos == 0 or n_neg == 0:
        raise ValueError("auc needs at least one positive and one negative score")
    s = torch.cat([pos, neg])  # [p + q]
    if torch.isnan(s).any():
        raise ValueError("auc: scores contain NaN")
    ranks = _average_ranks(s)  # [p + q]
    u = ranks[:n_pos].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def privleak(auc_model: float, auc_oracle: float) -> float:
    """MUSE PrivLeak = (AUC_model - AUC_oracle) / AUC_oracle, as a fraction.

    AUCs are forget-vs-holdout MIA AUCs for the unlearned model and for the
    retrained (oracle) model.  ~0 is ideal; > 0 under-unlearning, < 0
    over-unlearning.  MUSE tables report this multiplied by 100 (%).
    """
    if auc_oracle == 0:
        raise ValueError("privleak: auc_oracle must be non-zero")
    return float((auc_model - auc_oracle) / auc_oracle)


def min_k_prob(token_logprobs: Tensor, mask: Tensor, k: float = 0.2) -> Tensor:
    """Min-K% Prob (Shi et al. 2023) per sequence.

    token_logprobs: [n, t] log p(token_j | prefix) for each position.
    mask:           [n, t] bool/0-1, which positions count (e.g. answer tokens,
                    not padding).
    k:              fraction in (0, 1]; each row averages its ceil(k * count)
                    lowest masked log-probs (at least 1).
    Returns [n] float64; NaN for rows with no masked token.  Higher = more
    likely a member.
    """
    if not (0.0 < k <= 1.0):
        raise ValueError("min_k_prob: k must be in (0, 1]")
    lp = _f64(token_logprobs)  # [n, t]
    m = torch.as_tensor(mask, device=lp.device).to(torch.bool)  # [n, t]
    if lp.shape != m.shape or lp.dim() != 2:
        raise ValueError(f"min_k_prob: expected matching [n, t] inputs, got {tuple(lp.shape)} "
                         f"and {tuple(m.shape)}")
    n, t = lp.shape
    count = m.sum(1)  # [n]
    # ceil with a small guard so that e.g. 0.3 * 10 = 3.0000000000000004 -> 3
    kk = torch.ceil(k * count.to(_F64) - 1e-9).clamp(min=1).to(torch.long)  # [n]
    kk = torch.minimum(kk, count.clamp(min=1))
    vals = torch.where(m, lp, torch.full_like(lp, math.inf))  # [n, t]
    vals, _ = torch.sort(vals, dim=1)  # ascending: lowest masked first
    take = torch.arange(t, device=lp.device)[None, :] < kk[:, None]  # [n, t]
    s = torch.where(take, vals, torch.zeros_like(vals)).sum(1)  # [n]
    out = s / kk.to(_F64)  # [n]
    return torch.where(count > 0, out, torch.full_like(out, math.nan))


def exposure(true_rank: Tensor, n_candidates: int) -> Tensor:
    """Canary exposure (Carlini et al. 2019) = log2(n_candidates) - log2(rank).

    true_rank: [...] 1-based rank of the true canary among ``n_candidates``
    candidates (1 = most likely).  Returns float64 of the same shape; maximum
    log2(n_candidates) at rank 1, 0 at rank n_candidates.
    """
    r = _f64(true_rank)
    if n_candidates < 1:
        raise ValueError("exposure: n_candidates must be >= 1")
    if (r < 1).any() or (r > n_candidates).any():
        raise ValueError("exposure: ranks must be in [1, n_candidates]")
    return math.log2(n_candidates) - torch.log2(r)


# -- TOFU ------------------------------------------------------------------------------------------
def truth_ratio(true_logp: Tensor, false_logp: Tensor, reduction: str = "geometric") -> Tensor:
    """TOFU truth ratio R per question.

    true_logp:  [n]    length-normalised log-prob (mean per-token log-prob,
                       i.e. log P(a|q)^(1/|a|)) of the paraphrased/true answer.
    false_logp: [n, m] same for the m perturbed (wrong) answers ([n] = m of 1).

    reduction="geometric" (default):
        R = exp(mean_j false_logp_j - true_logp)
          = (prod_j P(pert_j)^(1/|a_j|))^(1/m) / P(true)^(1/|a|)
        This is what the TOFU reference code computes (it averages the
        perturbed losses before exponentiating).
    reduction="arithmetic":
        R = mean_j exp(false_logp_j) / exp(true_logp)   (the paper's formula).

    Returns [n] float64.  R -> small means the model prefers the true answer.
    (TOFU's code stores the reciprocal; forget_quality is unaffected because
    the KS test is invariant to monotone transforms.)
    """
    t = _f64(true_logp).reshape(-1)  # [n]
    f = _f64(false_logp)
    if f.dim() == 1:
        f = f[:, None]  # [n, 1]
    if f.dim() != 2 or f.shape[0] != t.shape[0]:
        raise ValueError(f"truth_ratio: expected [n] and [n, m], got {tuple(t.shape)} "
                         f"and {tuple(f.shape)}")
    if reduction == "geometric":
        num = f.mean(1)  # [n]
    elif reduction == "arithmetic":
        num = torch.logsumexp(f, 1) - math.log(f.shape[1])  # [n]
    else:
        raise ValueError("truth_ratio: reduction must be 'geometric' or 'arithmetic'")
    return torch.exp(num - t)


def forget_quality(tr_model: Tensor, tr_oracle: Tensor) -> float:
    """TOFU forget quality: p-value of the two-sample KS test between the
    forget-set truth-ratio distributions of the unlearned model ([n1]) and the
    retain-only oracle ([n2]).  High (-> 1) = indistinguishable from oracle."""
    from scipy.stats import ks_2samp

    a = _f64(tr_model).reshape(-1).cpu().numpy()
    b = _f64(tr_oracle).reshape(-1).cpu().numpy()
    return float(ks_2samp(a, b).pvalue)


# -- Representation similarity ---------------------------------------------------------------------
def linear_cka(x: Tensor, y: Tensor) -> float:
    """Linear CKA (Kornblith et al. 2019) between x: [n, d1] and y: [n, d2].

    CKA = ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F * ||Yc^T Yc||_F), columns centered.
    In [0, 1]; 1 for identical inputs; invariant to orthogonal transforms and
    isotropic scaling of either input.  Uses the feature-space or the Gram
    (n x n) form, whichever is cheaper.  NaN if either input is constant.
    """
    x = _f64(x)
    y = _f64(y)
    if x.dim() != 2 or y.dim() != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"linear_cka: expected [n, d1], [n, d2], got {tuple(x.shape)}, "
                         f"{tuple(y.shape)}")
    n, d1 = x.shape
    d2 = y.shape[1]
    xc = x - x.mean(0, keepdim=True)  # [n, d1]
    yc = y - y.mean(0, keepdim=True)  # [n, d2]
    if d1 * d2 + d1 * d1 + d2 * d2 <= n * (d1 + d2):
        hsic_xy = (yc.T @ xc).pow(2).sum()  # ||[d2, d1]||^2
        hsic_xx = (xc.T @ xc).pow(2).sum().sqrt()
        hsic_yy = (yc.T @ yc).pow(2).sum().sqrt()
    else:
        kx = xc @ xc.T  # [n, n]
        ky = yc @ yc.T  # [n, n]
        hsic_xy = (kx * ky).sum()
        hsic_xx = kx.pow(2).sum().sqrt()
        hsic_yy = ky.pow(2).sum().sqrt()
    den = hsic_xx * hsic_yy
    if den == 0:
        return math.nan
    return float(hsic_xy / den)


# -- Label helpers ---------------------------------------------------------------------------------
def _binary_kind(y: Tensor) -> str:
    """'01' for {0,1} labels, 'pm' for {-1,+1}; raises otherwise."""
    vals = torch.unique(y)
    if bool(((vals == 0) | (vals == 1)).all()):
        return "01"
    if bool(((vals == -1) | (vals == 1)).all()):
        return "pm"
    raise ValueError("labels must be in {0, 1} or {-1, +1}")


def _to01(y: Tensor) -> Tensor:
    y = _f64(y).reshape(-1)
    return (y > 0).to(_F64) if _binary_kind(y) == "pm" else y


def _check_xy(x, y) -> tuple[Tensor, Tensor]:
    x = _f64(x)
    y = _f64(y).reshape(-1).to(x.device)
    if x.dim() != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"expected x [n, d] and y [n], got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.shape[0] < 2:
        raise ValueError("need at least 2 samples")
    return x, y


# -- Ridge regression (unpenalised intercept) ------------------------------------------------------
def _centre(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Column means of ``x`` [n, d] and ``y`` [n], and both centred: ``(xm, ym, xc, yc)``."""
    xm, ym = x.mean(0), y.mean()
    return xm, ym, x - xm, y - ym


def ridge_fit(x: Tensor, y: Tensor, lam: float) -> tuple[Tensor, Tensor]:
    """Ridge fit  min ||y - x w - b||^2 + lam ||w||^2  with free intercept.

    x: [n, d], y: [n].  Returns (w [d], b []) in float64.
    Primal (d x d solve) when d <= n, dual/kernel (n x n solve) when d > n;
    the dual needs lam > 0.
    """
    x, y = _check_xy(x, y)
    n, d = x.shape
    xm, ym, xc, yc = _centre(x, y)
    if d <= n:
        g = xc.T @ xc + lam * torch.eye(d, dtype=_F64, device=x.device)  # [d, d]
        w = solve(g, xc.T @ yc)  # [d]
    else:
        if lam <= 0:
            raise ValueError("ridge_fit: lam must be > 0 when d > n")
        k = xc @ xc.T + lam * torch.eye(n, dtype=_F64, device=x.device)  # [n, n]
        alpha = solve(k, yc)  # [n]
        w = xc.T @ alpha  # [d]
    b = ym - xm @ w
    return w, b


def ridge_loo(x: Tensor, y: Tensor, lam: float) -> Tensor:
    """Exact leave-one-out predictions of ``ridge_fit`` in closed form.

    loo_i = prediction at x_i of the ridge fit on all samples except i.
    With A = [x, 1] and penalty P = diag(lam, ..., lam, 0) the fit is the
    linear smoother yhat = H y, H = A (A^T A + P)^-1 A^T, which equals
    H = 11^T/n + xc (xc^T xc + lam I)^-1 xc^T  (xc = column-centered x);
    Sherman-Morrison gives exactly  loo_i = (yhat_i - h_ii y_i) / (1 - h_ii).
    Primal (d x d) when d <= n, dual H_lin = K (K + lam I)^-1 with K = xc xc^T
    when d > n (needs lam > 0).  x: [n, d], y: [n] (any real targets).
    Returns [n] float64.
    """
    x, y = _check_xy(x, y)
    n, d = x.shape
    xm, ym, xc, yc = _centre(x, y)
    if d <= n:
        g = xc.T @ xc + lam * torch.eye(d, dtype=_F64, device=x.device)  # [d, d]
        sol = solve(g, xc.T)  # [d, n] = G^-1 xc^T
        h_lin = (xc * sol.T).sum(1)  # [n] diag(xc G^-1 xc^T)
        yhat = ym + xc @ (sol @ yc)  # [n]
    else:
        if lam <= 0:
            raise ValueError("ridge_loo: lam must be > 0 when d > n")
        k = xc @ xc.T  # [n, n]
        eye = torch.eye(n, dtype=_F64, device=x.device)
        s = solve(k + lam * eye, k)  # [n, n] symmetric
        h_lin = torch.diagonal(s)  # [n]
        yhat = ym + s @ yc  # [n]
    h = h_lin + 1.0 / n  # [n]
    return (yhat - h * y) / (1.0 - h)


def ridge_loo_accuracy(x: Tensor, y: Tensor, lam: float) -> float:
    """LOO accuracy of a ridge probe: threshold 0.5 for {0,1} labels, sign
    (threshold 0) for {-1,+1} labels."""
    x, y = _check_xy(x, y)
    thr = 0.5 if _binary_kind(y) == "01" else 0.0
    loo = ridge_loo(x, y, lam)  # [n]
    return float(((loo > thr) == (y > thr)).to(_F64).mean())


# -- L2-regularised logistic regression (unpenalised intercept) ------------------------------------
def _design(x: Tensor) -> tuple[Tensor, Tensor | None]:
    """Augmented design A = [z, 1] ([n, r+1]) and the basis V ([d, r]) with
    w = V u, or None when z = x.

    For d > n the optimal w of any (sub)problem lies in the row space of x
    (stationarity gives w = -x^T(p - t)/lam), so we reparametrise with
    z = x V, V from the thin SVD of x (r = n): an exact reduction to an
    (n+1)-dimensional problem, valid for every leave-one-out subproblem too.
    """
    n, d = x.shape
    if d > n:
        _, _, vh = torch.linalg.svd(x, full_matrices=False)  # vh [n, d]
        v = vh.T  # [d, n]
        z = x @ v  # [n, n]
    else:
        v = None
        z = x
    ones = torch.ones(n, 1, dtype=_F64, device=x.device)
    return torch.cat([z, ones], 1), v


def _logistic_newton(
    a: Tensor,  # [n, p] design incl. intercept column last
    t: Tensor,  # [n] targets in {0, 1}
    sw: Tensor,  # [B, n] sample weights (0/1 masks for LOO)
    lam: float,
    theta0: Tensor,  # [B, p]
    tol: float = 1e-22,
    max_iter: int = 100,
) -> Tensor:
    """Batched damped Newton for B weighted L2-logistic problems -> [B, p]."""
    n, p = a.shape
    pen = torch.ones(p, dtype=_F64, device=a.device)
    pen[-1] = 0.0  # intercept unpenalised
    lam_diag = torch.diag(lam * pen)  # [p, p]

    def objective(th: Tensor) -> Tensor:  # [B, p] -> [B]
        z = th @ a.T  # [B, n]
        loss = torch.nn.functional.softplus(z) - t * z  # [B, n]
        return (sw * loss).sum(1) + 0.5 * lam * (pen * th * th).sum(1)

    theta = theta0.clone()
    f = objective(theta)  # [B]
    for _ in range(max_iter):
        z = theta @ a.T  # [B, n]
        prob = torch.sigmoid(z)  # [B, n]
        grad = (sw * (prob - t)) @ a + lam * pen * theta  # [B, p]
        wts = sw * prob * (1.0 - prob)  # [B, n]
        hess = (a.T[None] * wts[:, None, :]) @ a + lam_diag  # [B, p, p]
        step = solve(hess, grad[..., None])[..., 0]  # [B, p]
        dec = (grad * step).sum(1)  # [B] Newton decrement^2 (>= 0)
        if float(dec.max()) <= tol:
            theta = theta - step
            break
        # backtracking line search (Armijo), vectorised over the batch
        lr = torch.ones_like(f)  # [B]
        slack = 1e-12 * (1.0 + f.abs())
        accepted = torch.zeros_like(f, dtype=torch.bool)
        new_theta, new_f = theta, f
        for _ls in range(60):
            cand = theta - lr[:, None] * step  # [B, p]
            fc = objective(cand)  # [B]
            ok = (~accepted) & (fc <= f - 1e-4 * lr * dec + slack)
            new_theta = torch.where(ok[:, None], cand, new_theta)
            new_f = torch.where(ok, fc, new_f)
            accepted = accepted | ok
            if bool(accepted.all()):
                break
            lr = torch.where(accepted, lr, lr * 0.5)
        theta, f = new_theta, new_f
    return theta


def logistic_fit(x: Tensor, y: Tensor, lam: float, *, tol: float = 1e-22,
                 max_iter: int = 100) -> tuple[Tensor, Tensor]:
    """L2-regularised logistic regression by damped Newton / IRLS, float64.

    min_{w,b} sum_i [softplus(z_i) - t_i z_i] + lam/2 ||w||^2, z_i = x_i.w + b.
    x: [n, d], y: [n] in {0,1} or {-1,+1}.  Returns (w [d], b []).
    lam > 0 recommended (lam = 0 diverges on separable data).  When d > n the
    problem is solved exactly in the n-dim row space of x.
    """
    x, y = _check_xy(x, y)
    t = _to01(y)
    a, v = _design(x)
    p = a.shape[1]
    theta0 = torch.zeros(1, p, dtype=_F64, device=x.device)
    sw = torch.ones(1, x.shape[0], dtype=_F64, device=x.device)
    theta = _logistic_newton(a, t, sw, lam, theta0, tol=tol, max_iter=max_iter)[0]  # [p]
    u, b = theta[:-1], theta[-1]
    w = u if v is None else v @ u
    return w, b


def logistic_loo(
    x: Tensor,
    y: Tensor,
    lam: float,
    *,
    exact: bool = False,
    tol: float = 1e-22,
    max_iter: int = 100,
    max_batch_bytes: int = 256 * 2**20,
) -> Tensor:
    """Leave-one-out predicted probabilities P(y_i = 1 | fit without i) -> [n].

    exact=False (default): approximate LOO (ALO; Rad & Maleki 2018), i.e. one
        Newton step on the LOO objective from the full fit theta:
            z_{-i} = z_i + (p_i - t_i) * h_i / (1 - w_i h_i),
        h_i = a_i^T H^-1 a_i, w_i = p_i (1 - p_i), H = A^T W A + lam P.
        Cost: one fit + one solve.  Error shrinks as n grows relative to d.
    exact=True: all n leave-one-out problems are refit at once by batched
        Newton (warm-started at theta; [n, p] parameters), processed in chunks
        of at most ``max_batch_bytes`` for the batched Hessian build.
    """
    x, y = _check_xy(x, y)
    t = _to01(y)  # [n]
    n = x.shape[0]
    a, _ = _design(x)  # [n, p]
    p = a.shape[1]
    sw_full = torch.ones(1, n, dtype=_F64, device=x.device)
    theta0 = torch.zeros(1, p, dtype=_F64, device=x.device)
    theta = _logistic_newton(a, t, sw_full, lam, theta0, tol, max_iter)[0]
    z = a @ theta  # [n]
    if not exact:
        prob = torch.sigmoid(z)  # [n]
        wts = prob * (1.0 - prob)  # [n]
        pen = torch.ones(p, dtype=_F64, device=x.device)
        pen[-1] = 0.0
        hess = (a.T * wts) @ a + torch.diag(lam * pen)  # [p, p]
        sol = solve(hess, a.T)  # [p, n]
        h = (a * sol.T).sum(1)  # [n]
        z_loo = z + (prob - t) * h / (1.0 - wts * h)
        return torch.sigmoid(z_loo)
    # exact: batched refits, chunked over the LOO problems
    chunk = max(1, int(max_batch_bytes // (8 * p * max(n, p))))
    out = torch.empty(n, dtype=_F64, device=x.device)
    for s in range(0, n, chunk):
        idx = torch.arange(s, min(s + chunk, n), device=x.device)  # [B]
        sw = torch.ones(idx.numel(), n, dtype=_F64, device=x.device)
        sw[torch.arange(idx.numel(), device=x.device), idx] = 0.0  # drop sample i from problem i
        th = _logistic_newton(a, t, sw, lam, theta.expand(idx.numel(), p), tol, max_iter)  # [B, p]
        out[idx] = (a[idx] * th).sum(1)
    return torch.sigmoid(out)


def loo_probe_accuracy(x: Tensor, y: Tensor, method: str = "ridge", lam: float = 1.0, *,
                       exact: bool = False) -> float:
    """LOO accuracy of a linear probe on (x: [n, d], y: [n] binary labels).

    method="ridge": closed-form exact LOO (``ridge_loo_accuracy``).
    method="logistic": ``logistic_loo`` (approximate unless exact=True),
    predicted class = prob > 0.5.
    """
    if method == "ridge":
        return ridge_loo_accuracy(x, y, lam)
    if method == "logistic":
        x, y = _check_xy(x, y)
        t = _to01(y)
        prob = logistic_loo(x, y, lam, exact=exact)
        return float(((prob > 0.5).to(_F64) == t).to(_F64).mean())
    raise ValueError("method must be 'ridge' or 'logistic'")


# -- Leave-one-group-out ---------------------------------------------------------------------------
# (e.g. leave one *person* out: all of a person's facts share identity features, so leaving one
# sequence out would let the probe recognise the person)
def _group_index(groups) -> list[Tensor]:
    g = torch.as_tensor(groups).reshape(-1)
    return [torch.nonzero(g == u, as_tuple=True)[0] for u in torch.unique(g)]


def ridge_group_loo(x: Tensor, y: Tensor, lam: float, groups) -> Tensor:
    """Exact leave-one-group-out predictions of ``ridge_fit`` in closed form.

    With the hat matrix H of the full fit and residuals e = y - H y, the residuals of the fit
    without group G on G are (I - H_GG)^-1 e_G (block Sherman-Morrison-Woodbury), so
    loo_G = y_G - (I - H_GG)^-1 e_G.  x: [n, d], y: [n], groups: [n] labels.  Returns [n].
    """
    x, y = _check_xy(x, y)
    n, d = x.shape
    if len(torch.as_tensor(groups).reshape(-1)) != n:
        raise ValueError(f"ridge_group_loo: {n} samples but {len(groups)} group labels")
    xc = x - x.mean(0)
    if d <= n:
        g = xc.T @ xc + lam * torch.eye(d, dtype=_F64, device=x.device)
        h = xc @ solve(g, xc.T)  # [n, n]
    else:
        if lam <= 0:
            raise ValueError("ridge_group_loo: lam must be > 0 when d > n")
        k = xc @ xc.T
        h = solve(k + lam * torch.eye(n, dtype=_F64, device=x.device), k)
    h = h + 1.0 / n
    e = y - h @ y
    out = torch.empty(n, dtype=_F64, device=x.device)
    for idx in _group_index(groups):
        hgg = h[idx][:, idx]
        eye = torch.eye(len(idx), dtype=_F64, device=x.device)
        out[idx] = y[idx] - solve(eye - hgg, e[idx])
    return out


def logistic_group_loo(x: Tensor, y: Tensor, lam: float, groups, *, tol: float = 1e-22,
                       max_iter: int = 100) -> Tensor:
    """Leave-one-group-out probabilities of ``logistic_fit`` by exact batched refits (one
    weighted Newton problem per group, warm-started at the full fit). Returns [n]."""
    x, y = _check_xy(x, y)
    t = _to01(y)
    n = x.shape[0]
    a, _ = _design(x)
    p = a.shape[1]
    full = torch.ones(1, n, dtype=_F64, device=x.device)
    theta = _logistic_newton(a, t, full, lam, torch.zeros(1, p, dtype=_F64, device=x.device),
                             tol, max_iter)
    idxs = _group_index(groups)
    sw = torch.ones(len(idxs), n, dtype=_F64, device=x.device)
    for j, idx in enumerate(idxs):
        sw[j, idx] = 0.0
    th = _logistic_newton(a, t, sw, lam, theta.expand(len(idxs), p), tol, max_iter)
    out = torch.empty(n, dtype=_F64, device=x.device)
    for j, idx in enumerate(idxs):
        out[idx] = a[idx] @ th[j]
    return torch.sigmoid(out)


def group_loo_accuracy(x: Tensor, y: Tensor, groups, method: str = "ridge",
                       lam: float = 1.0) -> float:
    """Leave-one-group-out accuracy of a ridge (closed form) or logistic (refits) probe."""
    x, y = _check_xy(x, y)
    t = _to01(y)
    if method == "ridge":
        pred = ridge_group_loo(x, t, lam, groups) > 0.5
    elif method == "logistic":
        pred = logistic_group_loo(x, y, lam, groups) > 0.5
    else:
        raise ValueError("method must be 'ridge' or 'logistic'")
    return float((pred.to(_F64) == t).to(_F64).mean())


def balanced_ridge_fit(x: Tensor, y: Tensor, lam: float) -> tuple[Tensor, Tensor]:
    """Ridge with an unpenalised intercept where each class carries half the total weight:
    minimises ``sum_i c_i (y_i - x_i w - b)^2 + lam |w|^2`` with ``c_i = 1 / (2 n_class(i))``.
    ``y`` in {0, 1}. Returns (w [d], b []) in float64."""
    x, y = _check_xy(x, y)
    t = _to01(y)
    n1 = t.sum()
    n0 = t.numel() - n1
    if n1 < 1 or n0 < 1:
        raise ValueError("balanced_ridge_fit needs both classes in the training rows")
    c = torch.where(t > 0.5, 0.5 / n1, 0.5 / n0)  # [n] weights summing to 1
    xm = c @ x  # weighted means
    tm = c @ t
    xc = x - xm
    g = (xc * c[:, None]).T @ xc + lam / t.numel() * torch.eye(x.shape[1], dtype=_F64,
                                                                device=x.device)
    w = solve(g, (xc * c[:, None]).T @ (t - tm))
    return w, tm - xm @ w


def balanced_group_loo_accuracy(x: Tensor, y: Tensor, groups, lam: float = 1.0) -> float:
    """Leave-one-group-out accuracy of :func:`balanced_ridge_fit`, refitted per group.

    Plain leave-one-out is biased *below* chance when there is no signal: leaving out members of
    one class shifts the fitted intercept towards the other class, so the left-out rows are
    misclassified. Weighting each class to half the training weight removes that shift, so a
    probe with nothing to read scores about chance and below-chance readings disappear."""
    x, y = _check_xy(x, y)
    t = _to01(y)
    g = torch.as_tensor(groups)
    correct = torch.zeros(t.numel(), dtype=_F64)
    for gid in torch.unique(g):  # one small solve per group (people: tens of groups)
        out = g == gid
        w, b = balanced_ridge_fit(x[~out], t[~out], lam)
        correct[out] = ((x[out] @ w + b > 0.5).to(_F64) == t[out]).to(_F64)
    return float(correct.mean())


# the memory (MB) up to which group_loo_with_null batches (about three times the groups' Gram
# matrices: those, a batch of fold matrices, the solve's copy), else it refits per group
GROUP_GRAM_MB = 512.0


def balanced_group_loo_many(x: Tensor, labels: Tensor, groups, lam: float = 1.0,
                            chunk_mb: float = 64.0) -> Tensor:
    """:func:`balanced_group_loo_accuracy` for each row of ``labels`` (``[P, n]`` in {0, 1}: e.g.
    the true labels and permutations of them across groups) on the same ``x`` (``[n, d]``):
    ``[P]``, batched. Every group must hold one class in every row.

    Leaving out group ``g`` (class ``k``) weights the kept rows of class 1 by ``a`` and of class
    0 by ``b`` (half the weight per class), so the fit solves ``(a S1' + b S0' - xm xm' + lam /
    n' I) w = a s1' - xm / 2`` with ``S1'``, ``S0'`` the kept rows' Gram matrices per class,
    ``s1'`` their class-1 sum, ``xm`` their weighted mean and ``n'`` their count; the intercept
    is ``1/2 - xm w``, so a left-out row is called 1 where ``(x - xm) w > 0``. The per-group Gram
    matrices are computed once for every label row and fold (the loop refits each fold from its
    rows); every fold's system is then one batched solve. ``chunk_mb``: label rows per
    batch, by memory. A row exactly on the boundary (``(x - xm) w = 0``, e.g. constant
    features: ``w = 0``) is called 0; the loop decides it by the rounding of its intercept."""
    x, _ = _check_xy(x, torch.zeros(len(x)))  # (the labels are checked below)
    n, d = x.shape
    dev = x.device
    t = torch.as_tensor(labels).to(device=dev, dtype=_F64).reshape(-1, n)
    if ((t == -1) | (t == 1)).all():
        t = (t > 0).to(_F64)  # {-1, +1} labels, as the loop's _to01 reads them
    if not ((t == 0) | (t == 1)).all():
        raise ValueError("balanced_group_loo_many: labels must be in {0, 1} (or {-1, +1})")
    ids, inverse = torch.unique(torch.as_tensor(groups).to(dev), return_inverse=True)
    n_groups = len(ids)
    first = torch.full((n_groups,), n, dtype=torch.long, device=dev).scatter_reduce(
        0, inverse, torch.arange(n, device=dev), "amin")
    lab = t[:, first]  # [P, G]: each group's class per label row
    if not torch.equal(lab[:, inverse], t):
        raise ValueError("balanced_group_loo_many needs every group to hold one class")
    m = torch.bincount(inverse, minlength=n_groups).to(_F64)
    sg = x.new_zeros(n_groups, d).index_add_(0, inverse, x)  # [G, d]
    basis = torch.stack([x[inverse == j].T @ x[inverse == j] for j in range(n_groups)]
                        + [torch.eye(d, dtype=_F64, device=dev)]).reshape(n_groups + 1, d * d)
    per = max(1, int(chunk_mb * 2 ** 20 // (8 * d * d * n_groups)))
    correct = []
    for start in range(0, len(t), per):
        lg = lab[start:start + per]  # [p, G]
        n1 = (lg @ m)[:, None] - lg * m  # [p, G] class-1 rows kept leaving out each group
        n0 = (n - (lg @ m))[:, None] - (1 - lg) * m
        if (n1 < 1).any() or (n0 < 1).any():
            raise ValueError("balanced_group_loo_many: leaving out a group leaves a class with "
                             "no rows")
        a, b = 0.5 / n1, 0.5 / n0
        c = torch.where(lg > 0.5, a, b)  # the left-out class's weight
        s1 = (lg @ sg)[:, None] - lg[..., None] * sg  # [p, G, d] kept class sums
        s0 = (sg.sum(0) - lg @ sg)[:, None] - (1 - lg)[..., None] * sg
        xm = a[..., None] * s1 + b[..., None] * s0
        # each fold's matrix a S1 + b S0 - c S_g + lam' I as one product over the Gram basis
        # [S_1 .. S_G, I] (the groups' Gram matrices): S1 sums the class-1 groups', S0 the rest
        coef = torch.cat([a[..., None] * lg[:, None] + b[..., None] * (1 - lg[:, None])
                          - torch.diag_embed(c), (lam / (n - m)).expand_as(a)[..., None]], -1)
        mat = (coef @ basis).reshape(-1, d, d)  # [p G, d, d]
        mat.baddbmm_(xm.reshape(-1, d, 1), xm.reshape(-1, 1, d), alpha=-1)
        # symmetric: its transpose is the column-major layout LAPACK factors without a copy
        w = solve(mat.mT, (a[..., None] * s1 - 0.5 * xm).reshape(-1, d, 1)).reshape(xm.shape)
        score = ((x[None] - xm[:, inverse]) * w[:, inverse]).sum(-1)  # [p, n]
        correct.append(((score > 0) == (lg[:, inverse] > 0.5)).to(_F64).mean(-1))
    return torch.cat(correct)


def group_permutation_null(x: Tensor, y: Tensor, groups, lam: float = 1.0, n_perm: int = 20,
                           seed: int = 0) -> Tensor:
    """Accuracies of :func:`balanced_group_loo_accuracy` with the class labels shuffled across
    groups (each group keeps one label; the class sizes in groups are kept): ``[n_perm]``.

    This is the chance level of the leave-one-group-out protocol itself. When the rows of a
    group cluster together (a person's facts share the name), a probe with nothing to read does
    not score 0.5 but scatters around a level set by the clustering; the permutation null measures
    that level on the same activations, so "accuracy above chance" means above this null."""
    return group_loo_with_null(x, y, groups, lam, n_perm, seed)[1]


def group_loo_with_null(x: Tensor, y: Tensor, groups, lam: float = 1.0, n_perm: int = 20,
                        seed: int = 0) -> tuple[float, Tensor]:
    """:func:`balanced_group_loo_accuracy` of the labels and :func:`group_permutation_null`'s
    ``[n_perm]`` accuracies, in one batch (:func:`balanced_group_loo_many`) where it fits in
    :data:`GROUP_GRAM_MB` (people: tens of groups), else refitted per group (the loop)."""
    x, y = _check_xy(x, y)
    t = _to01(y)
    g = torch.as_tensor(groups)
    ids, inverse = torch.unique(g, return_inverse=True)
    label = torch.zeros(len(ids), dtype=_F64)
    label[inverse] = t
    if not torch.equal(label[inverse], t):
        raise ValueError("group_permutation_null needs every group to hold one class")
    gen = torch.Generator().manual_seed(seed)
    rows = [t] + [label[torch.randperm(len(ids), generator=gen)][inverse] for _ in range(n_perm)]
    if 3 * len(ids) * x.shape[1] ** 2 * 8 > GROUP_GRAM_MB * 2 ** 20:  # would not fit (the
        # groups' Gram matrices, a batch of fold matrices as large, the solve's copy)
        acc = torch.tensor([balanced_group_loo_accuracy(x, r, g, lam) for r in rows],
                           dtype=_F64)
    else:
        acc = balanced_group_loo_many(x, torch.stack(rows), g, lam)
    return float(acc[0]), acc[1:]


# -- Paired bootstrap over groups (people) ---------------------------------------------------------
@dataclass(frozen=True)
class Bootstrap:
    """A statistic on the data (``estimate``) and on ``n_boot`` resamples of its groups
    (``samples``, float64 ``[n_boot]``). Bounds are quantiles of the samples (percentile
    bootstrap, linear interpolation as ``torch.quantile``)."""

    estimate: float
    samples: Tensor
    n_groups: int

    def upper(self, level: float = 0.9) -> float:
        """Upper end of the one-sided ``level`` interval: the ``level`` quantile."""
        return float(torch.quantile(self.samples, _level(level)))

    def lower(self, level: float = 0.9) -> float:
        """Lower end of the one-sided ``level`` interval: the ``1 - level`` quantile."""
        return float(torch.quantile(self.samples, 1.0 - _level(level)))


def _level(level: float) -> float:
    if not 0.5 <= level < 1:
        raise ValueError(f"confidence level {level!r}: must be in [0.5, 1)")
    return float(level)


def resample_counts(n_groups: int, n_boot: int, seed: int = 0) -> Tensor:
    """How often each of ``n_groups`` groups is drawn in each of ``n_boot`` resamples with
    replacement (``n_groups`` draws each): float64 ``[n_boot, n_groups]``, rows summing to
    ``n_groups``. Resample ``r`` draws the groups ``torch.randint(n_groups, (n_boot, n_groups),
    generator=torch.Generator().manual_seed(seed))[r]``."""
    if n_groups < 1 or n_boot < 1:
        raise ValueError(f"resample_counts: need n_groups >= 1 and n_boot >= 1, got "
                         f"{n_groups} and {n_boot}")
    idx = torch.randint(n_groups, (n_boot, n_groups),
                        generator=torch.Generator().manual_seed(seed))  # [R, P]
    counts = torch.zeros(n_boot, n_groups, dtype=_F64)
    return counts.scatter_add_(1, idx, torch.ones(n_boot, n_groups, dtype=_F64))


def group_bootstrap(a, b, groups: Sequence, rows=None, *, scale: float = 1.0,
                    n_boot: int = 2000, seed: int = 0) -> Bootstrap:
    """Paired bootstrap over groups of ``max over rows [mean(a) - scale * mean(b)]``.

    ``a``, ``b``: per-item values ``[n]`` (e.g. 0/1 correctness of each fact on two models -
    the same facts on both: paired); ``b=None`` reads as zeros. ``groups``: the group of each
    item (hashable labels, e.g. the person a fact is about); resampling draws whole groups with
    replacement, every resample the same for ``a`` and ``b``. ``rows``: an optional row label per
    item (e.g. the budget of an attack curve the fact was measured at); the means are taken per
    row over that row's items, and the statistic is the largest row's difference (rows holding
    no drawn item are skipped). Without ``rows`` every item is one row: a difference of means.

    Vectorised: items are summed per (group, row) once, then every resample is a matrix product
    of its group counts (:func:`resample_counts`) with those sums - no loop over resamples."""
    a = _f64(a).reshape(-1)
    b = torch.zeros_like(a) if b is None else _f64(b).reshape(-1)
    n = a.numel()
    labels = list(groups)
    if n == 0 or b.numel() != n or len(labels) != n:
        raise ValueError(f"group_bootstrap: need matching non-empty a, b and groups, got "
                         f"{n}, {b.numel()} and {len(labels)} items")
    row_labels = [0] * n if rows is None else list(rows)
    if len(row_labels) != n:
        raise ValueError(f"group_bootstrap: {n} items but {len(row_labels)} row labels")
    gid = {g: i for i, g in enumerate(dict.fromkeys(labels))}
    rid = {r: i for i, r in enumerate(dict.fromkeys(row_labels))}
    gi = torch.tensor([gid[g] for g in labels])
    ri = torch.tensor([rid[r] for r in row_labels])
    P, B = len(gid), len(rid)
    flat = gi * B + ri
    d = a - scale * b  # the means are linear: mean(a) - s mean(b) = mean(a - s b) per row

    def per_cell(v: Tensor) -> Tensor:  # [P, B] sums over the items of each (group, row)
        return torch.zeros(P * B, dtype=_F64).index_add_(0, flat, v).reshape(P, B)

    s_d, s_n = per_cell(d), per_cell(torch.ones(n, dtype=_F64))

    def stat(w: Tensor) -> Tensor:  # w [R, P] group weights -> [R]
        num, den = w @ s_d, w @ s_n  # [R, B]
        mean = torch.where(den > 0, num / den.clamp(min=1e-300),
                           torch.full_like(num, -math.inf))
        return mean.amax(1)

    est = float(stat(torch.ones(1, P, dtype=_F64))[0])
    return Bootstrap(est, stat(resample_counts(P, n_boot, seed)), P)
