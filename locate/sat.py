"""Conflict-guided localization (CLUE) as weighted MaxSAT.

Given per-unit attribution scores for a *forget* metric and a *retain* metric,
each metric is thresholded into a circuit.  Units of the forget circuit are the
edit candidates; the question of which of them to edit is encoded as weighted
MaxSAT and solved with RC2 (python-sat).

Model (one boolean variable ``e_u`` = "edit u" per candidate unit):

* candidates  = forget circuit  ∪  must_edit.  Every other unit is never edited.
* hard        ``must_edit:u``   e_u
              ``must_keep:u``   ¬e_u
              ``protect:u``     ¬e_u for retain-circuit units whose retain
                                importance is >= ``protect_threshold``
                                (only when ``protect_retain``)
              ``coverage>=k``   at least k forget-circuit units edited
              ``max_edit<=m``   at most m units edited
* soft        (e_u,  wf_u)      want to edit forget-important units
              (¬e_u, wr_u)      want to keep retain-important units

Importance is ``abs(score)``; a unit missing from one mapping has score 0.
Integer weights are ``round(importance / max_importance * WEIGHT_SCALE)`` per
metric (so both metrics live on the same 0..10**6 scale); zero weights are
dropped.  ``cost`` is the sum of violated soft weights over candidate units.

Labels depend only on the circuits: ``forget_only`` / ``retain_only`` /
``shared`` / ``none``.  The solved assignment decides ``edit``.

Solving.  Free candidates are interchangeable w.r.t. every hard constraint, so
dominance breaking orders them by gain (chain clauses), which turns each
cardinality constraint into a unit clause; soft clauses decided by top-level
unit propagation are then charged/dropped and RC2 solves the residual.  (Plain
core-guided search on "at most m of n" with diverse weights needs many tiny
cores and does not scale; see ``_solve(reduce=False)`` for the plain encoding.)

Hard satisfiability is decided first (unit propagation of the hard clauses,
then RC2's own initial SAT call).  When the hard constraints are unsatisfiable,
:class:`Conflict` is raised with an unsatisfiable set of named constraints,
computed on the plain encoding (CardEnc cardinalities) with one selector
literal per named constraint, ``Solver.get_core`` and deletion-based
minimisation (minimal unless the time/call budget runs out; ``.minimal``).
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from pysat.card import CardEnc, EncType
from pysat.examples.rc2 import RC2
from pysat.formula import WCNF, IDPool
from pysat.solvers import Solver

__all__ = ["Resolution", "Conflict", "resolve", "brute_force", "LABELS", "WEIGHT_SCALE"]

WEIGHT_SCALE = 10**6
_SAT_SOLVER = "g3"
_CARD_ENCODING = EncType.kmtotalizer
_MAX_CORE_CALLS = 2000  # caps on the work spent minimising an unsat core
_CORE_BUDGET_S = 1.0
_BRUTE_FORCE_MAX = 16

LABELS = ("forget_only", "retain_only", "shared", "none")


@dataclass(frozen=True)
class Resolution:
    """Result of :func:`resolve` (or :func:`brute_force`)."""

    edit: tuple[str, ...]  # units to edit, by forget importance desc, then name
    labels: dict[str, str] = field(hash=False)  # unit -> one of LABELS
    cost: int  # sum of violated soft weights (integer units)
    n_vars: int
    n_hard: int
    n_soft: int
    solve_seconds: float  # wall time spent encoding + solving


class Conflict(ValueError):
    """Hard constraints are unsatisfiable.

    ``core`` names an unsatisfiable subset of the hard constraints, e.g.
    ``("must_edit:u", "protect:u")``; ``minimal`` says whether dropping any one
    of them is known to restore satisfiability.
    """

    def __init__(self, core: Iterable[str], message: str | None = None, *,
                 minimal: bool = True) -> None:
        self.core: tuple[str, ...] = tuple(core)
        self.minimal = minimal
        if message is None:
            shown = list(self.core[:12])
            more = len(self.core) - len(shown)
            message = "hard constraints conflict: " + " vs ".join(shown)
            if more > 0:
                message += f" (and {more} more)"
            if not minimal:
                message += " [core not minimised]"
        super().__init__(message)


# -- shared preprocessing (thresholds, circuits, integer weights, validation) ----------------------


@dataclass(frozen=True)
class _Problem:
    units: tuple[str, ...]  # all units, sorted by name
    fimp: dict[str, float]  # forget importance (abs score, missing -> 0)
    rimp: dict[str, float]
    forget_circuit: frozenset[str]
    retain_circuit: frozenset[str]
    protected: frozenset[str]  # empty unless protect_retain
    candidates: tuple[str, ...]  # forget circuit ∪ must_edit, sorted by name
    wf: dict[str, int]  # integer soft weights, candidates only
    wr: dict[str, int]
    must_edit: tuple[str, ...]
    must_keep: tuple[str, ...]
    coverage: int
    max_edit: int | None
    labels: dict[str, str]


def _check_scores(name: str, scores: Mapping[str, float]) -> dict[str, float]:
    if not isinstance(scores, Mapping):
        raise TypeError(f"{name} scores must be a mapping unit -> float, "
                        f"got {type(scores).__name__}")
    out: dict[str, float] = {}
    for unit, value in scores.items():
        if not isinstance(unit, str):
            raise ValueError(f"{name} unit names must be str, got {unit!r}")
        try:
            v = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{name} score for unit {unit!r} is not a number: {value!r}") from None
        if not math.isfinite(v):
            raise ValueError(f"non-finite {name} score for unit {unit!r}: {value!r}")
        out[unit] = abs(v)
    return out


def _check_threshold(name: str, value: float | None) -> float | None:
    if value is None:
        return None
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return v


def _top_threshold(values: Iterable[float], top_fraction: float) -> float:
    vals = sorted(values, reverse=True)
    if not vals:
        return math.inf
    k = max(1, math.ceil(top_fraction * len(vals) - 1e-9))
    return vals[min(k, len(vals)) - 1]


def _check_units(name: str, units: Iterable[str], known: set[str]) -> tuple[str, ...]:
    if isinstance(units, str):
        raise ValueError(f"{name} must be a collection of unit names, not the string {units!r}")
    out: list[str] = []
    for u in units:
        if u not in known:
            raise ValueError(f"{name} names unknown unit {u!r}")
        if u not in out:
            out.append(u)
    return tuple(sorted(out))


def _prepare(
    forget: Mapping[str, float],
    retain: Mapping[str, float],
    *,
    forget_threshold: float | None,
    retain_threshold: float | None,
    top_fraction: float,
    protect_retain: bool,
    protect_threshold: float | None,
    must_edit: Iterable[str],
    must_keep: Iterable[str],
    min_forget_coverage: int,
    max_edit: int | None,
) -> _Problem:
    f = _check_scores("forget", forget)
    r = _check_scores("retain", retain)
    forget_threshold = _check_threshold("forget_threshold", forget_threshold)
    retain_threshold = _check_threshold("retain_threshold", retain_threshold)
    protect_threshold = _check_threshold("protect_threshold", protect_threshold)
    if not (isinstance(top_fraction, (int, float)) and 0.0 < top_fraction <= 1.0):
        raise ValueError(f"top_fraction must be in (0, 1], got {top_fraction!r}")
    if (isinstance(min_forget_coverage, bool) or not isinstance(min_forget_coverage, int)
            or min_forget_coverage < 0):
        raise ValueError(f"min_forget_coverage must be an int >= 0, got {min_forget_coverage!r}")
    if max_edit is not None and (isinstance(max_edit, bool) or not isinstance(max_edit, int)
                                 or max_edit < 0):
        raise ValueError(f"max_edit must be None or an int >= 0, got {max_edit!r}")

    known = set(f) | set(r)
    units = tuple(sorted(known))
    fimp = {u: f.get(u, 0.0) for u in units}
    rimp = {u: r.get(u, 0.0) for u in units}
    me = _check_units("must_edit", must_edit, known)
    mk = _check_units("must_keep", must_keep, known)

    ft = (_top_threshold(fimp.values(), top_fraction) if forget_threshold is None
          else forget_threshold)
    rt = (_top_threshold(rimp.values(), top_fraction) if retain_threshold is None
          else retain_threshold)
    pt = rt if protect_threshold is None else protect_threshold
    fc = frozenset(u for u in units if fimp[u] > 0 and fimp[u] >= ft)
    rc = frozenset(u for u in units if rimp[u] > 0 and rimp[u] >= rt)
    protected = frozenset(u for u in rc if rimp[u] >= pt) if protect_retain else frozenset()

    labels: dict[str, str] = {}
    for u in units:
        inf, inr = u in fc, u in rc
        labels[u] = ("shared" if inf and inr else "forget_only" if inf
                     else "retain_only" if inr else "none")

    candidates = tuple(sorted(fc | set(me)))
    fmax = max(fimp.values(), default=0.0)
    rmax = max(rimp.values(), default=0.0)

    def scale(x: float, mx: float) -> int:
        return int(round(x / mx * WEIGHT_SCALE)) if mx > 0 else 0

    wf = {u: scale(fimp[u], fmax) for u in candidates}
    wr = {u: scale(rimp[u], rmax) for u in candidates}
    return _Problem(
        units=units, fimp=fimp, rimp=rimp, forget_circuit=fc, retain_circuit=rc,
        protected=protected, candidates=candidates, wf=wf, wr=wr, must_edit=me,
        must_keep=mk, coverage=min_forget_coverage, max_edit=max_edit, labels=labels,
    )


def _sorted_edit(p: _Problem, edit: Iterable[str]) -> tuple[str, ...]:
    return tuple(sorted(edit, key=lambda u: (-p.fimp[u], u)))


# -- MaxSAT encoding -------------------------------------------------------------------------------


def _hard_groups(
    p: _Problem, var: dict[str, int], pool: IDPool, *, cardinality: bool = True
) -> list[tuple[str, list[list[int]]]]:
    """Named groups of hard clauses.  A group with an empty clause is unsat."""
    groups: list[tuple[str, list[list[int]]]] = []
    for u in p.must_edit:
        groups.append((f"must_edit:{u}", [[var[u]]]))
    for u in p.must_keep:
        if u in var:  # a non-candidate is never edited: trivially satisfied
            groups.append((f"must_keep:{u}", [[-var[u]]]))
    for u in p.candidates:
        if u in p.protected:
            groups.append((f"protect:{u}", [[-var[u]]]))
    if not cardinality:
        return groups
    if p.coverage > 0:
        fc_lits = [var[u] for u in p.candidates if u in p.forget_circuit]
        if p.coverage > len(fc_lits):
            clauses: list[list[int]] = [[]]
        else:
            clauses = CardEnc.atleast(fc_lits, bound=p.coverage, vpool=pool,
                                      encoding=_CARD_ENCODING).clauses
        groups.append((f"coverage>={p.coverage}", clauses))
    if p.max_edit is not None and p.max_edit < len(p.candidates):
        lits = [var[u] for u in p.candidates]
        clauses = CardEnc.atmost(lits, bound=p.max_edit, vpool=pool,
                                 encoding=_CARD_ENCODING).clauses
        groups.append((f"max_edit<={p.max_edit}", clauses))
    return groups


def _core(groups: list[tuple[str, list[list[int]]]], pool: IDPool
          ) -> tuple[tuple[str, ...], bool] | None:
    """None if the hard groups are satisfiable, else (group names, is_minimal).

    Minimisation stops after ``_MAX_CORE_CALLS`` SAT calls or
    ``_CORE_BUDGET_S`` seconds; the core is then valid but maybe not minimal.
    """
    sel_name: dict[int, str] = {}
    with Solver(name=_SAT_SOLVER) as s:
        for name, clauses in groups:
            sel = pool.id(("selector", name))
            sel_name[sel] = name
            for c in clauses:
                s.add_clause(c + [-sel])
        assumptions = list(sel_name)
        if s.solve(assumptions=assumptions):
            return None
        core = list(s.get_core() or [])
        # Deletion-based minimisation with clause-set refinement.
        must: list[int] = []
        rest = sorted(core)
        calls, t0 = 0, time.perf_counter()
        while rest and calls < _MAX_CORE_CALLS and time.perf_counter() - t0 < _CORE_BUDGET_S:
            x = rest.pop()
            calls += 1
            if s.solve(assumptions=must + rest):
                must.append(x)
            else:
                keep = set(s.get_core() or [])
                rest = [lit for lit in rest if lit in keep]
        minimal = not rest
        return tuple(sorted(sel_name[lit] for lit in must + rest)), minimal


def _gain(p: _Problem, u: str) -> int:
    """Soft-cost reduction obtained by editing u."""
    return p.wf[u] - p.wr[u]


def _reduced_hard(p: _Problem, var: dict[str, int]) -> list[list[int]]:
    """Hard clauses of the optimisation formula, with dominance breaking.

    Free candidates (not fixed by must_edit / must_keep / protect) all lie in
    the forget circuit, so they are interchangeable w.r.t. every hard
    constraint: only their *number* matters to coverage and max_edit.  Among
    them, editing a unit with a larger gain is never worse, so the clauses
    ``e_next -> e_prev`` along the gain-sorted order keep an optimum (the
    chain).  On the chain ``e_F[j]`` means "at least j+1 free units edited",
    so each cardinality constraint becomes one unit clause.  Equisatisfiable
    with :func:`_hard_groups`; the empty clause marks infeasibility.
    """
    fixed_true = set(p.must_edit)
    fixed_false = {u for u in p.candidates if u in p.protected or u in p.must_keep}
    hard: list[list[int]] = [[var[u]] for u in p.must_edit]
    hard += [[-var[u]] for u in sorted(fixed_false)]
    free = [u for u in p.candidates if u not in fixed_true and u not in fixed_false]
    assert all(u in p.forget_circuit for u in free)
    if p.coverage <= 0 and (p.max_edit is None or p.max_edit - len(fixed_true) >= len(free)):
        return hard  # no cardinality constraint binds the free units: no chain needed
    free.sort(key=lambda u: (-_gain(p, u), -p.fimp[u], u))
    hard += [[-var[b], var[a]] for a, b in zip(free, free[1:])]
    if p.coverage > 0:
        need = p.coverage - len(fixed_true & p.forget_circuit)
        if need > len(free):
            hard.append([])
        elif need > 0:
            hard.append([var[free[need - 1]]])
    if p.max_edit is not None:
        room = p.max_edit - len(fixed_true)
        if room < 0:
            hard.append([])
        elif room < len(free):
            hard.append([-var[free[room]]])
    return hard


def _propagate(clauses: list[list[int]]) -> set[int] | None:
    """Top-level unit propagation: the set of implied literals, None on conflict."""
    occ: dict[int, list[int]] = {}
    for i, c in enumerate(clauses):
        for lit in c:
            occ.setdefault(lit, []).append(i)
    n_false = [0] * len(clauses)
    satisfied = [False] * len(clauses)
    value: set[int] = set()
    queue: list[int] = []
    for c in clauses:
        if not c:
            return None
        if len(c) == 1:
            queue.append(c[0])
    while queue:
        lit = queue.pop()
        if lit in value:
            continue
        if -lit in value:
            return None
        value.add(lit)
        for i in occ.get(lit, ()):
            satisfied[i] = True
        for i in occ.get(-lit, ()):
            if satisfied[i]:
                continue
            n_false[i] += 1
            c = clauses[i]
            if n_false[i] == len(c):
                return None
            if n_false[i] == len(c) - 1:
                unit = next(lit for lit in c if -lit not in value)
                if unit not in value:
                    queue.append(unit)
    return value


def _make_rc2(wcnf: WCNF) -> RC2:
    # No ``adapt``: its AtMost1 detection propagates every soft literal, which
    # is quadratic along the dominance chain (4.8 s at 10k free units).
    return RC2(wcnf, solver=_SAT_SOLVER, exhaust=True, minz=True)


@dataclass(frozen=True)
class _Solved:
    edit: tuple[str, ...]
    cost: int
    n_vars: int
    n_hard: int
    n_soft: int


def _solve(p: _Problem, *, reduce: bool = True) -> _Solved:
    """Optimise; raise :class:`Conflict` if the hard constraints are unsat.

    ``reduce=False`` uses the plain encoding (:func:`_hard_groups`, CardEnc
    cardinalities, no dominance breaking) for the optimisation too; it is
    slower on large cardinality-constrained instances and exists so tests can
    cross-check both encodings.
    """
    var = {u: i for i, u in enumerate(p.candidates, start=1)}

    def conflict() -> Conflict:
        # Try the cheap unit constraints alone before building CardEnc encodings.
        pool = IDPool(start_from=len(var) + 1)
        found = _core(_hard_groups(p, var, pool, cardinality=False), pool)
        if found is None:
            pool = IDPool(start_from=len(var) + 1)
            found = _core(_hard_groups(p, var, pool), pool)
        if found is None:  # pragma: no cover - would be an encoding bug
            raise RuntimeError("internal error: reduced encoding unsat but constraints satisfiable")
        return Conflict(found[0], minimal=found[1])

    if reduce:
        hard = _reduced_hard(p, var)
        nv = len(var)
    else:
        pool = IDPool(start_from=len(var) + 1)
        hard = [c for _, clauses in _hard_groups(p, var, pool) for c in clauses]
        nv = pool.top
    # Merge each unit's opposite soft literals: (e, a), (¬e, b) costs min(a, b)
    # whatever e is, leaving one soft clause of weight |a - b|.
    base = 0
    soft: list[tuple[int, int]] = []
    for u, v in var.items():
        a, b = p.wf[u], p.wr[u]
        base += min(a, b)
        if a != b:
            soft.append((v, a - b) if a > b else (-v, b - a))
    n_hard, n_soft = len(hard), len(soft)

    # Standard MaxSAT preprocessing: soft literals decided by top-level unit
    # propagation of the hard clauses never reach the core-guided solver (RC2
    # pays O(#soft) per core, so thousands of trivial unit cores are slow).
    fixed = _propagate(hard)
    if fixed is None:
        raise conflict()
    residual = []
    for lit, w in soft:
        if -lit in fixed:
            base += w
        elif lit not in fixed:
            residual.append((lit, w))

    if not var:
        return _Solved((), base, nv, n_hard, n_soft)
    wcnf = WCNF()
    wcnf.extend(hard)
    wcnf.extend([[v] for v in sorted(fixed, key=abs)])
    for lit, w in residual:
        wcnf.append([lit], weight=w)
    with _make_rc2(wcnf) as rc2:
        model = rc2.compute()
        if model is None:
            raise conflict()
        cost = base + rc2.cost
    true = {lit for lit in model if lit > 0}
    edit = _sorted_edit(p, (u for u, v in var.items() if v in true))
    return _Solved(edit, int(cost), nv, n_hard, n_soft)


def resolve(
    forget: Mapping[str, float],
    retain: Mapping[str, float],
    *,
    forget_threshold: float | None = None,
    retain_threshold: float | None = None,
    top_fraction: float = 0.1,
    protect_retain: bool = True,
    protect_threshold: float | None = None,
    must_edit: Iterable[str] = (),
    must_keep: Iterable[str] = (),
    min_forget_coverage: int = 0,
    max_edit: int | None = None,
) -> Resolution:
    """Choose which units to edit by weighted MaxSAT (RC2).

    Args:
        forget, retain: unit name -> attribution score (importance = abs).
            Key sets may differ; a missing unit scores 0.
        forget_threshold, retain_threshold: importance thresholds for circuit
            membership (importance >= threshold and > 0).  ``None`` keeps the
            top ``top_fraction`` of units by importance (ties included).
        protect_retain: forbid editing retain-circuit units whose retain
            importance is >= ``protect_threshold`` (default: all of them).
        must_edit, must_keep: hard user constraints.
        min_forget_coverage: edit at least this many forget-circuit units.
        max_edit: edit at most this many units.

    Raises:
        ValueError: invalid input (non-finite score, unknown unit, ...).
        Conflict: hard constraints are unsatisfiable (``.core`` names a
            minimal conflicting set of them).
    """
    p = _prepare(
        forget, retain, forget_threshold=forget_threshold, retain_threshold=retain_threshold,
        top_fraction=top_fraction, protect_retain=protect_retain,
        protect_threshold=protect_threshold,
        must_edit=must_edit, must_keep=must_keep, min_forget_coverage=min_forget_coverage,
        max_edit=max_edit,
    )
    t0 = time.perf_counter()
    r = _solve(p)
    return Resolution(
        edit=r.edit, labels=p.labels, cost=r.cost, n_vars=r.n_vars, n_hard=r.n_hard,
        n_soft=r.n_soft, solve_seconds=time.perf_counter() - t0,
    )


# -- exhaustive reference (tests only) -------------------------------------------------------------


def _brute_constraints(p: _Problem) -> dict[str, object]:
    """Named hard constraints as predicates on an edit set (a frozenset)."""
    cons: dict[str, object] = {}
    for u in p.must_edit:
        cons[f"must_edit:{u}"] = lambda e, u=u: u in e
    for u in p.must_keep:
        cons[f"must_keep:{u}"] = lambda e, u=u: u not in e
    for u in sorted(p.protected):
        cons[f"protect:{u}"] = lambda e, u=u: u not in e
    if p.coverage > 0:
        cons[f"coverage>={p.coverage}"] = lambda e: len(e & p.forget_circuit) >= p.coverage
    if p.max_edit is not None:
        cons[f"max_edit<={p.max_edit}"] = lambda e: len(e) <= p.max_edit
    return cons


def _brute_search(p: _Problem, active: Iterable[str] | None = None
                  ) -> tuple[int, frozenset[str]] | None:
    """Best (cost, edit set) over all 2^N subsets of units, or None if infeasible.

    Only the constraints named in ``active`` are enforced (all if None); the
    model's scope rule (only candidates may be edited) always holds.
    """
    if len(p.units) > _BRUTE_FORCE_MAX:
        raise ValueError(f"brute_force handles at most {_BRUTE_FORCE_MAX} units, "
                         f"got {len(p.units)}")
    cons = _brute_constraints(p)
    if active is not None:
        active = set(active)
        unknown = active - set(cons)
        if unknown:
            raise ValueError(f"unknown constraint names: {sorted(unknown)}")
        cons = {k: v for k, v in cons.items() if k in active}
    cand = set(p.candidates)
    best: tuple[int, frozenset[str]] | None = None
    for bits in itertools.product((False, True), repeat=len(p.units)):
        edit = frozenset(u for u, b in zip(p.units, bits) if b)
        if not edit <= cand:
            continue
        if not all(pred(edit) for pred in cons.values()):
            continue
        cost = 0
        for u in p.candidates:
            if u in edit:
                cost += p.wr[u]  # violated soft (¬e_u, wr_u)
            else:
                cost += p.wf[u]  # violated soft (e_u, wf_u)
        if best is None or cost < best[0]:
            best = (cost, edit)
    return best


def brute_force(
    forget: Mapping[str, float],
    retain: Mapping[str, float],
    *,
    forget_threshold: float | None = None,
    retain_threshold: float | None = None,
    top_fraction: float = 0.1,
    protect_retain: bool = True,
    protect_threshold: float | None = None,
    must_edit: Iterable[str] = (),
    must_keep: Iterable[str] = (),
    min_forget_coverage: int = 0,
    max_edit: int | None = None,
) -> Resolution:
    """Exhaustive reference for :func:`resolve` (at most 16 units).

    Enumerates every edit set, so it is independent of the SAT encoding.  On
    infeasibility it raises :class:`Conflict` whose core lists *all* hard
    constraints (not minimised).
    """
    p = _prepare(
        forget, retain, forget_threshold=forget_threshold, retain_threshold=retain_threshold,
        top_fraction=top_fraction, protect_retain=protect_retain,
        protect_threshold=protect_threshold,
        must_edit=must_edit, must_keep=must_keep, min_forget_coverage=min_forget_coverage,
        max_edit=max_edit,
    )
    t0 = time.perf_counter()
    best = _brute_search(p)
    if best is None:
        raise Conflict(tuple(sorted(_brute_constraints(p))), minimal=False)
    cost, edit = best
    n_soft = sum(1 for u in p.candidates for w in (p.wf[u], p.wr[u]) if w > 0)
    return Resolution(
        edit=_sorted_edit(p, edit), labels=p.labels, cost=cost, n_vars=len(p.units),
        n_hard=len(_brute_constraints(p)), n_soft=n_soft, solve_seconds=time.perf_counter() - t0,
    )
