"""Models run on NDIF (excise.remote), offline: NDIF cannot be reached from here, so the request a
remote handle builds is checked as built (nnsight's own envelope and payload, nothing sent), and
run by a LocalServer - the payload deserialized against a local copy of the model the way the
server does it, refusing any module a server lacks - to compare every forward-only method with
HFHandle on the same weights; what needs local weights must refuse, naming itself."""

from __future__ import annotations

import inspect
import io
import json
import math
import socket
import warnings
from functools import partial

import pytest
import torch

pytest.importorskip("transformers")
from test_hf import CONFIGS, WORDS, word_tokenizer  # noqa: E402

from excise.hf import load_model  # noqa: E402
from excise.request import Fact, ForgetRequest  # noqa: E402

REPO = "excise-test/tiny-gpt2"  # the repo id requests name (no such repo: nothing is sent)
KEY = ('nnsight.modeling.transformers.TransformersModel:{"repo_id": "excise-test/tiny-gpt2", '
       '"revision": null, "task": "text-generation"}')


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny random GPT-2 saved as a Hugging Face folder (weights, config, tokenizer)."""
    from transformers import AutoModelForCausalLM

    path = tmp_path_factory.mktemp("tiny-gpt2")
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        AutoModelForCausalLM.from_config(CONFIGS["gpt2"]()).save_pretrained(path)
    word_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def env(folder):
    """The remote handle (requests run by a LocalServer on the folder's model), the same model
    as a local HFHandle, and the requests built. The Hub's canonical id for REPO is given, so
    building the model key asks nothing of the network."""
    import nnsight.modeling.huggingface as nh

    from excise.remote import LocalServer, OfflineBackend, load_remote

    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(nh._ID_CACHE, REPO, REPO)
        server = LocalServer(folder, REPO)
        sent: list = []
        remote = load_remote(REPO, path=folder, log=None,
                             backend=partial(OfflineBackend, server=server, sent=sent))
        yield remote, load_model(path=str(folder)), server, sent


@pytest.fixture()
def no_network(monkeypatch):
    """Any attempt to look up a host or open a connection fails (and is listed)."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise AssertionError(f"a connection was attempted: {args[:2]}")
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    return attempts


def recall_request(local) -> ForgetRequest:
    """Facts "the sK is" -> the local model's own greedy word for even K (recalled) and another
    word for odd K, so every split has facts recalled and facts not."""
    prompts = [f"the s{i} is" for i in range(12)]
    words = [w for w in WORDS if not w.startswith("<")]
    facts = []
    with torch.inference_mode():
        for i, p in enumerate(prompts):
            b = local.encode([Fact(p, "a0")])
            order = local.logits(b.tokens)[0, -2].argsort(descending=True).tolist()
            best = [local.tokenizer.decode([t]) for t in order if local.tokenizer.decode([t])
                    in words]
            facts.append((p, best[0] if i % 2 == 0 else best[1]))
    return ForgetRequest.from_lists(forget=facts[:4], retain=facts[4:8], holdout=facts[8:],
                                    general=["s1 is the a2 of s3", "the s4 of s5 is a6"])


def same_metrics(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        a[k] == b[k] or (math.isnan(a[k]) and math.isnan(b[k])) for k in a)


# ------------------------------------------------------------------ the request, built offline
def test_request_names_the_model_and_the_saves_and_nothing_is_sent(env, folder, no_network,
                                                                  monkeypatch):
    import nnsight.modeling.huggingface as nh
    from nnsight.intervention.serialization import loads

    from excise.remote import (NDIFBackend, OfflineBackend, RemoteError, ServerUnpickler,
                               load_remote)

    _, local, server, _ = env
    monkeypatch.setitem(nh._ID_CACHE, REPO, REPO)
    sent: list = []
    remote = load_remote(REPO, path=folder, log=None,  # requests built, recorded, not sent
                         backend=partial(OfflineBackend, sent=sent))
    tokens = torch.tensor([[1, 5, 6, 7], [1, 8, 9, 0]])
    sites = ["blocks.1.mlp.post", "embed", "blocks.0.attn.z"]
    with pytest.raises(RemoteError, match="built .* but not sent"):
        remote.run_with_cache(tokens, sites)
    batch = local.encode([Fact("the s1 is", "a1"), Fact("the s2 of s3 is", "a2")])
    with pytest.raises(RemoteError, match="not sent"):
        remote.target_logprobs(batch)
    assert len(sent) == 2 and remote.traces == 0
    seen = []

    class Recording(ServerUnpickler):  # refuses modules a server lacks; records module ids
        def persistent_load(self, pid):
            seen.append(pid)
            return super().persistent_load(pid)

    import zstandard

    decoded = []
    for request, blob in sent:
        envelope = json.loads(request.metadata())  # the routing JSON NDIF reads
        assert envelope["model_key"] == KEY == remote.model_key()
        assert envelope["compress"] is True and "attn_implementation" in envelope["env"]
        decoded.append(loads(zstandard.ZstdDecompressor().decompress(blob),
                             server.lm._remoteable_persistent_objects(), Recording))
    # run_with_cache: the three sites, in model order, read from the modules that carry them
    tracer, (source, _, variables) = decoded[0]
    assert torch.equal(tracer.kwargs["input_ids"], tokens)
    assert tracer.kwargs["use_cache"] is False
    steps = variables["steps"]
    assert [s[0] for s in steps] == ["embed", "blocks.0.attn.z", "blocks.1.mlp.post"]
    assert [(s[1].path, s[2]) for s in steps] == [
        ("model.transformer.wte", "output"), ("model.transformer.h.0.attn.c_proj", "input"),
        ("model.transformer.h.1.mlp.act", "output")]
    assert all(s[4] is None and s[5] is None for s in steps)  # no hook, nothing replaced
    assert variables["output"] == "stop" and variables["t0"] == 0
    assert "nn_save(out)" in source and "tracer.stop()" in source
    assert {"Module:model.transformer.wte", "Module:model.transformer.h.1.mlp.act",
            "Interleaver"} <= set(seen)
    # target_logprobs: no site read, only the target positions unembedded
    tracer, (_, _, variables) = decoded[1]
    keep = torch.zeros_like(batch.target_mask)
    keep[:, :-1] = batch.target_mask[:, 1:]
    assert variables["steps"] == [] and variables["output"] == "logits"
    assert torch.equal(tracer.kwargs["logits_to_keep"], keep)
    # the default backend is nnsight's remote one, for this key: its first forward goes to
    # NDIF's host - the only connection attempted in this test
    assert no_network == []
    default = load_remote(REPO, path=folder, log=None)
    b = default.backend()
    assert isinstance(b, NDIFBackend) and b.model_key == KEY and b.blocking
    with pytest.raises(Exception, match="a connection was attempted"):
        default.logits(tokens)
    host = b.host.split("://")[1].split("/")[0].split(":")[0]
    assert [a[0] for a in no_network] == [host] and default.traces == 0


def test_results_are_read_with_weights_only(env):
    """What comes back from NDIF is loaded with weights_only=True: tensors and containers, but
    never an arbitrary class."""
    from excise.remote import NDIFBackend

    b = NDIFBackend(KEY)
    b.compress = False
    buf = io.BytesIO()
    torch.save({"out": {"read": {"x": torch.ones(2)}, "wrote": ["embed"]}}, buf)
    assert torch.equal(b.finalize(buf.getvalue())["out"]["read"]["x"], torch.ones(2))
    buf = io.BytesIO()
    torch.save({"out": Fact("a", "b")}, buf)
    with pytest.raises(Exception, match="Weights only load failed"):
        b.finalize(buf.getvalue())


# ------------------------------------------------------- the same trace, run by a local server
def test_remote_forwards_equal_the_local_model(env, no_network):
    remote, local, server, sent = env
    tokens = torch.tensor([[1, 5, 6, 7, 3], [1, 8, 9, 10, 0]])
    batch = local.encode([Fact("the s1 is", "a1"), Fact("the s2 of s3 is", "a2 a3")])
    sites = ["embed", "blocks.0.resid_pre", "blocks.0.attn.z", "blocks.0.attn.out",
             "blocks.1.mlp.pre", "blocks.1.mlp.post", "blocks.1.mlp.out", "blocks.1.resid_post"]
    n0 = remote.traces
    with torch.inference_mode():
        assert torch.equal(remote.logits(tokens), local.logits(tokens))
        assert torch.equal(remote.target_logprobs(batch), local.target_logprobs(batch))
        assert torch.equal(remote.token_logprobs(batch), local.token_logprobs(batch))
        assert torch.equal(remote.loss(batch, per_example=True),
                           local.loss(batch, per_example=True))
        got, want = remote.run_with_cache(tokens, sites), local.run_with_cache(tokens, sites)
        assert all(torch.equal(got[s], want[s]) for s in sites)
        assert got["blocks.0.attn.z"].shape == (2, 5, 4, 8)
        # hooks run in the remote trace: one writes, two read (their stores land here)
        runs = []
        for handle in (remote, local):
            store = {}

            def grab(x, site, store=store):
                store[site] = x.clone()

            def shift(x, site):
                return x + 0.25 * torch.arange(x.shape[-1], dtype=x.dtype)

            hooks = {"blocks.1.resid_pre": grab, "embed": shift, "blocks.0.attn.z": grab}
            runs.append((handle.logits(tokens, hooks), store))
        (a, sa), (b, sb) = runs
        assert torch.equal(a, b) and sa.keys() == sb.keys() == {"blocks.0.attn.z",
                                                                 "blocks.1.resid_pre"}
        assert all(torch.equal(sa[s], sb[s]) for s in sa)
        assert not torch.equal(a, local.logits(tokens))  # the write took effect
        for s in ("blocks.1.mlp.post", "blocks.0.attn.z"):
            assert torch.equal(remote.unit_out_weights(s), local.unit_out_weights(s))
        assert torch.equal(remote.fetch("embed.W_E"), local.parameter("embed.W_E"))
        # a hook returning the wrong shape is refused
        with pytest.raises(ValueError, match="hook at 'embed' returned shape"):
            remote.logits(tokens, {"embed": lambda x, s: x[:, :1]})
    assert remote.traces - n0 == 9  # one trace per call above (the failed one sent nothing back)
    assert remote.hook_count() == 0 and remote.edit_stack == []


def test_kv_run_and_resume_equal_the_local_model(env, no_network):
    remote, local, _, _ = env
    tokens = torch.tensor([[1, 5, 6, 7, 3], [1, 8, 9, 10, 4]])
    noise = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(0))
    hooks = {"embed": lambda x, s: x + noise}
    with torch.inference_mode():
        la, pa = remote.kv_run(tokens, hooks)
        lb, pb = local.kv_run(tokens, hooks)
        assert torch.equal(la, lb) and len(pa) == 2 and pa.length == 5
        for layer, t in ((1, 2), (0, 3)):
            resid = torch.randn(2, 5 - t, 32, generator=torch.Generator().manual_seed(t))
            put = {f"blocks.{layer}.mlp.out": lambda x, s: x * 0.5}
            got = remote.resume(pa.upto(t), resid, layer, put)
            want = local.resume(pb.upto(t), resid, layer, put)
            assert torch.allclose(got, want, atol=1e-5, rtol=0)
            got = remote.resume(pa.upto(t)[[1]], resid[[1], :1], layer, stop=layer + 1)
            want = local.resume(pb.upto(t)[[1]], resid[[1], :1], layer, stop=layer + 1)
            assert got.shape == (1, 1, 32) and torch.allclose(got, want, atol=1e-5, rtol=0)
        # a kv_run whose hooks changed block 1 cannot be resumed at or below it
        _, changed = remote.kv_run(tokens, {"blocks.1.mlp.out": lambda x, s: x * 2})
        with pytest.raises(ValueError, match="the kv_run's hooks changed block 1"):
            remote.resume(changed.upto(2), torch.zeros(2, 3, 32), 1)


