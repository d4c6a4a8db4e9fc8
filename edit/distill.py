"""UNDO-style distillation: perturb the located units, then distill the model's own outputs on
retain data back into them ("Distillation Robustifies Unlearning", 2025).

An unlearning edit that only suppresses leaves the information in the weights, where relearning
finds it. Distillation passes on behaviour, not weights: the *teacher* is the model as it stands
when ``distill`` is applied (earlier applied edits included, so a config chains e.g. masked NPO
then distill), the *student* is a copy whose ``units`` (default: the ``top`` neurons/heads of
``importance``; ``"all"``: every parameter, the global reference) were shrunk and perturbed,
``theta <- (1 - alpha) * theta + alpha * fresh`` (``fresh`` drawn like the tensor's
initialisation, :func:`edit._common.fresh_values`; ``alpha = 1`` re-initialises them whole).
Only those units then train, to match the teacher's full next-token distribution (``KL(p_teacher
|| p_student)`` over the vocabulary, averaged over every real position that predicts a next token;
with ``temperature`` T the teacher's is softened, ``softmax(logits / T)``, the student's is not)
on the request's retain facts and, weighted by ``text_weight``, its retain text - or, with
``labels="hard"``, the teacher's greedy token at each of those positions (cross-entropy: the
student learns what the teacher answers, not how much probability it keeps for every other token;
soft labels of a teacher that knew the forget facts can carry them), or with
``labels="hard_facts"`` greedy answers on the retain facts and whole distributions on the text
(greedy tokens alone on text leave a student that predicts text badly), or with
``labels="data_facts"`` the retain facts' own tokens (the answers the request gives: the
teacher's mistakes on retain facts, e.g. after an unlearning edit that damaged some, are not
copied) and the teacher's whole distributions on the text. What the teacher still does
on retain data is learned back; what it no longer does (the forgotten facts) is not, and the
perturbation removed what was left of it in those units.

The student's forward runs through ``engine`` (:data:`excise.fused.ENGINES`): by default
"fused" (:mod:`excise.fused`: the same GPT-2-style computation with fused torch ops, logits only
at the positions that predict a next token), "serial" through the handle; where the fused
forward does not apply (another handle or architecture, hooks, logits that differ from the
handle's) the serial path runs. Both compute the same loss to float precision, not bit for bit:
an edit made at one engine is reproduced at that engine (its parameters record which).

The teacher's log-probabilities are computed once up front (no gradients) when they fit in
``teacher_cache_mb``; otherwise per batch, from the teacher itself. Teacher hook edits (a
projection kept as a hook) shape its outputs, but the student is a plain weight copy: bake such
edits first if the student should carry them. Noise and batches come from generators seeded with
``seed``: same seed, same edit. The result is a weight diff of the units' slices (dense where most
of a tensor changes): revert is exact, the diff saves.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from edit._common import real_positions, start_unit_edit
from edit.finetune import OPTIMIZERS
from excise.checks import check_choice, check_number
from excise.edits import Edit, weight_edit
from excise.fused import ENGINES, engine_for
from excise.handle import Batch, ModelHandle
from excise.importance import Importance
from excise.sites import Selection
from excise.train import Optim, Sampler, train, warmup_decay

# what the student learns at each position, on the retain facts and on the retain text: the
# teacher's whole next-token distribution ("soft": KL), only its greedy token ("hard":
# cross-entropy to the argmax, hard-label distillation) or the data's own next token ("data")
MODES = {"soft": ("soft", "soft"), "hard": ("hard", "hard"), "hard_facts": ("hard", "soft"),
         "data_facts": ("data", "soft")}
LABELS = tuple(MODES)
# the learning rate over the steps: "constant", or "linear" - the organism's own training recipe
# (warm-up over the first 5% of the steps, then linear decay to 5% of ``lr``)
SCHEDULES = ("constant", "linear")


@dataclass(frozen=True)
class DistillSettings:
    """How :func:`distill` perturbs and distills (validated on construction)."""

    alpha: float = 0.5
    steps: int = 100
    lr: float = 3e-3
    batch_size: int = 32
    text_weight: float = 1.0
    optimizer: str = "adam"
    max_grad_norm: float = 1.0
    seed: int = 0
    teacher_cache_mb: float = 1024.0
    labels: str = "soft"
    schedule: str = "constant"
    shared_text: bool = False
    engine: str = "fused"
    text_batch: int | None = None
    temperature: float = 1.0

    def __post_init__(self):
        check_number("distill", "alpha", self.alpha, low=0, high=1, low_open=True)
        check_number("distill", "steps", self.steps, low=1, integer=True)
        check_number("distill", "lr", self.lr, low=0, low_open=True)
        check_number("distill", "batch_size", self.batch_size, low=1, integer=True)
        check_number("distill", "text_weight", self.text_weight, low=0)
        check_choice("distill", "optimizer", self.optimizer, OPTIMIZERS)
        check_number("distill", "max_grad_norm", self.max_grad_norm, low=0, low_open=True)
        check_number("distill", "seed", self.seed, low=0, integer=True)
        check_number("distill", "teacher_cache_mb", self.teacher_cache_mb, low=0)
        check_choice("distill", "labels", self.labels, LABELS)
        check_choice("distill", "schedule", self.schedule, SCHEDULES)
        check_choice("distill", "engine", self.engine, ENGINES)
        if self.text_batch is not None:
            try:
                check_number("distill", "text_batch", self.text_batch, low=1, integer=True)
            except ValueError as e:
                raise ValueError(f"{e}, or null for batch_size") from None
            if not self.text_weight:
                raise ValueError(f"distill: text_batch={self.text_batch} draws retain text, but "
                                 f"text_weight=0 trains on none; drop text_batch or set "
                                 f"text_weight above 0")
        check_number("distill", "temperature", self.temperature, low=0, low_open=True)
        if self.temperature != 1.0 and self.labels == "hard":
            raise ValueError(f"distill: temperature={self.temperature} softens whole "
                             f"distributions, but labels='hard' learns greedy tokens only; use "
                             f"labels 'soft', 'hard_facts' or 'data_facts', or drop temperature")
        if not isinstance(self.shared_text, bool):
            raise ValueError(f"distill: shared_text={self.shared_text!r}; must be true or false")

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("teacher_cache_mb")  # where the teacher's outputs are kept, not what is learned
        for name, default in (("schedule", "constant"), ("shared_text", False),
                              ("text_batch", None), ("temperature", 1.0)):
            if d[name] == default:  # the defaults: earlier edits' parameters unchanged
                d.pop(name)
        return d


def distill(model: ModelHandle, importance: Importance | None = None,
            units: Selection | str | None = None, *, request=None, top: int | float = 0.02,
            alpha: float = 0.5, steps: int = 100, lr: float = 3e-3, batch_size: int = 32,
            text_weight: float = 1.0, optimizer: str = "adam", max_grad_norm: float = 1.0,
            seed: int = 0, teacher_cache_mb: float = 1024.0, labels: str = "soft",
            schedule: str = "constant", shared_text: bool = False, engine: str = "fused",
            text_batch: int | None = None, temperature: float = 1.0,
            progress: bool = False) -> Edit:
    """Shrink-and-perturb the parameters of ``units`` by ``alpha``, then distill the model (as
    it stands) into them on the request's retain facts and retain text for ``steps`` steps.
    ``labels``: ``"soft"`` (the teacher's whole next-token distribution, as UNDO), ``"hard"``
    (its greedy token at each position only), ``"hard_facts"`` (greedy on the retain facts,
    whole distributions on the retain text) or ``"data_facts"`` (the retain facts' own tokens,
    whole distributions on the retain text). ``schedule``: the learning rate over the steps,
    ``"constant"`` or ``"linear"`` (:data:`SCHEDULES`). ``shared_text``: the request's shared
    facts' sentences join the retain text (they are not forget data and the model trained on
    them; a student re-drawn from scratch, ``units="all"``, cannot know them otherwise).
    ``engine``: the student's forward, ``"fused"`` or ``"serial"`` (module docstring).
    ``text_batch``: rows of retain text per step (default ``batch_size``); the facts keep
    ``batch_size``. ``temperature``: where the student learns whole distributions, the
    target is the teacher's softened, ``softmax(logits / T)``, while the student's own logits
    are not divided (T > 1: the student learns to be flatter than the teacher; greedy labels
    are unchanged). Returns the applied Edit."""
    st = DistillSettings(alpha, steps, lr, batch_size, text_weight, optimizer, max_grad_norm,
                         seed, teacher_cache_mb, labels, schedule, shared_text, engine,
                         text_batch, temperature)
    req, selection, copy, params = start_unit_edit(
        "distill", model, importance, units, top, request, "(the teacher's outputs on its "
        "retain facts and retain text are distilled)", st.to_dict(), st.alpha, st.seed)
    work = copy.work
    fact_mode, text_mode = MODES[st.labels]
    # (data, weight, mode, rows per step): the retain facts, then the retain text
    data = [(work.encode(list(req.retain)), 1.0, fact_mode, st.batch_size)]
    text = list(req.retain_text) + ([f.text for f in req.shared] if st.shared_text else [])
    if st.text_weight and text:
        data.append((work.encode_texts(text), st.text_weight, text_mode,
                     st.text_batch or st.batch_size))
    teachers = [None if mode == "data" else _Teacher(model, batch, st.teacher_cache_mb / len(data))
                for batch, _, mode, _ in data]
    sampler = Sampler(st.seed)
    fwd = engine_for(work, st.engine, data[0][0])
    params["engine"] = "serial" if fwd is None else "fused"  # what ran (fused may step aside)
    weights = work.named_parameters()

    def student_logprobs(b: Batch, mask: torch.Tensor) -> torch.Tensor:
        """``[n, V]``: the student's next-token log-probabilities at ``mask`` (row-major)."""
        if fwd is None:
            return torch.log_softmax(work.logits(b.tokens)[:, :-1].float(), -1)[mask]
        keep = torch.zeros(b.tokens.shape, dtype=torch.bool, device=mask.device)
        keep[:, :-1] = mask
        return torch.log_softmax(fwd(weights, b.tokens, None, keep).float(), -1)

    def loss_fn(_step: int) -> torch.Tensor:
        loss = None
        for (batch, weight, mode, size), teacher in zip(data, teachers):  # facts, then text
            rows = sampler.rows(len(batch), size)
            b = batch[rows].trim()
            mask = predicting(b).to(work.device)
            student = student_logprobs(b, mask)
            if mode == "data":
                term = weight * F.nll_loss(student, b.tokens[:, 1:].to(work.device)[mask])
            elif mode == "hard":
                term = weight * F.nll_loss(student, teacher.logprobs(rows, b)[mask].argmax(-1))
            else:
                target = teacher.logprobs(rows, b)[mask]
                if st.temperature != 1.0:  # log-probabilities differ from logits by a constant
                    target = torch.log_softmax(target / st.temperature, -1)
                term = weight * F.kl_div(student, target, log_target=True, reduction="batchmean")
            loss = term if loss is None else loss + term
        return loss

    copy.result = train(loss_fn, copy.params, steps=st.steps,
                        optim=Optim(st.optimizer, lr=st.lr), masks=copy.masks,
                        schedule=None if st.schedule == "constant" else warmup_decay(st.steps),
                        max_grad_norm=st.max_grad_norm, progress=progress, desc="distill")
    return weight_edit(model, "distill", params, selection, copy.new_values())


