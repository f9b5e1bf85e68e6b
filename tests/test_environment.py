"""The pinned dependency set imports together on this interpreter."""

import importlib

import pytest


@pytest.mark.parametrize(
    "module",
    ["jetnet.evaluation", "energyflow", "pythia8mc", "fastjet", "optuna", "ray", "torch", "h5py"],
)
def test_dependency_imports(module):
    assert importlib.import_module(module) is not None


def test_numpy_is_1x_for_wasserstein():
    import numpy
    import wasserstein

    assert numpy.__version__.startswith("1."), numpy.__version__
    assert wasserstein.EMD is not None


def test_jetnet_frechet_accepts_installed_scipy():
    """jetnet's FPND calls scipy.linalg.sqrtm(disp=False), which scipy 1.18 removed."""
    import numpy as np
    from jetnet.evaluation.gen_metrics import _calculate_frechet_distance

    mu = np.zeros(3)
    sigma = np.eye(3)
    assert _calculate_frechet_distance(mu, sigma, mu + 1.0, sigma) == pytest.approx(3.0)


def test_cli_help_lists_commands():
    from typer.testing import CliRunner

    from hpo.cli import app

    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0, result.output
    assert "data" in result.output
