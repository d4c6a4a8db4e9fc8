"""The planted-location organism as ground truth for ``locate`` (issue 14, section 1).

    EXCISE_CACHE=... OMP_NUM_THREADS=2 python bench/planted.py [--preset small] [--out docs]
        [--methods fisher grad_ratio ...] [--from-json docs/results/planted.json]

(a) The planting worked: recall of the designated people (reported and validation groups) in
    the planted organism, with its planted neurons zero- and mean-ablated, and in the oracle
    (the same routed training without the reported people); everyone else's recall, shared
    facts and perplexity beside them.
(b) Every unit-level method registered in ``locate.METHODS``, run with its defaults on the
    request that forgets the reported group and retains everyone outside the designated groups
    (:func:`locate_request`: the validation group shares the planted neurons), scored against
    the planted neurons: precision and recall at k = 0.5x / 1x / 2x / 5x the planted count,
    the planted neurons' median rank and the AUROC of planted vs. other neurons. Methods rank
    MLP neurons (parameter scores summed per neuron, ``Importance.by_unit``); an SAE at an MLP
    neuron site is scored through its decoder weights onto the neurons, one at another site is
    left out with the reason, as is a method that fails or scores no neuron. A random
    ranking's expected values are the baseline row.

(c) From location to deletion: the planted neurons, ``subnetwork``'s top neurons and as many
    random neurons re-initialised and retrained on the user's retain data (``edit.reinit``),
    measured beside the original and the oracle, with one relearning attack
    (:func:`chain_check`).
(d) What the best localizer missed: the planted neurons, its top k, the planted neurons it
    found, the ones it missed and the others it picked, each zero-ablated in the planted model
    (:func:`miss_check`): whether the misses hold anything the reported facts need.

Writes ``<out>/results/planted.md`` (tables), ``planted.png`` (the figure) and ``planted.json``
(every number), and refreshes the "Planted organism" section of ``<out>/results.md`` (between
``<!-- planted:start -->`` and ``<!-- planted:end -->``; the sweep keeps it), with the bar:
the best localizer's recall at k = the planted count, >= 0.9. ``tiny`` writes those names,
another preset ``planted-<preset>.*`` and its own section. No setting is chosen on the
reported people: every method runs at its defaults.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import excise  # noqa: E402
from excise import plots  # noqa: E402
from excise.importance import Importance  # noqa: E402
from excise.io import atomic_write_text, write_marked_section  # noqa: E402

K_MULTIPLES = (0.5, 1, 2, 5)


# -- (a) the planting check --------------------------------------------------------------------
def mean_activations(model, facts, sites) -> dict[str, torch.Tensor]:
    """Mean activation per unit of ``sites`` over every real token of ``facts``."""
    sums, count = {}, 0
    for b in model.encode(list(facts)).chunks(256):
        acts = model.run_with_cache(b.tokens, sites)
        real = torch.arange(b.tokens.shape[1])[None, :] < b.lengths[:, None]
        for s, a in acts.items():
            sums[s] = sums.get(s, 0) + a[real].sum(0)
        count += int(real.sum())
    return {s: v / count for s, v in sums.items()}


def planting_check(org, oracle) -> dict:
    from probes.behaviour import perplexity, recall

    p = org.planted
    rep = org.request(p.groups["reported"])
    val = org.request(p.groups["validation"])
    others = org.request([i for i in org.world.trained_people if i not in p.people])
    model = org.model
    means = mean_activations(model, others.forget, p.units.sites())
    variants = {"planted": (model, None), "zero-ablated": (model, p.ablation()),
                "mean-ablated": (model, p.ablation(means)), "oracle": (oracle, None)}
    rows = {}
    for name, (m, hooks) in variants.items():
        rows[name] = {
            "reported": recall(m, rep.forget, hooks=hooks),
            "reported (held-out phrasings)": recall(m, rep.paraphrase, hooks=hooks),
            "validation": recall(m, val.forget, hooks=hooks),
            "others": recall(m, others.forget, hooks=hooks),
            "holdout": recall(m, rep.holdout, hooks=hooks),
            "shared": recall(m, rep.shared, hooks=hooks),
            "perplexity": perplexity(m, rep.general, hooks=hooks),
        }
    return rows


# -- (b) scoring the localizers ----------------------------------------------------------------
def neuron_scores(imp: Importance, model) -> torch.Tensor | str:
    """One score per MLP neuron (layer-major), or the reason there is none."""
    L = model.n_layers
    view = imp
    if any(model.info(s).kind == "param" for s in imp.scores if s in model.site_table()):
        view = imp.by_unit()
    sites = [f"blocks.{layer}.mlp.post" for layer in range(L)]
    if all(s in view.scores for s in sites):
        return torch.cat([view.scores[s].float().reshape(-1) for s in sites])
    sae_sites = [s for s in imp.scores if s.endswith(".sae")]
    if sae_sites:
        bases = [s[:-4] for s in sae_sites]
        if not all(b.endswith(".mlp.post") for b in bases):
            return (f"its SAE reads {', '.join(bases)} (the default site), not MLP neurons; "
                    f"latents cannot be mapped onto neurons there")
        return sae_onto_neurons(imp, model)
    return f"scores no MLP neuron (sites: {', '.join(list(view.scores)[:4])})"


def sae_onto_neurons(imp: Importance, model) -> torch.Tensor:
    """A neuron's score: the sum over latents of latent score x |decoder weight| onto it."""
    from excise.sae import load_sae

    d = model.info("blocks.0.mlp.post").unit_shape[0]
    out = torch.zeros(model.n_layers * d)
    for site, s in imp.scores.items():
        layer = int(site.split(".")[1])
        sae_model, _scale = load_sae(imp.meta["sae_path"][site])
        W_dec = sae_model.W_dec.detach().float()  # [d_sae, d_mlp]
        out[layer * d:(layer + 1) * d] = s.float() @ W_dec.abs()
    return out


