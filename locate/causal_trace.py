"""Causal tracing (ROME, "Locating and Editing Factual Associations in GPT", Meng et al.) and
attribution patching (Nanda; Syed et al.).

Corrupt a fact's prompt by adding Gaussian noise to the subject tokens' embeddings (σ = 3 x the
token-embedding standard deviation by default, seeded), then restore a single clean state - the
residual stream, the MLP output or the attention output of one layer at one token position - and
read the probability of the answer's first token. States whose restoration brings the answer
back are where the fact flows through.

``mode="exact"`` runs the restorations for real. Restoring a state at (layer ``l``, position
``t``) leaves every position before ``t`` and every layer below ``l`` as in the corrupted run, so
each restoration resumes the corrupted run from its keys and values
(:meth:`~excise.handle.ModelHandle.resume`): only positions ``t ..`` of the layers above the
restored state are computed. Restorations resuming at the same layer and position share a
forward (their rows stacked: prompts of one length, noise samples, cells), and cells restoring
the same states (ROME's window near the first and last layers) run once. A model with hooks
attached (an activation edit) is traced by full forwards instead, one row per restoration.
``mode="fast"`` estimates every cell at once by attribution
patching: one clean forward (cached), one corrupted forward (cached) and one backward give
``p_corrupt + (clean - corrupt) . dp/dstate`` for every state.

Public API:

- :func:`trace` (notebooks) -> :class:`Trace`, a small frozen result with a ROME-style ``plot``;
  one fact gives its own token-by-layer grid, several facts the ROME aggregate, positions
  grouped as first / middle / last subject token, first subsequent token, further tokens and
  last token.
- :func:`causal_trace` (pipeline) -> ``Importance``: per-unit indirect effects (attribution
  patching over neurons and heads) with the aggregate trace in ``meta["trace"]``.
- :func:`attribution` (pipeline) -> ``Importance``: the same unit scores, fast trace only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from excise.checks import check_choice, check_finite
from excise.handle import ModelHandle
from excise.importance import Importance
from excise.request import Fact, FactSet, ForgetRequest
from locate._common import UNIT_SITES, base_meta, check_inputs, resolve_sites

COMPONENTS = ("resid_post", "mlp.out", "attn.out")
_KNOWN_COMPONENTS = ("resid_pre", "resid_mid", "resid_post", "mlp.out", "attn.out")
MODES = ("exact", "fast")
# ROME's position categories for the aggregate plot (plus the tokens before the subject)
GROUPS = ("before subject", "first subject token", "middle subject tokens",
          "last subject token", "first subsequent token", "further tokens", "last token")
_ATTRIBUTION_SUFFIXES = ("mlp.post", "mlp.pre", "attn.z", "mlp.out", "attn.out", "resid_pre",
                         "resid_mid", "resid_post")


# ------------------------------------------------------------------------------------------------
# the result
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Trace:
    """Recovered answer probability for each restored state.

    ``scores[c, L, t]``: P(answer) when the state of component ``components[c]`` at layer ``L``
    and position ``t`` is restored into the corrupted run. ``labels[t]`` names the position (a
    token for one prompt, a position group for an aggregate); ``groups[t]`` is its ROME category.
    ``low`` / ``high``: P(answer) corrupted / clean."""

    components: tuple[str, ...]
    labels: tuple[str, ...]
    scores: Tensor  # [component, layer, position]
    low: float
    high: float
    answer: str = ""
    groups: tuple[str, ...] = ()
    subject: tuple[int, ...] = ()  # positions that were corrupted
    mode: str = "exact"
    window: int = 1
    n_prompts: int = 1

    def __post_init__(self):
        c, _, t = (tuple(self.scores.shape) + (None, None, None))[:3]
        if self.scores.dim() != 3 or c != len(self.components) or t != len(self.labels):
            raise ValueError(f"Trace: scores have shape {tuple(self.scores.shape)}; expected "
                             f"[{len(self.components)} components, layers, "
                             f"{len(self.labels)} positions]")
        if self.groups and len(self.groups) != len(self.labels):
            raise ValueError(f"Trace: {len(self.groups)} groups for {len(self.labels)} positions")
        if not torch.isfinite(self.scores).all() or not (math.isfinite(self.low)
                                                         and math.isfinite(self.high)):
            raise ValueError("Trace: non-finite probabilities (the model overflowed?)")
        if self.mode not in MODES:
            raise ValueError(f"Trace: unknown mode {self.mode!r}")

    @property
    def n_layers(self) -> int:
        return self.scores.shape[1]

    def component(self, name: str) -> Tensor:
        """``[layer, position]`` recovered probability for one component."""
        if name not in self.components:
            raise ValueError(f"Trace has no component {name!r}; it has {list(self.components)}")
        return self.scores[self.components.index(name)]

    def effect(self, name: str | None = None) -> Tensor:
        """Indirect effect: recovered probability minus the corrupted probability."""
        return (self.scores if name is None else self.component(name)) - self.low

    def peak(self, name: str) -> tuple[int, int]:
        """(layer, position) whose restoration recovers the most."""
        m = self.component(name)
        i = int(torch.argmax(m))
        return i // m.shape[1], i % m.shape[1]

    def layer_effect(self, name: str, position: int | str | None = None) -> Tensor:
        """``[layer]`` effect at one position (index or label), or the max over positions."""
        e = self.effect(name)
        if position is None:
            return e.amax(1)
        if isinstance(position, str):
            if position not in self.labels:
                raise ValueError(f"no position labelled {position!r}; have {list(self.labels)}")
            position = self.labels.index(position)
        return e[:, position]

    def plot(self, component: str | None = None, ax=None, **kw):
        """ROME-style heatmap (positions x layers). One component -> Axes; ``None`` -> all
        components side by side, returning the list of Axes."""
        from locate.plots import causal_trace_heatmap

        return causal_trace_heatmap(self, component, ax=ax, **kw)

    def to_dict(self) -> dict:
        return {"components": list(self.components), "labels": list(self.labels),
                "scores": self.scores.tolist(), "low": self.low, "high": self.high,
                "answer": self.answer, "groups": list(self.groups),
                "subject": list(self.subject), "mode": self.mode, "window": self.window,
                "n_prompts": self.n_prompts}

    @classmethod
    def from_dict(cls, d: dict) -> "Trace":
        return cls(tuple(d["components"]), tuple(d["labels"]),
                   torch.tensor(d["scores"], dtype=torch.float32), float(d["low"]),
                   float(d["high"]), d.get("answer", ""), tuple(d.get("groups", ())),
                   tuple(d.get("subject", ())), d.get("mode", "exact"), int(d.get("window", 1)),
                   int(d.get("n_prompts", 1)))

    @staticmethod
    def mean(traces: Sequence["Trace"]) -> "Trace":
        """ROME's aggregate: each prompt's positions are averaged within their group (first /
        middle / last subject token, ...), then groups are averaged over prompts."""
        if not traces:
            raise ValueError("Trace.mean: no traces to average")
        comps = traces[0].components
        layers = traces[0].n_layers
        for t in traces:
            if t.components != comps or t.n_layers != layers:
                raise ValueError("Trace.mean: traces differ in components or layers")
            if not t.groups:
                raise ValueError("Trace.mean: a trace has no position groups (is it an "
                                 "aggregate already?)")
        sums = {g: torch.zeros(len(comps), layers) for g in GROUPS}
        counts = dict.fromkeys(GROUPS, 0)
        for t in traces:
            for g in GROUPS:
                idx = [i for i, x in enumerate(t.groups) if x == g]
                if idx:
                    sums[g] += t.scores[:, :, idx].mean(-1)
                    counts[g] += 1
        present = [g for g in GROUPS if counts[g]]
        scores = torch.stack([sums[g] / counts[g] for g in present], dim=-1)
        return Trace(comps, tuple(present), scores,
                     float(sum(t.low for t in traces) / len(traces)),
                     float(sum(t.high for t in traces) / len(traces)), "", tuple(present), (),
                     traces[0].mode, traces[0].window, len(traces))

    def __repr__(self) -> str:
        return (f"Trace({self.mode}, prompts={self.n_prompts}, components={list(self.components)}"
                f", layers={self.n_layers}, positions={len(self.labels)}, "
                f"low={self.low:.3f}, high={self.high:.3f})")


# ------------------------------------------------------------------------------------------------
# prompts, noise, windows
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Prompt:
    tokens: Tensor  # [T] long: BOS + prompt
    subject: Tensor  # [T] bool: positions to corrupt
    answer: int  # first target token
    labels: tuple[str, ...]
    groups: tuple[str, ...]


def _as_facts(facts) -> list[Fact]:
    if isinstance(facts, Fact):
        return [facts]
    out = list(facts)
    if not out:
        raise ValueError("causal tracing needs at least one fact; got an empty set")
    return out


def prompts(model: ModelHandle, facts) -> list[_Prompt]:
    """Encode facts for tracing. A fact without a subject gets every prompt token after BOS
    corrupted."""
    fl = _as_facts(facts)
    b = model.encode(fl)
    out = []
    for i, f in enumerate(fl):
        plen = int(b.target_mask[i].int().argmax())
        if plen < 2:
            raise ValueError(f"fact {f.prompt!r} -> {f.target!r} has an empty prompt: "
                             f"nothing to corrupt")
        tokens = b.tokens[i, :plen].clone()
        subj = b.subject_mask[i, :plen].clone()
        if not subj.any():
            subj[1:] = True
        out.append(_Prompt(tokens, subj, int(b.tokens[i, plen]),
                           tuple(model.tokenizer.decode([t]) for t in tokens.tolist()),
                           _groups(subj)))
    return out


def _groups(subj: Tensor) -> tuple[str, ...]:
    T = subj.numel()
    pos = torch.nonzero(subj).flatten().tolist()
    first, last = pos[0], pos[-1]
    out = []
    for t in range(T):
        if t == T - 1:
            out.append("last token")
        elif t < first:
            out.append("before subject")
        elif t == last:
            out.append("last subject token")
        elif t == first:
            out.append("first subject token")
        elif t < last:
            out.append("middle subject tokens")
        elif t == last + 1:
            out.append("first subsequent token")
        else:
            out.append("further tokens")
    return tuple(out)


def embedding_std(model: ModelHandle) -> float:
    """Standard deviation of the token-embedding entries."""
    if "embed.W_E" in model.site_table():
        return float(model.parameter("embed.W_E").detach().float().std())
    raise ValueError("cannot find the token embedding 'embed.W_E' of this model; pass noise= "
                     "(an absolute standard deviation) to causal tracing")


def subject_noise(T: int, d: int, samples: int, sigma: float, seed: int) -> Tensor:
    """The noise added to a prompt of ``T`` tokens: ``[samples, T, d]``, reproducible from
    ``seed`` (the same for every prompt of that length); masked to the subject by the caller."""
    g = torch.Generator().manual_seed(int(seed))
    return sigma * torch.randn(samples, T, d, generator=g)


def window_layers(component: str, layer: int, window: int, n_layers: int) -> range:
    """Layers restored together for one cell: ROME's window around ``layer`` for MLP and
    attention outputs; the residual stream is always restored at one layer."""
    if component.startswith("resid"):
        return range(layer, layer + 1)
    return range(max(0, layer - window // 2), min(n_layers, layer - (-window // 2)))


def _check_args(model: ModelHandle, components, mode: str, window: int, samples: int):
    check_choice("causal tracing", "mode", mode, MODES)
    comps = (components,) if isinstance(components, str) else tuple(components)
    bad = [c for c in comps if c not in _KNOWN_COMPONENTS]
    if bad or not comps:
        raise ValueError(f"causal tracing cannot restore component {bad[0] if bad else None!r}; "
                         f"choose from {list(_KNOWN_COMPONENTS)}")
    if not (isinstance(window, int) and window >= 1):
        raise ValueError(f"causal tracing: window must be an int >= 1, got {window!r}")
    if not (isinstance(samples, int) and samples >= 1):
        raise ValueError(f"causal tracing: samples must be an int >= 1, got {samples!r}")
    n_layers = model.n_layers
    for c in comps:
        model.info(f"blocks.0.{c}")  # unknown to this backend -> the handle's error
    return comps, n_layers


def _sigma(model: ModelHandle, noise: float | None, noise_scale: float) -> float:
    sigma = noise_scale * embedding_std(model) if noise is None else float(noise)
    if not (math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"causal tracing: the noise standard deviation must be finite and > 0, "
                         f"got {sigma!r}")
    return sigma


# ------------------------------------------------------------------------------------------------
# exact tracing: resume the corrupted run at each restored state
# ------------------------------------------------------------------------------------------------
_LOW, _HIGH = -1, -2  # cells not run: their value is the corrupted / the clean probability


def _prob(last_logits: Tensor, answers: Tensor) -> Tensor:
    """P(answer) from last-position logits ``[n, vocab]``."""
    lp = torch.log_softmax(last_logits.float(), dim=-1)
    return lp.gather(-1, answers.to(lp.device)[:, None]).squeeze(-1).exp()


def _answer_prob(logits: Tensor, last: Tensor, answers: Tensor) -> Tensor:
    rows = torch.arange(logits.shape[0], device=logits.device)
    return _prob(logits[rows, last.to(logits.device)], answers)


def _restorations(comps: tuple[str, ...], n_layers: int, window: int, T: int
                  ) -> tuple[list[tuple], Tensor]:
    """The distinct restorations of one prompt length and, per cell ``[component, layer,
    position]``, the index of the one it runs (or ``_LOW`` / ``_HIGH``).

    A restoration is ``("resid", a, t)`` (the residual entering block ``a`` at position ``t``:
    ``resid_pre`` of ``a`` or ``resid_post`` of ``a - 1``, the same tensor) or ``(component,
    layers, t)``; cells restoring the same states share one (ROME's window covers the same
    layers for several cells near the first and last block). Not run: last-block states at
    positions other than the last (nothing reads them) -> corrupted; ``resid_post`` of the last
    block at the last position is the clean run's output -> clean."""
    keys: dict[tuple, int] = {}
    cell = torch.empty(len(comps), n_layers, T, dtype=torch.long)
    for ci, c in enumerate(comps):
        for L in range(n_layers):
            layers = tuple(window_layers(c, L, window, n_layers))
            for t in range(T):
                if c == "resid_post" and L == n_layers - 1:
                    cell[ci, L, t] = _HIGH if t == T - 1 else _LOW
                    continue
                if t < T - 1 and layers[0] == n_layers - 1 and c != "resid_pre":
                    cell[ci, L, t] = _LOW
                    continue
                key = (("resid", L + (c == "resid_post"), t) if c in ("resid_pre", "resid_post")
                       else (c, layers, t))
                cell[ci, L, t] = keys.setdefault(key, len(keys))
    return list(keys), cell


