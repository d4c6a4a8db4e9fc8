"""The CLI: a full run on the tiny organism, and bad input refused before anything is written."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from excise.cli import app

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
