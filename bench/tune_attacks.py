"""Tune the fine-tuning attacks on positive controls of the `small` organism (not on edits).

    EXCISE_CACHE=/tmp/exc OMP_NUM_THREADS=2 python bench/tune_attacks.py [--people 150 160]

The forget set is a *validation* group of people (default 150..159, never reported). For each
control - gradient ascent on all weights, and on the unembedding alone (facts known to be only
suppressed) - and for each learning rate, it runs the relearning attack and prints:

- ``control``: peak recall of the held-out forget people on the control (must be high: the attack
  has to undo known suppression);
- ``strangers``: the same attack on the same control with never-trained people instead (what
  "learning new facts" looks like; a retrain oracle would read like this);
- ``original min``: the lowest held-out recall along the attack on the *unedited* model (must stay
  near 1: an attack that wrecks what it measures reads as "forgotten");
- ``gap`` = control - strangers.

Picks the learning rate with the largest gap among those whose original min >= 0.9.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="small")
    ap.add_argument("--people", type=int, nargs=2, default=(150, 160))
    ap.add_argument("--lrs", type=float, nargs="+", default=(1e-4, 3e-4, 1e-3, 3e-3))
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--stop", type=float, default=0.3,
                    help="controls ascend until forget recall <= this")
    a = ap.parse_args()

    import excise
    from probes import attacks as A
    from probes.behaviour import recall
    from probes.controls import gradient_ascent, unembed_ascent

    org = excise.organism(a.preset, progress=False)
    req = org.request(forget_people=range(*a.people))
    t0 = time.time()
    controls = {"ascent (all weights)": gradient_ascent(org.model, req, stop=a.stop),
                "ascent (unembedding)": unembed_ascent(org.model, req, stop=a.stop)}
    for name, m in controls.items():
        print(f"{name}: forget {recall(m, req.forget):.3f}  retain {recall(m, req.retain):.3f}")
    print(f"controls built in {time.time() - t0:.0f} s")

    base = A.AttackConfig(relearn_steps=a.steps, eval_every=5)
    rows = []
    for lr in a.lrs:
        cfg = dataclasses.replace(base, relearn_lr=lr)
        orig = min(A.relearn(org.model, req, cfg).y)
        for name, m in controls.items():
            ctl = max(A.relearn(m, req, cfg).y)
            strangers = max(A.relearn(m, req, cfg, facts=req.holdout).y)
            rows.append((lr, name, ctl, strangers, orig))
            print(f"lr {lr:g}  {name:22s} control {ctl:.3f}  strangers {strangers:.3f}  "
                  f"gap {ctl - strangers:+.3f}  original min {orig:.3f}", flush=True)
    ok = {}
    for lr, _, ctl, strangers, orig in rows:
        if orig >= 0.9:
            ok.setdefault(lr, []).append(ctl - strangers)
    if ok:
        best = max(ok, key=lambda lr: min(ok[lr]))
        print(f"chosen relearn_lr = {best:g} (largest worst-case gap {min(ok[best]):+.3f} over "
              f"the controls with the original's held-out recall kept >= 0.9)")
    else:
        print("no learning rate keeps the original's held-out recall >= 0.9")
    print(f"total {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