@dataclass(frozen=True)
class _Plan:
    """How one restoration runs. ``step``: a block run alone at position ``t`` first (its
    ``step_sites`` restored), whose output then enters the main run at ``t``; the main run
    resumes at block ``resume`` over positions ``t ..`` with ``sites`` restored at ``t`` (or,
    with ``enter``, that clean state entering at ``t`` directly)."""

    t: int
    resume: int
    sites: tuple[str, ...] = ()
    enter: str | None = None
    step: int | None = None
    step_sites: tuple[str, ...] = ()


def _plan(key: tuple, n_layers: int) -> _Plan:
    """A restoration's plan. The lowest restored block changes only position ``t`` (the states
    it reads at other positions are the corrupted run's), so for an MLP / attention output it
    runs alone at ``t`` and the main run starts one block higher."""
    if key[0] == "resid":
        return _Plan(key[2], key[1], enter=f"blocks.{key[1]}.resid_pre")
    c, layers, t = key
    sites = tuple(f"blocks.{L}.{c}" for L in layers)
    if layers[0] == n_layers - 1:  # the last block (at the last position): nothing above it
        return _Plan(t, layers[0], sites)
    return _Plan(t, layers[0] + 1, sites[1:], step=layers[0], step_sites=sites[:1])


def _rows(prompts: Tensor, K: int, S: int) -> tuple[Tensor, Tensor, Tensor]:
    """Every (prompt, restoration ``0 .. K-1``, noise sample) triple, prompt-major."""
    return (prompts.repeat_interleave(K * S), torch.arange(K).repeat_interleave(S).repeat(
        prompts.numel()), torch.arange(S).repeat(prompts.numel() * K))