def test_forward_only_methods_equal_the_local_model(env, folder, no_network):
    import locate
    import probes

    remote, local, server, _ = env
    req = recall_request(local)
    imp_r, imp_l = locate.activations(remote, req), locate.activations(local, req)
    assert imp_r.scores.keys() == imp_l.scores.keys()
    assert all(torch.equal(imp_r.scores[s], imp_l.scores[s]) for s in imp_r.scores)
    assert imp_r.meta["model"] == remote.fingerprint() != local.fingerprint()
    facts = list(req.forget)[:2] + [Fact("the s2 of s3 is", "a2", subject="s2 of s3")]
    n0 = remote.traces
    got = locate.traces(remote, facts, mode="exact", noise=0.5, samples=2, window=2)
    per_trace = remote.traces - n0
    want = locate.traces(local, facts, mode="exact", noise=0.5, samples=2, window=2)
    for a, b in zip(got, want):
        assert a.labels == b.labels and abs(a.low - b.low) < 1e-6 and abs(a.high - b.high) < 1e-6
        assert torch.allclose(a.scores, b.scores, atol=1e-6, rtol=0)
    # full forwards, not one resume per restored (position, block): a round trip each
    assert per_trace <= 2 * len({len(local.encode([f]).tokens[0]) for f in facts}) + 2, per_trace
    other = load_model(path=str(folder))  # the original, for drift
    suites = ["behaviour", "privacy", "loo_probe", "drift"]
    a = probes.verify(remote, req, suite=suites, original=other, loo_null=2, n_candidates=16)
    b = probes.verify(local, req, suite=suites, original=other, loo_null=2, n_candidates=16)
    assert same_metrics(a.metrics["model"], b.metrics["model"])
    assert 0 < a.metrics["model"]["forget_recall"] < 1  # recall is measured, not trivially 0
    assert a.extra["loo_probe"] == b.extra["loo_probe"]
    assert all(abs(v - 1) < 1e-6 for k, v in a.metrics["model"].items()
               if k.startswith("cka_original"))  # the same weights, remote and local