def ranks_of(scores: torch.Tensor) -> torch.Tensor:
    """1 = highest score; ties share their average rank."""
    order = torch.argsort(-scores, stable=True)
    ranks = torch.empty_like(scores)
    ranks[order] = torch.arange(1, len(scores) + 1, dtype=scores.dtype)
    for v in torch.unique(scores):  # average over ties (a method scoring many units 0)
        tie = scores == v
        if int(tie.sum()) > 1:
            ranks[tie] = ranks[tie].mean()
    return ranks


def score_against(scores: torch.Tensor, planted: torch.Tensor) -> dict:
    """Precision / recall at k, the planted units' median rank and the AUROC."""
    n, N = int(planted.sum()), len(scores)
    scores = scores.double().nan_to_num(nan=-math.inf)
    ranks = ranks_of(scores)
    out = {}
    for mult in K_MULTIPLES:
        k = max(1, round(mult * n))
        top = torch.argsort(-scores, stable=True)[:k]
        hit = int(planted[top].sum())
        out[f"p@{mult:g}x"], out[f"r@{mult:g}x"] = hit / k, hit / n
    pr = ranks[planted]
    out["median rank"] = float(pr.median())
    # AUROC = P(a planted unit outranks another), ties counted half (Mann-Whitney)
    out["AUROC"] = float(((N - pr + 1).sum() - n * (n + 1) / 2) / (n * (N - n)))
    return out


def random_baseline(n: int, N: int) -> dict:
    """A random ranking's expected values."""
    out = {}
    for mult in K_MULTIPLES:
        k = max(1, round(mult * n))
        out[f"p@{mult:g}x"], out[f"r@{mult:g}x"] = n / N, k / N
    out["median rank"], out["AUROC"] = (N + 1) / 2, 0.5
    return out


def locate_request(org):
    """Forget the reported group; retain every trained person outside the designated groups.
    The validation people's facts live in the same planted neurons: kept in the retain set they
    would make every contrastive localizer (forget against retain) avoid exactly those neurons,
    and the planted neurons would no longer be the answer to the question asked."""
    p = org.planted
    others = [i for i in org.world.trained_people if i not in p.people]
    return org.request(p.groups["reported"], retain_people=others)


def score_methods(org, methods, log) -> tuple[dict, dict, dict]:
    import locate
    from excise.app.pipeline import locate_with

    req = locate_request(org)
    model = org.model
    planted = planted_mask(org)
    scored, skipped, neuron_ranking = {}, {}, {}
    cache = locate.StatsCache()
    for name in methods:
        fn = locate.METHODS[name]
        t0 = time.time()
        try:
            imp = locate_with(fn, model, req, None, {}, cache=cache)
        except Exception as e:  # noqa: BLE001 - a method that cannot run here is reported
            skipped[name] = f"failed with its defaults: {type(e).__name__}: {e}"
            log(f"  {name}: {skipped[name]}")
            continue
        s = neuron_scores(imp, model)
        if isinstance(s, str):
            skipped[name] = s
            log(f"  {name}: left out - {s}")
            continue
        scored[name] = score_against(s, planted) | {"seconds": round(time.time() - t0, 1)}
        neuron_ranking[name] = s
        log(f"  {name}: {scored[name]}")
    scored["random (expected)"] = random_baseline(int(planted.sum()), len(planted))
    scored[SHORTCUT] = score_against(weight_norms(model), planted)
    log(f"  {SHORTCUT}: {scored[SHORTCUT]}")
    return scored, skipped, neuron_ranking