def _exact_group(model: ModelHandle, group: list[_Prompt], comps: tuple[str, ...],
                 n_layers: int, window: int, samples: int, noise: Tensor, max_rows: int
                 ) -> tuple[Tensor, Tensor, Tensor]:
    """Prompts of one length T; ``noise`` ``[P, samples, T, d]`` (zero off the subject).
    Returns scores [P, C, L, T], low [P], high [P].

    Restoring the clean state at (block ``l``, position ``t``) leaves every position before
    ``t``, and every block below the lowest restored one, exactly as in the corrupted run. So
    the corrupted run is run once per noise sample, keeping its keys and values and the
    residual entering each block, and each restoration resumes it
    (:meth:`ModelHandle.resume`) at position ``t``: ``T - t`` positions of the blocks above
    the restored state (the lowest restored block itself changes only position ``t``, run
    alone). Restorations that resume at the same block and position share a forward, across
    the group's prompts and noise samples; cells restoring the same states run once. Positions
    before a prompt's first corrupted token are not run (clean and corrupted runs agree there):
    their value is the corrupted probability."""
    P, T, S = len(group), group[0].tokens.numel(), samples
    dev = model.device
    tokens = torch.stack([p.tokens for p in group]).to(dev)
    answers = torch.tensor([p.answer for p in group], device=dev)
    first = torch.tensor([int(p.subject.int().argmax()) for p in group])  # [P]
    keys, cell = _restorations(comps, n_layers, window, T)
    plans = [_plan(k, n_layers) for k in keys]
    clean_sites = dict.fromkeys(s for pl in plans for s in pl.step_sites + pl.sites
                                + ((pl.enter,) if pl.enter else ()))
    entries = {b for pl in plans for b in (pl.resume, pl.step) if b is not None}
    clean: dict[str, Tensor] = {}
    corrupt: dict[str, Tensor] = {}  # the residual entering each block, [P * S, T, d]

    def keep(store):
        def hook(x, site):
            store[site] = x.detach().clone()
        return hook

    probs = torch.zeros(P, len(keys), S)
    with torch.inference_mode():
        logits = model.logits(tokens, {s: keep(clean) for s in clean_sites})
        high = _prob(logits[:, -1], answers).cpu()
        src_p = torch.arange(P).repeat_interleave(S)  # corrupted run -> prompt, sample
        src_s = torch.arange(S).repeat(P)
        logits, past = model.kv_run(tokens[src_p], {"embed": _add(noise[src_p, src_s])} | {
            f"blocks.{b}.resid_pre": keep(corrupt) for b in sorted(entries)})
        low = _prob(logits[:, -1], answers[src_p]).cpu().view(P, S).mean(-1)
        for t in range(T):
            ps = torch.nonzero(first <= t).flatten()
            here = [i for i, pl in enumerate(plans) if pl.t == t]
            if not ps.numel() or not here:
                continue
            head = past.upto(t)
            where = {k: i for i, k in enumerate(here)}
            stepped = None  # [P, len(here), S, d]: each step's output at t

            def run(block: int, kidx: list[int], step: bool):
                nonlocal stepped
                sites_of = [plans[k].step_sites if step else plans[k].sites for k in kidx]
                has = {site: torch.tensor([site in ss for ss in sites_of])
                       for site in dict.fromkeys(x for ss in sites_of for x in ss)}
                enter = torch.tensor([plans[k].enter is not None for k in kidx])
                after_step = torch.tensor([plans[k].step is not None for k in kidx])
                local = torch.tensor([where[k] for k in kidx])
                p_all, j_all, s_all = _rows(ps, len(kidx), S)
                for i in range(0, p_all.numel(), max_rows):
                    p_idx, j_idx, s_idx = (v[i:i + max_rows] for v in (p_all, j_all, s_all))
                    src = (p_idx * S + s_idx).to(dev)
                    resid = corrupt[f"blocks.{block}.resid_pre"][src, t:t + 1 if step else T]
                    resid = resid.clone()
                    hooks = {}
                    for site, h in has.items():
                        rows = h[j_idx]
                        if rows.any():
                            hooks[site] = _put_first(torch.nonzero(rows).flatten(),
                                                     clean[site][p_idx[rows].to(dev), t])
                    if step:
                        out = model.resume(head[src], resid, block, hooks, stop=block + 1)
                        if stepped is None:
                            stepped = out.new_empty(P, len(here), S, out.shape[-1])
                        stepped[p_idx, local[j_idx], s_idx] = out[:, 0]
                        continue
                    rows = enter[j_idx]  # the clean residual enters at t
                    if rows.any():
                        resid[rows.to(dev), 0] = clean[f"blocks.{block}.resid_pre"][
                            p_idx[rows].to(dev), t]
                    rows = after_step[j_idx]  # the step's output enters at t
                    if rows.any():
                        resid[rows.to(dev), 0] = stepped[p_idx[rows], local[j_idx[rows]],
                                                         s_idx[rows]]
                    out = model.resume(head[src], resid, block, hooks)
                    k_idx = torch.tensor(kidx)[j_idx]
                    probs[p_idx, k_idx, s_idx] = _prob(out, answers[p_idx.to(dev)]).cpu()

            for b in sorted({plans[k].step for k in here} - {None}):
                run(b, [k for k in here if plans[k].step == b], step=True)
            for b in sorted({plans[k].resume for k in here}):
                run(b, [k for k in here if plans[k].resume == b], step=False)
    mean = probs.mean(-1)  # [P, K]
    ran = (cell >= 0)[None] & (torch.arange(T)[None, None, None, :] >= first[:, None, None, None])
    scores = torch.where(ran, mean[:, cell.clamp(min=0)], low[:, None, None, None])
    scores = torch.where((cell == _HIGH)[None], high[:, None, None, None], scores)
    return scores, low, high


