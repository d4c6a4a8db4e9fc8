"""Calibration of the verdict: models whose answer is known, judged with the full verify suite.

Before the verdict (:mod:`probes.verdict`) judges an edit, it must be right on models whose
answer is known (issue 14, section 2). For each seed ``s`` (the organism's seed: world, training
and the seed of every edit and attack below), a request that forgets a fixed group of people
(``people``; default :data:`PEOPLE` of the preset, chosen outside the planted organism's groups)
and the known-answer models built for it:

- **deleted** (``retrain``): another retrain oracle - the same recipe, training seed ``s + 1``
  - judged against the reference oracles;
- **deleted** (``distill``): a fresh-initialised model distilled from the original on retain
  data only (``edit.distill``, ``units="all"``, ``alpha=1``: every weight re-drawn; its data the
  retain facts, the shared facts and the retain text - everything but the forget facts),
  learning the original's greedy answer on the retain facts and its whole next-token
  distribution on the text (``Knobs.distill_labels="hard_facts"``): its distributions at the
  answer positions of retain facts keep probability on the answers it was trained on, forget
  answers included (soft-label students read a membership AUC 0.06-0.15 above the oracle's on
  tiny), and greedy tokens alone on the text leave a student with 130x the perplexity
  (docs/results.md);
- **deleted** (``planted_reinit``): on the planted-location organism (``planted=True``), the
  planted units re-initialised and retrained on retain data (``edit.reinit`` on
  ``org.planted.units``); its request forgets the planted ``reported`` group, its oracle is the
  planted oracle, its original the planted organism;
- **suppressed**: every control of :mod:`probes.controls` (ascent on all weights, on the
  unembedding, SAE-latent gains);
- **damaged**: global gradient ascent on the forget facts run until retain recall falls below
  ``damage_below`` (:func:`damage`);
- **not forgotten**: the original.

Each is judged by ``probes.verify(suite="verdict")`` - behaviour, privacy (membership), every
restoration attack over the attack grid (``grid``), the rule - against the reference retrain
oracles (``Knobs.oracles``: training seeds ``s``, ``s + 2``, ``s + 3``, ...; never ``s + 1``, the
``retrain`` case; ``probes.verify.against_oracles``) and the original, with one cache per request
so every oracle's and the original's attack grids run once.
:meth:`Calibration.confusion` is the expected x got table; every cell off the diagonal is a bug in
a probe or in the rule.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import edit
import excise
import probes
from edit.distill import LABELS as DISTILL_LABELS
from edit.distill import SCHEDULES as DISTILL_SCHEDULES
from excise.checks import check_choice
from excise.handle import ModelHandle
from excise.report import check_outcome
from excise.request import ForgetRequest
from excise.train import TEXT_LOSSES, Optim, Sampler, train
from probes import attacks as A
from probes import controls
from probes.behaviour import recall
from probes.verdict import ANSWERS, VERDICTS

# the forget people of the calibration request per preset: outside the planted organism's
# designated groups (tiny: reported 0..3, validation 16..19; small: 0..9, 150..159) and the
# people the controls' settings were chosen on (tiny: 12..19, probes.controls)
# tiny: 12 people, half of the world. With 8 (4..11, stops 29-32) a per-person bound could not
# decide the forget check itself: a second retrain oracle recalled 4 of 60 forget facts against
# the reference oracle's 2, upper bound 0.075 against the 0.05 margin
PEOPLE: dict[str, tuple[int, ...]] = {"tiny": tuple(range(4, 12)) + tuple(range(20, 24)),
                                      "small": tuple(range(10, 20)),
                                      "medium": tuple(range(10, 20))}

# case -> the verdict it must get
EXPECTED: dict[str, str] = {
    "retrain": "deleted",
    "distill": "deleted",
    "planted_reinit": "deleted",
    "ascent_all": "suppressed",
    "ascent_unembed": "suppressed",
    "ascent_last": "suppressed",
    "latent_gains": "suppressed",
    "ascent_until_damaged": "damaged",
    "original": "not forgotten",
}
CASES = tuple(EXPECTED)


@dataclass(frozen=True)
class Row:
    """One known-answer model judged: its case, the verdict it must get and the one it got, the
    seed, the forget people, the key numbers (``metrics``), which checks of the rule credibly
    failed (``failed``) and which were open (``open``: neither passed nor credibly failed), and
    the seconds spent building and judging it."""

    case: str
    expected: str
    got: str
    seed: int
    people: tuple[int, ...]
    metrics: dict[str, Any]
    failed: tuple[str, ...]
    build_seconds: float
    verify_seconds: float
    detail: dict[str, Any] = field(default_factory=dict)
    open: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.got == self.expected

    def to_dict(self) -> dict:
        return dataclasses.asdict(self) | {"ok": self.ok}


@dataclass(frozen=True)
class Calibration:
    """The calibration run: every row, and the settings it ran with."""

    rows: tuple[Row, ...]
    preset: str
    seeds: tuple[int, ...]
    grid: str
    settings: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def confusion(self) -> dict[str, dict[str, int]]:
        """``table[expected][got]``: how many rows; the rows are the answers a known-answer
        model can have (:data:`probes.verdict.ANSWERS`), the columns every verdict the rule can
        give (:data:`~probes.verdict.VERDICTS`: the answers and "inconclusive")."""
        table = {e: {g: 0 for g in VERDICTS} for e in ANSWERS}
        for r in self.rows:
            table[r.expected][r.got] += 1
        return table

    @property
    def off_diagonal(self) -> tuple[Row, ...]:
        return tuple(r for r in self.rows if not r.ok)

    @property
    def diagonal(self) -> bool:
        """Whether every row got the verdict it must get."""
        return not self.off_diagonal

    def to_dict(self) -> dict:
        return {"preset": self.preset, "seeds": list(self.seeds), "grid": self.grid,
                "settings": self.settings, "seconds": round(self.seconds, 1),
                "confusion": self.confusion(), "diagonal": self.diagonal,
                "rows": [r.to_dict() for r in self.rows]}


# -- the known-answer models -------------------------------------------------------------------
def damage(model: ModelHandle, request: ForgetRequest, below: float = 0.9, *, lr: float = 1e-4,
           batch_size: int = 32, every: int = 5, max_steps: int = 2000,
           seed: int = 0) -> tuple[ModelHandle, int]:
    """Global gradient ascent on the forget facts (Adam on every weight, no retain term) until
    retain recall is below ``below``: ``(the damaged clone, steps taken)``. Retain recall is
    measured every ``every`` steps; training stops at the first measurement below ``below``.
    ``model`` is unchanged. Refuses when ``max_steps`` steps do not get there."""
    if not 0 < below <= 1:
        raise ValueError(f"damage: below={below!r}; must be a retain recall in (0, 1]")
    m = model.clone()
    params = m.named_parameters()
    for p in params.values():
        p.requires_grad_(True)
    fb = m.encode(list(request.forget))
    rb = m.encode(list(request.retain))
    sampler = Sampler(seed)
    reached: list[int] = []

    def broken(step: int) -> bool:
        if recall(m, rb) < below:
            reached.append(step)
            return True
        return False

    if broken(0):
        raise ValueError(f"damage: retain recall is already below {below} before any ascent")
    res = train(lambda _: -m.loss(fb[sampler.rows(len(fb), batch_size)].trim()), params,
                steps=max_steps, optim=Optim("adam", lr=lr), evaluate=broken, eval_every=every)
    if not reached:
        raise ValueError(f"damage: retain recall stayed >= {below} after {max_steps} steps of "
                         f"ascent at lr {lr:g}; raise max_steps or lr")
    for p in params.values():
        p.requires_grad_(False)
    return m, res.steps


def distill_request(request: ForgetRequest) -> ForgetRequest:
    """The data a from-scratch distillation learns from: the request with the shared facts'
    sentences added to its retain text (the organism trained on them too; they are not forget
    data, and a student that never saw them could not know them)."""
    extra = tuple(f.text for f in request.shared)
    return dataclasses.replace(request, retain_text=tuple(request.retain_text) + extra)


def _with_edit(model: ModelHandle, method: Callable, **kw) -> ModelHandle:
    m = model.clone()
    method(m, **kw)
    return m


@dataclass(frozen=True)
class Knobs:
    """How the known-answer models are built (recorded in the calibration's settings).

    ``distill_*``: the from-scratch distillation (every weight re-drawn, ``alpha = 1``);
    ``distill_teacher``: whose outputs it learns - ``"original"`` (the case as the issue defines
    it) or ``"oracle"`` (a retrain oracle at training seed ``s + 1``, which never saw the forget
    people: the control that tells information carried over by the teacher's outputs from an
    artifact of distillation itself); ``distill_labels``: what it learns (``edit.distill``'s
    ``labels``) - ``"hard_facts"`` (the known-deleted case): the teacher's greedy answer on the
    retain facts, its whole distribution on the text; ``"soft"``: whole distributions
    everywhere, which keep probability on the answers the teacher was trained on, forget
    answers included (reported, not a known answer); ``"hard"``: greedy tokens everywhere.
    ``distill_schedule``: its learning rate over the steps (``edit.distill``'s ``schedule``):
    ``"constant"`` (``tiny``'s table) or ``"linear"`` (the organism's own warm-up and decay;
    on ``small`` a constant 3e-3 from scratch kept only 0.888 of the retain facts after 1,500
    steps, the linear schedule 1.000 after 1,000 on four requests - docs/results.md, "Deletion
    vs fraction touched").
    ``reinit_*``: retraining of the re-initialised planted units (``reinit_text_loss``: how
    the retain text is kept - ``"kl"``, the original's next-token distributions on it; under
    ``"nll"`` the small planted case read general-text perplexity 1.19x its oracle's, under
    ``"kl"`` 0.80x, forget recall 0.020 both; ``reinit_shared``: the shared facts' sentences
    join the retain text it is kept on, as for the distillation (:func:`distill_request`: the
    organism trained on them, they are not forget data; without them the fresh units cost
    ``tiny`` seed 1 one of its 48 shared facts at stop 34 and the case read damaged).
    ``damage_*``: the global
    ascent of :func:`damage`. ``control_*``: the controls' step budget and how they keep
    utility (``keep``, ``keep_text`` of :mod:`probes.controls`: a known-suppressed model must
    pass the utility gate, or the gate decides and the rest of the rule is never tested) and
    what hides the facts (``objective``: ``"margin"``, the answer pushed just below the best
    other token - the least change that hides a fact, so the knowledge is certainly still
    there; ``"ascent"``, the loss raised to its clamp, which bent the unembedding-only control
    into a damaged model on ``tiny``) and how the text is kept (``text``: ``"kl"``, the KL from
    the original's next-token distributions; ``"nll"``, the text's loss, under which the
    unembedding-only control learned the 60 retain sentences and general-text perplexity rose
    2.2-2.5x on ``tiny``).
    ``latent_*``: the SAE the latent-gains control hides the facts through and its step budget
    (``None``: the steering attack's SAE, ``blocks.{n_layers // 2}.resid_post`` at the attack's
    width, and ``control_steps``). ``latent_layer``: the block whose ``resid_post`` it reads;
    ``latent_expansion``: its width as a multiple of ``d_model``. On ``tiny`` the attack's SAE
    reads the last block's output, where 100 steps of gains hid almost nothing: forget recall
    stayed 0.93-0.97 (validation people 12..19, seeds 0 and 1); at block 0 with 4x the width
    and 300 steps it fell to 0.37-0.64 with retain recall 1.000 (docs/results.md, "The
    latent-gains control on `tiny`").
    ``oracles``: how many reference retrain oracles judge every case
    (training seeds ``s``, then ``s + 2``, ``s + 3``, ...: :func:`oracles_for`)."""

    distill_steps: int = 1500
    distill_lr: float = 3e-3
    distill_batch: int = 64
    distill_teacher: str = "original"
    distill_labels: str = "hard_facts"
    distill_schedule: str = "constant"
    reinit_steps: int = 400
    reinit_lr: float = 3e-3
    reinit_batch: int = 64
    reinit_text_loss: str = "kl"
    reinit_shared: bool = True
    damage_below: float = 0.9
    damage_lr: float = 1e-4
    oracles: int = 2
    control_steps: int = 100
    control_keep: float = 10.0
    control_keep_text: bool = True
    control_objective: str = "margin"
    control_text: str = "kl"
    latent_layer: int | None = None
    latent_expansion: int | None = None
    latent_steps: int | None = None

    def __post_init__(self):
        check_choice("Knobs", "distill_teacher", self.distill_teacher, ["original", "oracle"])
        check_choice("Knobs", "control_objective", self.control_objective,
                     list(controls.OBJECTIVES))
        check_choice("Knobs", "control_text", self.control_text, list(TEXT_LOSSES))
        check_choice("Knobs", "reinit_text_loss", self.reinit_text_loss, list(TEXT_LOSSES))
        keep = self.control_keep
        if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not keep > 0:
            raise ValueError(f"Knobs.control_keep={keep!r}: must be a number > 0 (the weight of "
                             f"the controls' descent on retain data against the ascent)")
        check_choice("Knobs", "distill_labels", self.distill_labels, list(DISTILL_LABELS))
        check_choice("Knobs", "distill_schedule", self.distill_schedule,
                     list(DISTILL_SCHEDULES))
        for name, low in (("latent_layer", 0), ("latent_expansion", 1), ("latent_steps", 1)):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < low):
                raise ValueError(f"Knobs.{name}={v!r}: must be null (the steering attack's "
                                 f"SAE and the controls' steps) or an integer >= {low}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def oracles_for(org, request: ForgetRequest, n: int,
                log: Callable[[str], None]) -> list[ModelHandle]:
    """The ``n`` reference retrain oracles of ``request`` on ``org``: training seeds ``seed``,
    then ``seed + 2``, ... (``seed + 1`` trains the ``retrain`` case, which they judge)."""
    from excise.organism import retrain_oracles

    return retrain_oracles(org, request, n, skip=[org.seed + 1], log=log)


def latent_kit(source: ModelHandle, request: ForgetRequest, cfg: A.AttackConfig, knobs: Knobs,
               attack_kit=None):
    """``(sae, site, scale)`` the latent-gains control hides through: the steering attack's
    (``attack_kit``, or trained as the attack would) unless ``knobs.latent_layer`` /
    ``latent_expansion`` name another SAE, trained on ``source`` the same way."""
    if knobs.latent_layer is None and knobs.latent_expansion is None:
        return attack_kit if attack_kit is not None else A.steering_kit(source, request, cfg)
    own = dataclasses.replace(
        cfg, **({} if knobs.latent_layer is None else {"sae_layer": knobs.latent_layer}),
        **({} if knobs.latent_expansion is None else {"sae_expansion": knobs.latent_expansion}))
    return A.steering_kit(source, request, own)


def sae_kits(source: ModelHandle, request: ForgetRequest, cfg: A.AttackConfig, knobs: Knobs,
             cases: Sequence[str]):
    """``(attack kit, control kit)``: the steering attack's SAE where ``cfg`` runs that attack,
    the latent-gains control's where ``cases`` build it (:func:`latent_kit`); else None."""
    kit = A.steering_kit(source, request, cfg) if "sae" in cfg.attacks else None
    control = latent_kit(source, request, cfg, knobs, kit) if "latent_gains" in cases else None
    return kit, control


def plain_cases(org, request: ForgetRequest, seed: int, knobs: Knobs,
                kit, cases: Sequence[str], log: Callable[[str], None]):
    """Yield ``(case, model, build seconds)`` of the cases on the plain organism."""
    original = org.model
    keep = {"steps": knobs.control_steps, "keep": knobs.control_keep,
            "keep_text": knobs.control_keep_text, "objective": knobs.control_objective,
            "text": knobs.control_text}
    def teacher() -> ModelHandle:
        if knobs.distill_teacher == "oracle":
            return org.oracle(request, train_seed=org.preset.seed + 1)
        return original

    builders: dict[str, Callable[[], ModelHandle]] = {
        "retrain": lambda: org.oracle(request, train_seed=org.preset.seed + 1),
        "distill": lambda: _with_edit(
            teacher(), edit.distill, units="all", request=distill_request(request), alpha=1.0,
            steps=knobs.distill_steps, lr=knobs.distill_lr, batch_size=knobs.distill_batch,
            labels=knobs.distill_labels, schedule=knobs.distill_schedule, seed=seed,
            engine="serial"),  # the forward every documented calibration run used
        "ascent_all": lambda: controls.gradient_ascent(original, request, **keep),
        "ascent_unembed": lambda: controls.unembed_ascent(original, request, **keep),
        "ascent_last": lambda: controls.last_block_ascent(original, request, **keep),
        "latent_gains": lambda: controls.latent_suppression(
            original, request, kit[0], kit[1], kit[2],
            **(keep | ({} if knobs.latent_steps is None else {"steps": knobs.latent_steps}))),
        "ascent_until_damaged": lambda: damage(original, request, knobs.damage_below,
                                               lr=knobs.damage_lr, seed=seed)[0],
        "original": lambda: original,
    }
    for case in cases:
        if case not in builders:
            continue
        log(f"seed {seed}: building {case}")
        t = time.time()
        yield case, builders[case](), time.time() - t


def _key_metrics(rep, label: str, original_label: str) -> dict[str, Any]:
    m, o = rep.metrics[label], rep.metrics["oracle"]
    z = rep.metrics.get(original_label, {})
    checks = rep.extra["verdict"]["checks"]
    gaps = {k[len("attack_"):]: c.get("worst_gap") for k, c in checks.items()
            if k.startswith("attack_")}
    uppers = {k[len("attack_"):]: c.get("upper") for k, c in checks.items()
              if k.startswith("attack_")}
    ppl_m, ppl_o = m.get("perplexity", math.nan), o.get("perplexity", math.nan)
    return {
        "forget": m.get("forget_recall"), "oracle_forget": o.get("forget_recall"),
        "original_forget": z.get("forget_recall"),
        "retain": m.get("retain_recall"), "oracle_retain": o.get("retain_recall"),
        "shared": m.get("shared_recall"), "oracle_shared": o.get("shared_recall"),
        "ppl_ratio": ppl_m / ppl_o if ppl_o else math.nan,
        "mia": m.get("mia_auc_loss"), "oracle_mia": o.get("mia_auc_loss"),
        "relearn_gap": gaps.get("relearn"),
        "worst_attack": max(gaps, key=lambda k: gaps[k] if gaps[k] is not None else -9)
        if gaps else None,
        "attack_gaps": gaps, "attack_uppers": uppers,
        "params_changed": m.get("params_changed"),
    }


def judge(case: str, model: ModelHandle, request: ForgetRequest,
          oracle: ModelHandle | Sequence[ModelHandle],
          original: ModelHandle, seed: int, people: Sequence[int], build_seconds: float, *,
          cache: dict, verify_kw: dict) -> Row:
    """One known-answer model through ``probes.verify(suite="verdict")``, as a :class:`Row`."""
    t = time.time()
    rep = probes.verify(model, request, oracle=oracle, original=original, suite="verdict",
                        label=case, seed=seed, cache=cache, **verify_kw)
    checks = rep.extra["verdict"]["checks"]
    outcome = {k: check_outcome(c) for k, c in checks.items()}
    failed = tuple(k for k, w in outcome.items() if w == "FAIL")
    undecided = tuple(k for k, w in outcome.items() if w == "open")
    detail = {k: {n: v for n, v in c.items() if n != "need"} for k, c in checks.items()}
    return Row(case, EXPECTED[case], rep.verdict, seed, tuple(int(i) for i in people),
               _key_metrics(rep, case, "original"), failed, round(build_seconds, 1),
               round(time.time() - t, 1),
               {"checks": detail, "oracles": [{k: v for k, v in o.items() if k != "metrics"}
                                              for o in rep.extra.get("oracles", [])]},
               undecided)


def calibrate(preset: str = "tiny", seeds: Sequence[int] = (0, 1), *, grid: str = "full",
              people: Sequence[int] | None = None, planted_people: Sequence[int] | None = None,
              cases: Sequence[str] = CASES, attacks=None, knobs: Knobs = Knobs(),
              progress: Callable[[str], None] | None = None,
              on_row: Callable[[Row], None] | None = None, **verify_kw) -> Calibration:
    """Build the known-answer models of every seed and judge each with the full verify suite.

    ``seeds``: organism seeds (each its own world, training, oracles; the edits, controls and
    attacks are seeded with it too). ``people``: the forget people of the plain organism's
    request (default :data:`PEOPLE` of the preset); ``planted_people``: the planted case's
    (default the planted organism's ``reported`` group). ``grid``: the attack grid
    (``probes.attacks.GRIDS``); ``attacks``: as for ``probes.verify`` (default: every attack).
    ``cases``: a subset of :data:`CASES`, built in that order. ``on_row(row)``: called as each
    row is judged. Further keywords go to ``probes.verify``."""
    check_choice("calibrate", "grid", grid, list(A.GRIDS))
    bad = [c for c in cases if c not in EXPECTED]
    if bad:
        raise ValueError(f"calibrate: unknown case {bad[0]!r}; choose from {list(CASES)}")
    if not seeds:
        raise ValueError("calibrate: seeds is empty; give at least one organism seed")
    if people is None:
        if preset not in PEOPLE:
            raise ValueError(f"calibrate: no default people for preset {preset!r}; pass people=")
        people = PEOPLE[preset]
    log = progress or (lambda _msg: None)
    verify_kw = {"grid": grid, "attacks": attacks} | verify_kw
    t0 = time.time()
    rows: list[Row] = []
    for seed in seeds:
        org = excise.organism(preset, seed=seed, progress=False)
        req = org.request(list(people))
        log(f"seed {seed}: forget people {list(people)}")
        n = org.model.n_layers
        if "latent_gains" in cases and knobs.latent_layer is not None and knobs.latent_layer >= n:
            raise ValueError(f"Knobs.latent_layer={knobs.latent_layer}: the {preset} organism "
                             f"has blocks 0..{n - 1}")
        oracles = oracles_for(org, req, knobs.oracles, log)
        cfg = probes.VerifySettings(suite="verdict", seed=seed, grid=grid,
                                    attacks=attacks).attack_config()
        kit, control_kit = sae_kits(org.model, req, cfg, knobs, cases)
        kw = verify_kw | ({"sae": (kit[0], kit[2])} if kit is not None else {})
        cache: dict = {}
        for case, model, secs in plain_cases(org, req, seed, knobs, control_kit, cases, log):
            log(f"seed {seed}: judging {case}")
            rows.append(judge(case, model, req, oracles, org.model, seed, people, secs,
                              cache=cache, verify_kw=kw))
            log(f"seed {seed}: {case} -> {rows[-1].got} (expected {rows[-1].expected})")
            if on_row:
                on_row(rows[-1])
        if "planted_reinit" in cases:
            rows.append(planted_row(preset, seed, planted_people, knobs, log, verify_kw))
            if on_row:
                on_row(rows[-1])
    settings = {"people": list(people), "cases": list(cases), "knobs": knobs.to_dict(),
                "attacks": attacks, "verify": {k: v for k, v in verify_kw.items()
                                               if k not in ("attacks",)}}
    return Calibration(tuple(rows), preset, tuple(seeds), grid, settings, time.time() - t0)


def planted_row(preset: str, seed: int, planted_people: Sequence[int] | None, knobs: Knobs,
                log: Callable[[str], None], verify_kw: dict) -> Row:
    """The planted case: on the planted organism of ``seed``, the planted units re-initialised
    and retrained on retain data, judged against the planted oracle."""
    org = excise.organism(preset, seed=seed, planted=True, progress=False)
    people = (org.planted.groups["reported"] if planted_people is None
              else tuple(planted_people))
    req = org.request(list(people))
    log(f"seed {seed}: planted organism, forget people {list(people)}")
    oracles = oracles_for(org, req, knobs.oracles, log)
    log(f"seed {seed}: building planted_reinit")
    t = time.time()
    data = distill_request(req) if knobs.reinit_shared else req
    model = _with_edit(org.model, edit.reinit, units=org.planted.units, request=data,
                       mode="fresh", steps=knobs.reinit_steps, lr=knobs.reinit_lr,
                       batch_size=knobs.reinit_batch, text_loss=knobs.reinit_text_loss,
                       seed=seed)
    secs = time.time() - t
    log(f"seed {seed}: judging planted_reinit")
    row = judge("planted_reinit", model, req, oracles, org.model, seed, people, secs, cache={},
                verify_kw=verify_kw)
    log(f"seed {seed}: planted_reinit -> {row.got} (expected {row.expected})")
    return row
