"""Continuing runs from their keys and values (``ModelHandle.kv_run`` / ``resume``), the
capability exact causal tracing is built on: on every backend and Hugging Face family, a run
resumed at any block and position gives the full run's logits, with a patch or without."""

from __future__ import annotations

import warnings

import pytest
import torch

pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, Gemma3TextConfig  # noqa: E402

from excise.hf import HFHandle  # noqa: E402
from test_hf import CONFIGS, SMALL, V, tiny, word_tokenizer  # noqa: E402

TOKENS = torch.randint(3, V, (3, 9), generator=torch.Generator().manual_seed(1))


def gemma_sliding() -> HFHandle:
    """Gemma 3 with a 3-token sliding window: prefixes longer than the window."""
    torch.manual_seed(0)
    cfg = Gemma3TextConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                           num_key_value_heads=1, head_dim=8, intermediate_size=64, vocab_size=V,
                           max_position_embeddings=32, sliding_window=3,
                           layer_types=["sliding_attention", "full_attention"], **SMALL)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_config(cfg)
    return HFHandle(model, word_tokenizer(), name="tiny-gemma3-sliding")


@pytest.fixture(scope="module", params=list(CONFIGS) + ["gemma3-sliding", "transformerlens"])
def handle(request):
    if request.param == "gemma3-sliding":
        return gemma_sliding()
    if request.param == "transformerlens":
        return request.getfixturevalue("tiny").model  # the tiny organism
    return tiny(request.param)


def _full(h, tokens, hooks=None):
    with torch.no_grad():
        return h.logits(tokens, hooks)


def test_resumed_runs_equal_full_runs(handle):
    h = handle
    tokens = TOKENS % h.d_vocab
    n, T = tokens.shape
    full = _full(h, tokens)
    resid = {}

    def grab(x, site):
        resid[site] = x.detach().clone()

    last = f"blocks.{h.n_layers - 1}.resid_post"
    with torch.no_grad():
        logits, past = h.kv_run(tokens, {f"blocks.{L}.resid_pre": grab
                                         for L in range(h.n_layers)} | {last: grab})
    after = [resid[f"blocks.{L}.resid_pre"] for L in range(1, h.n_layers)] + [resid[last]]
    assert len(past) == n and past.length == T
    torch.testing.assert_close(logits, full, atol=1e-5, rtol=0)
    site = "blocks.{}.mlp.out"
    kick = torch.randn(h.info("embed").unit_shape[0], generator=torch.Generator().manual_seed(2))
    for layer in range(h.n_layers):
        for t in (0, 4, T - 1):
            with torch.no_grad():
                out = h.resume(past.upto(t), resid[f"blocks.{layer}.resid_pre"][:, t:], layer)
            torch.testing.assert_close(out, full[:, -1], atol=1e-5, rtol=0)
            for stop in range(layer + 1, h.n_layers + 1):  # the residual leaving block stop-1
                with torch.no_grad():
                    mid = h.resume(past.upto(t), resid[f"blocks.{layer}.resid_pre"][:, t:],
                                   layer, stop=stop)
                torch.testing.assert_close(mid, after[stop - 1][:, t:], atol=1e-5, rtol=0)

            # a patch at position t of this block's MLP output, rows 0 and 2 only
            def bump(x, s, t0=None):
                x = x.clone()
                x[[0, 2], 0 if t0 is None else t0] += kick[:x.shape[-1]]
                return x

            want = _full(h, tokens, {site.format(layer): lambda x, s, t=t: bump(x, s, t)})
            with torch.no_grad():
                got = h.resume(past[[0, 1, 2]].upto(t),
                               resid[f"blocks.{layer}.resid_pre"][:, t:], layer,
                               {site.format(layer): bump})
            torch.testing.assert_close(got, want[:, -1], atol=1e-5, rtol=0)
            if layer < h.n_layers - 1 or t == T - 1:  # else nothing reads the patch
                assert not torch.allclose(want[[0, 2], -1], full[[0, 2], -1], atol=1e-4)
    assert h.hook_count() == 0
    if not hasattr(h, "cfg"):  # HF: nnsight's reads (run_with_cache) still work after resume
        sites = [f"blocks.{L}.resid_post" for L in range(h.n_layers)]
        got = h.run_with_cache(tokens, sites)
        for s in sites:
            torch.testing.assert_close(got[s], resid[last] if s == last else
                                       resid[f"blocks.{int(s.split('.')[1]) + 1}.resid_pre"],
                                       atol=1e-5, rtol=0)
        with torch.no_grad():
            out = h.resume(past.upto(3), resid[f"blocks.{h.n_layers - 1}.resid_pre"][:, 3:],
                           h.n_layers - 1)
        torch.testing.assert_close(out, full[:, -1], atol=1e-5, rtol=0)
        assert torch.allclose(h.run_with_cache(tokens, sites[:1])[sites[0]],
                              got[sites[0]], atol=1e-6)


def test_resume_refuses_what_it_cannot_run(handle):
    h = handle
    tokens = TOKENS[:1] % h.d_vocab
    with torch.no_grad():
        _, past = h.kv_run(tokens)
    resid = torch.zeros(1, 2, h.info("embed").unit_shape[0])
    with pytest.raises(ValueError, match="would never run"):
        h.resume(past.upto(7), resid, 1, {"blocks.0.mlp.out": lambda x, s: x})
    with pytest.raises(ValueError, match="layer must be"):
        h.resume(past.upto(7), resid, h.n_layers)
    with pytest.raises(ValueError, match="stop must be"):
        h.resume(past.upto(7), resid, 1, stop=1)
    with pytest.raises(ValueError, match="would never run"):
        h.resume(past.upto(7), resid, 0, {"blocks.1.mlp.out": lambda x, s: x}, stop=1)
    with pytest.raises(ValueError, match="resid has shape"):
        h.resume(past.upto(7), resid[0], 0)
