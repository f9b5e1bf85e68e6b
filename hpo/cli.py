"""The ``jethpo`` command line.

Commands that read or write studies take ``--storage URL``, else ``JETHPO_STORAGE``, else the
SQLite file ``jethpo.db`` in the data directory (``--data-dir``, else ``JETHPO_DATA_DIR``,
else ``./jethpo-data``). Results go to stdout, and ``--json`` makes that exactly one JSON
document. Logs and errors go to stderr. Invalid input and unreachable databases end the
command with one ``Error:`` line on stderr and exit code 1.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Annotated, Any, Optional
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import typer

from hpo import __version__

if TYPE_CHECKING:
    import optuna

logger = logging.getLogger(__name__)

app = typer.Typer(
    name="jethpo",
    help="Hyperparameter search for ConVAE+NF generation of LHC hadronic jets.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    # click's plain help, because at 80 columns rich's option tables cut long option names with "…"
    rich_markup_mode=None,
)
data_app = typer.Typer(help="Make jet data sets with Pythia 8 and FastJet.", no_args_is_help=True)
app.add_typer(data_app, name="data")
spaces_app = typer.Typer(help="List, show, validate and add search spaces.", no_args_is_help=True)
app.add_typer(spaces_app, name="spaces")

DATA_DIR_ENV_VAR = "JETHPO_DATA_DIR"
DEFAULT_DATA_DIR = Path("jethpo-data")

StorageOption = Annotated[
    Optional[str],
    typer.Option(
        "--storage",
        help=(
            "Storage URL, such as postgresql://user:password@host:5432/jethpo or "
            "sqlite:////path/to/jethpo.db. Defaults to $JETHPO_STORAGE, else the SQLite file "
            "jethpo.db in the data directory."
        ),
        show_default=False,
    ),
]
DataDirOption = Annotated[
    Path,
    typer.Option(
        "--data-dir",
        envvar=DATA_DIR_ENV_VAR,
        help=(
            "Data directory that contains the default SQLite storage jethpo.db. A command that "
            "stores data there creates it."
        ),
    ),
]
ArtifactsOption = Annotated[
    Optional[Path],
    typer.Option(
        "--artifacts",
        envvar="JETHPO_ARTIFACTS",
        help=(
            "Artifact directory for checkpoints, plots and result tables, which every Ray node and the "
            "dashboard must read at the same path. Default: DATA_DIR/artifacts."
        ),
        show_default=False,
    ),
]
JsonOption = Annotated[
    bool,
    typer.Option("--json", help="Print one JSON document on stdout instead of a table."),
]


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
    except KeyboardInterrupt as interrupt:
        typer.echo("Interrupted. Run the same command again to resume from the finished chunks.", err=True)
        raise _exit_after_interrupt(interrupt) from None
    typer.echo(str(path))


# shared helpers of the study commands


@contextmanager
def _exit_on_user_errors(storage_url: str | None = None) -> Iterator[None]:
    """Turn the errors of invalid input and unusable databases into one stderr line and exit 1.

    Args:
        storage_url: URL of the storage, whose password is removed from database errors.
    """
    # Imported here because optuna, SQLAlchemy and the search space code take about a second
    # to load, which `jethpo data generate` and `--help` would pay too.
    import optuna
    import sqlalchemy.exc

    from hpo.spaces import ConfigError
    from hpo.studies import StudyError
    from storage.urls import StorageError, describe_database_error, mask_password, parse_storage_url

    try:
        yield
    except (StorageError, ConfigError, StudyError, OSError) as error:
        typer.echo(f"Error: {error}", err=True)
        raise typer.Exit(1) from None
    except (optuna.exceptions.StorageInternalError, sqlalchemy.exc.SQLAlchemyError) as error:
        try:
            password = parse_storage_url(storage_url).password if storage_url else None
        except StorageError:
            password = None
        reason = describe_database_error(error.__cause__ or error, password)
        where = mask_password(storage_url) if storage_url else "the storage"
        typer.echo(f"Error: database request to {where} failed: {reason}. Check the database and retry.", err=True)
        raise typer.Exit(1) from None


def _storage_url(storage_url: str | None, data_dir: Path, create_data_dir: bool = True) -> str:
    """Return ``--storage``, else ``JETHPO_STORAGE``, else the SQLite file in the data directory.

    Commands that only read a storage pass ``create_data_dir=False``, so that they leave no
    empty data directory behind.
    """
    from storage import resolve_storage_url

    try:
        return resolve_storage_url(storage_url, data_dir, create_data_dir=create_data_dir)
    except OSError as error:
        typer.echo(
            f"Error: failed to create the data directory {str(data_dir)!r}: {error.strerror}. "
            f"Pass another --data-dir.",
            err=True,
        )
        raise typer.Exit(1) from None


def _open_storage(url: str, must_exist: bool = False) -> optuna.storages.RDBStorage:
    """Open the storage and route Optuna's log records through the root logger.

    Commands that read what a run stored pass ``must_exist``, so that they report a SQLite
    file that does not exist, or a database without a storage, instead of creating one.
    """
    import optuna

    from storage import open_storage

    # Optuna's own stderr handler would print its records a second time
    optuna.logging.disable_default_handler()
    optuna.logging.enable_propagation()
    return open_storage(url, must_exist=must_exist)


def _stored_spaces(url: str) -> dict[str, Any]:
    """Return the shipped search spaces and those added to the storage.

    Before the first run has created the storage, only the shipped ones, without creating
    the storage.
    """
    from hpo.studies import builtin_spaces, load_spaces
    from storage.urls import StorageNotFoundError

    try:
        return load_spaces(_open_storage(url, must_exist=True))
    except StorageNotFoundError:
        return builtin_spaces()


def _masked(url: str) -> str:
    from storage.urls import mask_password

    return mask_password(url)


def _json_safe(value: Any) -> Any:
    """Replace non-finite floats with None, because JSON has no NaN or Infinity."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(key): _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    return value


