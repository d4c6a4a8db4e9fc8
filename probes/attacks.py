"""Restoration attacks: try to bring forgotten facts back, on the edited model and on the oracle.

Every attack works on a clone (or through temporary hooks): the model passed in is never changed.
Every attack is seeded. Each returns a :class:`Curve` of forget recall against the attack's
budget; ``run_attacks`` runs each attack with identical settings on every model it is given, so
the edited model's curve can be compared with the retrain oracle's ("deleted" = recovers no
faster than a model that never saw the data).

- ``relearn``   fine-tune on one part of the forget set (split by person, retain data mixed in);
                measure recall on the other part ("Unlearning or Obfuscating?").
- ``benign``    fine-tune on retain / neighbour data only; measure forget recall.
- ``refit``     logit-lens readout per depth, re-fitted on retain activations, read on forget.
- ``sae``       SAE-latent steering ("Suppression or Deletion"): one gain per latent of an SAE
                trained on the original model (``excise.sae``), fitted on part of the forget set,
                recall measured on the other part.
- ``quantize``  round-to-nearest per-channel weight quantization (8 and 4 bit).
- ``paraphrase``forget facts asked in never-trained phrasings, by form.
- ``incontext`` in-context relearning: the facts of one part of the forget set (prompt and
                target, split by person as for relearning) written as few-shot examples before
                each prompt of the other part; recall on that part against the number of shots.
                No training: it matters most where gradient attacks are expensive.
- ``lens``      the logit lens: each layer's residual (``blocks.L.resid_post``) at every target
                position read through the final norm and the unembedding
                (``ModelHandle.readout()``); forget recall (and the first target token's median
                rank) per layer. At the last layer it is the model's own recall.

Models with no retrain oracle (real facts learned in pretraining): the comparator
(:func:`comparator_request`, :func:`run_comparator_grid`) is facts the model never knew (the
request's ``holdout`` split: screened as not known, or fictitious) put in the forget facts'
place - split in halves exactly as the forget facts are (:func:`_split_people`, same fraction
and seed) and attacked with the same settings and grid, on the unedited model. Its curves carry
the label ``"comparator"``; the verdict compares the edited model's curves with them where it
would compare them with the oracle's.

Attacker hygiene (Deeb & Roger 2024; "Distillation Robustifies Unlearning"): every attack with a
learning rate (``relearn``, ``benign``, ``refit``, ``sae``) runs over a grid of learning rates x
seeds (``GRIDS``: ``quick`` for ``excise run``, ``full`` for the sweep and ``excise verify --grid
full``, ``single`` = the configured setting only), identically on every model (:func:`run_grid`).
The seeds of an attack that splits the forget people are the folds of a cross-fit: the second seed
trains on the part the first one held out and holds out the part it trained on
(``AttackConfig.fold``), so every person is held out once per learning rate (in-context
relearning, which has no learning rate, runs both folds too: :data:`FOLDED`); the verdict pools
each learning rate's seeds (:meth:`excise.report.AttackGrid.pooled`) and reads the worst gap over
learning rates and budgets. Settings that wreck the unedited model's own held-out recall are
flagged (:func:`wrecks`), never dropped.

Speed (``AttackConfig.engine``, ``ENGINES``): the fine-tuning and steering attacks run their
forward passes either through the handle ("serial": TransformerLens, hooks and all) or, by
default, "fused" (:mod:`excise.fused`): the same GPT-2-style computation written with fused
torch ops, computing
only what a target token's logit depends on: each row up to its last position that predicts a
target (causal attention: nothing later feeds it), the rows packed so the per-position layers
compute no padding (attention alone runs on the padded grid), and the last block, final norm
and unembedding only at the positions that predict a target token (the earlier blocks at every
position before them: their keys and values are read). Same steps, batches, learning
rates and seeds; losses equal to float precision, every per-fact hit identical on the tiny and
small organisms (tests/test_attacks_batched.py, bench/bench_attacks.py). Where it does not apply
(another handle or architecture, hooks attached, logits that differ from the handle's) the
serial path runs. Training several settings at once with ``torch.func.vmap`` was measured and
left out: on the CPU it is no faster than running them one after another (0.9-1.0x on small).
What is faster there is running them side by side (``AttackConfig.workers``, :func:`in_workers`):
the grid's settings x models are independent tasks, and on a small model two tasks at one torch
thread each get more from two cores than one task at two threads (the quick grid of every
attack on the small organism and its oracle, 20 forget people: 114 s against 153 s one setting
at a time at two threads, every curve identical; the whole suite: bench/bench_probes.py). By
default :func:`run_grid` runs one task per torch thread wherever every model is a CPU model the
fused engine runs, each worker on its own copies of the models.

Defaults are tuned on positive controls (models where the facts are known to be only
suppressed, see tests/test_probes.py), not on the edit methods being judged.
"""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
import random
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch
from torch import Tensor

from excise.checks import check_positive
from excise.fused import ENGINES, engine_for, fused_forward, fused_hits, fused_loss
from excise.handle import Batch, ModelHandle
from excise.report import AttackCurves, AttackGrid, Curve, GridPoint
from excise.request import FactSet, ForgetRequest, owner
from excise.sae import SAETrainConfig, check_sae_fits, train_sae
from excise.train import Optim, Sampler
from excise.train import train as train_loop
from probes.behaviour import fact_hits

ATTACKS = ("relearn", "benign", "refit", "sae", "quantize", "paraphrase", "incontext", "lens")

# the label of the comparator's curves (never-known facts on the unedited model; models
# without a retrain oracle)
COMPARATOR = "comparator"


# the attacks with a learning rate, and the AttackConfig field each grid varies
LR_FIELDS = {"relearn": "relearn_lr", "benign": "benign_lr", "refit": "refit_lr",
             "sae": "sae_lr"}

# attacks without a learning rate that still split the forget people (a trained part shown,
# a held-out part measured): they run one setting per grid seed - the complementary folds - so
# their pooled curve holds every forget person out once, as the learning-rate attacks' do
FOLDED = ("incontext",)

