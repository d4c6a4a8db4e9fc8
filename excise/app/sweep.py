"""The deletion sweep: which locate x edit recipe deletes facts on the organism, at what cost?

``excise sweep configs/sweep.yaml`` runs the protocol below and writes ``sweep.json`` and
``screen.json`` (compact: no indent, floats to 7 significant digits, one record per line) to the
config's ``out`` folder; ``python bench/sweep.py`` runs it and writes docs/results.md and its
figures. The grid, the splits, the seeds and the number of finalists come from the config
(:class:`SweepConfig`); locate and edit methods are called through the pipeline's registries.

The report stage's cells (finalist x split x seed) are independent: after the oracles are
trained (or loaded) once, here, they run on the config's ``executor`` (:mod:`excise.app.dispatch`:
``serial``, ``local`` - a process pool, the default - or ``ray``), each cell loading the organism
and its oracle from the cache, at the torch threads in effect; the records are the same as a
serial run's, assembled in the serial order. A cell that still fails after ``retries`` more tries
is recorded with its ``error`` (and ``excise sweep`` exits 1).

Protocol (the rules are printed into docs/results.md):

1. **Screen on validation people** (150..159, never reported): every locate method x every edit
   it applies to (``PAIRS``; pairs that cannot apply are listed, not run) plus the global
   baselines, each over a small hyperparameter grid (``GRID``). Cheap behaviour metrics only.
   Per pair the setting kept is the one with the lowest forget recall among those that meet the
   utility bar (retain and shared >= 98% of the original, perplexity within 2%, <= 1% of
   parameters); if none does, the one with the lowest penalised score.
2. **Prune by a stated rule:** keep the pairs whose kept setting is not dominated on validation in
   (forget recall, retain recall, perplexity), at most ``--finalists`` of them by score, plus the
   three global baselines as references.
3. **Report** the finalists on forget splits of 1% / 5% / 10% of the people (2 / 10 / 20 people,
   TOFU's forget01/05/10), 3 seeds each (seed s forgets people 50 s .. 50 s + n - 1), each with
   its retrain oracle and the full ``probes.verify`` suite (attacks over the config's ``grid``
   of learning rates x seeds, ``full`` by default; the verdict reads the worst gap over it).
   Importance is computed once per (method, request) and shared across edits; the oracle's and
   the original's metrics are computed once per request (``verify(cache=...)``).
4. **The bar** (5% split) is checked per seed and summarised.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from excise.config import (ConfigError, ModelConfig, OrganismConfig, RequestConfig, RunConfig,
                           check_params, read_yaml, set_path, unknown_key)
from excise.io import atomic_write_text
from excise.report import check_outcome

PROTOCOL = __doc__.split("Protocol (the rules are printed into docs/results.md):")[1].strip()

# -- the sweep's configuration -----------------------------------------------------------------


@dataclass(frozen=True)
class EditStep:
    """One edit of a recipe: an edit method (``edit.METHODS``) with fixed ``params``; ``hp``
    maps grid keys to this method's parameter names (``None``: every grid key, under its own
    name); ``units="all"`` edits the whole model (no importance)."""

    edit: str
    params: dict = field(default_factory=dict)
    hp: dict | None = None
    units: str | None = None

    def kwargs(self, setting: dict) -> dict:
        take = self.hp if self.hp is not None else {k: k for k in setting}
        return dict(self.params) | {param: setting[key] for key, param in take.items()}


@dataclass(frozen=True)
class Recipe:
    """A named edit (one or more :class:`EditStep`, applied in order) and its grid of settings.
    ``latents``: it applies to SAE latents (locate methods that score latents, not weights);
    ``needs``: the Importance parts it needs (e.g. forget and retain statistics for SSD);
    ``baseline``: a whole-model recipe run without a locate method, kept as a reference."""

    name: str
    steps: tuple[EditStep, ...]
    grid: tuple[dict, ...]
    latents: bool = False
    needs: tuple[str, ...] = ()
    baseline: bool = False


@dataclass(frozen=True)
class SweepConfig:
    organism: OrganismConfig = OrganismConfig()
    # where the organism and its oracles run: {device: auto | cpu | cuda..., dtype: ...}
    model: ModelConfig = ModelConfig()
    validation: tuple[int, ...] = tuple(range(150, 160))  # screened, never reported
    locate: dict = field(default_factory=dict)  # method -> its parameters
    recipes: dict = field(default_factory=dict)  # name -> Recipe (baselines included)
    finalists: int = 4  # at most this many local pairs go on, plus every baseline
    splits: dict = field(default_factory=lambda: {"forget01": 2, "forget05": 10,
                                                  "forget10": 20})
    bar_split: str = "forget05"  # the split the bar and the report's curves are read on
    seeds: tuple[int, ...] = (0, 1, 2)
    stride: int = 50  # seed s forgets people stride * s .. stride * s + n - 1
    suite: Any = "all"  # probes.verify suites for the finalists
    grid: str = "full"  # the attacks' grid of learning rates x seeds (probes.attacks.GRIDS)
    seed: int = 0  # torch's global seed before the organism is built and before each cell
    out: str = "docs/results"
    # where the report stage's cells (finalist x split x seed) run (excise.app.dispatch):
    # serial (this process) | local (a process pool, the default) | ray (plain Ray tasks)
    executor: str = "local"
    # cells at a time. local: None = cores // threads (at least 1), so workers x threads never
    # exceeds the cores (threads: the torch threads in effect, --threads); ray: the CPUs of a
    # local Ray instance started for the sweep are workers x threads (None: every core)
    workers: int | None = None
    retries: int = 1  # a failed cell is tried again this many times, then recorded with its error
    # retrain oracles per request (training seeds: the organism's, + 1, ...) the finalists are
    # judged against (probes.verify.against_oracles: the most favourable verdict); needs a suite
    # with the verdict
    oracles: int = 1

    def people(self, split: str, seed: int) -> range:
        return range(self.stride * seed, self.stride * seed + self.splits[split])

    @property
    def local(self) -> list[Recipe]:
        return [r for r in self.recipes.values() if not r.baseline]

    @property
    def baselines(self) -> list[Recipe]:
        return [r for r in self.recipes.values() if r.baseline]


_TOP = ("organism", "model", "validation", "locate", "recipes", "baselines", "finalists", "splits",
        "bar_split", "seeds", "stride", "suite", "grid", "seed", "out", "executor", "workers",
        "retries", "oracles")
_RECIPE = ("apply", "grid", "latents", "needs")
_STEP = ("edit", "hp", "units")


def load_config(path: str | Path, sets: list[str] = (), registries: dict | None = None
                ) -> SweepConfig:
    """A sweep config from YAML with ``--set key.path=value`` overrides, every method name and
    parameter checked against the registries (default: the pipeline's)."""
    raw = read_yaml(path)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a sweep config is a mapping, got {type(raw).__name__}")
    for item in sets:
        set_path(raw, item, list(_TOP), example="seeds=[0]")
    return build_config(raw, registries)


def build_config(raw: dict, registries: dict | None = None) -> SweepConfig:
    """Turn a raw mapping into a :class:`SweepConfig`, refusing unknown keys, methods and
    parameters, people the organism does not have, and validation people that are reported."""
    if registries is None:
        from excise.app.pipeline import registries as pipeline_registries

        registries = pipeline_registries()
    bad = [k for k in raw if k not in _TOP]
    if bad:
        raise ConfigError(unknown_key("sweep config", bad[0], list(_TOP)))
    org = raw.get("organism") or {}
    fields = [f.name for f in dataclasses.fields(OrganismConfig)]
    if not isinstance(org, dict) or any(k not in fields for k in org):
        bad = [k for k in org if k not in fields] if isinstance(org, dict) else [str(org)]
        raise ConfigError(unknown_key("sweep config organism", bad[0], fields))
    kw: dict[str, Any] = {"organism": OrganismConfig(**org)}
    placed = raw.get("model") or {}
    if not isinstance(placed, dict) or any(k not in ("device", "dtype") for k in placed):
        bad = [k for k in placed if k not in ("device", "dtype")] if isinstance(placed, dict) \
            else [str(placed)]
        raise ConfigError(unknown_key("sweep config model", bad[0], ["device", "dtype"]))
    kw["model"] = ModelConfig(**placed)

    val = raw.get("validation", {"first": 150, "people": 10})
    if not (isinstance(val, dict) and set(val) == {"first", "people"}
            and all(_is_int(v) and v >= 0 for v in val.values()) and val["people"] >= 1):
        raise ConfigError(f"validation={val!r}: give {{first: N, people: K}} (people "
                          f"N..N+K-1 are screened, never reported)")
    kw["validation"] = tuple(range(val["first"], val["first"] + val["people"]))

    loc = raw.get("locate") or {}
    if not isinstance(loc, dict) or not loc:
        raise ConfigError("locate: give a mapping of locate methods to screen -> their "
                          f"parameters, e.g. {{fisher: {{estimator: example}}}}; methods: "
                          f"{sorted(registries['locate'])}")
    for name, params in loc.items():
        if name not in registries["locate"]:
            raise ConfigError(f"locate: unknown method {name!r}; choose from "
                              f"{sorted(registries['locate'])}")
        if params is not None and not isinstance(params, dict):
            raise ConfigError(f"locate.{name}: parameters must be a mapping, got {params!r}")
    # checked and converted ("1e-4" -> 1e-4 where the method takes a number)
    kw["locate"] = {name: dict(check_params(f"locate.{name}", registries["locate"][name],
                                            params or {}))
                    for name, params in loc.items()}

    recipes: dict[str, Recipe] = {}
    for section, baseline in (("recipes", False), ("baselines", True)):
        entries = raw.get(section) or {}
        if not isinstance(entries, dict):
            raise ConfigError(f"{section}: give a mapping of recipe names to recipes")
        for name, spec in entries.items():
            if name in recipes:
                raise ConfigError(f"{section}.{name}: a recipe of that name already exists")
            recipes[name] = _recipe(f"{section}.{name}", name, spec, baseline, registries)
    if not any(not r.baseline for r in recipes.values()):
        raise ConfigError("recipes: give at least one edit recipe to screen")
    kw["recipes"] = recipes

    for key in ("finalists", "stride", "seed"):
        if key in raw:
            if not _is_int(raw[key]) or raw[key] < (1 if key == "finalists" else 0):
                raise ConfigError(f"{key}={raw[key]!r}: must be a "
                                  f"{'positive' if key == 'finalists' else 'non-negative'} "
                                  f"integer")
            kw[key] = raw[key]
    splits = raw.get("splits", SweepConfig().splits)
    if not isinstance(splits, dict) or not splits or not all(
            _is_int(n) and n >= 1 for n in splits.values()):
        raise ConfigError(f"splits={splits!r}: give a mapping of split name -> number of "
                          f"people to forget, e.g. {{forget05: 10}}")
    kw["splits"] = dict(splits)
    bar_split = raw.get("bar_split", "forget05" if "forget05" in splits else next(iter(splits)))
    if bar_split not in splits:
        raise ConfigError(f"bar_split={bar_split!r}: not one of the splits {list(splits)}")
    kw["bar_split"] = bar_split
    seeds = raw.get("seeds", [0, 1, 2])
    if not isinstance(seeds, list) or not seeds or not all(_is_int(s) and s >= 0
                                                           for s in seeds):
        raise ConfigError(f"seeds={seeds!r}: give a non-empty list of non-negative integers")
    kw["seeds"] = tuple(seeds)
    if "suite" in raw:
        kw["suite"] = raw["suite"]
    if "grid" in raw:
        from probes.attacks import GRIDS

        if raw["grid"] not in GRIDS:
            raise ConfigError(f"grid={raw['grid']!r}: choose one of {list(GRIDS)} (the "
                              f"attacks' grid of learning rates x seeds)")
        kw["grid"] = raw["grid"]
    if "out" in raw:
        kw["out"] = str(raw["out"])
    if "oracles" in raw:
        from probes.suites import resolve

        n = raw["oracles"]
        if not _is_int(n) or n < 1:
            raise ConfigError(f"oracles={n!r}: must be an integer >= 1 (retrain oracles per "
                              f"request, at different training seeds)")
        suite = kw.get("suite", SweepConfig().suite)
        if n > 1 and "verdict" not in resolve(suite):
            raise ConfigError(f"oracles={n}: several retrain oracles serve the verdict only; "
                              f"suite={suite!r} has no verdict (use suite: all)")
        kw["oracles"] = n
    kw.update(_dispatch_keys(raw))
    cfg = SweepConfig(**kw)
    _check_people(cfg)
    return cfg


def _recipe(where: str, name: str, spec, baseline: bool, registries) -> Recipe:
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: a recipe is a mapping with 'apply' (edit steps) and 'grid'")
    bad = [k for k in spec if k not in _RECIPE]
    if bad:
        raise ConfigError(unknown_key(where, bad[0], list(_RECIPE)))
    apply, grid = spec.get("apply"), spec.get("grid")
    if not isinstance(apply, list) or not apply:
        raise ConfigError(f"{where}.apply: give a list of edit steps, e.g. [{{edit: dampen}}]")
    if not isinstance(grid, list) or not grid or not all(isinstance(g, dict) for g in grid):
        raise ConfigError(f"{where}.grid: give a list of settings (mappings), e.g. "
                          f"[{{alpha: 5.0}}]")
    steps = []
    for i, s in enumerate(apply):
        w = f"{where}.apply[{i}]"
        if not isinstance(s, dict) or "edit" not in s:
            raise ConfigError(f"{w}: a step is a mapping with 'edit' (an edit method)")
        if s["edit"] not in registries["edit"]:
            raise ConfigError(f"{w}: unknown edit method {s['edit']!r}; choose one of "
                              f"{sorted(registries['edit'])}")
        hp = s.get("hp")
        if hp is not None and not isinstance(hp, dict):
            raise ConfigError(f"{w}.hp: map grid keys to the method's parameters, e.g. "
                              f"{{noise_top: top}}")
        if s.get("units") not in (None, "all"):
            raise ConfigError(f"{w}.units={s['units']!r}: only 'all' (the whole model) or "
                              f"unset (the located units)")
        if s.get("units") == "all" and not baseline:
            raise ConfigError(f"{w}: units: all edits the whole model; put the recipe under "
                              f"'baselines'")
        params = {k: v for k, v in s.items() if k not in _STEP}
        steps.append(EditStep(s["edit"], params, None if hp is None else dict(hp),
                              s.get("units")))
    if baseline and any(st.units != "all" for st in steps):
        raise ConfigError(f"{where}: a baseline runs without a locate method; give every step "
                          f"units: all")
    if len(steps) > 1 and any(st.hp is None for st in steps):
        raise ConfigError(f"{where}: with several steps, say which grid keys each step takes "
                          f"(hp: {{grid key: parameter}})")
    for j, setting in enumerate(grid):
        taken = set()
        for i, st in enumerate(steps):
            missing = [k for k in (st.hp or {}) if k not in setting]
            if missing:
                raise ConfigError(f"{where}.grid[{j}]: no value for {missing[0]!r} (taken by "
                                  f"step {i}, {st.edit})")
            taken |= set(st.hp) if st.hp is not None else set(setting)
            check_params(f"{where}.apply[{i}].{st.edit}", registries["edit"][st.edit],
                         st.kwargs(setting))
        unused = [k for k in setting if k not in taken]
        if unused:
            raise ConfigError(f"{where}.grid[{j}]: key {unused[0]!r} is taken by no step")
    needs = spec.get("needs") or ()
    if isinstance(needs, str) or not all(isinstance(n, str) for n in needs):
        raise ConfigError(f"{where}.needs={needs!r}: give a list of Importance parts, e.g. "
                          f"[forget, retain]")
    return Recipe(name, tuple(steps), tuple(dict(g) for g in grid),
                  latents=bool(spec.get("latents", False)), needs=tuple(needs),
                  baseline=baseline)


def _check_people(cfg: SweepConfig) -> None:
    from excise.organism import PRESETS

    if cfg.organism.preset not in PRESETS:
        raise ConfigError(f"organism.preset: unknown preset {cfg.organism.preset!r}; choose one "
                          f"of {sorted(PRESETS)}")
    n = PRESETS[cfg.organism.preset].n_people
    reported = {p for s in cfg.splits for seed in cfg.seeds for p in cfg.people(s, seed)}
    for what, people in (("validation", set(cfg.validation)), ("splits x seeds", reported)):
        bad = sorted(p for p in people if p >= n)
        if bad:
            raise ConfigError(f"{what}: people {bad[:5]} do not exist; the "
                              f"{cfg.organism.preset} organism's trained people are "
                              f"0..{n - 1}")
    both = sorted(reported & set(cfg.validation))
    if both:
        raise ConfigError(f"validation people {both[:5]} are also reported (splits x seeds, "
                          f"stride {cfg.stride}); validation people must never be reported")


def _dispatch_keys(raw: dict) -> dict:
    """``executor`` / ``workers`` / ``retries``, checked (Ray installed where it is chosen)."""
    from excise.app.dispatch import EXECUTORS, require_ray

    kw = {}
    if "executor" in raw:
        if raw["executor"] not in EXECUTORS:
            raise ConfigError(f"executor={raw['executor']!r}: choose one of "
                              f"{', '.join(EXECUTORS)} (where the report stage's cells run)")
        if raw["executor"] == "ray":
            try:
                require_ray()
            except ValueError as e:
                raise ConfigError(str(e)) from None
        kw["executor"] = raw["executor"]
    if raw.get("workers") is not None:
        if not _is_int(raw["workers"]) or raw["workers"] < 1:
            raise ConfigError(f"workers={raw['workers']!r}: must be a positive integer, or null "
                              f"(local: cores // threads)")
        kw["workers"] = raw["workers"]
    if "retries" in raw:
        if not _is_int(raw["retries"]) or raw["retries"] < 0:
            raise ConfigError(f"retries={raw['retries']!r}: must be a non-negative integer (the "
                              f"extra tries a failing cell gets)")
        kw["retries"] = raw["retries"]
    return kw


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# -- the protocol's rules ----------------------------------------------------------------------


def bar_penalty(m: dict, base: dict, frac: float) -> float:
    """0 when the utility side of the bar holds; grows with each violation."""
    p = max(0.0, 0.98 * base["retain_recall"] - m["retain_recall"])
    p += max(0.0, 0.98 * base["shared_recall"] - m["shared_recall"])
    p += max(0.0, m["perplexity"] / base["perplexity"] - 1.02)
    p += max(0.0, frac - 0.01) * 10
    return p


def applicable(recipe: Recipe, imp, recipes: list[Recipe] = ()) -> str | None:
    """None when the recipe applies to the importance, else the reason it cannot."""
    if any(site.endswith(".sae") for site in imp.scores) and not recipe.latents:
        names = ", ".join(r.name for r in recipes if r.latents) or "none configured"
        return f"SAE latents are not weights: only latent ablation ({names}) applies"
    if recipe.needs and not set(recipe.needs) <= set(imp.parts or {}):
        return (f"{recipe.name} needs {' and '.join(recipe.needs)} statistics per unit "
                f"(Importance.parts), which {imp.method} does not record")
    return None


def choose(screen_res: dict, n_finalists: int):
    """Per pair the kept setting, then the undominated pairs (plus the global baselines)."""
    best = {}
    for r in screen_res["rows"]:
        if "error" in r:
            continue
        k = (r["locate"], r["edit"])
        feasible = r["penalty"] == 0
        key = (not feasible, r["forget"] if feasible else r["score"])
        if k not in best or key < best[k][0]:
            best[k] = (key, r)
    kept = {k: v[1] for k, v in best.items()}

    def dominated(a, b):  # b dominates a
        ge = (b["forget"] <= a["forget"] and b["retain"] >= a["retain"] and
              b["ppl"] <= a["ppl"])
        gt = (b["forget"] < a["forget"] or b["retain"] > a["retain"] or b["ppl"] < a["ppl"])
        return ge and gt

    local = [r for k, r in kept.items() if k[0] is not None]
    front = [a for a in local if not any(dominated(a, b) for b in local if b is not a)]
    front.sort(key=lambda r: r["score"])
    finalists = front[:n_finalists] + [r for k, r in kept.items() if k[0] is None]
    return kept, finalists


def bar_checks(row) -> dict[str, bool]:
    a, b, o = (row["metrics"][k] for k in ("after", "before", "oracle"))
    return {
        "forget <= oracle + 2pt": a["forget_recall"] <= o["forget_recall"] + 0.02,
        "retain >= 98%": a["retain_recall"] >= 0.98 * b["retain_recall"],
        "shared >= 98%": a["shared_recall"] >= 0.98 * b["shared_recall"],
        "ppl within 2%": abs(a["perplexity"] / b["perplexity"] - 1) <= 0.02,
        "MIA within 0.05 of oracle": abs(a["mia_auc_loss"] - o["mia_auc_loss"]) <= 0.05,
        "LOO <= chance + 5pt": row["loo_gap"]["after"] <= 0.05,
        "relearn <= oracle + 5pt": row["relearn_gap"] <= 0.05,
        "<= 1% params": row["params"] <= 0.01,
    }


def has_bar_inputs(row, rep) -> bool:
    """Whether the suites that ran give everything :func:`bar_checks` reads: privacy, the LOO
    probe and the relearning attack, beside the oracle and the original."""
    m = row["metrics"]
    return ({"after", "before", "oracle"} <= set(m) and "mia_auc_loss" in m["after"]
            and "loo_probe" in rep.extra and row.get("relearn_gap") is not None)


def name(f) -> str:
    """A recipe's display name: ``locate + edit`` or the baseline's name."""
    return f["edit"] if f["locate"] is None else f"{f['locate']} + {f['edit']}"


# -- running it --------------------------------------------------------------------------------


def locate_all(model, req, cfg: SweepConfig, names, stats_cache, log, regs):
    from excise.app.pipeline import locate_with

    out, secs = {}, {}
    for n in names:
        t = time.time()
        out[n] = locate_with(regs["locate"][n], model, req, None, cfg.locate[n],
                             cache=stats_cache)
        secs[n] = round(time.time() - t, 1)
        log(f"  locate {n}: {secs[n]} s")
    return out, secs


def apply_recipe(model, req, imp, recipe: Recipe, setting: dict, regs) -> list:
    """Apply one setting of a recipe, step by step, through the edit registry; returns the
    edits (revert them last-in first-out). A failing step reverts the steps before it."""
    from excise.app.pipeline import edit_with

    edits = []
    try:
        for st in recipe.steps:
            importance = None if st.units == "all" else imp
            edits.append(edit_with(regs["edit"][st.edit], model, importance, st.units,
                                   st.kwargs(setting), request=req))
    except BaseException:
        for e in reversed(edits):
            e.revert()
        raise
    return edits


def changed_fraction(model, edits) -> float:
    return sum(e.manifest["params_changed"] for e in edits) / model.n_parameters()


def screen(model, req, cfg: SweepConfig, log, regs, only=None) -> dict:
    """Stage 1: every locate method x every recipe that applies, plus the baselines, over each
    recipe's grid, on the validation request; behaviour metrics only."""
    from locate import StatsCache
    from probes.behaviour import behaviour_metrics

    base = behaviour_metrics(model, req)
    imps, secs = locate_all(model, req, cfg, only or list(cfg.locate), StatsCache(), log, regs)
    rows, skipped = [], []
    pairs = [(lo, r) for lo in imps for r in cfg.local] + [(None, r) for r in cfg.baselines]
    for lo, recipe in pairs:
        imp = imps.get(lo)
        why = applicable(recipe, imp, cfg.local) if lo else None
        if why:
            skipped.append({"locate": lo, "edit": recipe.name, "why": why})
            continue
        for hp in recipe.grid:
            t = time.time()
            try:
                edits = apply_recipe(model, req, imp, recipe, hp, regs)
            except ValueError as e:
                rows.append({"locate": lo, "edit": recipe.name, "hp": hp,
                             "error": str(e)[:200]})
                continue
            try:
                m = behaviour_metrics(model, req)
                frac = changed_fraction(model, edits)
            finally:
                for e in reversed(edits):
                    e.revert()
            pen = bar_penalty(m, base, frac)
            rows.append({"locate": lo, "edit": recipe.name, "hp": hp, "forget": m["forget_recall"],
                         "retain": m["retain_recall"], "shared": m["shared_recall"],
                         "ppl": m["perplexity"], "params": frac, "penalty": pen,
                         "score": m["forget_recall"] + 2 * pen,
                         "seconds": round(time.time() - t, 1)})
            r = rows[-1]
            log(f"  {lo or '-':13s} {recipe.name:15s} {json.dumps(hp):60s} forget "
                f"{r['forget']:.3f} retain {r['retain']:.3f} ppl {r['ppl']:.2f} params "
                f"{frac:.4f}")
    return {"base": base, "rows": rows, "skipped": skipped, "locate_seconds": secs}


def report_stage(org, cfg: SweepConfig, finalists, log, executor=None):
    """Stage 3: the finalists on every split x seed, each request with its retrain oracle and
    ``probes.verify`` (``cfg.suite``); returns the rows (in the order split, seed, finalist) and,
    for the bar split's first seed, the attack curves per recipe.

    The oracles are trained (or loaded) here, once each, before anything is dispatched; then
    the cells run on ``executor`` (default: ``cfg.executor`` at the torch threads in effect;
    :mod:`excise.app.dispatch`): per request one cell measures what every finalist shares (the
    importance of each locate method, the oracle's and the original's results), then one cell
    per finalist edits and verifies. Workers load the organism and the oracles from the cache.
    A cell that still fails after ``cfg.retries`` more tries is a row with its ``error``."""
    from excise.app.dispatch import Cell, dispatch

    if executor is None:
        executor = sweep_executor(cfg)
    if not finalists:
        return [], {}
    names = [name(f) for f in finalists]  # a cell's name; with the setting where names repeat
    names = [n if names.count(n) == 1 else f"{n} {json.dumps(f['hp'])}"
             for n, f in zip(names, finalists)]
    cells: list[Cell] = []
    for split in cfg.splits:
        for seed in cfg.seeds:
            people = cfg.people(split, seed)
            t = time.time()
            _oracles(org, org.request(forget_people=people), cfg.oracles)  # trained once,
            # shared by the cells
            log(f"{split} seed {seed}: people {people.start}..{people.stop - 1} "
                f"(oracle {time.time() - t:.0f} s)")
            need = sorted({f["locate"] for f in finalists if f["locate"]})
            shared = Cell(f"{split} seed {seed}", measure_shared, (cfg, split, seed, need))
            cells.append(shared)
            cells += [Cell(f"{split} seed {seed}: {n}", report_cell, (cfg, split, seed, f),
                           needs=(shared.key,)) for n, f in zip(names, finalists)]
    log(f"{len(cells)} cells on {executor.name} ({executor.workers or 'Ray-scheduled'} "
        f"worker(s) x {executor.threads} thread(s))")
    done = [0]

    def progress(o) -> None:
        done[0] += 1
        for line in (o.value or {}).get("log", []) if o.ok else [f"{o.key}: FAILED: {o.error}"]:
            log(f"  [{done[0]}/{len(cells)}] {line}")

    outcomes = dispatch(cells, executor, retries=cfg.retries, log=log, on_done=progress)
    rows, curves = [], {}
    for cell, o in zip(cells, outcomes):
        if cell.fn is measure_shared:
            continue
        split, seed, f = cell.args[1:]
        if not o.ok:
            rows.append({"split": split, "seed": seed, "locate": f["locate"], "edit": f["edit"],
                         "hp": f["hp"], "error": o.error, "attempts": o.attempts})
            continue
        row = o.value["row"]
        if o.attempts > 1:
            row = row | {"attempts": o.attempts}
        rows.append(row)
        if split == cfg.bar_split and seed == cfg.seeds[0] and o.value["attacks"] is not None:
            curves[name(f)] = o.value["attacks"]
    return rows, curves


# what a report cell imports: local workers import it as they start, side by side
# (transformer_lens, imported when the first model is built, is most of a worker's start)
CELL_MODULES = ("excise.app.sweep", "excise.app.pipeline", "locate", "edit", "probes",
                "transformer_lens")


def sweep_executor(cfg: SweepConfig, threads: int | None = None):
    """The executor ``cfg`` names, checked (workers x threads against the cores), not started;
    ``threads``: torch threads per cell (None: the count in effect)."""
    from excise.app.dispatch import make_executor

    try:
        return make_executor(cfg.executor, cfg.workers, threads, preload=CELL_MODULES)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _organism(cfg: SweepConfig):
    """The sweep's organism, built the pipeline's way (in a worker: loaded from the cache)."""
    from excise.app.pipeline import Setup

    return Setup.check(_run_config(cfg)).build(progress=False, log=lambda m: None).organism


def _run_config(cfg: SweepConfig) -> RunConfig:
    return RunConfig(organism=cfg.organism, model=cfg.model,
                     request=RequestConfig(forget_people=list(cfg.validation)))


def _oracles(org, req, n: int):
    from excise.organism import oracle_or_oracles  # torch loads on first use, not at import

    return oracle_or_oracles(org, req, n)


def measure_shared(cfg: SweepConfig, split: str, seed: int, need: list[str]) -> dict:
    """A cell: what every finalist on one request shares - each locate method's importance
    (``need``) and ``probes.verify``'s per-model cache holding the oracle's and the original's
    results (the original measured as the model under test: the same cache entries a first
    finalist would fill)."""
    import probes
    import torch
    from excise.app.pipeline import registries
    from locate import StatsCache

    org = _organism(cfg)
    torch.manual_seed(cfg.seed)
    req = org.request(forget_people=cfg.people(split, seed))
    oracle = _oracles(org, req, cfg.oracles)
    lines: list[str] = []
    imps, _ = locate_all(org.model, req, cfg, need, StatsCache(),
                         lambda m: lines.append(f"{split} seed {seed}:{m}"), registries())
    vcache: dict = {}
    t = time.time()
    probes.verify(org.model, req, oracle=oracle, suite=cfg.suite, label="after",
                  original=org.model.clone(), seed=seed, grid=cfg.grid, cache=vcache)
    lines.append(f"{split} seed {seed}: oracle and original measured "
                 f"({time.time() - t:.1f} s)")
    return {"importances": imps, "cache": vcache, "log": lines}


def report_cell(cfg: SweepConfig, split: str, seed: int, f: dict, shared: dict) -> dict:
    """A cell: finalist ``f`` on one split x seed - edit (with the shared importance), verify
    against the oracle (reusing the shared results), revert; returns the row, the attack curves
    and the log line."""
    import probes
    import torch
    from excise.app.pipeline import registries

    org = _organism(cfg)
    torch.manual_seed(cfg.seed)
    req = org.request(forget_people=cfg.people(split, seed))
    oracle = _oracles(org, req, cfg.oracles)
    original = org.model.clone()  # before any edit: verify's "before" column and SAE source
    vcache = dict(shared["cache"])  # this cell's entries stay its own
    t = time.time()
    edits = apply_recipe(org.model, req, shared["importances"].get(f["locate"]),
                         cfg.recipes[f["edit"]], f["hp"], registries())
    try:
        frac = changed_fraction(org.model, edits)
        rep = probes.verify(org.model, req, oracle=oracle, suite=cfg.suite, label="after",
                            original=original, seed=seed, grid=cfg.grid, cache=vcache)
    finally:
        for e in reversed(edits):
            e.revert()
    metrics = dict(rep.metrics)
    if "before" not in metrics:  # behaviour only: measure the original here
        metrics["before"] = probes.verify(original, req, label="before",
                                          cache=vcache).metrics["before"]
    row = {"split": split, "seed": seed, "locate": f["locate"], "edit": f["edit"],
           "hp": f["hp"], "params": frac, "verdict": rep.verdict,
           "metrics": metrics, "seconds": round(time.time() - t, 1)}
    row["loo_gap"] = {k: loo_gap(rep, k) for k in metrics}
    row["relearn_gap"] = relearn_gap(rep)
    row["bar"] = bar_checks(row) if has_bar_inputs(row, rep) else None
    if "verdict" in rep.extra:  # issue 8's bar as the verdict reports it
        row["verdict_bar"] = {k: c["ok"] for k, c in rep.extra["verdict"]["bar"].items()}
        # each check's outcome (pass / FAIL / open / not used): what the verdict was read from
        row["checks"] = {k: check_outcome(c) for k, c in rep.extra["verdict"]["checks"].items()}
    a, o = metrics["after"], metrics.get("oracle", {})
    line = (f"{split} seed {seed}: {name(f):32s} forget {a['forget_recall']:.3f} (oracle "
            f"{_fmt(o.get('forget_recall'))}) retain {a['retain_recall']:.3f} ppl "
            f"{a['perplexity']:.2f} mia {_fmt(a.get('mia_auc_loss'), 2)} relearn "
            f"{_fmt(a.get('attack_relearn'), 2)}/{_fmt(o.get('attack_relearn'), 2)} "
            f"{rep.verdict} [{row['seconds']} s]")
    return {"row": row, "attacks": rep.extra.get("attacks"), "log": [line]}


def _fmt(v, digits: int = 3) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def _curves(obj) -> dict:
    """An attack's curves as ``{label: [y, ...]}`` (a typed result or its dict form)."""
    d = obj.to_dict() if hasattr(obj, "to_dict") else obj
    return d["curves"]


def loo_gap(rep, label) -> float:
    """The balanced LOO probe's accuracy minus its permutation null, maximised over depths
    (NaN when the ``loo_probe`` suite did not run)."""
    c = rep.extra.get("loo_probe", {}).get("curves", {}).get(label)
    if not c or "null" not in c:
        return float("nan")
    return max(a - n for a, n in zip(c["balanced"], c["null"]))


def relearn_gap(rep) -> float | None:
    """The largest excess of the model's relearned forget recall over the oracle's at equal
    steps, over the whole attack grid (every learning rate and seed; None when the relearning
    attack did not run)."""
    grid = (rep.extra.get("attack_grid") or {}).get("relearn")
    if grid is not None:
        return grid.worst_gap("after")
    attacks = rep.extra.get("attacks") or {}
    if "relearn" not in attacks:
        return None
    rl = _curves(attacks["relearn"])
    return max(e - o for e, o in zip(rl["after"], rl["oracle"]))


@dataclass
class SweepResult:
    """What :func:`run` produced: the records (``records``, as written to ``sweep.json``) and
    the files written."""

    records: dict
    files: list[Path]


def run(cfg: SweepConfig, out: str | Path | None = None, *, stage: str = "all",
        screen_from: str | Path | None = None, only: list[str] | None = None,
        log: Callable[[str], None] = print, executor=None) -> SweepResult:
    """The whole protocol: build the organism and the validation request (the pipeline's build
    step), screen (or reuse ``screen_from``, an earlier ``screen.json``), choose the finalists,
    then (``stage="all"``) report them on every split x seed, the cells on ``executor``
    (default: the config's ``executor`` / ``workers`` at the torch threads in effect). Writes
    ``screen.json`` and ``sweep.json`` to ``out`` (default: the config's ``out``)."""
    import torch

    from excise.app.pipeline import Setup, registries

    if stage not in ("screen", "all"):
        raise ConfigError(f"stage={stage!r}: choose 'screen' or 'all'")
    unknown = [n for n in only or () if n not in cfg.locate]
    if unknown:
        raise ConfigError(f"only: {unknown[0]!r} is not a locate method of this sweep; choose "
                          f"from {list(cfg.locate)}")
    if executor is None and stage == "all":  # checked before any model is built
        executor = sweep_executor(cfg)
    out = Path(out if out is not None else cfg.out)
    regs = registries()
    t0 = time.time()
    out.mkdir(parents=True, exist_ok=True)
    files = []
    torch.manual_seed(cfg.seed)
    subject = Setup.check(_run_config(cfg)).build(progress=False, log=lambda m: None)
    org = subject.organism
    log(f"organism {cfg.organism.preset}: {org.model.n_parameters():,} parameters")
    log(f"stage 1: screen on validation people "
        f"{cfg.validation[0]}..{cfg.validation[-1]}")
    if screen_from:
        scr = json.loads(Path(screen_from).read_text())
        log(f"screen reused from {screen_from}")
    else:
        scr = screen(subject.model, subject.request, cfg, log, regs, only)
        files.append(write_records(out / "screen.json", scr))
    kept, finalists = choose(scr, cfg.finalists)
    log("finalists: " + "; ".join(f"{name(f)} {json.dumps(f['hp'])}" for f in finalists))
    res = {"preset": cfg.organism.preset, "screen": scr, "kept": list(kept.values()),
           "finalists": finalists, "seeds": list(cfg.seeds), "splits": list(cfg.splits)}
    if stage == "all":
        log("stage 2: report on held-out forget splits")
        res["rows"], res["curves"] = report_stage(org, cfg, finalists, log, executor)
        res["dispatch"] = {"executor": executor.name, "workers": executor.workers,
                           "threads": executor.threads, "retries": cfg.retries,
                           "failed": sum("error" in r for r in res["rows"])}
    res["seconds"] = round(time.time() - t0, 1)
    log(f"done in {res['seconds']:.0f} s")
    files.append(write_records(out / "sweep.json", res))
    return SweepResult(res, files)


# -- compact records ---------------------------------------------------------------------------


def jsonable(x, digits: int = 7):
    """Plain JSON values: typed results through ``to_dict``, floats rounded to ``digits``
    significant digits, NaN and infinities as null."""
    if hasattr(x, "to_dict") and not isinstance(x, type):
        x = x.to_dict()
    if isinstance(x, dict):
        return {str(k): jsonable(v, digits) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v, digits) for v in x]
    if isinstance(x, float):
        if math.isnan(x) or math.isinf(x):
            return None
        return float(f"{x:.{digits}g}")
    return x


