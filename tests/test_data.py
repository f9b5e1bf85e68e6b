"""Tests for models.data: the three file layouts, input errors, the split, the scaler and the
JetNet writer."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from models.data import (
    MIN_JETS,
    JetData,
    JetDataError,
    MinMaxScaler,
    read_jets,
    split_jets,
    write_jetnet_jets,
)
from models.jets import jet_kinematics_numpy, relative_coordinates

# A two-particle JetNet jet with pT 1000 GeV and eta 0.5, rebuilt around jet phi = 0. Its
# particles have (etarel, phirel, ptrel) (0.1, 0.2, 0.6) and (-0.2, -0.1, 0.3), so they have
# (pT, eta, phi) = (600 GeV, 0.6, 0.2) and (300 GeV, 0.3, -0.1), and
# (px, py, pz) = pT * (cos phi, sin phi, sinh eta) in GeV.
HAND_RELATIVE = [(0.1, 0.2, 0.6), (-0.2, -0.1, 0.3)]
HAND_JET_PT, HAND_JET_ETA = 1000.0, 0.5
HAND_CONSTITUENTS = [
    (588.0399467, 119.2015985, 381.9921493),
    (298.5012496, -29.9500250, 91.3560880),
]
# Massless pair: m^2 = 2 pT1 pT2 (cosh(d eta) - cos(d phi)) with d eta = d phi = 0.3,
# which is 2 * 600 * 300 * (1.0453385 - 0.9553365) = 32400.73 GeV^2.
HAND_JET_MASS = 180.002025


# file writers, one per layout


def write_jetnet(path: Path, particle_features: np.ndarray, jet_features: np.ndarray) -> Path:
    with h5py.File(path, "w") as file:
        file["particle_features"] = np.asarray(particle_features, dtype=np.float32)
        file["jet_features"] = np.asarray(jet_features, dtype=np.float32)
    return path


def hand_jetnet_arrays(n_jets: int = MIN_JETS) -> tuple[np.ndarray, np.ndarray]:
    """n_jets copies of the hand-computed two-particle jet in JetNet's layout."""
    particle_features = np.zeros((n_jets, 30, 4))
    particle_features[:, :2, :3] = HAND_RELATIVE
    particle_features[:, :2, 3] = 1.0
    jet_features = np.tile([HAND_JET_PT, HAND_JET_ETA, HAND_JET_MASS, 2.0], (n_jets, 1))
    return particle_features, jet_features


# HLS4ML columns in a shuffled order. The trailing j1_pdgid name has no column, as in the
# 150-particle HLS4ML files (17 names for 16 columns). The eta, e and pt columns are 99.
HLS4ML_PARTICLE_NAMES = [b"j1_eta", b"j1_pz", b"j1_e", b"j1_px", b"j1_pt", b"j1_py", b"j1_pdgid"]
HLS4ML_JET_NAMES = [b"j_pt", b"j_t", b"j_eta", b"j_q", b"j_g", b"j_mass", b"j_w", b"j_z", b"j_undef"]


def write_hls4ml(
    path: Path,
    momenta: np.ndarray,
    labels: list[str],
    jet_names: list[bytes] = HLS4ML_JET_NAMES,
    particle_names: list[bytes] = HLS4ML_PARTICLE_NAMES,
) -> Path:
    """Write jets of (px, py, pz) momenta ``[n, n_particles, 3]`` with one label each."""
    momenta = np.asarray(momenta, dtype=np.float64)
    n_jets, n_particles, _ = momenta.shape
    n_columns = len(particle_names) - 1
    constituents = np.full((n_jets, n_particles, n_columns), 99.0)
    for feature_index, name in enumerate((b"j1_px", b"j1_py", b"j1_pz")):
        if name in particle_names[:n_columns]:
            constituents[..., particle_names.index(name)] = momenta[..., feature_index]

    jets = np.zeros((n_jets, len(jet_names)))
    for row, label in enumerate(labels):
        jets[row, jet_names.index(f"j_{label}".encode())] = 1.0

    with h5py.File(path, "w") as file:
        file["jetConstituentList"] = constituents
        file["particleFeatureNames"] = np.array(particle_names)
        file["jets"] = jets
        file["jetFeatureNames"] = np.array(jet_names)
    return path


def mixed_hls4ml_jets() -> tuple[np.ndarray, list[str]]:
    """Interleaved jets: 10 g, 10 q and 1 w.

    Gluon jet i lists a (3, 4, i) GeV particle (pT 5 GeV) before a (6, 8, 2) GeV particle
    (pT 10 GeV), so reading must reorder them. Quark and W jets carry px = 100 GeV.
    """
    labels = ["g", "q"] * 10 + ["w"]
    momenta = np.zeros((len(labels), 30, 3))
    gluon = 0
    for row, label in enumerate(labels):
        if label == "g":
            momenta[row, 0] = (3.0, 4.0, gluon)
            momenta[row, 1] = (6.0, 8.0, 2.0)
            gluon += 1
        else:
            momenta[row, 0] = (100.0, 1.0, 1.0)
    return momenta, labels


