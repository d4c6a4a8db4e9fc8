"""The Hugging Face backend (excise.hf) on tiny random models built from configs (no download),
and Gemma 3 270M end to end (slow; needs the ``gemma`` extra)."""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import (AutoModelForCausalLM, Gemma3TextConfig, GPT2Config,  # noqa: E402
                          GPTNeoXConfig, LlamaConfig, OPTConfig, PreTrainedTokenizerFast)

from excise.hf import HFHandle  # noqa: E402
from probes import knowledge, screen_known  # noqa: E402
from excise.request import ForgetRequest  # noqa: E402
from excise.request import Fact  # noqa: E402

WORDS = ["<pad>", "<bos>", "<unk>"] + [f"s{i}" for i in range(12)] + \
    [f"a{i}" for i in range(12)] + "the is of".split()
V = len(WORDS)
SMALL = dict(bos_token_id=1, eos_token_id=1, pad_token_id=0)


def word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", pad_token="<pad>",
                                   unk_token="<unk>")


CONFIGS = {
    "gpt2": lambda: GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=V, n_positions=32,
                               **SMALL),
    "gpt_neox": lambda: GPTNeoXConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                                      intermediate_size=64, vocab_size=V,
                                      max_position_embeddings=32, **SMALL),
    "llama": lambda: LlamaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                                 num_key_value_heads=2, intermediate_size=64, vocab_size=V,
                                 max_position_embeddings=32, **SMALL),
    "gemma3": lambda: Gemma3TextConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                                       num_key_value_heads=1, head_dim=8, intermediate_size=64,
                                       vocab_size=V, max_position_embeddings=32, **SMALL),
}


def tiny(kind: str, seed: int = 0) -> HFHandle:
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_config(CONFIGS[kind]())
    return HFHandle(model, word_tokenizer(), name=f"tiny-{kind}")


def tiny_request():
    facts = lambda ids: [(f"the s{i} is", f"a{i}") for i in ids]  # noqa: E731
    return ForgetRequest.from_lists(forget=facts(range(3)), retain=facts(range(3, 12)),
                                    general=["s1 is the a2 of s3", "the s4 of s5 is a6"])


TOKENS = torch.randint(3, V, (3, 9), generator=torch.Generator().manual_seed(0))

# ---------------------------------------------------------------- logits equal raw HF


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_logits_equal_raw_hf(kind):
    h = tiny(kind)
    raw = h.model(TOKENS).logits
    assert torch.equal(h.logits(TOKENS), raw)
    # reading activations through nnsight leaves the model untouched
    h.run_with_cache(TOKENS, ["blocks.1.resid_post"])
    assert torch.equal(h.logits(TOKENS), raw)
    assert h.hook_count() == 0


# ---------------------------------------------------------------- site tables (pinned)

BLOCK_ACTS = ["blocks.0.resid_pre", "blocks.0.attn.z", "blocks.0.attn.out", "blocks.0.mlp.pre",
              "blocks.0.mlp.post", "blocks.0.mlp.out", "blocks.0.resid_post"]
