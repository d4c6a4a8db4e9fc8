"""Edit and Diff: every change excise makes to a model is reversible, tracked and saveable.

An :class:`Edit` is what every ``edit.*`` method returns, already applied. It is a context manager
(reverted on exit, also after an exception), has ``revert()``, a :class:`Diff` (parameter ->
flat indices, old values, new values; or, where most of a tensor changes, the whole old and new
tensor - :func:`dense_pays`) that can be saved and re-applied to a fresh copy of the same
model, and a manifest (method, parameters, selection, model fingerprint before and after, and the
chain of edits it was applied on top of). Hook edits keep their hook handles and remove them on
revert. Applying the same edit twice is refused; edits are reverted last-in, first-out.

Old values are stored exactly, so ``revert()`` restores parameters bit for bit.

A saved diff carries a checksum of its tensors (checked by :meth:`Diff.load`, which names the
file on a mismatch), and :meth:`Diff.apply` checks the weights it produced against the recorded
``fingerprint_after`` - a diff changed after it was saved is refused, the model left as it was.
Duplicate edits are recognised by method, selection and parameter *values*: ``alpha=5`` and
``alpha=5.0`` are the same edit.

Hook edits that should survive a save are described by :class:`HookSpec` (a registered hook
*kind*, the site, JSON parameters and named tensors). A Diff saves their tensors in the
safetensors file and the specs as JSON in its metadata; loading re-creates the hook functions
from :data:`HOOK_KINDS` - nothing is ever pickled. Plain ``hooks={site: fn}`` still work but
cannot be saved. The built-in kinds (``rank_one``: ``edit.project``; ``sae_latents``: SAE latent
ablation) are registered here, so a saved diff loads in any process that imports this module;
:func:`register_hook_kind` adds more and refuses a name that is taken.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch
from torch import Tensor

from excise.handle import HookFn, ModelHandle
from excise.io import (load_safetensors, safetensors_metadata, save_safetensors,
                       tensors_sha256, write_json)
from excise.sites import Selection


DIFF_FORMATS = ("excise.diff/1", "excise.diff/2")  # /2: with dense (whole-tensor) changes


@dataclass(frozen=True)
class ParamChange:
    """The change of one parameter. Sparse: ``indices`` ``[k]`` (long, flat positions in the
    parameter) with their ``old`` and ``new`` values ``[k]``. Dense (``indices`` is None): ``old``
    and ``new`` hold the whole parameter, flattened ``[numel]`` - what a diff keeps when most of
    a tensor changes (:func:`dense_pays`)."""

    indices: Tensor | None
    old: Tensor
    new: Tensor

    def __post_init__(self):
        if self.indices is None:
            if not (self.old.dim() == 1 and self.old.shape == self.new.shape):
                raise ValueError(f"ParamChange (dense): old {tuple(self.old.shape)} and new "
                                 f"{tuple(self.new.shape)} must be the same flat shape")
        elif not (self.indices.shape == self.old.shape == self.new.shape):
            raise ValueError(f"ParamChange: shapes differ: indices {tuple(self.indices.shape)}, "
                             f"old {tuple(self.old.shape)}, new {tuple(self.new.shape)}")

    @property
    def dense(self) -> bool:
        return self.indices is None

    def n_changed(self) -> int:
        return int((self.old != self.new).sum())

    def read(self, flat: Tensor) -> Tensor:
        """The values at this change's positions of a flat parameter (on its device)."""
        return flat if self.indices is None else flat[self.indices.to(flat.device)]

    def write(self, flat: Tensor, values: Tensor) -> None:
        """Write ``values`` (``old`` or ``new``) at this change's positions, in place (a diff
        loaded on the CPU writes into a parameter on any device)."""
        values = values.to(flat.device, flat.dtype)
        if self.indices is None:
            flat.copy_(values)
        else:
            flat[self.indices.to(flat.device)] = values


