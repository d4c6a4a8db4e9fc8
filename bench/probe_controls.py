"""Positive controls of the leave-one-out probe (issue 15, part 3): is its answer right where the
answer is known?

    python bench/probe_controls.py [--preset tiny] [--n-null 100] [--feature last]
                                   [--per-count 16] [--unseen 32] [--canary-seed 0]
                                   [--no-canaries] [--no-gemma] [--json out.json]

1. Canaries on the organism: ``excise.organism(preset, canaries=True)`` - 16 random canaries
   (``--per-count``; five words of the world's vocabulary, then four digits) each in exactly 1,
   4, 16 and 64 batch rows of training, 32 never seen (``--unseen``). Per count: the probe on
   that count's canaries vs the never-seen ones (best depth, against the null of the best depth:
   mean and 95th percentile), loss-based membership AUC, greedy recall of the digits; Spearman
   between probe accuracy and AUC across the counts (the issue's statistic). Where the AUC
   saturates at 1.0 for several counts that Spearman is decided by ties, so Spearman with the
   count itself and with the recall are printed beside it (undefined, ``nan``, where one side is
   constant). The same on the oracle (``org.without_canaries()``: the plain organism, which
   never saw a canary): the probe must read at its null there.
2. Verbatim passages on Gemma 3 270M (``data/verbatim.jsonl``; skipped when the Gemma extra is
   missing): passages the model completes exactly vs novel passages of the same style written
   for excise (pairs whose novel twin it completes too are left out). The probe must read at
   least 0.1 above its null's mean and above the null's 95th percentile.

Every probe is :func:`probes.representations.probe_control` (the class-balanced ridge probe of
``loo_probe``, standardised features, every ``blocks.{L}.resid_post``, one sequence left out at a
time). Wall and process CPU time per part are printed (the machine may be shared).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import excise  # noqa: E402
from probes.representations import FEATURES, canary_control, probe_control, verbatim_pairs  # noqa: E402,E501
from probes import stats  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def spearman(a, b) -> float:
    """Spearman's rank correlation (ties: average ranks); ``nan`` where either side is
    constant (no ranking to correlate)."""
    from scipy.stats import spearmanr

    if len(set(a)) < 2 or len(set(b)) < 2:
        return float("nan")
    return float(spearmanr(a, b).correlation)


def canaries(preset: str, n_null: int, feature: str, per_count: int = 16,
             n_unseen: int = 32, seed: int = 0) -> dict:
    t0, c0 = time.time(), time.process_time()
    org = excise.organism(preset, canaries={"per_count": per_count, "n_unseen": n_unseen,
                                            "seed": seed}, progress=False)
    facts = org.canary_facts()
    out = {"preset": preset, "canaries": org.canaries.to_dict(), "feature": feature}
    for label, model in (("canaries", org.model), ("oracle", org.without_canaries())):
        rows = canary_control(model, facts, n_null=n_null, feature=feature)
        accs, aucs = [r["acc"] for r in rows], [r["mia_auc"] for r in rows]
        out[label] = {"rows": rows, "spearman": spearman(accs, aucs),
                      "spearman_count": spearman(accs, [r["count"] for r in rows]),
                      "spearman_recall": spearman(accs, [r["recall"] for r in rows]),
                      "spearman_auc_count": spearman(aucs, [r["count"] for r in rows])}
        print(f"\n{preset} organism, model: {label} ({len(facts[0])} never-seen canaries, "
              f"{len(facts[rows[0]['count']])} per count, feature {feature!r})")
        print(f"{'count':>5} | {'probe acc':>9} {'depth':>5} | {'null mean':>9} {'null p95':>8} | "
              f"{'MIA AUC':>7} | {'recall':>6}")
        for r in rows:
            print(f"{r['count']:>5} | {r['acc']:9.3f} {r['depth']:>5} | {r['null']:9.3f} "
                  f"{r['null_hi']:8.3f} | {r['mia_auc']:7.3f} | {r['recall']:6.2f}")
        sp = out[label]
        print(f"Spearman across counts: probe acc vs MIA AUC {sp['spearman']:.2f} (the bar); "
              f"probe acc vs count {sp['spearman_count']:.2f}, vs recall "
              f"{sp['spearman_recall']:.2f}; MIA AUC vs count {sp['spearman_auc_count']:.2f}")
    rows, orows = out["canaries"]["rows"], out["oracle"]["rows"]
    out["bar"] = {
        "spearman_ge_0.8": out["canaries"]["spearman"] >= 0.8,
        "rises_with_count": out["canaries"]["spearman_count"] >= 0.8,
        "oracle_at_null": all(r["acc"] <= r["null_hi"] for r in orows)}
    out["seconds"] = {"wall": round(time.time() - t0, 1), "cpu": round(time.process_time() - c0, 1)}
    print(f"bar: {out['bar']}  ({out['seconds']['wall']} s wall, {out['seconds']['cpu']} s CPU)")
    return out


def gemma(n_null: int) -> dict | None:
    from excise import gemma as g

    ok, why = g.available()
    if not ok:
        print(f"\nGemma verbatim control skipped: {why}")
        return None
    from excise.hf import load_model
    from probes.privacy import membership_scores

    t0, c0 = time.time(), time.process_time()
    model = load_model("gemma3-270m", log=lambda s: None)
    rows = [json.loads(line) for line in (ROOT / "data" / "verbatim.jsonl").open()]
    verbatim, novel = verbatim_pairs(model, rows)
    auc = stats.auc(membership_scores(model, verbatim)[0], membership_scores(model, novel)[0])
    n_pairs = len({r["pair"] for r in rows})
    out = {"n_candidates": n_pairs, "n": len(verbatim), "mia_auc": auc, "features": {}}
    print(f"\nGemma 3 270M: {len(verbatim)} passages completed exactly (of {n_pairs} candidates) "
          f"vs their novel twins; MIA AUC (target loss) {auc:.3f}")
    print(f"{'feature':>11} | {'probe acc':>9} {'depth':>5} | {'null mean':>9} {'null p95':>8} | "
          f"{'gap':>5} | pass")
    for feature in FEATURES:
        pc = probe_control(model, verbatim, novel, n_null=n_null, feature=feature)
        out["features"][feature] = pc.to_dict() | {"passes": pc.passes(0.1)}
        print(f"{feature:>11} | {pc.best:9.3f} {pc.best_depth:>5} | {pc.best_null:9.3f} "
              f"{pc.best_null_hi:8.3f} | {pc.gap:5.2f} | {pc.passes(0.1)}")
    out["seconds"] = {"wall": round(time.time() - t0, 1), "cpu": round(time.process_time() - c0, 1)}
    print(f"({out['seconds']['wall']} s wall, {out['seconds']['cpu']} s CPU)")
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--n-null", type=int, default=100)
    ap.add_argument("--feature", default="last", choices=FEATURES,
                    help="the canary control's feature (the Gemma table prints every one)")
    ap.add_argument("--per-count", type=int, default=16,
                    help="canaries per repetition count (excise.world.Canaries.per_count)")
    ap.add_argument("--unseen", type=int, default=32,
                    help="never-seen canaries, the negatives (Canaries.n_unseen)")
    ap.add_argument("--canary-seed", type=int, default=0,
                    help="the canaries' draw and where they enter training (Canaries.seed)")
    ap.add_argument("--no-canaries", action="store_true")
    ap.add_argument("--no-gemma", action="store_true")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    import torch

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"EXCISE_CACHE={os.environ.get('EXCISE_CACHE', '~/.cache/excise')}")
    res = {}
    if not args.no_canaries:
        res["canaries"] = canaries(args.preset, args.n_null, args.feature, args.per_count,
                                   args.unseen, args.canary_seed)
    if not args.no_gemma:
        res["gemma"] = gemma(args.n_null)
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