PINNED_PARAMS = {
    "gpt2": {"embed.W_E": "transformer.wte.weight", "pos_embed.W_pos": "transformer.wpe.weight",
             "blocks.0.ln1.w": "transformer.h.0.ln_1.weight",
             "blocks.0.ln1.b": "transformer.h.0.ln_1.bias",
             "blocks.0.attn.W_QKV": "transformer.h.0.attn.c_attn.weight",
             "blocks.0.attn.b_QKV": "transformer.h.0.attn.c_attn.bias",
             "blocks.0.attn.W_O": "transformer.h.0.attn.c_proj.weight",
             "blocks.0.attn.b_O": "transformer.h.0.attn.c_proj.bias",
             "blocks.0.ln2.w": "transformer.h.0.ln_2.weight",
             "blocks.0.ln2.b": "transformer.h.0.ln_2.bias",
             "blocks.0.mlp.W_in": "transformer.h.0.mlp.c_fc.weight",
             "blocks.0.mlp.b_in": "transformer.h.0.mlp.c_fc.bias",
             "blocks.0.mlp.W_out": "transformer.h.0.mlp.c_proj.weight",
             "blocks.0.mlp.b_out": "transformer.h.0.mlp.c_proj.bias",
             "ln_final.w": "transformer.ln_f.weight", "ln_final.b": "transformer.ln_f.bias"},
    "gpt_neox": {"embed.W_E": "gpt_neox.embed_in.weight",
                 "blocks.0.ln1.w": "gpt_neox.layers.0.input_layernorm.weight",
                 "blocks.0.ln1.b": "gpt_neox.layers.0.input_layernorm.bias",
                 "blocks.0.ln2.w": "gpt_neox.layers.0.post_attention_layernorm.weight",
                 "blocks.0.ln2.b": "gpt_neox.layers.0.post_attention_layernorm.bias",
                 "blocks.0.attn.W_QKV": "gpt_neox.layers.0.attention.query_key_value.weight",
                 "blocks.0.attn.b_QKV": "gpt_neox.layers.0.attention.query_key_value.bias",
                 "blocks.0.attn.W_O": "gpt_neox.layers.0.attention.dense.weight",
                 "blocks.0.attn.b_O": "gpt_neox.layers.0.attention.dense.bias",
                 "blocks.0.mlp.W_in": "gpt_neox.layers.0.mlp.dense_h_to_4h.weight",
                 "blocks.0.mlp.b_in": "gpt_neox.layers.0.mlp.dense_h_to_4h.bias",
                 "blocks.0.mlp.W_out": "gpt_neox.layers.0.mlp.dense_4h_to_h.weight",
                 "blocks.0.mlp.b_out": "gpt_neox.layers.0.mlp.dense_4h_to_h.bias",
                 "ln_final.w": "gpt_neox.final_layer_norm.weight",
                 "ln_final.b": "gpt_neox.final_layer_norm.bias", "unembed.W_U": "lm_head.weight"},
    "llama": {"embed.W_E": "model.embed_tokens.weight",
              "blocks.0.attn.W_Q": "model.layers.0.self_attn.q_proj.weight",
              "blocks.0.attn.W_K": "model.layers.0.self_attn.k_proj.weight",
              "blocks.0.attn.W_V": "model.layers.0.self_attn.v_proj.weight",
              "blocks.0.attn.W_O": "model.layers.0.self_attn.o_proj.weight",
              "blocks.0.mlp.W_gate": "model.layers.0.mlp.gate_proj.weight",
              "blocks.0.mlp.W_in": "model.layers.0.mlp.up_proj.weight",
              "blocks.0.mlp.W_out": "model.layers.0.mlp.down_proj.weight",
              "blocks.0.ln1.w": "model.layers.0.input_layernorm.weight",
              "blocks.0.ln2.w": "model.layers.0.post_attention_layernorm.weight",
              "ln_final.w": "model.norm.weight", "unembed.W_U": "lm_head.weight"},
    "gemma3": {"embed.W_E": "model.embed_tokens.weight",
               "blocks.0.attn.W_Q": "model.layers.0.self_attn.q_proj.weight",
               "blocks.0.attn.W_K": "model.layers.0.self_attn.k_proj.weight",
               "blocks.0.attn.W_V": "model.layers.0.self_attn.v_proj.weight",
               "blocks.0.attn.W_O": "model.layers.0.self_attn.o_proj.weight",
               "blocks.0.attn.q_norm.w": "model.layers.0.self_attn.q_norm.weight",
               "blocks.0.attn.k_norm.w": "model.layers.0.self_attn.k_norm.weight",
               "blocks.0.mlp.W_gate": "model.layers.0.mlp.gate_proj.weight",
               "blocks.0.mlp.W_in": "model.layers.0.mlp.up_proj.weight",
               "blocks.0.mlp.W_out": "model.layers.0.mlp.down_proj.weight",
               "blocks.0.ln1.w": "model.layers.0.input_layernorm.weight",
               "blocks.0.ln1_post.w": "model.layers.0.post_attention_layernorm.weight",
               "blocks.0.ln2.w": "model.layers.0.pre_feedforward_layernorm.weight",
               "blocks.0.ln2_post.w": "model.layers.0.post_feedforward_layernorm.weight",
               "ln_final.w": "model.norm.weight"},  # unembedding tied to embed.W_E
}
PINNED_MODULES = {
    "gpt2": {"blocks.0.attn.z": "transformer.h.0.attn.c_proj:input",
             "blocks.0.mlp.post": "transformer.h.0.mlp.act:output",
             "blocks.0.mlp.out": "transformer.h.0.mlp:output"},
    "gpt_neox": {"blocks.0.attn.z": "gpt_neox.layers.0.attention.dense:input",
                 "blocks.0.mlp.post": "gpt_neox.layers.0.mlp.act:output"},
    "llama": {"blocks.0.attn.z": "model.layers.0.self_attn.o_proj:input",
              "blocks.0.mlp.post": "model.layers.0.mlp.down_proj:input",
              "blocks.0.attn.out": "model.layers.0.self_attn:output",
              "blocks.0.mlp.out": "model.layers.0.mlp:output"},
    "gemma3": {"blocks.0.mlp.post": "model.layers.0.mlp.down_proj:input",
               "blocks.0.attn.out": "model.layers.0.post_attention_layernorm:output",
               "blocks.0.mlp.out": "model.layers.0.post_feedforward_layernorm:output"},
}


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_target_only_logprobs_equal_full_logits(kind):
    """HFHandle.token_logprobs unembeds only the target positions; the reference is the base
    class's full-logit path. Same values and same parameter gradients, with and without a hook,
    for fact batches (targets at different positions per row) and text batches."""
    from excise.handle import ModelHandle

    h = tiny(kind)
    from excise.request import Fact

    facts = h.encode([Fact("the s0 is", "a0"), Fact("the s1 of the s2 is", "a3 a4"),
                      Fact("s5 is", "a5")])
    first = facts.target_mask.float().argmax(1)
    assert first.unique().numel() == 3  # targets sit at different positions in each row
    text = h.encode_texts(["s1 is the a2 of s3 s4", "the s4 of s5"])
    hook = {"blocks.0.mlp.post": lambda a, site: a * 0.5}
    w = h.parameter("blocks.1.mlp.W_out")
    for batch in (facts, text):
        for hooks in (None, hook):
            fast = h.token_logprobs(batch, hooks)
            ref = ModelHandle.token_logprobs(h, batch, hooks)
            assert fast.shape == ref.shape
            torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-6)
            g_fast = torch.autograd.grad(fast.sum(), w)[0]
            g_ref = torch.autograd.grad(ref.sum(), w)[0]
            torch.testing.assert_close(g_fast, g_ref, rtol=1e-4, atol=1e-7)
    assert h.hook_count() == 0


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_sites_resolve_pinned(kind):
    h = tiny(kind)
    table = h.site_table()
    assert h.sites("blocks.0.*", kind="activation") == BLOCK_ACTS
    assert "embed" in table and "blocks.1.resid_post" in table
    params = {s: i.target for s, i in table.items() if i.kind == "param"
              and (i.layer in (None, 0))}
    assert params == PINNED_PARAMS[kind]
    hf_params = {n for n, _ in h.model.named_parameters()}
    assert {i.target for i in table.values() if i.kind == "param"} == hf_params  # all covered
    for site, target in PINNED_MODULES[kind].items():
        assert table[site].target == target
    H = 4
    assert table["blocks.0.attn.z"].unit_shape == (H,)
    for site, p in h.named_parameters().items():
        assert tuple(p.shape) == table[site].unit_shape


