"""Shared pieces of the benchmark scripts: hardware record, interleaved timing, result files,
real jets and throwaway PostgreSQL databases."""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import logging
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "RESULTS_DIR",
    "add_device_argument",
    "describe_hardware",
    "interleave",
    "jets_file",
    "matmul_flops_per_s",
    "median",
    "non_negative_float",
    "positive_float",
    "positive_int",
    "print_table",
    "select_device",
    "synchronize",
    "throwaway_postgres",
    "write_results",
]

logger = logging.getLogger(__name__)

#: Folder of the JSON result files and of the jets the scripts generate. Git ignores it.
RESULTS_DIR = Path(__file__).resolve().parent / "results"

#: PostgreSQL server of the development machine and of CI (trust authentication).
DEFAULT_POSTGRES_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


# hardware and results


def _cpu_model() -> str:
    try:
        output = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown"
    for line in output.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def describe_hardware(device: str = "cpu") -> dict[str, Any]:
    """Describe the machine, the library versions and the load at the time of the call.

    The load averages matter because the development machine is shared: other processes
    may have used the cores during a measurement.
    """
    import psutil

    info: dict[str, Any] = {
        "cpu_model": _cpu_model(),
        "usable_cpus": len(os.sched_getaffinity(0)),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "load_average_1_5_15_min": [round(value, 2) for value in os.getloadavg()],
    }
    for module in ("torch", "numpy", "optuna", "ray", "sqlalchemy", "jetnet"):
        try:
            info[module] = __import__(module).__version__
        except ImportError:
            info[module] = None
    if "torch" in sys.modules:
        import torch

        info["torch_threads"] = torch.get_num_threads()
        if device.startswith("cuda") and torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def run_benchmark(main: Callable[[], Any]) -> None:
    """Run a benchmark's ``main`` as a script, with warnings logged to stderr.

    Ctrl-C ends it with exit code 130 and one line instead of a traceback. Every script writes
    its result file at the end, so an interrupted run writes none.
    """
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    try:
        main()
    except KeyboardInterrupt:
        print("Interrupted before the result file was written.", file=sys.stderr)
        sys.exit(130)


def write_results(name: str, payload: Mapping[str, Any], device: str = "cpu") -> Path:
    """Write one benchmark's results with the command line and the hardware to ``bench/results/``.

    Returns:
        The path of the JSON file, ``bench/results/<name>-<device>.json``.
    """
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}-{device.split(':')[0]}.json"
    document = {
        "benchmark": name,
        "command": "python -m " + shlex.join([f"bench.{Path(sys.argv[0]).stem}", *sys.argv[1:]]),
        "finished_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "hardware": describe_hardware(device),
        **payload,
    }
    path.write_text(json.dumps(document, indent=2, default=str) + "\n")
    print(f"wrote {path}")
    return path


def print_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], title: str = "") -> None:
    """Print rows as an aligned text table with the given columns."""

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        return "" if value is None else str(value)

    cells = [[cell(row.get(column)) for column in columns] for row in rows]
    widths = [max(len(column), *(len(line[index]) for line in cells)) for index, column in enumerate(columns)]
    if title:
        print(f"\n{title}")
    print("  ".join(column.rjust(width) for column, width in zip(columns, widths)))
    for line in cells:
        print("  ".join(value.rjust(width) for value, width in zip(line, widths)))


# timing


def median(values: Sequence[float]) -> float:
    """Return the median, or NaN for no values."""
    return statistics.median(values) if values else float("nan")


def interleave(cases: Mapping[str, Callable[[], float]], repeats: int) -> dict[str, list[float]]:
    """Run every case once per repeat, rotating their order, and collect what each returns.

    Rotating the order spreads slow phases of a shared machine over all cases, so that the
    medians of two cases measured in one call can be compared.

    Args:
        cases: Name to a function that runs one measurement and returns its value.
        repeats: Rounds; every case runs once per round.

    Returns:
        Name to the values in the order they were measured.
    """
    names = list(cases)
    values: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            values[name].append(cases[name]())
    return values


# devices


def _bounded_int(text: str, minimum: int) -> int:
    message = f"expected an integer of at least {minimum}, got {text!r}"
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(message) from None
    if value < minimum:
        raise argparse.ArgumentTypeError(message)
    return value


def positive_int(text: str) -> int:
    """Parse an option value that must be an integer of at least 1, for ``argparse``."""
    return _bounded_int(text, 1)


def non_negative_int(text: str) -> int:
    """Parse an option value that must be an integer of 0 or more, such as a seed, for ``argparse``."""
    return _bounded_int(text, 0)


def result_name(text: str) -> str:
    """Parse the name of a result file under ``bench/results/``, for ``argparse``.

    The name is checked before the benchmark runs, so that a name the script cannot write
    does not lose the results at the end.
    """
    if not text or text in (".", "..") or "/" in text or "\\" in text or "\0" in text:
        raise argparse.ArgumentTypeError(f"expected a file name without a folder, got {text!r}")
    return text


