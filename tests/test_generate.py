"""Pythia 8 + FastJet jet generation: file layout, cuts, reproducibility, resume and the CLI."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import awkward as ak
import fastjet
import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

import hpo
from hpo.cli import app
from models.generate import (
    CHUNK_DIRECTORY,
    MAX_PYTHIA_SEED,
    OUTPUT_NAME,
    PRODUCER,
    GenerationError,
    GenerationSettings,
    _select_jets,
    generate_jets,
    pythia_seed,
)

# Small chunks keep each Pythia run short. The run below has 3 chunks of 20 jets.
CHUNK_SIZE = 20
N_JETS = 60
SEED = 1
DATASETS = ("particle_features", "jet_features", "constituents", "clustered_jet_features")


def read_jets_file(path: Path) -> dict:
    with h5py.File(path, "r") as file:
        contents = {name: file[name][()] for name in DATASETS}
        contents["attrs"] = dict(file.attrs)
    return contents


def assert_same_jets(first: dict, second: dict, n_jets: int | None = None) -> None:
    for name in DATASETS:
        np.testing.assert_array_equal(first[name][:n_jets], second[name][:n_jets], err_msg=name)


@pytest.fixture(scope="module")
def run_directory(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("generated")
    generate_jets(N_JETS, directory, seed=SEED, workers=1, chunk_size=CHUNK_SIZE, progress=False)
    return directory


@pytest.fixture(scope="module")
def jets(run_directory) -> dict:
    return read_jets_file(run_directory / OUTPUT_NAME)


# ---------------------------------------------------------------------------
# Jet selection on events whose jets can be computed by hand
# ---------------------------------------------------------------------------


def particle(pdg_id: int, status: int, px: float, py: float, pz: float) -> dict:
    # massless, so that E = |p|
    energy = math.sqrt(px**2 + py**2 + pz**2)
    return {"id": pdg_id, "status": status, "p": {"px": px, "py": py, "pz": pz, "e": energy}}


def hand_made_events() -> ak.Array:
    # Event 0: photons A (900 GeV along x) and B (400 GeV at phi = 0.3) form one jet. A
    # collinear 500 GeV neutrino and a decayed 1300 GeV gluon (status < 0) would push it above
    # 1600 GeV if they were clustered. A 1000 GeV photon at phi = pi is the second jet, and an
    # 850 GeV photon at phi = pi/2 is a third jet that passes the cuts but is not one of the
    # two leading jets.
    event_0 = [
        particle(22, 91, 900.0, 0.0, 0.0),
        particle(22, 91, 400.0 * math.cos(0.3), 400.0 * math.sin(0.3), 0.0),
        particle(12, 91, 500.0, 0.0, 0.0),
        particle(21, -23, 1300.0, 0.0, 0.0),
        particle(22, 91, -1000.0, 0.0, 0.0),
        particle(22, 91, 0.0, 850.0, 0.0),
    ]
    # Event 1: a 1700 GeV jet above the pT window, a 1000 GeV jet at eta = 3 outside the eta
    # cut, and a third jet that would pass. Nothing is kept.
    event_1 = [
        particle(22, 91, 1700.0, 0.0, 0.0),
        particle(22, 91, -1000.0, 0.0, 1000.0 * math.sinh(3.0)),
        particle(22, 91, 0.0, 900.0, 0.0),
    ]
    return ak.Array([{"prt": event_0}, {"prt": event_1}])


def test_select_jets_hand_made_events():
    settings = GenerationSettings()
    definition = fastjet.JetDefinition(fastjet.antikt_algorithm, settings.jet_radius)

    selected = list(_select_jets(hand_made_events(), settings, definition))

    assert [event for event, *_ in selected] == [0, 0]
    assert [count for _, _, count, _ in selected] == [2, 1]


def test_select_jets_two_photon_jet_by_hand():
    settings = GenerationSettings()
    definition = fastjet.JetDefinition(fastjet.antikt_algorithm, settings.jet_radius)

    _, constituents, count, clustered = next(_select_jets(hand_made_events(), settings, definition))

    # Two massless particles: m^2 = 2 |p_A| |p_B| (1 - cos 0.3).
    expected_mass = math.sqrt(2 * 900.0 * 400.0 * (1 - math.cos(0.3)))
    expected_pt = math.hypot(900.0 + 400.0 * math.cos(0.3), 400.0 * math.sin(0.3))
    assert count == 2
    np.testing.assert_allclose(constituents[0], [900.0, 0.0, 0.0])
    np.testing.assert_allclose(constituents[1], [400.0 * math.cos(0.3), 400.0 * math.sin(0.3), 0.0])
    assert not constituents[2:].any()
    assert clustered[0] == pytest.approx(expected_pt)
    assert clustered[1] == pytest.approx(0.0, abs=1e-12)
    assert clustered[3] == pytest.approx(expected_mass)


def test_select_jets_one_jet_per_event():
    settings = GenerationSettings(jets_per_event=1)
    definition = fastjet.JetDefinition(fastjet.antikt_algorithm, settings.jet_radius)

    selected = list(_select_jets(hand_made_events(), settings, definition))

    assert len(selected) == 1
    assert selected[0][2] == 2


# ---------------------------------------------------------------------------
# Seeds and settings
# ---------------------------------------------------------------------------


def test_pythia_seed_range_and_determinism():
    seeds = [pythia_seed(SEED, chunk) for chunk in range(1000)]

    assert all(1 <= seed <= MAX_PYTHIA_SEED for seed in seeds)
    assert len(set(seeds)) == len(seeds)
    assert seeds == [pythia_seed(SEED, chunk) for chunk in range(1000)]
    assert pythia_seed(SEED, 0) != pythia_seed(SEED + 1, 0)


def test_settings_contain_every_pythia_string():
    strings = GenerationSettings().pythia_settings(seed=123)

    assert "Beams:eCM = 13000.0" in strings
    assert "HardQCD:gg2gg = on" in strings
    assert "HardQCD:qqbar2gg = on" in strings
    assert "PhaseSpace:pTHatMin = 900.0" in strings
    assert "PhaseSpace:pTHatMax = 1300.0" in strings
    assert "Random:setSeed = on" in strings
    assert strings[-1] == "Random:seed = 123"


@pytest.mark.parametrize(
    "values",
    [
        {"pthat_min_gev": 1300.0, "pthat_max_gev": 900.0},
        {"jet_pt_min_gev": 0.0},
        {"jet_pt_min_gev": 1700.0},
        {"jet_radius": 0.0},
        {"jets_per_event": 0},
        {"processes": ()},
    ],
)
def test_settings_reject_invalid_values(values):
    with pytest.raises(GenerationError):
        GenerationSettings(**values)


# ---------------------------------------------------------------------------
# The generated file
# ---------------------------------------------------------------------------


@pytest.mark.slow
def test_file_layout_shapes_and_dtypes(jets):
    assert jets["particle_features"].shape == (N_JETS, 30, 4)
    assert jets["jet_features"].shape == (N_JETS, 4)
    assert jets["constituents"].shape == (N_JETS, 30, 3)
    assert jets["clustered_jet_features"].shape == (N_JETS, 4)
    for name in DATASETS:
        assert jets[name].dtype == np.float32, name


@pytest.mark.slow
def test_file_attributes(run_directory, jets):
    attrs = jets["attrs"]
    settings = json.loads(attrs["settings"])

    assert attrs["producer"] == PRODUCER
    assert attrs["jethpo_version"] == hpo.__version__
    assert attrs["pythia_version"].startswith("8.3")
    assert attrs["fastjet_version"].startswith("3.")
    assert attrs["seed"] == SEED
    assert attrs["n_jets"] == N_JETS
    assert "HardQCD:gg2gg = on" in settings["pythia_settings"]
    assert settings["pthat_min_gev"] == 900.0
    assert settings["jet_pt_min_gev"] == 800.0
    assert settings["jet_abs_eta_max"] == 2.5
    assert settings["chunk_size"] == CHUNK_SIZE
    assert settings["chunk_pythia_seeds"] == [pythia_seed(SEED, chunk) for chunk in range(3)]
    assert settings["n_events"] >= N_JETS / 2
    with h5py.File(run_directory / OUTPUT_NAME, "r") as file:
        assert file["constituents"].attrs["features"] == "px,py,pz"
        assert file["constituents"].attrs["unit"] == "GeV"


@pytest.mark.slow
def test_jets_pass_pt_window_and_eta_cut(jets):
    pt, eta, _, _ = jets["clustered_jet_features"].T

    assert (pt > 800.0).all()
    assert (pt < 1600.0).all()
    assert (np.abs(eta) < 2.5).all()
    # The 30 kept constituents carry part of the jet pT, never more.
    assert (jets["jet_features"][:, 0] <= pt * (1 + 1e-5)).all()
    assert (jets["jet_features"][:, 0] > 0.5 * pt).all()


@pytest.mark.slow
def test_constituents_pt_ordered_and_zero_padded(jets):
    constituents = jets["constituents"]
    mask = jets["particle_features"][..., 3].astype(bool)
    pt = np.hypot(constituents[..., 0], constituents[..., 1])

    assert (np.diff(pt, axis=1) <= 0).all()
    assert not constituents[~mask].any()
    assert (pt[mask] > 0).all()
    # A real mask is a run of ones followed by zeros.
    assert (np.diff(mask.astype(int), axis=1) <= 0).all()


@pytest.mark.slow
def test_mask_matches_num_particles(jets):
    mask = jets["particle_features"][..., 3]

    np.testing.assert_array_equal(mask.sum(axis=1), jets["jet_features"][:, 3])
    assert set(np.unique(mask)) <= {0.0, 1.0}


@pytest.mark.slow
def test_jet_mass_recomputed_from_constituents(jets):
    constituents = jets["constituents"].astype(np.float64)
    energy = np.linalg.norm(constituents, axis=-1).sum(axis=1)
    momentum = constituents.sum(axis=1)
    mass = np.sqrt(energy**2 - (momentum**2).sum(axis=1))

    np.testing.assert_allclose(jets["jet_features"][:, 2], mass, rtol=1e-4)
    np.testing.assert_allclose(jets["jet_features"][:, 0], np.hypot(momentum[:, 0], momentum[:, 1]), rtol=1e-5)


@pytest.mark.slow
def test_relative_coordinates_in_range(jets):
    features = jets["particle_features"]
    mask = features[..., 3].astype(bool)
    etarel, phirel, ptrel = features[..., 0], features[..., 1], features[..., 2]

    assert (np.abs(phirel) <= math.pi).all()
    # Constituents lie within about R = 0.8 of the axis of their 30 hardest.
    assert (np.hypot(etarel[mask], phirel[mask]) < 1.2).all()
    assert (ptrel[mask] > 0).all()
    assert (ptrel[mask] <= 1).all()
    assert not features[..., :3][~mask].any()


# ---------------------------------------------------------------------------
# Reproducibility and resume
# ---------------------------------------------------------------------------


@pytest.mark.slow
def test_same_seed_gives_same_jets(tmp_path, jets):
    path = generate_jets(CHUNK_SIZE, tmp_path, seed=SEED, workers=1, chunk_size=CHUNK_SIZE, progress=False)

    assert_same_jets(read_jets_file(path), jets, n_jets=CHUNK_SIZE)


@pytest.mark.slow
def test_other_seed_gives_other_jets(tmp_path, jets):
    path = generate_jets(CHUNK_SIZE, tmp_path, seed=SEED + 1, workers=1, chunk_size=CHUNK_SIZE, progress=False)

    assert not np.array_equal(read_jets_file(path)["constituents"], jets["constituents"][:CHUNK_SIZE])


@pytest.mark.slow
def test_two_workers_match_one_worker(tmp_path, jets):
    path = generate_jets(N_JETS, tmp_path, seed=SEED, workers=2, chunk_size=CHUNK_SIZE, progress=False)
    parallel = read_jets_file(path)

    assert_same_jets(parallel, jets)
    assert parallel["attrs"]["settings"] == jets["attrs"]["settings"]


@pytest.mark.slow
def test_partial_chunk_is_prefix_then_extended(tmp_path, jets):
    first = generate_jets(30, tmp_path, seed=SEED, workers=1, chunk_size=CHUNK_SIZE, progress=False)
    assert_same_jets(read_jets_file(first), jets, n_jets=30)

    extended = generate_jets(40, tmp_path, seed=SEED, workers=1, chunk_size=CHUNK_SIZE, progress=False)
    assert_same_jets(read_jets_file(extended), jets, n_jets=40)


@pytest.mark.slow
def test_resume_regenerates_only_missing_chunk(tmp_path, run_directory, jets, caplog):
    directory = tmp_path / "run"
    shutil.copytree(run_directory, directory)
    chunks = sorted((directory / CHUNK_DIRECTORY).glob("chunk-*.hdf5"))
    assert len(chunks) == 3
    (directory / OUTPUT_NAME).unlink()
    chunks[1].unlink()
    kept_mtimes = {chunks[0]: chunks[0].stat().st_mtime_ns, chunks[2]: chunks[2].stat().st_mtime_ns}

    with caplog.at_level(logging.INFO, logger="models.generate"):
        path = generate_jets(N_JETS, directory, seed=SEED, workers=1, chunk_size=CHUNK_SIZE, progress=False)

    assert "1 of 3 chunks" in caplog.text
    assert chunks[1].exists()
    for chunk, mtime in kept_mtimes.items():
        assert chunk.stat().st_mtime_ns == mtime, chunk.name
    assert_same_jets(read_jets_file(path), jets)


@pytest.mark.slow
def test_finished_run_rewrites_file_without_generating(tmp_path, run_directory, jets, caplog):
    directory = tmp_path / "run"
    shutil.copytree(run_directory, directory)

    with caplog.at_level(logging.INFO, logger="models.generate"):
        path = generate_jets(N_JETS, directory, seed=SEED, workers=1, chunk_size=CHUNK_SIZE, progress=False)

    assert "0 of 3 chunks" in caplog.text
    assert_same_jets(read_jets_file(path), jets)


@pytest.mark.slow
def test_fewer_jets_warns_and_keeps_chunks(tmp_path, run_directory, jets, caplog):
    directory = tmp_path / "run"
    shutil.copytree(run_directory, directory)

    with caplog.at_level(logging.INFO, logger="models.generate"):
        generate_jets(30, directory, seed=SEED, workers=1, chunk_size=CHUNK_SIZE, progress=False)
    assert f"which held {N_JETS} jets, with 30 jets" in caplog.text
    assert f"--jets {N_JETS}" in caplog.text

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="models.generate"):
        path = generate_jets(N_JETS, directory, seed=SEED, workers=1, chunk_size=CHUNK_SIZE, progress=False)
    assert "0 of 3 chunks" in caplog.text
    assert_same_jets(read_jets_file(path), jets)

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="models.generate"):
        generate_jets(N_JETS, directory, seed=SEED, workers=1, chunk_size=CHUNK_SIZE, progress=False)
    assert "replacing" not in caplog.text


@pytest.mark.parametrize(
    "arguments, message",
    [
        ({"seed": SEED + 1}, "seed"),
        ({"seed": SEED, "chunk_size": CHUNK_SIZE + 1}, "chunk_size"),
        ({"seed": SEED, "settings": GenerationSettings(pthat_min_gev=1000.0)}, "settings"),
    ],
)
def test_other_run_in_same_directory_is_rejected(tmp_path, run_directory, arguments, message):
    directory = tmp_path / "run"
    shutil.copytree(run_directory, directory)
    arguments.setdefault("chunk_size", CHUNK_SIZE)

    with pytest.raises(GenerationError, match=message):
        generate_jets(N_JETS, directory, workers=1, progress=False, **arguments)


def test_invalid_arguments_raise(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("")

    with pytest.raises(GenerationError, match="at least 1"):
        generate_jets(0, tmp_path)
    with pytest.raises(GenerationError, match="workers"):
        generate_jets(10, tmp_path, workers=0)
    with pytest.raises(GenerationError, match="chunk size"):
        generate_jets(10, tmp_path, chunk_size=0)
    with pytest.raises(GenerationError, match="is a file"):
        generate_jets(10, a_file)


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


@pytest.mark.slow
def test_cli_generates_same_jets(tmp_path, jets):
    result = CliRunner().invoke(
        app,
        ["data", "generate", "--jets", str(CHUNK_SIZE), "--out", str(tmp_path), "--seed", str(SEED),
         "--workers", "1", "--chunk-size", str(CHUNK_SIZE)],
    )

    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(tmp_path / OUTPUT_NAME)
    assert_same_jets(read_jets_file(tmp_path / OUTPUT_NAME), jets, n_jets=CHUNK_SIZE)


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--jets", "0"], "--jets"),
        (["--jets", "10", "--workers", "0"], "--workers"),
        (["--jets", "ten"], "--jets"),
        (["--jets", "10", "--out", "FILE"], "is a file"),
    ],
)
def test_cli_bad_arguments_give_one_line_error(tmp_path, arguments, message):
    a_file = tmp_path / "file"
    a_file.write_text("")
    arguments = [str(a_file) if value == "FILE" else value for value in arguments]
    if "--out" not in arguments:
        arguments += ["--out", str(tmp_path / "out")]

    result = CliRunner().invoke(app, ["data", "generate", *arguments])
    # rich wraps long messages inside a box, so compare the words only
    words = " ".join(result.output.replace("│", " ").split())

    assert result.exit_code == 2
    assert message in words
    assert "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_cli_other_run_in_directory_gives_error(tmp_path, run_directory):
    directory = tmp_path / "run"
    shutil.copytree(run_directory, directory)

    result = CliRunner().invoke(
        app, ["data", "generate", "--jets", "10", "--out", str(directory), "--seed", str(SEED + 1),
              "--chunk-size", str(CHUNK_SIZE)],
    )

    words = " ".join(result.output.split())

    assert result.exit_code == 2
    assert "belongs to another run" in words
    assert "Traceback" not in result.output


@pytest.mark.slow
@pytest.mark.parametrize(("signum", "exit_code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_cli_interrupt_keeps_finished_chunks(tmp_path, signum, exit_code):
    executable = Path(sys.executable).parent / "jethpo"
    if not executable.exists():
        pytest.skip(f"console script {executable} is not installed")
    command = [str(executable), "data", "generate", "--jets", "2000", "--out", str(tmp_path),
               "--workers", "2", "--chunk-size", "10"]
    # A new session, so that the signal below reaches the command and its workers, as a
    # Ctrl-C in a terminal or `timeout` does, and not pytest.
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    first_chunk = tmp_path / CHUNK_DIRECTORY / "chunk-000000.hdf5"
    deadline = time.monotonic() + 120
    while not first_chunk.exists() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.1)
    assert first_chunk.exists(), "no chunk was finished within 120 s"

    os.killpg(process.pid, signum)
    _, stderr = process.communicate(timeout=60)

    assert process.returncode == exit_code, stderr
    assert "Traceback" not in stderr
    assert "resume" in stderr
    assert not list((tmp_path / CHUNK_DIRECTORY).glob("*.tmp-*"))
    assert not (tmp_path / OUTPUT_NAME).exists()
    # The finished chunk is complete, so a run that needs only it generates nothing.
    path = generate_jets(10, tmp_path, seed=0, workers=1, chunk_size=10, progress=False)
    assert read_jets_file(path)["constituents"].shape == (10, 30, 3)