def test_hf_layout_documented_by_unit_axis():
    h = tiny("llama")
    # nn.Linear is [out, in]: down_proj is [d_model, d_mlp], neurons on axis 1
    assert tuple(h.parameter("blocks.0.mlp.W_out").shape) == (32, 64)
    assert h.unit_axis("blocks.0.mlp.W_out") == ("blocks.0.mlp.post", 1)
    assert h.unit_axis("blocks.0.mlp.W_in") == ("blocks.0.mlp.post", 0)
    g = tiny("gpt2")  # Conv1D is [in, out]
    assert g.unit_axis("blocks.0.mlp.W_out") == ("blocks.0.mlp.post", 0)


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_run_with_cache_matches_torch_hooks(kind):
    h = tiny(kind)
    sites = h.sites("blocks.*", kind="activation") + ["embed"]
    cache = h.run_with_cache(TOKENS, list(reversed(sites)))  # any order in, nnsight reads in order
    seen = {}
    h.logits(TOKENS, {s: (lambda a, s: seen.__setitem__(s, a.detach().clone())) for s in sites})
    for s in sites:
        torch.testing.assert_close(cache[s], seen[s], msg=s)
    assert cache["blocks.0.attn.z"].shape == (3, 9, 4, 8)
    with pytest.raises(ValueError, match="stop_at_layer is not supported"):
        h.run_with_cache(TOKENS, ["embed"], stop_at_layer=1)
    with pytest.raises(ValueError, match="is a param site"):
        h.run_with_cache(TOKENS, ["blocks.0.mlp.W_out"])


