"""``excise run``: locate -> select -> edit -> verify, written to a run folder.

The run is assembled in a hidden partial folder beside the target and put in place, with its
manifest ``run.json`` as the last file, only when every step has finished, so a failed or
interrupted run (SIGINT, SIGTERM) never looks like a finished one and never touches an earlier
run; ``overwrite`` removes only the files an earlier run's manifest lists (see
:mod:`excise.app.folders`).

Shared with ``excise verify`` and the sweep: the stage registries (:func:`registries`), the one
"build model + request" step (:class:`Setup`: checked before anything is built, then
:meth:`Setup.build` gives a :class:`Subject`) and the calls into a locate or edit method
(:func:`locate_with`, :func:`edit_with`).
"""

from __future__ import annotations

import contextlib
import inspect
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

from excise.app.folders import check_out, staged
from excise.config import ConfigError, RunConfig
from excise.io import atomic_write_text, write_json
from excise.report import Report, facts_by_split
from excise.request import FactSet, ForgetRequest


def registries() -> dict[str, dict[str, Callable]]:
    """Method name -> function, per stage: what a config's ``locate.method`` / ``edit.method``
    and ``verify.suite`` may name."""
    import edit
    import locate
    import probes

    return {"locate": locate.METHODS, "edit": edit.METHODS, "verify": probes.SUITES,
            "verify_settings": probes.VerifySettings}


# -- the one "build model + request" step ------------------------------------------------------
@dataclass
class Subject:
    """What a run works on: the model, the request, and the organism the model came from
    (``None`` for a real model, whose facts the model did not produce before editing are in
    ``not_known``)."""

    model: Any
    request: ForgetRequest
    organism: Any = None
    not_known: dict | None = None

    def oracle(self, wanted: bool = True, n: int = 1):
        """The retrain oracle when ``wanted`` and the request names organism people (a real
        model or a request file has none): trained once per forget split, then cached. ``n >
        1``: a list of ``n`` oracles at training seeds seed, seed + 1, ... (``verify.oracles``)."""
        if not wanted or self.organism is None or not self.request.forget_people():
            return None
        from excise.organism import oracle_or_oracles

        return oracle_or_oracles(self.organism, self.request, n)


@dataclass(frozen=True)
class Setup:
    """A config's model and request, checked before any model is built or trained: the
    organism people to forget, or the request file (parsed once, here)."""

    cfg: RunConfig
    people: list[int] | None
    parsed: ForgetRequest | None

    @classmethod
    def check(cls, cfg: RunConfig) -> "Setup":
        remote(cfg)
        people = forget_people(cfg)
        planting(cfg)
        placement(cfg)
        parsed = None
        if cfg.request.jsonl:
            try:
                parsed = ForgetRequest.from_jsonl(cfg.request.jsonl)
            except (ValueError, FileNotFoundError) as e:
                raise ConfigError(f"request: {e}") from None
        return cls(cfg, people, parsed)

    @property
    def real_model(self) -> bool:
        return bool(self.cfg.model.name or self.cfg.model.path)

    def build(self, *, progress: bool = True, log: Callable[[str], None] = print) -> Subject:
        """Load the real model (``model.name`` / ``model.path``; facts it does not produce
        before editing are screened out) or build the organism (trained on first use, then
        cached), and the request."""
        import excise

        cfg = self.cfg
        if cfg.model.finetune_world is not None:  # a real model fine-tuned on a world (TOFU)
            from excise.finetuned import finetuned

            base = cfg.model.name or cfg.model.path
            log(f"model: {base}, fine-tuned on a fictitious world {cfg.model.finetune_world}")
            try:
                ft = finetuned(base, cfg.model.finetune_world, progress=progress,
                               device=cfg.model.device, dtype=cfg.model.dtype)
                req = ft.request(forget_people=self.people, attributes=cfg.request.attributes)
            except (ValueError, ModuleNotFoundError) as e:
                raise ConfigError(f"model: {e}") from None
            return Subject(ft.model, req, ft)
        if self.real_model:  # a real model (excise.hf) instead of the organism
            from excise.hf import load_model
            from probes import screen_known

            log(f"model: {cfg.model.name or cfg.model.path}")
            try:
                if cfg.model.remote:  # NDIF: forward passes only (remote() checked the config)
                    from excise.remote import load_remote

                    model = load_remote(cfg.model.name, path=cfg.model.path,
                                        on_split=cfg.model.on_split, log=log)
                else:
                    model = load_model(cfg.model.name, cfg.model.path,
                                       on_split=cfg.model.on_split, device=cfg.model.device,
                                       dtype=cfg.model.dtype, device_map=cfg.model.device_map,
                                       log=log)
            except (ValueError, ModuleNotFoundError) as e:
                raise ConfigError(f"model: {e}") from None
            req, not_known = screen_known(model, self.parsed, log=log)
            req, known = screen_never_known(model, req, log=log)
            if known:
                not_known = dict(not_known or {}) | {"holdout_known": known}
            return Subject(model, req, None, not_known)
        planted = cfg.organism.planted
        log(f"organism: {cfg.organism.preset} (seed {cfg.organism.seed})"
            + (f", planted {planted}" if planted else ""))
        try:
            org = excise.organism(cfg.organism.preset, seed=cfg.organism.seed, planted=planted,
                                  progress=progress, device=cfg.model.device,
                                  dtype=cfg.model.dtype)
        except ValueError as e:
            raise ConfigError(f"organism: {e}") from None
        if self.parsed is not None:
            return Subject(org.model, self.parsed, org)
        try:
            req = org.request(forget_people=self.people, attributes=cfg.request.attributes)
        except ValueError as e:
            raise ConfigError(f"request: {e}") from None
        return Subject(org.model, req, org)


