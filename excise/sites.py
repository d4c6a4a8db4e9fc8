"""One site grammar for every backend.

A *site* is a named location in a model:

=============================  ==============================================  =================
site                           what it carries                                 unit axis
=============================  ==============================================  =================
``embed``                      token embeddings                                d_model
``blocks.{L}.resid_pre``       residual stream entering block L                d_model
``blocks.{L}.resid_mid``       residual stream after attention                 d_model
``blocks.{L}.resid_post``      residual stream leaving block L                 d_model
``blocks.{L}.attn.z``          per-head attention output before W_O            heads
``blocks.{L}.attn.out``        attention output added to the residual          d_model
``blocks.{L}.mlp.pre``         MLP pre-activations                             d_mlp (neurons)
``blocks.{L}.mlp.post``        MLP activations                                 d_mlp (neurons)
``blocks.{L}.mlp.out``         MLP output added to the residual                d_model
``blocks.{L}.mlp.W_in`` ...    a parameter (TransformerLens naming)            every element
``blocks.{L}.resid_post.sae``  latents of an SAE attached at that site         d_sae
=============================  ==============================================  =================

A :class:`Unit` is ``(site, index)``: one neuron, one head, one SAE latent, one parameter element.
Globs (``blocks.*.mlp.post``) expand eagerly; an unknown name raises ``ValueError`` with the
closest valid names.
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence


@dataclass(frozen=True)
class SiteInfo:
    name: str
    kind: str  # "activation" | "param" | "sae"
    target: str  # hook name / module path / parameter name in the backend
    unit_shape: tuple[int, ...]  # shape of one score tensor for this site
    layer: int | None


@dataclass(frozen=True, order=True)
class Unit:
    """One scorable, editable thing: ``Unit("blocks.1.mlp.post", (17,))`` is neuron 17."""

    site: str
    index: tuple[int, ...]

    def __str__(self) -> str:
        return f"{self.site}[{','.join(map(str, self.index))}]"

    @classmethod
    def parse(cls, text: str) -> "Unit":
        m = re.fullmatch(r"(.+)\[([\d,\s]+)\]", text.strip())
        if not m:
            raise ValueError(f"cannot parse unit {text!r}; expected e.g. 'blocks.1.mlp.post[17]'")
        return cls(m.group(1), tuple(int(i) for i in m.group(2).split(",")))


@dataclass(frozen=True)
class Selection:
    """A set of units, kept in a stable order, optionally labelled
    (e.g. ``forget_only`` / ``retain_only`` / ``shared``)."""

    units: tuple[Unit, ...]
    labels: tuple[str, ...] = ()
    source: str = ""  # what produced it, e.g. "fisher.top(0.005)"

    def __post_init__(self):
        if self.labels and len(self.labels) != len(self.units):
            raise ValueError(f"Selection: {len(self.units)} units but {len(self.labels)} labels")
        if len(set(self.units)) != len(self.units):
            raise ValueError("Selection holds a unit twice")

    def __len__(self) -> int:
        return len(self.units)

    def __iter__(self) -> Iterator[Unit]:
        return iter(self.units)

    def __contains__(self, unit: Unit) -> bool:
        return unit in set(self.units)

    def sites(self) -> list[str]:
        return sorted({u.site for u in self.units})

    def by_site(self) -> dict[str, list[tuple[int, ...]]]:
        out: dict[str, list[tuple[int, ...]]] = {}
        for u in self.units:
            out.setdefault(u.site, []).append(u.index)
        return out

    def with_label(self, label: str) -> "Selection":
        if not self.labels:
            raise ValueError("this Selection has no labels")
        keep = [(u, lab) for u, lab in zip(self.units, self.labels) if lab == label]
        return Selection(tuple(u for u, _ in keep), tuple(lab for _, lab in keep),
                         f"{self.source}[{label}]")

    def to_list(self) -> list[str]:
        return [str(u) for u in self.units]

    @classmethod
    def from_list(cls, items: Iterable[str], source: str = "") -> "Selection":
        return cls(tuple(Unit.parse(s) for s in items), source=source)

    def digest(self) -> str:
        import hashlib

        return hashlib.sha256("\n".join(self.to_list()).encode()).hexdigest()[:16]


def _layer_hint(name: str, valid: Sequence[str]) -> str:
    """'; the model has 4 layers, blocks 0..3' when ``name`` names a block the model lacks."""
    m = re.match(r"blocks\.(\d+)(\.|$)", name)
    if not m:
        return ""
    layers = sorted({L for L in map(layer_of, valid) if L is not None})
    if int(m.group(1)) in layers:
        return ""
    if not layers:
        return "; the model has no blocks.L sites"
    return (f"; the model has {len(layers)} layer{'s' if len(layers) != 1 else ''}, blocks "
            f"{layers[0]}..{layers[-1]}")


def unknown_site_error(name: str, valid: Sequence[str]) -> ValueError:
    layer = _layer_hint(name, valid)
    if layer:  # the same site in the last block, not a near-miss spelling of another layer
        L = int(re.match(r"blocks\.(\d+)", name).group(1))
        last = max((x for x in map(layer_of, valid) if x is not None), default=None)
        same = name.replace(f"blocks.{L}.", f"blocks.{last}.", 1)
        hint = f"{layer} (e.g. {same!r})" if same in valid else layer
        return ValueError(f"unknown site {name!r}: layer {L} is out of range{hint}")
    close = difflib.get_close_matches(name, valid, n=3, cutoff=0.5)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    sample = ", ".join(list(valid)[:6])
    return ValueError(f"unknown site {name!r}{hint} (valid sites look like: {sample}, ...)")


def expand(patterns: str | Sequence[str], valid: Sequence[str]) -> list[str]:
    """Expand globs against the valid site names, keeping model order; unknown names raise."""
    if isinstance(patterns, str):
        patterns = [patterns]
    out: list[str] = []
    for pat in patterns:
        if any(ch in pat for ch in "*?["):
            hits = [v for v in valid if fnmatch.fnmatchcase(v, pat)]
            if not hits:
                raise ValueError(f"site pattern {pat!r} matches no site of this model"
                                 f"{_layer_hint(pat, valid)}")
        elif pat in valid:
            hits = [pat]
        else:
            raise unknown_site_error(pat, valid)
        out.extend(h for h in hits if h not in out)
    return out


def layer_of(site: str) -> int | None:
    m = re.match(r"blocks\.(\d+)\.", site)
    return int(m.group(1)) if m else None


# Parameter -> the unit it belongs to: (suffix of the parameter site, unit site suffix, axis).
# The axes are TransformerLens layouts (``TLHandle.unit_axis``); other backends answer
# ``ModelHandle.unit_axis`` in their own layout. Edits list a unit's parameters from here and ask
# the handle for the axis; ``Importance.by_unit`` reads the axes the locate method recorded.
PARAM_UNITS: tuple[tuple[str, str, int], ...] = (
    ("mlp.W_in", "mlp.post", 1),
    ("mlp.W_gate", "mlp.post", 1),
    ("mlp.b_in", "mlp.post", 0),
    ("mlp.W_out", "mlp.post", 0),
    ("attn.W_Q", "attn.z", 0),
    ("attn.W_K", "attn.z", 0),
    ("attn.W_V", "attn.z", 0),
    ("attn.W_O", "attn.z", 0),
    ("attn.b_Q", "attn.z", 0),
    ("attn.b_K", "attn.z", 0),
    ("attn.b_V", "attn.z", 0),
)


def unit_of_param(site: str) -> tuple[str, int] | None:
    """``blocks.2.mlp.W_in`` -> (``blocks.2.mlp.post``, axis 1) in TransformerLens layout; None
    for parameters that belong to no neuron or head (embeddings, layer norms, output biases)."""
    L = layer_of(site)
    if L is None:
        return None
    for suffix, unit, axis in PARAM_UNITS:
        if site == f"blocks.{L}.{suffix}":
            return f"blocks.{L}.{unit}", axis
    return None
