"""Edits that remove information (issue 14, section 3): reinit, distill, chains of edits, dense
diffs and common-direction projection (CIR) in masked fine-tuning.

Every claim is checked against an independent reference: the slices a neuron or head owns are
written out by hand in TransformerLens layout, the shrink-and-perturb mix against the fresh draw
of the same seed, the distillation teacher against the KL to the model it should match, the CIR
directions recomputed here from TransformerLens' own LayerNorm hooks, reverts by bit-identity.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import make_planted
from typer.testing import CliRunner

import edit
import locate
from edit._common import init_std
from excise.edits import Diff, ParamChange, dense_pays, weight_edit
from excise.io import safetensors_metadata
from excise.sites import Selection, Unit
from probes.behaviour import recall

NEURONS = tuple(range(0, 64, 2))  # layer-1 MLP neurons the hand-written tests select
HEAD = 1  # and one head of layer 0


def _state(h):
    return {k: v.detach().clone() for k, v in h.named_parameters().items()}


def _identical(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _units():
    return Selection(tuple(Unit("blocks.1.mlp.post", (j,)) for j in NEURONS)
                     + (Unit("blocks.0.attn.z", (HEAD,)),))


def _owned(h) -> dict[str, torch.Tensor]:
    """By hand, in TransformerLens layout: what the neurons and the head of :func:`_units`
    own - W_in[:, j], b_in[j], W_out[j, :]; W_Q/K/V/O[h], b_Q/K/V[h]."""
    out = {}
    for s, p in h.named_parameters().items():
        out[s] = torch.zeros(p.shape, dtype=torch.bool)
    j = list(NEURONS)
    out["blocks.1.mlp.W_in"][:, j] = True
    out["blocks.1.mlp.b_in"][j] = True
    out["blocks.1.mlp.W_out"][j, :] = True
    for w in ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V"):
        out[f"blocks.0.attn.{w}"][HEAD] = True
    return out


@pytest.fixture(scope="module")
def imp(tiny, tiny_request):
    return locate.fisher(tiny.model, tiny_request)


# -- reinit ------------------------------------------------------------------------------------
def test_fresh_reinit_replaces_exactly_the_units_slices(tiny_model, tiny_request):
    h = tiny_model
    before = _state(h)
    e = edit.reinit(h, None, _units(), request=tiny_request, steps=0)
    after, owned = _state(h), _owned(h)
    std = float(h.cfg.initializer_range)
    for s in before:
        m = owned[s]
        assert torch.equal(after[s][~m], before[s][~m]), f"{s} changed outside the units"
        if not m.any():
            continue
        old, new = before[s][m], after[s][m]
        if s.rsplit(".", 1)[1].startswith("W_"):  # drawn afresh: N(0, init std), no trace of old
            corr = torch.corrcoef(torch.stack([old, new]))[0, 1]
            assert abs(float(corr)) < 0.15, f"{s}: new values correlate with the old ({corr})"
            assert 0.8 * std < float(new.std()) < 1.2 * std and abs(float(new.mean())) < 0.2 * std
        else:  # biases start at zero
            assert torch.equal(new, torch.zeros_like(new))
    assert init_std(h, "blocks.1.mlp.W_in") == std
    e.revert()
    assert _identical(before, _state(h))


def test_shrink_perturb_mixes_old_values_with_the_fresh_draw(tiny_model, tiny_request):
    h = tiny_model
    before = _state(h)
    with edit.reinit(h, None, _units(), request=tiny_request, steps=0, seed=3):
        fresh = _state(h)
    with edit.reinit(h, None, _units(), request=tiny_request, steps=0, seed=3,
                     mode="shrink_perturb", alpha=0.25):
        mixed = _state(h)
    for s, m in _owned(h).items():
        want = 0.75 * before[s][m] + 0.25 * fresh[s][m]
        assert torch.allclose(mixed[s][m], want, atol=1e-6, rtol=0), s
    assert _identical(before, _state(h))


def test_reinit_retraining_restores_retain_recall(tiny, tiny_request, imp):
    h = tiny.model.clone()
    req = tiny_request
    f0, r0 = recall(h, req.forget), recall(h, req.retain)
    with edit.reinit(h, imp, request=req, top=0.2, steps=0):
        r_wiped = recall(h, req.retain)
    with edit.reinit(h, imp, request=req, top=0.2, steps=50) as e:
        f1, r1 = recall(h, req.forget), recall(h, req.retain)
        assert set(e.changes) <= {s for s in h.named_parameters() if ".mlp." in s or ".attn."
                                  in s}  # only units' parameters: no embedding, norm, b_out
    assert r_wiped < 0.5 < r0  # the units were needed, and overwritten
    assert r1 >= 0.9, f"retraining brought retain recall back to {r1:.3f} only"
    assert f1 < f0 - 0.1, f"forget recall {f0:.3f} -> {f1:.3f}"
    assert h.fingerprint() == tiny.model.fingerprint()


def test_same_seed_same_weights(tiny, tiny_request):
    runs = {}
    for name, kw in [("reinit", {"mode": "shrink_perturb", "alpha": 0.5}),
                     ("distill", {"alpha": 0.5})]:
        for seed in (0, 0, 1):
            h = tiny.model.clone()
            edit.METHODS[name](h, None, _units(), request=tiny_request, steps=4, batch_size=8,
                               seed=seed, **kw)
            runs.setdefault(name, []).append(h.fingerprint())
        assert runs[name][0] == runs[name][1] != runs[name][2], name


def test_bad_settings_are_refused_before_anything_changes(tiny_model, tiny_request):
    h = tiny_model
    before = _state(h)
    bad = [("reinit", {"mode": "zero"}, "mode 'zero'.*'fresh'"),
           ("reinit", {"alpha": 0.5}, "shrink_perturb"),
           ("reinit", {"mode": "shrink_perturb", "alpha": 0.0}, "alpha"),
           ("reinit", {"steps": -1}, "steps"),
           ("reinit", {"text_loss": "mse"}, "text_loss"),
           ("distill", {"alpha": 1.5}, "alpha"),
           ("distill", {"steps": 0}, "steps"),
           ("distill", {"teacher_cache_mb": -1}, "teacher_cache_mb"),
           ("distill", {"text_batch": 0}, "text_batch=0 .*or null for batch_size"),
           ("distill", {"text_batch": True}, "text_batch=True"),
           ("distill", {"text_batch": 8, "text_weight": 0.0}, "text_weight=0"),
           ("distill", {"temperature": 0}, "temperature=0"),
           ("distill", {"temperature": 2.0, "labels": "hard"}, "labels='hard'"),
           ("finetune", {"cir_rank": -1}, "cir_rank"),
           ("finetune", {"cir_rank": 65}, "cir_rank=65.*1..64")]
    for name, kw, words in bad:
        with pytest.raises(ValueError, match=words):
            edit.METHODS[name](h, None, _units(), request=tiny_request, steps=kw.pop("steps", 2),
                               **kw)
        assert _identical(before, _state(h)) and not h.edit_stack
    for name in ("reinit", "distill"):
        with pytest.raises(ValueError, match="'all'"):
            edit.METHODS[name](h, None, "some", request=tiny_request)
        with pytest.raises(ValueError, match="request"):
            edit.METHODS[name](h, None, _units(), request=None)
    with pytest.raises(ValueError, match="parameter-element units"):
        edit.finetune(h, None, Selection((Unit("blocks.1.mlp.W_in", (0, 0)),)),
                      request=tiny_request, cir_rank=2, steps=2)
    assert _identical(before, _state(h))


# -- distill and chains ------------------------------------------------------------------------
def _kl(teacher, student, batch) -> float:
    """KL(teacher || student) of the next-token distributions at every real position."""
    with torch.no_grad():
        m = (torch.arange(batch.tokens.shape[1])[None] < batch.lengths[:, None])[:, 1:]
        lt = torch.log_softmax(teacher.logits(batch.tokens)[:, :-1], -1)[m]
        ls = torch.log_softmax(student.logits(batch.tokens)[:, :-1], -1)[m]
        return float(F.kl_div(ls, lt, log_target=True, reduction="batchmean"))


def test_distill_teacher_is_the_model_as_it_stands(tiny, tiny_request, imp):
    """A chain: prune (zero) the top units, then distill into other units. The teacher is the
    pruned model, so distillation pulls the perturbed student back to the *pruned* outputs (and
    does not restore what pruning took from retain recall)."""
    req = tiny_request
    h = tiny.model.clone()
    original = tiny.model.clone()
    retain = h.encode(list(req.retain))
    pruned_units = imp.by_unit("mean").top(0.2)
    other = Selection(tuple(Unit("blocks.0.mlp.post", (j,)) for j in range(256)
                            if Unit("blocks.0.mlp.post", (j,)) not in pruned_units))
    e1 = edit.prune(h, imp, pruned_units)
    pruned = h.clone()
    r_pruned = recall(h, req.retain)
    with edit.reinit(h, None, other, request=req, mode="shrink_perturb", alpha=0.5, steps=0):
        kl_perturbed = _kl(pruned, h, retain)  # the student before distillation (same draw)
    e2 = edit.distill(h, None, other, request=req, alpha=0.5, steps=40, batch_size=16)
    kl_distilled = _kl(pruned, h, retain)
    assert e2.manifest["fingerprint_before"] == e1.fingerprint_after
    assert [c["method"] for c in e2.manifest["chain"]] == ["prune"]
    assert kl_distilled < 0.5 * kl_perturbed, (kl_perturbed, kl_distilled)
    assert _kl(pruned, h, retain) < _kl(original, h, retain)
    assert recall(h, req.retain) <= r_pruned + 0.1 < 0.9
    e2.revert()
    assert h.fingerprint() == pruned.fingerprint()
    e1.revert()
    assert h.fingerprint() == original.fingerprint()


def test_teacher_per_batch_equals_teacher_up_front(tiny, tiny_request):
    """Same edit up to float rounding in the teacher's batch shapes. Compared by outputs:
    Adam turns the rounding noise of a gradient that is zero in exact arithmetic (b_K: softmax
    ignores a key bias) into steps of size lr, which the outputs do not see."""
    tokens = tiny.model.encode(list(tiny_request.retain)).tokens
    got = []
    for mb in (1024.0, 0.0):  # up front; per batch (no room for the cache)
        h = tiny.model.clone()
        e = edit.distill(h, None, _units(), request=tiny_request, steps=3, batch_size=8,
                         teacher_cache_mb=mb)
        with torch.no_grad():
            got.append(h.logits(tokens))
        assert e.n_changed() > 0 and "teacher_cache_mb" not in e.params
    assert torch.allclose(got[0], got[1], atol=1e-4, rtol=0)


def test_a_chain_config_runs_saves_every_diff_and_verify_reapplies_it(tmp_path, tiny):
    from excise.app.cli import app

    cfg = {"organism": {"preset": "tiny"}, "request": {"forget_people": 3},
           "locate": {"method": "fisher"}, "select": {"top": 0.1},
           "edit": [{"method": "finetune", "params": {"method": "npo"}, "steps": 5,
                     "batch_size": 8},
                    {"method": "distill", "units": "all", "alpha": 0.1, "steps": 3,
                     "batch_size": 8, "lr": 1e-4}],
           "verify": {"suite": "behaviour", "oracle": False}}
    path = tmp_path / "chain.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "run"
    runner = CliRunner()
    r = runner.invoke(app, ["run", str(path), "--out", str(out), "--quiet"])
    assert r.exit_code == 0, r.output
    manifest = json.loads((out / "run.json").read_text())
    assert {"edit-0.safetensors", "edit-1.safetensors"} <= set(manifest["files"])
    assert not (out / "edit.safetensors").exists()
    d0, d1 = Diff.load(out / "edit-0.safetensors"), Diff.load(out / "edit-1.safetensors")
    assert (d0.manifest["method"], d1.manifest["method"]) == ("finetune", "distill")
    assert d1.manifest["fingerprint_before"] == d0.manifest["fingerprint_after"]
    assert d1.manifest["params"]["units"] == "all"
    ran = json.loads((out / "metrics.json").read_text())
    assert ran["edit"]["method"] == "finetune+distill"
    assert yaml.safe_load((out / "config.yaml").read_text())["edit"][0]["params"] == \
        {"method": "npo"}
    r = runner.invoke(app, ["verify", str(out), "--quiet"])
    assert r.exit_code == 0, r.output
    again = json.loads((out / "verify" / "metrics.json").read_text())
    assert again["after"] == ran["after"]
    assert again["edit"]["params_changed"] == ran["edit"]["params_changed"]
    # the chain's second diff alone does not apply to the original weights
    with pytest.raises(ValueError, match="refusing to apply it to different weights"):
        d1.apply(tiny.model.clone())


# -- dense diffs -------------------------------------------------------------------------------
def test_dense_pays_threshold():
    assert dense_pays(501, 1000, 4) and not dense_pays(500, 1000, 4)  # float32: over half
    assert dense_pays(334, 1000, 2) and not dense_pays(333, 1000, 2)  # 16-bit: over a third


def test_weight_edit_goes_dense_only_when_most_of_a_tensor_changes(tiny_model):
    h = tiny_model
    before = _state(h)
    site = "blocks.0.mlp.b_in"  # 256 values
    for k, dense in ((154, True), (102, False)):
        idx = torch.arange(k)
        e = weight_edit(h, f"t{k}", {}, None, {site: (idx, before[site][:k] + 1.0)})
        assert e.changes[site].dense is dense and e.n_changed() == k
        e.revert()
        assert _identical(before, _state(h))


def _as_sparse(diff: Diff) -> Diff:
    sparse = {}
    for s, c in diff.changes.items():
        if c.dense:
            idx = torch.nonzero(c.old != c.new).reshape(-1)
            c = ParamChange(idx, c.old[idx], c.new[idx])
        sparse[s] = c
    return Diff(sparse, diff.manifest, diff.hook_specs)


@pytest.mark.parametrize("name", ["reinit", "distill"])
def test_a_global_edit_saves_dense_and_reapplies_exactly(name, tiny, tiny_request, tmp_path):
    h = tiny.model.clone()
    kw = {"steps": 0} if name == "reinit" else {"steps": 2, "batch_size": 8, "lr": 1e-4}
    e = edit.METHODS[name](h, None, "all", request=tiny_request, **kw)
    assert e.changes["blocks.0.mlp.W_in"].dense and e.changes["embed.W_E"].dense
    path = e.diff.save(tmp_path / "dense.safetensors")
    sparse_path = _as_sparse(e.diff).save(tmp_path / "sparse.safetensors")
    assert safetensors_metadata(path)["format"] == "excise.diff/2"
    assert safetensors_metadata(sparse_path)["format"] == "excise.diff/1"  # as before
    assert path.stat().st_size < 0.6 * sparse_path.stat().st_size
    for p in (path, sparse_path):  # both formats load and give the same weights
        back = Diff.load(p)
        assert back.n_changed() == e.n_changed()
        fresh = tiny.model.clone()
        e2 = back.apply(fresh)
        assert fresh.fingerprint() == h.fingerprint()
        e2.revert()
        assert fresh.fingerprint() == tiny.model.fingerprint()
    e.revert()
    assert h.fingerprint() == tiny.model.fingerprint()
    # a dense change altered after saving is refused on apply, the model left as it was
    back = Diff.load(path)
    c = back.changes["blocks.0.mlp.W_in"]
    forged = Diff(dict(back.changes) | {"blocks.0.mlp.W_in": ParamChange(None, c.old, c.new + 1)},
                  back.manifest)
    fresh = tiny.model.clone()
    with pytest.raises(ValueError, match="changed after it was saved"):
        Diff.load(forged.save(tmp_path / "forged.safetensors")).apply(fresh)
    assert fresh.fingerprint() == tiny.model.fingerprint()


# -- CIR ---------------------------------------------------------------------------------------
def _retain_inputs(h, req, ln: str) -> torch.Tensor:
    """Independently of edit.finetune: the input a block's MLP (``ln2``) or attention (``ln1``)
    reads - TransformerLens' LayerNorm ``hook_normalized`` times its weight plus its bias - at
    every real token of the retain facts and retain text."""
    rows = []
    norm = h.model.get_submodule(ln)
    for b in (h.encode(list(req.retain)), h.encode_texts(list(req.retain_text))):
        _, cache = h.model.run_with_cache(b.tokens, names_filter=f"{ln}.hook_normalized")
        x = cache[f"{ln}.hook_normalized"] * norm.w + norm.b
        real = torch.arange(b.tokens.shape[1])[None] < b.lengths[:, None]
        rows.append(x[real].detach().double())
    return torch.cat(rows)


def _along(delta: torch.Tensor, axis: int, u: torch.Tensor) -> float:
    """Share of ``delta``'s norm along the columns of ``u`` on ``axis``."""
    x = delta.double().movedim(axis, 0).reshape(u.shape[0], -1)
    return float((u.T @ x).norm() / x.norm())


