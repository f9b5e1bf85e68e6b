"""Generation time per jet against batch size for ConVAE, ConVAE+NF and NF, and its FLOP floor.

Jets are made as ``jethpo generate`` makes them: ``models.checkpoint.JetSampler.sample_gev``
with a batch size, which draws z, runs the networks without gradients and converts the
jets to (px, py, pz) in GeV as float64 NumPy arrays. The networks have the published sizes
and freshly initialised weights (seed 0), because the time does not depend on the weights.

- ConVAE: the generation-tuned ConVAE's decoder (latent 190, 75 filters, kernel 3, 1100
  linear nodes, 4 conv layers).
- ConVAE+NF: a RealNVP with 55 flows and hidden layers of 400, 350, 400 and 400 nodes on
  a 180-dimensional latent space. The reconstruction-tuned ConVAE (latent 180, 50 filters,
  kernel 2, 3000 linear nodes, 4 conv layers) decodes its samples into jets, because the
  pipeline trains the latent flow on that ConVAE's latents.
- NF: a RealNVP with 65 flows and hidden layers of 150, 200, 350 and 150 nodes on the
  flattened 90-value jet.

For each batch size the three models alternate ``--repeats`` times, and each measurement
runs as many batches as fill ``--min-seconds`` (at least one). The FLOPs per jet come from
``torch.utils.flop_counter.FlopCounterMode`` over one batch of 100 jets (matrix
multiplications and convolutions only), and the floor is those FLOPs divided by the float32
matmul FLOP/s measured in the same run. The run also times the forward pass of the widest
ConVAE convolution (``bench.training.convolution_flops_per_s``), because the convolutions
go through oneDNN, which can be faster than the BLAS behind ``torch.mm``. The floor at the
faster of the two rates is given as well, the tighter bound where the convolution is faster.
Each round also times one hidden layer of the flow as ``nn.Linear`` and through oneDNN
(:func:`linear_flops_per_s`), to show what the linear layers could reach.

Run from the repository root::

    python -m bench.generation                                  # batch sizes 1 to 10,000: about 5 minutes
    python -m bench.generation --batch-sizes 100000 --repeats 1 --output generation-100k   # needs over 10 GB free
    python -m bench.generation --device cuda --batch-sizes 1 10 100 1000 10000 100000
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from typing import Any

import numpy as np
import torch

from bench.common import (
    add_device_argument,
    calls_per_s,
    interleave,
    matmul_flops_per_s,
    median,
    positive_float,
    positive_int,
    print_table,
    result_name,
    run_benchmark,
    select_device,
    synchronize,
    write_results,
)
from bench.training import convolution_flops_per_s

__all__ = ["PUBLISHED_US_PER_JET", "build_samplers", "main"]

logger = logging.getLogger(__name__)

#: Published generation times on an NVIDIA T4 (Orzari et al., 2023, arXiv:2310.13138).
PUBLISHED_US_PER_JET = {"ConVAE+NF (T4)": 18.3, "MPGAN (T4)": 35.7}

GENERATION_TUNED = {"latent_dim": 190, "n_filters": 75, "kernel_size": 3, "linear_nodes": 1100, "n_conv_layers": 4}
RECONSTRUCTION_TUNED = {"latent_dim": 180, "n_filters": 50, "kernel_size": 2, "linear_nodes": 3000, "n_conv_layers": 4}
LATENT_FLOW = {"n_flows": 55, "hidden_sizes": [400, 350, 400, 400]}
JET_FLOW = {"n_flows": 65, "hidden_sizes": [150, 200, 350, 150]}

#: Batch size from which a measurement runs a single batch without a probe batch.
PROBE_LIMIT = 10_000


def _scaler_state() -> dict[str, Any]:
    """Return a min-max scaler state with GeV ranges typical of 1 TeV gluon jets."""
    from models.data import MinMaxScaler

    scaler = MinMaxScaler(minimum=[-800.0, -800.0, -3000.0], maximum=[800.0, 800.0, 3000.0])
    return scaler.state_dict()


def _checkpoint(kind: str, model: torch.nn.Module, hyperparameters: dict, **extra: Any) -> dict[str, Any]:
    return {
        "kind": kind,
        "state_dict": model.state_dict(),
        "scaler": _scaler_state(),
        "hyperparameters": hyperparameters,
        "data_fingerprint": "benchmark",
        "seed": 0,
        **extra,
    }


def build_samplers(device: torch.device) -> dict[str, Any]:
    """Build the three samplers through ``models.checkpoint.sampler_from_checkpoint``."""
    from models.checkpoint import sampler_from_checkpoint
    from models.convae import ConVAE, ConVAEConfig
    from models.realnvp import RealNVP

    torch.manual_seed(0)
    generation = ConVAE(ConVAEConfig(**GENERATION_TUNED))
    reconstruction = ConVAE(ConVAEConfig(**RECONSTRUCTION_TUNED))
    latent_flow = RealNVP(dim=RECONSTRUCTION_TUNED["latent_dim"], **LATENT_FLOW)
    jet_flow = RealNVP(dim=90, **JET_FLOW)

    checkpoints = {
        "ConVAE": _checkpoint("convae", generation, dict(GENERATION_TUNED, activation="ReLU")),
        "ConVAE+NF": _checkpoint(
            "realnvp",
            latent_flow,
            latent_flow.hyperparameters,
            latent_model={
                "hyperparameters": dict(RECONSTRUCTION_TUNED, activation="ReLU"),
                "state_dict": reconstruction.state_dict(),
            },
        ),
        "NF": _checkpoint("realnvp", jet_flow, jet_flow.hyperparameters),
    }
    return {name: sampler_from_checkpoint(checkpoint, device=device) for name, checkpoint in checkpoints.items()}


def count_generation_flops(sampler, batch: int = 100) -> float:
    """Count the FLOPs per jet of ``sampler.sample_scaled`` on one batch."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        sampler.sample_scaled(batch, torch.Generator().manual_seed(0))
    return counter.get_total_flops() / batch