def _finite_float(text: str, *, allow_zero: bool) -> float:
    bound = "0 or more" if allow_zero else "greater than 0"
    message = f"expected a finite number {bound}, got {text!r}"
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(message) from None
    below_bound = value < 0 if allow_zero else value <= 0
    if below_bound or not math.isfinite(value):
        raise argparse.ArgumentTypeError(message)
    return value


def positive_float(text: str) -> float:
    """Parse an option value that must be a finite number greater than 0, for ``argparse``."""
    return _finite_float(text, allow_zero=False)


def non_negative_float(text: str) -> float:
    """Parse an option value that must be a finite number of 0 or more, for ``argparse``."""
    return _finite_float(text, allow_zero=True)


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    """Add ``--device {cpu,cuda}`` and ``--threads`` to a benchmark's parser."""
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="torch device of the models")
    parser.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        help="torch intra-op threads; default: torch's default, the usable cores",
    )


def select_device(name: str, threads: int | None = None):
    """Return the torch device for ``--device`` after setting the thread count.

    Raises:
        SystemExit: ``cuda`` was requested on a machine without a CUDA device.
    """
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda was requested, but torch finds no CUDA device. Use --device cpu.")
    return torch.device(name)


def synchronize(device) -> None:
    """Wait for queued GPU work, so that wall-clock times cover it. Does nothing on the CPU."""
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def calls_per_s(call: Callable[[], Any], device, min_seconds: float = 1.0) -> float:
    """Run ``call`` until ``min_seconds`` have passed and return its calls per second.

    The device is synchronized every 4 calls and at the end, so GPU work is timed whole.
    The caller makes any warm-up call first.
    """
    synchronize(device)
    count = 0
    started = time.perf_counter()
    while True:
        call()
        count += 1
        if count % 4 == 0:
            synchronize(device)
            elapsed = time.perf_counter() - started
            if elapsed >= min_seconds:
                return count / elapsed


def matmul_flops_per_s(device, size: int = 2048, min_seconds: float = 1.0) -> float:
    """Measure float32 matrix-multiplication FLOP/s: ``size x size`` times ``size x size``.

    One product counts ``2 * size**3`` FLOPs. The product repeats until ``min_seconds`` have
    passed, after one warm-up product.
    """
    import torch

    generator = torch.Generator().manual_seed(0)
    a = torch.rand(size, size, generator=generator).to(device)
    b = torch.rand(size, size, generator=generator).to(device)
    out = torch.empty(size, size, device=device)
    torch.mm(a, b, out=out)
    return 2 * size**3 * calls_per_s(lambda: torch.mm(a, b, out=out), device, min_seconds)


# data


def jets_file(path: str | None, n_jets: int) -> Path:
    """Return a jets file with at least ``n_jets`` real jets.

    Without ``path``, Pythia 8 jets (seed 0) are generated with ``models.generate`` into
    ``bench/results/data/pythia/``, or reused from there. Generating takes about 7 ms of
    CPU per jet on the development machine.

    Raises:
        SystemExit: ``path`` does not exist.
    """
    if path is not None:
        resolved = Path(path).expanduser()
        if not resolved.exists():
            raise SystemExit(f"Jets file {str(resolved)!r} not found. Pass an existing file with --jets, or leave it out.")
        return resolved

    import h5py

    from models.generate import generate_jets

    folder = RESULTS_DIR / "data" / "pythia"
    file = folder / "jets.hdf5"
    if file.exists():
        with h5py.File(file, "r") as handle:
            if int(handle.attrs.get("n_jets", 0)) >= n_jets:
                return file
    print(f"generating {n_jets} Pythia jets into {folder} (seed 0)")
    return Path(generate_jets(n_jets, folder, seed=0, workers=1))


# PostgreSQL


@contextlib.contextmanager
def throwaway_postgres(admin_url: str = DEFAULT_POSTGRES_ADMIN_URL, label: str = "bench") -> Iterator[str]:
    """Create an empty PostgreSQL database, yield its URL, and drop it afterwards.

    The database is named ``jethpo_<label>_<pid>``. It is dropped with ``FORCE``, which ends
    connections that the benchmark left open (PostgreSQL 13 or newer).
    """
    import sqlalchemy
    from sqlalchemy.engine import make_url

    from storage.urls import describe_database_error, mask_password

    name = f"jethpo_{label}_{os.getpid()}"
    try:
        parsed = make_url(admin_url)
        if parsed.drivername == "postgresql":
            # SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3, which is not installed
            parsed = parsed.set(drivername="postgresql+psycopg2")
        admin = sqlalchemy.create_engine(parsed, isolation_level="AUTOCOMMIT", poolclass=sqlalchemy.pool.NullPool)
        with admin.connect() as connection:
            connection.execute(sqlalchemy.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            connection.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
    except (sqlalchemy.exc.SQLAlchemyError, ImportError) as error:
        raise SystemExit(
            f"--admin-url {mask_password(admin_url)}: creating the database {name} failed "
            f"({describe_database_error(error)}). Pass --admin-url with a postgresql:// URL of a "
            f"running server and a user allowed to create databases."
        ) from None
    url = parsed.set(database=name).render_as_string(hide_password=False)
    try:
        yield url
    finally:
        with admin.connect() as connection:
            connection.execute(sqlalchemy.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
