"""The verification suites: a registry from name to a small function with declared prerequisites.

A suite is ``fn(ctx: Context) -> SuiteResult``; ``@suite(name, ...)`` registers it (a name taken
twice is refused) and declares what it needs before anything runs:

- ``requires``   suites whose results it reads (``ctx.results[name]``); they run first and are
                 added when not asked for;
- ``needs``      models that must be given (``"oracle"``, ``"original"``), all of them;
  ``needs_any``  at least one of them; ``refusal`` is the message when they are missing;
- ``needs_holdout`` the request's holdout split must be non-empty;
- ``check``      a check of the settings, ``check(settings)``, that raises on bad input;
- ``timed``      whether its seconds are recorded under ``extra["verify_seconds"]``.

``probes.verify`` runs the suites asked for, with their prerequisites, in registration order
(``SUITES``): behaviour, oracle, privacy, loo_probe, drift, attacks, verdict. ``behaviour``
always runs: every report starts from it.
"""

from __future__ import annotations

import copy
import difflib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from excise.handle import ModelHandle
from excise.report import AttackCurves
from excise.request import ForgetRequest, owner
from excise.report import AttackGrid
from probes import attacks as A
from probes import representations as R
from probes.behaviour import measure_behaviour
from probes.oracle import oracle_metrics
from probes.privacy import add_privleak, membership_scores, privacy_metrics
from probes.verdict import Judgement, Rule, decide, groups_of, params_changed

MODELS = ("oracle", "original")  # the models a suite may need besides the one under test


@dataclass(frozen=True)
class VerifySettings:
    """``probes.verify``'s settings, as every suite reads them.

    ``attacks``: attack names, a dict of :class:`probes.attacks.AttackConfig` settings, or an
    ``AttackConfig``. ``grid``: the attacker-hygiene grid of learning rates x seeds
    (``probes.attacks.GRIDS``: quick, full, single) unless ``attacks`` sets its own.
    ``margin`` / ``tolerance`` / ``utility`` / ``ppl_tolerance`` / ``mia_tolerance`` /
    ``confidence`` / ``n_boot``: the verdict rule's settings (:class:`probes.verdict.Rule`).
    ``sae``: an SAE (or ``(sae, input_scale)``) for the steering attack instead of training
    one."""

    suite: tuple[str, ...] = ("behaviour",)
    label: str = "model"
    attacks: Any = None
    seed: int = 0
    margin: float = 0.05
    tolerance: float = 0.1
    n_false: int = 5
    n_candidates: int = 256
    loo_lam: float = 10.0
    loo_logistic: bool = True
    max_probe: int = 150
    loo_by: str = "person"
    loo_null: int = 20
    sae: Any = None
    grid: str = "quick"
    utility: float = 0.98
    ppl_tolerance: float = Rule.perplexity
    mia_tolerance: float = 0.05
    confidence: float = 0.9
    n_boot: int = 2000

    def __post_init__(self):
        s = self.suite
        object.__setattr__(self, "suite", (s,) if isinstance(s, str) else tuple(s))
        if self.grid not in A.GRIDS:
            raise ValueError(f"grid={self.grid!r}: choose one of {list(A.GRIDS)} (the attack "
                             f"grid of learning rates x seeds)")
        self.rule()  # refuses bad verdict settings before anything runs

    def rule(self) -> Rule:
        """The verdict rule with these settings (bootstrap seeded by ``seed``)."""
        return Rule(margin=self.margin, tolerance=self.tolerance, utility=self.utility,
                    perplexity=self.ppl_tolerance, mia=self.mia_tolerance,
                    confidence=self.confidence, n_boot=self.n_boot, seed=self.seed)

    @property
    def original_label(self) -> str:
        """The original model's column: ``before`` beside ``after`` (as in ``excise run``)."""
        return "before" if self.label == "after" else "original"

    def attack_config(self) -> A.AttackConfig:
        """The attack settings (``seed`` is the verification seed and ``grid`` this grid
        unless given; an ``AttackConfig`` is used as it is)."""
        attacks = self.attacks
        if isinstance(attacks, A.AttackConfig):
            return attacks
        base = {"seed": self.seed, "grid": self.grid}
        if attacks is None:
            return A.AttackConfig(**base)
        if isinstance(attacks, dict):
            return A.AttackConfig.from_params(base | dict(attacks))
        return A.AttackConfig.from_params(base | {"attacks": attacks})


