"""Tests for locate.sat (CLUE MaxSAT resolution)."""

from __future__ import annotations

import math
import random
import time

import pytest

from locate import sat
from locate.sat import Conflict, Resolution, brute_force, resolve


def _unit(i: int) -> str:
    return f"blocks.{i % 3}.mlp.post[{i}]"


def _random_instance(rng: random.Random) -> tuple[dict, dict, dict]:
    n = rng.randint(1, 10)
    units = [_unit(i) for i in range(n)]

    def scores() -> dict[str, float]:
        out = {}
        for u in units:
            r = rng.random()
            if r < 0.15:
                continue  # missing key -> score 0
            if r < 0.25:
                out[u] = 0.0
            elif r < 0.35:
                out[u] = -rng.random()  # signed attribution: importance = abs
            elif r < 0.45:
                out[u] = 0.5  # ties
            else:
                out[u] = rng.random()
        return out

    forget, retain = scores(), scores()
    if rng.random() < 0.35:  # correlated metrics: many units prefer not to be edited
        retain = {u: abs(v) + rng.uniform(-0.2, 0.4) for u, v in forget.items()}
    known = sorted(set(forget) | set(retain))
    kw: dict = {}
    if rng.random() < 0.5:
        kw["top_fraction"] = rng.choice([0.1, 0.3, 0.5, 0.8, 1.0])
    else:
        kw["forget_threshold"] = rng.choice([0.0, 0.2, 0.5, 0.7])
        kw["retain_threshold"] = rng.choice([0.0, 0.3, 0.5, 0.9])
    kw["protect_retain"] = rng.random() < 0.4
    if rng.random() < 0.3:
        kw["protect_threshold"] = rng.choice([0.4, 0.8])
    if known and rng.random() < 0.5:
        kw["must_edit"] = rng.sample(known, rng.randint(1, min(2, len(known))))
    if known and rng.random() < 0.4:
        pool = (known if rng.random() < 0.2
                else [u for u in known if u not in kw.get("must_edit", ())])
        kw["must_keep"] = rng.sample(pool, rng.randint(0, min(2, len(pool))))
    n_fc = len(_prepare(forget, retain, kw).forget_circuit)
    kw["min_forget_coverage"] = rng.choice([0, rng.randint(0, n_fc + 1),
                                            max(0, n_fc - rng.randint(0, 2))])
    kw["max_edit"] = rng.choice([None, None, 0, 1, 2, 3, 5])
    return forget, retain, kw


def _prepare(forget, retain, kw):
    defaults = {
        "forget_threshold": None, "retain_threshold": None, "top_fraction": 0.1,
        "protect_retain": True, "protect_threshold": None, "must_edit": (), "must_keep": (),
        "min_forget_coverage": 0, "max_edit": None,
    }
    return sat._prepare(forget, retain, **{**defaults, **kw})


def _check_feasible_and_cost(p, edit: tuple[str, ...]) -> int:
    """Independent check of a proposed edit set against the model definition."""
    e = frozenset(edit)
    assert e <= set(p.candidates)
    assert set(p.must_edit) <= e
    assert not (set(p.must_keep) & e)
    assert not (p.protected & e)
    assert len(e & p.forget_circuit) >= p.coverage
    assert p.max_edit is None or len(e) <= p.max_edit
    return sum(p.wr[u] if u in e else p.wf[u] for u in p.candidates)


def _assert_minimal_core(p, core: tuple[str, ...]) -> None:
    assert core
    assert sat._brute_search(p, active=core) is None, f"{core} is satisfiable"
    for c in core:
        rest = [x for x in core if x != c]
        assert sat._brute_search(p, active=rest) is not None, f"{core} minus {c} still unsat"


