"""Behaviour: does the model still produce the facts? Greedy recall and perplexity.

Recall of a fact is exact greedy reproduction of its target. It is computed teacher-forced in
one forward pass per batch: every target token must be the argmax given the prompt and the
target tokens before it - which is exactly when greedy decoding reproduces the target.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from excise.handle import Batch, ModelHandle
from excise.request import FactSet


@torch.inference_mode()
def fact_hits(model: ModelHandle, facts: FactSet | Sequence | Batch, batch_size: int = 256,
              hooks=None) -> torch.Tensor:
    """Per fact: True when the greedy continuation equals the target. ``[n]`` bool. ``facts``
    may be a Batch already encoded (``model.encode(facts)``), so a caller measuring the same
    facts many times (an attack curve) encodes them once."""
    if not isinstance(facts, Batch):
        facts = list(facts)
        if not facts:
            return torch.zeros(0, dtype=torch.bool)
        facts = model.encode(facts)
    if len(facts) == 0:
        return torch.zeros(0, dtype=torch.bool)
    out = []
    for b in facts.chunks(batch_size):
        logits = model.logits(b.tokens, hooks)  # [n, T, V]
        out.append(greedy_hits(logits[:, :-1], b)[1].cpu())  # a small result, for reports
    return torch.cat(out)


def greedy_hits(scores: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """From next-token scores ``[n, T-1, V]`` (logits or log-probabilities at positions
    0..T-2): the greedy prediction per position ``[n, T-1]`` and, per row, whether it equals
    every target token ``[n]`` bool (on the device of ``scores``)."""
    pred = scores.argmax(-1)  # [n, T-1]
    m = batch.target_mask[:, 1:].to(pred.device)
    ok = (pred == batch.tokens[:, 1:].to(pred.device)) | ~m
    return pred, ok.all(1)


def recall(model: ModelHandle, facts: FactSet | Sequence, batch_size: int = 256,
           hooks=None) -> float:
    """Fraction of facts recalled greedily (nan for an empty set)."""
    hits = fact_hits(model, facts, batch_size, hooks)
    return float(hits.float().mean()) if len(hits) else float("nan")


@torch.inference_mode()
def target_logprobs(model: ModelHandle, facts: FactSet | Sequence, batch_size: int = 256,
                    hooks=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed target log-probability and target length per fact: ``([n], [n])``."""
    lps, lens = [], []
    for b in model.encode(list(facts)).chunks(batch_size):
        lp = model.token_logprobs(b, hooks)
        lps.append(lp.sum(1))
        lens.append(b.target_mask[:, 1:].sum(1).to(lp.device))
    return torch.cat(lps), torch.cat(lens)


@torch.inference_mode()
def perplexity(model: ModelHandle, texts: Sequence[str], batch_size: int = 256,
               hooks=None) -> float:
    """Perplexity of general text (every token after the first word)."""
    if not texts:
        return float("nan")
    total, count = 0.0, 0
    for b in model.encode_texts(list(texts)).chunks(batch_size):
        lp = model.token_logprobs(b, hooks)
        total += float(lp.sum())
        count += int(b.target_mask[:, 1:].sum())
    return math.exp(-total / max(1, count))


# the request's fact splits behaviour measures, and the metric each one's recall is
SPLITS = {"forget": "forget_recall", "retain": "retain_recall", "holdout": "holdout_recall",
          "shared": "shared_recall", "paraphrase": "paraphrase_recall",
          "neighbors": "neighbor_recall"}


def behaviour_hits(model: ModelHandle, request) -> dict[str, torch.Tensor]:
    """Per-fact greedy correctness (``[n]`` bool, in the request's order) of every split
    behaviour measures: forget, retain, holdout, shared, and paraphrase / neighbors where the
    request has them. One forward pass per batch; recall is the mean."""
    out = {}
    for split in SPLITS:
        facts = getattr(request, split)
        if split in ("forget", "retain", "holdout", "shared") or len(facts):
            out[split] = fact_hits(model, facts)
    return out


def measure_behaviour(model: ModelHandle, request
                      ) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """``(behaviour_metrics, behaviour_hits)`` from one pass over every split: the metrics and
    the per-fact correctness they are the means of (the verdict's bootstrap reads those)."""
    hits = behaviour_hits(model, request)
    forget = _by_form(hits["forget"], request.forget, "forget")
    m = {"forget_recall": forget.pop("forget_recall")}
    for split in ("retain", "holdout", "shared"):
        m[SPLITS[split]] = _mean(hits[split])
    m["perplexity"] = perplexity(model, request.general)
    m.update(forget)
    if "paraphrase" in hits:
        m.update(_by_form(hits["paraphrase"], request.paraphrase, "paraphrase"))
    if "neighbors" in hits:
        m["neighbor_recall"] = _mean(hits["neighbors"])
    return m, hits


def behaviour_metrics(model: ModelHandle, request) -> dict[str, float]:
    """Recall on every split of the request (forget also by form; paraphrases by form),
    perplexity on general text, shared-knowledge accuracy."""
    return measure_behaviour(model, request)[0]


def _mean(hits: torch.Tensor) -> float:
    return float(hits.float().mean()) if len(hits) else float("nan")


def _by_form(hits: torch.Tensor, facts, name: str) -> dict[str, float]:
    """``{name}_recall`` and, when the set mixes forms, ``{name}_{form}_recall``."""
    facts = list(facts)
    hits = hits.float()
    out = {f"{name}_recall": _mean(hits)}
    for form in ("statement", "question"):
        sel = torch.tensor([f.form == form for f in facts], dtype=torch.bool)
        if 0 < int(sel.sum()) < len(facts):
            out[f"{name}_{form}_recall"] = float(hits[sel].mean())
    return out


def first_target_positions(batch: Batch) -> torch.Tensor:
    """Index of the first target token per row ``[n]``; the last prompt token is one before."""
    return batch.target_mask.float().argmax(1)
