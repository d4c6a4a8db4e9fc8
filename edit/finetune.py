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

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from edit._common import (check_choice, check_number, default_units, importance_digest,
                          need_request, param_slices)
from excise.edits import Edit, weight_edit
from excise.handle import ModelHandle
from excise.importance import Importance
from excise.sites import Selection

METHODS = ("ga", "gd", "npo")
TEXT_LOSSES = ("nll", "kl")
OPTIMIZERS = ("adam", "sgd")


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
    check_choice("finetune", "method", method, METHODS)
    check_choice("finetune", "optimizer", optimizer, OPTIMIZERS)
    check_choice("finetune", "text_loss", text_loss, TEXT_LOSSES)
    check_number("finetune", "steps", steps, low=1, integer=True)
    check_number("finetune", "lr", lr, low=0, low_open=True)
    check_number("finetune", "batch_size", batch_size, low=1, integer=True)
    check_number("finetune", "seed", seed, low=0, integer=True)
    check_number("finetune", "beta", beta, low=0, low_open=True)
    check_number("finetune", "retain_weight", retain_weight, low=0)
    check_number("finetune", "max_grad_norm", max_grad_norm, low=0, low_open=True)
    check_number("finetune", "text_weight", text_weight, low=0)
    req = need_request("finetune", request, "(its forget facts are unlearned, its retain facts "
                       "kept)")
    if isinstance(units, str):
        if units != "all":
            raise ValueError(f"finetune: units={units!r}; pass a Selection, None (top units "
                             f"of the importance) or 'all'")
        slices = {s: torch.arange(p.numel()) for s, p in model.named_parameters().items()}
        selection = None
    else:
        selection = default_units("finetune", importance, units, top)
        slices = param_slices("finetune", model, selection)
    params = {"method": method, "steps": steps, "lr": lr, "batch_size": batch_size,
              "seed": seed, "beta": beta, "retain_weight": retain_weight,
              "optimizer": optimizer, "max_grad_norm": max_grad_norm, "text_weight": text_weight,
              "text_loss": text_loss,
              "units": "all" if selection is None else "selection",
              "request": req.digest(), "importance": importance_digest(importance)}
    trained = _train(model, slices, req, method, steps, lr, batch_size, seed, beta,
                     retain_weight, optimizer, max_grad_norm, text_weight, text_loss,
                     progress)
    new = {s: (idx, trained[s].reshape(-1)[idx]) for s, idx in slices.items()}
    return weight_edit(model, "finetune", params, selection, new)


def _seq_logprob(model: ModelHandle, batch) -> torch.Tensor:
    return model.token_logprobs(batch).sum(1)  # [n]


def _train(model, slices, req, method, steps, lr, batch_size, seed, beta, retain_weight,
           optimizer, max_grad_norm, text_weight, text_loss,
           progress) -> dict[str, torch.Tensor]:
    """Train a private copy; return the trained values of the parameters in ``slices``."""
    work = model.clone()
    named = work.named_parameters()
    masks = {}
    for s, idx in slices.items():
        m = torch.zeros(named[s].numel(), dtype=torch.bool)
        m[idx] = True
        masks[s] = m.view(named[s].shape).to(named[s].device)
    for s, p in named.items():
        p.requires_grad_(s in masks)
    train = [named[s] for s in masks]
    forget = work.encode(list(req.forget))
    retain = work.encode(list(req.retain))
    text = work.encode_texts(list(req.retain_text)) if text_weight and req.retain_text else None
    gen = torch.Generator().manual_seed(seed)
    ref = None
    if method == "npo":
        with torch.no_grad():
            ref = torch.cat([_seq_logprob(work, b) for b in forget.chunks(256)])
    opt = (torch.optim.Adam(train, lr=lr) if optimizer == "adam"
           else torch.optim.SGD(train, lr=lr))
    def keep_text(batch):
        if text_loss == "nll":
            return work.loss(batch)
        with torch.no_grad():
            ref_lp = model.target_logprobs(batch)
        return F.kl_div(work.target_logprobs(batch), ref_lp, log_target=True,
                        reduction="batchmean")

    use_retain = method == "gd" or (method == "npo" and retain_weight > 0)
    for _ in tqdm(range(steps), desc=f"finetune ({method})", disable=not progress, leave=False):
        fi = torch.randperm(len(forget), generator=gen)[:batch_size]
        fb = _trim(forget[fi])
        if method == "npo":
            lp = _seq_logprob(work, fb)
            loss = -(2.0 / beta) * F.logsigmoid(-beta * (lp - ref[fi])).mean()
        else:
            loss = -work.loss(fb)
        if use_retain:
            ri = torch.randperm(len(retain), generator=gen)[:batch_size]
            loss = loss + retain_weight * work.loss(_trim(retain[ri]))
        if text is not None:
            ti = torch.randperm(len(text), generator=gen)[:batch_size]
            loss = loss + text_weight * keep_text(_trim(text[ti]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for s, p in zip(masks, train):
            if p.grad is not None:
                p.grad.mul_(masks[s])
        torch.nn.utils.clip_grad_norm_(train, max_grad_norm)
        opt.step()
    return {s: named[s].detach() for s in masks}


def _trim(b):
    t = int(b.lengths.max())
    return type(b)(b.tokens[:, :t], b.target_mask[:, :t], b.subject_mask[:, :t], b.lengths)
