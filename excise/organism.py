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
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from excise.handle import TLHandle
from excise.io import (CacheWarning, NotSafetensorsError, atomic_write_text, checksum_problem,
                       file_lock, file_sha256, load_safetensors, save_safetensors)
from excise.request import FactSet, ForgetRequest
from excise.train import Optim, Sampler, reproducible, train
from excise.world import World, Tokenizer, check_attributes, make_world


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


# torch threads every organism and oracle trains at (reproducible(): the cache key records it).
# Two, with deterministic algorithms: three trainings of `tiny` gave one fingerprint (without
# deterministic algorithms, three), in 16-23 s against 26-27 s for one thread on an idle 2-core
# machine; on a machine whose cores are busy with other work two threads wait on each other
# (100-340 s against 31-85 s measured) - the price of the same bits everywhere.
TRAIN_THREADS = 2
CACHE_VERSION = 2  # 2: torch version + thread count in the key, sha256 of the weights


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


def train_model(preset: Preset, world: World, tokenizer: Tokenizer,
                exclude_people: frozenset[int] = frozenset(), progress: bool = True,
                desc: str = "train"):
    """Train a fresh model on the world (minus ``exclude_people``). Bit-reproducible given the
    preset's seed and the torch version: it trains at :data:`TRAIN_THREADS` threads with
    deterministic algorithms, whatever the caller's setting (restored afterwards).

    The recipe: AdamW (betas 0.9 / 0.98, the preset's lr and weight decay), linear warm-up over
    the first 5% of the steps then linear decay to 5% of the lr, gradient norm clipped at 1,
    batches walking through shuffled epochs of the training texts."""
    texts = world.training_texts(exclude_people)
    shared = [f.text for f in world.shared_facts()] * (preset.shared_repeat - 1)
    texts = texts + shared
    with reproducible(TRAIN_THREADS):
        model = build_model(preset, len(tokenizer), n_ctx=32)
        handle = TLHandle(model, tokenizer, name=f"organism-{preset.name}")
        data = handle.encode_texts(texts)
        batches = Sampler(preset.seed).epochs(len(data), preset.batch_size)
        warmup = max(1, preset.steps // 20)
        model.train()
        train(lambda _: handle.loss(data[next(batches)].trim()), dict(model.named_parameters()),
              steps=preset.steps,
              optim=Optim("adamw", lr=preset.lr, betas=(0.9, 0.98),
                          weight_decay=preset.weight_decay),
              schedule=lambda s: min(1.0, (s + 1) / warmup) * max(0.05, 1 - s / preset.steps),
              max_grad_norm=1.0, progress=progress, desc=desc)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    return handle


class Organism:
    """A trained organism: ``model`` (a handle), ``world``, ``tokenizer``, splits, and oracles."""

    def __init__(self, preset: Preset, world: World, tokenizer: Tokenizer, model: TLHandle,
                 progress: bool = True):
        self.preset = preset
        self.world = world
        self.tokenizer = tokenizer
        self.model = model
        self.progress = progress

    def __repr__(self) -> str:
        return (f"Organism(preset={self.preset.name!r}, people={self.world.n_trained} trained + "
                f"{len(self.world.holdout_people)} holdout, params={self.model.n_parameters():,})")

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

    def oracle(self, request: ForgetRequest) -> TLHandle:
        """The retrain oracle for ``request``: trained without the forget people's facts."""
        people = request.forget_people()
        if not people:
            raise ValueError("this request names no organism people to leave out; the retrain "
                             "oracle is only defined for requests built with org.request(...)")
        return _load_or_train(self.preset, self.world, self.tokenizer, frozenset(people),
                              self.progress)


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


def _key(preset: Preset, world: World, exclude: frozenset[int]) -> str:
    import torch

    blob = json.dumps({"preset": preset.to_dict(), "world": world.digest(),
                       "exclude": sorted(exclude), "torch": torch.__version__,
                       "threads": TRAIN_THREADS, "version": CACHE_VERSION}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cache_files(preset: Preset, world: World, exclude: frozenset[int] = frozenset()
                ) -> tuple[Path, Path]:
    """``(weights, meta)``: where the model (``exclude`` empty) or the oracle without
    ``exclude`` is cached: ``<cache>/organism-<preset>/<model|oracle>-<key>.safetensors|json``."""
    key = _key(preset, world, exclude)
    kind = "oracle" if exclude else "model"
    folder = cache_dir() / f"organism-{preset.name}"
    return folder / f"{kind}-{key}.safetensors", folder / f"{kind}-{key}.json"


def _load_cached(preset: Preset, tokenizer: Tokenizer, weights: Path, meta: Path,
                 name: str) -> TLHandle | None:
    """The cached model, or ``None`` when there is none or it fails its checks (then a
    :class:`CacheWarning` names the file and why: it will be retrained)."""
    if not (weights.exists() or meta.exists()):
        return None
    why = None
    try:
        recorded = json.loads(meta.read_text()) if meta.exists() else None
        if not isinstance(recorded, dict):
            why = f"{meta} is missing" if recorded is None else f"{meta} is not a JSON object"
        else:
            problem = checksum_problem(weights, recorded.get("sha256"))
            if problem:
                why = f"{weights}: {problem}"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        why = f"{meta} is unreadable ({e})"
    state = None
    if why is None:
        try:
            state = load_safetensors(weights)
        except (NotSafetensorsError, OSError) as e:
            why = str(e)
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
                   exclude: frozenset[int], progress: bool) -> TLHandle:
    weights, meta = cache_files(preset, world, exclude)
    kind = "oracle" if exclude else "model"
    name = f"organism-{preset.name}" + ("-oracle" if exclude else "")

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
                             desc=f"training {preset.name} {kind}")
        handle.name = name
        handle.check_finite(f"training {preset.name} {kind}")  # a diverged run is never cached
        save_safetensors({k: v.detach() for k, v in handle.model.state_dict().items()
                          if k in dict(handle.model.named_parameters())}, weights)
        import torch

        # the JSON is written last, with the weights' checksum: it marks a finished entry
        atomic_write_text(meta, json.dumps({
            "preset": preset.to_dict(), "world": world.digest(), "exclude": sorted(exclude),
            "torch": torch.__version__, "threads": TRAIN_THREADS, "version": CACHE_VERSION,
            "sha256": file_sha256(weights), "fingerprint": handle.fingerprint(),
            "train_seconds": round(time.time() - t0, 1)}, indent=2))
        return handle


def organism(preset: str | Preset = "small", seed: int | None = None,
             progress: bool = True) -> Organism:
    """Build (train on first use, then load from the cache) the model organism."""
    if isinstance(preset, str):
        if preset not in PRESETS:
            raise ValueError(f"unknown organism preset {preset!r}; choose one of "
                             f"{sorted(PRESETS)}")
        preset = PRESETS[preset]
    if seed is not None:
        preset = dataclasses.replace(preset, seed=seed)
    world = make_world(preset.n_people, preset.n_holdout, seed=preset.seed,
                       n_filler=preset.n_filler)
    tokenizer = Tokenizer(world.vocabulary())
    model = _load_or_train(preset, world, tokenizer, frozenset(), progress)
    return Organism(preset, world, tokenizer, model, progress)