def _full_group(model: ModelHandle, group: list[_Prompt], comps: tuple[str, ...],
                n_layers: int, window: int, samples: int, noise: Tensor, max_rows: int
                ) -> tuple[Tensor, Tensor, Tensor]:
    """As :func:`_exact_group`, by full forwards (every position, every block): for a model
    with hooks attached (an applied activation edit), whose hooks a resumed run would not
    replay as a full one does. Corrupted copies of the prompts are stacked along the batch,
    each row restoring a different (layer, position) through a hook that indexes per row."""
    P, T = len(group), group[0].tokens.numel()
    dev = model.device
    tokens = torch.stack([p.tokens for p in group]).to(dev)
    answers = torch.tensor([p.answer for p in group], device=dev)
    last = torch.full((P,), T - 1)
    restorations = [(c, L, t) for c in comps for L in range(n_layers) for t in range(T)]
    R = 1 + len(restorations)  # restoration 0 = none (the corrupted baseline)
    table: dict[str, Tensor] = {}
    for r, (c, L, t) in enumerate(restorations, start=1):
        for L2 in window_layers(c, L, window, n_layers):
            table.setdefault(f"blocks.{L2}.{c}", torch.full((R,), -1, dtype=torch.long))[r] = t
    first = torch.tensor([int(p.subject.int().argmax()) for p in group])  # [P]
    active = torch.ones(P, R, dtype=torch.bool)
    for r, (c, L, t) in enumerate(restorations, start=1):
        lowest = min(window_layers(c, L, window, n_layers))
        unread = t < T - 1 and lowest == n_layers - 1 and c != "resid_pre"
        active[:, r] = ~((t < first) | unread)
    clean: dict[str, Tensor] = {}

    def grab(x, site):
        clean[site] = x.detach().clone()

    with torch.inference_mode():
        logits = model.logits(tokens, {s: grab for s in table})
        high = _answer_prob(logits, last, answers)
        pr = torch.nonzero(active)  # [rows / samples, 2]: (prompt, restoration)
        all_p = pr[:, 0].repeat_interleave(samples)
        all_r = pr[:, 1].repeat_interleave(samples)
        all_s = torch.arange(samples).repeat(pr.shape[0])
        probs = torch.full((P, R, samples), float("nan"))
        for start in range(0, all_p.numel(), max_rows):
            p_idx, r_idx, s_idx = (v[start:start + max_rows] for v in (all_p, all_r, all_s))
            hooks = {"embed": _add(noise[p_idx, s_idx])}
            for site, tab in table.items():
                pos = tab[r_idx]
                sel = pos >= 0
                if sel.any():
                    hooks[site] = _restore(torch.nonzero(sel).flatten(), pos[sel],
                                           clean[site][p_idx[sel], pos[sel]])
            logits = model.logits(tokens[p_idx], hooks)
            probs[p_idx, r_idx, s_idx] = _answer_prob(logits, last[p_idx],
                                                      answers[p_idx]).cpu()
    probs = torch.where(active[:, :, None], probs, probs[:, :1])  # skipped = corrupted
    probs = probs.mean(-1)
    return probs[:, 1:].reshape(P, len(comps), n_layers, T), probs[:, 0], high.cpu()


