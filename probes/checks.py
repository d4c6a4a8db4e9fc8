"""Input checks shared by the suites: every error names the culprit and the likely cause."""

from __future__ import annotations

from excise.handle import ModelHandle
from excise.request import ForgetRequest

_SPLITS = ("forget", "retain", "holdout", "neighbors")


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
    ca, cb = getattr(model, "cfg", None), getattr(other, "cfg", None)
    if ca is not None and cb is not None and ca.d_vocab != cb.d_vocab:
        raise ValueError(f"the {what} has d_vocab={cb.d_vocab}, the model {ca.d_vocab}")


def check_positive(name: str, value, minimum: float = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < minimum:
        raise ValueError(f"{name}={value!r}: must be a number >= {minimum} (an attack with no "
                         f"budget cannot restore anything, so it would prove nothing)")