@dataclass(frozen=True)
class SuiteResult:
    """What one suite measured: metrics per model label (``metrics[label][name]``) and what it
    adds to the report's ``extra`` (in order)."""

    metrics: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class BehaviourResult(SuiteResult):
    """The behaviour suite: metrics, and per model the per-fact correctness of every split
    (``hits[label][split]``, ``[n]`` bool) that the verdict's bootstrap resamples."""

    hits: Mapping[str, Mapping[str, Any]]
    # the owner of every fact of splits the request does not hold (generated same-template
    # neighbors: their substituted subject), for the bootstrap beside ``groups_of(request)``
    groups: Mapping[str, Sequence] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class PrivacyResult(SuiteResult):
    """The privacy suite: metrics, and per model the per-fact loss-based membership scores
    ``scores[label] = (forget, holdout)`` that the verdict's AUC bootstrap resamples."""

    scores: Mapping[str, tuple] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class AttackResult(SuiteResult):
    """The attacks suite: per attack its whole grid (:class:`excise.report.AttackGrid`), the
    curves of its worst setting (:class:`AttackCurves`, what plots show), and the settings."""

    curves: Mapping[str, AttackCurves]
    config: A.AttackConfig
    grids: Mapping[str, AttackGrid] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class VerdictResult(SuiteResult):
    """The verdict (``probes.verdict.VERDICTS``), the rule that produced it, its checks and
    issue 8's bar beside it."""

    verdict: str
    rule: str
    checks: Mapping[str, Mapping[str, Any]]
    bar: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class Context:
    """What a suite sees: the models, the request, the settings and earlier suites' results.

    ``models`` are measured under their labels: the model under test and - when more than
    behaviour runs and it is given - the original (``settings.original_label``); ``everyone``
    adds the oracle. ``cache``: the caller's per-model cache (see :meth:`memo`)."""

    model: ModelHandle
    request: ForgetRequest
    settings: VerifySettings
    oracle: ModelHandle | None = None
    original: ModelHandle | None = None
    models: Mapping[str, ModelHandle] = field(default_factory=dict)
    results: Mapping[str, SuiteResult] = field(default_factory=dict)
    cache: dict | None = None
    log: Callable[[str], None] | None = None

    @property
    def label(self) -> str:
        return self.settings.label

    @property
    def everyone(self) -> dict[str, ModelHandle]:
        return dict(self.models) | ({"oracle": self.oracle} if self.oracle is not None else {})

    def memo(self, model: ModelHandle, key: tuple, fn: Callable[[], Any]) -> Any:
        """``fn()``, reused from ``cache`` when a model without hooks with the same weights'
        fingerprint was measured on the same request, seed and ``key`` (returned as a copy)."""
        if self.cache is None or model.hook_count():
            return fn()
        k = (model.fingerprint(), self.request.digest(), self.settings.seed) + key
        if k not in self.cache:
            self.cache[k] = fn()
        return copy.deepcopy(self.cache[k])


@dataclass(frozen=True)
class Suite:
    """A registered suite and what it declares (see the module docstring)."""

    name: str
    run: Callable[[Context], SuiteResult]
    requires: tuple[str, ...] = ()
    needs: tuple[str, ...] = ()
    needs_any: tuple[str, ...] = ()
    refusal: str = ""
    needs_holdout: bool = False
    check: Callable[[VerifySettings], None] | None = None
    timed: bool = True

    def missing(self, given: Mapping[str, bool]) -> str | None:
        """The refusal when a model it needs was not given, else None."""
        if any(not given[n] for n in self.needs) or (
                self.needs_any and not any(given[n] for n in self.needs_any)):
            return self.refusal
        return None


