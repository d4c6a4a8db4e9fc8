"""Representation probes: leave-one-out "memorized vs not" probes per depth (PGA's
cross-sequence protocol) and linear-CKA drift per layer.

Both read ``blocks.{L}.resid_post`` at the last prompt token - the position that must produce the
answer. The probe can read other features of a sequence instead (``feature``, :data:`FEATURES`):
the mean over the prompt's tokens or over every token of the text, for memorized passages
(a verbatim passage is memorized at every token, not only where its continuation starts).

:func:`probe_control` is the same probe on two lists of texts with a known answer (memorized /
never seen): the positive controls of ``bench/probe_controls.py``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from excise.handle import ModelHandle
from excise.request import ForgetRequest
from excise.request import Fact
from probes import stats
from probes.behaviour import first_target_positions


def depth_sites(model: ModelHandle) -> list[str]:
    return [f"blocks.{L}.resid_post" for L in range(model.n_layers)]


@torch.inference_mode()
def last_prompt_states(model: ModelHandle, facts: Sequence[Fact], sites: Sequence[str],
                       batch_size: int = 256) -> dict[str, Tensor]:
    """``{site: [n, d]}`` activations at the last prompt token of every fact."""
    out: dict[str, list[Tensor]] = {s: [] for s in sites}
    for b in model.encode(list(facts)).chunks(batch_size):
        acts = model.run_with_cache(b.tokens, sites)
        pos = first_target_positions(b) - 1
        rows = torch.arange(len(b), device=pos.device)
        for s in sites:
            a = acts[s]
            out[s].append(a[rows.to(a.device), pos.to(a.device)].float().cpu())
    return {s: torch.cat(v) for s, v in out.items()}


FEATURES = ("last", "prompt_mean", "mean", "target_mean")


@torch.inference_mode()
def sequence_states(model: ModelHandle, facts: Sequence[Fact], sites: Sequence[str],
                    feature: str = "last", batch_size: int = 256) -> dict[str, Tensor]:
    """``{site: [n, d]}`` one vector per fact: ``"last"`` the activation at the last prompt token
    (:func:`last_prompt_states`), ``"prompt_mean"`` the mean over the prompt's tokens, ``"mean"``
    the mean over every token of the text (prompt and target), ``"target_mean"`` the mean over
    the positions that predict a target token (the last prompt token .. the second-to-last
    target token: where a memorised continuation is read out); BOS is never included."""
    if feature not in FEATURES:
        raise ValueError(f"feature={feature!r}: choose one of {list(FEATURES)}")
    if feature == "last":
        return last_prompt_states(model, facts, sites, batch_size)
    out: dict[str, list[Tensor]] = {s: [] for s in sites}
    for b in model.encode(list(facts)).chunks(batch_size):
        acts = model.run_with_cache(b.tokens, sites)
        pos = torch.arange(b.tokens.shape[1])[None, :]
        first = first_target_positions(b).cpu()
        start, end = {"prompt_mean": (1, first), "mean": (1, b.lengths.cpu()),
                      "target_mean": ((first - 1).clamp(min=1), b.lengths.cpu() - 1)}[feature]
        start = torch.as_tensor(start).reshape(-1, 1)
        w = ((pos >= start) & (pos < end[:, None])).float()  # [n, T]
        w = w / w.sum(1, keepdim=True).clamp(min=1)
        for s in sites:
            a = acts[s].float()
            out[s].append(torch.einsum("nt,ntd->nd", w.to(a.device), a).cpu())
    return {s: torch.cat(v) for s, v in out.items()}


def _standardise(x: Tensor) -> Tensor:
    """Label-free standardisation, then - where there are more features than rows - the rows'
    coordinates in their own span (``U S`` of the SVD): every ridge fit here (weights penalised
    by their norm, intercept free) depends on the rows only through their inner products and
    differences, which the rotation keeps, so predictions are unchanged and each solve is
    ``n x n`` instead of ``d x d``."""
    x = x.double()
    x = (x - x.mean(0)) / x.std(0).clamp(min=1e-6)
    if x.shape[1] > x.shape[0]:
        u, sv, _ = torch.linalg.svd(x, full_matrices=False)
        x = u * sv
    return x


def _sample(facts: Sequence[Fact], n: int, seed: int) -> list[Fact]:
    facts = list(facts)
    if len(facts) <= n:
        return facts
    return random.Random(seed).sample(facts, n)


def probe_data(request: ForgetRequest, max_per_class: int = 150,
               seed: int = 0) -> tuple[list[Fact], Tensor]:
    """Balanced facts and labels: forget (memorized, 1) vs holdout (never trained, 0)."""
    n = min(len(request.forget), len(request.holdout), max_per_class)
    if n < 2:
        raise ValueError(f"loo_probe needs at least 2 forget and 2 holdout facts, have "
                         f"{len(request.forget)} and {len(request.holdout)}")
    pos = _sample(request.forget, n, seed)
    neg = _sample(request.holdout, n, seed + 1)
    y = torch.cat([torch.ones(len(pos)), torch.zeros(len(neg))])
    return pos + neg, y


@dataclass(frozen=True)
class LooProbe:
    """What :func:`loo_probe_result` measured. ``curves`` (per depth, what :func:`loo_probe`
    returns): ``balanced`` and, with a null, ``null`` / ``null_hi``, ``ridge``, ``logistic``.
    ``null_samples`` (``[depths, n_null]``, None without a null): the balanced probe's accuracy
    under each label permutation - permutation ``k`` is the same relabelling at every depth.
    ``best``: the largest balanced accuracy over depths, at ``best_depth``; ``best_null`` /
    ``best_null_hi``: the mean and 95th percentile of each permutation's largest accuracy over
    depths (:func:`best_depth_null`), so choosing the depth after seeing the data is inside the
    null (None without a null)."""

    curves: dict[str, list[float]]
    null_samples: Tensor | None
    best: float
    best_depth: int
    best_null: float | None
    best_null_hi: float | None


def best_depth_null(null_samples: Tensor) -> tuple[float, float]:
    """The permutation null of the best depth from per-depth permutation accuracies
    (``[depths, n_perm]``, permutation ``k`` the same relabelling at every depth): per
    permutation the maximum over depths; its mean and 95th percentile."""
    if null_samples.ndim != 2 or not null_samples.numel():
        raise ValueError(f"best_depth_null needs [depths, n_perm] accuracies, got shape "
                         f"{tuple(null_samples.shape)}")
    best = null_samples.double().amax(0)
    return float(best.mean()), float(torch.quantile(best, 0.95))


def _person_groups(facts: Sequence[Fact]) -> Tensor:
    """One group per person; facts without a person each their own group."""
    return torch.tensor([f.person if f.person >= 0 else 10**6 + i for i, f in enumerate(facts)])


def loo_probe_states(states: Sequence[Tensor], y: Tensor, groups: Tensor, lam: float = 10.0,
                     logistic: bool = True, by: str = "person", n_null: int = 20,
                     seed: int = 0) -> LooProbe:
    """:func:`loo_probe_result` on activations already read: ``states[depth]`` ``[n, d]``,
    labels ``y`` and the person ``groups`` of the rows."""
    if by not in ("person", "sequence"):
        raise ValueError(f"by={by!r}: choose 'person' or 'sequence'")
    if not len(states):
        raise ValueError("loo_probe needs the activations of at least one depth")
    out: dict[str, list[float]] = {"balanced": [], "null": [], "null_hi": [], "ridge": [],
                                   "logistic": []}
    g = groups if by == "person" else torch.arange(len(y))
    nulls = []
    for a in states:
        x = _standardise(a)
        if n_null:
            # the same seed at every depth: permutation k relabels the groups alike everywhere
            acc, null = stats.group_loo_with_null(x, y, g, lam, n_null, seed)
            out["balanced"].append(acc)
            nulls.append(null)
            out["null"].append(float(null.mean()))
            out["null_hi"].append(float(torch.quantile(null, 0.95)))
        else:
            out["balanced"].append(stats.balanced_group_loo_accuracy(x, y, g, lam))
        for kind in ("ridge", "logistic") if logistic else ("ridge",):
            if by == "person":
                out[kind].append(stats.group_loo_accuracy(x, y, groups, kind, lam))
            else:
                out[kind].append(stats.loo_probe_accuracy(x, y, kind, lam))
    acc = out["balanced"]
    depth = max(range(len(acc)), key=lambda d: acc[d])
    samples = torch.stack(nulls) if nulls else None
    best_null, best_hi = best_depth_null(samples) if samples is not None else (None, None)
    return LooProbe({k: v for k, v in out.items() if v}, samples, acc[depth], depth,
                    best_null, best_hi)


def loo_probe_result(model: ModelHandle, facts: Sequence[Fact], y: Tensor, lam: float = 10.0,
                     logistic: bool = True, by: str = "person", n_null: int = 20,
                     seed: int = 0, feature: str = "last") -> LooProbe:
    """The probe of :func:`loo_probe` with its best depth read against the null of the best
    depth (:class:`LooProbe`): the per-depth permutations are computed once and reused."""
    if by not in ("person", "sequence"):
        raise ValueError(f"by={by!r}: choose 'person' or 'sequence'")
    sites = depth_sites(model)
    acts = sequence_states(model, facts, sites, feature)
    return loo_probe_states([acts[s] for s in sites], y, _person_groups(facts), lam, logistic,
                            by, n_null, seed)


def loo_probe(model: ModelHandle, facts: Sequence[Fact], y: Tensor, lam: float = 10.0,
              logistic: bool = True, by: str = "person", n_null: int = 20,
              seed: int = 0, feature: str = "last") -> dict[str, list[float]]:
    """Leave-one-out accuracy per depth: ridge (closed form, exact) and logistic (exact batched
    refits). ``by="person"`` leaves out all of one person's facts at a time - a person's facts
    share identity features, so leaving out single sequences would let the probe recognise the
    person instead of a memorization signature; ``by="sequence"`` is PGA's plain protocol
    (logistic then uses the approximate one-Newton-step LOO). Features are standardised with
    label-free statistics. ``balanced`` (the headline number) is a class-balanced ridge probe
    refitted per left-out group: plain LOO reads below chance when there is no signal (the
    intercept shifts away from the left-out class); ``ridge`` (closed form) and ``logistic`` are
    the plain estimators, kept for comparison.

    ``null`` / ``null_hi`` are the mean and 95th percentile of the balanced probe's accuracy with
    the labels permuted across groups (:func:`probes.stats.group_permutation_null`, ``n_null``
    permutations): the protocol's own chance level on these activations. A signature exists at a
    depth only where ``balanced`` exceeds ``null_hi``.

    ``feature`` (:data:`FEATURES`): which vector of each fact the probe reads (default the last
    prompt token; :func:`sequence_states`). The best depth against its own null:
    :func:`loo_probe_result`."""
    return loo_probe_result(model, facts, y, lam, logistic, by, n_null, seed, feature).curves


def loo_accuracies(x: Tensor, labels: Tensor, lam: float = 10.0, chunk: int = 32) -> Tensor:
    """Leave-one-sequence-out accuracy of :func:`probes.stats.balanced_ridge_fit` for each row
    of ``labels`` (``[P, n]`` in {0, 1}: e.g. the true labels and permutations of them) on the
    same ``x`` (``[n, d]``): ``[P]``, equal to :func:`probes.stats.balanced_group_loo_accuracy`
    with one group per sequence, batched. With class weights ``c`` (half the weight per class
    over the rows kept) the fit is ``w = (X'CX - m m' + lam/(n-1) I)^-1 X'C(t - 1/2)``, ``m =
    c X``, and the left-out row is classified 1 where ``(x_i - m) w > 0``. The matrix differs
    between left-out rows only by a rank-2 term plus which class the row is in, so each label
    vector costs two ``d x d`` inverses and a Woodbury step per row; ``chunk`` label vectors at
    a time."""
    x = x.double()
    n, d = x.shape
    t = labels.double().reshape(-1, n)
    eye = torch.eye(d, dtype=torch.float64)
    out = []
    for start in range(0, len(t), chunk):
        tt = t[start:start + chunk]  # [P, n]
        # the fit leaving out row i weights the other rows of its class by a, of the other by b
        n1 = tt.sum(1, keepdim=True) - tt  # [P, i] class-1 rows kept
        n0 = (n - 1) - n1
        if (n1 < 1).any() or (n0 < 1).any():
            raise ValueError("loo_accuracies needs at least 2 rows of each class")
        a, b = 0.5 / n1, 0.5 / n0  # [P, i]
        s1, s0 = tt @ x, (1 - tt) @ x  # [P, d]
        g1 = torch.einsum("pj,jd,je->pde", tt, x, x)
        g0 = torch.einsum("pj,jd,je->pde", 1 - tt, x, x)
        own = a * tt + b * (1 - tt)  # the left-out row's weight, taken out again
        m = a[..., None] * (s1[:, None] - tt[..., None] * x) \
            + b[..., None] * (s0[:, None] - (1 - tt)[..., None] * x)  # [P, i, d]
        rhs = 0.5 * (a[..., None] * (s1[:, None] - tt[..., None] * x)
                     - b[..., None] * (s0[:, None] - (1 - tt)[..., None] * x))
        # G_i = B_k - own_i x_i x_i' - m_i m_i', B_k = a S1 + b S0 + lam' I: one B per class k
        # of the left-out row (a, b depend on i only through it); Woodbury for the rank 2
        cls = tt > 0.5
        vecs = torch.stack([x.expand_as(m), m, rhs], -1)  # [P, i, d, 3]
        z = torch.zeros_like(vecs)
        big1, big0 = tt.sum(1), (1 - tt).sum(1)  # [P] class sizes with every row
        for k, ak, bk in ((True, 0.5 / (big1 - 1), 0.5 / big0),
                          (False, 0.5 / big1, 0.5 / (big0 - 1))):
            bmat = ak[:, None, None] * g1 + bk[:, None, None] * g0 + lam / (n - 1) * eye
            zk = torch.einsum("pde,pief->pidf", stats.inverse(bmat), vecs)
            z = torch.where((cls == k)[..., None, None], zk, z)
        bu, br = z[..., :2], z[..., 2]  # B^-1 U, B^-1 r
        u = vecs[..., :2]
        small = torch.diag_embed(torch.stack([1 / own, torch.ones_like(own)], -1)) \
            - u.transpose(-1, -2) @ bu  # D^-1 - U' B^-1 U: [P, i, 2, 2]
        w = br + (bu @ stats.solve(small, (u.transpose(-1, -2) @ br[..., None])))[..., 0]
        pred = ((x[None] - m) * w).sum(-1) > 0  # [P, i]
        out.append((pred.double() == tt).double().mean(-1))
    return torch.cat(out)


@dataclass(frozen=True)
class ProbeControl:
    """The leave-one-out probe on a positive control (members labelled 1, non-members 0, each
    sequence its own group), per depth: ``acc`` (the class-balanced ridge probe), ``null`` and
    ``null_hi`` (mean and 95th percentile of its permutation null). ``best``: the largest
    accuracy over depths, at ``best_depth``, read against the null of the same maximum -
    ``best_null`` / ``best_null_hi`` - each permutation's largest accuracy over depths (one
    permutation shared by every depth), so choosing the depth after seeing the data is in the
    null too. ``n`` members and non-members, ``feature``, ``lam``, ``n_null``."""

    acc: list[float]
    null: list[float]
    null_hi: list[float]
    best: float
    best_depth: int
    best_null: float
    best_null_hi: float
    n: tuple[int, int]
    feature: str
    lam: float
    n_null: int

    @property
    def gap(self) -> float:
        """``best`` above the mean of its null."""
        return self.best - self.best_null

    def passes(self, margin: float = 0.1) -> bool:
        """The bar of a positive control: ``best`` at least ``margin`` above its null's mean and
        above its 95th percentile."""
        return self.best >= self.best_null + margin and self.best > self.best_null_hi

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


def probe_control(model: ModelHandle, members: Sequence[Fact], nonmembers: Sequence[Fact],
                  lam: float = 10.0, n_null: int = 100, seed: int = 0,
                  feature: str = "last") -> ProbeControl:
    """The probe of :func:`loo_probe` (class-balanced ridge, standardised features, every depth
    ``blocks.{L}.resid_post``, leave-one-sequence-out) on texts whose answer is known, with its
    permutation null per depth and for the maximum over depths."""
    if len(members) < 2 or len(nonmembers) < 2:
        raise ValueError(f"probe_control needs at least 2 members and 2 non-members, have "
                         f"{len(members)} and {len(nonmembers)}")
    if n_null < 1:
        raise ValueError(f"n_null={n_null!r}: the permutation null needs at least 1 permutation")
    facts = list(members) + list(nonmembers)
    y = torch.cat([torch.ones(len(members)), torch.zeros(len(nonmembers))]).double()
    # the permutations of group_permutation_null (one group per sequence), the same at every
    # depth
    gen = torch.Generator().manual_seed(seed)
    perms = torch.stack([y[torch.randperm(len(y), generator=gen)] for _ in range(n_null)])
    sites = depth_sites(model)
    acts = sequence_states(model, facts, sites, feature)
    acc, nulls = [], []
    for s in sites:
        res = loo_accuracies(_standardise(acts[s]), torch.cat([y[None], perms]), lam)
        acc.append(float(res[0]))
        nulls.append(res[1:])
    null = torch.stack(nulls)  # [depths, n_null]
    depth = max(range(len(acc)), key=lambda d: acc[d])
    return ProbeControl(acc, [float(v) for v in null.mean(1)],
                        [float(torch.quantile(v, 0.95)) for v in null], acc[depth], depth,
                        *best_depth_null(null), (len(members), len(nonmembers)), feature, lam,
                        n_null)


def drift_facts(request: ForgetRequest, max_n: int = 150, seed: int = 0) -> dict[str, list[Fact]]:
    return {"forget": _sample(request.forget, max_n, seed),
            "retain": _sample(request.retain, max_n, seed)}


def cka_per_layer(model: ModelHandle, reference: ModelHandle,
                  facts: Sequence[Fact]) -> list[float]:
    """Linear CKA between ``model`` and ``reference`` at every depth on the same prompts."""
    sites = depth_sites(model)
    a = last_prompt_states(model, facts, sites)
    b = last_prompt_states(reference, facts, sites)
    return [stats.linear_cka(a[s], b[s]) for s in sites]


def canary_control(model: ModelHandle, canaries: dict[int, Sequence[Fact]], lam: float = 10.0,
                   n_null: int = 100, seed: int = 0, feature: str = "last") -> list[dict]:
    """The canary control on one model: for every repetition count (``canaries[count]``, the
    never-seen ones under 0, e.g. ``Organism.canary_facts()``) the probe on that count's canaries
    against the never-seen ones (:func:`probe_control`), the loss-based membership AUC of the
    same split (mean target log-probability; :func:`probes.stats.auc`) and the greedy recall of
    the canaries' secrets. One row per count, ascending."""
    from probes.behaviour import recall
    from probes.privacy import membership_scores

    if 0 not in canaries or not canaries[0]:
        raise ValueError("canary_control needs never-seen canaries under count 0")
    unseen = list(canaries[0])
    s_unseen = membership_scores(model, unseen)[0]
    rows = []
    for count in sorted(c for c in canaries if c):
        pc = probe_control(model, canaries[count], unseen, lam, n_null, seed, feature)
        rows.append({"count": count, "acc": pc.best, "depth": pc.best_depth,
                     "null": pc.best_null, "null_hi": pc.best_null_hi,
                     "mia_auc": stats.auc(membership_scores(model, canaries[count])[0],
                                          s_unseen),
                     "recall": recall(model, canaries[count]), "probe": pc.to_dict()})
    return rows