# The attacker-hygiene grids: learning rates per attack (each on its own scale: weights for the
# fine-tuning attacks, a readout for refit, log-gains for SAE steering) and how many seeds
# (cfg.seed, cfg.seed + 1, ...). Every setting runs on every model (edited, oracle, original).
# One fine-tuning run of 60 steps costs ~15 s on `small` (2 cores), so "quick" (excise run) keeps
# two seeds of every attack and two learning rates of relearning (the attack issue 8's bar reads);
# "full" (the sweep, excise verify --grid full) spans 1e-5 .. 3e-3 as the literature does.
# "single" runs the configured learning rate at cfg.seed only (tests, tuning). "small" is the
# stated budget of a real model on a CPU (configs/gemma-facts.yaml): one seed, two learning
# rates of relearning, one of the other fine-tuning attacks; pretrained weights move far at the
# organism's rates (Gemma 3 270M, MLPs only, 4 steps at 3e-4: its own held-out recall 1.0 -> 0.4).
GRIDS: dict[str, dict] = {
    "single": {"lrs": {}, "seeds": 1},
    "small": {"lrs": {"relearn": (1e-5, 1e-4), "benign": (1e-5,), "refit": (1e-2,),
                      "sae": (0.2,)},
              "seeds": 1},
    "quick": {"lrs": {"relearn": (3e-4, 1e-3), "benign": (3e-4,), "refit": (1e-2,),
                      "sae": (0.2,)},
              "seeds": 2},
    "full": {"lrs": {"relearn": (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3),
                     "benign": (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3),
                     "refit": (1e-3, 1e-2, 1e-1),
                     "sae": (0.05, 0.2, 0.5)},
             "seeds": 2},
}


@dataclass(frozen=True)
class AttackConfig:
    """Settings shared by every model an attack runs on. Budgets must be positive."""

    attacks: tuple[str, ...] = ATTACKS
    seed: int = 0
    # relearning on part of the forget set; ``fold`` 1 swaps the parts of the split drawn with
    # ``seed - 1`` (trains on what fold 0 held out): the grid's seeds are a 2-fold cross-fit
    relearn_fraction: float = 0.5
    fold: int = 0
    # tuned on the small organism's controls (bench/tune_attacks.py): at 3e-3 relearning drops the
    # unedited model's held-out recall to 0.17; at 3e-4 x 60 steps it keeps it >= 0.98 and lifts
    # suppressed controls 0.1 -> 0.33 while never-trained people stay <= 0.08
    relearn_steps: int = 60
    relearn_lr: float = 3e-4
    relearn_batch: int = 64
    retain_mix: float = 1.0  # retain facts per forget fact in every relearning batch
    eval_every: int = 10
    # benign relearning (retain / neighbour data only)
    benign_steps: int = 60
    benign_lr: float = 3e-4
    benign_batch: int = 64
    # probe re-fitting
    refit_steps: int = 100
    refit_lr: float = 1e-2
    refit_max_facts: int = 1000
    # SAE-latent steering
    sae_layer: int | None = None  # default: the middle layer
    sae_expansion: int = 8
    sae_steps: int = 1500
    sae_l1: float = 0.5  # sparser SAEs leave the facts in the error term (tests/test_probes.py)
    sae_attack_steps: int = 40
    sae_lr: float = 0.2
    # quantization
    quant_bits: tuple[int, ...] = (8, 4)
    # in-context relearning: how many facts of the other part are written before each prompt
    # (capped by the part's size and the model's context: "shots used" on the curve), and what
    # separates the examples
    icl_shots: tuple[int, ...] = (0, 1, 2, 4, 8)
    icl_sep: str = "\n"
    # the parameters the fine-tuning attacks (relearn, benign) train: glob patterns over
    # parameter sites (e.g. "blocks.*.mlp.*"); empty: every parameter
    train_sites: tuple[str, ...] = ()
    # attacker hygiene: the grid of learning rates x seeds (GRIDS) and when a setting is flagged
    # as wrecking the unedited model (its held-out recall falls more than this below its start)
    grid: str = "quick"
    flag_drop: float = 0.1
    # forward passes of relearn / benign / sae: "serial" or "fused" (ENGINES)
    engine: str = "fused"
    # settings of the grid run at once (:func:`run_grid`), each worker on its own copies of the
    # models at (torch threads // workers) intra-op threads; None: one worker per torch thread
    # where every model is a CPU model the fused engine runs (a small model's matmuls gain less
    # from a second thread than from a second job), else 1. The per-job thread count it implies
    # decides the last bits of the arithmetic (same threads and workers, same numbers). A value
    # given applies to any model: each worker then holds its own copies (memory x workers)
    workers: int | None = None

    def __post_init__(self):
        bad = [a for a in self.attacks if a not in ATTACKS]
        if bad:
            raise ValueError(f"unknown attack {bad[0]!r}; choose from {list(ATTACKS)}")
        if not self.attacks:
            raise ValueError("attacks is empty: name at least one of " + ", ".join(ATTACKS))
        for name in ("relearn_steps", "relearn_batch", "eval_every", "benign_steps",
                     "benign_batch", "refit_steps", "refit_max_facts", "sae_expansion",
                     "sae_steps", "sae_attack_steps"):
            check_positive(name, getattr(self, name))
        for name in ("relearn_lr", "benign_lr", "refit_lr", "sae_lr"):
            check_positive(name, getattr(self, name), 1e-12)
        if not 0 < self.relearn_fraction < 1:
            raise ValueError(f"relearn_fraction={self.relearn_fraction!r}: must be in (0, 1)")
        if self.fold not in (0, 1):
            raise ValueError(f"fold={self.fold!r}: choose 0 (train on the first part of the "
                             f"seeded split) or 1 (on the other part: its complement)")
        if self.retain_mix < 0:
            raise ValueError(f"retain_mix={self.retain_mix!r}: must be >= 0")
        if not self.quant_bits or any(not 2 <= int(b) <= 16 for b in self.quant_bits):
            raise ValueError(f"quant_bits={self.quant_bits!r}: give bit widths in 2..16")
        if not self.icl_shots or any(isinstance(k, bool) or not isinstance(k, int) or k < 0
                                     for k in self.icl_shots):
            raise ValueError(f"icl_shots={self.icl_shots!r}: give shot counts, integers >= 0")
        if len(set(self.icl_shots)) != len(self.icl_shots):
            raise ValueError(f"icl_shots={self.icl_shots!r}: a shot count is repeated")
        if not isinstance(self.icl_sep, str):
            raise ValueError(f"icl_sep={self.icl_sep!r}: must be a string (e.g. '\\n')")
        if any(not isinstance(p, str) or not p for p in self.train_sites):
            raise ValueError(f"train_sites={self.train_sites!r}: give glob patterns over "
                             f"parameter sites, e.g. ['blocks.*.mlp.*']")
        if self.grid not in GRIDS:
            raise ValueError(f"grid={self.grid!r}: choose one of {list(GRIDS)}")
        if not 0 < self.flag_drop <= 1:
            raise ValueError(f"flag_drop={self.flag_drop!r}: must be in (0, 1]")
        if self.engine not in ENGINES:
            raise ValueError(f"engine={self.engine!r}: choose one of {list(ENGINES)}")
        if self.workers is not None and (isinstance(self.workers, bool)
                                         or not isinstance(self.workers, int)
                                         or self.workers < 1):
            raise ValueError(f"workers={self.workers!r}: give an integer >= 1 (settings run at "
                             f"once), or null for one per torch thread on small CPU models")

    def settings(self, attack: str) -> list["AttackConfig"]:
        """The grid of ``attack``: one config per (learning rate, seed), learning rates
        outermost; attacks without a learning rate run once, at ``seed``, except those that
        split the forget people (:data:`FOLDED`), which run once per seed. Seed ``seed + k`` is
        fold ``k % 2`` of the split drawn with ``seed + k - k % 2``: seeds come in complementary
        pairs (every forget person held out once per pair)."""
        g = GRIDS[self.grid]
        field_ = LR_FIELDS.get(attack)
        if field_ is None:
            if attack not in FOLDED:
                return [self]
            return [dataclasses.replace(self, seed=self.seed + k, fold=k % 2)
                    for k in range(g["seeds"])]
        lrs = g["lrs"].get(attack) or (getattr(self, field_),)
        return [dataclasses.replace(self, seed=self.seed + k, fold=k % 2,
                                    **{field_: float(lr)})
                for lr in lrs for k in range(g["seeds"])]

    @classmethod
    def from_params(cls, params: dict | None) -> "AttackConfig":
        params = dict(params or {})
        fields = {f.name for f in dataclasses.fields(cls)}
        bad = [k for k in params if k not in fields]
        if bad:
            raise ValueError(f"unknown attack setting {bad[0]!r}; valid: {sorted(fields)}")
        for k in ("attacks", "quant_bits", "icl_shots", "train_sites"):
            if k in params:
                v = params[k]
                params[k] = (v,) if isinstance(v, (str, int, float)) else tuple(v)
        return cls(**params)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# -- helpers -----------------------------------------------------------------------------------