# ------------------------------------------------------------- what needs local weights
def test_methods_that_need_local_weights_refuse_naming_themselves(env, no_network):
    import edit
    import locate
    import probes

    from excise.remote import EDIT_METHODS, RemoteError

    remote, local, server, _ = env
    req = recall_request(local)
    imp = locate.activations(remote, req)
    units = imp.top(3)
    n0 = server.requests
    assert set(edit.METHODS) == set(EDIT_METHODS)  # a new edit method must be listed
    for name, fn in edit.METHODS.items():
        kw = {"request": req} if "request" in inspect.signature(fn).parameters else {}
        with pytest.raises(RemoteError, match=rf"^{name}: needs local weights .* load the "
                                              rf"model locally"):
            fn(remote, imp, units, **kw)
    for name in ("fisher", "grad_ratio", "circuit", "attribution", "causal_trace",
                 "fact_lookup", "subnetwork", "saliency"):
        with pytest.raises(RemoteError, match=rf"^{name}: needs local weights - .*gradients"):
            locate.METHODS[name](remote, req)
    with pytest.raises(RemoteError, match="^sae: is not offered on a remote model"):
        locate.sae(remote, req)
    assert server.requests == n0  # refused before anything was sent
    facts = list(req.forget)[:1]
    with pytest.raises(RemoteError, match=r"gradients through the model .* traces\(mode='fast'\)"):
        locate.traces(remote, facts, mode="fast", noise=0.5)
    with pytest.raises(RemoteError, match=r"parameter\('embed.W_E'\).*pass noise="):
        locate.traces(remote, facts, mode="exact")
    with pytest.raises(RemoteError, match=r"^clone\(\): needs local weights .* attacks"):
        probes.verify(remote, req, suite="attacks", attacks=["relearn"])
    for call, what in ((lambda: remote.named_parameters(), "named_parameters"),
                       (lambda: remote.hooks({}), "hooks"),
                       (lambda: remote.add_persistent_hook("embed", print), "add_persistent_hook"),
                       (lambda: remote.readout(), "readout"),
                       (lambda: remote.to("cpu"), "to"),
                       (lambda: remote.functional_loss(), "functional_loss")):
        with pytest.raises(RemoteError, match=rf"^{what}\(.*needs local weights"):
            call()
    assert remote.to() is remote and remote.device == torch.device("cpu")
    assert remote.n_parameters() == local.n_parameters() and remote.d_vocab == local.d_vocab


