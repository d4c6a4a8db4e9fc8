"""Dispatching independent cells (excise.app.dispatch) and the sweep's report stage on it:
outcomes in the cells' order whatever order they finish in; a failing cell retried, then
recorded with its error, never dropped; the tiny sweep's cells give the same records serially,
on a local process pool and as Ray tasks."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import pytest

from excise.app import dispatch as D
from excise.app import sweep
from excise.config import ConfigError

ROOT = Path(__file__).resolve().parent.parent

# -- toy cells: module-level, so that worker processes import them by name ---------------------


def _plus(x, y):
    return x + y


def _fails(msg):
    raise ValueError(msg)


def _flaky(marker: str, x, die: bool = False):
    """Fails the first time it runs (raises, or kills its worker process), then returns x."""
    if not os.path.exists(marker):
        Path(marker).write_text("tried once")
        if die:
            os._exit(3)
        raise RuntimeError("first try fails")
    return x


def _touch(path: str) -> float:
    """Writes ``path``; returns when it ran (the time before the write: a waiter may see the
    file and read its clock before this process reads its own after writing)."""
    t = time.time()
    Path(path).write_text("done")
    return t


def _after(path: str) -> float:
    """Waits until another worker has written ``path``; returns when it finished."""
    t = time.time()
    while not os.path.exists(path):
        if time.time() - t > 120:
            raise TimeoutError(f"nobody wrote {path}")
        time.sleep(0.01)
    return time.time()


def _worker_setup():
    import torch

    return (torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS"),
            os.environ.get("EXCISE_CACHE"), os.getpid())


def test_serial_dispatch_keeps_order_retries_and_records_failures(tmp_path):
    cells = [D.Cell("a", _plus, (1, 2)),
             D.Cell("b", _fails, ("boom",)),
             D.Cell("c", _plus, (10,), needs=("a",)),
             D.Cell("d", _plus, (1,), needs=("b",)),
             D.Cell("e", _flaky, (str(tmp_path / "e"), 5))]
    log: list[str] = []
    out = D.dispatch(cells, D.SerialExecutor(threads=1), retries=1, log=log.append)
    assert [o.key for o in out] == ["a", "b", "c", "d", "e"]
    assert [o.value for o in out] == [3, None, 13, None, 5]
    assert [o.attempts for o in out] == [1, 2, 1, 0, 2]
    assert out[1].error == "ValueError: boom" and "_fails" in out[1].trace
    assert out[3].error.startswith("not run: it needs 'b', which failed (ValueError: boom)")
    assert out[4].ok and not out[1].ok
    assert "b: failed (try 1 of 2): ValueError: boom; trying again" in log
    assert any(line.startswith("b: failed after 2 tries: ValueError: boom") for line in log)
    # no retries: one try each
    again = D.dispatch(cells[:2], D.SerialExecutor(threads=1), retries=0)
    assert [o.attempts for o in again] == [1, 1] and again[1].error == "ValueError: boom"


def test_local_pool_outcomes_in_cell_order_a_dead_worker_retried(tmp_path):
    """Two workers at one thread each: the first cell waits for the second (run by the other
    worker), so it finishes last, yet the outcomes come back in the cells' order; a cell whose
    worker dies is run again in a fresh pool; every worker runs at the thread count it was
    given, with the caller's cache folder."""
    ex = D.LocalExecutor(workers=2, threads=1)
    marker = str(tmp_path / "touched")
    cells = [D.Cell("waits", _after, (marker,)),
             D.Cell("touches", _touch, (marker,)),
             D.Cell("setup", _worker_setup),
             D.Cell("dies", _flaky, (str(tmp_path / "dies"), "d", True))]
    out = D.dispatch(cells, ex, retries=1)
    assert [o.key for o in out] == ["waits", "touches", "setup", "dies"]
    assert all(o.ok for o in out), [o.error for o in out]
    assert out[0].value >= out[1].value  # the first cell finished after the second ran
    assert out[3].value == "d" and out[3].attempts == 2  # its worker died on the first try
    threads, omp, cache, pid = out[2].value
    assert (threads, omp, cache) == (1, "1", os.environ["EXCISE_CACHE"]) and pid != os.getpid()