def _trainable_clone(model: ModelHandle, sites: Sequence[str] = ()) -> ModelHandle:
    """A clone whose parameters matching ``sites`` (glob patterns; empty: all) train."""
    m = model.clone()
    for name, p in m.named_parameters().items():
        p.requires_grad_(trains(name, sites))
    return m


def trains(site: str, patterns: Sequence[str]) -> bool:
    """Whether a fine-tuning attack trains parameter ``site`` (``patterns`` empty: every one)."""
    return not patterns or any(fnmatch.fnmatchcase(site, p) for p in patterns)


def _groups(facts: Sequence) -> tuple:
    """The owner (person, else subject) of each fact: what the verdict resamples."""
    return tuple(owner(f) for f in facts)


def finetune_curve(model: ModelHandle, train: Sequence, evaluate: Sequence,
                   mix: Sequence = (), *, steps: int, lr: float, batch: int, mix_ratio: float,
                   eval_every: int, seed: int, also: Sequence = (),
                   engine: str = "serial", sites: Sequence[str] = ()) -> Curve:
    """Fine-tune a clone of ``model`` on ``train`` (with ``mix_ratio`` x as many ``mix`` facts
    per batch) by AdamW; recall on ``evaluate`` (and ``also``) every ``eval_every`` steps. The
    curve keeps the per-fact hits on ``evaluate`` at every step measured. ``engine``: the
    forward passes (``ENGINES``; "fused" falls back to "serial" where it does not apply).
    ``sites``: glob patterns of the parameters that train (empty: every parameter)."""
    train, mix, evaluate = list(train), list(mix), list(evaluate)
    if not train and not mix:
        raise ValueError("nothing to fine-tune on")
    m = _trainable_clone(model, sites)
    sampler = Sampler(seed)
    data = m.encode(train + mix)
    ev = m.encode(evaluate)  # encoded once, measured at every evaluation
    seen = m.encode(list(also)) if also else None
    n_tr, n_mix = len(train), len(mix)
    xs, hits, aux = [], [], []
    fwd = engine_for(m, engine, data)
    params = m.named_parameters()
    if fwd is None:
        def hits_of(b: Batch) -> Tensor:
            return fact_hits(m, b)

        def loss(b: Batch) -> Tensor:
            return m.loss(b.trim())
    else:
        def hits_of(b: Batch) -> Tensor:
            return fused_hits(fwd, params, b)

        def loss(b: Batch) -> Tensor:
            return fused_loss(fwd, params, b)

    def measure(step: int) -> None:
        xs.append(step)
        hits.append(hits_of(ev))
        if seen is not None:
            aux.append(float(hits_of(seen).float().mean()))

    trained = {k: p for k, p in params.items() if trains(k, sites)}
    if not trained:
        raise ValueError(f"train_sites={list(sites)!r} match no parameter; sites are e.g. "
                         f"{list(params)[:4]}")
    measure(0)
    train_loop(lambda _: loss(data[sampler.mixed(n_tr, n_mix, batch, mix_ratio)]),
               trained, steps=steps, optim=Optim("adamw", lr=lr, weight_decay=0.0),
               max_grad_norm=1.0, evaluate=measure, eval_every=eval_every)
    return _curve(xs, hits, evaluate, "fine-tuning steps",
                  aux={"trained part": aux} if also else {})