def _add(delta: Tensor):
    def hook(x, site):
        return x + delta.to(x.device, x.dtype)
    return hook


def _restore(rows: Tensor, pos: Tensor, values: Tensor):
    def hook(x, site):
        x = x.clone()
        x[rows.to(x.device), pos.to(x.device)] = values
        return x
    return hook


def _put_first(rows: Tensor, values: Tensor):
    """Set the first position of some rows (a resumed run's position ``t``)."""
    def hook(x, site):
        x = x.clone()
        x[rows.to(x.device), 0] = values
        return x
    return hook


def _exact_traces(model: ModelHandle, ps: list[_Prompt], comps: tuple[str, ...], n_layers: int,
                  window: int, samples: int, max_rows: int, noise, progress: bool = False,
                  resume: bool | None = None) -> list[Trace]:
    """Exact traces of prompts; ``noise(prompt) -> [samples, T, d]`` (masked to the subject
    here). Prompts of one length run together, as many as keep a forward under ``max_rows``
    rows. ``resume``: resume the corrupted run per restoration (:func:`_exact_group`) or run
    full forwards (:func:`_full_group`); default: resume unless the model has hooks attached or
    runs remotely (there every forward is a round trip: a few full forwards beat one resumed
    forward per restored position and block)."""
    from tqdm.auto import tqdm

    full = (model.hook_count() > 0 or model.remote) if resume is None else not resume
    by_len: dict[int, list[int]] = {}
    for i, p in enumerate(ps):
        by_len.setdefault(p.tokens.numel(), []).append(i)
    out: list[Trace | None] = [None] * len(ps)
    for T, idx in tqdm(sorted(by_len.items()), desc="causal tracing", disable=not progress,
                       leave=False):
        per_prompt = (1 + len(comps) * n_layers * (T - 1) if full else len(comps)) * samples
        step = max(1, max_rows // per_prompt)
        for k in range(0, len(idx), step):
            group = [ps[i] for i in idx[k:k + step]]
            nz = torch.stack([noise(p) * p.subject[None, :, None] for p in group])
            scores, low, high = (_full_group if full else _exact_group)(
                model, group, comps, n_layers, window, samples, nz, max_rows)
            for j, i in enumerate(idx[k:k + step]):
                out[i] = _make_trace(model, ps[i], comps, scores[j], float(low[j]),
                                     float(high[j]), "exact", window)
    return out  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------------
# attribution patching: 2 forwards + 1 backward
# ------------------------------------------------------------------------------------------------
def _attribution_chunk(model: ModelHandle, chunk: list[_Prompt], comps: tuple[str, ...],
                       n_layers: int, window: int, unit_sites: Sequence[str], samples: int,
                       sigma: float, seed: int):
    """Grid estimates [P, C, L, Tmax], unit effects {site: [P, *units]}, low [P], high [P]."""
    P = len(chunk)
    dev = model.device
    lens = torch.tensor([p.tokens.numel() for p in chunk])
    Tm = int(lens.max())
    tokens = torch.full((P, Tm), model.tokenizer.pad_id, dtype=torch.long)
    subj = torch.zeros((P, Tm), dtype=torch.bool)
    for i, p in enumerate(chunk):
        tokens[i, :lens[i]] = p.tokens
        subj[i, :lens[i]] = p.subject
    tokens, subj = tokens.to(dev), subj.to(dev)
    answers = torch.tensor([p.answer for p in chunk], device=dev)
    grid_sites = [f"blocks.{L}.{c}" for c in comps for L in range(n_layers)]
    sites = list(dict.fromkeys(grid_sites + list(unit_sites)))
    clean: dict[str, Tensor] = {}

    def grab(x, site):
        clean[site] = x.detach().clone()

    with torch.inference_mode():
        logits = model.logits(tokens, {s: grab for s in sites})
        high = _answer_prob(logits, lens - 1, answers)
    d = model.info("blocks.0.resid_post").unit_shape[0]
    noise = torch.stack([torch.nn.functional.pad(subject_noise(int(n), d, samples, sigma, seed),
                                                 (0, 0, 0, Tm - int(n))) for n in lens])
    noise = noise.to(dev) * subj[:, None, :, None]  # [P, S, Tm, d]
    rows = torch.arange(P).repeat_interleave(samples)  # row -> prompt
    s_idx = torch.arange(samples).repeat(P)
    acts: dict[str, Tensor] = {}

    def corrupt(x, site):
        y = x + noise[rows, s_idx].to(x.dtype)
        return y if y.requires_grad else y.requires_grad_(True)

    def keep(x, site):
        acts[site] = x

    hooks = {"embed": corrupt} | {s: keep for s in sites}
    with torch.enable_grad():
        logits = model.logits(tokens[rows], hooks)
        p = _answer_prob(logits, (lens - 1)[rows], answers[rows])
        grads = torch.autograd.grad(p.sum(), [acts[s] for s in sites], allow_unused=True)
    low = p.detach().cpu().view(P, samples).mean(-1)
    est: dict[str, Tensor] = {}  # site -> [rows, T, ...] effect of restoring that state
    for s, g in zip(sites, grads):
        a = acts[s].detach()
        if g is None:
            g = torch.zeros_like(a)
        # float32 whatever the model's dtype: the effects are summed over units and layers
        e = (clean[s][rows.to(a.device)].float() - a.float()) * g.float()
        check_finite(e, "attribution estimates", s, "attribution patching")
        est[s] = e
    grid = torch.zeros(P * samples, len(comps), n_layers, Tm)
    for ci, c in enumerate(comps):
        for L in range(n_layers):
            for L2 in window_layers(c, L, window, n_layers):
                grid[:, ci, L] += est[f"blocks.{L2}.{c}"].sum(-1).cpu()
    grid = grid + p.detach().float().cpu()[:, None, None, None]
    grid = grid.view(P, samples, len(comps), n_layers, Tm).mean(1)
    units = {}
    for s in unit_sites:
        e = est[s].sum(1)  # over positions: patch the unit everywhere
        if e.dim() == 3:  # attn.z [rows, heads, d_head] -> one score per head
            e = e.sum(-1)
        units[s] = e.cpu().view(P, samples, *e.shape[1:]).mean(1)
    return grid, units, low, high.cpu(), lens


def _attribution(model: ModelHandle, ps: list[_Prompt], comps, n_layers, window, unit_sites,
                 samples, sigma, seed, batch_size, progress=False):
    from tqdm.auto import tqdm

    traces, units = [], {s: [] for s in unit_sites}
    for i in tqdm(range(0, len(ps), batch_size), desc="attribution patching",
                  disable=not progress, leave=False):
        chunk = ps[i:i + batch_size]
        grid, u, low, high, lens = _attribution_chunk(model, chunk, comps, n_layers, window,
                                                      unit_sites, samples, sigma, seed)
        for j, p in enumerate(chunk):
            traces.append(_make_trace(model, p, comps, grid[j, :, :, :int(lens[j])],
                                      float(low[j]), float(high[j]), "fast", window))
        for s in unit_sites:
            units[s].append(u[s])
    return traces, {s: torch.cat(v) for s, v in units.items()}


def _make_trace(model, p: _Prompt, comps, scores, low, high, mode, window) -> Trace:
    return Trace(tuple(comps), p.labels, scores.float(), low, high,
                 model.tokenizer.decode([p.answer]), p.groups,
                 tuple(torch.nonzero(p.subject).flatten().tolist()), mode, window, 1)


# ------------------------------------------------------------------------------------------------
# public API
# ------------------------------------------------------------------------------------------------
def traces(model: ModelHandle, facts, *, components: str | Sequence[str] = COMPONENTS,
           mode: str = "exact", window: int = 1, samples: int = 4, noise: float | None = None,
           noise_scale: float = 3.0, seed: int = 0, max_rows: int = 1024,
           batch_size: int = 32, progress: bool = False) -> list[Trace]:
    """One :class:`Trace` per fact (see :func:`trace` for the arguments)."""
    check_inputs("causal tracing", model, batch_size=batch_size)
    comps, n_layers = _check_args(model, components, mode, window, samples)
    sigma = _sigma(model, noise, noise_scale)
    ps = prompts(model, facts)
    if mode == "fast":
        out, _ = _attribution(model, ps, comps, n_layers, window, [], samples, sigma, seed,
                              batch_size, progress)
        return out
    d = model.info("embed").unit_shape[0]
    return _exact_traces(model, ps, comps, n_layers, window, samples, max_rows,
                         lambda p: subject_noise(p.tokens.numel(), d, samples, sigma, seed),
                         progress)


def trace(model: ModelHandle, facts, *, components: str | Sequence[str] = COMPONENTS,
          mode: str = "exact", window: int = 1, samples: int = 4, noise: float | None = None,
          noise_scale: float = 3.0, seed: int = 0, max_rows: int = 1024, batch_size: int = 32,
          progress: bool = False) -> Trace:
    """Causal trace of one fact (its token x layer grid) or of several (ROME's aggregate).

    ``components``: which states to restore (``resid_post``, ``resid_pre``, ``mlp.out``,
    ``attn.out``). ``window``: restore that many consecutive MLP / attention layers around each
    layer (ROME uses 10 on GPT-2 XL). ``samples``: noise draws averaged per cell. ``noise``: an
    absolute noise standard deviation; default ``noise_scale`` x the embedding std. ``mode``:
    ``"exact"`` or ``"fast"`` (attribution patching)."""
    ts = traces(model, facts, components=components, mode=mode, window=window, samples=samples,
                noise=noise, noise_scale=noise_scale, seed=seed, max_rows=max_rows,
                batch_size=batch_size, progress=progress)
    return ts[0] if len(ts) == 1 else Trace.mean(ts)


def _unit_importance(method: str, units: dict[str, Tensor], meta: dict) -> Importance:
    scores = {s: v.abs().mean(0) for s, v in units.items()}
    signed = {s: v.mean(0) for s, v in units.items()}
    return Importance(method, scores, meta, {"effect": signed})


def _pipeline_trace(method: str, model: ModelHandle, request: ForgetRequest, sites, *, mode,
                    components, window, samples, noise, noise_scale, seed, max_facts,
                    batch_size, max_rows, progress) -> Importance:
    check_inputs(method, model, batch_size=batch_size)
    unit_sites = resolve_sites(model, sites, list(UNIT_SITES), method,
                               suffixes=_ATTRIBUTION_SUFFIXES)
    comps, n_layers = _check_args(model, components, mode, window, samples)
    sigma = _sigma(model, noise, noise_scale)
    facts = _forget_facts(request, method, max_facts)
    ps = prompts(model, facts)
    fast, units = _attribution(model, ps, comps, n_layers, window, unit_sites, samples, sigma,
                               seed, batch_size, progress)
    per = fast if mode == "fast" else traces(
        model, facts, components=comps, mode="exact", window=window, samples=samples,
        noise=sigma, seed=seed, max_rows=max_rows, progress=progress)
    agg = Trace.mean(per)
    meta = base_meta(model, request, mode=mode, components=list(comps), window=window,
                     samples=samples, noise=sigma, seed=seed, n_traced=len(facts),
                     trace=agg.to_dict(),
                     peak_layer={c: int(agg.layer_effect(c).argmax()) for c in comps})
    return _unit_importance(method, units, meta)


def _forget_facts(request: ForgetRequest, method: str, max_facts: int | None) -> FactSet:
    facts = request.forget
    if len(facts) == 0:
        raise ValueError(f"{method}: the forget set is empty")
    if max_facts is not None:
        if max_facts < 1:
            raise ValueError(f"{method}: max_facts must be >= 1, got {max_facts}")
        facts = facts[:max_facts]
    return facts


def causal_trace(model: ModelHandle, request: ForgetRequest,
                 sites: str | Sequence[str] | None = None, *, mode: str = "exact",
                 components: str | Sequence[str] = COMPONENTS, window: int = 1, samples: int = 4,
                 noise: float | None = None, noise_scale: float = 3.0, seed: int = 0,
                 max_facts: int | None = None, batch_size: int = 32, max_rows: int = 1024,
                 progress: bool = False) -> Importance:
    """Causal tracing of the forget facts, as an ``Importance`` for the pipeline.

    Scores: each unit's indirect effect on the answer probability (mean |effect| over the
    forget facts, estimated by attribution patching: ``(clean - corrupt) . grad``), at
    ``sites`` (default neurons and heads; any activation site works, one score per dimension).
    ``parts["effect"]`` keeps the signed mean. ``meta["trace"]`` holds the aggregate trace
    (``mode="exact"`` by real restorations, ``"fast"`` by attribution patching); rebuild it
    with ``Trace.from_dict(imp.meta["trace"])``. ``meta["peak_layer"]``: per component, the
    layer whose restoration recovers most."""
    return _pipeline_trace("causal_trace", model, request, sites, mode=mode,
                           components=components, window=window, samples=samples, noise=noise,
                           noise_scale=noise_scale, seed=seed, max_facts=max_facts,
                           batch_size=batch_size, max_rows=max_rows, progress=progress)


def attribution(model: ModelHandle, request: ForgetRequest,
                sites: str | Sequence[str] | None = None, *, components=COMPONENTS,
                window: int = 1, samples: int = 4, noise: float | None = None,
                noise_scale: float = 3.0, seed: int = 0, max_facts: int | None = None,
                batch_size: int = 32, progress: bool = False) -> Importance:
    """Attribution patching alone (two forwards and one backward per batch): per-unit indirect
    effects as in :func:`causal_trace`, with the fast aggregate trace in ``meta["trace"]``."""
    return _pipeline_trace("attribution", model, request, sites, mode="fast",
                           components=components, window=window, samples=samples, noise=noise,
                           noise_scale=noise_scale, seed=seed, max_facts=max_facts,
                           batch_size=batch_size, max_rows=1024, progress=progress)
