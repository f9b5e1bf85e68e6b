"""The ``jethpo`` command line."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import typer

from hpo import __version__

app = typer.Typer(
    name="jethpo",
    help="Hyperparameter search for ConVAE+NF generation of LHC hadronic jets.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Make or inspect jet data sets.", no_args_is_help=True)
app.add_typer(data_app, name="data")


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"jethpo {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version_callback, is_eager=True, help="Print the version and exit."
    ),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log at DEBUG level instead of INFO."),
) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


@data_app.command("generate")
def data_generate(
    jets: int = typer.Option(..., "--jets", min=1, help="Number of jets to write."),
    out: Path = typer.Option(
        ..., "--out", help="Output directory. Receives jets.hdf5 and, in chunks/, the finished chunks."
    ),
    seed: int = typer.Option(0, "--seed", min=0, help="Seed of the run. The same seed and chunk size give the same jets."),
    workers: Optional[int] = typer.Option(
        None, "--workers", min=1, help="Worker processes. Defaults to the number of usable CPU cores."
    ),
    chunk_size: int = typer.Option(
        1000, "--chunk-size", min=1, help="Jets per chunk. Changing it changes which jets a seed gives."
    ),
) -> None:
    """Generate gluon jets near 1 TeV with Pythia 8 and FastJet.

    Rerunning the same command after an interruption reuses the finished chunks.

    The command prints the path of the jets file on stdout.
    """
    # Imported here because Pythia, FastJet and awkward take about a second to load, which
    # every other command would pay too.
    from models.generate import GenerationError, generate_jets

    if out.exists() and not out.is_dir():
        raise typer.BadParameter(f"{out} is a file, not a directory.", param_hint="--out")

    try:
        path = generate_jets(jets, out, seed=seed, workers=workers, chunk_size=chunk_size)
    except GenerationError as error:
        typer.echo(f"Error: {error}", err=True)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        typer.echo("Interrupted. Run the same command again to resume from the finished chunks.", err=True)
        raise typer.Exit(130) from None
    typer.echo(str(path))


def main() -> None:
    app()
