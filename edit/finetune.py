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

``retain_loss`` picks the retain term the same way: ``"nll"`` (the formulas above: keep
producing each retain fact's target) or ``"kl"`` - ``KL(p_before || p_now)`` of the next-token
distribution at the positions that predict a retain fact's target (TOFU's "KL" regulariser):
the whole answer distribution of a retain prompt stays where it was, not only its top answer -
so the ranking of the other answers a prompt of that kind can take (the neighbouring countries
of a forgotten one) is held too.

Only the parameters of ``units`` train: gradients outside their slices are masked to zero, and the
edit is computed on a private copy of the model, then written back as a weight diff holding only
the selected elements that changed - everything else is bit-identical by construction, and
``revert()`` is exact. ``units="all"`` trains every parameter: the usual global baseline.
Batches are drawn from a seeded generator: same seed, same edit.

Speed on Hugging Face models (``_train(fast=True)``, the default; TransformerLens models take
the plain path bit for bit): a neuron's ``W_gate`` / ``W_in`` rows and ``W_out`` column (a
head's rows / columns) train as small deltas added by forward hooks (:class:`SliceCopy`: no
dense gradient of the whole matrix), the three batches of a step run as one forward with one
unembedding of all their target positions (``ModelHandle.target_hidden`` / ``unembed``: on
Gemma each pass over the 262k x 640 unembedding costs about as much as the whole body), and
the text KL's reference (and the retain KL's) is computed once (``ModelHandle.kl_reference``:
per position a ``d_model`` vector and a scalar, exact) instead of a forward of the unedited
model at every step. Same objective and draws; equal to the plain path up to float rounding.

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
from excise.train import TEXT_LOSSES, Optim, Sampler, train

METHODS = ("ga", "gd", "npo")
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
    retain_loss: str = "nll"

    def __post_init__(self):
        check_choice("finetune", "method", self.method, METHODS)
        check_choice("finetune", "optimizer", self.optimizer, OPTIMIZERS)
        check_choice("finetune", "text_loss", self.text_loss, TEXT_LOSSES)
        check_choice("finetune", "retain_loss", self.retain_loss, TEXT_LOSSES)
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
        if self.retain_loss == "nll":  # likewise
            d.pop("retain_loss")
        return d