def screen_never_known(model, request: ForgetRequest,
                       log: Callable[[str], None] = print) -> tuple[ForgetRequest, list[dict]]:
    """A real model's holdout split keeps only facts the model does not produce before editing:
    they are the never-known facts - the membership baseline of the privacy and probe suites
    and, with no retrain oracle, the attacks' comparator (``probes.attacks``). Returns the
    request and the facts dropped because the model knew them (with their target
    log-probability)."""
    import dataclasses

    from probes import knowledge

    if not len(request.holdout):
        return request, []
    rows = knowledge(model, request.holdout)
    dropped = [{"prompt": r["prompt"], "target": r["target"],
                "target_logprob": round(r["target_logprob"], 3)} for r in rows if r["known"]]
    for r in dropped:
        log(f"known before editing (holdout): {r['prompt']!r} -> {r['target']!r}; a holdout "
            f"fact must be one the model never knew, left out")
    keep = tuple(f for f, r in zip(request.holdout, rows) if not r["known"])
    return dataclasses.replace(request, holdout=FactSet("holdout", keep)), dropped


def build(cfg: RunConfig, *, progress: bool = True,
          log: Callable[[str], None] = print) -> Subject:
    """``Setup.check(cfg).build(...)``: the model and the request a config describes."""
    return Setup.check(cfg).build(progress=progress, log=log)


