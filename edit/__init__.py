"""edit: targeted, reversible changes to a model.

Every method is ``name(model, importance=None, units=None, **params) -> Edit``: it takes a model
handle plus an Importance and/or a Selection (when ``units`` is None it takes the ``top`` units
of the importance) and returns an applied :class:`excise.edits.Edit` (a context manager with
``revert()``, a saveable ``diff`` and a manifest). Methods that need data (``project``,
``finetune``, ``reinit``, ``distill``, ``prune(mode="mean")``) take ``request=`` (a
ForgetRequest). ``finetune``, ``reinit`` and ``distill`` also take ``units="all"`` (every
parameter: the global reference). ``reinit`` and ``distill`` remove information rather than
hide it: they overwrite (or shrink and perturb) the units and retrain them on retain data only.
"""

from edit.dampen import dampen
from edit.distill import distill
from edit.finetune import finetune
from edit.noise import noise
from edit.project import project
from edit.prune import prune
from edit.reinit import reinit
from edit.sequential import Step, sequential
from excise.edits import Diff, Edit, HookSpec, export

METHODS = {"dampen": dampen, "prune": prune, "noise": noise, "project": project,
           "finetune": finetune, "reinit": reinit, "distill": distill}

__all__ = ["Diff", "Edit", "HookSpec", "METHODS", "Step", "dampen", "distill", "export",
           "finetune", "noise", "project", "prune", "reinit", "sequential"]
