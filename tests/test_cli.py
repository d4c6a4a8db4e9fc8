"""The CLI: a full run on the tiny organism, and bad input refused before anything is written."""

from __future__ import annotations

import json
import math

import pytest
from typer.testing import CliRunner

from excise.app.cli import app

runner = CliRunner()


def _run(*args):
    return runner.invoke(app, ["run", *args])


def test_run_writes_a_complete_run_folder(tmp_path, tiny, tiny_oracle):
    out = tmp_path / "run1"
    # the default config (every suite), with one attack setting instead of the quick grid
    r = _run("--set", "organism.preset=tiny", "--set", "request.forget_people=3",
             "--set", "verify.grid=single", "--out", str(out), "--quiet")
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
    # where the time went: every stage the run passed through, within the run's seconds
    stages = m["probes"]["stage_seconds"]
    assert set(stages) == {"model", "request", "locate", "plots", "edit", "oracle", "verify",
                           "listing"}
    assert all(v >= 0 for v in stages.values()) and stages["verify"] > 0
    assert sum(stages.values()) <= m["probes"]["seconds"] + 0.5
    # a run's listing: every fact of every split, before and after
    assert len(m["probes"]["facts"]["forget"]) == m["request"]["forget"] > 0
    # a second run into the same folder is refused, and the first run is left intact
    before = (out / "metrics.json").read_text()
    r2 = _run("--set", "organism.preset=tiny", "--out", str(out), "--quiet")
    assert r2.exit_code != 0 and "already holds a run" in r2.output
    assert (out / "metrics.json").read_text() == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".run1.partial")]


def test_saliency_config_redraws_only_its_top_weights(tmp_path, tiny):
    """configs/saliency.yaml (locate.saliency, the top 10% of the weights outside the
    LayerNorms, distill at alpha 1) on tiny, a few steps: the edit changes the selected
    elements and nothing else, and no norm parameter is selected."""
    import torch

    from edit._common import flat_index
    from excise.edits import Diff
    from excise.sites import Unit

    out = tmp_path / "run"
    from excise.config import DEFAULT_CONFIG

    r = _run(str(DEFAULT_CONFIG.parent / "saliency.yaml"), "--set", "organism.preset=tiny",
             "--set", "request.forget_people=3", "--set", "edit.steps=5",
             "--set", "verify.suite=behaviour", "--set", "verify.oracle=false",
             "--set", "verify.oracles=1",
             "--out", str(out), "--quiet")
    assert r.exit_code == 0, r.output
    m = json.loads((out / "metrics.json").read_text())
    assert m["edit"]["locate"] == "saliency" and m["edit"]["method"] == "distill"
    named = tiny.model.named_parameters()
    norms = {s for s in named if ".ln" in f".{s}"}  # blocks.*.ln1.w, ln_final.b, ...
    assert len(norms) == 4 * tiny.model.n_layers + 2  # ln1, ln2 (gain, bias) per block; ln_final
    n = tiny.model.n_parameters()
    n_sites = n - sum(named[s].numel() for s in norms)
    chosen = json.loads((out / "selection.json").read_text())["units"]
    assert len(chosen) == math.ceil(0.1 * n_sites)
    assert not {Unit.parse(t).site for t in chosen} & norms
    # fresh values differ from the old ones almost everywhere; the rest of the weights never
    assert 0.095 * n_sites / n <= m["edit"]["params_changed_frac"] <= len(chosen) / n
    diff = Diff.load(out / "edit.safetensors")
    changed = set()
    for site, c in diff.changes.items():
        moved = torch.nonzero(c.old != c.new).flatten()
        flat = moved if c.indices is None else c.indices[moved]
        changed |= {(site, int(i)) for i in flat.tolist()}
    selected = set()
    for text in chosen:
        u = Unit.parse(text)
        selected.add((u.site, flat_index(named[u.site].shape, u.index)))
    assert changed <= selected and len(changed) == m["edit"]["params_changed"]
    assert torch.isfinite(torch.tensor([m["after"]["perplexity"]])).all()


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
    r = _run("--set", f"request.jsonl={req}", "--set", "verify.suite=behaviour", "--out",
             str(tmp_path / "r"))
    assert r.exit_code == 2 and "forget and retain overlap" in r.output, r.output