def forget_people(cfg: RunConfig) -> list[int] | None:
    """The people a config asks to forget, checked against the preset before any training."""
    from excise.organism import PRESETS

    rc = cfg.request
    tofu = cfg.model.finetune_world is not None
    if tofu and not (cfg.model.name or cfg.model.path):
        raise ConfigError("model.finetune_world fine-tunes a real model: give model.name (e.g. "
                          "gemma3-270m) or model.path")
    if tofu and rc.jsonl:
        raise ConfigError(f"model.finetune_world: the request is built from the fine-tuned "
                          f"world's people (request.forget_people); drop request.jsonl="
                          f"{rc.jsonl!r}")
    if tofu and (cfg.model.remote or cfg.model.device_map is not None):
        raise ConfigError("model.finetune_world: the fine-tune trains the model locally on one "
                          "device; drop model.remote / model.device_map")
    if (cfg.model.name or cfg.model.path) and not rc.jsonl and not tofu:
        raise ConfigError("model: a real model has no organism people; give the facts to forget "
                          "and keep as request.jsonl (or fine-tune it on a fictitious world: "
                          "model.finetune_world)")
    if rc.jsonl:
        return None
    if tofu:
        from excise.finetuned import FinetuneWorld

        n = FinetuneWorld.of(cfg.model.finetune_world).people
        who = f"the fine-tuned world of {cfg.model.name or cfg.model.path}"
    else:
        if cfg.organism.preset not in PRESETS:
            raise ConfigError(f"organism.preset: unknown preset {cfg.organism.preset!r}; "
                              f"choose one of {sorted(PRESETS)}")
        n = PRESETS[cfg.organism.preset].n_people
        who = f"the {cfg.organism.preset} organism"
    if rc.forget_fraction is not None:
        f = rc.forget_fraction
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f < 1:
            raise ConfigError(f"request.forget_fraction={f!r}: must be a number in (0, 1)")
        k = max(1, round(f * n))
        return sorted(random.Random(rc.split_seed).sample(range(n), k))
    fp = rc.forget_people
    if isinstance(fp, bool) or fp is None:
        raise ConfigError(f"request.forget_people={fp!r}: give a count or a list of people")
    if isinstance(fp, int):
        if not 1 <= fp < n:
            raise ConfigError(f"request.forget_people={fp}: must be between 1 and {n - 1} "
                              f"({who} has {n} trained people)")
        return list(range(fp))
    if isinstance(fp, list):
        if not fp:
            raise ConfigError("request.forget_people is an empty list: nothing to forget")
        bad = [i for i in fp if isinstance(i, bool) or not isinstance(i, int)
               or not 0 <= i < n]
        if bad:
            raise ConfigError(f"request.forget_people: unknown people {bad[:5]}; {who}'s "
                              f"trained people are 0..{n - 1}")
        return sorted(set(fp))
    raise ConfigError(f"request.forget_people={fp!r}: give a count or a list of people")


def remote(cfg: RunConfig) -> None:
    """``model.remote: true`` checked before anything is built: NDIF runs forward passes only,
    so a config that edits (every run, verify and sweep config) is refused here, naming the
    edit; ``model.name`` must be the repo id NDIF serves, and NDIF places the model."""
    m = cfg.model
    if not m.remote:
        return
    if not m.name:
        raise ConfigError("model.remote: true needs model.name, the Hugging Face repo id NDIF "
                          "serves (e.g. openai-community/gpt2); model.path may hold its config "
                          "and tokenizer")
    placed = {k: v for k, v in (("device", m.device), ("dtype", m.dtype),
                                ("device_map", m.device_map)) if v is not None}
    if placed:
        raise ConfigError(f"model.remote: true: NDIF places and casts the model; drop "
                          f"{', '.join(f'model.{k}={v!r}' for k, v in placed.items())}")
    if cfg.edits:
        methods = ", ".join(repr(c.method) for c in cfg.edits)
        raise ConfigError(f"model.remote: true runs {m.name!r} on NDIF, where only forward "
                          f"passes run; edit {methods} needs local weights. Load the model "
                          f"locally (model.remote: false, model.path: a local folder), or from "
                          f"Python use excise.load_remote({m.name!r}) with the forward-only "
                          f"methods (locate.activations, locate.traces(mode='exact'), "
                          f"probes.verify's behaviour / privacy / loo_probe / drift suites)")


def placement(cfg: RunConfig) -> None:
    """``model.device`` / ``dtype`` / ``device_map`` checked before anything is built: names
    this machine can honour (a CUDA device where there is none is refused here)."""
    from excise.placement import check_device_map, resolve_device, resolve_dtype

    m = cfg.model
    try:
        resolve_device(m.device)
        resolve_dtype(m.dtype)
        check_device_map(m.device_map)
    except ValueError as e:
        raise ConfigError(f"model: {e}") from None
    if m.device_map is not None and not (m.name or m.path):
        raise ConfigError(f"model.device_map={m.device_map!r}: sharding is for Hugging Face "
                          f"models (model.name / model.path); the organism runs on one device "
                          f"(model.device)")
    if m.device_map is not None and m.device is not None:
        raise ConfigError(f"model: device={m.device!r} and device_map={m.device_map!r} both "
                          f"place the model; give one of them")


