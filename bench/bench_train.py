"""Training the organism: its recipe's steps through the fused forward and AdamW's fused kernel
(``train_model(engine="fused")``, the recipe since cache version 3) against the same recipe
through the TransformerLens forward and AdamW's loop (``engine="serial"``, the recipe up to
cache version 2) - excise's own earlier way, not a reference implementation.

    python bench/bench_train.py [--preset small] [--seed 0] [--repeats 1] [--steps N]
        [--json out.json]

Same preset, world, batches, steps and schedule; only how each step is computed differs. Each
repetition trains both (interleaved, serial first), uncached, at the recipe's thread count
(``TRAIN_THREADS``, deterministic algorithms). Prints wall seconds of each training, the median
step, the ratio, and each model's recall on its trained facts, on never-trained (holdout)
people and on held-out phrasings of the trained people's facts - the recipe's bar is trained
>= 0.99 and holdout <= 0.06 at either engine. ``--steps`` shortens training for timing only
(the recalls then mean little).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def recalls(handle, world) -> dict[str, float]:
    """Greedy-decoding recall of the trained facts, the holdout people and the held-out
    phrasings of the trained people."""
    import torch

    from probes.behaviour import recall

    trained = [f for i in world.trained_people for f in world.facts(i, trained=True)]
    holdout = [f for i in world.holdout_people for f in world.facts(i)]
    phrasing = [f for i in world.trained_people for f in world.facts(i, trained=False)]
    with torch.inference_mode():
        return {"trained": round(recall(handle, trained), 4),
                "holdout": round(recall(handle, holdout), 4),
                "phrasing": round(recall(handle, phrasing), 4)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="small")
    ap.add_argument("--seed", type=int, default=None, help="training seed (default: preset's)")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--steps", type=int, default=None, help="fewer steps: timing only")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()

    import torch

    from excise.world import Tokenizer, make_world

    orgmod = importlib.import_module("excise.organism")  # the module, not excise.organism()

    preset = orgmod.PRESETS[a.preset]
    if a.steps is not None:
        preset = dataclasses.replace(preset, steps=a.steps)
    world = make_world(preset.n_people, preset.n_holdout, seed=preset.seed,
                       n_filler=preset.n_filler)
    tok = Tokenizer(world.vocabulary())
    print(f"torch {torch.__version__}, training at {orgmod.TRAIN_THREADS} threads; {a.preset} "
          f"({preset.steps} steps, batch {preset.batch_size}), training seed "
          f"{preset.seed if a.seed is None else a.seed}", flush=True)
    runs: dict[str, list[dict]] = {"serial": [], "fused": []}
    steps_seen: dict[str, list[float]] = {"serial": [], "fused": []}
    real_train = orgmod.train

    def timed(*args, **kw):
        res = real_train(*args, **kw)
        steps_seen[current].extend(res.seconds)
        return res

    orgmod.train = timed
    try:
        for _ in range(a.repeats):
            for current in ("serial", "fused"):
                t = time.perf_counter()
                h = orgmod.train_model(preset, world, tok, progress=False, train_seed=a.seed,
                                       engine=current)
                row = {"seconds": round(time.perf_counter() - t, 2), **recalls(h, world),
                       "fingerprint": h.fingerprint()}
                runs[current].append(row)
                print(f"  {current}: {row}", flush=True)
    finally:
        orgmod.train = real_train
    s = statistics.median(r["seconds"] for r in runs["serial"])
    f = statistics.median(r["seconds"] for r in runs["fused"])
    ss, fs = (1e3 * statistics.median(steps_seen[k]) for k in ("serial", "fused"))
    print(f"training {a.preset}: serial (TransformerLens forward, AdamW loop) {s:.1f} s, "
          f"fused (fused forward, fused AdamW) {f:.1f} s (medians of {a.repeats}); median step "
          f"{ss:.1f} vs {fs:.1f} ms")
    print(f"  fused vs serial (excise's own earlier recipe): {s / f:.2f}x faster in all, "
          f"{ss / fs:.2f}x per step")
    if a.json:
        from excise.io import atomic_write_text

        atomic_write_text(a.json, json.dumps({
            "preset": a.preset, "steps": preset.steps, "seed": a.seed, "torch":
            torch.__version__, "threads": orgmod.TRAIN_THREADS, "runs": runs,
            "ratio_total": round(s / f, 3), "ratio_step": round(ss / fs, 3),
            "median_step_ms": {"serial": round(ss, 2), "fused": round(fs, 2)}}, indent=2))


if __name__ == "__main__":
    main()