_ORPHAN = """
import os, sys, time
from excise.app import dispatch as D
with D.LocalExecutor(workers=1, threads=1) as ex:
    print(ex.result(ex.submit(os.getpid, ())).value, flush=True)
    ex.submit(time.sleep, (300,))  # a long cell, running when this process is killed
    time.sleep(300)
"""


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] in "ZX"
    except (FileNotFoundError, ProcessLookupError):
        return True


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc (Linux)")
def test_a_killed_caller_leaves_no_pool_worker_running():
    """SIGKILL the process that owns a local pool while a cell runs: no cleanup code of its
    own runs, yet its worker exits within seconds instead of computing on."""
    import signal
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", _ORPHAN], stdout=subprocess.PIPE, text=True,
                            cwd=ROOT)
    try:
        worker = int(proc.stdout.readline())
        time.sleep(0.5)
        assert not _gone(worker)  # the long cell is running in it
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        t = time.time()
        while not _gone(worker) and time.time() - t < 15:
            time.sleep(0.1)
        assert _gone(worker), f"pool worker {worker} still running after its caller died"
    finally:
        proc.kill()


def test_dispatch_refuses_bad_cells_and_settings():
    with pytest.raises(ValueError, match="not a module-level function"):
        D.Cell("x", lambda: 1)
    with pytest.raises(ValueError, match="two cells named 'a'"):
        D.dispatch([D.Cell("a", _plus, (1, 2)), D.Cell("a", _plus, (1, 2))],
                   D.SerialExecutor(1))
    with pytest.raises(ValueError, match="needs 'b', which is not an earlier cell"):
        D.dispatch([D.Cell("a", _plus, (1,), needs=("b",)), D.Cell("b", _plus, (1, 2))],
                   D.SerialExecutor(1))
    with pytest.raises(ValueError, match="retries=-1"):
        D.dispatch([], D.SerialExecutor(1), retries=-1)
    with pytest.raises(ValueError, match="choose one of serial, local, ray"):
        D.make_executor("threads")
    n = D.cores()
    with pytest.raises(ValueError, match="oversubscribe"):
        D.LocalExecutor(workers=n + 1, threads=1)
    assert D.LocalExecutor(threads=1).workers == n  # the default: cores // threads
    assert D.LocalExecutor(threads=n + 1).workers == 1


def test_executor_ray_without_ray_is_refused_naming_the_install(monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "ray" else find_spec(name, *a))
    with pytest.raises(ValueError, match=r"needs Ray, which is not installed: pip install "
                                         r"'excise\[ray\]'"):
        D.make_executor("ray")
    with pytest.raises(ConfigError, match="needs Ray"):
        sweep.load_config(ROOT / "configs" / "sweep-tiny.yaml", ["executor=ray"])


@pytest.mark.parametrize("change, message", [
    ({"executor": "rey"}, "executor='rey': choose one of serial, local, ray"),
    ({"workers": 0}, "workers=0: must be a positive integer"),
    ({"retries": -1}, "retries=-1: must be a non-negative integer"),
])
def test_bad_dispatch_keys_are_refused(change, message):
    raw = {"organism": {"preset": "tiny"}, "validation": {"first": 20, "people": 2},
           "locate": {"grad_ratio": {}}, "splits": {"forget05": 3}, "seeds": [0], "stride": 3,
           "recipes": {"dampen": {"apply": [{"edit": "dampen"}], "grid": [{"alpha": 5.0}]}}}
    cfg = sweep.build_config(raw)
    assert (cfg.executor, cfg.workers, cfg.retries) == ("local", None, 1)  # the defaults
    with pytest.raises(ConfigError, match=message):
        sweep.build_config(raw | change)


# -- the tiny sweep's report cells -------------------------------------------------------------

# one split x one seed: a cell measuring what the request's finalists share, then two finalist
# cells that run side by side
FINALISTS = [{"locate": "grad_ratio", "edit": "dampen", "hp": {"alpha": 5.0, "lam": 1.0}},
             {"locate": "grad_ratio", "edit": "prune", "hp": {"top": 8}}]


def _records(rows) -> list[dict]:
    """The JSON records of the rows, less their timing."""
    recs = json.loads(sweep.dumps_records(rows))
    for r in recs:
        r.pop("seconds", None)
    return recs


@pytest.fixture(scope="module")
def tiny_cfg():
    return sweep.load_config(ROOT / "configs" / "sweep-tiny.yaml")


@pytest.fixture(scope="module")
def serial_rows(tiny, tiny_oracle, tiny_cfg):
    rows, curves = sweep.report_stage(tiny, tiny_cfg, FINALISTS, lambda m: None,
                                      D.SerialExecutor(threads=1))
    assert curves == {}  # behaviour only: no attack curves
    return _records(rows)