def test_hooks_patch_and_clean_up():
    h = tiny("llama")
    ref = h.logits(TOKENS)
    with h.hooks({"blocks.1.mlp.post": lambda a, s: a * 0}):
        assert h.hook_count() == 1
        assert not torch.allclose(h.logits(TOKENS), ref)
    assert h.hook_count() == 0
    with pytest.raises(RuntimeError, match="boom"):
        with h.hooks({"blocks.0.attn.z": lambda a, s: None}):
            raise RuntimeError("boom")
    assert h.hook_count() == 0
    handle = h.add_persistent_hook("blocks.0.attn.z", lambda a, s: a * 0)
    assert not torch.allclose(h.logits(TOKENS), ref)
    handle.remove()
    assert torch.equal(h.logits(TOKENS), ref)
    with pytest.raises(ValueError, match="returned shape"):
        h.logits(TOKENS, {"blocks.0.mlp.post": lambda a, s: a[..., :3]})
    with pytest.raises(ValueError, match="unknown site 'blocks.0.mlp.postt'"):
        h.logits(TOKENS, {"blocks.0.mlp.postt": lambda a, s: None})
    with pytest.raises(ValueError, match="is a parameter"):
        h.add_persistent_hook("blocks.0.mlp.W_out", lambda a, s: None)


def test_unsupported_architecture_lists_families():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_config(OPTConfig(num_hidden_layers=1, hidden_size=16,
                                                           ffn_dim=32, num_attention_heads=2,
                                                           vocab_size=V,
                                                           word_embed_proj_dim=16))
    with pytest.raises(ValueError, match=r"unsupported architecture OPTForCausalLM .*'opt'.*"
                                         r"gpt2: gpt2; gpt_neox: gpt_neox; llama: llama"):
        HFHandle(model)


# ---------------------------------------------------------------- encoding


def test_encode_marks_target_and_subject():
    h = tiny("llama")
    b = h.encode([Fact("the s1 is", "a1", subject="s1"), Fact("s2 is the a3 of", "s4 a5")])
    assert b.tokens[0].tolist()[:5] == [1, WORDS.index("the"), WORDS.index("s1"),
                                        WORDS.index("is"), WORDS.index("a1")]
    assert b.target_mask[0].tolist() == [False] * 4 + [True] + [False] * 3
    assert b.target_mask[1].tolist() == [False] * 6 + [True, True]
    assert b.subject_mask[0].tolist() == [False, False, True] + [False] * 5
    assert b.lengths.tolist() == [5, 8]
    assert len(h.tokenizer) == V and h.tokenizer.digest() == tiny("gpt2").tokenizer.digest()
    assert h.tokenizer.encode("the s1") == [WORDS.index("the"), WORDS.index("s1")]
    with pytest.raises(ValueError, match="has no tokenizer"):
        HFHandle(h.model).encode([Fact("the s1 is", "a1")])


