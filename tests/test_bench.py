"""The benchmark scripts reject bad options with one line that names the option."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bench.common import run_benchmark, throwaway_postgres

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("module", "options", "expected"),
    [
        ("bench.workers", ["--workers", "0"], "argument --workers: expected an integer of at least 1, got '0'"),
        ("bench.workers", ["--trials-per-worker", "x"], "argument --trials-per-worker: expected an integer of at least 1"),
        ("bench.workers", ["--sleep", "-1"], "argument --sleep: expected a finite number 0 or more, got '-1'"),
        ("bench.workers", ["--poll", "0"], "argument --poll: expected a finite number greater than 0"),
        ("bench.workers", ["--timeout", "inf"], "argument --timeout: expected a finite number greater than 0"),
        ("bench.orchestration", ["--levels", "100", "-5"], "argument --levels: expected an integer of at least 1, got '-5'"),
        ("bench.orchestration", ["--repeats", "0"], "argument --repeats: expected an integer of at least 1"),
        ("bench.memory", ["--repeats", "0"], "argument --repeats: expected an integer of at least 1, got '0'"),
        ("bench.memory", ["--threads", "0"], "argument --threads: expected an integer of at least 1, got '0'"),
        ("bench.memory", ["--train-jets", "0"], "argument --train-jets: expected an integer of at least 1, got '0'"),
        ("bench.training", ["--repeats", "0"], "argument --repeats: expected an integer of at least 1, got '0'"),
        ("bench.training", ["--jets-per-epoch", "-100"], "argument --jets-per-epoch: expected an integer of at least 1"),
        ("bench.generation", ["--batch-sizes", "1", "0"], "argument --batch-sizes: expected an integer of at least 1, got '0'"),
        ("bench.generation", ["--min-seconds", "nan"], "argument --min-seconds: expected a finite number greater than 0"),
        ("bench.metrics", ["--n-jets", "0"], "argument --n-jets: expected an integer of at least 1, got '0'"),
        ("bench.metrics", ["--seed", "-1"], "argument --seed: expected an integer of at least 0, got '-1'"),
        ("bench.generation", ["--output", "sub/name"], "argument --output: expected a file name without a folder, got 'sub/name'"),
        ("bench.workers", ["--output", ".."], "argument --output: expected a file name without a folder, got '..'"),
        ("bench.memory", ["--output", ""], "argument --output: expected a file name without a folder, got ''"),
    ],
)
def test_bench_rejects_bad_option(module, options, expected):
    result = subprocess.run([sys.executable, "-m", module, *options], cwd=ROOT, capture_output=True, text=True, timeout=120)

    assert result.returncode == 2
    assert expected in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("admin_url", "cause"),
    [
        ("notaurl", "Could not parse SQLAlchemy URL"),
        ("postgresql://postgres:secret@127.0.0.1:1/postgres", "Connection refused"),
    ],
)
def test_bad_admin_url_names_option(admin_url, cause):
    with pytest.raises(SystemExit) as exit_info:
        with throwaway_postgres(admin_url, "badurl"):
            pass

    message = str(exit_info.value)
    assert message.startswith("--admin-url ")
    assert cause in message
    assert "secret" not in message
    assert "Pass --admin-url" in message


def test_widest_convolution_flops():
    import torch

    from bench.training import WIDEST_CONVOLUTION, widest_convolution_pass

    shape = WIDEST_CONVOLUTION
    _, flops = widest_convolution_pass(torch.device("cpu"))
    _, forward_only = widest_convolution_pass(torch.device("cpu"), backward=False)

    kernel_width = shape["kernel_size"][1]
    outputs = 100 * shape["out_channels"] * (shape["width"] - kernel_width + 1)
    forward = 2 * outputs * shape["in_channels"] * kernel_width
    # backward to the input and to the weight, each as costly as the forward pass
    assert flops == 3 * forward
    assert forward_only == forward


def test_interrupted_benchmark_exits_130(capsys):
    def interrupted_main():
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as exit_info:
        run_benchmark(interrupted_main)

    assert exit_info.value.code == 130
    assert capsys.readouterr().err == "Interrupted before the result file was written.\n"



def test_linear_rates_on_cpu():
    import torch

    from bench.generation import linear_flops_per_s

    plain = linear_flops_per_s(torch.device("cpu"), onednn=False, min_seconds=0.05)
    onednn = linear_flops_per_s(torch.device("cpu"), onednn=True, min_seconds=0.05)

    assert plain is not None and plain > 0
    if torch.backends.mkldnn.is_available():
        assert onednn is not None and onednn > 0
    else:
        assert onednn is None


def test_gpu_script_needs_jets_file(tmp_path):
    missing = tmp_path / "jets.hdf5"

    result = subprocess.run(["bash", "bench/gpu.sh", str(missing)], cwd=ROOT, capture_output=True, text=True, timeout=60)

    assert result.returncode == 2
    assert f"JETS must be an existing jets file of at least 10,000 jets; got '{missing}'" in result.stderr