def planted_mask(org) -> torch.Tensor:
    """Bool over the MLP neurons (layer-major): planted or not."""
    model = org.model
    d = model.info("blocks.0.mlp.post").unit_shape[0]
    planted = torch.zeros(model.n_layers * d, dtype=torch.bool)
    for u in org.planted.neurons():
        planted[int(u.site.split(".")[1]) * d + u.index[0]] = True
    return planted


def best_localizer(scored: dict) -> str | None:
    """The scored localizer with the highest recall at k = the planted count."""
    real = {n: r for n, r in scored.items() if not n.startswith("random") and n != SHORTCUT}
    return max(real, key=lambda n: real[n]["r@1x"]) if real else None


# -- (d) what the best localizer missed --------------------------------------------------------
def miss_check(org, oracle, scores: torch.Tensor, log) -> dict:
    """Zero-ablate, in the planted model, the planted neurons, the best localizer's top k
    (k = the planted count), the planted neurons it found, the ones it missed and the others it
    picked; recall of each group. Whether the planted neurons a localizer misses hold anything
    the reported people's facts need: where ablating only the found ones already brings the
    reported people to the oracle's level, the misses are planted but not needed."""
    from probes.behaviour import recall

    p, model = org.planted, org.model
    d = model.info("blocks.0.mlp.post").unit_shape[0]
    planted = planted_mask(org)
    top = torch.zeros_like(planted)
    top[torch.argsort(-scores, stable=True)[:int(planted.sum())]] = True
    groups = {"reported": org.request(p.groups["reported"]).forget,
              "validation": org.request(p.groups["validation"]).forget,
              "others": org.request([i for i in org.world.trained_people
                                     if i not in p.people]).forget}
    sets = {"nothing": torch.zeros_like(planted), "planted neurons": planted,
            "the localizer's top k": top, "planted, found": planted & top,
            "planted, missed": planted & ~top, "picked, not planted": top & ~planted}

    def zero(on: torch.Tensor) -> dict:
        keep = (~on).float()
        return {f"blocks.{L}.mlp.post": (lambda m: lambda x, _s: x * m.to(x.dtype))(
            keep[L * d:(L + 1) * d]) for L in range(model.n_layers)}

    rows = {}
    for name, on in sets.items():
        rows[f"{name} ({int(on.sum())})"] = {g: recall(model, f, hooks=zero(on))
                                             for g, f in groups.items()}
        log(f"  {name}: {rows[f'{name} ({int(on.sum())})']}")
    rows["oracle"] = {g: recall(oracle, f) for g, f in groups.items()}
    return rows


def miss_lines(res: dict) -> list[str]:
    """The table of :func:`miss_check` (nothing for a record without it)."""
    return table_lines(res.get("miss"), "ablated", (
        f"**(d) What the best localizer missed** (`{res.get('best')}`; zero-ablating, in the "
        f"planted model, each set of MLP neurons - its size in brackets - and reading each "
        f"group's recall; the oracle beside):"))


# the planting's training settings the report prints
SETTINGS = ("fraction", "repeat", "steps", "quiet", "match_norms")


# not a localizer (it reads no data): whether the planted neurons stand out by their weights
# alone - a shortcut any weight-scaled statistic could ride on
SHORTCUT = "weight norm (shortcut check)"


def weight_norms(model) -> torch.Tensor:
    """Per MLP neuron (layer-major): |its W_in column| x |its W_out row|."""
    return torch.cat([model.parameter(f"blocks.{L}.mlp.W_in").detach().norm(dim=0)
                      * model.parameter(f"blocks.{L}.mlp.W_out").detach().norm(dim=1)
                      for L in range(model.n_layers)]).float()