def planting(cfg: RunConfig):
    """``organism.planted`` checked against the preset's people before any training (its
    fields were checked when the config was loaded); None for the plain organism."""
    from excise.organism import PRESETS, Planting
    from excise.world import make_world

    if not cfg.organism.planted or cfg.model.name or cfg.model.path:
        return None
    preset = PRESETS.get(cfg.organism.preset)
    if preset is None:
        return None  # forget_people() names the unknown preset
    world = make_world(preset.n_people, preset.n_holdout, seed=cfg.organism.seed,
                       n_filler=preset.n_filler)
    try:
        return Planting.of(cfg.organism.planted).resolve(preset, world)
    except ValueError as e:
        raise ConfigError(f"organism.planted: {e}") from None


# -- calling a stage method --------------------------------------------------------------------
def locate_with(fn: Callable, model, request: ForgetRequest, sites=None, params=None, *,
                progress: bool = False, cache=None):
    """``fn(model, request, sites, **params)``, adding ``progress`` and a shared statistics
    ``cache`` (a ``locate.StatsCache``) for the methods that take them."""
    kw = dict(params or {})
    takes = inspect.signature(fn).parameters
    if "progress" in takes:
        kw["progress"] = progress
    if cache is not None and "cache" in takes:
        kw["cache"] = cache
    return fn(model, request, sites, **kw)


def edit_with(fn: Callable, model, importance, units, params=None, *, request=None,
              progress: bool = False):
    """``fn(model, importance, units, **params)``, adding ``request`` and ``progress`` for the
    methods that take them (unless ``params`` sets them)."""
    kw = dict(params or {})
    takes = inspect.signature(fn).parameters
    if "request" in takes:
        kw.setdefault("request", request)
    if "progress" in takes:
        kw.setdefault("progress", progress)
    return fn(model, importance, units, **kw)


# -- excise run --------------------------------------------------------------------------------
@dataclass
class RunResult:
    folder: Path
    report: Report
    seconds: float


def run(cfg: RunConfig, out: Path, *, overwrite: bool = False, progress: bool = True,
        log: Callable[[str], None] = print) -> RunResult:
    """locate -> edit -> verify into the run folder ``out``, at ``cfg.threads`` torch threads
    (None: the process's setting; the count in effect is recorded in metrics.json)."""
    from excise.train import using_threads

    with using_threads(cfg.threads):
        return _run(cfg, out, overwrite=overwrite, progress=progress, log=log)


