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

``cir_rank > 0``: common-direction projection (CIR, "Collapsing Irrelevant Representations",
2025). Before training, the top ``cir_rank`` directions of the retain activations are computed
once at the input of every trained weight that reads the residual stream (:func:`cir_bases`:
``mlp.W_in`` / ``W_gate`` - the normalised residual the MLP reads; ``attn.W_Q/K/V`` - the
normalised residual the attention reads; uncentred, over every real token of the retain facts
and retain text). Before each update those directions are removed from the weight's gradient
on its input axis, and the weight's accumulated change is kept orthogonal to them: for a
retain-typical input the selected neurons' (heads') pre-activations do not change, so only
fact-specific directions are unlearned. Output weights, biases, embeddings and norms train
unprojected. TransformerLens models only; ``cir_rank=0`` (default) is the plain fine-tuning.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from edit._common import (MaskedCopy, check_inputs, importance_digest, keep_text_loss,
                          real_positions, unit_slices)
from excise.checks import check_choice, check_number, need_request
from excise.edits import Edit, weight_edit
from excise.handle import Batch, ModelHandle, TLHandle
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
    cir_rank: int = 0

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
        check_number("finetune", "cir_rank", self.cir_rank, low=0, integer=True)

    def to_dict(self) -> dict:
        d = asdict(self)
        if not self.cir_rank:  # off: recorded as before the option existed (same edit key)
            d.pop("cir_rank")
        return d


def finetune(model: ModelHandle, importance: Importance | None = None,
             units: Selection | str | None = None, *, request=None, method: str = "gd",
             steps: int = 30, lr: float = 3e-3, batch_size: int = 16, seed: int = 0,
             top: int | float = 0.02, beta: float = 0.1, retain_weight: float = 1.0,
             optimizer: str = "adam", max_grad_norm: float = 1.0,
             text_weight: float = 0.0, text_loss: str = "nll", cir_rank: int = 0,
             progress: bool = False) -> Edit:
    """Fine-tune the parameters of ``units`` (default: the ``top`` neurons/heads of
    ``importance``; ``"all"``: every parameter) with ``method`` for ``steps`` steps
    (``progress``: a tqdm bar over the steps). ``cir_rank > 0``: common-direction projection
    (see the module docstring)."""
    settings = FinetuneSettings(method, steps, lr, batch_size, seed, beta, retain_weight,
                                optimizer, max_grad_norm, text_weight, text_loss, cir_rank)
    req = need_request("finetune", request, "(its forget facts are unlearned, its retain facts "
                       "kept)")
    check_inputs("finetune", model, importance)
    selection, slices = unit_slices("finetune", model, importance, units, top)
    bases = cir_bases("finetune", model, req, list(slices), cir_rank) if cir_rank else {}
    params = settings.to_dict() | {
        "units": "all" if selection is None else "selection",
        "request": req.digest(), "importance": importance_digest(importance)}
    trained = _train(model, slices, req, settings, progress=progress, bases=bases)
    return weight_edit(model, "finetune", params, selection, trained.new_values())


def _seq_logprob(model: ModelHandle, batch: Batch) -> torch.Tensor:
    return model.token_logprobs(batch).sum(1)  # [n]


def _train(model: ModelHandle, slices: dict[str, torch.Tensor], req: ForgetRequest,
           settings: FinetuneSettings, *, progress: bool,
           bases: dict[str, tuple[int, torch.Tensor]] | None = None) -> MaskedCopy:
    """Train a private copy (only the elements in ``slices`` move: gradients elsewhere are
    masked to zero) and return it; ``bases``: the CIR projections (:func:`cir_bases`)."""
    st = settings
    copy = MaskedCopy(model, slices)
    work = copy.work
    forget = work.encode(list(req.forget))
    retain = work.encode(list(req.retain))
    text = (work.encode_texts(list(req.retain_text)) if st.text_weight and req.retain_text
            else None)
    sampler = Sampler(st.seed)
    ref = None
    if st.method == "npo":
        with torch.no_grad():
            ref = torch.cat([_seq_logprob(work, b) for b in forget.chunks(256)])

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
            loss = loss + st.text_weight * keep_text_loss(st.text_loss, work, model,
                                                          text[ti].trim())
        return loss

    project = _Projector(copy.params, copy.masks, bases) if bases else None
    try:
        train(loss_fn, copy.params, steps=st.steps,
              optim=Optim(st.optimizer, lr=st.lr), masks=copy.masks,
              max_grad_norm=st.max_grad_norm, progress=progress, desc=f"finetune ({st.method})",
              evaluate=project, eval_every=1 if project else None)
    finally:
        if project is not None:
            project.remove()
    return copy


# -- CIR: common-direction projection ----------------------------------------------------------
# the weights that read the residual stream, by parameter name: (axis of their input in
# TransformerLens layout, what the owning module receives that input as: a keyword or the first
# positional argument)
CIR_READERS = {"mlp.W_in": (0, None), "mlp.W_gate": (0, None), "attn.W_Q": (1, "query_input"),
               "attn.W_K": (1, "key_input"), "attn.W_V": (1, "value_input")}


def _reader(site: str) -> tuple[int, str | None] | None:
    parts = site.split(".")
    return CIR_READERS.get(".".join(parts[2:])) if len(parts) == 4 else None


