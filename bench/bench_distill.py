"""The global distillation edit (configs/undo.yaml's recipe) against retraining, and its two
engines: the student's fused forward (``edit.distill(engine="fused")``, the default) against the
handle's serial TransformerLens forward (own loop), and both against training the retrain oracle
from scratch (``excise.organism.train_model`` without the forget people: what the edit imitates;
issue 14's "cheaper than retraining" compares these wall times) at each engine too (serial: the
organism's steps up to cache version 2; fused: its steps since cache version 3, how every cached
oracle is trained now - the fused forward and fused AdamW). One run, one
request, same seeds; prints seconds, the ratios and what each model does (forget / retain /
shared recall).

    OMP_NUM_THREADS=2 EXCISE_CACHE=/tmp/exc python bench/bench_distill.py [--people 0-9]
        [--steps 1000] [--batch-size 64] [--json out.json]
        [--select saliency:0.1:SITES --alpha 1 --lr 5e-3 --steps 500 --engines fused]

``--select METHOD:FRACTION[:SITES]`` times a localized edit instead (as configs/saliency.yaml's
selection: the top fraction of a locate method's scores on the original, re-drawn and
distilled); its time
includes the locate call. ``--engines``: which edit engines run (the retraining runs both).
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
    ap.add_argument("--select", default="all",
                    help="the weights the edit re-draws: 'all' or METHOD:FRACTION[:SITES] "
                         "(locate.parse_select)")
    ap.add_argument("--schedule", default="linear", choices=("constant", "linear"))
    ap.add_argument("--engines", nargs="+", default=["serial", "fused"],
                    choices=("serial", "fused"), help="the edit's engines (each one edit)")
    ap.add_argument("--no-retrain", action="store_true", help="skip training the oracle")
    ap.add_argument("--json", default="")
    a = ap.parse_args()

    import torch

    import edit
    import excise
    import locate
    from excise.organism import train_model
    from probes.behaviour import recall

    try:
        first, last = (int(x) for x in a.people.split("-"))
    except ValueError:
        ap.error(f"--people {a.people!r}: give a range FIRST-LAST, e.g. 0-9")
    org = excise.organism(a.preset, seed=a.seed, progress=False)
    try:
        select = locate.parse_select(a.select, org.model)
    except ValueError as e:
        ap.error(f"--select: {e}")
    people = list(range(first, last + 1))
    req = org.request(people)
    print(f"{a.preset} seed {a.seed}, people {first}..{last}, torch threads "
          f"{torch.get_num_threads()}; distill alpha {a.alpha}, {a.steps} steps, lr {a.lr}, "
          f"batch {a.batch_size} ({a.schedule} schedule, hard_facts, shared text), weights "
          f"{a.select}", flush=True)
    rows = {}
    for engine in a.engines:
        m = org.model.clone()
        t = time.perf_counter()
        units = "all" if select is None else \
            locate.METHODS[select[0]](m, req).top(select[1], select[2])
        e = edit.distill(m, units=units, request=req, alpha=a.alpha, steps=a.steps, lr=a.lr,
                         batch_size=a.batch_size, labels="hard_facts", schedule=a.schedule,
                         shared_text=True, seed=a.seed, engine=engine)
        secs = time.perf_counter() - t
        got = {s: recall(m, getattr(req, s)) for s in ("forget", "retain", "shared")}
        rows[engine] = {"seconds": round(secs, 1), "changed": e.n_changed(),
                        "params_share": e.n_changed() / m.n_parameters(), **got}
        print(f"distill, {engine} engine: {secs:.1f} s; forget {got['forget']:.3f}, retain "
              f"{got['retain']:.3f}, shared {got['shared']:.3f}", flush=True)
    out = {"args": vars(a), "edits": rows}
    if len(rows) == 2:
        ratio = rows["serial"]["seconds"] / rows["fused"]["seconds"]
        print(f"fused vs serial (own loop): {ratio:.2f}x faster")
        out["fused_vs_serial"] = round(ratio, 3)
    if not a.no_retrain:
        out["retrain"] = {}
        for engine in ("serial", "fused"):  # fused: how every cached oracle trains since v3
            t = time.perf_counter()
            oracle = train_model(org.preset, org.world, org.tokenizer, frozenset(people),
                                 progress=False, desc="oracle", engine=engine)
            secs = time.perf_counter() - t
            got = {s: recall(oracle, getattr(req, s)) for s in ("forget", "retain", "shared")}
            out["retrain"][engine] = {"seconds": round(secs, 1), **got}
            print(f"retraining the oracle, {engine} engine (train_model without people "
                  f"{first}..{last}, not cached): {secs:.1f} s; forget {got['forget']:.3f}, "
                  f"retain {got['retain']:.3f}, shared {got['shared']:.3f}", flush=True)
        for engine in rows:
            print(f"edit / retraining, both {engine}: "
                  f"{rows[engine]['seconds'] / out['retrain'][engine]['seconds']:.2f}")
        if "fused" in rows:
            print(f"edit (fused) / retraining (serial, the recipe up to cache version 2): "
                  f"{rows['fused']['seconds'] / out['retrain']['serial']['seconds']:.2f}")
    if a.json:
        from excise.io import atomic_write_text
        atomic_write_text(a.json, json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
