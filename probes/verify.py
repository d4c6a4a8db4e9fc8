"""``probes.verify``: measure a model on a ForgetRequest beside the retrain oracle, attack it,
and decide whether the knowledge was deleted or only suppressed.

Suites (``SUITES``), selected by name (``suite="all"`` runs every one):

- ``behaviour``  recall per split and form, paraphrases, perplexity, shared knowledge;
- ``oracle``     truth ratio, forget quality (KS vs the oracle), KL to the oracle, recall gaps;
- ``privacy``    membership AUC (loss, min-k%), PrivLeak vs the oracle, canary exposure;
- ``loo_probe``  leave-one-out "memorized vs not" probes per depth (ridge + logistic);
- ``drift``      linear CKA per layer against the original and the oracle;
- ``attacks``    restoration attacks on the model and the oracle (see ``probes.attacks``);
- ``verdict``    deleted / suppressed / not forgotten (runs ``attacks``; needs oracle and
                 original).

Metrics go under ``label`` (the model), ``"oracle"``, and - when ``original`` is given and more
than behaviour is asked for - the original model under ``"before"`` (if ``label == "after"``, as
in ``excise run``) or ``"original"``.
"""

from __future__ import annotations

import copy
import time
from typing import Callable, Sequence

from excise.handle import ModelHandle
from excise.report import Report
from excise.request import ForgetRequest
from probes import attacks as A
from probes import representations as R
from probes.behaviour import behaviour_metrics
from probes.checks import check_compatible, check_request
from probes.oracle import oracle_metrics
from probes.privacy import add_privleak, privacy_metrics
from probes.verdict import decide

SUITES = ("behaviour", "oracle", "privacy", "loo_probe", "drift", "attacks", "verdict")


def _suites(suite) -> list[str]:
    names = [suite] if isinstance(suite, str) else list(suite)
    if "all" in names:
        names = list(SUITES)
    for s in names:
        if s not in SUITES:
            raise ValueError(f"unknown verification suite {s!r}; choose from "
                             f"{list(SUITES) + ['all']}")
    if "verdict" in names and "attacks" not in names:
        names.append("attacks")
    if "behaviour" not in names:
        names.insert(0, "behaviour")
    return [s for s in SUITES if s in names]


def _attack_config(attacks, seed: int) -> A.AttackConfig:
    if isinstance(attacks, A.AttackConfig):
        return attacks
    if attacks is None:
        return A.AttackConfig(seed=seed)
    if isinstance(attacks, dict):
        return A.AttackConfig.from_params({"seed": seed} | dict(attacks))
    return A.AttackConfig.from_params({"attacks": attacks, "seed": seed})


