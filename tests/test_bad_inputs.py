"""Bad inputs, faults and races (issue 19): each is refused with a clear error, or flagged, never
a normal-looking wrong result.

``CLI_CASES`` is the table of command-line refusals: ``(argv, exit code, text the error line
must contain)``. ``{tmp}`` in an argument is a fresh folder holding the files of ``FILES``.
A refusal prints one ``error:`` line on stderr (no traceback) and exits with the code.
The Python-API cases follow as tests grouped by case.
"""

from __future__ import annotations

import json
import re
import struct
import time

import pytest
import torch
from typer.testing import CliRunner

import edit
import locate
import probes
from excise.app.cli import app
from excise.edits import Diff
from excise.importance import Importance
from excise.io import NotSafetensorsError, load_safetensors, save_safetensors
from excise.request import Fact, ForgetRequest
from excise.sites import Selection, Unit
from conftest import make_planted
from test_cache import tampered_diff_bytes

# a safetensors header that promises 16 bytes of data the file does not hold (a cut copy)
_HEADER = json.dumps({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).encode()
_TRUNCATED = struct.pack("<Q", len(_HEADER)) + _HEADER + b"\x00" * 4

# files written under {tmp} before each CLI case: relative path -> content
FILES: dict[str, str | bytes] = {
    "truncated-run/config.yaml": "organism: {preset: tiny}\nrequest: {forget_people: 3}\n",
    "truncated-run/edit.safetensors": _TRUNCATED,
    "pickle-run/config.yaml": "organism: {preset: tiny}\nrequest: {forget_people: 3}\n",
    "pickle-run/edit.safetensors": b"\x80\x04\x95\x00\x00\x00\x00\x00\x00\x00\x00}\x94.",
    # a diff with one byte of a new value flipped after it was saved (F)
    "tampered-run/config.yaml": "organism: {preset: tiny}\nrequest: {forget_people: 3}\n",
    "tampered-run/edit.safetensors": tampered_diff_bytes(),
    # request files (CONFIG_CASES)
    "requests/whitespace.jsonl": '{"split": "forget", "prompt": "the pet of alba is", '
                                 '"target": "cat"}\n{"split": "retain", "prompt": '
                                 '"the  pet of alba is ", "target": " cat"}\n',
    "requests/latin1.jsonl": '{"split": "forget", "prompt": "a b", "target": "c"}\n'
                             '{"split": "retain", "prompt": "caf\u00e9 is", '
                             '"target": "open"}\n'.encode("latin-1"),
    "requests/list-row.jsonl": '{"split": "forget", "prompt": "a b", "target": "c"}\n'
                               '["retain", "d e", "f"]\n',
    "requests/general.jsonl": '{"split": "forget", "prompt": "a b", "target": "c"}\n'
                              '{"split": "retain", "prompt": "d e", "target": "f"}\n'
                              '{"split": "general"}\n',
    # configs and --out folders (E): not a mapping, a file in the way, someone's project, a run
    # of an earlier excise (no run.json), a run excise wrote (a valid manifest)
    "configs/list.yaml": "- organism\n- edit\n",
    "configs/string.yaml": "just a string\n",
    "a-file": "a file, not a folder\n",
    "project/config.yaml": "my: project\n",
    "project/notes.md": "# notes\n",
    "project/data/important.txt": b"\x00\x01 irreplaceable",
    "old-run/metrics.json": "{}\n",
    "old-run/report.md": "# an old run\n",
    "other-run/run.json": json.dumps({"format": "excise.run/1", "kind": "run", "id": "0" * 32,
                                      "complete": True, "files": {}, "dirs": []}),
}

_TINY = ["run", "--set", "organism.preset=tiny", "--set", "request.forget_people=3",
         "--set", "verify.oracle=false", "--set", "verify.suite=behaviour", "--quiet", "--out",
         "{tmp}/run"]

# a config refused when it is loaded, before any model is built or trained (every row of this
# table is also run with model building disabled: test_config_refusals_come_before_any_model)
_CFG = ["run", "--quiet", "--out", "{tmp}/run", "--set", "organism.preset=tiny", "--set",
        "request.forget_people=3", "--set", "verify.suite=behaviour"]
_REQ = _CFG + ["--set", "request.jsonl={tmp}/requests/"]
CONFIG_CASES = [
    # wrong types, unknown verify settings, suite and method typos (with "did you mean")
    (_CFG + ["--set", "edit.alpha=banana"], 2,
     "edit.distill: alpha='banana' is not a number (alpha: float, default 0.5)"),
    (_CFG + ["--set", "locate.batch_size=2.5"], 2,
     "locate.grad_ratio: batch_size=2.5 is not an integer"),
    (_CFG + ["--set", "verify.bogus=1"], 2, "verify: unknown key 'bogus'"),
    (_CFG + ["--set", "verify.margin=wide"], 2, "verify: margin='wide' is not a number"),
    (_CFG + ["--set", "verify.suite=behavior"], 2,
     "verify.suite: unknown suite 'behavior'; did you mean 'behaviour'?"),
    (_CFG + ["--set", "verify.suite=[behaviour, atacks]"], 2,
     "unknown suite 'atacks'; did you mean 'attacks'?"),
    (_CFG + ["--set", "verify.suite=attacks", "--set", "verify.attacks=[relern]"], 2,
     "verify: unknown attack 'relern'; choose from"),
    (_CFG + ["--set", "verify.suite=all", "--set", "verify.oracle=false"], 2,
     "runs ['oracle'], which need the retrain oracle, but verify.oracle is false"),
    (_CFG + ["--set", "edit.method=dampn"], 2,
     "unknown method 'dampn'; choose one of ['dampen', 'distill', 'finetune', 'noise', "
     "'project', 'prune', 'reinit']; did you mean 'dampen'?"),
    (_CFG + ["--set", "locate.method=fishr"], 2, "did you mean 'fisher'?"),
    (_CFG + ["--threads", "0"], 2, "threads=0: the torch threads to run at must be an "
     "integer >= 1"),
    (_CFG + ["--set", "select.top=0"], 2, "select.top=0: a count must be >= 1"),
    (_CFG + ["--set", "model.on_split=maybe"], 2, "model.on_split='maybe': choose one of"),
    # the request: people that are not integers, attributes given as a string
    (_CFG + ["--set", "request.forget_people=[1.7]"], 2,
     "request.forget_people=[1.7] is not a list of integers (found 1.7)"),
    (_CFG + ["--set", "request.forget_people=[true]"], 2,
     "request.forget_people=[True] is not a list of integers"),
    (_CFG + ["--set", "request.attributes=pet"], 2,
     "request.attributes='pet' is a string, not a list of attribute names; give a list, e.g. "
     "['pet'] (choose from ['birth_city', 'occupation', 'employer', 'pet', 'account'])"),
    (_CFG + ["--set", "request.attributes=[pett]"], 2,
     "unknown attributes ['pett'] in request.attributes; did you mean 'pet'?"),
    # request files: facts that differ only in whitespace, bad lines named by file:line
    (_REQ[:-1] + [_REQ[-1] + "whitespace.jsonl"], 2,
     "forget and retain overlap in 1 fact(s), e.g. 'the pet of alba is' -> 'cat' (retain: "
     "'the  pet of alba is ' -> ' cat'; they differ only in whitespace"),
    (_REQ[:-1] + [_REQ[-1] + "latin1.jsonl"], 2,
     "latin1.jsonl:2: not UTF-8 text (byte 0xe9 at column"),
    (_REQ[:-1] + [_REQ[-1] + "list-row.jsonl"], 2,
     "list-row.jsonl:2: expected a JSON object such as"),
    (_REQ[:-1] + [_REQ[-1] + "general.jsonl"], 2,
     "general.jsonl:3: a 'general' row needs a non-empty 'text' string"),
]

CLI_CASES = [
    # a truncated or non-safetensors file: named, and what was expected
    (["verify", "{tmp}/truncated-run", "--quiet"], 2,
     "truncated-run/edit.safetensors is not a readable safetensors file"),
    (["verify", "{tmp}/pickle-run", "--quiet"], 2, "expected a safetensors file"),
    # a diff changed after it was saved: its checksum names the file (F; a diff re-saved with
    # changed values is refused by fingerprint_after: test_edit.py)
    (["verify", "{tmp}/tampered-run", "--quiet"], 2,
     "tampered-run/edit.safetensors: its tensors do not match the checksum recorded when it "
     "was saved"),
    # excise verify --suite: a typo is refused before any model is built (or the diff read)
    (["verify", "{tmp}/truncated-run", "--suite", "behaviour,atacks", "--quiet"], 2,
     "unknown verification suite 'atacks'; did you mean 'attacks'?"),
    # a layer out of range says how many layers the model has
    (_TINY + ["--set", "locate.method=activations", "--set", "locate.sites=blocks.9.mlp.post"],
     2, "layer 9 is out of range; the model has 2 layers, blocks 0..1"),
    # batch_size <= 0 in locate
    (_TINY + ["--set", "locate.batch_size=0"], 2, "batch_size=0 is out of range"),
    # top larger than the number of units
    (_TINY + ["--set", "locate.method=activations", "--set", "select.top=100000"], 2,
     "top(k=100000): Importance('activations') has only"),
    # configs and request files refused at load time (G)
    *CONFIG_CASES,
    # a config that is not a mapping, or a folder (E)
    (["run", "{tmp}/configs/list.yaml", "--out", "{tmp}/run"], 2,
     "configs/list.yaml holds a list, not a mapping of stages"),
    (["run", "{tmp}/configs/string.yaml", "--out", "{tmp}/run"], 2,
     "configs/string.yaml holds a string, not a mapping of stages"),
    (["run", "{tmp}/configs", "--out", "{tmp}/run"], 2,
     "configs is a folder; expected a YAML config file"),
    (["verify", "{tmp}/truncated-run", "--config", "{tmp}/configs"], 2,
     "configs is a folder; expected a YAML config file"),
    # an --out excise may not write: a file in the way, a path under a file, a folder that is
    # not a run (even with --overwrite), a run of an earlier excise, a run without --overwrite
    (_TINY[:-1] + ["{tmp}/a-file"], 2, "exists and is not a folder (a file is in the way)"),
    (_TINY[:-1] + ["{tmp}/a-file/run"], 2, "a-file is a file, not a folder; give a path in a"),
    (_TINY[:-1] + ["{tmp}/project"], 2,
     "project is a non-empty folder that is not an excise run (it has no run.json)"),
    (_TINY[:-1] + ["{tmp}/project", "--overwrite"], 2,
     "project is a non-empty folder that is not an excise run (it has no run.json)"),
    (_TINY[:-1] + ["{tmp}/old-run", "--overwrite"], 2,
     "old-run looks like a run written by an earlier excise"),
    (_TINY[:-1] + ["{tmp}/other-run"], 2,
     "other-run already holds a run; choose another folder or pass --overwrite"),
    # excise verify: never into the run it verifies, nor another run
    (["verify", "{tmp}/truncated-run", "--out", "{tmp}/truncated-run", "--overwrite"], 2,
     "truncated-run is the run being verified"),
    (["verify", "{tmp}/truncated-run", "--out", "{tmp}", "--overwrite"], 2,
     "holds the run being verified"),
    (["verify", "{tmp}/truncated-run", "--out", "{tmp}/other-run"], 2,
     "other-run already holds a run; choose another folder"),
    (["verify", "{tmp}/truncated-run", "--out", "{tmp}/other-run", "--overwrite"], 2,
     "holds a run; --overwrite replaces a run only with another one, not with a verify report"),
    (["verify", "{tmp}/truncated-run", "--out", "{tmp}/project", "--overwrite"], 2,
     "project is a non-empty folder that is not an excise run"),
    (["verify", "{tmp}/truncated-run", "--out", "{tmp}/a-file"], 2,
     "exists and is not a folder"),
]


@pytest.mark.parametrize("argv, code, text", CLI_CASES,
                         ids=[" ".join(a[:1] + a[-2:]) for a, _, _ in CLI_CASES])
def test_cli_refusal(tmp_path, tiny, argv, code, text):
    for rel, content in FILES.items():
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(content if isinstance(content, bytes) else content.encode())
    args = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == code, r.output
    assert "Traceback" not in r.output
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and text in errors[0], r.stderr
    assert r.stderr.rstrip().splitlines()[-1] == errors[0]
    for rel, content in FILES.items():  # nothing lost: every input is byte-identical
        data = content if isinstance(content, bytes) else content.encode()
        assert (tmp_path / rel).read_bytes() == data, rel


# ---------------------------------------------------- an Importance from one model edits another
def _other_planted():
    return make_planted(seed=1)


EDIT_CALLS = {  # method -> extra keyword arguments for a cheap call
    "prune": {"top": 1},
    "dampen": {},
    "noise": {"top": 3},
    "project": {"top": 1, "sites": "blocks.1.mlp.out"},
    "finetune": {"top": 1, "steps": 1},
}


def _call(method, model, imp, request):
    kw = dict(EDIT_CALLS[method])
    if method in ("project", "finetune"):
        kw["request"] = request
    return edit.METHODS[method](model, imp, **kw)


@pytest.mark.parametrize("method", sorted(EDIT_CALLS))
def test_importance_of_another_model_is_refused(planted, method):
    imp = locate.fisher(planted.handle, planted.request)
    other = _other_planted()
    before = other.handle.fingerprint()
    with pytest.raises(ValueError) as e:
        _call(method, other.handle, imp, other.request)
    msg = str(e.value)
    assert f"computed on a model with fingerprint {imp.meta['model']}" in msg, msg
    assert f"has fingerprint {before}" in msg and "Locate again on this model" in msg
    assert other.handle.fingerprint() == before and not other.handle.edit_stack
    # on its own model (or a clone of it) the same call works
    with _call(method, planted.handle.clone(), imp, planted.request):
        pass


def test_importance_checks_allow_chains_and_sequential(planted):
    h, req = planted.handle, planted.request
    imp0 = locate.fisher(h, req)
    # stacked edits from one Importance (noise then finetune, as GRIN): imp0 describes the
    # weights before the first edit, which are in this model's history
    e1 = edit.noise(h, imp0, top=3)
    e2 = edit.finetune(h, imp0, top=1, steps=1, request=req)
    # an Importance located on the edited model drives a further edit of it
    imp1 = locate.fisher(h, req)
    assert imp1.meta["model"] != imp0.meta["model"]
    e3 = edit.dampen(h, imp1)
    for e in (e3, e2, e1):
        e.revert()
    # back on the original weights, an Importance of the edited weights describes other ones
    with pytest.raises(ValueError, match="computed on a model with fingerprint"):
        edit.dampen(h, imp1)
    # sequential requests locate on the current weights each time
    forget2 = ForgetRequest.from_lists(forget=[("s3", "a3")], retain=[("s4", "a4")])
    steps = edit.sequential(h, [req, forget2], lambda m, r: locate.fisher(m, r), edit.dampen,
                            edit_params={"alpha": 1.0})
    assert [s.edit.state for s in steps] == ["applied", "applied"]
    for s in reversed(steps):
        s.edit.revert()
    # an Importance built by hand records no model: not checked
    hand = Importance("hand", {planted.site: torch.arange(16.0)})
    with edit.prune(h, hand, top=1):
        pass


# ---------------------------------------------------------------- a NaN in the model's weights
def _nan_model(h):
    h = h.clone()
    with torch.no_grad():
        h.model.blocks[1].mlp.W_in[0, 3] = float("nan")
        h.model.blocks[0].attn.W_Q[1, 2, 0] = float("inf")
    return h


NAN_TEXT = "blocks.1.mlp.W_in holds 1 NaN and 0 inf"


def test_check_finite_names_the_tensors(planted):
    planted.handle.check_finite()  # finite: silent
    h = _nan_model(planted.handle)
    with pytest.raises(ValueError) as e:
        h.check_finite("here")
    msg = str(e.value)
    assert msg.startswith("here: the weights of model 'planted' are not finite")
    assert NAN_TEXT in msg and "(first at [0, 3])" in msg
    assert "blocks.0.attn.W_Q holds 0 NaN and 1 inf" in msg
    # a sum that overflows is not a NaN: huge finite weights pass
    with torch.no_grad():
        planted.handle.model.blocks[0].mlp.W_in.fill_(3e38)
    planted.handle.check_finite()


@pytest.mark.parametrize("method", sorted(locate.METHODS))
def test_every_locate_method_refuses_a_nan_model(planted, method):
    h = _nan_model(planted.handle)
    with pytest.raises(ValueError, match=f"{method}: the weights of model .* are not finite.*"
                                         f"{NAN_TEXT}"):
        locate.METHODS[method](h, planted.request)
    with pytest.raises(ValueError, match=NAN_TEXT):
        locate.trace(h, planted.request.forget)


@pytest.mark.parametrize("method", sorted(EDIT_CALLS))
def test_every_edit_method_refuses_a_nan_model(planted, method):
    imp = locate.fisher(planted.handle, planted.request)
    h = _nan_model(planted.handle)
    before = h.fingerprint()
    with pytest.raises(ValueError, match=f"{method}: the weights .* not finite.*{NAN_TEXT}"):
        _call(method, h, imp, planted.request)
    assert h.fingerprint() == before and not h.edit_stack


def test_verify_refuses_a_nan_model_oracle_or_original(tiny, tiny_request):
    h, req = tiny.model, tiny_request
    bad = _nan_model(h)
    for kw in ({"model": bad}, {"model": h, "oracle": bad}, {"model": h, "original": bad}):
        args = {"model": h} | kw
        with pytest.raises(ValueError, match=f"verify: the weights .*{NAN_TEXT}"):
            probes.verify(args.pop("model"), req, **args)


def test_loading_an_organism_with_nan_weights_is_refused(tiny, monkeypatch):
    import importlib

    import excise

    io_mod = importlib.import_module("excise.io")  # the cache entry is read there

    real = io_mod.load_safetensors

    def poisoned(path):
        state = real(path)
        state["blocks.1.mlp.W_in"] = state["blocks.1.mlp.W_in"].clone()
        state["blocks.1.mlp.W_in"][0, 3] = float("nan")
        return state

    monkeypatch.setattr(io_mod, "load_safetensors", poisoned)
    with pytest.raises(ValueError, match=f"loading .*organism-tiny.*safetensors: the weights of "
                                         f"model 'organism-tiny' are not finite.*{NAN_TEXT}"):
        excise.organism("tiny", progress=False)


def test_loading_a_hugging_face_model_with_nan_weights_is_refused(tmp_path):
    transformers = pytest.importorskip("transformers")
    from excise.hf import load_model

    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=40, n_positions=16)
    model = transformers.GPT2LMHeadModel(cfg)
    with torch.no_grad():
        model.transformer.h[1].mlp.c_fc.weight[0, 3] = float("nan")
    model.save_pretrained(tmp_path / "m")
    _word_tokenizer().save_pretrained(tmp_path / "m")
    with pytest.raises(ValueError, match=f"loading {tmp_path / 'm'}: the weights .* not finite: "
                                         f"blocks.1.mlp.W_in holds 1 NaN"):
        load_model(path=str(tmp_path / "m"))