def finetune(model: ModelHandle, importance: Importance | None = None,
             units: Selection | str | None = None, *, request=None, method: str = "gd",
             steps: int = 30, lr: float = 3e-3, batch_size: int = 16, seed: int = 0,
             top: int | float = 0.02, beta: float = 0.1, retain_weight: float = 1.0,
             optimizer: str = "adam", max_grad_norm: float = 1.0,
             text_weight: float = 0.0, text_loss: str = "nll", cir_rank: int = 0,
             retain_loss: str = "nll", progress: bool = False) -> Edit:
    """Fine-tune the parameters of ``units`` (default: the ``top`` neurons/heads of
    ``importance``; ``"all"``: every parameter) with ``method`` for ``steps`` steps
    (``progress``: a tqdm bar over the steps). ``cir_rank > 0``: common-direction projection
    (see the module docstring)."""
    settings = FinetuneSettings(method, steps, lr, batch_size, seed, beta, retain_weight,
                                optimizer, max_grad_norm, text_weight, text_loss, cir_rank,
                                retain_loss)
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
           bases: dict[str, tuple[int, torch.Tensor]] | None = None,
           fast: bool = True) -> MaskedCopy:
    """Train a private copy (only the elements in ``slices`` move: gradients elsewhere are
    masked to zero) and return it; ``bases``: the CIR projections (:func:`cir_bases`).
    ``fast`` (default), where the backend offers it (Hugging Face models; TransformerLens
    models train exactly as with ``fast=False``): selected whole rows / columns of
    ``nn.Linear`` weights train as small deltas (:class:`SliceCopy`); the forget, retain and
    text batches of a step run as one forward whose target positions go through the
    unembedding together (``target_hidden`` / ``unembed``); the text KL's (and the retain
    KL's) reference is computed once up front (``ModelHandle.kl_reference``, exact) instead
    of a forward of the unedited model at every step. Same objective, equal up to float
    rounding (tests/test_fast_loss.py); ``fast=False`` is the old path
    (bench/gemma_edit_step.py times both)."""
    st = settings
    copy = (MaskedCopy(model, slices) if bases or not fast else SliceCopy(model, slices))
    work = copy.work
    forget = work.encode(list(req.forget))
    retain = work.encode(list(req.retain))
    text = (work.encode_texts(list(req.retain_text)) if st.text_weight and req.retain_text
            else None)
    sampler = Sampler(st.seed)
    # KL to the unedited model from its statistics, computed once (exact; see
    # ModelHandle.kl_reference), where the model's readout allows it and the unembedding stays
    exact_kl = fast and not bases and model.affine_readout and \
        not _trains_unembedding(work, slices)
    kl_ref = model.kl_reference(text) if (exact_kl and text is not None
                                           and st.text_loss == "kl") else None
    ref = None
    if st.method == "npo":
        with torch.no_grad():
            ref = torch.cat([_seq_logprob(work, b) for b in forget.chunks(256)])

    use_retain = st.method == "gd" or (st.method == "npo" and st.retain_weight > 0)
    kl_retain = model.kl_reference(retain) if (exact_kl and use_retain and len(retain)
                                               and st.retain_loss == "kl") else None
    # one forward for the three batches and one unembedding of every target position they
    # have: on a large vocabulary each pass over the unembedding costs about as much as the
    # whole body (Gemma: 262k x 640 floats read per pass, whatever the number of positions)
    fused = (fast and not bases and work.affine_readout
             and (text is None or st.text_loss == "nll" or kl_ref is not None)
             and (not use_retain or st.retain_loss == "nll" or kl_retain is not None))
    frozen_head = fused and not _trains_unembedding(work, slices)

    def fused_loss(fi: torch.Tensor, ri: torch.Tensor | None, ti: torch.Tensor | None
                   ) -> torch.Tensor:
        parts = [forget[fi]] + ([retain[ri]] if ri is not None else []) + \
            ([text[ti]] if ti is not None else [])
        batch = _concat(parts, work.tokenizer.pad_id)
        hidden = work.target_hidden(batch)  # [K, d_model], row-major over the rows
        mask = batch.target_mask[:, 1:].to(hidden.device)
        tok = batch.tokens[:, 1:].to(hidden.device)[mask]
        if frozen_head:  # one pass over the unembedding for the forward and the backward
            lse = work.readout_lse(hidden)
            logit = work.readout_logit(hidden, tok)
        else:
            z = work.unembed(hidden)
            lse = torch.logsumexp(z, -1)
            logit = z.gather(-1, tok[:, None].to(z.device))[:, 0]
        lp = logit.to(lse.device) - lse  # each target token's log-probability
        row = torch.repeat_interleave(torch.arange(len(batch), device=lp.device),
                                      mask.sum(1).to(lp.device))
        n_f = len(fi)
        is_f = row < n_f
        if st.method == "npo":
            seq = torch.zeros(n_f, dtype=lp.dtype, device=lp.device).index_add(
                0, row[is_f], lp[is_f])
            loss = -(2.0 / st.beta) * F.logsigmoid(-st.beta * (seq - ref[fi])).mean()
        else:
            loss = lp[is_f].sum() / is_f.sum().clamp(min=1)  # -NLL(forget)
        end = n_f
        if ri is not None:
            sel = (row >= end) & (row < end + len(ri))
            if st.retain_loss == "kl":
                keep = kl_retain.take(ri).kl(hidden[sel], lse[sel]).mean().to(lp.dtype)
            else:
                keep = -lp[sel].sum() / sel.sum().clamp(min=1)
            loss = loss + st.retain_weight * keep
            end += len(ri)
        if ti is not None:
            sel = row >= end
            if st.text_loss == "kl":
                keep = kl_ref.take(ti).kl(hidden[sel], lse[sel]).mean().to(lp.dtype)
            else:
                keep = -lp[sel].sum() / sel.sum().clamp(min=1)
            loss = loss + st.text_weight * keep
        return loss

    def loss_fn(_step: int) -> torch.Tensor:
        # one batch per split, drawn in this order: forget, retain, text
        fi = sampler.rows(len(forget), st.batch_size)
        if fused:
            ri = sampler.rows(len(retain), st.batch_size) if use_retain else None
            ti = sampler.rows(len(text), st.batch_size) if text is not None else None
            return fused_loss(fi, ri, ti)
        fb = forget[fi].trim()
        if st.method == "npo":
            lp = _seq_logprob(work, fb)
            loss = -(2.0 / st.beta) * F.logsigmoid(-st.beta * (lp - ref[fi])).mean()
        else:
            loss = -work.loss(fb)
        if use_retain:
            ri = sampler.rows(len(retain), st.batch_size)
            loss = loss + st.retain_weight * keep_text_loss(st.retain_loss, work, model,
                                                            retain[ri].trim())
        if text is not None:
            ti = sampler.rows(len(text), st.batch_size)
            loss = loss + st.text_weight * keep_text_loss(st.text_loss, work, model,
                                                          text[ti].trim())
        return loss

    project = _Projector(copy.params, copy.masks, bases) if bases else None
    try:
        copy.result = train(loss_fn, copy.params, steps=st.steps,
                            optim=Optim(st.optimizer, lr=st.lr), masks=copy.masks,
                            max_grad_norm=st.max_grad_norm, progress=progress,
                            desc=f"finetune ({st.method})", evaluate=project,
                            eval_every=1 if project else None)
    finally:
        if project is not None:
            project.remove()
        if isinstance(copy, SliceCopy):
            copy.remove()
    return copy