def _curve(xs, hits: Sequence[Tensor], facts: Sequence, xlabel: str,
           ylabel: str = "forget recall", aux=None, groups=None) -> Curve:
    """A Curve from per-fact hits at each budget (``groups``: per budget; default: the owners
    of ``facts`` at every budget)."""
    g = _groups(facts)
    return Curve(xs, [float(h.float().mean()) if len(h) else float("nan") for h in hits],
                 xlabel, ylabel, aux=aux or {}, hits=[h.tolist() for h in hits],
                 groups=groups if groups is not None else [g] * len(hits))


def _split_people(facts: FactSet, cfg: AttackConfig, attack: str) -> tuple[FactSet, FactSet]:
    """The part an attack trains on and the held-out part it is measured on, split by person
    (by subject for facts that belong to no person): the split drawn with ``cfg.seed -
    cfg.fold``, its parts swapped for fold 1 (the complement of fold 0's)."""
    from excise.request import owner

    owners = {owner(f) for f in facts}
    if len(owners) < 2:
        raise ValueError(f"the {attack} attack splits the forget set by person (or subject) and "
                         f"needs facts about at least 2 of them; have {len(owners)}")
    a, b = facts.split(cfg.relearn_fraction, seed=cfg.seed - cfg.fold)
    return (b, a) if cfg.fold else (a, b)


# -- the attacks -------------------------------------------------------------------------------
def relearn(model: ModelHandle, request: ForgetRequest, cfg: AttackConfig = AttackConfig(),
            facts: FactSet | None = None) -> Curve:
    """Fine-tune on part of ``facts`` (default: the forget set), split by person; recall on the
    other part. Retain facts are mixed into every batch."""
    a, b = _split_people(request.forget if facts is None else facts, cfg, "relearning")
    c = finetune_curve(model, a, b, request.retain, steps=cfg.relearn_steps, lr=cfg.relearn_lr,
                       batch=cfg.relearn_batch, mix_ratio=cfg.retain_mix,
                       eval_every=cfg.eval_every, seed=cfg.seed, also=a, engine=cfg.engine,
                       sites=cfg.train_sites)
    return dataclasses.replace(c, ylabel="forget recall (held-out people)")


def benign(model: ModelHandle, request: ForgetRequest,
           cfg: AttackConfig = AttackConfig()) -> Curve:
    """Fine-tune on neighbour data (or retain data when there are no neighbours)."""
    data = request.neighbors if len(request.neighbors) else request.retain
    c = finetune_curve(model, [], request.forget, data, steps=cfg.benign_steps,
                       lr=cfg.benign_lr, batch=cfg.benign_batch, mix_ratio=1.0,
                       eval_every=cfg.eval_every, seed=cfg.seed, engine=cfg.engine,
                       sites=cfg.train_sites)
    return c


@torch.no_grad()
def _readout_data(model: ModelHandle, facts: Sequence, sites: Sequence[str]):
    """Per target-predicting position: ln_final(resid) at each site (float32), the token, and
    the fact - all on the device of the model's readout (its unembedding)."""
    ln, W_U, _ = model.readout()
    dev = W_U.device
    feats: dict[str, list[Tensor]] = {s: [] for s in sites}
    toks, owner = [], []
    offset = 0
    for b in model.encode(list(facts)).chunks(256):
        acts = model.run_with_cache(b.tokens, sites)
        m = b.target_mask[:, 1:]  # logits at j predict token j+1
        rows, cols = m.nonzero(as_tuple=True)
        toks.append(b.tokens[rows, cols + 1].to(dev))
        owner.append((rows + offset).to(dev))
        offset += len(b)
        for s in sites:
            feats[s].append(acts[s][rows, cols].to(dev))
    out = {s: ln(torch.cat(v)[:, None, :])[:, 0].detach().float() for s, v in feats.items()}
    return out, torch.cat(toks), torch.cat(owner)


def _fit_readout(x: Tensor, tokens: Tensor, W0: Tensor, b0: Tensor,
                 cfg: AttackConfig) -> tuple[Tensor, Tensor]:
    """A readout ``x @ W + b`` started at ``(W0, b0)`` and fitted by Adam to predict ``tokens``."""
    W = W0.clone().requires_grad_(True)
    bias = b0.clone().requires_grad_(True)
    train_loop(lambda _: torch.nn.functional.cross_entropy(x @ W + bias, tokens), [W, bias],
               steps=cfg.refit_steps, optim=Optim("adam", lr=cfg.refit_lr))
    return W.detach(), bias.detach()


def refit(model: ModelHandle, request: ForgetRequest, cfg: AttackConfig = AttackConfig()) -> Curve:
    """Logit-lens readout from every depth, initialised at the model's unembedding and re-fitted
    on retain activations; forget recall when reading the forget activations with it. ``aux``
    keeps the plain logit lens (the readout before fitting) at every depth: at the last depth
    that is the model's own recall."""
    rng = random.Random(cfg.seed)
    retain = list(request.retain)
    if len(retain) > cfg.refit_max_facts:
        retain = rng.sample(retain, cfg.refit_max_facts)
    sites = [f"blocks.{L}.resid_post" for L in range(model.n_layers)]
    xr, tr, _ = _readout_data(model, retain, sites)
    forget = list(request.forget)
    xf, tf, of = _readout_data(model, forget, sites)
    _, W0, b0 = model.readout()  # fitted in float32 where the unembedding is
    W0, b0 = W0.float(), b0.float().to(W0.device)

    def fact_hit(W: Tensor, bias: Tensor, x: Tensor) -> Tensor:
        with torch.no_grad():
            ok = ((x @ W + bias).argmax(-1) == tf).float()
        hit = torch.ones(len(forget), device=ok.device)
        return hit.scatter_reduce_(0, of, ok, "amin").bool().cpu()

    hits, lens = [], []
    for s in sites:
        W, bias = _fit_readout(xr[s], tr, W0, b0, cfg)
        hits.append(fact_hit(W, bias, xf[s]))
        lens.append(float(fact_hit(W0, b0, xf[s]).float().mean()))
    return _curve(list(range(model.n_layers)), hits, forget,
                  "depth of the re-fitted readout (layer)", aux={"logit lens": lens})