SUITES: dict[str, Suite] = {}


def register_suite(s: Suite) -> Suite:
    """Add ``s`` to ``SUITES``. Refuses a name already taken, a prerequisite not registered yet
    (so the registration order is a valid running order) and a model it cannot need."""
    if s.name == "all":
        raise ValueError("suite name 'all' is reserved: it selects every registered suite")
    if s.name in SUITES:
        raise ValueError(f"verification suite {s.name!r} is already registered (by "
                         f"{SUITES[s.name].run.__module__}.{SUITES[s.name].run.__qualname__}); "
                         f"choose another name")
    bad = [r for r in s.requires if r not in SUITES]
    if bad:
        raise ValueError(f"suite {s.name!r} requires {bad[0]!r}, which is not registered; "
                         f"register prerequisites first (registered: {list(SUITES)})")
    bad = [n for n in s.needs + s.needs_any if n not in MODELS]
    if bad:
        raise ValueError(f"suite {s.name!r} needs {bad[0]!r}; a suite can need {list(MODELS)}")
    if (s.needs or s.needs_any) and not s.refusal:
        raise ValueError(f"suite {s.name!r} needs models: give the refusal message that says "
                         f"what to pass")
    SUITES[s.name] = s
    return s


def suite(name: str, **declared) -> Callable[[Callable[[Context], SuiteResult]], Callable]:
    """Decorator: register ``fn(ctx) -> SuiteResult`` as suite ``name`` (see :class:`Suite`)."""
    def deco(fn):
        register_suite(Suite(name, fn, **declared))
        return fn
    return deco


def resolve(names: str | Sequence[str]) -> list[str]:
    """The suites to run for ``names`` ("all" = every one): those asked for, their
    prerequisites and ``behaviour``, in registration order."""
    names = [names] if isinstance(names, str) else list(names)
    if "all" in names:
        names = list(SUITES)
    for s in names:
        if s not in SUITES:
            close = difflib.get_close_matches(str(s), list(SUITES), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"unknown verification suite {s!r}{hint} (choose from "
                             f"{list(SUITES) + ['all']})")
    want: set[str] = set()
    todo = ["behaviour"] + names
    while todo:
        s = todo.pop()
        if s not in want:
            want.add(s)
            todo.extend(SUITES[s].requires)
    return [s for s in SUITES if s in want]


# -- the suites --------------------------------------------------------------------------------
@suite("behaviour")
def behaviour(ctx: Context) -> BehaviourResult:
    """Recall per split and form, paraphrases, perplexity, shared knowledge, same-template
    neighbors (:mod:`excise.templates`, generated once from the unedited model) and the per-fact
    correctness behind each recall."""
    st = same_template(ctx)
    facts = st.metric if st is not None and len(st.metric) else None
    engine = ctx.settings.attack_config().engine  # the forward the attacks read through too
    key = (("behaviour", engine) + ((tuple((f.prompt, f.target) for f in facts),) if facts
                                    else ()))
    got = {k: ctx.memo(m, key, partial(measure_behaviour, m, ctx.request, facts, engine))
           for k, m in ctx.everyone.items()}
    extra = {"same_template": st.summary()} if st is not None else {}
    return BehaviourResult({k: v[0] for k, v in got.items()}, extra,
                           hits={k: v[1] for k, v in got.items()},
                           groups={"same_template": [owner(f) for f in facts]} if facts else {})


def same_template(ctx: Context):
    """The request's same-template neighbors (:func:`excise.templates.cached`) from the
    unedited model: the original when given, else the model under test when it carries no edit
    (then it is the unedited model), else what an earlier call stored for the weights before its
    first edit; None when none of these is known."""
    from excise import templates

    if ctx.original is not None:
        return templates.cached(ctx.original, ctx.request)
    stack = getattr(ctx.model, "edit_stack", [])
    if not stack:
        return templates.cached(ctx.model, ctx.request)
    return templates.lookup(ctx.request, stack[0].fingerprint_before or "")


