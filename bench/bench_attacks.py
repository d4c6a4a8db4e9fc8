"""The restoration-attack grid, serial against fused engine, on the `small` organism.

    EXCISE_CACHE=/tmp/exc OMP_NUM_THREADS=1 python bench/bench_attacks.py [--preset small]
        [--forget 10] [--grid quick] [--models original,oracle] [--attacks relearn,benign,sae]
        [--repeats 1]

Runs ``probes.attacks.run_grid`` (every learning rate x seed of the grid on each model, as the
attacks suite does) once with ``engine="serial"`` (TransformerLens forward passes) and once with
``engine="fused"`` (fused torch ops on packed rows), interleaved per attack
(``--repeats`` times, the order alternating),
at equal budgets (same steps, learning rates, batches, people, seeds); prints seconds per attack,
the ratio, and whether every per-fact hit of every curve agrees. Both are excise's own code
paths (no reference implementation is involved). Needs the organism (and, for ``oracle``, its
retrain oracle) in the cache - trains them otherwise (minutes).
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
    ap.add_argument("--forget", type=int, default=10)
    ap.add_argument("--grid", default="quick")
    ap.add_argument("--models", default="original,oracle")
    ap.add_argument("--attacks", default="relearn,benign,sae")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--ceiling", action="store_true",
                    help="only measure how close one fused relearning step runs to this "
                         "machine's matrix-multiply rate (no grid)")
    a = ap.parse_args()

    import torch

    import excise
    from probes import attacks as A

    org = excise.organism(a.preset, progress=False)
    req = org.request(forget_people=range(a.forget))
    if a.ceiling:
        return ceiling(org, req)
    avail = {"original": lambda: org.model, "oracle": lambda: org.oracle(req)}
    names = a.models.split(",")
    bad = [n for n in names if n not in avail]
    if bad:
        raise SystemExit(f"unknown model {bad[0]!r}; choose from {list(avail)}")
    models = {n: avail[n]() for n in names}
    attacks = tuple(a.attacks.split(","))
    cfg = A.AttackConfig(attacks=attacks, grid=a.grid)
    kit = A.steering_kit(org.model, req, cfg) if "sae" in attacks else None
    print(f"{a.preset}, forget people 0..{a.forget - 1}, grid {a.grid!r}, models {names}, "
          f"attacks {list(attacks)}, {torch.get_num_threads()} thread(s)")

    secs = {e: {n: 0.0 for n in attacks} for e in A.ENGINES}
    grids = {}
    for r in range(a.repeats):  # interleaved per attack, the order alternating
        for name in attacks:
            for engine in A.ENGINES[::1 if r % 2 == 0 else -1]:
                c = dataclasses.replace(cfg, attacks=(name,), engine=engine)
                t = time.perf_counter()
                g = A.run_grid(models, req, c, kit=kit)
                secs[engine][name] += time.perf_counter() - t
                grids.setdefault(engine, {}).update(g)
    same = all(p.curves.curves[lab].hits == q.curves.curves[lab].hits
               for name in attacks
               for p, q in zip(grids["serial"][name].points, grids["fused"][name].points)
               for lab in names)
    print(f"{'attack':10s} {'settings':>8s} {'serial s':>9s} {'fused s':>8s} {'ratio':>6s}")
    for name in attacks:
        s, f = secs["serial"][name] / a.repeats, secs["fused"][name] / a.repeats
        print(f"{name:10s} {len(cfg.settings(name)):8d} {s:9.1f} {f:8.1f} {s / f:6.2f}")
    s = sum(secs["serial"].values()) / a.repeats
    f = sum(secs["fused"].values()) / a.repeats
    print(f"{'all':10s} {'':8s} {s:9.1f} {f:8.1f} {s / f:6.2f}")
    print(f"every per-fact hit identical (serial vs fused): {same}")


def ceiling(org, req, steps: int = 15) -> None:
    """Arithmetic of one fused relearning step (forward + backward at the default batch, the
    retain mix included; torch's FLOP counter) over its measured time, against a plain matmul of
    the model's own shapes (one row per real token of a batch) at the same thread count: how
    much of the machine the step uses,
    so how much any faster engine could still gain at equal budgets."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from excise.fused import engine_for, fused_loss
    from excise.train import Sampler
    from probes import attacks as A

    cfg = A.AttackConfig(attacks=("relearn",))
    m = org.model.clone()
    part, _ = A._split_people(req.forget, cfg, "relearning")
    data = m.encode(list(part) + list(req.retain))
    fwd = engine_for(m, "fused", data)
    params = m.named_parameters()
    sampler = Sampler(0)
    batches = [data[sampler.mixed(len(part), len(req.retain), cfg.relearn_batch,
                                  cfg.retain_mix)] for _ in range(steps + 3)]
    with FlopCounterMode(display=False) as fc:
        for b in batches[:3]:  # also the warm-up
            fused_loss(fwd, params, b).backward()
    flops = fc.get_total_flops() / 3
    t = time.perf_counter()
    for b in batches[3:]:
        fused_loss(fwd, params, b).backward()
    step = (time.perf_counter() - t) / steps
    d, rows = m.info("blocks.0.mlp.post").unit_shape[0], int(batches[0].lengths.sum())
    x, w = torch.randn(rows, org.preset.d_model), torch.randn(org.preset.d_model, d)
    for _ in range(5):
        x @ w
    t, n = time.perf_counter(), 200
    for _ in range(n):
        x @ w
    peak = 2 * rows * x.shape[1] * d * n / (time.perf_counter() - t)
    print(f"{torch.get_num_threads()} thread(s): a fused relearning step does "
          f"{flops / 1e9:.2f} GFLOP in {step * 1e3:.0f} ms = {flops / step / 1e9:.0f} GFLOP/s; "
          f"a [{rows} x {x.shape[1]}] @ [{x.shape[1]} x {d}] matmul runs at {peak / 1e9:.0f} "
          f"GFLOP/s: the step uses {flops / step / peak:.0%} of it")


if __name__ == "__main__":
    main()
