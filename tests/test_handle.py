"""The model-handle protocol: the abstract base declares everything the stages use, the
TransformerLens and Hugging Face handles answer it alike, layout questions (quantization axes,
unit axes) go to the handle, and Importance.by_unit refuses to guess a layout."""

from __future__ import annotations

import warnings

import pytest
import torch

import edit
import locate
from excise.checks import check_compatible
from excise.handle import ModelHandle, TLHandle
from excise.importance import Importance
from probes import attacks as A

# the members every backend must provide (everything else lives once in the base)
ABSTRACT = {"site_table", "_attach", "_forward", "run_with_cache", "functional_loss", "readout",
            "clone", "unit_axis", "unit_out_weights", "site_writers", "quant_axes", "kv_run",
            "_resume"}


def _handle_class(missing: str):
    body = {name: (lambda self, *a, **k: None) for name in ABSTRACT - {missing}}
    return type(f"Without_{missing}", (ModelHandle,), body)


def test_base_declares_the_backend_members():
    assert ModelHandle.__abstractmethods__ == ABSTRACT


@pytest.mark.parametrize("member", sorted(ABSTRACT))
def test_handle_missing_a_member_cannot_be_instantiated(member):
    with pytest.raises(TypeError, match=member):
        _handle_class(member)(torch.nn.Linear(2, 2), None, "x")


def test_complete_handle_gets_the_shared_parts_from_the_base():
    h = _handle_class("")(torch.nn.Linear(2, 2), None, "x")
    assert h.edit_stack == [] and h.hook_count() == 0 and h.name == "x"


def test_edit_stack_is_created_by_the_base(planted):
    h = planted.handle
    assert h.edit_stack == []
    e = edit.prune(h, units=locate.fisher(h, planted.request, [planted.site]).top(1))
    assert h.edit_stack == [e]
    assert h.clone().edit_stack == []  # a clone carries no edits
    e.revert()
    assert h.edit_stack == []