def _print_json(document: Any) -> None:
    typer.echo(json.dumps(_json_safe(document), indent=2, allow_nan=False, default=str))


def _format_value(value: Any) -> str:
    """Format a table cell: floats to 4 significant digits, None as "-"."""
    if isinstance(value, float):
        return f"{value:.4g}"
    if value is None:
        return "-"
    return str(value)


def _table(title: str) -> Any:
    """Create a rich table whose borders and padding leave the columns room on 80 characters."""
    from rich import box
    from rich.table import Table

    return Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True, show_edge=False)


def _print_table(table: Any) -> None:
    from rich.console import Console

    Console().print(table)


# studies


@app.command("studies", short_help="List the studies with trial counts, best EMD_sum and budget.")
def studies_command(
    json_output: JsonOption = False,
    storage: StorageOption = None,
    data_dir: DataDirOption = DEFAULT_DATA_DIR,
) -> None:
    """List the studies in the storage with their trial counts, best EMD_sum and budget."""
    from hpo.studies import REPORTED_STATES, study_summaries

    url = _storage_url(storage, data_dir, create_data_dir=False)
    with _exit_on_user_errors(url):
        rdb = _open_storage(url, must_exist=True)
        summaries = study_summaries(rdb)

    if json_output:
        _print_json({"storage": _masked(url), "studies": summaries})
        return
    if not summaries:
        typer.echo(f"No jethpo studies in {_masked(url)} yet. Start a search with 'jethpo run'.")
        return

    table = _table(f"Studies in {_masked(url)}")
    table.add_column("Study", no_wrap=True)
    for state in REPORTED_STATES:
        table.add_column(state, justify="right")
    table.add_column("Budget", justify="right")
    table.add_column("Best EMD_sum", justify="right")
    for summary in summaries:
        table.add_row(
            summary["study"],
            *(str(summary["states"][state]) for state in REPORTED_STATES),
            _format_value(summary["budget"].get("n_trials")),
            _format_value(summary["best_value"]),
        )
    _print_table(table)

    failures = [summary for summary in summaries if summary["fail_reasons"]]
    if failures:
        typer.echo("Failure reasons of FAIL trials:")
    for summary in failures:
        reasons = ", ".join(f"{reason} {count}" for reason, count in summary["fail_reasons"].items())
        typer.echo(f"  {summary['study']}: {reasons}")


@app.command("best", short_help="Show the best COMPLETE trial of a study.")
def best_command(
    study: Annotated[str, typer.Argument(help="Study name, such as convae-gen.loss.")],
    json_output: JsonOption = False,
    storage: StorageOption = None,
    data_dir: DataDirOption = DEFAULT_DATA_DIR,
) -> None:
    """Show the best COMPLETE trial of a study with all its parameters and user attributes."""
    from hpo.studies import best_trial_summary, find_stage, load_spaces, load_study

    url = _storage_url(storage, data_dir, create_data_dir=False)
    with _exit_on_user_errors(url):
        rdb = _open_storage(url, must_exist=True)
        space, stage = find_stage(load_spaces(rdb), study)
        summary = best_trial_summary(load_study(rdb, space, stage), space, stage)

    if json_output:
        _print_json(summary)
        return

    # rounded as in the tables, while --json keeps the full value
    typer.echo(f"Study {summary['study']}: best trial {summary['number']}, EMD_sum {_format_value(summary['value'])}")
    table = _table("Parameters")
    table.add_column("Name")
    table.add_column("Value", justify="right")
    table.add_column("Origin")
    for name, value in summary["params"].items():
        origin = next(
            (kind for kind in ("tuned", "fixed", "inherited") if name in summary[kind]),
            "recorded",
        )
        table.add_row(name, str(value), origin)
    _print_table(table)

    attrs = {name: value for name, value in summary["user_attrs"].items() if name != "params"}
    if attrs:
        typer.echo("User attributes:")
        for name, value in attrs.items():
            typer.echo(f"  {name}: {value}")


class _DuplicateKeyError(ValueError):
    """Error for a JSON object that contains the same key twice."""


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json.loads silently keeps the last of two equal keys, which would drop a value
    values: dict[str, Any] = {}
    for key, value in pairs:
        if key in values:
            raise _DuplicateKeyError(f"the key {key!r} appears twice")
        values[key] = value
    return values