def test_cir_update_is_orthogonal_to_the_retain_directions(tiny, tiny_request):
    req, rank = tiny_request, 4
    dirs = {}
    for ln in ("blocks.1.ln2", "blocks.0.ln1"):
        _, _, vh = torch.linalg.svd(_retain_inputs(tiny.model, req, ln), full_matrices=False)
        dirs[ln] = vh[:rank].T  # top right singular vectors, uncentred
    share = {}
    for cir in (0, rank):
        h = tiny.model.clone()
        before = _state(h)
        edit.finetune(h, None, _units(), request=req, steps=10, cir_rank=cir)
        after = _state(h)
        share[cir] = {
            "W_in": _along(after["blocks.1.mlp.W_in"] - before["blocks.1.mlp.W_in"], 0,
                           dirs["blocks.1.ln2"]),
            "W_Q": _along(after["blocks.0.attn.W_Q"] - before["blocks.0.attn.W_Q"], 1,
                          dirs["blocks.0.ln1"]),
            "W_V": _along(after["blocks.0.attn.W_V"] - before["blocks.0.attn.W_V"], 1,
                          dirs["blocks.0.ln1"])}
        owned = _owned(h)  # CIR or not, only the units' slices move
        for s in before:
            assert torch.equal(after[s][~owned[s]], before[s][~owned[s]]), s
    for w in ("W_in", "W_Q", "W_V"):
        assert share[rank][w] < 1e-4, (w, share)
        assert share[0][w] > 1e-2, (w, share)  # without CIR the update has such components