# -- SAE ---------------------------------------------------------------------------------------
def steering_sae(model: ModelHandle, request: ForgetRequest, site: str, expansion: int = 8,
                 steps: int = 1500, l1: float = 0.5, seed: int = 0):
    """The SAE the steering attack works in: ``(sae, input_scale)``, trained (or loaded from
    the cache) by :func:`excise.sae.train_sae` on ``site`` activations of the request's forget,
    retain and neighbour facts; its weights frozen."""
    facts = FactSet("sae", tuple(request.forget) + tuple(request.retain)
                    + tuple(request.neighbors))
    sae, scale, _ = train_sae(model, facts, site, SAETrainConfig(
        expansion=expansion, steps=steps, l1=l1, seed=seed))
    for p in sae.parameters():
        p.requires_grad_(False)
    return sae, float(scale)


def gain_hook(sae, gains: Tensor, scale: float = 1.0):
    """Hook: multiply every SAE latent's contribution to the activation by ``gains`` ``[d_sae]``
    (the SAE reads ``activation * scale``); what the SAE does not reconstruct passes unchanged.
    Differentiable in ``gains``."""
    W = sae.W_dec.detach() / scale  # [d_sae, d]

    def fn(x, site):
        f = sae.encode(x.float() * scale)  # [..., d_sae]
        return x + (((gains - 1.0) * f) @ W).to(x.dtype)
    return fn


def sae_steer(model: ModelHandle, request: ForgetRequest, sae, site: str,
              cfg: AttackConfig = AttackConfig(), scale: float = 1.0,
              facts: FactSet | None = None) -> Curve:
    """SAE-latent steering, learned: one gain per SAE latent at ``site`` (d_sae numbers, the
    weights stay frozen) is fitted to bring back one part of the forget set (split by person,
    retain facts mixed in as for relearning); the curve is recall on the other part. Knowledge
    that an edit only hid in latent space (latents dampened, but the weights still compute the
    facts from them) comes back for people the gains were never fitted on; a model that never
    learned the facts has nothing for the gains to amplify."""
    check_sae_fits(model, sae, site, "SAE steering")  # widths, before anything is attached
    a, b = _split_people(request.forget if facts is None else facts, cfg, "SAE steering")
    m = model.clone()
    for p in m.named_parameters().values():
        p.requires_grad_(False)
    # gains = exp: amplify x20 fast; on the SAE's device (train_sae puts it on the model's)
    log_gains = torch.zeros(sae.W_dec.shape[0], device=sae.W_dec.device, requires_grad=True)
    sampler = Sampler(cfg.seed)
    data = m.encode(list(a) + list(request.retain))
    eb, ea = m.encode(list(b)), m.encode(list(a))
    n_a, n_mix = len(a), len(request.retain)
    xs, hits, seen = [], [], []

    fwd = engine_for(m, cfg.engine, data)
    params = m.named_parameters()

    def loss(_step: int) -> Tensor:
        rows = sampler.mixed(n_a, n_mix, cfg.relearn_batch, cfg.retain_mix)
        hook = {site: gain_hook(sae, log_gains.exp(), scale)}
        if fwd is not None:
            return fused_loss(fwd, params, data[rows], hooks=hook)
        return m.loss(data[rows].trim(), hooks=hook)

    def hits_of(b: Batch, hk) -> Tensor:
        return fact_hits(m, b, hooks=hk) if fwd is None else fused_hits(fwd, params, b, hk)

    def measure(step: int) -> None:
        hk = {site: gain_hook(sae, log_gains.detach().exp(), scale)} if step else None
        xs.append(step)
        hits.append(hits_of(eb, hk))
        seen.append(float(hits_of(ea, hk).float().mean()))

    measure(0)
    train_loop(loss, [log_gains], steps=cfg.sae_attack_steps, optim=Optim("adam", lr=cfg.sae_lr),
               evaluate=measure, eval_every=cfg.eval_every)
    return _curve(xs, hits, list(b), f"steps fitting {len(log_gains)} latent gains ({site})",
                  "forget recall (held-out people)", aux={"trained part": seen})


# -- quantization ------------------------------------------------------------------------------
def rtn(w: Tensor, bits: int, reduce: tuple[int, ...] | None) -> Tensor:
    """Symmetric round-to-nearest with one scale per slice: the scale is the amax over the
    axes in ``reduce`` (None: one scale for the whole tensor)."""
    qmax = 2 ** (bits - 1) - 1
    if reduce is None:
        amax = w.abs().amax()
    else:
        amax = w.abs().amax(dim=list(reduce), keepdim=True)
    scale = (amax / qmax).clamp(min=1e-12)
    return (w / scale).round().clamp(-qmax, qmax) * scale


def quantized(model: ModelHandle, bits: int) -> ModelHandle:
    """A clone with every weight matrix quantized per output channel (biases and norms kept);
    the handle says which axes each weight's scale reduces over (``quant_axes``: the input
    axis, whatever the backend's layout)."""
    m = model.clone()
    with torch.no_grad():
        for name, p in m.named_parameters().items():
            reduce = m.quant_axes(name)
            if reduce is None:
                continue
            p.copy_(rtn(p.float(), bits, reduce).to(p.dtype))
    return m


def quantize(model: ModelHandle, request: ForgetRequest,
             cfg: AttackConfig = AttackConfig()) -> Curve:
    """Forget recall (and retain recall, ``aux``) of the weights in fp32 and quantized to each
    of ``cfg.quant_bits`` (:func:`quantized`); the greedy reads through ``cfg.engine``."""
    forget = list(request.forget)
    fb, rb = model.encode(forget), model.encode(list(request.retain))
    fwd = engine_for(model, cfg.engine, fb)

    def hits_of(m: ModelHandle, b: Batch) -> Tensor:
        return fact_hits(m, b) if fwd is None else fused_hits(fwd, m.named_parameters(), b)

    def rec(m: ModelHandle) -> float:
        return float(hits_of(m, rb).float().mean()) if len(rb) else float("nan")

    xs, hits, ret = ["fp32"], [hits_of(model, fb)], [rec(model)]
    for b in cfg.quant_bits:
        q = quantized(model, int(b))
        xs.append(f"{int(b)}-bit")
        hits.append(hits_of(q, fb))
        ret.append(rec(q))
    return _curve(xs, hits, forget, "weights", aux={"retain recall": ret})


