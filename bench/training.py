"""ConVAE training throughput at the two published sizes, against this machine's matmul FLOP/s.

Each repeat trains each size for one epoch with ``models.training.train_convae`` (the loop
that trials run, batches of 100 jets, Adam) on real jets, and measures the float32 matmul
FLOP/s of the device. The measurements alternate, so a slow phase of a shared machine
hits all of them.

Every size trains in three ways inside the same interleaved run, the before and after of two
fixes: with Adam's per-tensor loop and glibc's default malloc settings (the code before
both), with fused Adam (:func:`fused_adam`), and with fused Adam and the malloc settings of a
worker process (:func:`worker_malloc`, the code now). Each epoch also counts the page faults
of the process per training step.

The last epoch of ``train_convae`` always evaluates EMD_sum and copies the best checkpoint,
so the validation split is cut to ``--validation-jets`` jets to keep that cost small. Two
throughputs are reported: that of the whole call (``jets_per_s``), and that of the training
steps alone (``step_jets_per_s``): the call less the closing evaluation and checkpoint copy
(:func:`timed_evaluation`). A paper trial evaluates once per 5 epochs of 124,076 jets, and
this benchmark once per epoch of ``--jets-per-epoch`` jets.

FLOPs per jet come from ``torch.utils.flop_counter.FlopCounterMode`` over one training step
(forward, ``models.losses.convae_loss``, backward) of a batch of 100 jets. It counts matrix
multiplications and convolutions, not elementwise operations, the Adam update or the
evaluation. The achieved FLOP/s is FLOPs per jet times jets per second, and its fraction of
the matmul rate is given for both throughputs.

The matmul rate is that of ``torch.mm`` on square matrices, which calls the BLAS library
(MKL in the PyPI builds of torch). The convolutions go through oneDNN instead, which can be
faster than that BLAS on the same CPU. So each round also times the widest convolution of
the generation-tuned size, forward and backward, at the training batch
(:func:`convolution_flops_per_s`). Where that rate is above the matmul rate, the fraction of
the matmul rate can exceed 1, and the fraction of the faster of the two is the tighter
measure.

Sizes (Orzari et al., 2023, arXiv:2310.13138):

- generation-tuned: latent 190, 75 filters, kernel 3, 1100 linear nodes, 4 conv layers;
- reconstruction-tuned: latent 180, 50 filters, kernel 2, 3000 linear nodes, 4 conv layers.

The activation is ReLU for both, because only the architecture sizes are given.

Run from the repository root::

    python -m bench.training                 # 3 repeats of 2,100 training jets per epoch
    python -m bench.training --profile       # and a torch.profiler table of 20 training steps
    python -m bench.training --device cuda --jets-per-epoch 70000
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import math
import resource
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from bench.common import (
    add_device_argument,
    calls_per_s,
    interleave,
    jets_file,
    matmul_flops_per_s,
    median,
    positive_int,
    print_table,
    run_benchmark,
    select_device,
    synchronize,
    write_results,
)
from hpo.host_memory import glibc

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


# mallopt parameters and glibc's documented defaults (mallopt(3))
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_DEFAULT_TRIM_THRESHOLD = 128 * 1024
_DEFAULT_MMAP_MAX = 65536


@contextlib.contextmanager
def worker_malloc() -> Iterator[None]:
    """Give this process the malloc behaviour of a worker for the duration of the block.

    A worker starts with ``hpo.host_memory.TRAINING_MALLOC_ENV``, which glibc reads only at
    start-up, so the block sets the same parameters with ``mallopt``: no separate mappings,
    and no trimming below 2 GiB, the largest threshold that ``mallopt`` takes. The arena limit
    does not matter here, because the benchmark trains in the main thread. Afterwards the
    block restores glibc's default values and hands the freed memory back. The mmap
    threshold then stays where it was, because any ``mallopt`` call stops glibc from raising
    it on its own. Other C libraries are left alone.
    """
    libc = glibc()
    if libc is None:
        yield
        return
    libc.mallopt(_M_MMAP_MAX, 0)
    libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
    try:
        yield
    finally:
        libc.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
        libc.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD)
        libc.malloc_trim(0)


@contextlib.contextmanager
def timed_evaluation(device: torch.device) -> Iterator[list[float]]:
    """Time the evaluations of ``train_convae`` and the bookkeeping that follows each.

    Inside the block, ``models.training.evaluate_convae`` and ``_TrainingRun.record`` (which
    copies the best checkpoint) add their seconds to the list that the block yields.
    """
    import time

    import models.training

    seconds: list[float] = []

    def timed(function):
        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            synchronize(device)
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                synchronize(device)
                seconds.append(time.perf_counter() - started)

        return wrapper

    evaluate, record = models.training.evaluate_convae, models.training._TrainingRun.record
    models.training.evaluate_convae = timed(evaluate)
    models.training._TrainingRun.record = timed(record)
    try:
        yield seconds
    finally:
        models.training.evaluate_convae = evaluate
        models.training._TrainingRun.record = record


@dataclass(frozen=True)
class Epoch:
    """Timing of one epoch of ``train_convae``."""

    seconds: float
    evaluation_seconds: float
    page_faults_per_step: float


#: Widest convolution of the generation-tuned encoder: 300 to 600 channels, kernel (1, 3), on
#: the 24 columns that the previous layers leave of the 30 particles.
WIDEST_CONVOLUTION = {"in_channels": 300, "out_channels": 600, "kernel_size": (1, 3), "width": 24}


def widest_convolution_pass(device: torch.device, backward: bool = True) -> tuple[Callable[[], None], int]:
    """Return one pass of the generation-tuned ConVAE's widest convolution and its FLOPs.

    The pass is the forward convolution of a batch of 100 and, with ``backward``, the
    backward pass to its input and weight, as in training. Without it the forward pass runs
    without gradients, as in generation. Its FLOPs are counted with ``FlopCounterMode``, as
    the model's FLOPs are.
    """
    from torch.utils.flop_counter import FlopCounterMode

    shape = WIDEST_CONVOLUTION
    generator = torch.Generator().manual_seed(0)
    layer = torch.nn.Conv2d(shape["in_channels"], shape["out_channels"], shape["kernel_size"]).to(device)
    x = torch.rand(BATCH_SIZE, shape["in_channels"], 1, shape["width"], generator=generator).to(device)
    x.requires_grad_(backward)

    def one_pass() -> None:
        if backward:
            layer(x).sum().backward()
            return
        with torch.no_grad():
            layer(x)

    with FlopCounterMode(display=False) as counter:
        one_pass()
    return one_pass, counter.get_total_flops()


def convolution_flops_per_s(device: torch.device, min_seconds: float = 1.0, backward: bool = True) -> float:
    """Measure the FLOP/s of :func:`widest_convolution_pass`, repeated until ``min_seconds`` have passed."""
    one_pass, flops = widest_convolution_pass(device, backward)
    return flops * calls_per_s(one_pass, device, min_seconds)


def train_one_epoch(size: str, data, train, validation) -> Epoch:
    """Train a fresh model of ``size`` for one epoch with ``train_convae`` and time it."""
    import time

    model = _model(size, train.device)
    synchronize(train.device)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    with timed_evaluation(train.device) as evaluation_seconds:
        started = time.perf_counter()
        _train_epoch(size, model, data, train, validation)
        synchronize(train.device)
        seconds = time.perf_counter() - started
    steps = math.ceil(len(train) / BATCH_SIZE)
    return Epoch(seconds, sum(evaluation_seconds), (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / steps)


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
    parser.add_argument("--jets-per-epoch", type=positive_int, default=2100, help="training jets per timed epoch")
    parser.add_argument("--validation-jets", type=positive_int, default=200, help="validation jets of the EMD_sum at the end of the epoch")
    parser.add_argument("--repeats", type=positive_int, default=3, help="timed epochs per size, alternating with matmul measurements")
    parser.add_argument("--matmul-size", type=positive_int, default=2048, help="side of the square matrices of the matmul ceiling")
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
    convolution_flops_per_s(device, 0.5)

    epochs: dict[str, list[Epoch]] = {}

    def epoch(case: str, size: str, adam, malloc) -> float:
        with adam(), malloc():
            # untimed: a trial's first step grows the heap once, and its epochs reuse it
            train_one_epoch(size, data, train[: 2 * BATCH_SIZE], validation)
            timing = train_one_epoch(size, data, train, validation)
        epochs.setdefault(case, []).append(timing)
        return len(train) / timing.seconds

    variants = {
        "": (per_tensor_adam, contextlib.nullcontext),
        ", fused Adam": (fused_adam, contextlib.nullcontext),
        ", fused Adam, worker malloc": (fused_adam, worker_malloc),
    }
    cases = {
        "matmul": lambda: matmul_flops_per_s(device, args.matmul_size),
        "convolution": lambda: convolution_flops_per_s(device),
    }
    for size in SIZES:
        for suffix, (adam, malloc) in variants.items():
            case = size + suffix
            cases[case] = functools.partial(epoch, case, size, adam, malloc)
    values = interleave(cases, args.repeats)
    ceiling = median(values["matmul"])
    convolution_rate = median(values["convolution"])

    rows = []
    for case in cases:
        if case in ("matmul", "convolution"):
            continue
        size = case.split(",")[0]
        flops_per_jet = flops[size]["training_flops_per_jet"]
        timings = epochs[case]
        step_jets_per_s = [len(train) / (timing.seconds - timing.evaluation_seconds) for timing in timings]
        # each round's epoch against the matmul ceiling of the same round, because the load
        # of a shared machine drifts between rounds
        round_fractions = [jets * flops_per_jet / matmul for jets, matmul in zip(values[case], values["matmul"])]
        step_fractions = [jets * flops_per_jet / matmul for jets, matmul in zip(step_jets_per_s, values["matmul"])]
        fastest = [max(matmul, convolution) for matmul, convolution in zip(values["matmul"], values["convolution"])]
        fastest_fractions = [jets * flops_per_jet / rate for jets, rate in zip(values[case], fastest)]
        rows.append(
            {
                "size": case,
                "jets_per_s": median(values[case]),
                "epoch_jets_per_s_runs": values[case],
                "step_jets_per_s": median(step_jets_per_s),
                "step_jets_per_s_runs": step_jets_per_s,
                "evaluation_s": median([timing.evaluation_seconds for timing in timings]),
                "page_faults_per_step": median([timing.page_faults_per_step for timing in timings]),
                "page_faults_per_step_runs": [timing.page_faults_per_step for timing in timings],
                "parameters": flops[size]["parameters"],
                "training_mflop_per_jet": flops_per_jet / 1e6,
                "forward_mflop_per_jet": flops[size]["forward_flops_per_jet"] / 1e6,
                "matmul_gflop_per_s": ceiling / 1e9,
                "fraction_of_matmul_runs": round_fractions,
                "median_fraction_per_round": median(round_fractions),
                "step_fraction_of_matmul_runs": step_fractions,
                "median_step_fraction_per_round": median(step_fractions),
                "convolution_gflop_per_s": convolution_rate / 1e9,
                "fraction_of_fastest_runs": fastest_fractions,
                "median_fraction_of_fastest_per_round": median(fastest_fractions),
            }
        )
    print_table(
        rows,
        [
            "size",
            "jets_per_s",
            "step_jets_per_s",
            "evaluation_s",
            "page_faults_per_step",
            "training_mflop_per_jet",
            "matmul_gflop_per_s",
            "median_fraction_per_round",
            "median_step_fraction_per_round",
            "convolution_gflop_per_s",
            "median_fraction_of_fastest_per_round",
        ],
        title=f"ConVAE training on {device}, batch {BATCH_SIZE}, median of {args.repeats} epochs of {len(train)} jets",
    )

    profiles = {}
    if args.profile:
        for size in SIZES:
            for suffix, (adam, malloc) in variants.items():
                with adam(), malloc():
                    profiles[size + suffix] = profile_training(size, data, device)
                print(f"\ntorch.profiler, 20 training steps of the {size + suffix} ConVAE:\n{profiles[size + suffix]}")

    payload = {
        "settings": vars(args),
        "device": str(device),
        "matmul_gflop_per_s_runs": [value / 1e9 for value in values["matmul"]],
        "convolution_gflop_per_s_runs": [value / 1e9 for value in values["convolution"]],
        "rows": rows,
        "targets": {"min_fraction_of_matmul": 0.5},
        "profiles": profiles,
    }
    write_results("training", payload, device=str(device))
    return payload


if __name__ == "__main__":
    run_benchmark(main)