@torch.no_grad()
def cir_bases(method: str, model: ModelHandle, req: ForgetRequest, sites: list[str],
              rank: int, batch_size: int = 256) -> dict[str, tuple[int, torch.Tensor]]:
    """The directions CIR removes: for each trained weight that reads the residual stream
    (:data:`CIR_READERS`: ``mlp.W_in`` / ``W_gate`` read the normalised residual the MLP
    receives, ``attn.W_Q/K/V`` the normalised residual the attention receives as query, key
    and value input), the top ``rank`` right singular vectors of the matrix of that input over
    every real token of the request's retain facts and retain text (uncentred: the common
    mean direction counts as shared), computed once on the model as it is. Returns
    ``{site: (input axis, U [d_in, rank])}``; other trained parameters (output weights,
    biases, embeddings, norms) get no projection."""
    if not isinstance(model, TLHandle):
        raise ValueError(f"{method}: cir_rank={rank} projects gradients in TransformerLens "
                         f"layout; this model's backend ({type(model).__name__}) is not "
                         f"supported - use cir_rank=0")
    readers = {s: _reader(s) for s in sites if _reader(s) is not None}
    if not readers:
        raise ValueError(f"{method}: cir_rank={rank}, but none of the trained parameters reads "
                         f"the residual stream ({sorted(CIR_READERS)}): select neurons or heads "
                         f"(or units='all'), or use cir_rank=0")
    grams: dict[str, torch.Tensor] = {}
    handles = []

    def grab(site: str, keyword: str | None):
        def hook(_module, args, kwargs):
            x = kwargs.get(keyword) if keyword else (args[0] if args else None)
            if x is None or x.dim() != 3:
                raise ValueError(f"{method}: cir_rank needs the input of {site} as [batch, pos, "
                                 f"d_model]; this model passes it otherwise")
            rows = x[mask.to(x.device)].double()
            grams[site] = grams.get(site, 0) + rows.T @ rows
        return hook

    mask = None
    for site, (_, keyword) in readers.items():
        module = model.model.get_submodule(model.info(site).target.rsplit(".", 1)[0])
        handles.append(module.register_forward_pre_hook(grab(site, keyword), with_kwargs=True))
    try:
        data = [model.encode(list(req.retain))]
        if req.retain_text:
            data.append(model.encode_texts(list(req.retain_text)))
        for batch in data:
            for b in batch.trim().chunks(batch_size):
                mask = real_positions(b.trim())
                model.logits(b.trim().tokens)
    finally:
        for h in handles:
            h.remove()
    out = {}
    for site, (axis, _) in readers.items():
        gram = grams[site]
        if not 1 <= rank <= gram.shape[0]:
            raise ValueError(f"{method}: cir_rank={rank}; {site} reads {gram.shape[0]} "
                             f"dimensions, choose 1..{gram.shape[0]} (0: off)")
        _vals, vecs = torch.linalg.eigh(gram)  # ascending: the last are the top directions
        u = vecs[:, -rank:].flip(-1)
        out[site] = (axis, u.to(model.parameter(site).dtype))
    return out


def _wide(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32, or as it is when already float32 / float64 (no copy)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def project_out(g: torch.Tensor, axis: int, u: torch.Tensor) -> torch.Tensor:
    """``g`` with its component along the columns of ``u`` (orthonormal, ``[d, r]``) removed
    on ``axis``: ``(I - u u^T)`` applied to every vector along that axis."""
    x = g.movedim(axis, 0)
    flat = x.reshape(x.shape[0], -1)
    flat = flat - u @ (u.T @ flat)
    return flat.reshape(x.shape).movedim(0, axis)


class _Projector:
    """CIR during training: the gradient of every projected weight has the directions removed
    before the masked, clipped optimizer step (a gradient hook), and after each step the
    weight's total change since the start is projected once more (Adam rescales each element
    and float rounding leaves a trace, so the change itself is made exactly orthogonal, up to
    rounding). Used as the training loop's evaluate callback, every step."""

    def __init__(self, params: dict[str, torch.Tensor], masks: dict[str, torch.Tensor],
                 bases: dict[str, tuple[int, torch.Tensor]]):
        for s, (axis, _) in bases.items():  # the projection mixes elements along the axis
            m = masks[s]
            if not torch.equal(m.any(axis), m.all(axis)):
                raise ValueError(f"finetune: cir_rank projects whole input vectors of {s}, "
                                 f"but the selection trains only some of their elements "
                                 f"(parameter-element units); select neurons or heads, or use "
                                 f"cir_rank=0")
        # projected in float32 (or wider) whatever the parameters' dtype
        self.params, self.bases = params, {s: (axis, _wide(u)) for s, (axis, u) in bases.items()}
        self.start = {s: _wide(params[s].detach().clone()) for s in bases}
        self.handles = [params[s].register_hook(
            lambda g, axis=axis, u=u: project_out(_wide(g), axis, u.to(g.device)).to(g.dtype))
            for s, (axis, u) in self.bases.items()]

    def __call__(self, _done: int) -> None:
        for s, (axis, u) in self.bases.items():
            p = self.params[s]
            p.data.copy_(self.start[s] + project_out(_wide(p.data) - self.start[s], axis, u))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