@suite("oracle", requires=("behaviour",), needs=("oracle",),
       refusal="the 'oracle' suite needs the retrain oracle: pass oracle=org.oracle(request)")
def oracle(ctx: Context) -> SuiteResult:
    """Truth ratio, forget quality (KS vs the oracle), KL to the oracle, recall gaps."""
    s = ctx.settings
    return SuiteResult(oracle_metrics(dict(ctx.models), ctx.oracle, ctx.request,
                                      ctx.results["behaviour"].metrics, s.n_false, s.seed))


@suite("privacy", needs_holdout=True)
def privacy(ctx: Context) -> SuiteResult:
    """Membership AUC (loss, min-k%), PrivLeak vs the oracle, canary exposure."""
    s = ctx.settings
    engine = s.attack_config().engine
    got = {k: ctx.memo(m, ("privacy", s.n_candidates, engine), partial(
        _privacy, m, ctx.request, s.n_candidates, s.seed, engine))
        for k, m in ctx.everyone.items()}
    metrics = {k: v[0] for k, v in got.items()}
    add_privleak(metrics)
    return PrivacyResult(metrics, scores={k: v[1] for k, v in got.items()})


def _privacy(model: ModelHandle, request: ForgetRequest, n_candidates: int, seed: int,
             engine: str = "serial") -> tuple:
    """The privacy metrics and the per-fact loss-based membership scores ``(forget, holdout)``
    (what ``mia_auc_loss`` is the AUC of; the verdict's bootstrap resamples them by person),
    each fact's log-probabilities read once."""
    both = (membership_scores(model, request.forget, engine=engine),
            membership_scores(model, request.holdout, engine=engine))
    return (privacy_metrics(model, request, n_candidates, seed=seed, scores=both,
                            engine=engine), (both[0][0], both[1][0]))


@suite("loo_probe", needs_holdout=True)
def loo_probe(ctx: Context) -> SuiteResult:
    """Leave-one-out "memorized vs not" probes per depth (ridge + logistic) with a permutation
    null; per model also the best depth against the null of the best depth (``loo_best``,
    ``loo_best_depth``, ``loo_best_null``, ``loo_best_null_hi``: each permutation's largest
    accuracy over depths, the same permutations as the per-depth null), what the verdict reads
    where this suite ran (``probes.verdict``, its ``probe`` check)."""
    s = ctx.settings
    facts, y = R.probe_data(ctx.request, s.max_probe, s.seed)
    chance = float(max(y.mean(), 1 - y.mean()))
    metrics: dict[str, dict[str, float]] = {}
    curves = {}
    for k, m in ctx.everyone.items():
        got: R.LooProbe = ctx.memo(
            m, ("loo_probe", s.max_probe, s.loo_lam, s.loo_logistic, s.loo_by, s.loo_null),
            partial(R.loo_probe_result, m, facts, y, s.loo_lam, s.loo_logistic, s.loo_by,
                    s.loo_null, s.seed))
        res = curves[k] = got.curves
        mk = metrics[k] = {}
        for kind, accs in res.items():
            for L, acc in enumerate(accs):
                mk[f"loo_{kind}_L{L}"] = acc
        mk["loo_chance"] = chance
        if "null" in res:  # signature above the protocol's own chance, worst depth
            mk["loo_gap_max"] = max(a - n for a, n in zip(res["balanced"], res["null"]))
        mk["loo_best"], mk["loo_best_depth"] = got.best, got.best_depth
        if got.best_null is not None:
            mk["loo_best_null"], mk["loo_best_null_hi"] = got.best_null, got.best_null_hi
    extra = {"depths": list(range(ctx.model.n_layers)), "chance": chance, "n": len(y),
             "lam": s.loo_lam, "left_out": s.loo_by, "curves": curves,
             "labels": "forget (memorized) vs holdout (never trained)",
             "null": "balanced probe with labels permuted across people "
                     f"({s.loo_null} permutations)",
             "best_null": "per permutation the largest balanced accuracy over depths (the "
                          "same permutation at every depth): choosing the depth is inside it"}
    return SuiteResult(metrics, {"loo_probe": extra})