#: A hidden layer of the ConVAE+NF flow (400 to 350 nodes) at a batch of 1,000 jets, the best
#: batch size on machines A, E and F (bench/BENCHMARKS.md, section 4).
LINEAR_SHAPE = {"batch": 1000, "in_features": 400, "out_features": 350}


def linear_flops_per_s(device: torch.device, onednn: bool, min_seconds: float = 1.0) -> float | None:
    """Measure the FLOP/s of one flow layer, ``nn.Linear`` as the samplers run it or through oneDNN.

    ``nn.Linear`` on the CPU calls the BLAS library (MKL in the PyPI builds of torch). With
    ``onednn`` the same layer is converted by ``torch.utils.mkldnn.to_mkldnn``, which runs it
    through oneDNN. The samplers do not do that, so the rate is a measure of what the linear
    layers could reach. Returns None for oneDNN on a GPU or where torch lacks oneDNN.
    """
    if onednn and (device.type != "cpu" or not torch.backends.mkldnn.is_available()):
        return None
    shape = LINEAR_SHAPE
    generator = torch.Generator().manual_seed(0)
    layer = torch.nn.Linear(shape["in_features"], shape["out_features"]).to(device).eval()
    x = torch.rand(shape["batch"], shape["in_features"], generator=generator).to(device)
    if onednn:
        import warnings

        # NOTE: torch.utils.mkldnn defines its modules with torch.jit.script_method, which
        # torch 2.13 marks deprecated, so this route may go away with TorchScript
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            from torch.utils import mkldnn

            layer = mkldnn.to_mkldnn(torch.nn.Sequential(layer))
    flops = 2 * shape["batch"] * shape["in_features"] * shape["out_features"]
    with torch.no_grad():
        layer(x)
        return flops * calls_per_s(lambda: layer(x), device, min_seconds)