def _word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<bos>", "<unk>"] + [f"w{i}" for i in range(37)]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", pad_token="<pad>",
                                   unk_token="<unk>")


# ------------------------------------------------------- a truncated or non-safetensors file
@pytest.mark.parametrize("content, why", [
    (_TRUNCATED, "incomplete metadata"), (b"", "header too small"),
    (b"\x80\x04\x95 a pickle, not safetensors", "header too large"),
    (b"hello, I am a text file and not weights at all\n" * 3, "header too large"),
])
def test_unreadable_safetensors_files_are_named(tmp_path, content, why):
    path = tmp_path / "x.safetensors"
    path.write_bytes(content)
    for load in (load_safetensors, Importance.load, Diff.load):
        with pytest.raises(NotSafetensorsError) as e:
            load(path)
        msg = str(e.value)
        assert msg.startswith(f"{path} is not a readable safetensors file") and why in msg
        assert "expected a safetensors file" in msg
    # a truncated copy of a real file
    good = tmp_path / "good.safetensors"
    save_safetensors({"a": torch.ones(100)}, good)
    path.write_bytes(good.read_bytes()[:200])
    with pytest.raises(NotSafetensorsError, match="x.safetensors is not a readable"):
        load_safetensors(path)
    with pytest.raises(NotSafetensorsError, match="is a folder; expected a safetensors file"):
        load_safetensors(tmp_path)
    with pytest.raises(FileNotFoundError):
        load_safetensors(tmp_path / "missing.safetensors")
    # a safetensors file of another kind says which format it has and which was expected
    with pytest.raises(ValueError, match="its format is None, expected 'excise.importance/1'"):
        Importance.load(good)


