"""The deletion sweep: which locate x edit recipe deletes facts on the `small` organism, at what
cost? Writes docs/results.md, docs/results/*.png and docs/results/sweep.json.

    EXCISE_CACHE=/tmp/exc OMP_NUM_THREADS=2 python bench/sweep.py [--out docs] [--seeds 0 1 2]

Protocol (the rules are printed into docs/results.md):

1. **Screen on validation people** (150..159, never reported): every locate method x every edit
   it applies to (``PAIRS``; pairs that cannot apply are listed, not run) plus the global
   baselines, each over a small hyperparameter grid (``GRID``). Cheap behaviour metrics only.
   Per pair the setting kept is the one with the lowest forget recall among those that meet the
   utility bar (retain and shared >= 98% of the original, perplexity within 2%, <= 1% of
   parameters); if none does, the one with the lowest penalised score.
2. **Prune by a stated rule:** keep the pairs whose kept setting is not dominated on validation in
   (forget recall, retain recall, perplexity), at most ``--finalists`` of them by score, plus the
   three global baselines as references.
3. **Report** the finalists on forget splits of 1% / 5% / 10% of the people (2 / 10 / 20 people,
   TOFU's forget01/05/10), 3 seeds each (seed s forgets people 50 s .. 50 s + n - 1), each with
   its retrain oracle and the full ``probes.verify`` suite (attacks at the tuned defaults).
   Importance is computed once per (method, request) and shared across edits; the oracle's and
   the original's metrics are computed once per request (``verify(cache=...)``).
4. **The bar** (5% split) is checked per seed and summarised.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SPLITS = {"forget01": 2, "forget05": 10, "forget10": 20}
VALIDATION = 150  # validation people start here (150..159 for the screen)
LOCATORS = ("fisher", "grad_ratio", "activations", "causal_trace", "sae", "circuit")
EDITS = ("prune", "dampen", "noise+finetune", "project", "finetune")
GLOBAL = ("global ga", "global gd", "global npo")
# the hyperparameter grid per edit (tuned on validation people only)
GRID = {
    "prune": [{"top": t} for t in (2, 8, 32)],  # units (neurons / heads / latents)
    "dampen": [{"alpha": a, "lam": 1.0} for a in (3.0, 5.0, 10.0)],
    "noise+finetune": [{"noise_top": 0.001, "scale": s, "top": 32, "steps": 30, "lr": 1e-2}
                       for s in (1.0, 3.0)],
    "project": [{"top": t} for t in (0.01, 0.05)],
    "finetune": [{"method": "gd", "top": t, "steps": 30, "lr": lr}
                 for t, lr in ((8, 1e-2), (32, 1e-2), (32, 3e-3))],
    "global": [{"steps": 20, "lr": lr} for lr in (1e-4, 2e-4)],
}


def locate_all(model, req, names, stats_cache, log):
    import locate

    kw = {"fisher": dict(estimator="example", cache=stats_cache),
          "grad_ratio": dict(cache=stats_cache), "activations": {},
          "causal_trace": dict(max_facts=32), "sae": {}, "circuit": dict(cache=stats_cache)}
    out, secs = {}, {}
    for n in names:
        t = time.time()
        out[n] = locate.METHODS[n](model, req, **kw[n])
        secs[n] = round(time.time() - t, 1)
        log(f"  locate {n}: {secs[n]} s")
    return out, secs


def applicable(loc: str, ed: str, imp) -> str | None:
    """None when the pair applies, else the reason it cannot."""
    if loc == "sae" and ed != "prune":
        return "SAE latents are not weights: only latent ablation (prune) applies"
    if ed == "dampen" and not {"forget", "retain"} <= set(imp.parts or {}):
        return "SSD dampening needs forget and retain statistics per unit"
    return None


def apply_edit(model, req, imp, ed: str, hp: dict):
    """Apply one edit setting; returns the edits (revert last-in first-out)."""
    import edit

    if ed == "prune":
        return [edit.prune(model, imp, top=hp["top"], request=req)]
    if ed == "dampen":
        return [edit.dampen(model, imp, alpha=hp["alpha"], lam=hp["lam"])]
    if ed == "noise+finetune":  # GRIN-style: noise on the located elements, then repair/forget
        e1 = edit.noise(model, imp, top=hp["noise_top"], scale=hp["scale"])
        e2 = edit.finetune(model, imp, request=req, method="gd", top=hp["top"],
                           steps=hp["steps"], lr=hp["lr"])
        return [e1, e2]
    if ed == "project":
        return [edit.project(model, imp, request=req, top=hp["top"])]
    if ed == "finetune":
        return [edit.finetune(model, imp, request=req, method=hp["method"], top=hp["top"],
                              steps=hp["steps"], lr=hp["lr"])]
    if ed.startswith("global "):
        return [edit.finetune(model, None, "all", request=req, method=ed.split()[1],
                              steps=hp["steps"], lr=hp["lr"])]
    raise ValueError(ed)


def changed_fraction(model, edits) -> float:
    return sum(e.manifest["params_changed"] for e in edits) / model.n_parameters()


def bar_penalty(m: dict, base: dict, frac: float) -> float:
    """0 when the utility side of the bar holds; grows with each violation."""
    p = max(0.0, 0.98 * base["retain_recall"] - m["retain_recall"])
    p += max(0.0, 0.98 * base["shared_recall"] - m["shared_recall"])
    p += max(0.0, m["perplexity"] / base["perplexity"] - 1.02)
    p += max(0.0, frac - 0.01) * 10
    return p


def screen(org, log, only=None):
    from locate._grads import StatsCache
    from probes.behaviour import behaviour_metrics

    req = org.request(forget_people=range(VALIDATION, VALIDATION + SPLITS["forget05"]))
    base = behaviour_metrics(org.model, req)
    imps, secs = locate_all(org.model, req, only or LOCATORS, StatsCache(), log)
    rows, skipped = [], []
    pairs = [(lo, ed) for lo in imps for ed in EDITS] + [(None, g) for g in GLOBAL]
    for lo, ed in pairs:
        imp = imps.get(lo)
        why = applicable(lo, ed, imp) if lo else None
        if why:
            skipped.append({"locate": lo, "edit": ed, "why": why})
            continue
        for hp in GRID["global" if lo is None else ed]:
            t = time.time()
            try:
                edits = apply_edit(org.model, req, imp, ed, hp)
            except ValueError as e:
                rows.append({"locate": lo, "edit": ed, "hp": hp, "error": str(e)[:200]})
                continue
            try:
                m = behaviour_metrics(org.model, req)
                frac = changed_fraction(org.model, edits)
            finally:
                for e in reversed(edits):
                    e.revert()
            pen = bar_penalty(m, base, frac)
            rows.append({"locate": lo, "edit": ed, "hp": hp, "forget": m["forget_recall"],
                         "retain": m["retain_recall"], "shared": m["shared_recall"],
                         "ppl": m["perplexity"], "params": frac, "penalty": pen,
                         "score": m["forget_recall"] + 2 * pen,
                         "seconds": round(time.time() - t, 1)})
            r = rows[-1]
            log(f"  {lo or '-':13s} {ed:15s} {json.dumps(hp):60s} forget {r['forget']:.3f} "
                f"retain {r['retain']:.3f} ppl {r['ppl']:.2f} params {frac:.4f}")
    return {"base": base, "rows": rows, "skipped": skipped, "locate_seconds": secs}


def choose(screen_res, n_finalists: int):
    """Per pair the kept setting, then the undominated pairs (plus the global baselines)."""
    best = {}
    for r in screen_res["rows"]:
        if "error" in r:
            continue
        k = (r["locate"], r["edit"])
        feasible = r["penalty"] == 0
        key = (not feasible, r["forget"] if feasible else r["score"])
        if k not in best or key < best[k][0]:
            best[k] = (key, r)
    kept = {k: v[1] for k, v in best.items()}

    def dominated(a, b):  # b dominates a
        ge = (b["forget"] <= a["forget"] and b["retain"] >= a["retain"] and
              b["ppl"] <= a["ppl"])
        gt = (b["forget"] < a["forget"] or b["retain"] > a["retain"] or b["ppl"] < a["ppl"])
        return ge and gt

    local = [r for k, r in kept.items() if k[0] is not None]
    front = [a for a in local if not any(dominated(a, b) for b in local if b is not a)]
    front.sort(key=lambda r: r["score"])
    finalists = front[:n_finalists] + [r for k, r in kept.items() if k[0] is None]
    return kept, finalists


def report_stage(org, finalists, seeds, splits, log):
    import probes
    from locate._grads import StatsCache

    rows, curves = [], {}
    stats_cache = StatsCache()
    original = org.model.clone()  # before any edit: verify's "before" column and SAE source
    for split in splits:
        n = SPLITS[split]
        for seed in seeds:
            people = range(50 * seed, 50 * seed + n)
            req = org.request(forget_people=people)
            t = time.time()
            oracle = org.oracle(req)
            log(f"{split} seed {seed}: people {people.start}..{people.stop - 1} "
                f"(oracle {time.time() - t:.0f} s)")
            need = sorted({f["locate"] for f in finalists if f["locate"]})
            imps, _ = locate_all(org.model, req, need, stats_cache, log)
            vcache: dict = {}
            for f in finalists:
                t = time.time()
                edits = apply_edit(org.model, req, imps.get(f["locate"]), f["edit"], f["hp"])
                try:
                    frac = changed_fraction(org.model, edits)
                    rep = probes.verify(org.model, req, oracle=oracle, suite="all",
                                        label="after", original=original, seed=seed,
                                        cache=vcache)
                finally:
                    for e in reversed(edits):
                        e.revert()
                row = {"split": split, "seed": seed, "locate": f["locate"], "edit": f["edit"],
                       "hp": f["hp"], "params": frac, "verdict": rep.verdict,
                       "metrics": rep.metrics, "seconds": round(time.time() - t, 1)}
                row["loo_gap"] = {k: _loo_gap(rep, k) for k in rep.metrics}
                rl = rep.extra["attacks"]["relearn"]["curves"]  # at equal steps
                row["relearn_gap"] = max(e - o for e, o in zip(rl["after"], rl["oracle"]))
                rows.append(row)
                if split == "forget05" and seed == seeds[0]:
                    curves[_name(f)] = rep.extra["attacks"]
                a, o = rep.metrics["after"], rep.metrics["oracle"]
                log(f"  {_name(f):32s} forget {a['forget_recall']:.3f} (oracle "
                    f"{o['forget_recall']:.3f}) retain {a['retain_recall']:.3f} ppl "
                    f"{a['perplexity']:.2f} mia {a['mia_auc_loss']:.2f} relearn "
                    f"{a['attack_relearn']:.2f}/{o['attack_relearn']:.2f} {rep.verdict} "
                    f"[{row['seconds']} s]")
    return rows, curves


def _loo_gap(rep, label) -> float:
    c = rep.extra.get("loo_probe", {}).get("curves", {}).get(label)
    if not c or "null" not in c:
        return float("nan")
    return max(a - n for a, n in zip(c["balanced"], c["null"]))


def _name(f) -> str:
    return f["edit"] if f["locate"] is None else f"{f['locate']} + {f['edit']}"


def bar_checks(row) -> dict[str, bool]:
    a, b, o = (row["metrics"][k] for k in ("after", "before", "oracle"))
    return {
        "forget <= oracle + 2pt": a["forget_recall"] <= o["forget_recall"] + 0.02,
        "retain >= 98%": a["retain_recall"] >= 0.98 * b["retain_recall"],
        "shared >= 98%": a["shared_recall"] >= 0.98 * b["shared_recall"],
        "ppl within 2%": abs(a["perplexity"] / b["perplexity"] - 1) <= 0.02,
        "MIA within 0.05 of oracle": abs(a["mia_auc_loss"] - o["mia_auc_loss"]) <= 0.05,
        "LOO <= chance + 5pt": row["loo_gap"]["after"] <= 0.05,
        "relearn <= oracle + 5pt": row["relearn_gap"] <= 0.05,
        "<= 1% params": row["params"] <= 0.01,
    }


# -- docs/results.md ---------------------------------------------------------------------------
COLUMNS = [("forget", lambda r: r["metrics"]["after"]["forget_recall"]),
           ("oracle forget", lambda r: r["metrics"]["oracle"]["forget_recall"]),
           ("retain", lambda r: r["metrics"]["after"]["retain_recall"]
            / r["metrics"]["before"]["retain_recall"]),
           ("shared", lambda r: r["metrics"]["after"]["shared_recall"]
            / r["metrics"]["before"]["shared_recall"]),
           ("ppl change", lambda r: r["metrics"]["after"]["perplexity"]
            / r["metrics"]["before"]["perplexity"] - 1),
           ("MIA AUC", lambda r: r["metrics"]["after"]["mia_auc_loss"]),
           ("oracle MIA", lambda r: r["metrics"]["oracle"]["mia_auc_loss"]),
           ("LOO gap", lambda r: r["loo_gap"]["after"]),
           ("relearn", lambda r: r["metrics"]["after"]["attack_relearn"]),
           ("oracle relearn", lambda r: r["metrics"]["oracle"]["attack_relearn"]),
           ("relearn gap", lambda r: r["relearn_gap"]),
           ("params", lambda r: r["params"])]


def _ms(vals) -> str:
    vals = [v for v in vals if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return "n/a"
    if len(vals) == 1:
        return f"{vals[0]:.3f}"
    return f"{statistics.mean(vals):.3f} ± {statistics.stdev(vals):.3f}"


def table(rows, split) -> list[str]:
    names = list(dict.fromkeys(_name(r) for r in rows if r["split"] == split))
    head = "| recipe | " + " | ".join(c for c, _ in COLUMNS) + " | verdicts | bar |"
    out = [head, "|" + "---|" * (len(COLUMNS) + 3)]
    for n in names:
        rs = [r for r in rows if r["split"] == split and _name(r) == n]
        cells = [_ms([f(r) for r in rs]) for _, f in COLUMNS]
        verdicts = ", ".join(f"{v} {sum(r['verdict'] == v for r in rs)}"
                             for v in dict.fromkeys(r["verdict"] for r in rs))
        met = sum(all(r["bar"].values()) for r in rs)
        out.append(f"| {n} | " + " | ".join(cells) + f" | {verdicts} | {met}/{len(rs)} |")
    return out


def binding(rows) -> list[str]:
    """Per recipe on the 5% split: which bar constraints fail, on how many seeds."""
    out = []
    for n in dict.fromkeys(_name(r) for r in rows if r["split"] == "forget05"):
        rs = [r for r in rows if r["split"] == "forget05" and _name(r) == n]
        fails = {}
        for r in rs:
            for k, ok in r["bar"].items():
                if not ok:
                    fails[k] = fails.get(k, 0) + 1
        txt = ", ".join(f"{k} ({v}/{len(rs)})" for k, v in fails.items()) or "none"
        out.append(f"- **{n}**: fails {txt}")
    return out


UTILITY = ("retain >= 98%", "shared >= 98%", "ppl within 2%", "<= 1% params")


def recommend(rows) -> tuple[str, dict]:
    """The default recipe, when none meets the whole bar: among the recipes that keep the utility
    side of the bar (retain, shared, perplexity, <= 1% parameters) on most seeds of the 5% split,
    the one that forgets most (lowest mean forget recall above the oracle's); if none keeps
    utility, the one meeting the most bar conditions."""
    score = {}
    for n in dict.fromkeys(_name(r) for r in rows if r["split"] == "forget05"):
        rs = [r for r in rows if r["split"] == "forget05" and _name(r) == n]
        keeps = sum(all(r["bar"][k] for k in UTILITY) for r in rs) > len(rs) / 2
        met = statistics.mean(sum(r["bar"].values()) for r in rs)
        excess = statistics.mean(r["metrics"]["after"]["forget_recall"]
                                 - r["metrics"]["oracle"]["forget_recall"] for r in rs)
        score[n] = ((keeps, -excess) if keeps else (keeps, met), rs[0])
    best = max(score, key=lambda n: score[n][0])
    return best, score[best][1]


def pareto_plot(res, path):
    from excise import plots as P

    ax = P._axes(None, (6.5, 4.2))
    base = res["screen"]["base"]
    for r in res["screen"]["rows"]:
        if "error" not in r:
            ax.scatter(r["retain"] / base["retain_recall"], r["forget"], s=12, color="0.75",
                       zorder=1)
    ax.scatter([], [], s=12, color="0.75", label="screen (validation people, every setting)")
    rows = [r for r in res.get("rows", []) if r["split"] == "forget05"]
    for i, n in enumerate(dict.fromkeys(_name(r) for r in rows)):
        rs = [r for r in rows if _name(r) == n]
        x = [COLUMNS[2][1](r) for r in rs]
        y = [COLUMNS[0][1](r) for r in rs]
        ax.errorbar(statistics.mean(x), statistics.mean(y),
                    xerr=statistics.stdev(x) if len(x) > 1 else 0,
                    yerr=statistics.stdev(y) if len(y) > 1 else 0, fmt="o", capsize=3,
                    label=n, zorder=3)
    if rows:
        o = statistics.mean(COLUMNS[1][1](r) for r in rows)
        ax.axhline(o, color="k", ls="--", lw=0.8, label="retrain oracle forget recall")
    ax.axvline(0.98, color="k", ls=":", lw=0.8, label="bar: retain 98%")
    ax.set_xlabel("retain recall / original's (utility)")
    ax.set_ylabel("forget recall (lower = more forgotten)")
    ax.set_title("forget vs utility: small organism, 5% split (mean ± sd over seeds)",
                 fontsize=9)
    ax.legend(fontsize=6, loc="best")
    return P.save(ax, path)


def attack_plot(res, path):
    from excise import plots as P

    plt = P._plt()
    curves = res.get("curves", {})
    names = [a for a in ("relearn", "benign", "refit", "sae", "quantize", "paraphrase")
             if any(a in c for c in curves.values())]
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3.2),
                             constrained_layout=True, squeeze=False)
    for ax, a in zip(axes[0], names):
        oracle_drawn = False
        for i, (n, c) in enumerate(curves.items()):
            if a not in c:
                continue
            xs = list(range(len(c[a]["x"])))
            ax.plot(xs, c[a]["curves"]["after"], marker="o", ms=3, label=n)
            if not oracle_drawn:
                ax.plot(xs, c[a]["curves"]["oracle"], color="k", ls="--", label="oracle")
                oracle_drawn = True
            ax.set_xticks(xs, [str(v) for v in c[a]["x"]], fontsize=6, rotation=30)
        ax.set_title(f"attack: {a}", fontsize=9)
        ax.set_ylim(-0.03, 1.03)
        ax.set_ylabel("forget recall", fontsize=8)
    axes[0][0].legend(fontsize=6)
    return P.save(fig, path)


def write_report(res, out: Path):
    rows = res["rows"]
    pareto_plot(res, out / "results" / "pareto.png")
    attack_plot(res, out / "results" / "attacks.png")
    scr = res["screen"]
    lines = [
        "# Results: which recipe deletes, at what cost",
        "",
        f"Generated by `python bench/sweep.py` ({res['seconds'] / 60:.0f} min on 2 CPU cores, "
        f"organisms and oracles cached; raw numbers in `results/sweep.json`). Organism: "
        f"`{res['preset']}`. Do not edit by hand: rerun the sweep.",
        "",
        "## Protocol",
        "",
        __doc__.split("Protocol (the rules are printed into docs/results.md):")[1].strip(),
        "",
        "Columns: recall is exact greedy reproduction; retain and shared are relative to the "
        "original model; *LOO gap* is the balanced leave-one-person-out probe's accuracy minus "
        "its permutation null, maximised over depths (the bar's 'chance + 5 points' reads "
        "'gap <= 0.05'); *relearn* is the peak held-out forget recall under the relearning "
        "attack (oracle under identical settings beside it) and *relearn gap* the largest "
        "excess over the oracle at equal steps (the bar's condition); *params* is the fraction of "
        "parameters changed (hook edits change none).",
        "",
    ]
    for split in res["splits"]:
        n = SPLITS[split]
        lines += [f"## {split}: {n} people ({100 * n // 200}%), seeds {res['seeds']}", ""]
        lines += table(rows, split) + [""]
    lines += ["## The bar (5% split): what binds", ""] + binding(rows) + [""]
    best, r = recommend(rows)
    lines += [f"**Recommended recipe (configs/default.yaml):** {best} `{json.dumps(r['hp'])}`. "
              f"Rule: {' '.join(recommend.__doc__.split(':', 1)[1].split())}", ""]
    lines += ["## Forget efficacy vs utility", "", "![pareto](results/pareto.png)", "",
              "## Attack recovery (5% split, first seed)", "", "![attacks](results/attacks.png)",
              ""]
    lines += ["## Screen on validation people (150..159)", "",
              "| locate | edit | setting | forget | retain | ppl | params | kept |",
              "|---|---|---|---|---|---|---|---|"]
    kept = {(r["locate"], r["edit"], json.dumps(r["hp"])) for r in res["kept"]}
    fin = {(r["locate"], r["edit"], json.dumps(r["hp"])) for r in res["finalists"]}
    for r in scr["rows"]:
        k = (r["locate"], r["edit"], json.dumps(r["hp"]))
        if "error" in r:
            lines.append(f"| {r['locate']} | {r['edit']} | `{json.dumps(r['hp'])}` | error: "
                         f"{r['error'][:80]} | | | | |")
            continue
        mark = "finalist" if k in fin else ("best of pair" if k in kept else "")
        lines.append(f"| {r['locate'] or '-'} | {r['edit']} | `{json.dumps(r['hp'])}` | "
                     f"{r['forget']:.3f} | {r['retain']:.3f} | {r['ppl']:.2f} | "
                     f"{r['params']:.4f} | {mark} |")
    lines += ["", "Pairs not run (cannot apply):", ""]
    lines += [f"- {s['locate']} + {s['edit']}: {s['why']}" for s in scr["skipped"]]
    lines += ["", "Locate time on the validation request (s): " + ", ".join(
        f"{k} {v}" for k, v in scr["locate_seconds"].items()), ""]
    from excise.io import atomic_write_text

    atomic_write_text(out / "results.md", "\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="small")
    ap.add_argument("--out", default="docs")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--splits", nargs="+", default=list(SPLITS), choices=list(SPLITS))
    ap.add_argument("--finalists", type=int, default=4)
    ap.add_argument("--locators", nargs="+", default=list(LOCATORS), choices=list(LOCATORS))
    ap.add_argument("--stage", default="all", choices=["screen", "all"])
    ap.add_argument("--from-json", default=None,
                    help="only rewrite the report from an earlier run's results/sweep.json")
    ap.add_argument("--screen", default=None,
                    help="reuse the screen of an earlier run (its results/screen.json)")
    a = ap.parse_args()

    import torch

    import excise
    from excise.io import write_json

    t0 = time.time()
    out = Path(a.out)
    if a.from_json:
        res = json.loads(Path(a.from_json).read_text())
        for r in res.get("rows", []):
            r["bar"] = bar_checks(r)
        write_report(res, out)
        return
    (out / "results").mkdir(parents=True, exist_ok=True)
    log_lines: list[str] = []

    def log(msg):
        line = f"[{time.time() - t0:6.0f}s] {msg}"
        print(line, flush=True)
        log_lines.append(line)

    torch.manual_seed(0)
    org = excise.organism(a.preset, progress=False)
    log(f"organism {a.preset}: {org.model.n_parameters():,} parameters")
    log("stage 1: screen on validation people")
    if a.screen:
        scr = json.loads(Path(a.screen).read_text())
        log(f"screen reused from {a.screen}")
    else:
        scr = screen(org, log, a.locators)
        write_json(out / "results" / "screen.json", _jsonable(scr))
    kept, finalists = choose(scr, a.finalists)
    log("finalists: " + "; ".join(f"{_name(f)} {json.dumps(f['hp'])}" for f in finalists))
    res = {"preset": a.preset, "screen": scr, "kept": [r for r in kept.values()],
           "finalists": finalists, "seeds": a.seeds, "splits": a.splits}
    if a.stage == "all":
        log("stage 2: report on held-out forget splits")
        rows, curves = report_stage(org, finalists, a.seeds, a.splits, log)
        for r in rows:
            r["bar"] = bar_checks(r)
        res["rows"], res["curves"] = rows, curves
    res["seconds"] = round(time.time() - t0, 1)
    log(f"done in {res['seconds']:.0f} s")
    write_json(out / "results" / "sweep.json", _jsonable(res))
    if a.stage == "all":
        write_report(res, out)


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and math.isnan(x):
        return None
    return x


if __name__ == "__main__":
    main()