def test_cir_rank_zero_is_the_plain_finetune(tiny, tiny_request):
    a, b = tiny.model.clone(), tiny.model.clone()
    ea = edit.finetune(a, None, _units(), request=tiny_request, steps=5, batch_size=8)
    eb = edit.finetune(b, None, _units(), request=tiny_request, steps=5, batch_size=8,
                       cir_rank=0)
    assert _identical(_state(a), _state(b))
    assert "cir_rank" not in ea.params and ea.key() == eb.key()


@pytest.mark.parametrize("name", ["reinit", "distill"])
def test_an_importance_of_another_model_is_refused(name):
    a, b = make_planted(seed=0), make_planted(seed=1)
    imp = locate.fisher(a.handle, a.request)
    before, own = b.handle.fingerprint(), a.handle.fingerprint()
    with pytest.raises(ValueError, match="Locate again on this model"):
        edit.METHODS[name](b.handle, imp, request=b.request, top=1, steps=1)
    assert b.handle.fingerprint() == before and not b.handle.edit_stack
    with edit.METHODS[name](a.handle, imp, request=a.request, top=1, steps=1) as e:
        assert e.n_changed() > 0
    assert a.handle.fingerprint() == own


def test_distill_fused_engine_equals_serial(tiny, tiny_request):
    """The student's fused forward (the default) makes the same edit as the handle's serial
    forward up to float rounding, on the same slices; the record says which engine ran; an
    unknown engine is refused with the choices named."""
    tokens = tiny.model.encode(list(tiny_request.retain)).tokens
    got, edits = [], []
    for engine in ("serial", "fused"):
        h = tiny.model.clone()
        e = edit.distill(h, None, _units(), request=tiny_request, steps=5, batch_size=16,
                         labels="hard_facts", schedule="linear", engine=engine)
        assert e.params["engine"] == engine and e.n_changed() > 0
        with torch.no_grad():
            got.append(h.logits(tokens))
        edits.append(e)
    assert edits[0].n_changed() == edits[1].n_changed()
    assert not torch.equal(got[0], tiny.model.logits(tokens))
    assert torch.allclose(got[0], got[1], atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="serial"):
        edit.distill(tiny.model.clone(), None, _units(), request=tiny_request, steps=1,
                     engine="vmap")