def test_non_run_folder_is_not_written_into(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    r = _run("--out", str(tmp_path), "--quiet")
    assert r.exit_code == 2 and "not an excise run" in r.output
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_verify_reapplies_an_organism_runs_edit(tmp_path, tiny, tiny_oracle):
    """`excise verify RUN` rebuilds the model the run's config names and re-applies its diff:
    the behaviour it measures is the run's 'after' column, number for number."""
    out = tmp_path / "run"
    import torch

    threads = torch.get_num_threads()
    r = _run("--set", "organism.preset=tiny", "--set", "request.forget_people=3", "--set",
             "verify.suite=behaviour", "--out", str(out), "--quiet", "--threads", "1")
    assert r.exit_code == 0, r.output
    assert torch.get_num_threads() == threads  # the caller's setting is restored
    r = runner.invoke(app, ["verify", str(out), "--quiet"])
    assert r.exit_code == 0, r.output
    ran = json.loads((out / "metrics.json").read_text())
    again = json.loads((out / "verify" / "metrics.json").read_text())
    assert again["after"] == ran["after"] and again["oracle"] == ran["oracle"]
    # --threads is recorded in the run's config, and verify runs at the run's count
    assert ran["probes"]["threads"] == 1 and again["probes"]["threads"] == 1
    assert "threads: 1" in (out / "config.yaml").read_text()


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


# -- run folders: written whole, and only what excise wrote is ever removed (issue 19) ---------
TINY = ["--set", "organism.preset=tiny", "--set", "request.forget_people=3", "--set",
        "verify.suite=behaviour", "--set", "verify.oracle=false", "--quiet"]


def _snapshot(folder):
    """Every file under ``folder`` (relative path -> bytes)."""
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _partials(folder):
    return [p.name for p in folder.iterdir() if ".partial-" in p.name]


def _project(folder):
    """A folder of someone's own files (it even has a config.yaml), not a run."""
    (folder / "data").mkdir(parents=True)
    (folder / "config.yaml").write_text("my: project\n")
    (folder / "notes.md").write_text("# notes\n")
    (folder / "data" / "important.txt").write_bytes(b"\x00\x01 irreplaceable")
    return _snapshot(folder)


def test_overwrite_never_deletes_a_folder_that_is_not_a_run(tmp_path):
    proj = tmp_path / "project"
    before = _project(proj)
    for extra in ([], ["--overwrite"]):
        r = _run(*TINY, "--out", str(proj), *extra)
        assert r.exit_code == 2, r.output
        assert "is a non-empty folder that is not an excise run (it has no run.json)" in r.output
        assert _snapshot(proj) == before
        assert sorted(p.name for p in tmp_path.iterdir()) == ["project"]
    # a run.json of its own (not an excise manifest) does not make it a run either
    (proj / "run.json").write_text('{"name": "my thing"}')
    before = _snapshot(proj)
    r = _run(*TINY, "--out", str(proj), "--overwrite")
    assert r.exit_code == 2 and "its run.json is not an excise manifest" in r.output
    assert _snapshot(proj) == before


def test_a_run_of_an_earlier_excise_is_never_overwritten(tmp_path):
    """A run folder written before run.json existed: excise cannot tell which files are its own,
    so it says to delete the folder by hand instead of guessing."""
    old = tmp_path / "old-run"
    old.mkdir()
    for name in ("config.yaml", "metrics.json", "report.md", "edit.safetensors", "mine.txt"):
        (old / name).write_text(name)
    before = _snapshot(old)
    r = _run(*TINY, "--out", str(old), "--overwrite")
    assert r.exit_code == 2, r.output
    assert "looks like a run written by an earlier excise" in r.output
    assert "delete it by hand" in r.output
    assert _snapshot(old) == before


def test_overwrite_removes_only_the_files_excise_wrote(tmp_path, tiny):
    import hashlib

    out = tmp_path / "run"
    r = _run(*TINY, "--out", str(out))
    assert r.exit_code == 0, r.output
    m = json.loads((out / "run.json").read_text())
    assert m["format"] == "excise.run/1" and m["kind"] == "run" and m["complete"] is True
    files = _snapshot(out)
    assert set(m["files"]) == set(files) - {"run.json"}
    for rel, e in m["files"].items():
        assert e == {"bytes": len(files[rel]), "sha256": hashlib.sha256(files[rel]).hexdigest()}
    # a verify report of this run inside it, and files of the user's own beside it
    r = runner.invoke(app, ["verify", str(out), "--quiet"])
    assert r.exit_code == 0, r.output
    v = json.loads((out / "verify" / "run.json").read_text())
    assert v["kind"] == "verify" and v["of"]["id"] == m["id"]
    (out / "notes.md").write_text("my notes on this run")
    (out / "data").mkdir()
    (out / "data" / "important.txt").write_text("keep me")
    mine = {k: v for k, v in _snapshot(out).items() if k in ("notes.md", "data/important.txt")}
    # a run file changed by hand is not excise's any more: refused, nothing removed
    (out / "report.md").write_text((out / "report.md").read_text() + "\nmy comment\n")
    before = _snapshot(out)
    r = _run(*TINY, "--out", str(out), "--overwrite")
    assert r.exit_code == 2 and "report.md changed since excise wrote it" in r.output, r.output
    assert _snapshot(out) == before
    # moved away, the run is replaced: the old run's files and its verify report go, the
    # user's files stay byte-identical
    (out / "report.md").rename(tmp_path / "my-report.md")
    r = _run(*TINY, "--out", str(out), "--overwrite")
    assert r.exit_code == 0, r.output
    m2 = json.loads((out / "run.json").read_text())
    after = _snapshot(out)
    assert m2["id"] != m["id"] and m2["complete"] is True
    assert set(after) == set(m2["files"]) | {"run.json"} | set(mine)
    assert all(after[k] == v for k, v in mine.items())
    assert not (out / "verify").exists()
    assert json.loads(after["metrics.json"])["after"] == \
        json.loads(files["metrics.json"])["after"]  # the same run's numbers
    assert not _partials(tmp_path)


def test_verify_never_replaces_a_run(tmp_path, tiny):
    a, b = tmp_path / "a", tmp_path / "b"
    for out in (a, b):
        assert _run(*TINY, "--out", str(out)).exit_code == 0
    snap_a, snap_b = _snapshot(a), _snapshot(b)
    cases = [
        (["--out", str(b)], "already holds a run; choose another folder"),
        (["--out", str(b), "--overwrite"], "replaces a run only with another one"),
        (["--out", str(a)], "is the run being verified"),
        (["--out", str(a), "--overwrite"], "is the run being verified"),
        (["--out", str(tmp_path), "--overwrite"], "holds the run being verified"),
    ]
    for extra, message in cases:
        r = runner.invoke(app, ["verify", str(a), "--quiet", *extra])
        assert r.exit_code == 2 and message in r.output, (extra, r.output)
        assert _snapshot(a) == snap_a and _snapshot(b) == snap_b
    # the default folder: a second verify is refused, then replaced with --overwrite
    assert runner.invoke(app, ["verify", str(a), "--quiet"]).exit_code == 0
    first = _snapshot(a / "verify")
    r = runner.invoke(app, ["verify", str(a), "--quiet"])
    assert r.exit_code == 2 and "already holds a verify report" in r.output
    assert _snapshot(a / "verify") == first
    r = runner.invoke(app, ["verify", str(a), "--quiet", "--overwrite"])
    assert r.exit_code == 0, r.output
    again = _snapshot(a / "verify")
    assert json.loads(again["metrics.json"])["after"] == json.loads(first["metrics.json"])["after"]
    assert json.loads(again["run.json"])["id"] != json.loads(first["run.json"])["id"]
    assert {k: v for k, v in _snapshot(a).items() if not k.startswith("verify/")} == snap_a
    # a run cannot replace a verify report either
    r = _run(*TINY, "--out", str(a / "verify"), "--overwrite")
    assert r.exit_code == 2 and "replaces a verify report only with another one" in r.output
    assert not _partials(tmp_path) and not _partials(a)


def test_sigterm_removes_the_partial_folder(tmp_path, tiny):
    """SIGTERM (what `timeout` or a scheduler sends) mid-run: the partial folder (named with the
    pid) is removed, one error line, exit code 143."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    p = subprocess.Popen([sys.executable, "-m", "excise.app.cli", "run", *TINY, "--out",
                          str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                         cwd=Path(__file__).resolve().parent.parent)
    deadline = time.time() + 300
    while not _partials(tmp_path):
        if p.poll() is not None or time.time() > deadline:
            p.kill()
            pytest.fail(f"no partial folder appeared: {p.communicate()}")
        time.sleep(0.01)
    (partial,) = _partials(tmp_path)
    assert partial.startswith(f".run.partial-{p.pid}-")
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=300)
    err = err.decode()
    assert p.returncode == 143, err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "terminated by SIGTERM" in errors[0], err
    assert not out.exists() and not list(tmp_path.iterdir())


def test_stale_partial_folders_of_dead_processes_are_cleared(tmp_path):
    import os
    import socket
    import subprocess
    import sys

    from excise.app import folders

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()

    def partial(name, pid, marker=True, host=socket.gethostname()):
        d = tmp_path / f".{name}.partial-{pid}-abcd_123"
        d.mkdir()
        (d / "config.yaml").write_text("half a run")
        if marker:
            (d / folders.PARTIAL_MARKER).write_text(json.dumps({"pid": pid, "host": host}))
        return d

    stale = partial("run", dead.pid)
    live = partial("other", os.getpid())  # a run still going
    unmarked = partial("mine", dead.pid, marker=False)  # named alike, not made by excise
    elsewhere = partial("x", dead.pid, host="another-host")  # pid of another machine
    legacy = tmp_path / ".old.partial-abcdefgh"  # an earlier excise: no pid recorded
    legacy.mkdir()
    logs = []
    with folders.staged(tmp_path / "new", log=logs.append) as tmp:
        assert tmp.name.startswith(f".new.partial-{os.getpid()}-")
        (tmp / "a.txt").write_text("a")
    assert not stale.exists()
    assert live.exists() and unmarked.exists() and elsewhere.exists() and legacy.exists()
    assert any(f"process {dead.pid}, which stopped" in line for line in logs), logs
    assert any(".old.partial-abcdefgh" in line and "by hand" in line for line in logs), logs
    assert (tmp_path / "new" / "a.txt").read_text() == "a"


def test_staged_folder_api(tmp_path, monkeypatch):
    """excise.app.folders without a model: the manifest, cleanup on an exception, foreign files
    kept, clashes and tampered manifests refused, an interrupted replacement recovered, the
    SIGTERM handler restored."""
    import signal

    from excise.app import folders

    out = tmp_path / "out"
    handler = signal.getsignal(signal.SIGTERM)
    with folders.staged(out, log=lambda m: None) as tmp:
        (tmp / "sub").mkdir()
        (tmp / "a.txt").write_text("a1")
        (tmp / "sub" / "b.txt").write_text("b1")
        assert signal.getsignal(signal.SIGTERM) is folders._on_sigterm
    assert signal.getsignal(signal.SIGTERM) == handler
    m = json.loads((out / "run.json").read_text())
    assert sorted(m["files"]) == ["a.txt", "sub/b.txt"] and m["dirs"] == ["sub"]
    assert m["made_folder"] is True and not _partials(tmp_path)
    # an exception while writing: the partial folder goes, the run stays as it was
    snap = _snapshot(out)
    with pytest.raises(RuntimeError):
        with folders.staged(out, overwrite=True, log=lambda m: None) as tmp:
            (tmp / "a.txt").write_text("a2")
            raise RuntimeError("boom")
    assert _snapshot(out) == snap and not _partials(tmp_path)
    assert signal.getsignal(signal.SIGTERM) == handler
    # a file of the user's where the new run has one: refused, both left as they were
    (out / "mine.txt").write_text("mine")
    snap = _snapshot(out)
    with pytest.raises(folders.OutFolderError, match="holds mine.txt, which excise did not write"):
        with folders.staged(out, overwrite=True, log=lambda m: None) as tmp:
            (tmp / "mine.txt").write_text("new")
    assert _snapshot(out) == snap and not _partials(tmp_path)
    # a tampered manifest naming a file outside the folder: nothing removed
    victim = tmp_path / "victim.txt"
    victim.write_text("victim")
    bad = dict(m, files=dict(m["files"], **{"../victim.txt": {"bytes": 6, "sha256": "0"}}))
    (out / "run.json").write_text(json.dumps(bad))
    with pytest.raises(folders.OutFolderError, match="not a path inside the folder"):
        folders.check_out(out, True)
    assert victim.read_text() == "victim"
    (out / "run.json").write_text(json.dumps(m))
    # a replacement stopped half-way (here: moving the second new file in fails) is an
    # incomplete run; the next overwrite replaces it, the user's file stays
    real = folders.os.replace

    def failing(src, dst):
        if str(dst) == str(out / "c.txt"):
            raise OSError(5, "Input/output error")
        return real(src, dst)

    monkeypatch.setattr(folders.os, "replace", failing)
    with pytest.raises(OSError):
        with folders.staged(out, overwrite=True, log=lambda m: None) as tmp:
            (tmp / "a.txt").write_text("a3")
            (tmp / "c.txt").write_text("c3")
    monkeypatch.setattr(folders.os, "replace", real)
    assert folders.incomplete(out) and (out / "mine.txt").read_text() == "mine"
    with folders.staged(out, overwrite=True, log=lambda m: None) as tmp:
        (tmp / "d.txt").write_text("d4")
    assert sorted(_snapshot(out)) == ["d.txt", "mine.txt", "run.json"]
    assert not folders.incomplete(out) and not _partials(tmp_path)


def test_unwritable_out_is_refused_before_anything_runs(tmp_path, monkeypatch):
    import errno
    import os
    import tempfile

    from excise.app import folders

    def read_only(*a, **k):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(tempfile, "mkdtemp", read_only)  # the staged folder's (excise.io)
    r = _run(*TINY, "--out", str(tmp_path / "run"))
    assert r.exit_code == 2, r.output
    assert r.stderr.strip().splitlines() == [
        f"error: --out {tmp_path / 'run'}: cannot create a folder in {tmp_path} "
        f"(Read-only file system); give a writable folder"]
    monkeypatch.undo()
    (tmp_path / "mnt").mkdir()
    monkeypatch.setattr(folders.os.path, "ismount", lambda p: str(p) == str(tmp_path / "mnt"))
    r = _run(*TINY, "--out", str(tmp_path / "mnt"))
    assert r.exit_code == 2 and "is a mount point" in r.output
    assert f"--out {tmp_path / 'mnt' / 'run'}" in r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mnt"]


@pytest.mark.parametrize("stop, code, message", [
    (KeyboardInterrupt, 130, "interrupted (SIGINT) before it finished"),
    ("sigterm", 143, "terminated by SIGTERM before it finished"),
])
def test_interrupted_run_leaves_nothing(tmp_path, monkeypatch, stop, code, message):
    import os
    import signal

    from excise.app import pipeline

    def stopped(self, **kw):  # (the model is built once the partial folder exists)
        assert _partials(tmp_path)
        if stop == "sigterm":
            os.kill(os.getpid(), signal.SIGTERM)  # the handler raises right here
            raise AssertionError("SIGTERM was not turned into an exception")
        raise stop()

    handler = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(pipeline.Setup, "build", stopped)
    r = _run(*TINY, "--out", str(tmp_path / "run"))
    assert r.exit_code == code, r.output
    assert r.stderr.rstrip().splitlines()[-1].startswith(f"error: {message}")
    assert "Traceback" not in r.output
    assert not list(tmp_path.iterdir())
    assert signal.getsignal(signal.SIGTERM) == handler


def test_a_value_only_the_edit_can_judge_is_refused_before_the_oracle_trains(tmp_path, tiny,
                                                                            monkeypatch):
    """prune's mode is judged by prune itself, after locate: the retrain oracle (minutes on a
    real organism) must not have been trained by then."""
    from excise.app import pipeline

    def no_oracle(self, wanted=True):
        raise AssertionError("the oracle was trained before the edit ran")

    monkeypatch.setattr(pipeline.Subject, "oracle", no_oracle)
    r = _run("--set", "organism.preset=tiny", "--set", "request.forget_people=3",
             "--set", "edit.method=prune", "--set", "edit.mode=bogus",
             "--out", str(tmp_path / "run"), "--quiet")
    assert r.exit_code == 2, r.output
    assert "mode" in r.stderr and "bogus" in r.stderr
    assert "oracle was trained" not in r.output
    assert not (tmp_path / "run").exists()
