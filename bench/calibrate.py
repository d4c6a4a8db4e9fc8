"""Calibrate the verdict on models whose answer is known (issue 14, section 2).

    EXCISE_CACHE=... OMP_NUM_THREADS=2 python bench/calibrate.py [--preset tiny] [--seeds 0 1]
        [--grid full] [--people 4 5 6 7] [--out docs] [--from-json docs/results/calibration.json]

Runs :func:`excise.app.calibrate.calibrate`: per organism seed, the known-deleted models (a second
retrain oracle, a from-scratch distillation on retain data, the planted organism's planted units
re-initialised and retrained), the known-suppressed controls, a model damaged by global gradient
ascent and the original, each judged by ``probes.verify(suite="verdict")`` with the attack grid
``--grid`` against its retrain oracle. Writes ``<out>/results/calibration.md`` (the confusion table
and every row: people, forget / retain / shared recall, perplexity ratio, membership AUC beside
the oracle's, the worst relearning gap, the failed checks, time) and ``calibration.json`` (every
number, every check), and refreshes the "Calibration" section of ``<out>/results.md`` (between
its markers; appended when missing).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from excise.io import atomic_write_text, write_marked_section  # noqa: E402

START, END = "<!-- calibration:start -->", "<!-- calibration:end -->"


def _f(x, nd: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{nd}f}" if x == x else "nan"
    return str(x)


def confusion_md(d: dict) -> list[str]:
    from probes.verdict import VERDICTS

    table = d["confusion"]
    lines = ["| expected \\ got | " + " | ".join(VERDICTS) + " |",
             "|---" * (len(VERDICTS) + 1) + "|"]
    for e in VERDICTS:
        cells = [(f"**{table[e][g]}**" if e == g else str(table[e][g])) if table[e][g] else "."
                 for g in VERDICTS]
        lines.append(f"| {e} | " + " | ".join(cells) + " |")
    return lines


def rows_md(d: dict) -> list[str]:
    lines = ["| seed | case | people | expected | got | forget (oracle, original) | retain "
             "(oracle) | shared (oracle) | ppl / oracle | MIA AUC (oracle) | relearn gap | "
             "worst attack gap | failed checks | build s | verify s |",
             "|---" * 15 + "|"]
    for r in d["rows"]:
        m = r["metrics"]
        gaps = {k: v for k, v in m["attack_gaps"].items() if v is not None}
        worst = max(gaps, key=gaps.get) if gaps else None
        mark = "" if r["ok"] else " **(off)**"
        lines.append(
            f"| {r['seed']} | {r['case']} | {','.join(map(str, r['people']))} | {r['expected']} "
            f"| {r['got']}{mark} | {_f(m['forget'])} ({_f(m['oracle_forget'])}, "
            f"{_f(m['original_forget'])}) | {_f(m['retain'])} ({_f(m['oracle_retain'])}) | "
            f"{_f(m['shared'])} ({_f(m['oracle_shared'])}) | {_f(m['ppl_ratio'])} | "
            f"{_f(m['mia'])} ({_f(m['oracle_mia'])}) | {_f(m['relearn_gap'])} | "
            f"{_f(gaps.get(worst)) + ' ' + worst if worst else '-'} | "
            f"{', '.join(r['failed']) or '-'} | {r['build_seconds']:.0f} | "
            f"{r['verify_seconds']:.0f} |")
    return lines


def section(d: dict, detail: str = "results/calibration.md") -> list[str]:
    n_off = sum(not r["ok"] for r in d["rows"])
    return [START, "## Calibration: the verdict on known answers", "",
            f"`python bench/calibrate.py` ({d['preset']}, seeds {d['seeds']} = organism seeds, "
            f"grid `{d['grid']}`, {d['seconds'] / 60:.0f} min; every row in "
            f"[{detail}]({detail})). Known deleted: a second retrain oracle, a from-scratch "
            f"distillation on retain data, the planted units re-initialised and retrained; known "
            f"suppressed: the controls of `probes.controls`; known damaged: global ascent until "
            f"retain recall < 0.9; known not forgotten: the original. Forget people: "
            f"{d['settings']['people']} (the planted case: the planted organism's reported "
            f"group). Rows x columns = expected x got; "
            f"{'all on the diagonal' if not n_off else f'{n_off} off the diagonal'}.", "",
            *([f"**Note:** {d['note']}", ""] if d.get("note") else []),
            *confusion_md(d), "", END]


def _keep_text(k: dict) -> str:
    if "control_keep" not in k:
        return "."
    w = f"{k['control_keep']:g}"
    return (f", {k['control_steps']} steps at most, keeping utility (`keep={w}, keep_text="
            f"{k['control_keep_text']}`: the descent on retain facts, shared facts and retain "
            f"text weighted {w}x against the ascent).")


def burden_verdict(r: dict) -> str | None:
    """The verdict of row ``r`` had the forget-vs-oracle and attack checks the MIA check's
    burden - fail only when *credibly* outside (lower bound above the margin / tolerance)
    instead of pass only when credibly inside - the gate, the 'forgot' check, the MIA and
    probe checks unchanged; from the recorded checks (None where a bound was not recorded)."""
    from probes.verdict import ORACLE_CHECKS, Rule, verdict_of

    rule = Rule()
    checks = dict(r["detail"]["checks"])
    for k, c in checks.items():
        if k == "forget_vs_oracle" or k.startswith("attack_"):
            if c.get("lower") is None:
                return None
            checks[k] = c | {"ok": c["lower"] <= (rule.margin if k == "forget_vs_oracle"
                                                  else rule.tolerance)}
    gate = all(c["ok"] for k, c in checks.items() if k.startswith("utility_"))
    return verdict_of(gate, checks, ORACLE_CHECKS)


def burden_md(d: dict) -> list[str]:
    """The confusion table under :func:`burden_verdict` (an analysis, not the rule)."""
    rows = [(r, burden_verdict(r)) for r in d["rows"]]
    if any(v is None for _, v in rows):
        return []
    alt = {"confusion": {e: {g: 0 for g in d["confusion"]} for e in d["confusion"]}}
    for r, v in rows:
        alt["confusion"][r["expected"]][v] += 1
    return ["## If the recall checks carried the MIA check's burden (analysis, not the rule)",
            "", "The rule passes the forget-vs-oracle and attack checks only when the upper "
            "bound is inside the margin / tolerance (evidence of closeness), but fails the "
            "membership check only when the difference is credibly outside. The same rows, "
            "their recorded bounds read the second way for every check:", "",
            *confusion_md(alt), ""]


def write(d: dict, out: Path) -> None:
    res = out / "results"
    res.mkdir(parents=True, exist_ok=True)
    atomic_write_text(res / "calibration.json", json.dumps(d, indent=2, default=str) + "\n")
    k = d["settings"]["knobs"]
    lines = ["# Calibration: the verdict on models whose answer is known", "",
             f"Generated by `python bench/calibrate.py --preset {d['preset']} --grid {d['grid']}` "
             f"({d['seconds'] / 60:.1f} min on this machine). Do not edit by hand. Seeds "
             f"{d['seeds']} are organism seeds (world, training, and the seed of every edit, "
             f"control and attack). Every case is judged against {k.get('oracles', 1)} "
             f"reference retrain oracle(s) at training seeds seed, seed + 2, ... "
             f"(`probes.verify(oracle=[...])`: the most favourable verdict); the retrain case "
             f"trains at seed + 1.", "",
             *([f"**Note:** {d['note']}", ""] if d.get("note") else []),
             "## Confusion (expected x got)", "", *confusion_md(d), "", *burden_md(d),
             "## Cases", "",
             "- **retrain** (deleted): another retrain oracle (the same recipe, training seed "
             "+ 1) judged against the reference oracles.",
             f"- **distill** (deleted): `edit.distill(units='all', alpha=1)` - every weight "
             f"re-drawn - distilled from the original for {k['distill_steps']} steps (lr "
             f"{k['distill_lr']:g}, batch {k['distill_batch']}) on retain data only: the retain "
             f"facts, the shared facts' sentences and the retain text.",
             f"- **planted_reinit** (deleted): on the planted organism, `edit.reinit` of "
             f"`org.planted.units` (fresh) retrained {k['reinit_steps']} steps on retain data; "
             f"request: forget the planted reported group; oracle: the planted oracle.",
             "- **ascent_all / ascent_unembed / ascent_last / latent_gains** (suppressed): "
             "`probes.controls.gradient_ascent`, `unembed_ascent`, `last_block_ascent` (the "
             "last block only, lr 1e-3: chosen on validation people 12..19), "
             "`latent_suppression`"
             + _keep_text(k),
             f"- **ascent_until_damaged** (damaged): global gradient ascent on the forget facts "
             f"(Adam, lr {k['damage_lr']:g}) until retain recall < {k['damage_below']:g}.",
             "- **original** (not forgotten).", "",
             "Each model: `probes.verify(suite='verdict')` (behaviour, membership, every "
             f"restoration attack over the `{d['grid']}` grid, the rule) against its oracle and "
             "original.", "", "## Every row", "", *rows_md(d), ""]
    atomic_write_text(res / "calibration.md", "\n".join(lines))
    md = out / "results.md"
    write_marked_section(md, "\n".join(section(d)), START, END)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="tiny", choices=("tiny", "small"))
    ap.add_argument("--seeds", type=int, nargs="+", default=(0, 1))
    ap.add_argument("--grid", default="full")
    ap.add_argument("--people", type=int, nargs="+", default=None)
    ap.add_argument("--out", default="docs")
    ap.add_argument("--from-json", default=None, help="rewrite the reports from a saved run")
    a = ap.parse_args()
    if a.from_json:
        write(json.loads(Path(a.from_json).read_text()), Path(a.out))
        return
    from excise.app.calibrate import calibrate

    t0 = time.time()
    def row(r) -> None:
        print(f"[{time.time() - t0:6.0f}s] seed {r.seed} {r.case}: failed {list(r.failed)}",
              flush=True)

    cal = calibrate(a.preset, tuple(a.seeds), grid=a.grid, people=a.people,
                    progress=lambda s: print(f"[{time.time() - t0:6.0f}s] {s}", flush=True),
                    on_row=row)
    d = cal.to_dict()
    write(d, Path(a.out))
    print("\n".join(confusion_md(d)))
    for r in cal.off_diagonal:
        print(f"off: seed {r.seed} {r.case}: {r.got} (expected {r.expected}); failed {r.failed}")


if __name__ == "__main__":
    main()