def _phrasings(request: ForgetRequest) -> list[tuple[str, list]]:
    """The paraphrase attack's budget axis: ``(x, facts)`` per phrasing - the trained one, then
    each paraphrase form the request has."""
    out = [("trained", list(request.forget))]
    first = ("statement", "question")
    for form in first + tuple(sorted({f.form for f in request.paraphrase} - set(first))):
        part = list(request.paraphrase.where(form=form))
        if len(part):
            out.append((f"paraphrase {form}", part))
    if len(out) == 1:
        raise ValueError("the paraphrase attack needs request.paraphrase facts (never-trained "
                         "phrasings of the forget facts); the request has none")
    return out


def paraphrase(model: ModelHandle, request: ForgetRequest,
               cfg: AttackConfig = AttackConfig()) -> Curve:
    xs, hits, groups = [], [], []
    for x, part in _phrasings(request):
        xs.append(x)
        hits.append(fact_hits(model, part))
        groups.append(_groups(part))
    return _curve(xs, hits, list(request.forget), "phrasing", groups=groups)


def paraphrase_comparator(model: ModelHandle, request: ForgetRequest,
                          facts: FactSet) -> Curve:
    """The paraphrase attack's comparator curve: never-known ``facts`` have one phrasing, so
    their recall stands at every phrasing of ``request``'s axis (what a model that never knew
    a fact answers however it is asked)."""
    xs = [x for x, _ in _phrasings(request)]
    h = fact_hits(model, list(facts))
    return _curve(xs, [h] * len(xs), list(facts), "phrasing")


# -- attacks that need no training ---------------------------------------------------------------
def incontext_facts(shots: Sequence, held: Sequence, sep: str = "\n") -> list:
    """Each fact of ``held`` with every fact of ``shots`` written before its prompt as an
    example: prompt = ``s1.prompt + " " + s1.target + sep + ... + sN.target + sep + prompt``;
    target, person and subject as the held-out fact's."""
    prefix = "".join(f"{s.prompt} {s.target}{sep}" for s in shots)
    return [dataclasses.replace(f, prompt=prefix + f.prompt) for f in held]


def _fit_shots(model: ModelHandle, shots: Sequence, fact, sep: str) -> list:
    """The last ``len(shots)`` or fewer of ``shots`` (dropping the first ones) whose prompt
    with ``fact`` fits the model's context."""
    n = model.n_ctx
    shots = list(shots)
    if n is None:
        return shots
    tok = model.tokenizer.encode
    while shots:
        (f,) = incontext_facts(shots, [fact], sep)
        if 1 + len(tok(f.prompt + " " + f.target)) <= n:
            break
        shots = shots[1:]
    return shots


def incontext_prompts(model: ModelHandle, request: ForgetRequest,
                      cfg: AttackConfig = AttackConfig(), facts: FactSet | None = None
                      ) -> tuple[dict[int, list], list, list[list]]:
    """The in-context attack's inputs: ``facts`` (default: the forget set) split by person as
    for relearning (:func:`_split_people`); the trained part in an order seeded by
    ``cfg.seed``; for every k of ``cfg.icl_shots`` each held-out fact with the first k facts of
    that order written before it (:func:`incontext_facts`) - the last of them only, as many as
    fit the model's context. Returns ``({k: prompts}, held-out facts, {k: shots used per
    fact})``."""
    a, b = _split_people(request.forget if facts is None else facts, cfg,
                         "in-context relearning")
    pool = list(a)
    random.Random(cfg.seed).shuffle(pool)
    held = list(b)
    prompts, used = {}, []
    for k in cfg.icl_shots:
        rows = [_fit_shots(model, pool[:k], f, cfg.icl_sep) for f in held]
        prompts[k] = [incontext_facts(s, [f], cfg.icl_sep)[0] for s, f in zip(rows, held)]
        used.append([len(r) for r in rows])
    return prompts, held, used


def incontext(model: ModelHandle, request: ForgetRequest, cfg: AttackConfig = AttackConfig(),
              facts: FactSet | None = None) -> Curve:
    """In-context relearning: recall on the held-out part of ``facts`` (default: the forget
    set, split by person as for relearning) when the first k facts of the other part are
    written before every prompt, for every k in ``cfg.icl_shots``
    (:func:`incontext_prompts`). Fewer shots are used where the part has fewer facts or the
    model's context is too short (``aux["shots used"]``: the mean). No weight changes."""
    prompts, held, used = incontext_prompts(model, request, cfg, facts)
    xs = list(prompts)
    hits = [fact_hits(model, prompts[k], batch_size=16) for k in xs]
    return _curve(xs, hits, held, "in-context examples (facts of the other people)",
                  "forget recall (held-out people)",
                  aux={"shots used": [sum(u) / len(u) for u in used]})


@torch.no_grad()
def lens(model: ModelHandle, request: ForgetRequest, cfg: AttackConfig = AttackConfig(),
         facts: FactSet | None = None) -> Curve:
    """The logit lens: every layer's residual (``blocks.L.resid_post``) at each target-predicting
    position of ``facts`` (default: the forget set) read through the model's final norm and
    unembedding (``readout()``); a fact is recalled at a layer when every target token is the
    argmax there (as :func:`probes.behaviour.fact_hits`: at the last layer, the model's own
    recall). ``aux["median rank"]``: the median rank (1 = top) of each fact's first target
    token at its last prompt position."""
    facts = list(request.forget if facts is None else facts)
    sites = [f"blocks.{L}.resid_post" for L in range(model.n_layers)]
    xs, tok, own = _readout_data(model, facts, sites)
    _, W, bias = model.readout()
    W, bias = W.float(), bias.float().to(W.device)
    first = torch.full((len(facts),), len(own), device=own.device, dtype=torch.long)
    first = first.scatter_reduce_(0, own, torch.arange(len(own), device=own.device), "amin")
    hits, ranks = [], []
    for s in sites:
        logits = xs[s] @ W + bias
        ok = (logits.argmax(-1) == tok).float()
        hit = torch.ones(len(facts), device=ok.device).scatter_reduce_(0, own, ok, "amin")
        hits.append(hit.bool().cpu())
        tl = logits.gather(-1, tok[:, None])
        rank = (logits[first] > tl[first]).sum(-1) + 1
        ranks.append(float(rank.float().median()))
    return _curve(list(range(model.n_layers)), hits, facts, "layer read by the logit lens",
                  aux={"median rank": ranks})


