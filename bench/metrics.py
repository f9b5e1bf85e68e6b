"""Cost of EMD_sum and of each jetnet metric on a sample of real jets.

``models.metrics.evaluate_generated`` runs once with jetnet 0.2.5's recommended sample
sizes (``JetNetMetricSettings()``), the call that fills the final table. Every metric that
it calls is wrapped in a timer for the duration of the run. The table shows the wall time
of each of them: EMD_sum, the relative coordinates, W1M, W1P, W1EFP, COV and MMD, the EFP
features of FPD and KPD, FPD, KPD and FPND. ParticleNet runs on ``--device``. The search computes EMD_sum alone on the
validation split every few epochs, so it is also timed on its own, exactly and with 100
histogram bins.

Both samples are real Pythia 8 jets. The reference is the first ``--n-jets`` jets of the
file, and the stand-in for generated jets is a bootstrap resample of them (seed 1). So the
jet count and the number of constituents per jet match real output. The metric values
are therefore near their truth floor, and only their cost is of interest here.

Run from the repository root::

    python -m bench.metrics                    # 5,000 jets: about 2 minutes
    python -m bench.metrics --n-jets 50000 --fpnd-max-jets 10000   # 50,000 jets: about 8 minutes

``--fpnd-max-jets`` limits the jets that FPND passes through ParticleNet. Before
``models.metrics.fpnd`` wrote its activations into one array, FPND on 50,000 jets grew
this process past 15 GB on the development machine.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

from bench.common import (
    add_device_argument,
    jets_file,
    non_negative_int,
    positive_int,
    print_table,
    run_benchmark,
    select_device,
    write_results,
)

__all__ = ["main", "timed_metrics"]

logger = logging.getLogger(__name__)

# (module, function name, label) of the timed metric functions
TIMED_FUNCTIONS = (
    ("models.metrics", "emd_sum", "EMD_sum (exact W1)"),
    ("models.metrics", "relative_coordinates", "relative coordinates (both samples)"),
    ("jetnet.evaluation.gen_metrics", "w1m", "W1M"),
    ("jetnet.evaluation.gen_metrics", "w1p", "W1P"),
    ("jetnet.evaluation.gen_metrics", "w1efp", "W1EFP"),
    ("jetnet.evaluation.gen_metrics", "cov_mmd", "COV and MMD"),
    ("jetnet.evaluation.gen_metrics", "get_fpd_kpd_jet_features", "EFP features for FPD/KPD (both samples)"),
    ("jetnet.evaluation.gen_metrics", "fpd", "FPD"),
    ("jetnet.evaluation.gen_metrics", "kpd", "KPD"),
    ("models.metrics", "fpnd", "FPND (ParticleNet)"),
)


@contextlib.contextmanager
def timed_metrics() -> Iterator[dict[str, dict[str, float]]]:
    """Wrap each function of :data:`TIMED_FUNCTIONS` in a timer while the block runs.

    Yields:
        Label to ``{"seconds": total wall time, "calls": count, "rss_after_mib": resident memory
        after the last call, "peak_rss_after_mib": the process's peak so far}``, filled as the
        block runs.
    """
    import importlib

    import resource

    import psutil

    process = psutil.Process()
    times: dict[str, dict[str, float]] = {
        label: {"seconds": 0.0, "calls": 0, "rss_after_mib": 0.0, "peak_rss_after_mib": 0.0} for _, _, label in TIMED_FUNCTIONS
    }
    originals = []
    for module_name, name, label in TIMED_FUNCTIONS:
        module = importlib.import_module(module_name)
        original = getattr(module, name)

        @functools.wraps(original)
        def wrapper(*args: Any, _original=original, _label=label, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return _original(*args, **kwargs)
            finally:
                times[_label]["seconds"] += time.perf_counter() - started
                times[_label]["calls"] += 1
                times[_label]["rss_after_mib"] = process.memory_info().rss / 2**20
                times[_label]["peak_rss_after_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10

        setattr(module, name, wrapper)
        originals.append((module, name, original))
    try:
        yield times
    finally:
        for module, name, original in originals:
            setattr(module, name, original)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark with command-line arguments ``argv`` and return what it writes to its JSON file."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_device_argument(parser)
    parser.add_argument("--n-jets", type=positive_int, default=5000, help="jets in each sample")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="seed of the jetnet metrics")
    parser.add_argument("--no-fpnd", action="store_true", help="leave out FPND")
    parser.add_argument("--fpnd-max-jets", type=positive_int, default=50_000, help="jets that FPND passes through ParticleNet")
    parser.add_argument("--jets", default=None, help="jets file with at least --n-jets jets; default: generated Pythia jets")
    args = parser.parse_args(argv)

    from models.data import read_jets
    from models.metrics import JetNetMetricSettings, emd_sum, evaluate_generated

    data = read_jets(jets_file(args.jets, args.n_jets))
    if len(data) < args.n_jets:
        raise SystemExit(f"{data.path} contains {len(data)} jets, fewer than --n-jets {args.n_jets}. Pass a larger file.")
    reference = data.constituents[: args.n_jets]
    reference_mask = data.mask[: args.n_jets]
    resample = np.random.default_rng(1).integers(0, args.n_jets, args.n_jets)
    generated = reference[resample]
    generated_mask = reference_mask[resample]

    # EMD_sum alone, as every search evaluation computes it
    started = time.perf_counter()
    emd_sum(generated, reference, generated_mask=generated_mask, reference_mask=reference_mask)
    exact_s = time.perf_counter() - started
    started = time.perf_counter()
    emd_sum(generated, reference, generated_mask=generated_mask, reference_mask=reference_mask, bins=100)
    binned_s = time.perf_counter() - started

    select_device(args.device, args.threads)
    settings = JetNetMetricSettings(fpnd=not args.no_fpnd, fpnd_max_jets=args.fpnd_max_jets, device=args.device)
    with timed_metrics() as times:
        started = time.perf_counter()
        values = evaluate_generated(generated, generated_mask, reference, reference_mask, args.seed, settings=settings)
        total_s = time.perf_counter() - started

    rows = [{"metric": "EMD_sum alone, exact W1", "seconds": exact_s, "calls": 1}]
    rows.append({"metric": "EMD_sum alone, 100 bins", "seconds": binned_s, "calls": 1})
    rows += [{"metric": label, **timing} for label, timing in times.items() if timing["calls"]]
    rows.append({"metric": "evaluate_generated (total)", "seconds": total_s, "calls": 1})
    print_table(rows, ["metric", "seconds", "calls", "rss_after_mib", "peak_rss_after_mib"], title=f"Metric cost on {args.n_jets} jets per sample (JetNetMetricSettings defaults)")
    payload = {
        "settings": vars(args),
        "metric_settings": {key: getattr(settings, key) for key in settings.__dataclass_fields__},
        "rows": rows,
        "values": values,
    }
    write_results("metrics", payload, device=args.device)
    return payload


if __name__ == "__main__":
    run_benchmark(main)
