"""The ``excise`` command line (typer)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Locate, cut out, and verify the deletion of knowledge in a transformer.")
organism_app = typer.Typer(no_args_is_help=True, help="The embedded model organism.")
app.add_typer(organism_app, name="organism")


def _fail(msg: str, code: int = 2) -> None:
    typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


@app.command()
def run(config: Optional[Path] = typer.Argument(None, help="Pipeline YAML (default: "
                                                 "configs/default.yaml)."),
        set_: List[str] = typer.Option([], "--set", help="Override a key, e.g. edit.alpha=5."),
        out: Optional[Path] = typer.Option(None, "--out", help="Run folder to create."),
        overwrite: bool = typer.Option(False, help="Replace a run already in --out."),
        quiet: bool = typer.Option(False, help="No progress bars.")):
    """Run locate -> edit -> verify and write a run folder."""
    from excise import config as C
    from excise import pipeline

    try:
        cfg = C.load(config, set_, pipeline.registries())
        target = out or pipeline.default_out(cfg)
        result = pipeline.run(cfg, target, overwrite=overwrite, progress=not quiet,
                              log=lambda m: typer.echo(m, err=True))
    except (C.ConfigError, ValueError, FileNotFoundError) as e:
        _fail(str(e))
    r = result.report
    typer.echo("")
    typer.echo(r.summary_text())
    typer.echo("")
    ed = r.edit
    typer.echo(f"edit: {ed['method']} on {ed['locate']} - {ed['params_changed']:,} parameters "
               f"changed ({100 * ed['params_changed_frac']:.3f}%)")
    if r.verdict:
        typer.echo(f"verdict: {r.verdict}")
    typer.echo(f"run folder: {result.folder}  ({result.seconds:.0f} s)")


@organism_app.command("train")
def organism_train(preset: str = typer.Argument("small"), seed: int = typer.Option(0)):
    """Train (or load from the cache) an organism and print its recall."""
    import excise
    import probes

    try:
        org = excise.organism(preset, seed=seed)
    except ValueError as e:
        _fail(str(e))
    req = org.request(forget_people=[0])
    rep = probes.verify(org.model, req)
    typer.echo(repr(org))
    typer.echo(rep.summary_text())


@app.command()
def verify(target: Path = typer.Argument(..., help="A run folder (with config.yaml and "
                                         "edit.safetensors) or an edit diff file."),
           config: Optional[Path] = typer.Option(None, "--config", help="Pipeline YAML (default: "
                                                 "the run folder's config.yaml)."),
           set_: List[str] = typer.Option([], "--set", help="Override a key, e.g. "
                                          "verify.suite=all."),
           suite: Optional[str] = typer.Option(None, help="Suites, comma separated, or 'all' "
                                               "(default: the config's verify.suite)."),
           out: Optional[Path] = typer.Option(None, "--out", help="Folder for the report "
                                              "(default: <run folder>/verify)."),
           quiet: bool = typer.Option(False, help="No progress messages.")):
    """Re-apply a saved edit diff to the config's organism and run the verification suite."""
    from excise import config as C
    from excise import pipeline
    from excise.edits import Diff

    import excise
    import probes

    target = Path(target)
    diff_path = target / "edit.safetensors" if target.is_dir() else target
    run_dir = target if target.is_dir() else target.parent
    cfg_path = config or run_dir / "config.yaml"
    if not diff_path.exists():
        _fail(f"no edit diff at {diff_path}; give a run folder from `excise run` or an "
              f"edit.safetensors file")
    if not cfg_path.exists():
        _fail(f"no config at {cfg_path}; pass --config with the pipeline YAML the edit was "
              f"made with")
    log = (lambda m: None) if quiet else (lambda m: typer.echo(m, err=True))
    try:
        cfg = C.load(cfg_path, set_, pipeline.registries())
        people = pipeline.forget_people(cfg)
        org = excise.organism(cfg.organism.preset, seed=cfg.organism.seed, progress=not quiet)
        req = pipeline.build_request(cfg, org, people)
        oracle = org.oracle(req) if cfg.verify.oracle and req.forget_people() else None
        diff = Diff.load(diff_path)
        original = org.model.clone()
        edited = org.model.clone()
        diff.apply(edited)
        suites = ([s.strip() for s in suite.split(",")] if suite else cfg.verify.suite)
        log(f"verify: {suites} on {diff_path}")
        report = probes.verify(edited, req, oracle=oracle, suite=suites, label="after",
                               original=original, log=log, **cfg.verify.params)
        folder = out or run_dir / "verify"
        folder.mkdir(parents=True, exist_ok=True)
        report.edit = {k: diff.manifest.get(k) for k in ("method", "params", "params_changed",
                                                         "params_changed_frac")}
        report.plots = [Path(p).name for p in probes.write_plots(report, folder)]
        report.save(folder)
    except (C.ConfigError, ValueError, FileNotFoundError) as e:
        _fail(str(e))
    typer.echo(report.summary_text())
    if report.verdict:
        typer.echo(f"verdict: {report.verdict}")
    typer.echo(f"report: {folder}")


def main() -> None:  # console-script entry point
    app()


if __name__ == "__main__":
    sys.exit(main())
