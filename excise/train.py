"""The one training loop every trainer in excise runs on, and the one batch sampler.

:func:`train` takes the parameters to train and a loss function of the step; the loss function
draws its own batch (from a :class:`Sampler`), so each caller keeps only what differs - its data
and its objective. Everything else is shared: the optimizer (:class:`Optim`: Adam, AdamW, SGD or
L-BFGS), an optional learning-rate schedule, elementwise gradient masks per parameter, gradient
clipping, an evaluation callback every ``eval_every`` steps (it may stop training early), and a
tqdm progress bar. Users: the organism's recipe (``excise.organism``), SAE training
(``excise.sae``), ``edit.finetune`` / ``reinit`` / ``distill``, ``edit.project``'s probe fit,
``locate.subnetwork``'s mask, every fine-tuning attack and the positive controls in ``probes``.

One step, always in this order (the order fixes the float results)::

    loss = loss_fn(step)         # forward pass on the batch loss_fn draws
    optimizer.zero_grad()        # grads set to None
    backward(loss, inputs=trained)   # into the trained tensors only
    grad *= mask                 # per parameter, where a mask is given
    clip_grad_norm_(params, max_grad_norm)   # when given
    optimizer.step()
    schedule.step()              # when given
    evaluate(step + 1)           # every eval_every steps and after the last, under no_grad

Gradients reach the trained tensors and nothing else: :func:`train` accumulates gradients into
exactly the tensors it trains (``torch.autograd.backward(loss, inputs=trained)``), so a model's
other weights keep ``.grad`` untouched and need no ``requires_grad_(False)`` - a
localizer can train a mask over a user's model without cloning it or leaving gradients in it,
and no backward work is spent on tensors that are not trained.

L-BFGS runs the same zero_grad / loss / gradient / mask / clip sequence as its closure (it may
call it several times per step, so its loss function should not draw a new batch).

Half-precision parameters (bfloat16, float16: a model loaded with ``dtype=``) train through
float32 master copies: the forward and backward run in the model's dtype, each gradient is
cast to float32 onto its master, the mask, the clipping and the optimizer (its state in
float32 too) act on the masters, and the result is rounded back into the parameter after
every step. An update far below the parameter's rounding step (Adam at lr 3e-4 moves a weight
of 0.05 by ~0.6%, about one bfloat16 step) thus accumulates instead of being rounded away,
and elements masked out stay bit for bit as they were. The ``evaluate`` callback may change
the parameters (CIR's projection does): elements it changed are read back into the masters.
float32 / float64 parameters train as they are (no copies).

Same seed, same draws: a :class:`Sampler` owns one ``torch.Generator``, and every batch is drawn
from it in the order the loss function asks. Same seed, same weights: every step runs with
deterministic algorithms (:func:`deterministic`), so on the CPU, at a given torch version and
thread count, a training run is bit-reproducible (tested at two threads). The mode is warn-only:
an op with no deterministic kernel (some CUDA kernels) warns and runs as before, so on such a
device the promise holds only where no such warning appears; :func:`reproducible` (the
organism's recipe) is strict.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Callable, Iterator, Mapping, Sequence

import torch
from torch import Tensor

OPTIMIZERS = ("adam", "adamw", "sgd", "lbfgs")
# how a training step keeps general text modelled: its loss, or the KL from a reference model's
# next-token distributions (edit.finetune / reinit / distill, probes.controls)
TEXT_LOSSES = ("nll", "kl")
LINE_SEARCHES = (None, "strong_wolfe")


@dataclass(frozen=True)
class Optim:
    """Which optimizer and its settings. ``betas`` apply to Adam/AdamW, ``max_iter`` and
    ``line_search`` to L-BFGS (iterations within one step); ``weight_decay`` to all but
    L-BFGS. The defaults are torch's, except AdamW's ``weight_decay`` (0 here: say it).
    ``fused`` (Adam/AdamW): torch's fused kernel, one pass over every parameter per step instead
    of a loop of elementwise ops per tensor - the same update up to float rounding, so not bit
    for bit the loop's; the organism's recipe uses it (on ``small`` the loop's step took about
    15 ms of a 90 ms training step), every other trainer keeps the loop."""

    name: str = "adam"
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    max_iter: int = 20
    line_search: str | None = None
    fused: bool = False

    def __post_init__(self):
        if self.name not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.name!r}; choose one of {list(OPTIMIZERS)}")
        if not self.lr > 0:
            raise ValueError(f"optimizer lr={self.lr!r}: must be > 0")
        if self.weight_decay < 0:
            raise ValueError(f"optimizer weight_decay={self.weight_decay!r}: must be >= 0")
        if self.name == "lbfgs" and self.weight_decay:
            raise ValueError(f"optimizer 'lbfgs' has no weight_decay (got "
                             f"{self.weight_decay!r}); add an L2 term to the loss instead")
        if not (isinstance(self.max_iter, int) and self.max_iter >= 1):
            raise ValueError(f"optimizer max_iter={self.max_iter!r}: must be an integer >= 1")
        if not isinstance(self.fused, bool) or (self.fused and self.name not in ("adam",
                                                                                 "adamw")):
            raise ValueError(f"optimizer fused={self.fused!r}: a bool, True only for 'adam' and "
                             f"'adamw' (got optimizer {self.name!r})")
        if self.line_search not in LINE_SEARCHES:
            raise ValueError(f"optimizer line_search={self.line_search!r}; choose one of "
                             f"{list(LINE_SEARCHES)}")

    def build(self, params: Sequence[Tensor]) -> torch.optim.Optimizer:
        if self.name == "adam":
            return torch.optim.Adam(params, lr=self.lr, betas=self.betas,
                                    weight_decay=self.weight_decay, fused=self.fused or None)
        if self.name == "adamw":
            return torch.optim.AdamW(params, lr=self.lr, betas=self.betas,
                                     weight_decay=self.weight_decay, fused=self.fused or None)
        if self.name == "sgd":
            return torch.optim.SGD(params, lr=self.lr, weight_decay=self.weight_decay)
        return torch.optim.LBFGS(params, lr=self.lr, max_iter=self.max_iter,
                                 line_search_fn=self.line_search)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class TrainResult:
    """What a run of :func:`train` did: the loss of every step taken (for L-BFGS, the loss at
    the start of each step), whether the evaluation callback stopped it early, and the wall
    seconds of every step (the evaluation callback not included)."""

    losses: tuple[float, ...]
    stopped_early: bool = False
    seconds: tuple[float, ...] = ()

    @property
    def steps(self) -> int:
        return len(self.losses)


LossFn = Callable[[int], Tensor]
EvalFn = Callable[[int], "bool | None"]


def warmup_decay(steps: int) -> Callable[[int], float]:
    """The organism's learning-rate multiplier of each step (a ``schedule`` for :func:`train`):
    linear warm-up over the first 5% of ``steps``, then linear decay to 5% of the rate."""
    warmup = max(1, steps // 20)
    return lambda s: min(1.0, (s + 1) / warmup) * max(0.05, 1 - s / steps)


def train(loss_fn: LossFn, params: Mapping[str, Tensor] | Sequence[Tensor], *, steps: int,
          optim: Optim = Optim(), schedule: Callable[[int], float] | None = None,
          max_grad_norm: float | None = None, masks: Mapping[str, Tensor] | None = None,
          evaluate: EvalFn | None = None, eval_every: int | None = None,
          progress: bool = False, desc: str = "train") -> TrainResult:
    """Train ``params`` for ``steps`` steps on ``loss_fn(step)`` (``step`` counts from 0; the
    function draws its own batch and returns a scalar loss).

    ``params``: the tensors to train, by name (a dict) or as a list; each must require grad.
    ``optim``: the optimizer. ``schedule``: ``lr multiplier of step`` (a ``LambdaLR``, stepped
    after every optimizer step). ``masks``: ``{name: bool or 0/1 tensor shaped like the
    parameter}`` - that parameter's gradient is multiplied by it before clipping, so only the
    masked-in elements train (needs ``params`` as a dict). ``max_grad_norm``: clip the global
    gradient norm. ``evaluate(steps_done)`` runs under ``no_grad`` every ``eval_every`` steps and
    after the last one; a True return stops training there. ``progress``: a tqdm bar (``desc``)."""
    from tqdm.auto import tqdm

    named = dict(params) if isinstance(params, Mapping) else \
        {str(i): p for i, p in enumerate(params)}
    if not named:
        raise ValueError("train: no parameters to train")
    if not (isinstance(steps, int) and steps >= 1):
        raise ValueError(f"train: steps={steps!r}; need an integer >= 1")
    if max_grad_norm is not None and not max_grad_norm > 0:
        raise ValueError(f"train: max_grad_norm={max_grad_norm!r}; need a number > 0 or None")
    if evaluate is not None and not (isinstance(eval_every, int) and eval_every >= 1):
        raise ValueError(f"train: eval_every={eval_every!r}; an evaluate callback needs an "
                         f"integer >= 1")
    frozen = [n for n, p in named.items() if not p.requires_grad]
    if frozen:
        raise ValueError(f"train: parameter {frozen[0]!r} does not require grad; call "
                         f"requires_grad_(True) on every tensor it should train")
    masters = _Masters(named)
    mask_list = [(masters.of(p), m) for p, m in _masks(named, masks)]
    tensors = [masters.of(p) for p in named.values()]  # what the optimizer steps
    leaves = list(named.values())  # what autograd differentiates (the parameters themselves)
    opt = optim.build(tensors)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule) if schedule is not None else None

    def backward(value: Tensor) -> None:
        """Gradients of ``value`` accumulated into the trained tensors only (``inputs=``: the
        same engine and accumulation as ``loss.backward()``, gradient checkpointing included;
        ``None`` where the loss does not depend on one)."""
        torch.autograd.backward(value, inputs=leaves)
        masters.take_grads()
        for p, m in mask_list:
            if p.grad is not None:
                p.grad.mul_(m)
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(tensors, max_grad_norm)

    losses: list[float] = []
    seconds: list[float] = []
    stopped = False
    bar = tqdm(range(steps), desc=desc, disable=not progress, leave=False)
    with torch.enable_grad(), deterministic():
        for step in bar:
            t0 = time.perf_counter()
            if optim.name == "lbfgs":
                def closure(step: int = step) -> Tensor:
                    masters.write_back()  # L-BFGS evaluates at points of its own
                    opt.zero_grad()
                    value = loss_fn(step)
                    backward(value)
                    return value

                loss = opt.step(closure)
            else:
                loss = loss_fn(step)
                opt.zero_grad()
                backward(loss)
                opt.step()
            masters.write_back()
            if sched is not None:
                sched.step()
            losses.append(float(loss.detach()))
            seconds.append(time.perf_counter() - t0)
            if step % 50 == 0:
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
            done = step + 1
            if evaluate is not None and (done % eval_every == 0 or done == steps):
                with torch.no_grad():
                    stop = evaluate(done)
                    masters.read_changes()
                    if stop:
                        stopped = done < steps
                        break
    bar.close()
    return TrainResult(tuple(losses), stopped, tuple(seconds))


@contextmanager
def using_threads(threads: int | None) -> Iterator[int]:
    """Run the enclosed code at ``threads`` torch intra-op threads (None: as the process is
    set up - torch reads ``OMP_NUM_THREADS`` at start, else uses every core); yields the count
    in effect and restores the caller's afterwards. Pick it deliberately where other processes
    share the cores: several torch processes each at every core's count slow each other down
    many times over."""
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int)
                                or threads < 1):
        raise ValueError(f"threads={threads!r}: need an integer >= 1, or None for the process's "
                         f"setting")
    prev = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(prev)


@contextmanager
def deterministic(strict: bool = False) -> Iterator[None]:
    """``torch.use_deterministic_algorithms(True)`` inside - warn-only (an op with no
    deterministic kernel warns instead of failing) unless ``strict`` - and uninitialised memory
    left unfilled (nothing here reads memory it did not write; filling every new empty tensor
    with NaN, the mode's default, only costs time); the caller's three settings are restored
    after. A caller that already has the mode on keeps its own setting unless ``strict``.
    Every :func:`train` runs in it: on the CPU with more than one thread the backward of an
    indexed read (``W_E[tokens]``) otherwise adds with unordered atomics, and the same seed gave
    different weights from run to run (``edit.distill`` on ``tiny`` at two threads: the
    embedding 1.5e-8 apart after one step; the calibration's distilled model failed the SAE
    attack check in one run and passed it in the next)."""
    import torch.utils.deterministic as det

    prev, prev_warn = (torch.are_deterministic_algorithms_enabled(),
                       torch.is_deterministic_algorithms_warn_only_enabled())
    prev_fill = det.fill_uninitialized_memory
    if strict or not prev:
        torch.use_deterministic_algorithms(True, warn_only=not strict)
        det.fill_uninitialized_memory = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev, warn_only=prev_warn)
        det.fill_uninitialized_memory = prev_fill


@contextmanager
def reproducible(threads: int) -> Iterator[None]:
    """Run the enclosed code bit-reproducibly for a given torch version: at ``threads``
    intra-op threads under :func:`deterministic` (strict); the caller's thread count and
    deterministic settings are restored afterwards.

    Why both: on the CPU, with more than one thread, the backward of an indexed read
    (``W_E[tokens]``, every embedding) adds its gradients with unordered atomic float adds -
    the sums differ in the last bits from run to run - unless deterministic algorithms are on;
    and any reduction split across threads adds in an order fixed by the thread count."""
    if isinstance(threads, bool) or not (isinstance(threads, int) and threads >= 1):
        raise ValueError(f"reproducible: threads={threads!r}; need an integer >= 1")
    with using_threads(threads), deterministic(strict=True):
        yield


class _Masters:
    """float32 master copies of the half-precision parameters among ``named`` (see the module
    docstring); float32 / float64 parameters are their own masters."""

    def __init__(self, named: Mapping[str, Tensor]):
        self.pairs: list[tuple[Tensor, Tensor]] = []  # (parameter, its float32 master)
        self._master: dict[int, Tensor] = {}
        for p in named.values():
            if not p.is_floating_point() or p.dtype in (torch.float32, torch.float64):
                continue
            p.grad = None  # a gradient left from before would add to the first step's
            m = p.detach().float().requires_grad_(True)  # a new tensor: p is not float32
            self.pairs.append((p, m))
            self._master[id(p)] = m

    def of(self, p: Tensor) -> Tensor:
        return self._master.get(id(p), p)

    def take_grads(self) -> None:
        """Each parameter's gradient, cast to float32, onto its master (the parameter's own
        gradient cleared, so the next backward starts from nothing)."""
        for p, m in self.pairs:
            m.grad = None if p.grad is None else p.grad.float()
            p.grad = None

    @torch.no_grad()
    def write_back(self) -> None:
        """The masters rounded into the parameters (the parameters' own dtype)."""
        for p, m in self.pairs:
            p.copy_(m)

    @torch.no_grad()
    def read_changes(self) -> None:
        """Elements of a parameter changed outside the optimizer (an ``evaluate`` callback)
        into its master; the others keep the master's float32 value."""
        for p, m in self.pairs:
            changed = p != m.to(p.dtype)
            if bool(changed.any()):
                m[changed] = p[changed].float()


def _masks(named: dict[str, Tensor], masks: Mapping[str, Tensor] | None
           ) -> list[tuple[Tensor, Tensor]]:
    if not masks:
        return []
    out = []
    for name, m in masks.items():
        if name not in named:
            raise ValueError(f"train: a mask is given for {name!r}, which is not among the "
                             f"parameters trained ({sorted(named)[:5]}...)")
        p = named[name]
        if tuple(m.shape) != tuple(p.shape):
            raise ValueError(f"train: the mask for {name!r} has shape {tuple(m.shape)}, the "
                             f"parameter {tuple(p.shape)}")
        out.append((p, m.to(p.device)))
    return out


class Sampler:
    """Seeded batch rows: one ``torch.Generator`` (seeded with ``seed``), draws in call order.

    - :meth:`rows`: ``k`` distinct rows of ``n``, a fresh permutation at every call;
    - :meth:`mixed`: rows of one batch over ``train + mix`` data (training rows plus a ratio of
      mixed-in rows, e.g. retain facts mixed into a relearning batch);
    - :meth:`with_replacement`: ``k`` rows of ``n`` drawn independently;
    - :meth:`epochs`: batches of ``k`` walking through shuffled epochs of ``n`` rows (the
      remainder of an epoch that does not fill a batch is skipped).
    """

    def __init__(self, seed: int):
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)

    def rows(self, n: int, k: int) -> Tensor:
        """Up to ``k`` distinct rows out of ``n`` (a random permutation, cut)."""
        return torch.randperm(n, generator=self.generator)[:k]

    def with_replacement(self, n: int, k: int) -> Tensor:
        return torch.randint(0, n, (k,), generator=self.generator)

    def mixed(self, n_train: int, n_mix: int, batch: int, mix_ratio: float) -> Tensor:
        """Rows of one batch over ``train + mix`` data (mix rows numbered after the training
        rows): up to ``batch`` training rows plus ``mix_ratio`` x as many mixed-in rows (a full
        batch of mix rows when there is no training data)."""
        parts = []
        k = min(n_train, batch)
        if k:
            parts.append(self.rows(n_train, k))
        k_mix = min(n_mix, round(mix_ratio * k) if n_train else batch)
        if k_mix:
            parts.append(n_train + self.rows(n_mix, k_mix))
        if not parts:
            raise ValueError(f"Sampler.mixed: an empty batch (n_train={n_train}, "
                             f"n_mix={n_mix}, batch={batch}, mix_ratio={mix_ratio})")
        return torch.cat(parts)

    def epochs(self, n: int, k: int) -> Iterator[Tensor]:
        """Endless batches of ``k`` rows: a shuffled epoch of ``n`` rows, cut into batches; a
        new permutation when the next batch would run past the end (``k >= n``: every batch is
        all ``n`` rows, reshuffled)."""
        if n < 1 or k < 1:
            raise ValueError(f"Sampler.epochs: need rows and a batch size >= 1 (n={n}, k={k})")
        perm = torch.randperm(n, generator=self.generator)
        pos = 0
        while True:
            if pos + k > n:
                perm = torch.randperm(n, generator=self.generator)
                pos = 0
            yield perm[pos:pos + k]
            pos += k
