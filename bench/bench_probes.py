"""The whole verification suite on the `small` organism (with its retrain oracle), timed.

    EXCISE_CACHE=/tmp/exc OMP_NUM_THREADS=1 python bench/bench_probes.py [--preset small]
        [--forget 10] [--edit dampen|none] [--out DIR] [--engines]

Verifies the model edited by the localized recipe (grad_ratio + SSD dampening, configs/dampen.yaml)
beside the original and the oracle, and prints the metric table, the verdict and seconds per
suite. ``--engines``: the whole suite three times instead: the fine-tuning and steering attacks,
the quantization reads and the behaviour and privacy reads on the fused path with the grid's
settings run at once (``AttackConfig.workers`` left to its default: one per torch thread here),
on the fused path one setting at a time (``workers: 1``), and on the serial (TransformerLens)
path one setting at a time - the suite before either speed-up (``AttackConfig.engine``; excise's
own paths, same steps, learning rates, batches, people and seeds): seconds of each, the ratios
against the serial path, whether the attack grids and recalls agree exactly, and how far the
other metrics (sums of log-probabilities through two forwards) differ. Needs the organism and
its oracle in the cache (trains them otherwise - minutes).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="small")
    ap.add_argument("--forget", type=int, default=10)
    ap.add_argument("--edit", default="dampen", choices=["dampen", "none"])
    ap.add_argument("--out", default=None)
    ap.add_argument("--engines", action="store_true",
                    help="time the suite with the serial attack engine against the fused one")
    a = ap.parse_args()

    import torch

    import excise
    import probes
    from excise import config as C
    from excise.app import pipeline

    t0 = time.time()
    org = excise.organism(a.preset, progress=False)
    req = org.request(forget_people=range(a.forget))
    oracle = org.oracle(req)
    t_load = time.time() - t0
    original = org.model.clone()
    edited = org.model.clone()
    t1 = time.time()
    if a.edit == "dampen":  # the localized recipe its README numbers were measured on
        cfg = C.load(C.DEFAULT_CONFIG.parent / "dampen.yaml", [], pipeline.registries())
        regs = pipeline.registries()
        torch.manual_seed(cfg.seed)
        imp = regs["locate"][cfg.locate.method](edited, req, cfg.locate.sites,
                                                **cfg.locate.params)
        units = imp.top(cfg.select.top, cfg.select.sites) if cfg.select.top is not None else None
        regs["edit"][cfg.edit.method](edited, imp, units, **cfg.edit.params)
    t_edit = time.time() - t1
    if a.engines:
        return engines(edited, req, oracle, original)
    t2 = time.time()
    rep = probes.verify(edited, req, oracle=oracle, suite="all", label="after",
                        original=original)
    t_verify = time.time() - t2
    print(rep.summary_text())
    print(f"\nverdict: {rep.verdict}\nrule: {rep.verdict_rule}")
    for name, att in rep.extra["attacks"].items():
        print(f"attack {name:10s} x={list(att.x)}")
        for lab, c in att.curves.items():
            print(f"    {lab:7s} " + " ".join(f"{y:.2f}" for y in c.y))
    print(f"\nload {t_load:.1f} s, edit {t_edit:.1f} s, verify (all suites) {t_verify:.1f} s "
          f"on {torch.get_num_threads()} thread(s)")
    print("per suite:", rep.extra["verify_seconds"])
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        rep.plots = [os.path.basename(p) for p in probes.write_plots(rep, a.out)]
        rep.save(a.out)
        print(f"report: {a.out}")


def engines(edited, req, oracle, original) -> None:
    """The whole suite (quick grid) with each attack engine, fused first; no store, no cache."""
    import torch

    import probes

    reps, secs = {}, {}
    paths = {"fused": {"engine": "fused"},  # settings at once (workers: one per thread)
             "fused-1": {"engine": "fused", "workers": 1},
             "serial": {"engine": "serial", "workers": 1}}
    for name, attacks in paths.items():
        t = time.perf_counter()
        reps[name] = probes.verify(edited, req, oracle=oracle, suite="all", label="after",
                                   original=original, attacks=attacks)
        secs[name] = time.perf_counter() - t
        print(f"{name:7s} {secs[name]:6.1f} s  per suite: {reps[name].extra['verify_seconds']}",
              flush=True)
    print(f"fused, one setting at a time: {secs['serial'] / secs['fused-1']:.2f}x the serial "
          f"path; attack grid identical to the serial path's: "
          f"{reps['fused-1'].extra['attack_grid'] == reps['serial'].extra['attack_grid']}")
    f, s = reps["fused"], reps["serial"]
    grids = f.extra["attack_grid"] == s.extra["attack_grid"]
    # recalls are counts of facts: identical or not; perplexity, membership scores and
    # exposures are sums of log-probabilities read through two forwards: float noise
    keys = f.metrics.keys() == s.metrics.keys() and all(
        f.metrics[m].keys() == s.metrics[m].keys() for m in f.metrics)
    def same(a, b) -> bool:  # nan on both paths counts as the same reading
        return a == b or (a != a and b != b)

    pairs = [(m, k, a, s.metrics[m][k]) for m in f.metrics for k, a in f.metrics[m].items()
             if keys and isinstance(a, (int, float))]
    diffs = {(m, k): (abs(a - b) / max(abs(b), 1e-12) if a == a and b == b else float("inf"))
             for m, k, a, b in pairs if not same(a, b)}
    worst = max(diffs.items(), key=lambda kv: kv[1], default=(None, 0.0))
    recalls = keys and all(same(a, b) for m, k, a, b in pairs if k.endswith("recall"))
    if not keys:
        print("the two paths report different metrics: "
              f"{sorted(f.metrics)} / {sorted(s.metrics)}")
    print(f"suite all, quick grid, {torch.get_num_threads()} thread(s): serial, one setting at "
          f"a time {secs['serial']:.1f} s, fused with settings at once {secs['fused']:.1f} s: "
          f"{secs['serial'] / secs['fused']:.2f}x; attack grids identical: {grids}; every "
          f"recall identical: {recalls}; other metrics: {len(diffs)} differ, at most "
          f"{worst[1]:.1e} relative ({worst[0]}); verdict {f.verdict} / {s.verdict}")


if __name__ == "__main__":
    main()
