"""Attack grids kept on disk between runs: the restoration attacks of a model that was already
attacked - the retrain oracle and the original, every time a recipe is tried on the same
request - are read back instead of rerun.

:class:`AttackStore` is a ``cache`` for :func:`probes.verify` (the per-model memo of
:meth:`probes.suites.Context.memo`) that also writes each attack result to
``<root>/<hash>.json`` and reads it back in a later process. The hash covers the memo key (the
weights' fingerprint, the request's digest, the seed, every attack setting and the fingerprint
of the model the steering SAE is trained on) and what else decides the numbers: the torch
version, the thread count in effect, the versions of transformer-lens and sae-lens, and the
source of the ``excise`` and ``probes`` packages - any change to their code starts a new entry
rather than reuse a result it might have changed. Attacks steered with an SAE the caller supplied
are kept in memory only (an object, not a setting, decides them). Files are written
atomically (a folder that cannot be written warns, and the run goes on); one that does not read
back as the key's grids (truncated, edited, another version) is measured anew and replaced.
Only JSON is read: nothing is unpickled.
"""

from __future__ import annotations

import functools
import hashlib
import json
import warnings
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

import torch

from excise.io import atomic_write_text
from excise.report import AttackGrid, grids_from_record, grids_record

_PRIMITIVE = (str, int, float, bool, type(None))


@functools.cache
def code_digest() -> str:
    """sha256 of the source of the ``excise`` and ``probes`` packages (every ``.py`` file, by
    path and content) and the versions of the libraries the attacks run on."""
    import excise
    import probes

    h = hashlib.sha256()
    for pkg in (excise, probes):
        root = Path(pkg.__file__).parent
        for f in sorted(root.rglob("*.py")):
            h.update(str(f.relative_to(root.parent)).encode())
            h.update(f.read_bytes())
    for dist in ("transformer-lens", "sae-lens"):
        try:
            h.update(f"{dist}=={metadata.version(dist)}".encode())
        except metadata.PackageNotFoundError:
            h.update(f"{dist} absent".encode())
    return h.hexdigest()[:16]


def stored_key(key: tuple) -> bool:
    """Whether a memo key's result goes to disk: an attack result whose key is plain values."""
    return (len(key) > 3 and key[3] == "attacks"
            and all(isinstance(k, _PRIMITIVE) for k in key))


class AttackStore(dict):
    """A :func:`probes.verify` ``cache`` whose attack results also live in ``root`` (see the
    module). ``log``: told of every result read back from disk."""

    def __init__(self, root: Path | str, log: Callable[[str], None] | None = None):
        super().__init__()
        self.root = Path(root)
        self.log = log

    def path(self, key: tuple) -> Path | None:
        """The file of ``key`` (None where its result stays in memory)."""
        if not stored_key(key):
            return None
        blob = json.dumps({"key": list(key), "env": self.env()}, sort_keys=True)
        return self.root / f"attacks-{hashlib.sha256(blob.encode()).hexdigest()[:32]}.json"

    @staticmethod
    def env() -> dict[str, Any]:
        return {"torch": torch.__version__, "threads": torch.get_num_threads(),
                "code": code_digest()}

    def _load(self, key: tuple) -> dict[str, AttackGrid] | None:
        path = self.path(key)
        if path is None or not path.is_file():
            return None
        try:
            blob = json.loads(path.read_text())
            if blob["key"] != list(key) or blob["env"] != self.env():  # plain values only
                return None
            grids = grids_from_record(blob["grids"])
        except (ValueError, KeyError, TypeError):  # not this key's grids: measured anew
            return None
        if self.log:
            self.log(f"verify: attack results of model {key[0]} read from {path}")
        return grids

    def __contains__(self, key) -> bool:
        if dict.__contains__(self, key):
            return True
        grids = self._load(key) if isinstance(key, tuple) else None
        if grids is None:
            return False
        dict.__setitem__(self, key, grids)
        return True

    def __getitem__(self, key):
        if key not in self:
            raise KeyError(key)
        return dict.__getitem__(self, key)

    def __setitem__(self, key, value) -> None:
        dict.__setitem__(self, key, value)
        path = self.path(key) if isinstance(key, tuple) else None
        if path is not None and isinstance(value, dict) and value and all(
                isinstance(g, AttackGrid) for g in value.values()):
            try:
                self.root.mkdir(parents=True, exist_ok=True)
                atomic_write_text(path, json.dumps({"key": list(key), "env": self.env(),
                                                    "grids": grids_record(value)}) + "\n")
            except OSError as e:  # a full or read-only cache costs the reuse, not the run
                warnings.warn(f"attack results not kept: cannot write {path} ({e})",
                              stacklevel=2)
