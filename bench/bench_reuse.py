"""Verifying a second recipe on the same request: attack results read back from the store
(``probes.store.AttackStore``) against attacking every model anew, on the `small` organism.

    EXCISE_CACHE=... python bench/bench_reuse.py [--forget 10] [--alpha 5 3] [--grid quick]

Two recipes (SSD dampening on grad_ratio importance at two alphas, configs/dampen.yaml's) edit
copies of the organism. The second recipe's edited model is verified with the full suite
(``suite="all"``, the oracle and the original beside it) twice: once with no cache (every model
attacked), once with a store that the first recipe's verification filled (a fresh folder, as a
later ``excise run`` finds it): only the edited model is attacked. Prints both times, the ratio,
and whether every metric and every attack grid agree. Both are excise's own code paths; no
reference implementation is involved. Needs the organism and the oracle in the cache (trains
them otherwise: minutes).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--forget", type=int, default=10)
    ap.add_argument("--alpha", type=float, nargs=2, default=[5.0, 3.0])
    ap.add_argument("--grid", default="quick")
    a = ap.parse_args()

    import torch

    import excise
    import probes
    from edit import dampen
    from locate import grad_ratio
    from probes.store import AttackStore

    org = excise.organism("small", progress=False)
    req = org.request(forget_people=range(a.forget))
    oracle = org.oracle(req)
    imp = grad_ratio(org.model, req)

    def edited(alpha: float):
        m = org.model.clone()
        dampen(m, imp, alpha=alpha, lam=1.0)
        return m

    def verify(model, cache):
        t = time.perf_counter()
        rep = probes.verify(model, req, oracle=oracle, original=org.model, suite="all",
                            label="after", grid=a.grid, cache=cache)
        return rep, time.perf_counter() - t

    first, second = edited(a.alpha[0]), edited(a.alpha[1])
    print(f"small, forget people 0..{a.forget - 1}, suite all, grid {a.grid!r}, "
          f"{torch.get_num_threads()} thread(s); recipes: dampen alpha {a.alpha[0]:g} "
          f"then {a.alpha[1]:g}")
    fresh, t_fresh = verify(second, None)
    with tempfile.TemporaryDirectory() as root:
        _, t_fill = verify(first, AttackStore(root))
        stored, t_stored = verify(second, AttackStore(root))
    same = (stored.metrics == fresh.metrics
            and stored.extra["attack_grid"] == fresh.extra["attack_grid"])
    print(f"first recipe, filling the store: {t_fill:.1f} s")
    print(f"second recipe, every model attacked: {t_fresh:.1f} s")
    print(f"second recipe, oracle and original read back: {t_stored:.1f} s")
    print(f"ratio {t_fresh / t_stored:.2f}x; every metric and attack grid identical: {same}")


if __name__ == "__main__":
    main()
