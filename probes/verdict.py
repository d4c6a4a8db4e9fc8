"""The verdict: deleted / suppressed / not forgotten, with the rule that produced it."""

from __future__ import annotations

from collections.abc import Mapping

from excise.report import AttackCurves

VERDICTS = ("deleted", "suppressed", "not forgotten")


def rule_text(margin: float, tolerance: float, attacks: list[str]) -> str:
    att = ", ".join(attacks) if attacks else "none were run"
    return (f"'deleted' if forget recall <= oracle forget recall + {margin:g} AND under every "
            f"restoration attack ({att}) the edited model's forget recall is at no point of the "
            f"attack curve more than {tolerance:g} above the oracle's under identical settings; "
            f"'not forgotten' if forget recall >= original forget recall - {margin:g}; "
            f"otherwise 'suppressed'.")


def decide(metrics: Mapping[str, Mapping[str, float]], attacks: Mapping[str, AttackCurves],
           label: str, original_label: str, margin: float = 0.05,
           tolerance: float = 0.1) -> tuple[str, str, dict]:
    """Apply the rule to a report's metrics (forget recall of ``label``, ``"oracle"`` and
    ``original_label``) and attack curves (each with a curve for ``label`` and the oracle)."""
    for need in (label, "oracle", original_label):
        if need not in metrics or "forget_recall" not in metrics[need]:
            raise ValueError(f"the verdict needs forget recall of {need!r}; have "
                             f"{sorted(metrics)} (pass oracle= and original= to verify)")
    f = metrics[label]["forget_recall"]
    fo = metrics["oracle"]["forget_recall"]
    f0 = metrics[original_label]["forget_recall"]
    checks = {"recall": {"model": f, "oracle": fo, "original": f0,
                         "ok": f <= fo + margin}}
    for name, a in attacks.items():
        e, o = a.curves[label].y, a.curves["oracle"].y
        gaps = [x - y for x, y in zip(e, o)]
        worst = max(gaps)
        checks[name] = {"worst_gap": worst, "at": a.x[gaps.index(worst)],
                        "ok": worst <= tolerance}
    if all(c["ok"] for c in checks.values()):
        v = "deleted"
    elif f >= f0 - margin:
        v = "not forgotten"
    else:
        v = "suppressed"
    return v, rule_text(margin, tolerance, list(attacks)), checks