def test_a_remote_model_in_a_config_refuses_edits(tmp_path):
    from typer.testing import CliRunner

    from excise import config as C
    from excise.app import pipeline
    from excise.app.cli import app

    cfg = C.build({"model": {"remote": True, "name": "openai-community/gpt2"},
                   "edit": {"method": "dampen"}})
    assert cfg.model.remote is True
    with pytest.raises(C.ConfigError, match=r"model.remote: true runs 'openai-community/gpt2' "
                                            r"on NDIF.*edit 'dampen' needs local weights"):
        pipeline.Setup.check(cfg)
    with pytest.raises(C.ConfigError, match="needs model.name, the Hugging Face repo id"):
        pipeline.Setup.check(C.build({"model": {"remote": True}}))
    with pytest.raises(C.ConfigError, match="NDIF places and casts the model; drop "
                                            "model.dtype='bfloat16'"):
        pipeline.Setup.check(C.build({"model": {"remote": True, "name": "x/y",
                                                "dtype": "bfloat16"}}))
    with pytest.raises(C.ConfigError, match="remote"):
        C.build({"model": {"remote": "yes please"}})
    out = tmp_path / "run"
    r = CliRunner().invoke(app, ["run", "--set", "model.remote=true", "--set",
                                 "model.name=openai-community/gpt2", "--set",
                                 "verify.suite=behaviour", "--out", str(out), "--quiet"])
    assert r.exit_code == 2 and "needs local weights" in r.output and not out.exists()


