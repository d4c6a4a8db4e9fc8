"""``probes.verify``: measure a model on a ForgetRequest beside the retrain oracle, attack it,
and decide whether the knowledge was deleted or only suppressed.

Suites (``probes.SUITES``, a registry: see :mod:`probes.suites`), selected by name
(``suite="all"`` runs every one):

- ``behaviour``  recall per split and form, paraphrases, perplexity, shared knowledge;
- ``oracle``     truth ratio, forget quality (KS vs the oracle), KL to the oracle, recall gaps;
- ``privacy``    membership AUC (loss, min-k%), PrivLeak vs the oracle, canary exposure;
- ``loo_probe``  leave-one-out "memorized vs not" probes per depth (ridge + logistic);
- ``drift``      linear CKA per layer against the original and the oracle;
- ``attacks``    restoration attacks on the model and the oracle (see ``probes.attacks``);
- ``verdict``    deleted / suppressed / damaged / not forgotten (runs ``privacy`` and
                 ``attacks``; needs oracle and original; the rule: ``probes.verdict``).

Metrics go under ``label`` (the model), ``"oracle"``, and - when ``original`` is given and more
than behaviour is asked for - the original model under ``"before"`` (if ``label == "after"``, as
in ``excise run``) or ``"original"``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from excise.checks import check_compatible, check_request, check_weights
from excise.handle import ModelHandle
from excise.report import Report, check_outcome
from excise.request import ForgetRequest
from probes.suites import SUITES, Context, SuiteResult, VerdictResult, VerifySettings, resolve
from probes.verdict import FAVOURABLE, Rule


def verify(model: ModelHandle, request: ForgetRequest,
           oracle: ModelHandle | Sequence[ModelHandle] | None = None,
           suite: str | Sequence[str] = "behaviour", label: str = "model",
           original: ModelHandle | None = None, *, attacks=None, seed: int = 0,
           margin: float = 0.05, tolerance: float = 0.1, n_false: int = 5,
           n_candidates: int = 256, loo_lam: float = 10.0, loo_logistic: bool = True,
           max_probe: int = 150, loo_by: str = "person", loo_null: int = 20, sae=None,
           grid: str = "quick", utility: float = 0.98, ppl_tolerance: float = Rule.perplexity,
           mia_tolerance: float = 0.05, confidence: float = 0.9, n_boot: int = 2000,
           log: Callable[[str], None] | None = None, cache: dict | None = None) -> Report:
    """Measure ``model`` (and the ``oracle`` under identical settings) on ``request``.

    ``original`` is the model before editing (drift, the "not forgotten" test, the SAE for
    latent steering). ``attacks``: attack names, a dict of :class:`probes.attacks.AttackConfig`
    settings, or an ``AttackConfig``; ``grid``: the attacks' grid of learning rates x seeds
    (``quick``, ``full``, ``single``; ``probes.attacks.GRIDS``) unless ``attacks`` sets one.
    ``margin`` / ``tolerance`` / ``utility`` / ``ppl_tolerance`` / ``mia_tolerance`` /
    ``confidence`` / ``n_boot``: the verdict rule (:class:`probes.verdict.Rule`). The settings
    travel to the suites as one :class:`probes.suites.VerifySettings`. Nothing here changes
    ``model``: attacks work on clones or through temporary hooks.

    ``cache``: a dict kept by the caller across calls (sweeps): per-model results (behaviour,
    privacy, probes, attack curves) of models without hooks are reused when the weights'
    fingerprint, the request and the settings match - the oracle and the original are then
    measured once per request instead of once per edit.

    ``oracle`` may be a list of retrain oracles (the same recipe at different training seeds):
    the verdict is then taken against each, with the same rule, and the report is the one
    against the oracle that gives the most favourable verdict (:func:`against_oracles`)."""
    settings = VerifySettings(
        suite=suite, label=label, attacks=attacks, seed=seed, margin=margin,
        tolerance=tolerance, n_false=n_false, n_candidates=n_candidates, loo_lam=loo_lam,
        loo_logistic=loo_logistic, max_probe=max_probe, loo_by=loo_by, loo_null=loo_null, sae=sae,
        grid=grid, utility=utility, ppl_tolerance=ppl_tolerance, mia_tolerance=mia_tolerance,
        confidence=confidence, n_boot=n_boot)
    if isinstance(oracle, (list, tuple)):
        return against_oracles(model, request, settings, list(oracle), original=original,
                               log=log, cache=cache)
    return run_suites(model, request, settings, oracle=oracle, original=original, log=log,
                      cache=cache)


def against_oracles(model: ModelHandle, request: ForgetRequest, settings: VerifySettings,
                    oracles: Sequence[ModelHandle], *, original: ModelHandle | None = None,
                    log: Callable[[str], None] | None = None,
                    cache: dict | None = None) -> Report:
    """Judge ``model`` against several retrain oracles (one recipe, different training seeds).

    Retraining is a distribution, not one model: two retrain oracles of the ``tiny`` organism
    that differ only in their training seed differ by more than the rule's tolerances
    (perplexity by up to 18%, membership AUC by 0.1-0.14, forget recall by 0.05 -
    ``bench/calibrate.py``), so one oracle's seed decides a verdict as much as the model does
    (Hayes et al. 2024, "Inexact Unlearning Needs More Careful Evaluations", judge against many
    retrained models for this reason). Each oracle judges the model with the same rule; the
    report is the one whose verdict is the most favourable (:data:`~probes.verdict.FAVOURABLE`:
    deleted, inconclusive, suppressed, not forgotten, damaged) - a model that reads like some
    retraining on every check at once is as deleted as retraining makes it. Every check stays
    against one oracle: the checks are not mixed across oracles. ``extra["oracles"]`` lists
    each oracle's verdict, its credibly failed checks and its open ones; the model's and the
    original's measurements are made once (a shared ``cache``)."""
    if not oracles:
        raise ValueError("oracle=[]: give at least one retrain oracle (or None)")
    if "verdict" not in resolve(settings.suite):
        raise ValueError(f"several oracles ({len(oracles)}) serve the verdict only; suite "
                         f"{settings.suite!r} has no verdict: pass one oracle, or add the "
                         f"'verdict' suite")
    cache = {} if cache is None else cache
    reports = []
    for i, o in enumerate(oracles):
        if log:
            log(f"verify: against oracle {i + 1} of {len(oracles)}")
        reports.append(run_suites(model, request, settings, oracle=o, original=original,
                                  log=log, cache=cache))
    best = min(range(len(reports)), key=lambda i: FAVOURABLE.index(reports[i].verdict))
    rep = reports[best]
    def outcomes(r: Report, word: str) -> list[str]:
        return [k for k, c in r.extra["verdict"]["checks"].items() if check_outcome(c) == word]

    rep.extra["oracles"] = [
        {"index": i, "verdict": r.verdict, "chosen": i == best,
         "failed": outcomes(r, "FAIL"), "open": outcomes(r, "open"),
         "metrics": r.metrics.get("oracle", {})}
        for i, r in enumerate(reports)]
    order = ", ".join(FAVOURABLE)
    rep.verdict_rule = (f"Judged against {len(oracles)} retrain oracles (training seeds): the "
                        f"same rule against each, the most favourable verdict ({order} in that "
                        f"order) is the model's; this report is the one against oracle "
                        f"{best + 1}. " + rep.verdict_rule)
    return rep