# -- (c) from location to deletion -------------------------------------------------------------
def chain_check(org, oracle, log) -> dict:
    """The planted neurons, ``subnetwork``'s top neurons (run on the user's request - retain
    everyone else, validation people included - and on :func:`locate_request`) and as many
    random neurons, each re-initialised and retrained on the user's retain data
    (``edit.reinit``, the calibration's settings); recall of each group, perplexity and the
    relearning attack's peak (its default setting) beside the original and the oracle."""
    import edit
    import locate
    from excise.sites import Selection, Unit
    from probes.attacks import AttackConfig, peak_recovery, relearn
    from probes.behaviour import perplexity, recall

    p, model = org.planted, org.model
    req = org.request(p.groups["reported"])
    val = org.request(p.groups["validation"])
    others = org.request([i for i in org.world.trained_people if i not in p.people])
    d = model.info("blocks.0.mlp.post").unit_shape[0]
    n = len(p.neurons())
    planted = {(u.site, u.index) for u in p.neurons()}

    def neurons(idx) -> Selection:
        return Selection(tuple(Unit(f"blocks.{i // d}.mlp.post", (i % d,)) for i in idx))

    g = torch.Generator().manual_seed(org.seed)
    picks = {"planted neurons": p.neurons(),
             "random neurons": neurons(torch.randperm(model.n_layers * d, generator=g)[:n]
                                       .tolist())}
    for label, r in (("subnetwork (user's request)", req),
                     ("subnetwork (retain outside the groups)", locate_request(org))):
        s = neuron_scores(locate.subnetwork(model, r), model)
        picks[label] = neurons(torch.argsort(-s)[:n].tolist())

    def row(h, sel=None) -> dict:
        out = {"planted in the pick": None if sel is None else
               sum((u.site, u.index) in planted for u in sel.units) / n,
               "reported": recall(h, req.forget), "validation": recall(h, val.forget),
               "others": recall(h, others.forget), "perplexity": perplexity(h, req.general),
               "relearn peak": float(peak_recovery(relearn(h, req, AttackConfig()).y))}
        log(f"  {out}")
        return out

    rows = {"original": row(model), "oracle": row(oracle)}
    for label, sel in picks.items():
        h = model.clone()
        edit.reinit(h, None, sel, request=req, mode="fresh", steps=400, lr=3e-3, batch_size=64,
                    seed=org.seed)
        rows[f"reinit: {label}"] = row(h, sel)
    return rows


def chain_lines(res: dict) -> list[str]:
    """The table of :func:`chain_check` (nothing for a record without it)."""
    return table_lines(res.get("chain"), "model", (
        f"**(c) From location to deletion** (`edit.reinit` of {res['n_planted']} neurons, "
        f"fresh, retrained 400 steps on the user's retain data - everyone but the reported "
        f"people; the relearning attack at its default setting):"))


def table_lines(rows: dict | None, first: str, intro: str) -> list[str]:
    """``intro`` and a Markdown table of ``rows`` (name -> {column: value}); nothing without
    rows."""
    if not rows:
        return []
    cols = list(next(iter(rows.values())))
    return ["", intro, "", f"| {first} | " + " | ".join(cols) + " |",
            "|---|" + "---|" * len(cols)] + [
        f"| {name} | " + " | ".join(_f(row[c]) for c in cols) + " |"
        for name, row in rows.items()]


# -- the report --------------------------------------------------------------------------------
def _f(v) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else (
        f"{v:.3f}" if isinstance(v, float) and abs(v) < 100 else f"{v:.1f}"
        if isinstance(v, float) else str(v))


