"""edit: targeted, reversible changes to a model.

Every method takes a model handle plus an Importance and/or a Selection, and returns an applied
:class:`excise.edits.Edit` (a context manager with ``revert()``, a saveable ``diff`` and a
manifest).
"""

from edit.dampen import dampen
from excise.edits import Diff, Edit, export

METHODS = {"dampen": dampen}

__all__ = ["Diff", "Edit", "METHODS", "dampen", "export"]
