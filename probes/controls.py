"""Positive controls: models whose forget facts are known to be only *suppressed*.

A restoration attack proves something only if it brings back knowledge that is known to be
still there. Each control hides the forget facts while leaving them in the model:

- :func:`gradient_ascent`   a few steps of ascent on forget / descent on retain, all weights;
- :func:`unembed_ascent`    the same on the unembedding alone (the residual stream still
                            carries every fact; only the readout is bent);
- :func:`last_block_ascent` the same on the last ``blocks`` transformer blocks alone (every
                            block below, the embeddings and the unembedding untouched: the
                            readout bent where it can read the context, so it can spare
                            general text that the unembedding alone cannot);
- :func:`latent_suppression` per-latent gains in [floor, 1] on an SAE at one site, fitted to hide
                            the facts, applied as a persistent hook (weights untouched).

Attack settings are tuned on these (``bench/tune_attacks.py``, tests/test_probes.py), never on
the edit methods being judged. Every control works on a clone; the model passed in is unchanged.

``objective`` is what hides a fact: ``"ascent"`` raises its loss (clamped at 20 nats) - far past
the point where the answer stops being the greedy one, so the weights move far; ``"margin"`` only
pushes the answer's first token ``margin`` nats below the best other token (a hinge, zero for a
fact already hidden), the least change that hides it. ``text`` is how the retain text is kept
(with ``keep_text``): ``"nll"``, its loss, or ``"kl"``, the KL from the model's own next-token
distributions before the first step. On ``tiny`` (validation people 12..19, organism seeds 0 and
1, 100 steps at most, ``keep=10, keep_text=True``) the unembedding alone hides the facts with
``objective="margin", text="kl"`` - forget recall 0.083 / 0.075, retain and shared 1.0, general-text
perplexity 1.015x / 1.030x the original's - where under ``"margin"`` with ``"nll"`` it learned the
60 retain sentences and general-text perplexity rose 2.4x, and under ``"ascent"`` it never got
below 0.25 (:func:`last_block_ascent`). The whole model and the last block under the same
settings: forget 0.033 / 0.033 and 0.033 / 0.008, perplexity 0.97x / 1.01x and 0.92x / 0.93x.

``keep`` weighs the descent on retain data against the ascent, and ``keep_text`` adds the shared
facts and the request's retain text to it: with the defaults (1, False) a control hides the facts
at some cost to utility (on ``tiny`` retain recall falls to 0.58-0.80, enough for the verdict's
utility gate to call it damaged); ``keep=10, keep_text=True`` hides them with retain recall and
shared knowledge intact - the known-suppressed cases of the verdict's calibration
(``excise.app.calibrate``), which must pass the utility gate to test anything beyond it.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import torch

from excise.checks import check_choice, check_number
from excise.handle import Batch, ModelHandle
from excise.request import ForgetRequest
from excise.train import TEXT_LOSSES, Optim, train
from probes.attacks import gain_hook
from probes.behaviour import recall


def _retain_sample(items, max_retain: int, seed: int) -> list:
    items = list(items)
    return items if len(items) <= max_retain else random.Random(seed).sample(items, max_retain)


def step_sampler(rows: Batch, size: int, seed: int) -> Callable[[int], Batch]:
    """``step -> batch``: every row of ``rows`` when there are at most ``size``, otherwise
    ``size`` of them drawn afresh at each step (seeded by ``seed`` and the step: the same step
    draws the same rows), so a descent over many steps covers every row. A fixed sample kept
    only its own rows: on ``small`` (2,898 retain and shared facts, 512 a step; validation people
    50..59, both worlds) the last-block control kept retain recall 0.974 / 0.983 with one fixed
    sample, 0.992 / 0.991 with fresh draws."""
    if len(rows) <= size:
        return lambda step: rows

    def draw(step: int) -> Batch:
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        return rows[torch.randperm(len(rows), generator=g)[:size]].trim()
    return draw


OBJECTIVES = ("ascent", "margin")


def _text_keeper(model: ModelHandle, tb, text: str, hooks_fn=None):
    """``hooks -> loss`` keeping the model's behaviour on the text batch ``tb`` (0 without
    text): its mean token loss (``"nll"``) or the mean KL from the model's next-token
    distributions at the text's target positions as they are now (``"kl"``)."""
    if tb is None:
        return lambda hooks: 0.0
    if text == "nll":
        return lambda hooks: model.loss(tb, hooks)
    with torch.no_grad():
        ref = model.target_logprobs(tb, hooks_fn() if hooks_fn else None)  # [k, V]

    def kl(hooks) -> torch.Tensor:
        lp = model.target_logprobs(tb, hooks)
        return torch.nn.functional.kl_div(lp, ref, log_target=True, reduction="batchmean")
    return kl


