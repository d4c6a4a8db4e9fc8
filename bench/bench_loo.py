"""Closed-form vs explicit-refit leave-one-out timing for the linear probes.

    python bench/bench_loo.py [--n 200] [--d 256] [--lam 1.0] [--repeats 5]

Prints median wall time of closed-form ridge LOO (probes.stats.ridge_loo,
dual form since d > n) vs n explicit ridge refits (ridge_fit on n-1 rows in
a Python loop), their max abs disagreement and the speed ratio; then the
same for logistic LOO (approximate one-Newton-step, batched exact, loop); then the
``loo_probe`` suite's leave-one-person-out balanced probe with its permutation null at the
suite's shapes on ``small`` (``--groups``: 10 forget people x 15 facts, 20 holdout people with
3-12 facts, d 256, the true labels + 20 permutations): batched
(``probes.stats.balanced_group_loo_many``) vs one ``balanced_ridge_fit`` refitted per person and
label row in a Python loop (``balanced_group_loo_accuracy``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from probes.stats import (balanced_group_loo_accuracy, balanced_group_loo_many,  # noqa: E402
                          logistic_fit, logistic_loo, ridge_fit, ridge_loo)


def _median_time(fn, repeats: int):
    fn()  # warm-up
    ts = []
    out = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), out


def _refit_loop(fit, x, y, lam, link=lambda z: z):
    n = x.shape[0]
    out = torch.empty(n, dtype=torch.float64)
    for i in range(n):
        keep = torch.arange(n) != i
        w, b = fit(x[keep], y[keep], lam)
        out[i] = link(x[i].double() @ w + b)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--lam", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-logistic", action="store_true")
    ap.add_argument("--groups", action="store_true", help="only the grouped probe + null")
    args = ap.parse_args()
    if args.groups:
        return grouped(args.d, args.repeats)

    g = torch.Generator().manual_seed(0)
    n, d, lam = args.n, args.d, args.lam
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    w_true = torch.randn(d, generator=g, dtype=torch.float64) / d**0.5
    y = (x @ w_true + 0.5 * torch.randn(n, generator=g, dtype=torch.float64) > 0).double()
    print(f"n={n} d={d} lam={lam} torch={torch.__version__} "
          f"threads={torch.get_num_threads()} repeats={args.repeats}")

    t_cf, loo_cf = _median_time(lambda: ridge_loo(x, y, lam), args.repeats)
    half = max(1, args.repeats // 2)
    t_rf, loo_rf = _median_time(lambda: _refit_loop(ridge_fit, x, y, lam), half)
    print(f"ridge closed-form LOO : {t_cf * 1e3:9.2f} ms")
    print(f"ridge {n} refits      : {t_rf * 1e3:9.2f} ms")
    diff = (loo_cf - loo_rf).abs().max().item()
    print(f"ridge speed ratio     : {t_rf / t_cf:9.1f}x   max|diff| = {diff:.2e}")

    if args.no_logistic:
        return
    t_alo, p_alo = _median_time(lambda: logistic_loo(x, y, lam), args.repeats)
    t_ex, p_ex = _median_time(lambda: logistic_loo(x, y, lam, exact=True), half)
    t_lp, p_lp = _median_time(lambda: _refit_loop(logistic_fit, x, y, lam, torch.sigmoid), 1)
    d_alo = (p_alo - p_ex).abs().max().item()
    d_ex = (p_ex - p_lp).abs().max().item()
    print(f"logistic approx LOO   : {t_alo * 1e3:9.2f} ms   max|p - exact| = {d_alo:.2e}")
    print(f"logistic batched exact: {t_ex * 1e3:9.2f} ms   max|p - loop|  = {d_ex:.2e}")
    print(f"logistic {n} refits   : {t_lp * 1e3:9.2f} ms")
    print(f"logistic ratios       : loop/approx {t_lp / t_alo:.1f}x, "
          f"loop/batched {t_lp / t_ex:.1f}x")


def grouped(d: int, repeats: int, n_perm: int = 20, lam: float = 10.0) -> None:
    g = torch.Generator().manual_seed(0)
    sizes = torch.cat([torch.full((10,), 15), torch.randint(3, 13, (20,), generator=g)])
    groups = torch.repeat_interleave(torch.arange(len(sizes)), sizes)
    label = (torch.arange(len(sizes)) < 10).double()
    x = torch.randn(len(groups), d, generator=g, dtype=torch.float64)
    x += 0.3 * torch.randn(len(sizes), d, generator=g, dtype=torch.float64)[groups]  # people
    rows = torch.stack([label[groups]] + [label[torch.randperm(len(sizes), generator=g)][groups]
                                          for _ in range(n_perm)])
    print(f"grouped: n={len(groups)} people={len(sizes)} d={d} label rows={len(rows)} "
          f"threads={torch.get_num_threads()} repeats={repeats}")
    t_b, acc_b = _median_time(lambda: balanced_group_loo_many(x, rows, groups, lam), repeats)
    t_l, acc_l = _median_time(lambda: torch.tensor(
        [balanced_group_loo_accuracy(x, t, groups, lam) for t in rows], dtype=torch.float64),
        max(1, repeats // 2))
    print(f"grouped batched       : {t_b * 1e3:9.2f} ms")
    print(f"grouped per-person fits: {t_l * 1e3:9.2f} ms")
    print(f"grouped speed ratio   : {t_l / t_b:9.1f}x   max|diff| = "
          f"{(acc_b - acc_l).abs().max().item():.2e}")


if __name__ == "__main__":
    main()