def _concat(batches: list[Batch], pad_id: int) -> Batch:
    """The rows of ``batches`` in one batch, right padded to the longest row."""
    T = max(int(b.lengths.max()) for b in batches)

    def pad(t: torch.Tensor, value) -> torch.Tensor:
        return F.pad(t[:, :T], (0, T - min(T, t.shape[1])), value=value)

    return Batch(torch.cat([pad(b.tokens, pad_id) for b in batches]),
                 torch.cat([pad(b.target_mask, False) for b in batches]),
                 torch.cat([pad(b.subject_mask, False) for b in batches]),
                 torch.cat([b.lengths for b in batches]))


def _trains_unembedding(work: ModelHandle, slices: dict[str, torch.Tensor]) -> bool:
    """Whether one of the trained parameters is the unembedding (or shares its storage: a tied
    embedding)."""
    head = work.readout()[1].untyped_storage().data_ptr()
    named = work.named_parameters()
    return any(named[s].untyped_storage().data_ptr() == head for s in slices)


def _whole_lines(idx: torch.Tensor, shape: tuple[int, int]
                 ) -> tuple[int, torch.Tensor] | None:
    """``(0, rows)`` when the flat indices ``idx`` of a ``[out, in]`` matrix are exactly some
    whole rows, ``(1, columns)`` when exactly some whole columns; None otherwise."""
    out, inn = shape
    flat = torch.sort(idx.reshape(-1).cpu()).values
    rows = torch.unique(flat // inn)
    if flat.numel() == rows.numel() * inn and torch.equal(
            flat, (rows[:, None] * inn + torch.arange(inn)).reshape(-1)):
        return 0, rows
    cols = torch.unique(flat % inn)
    if flat.numel() == out * cols.numel() and torch.equal(
            flat, (torch.arange(out)[:, None] * inn + cols).reshape(-1)):
        return 1, cols
    return None


class SliceCopy(MaskedCopy):
    """A :class:`MaskedCopy` in which every ``nn.Linear`` weight (``ModelHandle.
    linear_module``) whose slice is whole rows or whole columns - at most half of them: a
    neuron's ``W_gate`` / ``W_in`` rows and ``W_out`` column, a head's rows of ``W_Q/K/V`` and
    columns of ``W_O`` - trains as a small delta ``D`` (``[rows, in]`` or ``[out, columns]``,
    starting at zero) added by a forward hook on the module: ``y = x W^T + scatter(x D^T)``.
    The weight itself stays frozen, so no dense gradient of the whole matrix is computed,
    masked and stepped; the gradient of ``D`` is the masked path's gradient at those elements
    and Adam acts elementwise, so the edit is the same up to float rounding (``W + D``
    instead of ``W`` updated in place). Other slices train masked as in :class:`MaskedCopy`.
    ``params`` holds ``D`` under ``site + ":delta"``; :meth:`remove` takes the hooks off."""

    def __init__(self, model: ModelHandle, slices: dict[str, torch.Tensor]):
        super().__init__(model, slices)
        self.deltas: dict[str, tuple[int, torch.Tensor, torch.Tensor]] = {}
        self.handles = []
        for s, idx in slices.items():
            mod = self.work.linear_module(s)
            w = self.params[s]
            hit = _whole_lines(idx, tuple(w.shape)) if mod is not None and w.dim() == 2 else None
            if hit is None or 2 * hit[1].numel() > w.shape[hit[0]]:
                continue
            axis, lines = hit
            lines = lines.to(w.device)
            shape = (lines.numel(), w.shape[1]) if axis == 0 else (w.shape[0], lines.numel())
            delta = torch.zeros(shape, dtype=w.dtype, device=w.device, requires_grad=True)
            w.requires_grad_(False)
            del self.params[s], self.masks[s]
            self.params[f"{s}:delta"] = delta
            self.deltas[s] = (axis, lines, delta)
            self.handles.append(mod.register_forward_hook(
                self._hook(axis, lines, delta), prepend=True))

    @staticmethod
    def _hook(axis: int, lines: torch.Tensor, delta: torch.Tensor):
        def hook(_module, args, output):
            x = args[0].to(delta.device)  # (a sharded model's device hooks move it later)
            if axis == 0:  # rows: the selected outputs get x D^T added
                return output.index_add(-1, lines, torch.nn.functional.linear(x, delta))
            return output + torch.nn.functional.linear(x.index_select(-1, lines), delta)
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def new_values(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        named = self.work.named_parameters()
        out = {}
        for s, idx in self.slices.items():
            w = named[s].detach()
            if s in self.deltas:
                axis, lines, delta = self.deltas[s]
                w = w.clone()
                if axis == 0:
                    w[lines] += delta.detach()
                else:
                    w[:, lines] += delta.detach()
            out[s] = (idx, w.reshape(-1)[idx.to(w.device)])
        return out


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
