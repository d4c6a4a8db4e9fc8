"""Re-initialise the located units, then retrain only them on retain data: a localized retraining.

Fine-tuning against the forget facts moves weights until the facts stop coming out; the
information can stay in the weights and come back with a little relearning. ``reinit`` removes
it instead: the parameters of ``units`` (default: the ``top`` neurons/heads of ``importance``;
``"all"``: every parameter, the global reference) are overwritten, then trained - and nothing
else - on the request's retain facts and retain text, so whatever the units did for the rest of
the model is learned again without the forget facts.

- ``mode="fresh"``: each element is drawn like a fresh initialisation of its tensor
  (:func:`edit._common.fresh_values`: weight matrices N(0, the model's init std - TransformerLens
  ``initializer_range``), biases 0, norm scales 1); nothing of the old value is left.
- ``mode="shrink_perturb"``: ``theta <- (1 - alpha) * theta + alpha * fresh`` (Ash & Adams
  2020); ``alpha`` in (0, 1], default 0.5. ``alpha = 1`` is ``"fresh"``.

Retraining (``steps`` steps; ``steps=0``: re-initialise only): per step one batch of retain
facts (NLL of their targets) plus ``text_weight`` times a batch of the request's ``retain_text``
(``text_loss``: ``"nll"`` or ``"kl"`` to the model before the edit, as in ``edit.finetune``),
on a private copy with every gradient outside the units' slices masked to zero (the one training
loop, :func:`excise.train.train`). The forget facts are never seen. The noise and the batches
come from generators seeded with ``seed``: same seed, same edit. The result is a weight diff of
the units' slices (dense where most of a tensor changes): revert is exact, the diff saves.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from edit._common import MaskedCopy, keep_text_loss, start_unit_edit
from edit.finetune import OPTIMIZERS, TEXT_LOSSES
from excise.checks import check_choice, check_number
from excise.edits import Edit, weight_edit
from excise.handle import ModelHandle
from excise.importance import Importance
from excise.sites import Selection
from excise.train import Optim, Sampler, train

MODES = ("fresh", "shrink_perturb")
DEFAULT_ALPHA = 0.5  # shrink_perturb's alpha when none is given


@dataclass(frozen=True)
class ReinitSettings:
    """How :func:`reinit` re-initialises and retrains (validated on construction)."""

    mode: str = "fresh"
    alpha: float | None = None
    steps: int = 100
    lr: float = 3e-3
    batch_size: int = 32
    text_weight: float = 1.0
    text_loss: str = "nll"
    optimizer: str = "adam"
    max_grad_norm: float = 1.0
    seed: int = 0

    def __post_init__(self):
        check_choice("reinit", "mode", self.mode, MODES)
        if self.mode == "fresh" and self.alpha is not None:
            raise ValueError(f"reinit: alpha={self.alpha!r} is the strength of "
                             f"mode='shrink_perturb'; mode='fresh' replaces the values whole "
                             f"(alpha 1). Drop alpha or use mode='shrink_perturb'")
        if self.alpha is not None:
            check_number("reinit", "alpha", self.alpha, low=0, high=1, low_open=True)
        check_number("reinit", "steps", self.steps, low=0, integer=True)
        check_number("reinit", "lr", self.lr, low=0, low_open=True)
        check_number("reinit", "batch_size", self.batch_size, low=1, integer=True)
        check_number("reinit", "text_weight", self.text_weight, low=0)
        check_choice("reinit", "text_loss", self.text_loss, TEXT_LOSSES)
        check_choice("reinit", "optimizer", self.optimizer, OPTIMIZERS)
        check_number("reinit", "max_grad_norm", self.max_grad_norm, low=0, low_open=True)
        check_number("reinit", "seed", self.seed, low=0, integer=True)

    @property
    def strength(self) -> float:
        """The shrink-and-perturb alpha actually used (1 for ``fresh``)."""
        if self.mode == "fresh":
            return 1.0
        return DEFAULT_ALPHA if self.alpha is None else float(self.alpha)

    def to_dict(self) -> dict:
        return asdict(self) | {"alpha": self.strength}


def reinit(model: ModelHandle, importance: Importance | None = None,
           units: Selection | str | None = None, *, request=None, top: int | float = 0.02,
           mode: str = "fresh", alpha: float | None = None, steps: int = 100,
           lr: float = 3e-3, batch_size: int = 32, text_weight: float = 1.0,
           text_loss: str = "nll", optimizer: str = "adam", max_grad_norm: float = 1.0,
           seed: int = 0, progress: bool = False) -> Edit:
    """Re-initialise the parameters of ``units`` (``mode``: ``"fresh"`` or
    ``"shrink_perturb"`` with ``alpha``), then retrain only them for ``steps`` steps on the
    request's retain facts and retain text. Returns the applied Edit."""
    st = ReinitSettings(mode, alpha, steps, lr, batch_size, text_weight, text_loss, optimizer,
                        max_grad_norm, seed)
    req, selection, copy, params = start_unit_edit(
        "reinit", model, importance, units, top, request, "(its retain facts and retain text "
        "retrain the re-initialised units)", st.to_dict(), st.strength, st.seed)
    if st.steps:
        retrain(model, copy, req, st, desc=f"reinit ({st.mode})", progress=progress)
    return weight_edit(model, "reinit", params, selection, copy.new_values())


def retrain(model: ModelHandle, copy: MaskedCopy, req, st, *, desc: str,
            progress: bool) -> None:
    """Train ``copy`` (its masked slices only) on retain facts (target NLL) plus
    ``st.text_weight`` x the retain-text term, ``st.steps`` steps; batches drawn in this
    order per step: retain facts, text."""
    work = copy.work
    retain = work.encode(list(req.retain))
    text = (work.encode_texts(list(req.retain_text)) if st.text_weight and req.retain_text
            else None)
    sampler = Sampler(st.seed)

    def loss_fn(_step: int) -> torch.Tensor:
        ri = sampler.rows(len(retain), st.batch_size)
        loss = work.loss(retain[ri].trim())
        if text is not None:
            ti = sampler.rows(len(text), st.batch_size)
            loss = loss + st.text_weight * keep_text_loss(st.text_loss, work, model,
                                                          text[ti].trim())
        return loss

    copy.result = train(loss_fn, copy.params, steps=st.steps,
                        optim=Optim(st.optimizer, lr=st.lr), masks=copy.masks,
                        max_grad_norm=st.max_grad_norm, progress=progress, desc=desc)
