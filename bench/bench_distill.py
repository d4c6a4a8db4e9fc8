"""The global distillation edit (configs/undo.yaml's recipe) against retraining, and its two
engines: the student's fused forward (``edit.distill(engine="fused")``, the default) against the
handle's serial TransformerLens forward (own loop), and both against training the retrain oracle
from scratch (``excise.organism.train_model`` without the forget people: what the edit imitates;
issue 14's "cheaper than retraining" compares these wall times) at each engine too (serial: how
every cached oracle is trained; fused: the same recipe through the fused forward). One run, one
request, same seeds; prints seconds, the ratios and what each model does (forget / retain /
shared recall).

    OMP_NUM_THREADS=2 EXCISE_CACHE=/tmp/exc python bench/bench_distill.py [--people 0-9]
        [--steps 1000] [--batch-size 64] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--seed", type=int, default=0, help="organism seed (its cached model)")
    ap.add_argument("--people", default="0-9", help="A-B: the forget people")
    ap.add_argument("--alpha", type=float, default=0.8)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--no-retrain", action="store_true", help="skip training the oracle")
    ap.add_argument("--json", default="")
    a = ap.parse_args()

    import torch

    import edit
    import excise
    from excise.organism import train_model
    from probes.behaviour import recall

    try:
        first, last = (int(x) for x in a.people.split("-"))
    except ValueError:
        ap.error(f"--people {a.people!r}: give a range FIRST-LAST, e.g. 0-9")
    org = excise.organism(a.preset, seed=a.seed, progress=False)
    people = list(range(first, last + 1))
    req = org.request(people)
    print(f"{a.preset} seed {a.seed}, people {first}..{last}, torch threads "
          f"{torch.get_num_threads()}; distill alpha {a.alpha}, {a.steps} steps, lr {a.lr}, "
          f"batch {a.batch_size} (linear schedule, hard_facts, shared text)", flush=True)
    rows = {}
    for engine in ("serial", "fused"):
        m = org.model.clone()
        t = time.perf_counter()
        e = edit.distill(m, units="all", request=req, alpha=a.alpha, steps=a.steps, lr=a.lr,
                         batch_size=a.batch_size, labels="hard_facts", schedule="linear",
                         shared_text=True, seed=a.seed, engine=engine)
        secs = time.perf_counter() - t
        got = {s: recall(m, getattr(req, s)) for s in ("forget", "retain", "shared")}
        rows[engine] = {"seconds": round(secs, 1), "changed": e.n_changed(), **got}
        print(f"distill, {engine} engine: {secs:.1f} s; forget {got['forget']:.3f}, retain "
              f"{got['retain']:.3f}, shared {got['shared']:.3f}", flush=True)
    ratio = rows["serial"]["seconds"] / rows["fused"]["seconds"]
    print(f"fused vs serial (own loop): {ratio:.2f}x faster")
    out = {"args": vars(a), "edits": rows, "fused_vs_serial": round(ratio, 3)}
    if not a.no_retrain:
        out["retrain"] = {}
        for engine in ("serial", "fused"):  # serial: how every cached oracle is trained
            t = time.perf_counter()
            oracle = train_model(org.preset, org.world, org.tokenizer, frozenset(people),
                                 progress=False, desc="oracle", engine=engine)
            secs = time.perf_counter() - t
            got = {s: recall(oracle, getattr(req, s)) for s in ("forget", "retain", "shared")}
            out["retrain"][engine] = {"seconds": round(secs, 1), **got}
            print(f"retraining the oracle, {engine} engine (train_model without people "
                  f"{first}..{last}, not cached): {secs:.1f} s; forget {got['forget']:.3f}, "
                  f"retain {got['retain']:.3f}, shared {got['shared']:.3f}", flush=True)
        for engine in ("serial", "fused"):
            print(f"edit / retraining, both {engine}: "
                  f"{rows[engine]['seconds'] / out['retrain'][engine]['seconds']:.2f}")
        print(f"edit (fused) / retraining (serial, as the cached oracles): "
              f"{rows['fused']['seconds'] / out['retrain']['serial']['seconds']:.2f}")
    if a.json:
        from excise.io import atomic_write_text
        atomic_write_text(a.json, json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
