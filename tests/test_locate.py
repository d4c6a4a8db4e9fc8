"""locate: every method finds a planted answer, exact causal tracing equals a plain loop, and bad
input fails with an error that names the culprit. (SAT resolution: tests/test_sat.py.)"""

from __future__ import annotations

import math

import pytest
import torch

import locate
from conftest import make_planted
from excise.importance import Importance
from excise.request import FactSet
from excise.sites import Unit
from locate.causal_trace import Trace, window_layers
from locate.sat import Conflict


@pytest.fixture(scope="module", params=[(2, 1, 5), (3, 2, 11)], ids=["L1of2", "L2of3"])
def planted_any(request):
    n_layers, layer, neuron = request.param
    return make_planted(n_layers=n_layers, layer=layer, neuron=neuron, seed=n_layers)


def _ranks_first(imp: Importance, unit: Unit, margin: float = 2.0) -> None:
    top = imp.top(2)
    assert top.units[0] == unit, f"{imp.method} ranks {top.units[0]} first, not {unit}"
    first, second = (imp.score_of(u) for u in top.units)
    assert first > margin * max(second, 0.0) and first > 0, (imp.method, first, second)


# ------------------------------------------------------------------------------ planted answer --
@pytest.mark.parametrize("method", ["fisher", "grad_ratio", "activations", "attribution",
                                    "circuit", "causal_trace"])
def test_planted_neuron_ranks_first(planted_any, method):
    p = planted_any
    sites = ["blocks.*.mlp.post", "blocks.*.attn.z"]
    imp = locate.METHODS[method](p.handle, p.request, sites)
    _ranks_first(imp, Unit(p.site, (p.neuron,)))


def test_grad_ratio_per_unit_from_parameters(planted_any):
    p = planted_any
    imp = locate.grad_ratio(p.handle, p.request, "blocks.*", unit=True)
    assert set(imp.scores) >= {p.site}
    _ranks_first(imp, Unit(p.site, (p.neuron,)))
    assert set(imp.parts) == {"forget", "retain"}
    per_param = locate.grad_ratio(p.handle, p.request, f"blocks.{p.layer}.mlp.W_out")
    assert per_param.scores[f"blocks.{p.layer}.mlp.W_out"].shape == (16, 64)
    assert per_param.top(1).units[0].index[0] == p.neuron  # a row of the planted neuron


def test_circuit_labels_and_selection(planted_any):
    p = planted_any
    imp = locate.circuit(p.handle, p.request, "blocks.*.mlp.post")
    name = f"{p.site}[{p.neuron}]"
    assert imp.meta["edit"][0] == name
    assert imp.meta["labels"][name] == "forget_only"
    sel = locate.circuit_selection(imp, "edit")
    assert sel.units[0] == Unit(p.site, (p.neuron,)) and sel.labels[0] == "forget_only"
    assert len(locate.circuit_selection(imp).with_label("forget_only")) >= 1


def test_circuit_conflict_core_names_units(planted, tiny, tiny_request):
    p = planted
    unit = f"{p.site}[{p.neuron}]"
    with pytest.raises(Conflict) as e:
        locate.circuit(p.handle, p.request, "blocks.*.mlp.post", must_edit=[unit],
                       must_keep=[unit])
    assert set(e.value.core) == {f"must_edit:{unit}", f"must_keep:{unit}"}
    # a real organism has a retain circuit: forcing an edit of a protected unit conflicts
    imp = locate.circuit(tiny.model, tiny_request)
    protected = next(u for u, lab in imp.meta["labels"].items() if lab == "retain_only")
    with pytest.raises(Conflict) as e:
        locate.circuit(tiny.model, tiny_request, must_edit=[protected])
    assert set(e.value.core) == {f"must_edit:{protected}", f"protect:{protected}"}
    assert protected in str(e.value)