def dumps_records(obj, digits: int = 7) -> str:
    """Compact JSON: no indent, floats to ``digits`` significant digits; the top-level keys and
    the records of top-level lists (and of lists one mapping down) one per line, so a diff
    shows which record changed."""
    obj = jsonable(obj, digits)

    def one(v) -> str:
        return json.dumps(v, separators=(",", ":"), ensure_ascii=False)

    def block(v, depth: int) -> str:
        if isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            return "[\n" + ",\n".join(one(x) for x in v) + "\n]"
        if isinstance(v, dict) and depth < 1 and v and all(isinstance(x, (dict, list))
                                                          for x in v.values()):
            return "{\n" + ",\n".join(f"{one(k)}:{block(x, depth + 1)}"
                                      for k, x in v.items()) + "\n}"
        return one(v)

    if not isinstance(obj, dict):
        return one(obj) + "\n"
    return "{\n" + ",\n".join(f"{one(k)}:{block(v, 0)}" for k, v in obj.items()) + "\n}\n"


def write_records(path: str | Path, obj, digits: int = 7) -> Path:
    path = Path(path)
    atomic_write_text(path, dumps_records(obj, digits))
    return path


__all__ = ["EditStep", "PROTOCOL", "Recipe", "SweepConfig", "SweepResult", "applicable",
           "apply_recipe", "bar_checks", "bar_penalty", "build_config", "choose",
           "dumps_records", "jsonable", "load_config", "loo_gap", "name", "relearn_gap", "run",
           "screen", "report_stage", "report_cell", "measure_shared", "sweep_executor",
           "write_records"]
