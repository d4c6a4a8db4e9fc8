"""The ``excise`` command line (typer): run, verify, sweep, organism train.

A refusal is one line on stderr, ``error: <what is wrong, and the valid choices>``, no
traceback. Exit codes:

- 0: done;
- 2: refused - a bad config, request, model or file, or an ``--out`` excise may not write (a
  file, a path under a file, a mount point, a non-empty folder that is not an excise run, a run
  without ``--overwrite``); nothing was written;
- 1: failed while running on an operating-system error (disk full, I/O error), named in the one
  line; any other failure is a bug and shows its traceback (also 1);
- 130: interrupted (SIGINT, Ctrl-C); 143: terminated (SIGTERM). The unfinished output's
  partial folder was removed and ``--out`` left as it was.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import List, Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Locate, cut out, and verify the deletion of knowledge in a transformer.")
organism_app = typer.Typer(no_args_is_help=True, help="The embedded model organism.")
app.add_typer(organism_app, name="organism")


EXIT_FAILED, EXIT_REFUSED, EXIT_INTERRUPTED, EXIT_TERMINATED = 1, 2, 130, 143

_THREADS_HELP = ("Torch threads to run at (default: the config's threads, else "
                 "OMP_NUM_THREADS, else every core). Set it where other processes share the "
                 "cores. CPU numbers depend on it: same torch, same threads, same numbers.")


_DEVICE_HELP = ("Where the model runs: auto (a GPU when present), cpu, cuda, cuda:N, mps "
                "(default: the config's model.device, else the CPU).")
_DTYPE_HELP = ("The weights' dtype: float32, bfloat16, float16 (default: the config's "
               "model.dtype, else float32). Sums that need precision stay float32.")


def _threads_set(set_: List[str], threads: Optional[int], device: Optional[str] = None,
                 dtype: Optional[str] = None) -> List[str]:
    """``--threads N`` / ``--device D`` / ``--dtype T`` as the config overrides ``threads=N``,
    ``model.device=D``, ``model.dtype=T`` (checked with the config)."""
    extra = [f"{key}={v}" for key, v in (("threads", threads), ("model.device", device),
                                          ("model.dtype", dtype)) if v is not None]
    return [*set_, *extra]


def _fail(msg: str, code: int = EXIT_REFUSED) -> None:
    typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


@contextmanager
def _refusals():
    """Every refusal excise raises (``ConfigError`` and the ``ValueError`` of validation, a
    missing file) as one ``error:`` line and exit code 2; an OS error as one line and 1; SIGINT
    and SIGTERM as one line and 130 / 143."""
    from excise.app.folders import Terminated

    try:
        yield
    except Terminated:
        _fail("terminated by SIGTERM before it finished; nothing was written (its partial "
              "folder was removed)", EXIT_TERMINATED)
    except KeyboardInterrupt:
        _fail("interrupted (SIGINT) before it finished; nothing was written (its partial folder "
              "was removed)", EXIT_INTERRUPTED)
    except (ValueError, FileNotFoundError) as e:  # (ConfigError is a ValueError)
        _fail(str(e))
    except OSError as e:
        _fail(f"{e.strerror or e}{f': {e.filename}' if e.filename else ''}", EXIT_FAILED)


@app.command()
def run(config: Optional[Path] = typer.Argument(None, help="Pipeline YAML (default: "
                                                 "configs/default.yaml)."),
        set_: List[str] = typer.Option([], "--set", help="Override a key, e.g. edit.alpha=5."),
        out: Optional[Path] = typer.Option(None, "--out", help="Run folder to create."),
        overwrite: bool = typer.Option(False, help="Replace a run excise wrote in --out: "
                                       "removes only the files its run.json lists."),
        threads: Optional[int] = typer.Option(None, "--threads", help=_THREADS_HELP),
        device: Optional[str] = typer.Option(None, "--device", help=_DEVICE_HELP),
        dtype: Optional[str] = typer.Option(None, "--dtype", help=_DTYPE_HELP),
        quiet: bool = typer.Option(False, help="No progress bars.")):
    """Run locate -> edit -> verify and write a run folder."""
    from excise import config as C
    from excise.app import pipeline

    with _refusals():
        cfg = C.load(config, _threads_set(set_, threads, device, dtype), pipeline.registries())
        target = out or pipeline.default_out(cfg)
        result = pipeline.run(cfg, target, overwrite=overwrite, progress=not quiet,
                              log=lambda m: typer.echo(m, err=True))
    r = result.report
    typer.echo("")
    typer.echo(r.summary_text())
    typer.echo("")
    ed = r.edit
    typer.echo(f"edit: {ed['method']} on {ed['locate']} - {ed['params_changed']:,} parameters "
               f"changed ({100 * ed['params_changed_frac']:.3f}%)")
    if r.verdict:
        typer.echo(r.verdict_text())
    typer.echo(f"run folder: {result.folder}  ({result.seconds:.0f} s)")


@organism_app.command("train")
def organism_train(preset: str = typer.Argument("small"), seed: int = typer.Option(0)):
    """Train (or load from the cache) an organism and print its recall."""
    import excise
    import probes

    with _refusals():
        org = excise.organism(preset, seed=seed)
    req = org.request(forget_people=[0])
    rep = probes.verify(org.model, req)
    typer.echo(repr(org))
    typer.echo(rep.summary_text())


@app.command()
def verify(target: Path = typer.Argument(..., help="A run folder (with config.yaml and "
                                         "edit.safetensors, or a chain's edit-0.safetensors, "
                                         "edit-1.safetensors ...) or an edit diff file."),
           config: Optional[Path] = typer.Option(None, "--config", help="Pipeline YAML (default: "
                                                 "the run folder's config.yaml)."),
           set_: List[str] = typer.Option([], "--set", help="Override a key, e.g. "
                                          "verify.suite=all."),
           suite: Optional[str] = typer.Option(None, help="Suites, comma separated, or 'all' "
                                               "(default: the config's verify.suite)."),
           grid: Optional[str] = typer.Option(None, help="The attacks' grid of learning rates "
                                              "x seeds: quick or full (default: the config's "
                                              "verify.grid, else quick)."),
           out: Optional[Path] = typer.Option(None, "--out", help="Folder for the report "
                                              "(default: <run folder>/verify); a new or empty "
                                              "folder, never the run itself."),
           overwrite: bool = typer.Option(False, help="Replace a verify report (or run) excise "
                                          "wrote in --out: removes only the files its run.json "
                                          "lists."),
           threads: Optional[int] = typer.Option(None, "--threads", help=_THREADS_HELP),
           device: Optional[str] = typer.Option(None, "--device", help=_DEVICE_HELP),
           quiet: bool = typer.Option(False, help="No progress messages.")):
    """Re-apply a saved edit diff (or a chain's diffs, in order) to the run's model (organism
    or Hugging Face) and verify."""
    import probes
    from excise import config as C
    from excise.app import folders, pipeline
    from excise.edits import Diff
    from excise.train import using_threads

    target = Path(target)
    diff_paths = _run_diffs(target) if target.is_dir() else [target]
    run_dir = target if target.is_dir() else target.parent
    cfg_path = config or run_dir / "config.yaml"
    if not diff_paths or not diff_paths[0].exists():
        _fail(f"no edit diff at {diff_paths[0] if diff_paths else target / 'edit.safetensors'}"
              f"; give a run folder from `excise run` or an edit.safetensors file")
    diff_path = diff_paths[0]
    if not cfg_path.exists():
        _fail(f"no config at {cfg_path}; pass --config with the pipeline YAML the edit was "
              f"made with")
    if folders.incomplete(run_dir):
        _fail(f"{run_dir} is a run whose replacement (--overwrite) was stopped half-way: it "
              f"mixes files of two runs. Run it again with `excise run --overwrite`")
    folder = out or run_dir / "verify"
    real_folder, real_run = Path(os.path.realpath(folder)), Path(os.path.realpath(run_dir))
    if real_run == real_folder or real_folder in real_run.parents:
        _fail(f"--out {folder} {'is' if real_run == real_folder else 'holds'} the run being "
              f"verified ({run_dir}); its metrics.json and report.md stay as the run wrote them. "
              f"Give another folder (default: {run_dir / 'verify'})")
    log = (lambda m: None) if quiet else (lambda m: typer.echo(m, err=True))
    with _refusals():
        folders.check_out(folder, overwrite, kind="verify")  # before any model is built
        if grid is not None:  # checked with the config, like verify.grid
            set_ = [*set_, f"verify.grid={grid}"]
        cfg = C.load(cfg_path, _threads_set(set_, threads, device), pipeline.registries())
        setup = pipeline.Setup.check(cfg)
        if suite:  # a typo in --suite is refused before any model is built
            from probes.suites import resolve

            resolve([s.strip() for s in suite.split(",")])
        if target.is_dir() and len(diff_paths) != len(cfg.edits):
            raise C.ConfigError(f"{run_dir} holds {len(diff_paths)} edit diff(s) "
                                f"({', '.join(p.name for p in diff_paths)}) but {cfg_path} "
                                f"lists {len(cfg.edits)} edit(s); verify a run with the config "
                                f"it was made with")
        diffs = [Diff.load(p) for p in diff_paths]
        of = {"id": folders.manifest_id(run_dir), "run": str(real_run),
              "diff": diff_path.name if len(diffs) == 1 else [p.name for p in diff_paths]}
        with folders.staged(folder, overwrite=overwrite, kind="verify", info={"of": of},
                            log=log) as tmp, using_threads(cfg.threads) as n_threads:
            subject = setup.build(progress=not quiet, log=log)
            req = subject.request
            oracle = subject.oracle(cfg.verify.oracle, cfg.verify.oracles)
            original = subject.model.clone()
            edited = subject.model  # built for this command alone: edit it in place
            for diff in diffs:  # in order: each checks its fingerprints before and after
                diff.apply(edited)
            suites = ([s.strip() for s in suite.split(",")] if suite else cfg.verify.suite)
            log(f"verify: {suites} on {', '.join(str(p) for p in diff_paths)}")
            report = probes.verify(edited, req, oracle=oracle, suite=suites, label="after",
                                   original=original, log=log,
                                   cache=pipeline.verify_cache(cfg, log), **cfg.verify.params)
            if subject.not_known:  # facts the model did not produce before editing
                report.extra["not_known"] = subject.not_known
            if len(diffs) == 1:
                report.edit = {k: diffs[0].manifest.get(k) for k in (
                    "method", "params", "params_changed", "params_changed_frac")}
            else:  # a chain: what it changed in all
                changed = pipeline.net_changed(edited, original)
                report.edit = {"method": "+".join(str(d.manifest.get("method")) for d in diffs),
                               "params": [d.manifest.get("params") for d in diffs],
                               "params_changed": changed,
                               "params_changed_frac": changed / max(1, edited.n_parameters())}
            report.plots = [Path(p).name for p in probes.write_plots(report, tmp)]
            report.extra["threads"] = n_threads
            report.save(tmp)
    typer.echo(report.summary_text())
    if report.verdict:
        typer.echo(report.verdict_text())
    typer.echo(f"report: {folder}")


def _run_diffs(run_dir: Path) -> list[Path]:
    """A run folder's edit diffs in the order they apply: ``edit.safetensors`` (one edit) or a
    chain's ``edit-0.safetensors``, ``edit-1.safetensors`` ... (consecutive from 0)."""
    one = run_dir / "edit.safetensors"
    if one.exists():
        return [one]
    chain, i = [], 0
    while (run_dir / f"edit-{i}.safetensors").exists():
        chain.append(run_dir / f"edit-{i}.safetensors")
        i += 1
    return chain


@app.command()
def sweep(config: Path = typer.Argument(..., help="Sweep YAML (e.g. configs/sweep.yaml)."),
          set_: List[str] = typer.Option([], "--set", help="Override a key, e.g. seeds=[0] "
                                         "or finalists=2."),
          out: Optional[Path] = typer.Option(None, "--out", help="Folder for sweep.json and "
                                             "screen.json (default: the config's out)."),
          stage: str = typer.Option("all", help="'screen' (validation screen and finalists "
                                    "only) or 'all'."),
          screen: Optional[Path] = typer.Option(None, "--screen", help="Reuse an earlier "
                                                "run's screen.json."),
          threads: Optional[int] = typer.Option(None, "--threads", help=_THREADS_HELP),
          executor: Optional[str] = typer.Option(None, "--executor", help="Where the report "
                                                 "stage's cells run: serial, local (a process "
                                                 "pool of cores // threads workers) or ray "
                                                 "(default: the config's executor, else "
                                                 "local)."),
          quiet: bool = typer.Option(False, help="No progress messages.")):
    """Screen locate x edit recipes, keep the best, report them beside retrain oracles. Exits 1
    (after writing the records) when a report cell still failed after its retries."""
    from excise import config as C
    from excise.app import sweep as S
    from excise.train import using_threads

    log = (lambda m: None) if quiet else (lambda m: typer.echo(m, err=True))
    with _refusals():
        if executor is not None:  # checked with the config, like executor: in the YAML
            set_ = [*set_, f"executor={executor}"]
        cfg = S.load_config(config, set_)
        with using_threads(C.check_threads(threads, "--threads")):
            res = S.run(cfg, out, stage=stage, screen_from=screen, log=log)
    rec = res.records
    typer.echo(f"finalists: {'; '.join(S.name(f) for f in rec['finalists'])}")
    if "rows" in rec:
        typer.echo(f"{len(rec['rows'])} reported runs ({len(rec['splits'])} splits x "
                   f"{len(rec['seeds'])} seeds x {len(rec['finalists'])} finalists)")
    typer.echo("records: " + ", ".join(str(p) for p in res.files) +
               f"  ({rec['seconds']:.0f} s)")
    failed = [r for r in rec.get("rows", []) if "error" in r]
    if failed:
        _fail(f"{len(failed)} of {len(rec['rows'])} report cells failed after "
              f"{rec['dispatch']['retries']} retries (their rows in sweep.json hold the error): "
              + "; ".join(f"{r['split']} seed {r['seed']} {S.name(r)}: {r['error']}"
                          for r in failed[:3]), EXIT_FAILED)


def main() -> None:  # console-script entry point
    app()


if __name__ == "__main__":
    sys.exit(main())