@pytest.mark.parametrize("labels, temperature", [("hard", 1.0), ("hard_facts", 1.0),
                                                  ("soft", 1.0), ("data_facts", 1.0),
                                                  ("soft", 2.0), ("hard_facts", 0.5)])
def test_distillation_labels_are_the_plain_losses(tiny, tiny_request, labels, temperature):
    """One SGD step of ``distill`` equals a step on the loss written out here: on the retain
    facts and on the retain text, the mean over every real position that predicts a next token
    of the cross-entropy to the teacher's argmax token (``hard``; ``hard_facts`` on the facts
    only), to the fact's own next token (``data_facts`` on the facts) or of KL(teacher ||
    student) (``soft``; ``hard_facts`` and ``data_facts`` on the text), the teacher's
    distribution softened to ``softmax(logits / temperature)`` where it is learned whole."""
    req, units, teacher = tiny_request, _units(), tiny.model
    facts = teacher.encode(list(req.retain)).trim()
    text = teacher.encode_texts(list(req.retain_text)).trim()
    kw = dict(request=req, alpha=0.5, steps=1, lr=0.5,
              batch_size=max(len(req.retain), len(req.retain_text)), text_weight=1.0,
              optimizer="sgd", max_grad_norm=1e9, seed=3)
    student = teacher.clone()
    with edit.reinit(student, None, units, request=req, mode="shrink_perturb", alpha=0.5,
                     steps=0, seed=3):  # the same draw as distill's perturbation
        start = {k: v.detach().clone() for k, v in student.named_parameters().items()}
        params = student.named_parameters()
        for v in params.values():
            v.requires_grad_(True)
        loss = 0.0
        fact_mode, text_mode = {"hard": ("hard", "hard"), "hard_facts": ("hard", "soft"),
                                "soft": ("soft", "soft"), "data_facts": ("data", "soft")}[labels]
        for batch, mode in ((facts, fact_mode), (text, text_mode)):
            m = (torch.arange(batch.tokens.shape[1])[None] < batch.lengths[:, None])[:, 1:]
            with torch.no_grad():
                t = torch.log_softmax(teacher.logits(batch.tokens)[:, :-1].float(), -1)[m]
            s_ = torch.log_softmax(student.logits(batch.tokens)[:, :-1].float(), -1)[m]
            if mode == "data":
                loss = loss - s_.gather(1, batch.tokens[:, 1:][m][:, None]).mean()
            elif mode == "hard":
                loss = loss - s_.gather(1, t.argmax(-1, keepdim=True)).mean()
            else:
                t = torch.log_softmax(t / temperature, -1)
                loss = loss + (t.exp() * (t - s_)).sum(-1).mean()
        loss.backward()
        want = {k: start[k] - 0.5 * v.grad for k, v in params.items() if v.grad is not None}
        for v in params.values():
            v.requires_grad_(False)
    got = teacher.clone()
    edit.distill(got, None, units, labels=labels, temperature=temperature, **kw)
    got = got.named_parameters()
    moved = 0
    for k, w in want.items():
        changed = got[k] != start[k]  # the units' slices where the gradient is not zero
        moved += int(changed.sum())
        assert torch.allclose(got[k][changed], w[changed], atol=1e-5, rtol=1e-4), k
    assert moved > 100
    with pytest.raises(ValueError, match="labels"):
        edit.distill(teacher.clone(), None, units, labels="argmax", **kw)