def write_jethpo(path: Path, constituents: np.ndarray, mask: np.ndarray, seed: int = 7) -> Path:
    relative = relative_coordinates(constituents, mask)
    kinematics = jet_kinematics_numpy(constituents)
    with h5py.File(path, "w") as file:
        file["particle_features"] = np.concatenate([relative, mask[..., None]], axis=-1).astype(np.float32)
        file["jet_features"] = np.stack(
            [kinematics["pt"], kinematics["eta"], kinematics["mass"], mask.sum(axis=1)], axis=-1
        ).astype(np.float32)
        dataset = file.create_dataset("constituents", data=constituents.astype(np.float32))
        dataset.attrs["features"] = "px,py,pz"
        dataset.attrs["unit"] = "GeV"
        file.attrs["producer"] = "jethpo data generate"
        file.attrs["jethpo_version"] = "0.1.0"
        file.attrs["pythia_version"] = "8.317"
        file.attrs["seed"] = seed
        file.attrs["n_jets"] = len(constituents)
        file.attrs["settings"] = json.dumps({"sqrt_s_GeV": 13000.0, "jet_R": 0.8})
    return path


def generated_jets(n_jets: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random jets in canonical form: 5 to 30 particles, pT decreasing, in GeV."""
    rng = np.random.default_rng(seed)
    constituents = np.zeros((n_jets, 30, 3))
    mask = np.zeros((n_jets, 30), dtype=bool)
    for jet in range(n_jets):
        n_particles = rng.integers(5, 31)
        pt = np.sort(rng.exponential(50.0, n_particles))[::-1] + 1.0
        eta = rng.normal(0.0, 0.3, n_particles)
        phi = rng.normal(0.0, 0.3, n_particles)
        momenta = [pt * np.cos(phi), pt * np.sin(phi), pt * np.sinh(eta)]
        constituents[jet, :n_particles] = np.stack(momenta, axis=-1)
        mask[jet, :n_particles] = True
    return constituents, mask


def in_memory_jets(n_jets: int) -> JetData:
    constituents, mask = generated_jets(n_jets)
    return JetData(constituents, mask, path="memory.hdf5", source="jethpo", metadata={"n_jets": n_jets})


# JetNet layout


def test_jetnet_rebuilds_hand_computed_momenta(tmp_path):
    path = write_jetnet(tmp_path / "g.hdf5", *hand_jetnet_arrays())

    data = read_jets(path)

    assert data.source == "jetnet"
    assert len(data) == MIN_JETS
    assert data.constituents.dtype == np.float32
    assert data.constituents.shape == (MIN_JETS, 30, 3)
    np.testing.assert_allclose(data.constituents[0, :2], HAND_CONSTITUENTS, rtol=1e-6)
    assert data.mask[0].tolist() == [True, True] + [False] * 28
    assert not data.constituents[0, 2:].any()


def test_jetnet_mass_matches_stored_mass(tmp_path):
    path = write_jetnet(tmp_path / "g.hdf5", *hand_jetnet_arrays())

    data = read_jets(path)
    kinematics = jet_kinematics_numpy(data.constituents)

    np.testing.assert_allclose(kinematics["mass"], HAND_JET_MASS, rtol=1e-5)


def test_jetnet_metadata_records_phi(tmp_path):
    path = write_jetnet(tmp_path / "g.hdf5", *hand_jetnet_arrays())

    data = read_jets(path)

    assert data.path == str(path)
    assert data.metadata["layout"] == "jetnet"
    assert data.metadata["path"] == str(path)
    assert data.metadata["n_jets"] == MIN_JETS
    assert "phi = 0" in data.metadata["jet_phi"]


def test_jetnet_rejects_file_named_for_other_type(tmp_path):
    path = write_jetnet(tmp_path / "q.hdf5", *hand_jetnet_arrays())

    with pytest.raises(JetDataError) as raised:
        read_jets(path, jet_type="g")

    message = str(raised.value)
    assert str(path) in message
    assert "'q'" in message
    assert len(read_jets(path, jet_type="q")) == MIN_JETS


def test_directory_picks_jetnet_file_of_type(tmp_path):
    particle_features, jet_features = hand_jetnet_arrays()
    write_jetnet(tmp_path / "g.hdf5", particle_features, jet_features)
    write_jetnet(tmp_path / "q.hdf5", particle_features, jet_features * [2.0, 1.0, 1.0, 1.0])

    gluons = read_jets(tmp_path, jet_type="g")
    quarks = read_jets(tmp_path, jet_type="q")

    assert gluons.path == str(tmp_path / "g.hdf5")
    assert quarks.path == str(tmp_path / "q.hdf5")
    np.testing.assert_allclose(quarks.constituents, 2 * gluons.constituents, rtol=1e-6)


# HLS4ML layout


def test_hls4ml_selects_gluons_by_column_name(tmp_path):
    momenta, labels = mixed_hls4ml_jets()
    path = write_hls4ml(tmp_path / "jets.h5", momenta, labels)

    data = read_jets(path, jet_type="g")

    assert data.source == "hls4ml"
    assert len(data) == 10
    for index in range(10):
        np.testing.assert_array_equal(data.constituents[index, 0], [6.0, 8.0, 2.0])
        np.testing.assert_array_equal(data.constituents[index, 1], [3.0, 4.0, index])
    assert data.mask[:, :2].all()
    assert not data.mask[:, 2:].any()
    assert data.metadata["label_counts"] == {"g": 10, "q": 10, "w": 1, "z": 0, "t": 0}


def test_hls4ml_selects_quarks(tmp_path):
    momenta, labels = mixed_hls4ml_jets()
    path = write_hls4ml(tmp_path / "jets.h5", momenta, labels)

    data = read_jets(path, jet_type="q")

    assert len(data) == 10
    assert (data.constituents[:, 0, 0] == 100.0).all()
    assert data.mask.sum() == 10


def test_hls4ml_directory_concatenates_sorted(tmp_path):
    momenta, labels = mixed_hls4ml_jets()
    write_hls4ml(tmp_path / "part_b.h5", momenta[10:], labels[10:])
    write_hls4ml(tmp_path / "part_a.h5", momenta[:10], labels[:10])

    data = read_jets(tmp_path, jet_type="g")

    assert data.path == str(tmp_path)
    assert data.metadata["files"] == [str(tmp_path / "part_a.h5"), str(tmp_path / "part_b.h5")]
    assert data.constituents[:, 1, 2].tolist() == list(range(10))


def test_hls4ml_ignores_nan_in_unselected_jets(tmp_path):
    momenta, labels = mixed_hls4ml_jets()
    momenta[1, 0, 0] = np.nan
    path = write_hls4ml(tmp_path / "jets.h5", momenta, labels)

    assert labels[1] == "q"
    assert len(read_jets(path, jet_type="g")) == 10


# jethpo layout


def test_jethpo_reads_constituents_and_attrs(tmp_path):
    constituents, mask = generated_jets(12)
    path = write_jethpo(tmp_path / "jets.hdf5", constituents, mask, seed=7)

    data = read_jets(path)

    assert data.source == "jethpo"
    np.testing.assert_array_equal(data.constituents, constituents.astype(np.float32))
    np.testing.assert_array_equal(data.mask, mask)
    assert data.metadata["attrs"]["producer"] == "jethpo data generate"
    assert data.metadata["attrs"]["seed"] == 7
    assert type(data.metadata["attrs"]["seed"]) is int
    assert data.metadata["settings"] == {"sqrt_s_GeV": 13000.0, "jet_R": 0.8}


def test_jethpo_directory_with_one_file(tmp_path):
    constituents, mask = generated_jets(12)
    write_jethpo(tmp_path / "jets.hdf5", constituents, mask)
    (tmp_path / "README.txt").write_text("jets made for a test\n")

    data = read_jets(tmp_path)

    assert data.path == str(tmp_path / "jets.hdf5")
    assert len(data) == 12


def test_directory_skips_unreadable_file(tmp_path, caplog):
    constituents, mask = generated_jets(12)
    write_jethpo(tmp_path / "jets.hdf5", constituents, mask)
    (tmp_path / "notes.h5").write_text("not HDF5\n")

    with caplog.at_level(logging.WARNING, logger="models.data"):
        data = read_jets(tmp_path)

    assert data.path == str(tmp_path / "jets.hdf5")
    assert "notes.h5" in caplog.text


def test_jethpo_reorders_by_pt(tmp_path):
    constituents, mask = generated_jets(12)
    shuffled = constituents[:, ::-1].copy()
    path = write_jethpo(tmp_path / "jets.hdf5", shuffled, mask[:, ::-1].copy())

    data = read_jets(path)

    np.testing.assert_array_equal(data.constituents, constituents.astype(np.float32))
    np.testing.assert_array_equal(data.mask, mask)


def test_fingerprint_stable_across_reads(tmp_path):
    constituents, mask = generated_jets(12)
    path = write_jethpo(tmp_path / "jets.hdf5", constituents, mask)
    changed = constituents.copy()
    changed[3, 0, 1] += 1.0
    other = write_jethpo(tmp_path / "other.hdf5", changed, mask)

    first = read_jets(path).fingerprint

    assert first == read_jets(path).fingerprint
    assert len(first) == 64
    int(first, 16)
    assert first != read_jets(other).fingerprint
    assert first != read_jets(path).subset(np.arange(11)).fingerprint


def test_subset_selects_jets(tmp_path):
    data = in_memory_jets(12)

    subset = data.subset([5, 2])

    np.testing.assert_array_equal(subset.constituents, data.constituents[[5, 2]])
    np.testing.assert_array_equal(subset.mask, data.mask[[5, 2]])
    assert subset.metadata["n_jets"] == 2
    assert data.metadata["n_jets"] == 12


# input errors; every message must name the file


def assert_error(path: Path, *phrases: str, **read_arguments) -> str:
    with pytest.raises(JetDataError) as raised:
        read_jets(path, **read_arguments)
    message = str(raised.value)
    assert str(path) in message
    for phrase in phrases:
        assert phrase in message
    return message


def test_error_missing_file(tmp_path):
    assert_error(tmp_path / "absent.hdf5", "not found", "jethpo data generate")


def test_error_not_hdf5(tmp_path):
    path = tmp_path / "g.hdf5"
    path.write_text("<html>download failed</html>\n")

    assert_error(path, "not an HDF5 file")


def test_error_truncated_hdf5(tmp_path):
    path = write_jetnet(tmp_path / "g.hdf5", *hand_jetnet_arrays(200))
    content = path.read_bytes()
    path.write_bytes(content[: len(content) // 2])

    assert_error(path, "damaged")


def test_error_unknown_layout(tmp_path):
    path = tmp_path / "images.h5"
    with h5py.File(path, "w") as file:
        file["jetImage"] = np.zeros((3, 4, 4))

    message = assert_error(path, "unknown file layout", "jetImage")

    assert "jetConstituentList" in message
    assert "particle_features" in message
    assert "constituents" in message


def test_error_empty_directory(tmp_path):
    assert_error(tmp_path, "no HDF5 file")


def test_error_ambiguous_directory(tmp_path):
    write_jetnet(tmp_path / "a.hdf5", *hand_jetnet_arrays())
    write_jetnet(tmp_path / "b.hdf5", *hand_jetnet_arrays())

    assert_error(tmp_path, "a.hdf5", "b.hdf5", "Pass one file")


def test_error_wrong_particle_count(tmp_path):
    particle_features = np.zeros((MIN_JETS, 150, 4))
    particle_features[:, 0] = (0.0, 0.0, 1.0, 1.0)
    path = write_jetnet(tmp_path / "g150.hdf5", particle_features, hand_jetnet_arrays()[1])

    assert_error(path, "150 particles per jet", "g.hdf5 rather than g150.hdf5")


def test_error_hls4ml_particle_count(tmp_path):
    momenta, labels = mixed_hls4ml_jets()
    padded = np.concatenate([momenta, np.zeros((len(momenta), 120, 3))], axis=1)
    path = write_hls4ml(tmp_path / "jets_150p.h5", padded, labels)

    assert_error(path, "150 particles per jet")


def test_error_wrong_feature_count(tmp_path):
    particle_features, jet_features = hand_jetnet_arrays()
    path = write_jetnet(tmp_path / "g.hdf5", particle_features[..., :3], jet_features)

    assert_error(path, "3 features per particle", "etarel, phirel, ptrel, mask")


def test_error_jet_features_shape(tmp_path):
    particle_features, jet_features = hand_jetnet_arrays()
    path = write_jetnet(tmp_path / "g.hdf5", particle_features, jet_features[:, :2])

    assert_error(path, "'jet_features'", "pt, eta, mass, num_particles")


def test_error_jethpo_feature_count(tmp_path):
    path = tmp_path / "jets.hdf5"
    with h5py.File(path, "w") as file:
        file["constituents"] = np.ones((12, 30, 4), dtype=np.float32)

    assert_error(path, "4 features per particle", "px, py, pz")


def test_error_jethpo_unit(tmp_path):
    constituents, mask = generated_jets(12)
    path = write_jethpo(tmp_path / "jets.hdf5", constituents, mask)
    with h5py.File(path, "a") as file:
        file["constituents"].attrs["unit"] = "TeV"

    assert_error(path, "'TeV'", "GeV")


def test_error_mismatched_jet_counts(tmp_path):
    particle_features, jet_features = hand_jetnet_arrays()
    path = write_jetnet(tmp_path / "g.hdf5", particle_features, jet_features[:-1])

    assert_error(path, "10 jets", "9")


def test_error_hls4ml_missing_momentum_column(tmp_path):
    momenta, labels = mixed_hls4ml_jets()
    names = [b"j1_eta", b"j1_pz", b"j1_e", b"j1_ptrel", b"j1_pt", b"j1_py", b"j1_pdgid"]
    path = write_hls4ml(tmp_path / "jets.h5", momenta, labels, particle_names=names)

    assert_error(path, "j1_px", "j1_ptrel")


def test_error_hls4ml_name_beyond_columns(tmp_path):
    momenta, labels = mixed_hls4ml_jets()
    names = [b"j1_eta", b"j1_pz", b"j1_e", b"j1_pt", b"j1_py", b"j1_px"]
    path = write_hls4ml(tmp_path / "jets.h5", momenta, labels, particle_names=names)

    assert_error(path, "j1_px", "5 columns")


def test_error_hls4ml_missing_dataset(tmp_path):
    momenta, labels = mixed_hls4ml_jets()
    path = write_hls4ml(tmp_path / "jets.h5", momenta, labels)
    with h5py.File(path, "a") as file:
        del file["jetFeatureNames"]

    assert_error(path, "'jetFeatureNames' is missing")


def test_error_nan_values(tmp_path):
    particle_features, jet_features = hand_jetnet_arrays(12)
    particle_features[3, 0, 0] = np.nan
    particle_features[7, 1, 2] = np.inf
    path = write_jetnet(tmp_path / "g.hdf5", particle_features, jet_features)

    assert_error(path, "2 of 12 jets", "NaN or infinite", "rows [3, 7]")


def test_error_nan_in_jet_pt(tmp_path):
    particle_features, jet_features = hand_jetnet_arrays(12)
    jet_features[5, 0] = np.nan
    path = write_jetnet(tmp_path / "g.hdf5", particle_features, jet_features)

    assert_error(path, "1 of 12 jets", "jet_features")


def test_error_inf_in_hls4ml(tmp_path):
    momenta, labels = mixed_hls4ml_jets()
    momenta[2, 1, 2] = np.inf
    path = write_hls4ml(tmp_path / "jets.h5", momenta, labels)

    assert labels[2] == "g"
    assert_error(path, "1 of 10 g jets", "NaN or infinite", "rows [2]")


def test_error_nan_in_jethpo(tmp_path):
    constituents, mask = generated_jets(12)
    constituents[4, 0, 0] = np.nan
    path = write_jethpo(tmp_path / "jets.hdf5", constituents, mask)

    assert_error(path, "1 of 12 jets")


def test_error_too_few_jets(tmp_path):
    path = write_jetnet(tmp_path / "g.hdf5", *hand_jetnet_arrays(5))

    assert_error(path, "contains 5 jets", f"at least {MIN_JETS}")


def test_error_too_few_hls4ml_jets_of_type(tmp_path):
    momenta, labels = mixed_hls4ml_jets()
    path = write_hls4ml(tmp_path / "jets.h5", momenta, labels)

    assert_error(path, "contains 1 w jets", jet_type="w")


def test_error_hls4ml_type_absent(tmp_path):
    momenta, labels = mixed_hls4ml_jets()
    path = write_hls4ml(tmp_path / "jets.h5", momenta, labels)

    assert_error(path, "no jets with label j_t", "g (10)", "q (10)", "w (1)", jet_type="t")


def test_error_hls4ml_label_column_absent(tmp_path):
    momenta, labels = mixed_hls4ml_jets()
    names = [name for name in HLS4ML_JET_NAMES if name != b"j_z"]
    path = write_hls4ml(tmp_path / "jets.h5", momenta, labels, jet_names=names)

    assert_error(path, "no label column j_z", "j_g", jet_type="z")


def test_error_invalid_jet_type(tmp_path):
    path = write_jetnet(tmp_path / "g.hdf5", *hand_jetnet_arrays())

    assert_error(path, "'gluon'", "g, q, t, w, z", jet_type="gluon")


# split


def test_split_sizes_70_15_15():
    splits = split_jets(in_memory_jets(100), seed=1)

    assert len(splits.train) == 70
    assert len(splits.validation) == 15
    assert len(splits.test) == 15


@pytest.mark.parametrize("n_jets", [10, 11, 13, 99, 101, 1001])
def test_split_sizes_sum_to_total(n_jets):
    splits = split_jets(in_memory_jets(n_jets), seed=1)

    sizes = [len(splits.train), len(splits.validation), len(splits.test)]
    assert sum(sizes) == n_jets
    assert min(sizes) >= 1
    assert abs(sizes[0] - 0.7 * n_jets) < 1


def test_split_disjoint_and_complete():
    data = in_memory_jets(100)

    splits = split_jets(data, seed=3)

    # each jet has a distinct leading px, which identifies it
    leading = {float(px): index for index, px in enumerate(data.constituents[:, 0, 0])}
    assert len(leading) == 100
    parts = [splits.train, splits.validation, splits.test]
    members = [{leading[float(px)] for px in part.constituents[:, 0, 0]} for part in parts]
    assert members[0].isdisjoint(members[1])
    assert members[0].isdisjoint(members[2])
    assert members[1].isdisjoint(members[2])
    assert members[0] | members[1] | members[2] == set(range(100))


def test_split_same_seed_same_split():
    data = in_memory_jets(100)

    first = split_jets(data, seed=5)
    second = split_jets(data, seed=5)

    assert first.train.fingerprint == second.train.fingerprint
    assert first.validation.fingerprint == second.validation.fingerprint
    assert first.test.fingerprint == second.test.fingerprint


def test_split_different_seed_different_split():
    data = in_memory_jets(100)

    first = split_jets(data, seed=5)
    second = split_jets(data, seed=6)

    assert first.train.fingerprint != second.train.fingerprint
    assert first.test.fingerprint != second.test.fingerprint


def test_split_records_name_and_seed():
    splits = split_jets(in_memory_jets(20), seed=9)

    assert splits.validation.metadata["split"] == "validation"
    assert splits.validation.metadata["split_seed"] == 9
    assert splits.train.metadata["n_jets"] == 14
    assert splits.train.path == "memory.hdf5"


@pytest.mark.parametrize(
    "fractions",
    [(0.7, 0.3), (0.7, 0.3, 0.0), (0.8, 0.3, -0.1), (0.5, 0.2, 0.2), (0.7, 0.15, math.nan)],
)
def test_split_rejects_bad_fractions(fractions):
    with pytest.raises(ValueError, match="split fractions"):
        split_jets(in_memory_jets(100), seed=0, fractions=fractions)


@pytest.mark.parametrize("seed", [-1, 1.5, "7", True])
def test_split_rejects_bad_seed(seed):
    with pytest.raises(ValueError, match="seed"):
        split_jets(in_memory_jets(20), seed=seed)


def test_split_rejects_empty_split():
    with pytest.raises(JetDataError) as raised:
        split_jets(in_memory_jets(10), seed=0, fractions=(0.9, 0.05, 0.05))

    message = str(raised.value)
    assert "memory.hdf5" in message
    assert "test 0" in message


# scaler


def hand_scaler_jets() -> tuple[np.ndarray, np.ndarray]:
    """Two jets whose real particles span px 1..3, py -2..4, pz 10..20 GeV. The padded
    particle is at 1000 GeV, which a fit that ignored the mask would pick up."""
    constituents = np.array(
        [
            [[1.0, -2.0, 10.0], [2.0, 4.0, 15.0], [1000.0, 1000.0, 1000.0]],
            [[3.0, 0.0, 20.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]],
        ]
    )
    mask = np.array([[True, True, False], [True, False, False]])
    return constituents, mask


def test_scaler_fits_real_particles_only():
    scaler = MinMaxScaler().fit(*hand_scaler_jets())

    np.testing.assert_array_equal(scaler.minimum, [1.0, -2.0, 10.0])
    np.testing.assert_array_equal(scaler.maximum, [3.0, 4.0, 20.0])


def test_scaler_maps_train_to_unit_range():
    constituents, mask = hand_scaler_jets()
    scaler = MinMaxScaler().fit(constituents, mask)

    scaled = scaler.transform(constituents)[mask]

    np.testing.assert_allclose(scaled, [[0.0, 0.0, 0.0], [0.5, 1.0, 0.5], [1.0, 1 / 3, 1.0]])
    assert scaled.min() >= 0.0
    assert scaled.max() <= 1.0


def test_scaler_range_on_generated_train():
    splits = split_jets(in_memory_jets(100), seed=0)
    scaler = MinMaxScaler().fit(splits.train.constituents, splits.train.mask)

    scaled = scaler.transform(splits.train.constituents)[splits.train.mask]

    np.testing.assert_allclose(scaled.min(axis=0), 0.0, atol=1e-6)
    np.testing.assert_allclose(scaled.max(axis=0), 1.0, atol=1e-6)
    assert scaled.dtype == np.float32


def test_scaler_inverse_round_trip_numpy():
    constituents, mask = generated_jets(20)
    scaler = MinMaxScaler().fit(constituents, mask)

    restored = scaler.inverse_transform(scaler.transform(constituents))

    np.testing.assert_allclose(restored, constituents, rtol=1e-12, atol=1e-9)


def test_scaler_torch_keeps_dtype_and_gradient():
    constituents, mask = hand_scaler_jets()
    scaler = MinMaxScaler().fit(constituents, mask)
    x = torch.tensor(constituents, dtype=torch.float64, requires_grad=True)

    scaled = scaler.transform(x)
    scaled.sum().backward()

    assert isinstance(scaled, torch.Tensor)
    assert scaled.dtype == torch.float64
    assert scaled.device == x.device
    # d/dx of (x - min) / (max - min) is 1 / (max - min) = 1/2, 1/6, 1/10 per GeV
    torch.testing.assert_close(x.grad[0, 0], torch.tensor([0.5, 1 / 6, 0.1], dtype=torch.float64))
    torch.testing.assert_close(scaler.inverse_transform(scaled), x)


def test_scaler_torch_float32():
    constituents, mask = generated_jets(20)
    scaler = MinMaxScaler().fit(constituents, mask)
    x = torch.as_tensor(constituents, dtype=torch.float32)

    scaled = scaler.transform(x)

    assert scaled.dtype == torch.float32
    torch.testing.assert_close(scaler.inverse_transform(scaled), x, rtol=1e-5, atol=1e-3)


def test_scaler_padding_maps_to_constant():
    scaler = MinMaxScaler().fit(*hand_scaler_jets())

    padding = scaler.transform(np.zeros(3))

    np.testing.assert_allclose(padding, [-0.5, 2 / 6, -1.0])


def test_scaler_state_dict_round_trip(tmp_path):
    constituents, mask = generated_jets(20)
    scaler = MinMaxScaler().fit(constituents, mask)
    path = tmp_path / "scaler.pt"

    torch.save({"scaler": scaler.state_dict()}, path)
    state = torch.load(path, weights_only=True)["scaler"]
    restored = MinMaxScaler.from_state_dict(state)

    assert all(type(value) is float for value in state["minimum"] + state["maximum"])
    np.testing.assert_array_equal(restored.minimum, scaler.minimum)
    np.testing.assert_array_equal(restored.maximum, scaler.maximum)
    np.testing.assert_array_equal(restored.transform(constituents), scaler.transform(constituents))


def test_scaler_rejects_no_real_particles():
    constituents, mask = hand_scaler_jets()

    with pytest.raises(ValueError, match="no real constituents"):
        MinMaxScaler().fit(constituents, np.zeros_like(mask))


def test_scaler_rejects_constant_feature():
    constituents, mask = hand_scaler_jets()
    constituents[..., 2] = 5.0

    with pytest.raises(ValueError, match=r"\['pz'\]"):
        MinMaxScaler().fit(constituents, mask)


def test_scaler_rejects_nan():
    constituents, mask = hand_scaler_jets()
    constituents[0, 0, 0] = np.nan

    with pytest.raises(ValueError, match="NaN"):
        MinMaxScaler().fit(constituents, mask)


def test_scaler_rejects_wrong_last_dimension():
    scaler = MinMaxScaler().fit(*hand_scaler_jets())

    with pytest.raises(ValueError, match=r"\[\.\.\., 3\]"):
        scaler.transform(np.zeros((2, 4)))


def test_scaler_unfitted_raises():
    with pytest.raises(RuntimeError, match="not fitted"):
        MinMaxScaler().transform(np.zeros(3))


def test_scaler_state_missing_key():
    with pytest.raises(ValueError, match="maximum"):
        MinMaxScaler.from_state_dict({"minimum": [0.0, 0.0, 0.0]})


def test_error_generated_file_without_constituents(tmp_path):
    constituents, mask = generated_jets(MIN_JETS)
    path = write_jethpo(tmp_path / "jets.hdf5", constituents, mask)
    with h5py.File(path, "a") as file:
        del file["constituents"]

    assert_error(path, "no 'constituents' dataset")


def test_error_jets_without_constituents(tmp_path):
    constituents, mask = generated_jets(MIN_JETS)
    constituents[3] = 0.0
    mask[3] = False
    path = write_jethpo(tmp_path / "jets.hdf5", constituents, mask)

    assert_error(path, "1 of 10 jets have no constituents", "row 3")


# JetNet writer

# Two massless 500 GeV particles at eta +0.1 and -0.1, both at phi = 1 rad: a jet of pT
# 1000 GeV at eta 0 and phi 1, with m^2 = 2 * 500 * 500 * (cosh(0.2) - 1) = 10033.378 GeV^2.
# Each particle has (px, py, pz) = 500 * (cos 1, sin 1, sinh(+-0.1)) in GeV.
PAIR_CONSTITUENTS = [
    (270.1511529, 420.7354924, 50.0833750),
    (270.1511529, 420.7354924, -50.0833750),
]
PAIR_MASS = 100.1667500


def pair_jets(n_jets: int = MIN_JETS) -> tuple[np.ndarray, np.ndarray]:
    constituents = np.zeros((n_jets, 30, 3))
    constituents[:, :2] = PAIR_CONSTITUENTS
    mask = np.zeros((n_jets, 30), dtype=bool)
    mask[:, :2] = True
    return constituents, mask


def test_writer_jetnet_features_of_pair(tmp_path):
    path = write_jetnet_jets(tmp_path / "pair.hdf5", *pair_jets(), attrs={})

    with h5py.File(path, "r") as file:
        particle_features = file["particle_features"][()]
        jet_features = file["jet_features"][()]

    assert particle_features.shape == (MIN_JETS, 30, 4)
    assert particle_features.dtype == np.float32
    expected_particles = [(0.1, 0.0, 0.5, 1.0), (-0.1, 0.0, 0.5, 1.0)]
    np.testing.assert_allclose(particle_features[0, :2], expected_particles, atol=1e-6)
    assert not particle_features[0, 2:].any()
    assert jet_features.shape == (MIN_JETS, 4)
    np.testing.assert_allclose(jet_features[0], [1000.0, 0.0, PAIR_MASS, 2.0], rtol=1e-5, atol=1e-6)


def test_writer_round_trip_keeps_jet_phi(tmp_path):
    constituents, mask = pair_jets()
    path = write_jetnet_jets(tmp_path / "pair.hdf5", constituents, mask, attrs={})

    data = read_jets(path)
    kinematics = jet_kinematics_numpy(data.constituents)

    np.testing.assert_allclose(data.constituents, constituents, rtol=1e-6, atol=1e-4)
    np.testing.assert_array_equal(data.mask, mask)
    np.testing.assert_allclose(kinematics["phi"], 1.0, rtol=1e-6)
    np.testing.assert_allclose(kinematics["mass"], PAIR_MASS, rtol=1e-5)


def test_writer_jetnet_datasets_alone(tmp_path):
    constituents, mask = pair_jets()
    path = write_jetnet_jets(tmp_path / "g.hdf5", constituents, mask, attrs={})
    with h5py.File(path, "a") as file:
        del file["constituents"]

    data = read_jets(path)
    kinematics = jet_kinematics_numpy(data.constituents)

    assert data.source == "jetnet"
    np.testing.assert_allclose(kinematics["mass"], PAIR_MASS, rtol=1e-5)
    np.testing.assert_allclose(kinematics["pt"], 1000.0, rtol=1e-6)
    np.testing.assert_allclose(kinematics["eta"], 0.0, atol=1e-6)
    # JetNet stores no jet phi, so the reader rotates every jet to phi = 0
    np.testing.assert_allclose(kinematics["phi"], 0.0, atol=1e-6)


def test_writer_round_trip_pythia_jets(tmp_path, pythia_jets):
    path = write_jetnet_jets(
        tmp_path / "jets.hdf5", pythia_jets.constituents, pythia_jets.mask, attrs={"seed": 3}
    )

    data = read_jets(path)

    assert len(data) == len(pythia_jets)
    np.testing.assert_array_equal(data.constituents, pythia_jets.constituents)
    np.testing.assert_array_equal(data.mask, pythia_jets.mask)
    assert data.fingerprint == pythia_jets.fingerprint


def test_writer_jet_features_match_kinematics(tmp_path, pythia_jets):
    path = write_jetnet_jets(
        tmp_path / "jets.hdf5", pythia_jets.constituents, pythia_jets.mask, attrs={}
    )
    kinematics = jet_kinematics_numpy(pythia_jets.constituents)

    with h5py.File(path, "r") as file:
        jet_features = file["jet_features"][()]
        ptrel = file["particle_features"][..., 2]

    np.testing.assert_allclose(jet_features[:, 0], kinematics["pt"], rtol=1e-5)
    np.testing.assert_allclose(jet_features[:, 1], kinematics["eta"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(jet_features[:, 2], kinematics["mass"], rtol=1e-4)
    np.testing.assert_array_equal(jet_features[:, 3], pythia_jets.mask.sum(axis=1))
    # massless constituents' pT fractions add up to more than 1 unless they are collinear
    assert (ptrel.sum(axis=1) >= 1.0 - 1e-5).all()


def test_writer_orders_constituents_by_pt(tmp_path):
    constituents, mask = generated_jets(MIN_JETS, seed=4)
    reversed_constituents = constituents[:, ::-1]
    reversed_mask = mask[:, ::-1]

    path = write_jetnet_jets(tmp_path / "jets.hdf5", reversed_constituents, reversed_mask, attrs={})
    with h5py.File(path, "r") as file:
        stored = file["constituents"][()]
        stored_mask = file["particle_features"][..., 3] > 0.5

    np.testing.assert_allclose(stored, constituents, rtol=1e-6)
    np.testing.assert_array_equal(stored_mask, mask)


def test_writer_without_mask_counts_nonzero_pt(tmp_path):
    constituents, mask = generated_jets(MIN_JETS, seed=5)

    path = write_jetnet_jets(tmp_path / "jets.hdf5", constituents, None, attrs={})
    data = read_jets(path)

    np.testing.assert_array_equal(data.mask, mask)


def test_writer_zeroes_masked_constituents(tmp_path):
    constituents, mask = pair_jets()
    constituents[:, 5] = (np.nan, 7.0, 7.0)

    path = write_jetnet_jets(tmp_path / "pair.hdf5", constituents, mask, attrs={})
    data = read_jets(path)

    assert not data.constituents[:, 2:].any()
    assert data.mask.sum() == 2 * MIN_JETS


def test_writer_stores_attrs(tmp_path):
    attrs = {
        "model": "convae-nf",
        "seed": 7,
        "batch_size": np.int64(512),
        "temperature": 1.0,
        "complete": True,
        "settings": {"n_jets": 10, "device": "cpu"},
        "checkpoint": None,
    }

    path = write_jetnet_jets(tmp_path / "jets.hdf5", *pair_jets(), attrs=attrs)
    data = read_jets(path)

    stored = data.metadata["attrs"]
    assert stored["model"] == "convae-nf"
    assert stored["seed"] == 7
    assert stored["batch_size"] == 512
    assert stored["temperature"] == 1.0
    assert stored["complete"] is True
    assert stored["checkpoint"] == "null"
    assert data.metadata["settings"] == {"n_jets": 10, "device": "cpu"}


def test_writer_replaces_file_atomically(tmp_path):
    path = tmp_path / "out" / "jets.hdf5"
    constituents, mask = pair_jets()
    write_jetnet_jets(path, constituents, mask, attrs={"seed": 1})

    write_jetnet_jets(path, 2 * constituents, mask, attrs={"seed": 2})
    data = read_jets(path)

    assert sorted(child.name for child in path.parent.iterdir()) == ["jets.hdf5"]
    assert data.metadata["attrs"]["seed"] == 2
    masses = jet_kinematics_numpy(data.constituents)["mass"]
    np.testing.assert_allclose(masses, 2 * PAIR_MASS, rtol=1e-5)


def test_writer_rejects_nan_jets(tmp_path):
    constituents, mask = pair_jets()
    constituents[3, 1, 2] = np.nan
    path = tmp_path / "jets.hdf5"

    with pytest.raises(JetDataError) as raised:
        write_jetnet_jets(path, constituents, mask, attrs={})

    message = str(raised.value)
    assert str(path) in message
    assert "1 of 10 jets" in message
    assert "[3]" in message
    assert not path.exists()


def test_writer_rejects_empty_jet(tmp_path):
    constituents, mask = pair_jets()
    mask[4] = False

    with pytest.raises(JetDataError, match=r"1 of 10 jets have no real constituents"):
        write_jetnet_jets(tmp_path / "jets.hdf5", constituents, mask, attrs={})


@pytest.mark.parametrize(
    ("constituents", "mask", "phrase"),
    [
        (np.ones((4, 30, 4)), None, "shape (4, 30, 4)"),
        (np.ones((0, 30, 3)), None, "at least one jet"),
        (np.ones((4, 30, 3)), np.ones((4, 20), dtype=bool), "mask has shape (4, 20)"),
    ],
)
def test_writer_rejects_bad_shapes(tmp_path, constituents, mask, phrase):
    path = tmp_path / "jets.hdf5"

    with pytest.raises(JetDataError) as raised:
        write_jetnet_jets(path, constituents, mask, attrs={})

    assert phrase in str(raised.value)
    assert str(path) in str(raised.value)


def test_writer_rejects_unstorable_attr(tmp_path):
    with pytest.raises(TypeError, match=r"attribute 'scaler' has a value of type object"):
        write_jetnet_jets(tmp_path / "jets.hdf5", *pair_jets(), attrs={"scaler": object()})