def hide_loss(model: ModelHandle, batch, hooks=None, objective: str = "ascent",
              margin: float = 1.0) -> torch.Tensor:
    """What :func:`ascend` minimises on the forget facts: ``"ascent"``, minus their mean token
    loss clamped at 20 nats; ``"margin"``, the mean over facts of ``relu(lp(answer) - max lp(other)
    + margin)`` at each fact's first target token (zero once the answer trails by ``margin``)."""
    if objective == "ascent":
        return -model.loss(batch, hooks).clamp(max=20)
    mask = batch.target_mask[:, 1:]
    first = mask & (mask.cumsum(1) == 1)  # [n, T-1]: the position predicting the first target
    logits = model.logits(batch.tokens, hooks)[:, :-1]
    lp = torch.log_softmax(logits[first.to(logits.device)].float(), -1)  # [n, V]
    answer = batch.tokens[:, 1:][first].to(lp.device)
    own = lp.gather(1, answer[:, None]).squeeze(1)
    other = lp.scatter(1, answer[:, None], float("-inf")).max(1).values
    return torch.relu(own - other + margin).mean()


def ascend(model: ModelHandle, params, request: ForgetRequest, steps: int, lr: float,
           stop: float, hooks_fn=None, max_retain: int = 512, seed: int = 0,
           keep: float = 1.0, keep_text: bool = False, objective: str = "ascent",
           margin: float = 1.0, text: str = "nll") -> int:
    """Adam on :func:`hide_loss` of the forget facts (``objective``) plus ``keep`` x descent on
    retain, over ``params`` only, until forget recall <= ``stop`` (checked every 5 steps and
    after the last). ``keep_text``: the descent also covers the shared facts and the retain text.
    At most ``max_retain`` kept facts per step (a fresh seeded sample each step when there are
    more: the descent covers all of them) and ``max_retain`` retain texts (one fixed sample,
    the KL's reference); ``text``: how the text is kept - ``"nll"``, its loss, or
    ``"kl"``, the KL from the model as it was before the first step (its next-token
    distributions on the text, computed once), which keeps what the model says on text without
    teaching it those sentences. Changes ``model`` in place; returns the steps taken.
    ``hooks_fn()`` builds the hooks of each step (for hook-parameterised controls)."""
    if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not keep > 0:
        raise ValueError(f"keep={keep!r}: must be a number > 0 (the weight of the descent on "
                         f"retain data against the ascent)")
    check_choice("ascend", "objective", objective, list(OBJECTIVES))
    check_number("ascend", "margin", margin, low=0.0)
    check_choice("ascend", "text", text, list(TEXT_LOSSES))
    fb = model.encode(list(request.forget))
    keep_facts = request.retain.facts + (request.shared.facts if keep_text else ())
    kept_batch = step_sampler(model.encode(list(keep_facts)), max_retain, seed)
    texts = _retain_sample(request.retain_text, max_retain, seed) if keep_text else []
    tb = model.encode_texts(texts) if texts else None
    text_loss = _text_keeper(model, tb, text, hooks_fn)

    def loss(step: int) -> torch.Tensor:
        hooks = hooks_fn() if hooks_fn else None
        kept = model.loss(kept_batch(step), hooks) + text_loss(hooks)
        return hide_loss(model, fb, hooks, objective, margin) + keep * kept

    def hidden(_done: int) -> bool:
        hk = hooks_fn() if hooks_fn else None
        return recall(model, request.forget, hooks=hk) <= stop

    return train(loss, params, steps=steps, optim=Optim("adam", lr=lr), evaluate=hidden,
                 eval_every=5).steps


