"""A retrain oracle for a real pretrained model: the TOFU protocol with excise's own world.

A pretrained model has no retrain oracle: nobody can train it again without one person's facts.
TOFU ("TOFU: A Task of Fictitious Unlearning for LLMs", Maini et al. 2024) gets one by
fine-tuning the model on facts about fictitious people, then fine-tuning a second copy of the
same base model on the same data without the forget people, with the same seed and steps: the
second copy is the model that never saw the forget people's facts.

``finetuned("gemma3-270m")`` does this with the organism's world (:mod:`excise.world`): the
trained facts (statement and question forms, one phrasing of each held out per person) of
``people`` fictitious people, and the shared city -> country facts, tokenized with the model's
own tokenizer, train the MLP weights of the middle layers (:class:`FinetuneWorld`) through
:func:`excise.train.train` with a target-only loss; the world's ``holdout`` people are never
trained. ``ft.request(forget_people=...)`` builds the ForgetRequest exactly as
:func:`excise.organism.organism_request` does; ``ft.oracle(request)`` is the fine-tune without
the forget people. Both are cached under ``cache_dir() / "finetuned-<base>"`` as safetensors of
the trained parameters only (the rest is the base model, whose weight fingerprint is in the
key and checked at load), keyed by every setting, the base model's fingerprint and tokenizer,
the torch version and thread count; written atomically under a file lock, with the sha256 of
the weights file in the JSON. The base model on disk is only ever read.

Why the MLPs of the middle layers (default: layers ``n//4 .. n - n//4 - 1``, every MLP
weight there; see :class:`FinetuneWorld`): fact recall lives mostly in mid-layer MLPs, so the
facts are stored where ``locate`` and the edits look for them and where the relearning attack
(restricted to MLPs on Gemma) acts; the layers below are frozen, so the backward pass stops
there (on Gemma 3 270M, 2.4 s against 3.0 s of process CPU per 16-fact forward + backward at
one thread); attention, embeddings and norms stay the base's. ``rank > 0`` trains low-rank
adapters on those weights instead, merged into them afterwards (measured once on Gemma, rank 16
at lr 1e-3: no better for general text than the weights themselves, so the default is 0).
Either way the result is plain weights: every stage sees an ordinary model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import torch

from excise.io import (CacheWarning, atomic_write_text, file_lock, file_sha256, read_cache_entry,
                       save_safetensors)
from excise.options import check_fields
from excise.organism import cache_dir, organism_request
from excise.request import FactSet, ForgetRequest, read_jsonl
from excise.train import Optim, Sampler, reproducible, train
from excise.world import World, make_world

CACHE_VERSION = 1
TEXT_LOSSES = ("kl", "nll")


def _int(name: str, value, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or \
            (high is not None and value > high):
        rng = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"finetune_world.{name}={value!r}: must be an integer {rng}")
    return value


@dataclass(frozen=True)
class FinetuneWorld:
    """How the fictitious world is made and fine-tuned into a base model.

    ``people`` trained fictitious people (15 trained facts each: five attributes, two statement
    phrasings and one question phrasing; the third statement and the other question are held
    out as paraphrases) and ``holdout`` never-trained people (the holdout split); ``shared``:
    also train the 48 shared city -> country facts. ``steps`` AdamW steps of ``batch_size``
    facts at ``lr`` (warm-up over 5% of the steps, then linear decay to 5%), gradient norm
    clipped at 1, no weight decay (it would pull pretrained weights towards zero). ``layers``:
    the blocks whose MLP weights train (None: the middle half, ``n//4 .. n - n//4 - 1``).
    ``seed`` seeds the world and the batch order (and the adapters' initialisation);
    ``threads``: torch threads the training runs at (bit-reproducible per torch version and
    thread count, both in the cache key). ``rank``: 0 trains the MLP weights themselves; > 0
    low-rank adapters ``W + B A`` (A seeded, B zero) on every MLP ``nn.Linear`` weight of the
    trained blocks, merged into the weights after training.
    ``text``: where the request's general text (perplexity) and retain text come from - None:
    the world's filler sentences; a JSONL request file: its ``general`` and ``retain_text``
    rows; ``general``: a JSONL file whose ``general`` rows replace them as the general text
    (measured, never trained, not in the cache key: the same weights with or without it).
    ``text_batch`` rows of the retain text (never the general text, which stays held
    out) join every step with a loss weighted ``text_weight`` (0: facts only; then the text is
    not training data and stays out of the cache key): facts alone pull the trained MLPs
    towards answering everything in their format (measured on Gemma 3 270M, facts only, AdamW
    at 1e-4: general-text perplexity 20.8 -> 56.6 after 20 steps; at 5e-4 -> 17,579 after 40).
    ``text_loss``: that loss - ``"kl"`` (default): ``KL(base || model)`` of the next-token
    distributions at every text position, the base being the model before fine-tuning (its
    statistics computed once, :meth:`~excise.handle.ModelHandle.kl_reference`: exact, no
    forward of the base per step; needs a readout without logit soft-capping, as Gemma 3's),
    which holds the model to the base's predictions on text rather than to the few retain
    sentences themselves; ``"nll"``: the language-model loss on the retain text. Measured on
    Gemma 3 270M (8 people, 80 steps of 8 facts at 1e-4; general-text perplexity against the
    base's, recall of the forget / retain facts): nll, 4 rows, weight 1: 2.4x, 1.00 / 1.00;
    kl, 8 rows, weight 5: 1.12x, 1.00 / 1.00; kl, 8 rows, weight 20: 1.18x, 0.93 / 0.97.
    ``anchor_samples``: that many texts sampled from the base itself (:func:`base_samples`,
    ``anchor_len`` tokens each, seeded by ``seed``, drawn once before training) join the retain
    text. The KL term held the 60 retain sentences at the base's perplexity (1.006x) while
    held-out general text still rose 1.12x, line by line between 0.81x and 1.45x: the model
    fitted the anchor rather than staying the base; the base's own samples (web text, code,
    other languages) spread the anchor over what the base actually predicts. Measured with
    128 samples of 24 tokens (kl, 8 rows, weight 5): 1.07x, trained facts recalled 0.98 (all
    eight people); the fine-tune took 725 s of CPU at one thread against 409 s without the
    samples (drawing them, their statistics, and longer text rows at every step)."""

    people: int = 12
    holdout: int = 4
    steps: int = 240
    batch_size: int = 16
    lr: float = 5e-4
    layers: tuple[int, ...] | None = None
    shared: bool = True
    seed: int = 0
    threads: int = 2
    text: str | None = None
    text_batch: int = 0
    text_weight: float = 1.0
    text_loss: str = "kl"
    rank: int = 0
    anchor_samples: int = 0
    anchor_len: int = 32
    general: str | None = None

    def __post_init__(self):
        _int("people", self.people, 2, 800)
        _int("holdout", self.holdout, 0, 200)
        _int("steps", self.steps, 1)
        _int("batch_size", self.batch_size, 1)
        _int("threads", self.threads, 1, 256)
        _int("text_batch", self.text_batch, 0)
        _int("rank", self.rank, 0, 4096)
        _int("anchor_samples", self.anchor_samples, 0, 100_000)
        _int("anchor_len", self.anchor_len, 4, 512)
        if self.anchor_samples and not (self.text_batch and self.text_weight):
            raise ValueError(f"finetune_world.anchor_samples={self.anchor_samples}: the base's "
                             f"samples join the retain text, which is not trained on "
                             f"(text_batch={self.text_batch}, text_weight={self.text_weight}); "
                             f"set text_batch and text_weight above 0, or anchor_samples: 0")
        tw = self.text_weight
        if isinstance(tw, bool) or not isinstance(tw, (int, float)) or not 0 <= tw <= 100:
            raise ValueError(f"finetune_world.text_weight={tw!r}: must be a number in [0, 100]")
        object.__setattr__(self, "text_weight", float(tw))
        if self.text_loss not in TEXT_LOSSES:
            raise ValueError(f"finetune_world.text_loss={self.text_loss!r}: must be one of "
                             f"{', '.join(TEXT_LOSSES)}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"finetune_world.seed={self.seed!r}: must be an integer")
        lr = self.lr
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0 < lr < 1:
            raise ValueError(f"finetune_world.lr={lr!r}: must be a number in (0, 1), e.g. 5e-4")
        object.__setattr__(self, "lr", float(lr))
        if not isinstance(self.shared, bool):
            raise ValueError(f"finetune_world.shared={self.shared!r}: must be true or false")
        if self.layers is not None:
            if isinstance(self.layers, (str, bytes)) or not isinstance(self.layers, Iterable):
                raise ValueError(f"finetune_world.layers={self.layers!r}: give a list of block "
                                 f"indices, e.g. [4, 5, 6], or null for the middle half")
            layers = [_int("layers[]", i, 0) for i in self.layers]
            if not layers:
                raise ValueError("finetune_world.layers is empty: name at least one block, or "
                                 "null for the middle half")
            object.__setattr__(self, "layers", tuple(sorted(set(layers))))
        if self.text is not None and (not isinstance(self.text, str) or not self.text.strip()):
            raise ValueError(f"finetune_world.text={self.text!r}: give the path of a JSONL "
                             f"request file with general / retain_text rows, or null for the "
                             f"world's filler text")
        if self.general is not None and (not isinstance(self.general, str)
                                         or not self.general.strip()):
            raise ValueError(f"finetune_world.general={self.general!r}: give the path of a "
                             f"JSONL file with general rows, or null for text's general rows")

    @classmethod
    def of(cls, value=None, **overrides) -> "FinetuneWorld":
        """None -> the defaults; a FinetuneWorld as is; a mapping of its fields (unknown keys
        refused, naming the valid ones); ``overrides`` replace fields."""
        fields = [f.name for f in dataclasses.fields(cls)]
        if value is None:
            value = {}
        if isinstance(value, cls):
            value = {f: getattr(value, f) for f in fields}
        if not isinstance(value, Mapping):
            raise ValueError(f"finetune_world={value!r}: give a mapping of its fields "
                             f"({', '.join(fields)}) or null for the defaults")
        merged = dict(value) | overrides
        check_fields(cls, merged, "finetune_world")
        return cls(**merged)

    def trained(self) -> dict:
        """The fields that determine the trained weights (the cache key's part)."""
        d = dataclasses.asdict(self)
        d["layers"] = None if self.layers is None else list(self.layers)
        d.pop("general")  # measured, never trained
        if not (self.text_batch and self.text_weight):  # text not trained on: not in the key
            for k in ("text", "text_batch", "text_weight", "text_loss"):
                d.pop(k)
        if not self.anchor_samples:
            d.pop("anchor_samples"), d.pop("anchor_len")
        return d

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["layers"] = None if self.layers is None else list(self.layers)
        return d

    def texts(self, world: World) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """``(general, retain_text)`` of the request: from ``text``'s JSONL file, or the
        world's filler sentences (held-out ones as general text); ``general``'s rows, where
        given, replace the general text."""
        if self.text is None:
            general, retain = tuple(world.filler_eval), tuple(world.filler_train)
        else:
            general, retain = read_text(self.text)
        if self.general is not None:
            general = read_text(self.general, "general")[0]
        return general, retain

    def world(self) -> World:
        return make_world(self.people, self.holdout, seed=self.seed, n_filler=60)


def base_name(base) -> str:
    """A short name for a base model (a model name, or a folder's name), for cache folders."""
    s = str(base)
    name = Path(s).name if ("/" in s or "\\" in s) else s
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name) or "model"


def load_base(base, *, on_split: str = "ignore"):
    """The base model as an HFHandle on the CPU in float32: a name of ``excise.hf.MODELS``
    or a local Hugging Face folder (read only, never written)."""
    from excise.hf import MODELS, load_model

    if isinstance(base, (str, Path)) and str(base) in MODELS:
        return load_model(str(base), on_split=on_split, log=lambda _m: None)
    path = Path(base) if isinstance(base, (str, Path)) else None
    if path is None or not path.is_dir():
        raise ValueError(f"base model {base!r}: give one of {sorted(MODELS)} or a local "
                         f"Hugging Face model folder")
    return load_model(path=str(path), on_split=on_split)


def trained_sites(model, layers: Sequence[int] | None) -> list[str]:
    """The parameter sites a fine-tune trains: every MLP parameter (``blocks.L.mlp.*``) of
    ``layers`` (None: the middle half of the blocks)."""
    n = model.n_layers
    if layers is None:
        layers = range(n // 4, n - n // 4)
    bad = [i for i in layers if not 0 <= i < n]
    if bad:
        raise ValueError(f"finetune_world.layers: {bad[:5]} are not blocks of this model, which "
                         f"has {n} (0..{n - 1})")
    wanted = {int(i) for i in layers}
    out = [s for s in model.named_parameters() if s.startswith("blocks.") and ".mlp." in s
           and int(s.split(".")[1]) in wanted]
    if not out:
        raise ValueError(f"finetune_world.layers={list(layers)}: no MLP parameters there")
    return out


def training_facts(world: World, spec: FinetuneWorld, exclude: Iterable[int] = ()) -> list:
    """The facts a fine-tune trains on: every trained phrasing of every trained person not in
    ``exclude`` (the oracle leaves the forget people out), then the shared facts."""
    skip = set(exclude)
    facts = [f for i in world.trained_people if i not in skip
             for f in world.facts(i, trained=True)]
    if spec.shared:
        facts += world.shared_facts()
    return facts


def finetune(model, world: World, spec: FinetuneWorld, exclude: Iterable[int] = (), *,
             train_seed: int | None = None, progress: bool = False,
             desc: str = "fine-tune", evaluate=None, eval_every: int | None = None):
    """Fine-tune ``model`` (an HFHandle, changed in place) on the world's facts without
    ``exclude``; returns the :class:`~excise.train.TrainResult`. Only the MLP parameters of
    ``spec.layers`` train; every other parameter's ``requires_grad`` is off meanwhile (so the
    backward pass stops below the lowest trained block) and on again afterwards.
    ``evaluate`` / ``eval_every``: as :func:`excise.train.train` (a monitor; it must not change
    the weights)."""
    seed = spec.seed if train_seed is None else train_seed
    facts = training_facts(world, spec, exclude)
    texts = spec.texts(world)[1] if spec.text_batch and spec.text_weight else ()
    if spec.text_batch and spec.text_weight and not texts and not spec.anchor_samples:
        raise ValueError(f"finetune_world.text_batch={spec.text_batch}: the retain text of "
                         f"{spec.text!r} is empty; add retain_text rows or set text_batch: 0")
    if spec.anchor_samples:  # the base's own text, drawn before any step (spec.seed: the data's)
        with reproducible(spec.threads):
            texts = tuple(texts) + base_samples(model, spec.anchor_samples, spec.anchor_len,
                                                spec.seed)
    sites = trained_sites(model, spec.layers)
    named = model.named_parameters()
    params = {s: named[s] for s in sites}
    steps = spec.steps
    warmup = max(1, steps // 20)
    with reproducible(spec.threads):
        data = model.encode(facts)
        sampler = Sampler(seed)
        batches = sampler.epochs(len(data), spec.batch_size)
        text = model.encode_texts(list(texts)) if texts else None
        kl_ref = None
        if text is not None and spec.text_loss == "kl":
            if not model.affine_readout:
                raise ValueError(f"finetune_world.text_loss='kl' needs a model whose logits "
                                 f"are affine in the final hidden state (no soft-capping); "
                                 f"{model.name!r} has none: set text_loss: nll")
            kl_ref = model.kl_reference(text)  # the base's statistics, once, before training

        def loss_fn(_step: int) -> torch.Tensor:
            loss = model.loss(data[next(batches)].trim())
            if text is not None:  # (drawn after the facts, from the same sampler)
                rows = sampler.rows(len(text), spec.text_batch)
                if kl_ref is None:
                    keep = model.loss(text[rows].trim())
                else:
                    keep = model.kl_to_reference(text[rows].trim(), kl_ref.take(rows))
                loss = loss + spec.text_weight * keep
            return loss

        for p in model.model.parameters():
            p.requires_grad_(False)
        hooks, adapters = [], {}
        if spec.rank:  # low-rank adapters on the trained weights, merged afterwards
            adapters = _adapters(model, sites, spec.rank, seed)
            hooks = [model.model.get_submodule(mod).register_forward_hook(fn)
                     for mod, fn in _adapter_hooks(model, adapters)]
            trained = {f"{s}.lora_{k}": t for s, ab in adapters.items() for k, t in
                       zip("AB", ab)}
        else:
            trained = params
        for p in trained.values():
            p.requires_grad_(True)
        try:
            result = train(loss_fn, trained,
                           steps=steps, optim=Optim("adamw", lr=spec.lr, betas=(0.9, 0.98)),
                           schedule=lambda s: min(1.0, (s + 1) / warmup)
                           * max(0.05, 1 - s / steps),
                           max_grad_norm=1.0, progress=progress, desc=desc,
                           evaluate=evaluate, eval_every=eval_every)
        finally:
            for h in hooks:
                h.remove()
            for p in model.model.parameters():
                p.requires_grad_(True)
        with torch.no_grad():  # W + B A: the adapters become plain weights
            for s, (a, b) in adapters.items():
                params[s].add_(b @ a)
    model.model.eval()
    return result


def base_samples(model, n: int, length: int, seed: int, chunk: int = 32) -> tuple[str, ...]:
    """``n`` texts sampled from ``model`` (an HFHandle) from its BOS token, ``length`` tokens
    each (cut at the first EOS; empty ones dropped), at temperature 1 with no top-k / top-p
    truncation (the model's own distribution, not its generation defaults), with a generator
    seeded ``seed``: the same texts for the same weights, seed, torch version and threads.
    Decoded without special tokens (they are re-encoded with the retain text)."""
    hf_tok = model.tokenizer.hf
    bos, eos = model.tokenizer.bos_id, model.tokenizer.eos_id
    from transformers import DynamicCache

    gen = torch.Generator().manual_seed(seed)
    out: list[str] = []
    with torch.inference_mode():
        for start in range(0, n, chunk):
            x = torch.full((min(chunk, n - start), 1), bos, dtype=torch.long)
            cache, drawn = DynamicCache(config=model.model.config), []
            for _ in range(length):  # (the cache fills in place)
                o = model.model(input_ids=x.to(model.device), use_cache=True, logits_to_keep=1,
                                **{model._cache_kwarg(): cache})
                x = torch.multinomial(o.logits[:, -1].float().softmax(-1).cpu(), 1,
                                      generator=gen)
                drawn.append(x)
            for row in torch.cat(drawn, 1).tolist():
                if eos in row:
                    row = row[:row.index(eos)]
                text = hf_tok.decode(row, skip_special_tokens=True).strip()
                if text:
                    out.append(text)
    return tuple(out)


def _adapters(model, sites: list[str], rank: int, seed: int
              ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``site -> (A [rank, in], B [out, rank])`` for every trained ``nn.Linear`` weight: A
    drawn from N(0, 1/in) (seeded), B zero, so training starts from the base model."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for s in sites:
        target = model.site_table()[s].target
        module = model.model.get_submodule(target.rsplit(".", 1)[0])
        if not target.endswith(".weight") or not isinstance(module, torch.nn.Linear):
            if target.endswith(".bias"):
                continue  # (biases of the trained layers stay the base's)
            raise ValueError(f"finetune_world.rank: {s} ({target}) is not an nn.Linear "
                             f"weight; low-rank adapters need them - set rank: 0 to train the "
                             f"MLP weights themselves")
        w = module.weight
        a = (torch.randn(rank, w.shape[1], generator=gen) / w.shape[1] ** 0.5).to(w.dtype)
        out[s] = (a, torch.zeros(w.shape[0], rank, dtype=w.dtype))
    return out


def _adapter_hooks(model, adapters):
    """``(module path, forward hook)`` adding ``x A^T B^T`` to each adapted Linear's output."""
    for s, (a, b) in adapters.items():
        def hook(_mod, args, output, a=a, b=b):
            return output + (args[0] @ a.T) @ b.T
        yield model.site_table()[s].target.rsplit(".", 1)[0], hook


class Finetuned:
    """A base model fine-tuned on a fictitious world: ``model`` (an HFHandle), ``world``,
    ``spec`` (:class:`FinetuneWorld`), ``base`` (what it was loaded from), ``sites`` (the
    parameters the fine-tune trained); ``request(...)`` and ``oracle(request)`` as on
    :class:`excise.organism.Organism`."""

    planted = None  # (no planted units: for code that asks an organism)

    def __init__(self, base, spec: FinetuneWorld, world: World, model, sites: list[str],
                 base_fingerprint: str, progress: bool = True, device=None, dtype=None):
        self.base = base
        self.spec = spec
        self.world = world
        self.model = model
        self.sites = sites
        self.base_fingerprint = base_fingerprint
        self.progress = progress
        self.device = device
        self.dtype = dtype

    @property
    def tokenizer(self):
        return self.model.tokenizer

    @property
    def seed(self) -> int:
        """The fine-tune's seed (``spec.seed``), that of its first oracle."""
        return self.spec.seed

    def __repr__(self) -> str:
        n = sum(self.model.named_parameters()[s].numel() for s in self.sites)
        return (f"Finetuned(base={base_name(self.base)!r}, people={self.world.n_trained} "
                f"trained + {len(self.world.holdout_people)} holdout, steps={self.spec.steps}, "
                f"trained params={n:,} of {self.model.n_parameters():,})")

    def request(self, forget_people: Iterable[int], retain_people: Iterable[int] | None = None,
                holdout_people: Iterable[int] | None = None,
                neighbor_people: Iterable[int] | None = None,
                attributes: Sequence[str] | None = None) -> ForgetRequest:
        """As :meth:`excise.organism.Organism.request`; general and retain text from
        ``spec.text`` when it names a JSONL file."""
        req = organism_request(self.world, forget_people, retain_people, holdout_people,
                               neighbor_people, attributes)
        general, retain_text = self.spec.texts(self.world)
        changes = {"general": general, "retain_text": retain_text}
        if not self.spec.shared:  # shared facts never trained: nothing an edit could damage
            changes["shared"] = FactSet("shared", ())
        return dataclasses.replace(req, **changes, meta=req.meta | {"text": self.spec.text})

    def oracle(self, request: ForgetRequest, train_seed: int | None = None):
        """The retrain oracle: the same fine-tune of the same base without the request's forget
        people (same seed, steps and settings); cached on its own."""
        people = request.forget_people()
        if not people:
            raise ValueError("this request names no people of the fine-tuned world to leave "
                             "out; the retrain oracle is only defined for requests built with "
                             "ft.request(...)")
        if request.meta.get("world") not in (None, self.world.digest()):
            raise ValueError("this request was built from another world than this fine-tune's "
                             f"(world {request.meta.get('world')}, this one "
                             f"{self.world.digest()})")
        if train_seed is not None and (isinstance(train_seed, bool)
                                       or not isinstance(train_seed, int)):
            raise ValueError(f"train_seed={train_seed!r}: must be an integer (or None for the "
                             f"fine-tune's seed, {self.spec.seed})")
        self.world.check_people("forget_people", people)
        handle, _ = _load_or_train(self.base, self.spec, self.world, frozenset(people),
                                   self.progress, train_seed=train_seed)
        return handle.to(self.device, self.dtype)

    def record(self, exclude: Iterable[int] = (), train_seed: int | None = None
               ) -> dict | None:
        """The cache entry's JSON record (settings, sha256, ``train_seconds`` and
        ``train_cpu_seconds`` of the run that trained it, final loss) of this fine-tune
        (``exclude`` empty) or of the oracle without ``exclude``; None when not cached."""
        if train_seed == self.spec.seed:
            train_seed = None
        key, _ = _key(self.base_fingerprint, self.model.tokenizer.digest(), self.spec,
                      self.world, frozenset(exclude), train_seed)
        meta = cache_files(self.base, key, frozenset(exclude))[1]
        try:
            return json.loads(meta.read_text())
        except (OSError, ValueError):
            return None


def read_text(path, field: str = "text") -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``(general, retain_text)``: the ``{"split": "general" | "retain_text", "text": ...}``
    rows of a JSONL request file (:func:`excise.request.read_jsonl`: every row is checked as a
    request's); refuses a file without general text, naming it (as ``finetune_world.<field>``)."""
    path = Path(path)
    if not path.is_file():
        rows, example = (("general rows", "data/general_text.jsonl") if field == "general"
                         else ("general / retain_text rows", "data/gemma_facts.jsonl"))
        raise ValueError(f"finetune_world.{field}={str(path)!r}: no such file; give a JSONL "
                         f"file with {rows} (e.g. {example})")
    _, texts = read_jsonl(path)
    if not texts["general"]:
        raise ValueError(f"finetune_world.{field}={str(path)!r} has no 'general' rows: the "
                         f"request's general text (perplexity) would be empty")
    return texts["general"], texts["retain_text"]


def _key(base_fp: str, tok_digest: str, spec: FinetuneWorld, world: World,
         exclude: frozenset[int], train_seed: int | None) -> tuple[str, dict]:
    blob = {"base": base_fp, "tokenizer": tok_digest, "spec": spec.trained(),
            "world": world.digest(), "exclude": sorted(exclude), "torch": torch.__version__,
            "threads": spec.threads, "version": CACHE_VERSION}
    if train_seed is not None and train_seed != spec.seed:
        blob["train_seed"] = train_seed
    if "text" in blob["spec"]:  # trained on: its content decides, not the file's name
        blob["spec"]["text"] = hashlib.sha256(
            json.dumps(spec.texts(world)[1]).encode()).hexdigest()[:16]
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16], blob


def cache_files(base, key: str, exclude: frozenset[int]) -> tuple[Path, Path]:
    """``(weights, meta)`` of a cache entry: ``<cache>/finetuned-<base>/<kind>-<key>.*``,
    kind ``model`` / ``oracle``."""
    kind = "oracle" if exclude else "model"
    folder = cache_dir() / f"finetuned-{base_name(base)}"
    return folder / f"{kind}-{key}.safetensors", folder / f"{kind}-{key}.json"


def _cached_state(weights: Path, meta: Path, sites: list[str], name: str
                  ) -> dict[str, torch.Tensor] | None:
    state, why = read_cache_entry(weights, meta)
    if state is None and why is None:
        return None
    if why is None and sorted(state) != sorted(sites):
        why = f"{weights} holds {sorted(state)[:3]}..., not the trained parameters"
    if why is not None:
        warnings.warn(f"the cached {name} fails its check and is trained again: {why}",
                      CacheWarning, stacklevel=4)
        return None
    return state


def _load_or_train(base, spec: FinetuneWorld, world: World, exclude: frozenset[int],
                   progress: bool, *, train_seed: int | None = None, evaluate=None,
                   eval_every: int | None = None):
    """The fine-tune (``exclude`` empty) or the oracle without ``exclude``: loaded from the
    cache, or trained on a fresh copy of the base model and cached. Returns the handle and the
    base model's fingerprint."""
    if train_seed == spec.seed:
        train_seed = None
    model = load_base(base)
    base_fp = model.fingerprint()
    sites = trained_sites(model, spec.layers)
    key, blob = _key(base_fp, model.tokenizer.digest(), spec, world, exclude, train_seed)
    weights, meta = cache_files(base, key, exclude)
    kind = "oracle" if exclude else "model"
    name = (f"finetuned-{base_name(base)}" + ("-oracle" if exclude else "")
            + (f"-seed{train_seed}" if train_seed is not None else ""))
    model.name = name

    def waiting(lock: Path) -> None:
        if progress:
            print(f"excise: waiting for another process to finish {weights.name} ({lock})",
                  file=sys.stderr, flush=True)

    with file_lock(weights.with_suffix(".lock"), on_wait=waiting):
        state = _cached_state(weights, meta, sites, name)
        named = model.named_parameters()
        if state is not None:
            with torch.no_grad():
                for s in sites:
                    named[s].copy_(state[s])
            model.check_finite(f"loading {weights}")
            return model, base_fp
        t0, c0 = time.time(), time.process_time()
        result = finetune(model, world, spec, exclude, train_seed=train_seed, progress=progress,
                          desc=f"fine-tuning {base_name(base)} {kind}",
                          evaluate=None if evaluate is None else lambda k: evaluate(model, k),
                          eval_every=eval_every)
        model.check_finite(f"fine-tuning {base_name(base)} {kind}")  # a diverged run: not cached
        save_safetensors({s: named[s].detach() for s in sites}, weights)
        atomic_write_text(meta, json.dumps(blob | {
            "base_name": str(base), "sites": sites, "sha256": file_sha256(weights),
            "fingerprint": model.fingerprint(), "final_loss": result.losses[-1],
            "train_seconds": round(time.time() - t0, 1),
            "train_cpu_seconds": round(time.process_time() - c0, 1)}, indent=2))
        return model, base_fp


def finetuned(base="gemma3-270m", spec: "FinetuneWorld | Mapping | None" = None, *,
              progress: bool = True, device=None, dtype=None, evaluate=None,
              eval_every: int | None = None, **fields) -> Finetuned:
    """Fine-tune ``base`` (a name of ``excise.hf.MODELS`` or a local Hugging Face folder) on
    a fictitious world (trained on first use, then loaded from the cache).

    ``spec``: a :class:`FinetuneWorld` or a mapping of its fields; keyword ``fields`` override
    it (``finetuned("gemma3-270m", people=12, steps=240)``). ``device`` / ``dtype``: where the
    model and its oracles run once loaded (training runs on the CPU in float32).
    ``evaluate(model, steps_done)`` every ``eval_every`` steps while training (a monitor, e.g.
    recall; it must not change the weights; not called when the cache has the model)."""
    from excise.placement import resolve_device, resolve_dtype

    spec = FinetuneWorld.of(spec, **fields)
    device, dtype = resolve_device(device), resolve_dtype(dtype)
    if spec.text is not None:
        read_text(spec.text)  # refused before minutes of training
    if spec.general is not None:
        read_text(spec.general, "general")
    world = spec.world()
    model, base_fp = _load_or_train(base, spec, world, frozenset(), progress,
                                    evaluate=evaluate, eval_every=eval_every)
    sites = trained_sites(model, spec.layers)
    return Finetuned(base, spec, world, model.to(device, dtype), sites, base_fp, progress,
                     device, dtype)