def run_suites(model: ModelHandle, request: ForgetRequest, settings: VerifySettings, *,
               oracle: ModelHandle | None = None, original: ModelHandle | None = None,
               log: Callable[[str], None] | None = None, cache: dict | None = None) -> Report:
    """:func:`verify` with its settings as one :class:`VerifySettings`: resolve the suites,
    run every check they declare before measuring anything, run them, assemble the Report."""
    names = resolve(settings.suite)
    suites = [SUITES[n] for n in names]
    check_request(request, needs_holdout=any(s.needs_holdout for s in suites))
    check_compatible(model, oracle, "oracle")
    check_compatible(model, original, "original model")
    check_weights("verify", model, oracle, original)
    if settings.label == "oracle":
        raise ValueError("label 'oracle' is reserved for the retrain oracle's column")
    given = {"oracle": oracle is not None, "original": original is not None}
    for s in suites:
        refusal = s.missing(given)
        if refusal:
            raise ValueError(refusal)
    for s in suites:
        if s.check is not None:
            s.check(settings)

    models = {settings.label: model}
    if original is not None and names != ["behaviour"]:
        models[settings.original_label] = original
    results: dict[str, SuiteResult] = {}
    ctx = Context(model, request, settings, oracle=oracle, original=original, models=models,
                  results=results, cache=cache, log=log)
    timing: dict[str, float] = {}
    for s in suites:
        if log:
            log(f"verify: {s.name}")
        t = time.time()
        results[s.name] = s.run(ctx)
        if s.timed:
            timing[s.name] = time.time() - t

    metrics: dict[str, dict[str, float]] = {k: {} for k in ctx.everyone}
    extra: dict = {}
    report = Report(metrics=metrics, request=request.summary(), extra=extra)
    for r in results.values():
        for k, v in r.metrics.items():
            metrics.setdefault(k, {}).update(v)
        extra.update(r.extra)
        if isinstance(r, VerdictResult):
            report.verdict, report.verdict_rule = r.verdict, r.rule
    extra["verify_seconds"] = {k: round(v, 2) for k, v in timing.items()}
    return report
