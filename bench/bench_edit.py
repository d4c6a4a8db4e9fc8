"""Every edit on Fisher's top units of an organism: forget / retain / shared recall, perplexity,
parameters changed, seconds. One run, one table (markdown on stdout).

    OMP_NUM_THREADS=1 EXCISE_CACHE=/tmp/exc python bench/bench_edit.py --preset small --forget 10
"""

from __future__ import annotations

import argparse
import time

import excise
import locate
import probes
from edit import dampen, finetune, noise, project, prune

COLS = ("forget_recall", "paraphrase_recall", "retain_recall", "shared_recall", "perplexity")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="small")
    ap.add_argument("--forget", type=int, default=10)
    ap.add_argument("--top", type=float, default=0.02, help="fraction of neurons/heads")
    a = ap.parse_args()
    org = excise.organism(a.preset, progress=False)
    req = org.request(forget_people=range(a.forget))
    h = org.model
    t0 = time.time()
    imp = locate.fisher(h, req)
    print(f"fisher: {time.time() - t0:.1f}s; {h.n_parameters():,} parameters")
    units = imp.by_unit("mean").top(a.top)
    heads = imp.by_unit("sum").top(4)
    runs = [
        ("none", None, {}),
        ("dampen a=10 (all params)", lambda: dampen(h, imp, alpha=10.0), {}),
        ("dampen a=10 (top units)", lambda: dampen(h, imp, units, alpha=10.0), {}),
        ("prune zero (top units)", lambda: prune(h, imp, units), {}),
        ("prune mean (top units)", lambda: prune(h, imp, units, mode="mean", request=req), {}),
        ("prune zero (top-4 by sum)", lambda: prune(h, imp, heads), {}),
        ("noise s=1 (top 0.2% elems)", lambda: noise(h, imp, scale=1.0), {}),
        ("noise s=3 (top 0.2% elems)", lambda: noise(h, imp, scale=3.0), {}),
        ("project remove (top-unit layers)", lambda: project(h, imp, units, request=req), {}),
        ("project align resid_mid", lambda: project(h, imp, request=req, mode="align",
                                                    sites="blocks.*.resid_mid"), {}),
        ("project align mlp.out baked", lambda: project(h, imp, units, request=req,
                                                        mode="align", bake=True), {}),
        ("finetune ga (top units)", lambda: finetune(h, imp, units, request=req,
                                                     method="ga"), {}),
        ("finetune gd (top units)", lambda: finetune(h, imp, units, request=req), {}),
        ("finetune npo (top units)", lambda: finetune(h, imp, units, request=req,
                                                      method="npo"), {}),
        ("finetune gd (all params)", lambda: finetune(h, imp, "all", request=req), {}),
    ]
    print(f"\n{a.preset} organism, forget people 0..{a.forget - 1}, top units = "
          f"{len(units)} neurons/heads ({units.source})\n")
    print("| edit | forget | paraphr. | retain | shared | ppl | params changed | s |")
    print("|---|---|---|---|---|---|---|---|")
    for name, fn, _ in runs:
        t = time.time()
        if fn is None:
            m, n, secs = probes.verify(h, req).metrics["model"], 0, 0.0
        else:
            try:
                e = fn()
            except ValueError as err:
                print(f"| {name} | error: {err} |")
                continue
            secs = time.time() - t
            with e:
                m = probes.verify(h, req).metrics["model"]
                n = e.n_changed()
        vals = " | ".join(f"{m.get(c, float('nan')):.3f}" if c != "perplexity"
                          else f"{m[c]:.1f}" for c in COLS)
        print(f"| {name} | {vals} | {n:,} ({n / h.n_parameters():.2%}) | {secs:.1f} |",
              flush=True)


if __name__ == "__main__":
    main()