def _compare_with_brute_force(forget, retain, kw) -> Resolution | None:
    """Assert resolve (both encodings) agrees with brute force; return the reference."""
    p = _prepare(forget, retain, kw)
    try:
        ref = brute_force(forget, retain, **kw)
    except Conflict:
        with pytest.raises(Conflict) as exc:
            resolve(forget, retain, **kw)
        assert exc.value.minimal
        _assert_minimal_core(p, exc.value.core)
        with pytest.raises(Conflict):
            sat._solve(p, reduce=False)
        return None
    got = resolve(forget, retain, **kw)
    ctx = (forget, retain, kw)
    assert got.cost == ref.cost, ctx
    assert _check_feasible_and_cost(p, got.edit) == ref.cost, ctx
    assert _check_feasible_and_cost(p, ref.edit) == ref.cost, ctx
    assert got.labels == ref.labels
    assert list(got.edit) == sorted(got.edit, key=lambda u: (-p.fimp[u], u))
    plain = sat._solve(p, reduce=False)  # plain CardEnc encoding, no dominance breaking
    assert plain.cost == ref.cost, ctx
    assert _check_feasible_and_cost(p, plain.edit) == ref.cost, ctx
    return ref


def test_random_instances_match_brute_force():
    rng = random.Random(1234)
    n_sat = n_unsat = 0
    for _ in range(300):
        forget, retain, kw = _random_instance(rng)
        if _compare_with_brute_force(forget, retain, kw) is None:
            n_unsat += 1
        else:
            n_sat += 1
    assert n_sat >= 100 and n_unsat >= 30, (n_sat, n_unsat)


