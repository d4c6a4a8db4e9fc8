"""Localized fine-tuning: unlearning objectives on the selected units' parameters only.

Objectives (``method``), on a batch of forget facts ``f`` and retain facts ``r``:

- ``"ga"``  gradient ascent: minimise ``-NLL(f)``;
- ``"gd"``  gradient difference: ``-NLL(f) + retain_weight * NLL(r)``;
- ``"npo"`` negative preference optimisation (Zhang et al. 2024, "Negative Preference
  Optimization: From Catastrophic Collapse to Effective Unlearning"):
  ``-(2/beta) * mean log sigmoid(-beta * (log p(f) - log p_ref(f)))`` ``+ retain_weight *
  NLL(r)`` (``retain_weight=0`` is plain NPO). ``log p_ref`` is the sequence log-probability
  under the weights *before* training, computed once up front.

``text_weight > 0`` adds ``text_weight * L(t)`` on a batch ``t`` of the request's ``retain_text``
(general text the model must keep modelling) to every objective; requests without retain text
ignore it. ``text_loss`` picks ``L``: ``"nll"`` (keep predicting the text) or ``"kl"`` -
``KL(p_before || p_now)`` of the next-token distribution at every text position, ``p_before``
from the unedited model: keep the distribution where it was, neither worse nor better (an NLL
term fits the text and can *lower* held-out perplexity, which is change too). The request's
``neighbors`` and ``paraphrase`` facts never enter training: they stay the held-out checks that
nearby knowledge survives and that the forgetting is not tied to the exact prompts.

Only the parameters of ``units`` train: gradients outside their slices are masked to zero, and the
edit is computed on a private copy of the model, then written back as a weight diff holding only
the selected elements that changed - everything else is bit-identical by construction, and
``revert()`` is exact. ``units="all"`` trains every parameter: the usual global baseline.
Batches are drawn from a seeded generator: same seed, same edit.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from edit._common import check_inputs, default_units, importance_digest, param_slices
from excise.checks import check_choice, check_number, need_request
from excise.edits import Edit, weight_edit
from excise.handle import Batch, ModelHandle
from excise.importance import Importance
from excise.request import ForgetRequest
from excise.sites import Selection
from excise.train import Optim, Sampler, train

METHODS = ("ga", "gd", "npo")
TEXT_LOSSES = ("nll", "kl")
OPTIMIZERS = ("adam", "sgd")


@dataclass(frozen=True)
class FinetuneSettings:
    """How :func:`finetune` trains (validated on construction; the field order is the order of
    the edit's recorded parameters)."""

    method: str = "gd"
    steps: int = 30
    lr: float = 3e-3
    batch_size: int = 16
    seed: int = 0
    beta: float = 0.1
    retain_weight: float = 1.0
    optimizer: str = "adam"
    max_grad_norm: float = 1.0
    text_weight: float = 0.0
    text_loss: str = "nll"

    def __post_init__(self):
        check_choice("finetune", "method", self.method, METHODS)
        check_choice("finetune", "optimizer", self.optimizer, OPTIMIZERS)
        check_choice("finetune", "text_loss", self.text_loss, TEXT_LOSSES)
        check_number("finetune", "steps", self.steps, low=1, integer=True)
        check_number("finetune", "lr", self.lr, low=0, low_open=True)
        check_number("finetune", "batch_size", self.batch_size, low=1, integer=True)
        check_number("finetune", "seed", self.seed, low=0, integer=True)
        check_number("finetune", "beta", self.beta, low=0, low_open=True)
        check_number("finetune", "retain_weight", self.retain_weight, low=0)
        check_number("finetune", "max_grad_norm", self.max_grad_norm, low=0, low_open=True)
        check_number("finetune", "text_weight", self.text_weight, low=0)

    def to_dict(self) -> dict:
        return asdict(self)


def finetune(model: ModelHandle, importance: Importance | None = None,
             units: Selection | str | None = None, *, request=None, method: str = "gd",
             steps: int = 30, lr: float = 3e-3, batch_size: int = 16, seed: int = 0,
             top: int | float = 0.02, beta: float = 0.1, retain_weight: float = 1.0,
             optimizer: str = "adam", max_grad_norm: float = 1.0,
             text_weight: float = 0.0, text_loss: str = "nll",
             progress: bool = False) -> Edit:
    """Fine-tune the parameters of ``units`` (default: the ``top`` neurons/heads of
    ``importance``; ``"all"``: every parameter) with ``method`` for ``steps`` steps
    (``progress``: a tqdm bar over the steps)."""
    settings = FinetuneSettings(method, steps, lr, batch_size, seed, beta, retain_weight,
                                optimizer, max_grad_norm, text_weight, text_loss)
    req = need_request("finetune", request, "(its forget facts are unlearned, its retain facts "
                       "kept)")
    check_inputs("finetune", model, importance)
    if isinstance(units, str):
        if units != "all":
            raise ValueError(f"finetune: units={units!r}; pass a Selection, None (top units "
                             f"of the importance) or 'all'")
        slices = {s: torch.arange(p.numel()) for s, p in model.named_parameters().items()}
        selection = None
    else:
        selection = default_units("finetune", importance, units, top)
        slices = param_slices("finetune", model, selection)
    params = settings.to_dict() | {
        "units": "all" if selection is None else "selection",
        "request": req.digest(), "importance": importance_digest(importance)}
    trained = _train(model, slices, req, settings, progress=progress)
    new = {s: (idx, trained[s].reshape(-1)[idx]) for s, idx in slices.items()}
    return weight_edit(model, "finetune", params, selection, new)


def _seq_logprob(model: ModelHandle, batch: Batch) -> torch.Tensor:
    return model.token_logprobs(batch).sum(1)  # [n]


def _train(model: ModelHandle, slices: dict[str, torch.Tensor], req: ForgetRequest,
           settings: FinetuneSettings, *, progress: bool) -> dict[str, torch.Tensor]:
    """Train a private copy (only the elements in ``slices`` move: gradients elsewhere are
    masked to zero); return the trained values of the parameters in ``slices``."""
    st = settings
    work = model.clone()
    named = work.named_parameters()
    masks = {}
    for s, idx in slices.items():
        m = torch.zeros(named[s].numel(), dtype=torch.bool)
        m[idx] = True
        masks[s] = m.view(named[s].shape).to(named[s].device)
    for s, p in named.items():
        p.requires_grad_(s in masks)
    forget = work.encode(list(req.forget))
    retain = work.encode(list(req.retain))
    text = (work.encode_texts(list(req.retain_text)) if st.text_weight and req.retain_text
            else None)
    sampler = Sampler(st.seed)
    ref = None
    if st.method == "npo":
        with torch.no_grad():
            ref = torch.cat([_seq_logprob(work, b) for b in forget.chunks(256)])

    def keep_text(batch: Batch) -> torch.Tensor:
        if st.text_loss == "nll":
            return work.loss(batch)
        with torch.no_grad():
            ref_lp = model.target_logprobs(batch)
        return F.kl_div(work.target_logprobs(batch), ref_lp, log_target=True,
                        reduction="batchmean")

    use_retain = st.method == "gd" or (st.method == "npo" and st.retain_weight > 0)

    def loss_fn(_step: int) -> torch.Tensor:
        # one batch per split, drawn in this order: forget, retain, text
        fi = sampler.rows(len(forget), st.batch_size)
        fb = forget[fi].trim()
        if st.method == "npo":
            lp = _seq_logprob(work, fb)
            loss = -(2.0 / st.beta) * F.logsigmoid(-st.beta * (lp - ref[fi])).mean()
        else:
            loss = -work.loss(fb)
        if use_retain:
            ri = sampler.rows(len(retain), st.batch_size)
            loss = loss + st.retain_weight * work.loss(retain[ri].trim())
        if text is not None:
            ti = sampler.rows(len(text), st.batch_size)
            loss = loss + st.text_weight * keep_text(text[ti].trim())
        return loss

    train(loss_fn, {s: named[s] for s in masks}, steps=st.steps,
          optim=Optim(st.optimizer, lr=st.lr), masks=masks, max_grad_norm=st.max_grad_norm,
          progress=progress, desc=f"finetune ({st.method})")
    return {s: named[s].detach() for s in masks}
