"""Importance: one score tensor per named site, the method that produced it, and metadata.

Scores are never stacked into one unlabeled tensor. ``parts`` keeps the raw statistics a method
computed on the way (e.g. Fisher on forget and on retain, which SSD needs), under the same sites.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import Tensor

from excise.io import load_safetensors, safetensors_metadata, save_safetensors
from excise.sites import Selection, Unit, layer_of


@dataclass(frozen=True)
class Importance:
    method: str
    scores: Mapping[str, Tensor]  # site -> score per unit (the site's unit shape)
    meta: Mapping = field(default_factory=dict)
    parts: Mapping[str, Mapping[str, Tensor]] = field(default_factory=dict)  # name -> site -> t

    def __post_init__(self):
        if not self.scores:
            raise ValueError(f"Importance({self.method!r}) has no sites")
        for site, s in self.scores.items():
            if not isinstance(s, Tensor):
                raise ValueError(f"score for site {site!r} is a {type(s).__name__}, not a Tensor")
            # one reduction first (a sum of finite scores may still overflow: only then is
            # every element looked at)
            if s.is_floating_point() and not torch.isfinite(s.sum()) and \
                    not torch.isfinite(s).all():
                bad = int((~torch.isfinite(s)).sum())
                raise ValueError(f"Importance({self.method!r}): {bad} non-finite score(s) at "
                                 f"site {site!r}")
        for name, part in self.parts.items():
            for site, t in part.items():
                if site not in self.scores:
                    raise ValueError(f"part {name!r} has site {site!r} that has no scores")
                if t.shape != self.scores[site].shape:
                    raise ValueError(f"part {name!r} at site {site!r} has shape "
                                     f"{tuple(t.shape)} but scores have "
                                     f"{tuple(self.scores[site].shape)}")

    # -- basic views -------------------------------------------------------------------------
    @property
    def sites(self) -> list[str]:
        return list(self.scores)

    def n_units(self) -> int:
        return sum(s.numel() for s in self.scores.values())

    def _flat(self) -> tuple[Tensor, list[tuple[str, int]]]:
        # float32 on the first site's device (scores of a sharded model's layers may differ)
        dev = next(iter(self.scores.values())).device
        flat = torch.cat([s.detach().reshape(-1).float().to(dev) for s in self.scores.values()])
        offsets, o = [], 0
        for site, s in self.scores.items():
            offsets.append((site, o))
            o += s.numel()
        return flat, offsets

    def _units_at(self, flat_idx: Tensor) -> list[Unit]:
        sites = list(self.scores)
        sizes = torch.tensor([self.scores[s].numel() for s in sites])
        starts = torch.cumsum(sizes, 0) - sizes
        flat_idx = flat_idx.cpu()  # k positions, read back as units (in their order)
        which = torch.searchsorted(starts, flat_idx, right=True) - 1  # [k] site position
        local = flat_idx - starts[which]
        out: list = [None] * len(flat_idx)
        for w in torch.unique(which).tolist():  # one vectorised unravel per site
            at = torch.nonzero(which == w).flatten()
            shape = self.scores[sites[w]].shape
            idx = local[at]
            coords = torch.stack(torch.unravel_index(idx, shape), 1) if len(shape) > 1 \
                else idx.unsqueeze(1)
            for p, c in zip(at.tolist(), coords.tolist()):
                out[p] = Unit(sites[w], tuple(c))
        return out

    # -- selection ---------------------------------------------------------------------------
    def top(self, k: int | float, sites: str | Sequence[str] | None = None) -> Selection:
        """The ``k`` highest-scoring units: an int is a count, a float in (0, 1] a fraction of
        all units at the chosen sites. Ties are broken by site order then index (stable)."""
        imp = self if sites is None else self.restrict(sites)
        n = imp.n_units()
        if isinstance(k, bool) or not isinstance(k, (int, float)):
            raise ValueError(f"top(k={k!r}): k must be an int count or a float fraction")
        if isinstance(k, float):
            if not 0 < k <= 1:
                raise ValueError(f"top(k={k}): a fraction must be in (0, 1]")
            count = max(1, math.ceil(k * n))
        else:
            if k < 1:
                raise ValueError(f"top(k={k}): a count must be >= 1")
            if k > n:
                where = f"{len(imp.scores)} site{'s' if len(imp.scores) != 1 else ''}: " + \
                    ", ".join(f"{s} ({t.numel():,})" for s, t in list(imp.scores.items())[:4]) + \
                    (", ..." if len(imp.scores) > 4 else "")
                raise ValueError(f"top(k={k}): Importance({self.method!r}) has only {n:,} units "
                                 f"({where}); ask for at most {n:,}, or a fraction in (0, 1] "
                                 f"such as 0.05")
            count = k
        flat, _ = imp._flat()
        order = torch.sort(flat, descending=True, stable=True).indices[:count]
        return Selection(tuple(imp._units_at(order)), source=f"{self.method}.top({k})")

    def select(self, *, threshold: float | None = None, k: int | float | None = None,
               sites: str | Sequence[str] | None = None) -> Selection:
        """Units with score >= ``threshold``, or the top ``k`` (count or fraction)."""
        if (threshold is None) == (k is None):
            raise ValueError("select() takes exactly one of threshold= or k=")
        if k is not None:
            return self.top(k, sites)
        imp = self if sites is None else self.restrict(sites)
        flat, _ = imp._flat()
        idx = torch.nonzero(flat >= threshold).flatten()
        idx = idx[torch.sort(flat[idx], descending=True, stable=True).indices]
        if len(idx) == 0:
            raise ValueError(f"select(threshold={threshold}): no unit scores that high "
                             f"(max score {float(flat.max()):.4g})")
        return Selection(tuple(imp._units_at(idx)), source=f"{self.method}>={threshold}")

    def restrict(self, sites: str | Sequence[str]) -> "Importance":
        from excise.sites import expand

        keep = expand(sites, list(self.scores))
        return Importance(self.method, {s: self.scores[s] for s in keep}, dict(self.meta),
                          {n: {s: p[s] for s in keep if s in p} for n, p in self.parts.items()})

    def by_unit(self, reduce: str = "sum") -> "Importance":
        """Aggregate parameter-level scores into neuron / head scores (``blocks.L.mlp.post``,
        ``blocks.L.attn.z``): each unit gets the sum (or mean / max) of its parameters' scores.
        Activation-site scores pass through unchanged.

        Which slice of a parameter belongs to which unit depends on the backend's layout, so it
        is read from ``meta["unit_axes"]`` (``ModelHandle.unit_axes``, recorded by every locate
        method that scores parameters); a parameter site it does not cover is refused."""
        if reduce not in ("sum", "mean", "max"):
            raise ValueError(f"by_unit(reduce={reduce!r}): choose 'sum', 'mean' or 'max'")
        out: dict[str, Tensor] = {}
        counts: dict[str, int] = {}
        axes = self.meta.get("unit_axes") or {}  # recorded by the method, in the backend's layout
        for site, s in self.scores.items():
            if site not in axes:
                if _is_activation(site):
                    out[site] = s
                    continue
                raise ValueError(
                    f"by_unit: Importance({self.method!r}) does not record which neuron or head "
                    f"owns each slice of parameter site {site!r} (meta['unit_axes'] has no entry "
                    f"for it), and that layout differs between backends; build the Importance "
                    f"with meta={{'unit_axes': model.unit_axes(sites), ...}} as the locate "
                    f"methods do")
            hit = tuple(axes[site]) if axes[site] else None
            if hit is None:  # a parameter of no neuron or head (norms, embeddings, biases)
                continue
            unit, axis = hit[:2]
            dims = [d for d in range(s.dim()) if d != axis]
            v = s.float()
            v = (v.amax(dim=dims) if reduce == "max" else v.sum(dim=dims)) if dims else v
            if len(hit) > 2:  # unit i owns elements i*group .. (i+1)*group - 1 along the axis
                v = v.view(-1, hit[2])
                v = v.amax(1) if reduce == "max" else v.sum(1)
            if unit in out and unit not in self.scores:
                out[unit] = torch.maximum(out[unit], v) if reduce == "max" else out[unit] + v
            else:
                out[unit] = v
            counts[unit] = counts.get(unit, 0) + (s.numel() // max(1, v.numel()))
        if not out:
            raise ValueError(f"Importance({self.method!r}) has no site that maps to units")
        if reduce == "mean":
            out = {k: v / counts.get(k, 1) for k, v in out.items()}
        return Importance(self.method, out, dict(self.meta) | {"aggregated": reduce})

    def score_of(self, unit: Unit) -> float:
        return float(self.scores[unit.site][unit.index])

    # -- comparison --------------------------------------------------------------------------
    def compare(self, other: "Importance", k: int | float = 0.01) -> dict[str, float]:
        """Agreement with another Importance over their common sites: Spearman rank
        correlation of all scores and the overlap of their top-k units (Jaccard)."""
        common = [s for s in self.scores if s in other.scores
                  and self.scores[s].shape == other.scores[s].shape]
        if not common:
            raise ValueError(f"{self.method} and {other.method} share no site with equal shapes")
        a = self.restrict(common)
        b = other.restrict(common)
        fa, _ = a._flat()
        fb, _ = b._flat()
        rho = spearman(fa, fb)
        ta, tb = set(a.top(k).units), set(b.top(k).units)
        return {"spearman": rho, "topk_jaccard": len(ta & tb) / max(1, len(ta | tb)),
                "n_units": float(fa.numel())}

    # -- frames, files, display --------------------------------------------------------------
    def to_frame(self, top: int | None = None):
        """A pandas DataFrame: one row per unit (site, layer, index, score), best first."""
        import pandas as pd

        flat, _ = self._flat()
        order = torch.sort(flat, descending=True, stable=True).indices
        if top:
            order = order[:top]
        order, flat = order.cpu(), flat.cpu()  # a table for people to read
        sites = list(self.scores)
        sizes = torch.tensor([self.scores[s].numel() for s in sites])
        starts = torch.cumsum(sizes, 0) - sizes
        which = torch.searchsorted(starts, order, right=True) - 1
        layers = [layer_of(s) for s in sites]
        w = which.tolist()
        return pd.DataFrame({"site": [sites[i] for i in w], "layer": [layers[i] for i in w],
                             "index": (order - starts[which]).tolist(),
                             "score": flat[order].tolist()})

    def save(self, path: str | Path) -> None:
        """Write ``path`` (safetensors: scores and parts) with the metadata as JSON inside."""
        tensors = {f"scores/{s}": t for s, t in self.scores.items()}
        for name, part in self.parts.items():
            tensors.update({f"parts/{name}/{s}": t for s, t in part.items()})
        meta = {"method": self.method, "meta": json.dumps(self.meta, default=str),
                "site_order": json.dumps(list(self.scores)), "format": "excise.importance/1"}
        save_safetensors(tensors, path, metadata=meta)

    @classmethod
    def load(cls, path: str | Path) -> "Importance":
        md = safetensors_metadata(path)
        if md.get("format") != "excise.importance/1":
            raise ValueError(f"{path} is not an excise Importance file: its format is "
                             f"{md.get('format')!r}, expected 'excise.importance/1' (written by "
                             f"Importance.save)")
        tensors = load_safetensors(path)
        scores, parts = {}, {}
        for key, t in tensors.items():
            kind, rest = key.split("/", 1)
            if kind == "scores":
                scores[rest] = t
            else:
                name, site = rest.split("/", 1)
                parts.setdefault(name, {})[site] = t
        order = json.loads(md.get("site_order", "[]")) or sorted(scores)
        scores = {s: scores[s] for s in order if s in scores} | scores
        return cls(md["method"], scores, json.loads(md["meta"]), parts)

    def plot(self, kind: str = "heatmap", ax=None, **kw):
        """``kind="heatmap"``: layer x unit map; ``kind="bar"``: the top units. Returns the Axes."""
        from excise import plots

        if kind == "heatmap":
            return plots.importance_heatmap(self, ax=ax, **kw)
        if kind == "bar":
            return plots.top_units_bar(self, ax=ax, **kw)
        raise ValueError(f"unknown plot kind {kind!r}; choose 'heatmap' or 'bar'")

    def __repr__(self) -> str:
        return (f"Importance(method={self.method!r}, sites={len(self.scores)}, "
                f"units={self.n_units():,})")

    def _repr_html_(self) -> str:
        df = self.to_frame(top=10)
        return (f"<b>Importance</b> <code>{self.method}</code>: {len(self.scores)} sites, "
                f"{self.n_units():,} units. Top units:" + df.to_html(index=False))


def _is_activation(site: str) -> bool:
    last = site.split(".")[-1]
    return site == "embed" or last in ("resid_pre", "resid_mid", "resid_post", "z", "out",
                                       "pre", "post", "sae")


def spearman(a: Tensor, b: Tensor) -> float:
    """Spearman rank correlation of two equally long vectors (average ranks for ties)."""
    from scipy.stats import spearmanr

    if a.numel() != b.numel():
        raise ValueError(f"spearman: lengths differ ({a.numel()} vs {b.numel()})")
    r = spearmanr(a.detach().double().cpu().numpy(), b.detach().double().cpu().numpy()).statistic
    return float(r) if r == r else 0.0