def _run(cfg: RunConfig, out: Path, *, overwrite: bool, progress: bool,
         log: Callable[[str], None]) -> RunResult:
    import torch

    import locate
    import probes
    from excise import plots

    out = Path(out)
    check_out(out, overwrite)  # (again when the run starts writing, and when it finishes)
    setup = Setup.check(cfg)
    regs = registries()
    locate_fn = regs["locate"][cfg.locate.method]
    t0 = time.time()
    torch.manual_seed(cfg.seed)
    stage = Stages()
    with staged(out, overwrite=overwrite, kind="run", log=log) as tmp:
        write_yaml(tmp / "config.yaml", cfg.to_dict())
        with stage("model"):  # the organism trained or loaded, or the real model loaded
            subject = setup.build(progress=progress, log=log)
        model, req = subject.model, subject.request
        log(f"request: {req.summary()}")
        with stage("request"):
            train_req = training_request(cfg, model, req, log=log)  # what locate and edit keep
        log(f"locate: {cfg.locate.method}")
        with stage("locate"):
            imp = locate_with(locate_fn, model, train_req, cfg.locate.sites, cfg.locate.params,
                              progress=progress)
        imp.save(tmp / "importance.safetensors")
        with stage("plots"):
            plot_paths = [plots.save(imp.plot("heatmap"), tmp / "importance.png"),
                          plots.save(imp.plot("bar"), tmp / "importance_top.png")]
            run_plots = getattr(locate, "run_plots", None)
            if run_plots is not None:  # method-specific figures (e.g. causal-trace heatmaps)
                plot_paths += run_plots(imp, model, req, tmp)
        units = None
        if cfg.select.top is not None:
            units = imp.top(cfg.select.top, cfg.select.sites)
            write_json(tmp / "selection.json", {"source": units.source,
                                                "units": units.to_list()})
        original = model.clone()
        with stage("edit"):
            edits = apply_edits(cfg, model, imp, units, train_req, progress=progress, log=log)
        try:
            for name, e in zip(diff_names(cfg), edits):
                e.diff.save(tmp / name)
            changed = net_changed(model, original)
            # the oracle is trained only now: a value only the locate or edit method can judge
            # (a site, a mode) is refused before minutes of training, not after
            oracle = None
            if cfg.verify.oracle and req.forget_people():
                log("retrain oracle (trained once per forget split, then cached)")
                with stage("oracle"):
                    oracle = subject.oracle(n=cfg.verify.oracles)
            log(f"verify: {cfg.verify.suite}")
            with stage("verify"):
                after = probes.verify(model, req, oracle=oracle, label="after",
                                      suite=cfg.verify.suite, original=original,
                                      cache=verify_cache(cfg, log), **cfg.verify.params)
            with stage("listing"):
                listing = {"after": fact_listing(cfg, model, req, original)}
        finally:
            for e in reversed(edits):
                e.revert()
        # the suites measure the original model as "before" when they need it; otherwise measure
        # its behaviour here (the edit is reverted, so the model is the original again)
        with stage("verify"):
            before = after.metrics.get("before") or \
                probes.verify(model, req, label="before").metrics["before"]
        report = Report(metrics={"before": before},
                        request=req.summary() | {"forget_people": req.forget_people()})
        report.merge(after)
        # every fact, before and after, by split (the edit is reverted: model is the original)
        with stage("listing"):
            listing = {"before": fact_listing(cfg, model, req, original)} | listing
        report.extra["facts"] = facts_by_split(listing)
        planted = getattr(subject.organism, "planted", None)
        if planted is not None:  # the planted organism: where its designated facts live
            report.extra["planted"] = planted.to_dict()
        if subject.not_known:  # facts the model did not produce before editing: not "forgotten"
            report.extra["not_known"] = subject.not_known
        if after.verdict:
            report.verdict, report.verdict_rule = after.verdict, after.verdict_rule
        write_plots = getattr(probes, "write_plots", None)
        if write_plots is not None:  # attack curves, per-depth probes ...
            with stage("plots"):
                plot_paths += write_plots(report, tmp)
        if not cfg.chained:
            m = edits[0].manifest
            report.edit = {"method": cfg.edit.method, "units_changed": _units_changed(edits[0]),
                           "params_changed": m["params_changed"],
                           "params_changed_frac": m["params_changed_frac"],
                           "params": cfg.edit.params, "locate": cfg.locate.method}
        else:  # a chain: what it changed in all (elements that differ from the original)
            report.edit = {"method": chain_name(cfg),
                           "units_changed": max(_units_changed(e) for e in edits),
                           "params_changed": changed,
                           "params_changed_frac": changed / max(1, model.n_parameters()),
                           "params": [dict(c.params) | ({"units": c.units} if c.units else {})
                                      for c in cfg.edits],
                           "steps": [{"method": e.method,
                                      "params_changed": e.manifest["params_changed"]}
                                     for e in edits],
                           "locate": cfg.locate.method}
        keys = plots.recall_keys({k: report.metrics[k] for k in ("before", "after", "oracle")
                                  if k in report.metrics})
        with stage("plots"):
            plot_paths.append(plots.save(plots.metrics_bars(report.metrics, keys),
                                         tmp / "recall.png"))
        report.plots = [Path(p).name for p in plot_paths]
        report.extra["seconds"] = round(time.time() - t0, 1)
        report.extra["stage_seconds"] = {k: round(v, 1) for k, v in stage.seconds.items()}
        log("seconds by stage: " + ", ".join(f"{k} {v:.0f}" for k, v in stage.seconds.items())
            + f" (all {report.extra['seconds']:.0f})")
        report.extra["threads"] = torch.get_num_threads()
        report.save(tmp)
    return RunResult(out, report, time.time() - t0)