def dense_pays(n_changed: int, numel: int, value_bytes: int) -> bool:
    """Whether a parameter's change is smaller stored dense (old and new whole tensors:
    ``2 * value_bytes`` per element) than sparse (an int64 index plus old and new per changed
    element): dense when ``n_changed * (8 + 2 * value_bytes) > numel * 2 * value_bytes`` -
    more than half the elements changed for float32, more than a third for 16-bit floats."""
    return n_changed * (8 + 2 * value_bytes) > numel * 2 * value_bytes


@dataclass(frozen=True)
class HookSpec:
    """A saveable hook edit: ``HOOK_KINDS[kind](site, params, tensors)`` builds the hook fn."""

    kind: str
    site: str
    params: Mapping = field(default_factory=dict)  # JSON-serialisable
    tensors: Mapping[str, Tensor] = field(default_factory=dict)

    def __post_init__(self):
        if self.kind not in HOOK_KINDS:
            raise ValueError(f"unknown hook kind {self.kind!r}; registered kinds: "
                             f"{sorted(HOOK_KINDS)}")
        for name, t in self.tensors.items():
            if not isinstance(t, Tensor):
                raise ValueError(f"hook {self.kind!r} at {self.site}: tensor {name!r} is a "
                                 f"{type(t).__name__}, not a Tensor")
            if not torch.isfinite(t).all():
                raise ValueError(f"hook {self.kind!r} at {self.site}: tensor {name!r} holds "
                                 f"non-finite values")
        json.dumps(dict(self.params))  # raises TypeError early for non-JSON parameters

    def build(self) -> HookFn:
        return HOOK_KINDS[self.kind](self.site, dict(self.params), dict(self.tensors))

    def to_json(self) -> dict:
        return {"kind": self.kind, "site": self.site, "params": dict(self.params),
                "tensors": sorted(self.tensors)}

    def digest(self) -> str:
        h = hashlib.sha256(json.dumps(self.to_json(), sort_keys=True).encode())
        for name in sorted(self.tensors):
            h.update(self.tensors[name].detach().cpu().contiguous().view(torch.uint8).numpy())
        return h.hexdigest()[:16]


HookFactory = Callable[[str, dict, dict], HookFn]
HOOK_KINDS: dict[str, HookFactory] = {}  # the built-in kinds below register at import