def gradient_ascent(model: ModelHandle, request: ForgetRequest, steps: int = 40,
                    lr: float = 3e-4, stop: float = 0.05, keep: float = 1.0,
                    keep_text: bool = False, objective: str = "ascent",
                    text: str = "nll") -> ModelHandle:
    m = model.clone()
    for p in m.named_parameters().values():
        p.requires_grad_(True)
    ascend(m, list(m.named_parameters().values()), request, steps, lr, stop, keep=keep,
           keep_text=keep_text, objective=objective, text=text)
    return m


def unembed_ascent(model: ModelHandle, request: ForgetRequest, steps: int = 60,
                   lr: float = 3e-3, stop: float = 0.1, keep: float = 1.0,
                   keep_text: bool = False, objective: str = "ascent",
                   text: str = "nll") -> ModelHandle:
    m = model.clone()
    params = [p for n, p in m.named_parameters().items() if n.startswith("unembed.")]
    if not params:
        raise ValueError("unembed_ascent needs parameters named 'unembed.*' (TransformerLens)")
    for p in m.named_parameters().values():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    ascend(m, params, request, steps, lr, stop, keep=keep, keep_text=keep_text,
           objective=objective, text=text)
    return m


def last_block_ascent(model: ModelHandle, request: ForgetRequest, blocks: int = 1,
                      steps: int = 100, lr: float = 1e-3, stop: float = 0.05,
                      keep: float = 1.0, keep_text: bool = False,
                      objective: str = "ascent", text: str = "nll") -> ModelHandle:
    """Ascent (:func:`ascend`) on the parameters of the last ``blocks`` blocks only
    (``blocks.{L}.*``, TransformerLens names). On ``tiny`` (validation people 12..19, 100 steps,
    ``keep=10, keep_text=True``) lr 1e-3 hides the facts (forget recall 0.025) with retain and
    shared recall 1.0 and general-text perplexity 0.88x the original's, where
    :func:`unembed_ascent` never got below forget recall 0.25 (that at 18x the perplexity; 0.42
    or above wherever perplexity stayed under 2x; 16 settings of lr, steps and ``keep``)."""
    layers = model.n_layers
    check_number("last_block_ascent", "blocks", blocks, low=1, high=layers, integer=True)
    m = model.clone()
    prefixes = tuple(f"blocks.{L}." for L in range(layers - blocks, layers))
    params = [p for n, p in m.named_parameters().items() if n.startswith(prefixes)]
    if not params:
        raise ValueError(f"last_block_ascent needs parameters named {prefixes[0]}* "
                         f"(TransformerLens)")
    for p in params:  # the rest needs no requires_grad_(False): train() feeds only these
        p.requires_grad_(True)
    ascend(m, params, request, steps, lr, stop, keep=keep, keep_text=keep_text,
           objective=objective, text=text)
    return m


def latent_suppression(model: ModelHandle, request: ForgetRequest, sae, site: str,
                       scale: float = 1.0, steps: int = 300, lr: float = 0.2,
                       floor: float = 0.02, stop: float = 0.0, keep: float = 1.0,
                       keep_text: bool = False, objective: str = "ascent",
                    text: str = "nll") -> ModelHandle:
    """Per-latent gains ``floor + (1 - floor) * sigmoid(theta)`` (every latent only dampened)
    fitted to hide the forget facts; the clone carries them as a persistent hook at ``site``."""
    m = model.clone()
    for p in m.named_parameters().values():
        p.requires_grad_(False)
    theta = torch.full((sae.W_dec.shape[0],), 4.0, device=sae.W_dec.device, requires_grad=True)

    def gains():
        return floor + (1 - floor) * torch.sigmoid(theta)

    ascend(m, [theta], request, steps, lr, stop, hooks_fn=lambda: {site: gain_hook(
        sae, gains(), scale)}, keep=keep, keep_text=keep_text, objective=objective, text=text)
    m.add_persistent_hook(site, gain_hook(sae, gains().detach(), scale))
    return m
