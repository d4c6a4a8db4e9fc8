"""Sequential requests: forget one request after another on the same, already-edited model.

Each step locates on the *current* (edited) weights, applies the edit on top of the previous ones
(so ``Edit.chain`` in its manifest records every edit it sits on), and optionally measures. The
edits stay applied; revert them last-in first-out (``for s in reversed(steps): s.edit.revert()``).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

from excise.edits import Edit
from excise.handle import ModelHandle
from excise.importance import Importance
from excise.request import ForgetRequest
from excise.sites import Selection


@dataclass
class Step:
    request: ForgetRequest
    importance: Importance | None
    edit: Edit
    metrics: dict = field(default_factory=dict)


def sequential(model: ModelHandle, requests: Sequence[ForgetRequest],
               locate_fn: Callable[[ModelHandle, ForgetRequest], Importance] | None,
               edit_fn: Callable[..., Edit], *, edit_params: Mapping | None = None,
               select: Callable[[Importance], Selection] | None = None,
               metrics_fn: Callable[[ModelHandle, ForgetRequest], dict] | None = None
               ) -> list[Step]:
    """Apply ``edit_fn(model, locate_fn(model, req), select(imp) or None, **edit_params)`` for
    each request in turn (``request=req`` is passed when ``edit_fn`` takes it), then
    ``metrics_fn(model, req)``. On an error the edits of this call are reverted and the error
    re-raised, leaving the model as it was."""
    if not requests:
        raise ValueError("sequential: no requests given")
    kw = dict(edit_params or {})
    takes_request = "request" in inspect.signature(edit_fn).parameters
    steps: list[Step] = []
    try:
        for req in requests:
            imp = locate_fn(model, req) if locate_fn is not None else None
            units = select(imp) if select is not None else None
            extra = {"request": req} if takes_request else {}
            e = edit_fn(model, imp, units, **kw, **extra)
            steps.append(Step(req, imp, e))
            if metrics_fn is not None:
                steps[-1].metrics = dict(metrics_fn(model, req))
    except BaseException:
        for s in reversed(steps):
            if s.edit.state == "applied":
                s.edit.revert()
        raise
    return steps
