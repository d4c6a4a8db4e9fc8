"""Calibrate the verdict on models whose answer is known (issue 14, section 2).

    EXCISE_CACHE=... OMP_NUM_THREADS=2 python bench/calibrate.py [--preset tiny] [--seeds 0 1]
        [--grid full] [--people 4 5 6 7] [--out docs] [--from-json docs/results/calibration.json]
        [--cases distill --distill-teacher oracle --json out.json]   (a partial run)
        [--cases distill --distill-labels soft --json out.json]      (soft-label students)
        [--preset small --people 50 51 ... 59 --grid quick --cases retrain distill original
         --distill-schedule linear --distill-steps 1000 --json out.json]   (small, partial)

Runs :func:`excise.app.calibrate.calibrate`: per organism seed, the known-deleted models (a second
retrain oracle, a from-scratch distillation on retain data, the planted organism's planted units
re-initialised and retrained), the known-suppressed controls, a model damaged by global gradient
ascent and the original, each judged by ``probes.verify(suite="verdict")`` with the attack grid
``--grid`` against its retrain oracle. Writes ``<out>/results/calibration.md`` (the confusion table
and every row: people, forget / retain / shared recall, perplexity ratio, membership AUC beside
the oracle's, the worst relearning gap, the checks that credibly failed and those left open,
time) and ``calibration.json`` (every
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
    got = [g for g in VERDICTS if any(g in row for row in table.values())]
    lines = ["| expected \\ got | " + " | ".join(got) + " |", "|---" * (len(got) + 1) + "|"]
    for e in table:
        cells = [(f"**{table[e][g]}**" if e == g else str(table[e][g]))
                 if table[e].get(g) else "." for g in got]
        lines.append(f"| {e} | " + " | ".join(cells) + " |")
    return lines


def rows_md(d: dict) -> list[str]:
    lines = ["| seed | case | people | expected | got | forget (oracle, original) | retain "
             "(oracle) | shared (oracle) | ppl / oracle | MIA AUC (oracle) | relearn gap | "
             "worst attack gap | failed checks | open checks | build s | verify s |",
             "|---" * 16 + "|"]
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
            f"{', '.join(r['failed']) or '-'} | {', '.join(r.get('open', ())) or '-'} | "
            f"{r['build_seconds']:.0f} | "
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


def _labels(k: dict) -> str:
    labels = k.get("distill_labels", "soft")
    if labels == "soft":
        return "the teacher's whole next-token distributions (soft labels)"
    if labels == "hard":
        return "the teacher's greedy token at every position (hard labels)"
    if labels == "data_facts":
        return ("the retain facts' own tokens and the teacher's whole next-token distributions "
                "on the text")
    return ("the teacher's greedy answer on the retain facts (its whole distributions there "
            "keep probability on the answers it was trained on, forget answers included) and "
            "its whole next-token distributions on the text")


_SHARED = " with the shared facts' sentences"


def _text_kept(kind: str) -> str:
    return ("its loss" if kind == "nll"
            else "the KL from the original's next-token distributions")


def _keep_text(k: dict) -> str:
    if "control_keep" not in k:
        return "."
    w = f"{k['control_keep']:g}"
    own = ("" if k.get("latent_steps") is None
           else f" ({k['latent_steps']} for the latent gains)")
    return (f", {k['control_steps']} steps at most{own}, keeping utility (`keep={w}, keep_text="
            f"{k['control_keep_text']}`: the descent on retain facts, shared facts and retain "
            f"text weighted {w}x against the ascent)" + _objective(k) + ".")


def _latent(k: dict) -> str:
    if k.get("latent_layer") is None and k.get("latent_expansion") is None:
        return " (through the steering attack's SAE)"
    layer = "the attack's layer" if k.get("latent_layer") is None else f"block {k['latent_layer']}"
    width = ("the attack's width" if k.get("latent_expansion") is None
             else f"{k['latent_expansion']}x d_model latents")
    return f" (through its own SAE: {layer}'s resid_post, {width})"


def _objective(k: dict) -> str:
    if k.get("control_objective", "ascent") == "ascent":
        hide = ", hiding each fact by raising its loss to the clamp (`objective='ascent'`)"
    else:
        hide = (", hiding each fact by pushing its answer's first token 1 nat below the best "
                "other token (`objective='margin'`: the least change that hides it)")
    text = k.get("control_text", "nll")
    return hide + f", the text kept by {_text_kept(text)} (`text='{text}'`)"


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
             "## Confusion (expected x got)", "", *confusion_md(d), "",
             "## Cases", "",
             "- **retrain** (deleted): another retrain oracle (the same recipe, training seed "
             "+ 1) judged against the reference oracles.",
             f"- **distill** (deleted): `edit.distill(units='all', alpha=1)` - every weight "
             f"re-drawn - distilled from the original for {k['distill_steps']} steps (lr "
             f"{k['distill_lr']:g}, batch {k['distill_batch']}) on retain data only: the retain "
             f"facts, the shared facts' sentences and the retain text, learning "
             f"{_labels(k)}. Not cases of the table: the same distillation from a "
             f"retrain oracle at training seed + 1 (`--cases distill --distill-teacher oracle "
             f"--json ...`; results/calibration-distill-oracle.json) and from the original's "
             f"whole distributions (`--distill-labels soft`; "
             f"results/calibration-distill-soft.json).",
             f"- **planted_reinit** (deleted): on the planted organism, `edit.reinit` of "
             f"`org.planted.units` (fresh) retrained {k['reinit_steps']} steps on retain data "
             f"(the retain facts, and the retain text"
             f"{_SHARED if k.get('reinit_shared') else ''} kept by "
             f"{_text_kept(k.get('reinit_text_loss', 'nll'))}); "
             f"request: forget the planted reported group; oracle: the planted oracle.",
             "- **ascent_all / ascent_unembed / ascent_last / latent_gains** (suppressed): "
             "`probes.controls.gradient_ascent`, `unembed_ascent`, `last_block_ascent` (the "
             "last block only, lr 1e-3: chosen on validation people 12..19), "
             "`latent_suppression`" + _latent(k)
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


# The latent-gains control's own SAE and steps per preset (Knobs.latent_*), chosen on tiny's
# validation people 12..19: through the steering attack's SAE (the last block's output) it hid
# almost nothing there. small keeps the attack's SAE, which its calibration (stop 42) used.
LATENT = {"tiny": {"latent_layer": 0, "latent_expansion": 32, "latent_steps": 300}}


def latent_knobs(a) -> dict:
    given = {"latent_layer": a.latent_layer, "latent_expansion": a.latent_expansion,
             "latent_steps": a.latent_steps}
    return LATENT.get(a.preset, {}) | {k: v for k, v in given.items() if v is not None}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="tiny", choices=("tiny", "small"))
    ap.add_argument("--seeds", type=int, nargs="+", default=(0, 1))
    ap.add_argument("--grid", default="full")
    ap.add_argument("--people", type=int, nargs="+", default=None)
    ap.add_argument("--out", default="docs")
    ap.add_argument("--from-json", default=None, help="rewrite the reports from a saved run")
    ap.add_argument("--cases", nargs="+", default=None, help="a subset of the cases")
    ap.add_argument("--distill-teacher", default="original", choices=("original", "oracle"),
                    help="whose outputs the distill case learns (oracle: the control)")
    ap.add_argument("--distill-labels", default="hard_facts",
                    choices=("hard_facts", "soft", "hard"),
                    help="what the distill case learns: the teacher's greedy answers on retain "
                         "facts and its distributions on text (hard_facts, the known-deleted "
                         "case), its distributions everywhere (soft) or greedy tokens "
                         "everywhere (hard)")
    ap.add_argument("--distill-schedule", default="constant", choices=("constant", "linear"),
                    help="the distill case's learning rate over its steps (linear: the "
                         "organism's warm-up and decay, what keeps small's retain facts)")
    ap.add_argument("--distill-steps", type=int, default=None,
                    help="the distill case's steps (default: the Knobs' 1500)")
    ap.add_argument("--oracles", type=int, default=None,
                    help="reference retrain oracles per case (default: the Knobs' 2)")
    ap.add_argument("--control-objective", default="margin", choices=("margin", "ascent"),
                    help="what hides the facts in the known-suppressed controls (margin: the "
                         "answer just below the best other token; ascent: the loss raised to "
                         "its clamp)")
    ap.add_argument("--control-text", default="kl", choices=("kl", "nll"),
                    help="how the controls keep the retain text (kl: the KL from the "
                         "original's next-token distributions; nll: its loss)")
    ap.add_argument("--control-keep", type=float, default=None,
                    help="the weight of the controls' descent on retain data (default: the "
                         "Knobs' 10, chosen on tiny; small's 2,898 retain and shared facts "
                         "need 30)")
    ap.add_argument("--latent-layer", type=int, default=None,
                    help="the block whose resid_post the latent-gains control's SAE reads "
                         "(default: tiny's 0; small: the steering attack's SAE)")
    ap.add_argument("--latent-expansion", type=int, default=None,
                    help="that SAE's width in multiples of d_model (default: tiny's 32)")
    ap.add_argument("--latent-steps", type=int, default=None,
                    help="the latent-gains control's steps (default: tiny's 300; small: the "
                         "controls' 100)")
    ap.add_argument("--json", default=None,
                    help="a partial run (--cases, --distill-teacher oracle) writes its rows "
                         "here and leaves the published report alone")
    a = ap.parse_args()
    partial = (bool(a.cases) or a.distill_teacher != "original"
               or a.distill_labels != "hard_facts" or a.control_objective != "margin"
               or a.control_text != "kl" or a.distill_schedule != "constant"
               or a.distill_steps is not None or a.oracles is not None
               or a.control_keep is not None or a.latent_layer is not None
               or a.latent_expansion is not None or a.latent_steps is not None)
    if partial and not a.json:
        ap.error("--cases / --distill-teacher oracle / --distill-labels / --distill-schedule / "
                 "--distill-steps / --oracles / --control-keep / --latent-* / "
                 "--control-objective ascent / --control-text nll make a partial run: give "
                 "--json PATH")
    if a.from_json:
        write(json.loads(Path(a.from_json).read_text()), Path(a.out))
        return
    from excise.app.calibrate import CASES, Knobs, calibrate

    t0 = time.time()
    def row(r) -> None:
        print(f"[{time.time() - t0:6.0f}s] seed {r.seed} {r.case}: failed {list(r.failed)}",
              flush=True)

    cal = calibrate(a.preset, tuple(a.seeds), grid=a.grid, people=a.people,
                    cases=tuple(a.cases) if a.cases else CASES,
                    knobs=Knobs(distill_teacher=a.distill_teacher,
                                distill_labels=a.distill_labels,
                                distill_schedule=a.distill_schedule,
                                **({} if a.distill_steps is None
                                   else {"distill_steps": a.distill_steps}),
                                **({} if a.oracles is None else {"oracles": a.oracles}),
                                **({} if a.control_keep is None
                                   else {"control_keep": a.control_keep}),
                                control_objective=a.control_objective,
                                control_text=a.control_text, **latent_knobs(a)),
                    progress=lambda s: print(f"[{time.time() - t0:6.0f}s] {s}", flush=True),
                    on_row=row)
    d = cal.to_dict()
    if partial:
        atomic_write_text(Path(a.json), json.dumps(d, indent=2, default=str) + "\n")
    else:
        write(d, Path(a.out))
    print("\n".join(confusion_md(d)))
    for r in cal.off_diagonal:
        print(f"off: seed {r.seed} {r.case}: {r.got} (expected {r.expected}); failed {r.failed}")


if __name__ == "__main__":
    main()