class Stages:
    """Wall seconds per stage of a run, summed over a stage's blocks (``stage("edit")`` as a
    context manager): ``report.extra["stage_seconds"]`` and one log line (stderr) when the
    run is written up."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        t = time.time()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.time() - t


def verify_cache(cfg: RunConfig, log: Callable[[str], None] | None = None):
    """The verify cache of a run: attack results kept in ``EXCISE_CACHE/verify`` across runs
    (:class:`probes.store.AttackStore`) when ``verify.reuse`` (the default), else none."""
    if not cfg.verify.reuse:
        return None
    from excise.organism import cache_dir
    from probes.store import AttackStore

    return AttackStore(cache_dir() / "verify", log=log)


def training_request(cfg: RunConfig, model, request: ForgetRequest, *,
                     log: Callable[[str], None] = print) -> ForgetRequest:
    """The request locate and edit work on: ``request`` itself, or with
    ``request.same_template_retain`` the request with generated same-template facts (retain-side
    subjects, :mod:`excise.templates`; computed once from the unedited ``model`` and kept in the
    request's meta) added to its retain facts. Verification measures ``request``: its retain
    split stays the user's, and the same-template metric uses the other subjects."""
    from excise import templates

    if not cfg.request.same_template_retain:
        return request
    st = templates.cached(model, request)
    log(f"same-template facts: {st.summary()} (retain side added to the retain facts locate "
        f"and edit keep; the metric side held out)")
    return templates.with_retain(request, st)


def fact_listing(cfg: RunConfig, model, request: ForgetRequest, original
                 ) -> dict[str, list[dict]]:
    """Every fact of ``request`` and its same-template neighbors (generated from the unedited
    ``original``, once per run: :func:`excise.templates.cached`) on ``model``
    (``probes.behaviour.fact_listing``), through the forward the verification's attacks use
    (``verify: {attacks: {engine: ...}}``)."""
    from excise import templates
    from probes.behaviour import fact_listing as listing
    from probes.suites import VerifySettings

    settings = VerifySettings(suite=cfg.verify.suite, **cfg.verify.params)  # checked at load
    return listing(model, request, templates.cached(original, request).metric,
                   engine=settings.attack_config().engine)


def _units_changed(e) -> int:
    if e.selection is not None:
        return len(e.selection)
    return sum(c.n_changed() for c in e.changes.values()) + len(e.hook_fns)


def apply_edits(cfg: RunConfig, model, importance, units, request: ForgetRequest, *,
                progress: bool = False, log: Callable[[str], None] = print) -> list:
    """Apply the config's edit (or chain of edits, in order: each sees the model the earlier
    ones left) through :func:`edit_with`; ``units: all`` edits every parameter, without the
    importance. Returns the applied edits; a failing edit reverts the ones before it."""
    regs = registries()
    edits = []
    try:
        for i, c in enumerate(cfg.edits):
            where = f" ({i + 1}/{len(cfg.edits)})" if cfg.chained else ""
            log(f"edit{where}: {c.method}{' on all parameters' if c.units else ''} {c.params}")
            everything = c.units == "all"
            edits.append(edit_with(regs["edit"][c.method], model,
                                   None if everything else importance,
                                   "all" if everything else units, c.params, request=request,
                                   progress=progress))
    except BaseException:
        for e in reversed(edits):
            e.revert()
        raise
    return edits


def diff_names(cfg: RunConfig) -> list[str]:
    """The run folder's diff files: ``edit.safetensors`` for one edit, ``edit-0.safetensors``,
    ``edit-1.safetensors`` ... for a chain (in the order they apply)."""
    if not cfg.chained:
        return ["edit.safetensors"]
    return [f"edit-{i}.safetensors" for i in range(len(cfg.edits))]


def chain_name(cfg: RunConfig) -> str:
    return "+".join(c.method for c in cfg.edits)


def net_changed(model, original) -> int:
    """Parameter elements in which ``model`` differs from ``original``."""
    mine, theirs = model.named_parameters(), original.named_parameters()
    return sum(int((mine[s].detach() != theirs[s].detach()).sum()) for s in mine)


def write_yaml(path: Path, obj) -> None:
    atomic_write_text(path, yaml.safe_dump(obj, sort_keys=False))


def default_out(cfg: RunConfig) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{stamp}-{cfg.locate.method}-{chain_name(cfg)}"
