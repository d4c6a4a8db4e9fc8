"""Global UNDO-style distillation on the natural organism, judged by the verdict (issue 14).

Every weight (``--select METHOD:FRACTION``: only the top fraction of a parameter-level locate
method's scores, located on the request in the teacher as it stands before any NPO - e.g.
``saliency:0.1``, stop 43's recipe over every site;
``METHOD:FRACTION:SITES``: the top FRACTION of the elements of those parameter sites only,
patterns joined by '+', e.g. configs/saliency.yaml's recipe with ``--alpha 1 --steps 1000
--lr 3e-3 --schedule linear --oracles 2``:
``saliency:0.1:blocks.*.attn.*+blocks.*.mlp.*+embed.*+pos_embed.*+unembed.*``) shrunk and
perturbed by ``alpha`` (``theta <- (1 - alpha) theta + alpha fresh``),
then the original distilled back into it (``edit.distill(units="all", labels="hard_facts",
shared_text=True)``) on retain data: the retain facts, the retain text and the shared facts'
sentences; ``--teacher-npo`` first applies global NPO to the teacher (the UNDO chain). Each
request (the sweep's 5% split: seed s forgets people 50s..50s+9) is judged by
``probes.verify(suite="verdict")`` against one retrain oracle, or with ``--oracles N`` against N
(training seeds organism-seed, + 1, ...: ``excise.organism.retrain_oracles``; the most
favourable verdict - the calibration's rule, though its oracles skip seed s + 1, its retrain
case).

    OMP_NUM_THREADS=2 python bench/undo_global.py --seeds 0 1 2 --alpha 0.8 --lr 3e-3
        --schedule linear [--grid quick|full] [--steps 1000] [--people 150-159]
        [--organism-seed 1] [--oracles 2] [--edit-seeds 2 3] [--teacher oracle-2]
        [--select saliency:0.1[:SITES]] [--text-batch 16] [--temperature 1.5]
        [--teacher-npo '{"steps": 20, "lr": 2e-4}'] [--json out.json]

``--alpha``, ``--lr`` and ``--schedule`` take several values: every combination runs on each
request, the oracle's and the original's measurements made once per request. ``--people A-B``
judges one request (those people; seed = the first ``--seeds``) instead of the sweep's 5%
split: the validation people 150..159 for choosing settings. The defaults (alpha 0.8, lr 1e-3,
constant) are stop 36's; configs/undo.yaml's recipe is alpha 0.8, lr 3e-3 with the linear
schedule, chosen on people 150..159 (docs/results/deletion-undo-linear.json; stop 36:
deletion-undo-global.json). ``--edit-seeds`` runs each edit at these seeds instead of the
request's (the perturbation and the batches; the attacks, the SAE and the verdict stay seeded
with the request's seed, so only the edit's randomness varies); ``--teacher oracle-T`` distills
a retrain oracle (training seed T, never one of the judging oracles) instead of the original -
the control that tells what the original's outputs carry about the forget people from what
distillation itself does; with alpha < 1 the student also starts from that oracle's weights.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--organism-seed", type=int, default=0)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--alpha", type=float, nargs="+", default=[0.8])
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--lr", type=float, nargs="+", default=[1e-3])
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--text-batch", type=int, default=None,
                    help="retain-text rows per step (default: --batch-size)")
    ap.add_argument("--temperature", type=float, default=1.0,
                    help="the teacher's whole distributions softened to softmax(logits / T)")
    ap.add_argument("--schedule", nargs="+", default=["constant"],
                    choices=("constant", "linear"))
    ap.add_argument("--people", default="", help="A-B: one request of these people")
    ap.add_argument("--grid", default="quick")
    ap.add_argument("--oracles", type=int, default=1, help="retrain oracles the verdict judges "
                    "against (training seeds organism-seed, + 1, ...: the most favourable "
                    "verdict)")
    ap.add_argument("--teacher-npo", default="", help="JSON finetune settings of a global NPO "
                    "teacher (default: the original is the teacher)")
    ap.add_argument("--edit-seeds", type=int, nargs="+", default=None,
                    help="seeds of the edit's perturbation and batches, instead of the "
                         "request's seed (attacks and verdict keep it); several: one edit each")
    ap.add_argument("--teacher", default="original",
                    help="whose outputs are distilled: 'original', or 'oracle-T': the retrain "
                         "oracle of training seed T (never saw the forget people; T must not be "
                         "one of the judging oracles' seeds)")
    ap.add_argument("--engine", default="fused", choices=("fused", "serial"),
                    help="the student's forward (edit.distill's engine; runs before stop 40: "
                         "serial)")
    ap.add_argument("--select", default="all",
                    help="the weights the edit re-draws: 'all', or 'METHOD:FRACTION[:SITES]' - "
                         "the top fraction of a parameter-level locate method's scores (e.g. "
                         "saliency:0.1), located on each request; SITES: parameter site "
                         "patterns joined by '+' (e.g. 'blocks.*+embed.*'), the fraction then "
                         "of those sites' elements (Importance.top(fraction, sites))")
    ap.add_argument("--json", default="")
    a = ap.parse_args()
    from edit.distill import DistillSettings

    try:  # the distillation's own checks, before any oracle trains
        for alpha, lr in itertools.product(a.alpha, a.lr):
            DistillSettings(alpha=alpha, steps=a.steps, lr=lr, batch_size=a.batch_size,
                            labels="hard_facts", text_batch=a.text_batch,
                            temperature=a.temperature)
    except ValueError as e:
        ap.error(str(e))

    import edit
    import excise
    import locate
    import probes
    from excise.app.calibrate import judge
    from excise.organism import oracle_or_oracles
    from probes import attacks as A

    org = excise.organism(a.preset, seed=a.organism_seed, progress=False)
    if a.oracles < 1:
        ap.error(f"--oracles {a.oracles}: need at least one retrain oracle")
    judges = range(org.seed, org.seed + a.oracles)  # excise.organism.retrain_oracles' seeds
    teacher_seed = None
    if a.teacher != "original":
        match = re.fullmatch(r"oracle-(\d+)", a.teacher)
        if match is None or int(match[1]) in judges:
            ap.error(f"--teacher {a.teacher!r}: give 'original' or 'oracle-T', T an integer not "
                     f"among the judging oracles' training seeds {list(judges)}")
        teacher_seed = int(match[1])
    try:  # the selection and its sites checked before any oracle trains
        select = locate.parse_select(a.select, org.model)
    except ValueError as e:
        ap.error(f"--select: {e}")
    rows = []
    if a.people:
        try:
            first, last = (int(x) for x in a.people.split("-"))
        except ValueError:
            ap.error(f"--people {a.people!r}: give a range FIRST-LAST, e.g. 150-159")
        requests = [(a.seeds[0], list(range(first, last + 1)))]
    else:
        requests = [(s, list(range(50 * s, 50 * s + 10))) for s in a.seeds]
    for s, people in requests:
        req = org.request(people)
        t = time.time()
        oracle = oracle_or_oracles(org, req, a.oracles)
        oracle_s = time.time() - t
        # one SAE and one verify-settings object per request: the oracle's and the original's
        # measurements are cached under them (the cache keys on the SAE's identity)
        cfg = probes.VerifySettings(suite="verdict", seed=s, grid=a.grid).attack_config()
        kit = A.steering_kit(org.model, req, cfg)
        verify_kw = {"grid": a.grid, "sae": (kit[0], kit[2])}
        cache: dict = {}
        t = time.time()
        teacher = org.model if teacher_seed is None else org.oracle(req, train_seed=teacher_seed)
        teacher_s = time.time() - t
        t = time.time()
        units = "all" if select is None else \
            locate.METHODS[select[0]](teacher, req).top(select[1], select[2])
        locate_s = time.time() - t
        for alpha, lr, schedule, es in itertools.product(a.alpha, a.lr, a.schedule,
                                                         a.edit_seeds or [s]):
            t = time.time()
            # distill's teacher is the model as it stands (the original or an oracle, NPO'd or
            # not); alpha < 1 keeps (1 - alpha) of its weights in the student
            m = teacher.clone()
            if a.teacher_npo:
                edit.finetune(m, units="all", request=req, method="npo", seed=es,
                              **json.loads(a.teacher_npo))
            e = edit.distill(m, units=units, request=req, alpha=alpha, shared_text=True,
                         steps=a.steps, lr=lr, batch_size=a.batch_size, labels="hard_facts",
                         text_batch=a.text_batch, temperature=a.temperature,
                         seed=es, schedule=schedule, engine=a.engine)
            build = time.time() - t + locate_s
            row = judge("distill", m, req, oracle, org.model, s, people, build, cache=cache,
                        verify_kw=verify_kw)
            rows.append(dataclasses.asdict(row) | {"oracle_seconds": round(oracle_s, 1),
                                                   "alpha": alpha, "lr": lr,
                                                   "schedule": schedule, "edit_seed": es,
                                                   "engine": a.engine,
                                                   "teacher": a.teacher,
                                                   "select": a.select,
                                                   "text_batch": a.text_batch,
                                                   "temperature": a.temperature,
                                                   # the distillation's own change (not NPO's)
                                                   "params_share": e.n_changed()
                                                   / m.n_parameters(),
                                                   "teacher_seconds": round(teacher_s, 1)})
            k = row.metrics
            pp = row.detail.get("checks", {}).get("utility_perplexity", {})
            vs_orig = (f" (/ original {pp['model'] / pp['original']:.3f})"
                       if pp.get("original") else "")
            print(f"seed {s} (people {people[0]}..{people[-1]}), alpha {alpha:g}, lr {lr:g} "
                  f"{schedule}, edit seed {es}, teacher {a.teacher}: "
                  f"{row.got}; failed {row.failed}, open {row.open}; forget {k['forget']:.3f} "
                  f"(oracle {k['oracle_forget']:.3f}), retain {k['retain']:.3f}, shared "
                  f"{k['shared']:.3f}, ppl / chosen oracle {k['ppl_ratio']:.3f}{vs_orig}, "
                  f"MIA {k['mia']:.3f} (oracle {k['oracle_mia']:.3f}), worst attack upper "
                  f"{max(v for v in k['attack_uppers'].values() if v is not None):.3f}; "
                  f"{100 * rows[-1]['params_share']:.2f}% of the parameters changed, edit "
                  f"{build:.0f} s, oracle training {oracle_s:.0f} s (0: cached)", flush=True)
            for o in row.detail.get("oracles", []):  # several oracles: each one's verdict
                print(f"    oracle {o['index']}: {o['verdict']}{' (chosen)' * o['chosen']}; "
                      f"failed {o['failed']}, open {o['open']}", flush=True)
    if a.json:
        from excise.io import atomic_write_text
        atomic_write_text(a.json, json.dumps({"args": vars(a), "rows": rows}, indent=1,
                                             default=str) + "\n")


if __name__ == "__main__":
    main()
