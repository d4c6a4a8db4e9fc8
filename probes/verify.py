"""``probes.verify``: measure a model on a ForgetRequest, optionally beside the retrain oracle."""

from __future__ import annotations

from typing import Sequence

from excise.handle import ModelHandle
from excise.report import Report
from excise.request import ForgetRequest
from probes.behaviour import perplexity, recall

SUITES = ("behaviour",)


def behaviour_metrics(model: ModelHandle, request: ForgetRequest) -> dict[str, float]:
    m = {
        "forget_recall": recall(model, request.forget),
        "retain_recall": recall(model, request.retain),
        "holdout_recall": recall(model, request.holdout),
        "shared_recall": recall(model, request.shared),
        "perplexity": perplexity(model, request.general),
    }
    if len(request.paraphrase):
        m["paraphrase_recall"] = recall(model, request.paraphrase)
    if len(request.neighbors):
        m["neighbor_recall"] = recall(model, request.neighbors)
    return m


def verify(model: ModelHandle, request: ForgetRequest, oracle: ModelHandle | None = None,
           suite: str | Sequence[str] = "behaviour", label: str = "model") -> Report:
    """Measure ``model`` (and the ``oracle`` under identical settings) on ``request``."""
    suites = [suite] if isinstance(suite, str) else list(suite)
    for s in suites:
        if s not in SUITES:
            raise ValueError(f"unknown verification suite {s!r}; choose from {list(SUITES)}")
    metrics = {label: behaviour_metrics(model, request)}
    if oracle is not None:
        metrics["oracle"] = behaviour_metrics(oracle, request)
    return Report(metrics=metrics, request=request.summary())
