"""edit: every registered method is reversible, saveable, refuses bad input, and lowers forget
recall; plus method-specific guarantees (masked fine-tuning, baked == hook projections, mean
ablation == hook, seeded noise, export, sequential requests).

The generated tests run over ``edit.METHODS``: a new method is covered as soon as it is
registered. ``FAST`` / ``EFFECTIVE`` hold per-method keyword arguments (a method not listed is
called with none, plus ``request=`` when its signature takes one).
"""

from __future__ import annotations

import inspect
import json
import re

import pytest
import torch

import edit
import locate
from excise.edits import Diff, HookSpec, applied_edits, export, weight_edit
from excise.importance import Importance
from excise.sites import Selection, Unit
from probes.behaviour import recall

FAST = {  # cheap settings for the mechanical tests
    "finetune": {"steps": 3, "batch_size": 8},
    "reinit": {"steps": 3, "batch_size": 8},
    "distill": {"steps": 3, "batch_size": 8},
}
EFFECTIVE = {  # settings under which the edit should lower forget recall on the tiny organism
    "prune": {"top": 4, "units_from": "sum"},
    "noise": {"scale": 3.0},
    "project": {"sites": "blocks.*.resid_mid", "mode": "align"},
    "finetune": {"steps": 30, "lr": 3e-3},
    # reinit / distill never see the forget facts: they delete only where the located units
    # hold them (the top 2% units of tiny do not; the top 20% do)
    "reinit": {"top": 0.2, "steps": 50},
    "distill": {"top": 0.2, "alpha": 0.8, "steps": 50},
}
BAD_STRENGTHS = {  # (kwargs, words the error must contain)
    "dampen": [({"alpha": 0}, "alpha"), ({"alpha": -1.0}, "alpha"), ({"lam": -0.5}, "lam"),
               ({"alpha": float("nan")}, "alpha")],
    "prune": [({"mode": "half"}, "mode"), ({"weights": "some"}, "weights")],
    "noise": [({"scale": -1.0}, "scale"), ({"scale": 0.0}, "scale"),
              ({"relative": "rms"}, "relative"), ({"seed": -1}, "seed")],
    "project": [({"mode": "flip"}, "mode"), ({"direction": "pca"}, "direction"),
                ({"positions": "end"}, "positions"),
                ({"direction": torch.full((64,), float("nan")),
                  "sites": "blocks.0.mlp.out"}, "direction")],
    "finetune": [({"lr": -1e-3}, "lr"), ({"lr": 0.0}, "lr"), ({"steps": 0}, "steps"),
                 ({"method": "sgd"}, "method"), ({"beta": 0.0}, "beta"),
                 ({"retain_weight": -1.0}, "retain_weight"), ({"units": "some"}, "all")],
}


def _state(h):
    return {k: v.detach().clone() for k, v in h.named_parameters().items()}