def _bpe_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<bos>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(["the code is 42", "the code is 42 and 42"] * 50, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", pad_token="<pad>",
                                   unk_token="<unk>")


def test_target_split_differently_in_context_warns_or_raises():
    tok = _bpe_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(num_hidden_layers=1, hidden_size=16, num_attention_heads=2,
                      intermediate_size=32, vocab_size=len(tok), **SMALL)
    model = AutoModelForCausalLM.from_config(cfg)
    fact = Fact("the code is ", "42")  # trailing space: " 42" is one token in context
    with pytest.warns(UserWarning, match="splits prompt\\+target as"):
        HFHandle(model, tok).encode([fact])
    with pytest.raises(ValueError, match="the tokenizer splits prompt\\+target"):
        HFHandle(model, tok, on_split="raise").encode([fact])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        HFHandle(model, tok).encode([Fact("the code is", "42")])  # clean boundary: silent


def test_facts_the_model_does_not_know_are_reported_not_forgotten():
    h = tiny("llama")
    greedy = [WORDS[r["greedy_first"]] for r in knowledge(h, [Fact(f"the s{i} is", "a0")
                                                              for i in range(2)])]
    known = Fact("the s0 is", greedy[0])
    wrong = next(w for w in WORDS[3:] if w != greedy[1])
    req = ForgetRequest.from_lists(forget=[(known.prompt, known.target), ("the s1 is", wrong)],
                                   retain=[("the s5 is", "a5")])
    logs = []
    kept, report = screen_known(h, req, log=logs.append)
    assert [f.target for f in kept.forget] == [known.target]
    assert report["forget"][0]["prompt"] == "the s1 is"
    assert "not known before editing" in logs[0] and "nothing to forget" in logs[0]
    none = ForgetRequest.from_lists(forget=[("the s1 is", wrong)], retain=[("the s5 is", "a5")])
    with pytest.raises(ValueError, match="does not produce any of the 1 forget facts"):
        screen_known(h, none, log=logs.append)


# ---------------------------------------------------------------- locate / edit / probes


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_fisher_dampen_verify_run(kind):
    import edit
    import locate
    import probes

    h = tiny(kind)
    req = tiny_request()
    imp = locate.fisher(h, req)
    assert set(imp.scores) == set(h.sites(kind="param"))
    acts = locate.fisher(h, req, sites=["blocks.*.mlp.post", "blocks.*.attn.z"])
    assert acts.scores["blocks.1.mlp.post"].shape == (64 if kind == "llama" else 128,)
    assert acts.scores["blocks.0.attn.z"].shape == (4,)
    fp = h.fingerprint()
    before = probes.verify(h, req, label="before").metrics["before"]
    with edit.dampen(h, imp, alpha=2.0) as e:
        assert e.manifest["params_changed"] > 0 and h.fingerprint() != fp
        after = probes.verify(h, req, label="after").metrics["after"]
        assert set(after) == set(before) and math.isfinite(after["perplexity"])
        diff = e.diff
    assert h.fingerprint() == fp and h.hook_count() == 0
    # the saved diff re-applies to a fresh copy of the same weights
    e2 = diff.apply(h.clone())
    assert e2.handle.fingerprint() != fp


def test_fisher_per_example_estimator_is_transformerlens_only():
    """Per-example parameter gradients use torch.func on TransformerLens; other backends get a
    clear error pointing at estimator='batch'."""
    import locate

    with pytest.raises(ValueError, match="estimator='batch'"):
        locate.fisher(tiny("llama"), tiny_request(), estimator="example")