# ---------------------------------------------------------------- batch_size <= 0 in locate
@pytest.mark.parametrize("method", sorted(locate.METHODS))
@pytest.mark.parametrize("bad", [0, -4, 2.5])
def test_locate_batch_size_must_be_positive(planted, method, bad):
    with pytest.raises(ValueError, match=f"{method}: batch_size={bad} is out of range; "
                                         f"batch_size must be an integer >= 1"):
        locate.METHODS[method](planted.handle, planted.request, batch_size=bad)
    with pytest.raises(ValueError, match="batch_size=0"):
        locate.trace(planted.handle, planted.request.forget, batch_size=0)


# ----------------------------------------------------------- top larger than the number of units
def test_top_larger_than_the_units_is_refused(planted):
    imp = locate.activations(planted.handle, planted.request)  # 2 layers x 16 neurons, 2 x 2 heads
    n = imp.n_units()
    assert len(imp.top(n)) == n  # all of them is fine
    for call in (lambda: imp.top(n + 1), lambda: imp.select(k=n + 1)):
        with pytest.raises(ValueError, match=rf"top\(k={n + 1}\): Importance\('activations'\) "
                                             rf"has only {n} units \(4 sites: .*ask for at most "
                                             rf"{n}, or a fraction"):
            call()
    with pytest.raises(ValueError, match=r"has only 16 units \(1 site: blocks.1.mlp.post \(16\)"):
        imp.top(17, sites="blocks.1.mlp.post")
    before = planted.handle.fingerprint()
    with pytest.raises(ValueError, match="has only"):
        edit.prune(planted.handle, imp, top=1000)
    assert planted.handle.fingerprint() == before


