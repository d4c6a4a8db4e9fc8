"""The default recipe's distillation confined to part of the model (issue 14: <= 10% of the
parameters), behaviour only.

    OMP_NUM_THREADS=2 python bench/undo_local.py [--people 150-159] [--alpha 0.8]
        [--steps 500] [--lr 3e-3] [--text-weight 1] [--text-batch 16]
        [--temperature 1.5] [--seed 0]
        [--units mlp attn attn0 ... fisher:6:attn fact_lookup:0.2:mlp] [--json out.json]

``configs/default.yaml``'s edit (``edit.distill``: shrink-and-perturb by ``alpha``, then 500
steps of distillation on the retain facts, retain text and shared facts' sentences, lr 3e-3
linear, batch 64, ``labels="hard_facts"``) reads deleted with every parameter as its units.
Here its units are a part of the model instead, each run on a fresh copy of the small organism:
whole components (``mlp``, ``attn``: every neuron / head; ``mlpL..``, ``attnL..``, ``blkL..``:
those of the layers named by the digits, ``blk`` both) or a localizer's top units
(``METHOD:K:WHERE``: ``K`` units, or a fraction when < 1, of ``locate.METHOD`` scored on the
request over ``WHERE`` = ``mlp`` neurons, ``attn`` heads or ``both``; ``params``: the top
parameter elements of a parameter-level score over every parameter - ``fisher``, ``grad_ratio``,
``saliency``, ``fisher_forget`` (the forget Fisher alone, ``fisher``'s forget part) or
``random`` (uniform scores, seeded by ``--seed``)). Prints the share of the
parameters the edit changed and the recall of each split (no attacks, no verdict: a screen for
the units that could get forget recall down to the oracle's at all); the retrain oracle's
behaviour is printed first for reference. Validation people by default (150..159, never a
reported request).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DEFAULT_UNITS = ["all", "mlp", "attn", "mlp01", "attn01", "blk0", "attn0", "attn1", "attn2",
                 "attn3", "fisher:6:attn", "grad_ratio:6:attn", "fisher:0.2:mlp",
                 "fact_lookup:0.2:mlp", "fact_lookup:0.1:both"]
WHERE = {"mlp": ["blocks.*.mlp.post"], "attn": ["blocks.*.attn.z"],
         "both": ["blocks.*.mlp.post", "blocks.*.attn.z"], "params": None}
PARAM_SCORES = ("fisher", "grad_ratio", "saliency", "fisher_forget", "random")
PARAMS_ONLY = {"saliency", "fisher_forget", "random"}  # no neuron / head scores
KEYS = ("forget_recall", "paraphrase_recall", "retain_recall", "shared_recall", "holdout_recall",
        "perplexity")


def component_units(spec: str, cfg) -> list | None:
    """The units of a component spec (``mlp``, ``attn1``, ``blk0`` ...); None if not one."""
    from excise.sites import Unit

    m = re.fullmatch(r"(mlp|attn|blk)(\d*)", spec)
    if m is None:
        return None
    layers = [int(d) for d in m[2]] or list(range(cfg.n_layers))
    if len(set(layers)) != len(layers) or max(layers) >= cfg.n_layers:
        raise ValueError(f"--units {spec}: name each layer once, one digit each, in "
                         f"0..{cfg.n_layers - 1}")
    units = []
    if m[1] in ("mlp", "blk"):
        units += [Unit(f"blocks.{layer}.mlp.post", (i,)) for layer in layers
                  for i in range(cfg.d_mlp)]
    if m[1] in ("attn", "blk"):
        units += [Unit(f"blocks.{layer}.attn.z", (h,)) for layer in layers
                  for h in range(cfg.n_heads)]
    return units


def parse_spec(spec: str, cfg, methods) -> tuple:
    """``("all",)``, ``("units", [Unit])`` or ``("located", method, k, where)``; a bad spec
    raises ValueError naming what is valid."""
    if spec == "all":
        return ("all",)
    units = component_units(spec, cfg)
    if units is not None:
        return ("units", units)
    parts = spec.split(":")
    known = parts[0] in (PARAM_SCORES if len(parts) == 3 and parts[2] == "params" else
                         set(methods) - PARAMS_ONLY)
    if len(parts) == 3 and known and parts[2] in WHERE:
        try:
            k = float(parts[1])
        except ValueError:
            k = -1.0
        if 0 < k < 1 or (k >= 1 and k == int(k)):
            return ("located", parts[0], int(k) if k >= 1 else k, parts[2])
        raise ValueError(f"--units {spec}: K={parts[1]!r} must be a count >= 1 or a fraction "
                         f"in (0, 1)")
    raise ValueError(f"--units {spec!r}: give all, mlp|attn|blk[LAYERS] or METHOD:K:WHERE "
                     f"(METHOD one of {sorted(methods)}, WHERE one of {list(WHERE)}; with "
                     f"params: METHOD one of {list(PARAM_SCORES)})")


def located(method: str, where: str, model, req, seed: int):
    """The Importance a ``METHOD:K:WHERE`` spec takes its top ``K`` from."""
    import locate
    from excise.importance import Importance

    if where != "params":
        return locate.METHODS[method](model, req, WHERE[where])
    if method == "random":
        g = torch.Generator().manual_seed(seed)
        return Importance("random", {s: torch.rand(p.shape, generator=g)
                                     for s, p in model.named_parameters().items()}, {})
    if method == "fisher_forget":
        f = locate.fisher(model, req)
        return Importance("fisher_forget", dict(f.parts["forget"]), dict(f.meta))
    return locate.METHODS[method](model, req)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--organism-seed", type=int, default=0)
    ap.add_argument("--people", default="150-159", help="A-B: the request's forget people")
    ap.add_argument("--alpha", type=float, default=0.8)
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--lr", type=float, default=3e-3, help="the distillation's peak rate")
    ap.add_argument("--text-weight", type=float, default=1.0,
                    help="the retain text's weight against the retain facts")
    ap.add_argument("--text-batch", type=int, default=None,
                    help="retain-text rows per step (default: the batch size, 64)")
    ap.add_argument("--temperature", type=float, default=1.0,
                    help="the teacher's whole distributions softened to softmax(logits / T)")
    ap.add_argument("--seed", type=int, default=0, help="the edit's seed")
    ap.add_argument("--units", nargs="+", default=DEFAULT_UNITS)
    ap.add_argument("--json", default="")
    a = ap.parse_args()
    from edit.distill import DistillSettings

    try:  # the distillation's own checks, before anything runs
        DistillSettings(alpha=a.alpha, steps=a.steps, lr=a.lr, batch_size=64,
                        text_weight=a.text_weight, labels="hard_facts", seed=a.seed,
                        text_batch=a.text_batch, temperature=a.temperature)
    except ValueError as e:
        ap.error(str(e))

    import edit
    import excise
    import locate
    from excise.sites import Selection
    from probes.behaviour import behaviour_metrics

    try:
        first, last = (int(x) for x in a.people.split("-"))
    except ValueError:
        first, last = 1, 0
    if first > last:
        ap.error(f"--people {a.people!r}: give a range FIRST-LAST, e.g. 150-159")
    org = excise.organism(a.preset, seed=a.organism_seed, progress=False)
    req = org.request(list(range(first, last + 1)))
    total = org.model.n_parameters()
    cfg = org.model.model.cfg
    try:  # every spec checked before anything runs
        specs = [(spec, parse_spec(spec, cfg, locate.METHODS)) for spec in a.units]
    except ValueError as e:
        ap.error(str(e))
    rows, scores = [], {}

    def show(name: str, b: dict, extra: str = "") -> None:
        print(f"{name:24s} {extra}" + " ".join(f"{k.replace('_recall', '')} {b[k]:.3f}"
                                               for k in KEYS), flush=True)

    for name, m in (("original", org.model), ("retrain oracle", org.oracle(req))):
        b = behaviour_metrics(m, req)
        rows.append({"units": name, **{k: b[k] for k in KEYS}})
        show(name, b)
    for spec, parsed in specs:
        if parsed[0] == "all":
            units = "all"
        elif parsed[0] == "units":
            units = parsed[1]
        else:
            _, method, k, where = parsed
            if (method, where) not in scores:
                scores[method, where] = located(method, where, org.model, req, a.seed)
            units = list(scores[method, where].top(k).units)
        m = org.model.clone()
        t = time.time()
        e = edit.distill(m, units=units if units == "all" else Selection(tuple(units),
                                                                          source=spec),
                         request=req, alpha=a.alpha, steps=a.steps, lr=a.lr, batch_size=64,
                         text_weight=a.text_weight, text_batch=a.text_batch,
                         temperature=a.temperature,
                         labels="hard_facts", shared_text=True,
                         schedule="linear", seed=a.seed)
        secs = time.time() - t
        b = behaviour_metrics(m, req)
        share = e.n_changed() / total
        n = "all" if units == "all" else len(units)
        rows.append({"units": spec, "n_units": n, "params_share": share, "edit_seconds": secs,
                     **{k: b[k] for k in KEYS}})
        show(spec, b, f"{n!s:>5} units, {100 * share:5.1f}% params, {secs:3.0f} s: ")
    if a.json:
        from excise.io import atomic_write_text
        atomic_write_text(a.json, json.dumps({"args": vars(a), "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
