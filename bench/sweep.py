"""The deletion sweep's report: runs the protocol in the library (``excise.app.sweep``, the same
as ``excise sweep configs/sweep.yaml``) and writes docs/results.md, docs/results/*.png and the
records docs/results/sweep.json + screen.json.

    EXCISE_CACHE=/tmp/exc OMP_NUM_THREADS=2 python bench/sweep.py [--out docs] [--set seeds=[0]]
    python bench/sweep.py --from-json docs/results/sweep.json   # only rewrite the report

The protocol (grids, the utility bar, Pareto pruning, splits x seeds) is described in
``excise/app/sweep.py`` and configured in ``configs/sweep.yaml``.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import time
from pathlib import Path

from excise.app import sweep as S

_name = S.name


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


def binding(rows, split: str = "forget05") -> list[str]:
    """Per recipe on the 5% split: which bar constraints fail, on how many seeds."""
    out = []
    for n in dict.fromkeys(_name(r) for r in rows if r["split"] == split):
        rs = [r for r in rows if r["split"] == split and _name(r) == n]
        fails = {}
        for r in rs:
            for k, ok in r["bar"].items():
                if not ok:
                    fails[k] = fails.get(k, 0) + 1
        txt = ", ".join(f"{k} ({v}/{len(rs)})" for k, v in fails.items()) or "none"
        out.append(f"- **{n}**: fails {txt}")
    return out


UTILITY = ("retain >= 98%", "shared >= 98%", "ppl within 2%", "<= 1% params")


def recommend(rows, split: str = "forget05") -> tuple[str, dict]:
    """The default recipe, when none meets the whole bar: among the recipes that keep the utility
    side of the bar (retain, shared, perplexity, <= 1% parameters) on most seeds of the 5% split,
    the one that forgets most (lowest mean forget recall above the oracle's); if none keeps
    utility, the one meeting the most bar conditions."""
    score = {}
    for n in dict.fromkeys(_name(r) for r in rows if r["split"] == split):
        rs = [r for r in rows if r["split"] == split and _name(r) == n]
        keeps = sum(all(r["bar"][k] for k in UTILITY) for r in rs) > len(rs) / 2
        met = statistics.mean(sum(r["bar"].values()) for r in rs)
        excess = statistics.mean(r["metrics"]["after"]["forget_recall"]
                                 - r["metrics"]["oracle"]["forget_recall"] for r in rs)
        score[n] = ((keeps, -excess) if keeps else (keeps, met), rs[0])
    best = max(score, key=lambda n: score[n][0])
    return best, score[best][1]


def pareto_plot(res, path, split: str = "forget05"):
    from excise import plots as P

    ax = P._axes(None, (6.5, 4.2))
    base = res["screen"]["base"]
    for r in res["screen"]["rows"]:
        if "error" not in r:
            ax.scatter(r["retain"] / base["retain_recall"], r["forget"], s=12, color="0.75",
                       zorder=1)
    ax.scatter([], [], s=12, color="0.75", label="screen (validation people, every setting)")
    rows = [r for r in res.get("rows", []) if r["split"] == split and "error" not in r]
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


def write_report(res, out: Path, cfg: S.SweepConfig):
    from excise.organism import PRESETS

    # a report cell that failed after its retries is a row with its error: listed, not scored
    failed = [r for r in res["rows"] if "error" in r]
    rows = [r for r in res["rows"] if "error" not in r]
    bar = cfg.bar_split
    pareto_plot(res, out / "results" / "pareto.png", bar)
    attack_plot(res, out / "results" / "attacks.png")
    scr = res["screen"]
    lines = [
        "# Results: which recipe deletes, at what cost",
        "",
        f"Generated by `python bench/sweep.py` ({res['seconds'] / 60:.0f} min on 2 CPU cores, "
        f"organisms and oracles cached; raw numbers in `results/sweep.json`). Organism: "
        f"`{res['preset']}`. Do not edit by hand: rerun the sweep (it keeps the sections other "
        f"bench scripts write below, between their markers).",
        "",
        "## Protocol",
        "",
        S.PROTOCOL,
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
        n = cfg.splits[split]
        lines += [f"## {split}: {n} people ({100 * n // PRESETS[res['preset']].n_people}%), "
                  f"seeds {res['seeds']}", ""]
        lines += table(rows, split) + [""]
    if failed:
        lines += ["## Cells that failed (after their retries)", ""] + [
            f"- {r['split']} seed {r['seed']} {_name(r)}: {r['error']}" for r in failed] + [""]
    lines += ["## The bar (5% split): what binds", ""] + binding(rows, bar) + [""]
    best, r = recommend(rows, bar)
    lines += [f"**Recommended localized recipe (configs/dampen.yaml):** {best} "
              f"`{json.dumps(r['hp'])}`. "
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

    md = out / "results.md"
    kept = kept_blocks(md.read_text() if md.exists() else "")
    atomic_write_text(md, "\n".join(lines) + "\n" + "".join("\n" + b + "\n" for b in kept))


def kept_blocks(text: str) -> list[str]:
    """The sections other bench scripts own in results.md (``<!-- NAME:start -->`` ..
    ``<!-- NAME:end -->``: calibration, planted organism, deletion), kept as they are when the
    sweep rewrites the rest."""
    return [m.group(0) for m in re.finditer(r"<!-- ([\w-]+):start -->.*?<!-- \1:end -->",
                                            text, flags=re.S)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(Path(__file__).resolve().parent.parent / "configs"
                                            / "sweep.yaml"))
    ap.add_argument("--set", dest="sets", action="append", default=[],
                    help="override a sweep config key, e.g. seeds=[0] or finalists=2")
    ap.add_argument("--out", default="docs", help="results.md here, records and figures in "
                                                  "<out>/results")
    ap.add_argument("--locators", nargs="+", default=None,
                    help="screen only these of the config's locate methods")
    ap.add_argument("--stage", default="all", choices=["screen", "all"])
    ap.add_argument("--from-json", default=None,
                    help="only rewrite the report from an earlier run's results/sweep.json")
    ap.add_argument("--screen", default=None,
                    help="reuse the screen of an earlier run (its results/screen.json)")
    a = ap.parse_args()

    out = Path(a.out)
    cfg = S.load_config(a.config, a.sets)
    if a.from_json:
        res = json.loads(Path(a.from_json).read_text())
        for r in res.get("rows", []):
            r["bar"] = S.bar_checks(r)
        write_report(res, out, cfg)
        return
    t0 = time.time()

    def log(msg):
        print(f"[{time.time() - t0:6.0f}s] {msg}", flush=True)

    files = S.run(cfg, out / "results", stage=a.stage, screen_from=a.screen, only=a.locators,
                  log=log).files
    if a.stage == "all":  # the report is drawn from the records as written
        write_report(json.loads(files[-1].read_text()), out, cfg)


if __name__ == "__main__":
    main()