@suite("drift", needs_any=("original", "oracle"),
       refusal="the 'drift' suite compares representations with the original and/or the "
               "oracle: pass original= or oracle=")
def drift(ctx: Context) -> SuiteResult:
    """Linear CKA per layer against the original and the oracle."""
    s = ctx.settings
    refs = {n: r for n, r in (("original", ctx.original), ("oracle", ctx.oracle))
            if r is not None}
    sets = R.drift_facts(ctx.request, s.max_probe, s.seed)
    metrics: dict[str, dict[str, float]] = {}
    curves: dict = {}
    for k, m in ctx.everyone.items():
        mk = metrics.setdefault(k, {})
        for rname, ref in refs.items():
            for split, facts in sets.items():
                vals = [1.0] * m.n_layers if ref is m else R.cka_per_layer(m, ref, facts)
                curves.setdefault(k, {})[f"{rname}/{split}"] = vals
                if split == "forget":
                    for L, v in enumerate(vals):
                        mk[f"cka_{rname}_forget_L{L}"] = v
                else:
                    mk[f"cka_{rname}_retain_min"] = min(vals)
    return SuiteResult(metrics, {"drift": {"depths": list(range(ctx.model.n_layers)),
                                           "curves": curves}})


def _check_attacks(settings: VerifySettings) -> None:
    settings.attack_config()


@suite("attacks", check=_check_attacks)
def attacks(ctx: Context) -> AttackResult:
    """Restoration attacks over the attacker-hygiene grid (learning rates x seeds), every
    setting identically on the model, the oracle and the original (whose curves flag the
    settings that wreck it; see ``probes.attacks``). Metrics: each model's peak forget recall
    over the whole grid, and the model's worst gap above the oracle.

    Without an oracle, where the request has never-known facts (its holdout split), the same
    grid also runs on the comparator (``probes.attacks.run_comparator_grid``: those facts in
    the forget facts' place, on the original), labelled ``"comparator"``: the reference the
    gaps are then taken against (``attack_<name>_comparator_gap``; its peaks:
    ``attack_<name>_comparator``, both under the model's label)."""
    s, cfg = ctx.settings, ctx.settings.attack_config()
    orig = s.original_label
    targets = {ctx.label: ctx.model}
    if ctx.oracle is not None:
        targets["oracle"] = ctx.oracle
    if ctx.original is not None and orig in ctx.models:
        targets[orig] = ctx.original
    source = ctx.original or ctx.model
    kit: dict = {}

    def grid_of(m: ModelHandle) -> dict[str, AttackGrid]:
        if "sae" in cfg.attacks and "kit" not in kit:  # built once, only when a model misses
            kit["kit"] = A.steering_kit(source, ctx.request, cfg, s.sae)
        return A.run_grid({"_": m}, ctx.request, cfg, kit=kit.get("kit"), log=ctx.log)

    # one model at a time, so with a cache the oracle's and the original's grids are reused;
    # an SAE the caller supplied decides the steering attack too: its identity joins the key
    # (a tuple - probes.store keeps such results in memory only)
    given = (("sae given", id(s.sae)),) if s.sae is not None and "sae" in cfg.attacks else ()
    parts = {k: ctx.memo(m, ("attacks", repr(cfg), source.fingerprint()) + given,
                         partial(grid_of, m)) for k, m in targets.items()}
    ref = "oracle" if "oracle" in targets else None
    if ref is None and len(ctx.request.holdout):  # no oracle: never-known facts instead
        ref = A.COMPARATOR
        if "sae" in cfg.attacks and "kit" not in kit:
            kit["kit"] = A.steering_kit(source, ctx.request, cfg, s.sae)
        parts[ref] = ctx.memo(source, ("attacks", ref, repr(cfg)) + given, partial(
            A.run_comparator_grid, source, ctx.request, cfg, kit=kit.get("kit"), log=ctx.log))
    grids = A.merge_grids(parts)
    if orig in targets:
        grids = A.flag(grids, orig, cfg.flag_drop)
    # what plots show: each attack at its worst setting (largest gap above the oracle or the
    # comparator; without either, where the model recovers most)
    res = {name: g.worst(ctx.label, ref or "oracle").curves for name, g in grids.items()}
    metrics: dict[str, dict[str, float]] = {k: {} for k in targets}
    for name, g in grids.items():
        for k in targets:
            metrics[k][f"attack_{name}"] = g.peak(k)
        if ref == "oracle":
            metrics[ctx.label][f"attack_{name}_gap"] = g.worst_gap(ctx.label, ref)
        elif ref == A.COMPARATOR:
            metrics[ctx.label][f"attack_{name}_comparator"] = g.peak(ref)
            metrics[ctx.label][f"attack_{name}_comparator_gap"] = g.worst_gap(ctx.label, ref)
    extra = {"attacks": res, "attack_grid": grids, "attack_config": cfg.to_dict()}
    if ref == A.COMPARATOR:
        extra["attack_reference"] = (f"{A.COMPARATOR}: the request's {len(ctx.request.holdout)} "
                                     f"never-known (holdout) facts attacked on the original "
                                     f"exactly as the forget facts")
    return AttackResult(metrics, extra, curves=res, config=cfg, grids=grids)