def test_random_cardinality_instances_match_brute_force():
    """Instances where coverage / max_edit actually change the optimum."""
    rng = random.Random(99)
    binding = {"min_forget_coverage": 0, "max_edit": 0}
    for _ in range(200):
        n = rng.randint(2, 10)
        forget = {_unit(i): rng.random() for i in range(n)}
        retain = {u: v + rng.uniform(-0.3, 0.3) for u, v in forget.items()}  # mixed-sign gains
        kw = {
            "top_fraction": rng.choice([0.5, 1.0]),
            "protect_retain": rng.random() < 0.3,
            "protect_threshold": 0.9,
            "min_forget_coverage": rng.randint(0, n // 2 + 1),
            "max_edit": rng.choice([None, rng.randint(0, n // 2 + 1)]),
        }
        if rng.random() < 0.3:
            kw["must_edit"] = [rng.choice(list(forget))]
        ref = _compare_with_brute_force(forget, retain, kw)
        if ref is None:
            continue
        for key, off in (("min_forget_coverage", 0), ("max_edit", None)):
            if brute_force(forget, retain, **{**kw, key: off}).cost != ref.cost:
                binding[key] += 1
    assert binding["min_forget_coverage"] >= 10 and binding["max_edit"] >= 10, binding


def test_small_example_labels_and_edit():
    forget = {"a": 10.0, "b": 9.0, "c": 1.0, "d": 0.0}
    retain = {"b": 10.0, "c": 9.0, "e": 1.0}
    kw = dict(forget_threshold=5.0, retain_threshold=5.0)
    r = resolve(forget, retain, **kw)
    assert r.labels == {"a": "forget_only", "b": "shared", "c": "retain_only", "d": "none",
                        "e": "none"}
    assert r.edit == ("a",)
    # b is protected; costs: a kept free (wr=0), b unedited loses wf=900000
    assert r.cost == 900_000
    # unprotected: b's retain weight (10**6) beats its forget weight (9*10**5)
    assert resolve(forget, retain, protect_retain=False, **kw).edit == ("a",)
    r2 = resolve(forget, retain, protect_retain=False, must_edit=["b"], **kw)
    assert r2.edit == ("a", "b") and r2.cost == 1_000_000
    res = brute_force(forget, retain, protect_retain=False, must_edit=["b"], **kw)
    assert res.cost == 1_000_000


def test_default_threshold_is_top_fraction():
    forget = {_unit(i): float(i) for i in range(20)}
    retain = {}
    r = resolve(forget, retain)  # top 10% of 20 -> 2 units
    assert set(r.edit) == {_unit(19), _unit(18)}
    assert sum(v == "forget_only" for v in r.labels.values()) == 2
    assert r.edit == (_unit(19), _unit(18))  # sorted by forget score desc


def test_planted_conflict_must_edit_vs_protect():
    forget = {_unit(i): 1.0 + i for i in range(8)}
    retain = {_unit(i): 1.0 for i in range(8)}
    victim = _unit(3)
    retain[victim] = 50.0  # only retain-circuit unit -> protected
    with pytest.raises(Conflict) as exc:
        resolve(forget, retain, must_edit=[victim, _unit(7)])
    assert set(exc.value.core) == {f"must_edit:{victim}", f"protect:{victim}"}
    assert exc.value.minimal
    msg = str(exc.value)
    assert msg.startswith("hard constraints conflict:") and victim in msg
    assert isinstance(exc.value, ValueError)
    # protection off -> satisfiable, victim edited
    assert victim in resolve(forget, retain, must_edit=[victim], protect_retain=False).edit


def test_other_planted_conflicts():
    forget = {_unit(i): 1.0 + i for i in range(10)}
    retain = {_unit(i): 0.0 for i in range(10)}  # empty retain circuit: nothing protected
    u = _unit(9)
    with pytest.raises(Conflict) as exc:
        resolve(forget, retain, must_edit=[u], must_keep=[u])
    assert set(exc.value.core) == {f"must_edit:{u}", f"must_keep:{u}"}
    with pytest.raises(Conflict) as exc:
        resolve(forget, retain, must_edit=[_unit(1), _unit(2), _unit(3)], max_edit=2)
    assert set(exc.value.core) == {"max_edit<=2", f"must_edit:{_unit(1)}", f"must_edit:{_unit(2)}",
                                   f"must_edit:{_unit(3)}"}
    with pytest.raises(Conflict) as exc:  # forget circuit has 1 unit
        resolve(forget, retain, min_forget_coverage=2)
    assert exc.value.core == ("coverage>=2",)


def test_validation():
    good = {"a": 1.0, "b": 0.5}
    for bad in (math.nan, math.inf, -math.inf):
        with pytest.raises(ValueError, match=r"'b'"):
            resolve({"a": 1.0, "b": bad}, good)
        with pytest.raises(ValueError, match="retain"):
            resolve(good, {"b": bad})
    with pytest.raises(ValueError, match="'zzz'"):
        resolve(good, good, must_edit=["zzz"])
    with pytest.raises(ValueError, match="'zzz'"):
        resolve(good, good, must_keep=["zzz"])
    with pytest.raises(ValueError):
        resolve(good, good, must_edit="a")  # a bare string is not a list of units
    with pytest.raises(ValueError):
        resolve(good, good, min_forget_coverage=-1)
    with pytest.raises(ValueError):
        resolve(good, good, max_edit=-1)
    with pytest.raises(ValueError):
        resolve(good, good, top_fraction=0.0)
    with pytest.raises(ValueError):
        resolve(good, good, forget_threshold=math.nan)
    with pytest.raises(ValueError, match="16"):
        brute_force({_unit(i): 1.0 for i in range(17)}, {})
    # different key sets are fine; missing = 0
    r = resolve({"a": 1.0}, {"b": 1.0}, top_fraction=1.0)
    assert r.labels == {"a": "forget_only", "b": "retain_only"} and r.edit == ("a",)
    empty = resolve({}, {})
    assert empty.edit == () and empty.cost == 0 and empty.labels == {}


def test_resolution_is_frozen():
    r = resolve({"a": 1.0}, {"a": 0.1})
    assert isinstance(r, Resolution)
    with pytest.raises(AttributeError):
        r.cost = 3  # type: ignore[misc]


def _large(n: int, seed: int = 0) -> tuple[dict[str, float], dict[str, float]]:
    rng = random.Random(seed)
    forget = {f"blocks.{i % 24}.mlp.post[{i}]": rng.random() for i in range(n)}
    retain = {u: rng.random() for u in forget}
    return forget, retain


@pytest.mark.parametrize("kw", [
    {},
    {"max_edit": 300, "min_forget_coverage": 200},
    {"top_fraction": 1.0, "protect_retain": False, "max_edit": 3000, "min_forget_coverage": 1000},
])
def test_10k_units(kw):
    forget, retain = _large(10_000)
    t0 = time.perf_counter()
    r = resolve(forget, retain, **kw)
    dt = time.perf_counter() - t0
    print(f"\n10k units {kw}: {dt:.3f}s total, solve {r.solve_seconds:.3f}s, "
          f"edit={len(r.edit)} vars={r.n_vars} hard={r.n_hard} soft={r.n_soft}")
    assert len(r.labels) == 10_000
    if "max_edit" in kw:
        assert kw["min_forget_coverage"] <= len(r.edit) <= kw["max_edit"]