# ---------------------------------------------------- a layer out of range names the model's layers
def test_layer_out_of_range_says_how_many_layers(tiny, planted):
    with pytest.raises(ValueError, match=r"unknown site 'blocks.9.mlp.post': layer 9 is out of "
                                         r"range; the model has 2 layers, blocks 0..1 \(e.g. "
                                         r"'blocks.1.mlp.post'\)"):
        tiny.model.info("blocks.9.mlp.post")
    with pytest.raises(ValueError, match="matches no site of this model; the model has 2 "
                                         "layers, blocks 0..1"):
        tiny.model.sites("blocks.7.*")
    with pytest.raises(ValueError, match="layer 2 is out of range; the model has 2 layers"):
        locate.activations(planted.handle, planted.request, "blocks.2.mlp.post")
    with pytest.raises(ValueError, match="layer 5 is out of range; the model has 2 layers"):
        edit.prune(planted.handle, units=Selection((Unit("blocks.5.mlp.post", (0,)),)))
    # a misspelt site in a valid layer still gets "did you mean"
    with pytest.raises(ValueError, match="did you mean 'blocks.1.mlp.post'"):
        tiny.model.info("blocks.1.mlp.pots")


# ---------------------------------------------------- a fact longer than the model's context
def test_fact_longer_than_the_context_is_refused(tiny):
    h = tiny.model
    assert h.n_ctx == 32
    word = next(w for w in h.tokenizer.vocab if w.isalpha() and len(w) > 3)
    ok = Fact(" ".join([word] * 29), word)  # BOS + 29 + 1 = 31 tokens
    assert h.encode([ok]).tokens.shape[1] == 31
    edge = Fact(" ".join([word] * 30), word)  # 32 tokens: exactly the context
    assert h.encode([edge]).tokens.shape[1] == 32
    long = Fact(" ".join([word] * 31), word)
    start = re.escape(long.prompt[:40] + "...")
    with pytest.raises(ValueError, match=f"the fact '{start}' is 33 tokens long .* takes at "
                                         f"most 32 tokens \\(its context, n_ctx\\)"):
        h.encode([ok, long])
    with pytest.raises(ValueError, match="the text .* is 33 tokens long"):
        h.encode_texts([" ".join([word] * 32)])
    # a 10 MB prompt fails fast, before it is tokenized whole or run
    huge = Fact(" ".join([word] * (10_000_000 // (len(word) + 1))), word)
    t = time.perf_counter()
    with pytest.raises(ValueError, match=r"is at least \d+ tokens long"):
        h.encode([huge])
    assert time.perf_counter() - t < 1.0
    # and through a stage: locate refuses the request
    req = ForgetRequest.from_lists(forget=[(long.prompt, long.target)],
                                   retain=[(ok.prompt, ok.target)])
    with pytest.raises(ValueError, match="takes at most 32 tokens"):
        locate.fisher(h, req)


def test_hugging_face_fact_longer_than_the_context_is_refused():
    transformers = pytest.importorskip("transformers")
    from excise.hf import HFHandle

    cfg = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=40, n_positions=8)
    h = HFHandle(transformers.GPT2LMHeadModel(cfg), _word_tokenizer(), name="gpt2-8")
    assert h.n_ctx == 8
    assert h.encode([Fact("w1 w2 w3 w4 w5", "w6 w7")]).tokens.shape[1] == 8
    with pytest.raises(ValueError, match="'w1 w2 w3 w4 w5 w6' is 9 tokens long .* model "
                                         "'gpt2-8' takes at most 8"):
        h.encode([Fact("w1 w2 w3 w4 w5 w6", "w6 w7")])
    with pytest.raises(ValueError, match="the text .* is 9 tokens long"):
        h.encode_texts(["w1 w2 w3 w4 w5 w6 w7 w8"])
    t = time.perf_counter()
    with pytest.raises(ValueError, match="is at least"):
        h.encode([Fact("w1 " * 3_000_000, "w2")])
    assert time.perf_counter() - t < 1.0


# ------------------------------------- configs and requests are checked before any model (G)
@pytest.mark.parametrize("argv, code, text", CONFIG_CASES,
                         ids=[a[-1] for a, _, _ in CONFIG_CASES])
def test_config_refusals_come_before_any_model(tmp_path, monkeypatch, argv, code, text):
    """Every config refusal happens at load time: with building a model made impossible, the
    refusal (not the sabotage) is what the user sees."""
    import excise
    import excise.hf

    def no_model(*a, **k):
        raise AssertionError("a model was built or trained before the config was checked")

    monkeypatch.setattr(excise, "organism", no_model)
    monkeypatch.setattr(excise.hf, "load_model", no_model)
    for rel, content in FILES.items():
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(content if isinstance(content, bytes) else content.encode())
    r = CliRunner().invoke(app, [a.replace("{tmp}", str(tmp_path)) for a in argv])
    assert r.exit_code == code and text in r.stderr, (r.stderr, r.exception)
    assert not (tmp_path / "run").exists()


def _registries():
    from excise.app.pipeline import registries

    return registries()


@pytest.mark.parametrize("raw, text", [
    ({"edit": {"method": "dampen", "alpha": "banana"}}, "alpha='banana' is not a number"),
    ({"edit": {"method": "dampen", "lam": [1]}}, "lam=[1] is not a number"),
    ({"edit": {"method": "dampen", "alpha": float("nan")}}, "alpha=nan is not a number (NaN)"),
    ({"edit": {"method": "finetune", "params": {"steps": "many"}}},
     "edit.finetune: steps='many' is not an integer (steps: int, default 30)"),
    ({"edit": {"method": "prune", "mode": 0}}, "edit.prune: mode=0 is not a string"),
    ({"edit": {"method": "dampen", "params": 3}}, "edit.params must be a mapping"),
    ({"locate": {"method": "circuit", "protect_retain": "yes please"}},
     "protect_retain='yes please' is not true or false"),
    ({"locate": {"method": "fisher", "batch_size": True}}, "batch_size=True is not an integer"),
    ({"locate": {"method": "fisher", "sites": [1, 2]}}, "locate.sites=[1, 2] is not a list of "
                                                        "strings"),
    ({"locate": {"method": "fishr"}}, "unknown method 'fishr'; choose one of"),
    ({"verify": {"suite": "all", "bogus": 1}}, "verify: unknown key 'bogus'"),
    ({"verify": {"suite": "behaviour", "label": "x"}}, "verify: unknown key 'label'"),
    ({"verify": {"suite": "behavior"}}, "did you mean 'behaviour'"),
    ({"verify": {"suite": []}}, "verify.suite is an empty list"),
    ({"verify": {"suite": "oracle", "oracle": False}}, "runs ['oracle'], which need"),
    ({"verify": {"suite": "oracle"}, "request": {"jsonl": "x.jsonl"}},
     "a request file (request.jsonl) names no organism people to leave out"),
    ({"verify": {"suite": "attacks", "attacks": {"relearn_stepz": 3}}},
     "verify: unknown attack setting 'relearn_stepz'"),
    ({"verify": {"oracle": "no"}}, "verify.oracle='no' is not true or false"),
    ({"verify": {"suite": "verdict", "oracles": 0}}, "verify.oracles=0: must be an integer >= 1"),
    ({"verify": {"suite": "behaviour", "oracles": 2}}, "verify.oracles=2: several retrain "
                                                        "oracles serve the verdict only"),
    ({"verify": {"suite": "verdict", "oracles": 2, "oracle": False}},
     "verify.oracles=2: several retrain oracles serve the verdict only"),
    ({"select": {"top": 1.5}}, "select.top=1.5: a fraction must be in (0, 1]"),
    ({"select": {"top": "lots"}}, "select.top='lots' is not an integer or a number or null"),
    ({"organism": {"seed": "zero"}}, "organism.seed='zero' is not an integer"),
    ({"request": {"forget_people": 1.7}}, "request.forget_people=1.7 is not an integer"),
    ({"request": {"forget_people": [0, 1.7]}}, "is not a list of integers (found 1.7)"),
    ({"request": {"attributes": "pet"}}, "request.attributes='pet' is a string"),
    ({"request": {"attributes": []}}, "request.attributes is an empty list"),
    ({"model": {"on_split": "maybe"}}, "model.on_split='maybe': choose one of"),
])
def test_config_values_are_checked_at_load(raw, text):
    from excise.config import ConfigError, build

    with pytest.raises(ConfigError) as e:
        build(raw, _registries())
    assert text in str(e.value)


def test_switching_the_edit_method_drops_the_recipes_units():
    """The default recipe edits ``units: all``; ``--set edit.method=prune`` starts the edit
    section afresh (the old method's parameters and its units dropped: prune does not take
    ``all``), and a ``--set edit.units=...`` given with it still applies."""
    from excise import config as C

    regs = _registries()
    assert C.load(None, [], regs).edits[0].units == "all"
    e = C.load(None, ["edit.method=prune", "edit.top=4"], regs).edits[0]
    assert (e.method, e.units, e.params) == ("prune", None, {"top": 4})
    e = C.load(None, ["edit.units=all", "edit.method=finetune"], regs).edits[0]
    assert (e.method, e.units, e.params) == ("finetune", "all", {})
    with pytest.raises(C.ConfigError, match="does not take units: all"):
        C.load(None, ["edit.method=prune", "edit.units=all"], regs)


def test_config_numbers_written_as_text_are_converted():
    """YAML 1.1 reads 1e-4 as a string: a numeric parameter converts it, and a whole float
    becomes an int where only an int is valid; other values keep their type (the default
    pipeline's numbers do not change)."""
    from excise import config as C

    regs = _registries()
    cfg = C.load(C.DEFAULT_CONFIG.parent / "dampen.yaml",
                 ["edit.alpha=1e-4", "edit.lam=2", "locate.batch_size=40.0", "select.top=0.05"],
                 regs)
    assert cfg.edit.params == {"alpha": 1e-4, "lam": 2} and type(cfg.edit.params["lam"]) is int
    assert cfg.locate.params == {"batch_size": 40} and type(cfg.locate.params["batch_size"]) is int
    assert cfg.select.top == 0.05
    assert C.build({"edit": {"method": "finetune", "params": {"lr": "3e-4", "top": "5"}}},
                   regs).edit.params == {"lr": 3e-4, "top": 5}
    assert C.build({"request": {"forget_people": "3"}}, regs).request.forget_people == 3
    # the shipped configs load to exactly the values they write
    for path in ("configs/default.yaml", "configs/dampen.yaml", "configs/gemma-facts.yaml",
                 "configs/undo.yaml", "configs/saliency.yaml"):
        raw = C.read_yaml(C.DEFAULT_CONFIG.parent.parent / path)
        cfg = C.build(raw, regs).to_dict()
        assert C.build(cfg, regs) == C.build(raw, regs)  # what a run writes loads back the same
        for stage, section in raw.items():
            flat, have = dict(section), dict(cfg[stage])
            flat.update(flat.pop("params", {}))
            have.update(have.pop("params", {}))  # (finetune's own method: under params)
            for k, v in flat.items():
                assert have[k] == v and type(have[k]) is type(v), (path, stage, k)


def test_config_files_that_are_not_a_mapping(tmp_path):
    from excise import config as C

    for content, text in (("- a\n- b\n", "holds a list, not a mapping of stages"),
                          ("just words\n", "holds a string, not a mapping of stages")):
        (tmp_path / "c.yaml").write_text(content)
        with pytest.raises(C.ConfigError, match=text):
            C.load(tmp_path / "c.yaml")
    with pytest.raises(C.ConfigError, match="is a folder; expected a YAML config file"):
        C.load(tmp_path)
    (tmp_path / "c.yaml").write_bytes(b"edit:\n  method: d\xe9mpen\n")
    with pytest.raises(C.ConfigError, match=r"c.yaml is not UTF-8 text \(byte 0xe9 at line 2\)"):
        C.load(tmp_path / "c.yaml")


# ------------------------------------ a kept fact that restates a forget fact in other words
def test_a_kept_fact_restating_a_forget_fact_is_refused():
    from excise.request import Fact, FactSet

    forget = FactSet("forget", (Fact("The Acropolis is located in the city of", "Athens",
                                     subject="Acropolis"),))
    same = Fact("The  acropolis is in the city of", " Athens", subject="acropolis ")
    for name in ("retain", "neighbors"):
        kept = {"retain": FactSet("retain", (Fact("x y", "z"),))} | {name: FactSet(name, (same,))}
        with pytest.raises(ValueError, match=rf"1 {name} fact\(s\) restate a forget fact, e.g. "
                                             rf"'The  acropolis is in the city of' -> ' Athens' "
                                             rf"restates 'The Acropolis is located in the city "
                                             rf"of' -> 'Athens' \(subject 'Acropolis', same "
                                             rf"target\).*drop them from {name}"):
            ForgetRequest(forget=forget, **kept)
    # every clash is counted, the first one shown
    other = Fact("Acropolis is a site in the city of", "Athens", subject="Acropolis")
    with pytest.raises(ValueError, match=r"^2 retain fact\(s\) restate a forget fact, e\.g\. "
                                         r"'The  acropolis"):
        ForgetRequest(forget=forget, retain=FactSet("retain", (same, Fact("x y", "z"), other)))
    # another target, another subject, or no subject: not a restatement
    for f in (Fact("The Acropolis was built in the city of", "Athens?", subject="Acropolis"),
              Fact("The Parthenon is in the city of", "Athens", subject="Parthenon"),
              Fact("The Acropolis is in the city of", "Athens")):
        ForgetRequest(forget=forget, retain=FactSet("retain", (f,)))


# ------------------------------------------- facts that differ only in whitespace are one fact
def test_facts_are_compared_after_normalisation():
    for forget, retain in ((("a b", "c"), ("a  b ", "c")), (("a b", "c"), ("a b", " c\n")),
                           (("a\u00a0b", "c"), ("a b", "c")), (("\tx y", "z"), ("x\ny", "z"))):
        with pytest.raises(ValueError, match=r"forget and retain overlap in 1 fact\(s\).*"
                                             r"they differ only in whitespace"):
            ForgetRequest.from_lists([forget, ("p q", "r")], [retain, ("s t", "u")])
    with pytest.raises(ValueError, match="forget and holdout overlap"):
        ForgetRequest.from_lists([("a b", "c")], [("d", "e")], holdout=[(" a b", "c")])
    with pytest.raises(ValueError, match="forget and neighbors overlap"):
        ForgetRequest.from_lists([("a b", "c")], [("d", "e")], neighbors=[("a b", "c ")])
    # case and punctuation still make different facts
    ForgetRequest.from_lists([("a b", "c")], [("A b", "c"), ("a b", "c.")])
    # a request changed around its constructor is re-checked the same way by the stages
    from excise.checks import check_request
    from excise.request import FactSet

    req = ForgetRequest.from_lists([("a b", "c")], [("d", "e")])
    object.__setattr__(req, "holdout", FactSet("holdout", (Fact("a  b", "c"),)))
    with pytest.raises(ValueError, match="the forget and holdout splits overlap in 1 fact"):
        check_request(req)


def test_organism_request_file_with_whitespace_twins(tiny, tmp_path):
    """The issue's case: a forget fact of the organism and a retain copy with extra spaces."""
    f = tiny.request(forget_people=[0]).forget[0]
    path = tmp_path / "req.jsonl"
    path.write_text(json.dumps({"split": "forget", "prompt": f.prompt, "target": f.target}) +
                    "\n" + json.dumps({"split": "retain", "prompt": "  " + f.prompt.replace(
                        " ", "   "), "target": f.target + " "}) + "\n")
    with pytest.raises(ValueError, match="forget and retain overlap in 1 fact"):
        ForgetRequest.from_jsonl(path)


# -------------------------------------------------------------- request files: bad lines named
@pytest.mark.parametrize("content, text", [
    (b'{"split": "forget", "prompt": "a b", "target": "c"}\n{"split": "retain", "prompt": '
     b'"\xff\xfe", "target": "d"}\n', r"req.jsonl:2: not UTF-8 text \(byte 0xff at column 32\)"),
    (b'\n\n["forget", "a", "b"]\n', r"req.jsonl:3: expected a JSON object .* got a list"),
    (b'"just a string"\n', r"req.jsonl:1: expected a JSON object .* got a string"),
    (b'{"split": "general"}\n', r"req.jsonl:1: a 'general' row needs a non-empty 'text' "
                                r"string, got None"),
    (b'{"split": "general", "text": "  "}\n', r"req.jsonl:1: a 'general' row needs"),
    (b'{"split": "retain_text", "text": 5}\n', r"req.jsonl:1: a 'retain_text' row needs a "
                                               r"non-empty 'text' string, got 5"),
    (b'{"split": "forget", "prompt": "a", "target": "b", "subject": 3}\n',
     r"req.jsonl:1: 'subject' must be a string"),
    (b'{"split": "forget", "prompt": "a", "target": "b"\n', r"req.jsonl:1: not valid JSON"),
])
def test_request_file_lines_are_named(tmp_path, content, text):
    path = tmp_path / "req.jsonl"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=text):
        ForgetRequest.from_jsonl(path)


def test_request_file_good_forms(tmp_path):
    path = tmp_path / "req.jsonl"
    # a byte order mark, Windows line ends, general text given as "prompt" (as before)
    path.write_bytes(b'\xef\xbb\xbf{"split": "forget", "prompt": "a b", "target": "c"}\r\n'
                     b'{"split": "retain", "prompt": "d e", "target": "f"}\r\n'
                     b'{"split": "general", "prompt": "some text"}\r\n')
    r = ForgetRequest.from_jsonl(path)
    assert r.summary()["forget"] == 1 and r.general == ("some text",)
    with pytest.raises(ValueError, match="is a folder; expected a JSONL request file"):
        ForgetRequest.from_jsonl(tmp_path)
    with pytest.raises(ValueError, match="general='some text': expected a list of non-empty "
                                         "strings"):
        ForgetRequest.from_lists([("a", "b")], [("c", "d")], general="some text")


# -------------------------------------------- organism people and attributes (the Python API)
@pytest.mark.parametrize("kw, text", [
    ({"forget_people": [1.7]}, r"forget_people: 1.7 is not an integer; people are whole-number "
                               r"indices"),
    ({"forget_people": [0, True]}, "forget_people: True is not an integer"),
    ({"forget_people": [2.0]}, "forget_people: 2.0 is not an integer"),
    ({"forget_people": "12"}, r"forget_people='12': give a list of person indices, e.g. "
                              r"range\(3\)"),
    ({"forget_people": 3}, "forget_people=3: give a list of person indices"),
    ({"forget_people": [999]}, r"unknown people \[999\] in forget_people: the world has "
                               r"{total} people, {n} trained \(0..{last}\)"),
    ({"forget_people": [0], "neighbor_people": [999]},
     r"unknown people \[999\] in neighbor_people: the world has {total} people"),
    ({"forget_people": [0], "neighbor_people": [1.5]}, "neighbor_people: 1.5 is not an integer"),
    ({"forget_people": [0], "neighbor_people": ["7"]}, "neighbor_people: '7' is not an "
                                                       "integer"),
    ({"forget_people": [0], "neighbor_people": ["N"]},  # N: the first never-trained person
     r"people \[{n}\] in neighbor_people are not trained people: the world has {total} "
     r"people, {n} trained \(0..{last}\) and {hold} never trained \({n}..{end}\); "
     r"neighbor_people takes trained people \(0..{last}\)"),
    ({"forget_people": [0], "retain_people": [-1]}, r"unknown people \[-1\] in retain_people"),
    ({"forget_people": [0], "holdout_people": [1]},
     r"people \[1\] in holdout_people are not holdout people"),
    ({"forget_people": [0], "attributes": "pet"},
     r"attributes='pet' is a string, not a list of attribute names; give a list, e.g. "
     r"\['pet'\] \(choose from \['birth_city', 'occupation', 'employer', 'pet', 'account'\]\)"),
    ({"forget_people": [0], "attributes": []}, "attributes is an empty list"),
    ({"forget_people": [0], "attributes": ["pets"]},
     r"unknown attributes \['pets'\] in attributes; did you mean 'pet'\?"),
])
def test_organism_people_and_attributes_are_checked(tiny, kw, text):
    w = tiny.world
    fill = {"n": w.n_trained, "last": w.n_trained - 1, "total": len(w.people),
            "hold": len(w.people) - w.n_trained, "end": len(w.people) - 1}
    kw = {k: [w.n_trained if x == "N" else x for x in v] if isinstance(v, list) else v
          for k, v in kw.items()}
    with pytest.raises(ValueError, match=text.format(**fill)):
        tiny.request(**kw)


def test_organism_people_accept_any_integer_kind(tiny):
    import numpy as np

    a = tiny.request(forget_people=np.array([0, 2]), neighbor_people=range(3, 5),
                     attributes=("pet", "pet"))
    b = tiny.request(forget_people=[2, 0, 2], neighbor_people=[torch.tensor(3), 4],
                     attributes=["pet"])
    assert a.forget_people() == b.forget_people() == [0, 2]
    assert a.digest() == b.digest() and len(a.neighbors) > 0
    assert {f.attribute for f in a.forget} == {"pet"}
