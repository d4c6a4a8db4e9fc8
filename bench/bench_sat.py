"""Time locate.sat.resolve on a random 10,000-unit instance.

Usage: python bench/bench_sat.py [n_units] [seed]
"""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from locate.sat import Conflict, resolve  # noqa: E402


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 10_000
    seed = int(sys.argv[2]) if len(sys.argv) > 2 else 0
    rng = random.Random(seed)
    forget = {f"blocks.{i % 24}.mlp.post[{i}]": rng.random() for i in range(n)}
    retain = {u: rng.random() for u in forget}
    some = rng.sample(sorted(forget), 3)
    cases = {
        "default (top 10%, protect retain circuit)": {},
        "must_edit/must_keep + coverage>=200 + max_edit<=300": dict(
            must_edit=some[:1], must_keep=some[1:], min_forget_coverage=200, max_edit=300),
        "all units candidates, no protect, coverage>=n/10, max_edit<=3n/10": dict(
            top_fraction=1.0, protect_retain=False, min_forget_coverage=n // 10,
            max_edit=3 * n // 10),
        "all units candidates, no protect, unconstrained": dict(top_fraction=1.0,
                                                                protect_retain=False),
        "conflict: must_edit a protected unit": dict(
            must_edit=[max(retain, key=retain.get)]),
    }
    for name, kw in cases.items():
        t0 = time.perf_counter()
        try:
            r = resolve(forget, retain, **kw)
            detail = (f"edit={len(r.edit)} cost={r.cost} vars={r.n_vars} hard={r.n_hard} "
                      f"soft={r.n_soft} solve={r.solve_seconds:.3f}s")
        except Conflict as exc:
            detail = f"Conflict core={exc.core} minimal={exc.minimal}"
        print(f"{n} units | {name}: {time.perf_counter() - t0:.3f} s | {detail}")


if __name__ == "__main__":
    main()