def verify(model: ModelHandle, request: ForgetRequest, oracle: ModelHandle | None = None,
           suite: str | Sequence[str] = "behaviour", label: str = "model",
           original: ModelHandle | None = None, *, attacks=None, seed: int = 0,
           margin: float = 0.05, tolerance: float = 0.1, n_false: int = 5,
           n_candidates: int = 256, loo_lam: float = 10.0, loo_logistic: bool = True,
           max_probe: int = 150, loo_by: str = "person", loo_null: int = 20, sae=None,
           log: Callable[[str], None] | None = None, cache: dict | None = None) -> Report:
    """Measure ``model`` (and the ``oracle`` under identical settings) on ``request``.

    ``original`` is the model before editing (drift, the "not forgotten" test, the SAE for
    latent steering). ``attacks``: attack names, a dict of :class:`probes.attacks.AttackConfig`
    settings, or an ``AttackConfig``. ``margin`` / ``tolerance``: the verdict rule's slack on
    forget recall and on attack curves. Nothing here changes ``model``: attacks work on clones
    or through temporary hooks.

    ``cache``: a dict kept by the caller across calls (sweeps): per-model results (behaviour,
    privacy, probes, attack curves) of models without hooks are reused when the weights'
    fingerprint, the request and the settings match - the oracle and the original are then
    measured once per request instead of once per edit."""
    suites = _suites(suite)
    check_request(request, needs_holdout=bool({"privacy", "loo_probe"} & set(suites)))
    check_compatible(model, oracle, "oracle")
    check_compatible(model, original, "original model")
    if label == "oracle":
        raise ValueError("label 'oracle' is reserved for the retrain oracle's column")
    if "oracle" in suites and oracle is None:
        raise ValueError("the 'oracle' suite needs the retrain oracle: pass oracle=org.oracle("
                         "request)")
    if "verdict" in suites and (oracle is None or original is None):
        raise ValueError("the verdict compares the model with the retrain oracle and with the "
                         "original: pass both oracle= and original=")
    if "drift" in suites and oracle is None and original is None:
        raise ValueError("the 'drift' suite compares representations with the original and/or "
                         "the oracle: pass original= or oracle=")
    acfg = _attack_config(attacks, seed) if "attacks" in suites else None

    orig_label = "before" if label == "after" else "original"
    models = {label: model}
    if original is not None and suites != ["behaviour"]:
        models[orig_label] = original
    everyone = dict(models) | ({"oracle": oracle} if oracle is not None else {})
    metrics: dict[str, dict[str, float]] = {k: {} for k in everyone}
    extra: dict = {}
    timing: dict[str, float] = {}

    def memo(m, key: tuple, fn):
        if cache is None or m.hook_count():
            return fn()
        k = (m.fingerprint(), request.digest(), seed) + key
        if k not in cache:
            cache[k] = fn()
        return copy.deepcopy(cache[k])

    def step(name):
        if log:
            log(f"verify: {name}")
        return time.time()

    t = step("behaviour")
    for k, m in everyone.items():
        metrics[k].update(memo(m, ("behaviour",), lambda: behaviour_metrics(m, request)))
    timing["behaviour"] = time.time() - t

    if "oracle" in suites:
        t = step("oracle")
        res = oracle_metrics(models, oracle, request, metrics, n_false, seed)
        for k, v in res.items():
            metrics[k].update(v)
        timing["oracle"] = time.time() - t

    if "privacy" in suites:
        t = step("privacy")
        for k, m in everyone.items():
            metrics[k].update(memo(m, ("privacy", n_candidates), lambda: privacy_metrics(
                m, request, n_candidates, seed=seed)))
        add_privleak(metrics)
        timing["privacy"] = time.time() - t

    if "loo_probe" in suites:
        t = step("loo_probe")
        facts, y = R.probe_data(request, max_probe, seed)
        chance = float(max(y.mean(), 1 - y.mean()))
        curves = {}
        for k, m in everyone.items():
            res = memo(m, ("loo", max_probe, loo_lam, loo_logistic, loo_by, loo_null),
                       lambda: R.loo_probe(m, facts, y, loo_lam, loo_logistic, loo_by, loo_null,
                                           seed))
            curves[k] = res
            for kind, accs in res.items():
                for L, acc in enumerate(accs):
                    metrics[k][f"loo_{kind}_L{L}"] = acc
            metrics[k]["loo_chance"] = chance
            if "null" in res:  # signature above the protocol's own chance, worst depth
                metrics[k]["loo_gap_max"] = max(a - n for a, n in zip(res["balanced"],
                                                                       res["null"]))
        extra["loo_probe"] = {"depths": list(range(model.n_layers)), "chance": chance,
                              "n": len(y), "lam": loo_lam, "left_out": loo_by, "curves": curves,
                              "labels": "forget (memorized) vs holdout (never trained)",
                              "null": "balanced probe with labels permuted across people "
                                      f"({loo_null} permutations)"}
        timing["loo_probe"] = time.time() - t

    if "drift" in suites:
        t = step("drift")
        refs = {n: r for n, r in (("original", original), ("oracle", oracle)) if r is not None}
        sets = R.drift_facts(request, max_probe, seed)
        drift: dict = {}
        for k, m in everyone.items():
            for rname, ref in refs.items():
                for split, facts in sets.items():
                    if ref is m:
                        vals = [1.0] * m.n_layers
                    else:
                        vals = R.cka_per_layer(m, ref, facts)
                    drift.setdefault(k, {})[f"{rname}/{split}"] = vals
                    if split == "forget":
                        for L, v in enumerate(vals):
                            metrics[k][f"cka_{rname}_forget_L{L}"] = v
                    else:
                        metrics[k][f"cka_{rname}_retain_min"] = min(vals)
        extra["drift"] = {"depths": list(range(model.n_layers)), "curves": drift}
        timing["drift"] = time.time() - t

    if "attacks" in suites:
        t = step("attacks")
        targets = {label: model} | ({"oracle": oracle} if oracle is not None else {})
        if cache is None:
            res = A.run_attacks(targets, request, acfg, sae_source=original, sae=sae, log=log)
        else:  # one model at a time, so the oracle's curves are reused across edits
            source = original or model
            parts = {k: memo(m, ("attacks", repr(acfg), source.fingerprint()),
                             lambda: A.run_attacks({"_": m}, request, acfg, sae_source=source,
                                                   sae=sae, log=log))
                     for k, m in targets.items()}
            res = {}
            for k, part in parts.items():  # relabel "_" as the model's column
                for name, a in part.items():
                    r = res.setdefault(name, dict(a, curves={}, aux={}))
                    r["curves"][k] = a["curves"]["_"]
                    for key, v in a["aux"].items():
                        r["aux"].setdefault(key, {})[k] = v["_"]
        for name, a in res.items():
            for k, ys in a["curves"].items():
                metrics[k][f"attack_{name}"] = A.peak_recovery(ys)
        extra["attacks"] = res
        extra["attack_config"] = acfg.to_dict()
        timing["attacks"] = time.time() - t

    report = Report(metrics=metrics, request=request.summary(), extra=extra)
    if "verdict" in suites:
        v, rule, checks = decide(metrics, extra["attacks"], label, orig_label, margin, tolerance)
        report.verdict, report.verdict_rule = v, rule
        extra["verdict"] = {"verdict": v, "rule": rule, "checks": checks}
    extra["verify_seconds"] = {k: round(v, 2) for k, v in timing.items()}
    return report
