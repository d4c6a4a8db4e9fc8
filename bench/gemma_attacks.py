"""Attacks on Gemma 3 270M with no oracle: the edited model's curves beside the comparator's.

Reads a finished run of ``configs/gemma-facts.yaml`` (``excise run configs/gemma-facts.yaml --out
RUN``; its verify runs behaviour, privacy, the attacks with the comparator and the verdict) and
prints, per attack, the curves of the edited model (``after``), the original (``before``) and the
comparator (never-known facts attacked on the original exactly as the forget facts) at the
setting with the worst gap, every setting's gap, and the verdict with its checks and rule::

    python bench/gemma_attacks.py RUN

With ``--verify`` it re-measures the run instead (``excise verify RUN`` into ``RUN/verify``,
needs Gemma: pip install -c constraints.txt -e ".[gemma]") and prints the same from there.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path


def show(metrics: dict) -> None:
    probes = metrics.get("probes", {})
    attacks = probes.get("attacks", {})
    grids = probes.get("attack_grid", {})
    ref = "comparator" if "attack_reference" in probes else "oracle"
    if "attack_reference" in probes:
        print(f"reference: {probes['attack_reference']}")
    for name, a in attacks.items():
        print(f"\n{name} ({a['xlabel']}; {a['ylabel']})")
        print("  " + "x".ljust(12) + "".join(str(x)[:10].rjust(11) for x in a["x"]))
        for label, ys in a["curves"].items():
            print("  " + label.ljust(12) + "".join(f"{y:11.3f}" for y in ys))
        for series, per in a.get("aux", {}).items():
            for label, ys in per.items():
                print("  " + f"{label}: {series}"[:30].ljust(12)
                      + "".join(f"{y:11.3g}" for y in ys))
        for p in grids.get(name, {}).get("points", []):
            c = p["curves"]["curves"]
            if ref in c and "after" in c:
                gap = max(x - y for x, y in zip(c["after"], c[ref]))
                print(f"  setting lr {p['lr']} seed {p['seed']}: worst gap after - {ref} "
                      f"{gap:+.3f}{' (flagged: wrecks the original)' if p['flagged'] else ''}")
    v = probes.get("verdict")
    if v:
        print(f"\nverdict: {v['verdict']}")
        for k, c in v["checks"].items():
            nums = {x: (round(y, 3) if isinstance(y, float) else y) for x, y in c.items()
                    if x not in ("need", "ok")}
            print(f"  {k}: {'ok' if c['ok'] else 'FAILS'}  {nums}")
        print(f"\nrule: {v['rule']}")
    for key in ("forget_recall", "paraphrase_recall", "neighbor_recall", "retain_recall",
                "holdout_recall", "perplexity", "mia_auc_loss"):
        row = {lab: metrics[lab].get(key) for lab in ("before", "after") if lab in metrics}
        print(f"{key}: " + ", ".join(f"{lab} {v:.3f}" for lab, v in row.items()
                                     if isinstance(v, float)))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="a run folder of configs/gemma-facts.yaml")
    ap.add_argument("--verify", action="store_true",
                    help="re-measure with excise verify (into RUN/verify) first")
    args = ap.parse_args(argv)
    folder = args.run
    if args.verify:
        subprocess.run([sys.executable, "-m", "excise.app.cli", "verify", str(folder)],
                       check=True)
        folder = folder / "verify"
    show(json.loads((folder / "metrics.json").read_text()))


if __name__ == "__main__":
    main()
