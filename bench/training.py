"""ConVAE training throughput at the two published sizes, against this machine's matmul FLOP/s.

Each repeat trains each size for one epoch with ``models.training.train_convae`` (the loop
that trials run, batches of 100 jets, Adam) on real jets, and measures the float32 matmul
FLOP/s of the device. The measurements alternate, so a slow phase of a shared machine
hits all of them. The last epoch of ``train_convae`` always evaluates EMD_sum, so the
validation split is cut to ``--validation-jets`` jets to keep that cost small. The
throughput counts the whole call.

Every size also trains with ``torch.optim.Adam`` switched to ``fused=True`` inside the same
interleaved run (:func:`fused_adam`), the before/after of the fix proposed for the largest
cost that ``--profile`` shows. FLOPs per jet come from ``torch.utils.flop_counter.FlopCounterMode`` over one training
step (forward, ``models.losses.convae_loss``, backward) of a batch of 100 jets. It counts
matrix multiplications and convolutions, not elementwise operations or the Adam update.
The achieved FLOP/s is FLOPs per jet times jets per second.

Sizes (Orzari et al., 2023, arXiv:2310.13138):

- generation-tuned: latent 190, 75 filters, kernel 3, 1100 linear nodes, 4 conv layers;
- reconstruction-tuned: latent 180, 50 filters, kernel 2, 3000 linear nodes, 4 conv layers.

The activation is ReLU for both, because only the architecture sizes are given.

Run from the repository root::

    python -m bench.training                 # 2,100 training jets per epoch: about 4 minutes
    python -m bench.training --profile       # and a torch.profiler table of 20 training steps
    python -m bench.training --device cuda --jets-per-epoch 70000
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import math
import sys
from collections.abc import Iterator
from typing import Any

import torch

from bench.common import (
    add_device_argument,
    interleave,
    jets_file,
    matmul_flops_per_s,
    median,
    print_table,
    select_device,
    synchronize,
    write_results,
)

__all__ = ["SIZES", "count_training_flops", "main"]

logger = logging.getLogger(__name__)

#: ConVAE hyperparameters and loss settings of the two published tunings.
SIZES = {
    "generation-tuned": {
        "config": {"latent_dim": 190, "n_filters": 75, "kernel_size": 3, "linear_nodes": 1100, "n_conv_layers": 4},
        "objective": "generation",
        "beta": 0.95,
    },
    "reconstruction-tuned": {
        "config": {"latent_dim": 180, "n_filters": 50, "kernel_size": 2, "linear_nodes": 3000, "n_conv_layers": 4},
        "objective": "reconstruction",
        "beta": 0.05,
    },
}

BATCH_SIZE = 100


def _model(size: str, device: torch.device):
    from models.convae import ConVAE, ConVAEConfig

    torch.manual_seed(0)
    return ConVAE(ConVAEConfig(activation="ReLU", **SIZES[size]["config"])).to(device)


def _weights(size: str, pt_over_mass: float):
    from models.losses import LossWeights

    return LossWeights(alpha=1.0, beta=SIZES[size]["beta"], gamma=1.0, gamma_pt=1.0, gamma_m=pt_over_mass)


def count_training_flops(size: str, data, device: torch.device) -> dict[str, float]:
    """Count the FLOPs of one training step of a batch of 100 jets, per jet.

    Returns:
        ``forward`` (encoder, decoder and loss) and ``training_step`` (forward and backward)
        FLOPs per jet, and the number of parameters.
    """
    from torch.utils.flop_counter import FlopCounterMode

    from models.losses import convae_loss

    model = _model(size, device)
    weights = _weights(size, data.statistics["pt_over_mass"])
    x = data.train[:BATCH_SIZE]
    with FlopCounterMode(display=False) as forward_counter:
        with torch.no_grad():
            reconstruction, mean, logvar = model(x)
            convae_loss(x, reconstruction, mean, logvar, data.scaler, weights)
    with FlopCounterMode(display=False) as step_counter:
        reconstruction, mean, logvar = model(x)
        convae_loss(x, reconstruction, mean, logvar, data.scaler, weights).total.backward()
    return {
        "forward_flops_per_jet": forward_counter.get_total_flops() / BATCH_SIZE,
        "training_flops_per_jet": step_counter.get_total_flops() / BATCH_SIZE,
        "parameters": sum(parameter.numel() for parameter in model.parameters()),
    }


@contextlib.contextmanager
def fused_adam() -> Iterator[None]:
    """Make ``torch.optim.Adam`` use ``fused=True`` for the duration of the block.

    ``models.training`` now creates Adam with ``fused=True`` itself, the fix for the largest
    cost of CPU training. The cases without this block still use the per-tensor loop,
    because :func:`per_tensor_adam` wraps them, so the table keeps the before/after.
    """
    original = torch.optim.Adam
    torch.optim.Adam = functools.partial(_with_fused, original, True)
    try:
        yield
    finally:
        torch.optim.Adam = original


def _with_fused(original, use_fused: bool, *args, **kwargs):
    # models.training passes fused=True itself, which this keyword replaces
    kwargs["fused"] = use_fused
    return original(*args, **kwargs)


@contextlib.contextmanager
def per_tensor_adam() -> Iterator[None]:
    """Make ``torch.optim.Adam`` use its per-tensor loop, the CPU default of PyTorch 2.13."""
    original = torch.optim.Adam
    torch.optim.Adam = functools.partial(_with_fused, original, False)
    try:
        yield
    finally:
        torch.optim.Adam = original


def train_one_epoch(size: str, data, train, validation) -> float:
    """Train a fresh model of ``size`` for one epoch with ``train_convae`` and return the seconds."""
    import time

    model = _model(size, train.device)
    synchronize(train.device)
    started = time.perf_counter()
    _train_epoch(size, model, data, train, validation)
    synchronize(train.device)
    return time.perf_counter() - started


def _train_epoch(size: str, model, data, train, validation) -> None:
    """Train ``model`` of ``size`` for one epoch on ``train`` with the benchmark's settings."""
    from models.training import train_convae

    train_convae(
        model,
        train,
        validation,
        data.scaler,
        _weights(size, data.statistics["pt_over_mass"]),
        objective=SIZES[size]["objective"],
        epochs=1,
        batch_size=BATCH_SIZE,
        lr=1.0e-4,
        seed=0,
        data_fingerprint=data.fingerprint,
        eval_every=1,
    )