@app.command("enqueue", short_help="Add a WAITING trial with given parameters to a study.")
def enqueue_command(
    study: Annotated[str, typer.Argument(help="Study name, such as convae-gen.loss.")],
    params: Annotated[
        str,
        typer.Option(
            "--params",
            help=(
                'Parameters of the trial as a JSON object, such as \'{"lr": 0.001, "beta": 0.95}\'. '
                "Tuned parameters left out are suggested by the sampler."
            ),
        ),
    ],
    storage: StorageOption = None,
    data_dir: DataDirOption = DEFAULT_DATA_DIR,
) -> None:
    """Add a WAITING trial with the given parameters, checked against the study's search space."""
    from hpo.studies import enqueue

    try:
        values = json.loads(params, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as error:
        typer.echo(
            f"Error: invalid --params {params!r}: not valid JSON ({error}). "
            f'Pass a JSON object such as \'{{"lr": 0.001}}\'.',
            err=True,
        )
        raise typer.Exit(1) from None
    except _DuplicateKeyError as error:
        typer.echo(f"Error: invalid --params {params!r}: {error}. Give each parameter once.", err=True)
        raise typer.Exit(1) from None
    if not isinstance(values, dict):
        typer.echo(
            f"Error: invalid --params {params!r}: expected a JSON object of parameter names and "
            f'values, not a {type(values).__name__}. Pass an object such as \'{{"lr": 0.001}}\'.',
            err=True,
        )
        raise typer.Exit(1)

    from sqlalchemy import select

    from storage.pipeline import StageState, stages_table

    url = _storage_url(storage, data_dir)
    with _exit_on_user_errors(url):
        rdb = _open_storage(url)
        with rdb.engine.connect() as connection:
            # the study's search stage, not the steps that name the same study
            registered = connection.execute(
                select(stages_table.c.pipeline, stages_table.c.state).where(
                    stages_table.c.study_name == study, stages_table.c.stage == study
                )
            ).all()
        finished = [row.pipeline for row in registered if row.state in (StageState.DONE.value, StageState.FAILED.value)]
        if finished:
            typer.echo(
                f"Error: study {study} is a finished stage of pipeline {', '.join(finished)}, and no worker runs "
                f"trials of a finished stage. Enqueue trials before or while the stage runs.",
                err=True,
            )
            raise typer.Exit(1)
        added = enqueue(rdb, study, values)

    if added:
        typer.echo(f"Enqueued a WAITING trial in study {study} with parameters {json.dumps(values)}.")
    else:
        typer.echo(f"Study {study} already has a trial with parameters {json.dumps(values)}, so nothing was enqueued.")


# search spaces


@spaces_app.command("list")
def spaces_list(
    json_output: JsonOption = False,
    storage: StorageOption = None,
    data_dir: DataDirOption = DEFAULT_DATA_DIR,
) -> None:
    """List the shipped search spaces and those added to the storage."""
    from hpo.studies import space_origin

    url = _storage_url(storage, data_dir, create_data_dir=False)
    with _exit_on_user_errors(url):
        spaces = _stored_spaces(url)

    if json_output:
        document = [
            {
                "name": space.name,
                "model": space.model,
                "objective": space.objective,
                "studies": list(space.study_names),
                "origin": space_origin(space),
                "fingerprint": space.fingerprint,
                "description": space.description,
            }
            for space in spaces.values()
        ]
        _print_json({"storage": _masked(url), "spaces": document})
        return

    table = _table(f"Search spaces in {_masked(url)}")
    for column in ("Name", "Model", "Objective", "Studies", "Origin"):
        table.add_column(column)
    for space in spaces.values():
        table.add_row(space.name, space.model, space.objective, ", ".join(space.study_names), space_origin(space))
    _print_table(table)


@spaces_app.command("show")
def spaces_show(
    name: Annotated[str, typer.Argument(help="Search space name, such as convae-gen.")],
    storage: StorageOption = None,
    data_dir: DataDirOption = DEFAULT_DATA_DIR,
) -> None:
    """Print the YAML text of a search space."""
    url = _storage_url(storage, data_dir, create_data_dir=False)
    with _exit_on_user_errors(url):
        spaces = _stored_spaces(url)

    if name not in spaces:
        typer.echo(f"Error: search space {name!r} not found. Known search spaces: {', '.join(spaces)}.", err=True)
        raise typer.Exit(1)
    typer.echo(spaces[name].to_yaml(), nl=False)


@spaces_app.command("validate")
def spaces_validate(
    path: Annotated[Path, typer.Argument(help="Search space YAML file.")],
    storage: Annotated[
        Optional[str],
        typer.Option(
            "--storage",
            help=(
                "Storage URL whose added search spaces are checked too, for name conflicts and "
                "latents_from. Defaults to $JETHPO_STORAGE. Without either, only the shipped "
                "search spaces are checked."
            ),
            show_default=False,
        ),
    ] = None,
) -> None:
    """Check a search space file without storing it.

    The file must parse, follow the schema described in hpo/spaces.py, and fit next to the
    known search spaces: no known space of the same name with different content, and a
    latents_from that names a convae space.
    """
    import os

    from hpo.spaces import builtin_spaces, load_space
    from hpo.studies import check_new_space, load_spaces, space_origin
    from storage.urls import STORAGE_ENV_VAR

    url = storage or os.environ.get(STORAGE_ENV_VAR) or None
    with _exit_on_user_errors(url):
        space = load_space(path)
        known = builtin_spaces() if url is None else load_spaces(_open_storage(url, must_exist=True))
        same = check_new_space(space, known)

    studies = ", ".join(space.study_names)
    typer.echo(
        f"{path}: valid search space {space.name!r} (model {space.model}, objective "
        f"{space.objective}, studies {studies})."
    )
    if same is not None:
        typer.echo(f"It has the same content as the {space_origin(same)} search space {same.name!r}.")


@spaces_app.command("add")
def spaces_add(
    path: Annotated[Path, typer.Argument(help="Search space YAML file.")],
    storage: StorageOption = None,
    data_dir: DataDirOption = DEFAULT_DATA_DIR,
) -> None:
    """Validate a search space file and store it, so that every worker can run its studies.

    Nothing is stored when the file is invalid or its name is taken by a search space with
    different content.
    """
    from hpo.studies import add_space

    url = _storage_url(storage, data_dir)
    with _exit_on_user_errors(url):
        rdb = _open_storage(url)
        space, created = add_space(rdb, path)

    studies = ", ".join(space.study_names)
    if created:
        typer.echo(f"Added search space {space.name!r} with studies {studies} to {_masked(url)}.")
    else:
        typer.echo(
            f"Search space {space.name!r} is already known with the same content "
            f"({space.source}), so nothing was stored."
        )


# search runs


ProfileOption = Annotated[
    str,
    typer.Option(
        "--profile",
        help="Run profile: a shipped name (paper, quick, smoke) or the path of a profile YAML file.",
    ),
]
AddressOption = Annotated[
    Optional[str],
    typer.Option(
        "--address",
        envvar="RAY_ADDRESS",
        help="Address of a Ray cluster to join, such as 10.0.0.5:6379. Without it, a local Ray instance is started.",
        show_default=False,
    ),
]
WorkersOption = Annotated[
    Optional[int],
    typer.Option(
        "--workers",
        min=1,
        help=(
            "Number of workers, each running one trial at a time. Defaults to one per GPU when the "
            "profile's trials request GPUs, else as many as the CPUs of the Ray cluster hold trials."
        ),
        show_default=False,
    ),
]
HeartbeatIntervalOption = Annotated[
    int,
    typer.Option(
        "--heartbeat-interval",
        envvar="JETHPO_HEARTBEAT_INTERVAL",
        min=1,
        help=(
            "Seconds between heartbeats of a running trial or step. Use the same value for every jethpo "
            "process of a storage."
        ),
    ),
]
GracePeriodOption = Annotated[
    int,
    typer.Option(
        "--grace-period",
        envvar="JETHPO_GRACE_PERIOD",
        min=2,
        help=(
            "Seconds without a heartbeat after which a RUNNING trial is marked FAIL and retried with the "
            "same parameters, and a started step is taken over by the next worker. Must be longer than the "
            "heartbeat interval."
        ),
    ),
]

KeepFreedMemoryOption = Annotated[
    bool,
    typer.Option(
        "--keep-freed-memory/--no-keep-freed-memory",
        envvar="JETHPO_KEEP_FREED_MEMORY",
        help=(
            "Start workers with glibc malloc settings that keep freed memory for the next training step "
            "(faster CPU training, a higher peak memory). A MALLOC_ variable set in this command's environment "
            "keeps its value."
        ),
    ),
]


@contextmanager
def _exit_on_run_errors(storage_url: str | None) -> Iterator[None]:
    """Turn run errors into one stderr line and exit 1, and Ctrl-C or SIGTERM into exit 130 or 143."""
    from hpo.workers import RunError
    from models.generate import GenerationError

    try:
        with _exit_on_user_errors(storage_url):
            yield
    except (RunError, GenerationError, ValueError) as error:
        typer.echo(f"Error: {error}", err=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt as interrupt:
        typer.echo(
            "Interrupted. Run the same command again to resume: finished chunks of generated jets are kept, "
            "interrupted trials run again with the same parameters, and a retraining continues from its last "
            "saved epoch.",
            err=True,
        )
        raise _exit_after_interrupt(interrupt) from None


def _exit_after_interrupt(interrupt: KeyboardInterrupt) -> typer.Exit:
    """Ignore further Ctrl-C and SIGTERM, and return the exit with 128 plus the signal number.

    The code is what a shell reports: 130 for Ctrl-C, 143 for SIGTERM. The SIGTERM handlers
    of ``hpo.workers`` and ``models.generate`` raise KeyboardInterrupt with the argument
    "SIGTERM". The command has finished its cleanup by then, and a Ctrl-C during the
    interpreter's exit would only end it by the signal instead of the code.
    """
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        for number in (signal.SIGINT, signal.SIGTERM):
            signal.signal(number, signal.SIG_IGN)
    return typer.Exit(128 + (signal.SIGTERM if interrupt.args == ("SIGTERM",) else signal.SIGINT))


def _worker_settings(
    url: str,
    heartbeat_interval: int,
    grace_period: int,
    data: str | None = None,
    artifacts: Path | None = None,
    keep_freed_memory: bool = True,
) -> Any:
    import optuna

    from hpo.workers import WorkerSettings

    # Optuna's own stderr handler would print its records a second time
    optuna.logging.disable_default_handler()
    optuna.logging.enable_propagation()
    return WorkerSettings(
        url,
        heartbeat_interval=heartbeat_interval,
        grace_period=grace_period,
        data_path=data,
        artifact_dir=str(Path(artifacts).expanduser().resolve()) if artifacts else None,
        keep_freed_memory=keep_freed_memory,
    )


def _warn_sqlite_on_cluster(url: str, address: str | None) -> None:
    if address and url.startswith("sqlite"):
        logger.warning(
            "The storage %s is a SQLite file, which works on a Ray cluster only if every node reads "
            "it at the same path on a shared file system. Pass a PostgreSQL URL with --storage.",
            _masked(url),
        )


def _print_outcome(outcome: Any) -> None:
    """Print one row per stage: state, finished trials out of the budget and best EMD_sum.

    Steps run once, so their Done column shows ``step`` instead of a trial count.
    """
    progress = outcome.progress
    if progress is None:
        return
    table = _table("Pipeline stages")
    for column in ("Stage", "State", "Done", "Best EMD_sum", "Best trial"):
        table.add_column(column)
    for stage in progress.stages:
        done = "step" if stage.is_step else f"{stage.counts.finished}/{stage.n_trials}"
        table.add_row(
            stage.name,
            stage.state.value,
            done,
            _format_value(stage.best_value),
            _format_value(stage.best_trial),
        )
    _print_table(table)


def _exit_on_failed_stages(outcome: Any, url: str) -> None:
    """Exit 1 with stderr lines when a stage failed or a worker stopped with an error."""
    failed = [(pipeline, name) for (pipeline, name), state in outcome.states.items() if state.value == "failed"]
    if failed:
        from storage.pipeline import get_outputs

        with _exit_on_user_errors(url):
            engine = _open_storage(url).engine
            for pipeline in dict.fromkeys(pipeline for pipeline, _ in failed):
                for name, output in get_outputs(engine, pipeline).items():
                    if (pipeline, name) in failed and output.get("error"):
                        typer.echo(f"Step {name} of pipeline {pipeline} failed: {output['error']}", err=True)
        names = ", ".join(name for _, name in failed)
        typer.echo(f"Error: stages {names} failed. The log above gives the reasons.", err=True)
        raise typer.Exit(1)
    if outcome.worker_errors:
        typer.echo(
            f"Error: {len(outcome.worker_errors)} workers stopped with an error. The log above gives the reasons.",
            err=True,
        )
        raise typer.Exit(1)
    if not outcome.ok:
        typer.echo("Error: the pipeline did not finish. Run the same command again to resume it.", err=True)
        raise typer.Exit(1)


def _profile_to_run(url: str) -> str:
    """Return the profile that ``jethpo run`` runs without --profile: the storage's pipeline, else quick."""
    from hpo.pipeline import pipeline_names
    from hpo.spaces import builtin_profiles
    from hpo.workers import RunError

    rdb = _open_storage(url)
    try:
        names = pipeline_names(rdb)
    finally:
        rdb.engine.dispose()
    if not names:
        return "quick"
    if len(names) > 1:
        raise RunError(
            f"{_masked(url)} contains the pipelines {', '.join(names)}. Pass --profile with the one to run."
        )
    if names[0] not in builtin_profiles():
        return _registered_profile_file(url, names[0])
    logger.info("No --profile given: resuming pipeline %s, the one in %s", names[0], _masked(url))
    return names[0]


def _registered_profile_file(url: str, pipeline: str) -> str:
    """Return the profile file that pipeline ``pipeline`` was registered with, if it still exists."""
    from hpo.pipeline import registered_run
    from hpo.workers import RunError

    rdb = _open_storage(url)
    try:
        registered = registered_run(rdb, pipeline) or {}
    finally:
        rdb.engine.dispose()
    path = registered.get("profile_file")
    if path is None:
        raise RunError(
            f"{_masked(url)} contains pipeline {pipeline!r} of a profile file. Pass --profile with the path of that file."
        )
    if not Path(path).is_file():
        raise RunError(
            f"{_masked(url)} contains pipeline {pipeline!r} of the profile file {path}, which no longer exists. "
            f"Restore the file, or pass --profile with the path where it is now."
        )
    logger.info("No --profile given: resuming pipeline %s with its profile file %s", pipeline, path)
    return path


@app.command("run", short_help="Run a profile's whole pipeline: search, retrain, evaluate.")
def run_command(
    profile: Annotated[
        Optional[str],
        typer.Option(
            "--profile",
            help=(
                "Run profile: a shipped name (paper, quick, smoke) or the path of a profile YAML file. "
                "Default: the profile of the pipeline in the storage, else quick."
            ),
            show_default=False,
        ),
    ] = None,
    storage: StorageOption = None,
    data_dir: DataDirOption = DEFAULT_DATA_DIR,
    data: Annotated[
        Optional[str],
        typer.Option(
            "--data",
            help=(
                "Jets file or directory (jethpo, JetNet or HLS4ML) that every Ray node can read. Without it, "
                "the profile's n_jets Pythia jets are generated into DATA_DIR/pythia on the first run."
            ),
            show_default=False,
        ),
    ] = None,
    artifacts: ArtifactsOption = None,
    address: AddressOption = None,
    workers: WorkersOption = None,
    family: Annotated[
        Optional[list[str]],
        typer.Option(
            "--family",
            help="Run only the stages of this search space. Repeat the option for several; default: all.",
            show_default=False,
        ),
    ] = None,
    heartbeat_interval: HeartbeatIntervalOption = 60,
    grace_period: GracePeriodOption = 120,
    keep_freed_memory: KeepFreedMemoryOption = True,
    progress: Annotated[
        Optional[bool],
        typer.Option(
            "--progress/--no-progress",
            help="Show the live progress table instead of one log line per trial. Default: on a terminal only.",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Run a profile's whole pipeline on Ray workers: search, retrain, evaluate, report.

    The pipeline is named after the profile and stored with the studies, so running the
    same command again after an interruption resumes it: finished stages and trials are
    kept, and trials that were running are retried. Once every stage is done, it prints
    the results table, and running it again prints the same table.
    """
    import sys

    from hpo.spaces import load_profile
    from hpo.workers import existing_data_path, run_pipeline

    # checked before the storage is opened, which creates its tables
    with _exit_on_run_errors(storage):
        if data is not None:
            existing_data_path(data)
        chosen = load_profile(profile) if profile is not None else None

    url = _storage_url(storage, data_dir)
    _warn_sqlite_on_cluster(url, address)
    with _exit_on_run_errors(url):
        settings = _worker_settings(url, heartbeat_interval, grace_period, keep_freed_memory=keep_freed_memory)
        loaded_profile = chosen if chosen is not None else load_profile(_profile_to_run(url))
        outcome = run_pipeline(
            settings,
            loaded_profile,
            data=data,
            data_dir=data_dir,
            # None lets a resumed pipeline keep its registered directory
            artifact_dir=Path(artifacts).expanduser().resolve() if artifacts else None,
            address=address,
            workers=workers,
            families=family or None,
            live=sys.stderr.isatty() if progress is None else progress,
            log_to_driver=logging.getLogger().isEnabledFor(logging.DEBUG),
        )

    _print_outcome(outcome)
    _exit_on_failed_stages(outcome, url)
    with _exit_on_user_errors(url):
        document = _results_document(_open_storage(url), loaded_profile.name)
    if document is not None:
        _print_results(document)


@app.command("worker", short_help="Start workers for the pipelines that 'jethpo run' registered.")
def worker_command(
    storage: StorageOption = None,
    data_dir: DataDirOption = DEFAULT_DATA_DIR,
    address: AddressOption = None,
    workers: WorkersOption = None,
    data: Annotated[
        Optional[str],
        typer.Option(
            "--data",
            help=(
                "Jets file that the workers read instead of the path that 'jethpo run' registered, for a "
                "cluster that mounts the data at another path than the controller. It must contain the same jets."
            ),
            show_default=False,
        ),
    ] = None,
    artifacts: Annotated[
        Optional[Path],
        typer.Option(
            "--artifacts",
            envvar="JETHPO_ARTIFACTS",
            help=(
                "Artifact directory to use instead of the one that 'jethpo run' registered, for a node that "
                "mounts it at another path."
            ),
            show_default=False,
        ),
    ] = None,
    heartbeat_interval: HeartbeatIntervalOption = 60,
    grace_period: GracePeriodOption = 120,
    keep_freed_memory: KeepFreedMemoryOption = True,
) -> None:
    """Start workers on a Ray cluster for the pipelines that 'jethpo run' registered.

    The workers take the budgets and the jets file from the storage, and the command
    returns when every stage of those pipelines is done. With no unfinished pipeline in
    the storage, it waits for one.
    """
    from hpo.workers import run_workers

    url = _storage_url(storage, data_dir)
    _warn_sqlite_on_cluster(url, address)
    with _exit_on_run_errors(url):
        settings = _worker_settings(url, heartbeat_interval, grace_period, data, artifacts, keep_freed_memory)
        outcome = run_workers(
            settings,
            address=address,
            workers=workers,
            log_to_driver=logging.getLogger().isEnabledFor(logging.DEBUG),
        )

    _print_outcome(outcome)
    _exit_on_failed_stages(outcome, url)

# results of a pipeline


PipelineOption = Annotated[
    Optional[str],
    typer.Option(
        "--pipeline",
        help="Pipeline, named after its profile (such as quick). Default: the one that finished last.",
        show_default=False,
    ),
]


def _results_document(rdb: Any, pipeline: str | None) -> dict | None:
    """Return the results document of a pipeline, or of the pipeline that finished last, or None."""
    latest = _latest_results(rdb, pipeline)
    return None if latest is None else latest[1]


def _latest_results(rdb: Any, pipeline: str | None) -> tuple[str, dict] | None:
    """Return ``(pipeline, results document)`` as :func:`_results_document` finds it, or None."""
    from sqlalchemy import select

    from storage.pipeline import outputs_table

    statement = select(outputs_table.c.pipeline, outputs_table.c.payload).where(
        outputs_table.c.stage.like("results:%")
    )
    if pipeline is not None:
        statement = statement.where(outputs_table.c.pipeline == pipeline)
    with rdb.engine.connect() as connection:
        rows = connection.execute(statement.order_by(outputs_table.c.updated_at.desc())).all()
    for row in rows:
        if isinstance(row.payload, dict) and "document" in row.payload:
            return row.pipeline, row.payload["document"]
    return None


def _print_results(document: dict) -> None:
    from hpo.evaluate import markdown_table

    typer.echo(markdown_table(document))


@app.command("results", short_help="Print the final evaluation table.")
def results_command(
    storage: StorageOption = None,
    data_dir: DataDirOption = DEFAULT_DATA_DIR,
    pipeline: PipelineOption = None,
    as_json: JsonOption = False,
) -> None:
    """Print the final evaluation table: the models, the truth row and the published rows."""
    from storage.pipeline import StageState, get_stages

    url = _storage_url(storage, data_dir, create_data_dir=False)
    with _exit_on_user_errors(url):
        rdb = _open_storage(url, must_exist=True)
        latest = _latest_results(rdb, pipeline)
        stages = {} if latest is None else {row.stage: row.state for row in get_stages(rdb.engine, latest[0])}
    document = None if latest is None else latest[1]
    if latest is not None and stages.get(f"results:{latest[0]}", StageState.DONE) != StageState.DONE:
        # a forced retraining or an added family reset the results step after this table was made
        typer.echo(
            f"Note: the results step of pipeline {latest[0]} is {stages[f'results:{latest[0]}'].value}, so this "
            f"table comes from its previous run. Run 'jethpo run' for that profile to make it again.",
            err=True,
        )
    if document is None:
        which = f"pipeline {pipeline!r}" if pipeline else "any pipeline"
        typer.echo(
            f"Error: no results for {which} in {_masked(url)} yet. Run 'jethpo run' to the end; "
            f"'jethpo studies' shows how far it got.",
            err=True,
        )
        raise typer.Exit(1)
    if as_json:
        _print_json(document)
    else:
        _print_results(document)


def _find_step(rdb: Any, kind: str, family: str, pipeline: str | None) -> Any:
    """Return the registered step ``<kind>:<family>``, from the given pipeline or the only one that has it."""
    from sqlalchemy import select

    from storage.pipeline import stages_table

    name = f"{kind}:{family}"
    statement = select(stages_table.c.pipeline).where(stages_table.c.stage == name)
    if pipeline is not None:
        statement = statement.where(stages_table.c.pipeline == pipeline)
    with rdb.engine.connect() as connection:
        pipelines = sorted(connection.execute(statement).scalars())
    if not pipelines:
        where = f"pipeline {pipeline!r}" if pipeline else "any pipeline"
        raise typer.BadParameter(
            f"{where} has no step {name}. Run 'jethpo run --profile PROFILE' first, which registers it."
        )
    if len(pipelines) > 1:
        raise typer.BadParameter(f"pipelines {', '.join(pipelines)} all have step {name}; choose one with --pipeline.")
    return pipelines[0], name


@app.command("retrain", short_help="Retrain the best trial of a search space now.")
def retrain_command(
    study: Annotated[str, typer.Argument(help="A study of the search space whose best trial is retrained, such as convae-gen.arch.")],
    storage: StorageOption = None,
    data_dir: DataDirOption = DEFAULT_DATA_DIR,
    artifacts: ArtifactsOption = None,
    pipeline: PipelineOption = None,
    address: AddressOption = None,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Retrain again even if the step is done. The steps that use the retrained model run again with the next 'jethpo run'.",
        ),
    ] = False,
    heartbeat_interval: HeartbeatIntervalOption = 60,
    grace_period: GracePeriodOption = 120,
    keep_freed_memory: KeepFreedMemoryOption = True,
) -> None:
    """Retrain the best trial of a search space now, as 'jethpo run' does once its search ends.

    The retraining is claimed in the storage, so it never runs twice at once, and it runs
    as a Ray task with the profile's retraining resources. An interrupted retraining
    resumes from the state saved after its last evaluation.
    """
    from hpo.studies import load_spaces
    from hpo.workers import retrain_by_hand

    url = _storage_url(storage, data_dir, create_data_dir=False)
    with _exit_on_run_errors(url):
        rdb = _open_storage(url, must_exist=True)
        spaces = load_spaces(rdb)
        family = next((space.name for space in spaces.values() for stage in space.stages if stage.study_name == study), None)
        if family is None:
            family = study if study in spaces else None
        if family is None:
            known = ", ".join(stage.study_name for space in spaces.values() for stage in space.stages)
            raise typer.BadParameter(f"no search space has a study {study!r}. Use one of {known}.")
        pipeline_name, step = _find_step(rdb, "retrain", family, pipeline)
        settings = _worker_settings(url, heartbeat_interval, grace_period, None, artifacts, keep_freed_memory)
        output = retrain_by_hand(settings, pipeline_name, step, address=address, force=force)

    typer.echo(
        f"Retrained trial {output['trial']} of study {output['study']}: validation EMD_sum "
        f"{_format_value(output['emd_sum'])} at epoch {output['best_epoch']} of {output['epochs']}; "
        f"checkpoint artifact {output['checkpoint']}."
    )


@app.command("generate", short_help="Sample jets from a retrained model into an HDF5 file.")
def generate_command(
    model: Annotated[
        str,
        typer.Option(
            "--model",
            help=(
                "Retrained model: convae (generation-tuned ConVAE), convae-nf or nf, or the name of the search "
                "space that trained it, such as an added space nf-narrow."
            ),
            show_default=False,
        ),
    ],
    jets: Annotated[int, typer.Option("--jets", min=1, help="Number of jets to generate.", show_default=False)],
    out: Annotated[Path, typer.Option("--out", help="HDF5 file to write, in JetNet's layout.", show_default=False)],
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace the --out file if it exists.")] = False,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Jets per generator call.")] = 10_000,
    seed: Annotated[int, typer.Option("--seed", min=0, help="Seed of the latent samples.")] = 0,
    device: Annotated[str, typer.Option("--device", help="Torch device, such as cpu or cuda.")] = "cpu",
    storage: StorageOption = None,
    data_dir: DataDirOption = DEFAULT_DATA_DIR,
    artifacts: ArtifactsOption = None,
    pipeline: PipelineOption = None,
) -> None:
    """Sample jets from a retrained model and write them in JetNet's layout.

    The file has particle_features [N, 30, 4] (etarel, phirel, ptrel, mask) and
    jet_features [N, 4] (pt in GeV, eta, mass in GeV, num_particles), as JetNet's g.hdf5,
    and constituents [N, 30, 3] (px, py, pz in GeV), which keeps each jet's direction. Its
    attributes name the model, its checkpoint, the seed and the jethpo version.
    """
    if out.is_dir():
        raise typer.BadParameter(f"{out} is a folder. Pass the path of an HDF5 file.", param_hint="--out")
    if out.exists() and not overwrite:
        raise typer.BadParameter(f"{out} exists. Pass --overwrite to replace it, or another --out.", param_hint="--out")

    import tempfile

    import numpy as np
    import torch

    from hpo.objectives import check_device
    from hpo.pipeline import RUN_ATTR, evaluated_model, pipeline_names
    from hpo.studies import load_spaces
    from models.checkpoint import CheckpointError, jethpo_version, load_checkpoint, sampler_from_checkpoint
    from models.data import write_jetnet_jets
    from storage.artifacts import download_file, open_artifact_store, resolve_artifact_dir
    from storage.pipeline import get_outputs

    url = _storage_url(storage, data_dir, create_data_dir=False)
    with _exit_on_run_errors(url):
        check_device(device)
        rdb = _open_storage(url, must_exist=True)
        spaces = load_spaces(rdb)
        families = _generating_families(model, spaces)
        if model in _GENERATED_MODELS:
            requested = f"a {model} model"
        else:
            requested = f"search space {model}"
            model = evaluated_model(spaces[model])
        found = []
        for family in families:
            try:
                found.append((family, *_find_step(rdb, "retrain", family, pipeline)))
            except typer.BadParameter:
                continue
        if not found and pipeline is not None:
            names = pipeline_names(rdb)
            if pipeline not in names:
                raise ValueError(
                    f"pipeline {pipeline!r} not found in {_masked(url)}. Registered pipelines: "
                    f"{', '.join(names) or 'none'}. Check --pipeline."
                )
            raise ValueError(f"pipeline {pipeline!r} has not retrained {requested} yet. Run 'jethpo run' to the end first.")
        if not found:
            raise ValueError(f"no pipeline has retrained {requested} yet. Run 'jethpo run' to the end first.")
        family, pipeline_name, step = found[0]
        if len(found) > 1:
            others = ", ".join(name for name, _, _ in found[1:])
            logger.info("Sampling the %s of search space %s. To sample from %s instead, pass its name with --model.", model, family, others)
        output = get_outputs(rdb.engine, pipeline_name).get(step, {})
        if "checkpoint" not in output:
            raise ValueError(
                f"step {step} of pipeline {pipeline_name} has not finished. Run 'jethpo run' or 'jethpo retrain' first."
            )
        run = rdb.get_study_user_attrs(rdb.get_study_id_from_name(output["study"])).get(RUN_ATTR, {})
        store = open_artifact_store(resolve_artifact_dir(artifacts, data_dir) if artifacts else run.get("artifact_dir") or resolve_artifact_dir(None, data_dir))
        with tempfile.TemporaryDirectory() as folder:
            path = download_file(store, output["checkpoint"], Path(folder) / "model.pt")
            try:
                checkpoint = load_checkpoint(path, data_fingerprint=run.get("data_fingerprint"))
            except CheckpointError as error:
                raise ValueError(str(error)) from None
        sampler = sampler_from_checkpoint(checkpoint, device=device)
        generator = torch.Generator(device=sampler.device).manual_seed(seed)
        logger.info(
            "Generating %d jets with the %s of %s (%s, batches of %d jets)",
            jets,
            model,
            step,
            device,
            min(batch_size, jets),
        )
        constituents = sampler.sample_gev(jets, generator, batch_size=batch_size)
        mask = ~(np.hypot(constituents[..., 0], constituents[..., 1]) <= 0)
        written = write_jetnet_jets(
            out,
            constituents,
            mask,
            {
                "producer": "jethpo generate",
                "model": model,
                "search_space": family,
                "pipeline": pipeline_name,
                "study": output["study"],
                "trial": output["trial"],
                "checkpoint": output["checkpoint"],
                "seed": seed,
                "data_fingerprint": run.get("data_fingerprint", ""),
                "jethpo_version": jethpo_version(),
            },
        )
    logger.info(
        "Wrote %d jets from the retrained %s of search space %s, pipeline %s, to %s", jets, model, family, pipeline_name, written
    )
    typer.echo(str(written))


#: Models that ``jethpo generate --model`` names by their kind, as the final table does.
_GENERATED_MODELS = ("convae", "convae-nf", "nf")


def _generating_families(model: str, spaces: Mapping[str, Any]) -> list[str]:
    """Return the search spaces whose retrained model ``--model`` names, shipped spaces first.

    A model name (convae, convae-nf, nf) names every search space of that model, and a
    search space name names that space alone.
    """
    from hpo.pipeline import evaluated_model

    kinds = ", ".join(_GENERATED_MODELS)
    if model in _GENERATED_MODELS:
        return [name for name, space in spaces.items() if evaluated_model(space) == model]
    if model not in spaces:
        generating = [name for name, space in spaces.items() if evaluated_model(space) is not None]
        raise typer.BadParameter(
            f"unknown model {model!r}. Use one of {kinds}, or the name of a search space: {', '.join(generating)}.",
            param_hint="--model",
        )
    if evaluated_model(spaces[model]) is None:
        raise typer.BadParameter(
            f"search space {model!r} trains a reconstruction-tuned ConVAE, which generates no jets of its own. "
            f"Use one of {kinds}, or a search space of one of these models.",
            param_hint="--model",
        )
    return [model]


# optuna-dashboard


@app.command("dashboard", short_help="Serve optuna-dashboard on the storage and artifacts.")
def dashboard_command(
    storage: StorageOption = None,
    data_dir: DataDirOption = DEFAULT_DATA_DIR,
    artifacts: ArtifactsOption = None,
    port: Annotated[int, typer.Option("--port", min=1, max=65535, help="TCP port to listen on.")] = 8080,
    host: Annotated[
        str,
        typer.Option(
            "--host",
            help="Address to listen on. The default accepts connections from this machine only.",
        ),
    ] = "127.0.0.1",
) -> None:
    """Serve optuna-dashboard on the same storage and artifact directory until Ctrl-C.

    The dashboard shows the checkpoints, plots and result tables that the pipeline linked
    to each study. It has no login, and anyone who reaches it can change studies, so keep
    the default --host unless the port is protected.
    """
    import optuna_dashboard

    from storage import parse_storage_url
    from storage.artifacts import open_artifact_store, resolve_artifact_dir

    url = _storage_url(storage, data_dir, create_data_dir=False)
    with _exit_on_user_errors(url):
        # A SQLite file must exist. On PostgreSQL the dashboard creates the storage, as a worker
        # does, because docker-compose.yml starts it before the first run.
        rdb = _open_storage(url, must_exist=parse_storage_url(url).get_backend_name() == "sqlite")
        store = open_artifact_store(resolve_artifact_dir(artifacts, data_dir))

    if host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("optuna-dashboard listens on %s, so other machines can read and change the studies", host)
    application = optuna_dashboard.wsgi(rdb, artifact_store=store)
    try:
        server = make_server(
            host, port, application, server_class=_ThreadingWSGIServer, handler_class=_QuietRequestHandler
        )
    except OSError as error:
        typer.echo(
            f"Error: optuna-dashboard failed to listen on {host}:{port}: {error.strerror or error}. "
            f"Pass another --port or --host.",
            err=True,
        )
        raise typer.Exit(1) from None

    logger.info("optuna-dashboard for %s at http://%s:%d/ (Ctrl-C stops it)", _masked(url), host, port)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        logger.info("optuna-dashboard stopped")
    finally:
        server.server_close()


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    """WSGI server with one thread per request, so that a slow page does not block the others."""

    daemon_threads = True


class _QuietRequestHandler(WSGIRequestHandler):
    """Request handler that logs each request at DEBUG instead of printing it to stderr."""

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("optuna-dashboard %s: %s", self.address_string(), format % args)


def main() -> None:
    app()