def test_config_model_section():
    from excise import config
    from excise.app import pipeline

    cfg = config.build({"model": {"name": "gemma3-270m"}, "request": {"jsonl": None}})
    assert cfg.model.name == "gemma3-270m"
    with pytest.raises(config.ConfigError, match="request.jsonl"):
        pipeline.forget_people(cfg)
    with pytest.raises(config.ConfigError, match="unknown key 'nmae'"):
        config.build({"model": {"nmae": "x"}})
    from excise.hf import load_model

    with pytest.raises(ValueError, match="unknown model 'gpt5'; choose one of"):
        load_model("gpt5")


# ---------------------------------------------------------------- Gemma 3 270M (slow)


def _gemma_or_skip():
    from excise import gemma

    ok, why = gemma.available()
    if not ok:
        pytest.skip(f"Gemma 3 270M test skipped: {why}")
    home = Path.home() / ".cache" / "excise" / gemma.NAME
    if "EXCISE_GEMMA_CACHE" not in os.environ and home.exists():
        os.environ["EXCISE_GEMMA_CACHE"] = str(home)  # reuse converted weights (conftest
        # points EXCISE_CACHE at a temporary folder)


@pytest.mark.slow
def test_gemma_forgets_facts(tmp_path):
    """configs/gemma-facts.yaml end to end through the pipeline (Fisher on the MLP weights; NPO
    on the top 2% of MLP neurons with a retain-fact term and a KL term on retain text). The run
    completes; every forget fact was screened as known (none reported "not known"); every
    forget fact's greedy answer changes and the target probability falls >= 10x (median); the
    held-out neighbors keep >= 80% of their recall, retain facts >= 80%, same-template
    neighbors >= 90%, and perplexity on held-out general text stays within 25% either way."""
    _gemma_or_skip()
    from edit import Diff
    from excise import config
    from excise.app import pipeline
    from excise.hf import load_model
    from excise.request import ForgetRequest

    root = Path(__file__).resolve().parent.parent
    cfg = config.load(root / "configs" / "gemma-facts.yaml", registries=pipeline.registries())
    res = pipeline.run(cfg, tmp_path / "run", progress=False, log=lambda s: None)
    m = res.report.metrics
    unknown = {r["target"] for r in res.report.extra["not_known"]["forget"]}
    assert unknown == set()  # every forget fact of the request was screened as known
    assert m["before"]["forget_recall"] == 1.0  # only facts the model knows are counted
    assert m["after"]["forget_recall"] <= 0.25
    h = load_model("gemma3-270m", log=lambda s: None)
    req, _ = screen_known(h, ForgetRequest.from_jsonl(root / cfg.request.jsonl),
                          log=lambda s: None)
    before = knowledge(h, req.forget)
    with Diff.load(tmp_path / "run" / "edit.safetensors").apply(h):
        after = knowledge(h, req.forget)
    drops = sorted(b["target_logprob"] - a["target_logprob"] for b, a in zip(before, after))
    assert all(a["greedy_first"] != b["greedy_first"] for a, b in zip(after, before))
    assert drops[len(drops) // 2] >= math.log(10)  # median drop >= 10x
    b, a = m["before"], m["after"]
    assert len(req.neighbors) >= 10 and b["neighbor_recall"] == 1.0
    assert a["neighbor_recall"] >= 0.8 * b["neighbor_recall"], (b, a)
    assert a["retain_recall"] >= 0.8 * b["retain_recall"], (b, a)
    assert 1 / 1.25 <= a["perplexity"] / b["perplexity"] <= 1.25, (b, a)
    # same-template neighbors (generated; the retain side's subjects are other ones):
    # measured 0.94 of 78 with same_template_retain on (the config's default)
    assert b["same_template_prompts"] >= 20 and a["same_template_recall"] >= 0.9, (b, a)