def _identical(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def tiny_imp(tiny, tiny_request):
    return locate.fisher(tiny.model, tiny_request)


def call(name, h, imp, req, units=None, **kw):
    fn = edit.METHODS[name]
    args = dict(FAST.get(name, {})) | kw
    if "request" in inspect.signature(fn).parameters:
        args.setdefault("request", req)
    if "units" in args:
        units = args.pop("units")
    return fn(h, imp, units, **args)


@pytest.mark.parametrize("name", sorted(edit.METHODS))
def test_revert_exception_and_twice(name, tiny_model, tiny_request, tiny_imp):
    h = tiny_model
    before, hooks0 = _state(h), h.hook_count()
    tokens = h.encode(list(tiny_request.forget)[:8]).tokens
    logits0 = h.logits(tokens)
    with call(name, h, tiny_imp, tiny_request) as e:
        assert e.state == "applied"
        assert not torch.equal(h.logits(tokens), logits0), f"{name} changed nothing"
        with pytest.raises(RuntimeError, match="already applied"):
            call(name, h, tiny_imp, tiny_request)
    assert _identical(before, _state(h)) and h.hook_count() == hooks0
    assert torch.equal(h.logits(tokens), logits0)
    with pytest.raises(RuntimeError, match="boom"):
        with call(name, h, tiny_imp, tiny_request):
            raise RuntimeError("boom")
    assert _identical(before, _state(h)) and h.hook_count() == hooks0
    e = call(name, h, tiny_imp, tiny_request)
    e.revert()
    assert _identical(before, _state(h)) and h.hook_count() == hooks0


@pytest.mark.parametrize("name", sorted(edit.METHODS))
def test_diff_round_trip(name, tiny, tiny_request, tiny_imp, tiny_oracle, tmp_path):
    h = tiny.model.clone()
    e = call(name, h, tiny_imp, tiny_request)
    path = e.diff.save(tmp_path / f"{name}.safetensors")
    fresh = tiny.model.clone()
    back = Diff.load(path)
    assert back.n_changed() == e.n_changed() and len(back.hook_specs) == len(e.hook_specs)
    e2 = back.apply(fresh)
    tokens = fresh.encode(list(tiny_request.forget)).tokens
    assert torch.equal(fresh.logits(tokens), h.logits(tokens))
    assert fresh.fingerprint() == h.fingerprint()
    with pytest.raises(ValueError, match="refusing to apply it to different weights"):
        Diff.load(path).apply(tiny_oracle.clone())
    e2.revert()
    assert fresh.fingerprint() == tiny.model.fingerprint() and fresh.hook_count() == 0
    json.loads(path.with_suffix(".json").read_text())  # manifest is plain JSON


@pytest.mark.parametrize("name", sorted(edit.METHODS))
def test_bad_units_leave_model_unchanged(name, tiny_model, tiny_request, tiny_imp):
    h = tiny_model
    before = _state(h)
    bad = [(Selection(()), "empty"),
           (Selection((Unit("blocks.1.mlp.pots", (0,)),)), "did you mean 'blocks.1.mlp.post'"),
           (Selection((Unit("blocks.1.mlp.post", (9999,)),)), "does not exist"),
           (Selection((Unit("blocks.0.attn.z", (0, 1)),)), "does not exist")]
    for units, words in bad:
        with pytest.raises(ValueError, match=words):
            call(name, h, tiny_imp, tiny_request, units=units)
        assert _identical(before, _state(h)) and h.hook_count() == 0
    if "request" in inspect.signature(edit.METHODS[name]).parameters and name != "prune":
        with pytest.raises(ValueError, match="request"):
            call(name, h, tiny_imp, None, request=None)
    for kw, words in BAD_STRENGTHS.get(name, []):
        with pytest.raises(ValueError, match=words):
            call(name, h, tiny_imp, tiny_request, **kw)
        assert _identical(before, _state(h)) and h.hook_count() == 0


def test_non_finite_results_are_refused(tiny_model, tiny_request, tiny_imp):
    h = tiny_model
    before = _state(h)
    with pytest.raises(ValueError, match="non-finite"):
        edit.noise(h, tiny_imp, scale=1e300)  # overflows float32
    with pytest.raises(ValueError, match="non-finite"):
        edit.finetune(h, tiny_imp, request=tiny_request, lr=1e38, optimizer="sgd", steps=2,
                      max_grad_norm=1e30)
    with pytest.raises(ValueError, match="non-finite"):
        weight_edit(h, "x", {}, None, {"blocks.0.mlp.b_in": (torch.tensor([0]),
                                                             torch.tensor([float("inf")]))})
    with pytest.raises(ValueError, match="non-finite"):
        HookSpec("rank_one", "blocks.0.mlp.out", {}, {"u": torch.tensor([float("nan")])})
    assert _identical(before, _state(h)) and h.hook_count() == 0


@pytest.mark.parametrize("name", sorted(edit.METHODS))
def test_lowers_forget_recall_on_fisher_top_units(name, tiny, tiny_request, tiny_imp):
    h = tiny.model.clone()
    kw = dict(EFFECTIVE.get(name, {}))
    units = None
    if kw.pop("units_from", None) == "sum":
        units = tiny_imp.by_unit("sum").top(kw.pop("top"))
    r0 = recall(h, tiny_request.forget)
    with call(name, h, tiny_imp, tiny_request, units=units, **kw):
        r1 = recall(h, tiny_request.forget)
    assert r1 < r0 - 0.05, f"{name}: forget recall {r0:.3f} -> {r1:.3f}"


def test_masked_finetune_touches_only_the_selection(tiny_model, tiny_request, tiny_imp):
    from edit._common import param_slices

    h = tiny_model
    before = _state(h)
    units = Selection((Unit("blocks.1.mlp.post", (3,)), Unit("blocks.0.attn.z", (1,)),
                       Unit("blocks.1.mlp.W_out", (5, 7))))
    with edit.finetune(h, None, units, request=tiny_request, steps=5, lr=1e-2,
                       method="npo") as e:
        after = _state(h)
        allowed = param_slices("t", h, units)
        for site, p in after.items():
            diff = (p != before[site]).reshape(-1)
            inside = torch.zeros_like(diff)
            if site in allowed:
                inside[allowed[site]] = True
            assert not (diff & ~inside).any(), f"{site} changed outside the selection"
        assert set(e.changes) <= set(allowed) and e.n_changed() > 0
        assert "blocks.1.mlp.W_in" in e.changes and "blocks.0.attn.W_Q" in e.changes
    assert _identical(before, _state(h))
    with edit.finetune(h, None, "all", request=tiny_request, steps=2) as e:  # global baseline
        assert e.n_changed() > 0.5 * h.n_parameters() and e.selection is None


def test_finetune_text_term_and_held_out_neighbors(tiny, tiny_request, tiny_imp):
    """text_weight trains on the request's retain_text (same seed, gradient ascent on the forget
    facts): with text_loss="nll" the text's loss ends lower than without the term; with "kl"
    its next-token distributions end closer to the unedited model's than without the term, and
    closer than the NLL term leaves them (fitting text moves the model too).
    Neighbors never enter training or locating - the edit is bit-identical with and without."""
    import dataclasses

    import torch.nn.functional as F

    h = tiny.model.clone()
    text = h.encode_texts(list(tiny_request.retain_text))
    with torch.no_grad():
        ref = h.target_logprobs(text)
    nll, kl = [], []
    for text_loss in ("nll", "kl"):
        kw = dict(request=tiny_request, method="ga", steps=15, lr=3e-2, text_loss=text_loss)
        for tw in (0.0, 1.0):
            with edit.finetune(h, tiny_imp, text_weight=tw, **kw), torch.no_grad():
                nll.append(float(h.loss(text)))
                kl.append(float(F.kl_div(h.target_logprobs(text), ref, log_target=True,
                                         reduction="batchmean")))
    assert nll[1] < nll[0] - 0.05, nll  # nll: [without, with the text term]
    assert kl[3] < 0.5 * kl[2] and kl[3] < kl[1], kl  # kl: [.., .., without, with]
    FactSet = type(tiny_request.retain)
    facts = tiny_request.retain.facts
    with_n = dataclasses.replace(tiny_request, retain=FactSet("retain", facts[:-10]),
                                 neighbors=FactSet("neighbors", facts[-10:]))
    without = dataclasses.replace(with_n, neighbors=FactSet("neighbors", ()))
    assert not with_n.keep.keys() & with_n.neighbors.keys()
    assert with_n.keep == without.keep
    diffs = []
    for r in (with_n, without):
        with edit.finetune(h, tiny_imp, request=r, method="gd", steps=3, text_weight=1.0) as e:
            diffs.append({s: c.new.clone() for s, c in e.changes.items()})
    assert diffs[0].keys() == diffs[1].keys()
    assert all(torch.equal(diffs[0][s], diffs[1][s]) for s in diffs[0])


def test_finetune_and_noise_are_seeded(tiny, tiny_request, tiny_imp):
    a, b = tiny.model.clone(), tiny.model.clone()
    for fn, kw in [(edit.noise, {}), (edit.finetune, {"request": tiny_request, "steps": 3})]:
        ea, eb = fn(a, tiny_imp, **kw), fn(b, tiny_imp, **kw)
        assert a.fingerprint() == b.fingerprint()
        eb.revert()
        ec = fn(b, tiny_imp, **kw, seed=1)
        assert a.fingerprint() != b.fingerprint()
        ec.revert()
        ea.revert()


@pytest.mark.parametrize("site", ["blocks.1.mlp.out", "blocks.0.attn.out", "embed"])
@pytest.mark.parametrize("mode", ["remove", "align"])
def test_project_baked_equals_hook(site, mode, tiny_model, tiny_request):
    h = tiny_model
    tokens = h.encode(list(tiny_request.forget) + list(tiny_request.retain)[:20]).tokens
    with edit.project(h, request=tiny_request, sites=site, mode=mode) as e:
        assert e.hook_specs and not e.changes
        hooked = h.logits(tokens)
    with edit.project(h, request=tiny_request, sites=site, mode=mode, bake=True) as e:
        assert not e.hook_fns and e.changes
        baked = h.logits(tokens)
    torch.testing.assert_close(baked, hooked, rtol=1e-4, atol=1e-4)


def test_project_bake_refused_where_it_cannot_match(tiny_model, tiny_request):
    with pytest.raises(ValueError, match="cannot fold a projection at 'blocks.1.resid_mid'"):
        edit.project(tiny_model, request=tiny_request, sites="blocks.1.resid_mid", bake=True)
    assert tiny_model.hook_count() == 0


def test_project_given_direction_removes_it(tiny_model, tiny_request):
    h = tiny_model
    u = torch.randn(64, generator=torch.Generator().manual_seed(0))
    with edit.project(h, direction=u, sites="blocks.0.mlp.out"):
        store = h.run_with_cache(h.encode(list(tiny_request.forget)[:4]).tokens,
                                 ["blocks.0.mlp.out"])
    assert float((store["blocks.0.mlp.out"].detach() @ (u / u.norm())).abs().max()) < 1e-4


def test_mean_prune_equals_mean_ablation_hook(tiny_model, tiny_request):
    from edit.prune import _mean_activations

    h = tiny_model
    units = Selection((Unit("blocks.1.mlp.post", (3,)), Unit("blocks.1.mlp.post", (9,)),
                       Unit("blocks.0.attn.z", (2,))))
    means = _mean_activations(h, tiny_request, units.sites(), 256)
    tokens = h.encode(list(tiny_request.forget)).tokens

    def mlp(x, s):
        x = x.clone()
        x[..., [3, 9]] = means[s][[3, 9]].to(x.dtype)
        return x

    def attn(x, s):
        x = x.clone()
        x[..., 2, :] = means[s][2].to(x.dtype)
        return x

    hooked = h.logits(tokens, {"blocks.1.mlp.post": mlp, "blocks.0.attn.z": attn})
    with edit.prune(h, None, units, mode="mean", request=tiny_request):
        baked = h.logits(tokens)
    torch.testing.assert_close(baked, hooked, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="can only be zeroed"):
        edit.prune(h, None, Selection((Unit("blocks.0.mlp.W_in", (0, 0)),)), mode="mean",
                   request=tiny_request)


def test_prune_zeroes_exactly_the_unit_slices(tiny_model):
    h = tiny_model
    with edit.prune(h, None, Selection((Unit("blocks.1.mlp.post", (7,)),
                                        Unit("blocks.0.attn.z", (1,)),
                                        Unit("blocks.0.mlp.W_in", (2, 3))))):
        assert not h.parameter("blocks.1.mlp.W_in")[:, 7].any()
        assert not h.parameter("blocks.1.mlp.W_out")[7].any()
        assert float(h.parameter("blocks.1.mlp.b_in").detach()[7]) == 0
        assert not h.parameter("blocks.0.attn.W_O")[1].any()
        assert not h.parameter("blocks.0.attn.W_V")[1].any()
        assert float(h.parameter("blocks.0.mlp.W_in").detach()[2, 3]) == 0
        assert h.parameter("blocks.0.attn.W_O")[0].any()


def test_hook_diff_is_json_and_safetensors_only(tiny, tiny_request, tmp_path):
    from safetensors import safe_open

    h = tiny.model.clone()
    e = edit.project(h, request=tiny_request, sites="blocks.*.mlp.out", mode="align")
    path = e.diff.save(tmp_path / "p.safetensors")
    with safe_open(str(path), framework="pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert keys == {"hook0::u", "hook0::c", "hook1::u", "hook1::c"}
    specs = json.loads(meta["hooks"])
    assert [s["kind"] for s in specs] == ["rank_one", "rank_one"]
    specs[0]["kind"] = "exec_anything"
    from excise.io import load_safetensors, save_safetensors

    save_safetensors(load_safetensors(path), tmp_path / "bad.safetensors",
                     metadata=dict(meta) | {"hooks": json.dumps(specs)})
    with pytest.raises(ValueError, match="unknown hook kind 'exec_anything'"):
        Diff.load(tmp_path / "bad.safetensors")
    # a plain (unregistered) hook function cannot be saved
    from excise.edits import Edit

    plain = Edit(tiny.model.clone(), "plain", {}, None, hooks={"blocks.0.mlp.out": lambda x, s: x})
    with pytest.raises(ValueError, match="cannot be saved"):
        plain.diff.save(tmp_path / "plain.safetensors")


def test_export(tiny, tiny_request, tiny_imp, tmp_path):
    from excise.io import load_safetensors

    h = tiny.model.clone()
    out = tmp_path / "model.safetensors"
    with edit.dampen(h, tiny_imp):
        export(h, out)
        state = load_safetensors(out)
        assert all(torch.equal(state[k], p.detach()) for k, p in h.named_parameters().items())
        with pytest.raises(FileExistsError, match="never overwrites"):
            export(h, out)
    with edit.project(h, request=tiny_request, sites="blocks.1.mlp.out"):
        with pytest.raises(ValueError, match="bake them into weights"):
            export(h, tmp_path / "hooked.safetensors")
    with edit.project(h, request=tiny_request, sites="blocks.1.mlp.out", bake=True):
        export(h, tmp_path / "baked.safetensors")
        tokens = h.encode(list(tiny_request.forget)).tokens
        edited = h.logits(tokens)
    fresh = tiny.model.clone()
    fresh.model.load_state_dict(load_safetensors(tmp_path / "baked.safetensors"), strict=False)
    assert torch.equal(fresh.logits(tokens), edited)


def test_three_sequential_requests(tiny):
    h = tiny.model.clone()
    before = _state(h)
    reqs = [tiny.request(forget_people=[i]) for i in (0, 1, 2)]
    keep = tiny.request(forget_people=[0, 1, 2]).retain  # people none of the requests name
    steps = edit.sequential(
        h, reqs, locate.fisher, edit.dampen, edit_params={"alpha": 100.0},
        metrics_fn=lambda m, r: {"forget": recall(m, r.forget),
                                 "earlier": [recall(m, q.forget) for q in reqs],
                                 "retain": recall(m, keep)})
    assert [len(s.edit.chain) for s in steps] == [0, 1, 2]
    assert [c["method"] for c in steps[2].edit.manifest["chain"]] == ["dampen", "dampen"]
    for i, s in enumerate(steps):
        assert s.metrics["forget"] < 0.5, (i, s.metrics)
        assert s.metrics["retain"] > 0.3, (i, s.metrics)  # SSD's damage accumulates
    print("sequential dampen:", [s.metrics for s in steps])
    # earlier requests stay forgotten after later ones
    assert all(r < 0.5 for r in steps[-1].metrics["earlier"])
    with pytest.raises(RuntimeError, match="last-in first-out"):
        steps[0].edit.revert()
    for s in reversed(steps):
        s.edit.revert()
    assert _identical(before, _state(h))


def test_sequential_reverts_on_error(tiny):
    h = tiny.model.clone()
    fp = h.fingerprint()
    reqs = [tiny.request(forget_people=[0]), tiny.request(forget_people=[1])]
    with pytest.raises(ValueError, match="alpha"):
        edit.sequential(h, reqs, locate.fisher, lambda m, i, u: edit.dampen(
            m, i, u, alpha=5.0 if not applied_edits(m) else -1.0))
    assert h.fingerprint() == fp


def test_dampen_accepts_neuron_units(tiny_model, tiny_imp):
    h = tiny_model
    units = tiny_imp.by_unit("mean").top(10)
    with edit.dampen(h, tiny_imp, units, alpha=2.0) as e:
        assert set(e.changes) <= {f"blocks.{L}.mlp.{p}" for L in (0, 1)
                                  for p in ("W_in", "b_in", "W_out")}
    bad = Importance("x", {"blocks.0.mlp.b_in": torch.ones(256)})
    with pytest.raises(ValueError, match="use locate.fisher"):
        edit.dampen(h, bad)


def test_prune_sae_latents_matches_sae_lens_and_round_trips(tiny, tiny_request, tmp_path):
    """Ablating SAE latents: the hook's latent code equals sae-lens' own encode, the edit
    lowers the selected latents' contribution to zero, reverts cleanly and re-applies."""
    from excise.sae import latent_spec, load_sae

    h = tiny.model.clone()
    imp = locate.sae(h, tiny_request, "blocks.1.resid_post", steps=200)
    site = "blocks.1.resid_post.sae"
    sae_model, scale = load_sae(imp.meta["sae_path"][site])
    acts = h.run_with_cache(h.encode(list(tiny_request.forget)).tokens,
                            ["blocks.1.resid_post"])["blocks.1.resid_post"]
    top = [u.index[0] for u in imp.top(5)]
    z_ref = sae_model.encode(acts * scale)[..., sorted(top)]
    spec = latent_spec(sae_model, scale, "blocks.1.resid_post", top, gain=2.0)
    out = spec.build()(acts, "blocks.1.resid_post")
    expected = acts + (z_ref @ sae_model.W_dec[sorted(top)]).detach() / scale
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    before = _state(h)
    hooks0 = h.hook_count()
    tokens = h.encode(list(tiny_request.forget)).tokens
    e = edit.prune(h, imp, top=5)
    edited_logits = h.logits(tokens)
    path = e.diff.save(tmp_path / "sae.safetensors")
    e.revert()
    assert _identical(before, _state(h)) and h.hook_count() == hooks0
    fresh = tiny.model.clone()
    Diff.load(path).apply(fresh)
    assert torch.equal(fresh.logits(tokens), edited_logits)
    with pytest.raises(ValueError, match="only be zeroed"):
        edit.prune(h, imp, top=5, mode="mean")


_FRESH_PROCESS = """
import sys

import torch

import excise
from excise.edits import Diff

diff_path, tokens_path, out_path = sys.argv[1:4]
h = excise.organism("tiny", progress=False).model
Diff.load(diff_path).apply(h)
stages = sorted(m for m in ("edit", "locate", "probes") if m in sys.modules)
assert not stages, f"loading a saved edit imported the stages {stages}"
torch.save(h.logits(torch.load(tokens_path)), out_path)
"""


def test_saved_sae_latent_edit_loads_in_a_fresh_process(tiny, tiny_request, tmp_path):
    """The ``sae_latents`` hook kind is registered in the core: a saved SAE-latent edit loads and
    applies in a process that never imported ``edit`` (nor any other stage)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    h = tiny.model.clone()
    imp = locate.sae(h, tiny_request, "blocks.1.resid_post", steps=200)
    tokens = h.encode(list(tiny_request.forget)).tokens
    plain = h.logits(tokens)
    with edit.prune(h, imp, top=5) as e:
        edited = h.logits(tokens)
        path = e.diff.save(tmp_path / "sae.safetensors")
    assert e.hook_specs and e.hook_specs[0].kind == "sae_latents"
    torch.save(tokens, tmp_path / "tokens.pt")
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(root)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    run = subprocess.run([sys.executable, "-c", _FRESH_PROCESS, str(path),
                          str(tmp_path / "tokens.pt"), str(tmp_path / "out.pt")],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    got = torch.load(tmp_path / "out.pt")
    assert not torch.allclose(plain, edited, atol=1e-3)  # the edit does change the logits
    torch.testing.assert_close(got, edited, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------- issue 19 (F)
def test_duplicate_edit_guard_compares_values_not_text(tiny_model, tiny_imp):
    """``alpha=5, lam=1`` then ``alpha=5.0, lam=1.0`` is the same edit: refused, not stacked."""
    import numpy as np

    from excise.edits import _normalised

    h = tiny_model
    fp = h.fingerprint()
    e = edit.dampen(h, tiny_imp, alpha=5, lam=1)
    after = h.fingerprint()
    for alpha, lam in [(5.0, 1.0), (5, 1.0), (5.0, 1)]:
        with pytest.raises(RuntimeError, match="an identical 'dampen' edit is already applied"):
            edit.dampen(h, tiny_imp, alpha=alpha, lam=lam)
        assert h.fingerprint() == after and applied_edits(h) == [e]
    with edit.dampen(h, tiny_imp, alpha=5.5, lam=1):  # another value is another edit
        assert len(applied_edits(h)) == 2
    e.revert()
    assert h.fingerprint() == fp
    def key(params):  # as Edit.key compares them
        return json.dumps(_normalised(params), sort_keys=True, default=str)

    assert key({"a": 5, "b": (1, 2.0), "c": np.float32(0.5), "d": np.int64(3),
                "t": torch.tensor(2.0), "z": -0.0}) == \
        key({"a": 5.0, "b": [1.0, 2], "c": 0.5, "d": 3.0, "t": 2, "z": 0.0})
    assert key({"a": True}) != key({"a": 1})  # flags are not numbers
    assert key({"a": "5"}) != key({"a": 5})
    assert key(2 ** 60 + 1) != key(2 ** 60)  # big integers keep every digit


def _span(data: bytes, name: str) -> tuple[int, int]:
    import struct

    n = struct.unpack("<Q", data[:8])[0]
    start, end = json.loads(data[8:8 + n])[name]["data_offsets"]
    return 8 + n + start, 8 + n + end


def _forged(diff: Diff, site: str) -> Diff:
    """``diff`` with its first new value at ``site`` changed (a consistent file, re-saved)."""
    from excise.edits import ParamChange

    c = diff.changes[site]
    new = c.new.clone()
    new[0] += 1.0
    return Diff(dict(diff.changes) | {site: ParamChange(c.indices, c.old, new)}, diff.manifest,
                diff.hook_specs)


def test_a_diff_changed_after_it_was_saved_is_refused(tiny, tiny_imp, tmp_path):
    """One byte flipped in a new value: Diff.load names the file (checksum). New values changed
    and the file re-saved consistently: apply sees other weights than ``fingerprint_after``,
    reverts and refuses - the model is left byte-identical."""
    from safetensors import safe_open

    from excise.io import load_safetensors, save_safetensors

    h = tiny.model.clone()
    e = edit.dampen(h, tiny_imp)
    path = e.diff.save(tmp_path / "edit.safetensors")
    site = sorted(e.changes)[0]
    data = bytearray(path.read_bytes())
    lo, _ = _span(bytes(data), f"{site}::new")
    data[lo + 1] ^= 0x01
    flipped = tmp_path / "flipped.safetensors"
    flipped.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=re.escape(f"{flipped}: its tensors do not match the "
                                                   f"checksum recorded when it was saved")):
        Diff.load(flipped)
    genuine = Diff.load(path)
    forged = _forged(genuine, site).save(tmp_path / "forged.safetensors")
    fresh = tiny.model.clone()
    before, hooks = _state(fresh), fresh.hook_count()
    want = genuine.manifest["fingerprint_after"]
    with pytest.raises(ValueError, match=re.escape(f"the diff {forged} was made to give weights "
                                                   f"with fingerprint {want}, but applying it "
                                                   f"gave ")):
        Diff.load(forged).apply(fresh)
    assert _identical(before, _state(fresh)) and fresh.hook_count() == hooks
    assert not applied_edits(fresh)
    genuine.apply(fresh)
    assert fresh.fingerprint() == want
    # a diff saved before checksums were recorded loads; apply still checks the weights
    with safe_open(str(path), framework="pt") as f:
        meta = {k: v for k, v in f.metadata().items() if k != "tensors_sha256"}
    save_safetensors(load_safetensors(path), tmp_path / "old.safetensors", metadata=meta)
    Diff.load(tmp_path / "old.safetensors").apply(tiny.model.clone())


def test_excise_verify_refuses_a_forged_diff(tiny, tiny_imp, tmp_path):
    """`excise verify` on a run whose diff was changed (and re-saved) after the run: one error
    line, exit 2, no report, every file of the run byte-identical."""
    from typer.testing import CliRunner

    from excise.app.cli import app

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("organism: {preset: tiny}\nrequest: {forget_people: 3}\n"
                                     "verify: {oracle: false, suite: behaviour}\n")
    h = tiny.model.clone()
    e = edit.dampen(h, tiny_imp)
    _forged(e.diff, sorted(e.changes)[0]).save(run / "edit.safetensors")
    files = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    r = CliRunner().invoke(app, ["verify", str(run), "--quiet"])
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "its new values were changed after it was saved" in errors[0]
    assert str(run / "edit.safetensors") in errors[0]
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == files


def _sae_of_width(d_in: int, d_sae: int = 8):
    from sae_lens import StandardTrainingSAE, StandardTrainingSAEConfig

    torch.manual_seed(0)
    return StandardTrainingSAE(StandardTrainingSAEConfig(
        d_in=d_in, d_sae=d_sae, l1_coefficient=1.0, dtype="float32", device="cpu"))


def test_an_sae_of_another_width_is_refused_when_attached(planted):
    """An SAE whose width differs from its site's is refused where it is attached (locate,
    the latent edit, a hook spec or a saved diff, the steering attack), naming both widths -
    not at the next forward pass; nothing is attached."""
    from edit.sae_latents import ablate_latents
    from excise.edits import Edit
    from excise.sae import latent_spec
    from probes.attacks import sae_steer

    h, req, site = planted.handle, planted.request, "blocks.1.resid_post"
    wrong = _sae_of_width(32)  # the site carries 64
    hooks, fp = h.hook_count(), h.fingerprint()
    text = f"the SAE reads d_in=32 dimensions (d_sae=8 latents) but site '{site}' carries 64"
    with pytest.raises(ValueError, match=re.escape(f"sae: {text}")):
        locate.sae(h, req, site, sae=wrong)
    units = Selection((Unit(f"{site}.sae", (0,)), Unit(f"{site}.sae", (3,))))
    with pytest.raises(ValueError, match=re.escape(f"sae latent edit: {text}")):
        ablate_latents(h, None, units, top=2, sae=wrong)
    with pytest.raises(ValueError, match=re.escape(f"SAE steering: {text}")):
        sae_steer(h, req, wrong, site)
    spec = latent_spec(wrong, 1.0, site, [0, 3], gain=0.0)
    hook_text = (f"hook 'sae_latents' at {site}: it reads 32 dimensions (an SAE latent hook "
                 f"over 2 latents) but site '{site}' carries 64")
    with pytest.raises(ValueError, match=re.escape(hook_text)):
        Edit(h, "prune", {}, units, hook_specs=[spec]).apply()
    with pytest.raises(ValueError, match=re.escape(hook_text)):
        Diff({}, {"method": "prune"}, (spec,)).apply(h)
    assert h.hook_count() == hooks and h.fingerprint() == fp and not applied_edits(h)
    h.logits(h.encode(list(req.forget)).tokens)  # the model still runs
    right = _sae_of_width(64)  # an SAE of the site's width attaches
    with ablate_latents(h, None, units, top=2, sae=right):
        assert h.hook_count() == hooks + 1