# -- all together ------------------------------------------------------------------------------
# The attacks by name, one for each name in ATTACKS (in that order): each is
# ``run(model, request, cfg, sae) -> Curve``, where ``sae`` is ``(sae, site, input scale)`` for
# SAE steering (trained once per run_attacks call) and None for the others.
RUNNERS: dict[str, Callable[..., Curve]] = {
    "relearn": lambda model, request, cfg, sae: relearn(model, request, cfg),
    "benign": lambda model, request, cfg, sae: benign(model, request, cfg),
    "refit": lambda model, request, cfg, sae: refit(model, request, cfg),
    "sae": lambda model, request, cfg, sae: sae_steer(model, request, sae[0], sae[1], cfg, sae[2]),
    "quantize": lambda model, request, cfg, sae: quantize(model, request, cfg),
    "paraphrase": lambda model, request, cfg, sae: paraphrase(model, request, cfg),
    "incontext": lambda model, request, cfg, sae: incontext(model, request, cfg),
    "lens": lambda model, request, cfg, sae: lens(model, request, cfg),
}


def comparator_request(request: ForgetRequest) -> ForgetRequest:
    """The comparator's request: the never-known facts (``request.holdout``: facts the model
    does not produce, or fictitious ones) in the forget facts' place, every other split as it
    is (no paraphrases: see :func:`paraphrase_comparator`). Every attack then treats them
    exactly as the forget facts: the same split by person or subject (:func:`_split_people`),
    settings and grid."""
    if not len(request.holdout):
        raise ValueError("the comparator needs never-known facts: the request's holdout split "
                         "(facts the model does not produce, or fictitious ones) is empty")
    return dataclasses.replace(request, forget=FactSet("forget", request.holdout.facts),
                               holdout=FactSet("holdout", ()),
                               paraphrase=FactSet("paraphrase", ()))


def run_comparator_grid(model: ModelHandle, request: ForgetRequest,
                        cfg: AttackConfig = AttackConfig(), *, kit=None,
                        log=None) -> dict[str, AttackGrid]:
    """:func:`run_grid` of every attack of ``cfg`` on ``model`` (the unedited model) with the
    never-known facts in the forget facts' place (:func:`comparator_request`): the reference
    curves of a model with no retrain oracle, one curve per setting labelled ``"_"`` (as
    :func:`run_grid` on one model; :func:`merge_grids` puts them beside the edited model's)."""
    creq = comparator_request(request)
    _check_paraphrase(request, cfg)
    runners = dict(RUNNERS)
    runners["paraphrase"] = lambda m, r, c, s: paraphrase_comparator(m, request, creq.forget)
    return run_grid({"_": model}, creq, cfg, kit=kit, log=log, runners=runners)


def steering_kit(source: ModelHandle, request: ForgetRequest, cfg: AttackConfig, sae=None):
    """``(sae, site, input scale)`` for the steering attack: ``sae`` (an SAE or ``(sae,
    scale)``) or one trained on ``source`` (the original model) at ``cfg.sae_layer``."""
    L = cfg.sae_layer if cfg.sae_layer is not None else source.n_layers // 2
    if not 0 <= L < source.n_layers:
        raise ValueError(f"sae_layer={L}: the model has layers 0..{source.n_layers - 1}")
    site = f"blocks.{L}.resid_post"
    if sae is None:
        sae = steering_sae(source, request, site, cfg.sae_expansion, cfg.sae_steps, cfg.sae_l1,
                           cfg.seed)
    sae, scale = sae if isinstance(sae, tuple) else (sae, 1.0)
    return sae, site, scale


def _check_paraphrase(request: ForgetRequest, cfg: AttackConfig) -> None:
    if "paraphrase" in cfg.attacks and not len(request.paraphrase):
        raise ValueError("the paraphrase attack needs request.paraphrase facts; drop it from "
                         "attacks or give never-trained phrasings of the forget facts")


def run_attacks(models: dict[str, ModelHandle], request: ForgetRequest,
                cfg: AttackConfig = AttackConfig(), *, sae_source: ModelHandle | None = None,
                sae=None, log=None) -> dict[str, AttackCurves]:
    """Run every attack of ``cfg`` once, at its configured setting, with identical settings on
    each model (no grid: see :func:`run_grid`).

    Returns ``{attack: AttackCurves}`` (one :class:`Curve` per model label).
    ``sae_source`` is the model whose activations define the SAE and the forget latents
    (the original, unedited model); ``sae`` may be given instead of training one."""
    _check_paraphrase(request, cfg)
    kit = None
    if "sae" in cfg.attacks:
        kit = steering_kit(sae_source or next(iter(models.values())), request, cfg, sae)
    out: dict[str, AttackCurves] = {}
    for name in cfg.attacks:
        if log:
            log(f"attack: {name}")
        out[name] = AttackCurves({label: RUNNERS[name](model, request, cfg, kit)
                                  for label, model in models.items()})
    return out