def write_report(res: dict, out: Path) -> None:
    (out / "results").mkdir(parents=True, exist_ok=True)
    p = res["planted"]
    check = res["check"]
    lines = [
        f"## The planted-location organism: ground truth for `locate` (`{res['preset']}`)",
        "",
        f"Generated by `python bench/planted.py` ({res['minutes']:.0f} min on 2 CPU cores, "
        f"including training the models not yet cached). Organism `{res['preset']}` trained "
        f"with gradient routing "
        f"(`excise.organism('{res['preset']}', planted=True)`): {len(p['units'])} planted MLP "
        f"neurons ({p['fraction']:.2%} of the neurons, spread over the layers; "
        f"{p['n_params']:.2%} of the parameters) hold the facts of the reported people "
        f"{_people(p['groups']['reported'])} and the validation people "
        f"{_people(p['groups']['validation'])}. The oracle is the same routed training without "
        f"the reported people." + (f" {res['note']}" if res.get("note") else ""),
        "",
        "**(a) The planting worked** (greedy recall; reported and validation on their trained "
        "phrasings; *others* = every other trained person; mean ablation uses each planted "
        "neuron's mean activation on the others' facts):",
        "",
        "| model | " + " | ".join(next(iter(check.values()))) + " |",
        "|---|" + "---|" * len(next(iter(check.values()))),
    ]
    for name, row in check.items():
        lines.append(f"| {name} | " + " | ".join(_f(v) for v in row.values()) + " |")
    scored = res["scored"]
    cols = list(next(iter(scored.values())))
    lines += [
        "",
        f"**(b) Localizers against the planted neurons** (request: forget the reported people, "
        f"retain every trained person outside the designated groups - the validation people "
        f"share the planted neurons, and a retain set holding them would ask a contrastive "
        f"localizer for other neurons; every method at its defaults; {res['n_planted']} "
        f"planted among {res['n_neurons']} MLP neurons; p@kx / r@kx: precision / recall among "
        f"the top k = kx x {res['n_planted']} neurons; median rank of the planted neurons, "
        f"1 = top; AUROC of "
        f"planted vs. other neurons):",
        "",
        "| method | " + " | ".join(cols) + " |",
        "|---|" + "---|" * len(cols),
    ]
    for name, row in scored.items():
        lines.append(f"| {name} | " + " | ".join(_f(row.get(c)) for c in cols) + " |")
    if res["skipped"]:
        lines += ["", "Left out:"]
        lines += [f"- `{n}`: {why}" for n, why in res["skipped"].items()]
    lines += chain_lines(res) + miss_lines(res) + ["", bar_line(res)]
    if SHORTCUT in scored:
        lines += ["", shortcut_line(res)]
    stem = stem_of(res["preset"])
    lines += ["", f"![localizers against the planted neurons]({stem}.png)", ""]
    atomic_write_text(out / "results" / f"{stem}.md", "\n".join(lines))
    figure(res, out / "results" / f"{stem}.png")
    md = out / "results.md"
    write_marked_section(md, "\n".join(section(res)), *markers(stem))


def stem_of(preset: str) -> str:
    """The results' file name: ``planted`` for tiny (the first one written), else
    ``planted-<preset>``."""
    return "planted" if preset == "tiny" else f"planted-{preset}"


def markers(stem: str) -> tuple[str, str]:
    return f"<!-- {stem}:start -->", f"<!-- {stem}:end -->"


def bar_line(res: dict) -> str:
    """The issue's bar: the best localizer's recall at k = the planted count >= 0.9."""
    best = best_localizer(res["scored"])
    if best is None:
        return "No localizer was scored."
    r = res["scored"][best]["r@1x"]
    verdict = "reached" if r >= 0.9 else "not reached"
    return (f"The bar (the best localizer recovers the planted units with recall >= 0.9 at k = "
            f"the planted count): **{verdict}** - best `{best}`, recall {r:.3f} at k = "
            f"{res['n_planted']} (random: {res['scored']['random (expected)']['r@1x']:.3f}).")


