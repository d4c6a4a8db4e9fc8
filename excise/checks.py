"""Input checks shared by every stage: numbers, choices, requests, fact sets, units, models.

Each raises ``ValueError`` (``TypeError`` for a request of the wrong type) naming the method, the
bad value and what would be valid, before anything touches the model - so a bad call leaves the
weights as they were.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from excise.handle import ModelHandle
from excise.request import FactSet, ForgetRequest
from excise.sites import Selection, Unit

_SPLITS = ("forget", "retain", "holdout", "neighbors")


# -- numbers and choices -------------------------------------------------------------------------
def check_number(method: str, name: str, value, *, low: float | None = None,
                 high: float | None = None, low_open: bool = False, integer: bool = False,
                 high_open: bool = False) -> None:
    """Raise ``ValueError`` unless ``value`` is a finite number in the given range."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok and integer:
        ok = isinstance(value, int)
    if ok:
        ok = math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        lo = "" if low is None else f"{'>' if low_open else '>='} {low}"
        hi = "" if high is None else f"{'<' if high_open else '<='} {high}"
        rng = " and ".join(x for x in (lo, hi) if x) or "finite"
        kind = "an integer" if integer else "a number"
        raise ValueError(f"{method}: {name}={value!r} is out of range; {name} must be {kind} "
                         f"{rng}")


def check_positive(name: str, value, minimum: float = 1) -> None:
    """An attack budget: a number ``>= minimum``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < minimum:
        raise ValueError(f"{name}={value!r}: must be a number >= {minimum} (an attack with no "
                         f"budget cannot restore anything, so it would prove nothing)")


def check_choice(method: str, name: str, value, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{method}: unknown {name} {value!r}; choose one of {list(choices)}")


def check_finite(t: Tensor, what: str, site: str, method: str) -> None:
    if not torch.isfinite(t).all():
        bad = int((~torch.isfinite(t)).sum())
        raise ValueError(f"{method}: {bad} non-finite {what} at site {site!r} (the model "
                         f"overflowed, or its weights hold NaN/inf?)")


# -- requests and fact sets ----------------------------------------------------------------------
def need_request(method: str, request, why: str) -> ForgetRequest:
    """``request`` itself when it is a ForgetRequest (a method that needs one for ``why``)."""
    if not isinstance(request, ForgetRequest):
        raise ValueError(f"{method} needs request= (a ForgetRequest) {why}; got "
                         f"{type(request).__name__}")
    return request


def check_facts(facts: FactSet, method: str) -> None:
    if len(facts) == 0:
        raise ValueError(f"{method}: the {facts.name!r} fact set is empty")


def check_request(request: ForgetRequest, needs_holdout: bool = False) -> None:
    """Re-check the splits (a request may have been built around its constructor)."""
    if not isinstance(request, ForgetRequest):
        raise TypeError(f"expected a ForgetRequest, got {type(request).__name__}")
    for name in ("forget", "retain"):
        if len(getattr(request, name)) == 0:
            raise ValueError(f"the {name} split of the request is empty; verification needs "
                             f"facts to forget and facts to keep")
    if needs_holdout and len(request.holdout) == 0:
        raise ValueError("the holdout split is empty: membership inference and leave-one-out "
                         "probes compare forget facts with never-trained (holdout) facts; build "
                         "the request with holdout facts or drop the 'privacy' / 'loo_probe' "
                         "suites")
    keys = {n: getattr(request, n).keys() for n in _SPLITS}
    for i, a in enumerate(_SPLITS):
        for b in _SPLITS[i + 1:]:
            if a == "retain" and b == "neighbors":
                continue  # neighbours are facts to keep: they may also be in retain
            both = keys[a] & keys[b]
            if both:
                p, t = sorted(both)[0]
                raise ValueError(f"the {a} and {b} splits overlap in {len(both)} fact(s), e.g. "
                                 f"{p!r} -> {t!r}; splits must be disjoint")
    pf = {f.person for f in request.forget if f.person >= 0}
    ph = {f.person for f in request.holdout if f.person >= 0}
    if pf & ph:
        raise ValueError(f"people {sorted(pf & ph)[:5]} appear in both forget and holdout")


# -- units and models ----------------------------------------------------------------------------
def check_units(method: str, model: ModelHandle, units: Selection) -> None:
    """Every unit names an existing site and an index inside it; the selection is not empty."""
    if len(units) == 0:
        raise ValueError(f"{method}: the selection is empty; nothing to edit")
    for site, idxs in units.by_site().items():
        info = model.info(site)  # unknown site -> ValueError with suggestions
        shape = info.unit_shape
        for ix in idxs:
            if len(ix) != len(shape) or any(not 0 <= i < n for i, n in zip(ix, shape)):
                raise ValueError(f"{method}: unit {Unit(site, ix)} does not exist in this model; "
                                 f"{site} has unit shape {tuple(shape)} (valid indices "
                                 f"{_ranges(shape)})")


def _ranges(shape) -> str:
    return "[" + ", ".join(f"0..{n - 1}" for n in shape) + "]"


def check_weights(stage: str, *models: ModelHandle | None) -> None:
    """Every given model's weights are finite (:meth:`ModelHandle.check_finite`, naming the
    tensor); ``None`` entries are skipped. Run before a stage measures or changes a model."""
    for m in models:
        if m is not None:
            m.check_finite(stage)


def check_compatible(model: ModelHandle, other: ModelHandle | None, what: str) -> None:
    """``other`` (oracle / original) must share the model's tokenizer and vocabulary."""
    if other is None:
        return
    if other is model:
        if what == "oracle":
            raise ValueError("the oracle is the model under test itself; pass the retrain "
                             "oracle (org.oracle(request))")
        return
    va, vb = len(model.tokenizer), len(other.tokenizer)
    if va != vb:
        raise ValueError(f"the {what} has a vocabulary of {vb} tokens but the model has {va}: "
                         f"it was trained on a different world or tokenizer")
    da, db = model.tokenizer.digest(), other.tokenizer.digest()
    if da != db:
        raise ValueError(f"the {what}'s tokenizer (digest {db}) differs from the model's "
                         f"({da}): it was trained on a different world")
    ca, cb = model.d_vocab, other.d_vocab
    if ca != cb:
        raise ValueError(f"the {what} has d_vocab={cb}, the model {ca}")
