"""How much must be touched to delete (issue 14, section 4): the stage-1 screen.

For each localizer (fisher, grad_ratio, fact_lookup, activations, random units) and fraction of
units touched (MLP neurons + attention heads; the parameter fraction is reported beside it), one
edit (``reinit``: re-initialise the units and retrain only them on retain data; ``distill``:
shrink-and-perturb them and distill the model as it stands into them on retain data) is applied
to the small organism and measured against the retrain oracle on validation people: forget,
retain and shared recall, perplexity, membership-inference AUC (loss, forget vs holdout), the
parameters changed and the edit's wall time; cells within reach of the oracle's forget recall
also get one relearning attack (``probes.attacks.relearn`` at its default ``AttackConfig``
setting), reported as the peak-recall gap to the oracle under the same attack. 100% is the
global reference (``units="all"``), one row per edit and no localizer.

Every cell is appended to a JSON file as soon as it is measured (a rerun skips the cells already
there), so a long screen can be stopped and resumed; ``report`` turns the JSON into
``docs/results/deletion.{md,png,json}``.

usage:
  OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python bench/deletion.py screen --people 50-59 \\
      --out WORK/screen-50.json [--localizers ...] [--fractions ...] [--edits ...]
  python bench/deletion.py report 50-59=WORK/screen-50.json[,WORK/global-50.json] ...

Never run it on the reported people (0..9): settings are chosen on 50..59 only.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

import edit
import excise
import locate
from excise.importance import Importance
from excise.io import atomic_write_text, write_marked_section
from locate._grads import StatsCache
from probes.attacks import AttackConfig, peak_recovery, relearn
from probes.behaviour import behaviour_metrics
from probes.privacy import membership

LOCALIZERS = ("fisher", "grad_ratio", "fact_lookup", "activations", "subnetwork", "random")
FRACTIONS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.25)  # 1.0 is the global row (units="all")
EDITS = ("reinit", "distill")
REPORTED = frozenset(range(10))  # the reported people: never screened here
# edit settings, chosen on people 50..59 (see docs/results/deletion.md)
SETTINGS = {
    "reinit": {"mode": "fresh", "steps": 100, "lr": 3e-3, "batch_size": 32},
    "distill": {"alpha": 1.0, "steps": 100, "lr": 3e-3, "batch_size": 32},
}
# the global reference: a fresh start of every parameter cannot relearn the world in a few
# steps, so it shrinks and perturbs instead (its alpha chosen on 50..59 as well)
GLOBAL = {
    "reinit": {"mode": "shrink_perturb", "alpha": 0.3, "steps": 100, "lr": 1e-3,
               "batch_size": 32},
    "distill": {"alpha": 0.3, "steps": 100, "lr": 1e-3, "batch_size": 32},
}
REACH = 0.15  # relearning runs where forget recall <= oracle's + REACH (else the gap is plain)
WRECKED = 0.9  # nor where retain recall < WRECKED x the oracle's (a wrecked model forgets all)
KEYS = ("forget_recall", "retain_recall", "shared_recall", "holdout_recall", "perplexity")


def people(text: str) -> list[int]:
    """``"50-59"`` or ``"50,51,52"`` -> a list of person ids."""
    out: list[int] = []
    for part in text.split(","):
        a, _, b = part.partition("-")
        out += list(range(int(a), int(b or a) + 1))
    if REPORTED & set(out):
        raise SystemExit(f"--people {text}: people {sorted(REPORTED & set(out))} are the "
                         f"reported split; the screen never runs on them")
    return out


def measure(model, req, oracle_peak: float | None, attack: bool) -> dict:
    m = behaviour_metrics(model, req)
    row = {k: round(float(m[k]), 4) for k in KEYS}
    row["mia_auc"] = round(float(membership(model, req)["mia_auc_loss"]), 4)
    if attack:
        t = time.time()
        c = relearn(model, req, AttackConfig())
        row["relearn_peak"] = round(float(peak_recovery(c.y)), 4)
        row["relearn_curve"] = [round(float(y), 3) for y in c.y]
        if oracle_peak is not None:
            row["relearn_gap"] = round(row["relearn_peak"] - oracle_peak, 4)
        row["relearn_s"] = round(time.time() - t, 1)
    return row


def random_importance(like: Importance, seed: int) -> Importance:
    """Uniform random unit scores over the same neurons and heads as ``like``."""
    g = torch.Generator().manual_seed(seed)
    scores = {s: torch.rand(t.shape, generator=g) for s, t in like.scores.items()}
    return Importance("random", scores, dict(like.meta))


def importances(model, req, names, work: Path, tag: str, log) -> dict[str, Importance]:
    """Unit-level importances (neurons + heads), cached in ``work``."""
    out: dict[str, Importance] = {}
    cache = StatsCache()
    for name in names:
        if name == "random":
            continue
        path = work / f"imp-{tag}-{name}.safetensors"
        if path.exists():
            out[name] = Importance.load(path)
            continue
        t = time.time()
        imp = locate.METHODS[name](model, req, **({"cache": cache}
                                                  if name in ("fisher", "grad_ratio") else {}))
        imp = imp.by_unit("mean") if imp.meta.get("unit_axes") else imp
        imp.save(path)
        out[name] = imp
        log(f"locate {name}: {time.time() - t:.1f}s, {imp.n_units()} units")
    if "random" in names:
        like = next(iter(out.values())) if out else None
        if like is None or not any(".attn." in s for s in like.scores):
            like = out.get("fisher") or out.get("grad_ratio")
        out["random"] = random_importance(like, seed=0)
    return out


def n_units(model) -> int:
    """Neurons + heads of the model (the universe every fraction is taken of)."""
    return sum(math.prod(model.info(f"blocks.{layer}.{s}").unit_shape)
               for layer in range(model.n_layers) for s in ("mlp.post", "attn.z"))


def changed(model, original) -> int:
    a, b = model.named_parameters(), original.named_parameters()
    return sum(int((a[s].detach() != b[s].detach()).sum()) for s in a)


def screen(args) -> None:
    torch.set_num_threads(1)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    rows = json.loads(out.read_text()) if out.exists() else []
    done = {r["cell"] for r in rows}
    t0 = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - t0:7.1f}s] {msg}", flush=True)

    def keep(row: dict) -> None:
        rows.append(row)
        done.add(row["cell"])
        out.write_text(json.dumps(rows, indent=1))
        log(json.dumps({k: v for k, v in row.items() if k != "relearn_curve"}))

    ppl = people(args.people)
    tag = f"{ppl[0]}-{ppl[-1]}"
    org = excise.organism("small", progress=False)
    req = org.request(forget_people=ppl)
    model = org.model
    total = model.n_parameters()
    universe = n_units(model)
    log(f"organism + request ({len(req.forget)} forget facts): {universe} units, "
        f"{total:,} parameters")
    if "before" not in done:
        keep({"cell": "before", "model": "before", **measure(model, req, None, args.attack_ref)})
    if "oracle" not in done:
        t = time.time()
        oracle = org.oracle(req)
        keep({"cell": "oracle", "model": "oracle", "load_s": round(time.time() - t, 1),
              **measure(oracle, req, None, True)})
        del oracle
    oracle_row = next(r for r in rows if r["cell"] == "oracle")
    oracle_peak = oracle_row["relearn_peak"]
    log("stage 0 (original + oracle) done")

    local = [f for f in args.fractions if f < 1.0]
    imps = importances(model, req, args.localizers if local else [], work, tag, log)
    log("locate done")

    def cell(name: str, loc: str | None, frac: float, ed: str, settings: dict) -> None:
        if name in done:
            return
        h = model.clone()
        t = time.time()
        if loc is None:
            units, count = "all", universe
            edit.METHODS[ed](h, None, "all", request=req, **settings)
        else:
            count = max(1, math.ceil(frac * universe))
            units = imps[loc].top(count)
            edit.METHODS[ed](h, imps[loc], units, request=req, **settings)
        secs = round(time.time() - t, 1)
        row = {"cell": name, "localizer": loc or "all", "fraction": frac, "edit": ed,
               "units": count, "settings": settings, "edit_s": secs,
               "params_changed": round(changed(h, model) / total, 5)}
        m = measure(h, req, None, False)
        attack = (args.attack and m["forget_recall"] <= oracle_row["forget_recall"] + REACH
                  and m["retain_recall"] >= WRECKED * oracle_row["retain_recall"])
        if attack:
            m = measure(h, req, oracle_peak, True)
        keep(row | m | {"relearn_run": attack})

    for frac in args.fractions:
        for ed in args.edits:
            if frac >= 1.0:
                over = json.loads(args.global_settings) if args.global_settings else {}
                cell(f"all/{ed}" + (f"/{args.suffix}" if args.suffix else ""), None, 1.0, ed,
                     GLOBAL[ed] | over.get(ed, {}))
                continue
            for loc in args.localizers:
                over = json.loads(args.settings) if args.settings else {}
                name = f"{loc}/{frac:g}/{ed}" + (f"/{args.suffix}" if args.suffix else "")
                cell(name, loc, frac, ed, SETTINGS[ed] | over.get(ed, {}))
        log(f"fraction {frac:g} done")
    log("screen done")


# -- report ------------------------------------------------------------------------------------
def utility_ok(row: dict, oracle: dict, before: dict, share: float = 0.98,
               ppl: float = 0.02) -> bool:
    """Retain and shared recall >= ``share`` x the oracle's, perplexity within ``ppl`` of the
    original's (the bar's; the oracle's own perplexity is lower than the original's here)."""
    return (row["retain_recall"] >= share * oracle["retain_recall"]
            and row["shared_recall"] >= share * oracle["shared_recall"]
            and row["perplexity"] <= (1 + ppl) * before["perplexity"])


def frontier(rows: list[dict], oracle: dict, before: dict,
             tol: float = 0.02) -> dict[tuple, dict | None]:
    """Per (localizer, edit): the smallest fraction with forget <= oracle + ``tol`` and
    utility kept (None: no cell)."""
    out: dict[tuple, dict | None] = {}
    for r in sorted(rows, key=lambda r: r["fraction"]):
        key = (r["localizer"], r["edit"])
        out.setdefault(key, None)
        if out[key] is None and r["forget_recall"] <= oracle["forget_recall"] + tol \
                and utility_ok(r, oracle, before):
            out[key] = r
    return out


def fmt(v, spec=".3f") -> str:
    return "-" if v is None else format(v, spec)


def table(rows: list[dict], oracle: dict, before: dict) -> list[str]:
    lines = ["| localizer | edit | units % | params % | forget | retain | shared | ppl | "
             "MIA AUC | relearn peak (gap) | utility kept | edit s |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|:-:|---:|"]
    for r in rows:
        rel = (f"{r['relearn_peak']:.3f} ({r['relearn_gap']:+.3f})" if r.get("relearn_run")
               else "not run (wrecked)" if r["forget_recall"] <= oracle["forget_recall"] + REACH
               else f"not run (>= {r['forget_recall'] - oracle['relearn_peak']:+.2f})")
        where = r["localizer"] + (f" (alpha {r['settings'].get('alpha')})"
                                  if r["localizer"] == "all" else "")
        lines.append(f"| {where} | {r['edit']} | {100 * r['fraction']:g} | "
                     f"{100 * r['params_changed']:.2f} | {r['forget_recall']:.3f} | "
                     f"{r['retain_recall']:.3f} | {r['shared_recall']:.3f} | "
                     f"{r['perplexity']:.2f} | {r['mia_auc']:.3f} | {rel} | "
                     f"{'yes' if utility_ok(r, oracle, before) else 'no'} | {r['edit_s']:.0f} |")
    return lines


def plot(rows: list[dict], oracle: dict, path: Path) -> None:
    from excise import plots

    plt = plots._plt()
    locs = [x for x in LOCALIZERS if any(r["localizer"] == x for r in rows)]
    fig, axes = plt.subplots(1, len(locs), figsize=(3.2 * len(locs), 3.4), sharey=True,
                             squeeze=False)
    glob = [r for r in rows if r["localizer"] == "all"]
    for ax, loc in zip(axes[0], locs):
        for ed, style in zip(EDITS, ("-", "--")):
            rs = sorted([r for r in rows if r["localizer"] == loc and r["edit"] == ed],
                        key=lambda r: r["fraction"])
            gs = [r for r in glob if r["edit"] == ed]
            for r in rs + gs:  # the global rows (100%) as points, one per setting
                if r.get("relearn_run"):
                    ax.plot(100 * r["fraction"], r["relearn_peak"], "^", color="C1",
                            mfc="none")
            if gs:
                ax.plot([100] * len(gs), [r["forget_recall"] for r in gs], "o", color="C3",
                        mfc="none" if ed == "distill" else None)
                ax.plot([100] * len(gs), [r["retain_recall"] for r in gs], "s", color="C0",
                        mfc="none" if ed == "distill" else None)
            if not rs:
                continue
            x = [100 * r["fraction"] for r in rs]
            ax.plot(x, [r["retain_recall"] for r in rs], "s" + style, color="C0",
                    label=f"retain ({ed})", mfc="none" if ed == "distill" else None)
            ax.plot(x, [r["forget_recall"] for r in rs], "o" + style, color="C3",
                    label=f"forget ({ed})", mfc="none" if ed == "distill" else None)
        ax.axhline(oracle["forget_recall"], color="C3", lw=0.8, ls=":")
        ax.axhline(oracle["relearn_peak"] + 0.1, color="C1", lw=0.8, ls=":")
        ax.set_xscale("log")
        ticks = [100 * f for f in FRACTIONS] + [100]
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks], fontsize=7)
        ax.minorticks_off()
        ax.set_xlim(0.35, 140)
        ax.set_title(loc)
        ax.set_xlabel("units touched (%)")
    axes[0][0].set_ylabel("recall")
    axes[0][-1].legend(fontsize=6, loc="center right")
    fig.suptitle("deletion vs fraction touched; 100% = every parameter, one point per setting "
                 "(dotted: oracle forget; oracle relearn peak + 0.1; open: distill)",
                 fontsize=9)
    fig.tight_layout()
    plots.save(fig, path)


def load_split(spec: str) -> tuple[str, list[dict], list[dict]]:
    """``"NAME=a.json,b.json"`` -> (NAME, rows of the screen, settings-trial rows): the files'
    rows merged (the first file's original and oracle rows); cells named with a suffix
    (``loc/frac/edit/suffix``) are settings trials, listed apart."""
    name, _, files = spec.partition("=")
    rows: dict[str, dict] = {}
    for f in files.split(","):
        for r in json.loads(Path(f).read_text()):
            rows.setdefault(r["cell"], r)
    main = [r for r in rows.values() if r["cell"].count("/") <= 2]
    trials = [r for r in rows.values() if r["cell"].count("/") > 2]
    return name, main, trials


def order(r: dict) -> tuple:
    locs = LOCALIZERS + ("all",)
    return (r["edit"], locs.index(r["localizer"]) if r["localizer"] in locs else 99,
            r["fraction"], r["cell"])


def report(args) -> None:
    out = Path(args.docs)
    out.mkdir(parents=True, exist_ok=True)
    md = ["# Deletion vs fraction touched: the stage-1 screen", ""]
    if args.intro:
        md += [Path(args.intro).read_text().rstrip(), ""]
    summary = {}
    for i, spec in enumerate(args.splits):
        name, rows, trials = load_split(spec)
        oracle = next(r for r in rows if r["cell"] == "oracle")
        before = next(r for r in rows if r["cell"] == "before")
        cells = sorted((r for r in rows if "edit" in r), key=order)
        md += [f"## Forget people {name}", "",
               f"original: forget {before['forget_recall']:.3f}, retain "
               f"{before['retain_recall']:.3f}, shared {before['shared_recall']:.3f}, ppl "
               f"{before['perplexity']:.2f}, MIA AUC {before['mia_auc']:.3f}; oracle: forget "
               f"{oracle['forget_recall']:.3f}, retain {oracle['retain_recall']:.3f}, shared "
               f"{oracle['shared_recall']:.3f}, ppl {oracle['perplexity']:.2f}, MIA AUC "
               f"{oracle['mia_auc']:.3f}, relearn peak {oracle['relearn_peak']:.3f} "
               f"(relearning: {oracle.get('relearn_s', '-')} s)", ""]
        md += table(cells, oracle, before) + [""]
        front = frontier(cells, oracle, before)
        md += ["Frontier (smallest fraction with forget <= oracle + 0.02 and retain, shared >= "
               "0.98 x oracle, perplexity <= 1.02 x original):", ""]
        for (loc, ed), r in front.items():
            gap = fmt(r.get("relearn_gap"), "+.3f") if r and r.get("relearn_run") else "not run"
            md.append(f"- {loc} / {ed}: " + ("none" if r is None else
                      f"{100 * r['fraction']:g}% of units ({100 * r['params_changed']:.1f}% "
                      f"of parameters), relearn gap {gap}"))
        md.append("")
        if trials:
            md += ["Settings trials (cell names carry the trial's tag; settings in "
                   "deletion.json):", ""]
            md += table(sorted(trials, key=order), oracle, before) + [""]
        png = out / ("deletion.png" if i == 0 else f"deletion-{name}.png")
        plot(cells, oracle, png)
        md += [f"![deletion vs fraction touched, people {name}]({png.name})", ""]
        summary[name] = {"oracle": oracle, "before": before, "cells": cells, "trials": trials,
                         "frontier": {f"{k[0]}/{k[1]}": v and v["cell"]
                                      for k, v in front.items()}}
    if args.outro:
        md += [Path(args.outro).read_text().rstrip(), ""]
    atomic_write_text(out / "deletion.md", "\n".join(md) + "\n")
    atomic_write_text(out / "deletion.json", json.dumps(summary, indent=1))
    print(f"wrote {out / 'deletion.md'}")
    if args.summary:
        results_section(out.parent / "results.md", Path(args.summary).read_text())


START, END = "<!-- deletion:start -->", "<!-- deletion:end -->"


def results_section(md: Path, body: str) -> None:
    """Put ``body`` under "Deletion vs fraction touched" in ``results.md`` (a block the sweep
    keeps when it rewrites the rest)."""
    block = "\n".join([START, "## Deletion vs fraction touched", "", body.rstrip(), END])
    write_marked_section(md, block, START, END)
    print(f"wrote the deletion section of {md}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("screen")
    s.add_argument("--people", default="50-59")
    s.add_argument("--out", required=True)
    s.add_argument("--work", default="/tmp/excise-deletion")
    s.add_argument("--localizers", nargs="+", default=list(LOCALIZERS), choices=LOCALIZERS)
    s.add_argument("--fractions", nargs="+", type=float, default=[1.0, *FRACTIONS[::-1]])
    s.add_argument("--edits", nargs="+", default=list(EDITS), choices=EDITS)
    s.add_argument("--settings", default="", help='JSON overrides per edit, e.g. '
                   '\'{"reinit": {"steps": 60}}\'')
    s.add_argument("--global-settings", default="", help="JSON overrides for the 100%% rows")
    s.add_argument("--suffix", default="", help="appended to the cell names (settings trials)")
    s.add_argument("--no-attack", dest="attack", action="store_false",
                   help="no relearning attack on any cell")
    s.add_argument("--attack-ref", action="store_true",
                   help="also run the relearning attack on the original")
    r = sub.add_parser("report")
    r.add_argument("splits", nargs="+", help="NAME=screen.json[,more.json]: one table each")
    r.add_argument("--docs", default="docs/results")
    r.add_argument("--intro", default="", help="a Markdown file put above the tables")
    r.add_argument("--outro", default="", help="a Markdown file put below them")
    r.add_argument("--summary", default="", help="a Markdown file: the section of "
                   "results.md (next to --docs)")
    args = ap.parse_args()
    screen(args) if args.cmd == "screen" else report(args)


if __name__ == "__main__":
    main()