def test_distill_schedule_and_shared_text(tiny, tiny_request):
    """``schedule="linear"`` is the organism's own warm-up and decay (the multipliers written out
    here) and changes what is learned; ``shared_text=True`` is the same edit as one whose request
    carries the shared facts' sentences in its retain text (bit for bit); bad values are refused
    with the choices named."""
    import dataclasses

    from excise.train import warmup_decay

    f = warmup_decay(100)  # warm-up over 5 steps, then linear decay to 5% of the rate
    assert [f(s) for s in (0, 4, 50, 99)] == pytest.approx([0.2, 0.96, 0.5, 0.05])
    req, units = tiny_request, _units()
    assert len(req.shared) > 0
    kw = dict(request=req, alpha=0.5, steps=3, lr=1e-2, batch_size=8, seed=1,
              labels="hard_facts")

    def weights(**extra):
        m = tiny.model.clone()
        edit.distill(m, None, units, **(kw | extra))
        return m.named_parameters()

    plain, linear = weights(), weights(schedule="linear")
    assert any(not torch.equal(plain[k], linear[k]) for k in plain)
    with_text = dataclasses.replace(req, retain_text=tuple(req.retain_text)
                                    + tuple(f.text for f in req.shared))
    shared, by_hand = weights(shared_text=True), weights(request=with_text)
    assert all(torch.equal(shared[k], by_hand[k]) for k in shared)
    assert any(not torch.equal(plain[k], shared[k]) for k in plain)
    m = tiny.model.clone()
    for bad, match in (({"schedule": "cosine"}, "constant"), ({"shared_text": "yes"},
                                                               "shared_text")):
        with pytest.raises(ValueError, match=match):
            edit.distill(m, None, units, **(kw | bad))
    e = edit.distill(m, None, units, **(kw | {"schedule": "linear"}))
    assert e.params["schedule"] == "linear" and "shared_text" not in e.params
    e.revert()