def test_tiny_report_cells_on_a_local_pool_equal_the_serial_run(tiny, tiny_cfg, serial_rows):
    assert [(r["locate"], r["edit"], r["hp"]) for r in serial_rows] == [
        (f["locate"], f["edit"], f["hp"]) for f in FINALISTS]
    assert all("error" not in r and r["metrics"]["after"]["forget_recall"] <= 1.0
               for r in serial_rows)
    log: list[str] = []
    local = sweep.sweep_executor(dataclasses.replace(tiny_cfg, executor="local", workers=2),
                                 threads=1)
    rows, _ = sweep.report_stage(tiny, tiny_cfg, FINALISTS, log.append, local)
    assert _records(rows) == serial_rows
    assert "3 cells on local (2 worker(s) x 1 thread(s))" in log


def test_tiny_report_cells_as_ray_tasks_equal_the_serial_run(tiny, tiny_cfg, serial_rows):
    import ray  # in the test extra: this test runs in CI

    assert not ray.is_initialized()
    rows, _ = sweep.report_stage(tiny, tiny_cfg, FINALISTS, lambda m: None,
                                 D.RayExecutor(workers=2, threads=1))
    assert _records(rows) == serial_rows
    assert not ray.is_initialized()  # the local instance it started is stopped


def test_a_failing_report_cell_is_retried_then_recorded(tiny, tiny_cfg, serial_rows):
    bad = {"locate": "grad_ratio", "edit": "dampen", "hp": {"alpha": -1.0, "lam": 1.0}}
    log: list[str] = []
    rows, _ = sweep.report_stage(tiny, tiny_cfg, [bad, FINALISTS[1], FINALISTS[0]], log.append,
                                 D.SerialExecutor(threads=1))
    assert _records(rows[1:]) == serial_rows[::-1]  # the other cells are untouched
    assert rows[0]["attempts"] == 2 and "alpha" in rows[0]["error"]
    assert {k: rows[0][k] for k in ("split", "seed", "locate", "edit", "hp")} == {
        "split": "forget05", "seed": 0} | bad
    # two finalists of one recipe: their cells are told apart by the setting
    assert any('grad_ratio + dampen {"alpha": -1.0, "lam": 1.0}: failed (try 1 of 2)' in line
               for line in log)


def test_excise_sweep_exits_1_naming_a_cell_that_still_fails(tmp_path, tiny, tiny_oracle):
    """`excise sweep` with a finalist whose setting its edit refuses: the records are written,
    the failed cell's row holds the error, the command exits 1. A bad --executor is refused
    before any model is built."""
    from typer.testing import CliRunner

    from excise.app.cli import app

    config = str(ROOT / "configs" / "sweep-tiny.yaml")
    r = CliRunner().invoke(app, ["sweep", config, "--executor", "rey", "--out",
                                 str(tmp_path / "no")])
    assert r.exit_code == 2 and "executor='rey': choose one of serial, local, ray" in r.output
    assert not (tmp_path / "no").exists()

    screen = {"base": {}, "skipped": [], "locate_seconds": {}, "rows": [
        {"locate": "grad_ratio", "edit": "dampen", "hp": {"alpha": -1.0, "lam": 1.0},
         "forget": 0.1, "retain": 0.95, "shared": 1.0, "ppl": 40.0, "params": 0.001,
         "penalty": 0.0, "score": 0.1},
        {"locate": "grad_ratio", "edit": "prune", "hp": {"top": 8}, "forget": 0.9,
         "retain": 1.0, "shared": 1.0, "ppl": 40.0, "params": 0.001, "penalty": 0.0,
         "score": 0.9}]}
    (tmp_path / "screen.json").write_text(json.dumps(screen))
    out = tmp_path / "sweep"
    r = CliRunner().invoke(app, ["sweep", config, "--screen", str(tmp_path / "screen.json"),
                                 "--set", "executor=local", "--executor", "serial", "--threads",
                                 "1", "--out", str(out), "--quiet"])
    assert r.exit_code == 1, r.output
    assert "error: 1 of 2 report cells failed after 1 retries" in r.output
    assert "forget05 seed 0 grad_ratio + dampen: ValueError: dampen" in r.output
    res = json.loads((out / "sweep.json").read_text())
    assert res["dispatch"] == {"executor": "serial", "workers": 1, "threads": 1, "retries": 1,
                               "failed": 1}  # --executor wins over --set executor=local
    failed, ok = res["rows"]
    assert "alpha" in failed["error"] and failed["attempts"] == 2 and "metrics" not in failed
    assert ok["edit"] == "prune" and "error" not in ok and ok["metrics"]["after"]
