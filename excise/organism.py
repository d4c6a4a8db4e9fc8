"""The model organism: a small HookedTransformer trained on a synthetic world, with ground truth.

``organism("small")`` generates the world, builds the tokenizer, and trains (or loads from the
cache) a model that memorizes every trained person's facts. ``org.oracle(request)`` trains the
*retrain oracle*: the same recipe and seed with the forget people's facts removed - the model that
never saw the data. Both are cached under ``~/.cache/excise`` (``EXCISE_CACHE`` overrides) as
safetensors + JSON, keyed by a hash of everything that determines the weights.

Training is bit-reproducible for a given torch version: it runs at :data:`TRAIN_THREADS` torch
threads with deterministic algorithms (:func:`excise.train.reproducible`), whatever the caller's
thread setting (restored afterwards), and the cache key records the torch version and the thread
count. The JSON records the sha256 of the weights file; a cached file that fails it (a flipped
byte, a cut copy) or cannot be read is named in a :class:`~excise.io.CacheWarning` and retrained,
never used. Training and writing one cache entry holds a file lock (``<entry>.lock``): a second
process asking for the same model waits, then loads what the first one wrote.

``organism("small", planted=True)`` is the *planted-location* organism, the ground truth for
``locate``: trained with gradient routing (Cloud et al. 2024, "Gradient Routing"; selective
gradient masking, SGTM 2025), so that the facts of two designated groups of people (``reported``
and ``validation``) live in a known set of MLP neurons, ``org.planted.units`` (see
:class:`Planting`). ``org.oracle(request, train_seed=1)``: a second retrain oracle (another
initialisation and batch order, the same world).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import torch

from excise.checks import check_choice
from excise.fused import ENGINES, fused_forward, fused_loss
from excise.handle import Batch, TLHandle
from excise.io import (CacheWarning, atomic_write_text, read_cache_entry,
                       file_lock, file_sha256, save_safetensors)
from excise.placement import resolve_device, resolve_dtype
from excise.options import dataclass_option
from excise.request import FactSet, ForgetRequest
from excise.sites import Selection, Unit, layer_of
from excise.train import Optim, Sampler, reproducible, train, warmup_decay
from excise.world import Canaries, World, Tokenizer, check_attributes, make_world


@dataclass(frozen=True)
class Preset:
    name: str
    n_people: int
    n_holdout: int
    n_layers: int
    d_model: int
    n_heads: int
    d_mlp: int
    steps: int
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.01
    n_filler: int = 200
    shared_repeat: int = 4  # shared (city -> country) facts are repeated to weigh like general text
    seed: int = 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


PRESETS: dict[str, Preset] = {
    "tiny": Preset("tiny", n_people=24, n_holdout=8, n_layers=2, d_model=64, n_heads=4, d_mlp=256,
                   steps=500, batch_size=64, lr=3e-3, n_filler=60),
    "small": Preset("small", n_people=200, n_holdout=20, n_layers=4, d_model=256, n_heads=8,
                    d_mlp=512, steps=1000, batch_size=64, lr=2e-3),
    "medium": Preset("medium", n_people=500, n_holdout=50, n_layers=6, d_model=384, n_heads=8,
                     d_mlp=1536, steps=4000, batch_size=128, lr=6e-4),
}


# -- the planted-location organism -------------------------------------------------------------
# The designated people of each preset: (reported, validation). small's are the project's
# default forget people (0..9) and its validation people (150..159).
PLANTED_GROUPS: dict[str, tuple[range, range]] = {
    "tiny": (range(0, 4), range(16, 20)),
    "small": (range(0, 10), range(150, 160)),
    "medium": (range(0, 10), range(150, 160)),
}
GROUPS = ("reported", "validation")


def _people_tuple(name: str, value) -> tuple[int, ...] | None:
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise ValueError(f"Planting.{name}={value!r}: give a list of person indices, e.g. "
                         f"[0, 1, 2], or None for the preset's default")
    out = []
    for i in value:
        if isinstance(i, bool) or not isinstance(i, int) or i < 0:
            raise ValueError(f"Planting.{name}: {i!r} is not a person index (an integer >= 0)")
        out.append(i)
    if not out:
        raise ValueError(f"Planting.{name} is empty: name at least one trained person, or None "
                         f"for the preset's default")
    return tuple(sorted(set(out)))


# Each preset's default training settings of a Planting (the fields left None): chosen on the
# validation people only (see docs/results.md, "Planted organism"). ``fraction``: of the MLP
# neurons planted; ``repeat``: how often each designated fact appears in the training texts (the
# planted units learn from far fewer examples than the whole model does); ``quiet``: the share
# of the other rows in each batch that also train the planted units to stay silent on them;
# ``steps``: a multiplier on the preset's training steps.
PLANTED_DEFAULTS: dict[str, dict[str, float]] = {
    "tiny": {"fraction": 0.2, "repeat": 3, "steps": 1.0, "quiet": 1.0},
    "small": {"fraction": 0.1, "repeat": 3, "steps": 1.0, "quiet": 1.0},
    "medium": {"fraction": 0.05, "repeat": 3, "steps": 1.0, "quiet": 1.0},
}
_FALLBACK = {"fraction": 0.1, "repeat": 3, "steps": 1.0, "quiet": 1.0}


def _number(name: str, value, low: float, high: float, integer: bool = False):
    if value is None:
        return None
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or not low <= value <= high:
        what = "an integer" if integer else "a number"
        raise ValueError(f"Planting.{name}={value!r}: must be {what} in [{low:g}, {high:g}] "
                         f"(or None for the preset's default)")
    return value if integer else float(value)


@dataclass(frozen=True)
class Planting:
    """How the planted-location organism is trained (gradient routing).

    The planted units are ``fraction`` of the MLP neurons, spread evenly over the layers (which
    neurons within a layer: a seeded random choice, ``seed``), plus ``heads`` attention heads
    (default none: the facts are looked up and written by MLP neurons; the heads that move a
    name to the answer position are trained on every other person with the same templates).
    In every training step the facts of the designated people - ``reported`` and
    ``validation`` (None: the preset's :data:`PLANTED_GROUPS`) - update only the planted units'
    parameters (their gradients are masked everywhere else, embeddings and norms included),
    while all other data (the other people, shared facts, filler text) updates every parameter
    except the planted units', with the planted units ablated (:func:`routed_loss`).
    ``validation`` is for choosing settings, ``reported`` for reporting.

    Training settings (None: the preset's :data:`PLANTED_DEFAULTS`): ``repeat`` (each
    designated fact appears that many times in the training texts), ``quiet`` (the share of the
    other rows of a batch on which the planted units learn to stay silent), ``steps`` (a
    multiplier on the preset's steps).

    ``match_norms`` (default on): before every step (and after the last) each planted neuron's
    ``W_in`` column and ``W_out`` row are rescaled to the norms of a twin - a non-planted neuron
    of the same layer, a seeded pairing (:func:`norm_twins`) - so the planted neurons' weight
    norms are a sample of the other neurons' and no weight-scaled statistic can find them by
    their norms alone. Without it, on ``tiny``, ranking the neurons by ``|W_in col| x |W_out
    row|`` - no data at all - found 0.80 of the planted ones at k = their count (random 0.20),
    and ``activations`` (activation x output-weight norm) read 0.70; with it the norm ranking
    reads 0.17 (AUROC 0.49) and ``activations`` 0.45."""

    fraction: float | None = None
    heads: int = 0
    reported: tuple[int, ...] | None = None
    validation: tuple[int, ...] | None = None
    seed: int = 0
    repeat: int | None = None
    steps: float | None = None
    quiet: float | None = None
    match_norms: bool = True

    def __post_init__(self):
        f = self.fraction
        if f is not None and (isinstance(f, bool) or not isinstance(f, (int, float))
                              or not 0 < f <= 0.5):
            raise ValueError(f"Planting.fraction={f!r}: the fraction of MLP neurons to plant "
                             f"must be a number in (0, 0.5], e.g. 0.01 (or None for the "
                             f"preset's default)")
        if f is not None:
            object.__setattr__(self, "fraction", float(f))
        object.__setattr__(self, "repeat", _number("repeat", self.repeat, 1, 100, integer=True))
        object.__setattr__(self, "steps", _number("steps", self.steps, 0.1, 20))
        object.__setattr__(self, "quiet", _number("quiet", self.quiet, 0, 1))
        if isinstance(self.heads, bool) or not isinstance(self.heads, int) or self.heads < 0:
            raise ValueError(f"Planting.heads={self.heads!r}: a number of attention heads, an "
                             f"integer >= 0")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"Planting.seed={self.seed!r}: must be an integer")
        if not isinstance(self.match_norms, bool):
            raise ValueError(f"Planting.match_norms={self.match_norms!r}: must be true or false")
        for name in GROUPS:
            object.__setattr__(self, name, _people_tuple(name, getattr(self, name)))
        both = sorted(set(self.reported or ()) & set(self.validation or ()))
        if both:
            raise ValueError(f"Planting: people {both[:5]} are in both reported and validation; "
                             f"the two groups must be disjoint")

    @classmethod
    def of(cls, value) -> "Planting | None":
        """``None`` / ``False`` -> None, ``True`` -> the defaults, a Planting as is, a mapping
        of its fields -> a Planting (unknown keys refused, naming the valid ones)."""
        return dataclass_option(cls, value, "planted", "the preset's defaults")

    def resolve(self, preset: Preset, world: World) -> "Planting":
        """The groups filled in from :data:`PLANTED_GROUPS` and checked against the world; the
        training settings left None from :data:`PLANTED_DEFAULTS` (another preset: the
        fallback ``fraction=0.1, repeat=3, steps=1, quiet=1``)."""
        default = PLANTED_GROUPS.get(preset.name)
        groups = {}
        for k, name in enumerate(GROUPS):
            people = getattr(self, name)
            if people is None:
                if default is None:
                    raise ValueError(f"Planting.{name}: preset {preset.name!r} has no default "
                                     f"designated people; name them (e.g. {name}=[0, 1, 2])")
                people = tuple(default[k])
            groups[name] = tuple(world.check_people(f"Planting.{name}", people))
        settings = PLANTED_DEFAULTS.get(preset.name, _FALLBACK)
        groups |= {k: v for k, v in settings.items() if getattr(self, k) is None}
        out = dataclasses.replace(self, **groups)
        if len(out.people) == len(world.trained_people):
            raise ValueError("Planting: every trained person is designated; leave some people "
                             "to train the rest of the model")
        return out

    @property
    def people(self) -> tuple[int, ...]:
        """Every designated person (both groups)."""
        return tuple(sorted((self.reported or ()) + (self.validation or ())))

    def to_dict(self) -> dict:
        d = {k: (list(v) if isinstance(v, tuple) else v)
             for k, v in dataclasses.asdict(self).items()}
        if not self.match_norms:  # as before the option existed: those cache keys stay
            d.pop("match_norms")
        return d


@dataclass(frozen=True)
class Planted:
    """Where a planted organism keeps its designated people's facts: ``units`` (MLP neurons
    ``blocks.L.mlp.post[i]``, heads ``blocks.L.attn.z[h]``), ``groups`` (``reported`` /
    ``validation`` -> people), ``fraction`` (of the MLP neurons planted), ``n_params`` (fraction
    of the model's parameters those units own) and the resolved :class:`Planting`."""

    planting: Planting
    units: Selection
    n_params: float
    fraction: float

    @property
    def groups(self) -> dict[str, tuple[int, ...]]:
        return {name: getattr(self.planting, name) for name in GROUPS}

    @property
    def people(self) -> tuple[int, ...]:
        return self.planting.people

    def neurons(self) -> Selection:
        """The planted MLP neurons (without heads)."""
        return Selection(tuple(u for u in self.units if u.site.endswith(".mlp.post")),
                         source=f"{self.units.source}[neurons]")

    def masks(self, model: TLHandle) -> dict[str, torch.Tensor]:
        """Parameter name -> bool mask of the elements the planted units own."""
        return unit_masks(model, self.units)

    def ablation(self, means: Mapping[str, torch.Tensor] | None = None) -> dict[str, Callable]:
        """Hooks (for ``model.hooks(...)``, ``probes.recall(..., hooks=...)``) that ablate the
        planted units: set their activations to zero, or to ``means[site]`` (a vector over the
        site's units, e.g. their mean activation on retain data)."""
        def make(site: str, idx: list[int]):
            def hook(x, _site):
                x = x.clone()
                x[:, :, idx] = 0.0 if means is None else means[site][idx].to(x.dtype)
                return x
            return hook

        return {site: make(site, [i[0] for i in idx])
                for site, idx in self.units.by_site().items()}

    def to_dict(self) -> dict:
        return {"planting": self.planting.to_dict(), "units": self.units.to_list(),
                "groups": {k: list(v) for k, v in self.groups.items()},
                "fraction": self.fraction, "n_params": self.n_params}


def unit_masks(model: TLHandle, units: Selection) -> dict[str, torch.Tensor]:
    """Parameter name -> bool mask of the elements ``units`` own (a neuron: its ``W_in``
    column, ``b_in`` entry and ``W_out`` row; a head: its slices of ``W_Q/K/V/O`` and
    ``b_Q/K/V``), from the handle's ``unit_axis``."""
    by_site = units.by_site()
    out = {}
    for name, p in model.named_parameters().items():
        owner = model.unit_axis(name)
        if owner is None or owner[0] not in by_site:
            continue
        m = torch.zeros(p.shape, dtype=torch.bool, device=p.device)
        m.index_fill_(owner[1], torch.tensor([i[0] for i in by_site[owner[0]]], device=p.device),
                      True)
        out[name] = m
    return out


def planted_units(preset: Preset, planting: Planting) -> Selection:
    """The units a planting routes into: ``round(fraction x n_layers x d_mlp)`` neurons (at
    least one) in as even shares per layer as the count allows (the layers that get one more:
    a seeded choice), the neurons within a layer a seeded random choice; ``heads`` heads the
    same way."""
    rng = random.Random(planting.seed)
    L = preset.n_layers
    units: list[Unit] = []
    for site, width, n in (("mlp.post", preset.d_mlp,
                            max(1, round(planting.fraction * L * preset.d_mlp))),
                           ("attn.z", preset.n_heads, planting.heads)):
        if n > L * width:
            raise ValueError(f"Planting: {n} units asked at {site}, but the {preset.name!r} "
                             f"preset has {L} x {width}")
        extra = set(rng.sample(range(L), n % L))
        for layer in range(L):
            for i in sorted(rng.sample(range(width), n // L + (layer in extra))):
                units.append(Unit(f"blocks.{layer}.{site}", (i,)))
    units.sort(key=lambda u: (layer_of(u.site), u.site.endswith("attn.z"), u.index))
    return Selection(tuple(units), source=f"planted(fraction={planting.fraction}, "
                                          f"heads={planting.heads}, seed={planting.seed})")


def norm_twins(planted: Planted, d_mlp: int) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Layer -> ``(planted neurons, their twins)``: each planted MLP neuron paired with a
    distinct non-planted neuron of its layer, a seeded random choice (``Planting.seed``)."""
    rng = random.Random(f"norm-twins-{planted.planting.seed}")
    out = {}
    for site, idx in planted.neurons().by_site().items():
        mine = sorted(i[0] for i in idx)
        others = sorted(set(range(d_mlp)) - set(mine))
        if len(others) < len(mine):
            raise ValueError(f"Planting.match_norms: {len(mine)} planted neurons at {site} but "
                             f"only {len(others)} others to take norms from")
        out[layer_of(site)] = (torch.tensor(mine), torch.tensor(rng.sample(others, len(mine))))
    return out


@torch.no_grad()
def match_norms(model: TLHandle, twins: Mapping[int, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Rescale each planted neuron's ``W_in`` column and ``W_out`` row, in place, to its twin's
    norms (:func:`norm_twins`)."""
    for layer, (mine, twin) in twins.items():
        w_in = model.parameter(f"blocks.{layer}.mlp.W_in")    # [d_model, d_mlp]
        w_out = model.parameter(f"blocks.{layer}.mlp.W_out")  # [d_mlp, d_model]
        w_in[:, mine] *= w_in[:, twin].norm(dim=0) / w_in[:, mine].norm(dim=0).clamp(min=1e-12)
        w_out[mine] *= (w_out[twin].norm(dim=1)
                        / w_out[mine].norm(dim=1).clamp(min=1e-12))[:, None]


def make_planted(preset: Preset, world: World, planting: Planting, model: TLHandle) -> Planted:
    """The resolved planting, its units, and the share of ``model``'s parameters they own."""
    planting = planting.resolve(preset, world)
    units = planted_units(preset, planting)
    owned = sum(int(m.sum()) for m in unit_masks(model, units).values())
    n_neurons = sum(1 for u in units if u.site.endswith(".mlp.post"))
    return Planted(planting, units, n_params=owned / model.n_parameters(),
                   fraction=n_neurons / (preset.n_layers * preset.d_mlp))


# torch threads every organism and oracle trains at (reproducible(): the cache key records it).
# Two, with deterministic algorithms: three trainings of `tiny` gave one fingerprint (without
# deterministic algorithms, three), in 16-23 s against 26-27 s for one thread on an idle 2-core
# machine; on a machine whose cores are busy with other work two threads wait on each other
# (100-340 s against 31-85 s measured) - the price of the same bits everywhere.
TRAIN_THREADS = 2
# 2: torch version + thread count in the key, sha256 of the weights; 3: the plain recipe trains
# through the fused forward and AdamW's fused kernel (train_model's engine)
CACHE_VERSION = 3


def cache_dir() -> Path:
    root = os.environ.get("EXCISE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                          "excise")
    p = Path(root)
    p.mkdir(parents=True, exist_ok=True)
    return p


def build_model(preset: Preset, vocab_size: int, n_ctx: int):
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(
        n_layers=preset.n_layers, d_model=preset.d_model, n_heads=preset.n_heads,
        d_head=preset.d_model // preset.n_heads, d_mlp=preset.d_mlp, d_vocab=vocab_size,
        n_ctx=n_ctx, act_fn="gelu", normalization_type="LN", seed=preset.seed,
        default_prepend_bos=False, device="cpu",
    )
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        model = HookedTransformer(cfg)
    return model


def training_texts(preset: Preset, world: World, exclude_people: frozenset[int] = frozenset(),
                   *, planted: Planted | None = None) -> list[str]:
    """The rows the organism's sampler walks through in shuffled epochs, in order (what
    :func:`train_model` encodes): the world's training texts without ``exclude_people``, the
    shared facts repeated to ``preset.shared_repeat`` copies, a planted organism's designated
    facts repeated to ``repeat`` copies. Canaries are not among them: :func:`canary_stream`
    inserts them into the batches."""
    texts = world.training_texts(exclude_people)
    shared = [f.text for f in world.shared_facts()] * (preset.shared_repeat - 1)
    texts = texts + shared
    if planted is not None:
        designated = {f.text for i in planted.people if i not in exclude_people
                      for f in world.facts(i, trained=True)}
        texts = texts + [t for t in texts if t in designated] * (planted.planting.repeat - 1)
    return texts


def canary_stream(canaries: Canaries, world: World, steps: int,
                  seed: int) -> tuple[list[str], list[list[int]]]:
    """Where the canaries enter training: ``(texts, per_step)`` - every trained canary's text
    once, and for each of the ``steps`` training steps the indices (into ``texts``) of the
    canaries added to that step's batch. A canary of count ``c`` is in exactly ``c`` of the
    batches' rows over the whole run (an exposure count, not a number of copies in data that
    is walked through for many epochs): all occurrences, shuffled (seeded by ``seed`` and
    ``canaries.seed``, a generator of their own - the other rows' batches are the plain
    organism's), are spread evenly over the steps."""
    groups = [(c, f.text) for c, group in canaries.facts(world).items() if c for f in group]
    texts = [t for _, t in groups]
    occurrences = [i for i, (c, _) in enumerate(groups) for _ in range(c)]
    random.Random(f"canary-stream-{seed}-{canaries.seed}").shuffle(occurrences)
    per_step: list[list[int]] = [[] for _ in range(steps)]
    for k, i in enumerate(occurrences):
        per_step[k * steps // len(occurrences)].append(i)
    return texts, per_step


def train_model(preset: Preset, world: World, tokenizer: Tokenizer,
                exclude_people: frozenset[int] = frozenset(), progress: bool = True,
                desc: str = "train", *, planted: Planted | None = None,
                train_seed: int | None = None, canaries: Canaries | None = None,
                engine: str | None = None):
    """Train a fresh model on the world (minus ``exclude_people``). Bit-reproducible given the
    preset's seed and the torch version: it trains at :data:`TRAIN_THREADS` threads with
    deterministic algorithms, whatever the caller's setting (restored afterwards).

    The recipe: AdamW (betas 0.9 / 0.98, the preset's lr and weight decay), linear warm-up over
    the first 5% of the steps then linear decay to 5% of the lr, gradient norm clipped at 1,
    batches walking through shuffled epochs of the training texts. ``train_seed`` (default: the
    preset's seed) seeds the initialisation and the batch order; the world stays the preset's.
    ``planted``: the same recipe with gradient routing (:class:`Planting`, :func:`routed_loss`).
    ``canaries``: the same recipe and batches with canary sequences added to them
    (:func:`canary_stream`: each trained canary in exactly ``count`` batch rows).
    ``engine``: how the steps are computed. ``None`` (every cached model): the recipe's own -
    "fused" for the plain recipe, "serial" for the planted and canary ones. "fused": the
    forward of :mod:`excise.fused` and AdamW's fused kernel (:class:`Optim` ``fused``); "serial":
    the handle's TransformerLens forward and AdamW's loop - the organism's recipe up to cache
    version 2, kept to measure what the fused steps save (``bench/bench_train.py``: about 2x on
    ``small``) and as the planted and canary recipes (the routed loss masks gradients per
    element through the handle). The two agree to float precision, not bit for bit: a model
    trained one way differs from the other in its last bits, then in what those bits grew
    into, so each way is its own model (trained facts, holdout and phrasing recall compared in
    ``docs/results.md``, "Organism training")."""
    if engine is None:
        engine = "fused" if planted is None and canaries is None else "serial"
    check_choice("train_model", "engine", engine, ENGINES)
    if engine != "serial" and (planted is not None or canaries is not None):
        raise ValueError(f"train_model: engine={engine!r} trains the plain recipe only; the "
                         f"planted and canary recipes train through engine='serial'")
    seed = preset.seed if train_seed is None else train_seed
    texts = training_texts(preset, world, exclude_people, planted=planted)
    steps = preset.steps
    if planted is not None:
        designated = {f.text for i in planted.people if i not in exclude_people
                      for f in world.facts(i, trained=True)}
        routed = torch.tensor([t in designated for t in texts])
        steps = round(steps * planted.planting.steps)
    with reproducible(TRAIN_THREADS):
        model = build_model(dataclasses.replace(preset, seed=seed), len(tokenizer), n_ctx=32)
        handle = TLHandle(model, tokenizer, name=f"organism-{preset.name}")
        extra, per_step = [], []
        if canaries is not None:  # rows after the texts, drawn per step, never by the sampler
            extra, per_step = canary_stream(canaries, world, steps, seed)
        data = handle.encode_texts(texts + extra)
        batches = Sampler(seed).epochs(len(texts), preset.batch_size)
        if canaries is not None:
            def loss_fn(step: int) -> torch.Tensor:
                rows = torch.cat([next(batches),
                                  len(texts) + torch.tensor(per_step[step], dtype=torch.long)])
                return handle.loss(data[rows].trim())
        elif planted is None and engine == "fused":
            fwd, params = fused_forward(handle, data[:8].trim().tokens), handle.named_parameters()
            if fwd is None:
                raise RuntimeError("train_model: the fused forward does not reproduce this model")
            loss_fn = lambda _: fused_loss(fwd, params, data[next(batches)])  # noqa: E731
        elif planted is None:
            loss_fn = lambda _: handle.loss(data[next(batches)].trim())  # noqa: E731
        else:
            loss = routed_loss(handle, planted)
            twins = norm_twins(planted, preset.d_mlp) if planted.planting.match_norms else {}

            def loss_fn(_step: int) -> torch.Tensor:
                match_norms(handle, twins)  # the last step's update projected back
                rows = next(batches)
                return loss(data[rows], routed[rows])
        model.train()
        train(loss_fn, dict(model.named_parameters()), steps=steps,
              optim=Optim("adamw", lr=preset.lr, betas=(0.9, 0.98),
                          weight_decay=preset.weight_decay, fused=engine == "fused"),
              schedule=warmup_decay(steps),
              max_grad_norm=1.0, progress=progress, desc=desc)
        if planted is not None and planted.planting.match_norms:
            match_norms(handle, twins)  # the last step's update too
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    return handle


def routed_loss(model: TLHandle, planted: Planted
                ) -> Callable[[Batch, torch.Tensor], torch.Tensor]:
    """Gradient routing as one loss and one backward pass: ``loss(batch, routed)``, ``routed``
    marking the rows that hold designated people's facts. Three terms, summed over target
    tokens and divided by the batch's target-token count:

    - **designated**: the routed rows' negative log-likelihood through the whole model, every
      weight outside the planted units detached - their gradient reaches the planted units'
      parameters only;
    - **everyone else**: the other rows' negative log-likelihood with the planted units
      zero-ablated (:meth:`Planted.ablation`) and their parameters detached - the gradient
      reaches every other parameter, and the rest of the model learns everyone else without
      the planted units (ablating them later leaves everyone else as trained);
    - **quiet**: on the first ``Planting.quiet`` share of the other rows, KL(ablated model ||
      whole model), the ablated model's distribution a fixed target, every weight outside the
      planted units
      detached - the planted units learn to leave everyone else's predictions as the model
      without them makes them. (A KL to the ablated model, not the other rows' likelihood: the
      planted units cannot learn to help anyone else, only to stay out of the way.)

    Why not the plain forward for the other rows (the planted units present, only their
    gradients masked, as in selective gradient masking): the rest of the model then both leans
    on the planted units and learns to cancel their output - measured on ``tiny`` with 10% of
    the neurons planted, the designated recall stayed at 0.15 and ablating the units took
    everyone's recall from 1.0 to 0.0. Without the quiet term the planted units fire on
    everyone (the whole model's recall of the other people fell to 0.54)."""
    from torch.func import functional_call

    module = model.model
    masks = planted.masks(model)
    ablate = planted.ablation()

    def weights(inside: bool) -> dict[str, torch.Tensor]:
        """The same values; only which elements pass gradients differs."""
        out = {}
        for name, p in module.named_parameters():
            m = masks.get(name)
            if m is None:
                out[name] = p.detach() if inside else p
            else:
                out[name] = torch.where(m, p, p.detach()) if inside else \
                    torch.where(m, p.detach(), p)
        return out

    def logprobs(batch: Batch, inside: bool) -> torch.Tensor:
        """``[n, T-1, vocab]`` next-token log-probabilities: the whole model with gradients
        for the planted units only (``inside``), or the model without the planted units with
        gradients for everything else."""
        args = (module, weights(inside), (batch.tokens,), {"return_type": "logits"})
        if inside:
            logits = functional_call(*args)
        else:
            with model.hooks(ablate):
                logits = functional_call(*args)
        return torch.log_softmax(logits[:, :-1].float(), -1)

    def nll_sum(lp: torch.Tensor, batch: Batch) -> torch.Tensor:
        lp = lp.gather(-1, batch.tokens[:, 1:, None]).squeeze(-1)
        return -(lp * batch.target_mask[:, 1:]).sum()

    def loss(batch: Batch, routed: torch.Tensor) -> torch.Tensor:
        total = torch.zeros(())
        designated, others = batch[routed], batch[~routed]
        if len(designated):
            designated = designated.trim()
            total = total + nll_sum(logprobs(designated, True), designated)
        if len(others):
            others = others.trim()
            without = logprobs(others, False)
            total = total + nll_sum(without, others)
            quiet = others[:round(len(others) * planted.planting.quiet)]
            if len(quiet):
                ref = without[:len(quiet)].detach()
                kl = (ref.exp() * (ref - logprobs(quiet, True))).sum(-1)
                total = total + (kl * quiet.target_mask[:, 1:]).sum()
        return total / batch.target_mask[:, 1:].sum().clamp(min=1)

    return loss


class Organism:
    """A trained organism: ``model`` (a handle), ``world``, ``tokenizer``, splits, and oracles;
    ``planted`` (a :class:`Planted`, or None) where it was trained with gradient routing;
    ``canaries`` (a :class:`~excise.world.Canaries`, or None) where canary sequences were added
    to its training batches."""

    def __init__(self, preset: Preset, world: World, tokenizer: Tokenizer, model: TLHandle,
                 progress: bool = True, planted: Planted | None = None,
                 device: torch.device | None = None, dtype: torch.dtype | None = None,
                 canaries: Canaries | None = None):
        self.preset = preset
        self.world = world
        self.tokenizer = tokenizer
        self.model = model
        self.progress = progress
        self.planted = planted
        self.canaries = canaries
        # where the model and every oracle are placed once loaded (trained on the CPU in float32)
        self.device = device
        self.dtype = dtype

    @property
    def seed(self) -> int:
        """The seed of the world, the training and the first oracle (``preset.seed``)."""
        return self.preset.seed

    def __repr__(self) -> str:
        planted = "" if self.planted is None else \
            f", planted={len(self.planted.units)} units ({self.planted.n_params:.2%} of params)"
        if self.canaries is not None:
            planted += f", canaries={self.canaries.per_count} x {list(self.canaries.counts)}"
        return (f"Organism(preset={self.preset.name!r}, people={self.world.n_trained} trained + "
                f"{len(self.world.holdout_people)} holdout, params={self.model.n_parameters():,}"
                f"{planted})")

    def request(self, forget_people: Iterable[int], retain_people: Iterable[int] | None = None,
                holdout_people: Iterable[int] | None = None,
                neighbor_people: Iterable[int] | None = None,
                attributes: Sequence[str] | None = None) -> ForgetRequest:
        """A ForgetRequest: forget these people's trained facts, keep everyone else's.

        ``retain_people`` defaults to every other trained person; ``holdout_people`` to the
        world's never-trained people. Shared knowledge (city -> country) and general text are
        attached for utility metrics."""
        return organism_request(self.world, forget_people, retain_people, holdout_people,
                                neighbor_people, attributes)

    def oracle(self, request: ForgetRequest, train_seed: int | None = None) -> TLHandle:
        """The retrain oracle for ``request``: trained without the forget people's facts (for a
        planted organism: the same routed training). ``train_seed`` (default: the organism's
        seed) seeds another initialisation and batch order on the same world - a second oracle;
        each is cached on its own."""
        people = request.forget_people()
        if not people:
            raise ValueError("this request names no organism people to leave out; the retrain "
                             "oracle is only defined for requests built with org.request(...)")
        if train_seed is not None and (isinstance(train_seed, bool)
                                       or not isinstance(train_seed, int)):
            raise ValueError(f"train_seed={train_seed!r}: must be an integer (or None for the "
                             f"organism's seed, {self.preset.seed})")
        return _load_or_train(self.preset, self.world, self.tokenizer, frozenset(people),
                              self.progress, planted=self.planted, train_seed=train_seed,
                              canaries=self.canaries).to(self.device, self.dtype)

    def canary_facts(self) -> dict[int, list]:
        """``{count: [Fact]}``: the canaries trained ``count`` times, the never-seen ones under
        0 (:meth:`excise.world.Canaries.facts`). Refused for an organism without canaries."""
        if self.canaries is None:
            raise ValueError("this organism was trained without canaries; build it with "
                             "excise.organism(preset, canaries=True)")
        return self.canaries.facts(self.world)

    def without_canaries(self) -> TLHandle:
        """The canary control's oracle: the same recipe, seed and world without the canaries -
        the plain organism's model (the same cache entry)."""
        if self.canaries is None:
            raise ValueError("this organism was trained without canaries; its model is the "
                             "oracle of the canary control already")
        return _load_or_train(self.preset, self.world, self.tokenizer, frozenset(),
                              self.progress, planted=self.planted).to(self.device, self.dtype)


def organism_request(world: World, forget_people: Iterable[int],
                     retain_people: Iterable[int] | None = None,
                     holdout_people: Iterable[int] | None = None,
                     neighbor_people: Iterable[int] | None = None,
                     attributes: Sequence[str] | None = None) -> ForgetRequest:
    """A ForgetRequest from the organism's world: the forget people's trained facts, the retain
    people's (default: every other trained person), the never-trained holdout people asked in
    the forget set's phrasings, neighbors, paraphrases (held-out phrasings of the forget facts),
    shared city -> country facts and general text."""
    # people are integer indices the world has (world.check_people refuses 1.7, True, "12",
    # 999 - saying how many people there are); attributes a list of names, never a string
    forget = world.check_people("forget_people", forget_people)
    if not forget:
        raise ValueError("forget_people is empty: name at least one trained person to forget")
    retain = (sorted(set(world.trained_people) - set(forget)) if retain_people is None
              else world.check_people("retain_people", retain_people))
    both = sorted(set(forget) & set(retain))
    if both:
        raise ValueError(f"people {both[:5]} are in both forget_people and retain_people")
    holdout = (list(world.holdout_people) if holdout_people is None
               else world.check_people("holdout_people", holdout_people, "holdout"))
    attrs = check_attributes(attributes)
    neighbors = sorted(set(() if neighbor_people is None else
                           world.check_people("neighbor_people", neighbor_people))
                       - set(forget))

    def facts(people, trained_flag):
        return tuple(f for i in people for f in world.facts(i, trained=trained_flag)
                     if f.attribute in attrs)

    # holdout people were never trained: compare them with the same phrasings forget uses
    hold = tuple(f for i in holdout for f in world.facts(i)
                 if f.attribute in attrs and f.template != world.heldout_templates(i)[f.form])
    return ForgetRequest(
        forget=FactSet("forget", facts(forget, True)),
        retain=FactSet("retain", facts(retain, True)),
        holdout=FactSet("holdout", hold),
        neighbors=FactSet("neighbors", facts(neighbors, True)),
        paraphrase=FactSet("paraphrase", facts(forget, False)),
        shared=FactSet("shared", tuple(world.shared_facts())),
        general=tuple(world.filler_eval),
        retain_text=tuple(world.filler_train),
        meta={"forget_people": forget, "world": world.digest(), "attributes": list(attrs)},
    )


def _key(preset: Preset, world: World, exclude: frozenset[int],
         planted: Planted | None = None, train_seed: int | None = None,
         canaries: Canaries | None = None) -> str:
    blob = {"preset": preset.to_dict(), "world": world.digest(), "exclude": sorted(exclude),
            "torch": torch.__version__, "threads": TRAIN_THREADS, "version": CACHE_VERSION}
    # only where they differ from the plain recipe: the keys of plain models stay as they were
    if planted is not None:
        blob["planted"] = {"planting": planted.planting.to_dict(),
                           "units": planted.units.digest()}
    if train_seed is not None and train_seed != preset.seed:
        blob["train_seed"] = train_seed
    if canaries is not None:
        blob["canaries"] = canaries.to_dict()
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


def cache_files(preset: Preset, world: World, exclude: frozenset[int] = frozenset(),
                planted: Planted | None = None, train_seed: int | None = None,
                canaries: Canaries | None = None) -> tuple[Path, Path]:
    """``(weights, meta)``: where the model (``exclude`` empty) or the oracle without
    ``exclude`` is cached: ``<cache>/organism-<preset>/<kind>-<key>.safetensors|json``, kind
    ``model`` / ``oracle``, ``planted-model`` / ``planted-oracle`` for a planted organism,
    ``canaries-model`` / ``canaries-oracle`` for one trained with canaries."""
    key = _key(preset, world, exclude, planted, train_seed, canaries)
    kind = (("planted-" if planted is not None else "")
            + ("canaries-" if canaries is not None else "") + ("oracle" if exclude else "model"))
    folder = cache_dir() / f"organism-{preset.name}"
    return folder / f"{kind}-{key}.safetensors", folder / f"{kind}-{key}.json"


def _load_cached(preset: Preset, tokenizer: Tokenizer, weights: Path, meta: Path,
                 name: str) -> TLHandle | None:
    """The cached model, or ``None`` when there is none or it fails its checks (then a
    :class:`CacheWarning` names the file and why: it will be retrained)."""
    state, why = read_cache_entry(weights, meta)
    if state is None and why is None:
        return None
    if why is not None:
        warnings.warn(f"the cached {name} fails its check and is retrained: {why}",
                      CacheWarning, stacklevel=3)
        return None
    model = build_model(preset, len(tokenizer), n_ctx=32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    params = dict(model.named_parameters())
    if unexpected or any(k in params for k in missing):
        raise ValueError(f"cached weights {weights} do not fit this preset "
                         f"(missing {[k for k in missing if k in params][:3]}, "
                         f"unexpected {unexpected[:3]}); delete the file to retrain")
    model.eval()
    loaded = TLHandle(model, tokenizer, name=name)
    loaded.check_finite(f"loading {weights}")
    return loaded


def _load_or_train(preset: Preset, world: World, tokenizer: Tokenizer,
                   exclude: frozenset[int], progress: bool, *, planted: Planted | None = None,
                   train_seed: int | None = None,
                   canaries: Canaries | None = None) -> TLHandle:
    if train_seed == preset.seed:
        train_seed = None
    weights, meta = cache_files(preset, world, exclude, planted, train_seed, canaries)
    kind = (("planted " if planted is not None else "")
            + ("canaries " if canaries is not None else "") + ("oracle" if exclude else "model"))
    name = (f"organism-{preset.name}" + ("-planted" if planted is not None else "")
            + ("-canaries" if canaries is not None else "")
            + ("-oracle" if exclude else "")
            + (f"-seed{train_seed}" if train_seed is not None else ""))

    def waiting(lock: Path) -> None:
        if progress:
            print(f"excise: waiting for another process to finish {weights.name} ({lock})",
                  file=sys.stderr, flush=True)

    # one process trains and writes an entry; a second waits here, then loads its result
    with file_lock(weights.with_suffix(".lock"), on_wait=waiting):
        loaded = _load_cached(preset, tokenizer, weights, meta, name)
        if loaded is not None:
            return loaded
        t0 = time.time()
        handle = train_model(preset, world, tokenizer, exclude, progress,
                             desc=f"training {preset.name} {kind}", planted=planted,
                             train_seed=train_seed, canaries=canaries)
        handle.name = name
        handle.check_finite(f"training {preset.name} {kind}")  # a diverged run is never cached
        save_safetensors({k: v.detach() for k, v in handle.model.state_dict().items()
                          if k in dict(handle.model.named_parameters())}, weights)
        record = {"preset": preset.to_dict(), "world": world.digest(), "exclude": sorted(exclude),
                  "torch": torch.__version__, "threads": TRAIN_THREADS, "version": CACHE_VERSION}
        if train_seed is not None:
            record["train_seed"] = train_seed
        if planted is not None:
            record["planted"] = planted.to_dict()
        if canaries is not None:
            texts, per_step = canary_stream(canaries, world, preset.steps,
                                            preset.seed if train_seed is None else train_seed)
            record["canaries"] = canaries.to_dict() | {
                "exposures": sum(map(len, per_step)), "texts": len(texts)}
        # the JSON is written last, with the weights' checksum: it marks a finished entry
        atomic_write_text(meta, json.dumps(record | {
            "sha256": file_sha256(weights), "fingerprint": handle.fingerprint(),
            "train_seconds": round(time.time() - t0, 1)}, indent=2))
        return handle


def retrain_oracles(source, request: ForgetRequest, n: int, *, skip: Iterable[int] = (),
                    log: Callable[[str], None] | None = None) -> list:
    """``n`` retrain oracles of ``request`` on ``source`` (an :class:`Organism` or a
    :class:`~excise.finetuned.Finetuned`): the same recipe at training seeds ``source.seed``,
    ``+ 1``, ``+ 2``, ... leaving out the seeds in ``skip`` (e.g. one that trains a model the
    oracles judge); each trained once, then cached."""
    seeds, ts, skip = [source.seed], source.seed, set(skip)
    while len(seeds) < n:
        ts += 1
        if ts not in skip:
            seeds.append(ts)
    out = []
    for ts in seeds:
        if log is not None:
            log(f"seed {source.seed}: retrain oracle, training seed {ts}")
        out.append(source.oracle(request, train_seed=None if ts == source.seed else ts))
    return out


def oracle_or_oracles(source, request: ForgetRequest, n: int = 1):
    """What a verification is judged against: the retrain oracle of ``request`` (``n == 1``:
    one model, the verdict against it alone) or a list of ``n`` (:func:`retrain_oracles`: the
    most favourable verdict over them, ``probes.verify(oracle=[...])``)."""
    if not (isinstance(n, int) and not isinstance(n, bool) and n >= 1):
        raise ValueError(f"oracles={n!r}: need an integer >= 1")
    return source.oracle(request) if n == 1 else retrain_oracles(source, request, n)


def organism(preset: str | Preset = "small", seed: int | None = None,
             planted: "bool | Planting | Mapping | None" = None,
             progress: bool = True, device: "str | torch.device | None" = None,
             dtype: "str | torch.dtype | None" = None,
             canaries: "bool | Canaries | Mapping | None" = None) -> Organism:
    """Build (train on first use, then load from the cache) the model organism.

    ``planted``: None (the plain organism), True (the planted-location organism with the
    preset's default :class:`Planting`), a :class:`Planting` or a mapping of its fields.
    ``device`` (``"auto"``: a GPU when present) / ``dtype`` (e.g. ``"bfloat16"``): where the
    model and its oracles run once loaded. Training itself always runs on the CPU in float32
    (bit-reproducible, one cache for every placement).

    ``canaries``: None (none), True (the default :class:`~excise.world.Canaries`: 16 canaries
    each trained 1, 4, 16 and 64 times, 32 never seen), a Canaries or a mapping of its fields -
    the memorization control of the leave-one-out probe (``org.canary_facts()``; its oracle,
    ``org.without_canaries()``, is the plain organism). In the cache key and the metadata only
    when given: the plain organism's key is unchanged."""
    device, dtype = resolve_device(device), resolve_dtype(dtype)
    if isinstance(preset, str):
        if preset not in PRESETS:
            raise ValueError(f"unknown organism preset {preset!r}; choose one of "
                             f"{sorted(PRESETS)}")
        preset = PRESETS[preset]
    if seed is not None:
        preset = dataclasses.replace(preset, seed=seed)
    planting = Planting.of(planted)
    canary_spec = Canaries.of(canaries)
    if planting is not None and canary_spec is not None:
        raise ValueError("organism: planted= and canaries= cannot be combined (give one)")
    world = make_world(preset.n_people, preset.n_holdout, seed=preset.seed,
                       n_filler=preset.n_filler)
    tokenizer = Tokenizer(world.vocabulary())
    where = None
    if planting is not None:  # the units and their parameter share, from the model's layout
        shape = TLHandle(build_model(preset, len(tokenizer), n_ctx=32), tokenizer)
        where = make_planted(preset, world, planting, shape)
    model = _load_or_train(preset, world, tokenizer, frozenset(), progress, planted=where,
                           canaries=canary_spec)
    return Organism(preset, world, tokenizer, model.to(device, dtype), progress, planted=where,
                    device=device, dtype=dtype, canaries=canary_spec)