def test_distill_text_batch_sets_the_text_rows_per_step(tiny, tiny_request, monkeypatch):
    """``text_batch``: each step draws that many retain-text rows and ``batch_size`` fact rows;
    unset, it is ``batch_size`` (the same edit bit for bit, its parameters unchanged).
    ``text_batch`` and ``temperature`` join the edit's parameters only where they are set away
    from their defaults (bad values: test_bad_settings_are_refused_before_anything_changes)."""
    from excise.train import Sampler

    req, units = tiny_request, _units()
    kw = dict(request=req, alpha=0.5, steps=3, lr=1e-2, batch_size=8, seed=1,
              labels="hard_facts", shared_text=True)
    n_facts = len(req.retain)
    n_text = len(req.retain_text) + len(req.shared)
    calls = []
    rows = Sampler.rows
    monkeypatch.setattr(Sampler, "rows", lambda self, n, k: calls.append((n, k))
                        or rows(self, n, k))

    def weights(**extra):
        m = tiny.model.clone()
        e = edit.distill(m, None, units, **(kw | extra))
        return m.named_parameters(), e.params

    (plain, p0), (same, p1) = weights(), weights(text_batch=8)
    assert all(torch.equal(plain[k], same[k]) for k in plain)
    assert "text_batch" not in p0 and p1["text_batch"] == 8
    calls.clear()
    small, p2 = weights(text_batch=3)
    assert calls == [(n_facts, 8), (n_text, 3)] * 3 and p2["text_batch"] == 3
    assert any(not torch.equal(plain[k], small[k]) for k in plain)
    _, p3 = weights(temperature=1.0)
    _, p4 = weights(temperature=1.5)
    assert "temperature" not in p3 and p4["temperature"] == 1.5