# -- TransformerLens and Hugging Face agree on the same weights --------------------------------
def _gpt2_pair():
    """The same random GPT-2 as an HFHandle and as a TLHandle (weights converted by
    TransformerLens' own GPT-2 conversion, nothing folded)."""
    transformers = pytest.importorskip("transformers")
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights

    from excise.hf import HFHandle

    torch.manual_seed(0)
    hf_cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=40,
                                     n_positions=16, attn_implementation="eager")
    hf = transformers.GPT2LMHeadModel(hf_cfg).eval()
    cfg = HookedTransformerConfig(n_layers=2, d_model=32, n_heads=4, d_head=8, d_mlp=128,
                                  d_vocab=40, n_ctx=16, act_fn="gelu_new",
                                  normalization_type="LN", eps=hf_cfg.layer_norm_epsilon,
                                  default_prepend_bos=False, device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tl = HookedTransformer(cfg)
    tl.load_state_dict(convert_gpt2_weights(hf, cfg), strict=False)
    return TLHandle(tl.eval(), None, "tl"), HFHandle(hf, None, "hf")


def test_tl_and_hf_handles_agree_on_n_layers_and_run_with_cache():
    tl, hf = _gpt2_pair()
    assert tl.n_layers == hf.n_layers == 2
    tokens = torch.randint(0, 40, (3, 7), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(tl.logits(tokens), hf.logits(tokens), atol=1e-4, rtol=1e-4)
    sites = ["embed", "blocks.0.resid_post", "blocks.1.mlp.post", "blocks.1.attn.z",
             "blocks.1.mlp.out", "blocks.1.resid_post"]
    a, b = tl.run_with_cache(tokens, sites), hf.run_with_cache(tokens, sites)
    assert set(a) == set(b) == set(sites)
    for s in sites:
        assert a[s].shape == b[s].shape, s
        torch.testing.assert_close(a[s], b[s], atol=1e-4, rtol=1e-4, msg=s)
    assert tl.d_vocab == hf.d_vocab == 40


# -- quantization asks the handle which axis to reduce over -------------------------------------
def _rtn_rows(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Plain per-row round-to-nearest: one scale per row (output channel)."""
    qmax = 2 ** (bits - 1) - 1
    out = torch.empty_like(w)
    for r in range(w.shape[0]):
        scale = (w[r].abs().max() / qmax).clamp(min=1e-12)
        out[r] = (w[r] / scale).round().clamp(-qmax, qmax) * scale
    return out


@pytest.mark.parametrize("kind", ["llama", "gpt_neox", "gpt2"])
def test_quantizer_reduces_over_the_input_axis_on_hf_weights(kind):
    pytest.importorskip("transformers")
    from test_hf import tiny

    h = tiny(kind)
    q = A.quantized(h, 4)
    conv1d = kind == "gpt2"  # Conv1D weights are [in, out]: the rows of w.T are the channels
    for site in ("blocks.0.mlp.W_in", "blocks.1.mlp.W_out", "blocks.0.attn.W_O"):
        w = h.parameter(site).detach()
        ref = _rtn_rows(w.T, 4).T if conv1d else _rtn_rows(w, 4)
        assert h.quant_axes(site) == ((0,) if conv1d else (1,))
        assert torch.equal(q.parameter(site).detach(), ref), site
    assert torch.equal(q.parameter("embed.W_E").detach(),
                       _rtn_rows(h.parameter("embed.W_E").detach(), 4))
    for site in h.sites(kind="param"):  # norms and biases are left alone
        if h.parameter(site).dim() < 2:
            assert h.quant_axes(site) is None
            assert torch.equal(q.parameter(site), h.parameter(site))


def test_transformerlens_quantization_is_the_old_rule(planted):
    """TransformerLens weights: per token row for W_E / W_pos, per entry of the last axis for
    every other W_* (the rule the attack used before it asked the handle)."""
    h = planted.handle
    for bits in (8, 4):
        q = A.quantized(h, bits)
        for name, p in h.named_parameters().items():
            last = name.split(".")[-1]
            w = p.detach()
            if w.dim() < 2 or not last.startswith("W_"):
                assert torch.equal(q.parameter(name), p), name
                continue
            dim = 0 if last in ("W_E", "W_pos") else w.dim() - 1
            flat = w.movedim(dim, 0).reshape(w.shape[dim], -1)
            ref = _rtn_rows(flat, bits).reshape(w.movedim(dim, 0).shape).movedim(0, dim)
            assert torch.equal(q.parameter(name).detach(), ref), name


# -- by_unit never guesses a layout ------------------------------------------------------------
def test_by_unit_without_unit_axes_refuses():
    imp = Importance("x", {"blocks.0.mlp.W_in": torch.rand(4, 8),
                           "blocks.0.mlp.post": torch.rand(8)})
    with pytest.raises(ValueError, match=r"'blocks.0.mlp.W_in'.*unit_axes"):
        imp.by_unit()
    # activation sites alone need no layout
    act = Importance("x", {"blocks.0.mlp.post": torch.rand(8)})
    assert torch.equal(act.by_unit().scores["blocks.0.mlp.post"], act.scores["blocks.0.mlp.post"])
    # with the layout recorded: neuron j sums column j of a [d_model, d_mlp] W_in
    w = torch.rand(4, 8)
    ok = Importance("x", {"blocks.0.mlp.W_in": w},
                    {"unit_axes": {"blocks.0.mlp.W_in": ["blocks.0.mlp.post", 1]}})
    torch.testing.assert_close(ok.by_unit().scores["blocks.0.mlp.post"], w.sum(0))


def test_parameter_scoring_methods_record_unit_axes(planted):
    h, req = planted.handle, planted.request
    params = h.sites("blocks.*.mlp.*", kind="param")
    for imp in (locate.fisher(h, req, params), locate.grad_ratio(h, req, params)):
        assert set(imp.meta["unit_axes"]) == set(params), imp.method
        imp.by_unit()  # no refusal


# -- compatibility is asked of the handle ------------------------------------------------------
def test_compatible_models_compare_their_vocabulary_through_the_handle():
    pytest.importorskip("transformers")
    from transformers import AutoModelForCausalLM

    from excise.hf import HFHandle
    from test_hf import CONFIGS, tiny, word_tokenizer

    a = tiny("llama")
    cfg = CONFIGS["llama"]()
    cfg.vocab_size += 8  # same tokenizer, wider unembedding
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        b = HFHandle(AutoModelForCausalLM.from_config(cfg), word_tokenizer(), name="wide")
    check_compatible(a, tiny("llama", seed=1), "oracle")
    with pytest.raises(ValueError, match=f"d_vocab={cfg.vocab_size}"):
        check_compatible(a, b, "oracle")
