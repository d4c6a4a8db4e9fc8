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


def main() -> None:  # console-script entry point
    app()


if __name__ == "__main__":
    sys.exit(main())