def test_the_pipeline_builds_a_remote_subject(env, folder, monkeypatch, no_network):
    """Setup.build's remote branch (which Setup.check keeps every editing config from): a
    RemoteHFHandle, and the request screened through it as through the local model."""
    from excise import config as C
    from excise import remote as R
    from excise.app import pipeline
    from probes import screen_known

    remote, local, server, _ = env
    real = R.load_remote
    monkeypatch.setattr(R, "load_remote", lambda *a, **kw: real(
        *a, **kw, backend=partial(R.OfflineBackend, server=server)))
    cfg = C.build({"model": {"remote": True, "name": REPO, "path": str(folder)}})
    req = recall_request(local)
    subject = pipeline.Setup(cfg, None, req).build(log=lambda m: None)
    assert isinstance(subject.model, R.RemoteHFHandle) and subject.model.traces > 0
    kept, dropped = screen_known(local, req, log=lambda m: None)
    # the holdout keeps only facts the model never knew (the comparator), screened alike
    kept, known = pipeline.screen_never_known(local, kept, log=lambda m: None)
    assert known  # the request's holdout has facts the model knows: the screen is exercised
    expected = dict(dropped or {}) | {"holdout_known": known}
    assert subject.request == kept and subject.not_known == expected
    assert len(kept.forget) == 2  # the two forget facts whose target is the greedy word
