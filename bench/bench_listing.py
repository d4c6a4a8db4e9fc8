"""The run report's per-fact listing (``probes.behaviour.fact_listing``), timed against the way
it was computed before stop 53 - excise's own earlier algorithm, not a reference implementation.

    EXCISE_CACHE=/tmp/exc python bench/bench_listing.py [--preset small] [--forget 20]
        [--repeats 2]

The listing gives, for every fact of every split (and the same-template neighbors), the greedy
continuation, the target's probability and whether greedy decoding reproduces the target; a
run lists the original and the edited model. Before: split by split, three measurements per
fact (``fact_hits``, ``target_logprobs``, ``greedy_continuations``) through the handle's
(TransformerLens) forward - on the organism every same-template neighbor is also a retain fact,
so those were measured twice. Now: each (prompt, target) once, the hit and the probability from
one forward, through the fused forward (``engine="fused"``, what ``excise run`` passes: the
verification's engine). Prints seconds of each (medians, repetitions interleaved), the ratio,
and whether answers and hits agree exactly and how far the probabilities differ.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def before(model, request, same_template, max_new_tokens: int = 3, batch_size: int = 64):
    """The listing as computed before stop 53: per split, three passes through the handle."""
    from excise.templates import greedy_continuations
    from probes.behaviour import LISTING_SPLITS, fact_hits, target_logprobs

    out = {}
    for split in LISTING_SPLITS:
        facts = list(same_template) if split == "same_template" else list(getattr(request, split))
        if not facts:
            continue
        hits = fact_hits(model, facts, batch_size).tolist()
        lp, _ = target_logprobs(model, facts, batch_size)
        texts, _ = greedy_continuations(model, [f.prompt for f in facts], max_new_tokens,
                                        batch_size, dummy=facts[0].target)
        out[split] = [{"prompt": f.prompt, "target": f.target,
                       "answer": (t.strip().splitlines() or [""])[0],
                       "p_target": math.exp(float(v)), "hit": bool(h)}
                      for f, t, v, h in zip(facts, texts, lp.tolist(), hits)]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="small")
    ap.add_argument("--forget", type=int, default=20, help="people forgotten (the default run's)")
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args()

    import torch

    import excise
    from excise import templates
    from probes.behaviour import fact_listing

    org = excise.organism(a.preset, progress=False)
    req = org.request(forget_people=list(range(a.forget)))
    model = org.model
    st = templates.organism_same_template(req)
    n = sum(len(getattr(req, s)) for s in ("forget", "paraphrase", "retain", "neighbors",
                                             "holdout", "shared")) + len(st)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {a.preset}, "
          f"{a.forget} people forgotten: {n} listed facts ({len(st)} same-template)")
    old_t, new_t = [], []
    for _ in range(a.repeats):  # interleaved
        t = time.perf_counter()
        old = before(model, req, st)
        old_t.append(time.perf_counter() - t)
        t = time.perf_counter()
        new = fact_listing(model, req, st, engine="fused")
        new_t.append(time.perf_counter() - t)
    assert list(old) == list(new)
    answers = hits = 0
    worst = 0.0
    for split in old:
        for x, y in zip(old[split], new[split], strict=True):
            assert (x["prompt"], x["target"]) == (y["prompt"], y["target"])
            answers += x["answer"] != y["answer"]
            hits += x["hit"] != y["hit"]
            worst = max(worst, abs(x["p_target"] - y["p_target"]) / max(x["p_target"], 1e-30))
    o, w = statistics.median(old_t), statistics.median(new_t)
    print(f"listing before (split by split, three passes, serial): {o:.2f} s; now (each fact "
          f"once, one pass for hit and probability, fused): {w:.2f} s (medians of {a.repeats})")
    print(f"  now vs before (excise's own earlier algorithm): {o / w:.2f}x faster; answers "
          f"differing {answers}, hits differing {hits}, max relative probability difference "
          f"{worst:.1e}")


if __name__ == "__main__":
    main()