def predicting(batch: Batch) -> torch.Tensor:
    """``[n, T-1]`` bool: positions whose logits predict a next real token."""
    return real_positions(batch)[:, 1:]


class _Teacher:
    """The teacher's next-token log-probabilities ``[n, T-1, V]`` on one data set: computed once
    up front (no gradients, in chunks) when they fit in ``budget_mb``, else per batch."""

    def __init__(self, model: ModelHandle, batch: Batch, budget_mb: float, chunk: int = 256):
        self.model = model
        self.cached = None
        parts = []
        with torch.no_grad():
            for b in batch.chunks(chunk):
                parts.append(torch.log_softmax(model.logits(b.tokens)[:, :-1].float(), -1).cpu())
                n, t, v = len(batch), parts[0].shape[1], parts[0].shape[2]
                if n * t * v * 4 > budget_mb * 2 ** 20:  # (known after the first chunk)
                    return
        self.cached = torch.cat(parts)

    def logprobs(self, rows: torch.Tensor, b: Batch) -> torch.Tensor:
        """For the batch ``b`` (rows ``rows`` of the data set, trimmed): ``[n, T_b - 1, V]``."""
        if self.cached is not None:
            return self.cached[rows, :b.tokens.shape[1] - 1].to(self.model.device)
        with torch.no_grad():
            return torch.log_softmax(self.model.logits(b.tokens)[:, :-1].float(), -1)