def run_grid(models: dict[str, ModelHandle], request: ForgetRequest,
             cfg: AttackConfig = AttackConfig(), *, sae_source: ModelHandle | None = None,
             sae=None, kit=None, reference: str | None = None,
             log=None, runners: Mapping[str, Callable[..., Curve]] | None = None
             ) -> dict[str, AttackGrid]:
    """Run every attack of ``cfg`` over its grid (:meth:`AttackConfig.settings`: learning rates
    x seeds of ``cfg.grid``), every setting identically on each model.

    Returns ``{attack: AttackGrid}``. ``reference``: the label of the unedited model, whose
    curves flag the settings that wreck it (:func:`wrecks`); flagged settings stay in the grid.
    ``kit``: a ready ``steering_kit`` (else one is built from ``sae`` / ``sae_source``).
    ``runners``: the attacks by name (default :data:`RUNNERS`)."""
    if runners is None:
        runners = RUNNERS
        _check_paraphrase(request, cfg)
    if kit is None and "sae" in cfg.attacks:
        kit = steering_kit(sae_source or next(iter(models.values())), request, cfg, sae)
    grid = {name: cfg.settings(name) for name in cfg.attacks}
    tasks = [(name, i, label) for name, settings in grid.items()
             for i in range(len(settings)) for label in models]

    def run(task: tuple[str, int, str], state: tuple) -> Curve:
        name, i, label = task
        ms, kit_ = state
        c = grid[name][i]
        if log and label == next(iter(models)):
            lr = getattr(c, LR_FIELDS[name]) if name in LR_FIELDS else None
            log(f"attack: {name}" + (f" lr {lr:g}" if lr is not None else "")
                + (f" seed {c.seed}" if lr is not None or len(grid[name]) > 1 else ""))
        return runners[name](ms[label], request, c, kit_)

    def private(state: tuple) -> tuple:  # a worker's own models and SAE kit
        ms, kit_ = state
        return {k: m.clone() for k, m in ms.items()}, copy.deepcopy(kit_)

    curves = dict(zip(tasks, in_workers(tasks, run, grid_workers(models, cfg, len(tasks)),
                                        (dict(models), kit), private)))
    out: dict[str, AttackGrid] = {}
    for name, settings in grid.items():
        points = []
        for i, c in enumerate(settings):
            lr = getattr(c, LR_FIELDS[name]) if name in LR_FIELDS else None
            seed = c.seed if lr is not None or len(settings) > 1 else None
            points.append(GridPoint(lr, seed, AttackCurves(
                {label: curves[name, i, label] for label in models})))
        out[name] = AttackGrid(tuple(points), LR_FIELDS.get(name))
    return flag(out, reference, cfg.flag_drop) if reference in next(
        iter(out.values())).labels else out


def grid_workers(models: Mapping[str, ModelHandle], cfg: AttackConfig, n_tasks: int) -> int:
    """How many settings :func:`run_grid` runs at once: ``cfg.workers``, else one per torch
    thread where every model is on the CPU and takes the fused engine, else 1 (at most one per
    task)."""
    if cfg.workers is not None:
        w = cfg.workers
    elif cfg.engine == "fused" and all(
            m.device.type == "cpu" and fused_forward(m) is not None for m in models.values()):
        w = torch.get_num_threads()
    else:
        w = 1
    return max(1, min(w, n_tasks))


def in_workers(tasks: Sequence, fn: Callable[[object, object], object], workers: int,
               state: object, private: Callable[[object], object]) -> list:
    """``[fn(task, state) for task in tasks]``, ``workers`` tasks at a time. With more than one
    worker, each worker gets its own ``private(state)`` (copies of the models and of anything a
    task might write to, such as an SAE's normalisation buffers) and runs in a thread of this
    process at (torch threads // workers) intra-op threads, under
    :func:`excise.train.deterministic` entered once here (the tasks' own training loops then
    rewrite that global setting with the same values). A worker's copy serves the tasks it
    runs one after another, so ``fn`` must leave it as it found it (the attacks train clones).
    Results come back in task order and depend on each task's inputs and that thread count
    only, never on the order tasks finish. The first failure (in task order among those that
    failed by then) is raised as soon as any task fails; tasks not yet started are cancelled,
    running ones finish first."""
    if workers <= 1:
        return [fn(t, state) for t in tasks]
    from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
    from queue import SimpleQueue

    from excise.train import deterministic, using_threads

    per_job = max(1, torch.get_num_threads() // workers)
    copies: SimpleQueue = SimpleQueue()
    for _ in range(workers):
        copies.put(private(state))

    def one(task):
        mine = copies.get()
        try:
            return fn(task, mine)
        finally:
            copies.put(mine)

    with using_threads(per_job), deterministic():
        pool = ThreadPoolExecutor(workers, thread_name_prefix="excise-attack")
        try:
            futures = [pool.submit(one, t) for t in tasks]
            wait(futures, return_when=FIRST_EXCEPTION)
            failed = [f for f in futures if f.done() and not f.cancelled() and f.exception()]
            if failed:
                raise failed[0].exception()
            return [f.result() for f in futures]
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


def wrecks(attack: str, curve: Curve, drop: float) -> bool:
    """Whether a setting wrecks the unedited model ``curve`` was measured on: its recall under
    the attack falls more than ``drop`` below its value without the attack. Without the attack:
    the first budget (fine-tuning and steering attacks: step 0; quantization: fp32); for probe
    re-fitting, the last depth read by the model's own readout (the logit lens, ``aux``),
    against the re-fitted readout there. Paraphrases and logit-lens reads are not an attack
    setting: never flagged."""
    if attack in ("paraphrase", "lens"):
        return False
    if attack == "refit":
        return curve.y[-1] < curve.aux["logit lens"][-1] - drop
    return min(curve.y[1:], default=curve.y[0]) < curve.y[0] - drop


def flag(grids: dict[str, AttackGrid], reference: str, drop: float) -> dict[str, AttackGrid]:
    """The grids with every setting flagged where it wrecks the ``reference`` model."""
    return {name: dataclasses.replace(g, points=tuple(
        dataclasses.replace(p, flagged=wrecks(name, p.curves.curves[reference], drop))
        for p in g.points)) for name, g in grids.items()}


def merge_grids(parts: dict[str, dict[str, AttackGrid]]) -> dict[str, AttackGrid]:
    """Grids run one model at a time (``{label: {attack: grid}}``, each with one curve per
    setting, labelled ``"_"``) as one grid per attack with every model's curve per setting.
    Refuses parts whose settings differ."""
    labels = list(parts)
    first = parts[labels[0]]
    out = {}
    for name, g in first.items():
        points = []
        for i, p in enumerate(g.points):
            curves = {}
            for lab in labels:
                q = parts[lab][name].points[i]
                if (q.lr, q.seed) != (p.lr, p.seed):
                    raise ValueError(f"attack {name}: setting {i} is lr {q.lr} seed {q.seed} "
                                     f"for {lab!r} but lr {p.lr} seed {p.seed} for "
                                     f"{labels[0]!r}; every model runs the same grid")
                curves[lab] = next(iter(q.curves.curves.values()))
            points.append(GridPoint(p.lr, p.seed, AttackCurves(curves)))
        out[name] = AttackGrid(tuple(points), g.param)
    return out


def peak_recovery(curve: Sequence[float], skip_first: bool = False) -> float:
    ys = list(curve)[1:] if skip_first and len(curve) > 1 else list(curve)
    return max(ys)
