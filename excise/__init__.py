"""excise: locate, cut out, and verify the deletion of knowledge in transformer language models.

The shared core. The three stages live in the top-level packages ``locate``, ``edit`` and
``probes``; this package holds what they share: model handles and sites, requests, the model
organism, result types. The core never imports a stage; only the application layer
``excise.app`` (pipeline, CLI, sweep) wires the stages together.
"""

from excise.finetuned import Finetuned, FinetuneWorld, finetuned
from excise.handle import Batch, ModelHandle, TLHandle
from excise.organism import Organism, PRESETS, organism
from excise.request import Fact, FactSet, ForgetRequest
from excise.sites import Selection, Unit

__all__ = ["Batch", "Fact", "FactSet", "FinetuneWorld", "Finetuned", "ForgetRequest",
           "ModelHandle", "Organism", "PRESETS",
           "RemoteError", "RemoteHFHandle", "Selection", "TLHandle", "Unit", "load_remote",
           "finetuned", "organism"]
__version__ = "0.1.0"

# models run on NDIF (excise.remote): imported when first asked for (it imports nnsight)
_REMOTE = ("RemoteError", "RemoteHFHandle", "load_remote")


def __getattr__(name: str):
    if name in _REMOTE:
        from excise import remote

        return getattr(remote, name)
    raise AttributeError(f"module 'excise' has no attribute {name!r}")
