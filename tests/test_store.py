"""probes.store: attack results kept on disk between runs, read back only where everything that
decides them matches."""

import json

import pytest
import torch

import probes
from excise.config import RunConfig, VerifyConfig
from excise.report import AttackCurves, AttackGrid, Curve, GridPoint
from probes import attacks as A
from probes import store
from probes.store import AttackStore

CFG = A.AttackConfig(attacks=("relearn", "quantize"), relearn_steps=5, relearn_lr=3e-3,
                     eval_every=5, grid="single")


@pytest.fixture()
def edited(tiny):
    m = tiny.model.clone()
    with torch.no_grad():
        m.named_parameters()["blocks.0.mlp.W_in"][0, :8] += 0.05
    return m


def _verify(model, request, oracle, original, cache):
    return probes.verify(model, request, oracle=oracle, original=original, suite=["attacks"],
                         label="after", attacks=CFG, cache=cache)


def _no_attacks(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("attacked again: the stored result was not read back")
    monkeypatch.setattr(A, "run_grid", refuse)


def test_a_new_process_reads_every_attack_result_back(tiny, tiny_request, tiny_oracle, edited,
                                                      tmp_path, monkeypatch):
    """A second store on the same folder (as a later run has) gives grids equal in every field
    - per-fact hits and their owners, which the verdict's bootstrap resamples - and equal
    metrics, without attacking anything."""
    first = _verify(edited, tiny_request, tiny_oracle, tiny.model, AttackStore(tmp_path))
    assert len(list(tmp_path.glob("attacks-*.json"))) == 3  # model, oracle, original
    _no_attacks(monkeypatch)
    told: list[str] = []
    second = _verify(edited, tiny_request, tiny_oracle, tiny.model,
                     AttackStore(tmp_path, log=told.append))
    assert second.metrics == first.metrics
    assert second.extra["attack_grid"] == first.extra["attack_grid"]
    owners = second.extra["attack_grid"]["relearn"].points[0].curves.curves["after"].groups[0]
    assert all(isinstance(o, tuple) for o in owners)  # hashable, as the bootstrap needs
    assert len(told) == 3 and all("read from" in t for t in told)


def test_anything_else_that_decides_the_numbers_starts_a_new_entry(
        tiny, tiny_request, tiny_oracle, edited, tmp_path, monkeypatch):
    """Other code, another thread count, other weights: measured anew, never read back."""
    _verify(edited, tiny_request, tiny_oracle, tiny.model, AttackStore(tmp_path))
    calls = []
    real = A.run_grid

    def counted(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(A, "run_grid", counted)
    monkeypatch.setattr(store, "code_digest", lambda: "another-version")
    _verify(edited, tiny_request, tiny_oracle, tiny.model, AttackStore(tmp_path))
    assert len(calls) == 3
    monkeypatch.undo()
    monkeypatch.setattr(A, "run_grid", counted)
    prev = torch.get_num_threads()
    try:
        torch.set_num_threads(1 if prev != 1 else 2)
        _verify(edited, tiny_request, tiny_oracle, tiny.model, AttackStore(tmp_path))
    finally:
        torch.set_num_threads(prev)
    assert len(calls) == 6
    with torch.no_grad():
        edited.named_parameters()["blocks.0.mlp.W_in"][0, 0] += 0.05
    _verify(edited, tiny_request, tiny_oracle, tiny.model, AttackStore(tmp_path))
    assert len(calls) == 7  # only the changed model


def test_a_damaged_file_is_measured_anew_and_replaced(tiny, tiny_request, tiny_oracle, edited,
                                                      tmp_path):
    first = _verify(edited, tiny_request, tiny_oracle, tiny.model, AttackStore(tmp_path))
    files = sorted(tmp_path.glob("attacks-*.json"))
    files[0].write_text(files[0].read_text()[:200])  # truncated
    blob = json.loads(files[1].read_text())
    blob["key"][2] = 99  # another key's result under this name
    files[1].write_text(json.dumps(blob))
    again = _verify(edited, tiny_request, tiny_oracle, tiny.model, AttackStore(tmp_path))
    assert again.metrics == first.metrics
    for f in files[:2]:
        assert json.loads(f.read_text())["key"][2] == 0  # rewritten whole


def test_what_stays_in_memory_and_the_run_setting(tmp_path, monkeypatch):
    """A caller's SAE object decides the steering attack: its key holds a tuple and never goes
    to disk. ``verify.reuse`` (on by default) picks the store under EXCISE_CACHE."""
    plain = ("f" * 16, "d" * 16, 0, "attacks", "AttackConfig(...)", "s" * 16)
    assert store.stored_key(plain)
    assert not store.stored_key(plain + (("sae given", 1234),))
    assert not store.stored_key(("f" * 16, "d" * 16, 0, "behaviour", "x"))
    s = AttackStore(tmp_path)
    s[plain + (("sae given", 1),)] = {}
    s[("f" * 16, "d" * 16, 0, "behaviour", "x")] = {"forget_recall": 1.0}
    assert not list(tmp_path.iterdir())
    from excise.app.pipeline import verify_cache

    monkeypatch.setenv("EXCISE_CACHE", str(tmp_path / "cache"))
    got = verify_cache(RunConfig())
    assert isinstance(got, AttackStore) and got.root == tmp_path / "cache" / "verify"
    assert verify_cache(RunConfig(verify=VerifyConfig(reuse=False))) is None


def test_a_folder_that_cannot_be_written_costs_the_reuse_not_the_run(tmp_path):
    """A full or read-only cache warns and keeps the result in memory; the run goes on."""
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    s = AttackStore(blocked / "verify")
    key = ("f" * 16, "d" * 16, 0, "attacks", "AttackConfig(...)", "s" * 16)
    grids = {"relearn": AttackGrid((GridPoint(1e-3, 0, AttackCurves(
        {"after": Curve((0, 5), (1.0, 0.5), "steps")})),), "relearn_lr")}
    with pytest.warns(UserWarning, match="attack results not kept"):
        s[key] = grids
    assert key in s and s[key] == grids
