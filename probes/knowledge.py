"""Knowledge screening: which facts does a model produce before any edit?

A forget fact the model never produced cannot be forgotten, and a neighbour it never produced
cannot show that nearby knowledge survived. ``screen_known`` drops them from a request and
reports them (real models: ``excise run`` with ``model:``). "Known" is exact greedy recall, the
same test as :func:`probes.behaviour.recall`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch

from excise.handle import ModelHandle
from excise.request import Fact, FactSet, ForgetRequest
from probes.behaviour import greedy_hits


def knowledge(model: ModelHandle, facts: FactSet | Sequence[Fact],
              batch_size: int = 16) -> list[dict]:
    """Per fact, before any edit: does the model produce the target greedily (``known``), the
    target's log-probability (summed over its tokens, ``target_logprob``) and the greedy answer's
    first token id (``greedy_first``)."""
    facts = list(facts)
    out: list[dict] = []
    if not facts:
        return out
    i = 0
    with torch.inference_mode():
        for b in model.encode(facts).chunks(batch_size):
            logits = model.logits(b.tokens).float()
            lp = torch.log_softmax(logits[:, :-1], -1)  # [n, T-1, V]
            pred, hit = greedy_hits(lp, b)
            tgt = b.tokens[:, 1:].to(lp.device)
            m = b.target_mask[:, 1:].to(lp.device)
            tlp = (lp.gather(-1, tgt[..., None])[..., 0] * m).sum(1)
            for r in range(len(b)):
                first = int(m[r].nonzero()[0])
                out.append({"prompt": facts[i].prompt, "target": facts[i].target,
                            "known": bool(hit[r]), "target_logprob": float(tlp[r]),
                            "greedy_first": int(pred[r, first])})
                i += 1
    return out


def screen_known(model: ModelHandle, request: ForgetRequest,
                 log: Callable[[str], None] = print) -> tuple[ForgetRequest, dict[str, list]]:
    """Keep only facts the model actually produces before editing.

    A forget fact the model does not produce greedily cannot be forgotten - it is reported as
    ``not known`` and dropped from ``forget`` (likewise for ``neighbors``, whose survival cannot be
    measured). Returns ``(request, report)`` where ``report`` maps split -> list of dropped facts
    with their target log-probability. Raises ``ValueError`` when no forget fact is known."""
    report: dict[str, list[dict]] = {}
    kept = {}
    for split in ("forget", "neighbors"):
        fs = getattr(request, split)
        if not len(fs):
            continue
        k = knowledge(model, fs)
        report[split] = [{"prompt": r["prompt"], "target": r["target"],
                          "target_logprob": round(r["target_logprob"], 3)}
                         for r in k if not r["known"]]
        kept[split] = FactSet(fs.name, tuple(f for f, r in zip(fs, k) if r["known"]))
        for r in report[split]:
            log(f"not known before editing ({split}): {r['prompt']!r} -> {r['target']!r} "
                f"(p={torch.tensor(r['target_logprob']).exp():.3g}); "
                f"{'nothing to forget' if split == 'forget' else 'cannot check it survives'}, "
                f"left out")
    if "forget" in kept and not len(kept["forget"]):
        raise ValueError(f"the model does not produce any of the {len(request.forget)} forget "
                         f"facts before editing: there is nothing to forget")
    return dataclasses.replace(request, **kept), report
