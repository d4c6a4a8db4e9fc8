"""The CLI: a full run on the tiny organism, and bad input refused before anything is written."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from excise.app.cli import app

runner = CliRunner()


def _run(*args):
    return runner.invoke(app, ["run", *args])


def test_run_writes_a_complete_run_folder(tmp_path, tiny, tiny_oracle):
    out = tmp_path / "run1"
    r = _run("--set", "organism.preset=tiny", "--set", "request.forget_people=3", "--out",
             str(out), "--quiet")
    assert r.exit_code == 0, r.output
    for name in ("config.yaml", "importance.safetensors", "importance.png", "edit.safetensors",
                 "edit.json", "metrics.json", "report.md", "recall.png"):
        assert (out / name).exists(), name
    m = json.loads((out / "metrics.json").read_text())
    for label in ("before", "after", "oracle"):
        for k in ("forget_recall", "retain_recall", "holdout_recall", "shared_recall",
                  "perplexity"):
            assert isinstance(m[label][k], float)
    assert set(m["edit"]) >= {"method", "units_changed", "params_changed_frac"}
    assert m["after"]["forget_recall"] < m["before"]["forget_recall"]
    assert "forget recall" in r.output and "oracle" in r.output
    # a second run into the same folder is refused, and the first run is left intact
    before = (out / "metrics.json").read_text()
    r2 = _run("--set", "organism.preset=tiny", "--out", str(out), "--quiet")
    assert r2.exit_code != 0 and "already holds a run" in r2.output
    assert (out / "metrics.json").read_text() == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".run1.partial")]


@pytest.mark.parametrize("args, message", [
    (["--set", "edit.method=dampn"], "unknown method 'dampn'; choose one of"),
    (["--set", "locate.method=nope"], "unknown method 'nope'"),
    (["--set", "edit.alpah=5"], "did you mean 'alpha'"),
    (["--set", "edti.alpha=5"], "unknown key 'edti'"),
    (["--set", "noequals"], "expected key=value"),
    (["--set", "request.forget_people=[]"], "empty list: nothing to forget"),
    (["--set", "request.forget_people=[0, 5000]"], "unknown people [5000]"),
    (["--set", "request.forget_people=0"], "must be between 1 and"),
    (["--set", "organism.preset=huge"], "unknown preset 'huge'"),
    (["--set", "request.forget_fraction=2"], "must be a number in (0, 1)"),
])
def test_bad_input_is_refused_with_a_clear_error(tmp_path, args, message):
    out = tmp_path / "run"
    r = _run(*args, "--out", str(out), "--quiet")
    assert r.exit_code == 2, r.output
    assert message in r.output
    assert not out.exists() and not list(tmp_path.iterdir())


def test_malformed_yaml_and_missing_config(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("edit:\n  method: dampen\n alpha: [1\n")
    r = _run(str(bad), "--out", str(tmp_path / "r"))
    assert r.exit_code == 2 and "malformed YAML" in r.output and "line" in r.output
    r = _run(str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "r"))
    assert r.exit_code == 2 and "config file not found" in r.output


def test_overlapping_request_file_is_refused(tmp_path):
    req = tmp_path / "req.jsonl"
    req.write_text('{"split": "forget", "prompt": "a b", "target": "c"}\n'
                   '{"split": "retain", "prompt": "a b", "target": "c"}\n')
    r = _run("--set", f"request.jsonl={req}", "--out", str(tmp_path / "r"))
    assert r.exit_code == 2 and "forget and retain overlap" in r.output


def test_non_run_folder_is_not_written_into(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    r = _run("--out", str(tmp_path), "--quiet")
    assert r.exit_code == 2 and "not an excise run" in r.output
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_verify_reapplies_an_organism_runs_edit(tmp_path, tiny, tiny_oracle):
    """`excise verify RUN` rebuilds the model the run's config names and re-applies its diff:
    the behaviour it measures is the run's 'after' column, number for number."""
    out = tmp_path / "run"
    r = _run("--set", "organism.preset=tiny", "--set", "request.forget_people=3", "--set",
             "verify.suite=behaviour", "--out", str(out), "--quiet")
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["verify", str(out), "--quiet"])
    assert r.exit_code == 0, r.output
    ran = json.loads((out / "metrics.json").read_text())
    again = json.loads((out / "verify" / "metrics.json").read_text())
    assert again["after"] == ran["after"] and again["oracle"] == ran["oracle"]