def register_hook_kind(name: str) -> Callable[[HookFactory], HookFactory]:
    """Register a factory ``(site, params, tensors) -> hook fn`` under ``name``. A name is
    registered once: a second factory under a taken name is refused (a saved diff names its
    kind, and must mean one thing when it is loaded)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"a hook kind is named by a non-empty string, got {name!r}")

    def deco(factory: HookFactory) -> HookFactory:
        have = HOOK_KINDS.get(name)
        if have is not None and have is not factory:
            raise ValueError(f"hook kind {name!r} is already registered (by "
                             f"{have.__module__}.{have.__qualname__}); choose another name. "
                             f"Registered kinds: {sorted(HOOK_KINDS)}")
        HOOK_KINDS[name] = factory
        return factory
    return deco


# hook kinds that read a fixed width of their site's activation: kind -> (tensors -> width).
# Edit.apply refuses a spec whose width differs from the site's before attaching anything.
HOOK_READS: dict[str, Callable[[Mapping[str, Tensor]], int]] = {
    "sae_latents": lambda t: int(t["W_enc"].shape[0]),
}


def check_hook_width(handle: ModelHandle, spec: HookSpec) -> None:
    """``ValueError`` when ``spec`` reads a different width than its site carries (an SAE of
    another model or site), naming both; kinds without a declared width pass."""
    reads = HOOK_READS.get(spec.kind)
    info = handle.info(spec.site)  # unknown site -> ValueError with suggestions
    if reads is None or len(info.unit_shape) != 1:
        return
    width, have = reads(spec.tensors), int(info.unit_shape[0])
    if width != have:
        extra = (f" (an SAE latent hook over {int(spec.tensors['W_enc'].shape[1])} latents)"
                 if spec.kind == "sae_latents" else "")
        raise ValueError(f"hook {spec.kind!r} at {spec.site}: it reads {width} dimensions"
                         f"{extra} but site {spec.site!r} carries {have}; an SAE fits only the "
                         f"site (and model) it was trained on")


@register_hook_kind("rank_one")
def _rank_one_hook(site: str, params: dict, tensors: dict) -> HookFn:
    """Rank-one projection of the last axis: ``remove``: ``x - (x.u) u``; ``align``:
    ``x + (c - x.u) u`` (the component along ``u`` set to the constant ``c``)."""
    u = tensors["u"].detach().clone()  # fresh, aligned memory: loaded tensors may be views
    mode = params.get("mode", "remove")
    if mode not in ("remove", "align"):
        raise ValueError(f"rank_one hook: mode {mode!r}; choose 'remove' or 'align'")
    c = tensors["c"].detach().clone() if mode == "align" else None

    def fn(x: Tensor, _site: str) -> Tensor:
        # in float32 on the activation's device; what is added back in the model's dtype
        acc = torch.promote_types(x.dtype, torch.float32)
        uu = u.to(x.device, acc)
        coef = x.to(acc) @ uu  # [..., ]
        target = 0.0 if c is None else c.to(x.device, acc)
        return x + ((target - coef)[..., None] * uu).to(x.dtype)

    return fn


@register_hook_kind("sae_latents")
def _sae_latents_hook(site: str, params: dict, tensors: dict) -> HookFn:
    """Rescale selected SAE latents: each latent's contribution ``z_j * W_dec[j] / scale`` to
    the activation is multiplied by ``gain`` (0 removes it); what else the SAE reads or misses
    passes unchanged. Tensors: the selected latents' ``W_enc [d_in, k]``, ``b_enc [k]``,
    ``W_dec [k, d_in]`` and the SAE's ``b_dec [d_in]``; params: ``scale`` (the SAE reads
    ``activation * scale``), ``gain``, ``apply_b_dec_to_input`` (``excise.sae.latent_spec``
    builds the spec from a sae-lens SAE)."""
    w_enc = tensors["W_enc"].detach().clone()  # [d_in, k]
    b_enc = tensors["b_enc"].detach().clone()  # [k]
    w_dec = tensors["W_dec"].detach().clone()  # [k, d_in]
    b_dec = tensors["b_dec"].detach().clone()  # [d_in]
    scale = float(params["scale"])
    gain = float(params["gain"])
    sub = bool(params.get("apply_b_dec_to_input", True))

    def fn(x: Tensor, _site: str) -> Tensor:
        # in float32 on the activation's device; what is added back in the model's dtype
        dev, acc = x.device, torch.promote_types(x.dtype, torch.float32)
        xs = x.to(acc) * scale
        if sub:
            xs = xs - b_dec.to(dev, acc)
        z = torch.relu(xs @ w_enc.to(dev, acc) + b_enc.to(dev, acc))  # [..., k] the latents
        return x + ((gain - 1.0) * (z @ w_dec.to(dev, acc)) / scale).to(x.dtype)

    return fn


@dataclass(frozen=True)
class Diff:
    """Weight changes by parameter site, with the manifest of the edit that made them."""

    changes: Mapping[str, ParamChange]
    manifest: Mapping = field(default_factory=dict)
    hook_specs: Sequence[HookSpec] = ()
    source: str | None = field(default=None, compare=False)  # the file it was loaded from

    def n_changed(self) -> int:
        return sum(c.n_changed() for c in self.changes.values())

    def save(self, path: str | Path) -> Path:
        """Write the diff as safetensors (manifest and hook specs in its metadata) plus
        ``<path>.json``. A sparse change is stored as ``{site}::indices`` / ``::old`` /
        ``::new``; a dense one as ``{site}::old`` / ``::new`` (whole flat tensors, the sites
        listed in the metadata's ``dense``; format ``excise.diff/2`` - a diff without dense
        changes keeps ``excise.diff/1``, which earlier versions read). Hook tensors are stored
        as ``hook{i}::{name}``."""
        path = Path(path)
        if self.manifest.get("unsaveable_hooks"):
            raise ValueError(f"this edit has plain hook functions at "
                             f"{self.manifest['unsaveable_hooks']} that cannot be saved; use a "
                             f"registered HookSpec (kinds: {sorted(HOOK_KINDS)})")
        tensors = {}
        dense = sorted(site for site, c in self.changes.items() if c.dense)
        for site, c in self.changes.items():
            if not c.dense:
                tensors[f"{site}::indices"] = c.indices
            tensors[f"{site}::old"] = c.old
            tensors[f"{site}::new"] = c.new
        for i, spec in enumerate(self.hook_specs):
            for name, t in spec.tensors.items():
                tensors[f"hook{i}::{name}"] = t
        meta = {"format": DIFF_FORMATS[1] if dense else DIFF_FORMATS[0],
                "manifest": json.dumps(self.manifest, default=str),
                "hooks": json.dumps([h.to_json() for h in self.hook_specs]),
                "tensors_sha256": tensors_sha256(tensors)}
        if dense:
            meta["dense"] = json.dumps(dense)
        save_safetensors(tensors, path, metadata=meta)
        write_json(path.with_suffix(".json"), dict(self.manifest))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Diff":
        """Read a diff written by :meth:`save`. ``ValueError`` naming the file when it is not
        one, or when its tensors no longer match the checksum recorded when it was saved (a
        diff saved before checksums were recorded has none to check; :meth:`apply` still
        checks the weights it produces)."""
        md = safetensors_metadata(path)
        if md.get("format") not in DIFF_FORMATS:
            raise ValueError(f"{path} is not an excise diff file (format "
                             f"{md.get('format')!r}; this excise reads {list(DIFF_FORMATS)})")
        t = load_safetensors(path)
        want = md.get("tensors_sha256")
        if want is not None and tensors_sha256(t) != want:
            raise ValueError(f"{path}: its tensors do not match the checksum recorded when it "
                             f"was saved (sha256 {tensors_sha256(t)[:16]}..., recorded "
                             f"{want[:16]}...): the file was changed or damaged after it was "
                             f"written; refusing to load it")
        specs = []
        for i, h in enumerate(json.loads(md.get("hooks", "[]"))):
            if not isinstance(h, dict) or not {"kind", "site", "params", "tensors"} <= set(h):
                raise ValueError(f"{path}: hook spec {i} is malformed: {h!r}")
            missing = [n for n in h["tensors"] if f"hook{i}::{n}" not in t]
            if missing:
                raise ValueError(f"{path}: hook spec {i} ({h['kind']}) misses tensors {missing}")
            specs.append(HookSpec(h["kind"], h["site"], h["params"],
                                  {n: t[f"hook{i}::{n}"] for n in h["tensors"]}))
        sites = sorted({k.rsplit("::", 1)[0] for k in t if not re.match(r"hook\d+::", k)})
        dense = set(json.loads(md.get("dense", "[]")))
        changes = {}
        for s in sites:
            parts = ("old", "new") if s in dense else ("indices", "old", "new")
            missing = [f"{s}::{k}" for k in parts if f"{s}::{k}" not in t]
            if missing:
                raise ValueError(f"{path}: the change of {s} misses tensors {missing}")
            try:
                changes[s] = ParamChange(None if s in dense else t[f"{s}::indices"],
                                         t[f"{s}::old"], t[f"{s}::new"])
            except ValueError as e:
                raise ValueError(f"{path}: {e}") from None
        return cls(changes, json.loads(md["manifest"]), tuple(specs), source=str(path))

    def apply(self, handle: ModelHandle, *, check_fingerprint: bool = True) -> "Edit":
        """Re-apply this diff to ``handle`` (refused unless the weights are the ones it was made
        on, as recorded by the fingerprint in the manifest; and, after applying, reverted and
        refused unless the weights are the ones it produced, ``fingerprint_after``)."""
        want = self.manifest.get("fingerprint_before")
        if check_fingerprint and want:
            have = handle.fingerprint()
            if have != want:
                raise ValueError(f"this diff was made on a model with fingerprint {want}, but "
                                 f"the model given has {have}: refusing to apply it to "
                                 f"different weights")
        for site, c in self.changes.items():
            p = handle.parameter(site)
            if c.dense and c.old.numel() != p.numel():
                raise ValueError(f"the diff's whole-tensor change of {site} holds "
                                 f"{c.old.numel()} values, the parameter {p.numel()}")
            if not c.dense and c.indices.numel() and int(c.indices.max()) >= p.numel():
                raise ValueError(f"diff indices out of range for {site} ({p.numel()} elements)")
        for spec in self.hook_specs:
            check_hook_width(handle, spec)  # (unknown site -> ValueError with suggestions)
        e = Edit(handle, self.manifest.get("method", "diff"), dict(self.manifest.get("params", {})),
                 None, changes=dict(self.changes), hook_specs=self.hook_specs,
                 selection_digest=(self.manifest.get("selection") or {}).get("digest", ""))
        e.apply()
        after = self.manifest.get("fingerprint_after")
        if check_fingerprint and want and after and e.fingerprint_after != after:
            e.revert()
            where = f"the diff {self.source}" if self.source else "this diff"
            raise ValueError(f"{where} was made to give weights with fingerprint {after}, but "
                             f"applying it gave {e.fingerprint_after}: its new values were "
                             f"changed after it was saved; reverted, refusing to use it")
        return e


class Edit:
    """A change to a model that can be undone. Created and applied by the ``edit`` methods."""

    def __init__(self, handle: ModelHandle, method: str, params: Mapping,
                 selection: Selection | None, *,
                 changes: Mapping[str, ParamChange] | None = None,
                 hooks: Mapping[str, HookFn] | None = None,
                 hook_state: Mapping[str, Tensor] | None = None,
                 hook_specs: Sequence[HookSpec] = (), selection_digest: str = ""):
        self.handle = handle
        self._selection_digest = selection_digest  # a re-applied diff's original selection
        self.method = method
        self.params = dict(params)
        self.selection = selection
        self.changes = dict(changes or {})
        self.hook_specs = tuple(hook_specs)
        self._plain_hooks = sorted(hooks or {})
        # (site, fn) pairs: plain hooks first, then those built from specs
        self._hooks: list[tuple[str, HookFn]] = list((hooks or {}).items())
        self._hooks += [(h.site, h.build()) for h in self.hook_specs]
        self.hook_fns = {site: fn for site, fn in self._hooks}
        self.hook_state = dict(hook_state or {})  # tensors a hook edit needs to be re-created
        for h in self.hook_specs:
            self.hook_state.update({f"{h.site}::{k}": v for k, v in h.tensors.items()})
        self._hook_handles: list = []
        self.state = "pending"
        self.fingerprint_before: str | None = None
        self.fingerprint_after: str | None = None
        self.chain: list[dict] = []
        if not self.changes and not self.hook_fns:
            raise ValueError(f"edit {method!r} changes nothing (empty selection?)")

    # -- identity ----------------------------------------------------------------------------
    def key(self) -> tuple:
        """What makes two edits the same: method, selection and parameter *values* (numbers
        compared as numbers: ``alpha=5`` and ``alpha=5.0`` are one edit)."""
        sel = self.selection.digest() if self.selection is not None else self._selection_digest
        return (self.method, json.dumps(_normalised(self.params), sort_keys=True, default=str),
                sel)

    @property
    def manifest(self) -> dict:
        return {
            "method": self.method,
            "params": self.params,
            "selection": {"n_units": len(self.selection), "source": self.selection.source,
                          "sites": self.selection.sites(),
                          "digest": self.selection.digest()} if self.selection else None,
            "hooks": sorted(self.hook_fns),
            "hook_specs": [h.to_json() for h in self.hook_specs],
            "unsaveable_hooks": self._plain_hooks,
            "params_changed": self.n_changed(),
            "params_changed_frac": self.n_changed() / max(1, self.handle.n_parameters()),
            "fingerprint_before": self.fingerprint_before,
            "fingerprint_after": self.fingerprint_after,
            "model": self.handle.name,
            "chain": self.chain,
            "state": self.state,
        }

    @property
    def diff(self) -> Diff:
        return Diff(self.changes, self.manifest, self.hook_specs)

    def n_changed(self) -> int:
        return sum(c.n_changed() for c in self.changes.values())

    # -- apply / revert ----------------------------------------------------------------------
    def apply(self) -> "Edit":
        if self.state == "applied":
            raise RuntimeError(f"edit {self.method!r} is already applied")
        stack = _stack(self.handle)
        for other in stack:
            if other.key() == self.key():
                raise RuntimeError(f"an identical {self.method!r} edit is already applied to "
                                   f"this model; revert it first (re-running a notebook cell "
                                   f"would otherwise stack the same edit twice)")
        for site, c in self.changes.items():
            if not torch.isfinite(c.new).all():
                raise ValueError(f"edit {self.method!r} would write non-finite values into "
                                 f"{site}; nothing was changed")
        for spec in self.hook_specs:
            check_hook_width(self.handle, spec)
        self.fingerprint_before = self.handle.fingerprint()
        self.chain = [o.manifest | {"chain": []} for o in stack]
        written: list[tuple[Tensor, ParamChange]] = []
        try:
            with torch.no_grad():
                for site, c in self.changes.items():
                    p = self.handle.parameter(site)
                    flat = p.data.view(-1)
                    if c.dense and flat.numel() != c.old.numel() or \
                            not torch.equal(c.read(flat), c.old.to(flat.device, flat.dtype)):
                        raise RuntimeError(f"parameter {site} no longer holds the values this "
                                           f"edit was computed from")
                    written.append((flat, c))
                    c.write(flat, c.new)
            for site, fn in self._hooks:
                self._hook_handles.append(self.handle.add_persistent_hook(site, fn))
        except BaseException:
            with torch.no_grad():
                for flat, c in reversed(written):
                    c.write(flat, c.old)
            for h in self._hook_handles:
                h.remove()
            self._hook_handles.clear()
            raise
        self.fingerprint_after = self.handle.fingerprint()
        self.state = "applied"
        stack.append(self)
        return self

    def revert(self) -> None:
        if self.state != "applied":
            raise RuntimeError(f"edit {self.method!r} is not applied (state: {self.state})")
        stack = _stack(self.handle)
        if stack and stack[-1] is not self:
            raise RuntimeError(f"edits are reverted last-in first-out: revert "
                               f"{stack[-1].method!r} (applied later) before {self.method!r}")
        try:
            for h in self._hook_handles:
                h.remove()
            self._hook_handles.clear()
            with torch.no_grad():
                for site, c in reversed(list(self.changes.items())):
                    flat = self.handle.parameter(site).data.view(-1)
                    c.write(flat, c.old)
        finally:
            if stack and stack[-1] is self:
                stack.pop()
            self.state = "reverted"

    def __enter__(self) -> "Edit":
        if self.state != "applied":
            self.apply()
        return self

    def __exit__(self, *exc) -> None:
        if self.state == "applied":
            self.revert()

    def __repr__(self) -> str:
        return (f"Edit({self.method!r}, state={self.state}, params_changed={self.n_changed():,}, "
                f"hooks={len(self.hook_fns)})")

    def _repr_html_(self) -> str:
        m = self.manifest
        rows = "".join(f"<tr><td>{k}</td><td>{v}</td></tr>" for k, v in m.items()
                       if k not in ("chain",))
        return f"<b>Edit</b> <code>{self.method}</code><table>{rows}</table>"


def _normalised(value):
    """Parameters as values: every real number (int, float, numpy or 0-d tensor scalar; not a
    bool) as a float (``-0.0`` as ``0.0``), tuples as lists, mappings and sequences walked."""
    if isinstance(value, Tensor) and value.numel() == 1 and value.dtype != torch.bool:
        value = value.item()
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, numbers.Integral) and abs(int(value)) > 2 ** 53:
        return int(value)  # beyond exact floats: keep every digit
    if isinstance(value, numbers.Real):
        x = float(value)
        return x + 0.0 if not math.isnan(x) else x
    if isinstance(value, Mapping):
        return {str(k): _normalised(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_normalised(v) for v in value]
    return value


def _stack(handle: ModelHandle) -> list[Edit]:
    """Edits currently applied to this handle, oldest first (``ModelHandle.edit_stack``)."""
    return handle.edit_stack


def applied_edits(handle: ModelHandle) -> list[Edit]:
    return list(_stack(handle))


def weight_edit(handle: ModelHandle, method: str, params: Mapping, selection: Selection | None,
                new_values: Mapping[str, tuple[Tensor, Tensor]]) -> Edit:
    """Build and apply an Edit from ``{site: (flat_indices, new_values)}``; unchanged elements
    are dropped from the diff, and a parameter whose change is smaller stored whole is kept
    dense (:func:`dense_pays`). An identical edit already applied is refused up front (before
    "changes nothing" could hide it)."""
    probe = Edit.__new__(Edit)
    probe.method, probe.params, probe.selection = method, dict(params), selection
    probe._selection_digest = ""
    for other in _stack(handle):
        if other.key() == probe.key():
            raise RuntimeError(f"an identical {method!r} edit is already applied to this model; "
                               f"revert it first")
    changes = {}
    for site, (idx, new) in new_values.items():
        p = handle.parameter(site).detach().view(-1)
        idx = idx.to(p.device, torch.long).reshape(-1)
        new = new.detach().reshape(-1).to(p.device, p.dtype)  # the parameter's own dtype
        if idx.shape != new.shape:
            raise ValueError(f"{site}: {idx.numel()} indices but {new.numel()} new values")
        if not torch.isfinite(new).all():
            raise ValueError(f"edit {method!r} computed non-finite values for {site}; the model "
                             f"was left as it was")
        old = p[idx].clone()
        keep = old != new
        n = int(keep.sum())
        if n and dense_pays(n, p.numel(), p.element_size()):
            whole = p.clone()
            whole[idx] = new
            changes[site] = ParamChange(None, p.clone(), whole)
        elif n:
            changes[site] = ParamChange(idx[keep].clone(), old[keep], new[keep].clone())
    return Edit(handle, method, params, selection, changes=changes).apply()


def export(handle: ModelHandle, path: str | Path, *, overwrite: bool = False) -> Path:
    """Save the (edited) model's weights as safetensors at a new path; never overwrites unless
    asked."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; excise never overwrites a model file unless "
                              f"overwrite=True")
    if any(e.hook_fns for e in _stack(handle)):  # (baked projections are weight edits)
        raise ValueError("the model has hook edits applied; bake them into weights first "
                         "(edit.project(..., bake=True)) or revert them before exporting")
    save_safetensors(dict(handle.named_parameters()), path,
                     metadata={"fingerprint": handle.fingerprint(), "format": "excise.model/1"})
    return path