def section(res: dict) -> list[str]:
    """The short "Planted organism" section of ``results.md``."""
    p, check = res["planted"], res["check"]
    keys = ["reported", "validation", "others", "shared", "perplexity"]
    stem = stem_of(res["preset"])
    start, end = markers(stem)
    lines = [start, f"## Planted organism (ground truth for `locate`): `{res['preset']}`", "",
             f"Generated by `python bench/planted.py --preset {res['preset']}`; details, every "
             f"column and the figure in [results/{stem}.md](results/{stem}.md). Organism "
             f"`{res['preset']}`, {len(p['units'])} planted MLP neurons ({p['fraction']:.2%} of "
             f"the neurons, {p['n_params']:.2%} of the parameters); settings "
             f"`{ {k: p['planting'][k] for k in SETTINGS if k in p['planting']} }`."
             + (f" {res['note']}" if res.get("note") else ""),
             "", "| model | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for name, row in check.items():
        lines.append(f"| {name} | " + " | ".join(_f(row[k]) for k in keys) + " |")
    cols = ["p@1x", "r@1x", "r@2x", "median rank", "AUROC"]
    lines += ["", "| method | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for name, row in res["scored"].items():
        lines.append(f"| {name} | " + " | ".join(_f(row.get(c)) for c in cols) + " |")
    if res["skipped"]:
        lines += ["", "Left out: " + "; ".join(f"`{n}` ({why})"
                                               for n, why in res["skipped"].items())]
    lines += chain_lines(res) + miss_lines(res) + ["", bar_line(res)]
    if SHORTCUT in res["scored"]:
        lines += ["", shortcut_line(res)]
    return lines + [end]


def shortcut_line(res: dict) -> str:
    """What the weight-norm row says about the organism."""
    r = res["scored"][SHORTCUT]["r@1x"]
    rand = res["scored"]["random (expected)"]["r@1x"]
    return (f"*{SHORTCUT}*: ranking the neurons by |W_in column| x |W_out row| alone, with no "
            f"data, recovers {r:.3f} of the planted neurons at k = {res['n_planted']} (random "
            f"{rand:.3f})" + (": the planted neurons stand out by their weights, so a "
                              "localizer that multiplies by a weight norm (e.g. `activations`) "
                              "gains from this shortcut; the planting should match the other "
                              "neurons' norms before its recall numbers mean what they claim."
                              if r > rand + 0.1 else "."))


def _people(ps) -> str:
    ps = list(ps)
    return f"{ps[0]}..{ps[-1]}" if ps == list(range(ps[0], ps[-1] + 1)) else str(ps)


def figure(res: dict, path: Path) -> None:
    import numpy as np

    plt = plots._plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 3.8), constrained_layout=True,
                                 gridspec_kw={"width_ratios": [1, 1.6]})
    check = res["check"]
    keys = ["reported", "validation", "others", "shared"]
    x = np.arange(len(keys))
    w = 0.8 / len(check)
    for i, (name, row) in enumerate(check.items()):
        a1.bar(x + i * w, [row[k] for k in keys], w, label=name)
    a1.set_xticks(x + w * (len(check) - 1) / 2, keys, fontsize=8)
    a1.set_ylim(0, 1.05)
    a1.set_ylabel("recall")
    a1.legend(fontsize=7)
    a1.set_title("(a) ablating the planted neurons")
    scored = res["scored"]
    names = list(scored)
    x = np.arange(len(names))
    w = 0.8 / len(K_MULTIPLES)
    for i, mult in enumerate(K_MULTIPLES):
        a2.bar(x + i * w, [scored[n][f"r@{mult:g}x"] for n in names], w,
               label=f"k = {mult:g} x planted", color=plt.get_cmap(plots.CMAP)(i / 4))
    a2.set_xticks(x + w * (len(K_MULTIPLES) - 1) / 2, names, rotation=20, fontsize=8)
    a2.set_ylim(0, 1.05)
    a2.set_ylabel("recall of the planted neurons")
    a2.legend(fontsize=7)
    a2.set_title("(b) localizers: planted neurons in the top k")
    plots.save(fig, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--out", default="docs", help="writes <out>/results/planted.{md,png,json}")
    ap.add_argument("--methods", nargs="*", default=None,
                    help="locate methods to score (default: every one in locate.METHODS)")
    ap.add_argument("--from-json", default=None, help="only rewrite the report from a record")
    ap.add_argument("--planting", default=None,
                    help="Planting fields as JSON (default: the preset's), e.g. "
                         "'{\"match_norms\": false}'")
    a = ap.parse_args()
    out = Path(a.out)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    if a.from_json:
        write_report(json.loads(Path(a.from_json).read_text()), out)
        return
    import locate

    t0 = time.time()
    org = excise.organism(a.preset, planted=json.loads(a.planting) if a.planting else True)
    p = org.planted
    log(f"{org}")
    oracle = org.oracle(org.request(p.groups["reported"]))
    log("(a) planting check")
    check = planting_check(org, oracle)
    for name, row in check.items():
        log(f"  {name}: {row}")
    log("(b) localizers")
    methods = a.methods if a.methods else list(locate.METHODS)
    scored, skipped, ranking = score_methods(org, methods, log)
    log("(c) from location to deletion")
    chain = chain_check(org, oracle, log)
    best = best_localizer(scored)
    log(f"(d) what {best} missed")
    miss = miss_check(org, oracle, ranking[best], log) if best else None
    d = org.model.info("blocks.0.mlp.post").unit_shape[0]
    res = {"preset": a.preset, "planted": p.to_dict(), "check": check, "scored": scored,
           "chain": chain, "best": best, "miss": miss,
           "skipped": skipped, "n_planted": len(p.neurons()),
           "n_neurons": org.model.n_layers * d, "minutes": (time.time() - t0) / 60}
    (out / "results").mkdir(parents=True, exist_ok=True)
    stem = stem_of(a.preset)
    atomic_write_text(out / "results" / f"{stem}.json", json.dumps(res, indent=2))
    write_report(res, out)
    log(f"wrote {out / 'results' / stem}.md in {res['minutes']:.1f} min")


if __name__ == "__main__":
    main()