def verbatim_pairs(model: ModelHandle, rows: Sequence[dict]) -> tuple[list[Fact], list[Fact]]:
    """The verbatim control's texts for ``model`` (rows as in ``data/verbatim.jsonl``: ``kind``
    ``"verbatim"`` or ``"novel"``, ``pair``, ``prompt``, ``target``): the passages it completes
    exactly (greedy, :func:`probes.knowledge.knowledge`), each with its novel twin - pairs whose
    twin the model completes too (a pattern it continues in context, not a memory) are left
    out."""
    from probes.knowledge import knowledge

    pairs: dict[int, dict[str, Fact]] = {}
    for r in rows:
        if r.get("kind") not in ("verbatim", "novel"):
            raise ValueError(f"verbatim row {r!r}: kind must be 'verbatim' or 'novel'")
        pairs.setdefault(int(r["pair"]), {})[r["kind"]] = Fact(r["prompt"], r["target"])
    ids = [i for i in sorted(pairs) if len(pairs[i]) == 2]
    if not ids:
        raise ValueError("no complete verbatim / novel pair in the rows")
    v = knowledge(model, [pairs[i]["verbatim"] for i in ids])
    n = knowledge(model, [pairs[i]["novel"] for i in ids])
    keep = [i for i, a, b in zip(ids, v, n) if a["known"] and not b["known"]]
    return [pairs[i]["verbatim"] for i in keep], [pairs[i]["novel"] for i in keep]