@suite("verdict", requires=("behaviour", "privacy", "attacks"), needs=("original",),
       refusal="the verdict compares the model with the original and with the retrain oracle "
               "(or, without one, with never-known facts: the request's holdout split): pass "
               "original= (and oracle= where there is one)", needs_holdout=True, timed=False)
def verdict(ctx: Context) -> VerdictResult:
    """Deleted / suppressed / damaged / not forgotten (``probes.verdict``): against the retrain
    oracle, or - without one - against the comparator (never-known facts attacked alike;
    ``probes.verdict.decide_comparator``). Where the ``loo_probe`` suite ran too (it is not
    required), its best-depth numbers go to the rule as ``probe=`` (:func:`probe_inputs`)."""
    s = ctx.settings
    metrics: dict[str, dict[str, float]] = {}
    for name in ("behaviour", "privacy"):
        for k, v in ctx.results[name].metrics.items():
            metrics.setdefault(k, {}).update(v)
    changed = params_changed(ctx.model, ctx.original)
    probe = probe_inputs(ctx.results["loo_probe"]) if "loo_probe" in ctx.results else None
    j: Judgement = decide(metrics, ctx.results["behaviour"].hits,
                          groups_of(ctx.request) | dict(ctx.results["behaviour"].groups),
                          ctx.results["attacks"].grids, ctx.label, s.original_label, s.rule(),
                          params_changed=changed,
                          scores=getattr(ctx.results["privacy"], "scores", None), probe=probe)
    return VerdictResult({ctx.label: {"params_changed": changed}}, {"verdict": j.to_dict()},
                         verdict=j.verdict, rule=j.rule, checks=j.checks, bar=j.bar)


def probe_inputs(result: SuiteResult) -> dict[str, dict[str, float | None]]:
    """The ``loo_probe`` suite's best-depth numbers per model label, as
    :func:`probes.verdict.decide` reads them: ``best``, ``depth``, ``null`` and ``null_hi``
    (None where the suite ran without a permutation null, ``loo_null=0``)."""
    return {k: {"best": m["loo_best"], "depth": m["loo_best_depth"],
                "null": m.get("loo_best_null"), "null_hi": m.get("loo_best_null_hi")}
            for k, m in result.metrics.items() if "loo_best" in m}