def time_per_jet(sampler, batch_size: int, min_seconds: float, max_jets: int) -> float:
    """Return seconds per jet of ``sample_gev`` in batches of ``batch_size``.

    One probe batch sets how many batches fill ``min_seconds``. The timed call then makes
    that many batches, at most ``max_jets`` jets but at least one batch. Batches of
    ``PROBE_LIMIT`` jets or more run once without a probe, which would double their cost.
    """
    generator = torch.Generator().manual_seed(1)
    batches = 1
    if batch_size < PROBE_LIMIT:
        started = time.perf_counter()
        sampler.sample_gev(batch_size, generator, batch_size=batch_size)
        synchronize(sampler.device)
        probe_s = time.perf_counter() - started
        batches = max(1, min(math.ceil(min_seconds / max(probe_s, 1e-6)), max(1, max_jets // batch_size)))

    started = time.perf_counter()
    jets = sampler.sample_gev(batches * batch_size, generator, batch_size=batch_size)
    synchronize(sampler.device)
    seconds = time.perf_counter() - started
    if not np.isfinite(jets).all():
        raise RuntimeError(f"{sampler.name} generated non-finite jets")
    return seconds / (batches * batch_size)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark with command-line arguments ``argv`` and return what it writes to its JSON file."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_device_argument(parser)
    parser.add_argument("--batch-sizes", type=positive_int, nargs="+", default=[1, 10, 100, 1000, 10000], help="jets per network call")
    parser.add_argument("--repeats", type=positive_int, default=3, help="measurements per model and batch size")
    parser.add_argument("--min-seconds", type=positive_float, default=1.0, help="minimum wall time of one measurement")
    parser.add_argument("--max-jets", type=positive_int, default=200_000, help="most jets one measurement makes")
    parser.add_argument("--matmul-size", type=positive_int, default=2048, help="side of the square matrices of the matmul ceiling")
    parser.add_argument(
        "--models", nargs="+", choices=("ConVAE", "ConVAE+NF", "NF"), default=["ConVAE", "ConVAE+NF", "NF"], help="models to time"
    )
    parser.add_argument("--output", type=result_name, default="generation", help="name of the result file under bench/results/")
    args = parser.parse_args(argv)

    device = select_device(args.device, args.threads)
    samplers = {name: sampler for name, sampler in build_samplers(device).items() if name in args.models}
    flops = {name: count_generation_flops(sampler) for name, sampler in samplers.items()}
    matmul_runs = [matmul_flops_per_s(device, args.matmul_size)]
    convolution_runs = [convolution_flops_per_s(device, backward=False)]
    linear_runs = {"torch": [], "onednn": []}

    def measure_linear() -> None:
        for name, runs in linear_runs.items():
            rate = linear_flops_per_s(device, onednn=name == "onednn")
            if rate is not None:
                runs.append(rate)

    measure_linear()

    rows = []
    for batch_size in args.batch_sizes:
        cases = {
            name: (lambda sampler=sampler: time_per_jet(sampler, batch_size, args.min_seconds, args.max_jets))
            for name, sampler in samplers.items()
        }
        values = interleave(cases, args.repeats)
        for name, seconds in values.items():
            rows.append({"model": name, "batch_size": batch_size, "us_per_jet": median(seconds) * 1e6, "runs_us": [v * 1e6 for v in seconds]})
        matmul_runs.append(matmul_flops_per_s(device, args.matmul_size))
        convolution_runs.append(convolution_flops_per_s(device, backward=False))
        measure_linear()
        latest = rows[-len(samplers) :]
        print(f"batch size {batch_size}: " + ", ".join(f"{row['model']} {row['us_per_jet']:.1f} us/jet" for row in latest), flush=True)

    ceiling = median(matmul_runs)
    fastest = max(ceiling, median(convolution_runs))
    summary = []
    for name, sampler in samplers.items():
        own = [row for row in rows if row["model"] == name]
        best = min(own, key=lambda row: row["us_per_jet"])
        floor_us = flops[name] / ceiling * 1e6
        fastest_floor_us = flops[name] / fastest * 1e6
        for row in own:
            row["floor_us_per_jet"] = floor_us
            row["times_floor"] = row["us_per_jet"] / floor_us
        summary.append(
            {
                "model": name,
                "parameters": sampler.n_parameters,
                "mflop_per_jet": flops[name] / 1e6,
                "floor_us_per_jet": floor_us,
                "best_us_per_jet": best["us_per_jet"],
                "best_batch_size": best["batch_size"],
                "best_times_floor": best["us_per_jet"] / floor_us,
                "fastest_floor_us_per_jet": fastest_floor_us,
                "best_times_fastest_floor": best["us_per_jet"] / fastest_floor_us,
            }
        )

    print_table(rows, ["model", "batch_size", "us_per_jet", "times_floor"], title=f"Generation time per jet on {device} (sample_gev, GeV output)")
    print_table(
        summary,
        [
            "model",
            "parameters",
            "mflop_per_jet",
            "floor_us_per_jet",
            "best_us_per_jet",
            "best_batch_size",
            "best_times_floor",
            "fastest_floor_us_per_jet",
            "best_times_fastest_floor",
        ],
        title=(
            f"Best batch size against the FLOP floor (matmul {ceiling / 1e9:.1f} GFLOP/s, "
            f"the faster of matmul and convolution {fastest / 1e9:.1f} GFLOP/s)"
        ),
    )
    if linear_runs["onednn"]:
        print(
            f"Linear({LINEAR_SHAPE['in_features']}, {LINEAR_SHAPE['out_features']}) at a batch of "
            f"{LINEAR_SHAPE['batch']}: {median(linear_runs['torch']) / 1e9:.1f} GFLOP/s as nn.Linear, "
            f"{median(linear_runs['onednn']) / 1e9:.1f} GFLOP/s through oneDNN (median of each round)"
        )
    payload = {
        "settings": vars(args),
        "device": str(device),
        "matmul_gflop_per_s_runs": [value / 1e9 for value in matmul_runs],
        "convolution_gflop_per_s_runs": [value / 1e9 for value in convolution_runs],
        "linear_gflop_per_s_runs": [value / 1e9 for value in linear_runs["torch"]],
        "onednn_linear_gflop_per_s_runs": [value / 1e9 for value in linear_runs["onednn"]],
        "published_us_per_jet": PUBLISHED_US_PER_JET,
        "rows": rows,
        "summary": summary,
        "targets": {"max_times_floor_at_best_batch": 2.0},
    }
    write_results(args.output, payload, device=str(device))
    return payload


if __name__ == "__main__":
    run_benchmark(main)
