"""Retraining's own seed noise: how far retrain oracles of one request, trained at different
seeds, differ in general-text perplexity and retain recall - the noise the verdict's utility
gate must stay above, or it judges the oracle's seed instead of the edit.

    OMP_NUM_THREADS=2 python bench/retrain_noise.py [--preset small]
        [--requests 0:10:0,1 0:50:0,1,2 1:10:0,1,2,3 ...] [--json out.json]

Each request is ``WORLD:START:SEEDS``: organism seed ``WORLD``, forget people ``START`` ..
``START + 9``, retrain oracles at the training seeds ``SEEDS`` (cached like every oracle:
missing ones are trained, ~1.5 min each on ``small``). For every ordered pair of a request's
oracles (one playing the model, the other the reference) it prints the ratio the perplexity
gate reads - the model's perplexity over the larger of the reference oracle's and the
original's (``probes.verdict.decide``) - and the worst per request; a gate tighter than the
worst calls a second retraining damaged. The default requests are those with oracles cached by
earlier runs: validation people 10..19 and 50..59 (the calibration's, the attack tuning's) and
the reported 0..9 and 100..109 (world 1's 100..109: the held-out calibration's oracles, added
after the slack was chosen).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DEFAULT = ["0:10:0,1,2", "0:50:0,1,2", "0:0:0,1", "0:100:0,1", "1:10:0,1,2,3", "1:0:1,2",
           "1:100:1,2,3"]


def parse(spec: str) -> tuple[int, int, list[int]]:
    try:
        world, start, seeds = spec.split(":")
        out = int(world), int(start), [int(s) for s in seeds.split(",")]
    except ValueError:
        raise SystemExit(f"--requests {spec!r}: write WORLD:START:SEED,SEED,... "
                         f"(e.g. 0:10:0,1,2)") from None
    if len(out[2]) < 2 or len(set(out[2])) != len(out[2]):
        raise SystemExit(f"--requests {spec!r}: name at least two different training seeds")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="small", choices=("tiny", "small"))
    ap.add_argument("--requests", nargs="+", default=DEFAULT)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    specs = [parse(s) for s in a.requests]  # every spec checked before anything trains

    import torch

    import excise
    from excise.io import atomic_write_text
    from probes.behaviour import perplexity, recall
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))

    rows, t0 = [], time.time()
    for world, start, seeds in specs:
        org = excise.organism(a.preset, seed=world)
        req = org.request(range(start, start + 10))
        z = perplexity(org.model, req.general)
        ppl, ret = {}, {}
        for s in seeds:
            o = org.oracle(req, train_seed=s)
            ppl[s], ret[s] = perplexity(o, req.general), recall(o, req.retain.facts)
        gate = {f"{m}/{r}": ppl[m] / max(ppl[r], z) for m, r in itertools.permutations(seeds, 2)}
        row = {"world": world, "people": [start, start + 9], "train_seeds": seeds,
               "original_perplexity": z, "perplexity": ppl, "retain_recall": ret,
               "gate_ratios": gate, "worst_gate_ratio": max(gate.values()),
               "spread": max(ppl.values()) / min(ppl.values())}
        rows.append(row)
        print(f"world {world} people {start}..{start + 9} seeds {seeds}: perplexity "
              + " / ".join(f"{ppl[s]:.2f}" for s in seeds) + f" (original {z:.2f}); spread "
              f"{row['spread']:.3f}x, worst gate ratio {row['worst_gate_ratio']:.3f}x; retain "
              + " / ".join(f"{ret[s]:.3f}" for s in seeds), flush=True)
    worst = max(rows, key=lambda r: r["worst_gate_ratio"])
    print(f"worst gate ratio {worst['worst_gate_ratio']:.3f}x (world {worst['world']}, people "
          f"{worst['people'][0]}..{worst['people'][1]}); {time.time() - t0:.0f} s")
    if a.json:
        atomic_write_text(a.json, json.dumps({"preset": a.preset, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
