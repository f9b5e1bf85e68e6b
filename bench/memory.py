"""Peak memory of a worker process during a paper-size trial.

Each case runs in a fresh Python process, as a Ray worker would, once with the malloc settings
of a worker (``hpo.host_memory.TRAINING_MALLOC_ENV``) and once with glibc's defaults. It prepares the jets with
``hpo.objectives.prepare_data`` and calls ``hpo.objectives.train_params`` for one epoch
with batches of 100 jets, as the shipped ``paper`` profile sets. The epoch ends with the
EMD_sum evaluation on the whole validation split. The parent samples the child's resident memory every 20 ms, and the
child reports its own peak (``ru_maxrss``) and, on a GPU, ``torch.cuda.max_memory_allocated``.

Nothing in a trial grows with the number of training batches once the first optimizer
step has allocated Adam's state. So the child trains on the first ``--train-jets``
training jets only, while the full data set stays in memory and the evaluation uses the
full validation split. The peak is therefore that of a whole trial.

The ``paper`` profile reads every jet of its data set, and JetNet's gluon file has 177,252
(70 % train, 15 % validation). Without
JetNet, ``--paper-size`` tiles the real Pythia jets up to 177,252 jets in a file under
``bench/results/data/``, which has the size but repeats each jet about 3.5 times.

The child also times the trial and counts its page faults, so that the cost of the malloc
settings in time shows next to their cost in memory. ``--threads`` sets the torch threads of
the child (torch's default, the usable cores, when left out): the settings put every thread
of a worker on one heap (``MALLOC_ARENA_MAX=1``), which could slow a trial that trains with
several threads. ``--repeats`` runs every case and setting that many times, in rounds whose
order rotates (``bench.common.interleave``), and the tables give medians.

Cases: the generation-tuned and reconstruction-tuned ConVAE architectures (see
``bench.training``) with their objectives, and the standalone NF (65 flows, hidden layers of
150, 200, 350 and 150 nodes).

Run from the repository root::

    python -m bench.memory --jets FILE                # all jets of the file: about 5 minutes for 50,000
    python -m bench.memory --jets FILE --paper-size   # 177,252 jets: about 10 minutes
    python -m bench.memory --jets FILE --threads 2 --train-jets 3000 --repeats 3   # trial time with two threads
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import (
    RESULTS_DIR,
    add_device_argument,
    interleave,
    jets_file,
    median,
    positive_int,
    print_table,
    result_name,
    run_benchmark,
    write_results,
)
from hpo.host_memory import TRAINING_MALLOC_ENV

__all__ = ["CASES", "main", "tiled_jets_file"]

logger = logging.getLogger(__name__)

PAPER_JETS = 177_252

LOSS_WEIGHTS = {"alpha": 1.0, "gamma": 1.0, "gamma_pt": 1.0, "gamma_m": 10.0}

#: Search space (shipped with jethpo) and full trial parameters of each case.
CASES = {
    "convae-gen (generation-tuned size)": (
        "convae-gen",
        {"lr": 1.0e-4, "latent_dim": 190, "n_filters": 75, "kernel_size": 3, "linear_nodes": 1100,
         "n_conv_layers": 4, "activation": "ReLU", "beta": 0.95, **LOSS_WEIGHTS},
    ),
    "convae-rec (reconstruction-tuned size)": (
        "convae-rec",
        {"lr": 1.0e-4, "latent_dim": 180, "n_filters": 50, "kernel_size": 2, "linear_nodes": 3000,
         "n_conv_layers": 4, "activation": "ReLU", "beta": 0.05, **LOSS_WEIGHTS},
    ),
    "nf (65 flows)": (
        "nf",
        {"lr": 1.0e-4, "n_flows": 65, "n_mlp_layers": 4, "nodes_1": 150, "nodes_2": 200, "nodes_3": 350, "nodes_4": 150},
    ),
}  # fmt: skip


def tiled_jets_file(source: Path, n_jets: int) -> Path:
    """Write a jets file of ``n_jets`` jets that repeats the jets of ``source`` in order.

    Every dataset of the source is tiled along its first axis and the attributes are copied,
    with ``n_jets`` updated.
    """
    import h5py
    import numpy as np

    target = RESULTS_DIR / "data" / f"tiled-{n_jets}.hdf5"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".partial")
    with h5py.File(source, "r") as reader, h5py.File(partial, "w") as writer:
        rows = np.arange(n_jets) % reader["constituents"].shape[0]
        for name, dataset in reader.items():
            copy = writer.create_dataset(name, data=dataset[()][rows])
            copy.attrs.update(dict(dataset.attrs))
        writer.attrs.update(dict(reader.attrs))
        writer.attrs["n_jets"] = n_jets
    partial.replace(target)
    return target


def run_case(case: str, path: str, train_jets: int, device: str, threads: int | None = None) -> dict[str, Any]:
    """Run one case in this process and return its memory readings in MiB, its time and its page faults."""
    import dataclasses

    import psutil
    import torch

    if threads is not None:
        torch.set_num_threads(threads)

    from hpo.objectives import prepare_data, train_params
    from hpo.spaces import Resources, SearchBudget, builtin_spaces

    process = psutil.Process()
    readings = {"after_imports_mib": process.memory_info().rss / 2**20}
    data = prepare_data(path, device=device)
    readings["after_prepare_data_mib"] = process.memory_info().rss / 2**20
    readings["train_jets_in_memory"] = len(data.train)
    readings["validation_jets"] = len(data.validation)

    space_name, params = CASES[case]
    budget = SearchBudget(n_trials=1, epochs=1, batch_size=100, eval_every=1, resources=Resources(cpus=2.0, gpus=0.0))
    trial_data = dataclasses.replace(data, train=data.train[:train_jets])
    space = builtin_spaces()[space_name]
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    started = time.perf_counter()
    result = train_params(space, params, budget, trial_data, seed=0)
    readings["trial_s"] = time.perf_counter() - started
    readings["trial_page_faults"] = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    readings["torch_threads"] = torch.get_num_threads()
    readings["validation_emd_sum"] = result.best_emd_sum
    readings["after_trial_mib"] = process.memory_info().rss / 2**20
    readings["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    if device.startswith("cuda"):
        readings["cuda_max_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return readings


#: Environment of the child process in each malloc setting, on top of this process's own
#: environment without its ``MALLOC_`` variables.
MALLOC_SETTINGS = {"worker": TRAINING_MALLOC_ENV, "glibc defaults": {}}


def measure(case: str, malloc: str, path: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Run one case in a child process and sample its resident memory from here."""
    import psutil

    command = [
        sys.executable, "-m", "bench.memory", "--child", case, "--jets", str(path),
        "--train-jets", str(args.train_jets), "--device", args.device,
    ]  # fmt: skip
    if args.threads is not None:
        command += ["--threads", str(args.threads)]
    env = {key: value for key, value in os.environ.items() if not key.startswith("MALLOC_")} | MALLOC_SETTINGS[malloc]
    child = subprocess.Popen(
        command, stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[1], env=env
    )
    handle = psutil.Process(child.pid)
    sampled_peak = 0.0
    while child.poll() is None:
        try:
            sampled_peak = max(sampled_peak, handle.memory_info().rss / 2**20)
        except psutil.NoSuchProcess:
            break
        time.sleep(0.02)
    output = child.stdout.read()
    if child.returncode != 0:
        raise RuntimeError(f"case {case!r} failed with exit code {child.returncode}; its output:\n{output}")
    readings = json.loads(output.strip().splitlines()[-1])
    return {"case": case, "malloc": malloc, "sampled_peak_rss_mib": sampled_peak, **readings}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark with command-line arguments ``argv`` and return what it writes to its JSON file."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_device_argument(parser)
    parser.add_argument("--paper-size", action="store_true", help=f"tile the jets up to the paper's {PAPER_JETS} jets")
    parser.add_argument("--train-jets", type=positive_int, default=1000, help="training jets the trial iterates over")
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES), help="cases to run")
    parser.add_argument(
        "--malloc", nargs="+", choices=list(MALLOC_SETTINGS), default=list(MALLOC_SETTINGS), help="malloc settings to run each case with"
    )
    parser.add_argument("--repeats", type=positive_int, default=1, help="runs of every case and malloc setting, in rotating order")
    parser.add_argument("--jets", default=None, help="jets file; default: generated Pythia jets")
    parser.add_argument("--output", type=result_name, default="memory", help="name of the result file under bench/results/")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child is not None:
        print(json.dumps(run_case(args.child, args.jets, args.train_jets, args.device, args.threads)))
        return {}

    path = jets_file(args.jets, 1500)
    if args.paper_size:
        path = tiled_jets_file(path, PAPER_JETS)
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {}

    def run(case: str, malloc: str) -> float:
        readings = measure(case, malloc, path, args)
        runs.setdefault((case, malloc), []).append(readings)
        return readings["trial_s"]

    cases = {(case, malloc): functools.partial(run, case, malloc) for case in args.cases for malloc in args.malloc}
    interleave(cases, args.repeats)
    rows = [_summary(pair_runs) for pair_runs in runs.values()]
    print_table(
        rows,
        ["case", "malloc", "train_jets_in_memory", "validation_jets", "after_prepare_data_mib", "peak_rss_mib", "sampled_peak_rss_mib"],
        title=f"Peak memory of one trial process on {args.device} (MiB, median of {args.repeats})",
    )
    print_table(
        rows,
        ["case", "malloc", "torch_threads", "trial_s", "trial_page_faults"],
        title=f"Time and page faults of one trial of {args.train_jets} training jets (median of {args.repeats})",
    )
    payload = {"settings": vars(args), "jets_file": str(path), "rows": rows, "runs": [item for pair_runs in runs.values() for item in pair_runs]}
    write_results(args.output, payload, device=args.device)
    return payload


def _summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Return the median of each numeric reading over one case's runs, and the trial time of each run."""
    summary = {key: value for key, value in runs[0].items() if not isinstance(value, (int, float))}
    for key, value in runs[0].items():
        if isinstance(value, (int, float)):
            summary[key] = median([item[key] for item in runs])
    summary["trial_s_runs"] = [item["trial_s"] for item in runs]
    return summary


if __name__ == "__main__":
    run_benchmark(main)