# -- a Hugging Face run: excise verify builds what the run's config says -----------------------
WORDS = ["<pad>", "<bos>", "<unk>"] + [f"s{i}" for i in range(12)] + \
    [f"a{i}" for i in range(12)] + "the is of".split()


def _tiny_hf_folder(folder):
    """A tiny random GPT-2 with a word-level tokenizer, saved as a local Hugging Face folder."""
    transformers = pytest.importorskip("transformers")
    import warnings

    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers

    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>",
                                               pad_token="<pad>", unk_token="<unk>")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=len(WORDS),
                                  n_positions=32, bos_token_id=1, eos_token_id=1,
                                  pad_token_id=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _request_the_model_knows(folder, path):
    """Facts whose targets are the model's own greedy answers (so it 'knows' them)."""
    from excise.hf import load_model
    from excise.request import Fact
    from probes import knowledge

    h = load_model(path=str(folder), log=lambda s: None)
    prompts = [f"the s{i} is" for i in range(12)]
    greedy = [WORDS[r["greedy_first"]] for r in knowledge(h, [Fact(p, "a0") for p in prompts])]
    facts = [(p, t) for p, t in zip(prompts, greedy) if t not in WORDS[:3]]
    assert len(facts) >= 6
    rows = [{"split": "forget" if i < 3 else "retain", "prompt": p, "target": t}
            for i, (p, t) in enumerate(facts)]
    rows += [{"split": "holdout", "prompt": f"the s{i} of", "target": "a1"} for i in range(4)]
    rows += [{"split": "general", "text": "s1 is the a2 of s3"},
             {"split": "general", "text": "the s4 of s5 is a6"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_verify_works_on_a_hugging_face_run(tmp_path):
    folder = _tiny_hf_folder(tmp_path / "tiny-gpt2")
    jsonl = _request_the_model_knows(folder, tmp_path / "facts.jsonl")
    out = tmp_path / "run"
    r = _run("--set", f"model.path={folder}", "--set", f"request.jsonl={jsonl}",
             "--set", "locate.method=fisher", "--set", "edit.method=prune", "--set",
             "edit.top=4", "--set", "verify.suite=behaviour", "--out", str(out), "--quiet")
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["verify", str(out), "--quiet"])
    assert r.exit_code == 0, r.output  # the organism is not built: no fingerprint refusal
    ran = json.loads((out / "metrics.json").read_text())
    again = json.loads((out / "verify" / "metrics.json").read_text())
    assert "after" in again and "oracle" not in again  # a real model has no retrain oracle
    assert again["after"] == ran["after"]
    assert again["edit"]["method"] == "prune"


def test_build_step_dispatches_on_the_config(tmp_path, tiny):
    """One build step for run, verify and the sweep: the organism for an organism config (the
    request from its people), a Hugging Face model for model.path (the request file parsed
    once, facts the model never produced screened out)."""
    from excise.app import pipeline
    from excise.config import build

    s = pipeline.build(build({"organism": {"preset": "tiny"}, "request": {"forget_people": 2}}),
                       progress=False, log=lambda m: None)
    assert s.organism is not None and s.model is s.organism.model
    assert s.request.forget_people() == [0, 1] and s.not_known is None
    folder = _tiny_hf_folder(tmp_path / "tiny-gpt2")
    jsonl = _request_the_model_knows(folder, tmp_path / "facts.jsonl")
    with jsonl.open("a") as f:  # a forget fact the model does not produce
        f.write(json.dumps({"split": "forget", "prompt": "the s0 of", "target": "s0"}) + "\n")
    setup = pipeline.Setup.check(build({"model": {"path": str(folder)},
                                        "request": {"jsonl": str(jsonl)}}))
    assert len(setup.parsed.forget) == 4
    s = setup.build(log=lambda m: None)
    assert s.organism is None and s.oracle() is None
    assert type(s.model).__name__ == "HFHandle" and len(s.request.forget) == 3
    assert [f["target"] for f in s.not_known["forget"]] == ["s0"]
