"""locate.fact_lookup: a neuron that looks a fact up at the subject's tokens ranks first at the
subject and not at the last position (a hand-built model with a lookup and a readout neuron);
exact patching equals a plain loop of one unit patched at a time; attribution patching agrees
with exact patching on the tiny organism; batch sizes do not change the result; bad input is
refused with an error that names it."""

from __future__ import annotations

import warnings

import pytest
import torch

import edit
import locate
from excise.importance import Importance, spearman
from excise.request import Fact, FactSet, ForgetRequest
from excise.sites import Unit

N = 12
FORGET = (0, 1, 2)
LOOKUP = (0, 3)  # (layer, neuron): reads the forget subjects at their own position
READOUT = (1, 7)  # reads what attention copied to the last position


def _facts(name, ids, subject=True):
    return FactSet(name, tuple(Fact(f"s{i} r", f"a{i}", form="custom",
                                    subject=f"s{i}" if subject else "") for i in ids))


def lookup_model(seed: int = 0):
    """Two blocks, prompts ``"sK r" -> "aK"`` (subject ``sK``). Block 0: attention off; neuron
    ``LOOKUP`` fires only at a forget subject's token and writes direction ``d1``. Block 1: one
    head at the last position attends to the subject and copies its identity and ``d1`` there;
    neuron ``READOUT`` fires at the last position when ``d1`` arrived and writes ``d2``. Forget
    answers read ``d1``, ``d2`` and the copied subject (weakly: their log-probability stays near
    -1, where gradients are not saturated); retain answers the copied subject only.
    Every other neuron is silent (bias -1, small weights)."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from excise.handle import TLHandle
    from excise.world import Tokenizer

    tok = Tokenizer([f"s{i}" for i in range(N)] + [f"a{i}" for i in range(N)] + ["r"])
    V, d, dh = len(tok), 64, 16
    cfg = HookedTransformerConfig(n_layers=2, d_model=d, n_heads=2, d_head=dh, d_mlp=16,
                                  d_vocab=V, n_ctx=8, act_fn="relu", normalization_type=None,
                                  seed=seed, default_prepend_bos=False, device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        model = HookedTransformer(cfg)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed)))
    E, d1, d2 = q[:V], q[V], q[V + 1]
    s = [tok.index[f"s{i}"] for i in range(N)]
    r = tok.index["r"]
    with torch.no_grad():
        model.embed.W_E.copy_(E)
        model.pos_embed.W_pos.zero_()
        for b in model.blocks:
            for w in (b.attn.W_Q, b.attn.W_K, b.attn.W_V, b.attn.W_O, b.attn.b_Q, b.attn.b_K,
                      b.attn.b_V, b.attn.b_O, b.mlp.b_out):
                w.zero_()
            b.mlp.W_in.mul_(0.05)
            b.mlp.W_out.mul_(0.05)
            b.mlp.b_in.fill_(-1.0)
        L, j = LOOKUP
        mlp = model.blocks[L].mlp
        mlp.W_in[:, j] = 3.0 * E[[s[i] for i in FORGET]].sum(0)
        mlp.b_in[j] = -2.0
        mlp.W_out[j] = d1
        attn = model.blocks[1].attn  # head 0: the last token ("r") attends to the subject
        c = 80.0 ** 0.5
        attn.W_Q[0, :, 0] = c * E[r]
        attn.W_K[0, :, 0] = c * E[s].sum(0)
        for i in range(N):
            attn.W_V[0, :, i] = E[s[i]]
            attn.W_O[0, i] = E[s[i]]
        attn.W_V[0, :, N] = d1
        attn.W_O[0, N] = d1
        L, j = READOUT
        mlp = model.blocks[L].mlp
        mlp.W_in[:, j] = 2.0 * d1 + 4.0 * E[r]
        mlp.b_in[j] = -5.0
        mlp.W_out[j] = d2
        U = torch.zeros(d, V)
        for i in range(N):
            a = tok.index[f"a{i}"]
            U[:, a] = (d1 + d2 + E[s[i]]) if i in FORGET else 6.0 * E[s[i]]
        model.unembed.W_U.copy_(U)
        model.unembed.b_U.zero_()
    req = ForgetRequest(_facts("forget", FORGET), _facts("retain", range(3, N)))
    return TLHandle(model, tok, name="lookup"), req


@pytest.fixture(scope="module")
def lookup():
    return lookup_model()


@pytest.fixture(scope="module")
def small_req(tiny):
    """Few facts of the tiny organism: the exact estimator patches every neuron on each."""
    req = tiny.request(forget_people=range(3))
    return ForgetRequest(FactSet("forget", req.forget.facts[::5]),
                         FactSet("retain", req.retain.facts[::25]))


def _unit(layer_neuron):
    return Unit(f"blocks.{layer_neuron[0]}.mlp.post", (layer_neuron[1],))


# ------------------------------------------------------------------------------ planted answer --
@pytest.mark.parametrize("mode", ["attribution", "exact"])
def test_lookup_neuron_ranks_first_at_subject_not_at_last(lookup, mode):
    h, req = lookup
    sites = ["blocks.*.mlp.post", "blocks.*.attn.z"]
    subj = locate.fact_lookup(h, req, sites, mode=mode)
    last = locate.fact_lookup(h, req, sites, mode=mode, positions="last")
    top = subj.top(2).units
    assert top[0] == _unit(LOOKUP), top
    assert subj.score_of(top[0]) > 0 and subj.score_of(top[1]) <= 0.01 * subj.score_of(top[0])
    assert float(subj.parts["effect"]["blocks.0.mlp.post"][LOOKUP[1]]) < -0.1  # it helps
    assert last.top(1).units[0] == _unit(READOUT)
    assert last.score_of(_unit(LOOKUP)) == 0.0  # silent at the last token: nothing to patch
    assert subj.score_of(_unit(READOUT)) == 0.0  # silent at the subject
    # the lookup neuron carries the forget facts: pruning it lowers their answers' probability
    before = h.target_logprobs(h.encode(list(req.forget)))
    with edit.prune(h, subj, top=1):
        after = h.target_logprobs(h.encode(list(req.forget)))
    ans = h.encode(list(req.forget)).tokens[:, -1]
    drop = (before - after).gather(1, ans[:, None])
    assert bool((drop > 0.1).all()), drop


def test_scores_follow_the_contrast_formula(lookup, tiny, small_req):
    for h, req in (lookup, (tiny.model, small_req)):
        ratio = locate.fact_lookup(h, req, eps=0.05)
        diff = locate.fact_lookup(h, req, contrast="difference")
        none = locate.fact_lookup(h, req, contrast="none")
        F, R = ratio.parts["forget"], ratio.parts["retain"]
        mean_r = float(torch.cat(list(R.values())).mean())
        floor = 0.05 * (mean_r if mean_r > 0 else float(torch.cat(list(F.values())).mean()))
        for s in ratio.scores:
            torch.testing.assert_close(ratio.scores[s], F[s] / (R[s] + floor))
            torch.testing.assert_close(diff.scores[s], F[s] - R[s])
            torch.testing.assert_close(none.scores[s], F[s])


# ------------------------------------------------------------------------ exact vs plain loop --
def _loop_effects(h, facts, site, units, positions, base):
    """Plain reference: for each unit, one forward with a hook setting it to ``base[unit]`` at
    the chosen positions of every fact; effect = patched - clean mean target log-probability."""
    b = h.encode(list(facts))
    if positions == "subject":
        pos = b.subject_mask
    else:
        pos = torch.zeros_like(b.target_mask)
        for i in range(len(b)):
            pos[i, int(b.target_mask[i].int().argmax()) - 1] = True

    def score(hooks):
        with torch.no_grad():
            lp = h.token_logprobs(b, hooks)
        return lp.sum(1) / b.target_mask[:, 1:].sum(1)

    clean = score({})
    out = []
    for u in units:
        def put(x, _site, u=u):
            x = x.clone()
            for i in range(x.shape[0]):
                for t in range(x.shape[1]):
                    if pos[i, t]:
                        x[i, t, u] = base[u]
            return x
        out.append(score({site: put}) - clean)
    return torch.stack(out, 1)  # [facts, units]


def _retain_mean(h, facts, site, positions):
    b = h.encode(list(facts))
    acts = h.run_with_cache(b.tokens, [site])[site]
    if positions == "subject":
        pos = b.subject_mask
    else:
        pos = torch.zeros_like(b.target_mask)
        pos[torch.arange(len(b)), b.target_mask.int().argmax(1) - 1] = True
    return acts[pos].double().mean(0).float()


@pytest.mark.parametrize("positions", ["subject", "last"])
def test_exact_equals_plain_loop(tiny, small_req, positions):
    h, req = tiny.model, small_req
    sites = ["blocks.0.mlp.post", "blocks.0.attn.z"]
    imp = locate.fact_lookup(h, req, sites, mode="exact", positions=positions, max_rows=100)
    for site, some in (("blocks.0.mlp.post", [0, 255]), ("blocks.0.attn.z", [0])):
        units = sorted(set(some) | set(imp.parts["forget"][site].topk(2).indices.tolist()))
        base = _retain_mean(h, req.retain, site, positions)
        f = _loop_effects(h, req.forget, site, units, positions, base)
        r = _loop_effects(h, req.retain, site, units, positions, base)
        got = {k: imp.parts[k][site][units] for k in ("forget", "retain", "effect")}
        torch.testing.assert_close(got["forget"], f.abs().mean(0), atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(got["retain"], r.abs().mean(0), atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(got["effect"], f.mean(0), atol=2e-5, rtol=1e-4)
        assert float(f.abs().max()) > 1e-3  # the loop measured real effects
    # zero baseline: the loop with base 0
    if positions == "last":
        return
    # the last block's neurons at the subject: nothing later reads them, so no effect at all
    assert float(imp.parts["forget"]["blocks.0.mlp.post"].max()) > 0
    last_block = locate.fact_lookup(h, req, "blocks.1.mlp.post", mode="exact")
    assert float(last_block.parts["forget"]["blocks.1.mlp.post"].abs().max()) == 0.0
    # zero baseline: the loop with base 0
    zero = locate.fact_lookup(h, req, "blocks.0.mlp.post", mode="exact", baseline="zero")
    f = _loop_effects(h, req.forget, "blocks.0.mlp.post", [5, 6], "subject", torch.zeros(256))
    torch.testing.assert_close(zero.parts["forget"]["blocks.0.mlp.post"][[5, 6]],
                               f.abs().mean(0), atol=2e-5, rtol=1e-4)


def test_attribution_agrees_with_exact(tiny):
    """First-order estimates against real patches, 45 forget and 45 retain facts, block 0 (at
    the subject, the last block's neurons have no effect at all). Measured on three forget
    groups: Spearman 0.98-0.995 (forget), 0.96-0.98 (retain), 0.90-0.96 (ratio scores); 7-9 of
    the top 10 shared."""
    h = tiny.model
    req = tiny.request(forget_people=range(3))
    req = ForgetRequest(req.forget, FactSet("retain", req.retain.facts[::7]))
    site = "blocks.0.mlp.post"
    a = locate.fact_lookup(h, req, site)
    e = locate.fact_lookup(h, req, site, mode="exact")
    for part, least in (("forget", 0.98), ("retain", 0.95)):
        assert spearman(a.parts[part][site], e.parts[part][site]) > least, part
    assert spearman(a.scores[site], e.scores[site]) > 0.9
    assert len(set(a.top(10).units) & set(e.top(10).units)) >= 7
    top_f = a.parts["forget"][site].topk(10).indices.tolist()
    assert len(set(top_f) & set(e.parts["forget"][site].topk(10).indices.tolist())) >= 7


def test_batch_size_does_not_change_the_result(tiny, small_req):
    h, req = tiny.model, small_req
    ref = locate.fact_lookup(h, req, batch_size=64)
    for bs in (1, 5):
        other = locate.fact_lookup(h, req, batch_size=bs)
        for s in ref.scores:
            torch.testing.assert_close(other.scores[s], ref.scores[s], atol=1e-5, rtol=1e-4)
    site = "blocks.0.mlp.post"
    ex = locate.fact_lookup(h, req, site, mode="exact")
    ex2 = locate.fact_lookup(h, req, site, mode="exact", batch_size=4, max_rows=50)
    # the effects agree to float32 rounding (matmuls over other numbers of rows); the ratio
    # divides by retain effects near zero, which magnifies that rounding in the scores
    for part in ("forget", "retain", "effect"):
        torch.testing.assert_close(ex2.parts[part][site], ex.parts[part][site], atol=1e-6, rtol=0)
    torch.testing.assert_close(ex2.scores[site], ex.scores[site], atol=1e-5, rtol=1e-2)


# ------------------------------------------------------------- the Importance, edits, pipeline --
def test_importance_selects_saves_and_edits(tiny, small_req, tmp_path):
    h, req = tiny.model, small_req
    imp = locate.fact_lookup(h, req, ["blocks.*.mlp.post", "blocks.*.attn.z"])
    assert "fact_lookup" in locate.METHODS and locate.METHODS["fact_lookup"] is locate.fact_lookup
    for s, v in imp.scores.items():
        assert tuple(v.shape) == h.info(s).unit_shape
    assert imp.meta["positions"] == "subject" and imp.meta["mode"] == "attribution"
    assert imp.meta["model"] == h.fingerprint() and imp.meta["n_forget_scored"] == len(req.forget)
    assert imp.by_unit().scores.keys() == imp.scores.keys()
    assert len(imp.top(0.01)) == 6 and len(imp.select(k=3)) == 3
    imp.save(tmp_path / "fl.safetensors")
    back = Importance.load(tmp_path / "fl.safetensors")
    assert back.top(5).units == imp.top(5).units and back.meta["unit_axes"] == {}
    fp = h.fingerprint()
    for method, kw in (("prune", {"top": 0.01}), ("noise", {"top": 0.01, "scale": 0.5}),
                       ("finetune", {"top": 0.01, "steps": 2, "request": req})):
        with edit.METHODS[method](h, imp, **kw) as e:
            assert e.manifest["params_changed"] > 0
    assert h.fingerprint() == fp


# ----------------------------------------------------------------------------------- bad input --
def test_bad_options_are_refused(lookup):
    h, req = lookup
    for kw, msg in ((dict(positions="middle"), "unknown positions 'middle'; choose one of "
                                               "\\['subject', 'last', 'all'\\]"),
                    (dict(mode="fast"), "unknown mode 'fast'; choose one of "
                                        "\\['attribution', 'exact'\\]"),
                    (dict(baseline="mean"), "unknown baseline 'mean'; choose one of "
                                            "\\['retain_mean', 'zero'\\]"),
                    (dict(contrast="odds"), "unknown contrast 'odds'"),
                    (dict(eps=-1.0), "eps=-1.0 is out of range"),
                    (dict(batch_size=0), "batch_size=0 is out of range"),
                    (dict(max_rows=0), "max_rows=0 is out of range")):
        with pytest.raises(ValueError, match=f"fact_lookup: {msg}"):
            locate.fact_lookup(h, req, **kw)
    with pytest.raises(ValueError, match="fact_lookup cannot score site 'blocks.1.resid_post'"):
        locate.fact_lookup(h, req, "blocks.1.resid_post")
    with pytest.raises(ValueError, match="did you mean 'blocks.1.mlp.post'"):
        locate.fact_lookup(h, req, "blocks.1.mlp.pots")


def test_facts_without_subject_tokens_are_refused(lookup):
    h, req = lookup
    no_subj = ForgetRequest(_facts("forget", FORGET, subject=False), req.retain)
    with pytest.raises(ValueError, match="3 of 3 forget facts have no subject tokens, e.g. "
                                         "'s0 r' -> 'a0' with subject '' \\(it has no subject\\)"):
        locate.fact_lookup(h, no_subj)
    # a subject that is not in the prompt
    wrong = FactSet("forget", (Fact("s0 r", "a0", subject="s5"),) + req.forget.facts[1:])
    with pytest.raises(ValueError, match="1 of 3 forget facts .* subject 's5'"):
        locate.fact_lookup(h, ForgetRequest(wrong, req.retain))
    # retain facts without a subject are left out; none at all is refused
    some = ForgetRequest(req.forget, FactSet("retain", _facts("r", range(3, 6)).facts
                                             + _facts("r", range(6, N), subject=False).facts))
    assert locate.fact_lookup(h, some).meta["n_retain_scored"] == 3
    with pytest.raises(ValueError, match="9 of 9 retain facts have no subject tokens"):
        locate.fact_lookup(h, ForgetRequest(req.forget, _facts("retain", range(3, N), False)))
    # the output-tracing variant needs no subject
    imp = locate.fact_lookup(h, no_subj, positions="last")
    assert imp.top(1).units[0] == _unit(READOUT)


# --------------------------------------------------------------------------- Hugging Face -----
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_hugging_face_models(kind):
    pytest.importorskip("transformers")
    from test_hf import tiny as hf_tiny

    h = hf_tiny(kind)
    facts = lambda name, ids, subj=True: FactSet(name, tuple(  # noqa: E731
        Fact(f"the s{i} is", f"a{i}", form="custom", subject=f"s{i}" if subj else "")
        for i in ids))
    req = ForgetRequest(facts("forget", range(3)), facts("retain", range(3, 9)))
    fp = h.fingerprint()
    sites = ["blocks.*.mlp.post", "blocks.0.attn.z"]
    a = locate.fact_lookup(h, req, sites)
    e = locate.fact_lookup(h, req, sites, mode="exact")
    for imp in (a, e):
        for s in imp.scores:
            assert tuple(imp.scores[s].shape) == h.info(s).unit_shape
            assert torch.isfinite(imp.scores[s]).all()
            # the last block's neurons at the subject reach no target
            assert (float(imp.scores[s].abs().max()) > 0) == (s != "blocks.1.mlp.post"), s
    fa = torch.cat([a.parts["forget"][s] for s in a.scores])
    fe = torch.cat([e.parts["forget"][s] for s in e.scores])
    assert spearman(fa, fe) > 0.8
    assert h.fingerprint() == fp and h.hook_count() == 0
    with pytest.raises(ValueError, match="no subject tokens"):
        locate.fact_lookup(h, ForgetRequest(facts("forget", range(3), False), req.retain))