def profile_training(size: str, data, device: torch.device, steps: int = 20) -> str:
    """Profile ``steps`` training steps of ``size`` with torch.profiler and return the op table."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    train = data.train[: steps * BATCH_SIZE]
    with profile(activities=activities) as profiler:
        _train_epoch(size, _model(size, device), data, train, data.validation[:BATCH_SIZE])
    sort_key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return profiler.key_averages().table(sort_by=sort_key, row_limit=20)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark with command-line arguments ``argv`` and return what it writes to its JSON file."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_device_argument(parser)
    parser.add_argument("--jets-per-epoch", type=int, default=2100, help="training jets per timed epoch")
    parser.add_argument("--validation-jets", type=int, default=200, help="validation jets of the EMD_sum at the end of the epoch")
    parser.add_argument("--repeats", type=int, default=3, help="timed epochs per size, alternating with matmul measurements")
    parser.add_argument("--matmul-size", type=int, default=2048, help="side of the square matrices of the matmul ceiling")
    parser.add_argument("--profile", action="store_true", help="also print torch.profiler tables of 20 training steps per size")
    parser.add_argument("--jets", default=None, help="jets file; default: generated Pythia jets")
    args = parser.parse_args(argv)

    from hpo.objectives import prepare_data

    device = select_device(args.device, args.threads)
    n_jets = math.ceil((args.jets_per_epoch + BATCH_SIZE) / 0.7) + 10
    data = prepare_data(jets_file(args.jets, n_jets), n_jets=n_jets, device=str(device))
    train = data.train[: args.jets_per_epoch]
    validation = data.validation[: args.validation_jets]

    flops = {size: count_training_flops(size, data, device) for size in SIZES}
    # warm-up: one short epoch per size, and one matmul measurement
    for size in SIZES:
        train_one_epoch(size, data, train[: 2 * BATCH_SIZE], validation)
    matmul_flops_per_s(device, args.matmul_size, 0.5)

    def epoch_with_fused_adam(size: str) -> float:
        with fused_adam():
            return len(train) / train_one_epoch(size, data, train, validation)

    def epoch_with_per_tensor_adam(size: str) -> float:
        with per_tensor_adam():
            return len(train) / train_one_epoch(size, data, train, validation)

    cases = {"matmul": lambda: matmul_flops_per_s(device, args.matmul_size)}
    for size in SIZES:
        cases[size] = lambda size=size: epoch_with_per_tensor_adam(size)
        cases[f"{size}, fused Adam"] = lambda size=size: epoch_with_fused_adam(size)
    values = interleave(cases, args.repeats)
    ceiling = median(values["matmul"])

    rows = []
    for case in cases:
        if case == "matmul":
            continue
        size = case.split(",")[0]
        jets_per_s = median(values[case])
        achieved = jets_per_s * flops[size]["training_flops_per_jet"]
        # each round's epoch against the matmul ceiling of the same round, because the load
        # of a shared machine drifts between rounds
        round_fractions = [
            jets * flops[size]["training_flops_per_jet"] / matmul for jets, matmul in zip(values[case], values["matmul"])
        ]
        rows.append(
            {
                "size": case,
                "jets_per_s": jets_per_s,
                "epoch_jets_per_s_runs": values[case],
                "parameters": flops[size]["parameters"],
                "training_mflop_per_jet": flops[size]["training_flops_per_jet"] / 1e6,
                "forward_mflop_per_jet": flops[size]["forward_flops_per_jet"] / 1e6,
                "achieved_gflop_per_s": achieved / 1e9,
                "matmul_gflop_per_s": ceiling / 1e9,
                "fraction_of_matmul": achieved / ceiling,
                "fraction_of_matmul_runs": round_fractions,
                "median_fraction_per_round": median(round_fractions),
            }
        )
    print_table(
        rows,
        [
            "size",
            "jets_per_s",
            "training_mflop_per_jet",
            "achieved_gflop_per_s",
            "matmul_gflop_per_s",
            "fraction_of_matmul",
            "median_fraction_per_round",
        ],
        title=f"ConVAE training on {device}, batch {BATCH_SIZE}, median of {args.repeats} epochs of {len(train)} jets",
    )

    profiles = {}
    if args.profile:
        for size in SIZES:
            with per_tensor_adam():
                profiles[size] = profile_training(size, data, device)
            print(f"\ntorch.profiler, 20 training steps of the {size} ConVAE:\n{profiles[size]}")
            with fused_adam():
                profiles[f"{size}, fused Adam"] = profile_training(size, data, device)
            print(f"\nthe same with fused Adam:\n{profiles[f'{size}, fused Adam']}")

    payload = {
        "settings": vars(args),
        "device": str(device),
        "matmul_gflop_per_s_runs": [value / 1e9 for value in values["matmul"]],
        "rows": rows,
        "targets": {"min_fraction_of_matmul": 0.5},
        "profiles": profiles,
    }
    write_results("training", payload, device=str(device))
    return payload


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    main()