def test_causal_trace_peaks_at_planted_layer():
    # attention is off, so everything flows through the subject token (which is also the last
    # prompt token): restoring the MLP output there recovers the answer only at the planted layer
    p = make_planted(n_layers=3, layer=1, neuron=5)
    for mode in ("exact", "fast"):
        t = locate.trace(p.handle, p.request.forget, mode=mode, samples=8)
        assert t.high > t.low + 0.1, t
        eff = t.layer_effect("mlp.out", "last token")
        assert int(eff.argmax()) == p.layer, (mode, eff)
        assert float(eff[p.layer]) > 0.5 * (t.high - t.low), (mode, eff, t)
        others = torch.cat([eff[:p.layer], eff[p.layer + 1:]])
        assert float(others.abs().max()) < 0.05, (mode, eff)
    imp = locate.causal_trace(p.handle, p.request)
    assert imp.meta["peak_layer"]["mlp.out"] == p.layer


# ------------------------------------------------------------------- exact tracing vs a loop --
def _loop_trace(handle, fact, comps, window, samples, seed):
    """Plain reference: one forward per (component, layer, position, noise sample)."""
    b = handle.encode([fact])
    T = int(b.target_mask[0].int().argmax())
    tokens = b.tokens[:, :T]
    answer = int(b.tokens[0, T])
    subj = b.subject_mask[0, :T].clone()
    if not subj.any():
        subj[1:] = True
    sigma = 3.0 * float(handle.parameter("embed.W_E").detach().std())
    d = handle.info("embed").unit_shape[0]
    noise = sigma * torch.randn(samples, T, d, generator=torch.Generator().manual_seed(seed))
    n_layers = handle.n_layers
    clean = {}

    def grab(x, site):
        clean[site] = x.detach().clone()

    every = {f"blocks.{L}.{c}": grab for c in comps for L in range(n_layers)}
    with torch.no_grad():
        handle.logits(tokens, every)

    def prob(restore):
        ps = []
        for s in range(samples):
            def corrupt(x, site, s=s):
                return x + noise[s] * subj[:, None]

            hooks = {"embed": corrupt}
            for site, t in restore:
                def put(x, site, t=t):
                    x = x.clone()
                    x[0, t] = clean[site][0, t]
                    return x

                hooks[site] = put
            with torch.no_grad():
                logits = handle.logits(tokens, hooks)
            ps.append(torch.softmax(logits[0, -1].double(), -1)[answer])
        return float(torch.stack(ps).mean())

    low = prob([])
    out = torch.zeros(len(comps), n_layers, T)
    for ci, c in enumerate(comps):
        for L in range(n_layers):
            for t in range(T):
                layers = [L] if c.startswith("resid") else range(
                    max(0, L - window // 2), min(n_layers, L - (-window // 2)))
                out[ci, L, t] = prob([(f"blocks.{L2}.{c}", t) for L2 in layers])
    return out, low


@pytest.mark.parametrize("window", [1, 2])
def test_exact_trace_equals_plain_loop(tiny, tiny_request, window):
    comps = ("resid_post", "mlp.out", "attn.out")
    facts = [tiny_request.forget[0], tiny_request.forget[2]]  # two prompt lengths
    assert len({len(f.prompt.split()) for f in facts}) == 2
    # max_rows small enough that a prompt's restorations span several forwards
    ts = locate.traces(tiny.model, facts, components=comps, window=window, samples=2, seed=3,
                       max_rows=50)
    for f, t in zip(facts, ts):
        ref, low = _loop_trace(tiny.model, f, comps, window, 2, 3)
        assert t.scores.shape == ref.shape
        assert torch.allclose(t.scores, ref, atol=1e-5), (t.scores - ref).abs().max()
        assert abs(t.low - low) <= 1e-5
        assert t.subject and all(t.labels[i] in f.subject.split() for i in t.subject)


# ------------------------------------------- exact tracing: resumed runs vs full forwards --
def _both_engines(handle, facts, comps, window, samples=2, seed=5, max_rows=7):
    """Exact traces by resuming the corrupted run (keys and values reused) and by full
    forwards (excise's earlier algorithm): the same prompts, noise and cells."""
    from locate.causal_trace import _exact_traces, prompts, subject_noise

    ps = prompts(handle, facts)
    sigma = 3.0 * float(handle.parameter("embed.W_E").detach().std())
    d = handle.info("embed").unit_shape[0]

    def noise(p):
        return subject_noise(p.tokens.numel(), d, samples, sigma, seed)

    return [_exact_traces(handle, ps, comps, handle.n_layers, window, samples, max_rows, noise,
                          resume=r) for r in (True, False)]


@pytest.mark.parametrize("window", [1, 3])
def test_resumed_exact_trace_equals_full_forwards(tiny, tiny_request, window):
    comps = ("resid_pre", "resid_mid", "resid_post", "mlp.out", "attn.out")
    facts = [tiny_request.forget[0], tiny_request.forget[2], tiny_request.forget[1]]
    fast, full = _both_engines(tiny.model, facts, comps, window)  # max_rows 7: many chunks
    for a, b in zip(fast, full):
        assert a.scores.shape == b.scores.shape and a.labels == b.labels
        torch.testing.assert_close(a.scores, b.scores, atol=1e-5, rtol=0)
        assert abs(a.low - b.low) < 1e-6 and abs(a.high - b.high) < 1e-6
        assert float(a.effect().abs().max()) > 1e-3  # the restorations do something


@pytest.mark.parametrize("kind", ["gpt2", "gpt_neox", "llama", "gemma3"])
def test_resumed_exact_trace_equals_full_forwards_hf(kind):
    pytest.importorskip("transformers")
    from excise.request import Fact
    from test_hf import tiny as hf_tiny

    h = hf_tiny(kind)
    facts = [Fact("the s1 of s2 is", "a3", subject="s2"), Fact("s4 is the", "a5", subject="s4"),
             Fact("the s6 of s7 is", "a8", subject="s6")]
    fast, full = _both_engines(h, facts, ("resid_pre", "resid_post", "mlp.out", "attn.out"), 2,
                               samples=3)
    for a, b in zip(fast, full):
        torch.testing.assert_close(a.scores, b.scores, atol=1e-5, rtol=0)
        assert abs(a.low - b.low) < 1e-6


def test_exact_trace_of_a_hooked_model_runs_full_forwards(tiny, tiny_request):
    """An attached hook (an activation edit) is replayed by full forwards only: tracing such a
    model takes the full-forward path and equals it exactly."""
    from locate.causal_trace import _exact_traces, prompts, subject_noise

    m = tiny.model.clone()
    facts = tiny_request.forget[:2]
    before = locate.traces(m, facts, samples=2, seed=1)
    handle = m.add_persistent_hook("blocks.0.mlp.out", lambda x, s: x * 0.5)
    try:
        hooked = locate.traces(m, facts, samples=2, seed=1)
        sigma = 3.0 * float(m.parameter("embed.W_E").detach().std())
        d = m.info("embed").unit_shape[0]
        full = _exact_traces(m, prompts(m, facts), ("resid_post", "mlp.out", "attn.out"),
                             m.n_layers, 1, 2, 1024,
                             lambda p: subject_noise(p.tokens.numel(), d, 2, sigma, 1),
                             resume=False)
    finally:
        handle.remove()
    for a, b, c in zip(hooked, full, before):
        assert torch.equal(a.scores, b.scores)
        assert not torch.allclose(a.scores, c.scores, atol=1e-4)


def test_window_layers_match_rome():
    assert list(window_layers("mlp.out", 5, 10, 48)) == list(range(0, 10))
    assert list(window_layers("mlp.out", 20, 10, 48)) == list(range(15, 25))
    assert list(window_layers("attn.out", 47, 10, 48)) == list(range(42, 48))
    assert list(window_layers("resid_post", 3, 10, 48)) == [3]


def test_fast_trace_tracks_exact_and_round_trips(tiny, tiny_request, tmp_path):
    facts = tiny_request.forget[:6]
    exact = locate.trace(tiny.model, facts)
    fast = locate.trace(tiny.model, facts, mode="fast")
    assert exact.n_prompts == fast.n_prompts == 6
    assert exact.labels == fast.labels and abs(exact.low - fast.low) < 1e-6
    from excise.importance import spearman

    assert spearman(exact.scores.flatten(), fast.scores.flatten()) > 0.5
    again = Trace.from_dict(exact.to_dict())
    assert torch.allclose(again.scores, exact.scores) and again.labels == exact.labels
    one = locate.trace(tiny.model, facts[0])
    assert one.n_prompts == 1 and len(one.labels) == len(facts[0].prompt.split()) + 1
    ax = one.plot("mlp.out")
    assert ax.get_title()
    imp = locate.causal_trace(tiny.model, tiny_request, max_facts=4, samples=2)
    imp.save(tmp_path / "ct.safetensors")
    back = Importance.load(tmp_path / "ct.safetensors")
    assert Trace.from_dict(back.meta["trace"]).n_prompts == 4
    assert [p.split("/")[-1] for p in locate.run_plots(back, tiny.model, tiny_request,
                                                       tmp_path)] == ["causal_trace.png"]
    assert (tmp_path / "causal_trace.png").stat().st_size > 1000


# ---------------------------------------------------------------------------------- fisher --
def _hf_facts():
    """Facts with 1-, 2- and 3-token targets, so the two reductions differ."""
    from excise.request import Fact, FactSet, ForgetRequest

    targets = ["a1", "a2 a3", "a4 a5 a6"]
    facts = [Fact(f"the s{i} of s{(i + 3) % 12} is", targets[i % 3]) for i in range(9)]
    keep = [Fact(f"s{i} is the", "a7 a8" if i % 2 else "a9") for i in range(5)]
    return ForgetRequest(FactSet("forget", tuple(facts)), FactSet("retain", tuple(keep)))


def _ssd_fisher(h, facts, batch_size):
    """SSD's calc_importance written out: per batch of consecutive facts, the cross-entropy
    averaged over every target token of the batch, backward, squared gradients summed; divided
    by the number of batches. Straight on the Hugging Face model (all logits, no handle)."""
    model = h.model
    params = dict(model.named_parameters())
    imp = {k: torch.zeros_like(v) for k, v in params.items()}
    n = 0
    for i in range(0, len(facts), batch_size):
        b = h.encode(list(facts[i:i + batch_size]))
        y = torch.where(b.target_mask[:, 1:], b.tokens[:, 1:], torch.tensor(-100))
        logits = model(input_ids=b.tokens).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                 y.reshape(-1))
        grads = torch.autograd.grad(loss, list(params.values()))
        for k, g in zip(params, grads):
            imp[k] += g ** 2
        n += 1
    return {k: v / n for k, v in imp.items()}


@pytest.mark.parametrize("batch_size", [1, 8])
def test_fisher_token_reduction_is_ssds_formula(batch_size):
    pytest.importorskip("transformers")
    from test_hf import tiny as hf_tiny

    h, req = hf_tiny("gpt2"), _hf_facts()
    imp = locate.fisher(h, req, reduction="token", batch_size=batch_size)
    fact = locate.fisher(h, req, batch_size=batch_size)  # the default
    assert imp.meta["reduction"] == "token" and fact.meta["reduction"] == "fact"
    ref = _ssd_fisher(h, req.forget, batch_size)
    ref_keep = _ssd_fisher(h, req.keep, batch_size)
    worst = 0.0
    for site, f in imp.parts["forget"].items():
        name = h.info(site).target
        torch.testing.assert_close(f, ref[name], rtol=1e-4, atol=1e-9)
        torch.testing.assert_close(imp.parts["retain"][site], ref_keep[name], rtol=1e-4,
                                   atol=1e-9)
        gap = (fact.parts["forget"][site] - ref[name]).abs().max() / ref[name].abs().max()
        worst = max(worst, float(gap))
    if batch_size == 1:  # one fact per batch: the reductions are the same
        assert worst < 1e-4
    else:  # unequal target lengths in a batch: per-fact averaging differs from SSD's
        assert worst > 1e-2


def test_fisher_fact_reduction_averages_each_facts_mean_loss(planted):
    h, req = planted.handle, planted.request
    site = f"blocks.{planted.layer}.mlp.W_out"
    p = h.parameter(site)
    imp = locate.fisher(h, req, [site], batch_size=2, reduction="fact")
    acc, n = torch.zeros_like(p), 0
    for i in range(0, len(req.forget), 2):
        b = h.encode(list(req.forget[i:i + 2]))
        lp = h.token_logprobs(b)
        m = b.target_mask[:, 1:]
        loss = (-(lp.sum(1) / m.sum(1))).mean()
        g, = torch.autograd.grad(loss, [p])
        acc, n = acc + g ** 2, n + 1
    torch.testing.assert_close(imp.parts["forget"][site], acc / n, rtol=1e-4, atol=1e-10)


def test_fisher_of_a_unit_is_the_squared_gate_gradient_of_the_batch_loss():
    """Activation sites under the per-batch estimator: one gate per neuron, shared by the
    batch's rows; Fisher = mean over batches of its squared gradient."""
    pytest.importorskip("transformers")
    from test_hf import tiny as hf_tiny

    h, req = hf_tiny("gpt2"), _hf_facts()
    site = "blocks.0.mlp.post"
    for reduction in ("fact", "token"):
        imp = locate.fisher(h, req, [site], batch_size=4, reduction=reduction)
        acc, n = 0.0, 0
        for i in range(0, len(req.forget), 4):
            b = h.encode(list(req.forget[i:i + 4]))
            gate = torch.ones(h.info(site).unit_shape, requires_grad=True)
            loss = h.loss(b, {site: lambda x, s: x * gate}, per_example=reduction == "fact")
            g, = torch.autograd.grad(loss.mean(), [gate])
            acc, n = acc + g ** 2, n + 1
        torch.testing.assert_close(imp.parts["forget"][site], acc / n, rtol=1e-4, atol=1e-12)


def test_fisher_refuses_unknown_reduction_and_estimator(planted):
    with pytest.raises(ValueError, match=r"fisher: unknown reduction 'mean'; choose one of "
                                         r"\['fact', 'token'\]"):
        locate.fisher(planted.handle, planted.request, reduction="mean")
    with pytest.raises(ValueError, match="fisher: unknown estimator 'batches'"):
        locate.fisher(planted.handle, planted.request, estimator="batches")
    from locate._grads import gradient_stats

    with pytest.raises(ValueError, match="unknown reduction 'Token'"):
        gradient_stats(planted.handle, planted.request.forget, ["blocks.0.mlp.W_in"],
                       reduction="Token")
    with pytest.raises(ValueError, match=r"stats \['var'\]"):
        gradient_stats(planted.handle, planted.request.forget, ["blocks.0.mlp.W_in"],
                       stats=("var",))


# ------------------------------------------------------------------------------------- sae ----
def test_sae_trains_caches_and_finds_forget_latent(planted, tmp_path, monkeypatch):
    monkeypatch.setenv("EXCISE_CACHE", str(tmp_path))
    p = planted
    kw = dict(steps=300, expansion=4, l1=1.0, batch_tokens=16)
    imp = locate.sae(p.handle, p.request, f"blocks.{p.layer}.resid_post", **kw)
    site = f"blocks.{p.layer}.resid_post.sae"
    assert list(imp.scores) == [site] and imp.scores[site].shape == (256,)
    best = imp.top(1).units[0]
    assert float(imp.parts["forget"][site][best.index]) > 0
    assert float(imp.parts["retain"][site][best.index]) < 0.1 * float(
        imp.parts["forget"][site][best.index])
    path = imp.meta["sae_path"][site]
    assert (tmp_path / "sae").exists() and path.startswith(str(tmp_path))
    again = locate.sae(p.handle, p.request, site, **kw)  # from the cache
    assert torch.equal(again.scores[site], imp.scores[site])
    from sae_lens import StandardTrainingSAE

    user = StandardTrainingSAE.load_from_disk(path)
    scale = __import__("json").loads(open(f"{path}/excise.json").read())["input_scale"]
    assert scale > 0
    theirs = locate.sae(p.handle, p.request, f"blocks.{p.layer}.resid_post", sae=user)
    assert theirs.scores[site].shape == (256,)


# ----------------------------------------------------------------------------- compare, plots --
def test_compare_matrix_and_plot(planted):
    p = planted
    imps = [locate.fisher(p.handle, p.request), locate.activations(p.handle, p.request),
            locate.attribution(p.handle, p.request)]
    m = locate.compare(imps, k=1)
    names = ["fisher", "activations", "attribution"]
    assert list(m["spearman"]) == names
    for a in names:
        assert m["spearman"][a][a] == 1.0
        for b in names:
            assert m["spearman"][a][b] == pytest.approx(m["spearman"][b][a])
            assert m["topk_jaccard"][a][b] == 1.0  # all agree on the planted neuron
    from locate.plots import agreement_matrix

    ax = agreement_matrix(m["spearman"])
    assert len(ax.get_xticklabels()) == 3
    with pytest.raises(ValueError, match="at least two"):
        locate.compare(imps[:1])


# -------------------------------------------------------------------------------- bad input --
def test_unknown_site_is_named(planted):
    for name in ("grad_ratio", "activations", "causal_trace", "circuit", "sae"):
        with pytest.raises(ValueError, match="did you mean 'blocks.1.mlp.post'"):
            locate.METHODS[name](planted.handle, planted.request, "blocks.1.mlp.pots")


@pytest.mark.parametrize("method,site", [("activations", "blocks.1.mlp.W_out"),
                                         ("activations", "blocks.1.resid_post"),
                                         ("causal_trace", "blocks.0.attn.W_Q"),
                                         ("attribution", "embed"),
                                         ("circuit", "blocks.1.mlp.W_in"),
                                         ("sae", "blocks.1.attn.z")])
def test_site_the_method_cannot_score(planted, method, site):
    with pytest.raises(ValueError, match=f"{method} cannot score site '{site}'"):
        locate.METHODS[method](planted.handle, planted.request, site)


def test_empty_data_and_bad_options(planted):
    h, req = planted.handle, planted.request
    with pytest.raises(ValueError, match="at least one fact"):
        locate.trace(h, [])
    with pytest.raises(ValueError, match="empty"):
        locate.trace(h, FactSet("forget", ()))
    with pytest.raises(ValueError, match="the list of sites is empty"):
        locate.activations(h, req, [])
    with pytest.raises(ValueError, match="component 'mlp.post'"):
        locate.trace(h, req.forget, components=["mlp.post"])
    with pytest.raises(ValueError, match="unknown mode"):
        locate.causal_trace(h, req, mode="slow")
    with pytest.raises(ValueError, match="unknown stat"):
        locate.activations(h, req, stat="median")
    with pytest.raises(ValueError, match="noise"):
        locate.trace(h, req.forget, noise=0.0)
    with pytest.raises(ValueError, match="empty prompt"):
        from excise.request import Fact

        locate.trace(h, [Fact("", "a0")])


def test_non_finite_is_named():
    p = make_planted()
    with torch.no_grad():
        p.handle.model.blocks[1].mlp.W_in[0, 3] = float("nan")
    # a non-finite weight is refused before anything runs, naming the tensor
    with pytest.raises(ValueError, match="activations: the weights of model 'planted' are not "
                                         "finite: blocks.1.mlp.W_in holds 1 NaN"):
        locate.activations(p.handle, p.request)
    # finite weights whose activations overflow: the stage names the site
    with torch.no_grad():
        p.handle.model.blocks[1].mlp.W_in[:, 3] = 3e38
        p.handle.model.blocks[1].mlp.b_in[3] = 3e38
    with pytest.raises(ValueError, match="non-finite activations at site 'blocks.1.mlp.post'"):
        locate.activations(p.handle, p.request)
    with pytest.raises(ValueError, match="non-finite"):
        locate.grad_ratio(p.handle, p.request, "blocks.*.mlp.post")
    with pytest.raises(ValueError, match="non-finite"):
        locate.causal_trace(p.handle, p.request)


def test_methods_are_registered_with_pipeline_signature():
    import inspect

    assert set(locate.METHODS) == {"fisher", "grad_ratio", "activations", "causal_trace",
                                   "attribution", "sae", "circuit", "fact_lookup",
                                   "subnetwork", "saliency"}
    for name, fn in locate.METHODS.items():
        params = list(inspect.signature(fn).parameters.values())
        assert [q.name for q in params[:3]] == ["model", "request", "sites"], name
        assert "progress" in inspect.signature(fn).parameters, name
    assert locate.StatsCache is not None and math.isfinite(1.0)


def test_every_method_runs_from_the_default_config():
    # --set locate.method=X on configs/default.yaml (its locate parameters are kept)
    from excise.config import DEFAULT_CONFIG, load
    from excise.app.pipeline import registries

    for name in locate.METHODS:
        cfg = load(DEFAULT_CONFIG, [f"locate.method={name}"], registries())
        assert cfg.locate.method == name
    import yaml

    raw = yaml.safe_load(DEFAULT_CONFIG.read_text())["locate"]
    cfg = load(DEFAULT_CONFIG, ["locate.method=fisher"], registries())
    assert cfg.locate.params == {k: v for k, v in raw.items() if k != "method"}  # kept


# -------------------------------------------------------------------------------- saliency ----
def test_saliency_is_half_forget_fisher_times_weight_squared(planted):
    """A plain loop: per batch of 2 forget facts, each fact's mean token loss averaged, its
    gradient squared and averaged over batches, times theta^2 / 2."""
    h, req = planted.handle, planted.request
    sites = [f"blocks.{planted.layer}.mlp.W_in", f"blocks.{planted.layer}.mlp.W_out",
             "unembed.W_U"]
    imp = locate.saliency(h, req, sites, batch_size=2)
    params = [h.parameter(s) for s in sites]
    acc, n = [torch.zeros_like(p) for p in params], 0
    for i in range(0, len(req.forget), 2):
        b = h.encode(list(req.forget[i:i + 2]))
        lp = h.token_logprobs(b)
        m = b.target_mask[:, 1:]
        grads = torch.autograd.grad((-(lp.sum(1) / m.sum(1))).mean(), params)
        acc, n = [a + g ** 2 for a, g in zip(acc, grads)], n + 1
    for s, p, a in zip(sites, params, acc):
        torch.testing.assert_close(imp.parts["forget"][s], a / n, rtol=1e-4, atol=1e-12)
        torch.testing.assert_close(imp.scores[s], 0.5 * a / n * p.detach() ** 2, rtol=1e-4,
                                   atol=1e-12)
    assert imp.method == "saliency" and imp.meta["n_forget"] == len(req.forget)


def test_saliency_ranks_the_planted_neurons_weights_first(planted):
    """The forget answers lean on the planted neuron: its input and output weights are the
    top of the ranking among the MLP's weights; by unit, the neuron ranks first."""
    h, req = planted.handle, planted.request
    imp = locate.saliency(h, req, [f"blocks.{planted.layer}.mlp.W_in",
                                   f"blocks.{planted.layer}.mlp.W_out"])
    top = imp.top(20)
    owners = {u.index[1] if u.site.endswith("W_in") else u.index[0] for u in top.units}
    assert owners == {planted.neuron}, owners
    _ranks_first(imp.by_unit(), Unit(planted.site, (planted.neuron,)))


def test_saliency_refuses_activation_sites_and_bad_reduction(planted):
    with pytest.raises(ValueError, match="saliency"):
        locate.saliency(planted.handle, planted.request, ["blocks.0.mlp.post"])
    with pytest.raises(ValueError, match=r"reduction.*'mean'"):
        locate.saliency(planted.handle, planted.request, reduction="mean")


def test_parse_select_reads_method_fraction_and_sites_and_names_bad_parts(planted):
    """The scripts' selection grammar: 'all', METHOD:FRACTION, METHOD:FRACTION:SITES; the parsed
    sites confine top() to those sites' elements; a bad spec is refused by name."""
    import re

    from excise.sites import expand

    h, req = planted.handle, planted.request
    assert locate.parse_select("all") is None
    assert locate.parse_select("fisher:0.01") == ("fisher", 0.01, None)
    mlp = f"blocks.{planted.layer}.mlp.*"
    got = locate.parse_select(f"saliency:0.25:{mlp}+unembed.*", h)
    assert got == ("saliency", 0.25, [mlp, "unembed.*"])
    method, frac, sites = got
    named = h.named_parameters()
    allowed = set(expand(sites, list(named)))
    assert allowed and allowed != set(named)  # the patterns leave some sites out
    chosen = locate.METHODS[method](h, req).top(frac, sites)
    assert {u.site for u in chosen.units} <= allowed
    assert len(chosen.units) == math.ceil(frac * sum(named[s].numel() for s in allowed))
    for bad in ("nosuch:0.1", "saliency:1.5", "saliency:ten", "saliency:0.1:"):
        with pytest.raises(ValueError, match=re.escape(repr(bad)) + ".*METHOD one of"):
            locate.parse_select(bad, h)
    with pytest.raises(ValueError, match=r"'saliency:0.1:nosuch\.\*'.*nosuch"):
        locate.parse_select("saliency:0.1:nosuch.*", h)
