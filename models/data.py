"""Jet data: readers for JetNet, HLS4ML and jethpo files, the train/validation/test split, and
the min-max scaler that maps (px, py, pz) to the network's [0, 1] range.

Every reader returns the canonical form used across jethpo: constituents as float32
``[n_jets, 30, 3]`` with features (px, py, pz) in GeV, ordered by decreasing pT and zero-padded,
and a bool mask ``[n_jets, 30]`` that is true for real constituents.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from torch import Tensor

from models.jets import (
    N_PARTICLES,
    constituents_from_relative,
    jet_kinematics_numpy,
    relative_coordinates,
)

__all__ = [
    "FEATURE_NAMES",
    "JET_TYPES",
    "MIN_JETS",
    "JetDataError",
    "JetData",
    "read_jets",
    "Splits",
    "split_jets",
    "MinMaxScaler",
    "write_jetnet_jets",
]

logger = logging.getLogger(__name__)

#: Constituent features of the canonical form, in this order, all in GeV.
FEATURE_NAMES = ("px", "py", "pz")

#: Jet types of JetNet (file names g.hdf5, q.hdf5, ...) and of the HLS4ML one-hot labels
#: (j_g, j_q, ...): gluon, light quark, top quark, W boson and Z boson.
JET_TYPES = ("g", "q", "t", "w", "z")

#: Minimum number of jets that :func:`read_jets` accepts, so that a 70/15/15 split leaves at least one
#: jet in each of train, validation and test.
MIN_JETS = 10

_HDF5_SUFFIXES = (".hdf5", ".h5", ".hdf")

# Datasets that identify each layout, checked in this order because a jethpo file also
# contains JetNet's two datasets.
_LAYOUT_DATASETS = {
    "jethpo": ("constituents",),
    "hls4ml": ("jetConstituentList",),
    "jetnet": ("particle_features", "jet_features"),
}
_EXPECTED_DATASETS = (
    "constituents, particle_features and jet_features for files written by `jethpo data generate`; "
    "particle_features and jet_features for JetNet; "
    "jetConstituentList, particleFeatureNames, jets and jetFeatureNames for HLS4ML"
)
_HLS4ML_DATASETS = ("jetConstituentList", "particleFeatureNames", "jets", "jetFeatureNames")
_JETNET_PARTICLE_FEATURES = ("etarel", "phirel", "ptrel", "mask")
_JETNET_JET_FEATURES = ("pt", "eta", "mass", "num_particles")
_JETNET_PARTICLE_SHAPE = f"[n_jets, {N_PARTICLES}, 4] with features ({', '.join(_JETNET_PARTICLE_FEATURES)})"
_REGENERATE = "Regenerate the file with `jethpo data generate`."
_JETHPO_PRODUCER = "jethpo data generate"
_JETNET_FILE_NAME = re.compile(r"^([gqtwz])(\d*)$")


class JetDataError(ValueError):
    """Invalid or unreadable jet data. The message names the file, the problem and what to
    do next."""


@dataclass
class JetData:
    """Jets in the canonical form, with where they came from.

    Arguments:
        constituents: float32 ``[n_jets, 30, 3]`` with features (px, py, pz) in GeV, ordered
            by decreasing pT, zero for padded constituents.
        mask: bool ``[n_jets, 30]``, true for real constituents.
        path: The file or directory the jets were read from.
        source: The file layout: ``"jetnet"``, ``"hls4ml"`` or ``"jethpo"``.
        metadata: Plain Python values that describe the data: ``path``, ``layout``,
            ``files``, ``jet_type``, the HDF5 file attributes under ``attrs`` and, for
            subsets made by :func:`split_jets`, ``split`` and ``split_seed``.

    Example:
        >>> data = read_jets("data/jets.hdf5")
        >>> data.constituents.shape, data.fingerprint[:12]
    """

    constituents: np.ndarray
    mask: np.ndarray
    path: str
    source: str
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.constituents = np.ascontiguousarray(self.constituents, dtype=np.float32)
        self.mask = np.ascontiguousarray(self.mask, dtype=bool)
        if self.constituents.ndim != 3 or self.constituents.shape[-1] != len(FEATURE_NAMES):
            raise ValueError(
                f"constituents of {self.path} have shape {self.constituents.shape}, "
                f"expected [n_jets, n_particles, 3] with features (px, py, pz)"
            )
        if self.mask.shape != self.constituents.shape[:2]:
            raise ValueError(
                f"mask of {self.path} has shape {self.mask.shape}, but the constituents "
                f"have shape {self.constituents.shape}, expected [n_jets, n_particles]"
            )

    def __len__(self) -> int:
        return len(self.constituents)

    @property
    def fingerprint(self) -> str:
        """SHA-256 hex digest of the constituent bytes (little-endian float32) followed by
        the mask bytes. Reading the same file twice gives the same fingerprint."""
        digest = hashlib.sha256()
        digest.update(np.ascontiguousarray(self.constituents, dtype="<f4"))
        digest.update(np.ascontiguousarray(self.mask, dtype=bool))
        return digest.hexdigest()

    def subset(self, indices: Sequence[int] | np.ndarray) -> JetData:
        """Select jets by integer index or boolean mask over jets.

        Returns:
            A new :class:`JetData` with copies of the selected jets and a shallow copy of
            the metadata, whose ``n_jets`` is updated.
        """
        indices = np.asarray(indices)
        metadata = dict(self.metadata)
        selected = JetData(
            constituents=self.constituents[indices],
            mask=self.mask[indices],
            path=self.path,
            source=self.source,
            metadata=metadata,
        )
        metadata["n_jets"] = len(selected)
        return selected


def read_jets(path: str | os.PathLike[str], jet_type: str = "g") -> JetData:
    """Read jets from a JetNet, HLS4ML or jethpo HDF5 file, or from a directory of them.

    The layout is detected from the dataset names:

    - jethpo (written by ``jethpo data generate``): ``constituents`` ``[n, 30, 3]``
      (px, py, pz) in GeV is used as stored. The file attributes (generator versions, seed,
      settings) go into ``metadata["attrs"]``, and the JSON ``settings`` attribute is also
      parsed into ``metadata["settings"]``.
    - JetNet (``g.hdf5``): ``particle_features`` ``[n, 30, 4]`` (etarel, phirel, ptrel,
      mask) and ``jet_features`` ``[n, 4]`` (pt, eta, mass, num_particles). JetNet stores
      no jet phi, so each constituent gets phi = phirel. That puts the jet axis near
      phi = 0 and leaves jet mass, energy, pT and eta unchanged (``metadata["jet_phi"]``
      records this).
    - HLS4ML (30-particle files): ``jetConstituentList`` ``[n, 30, n_features]`` whose px,
      py and pz columns are found by name in ``particleFeatureNames``. Only jets whose
      one-hot label ``j_<jet_type>`` in ``jets``/``jetFeatureNames`` is set are kept. A
      constituent is real when its momentum is nonzero.

    A directory is read as all of its HLS4ML files concatenated in sorted name order, or as
    the single jethpo or JetNet file it contains. Where a directory contains several JetNet
    files, the one named ``<jet_type>.hdf5`` is read.

    Args:
        path: An HDF5 file (``.hdf5``, ``.h5`` or ``.hdf``) or a directory containing them.
        jet_type: One of :data:`JET_TYPES`. It selects HLS4ML jets and the JetNet file in a
            directory. A JetNet file named for another type (``q.hdf5``) is rejected.
            jethpo files are read whatever the jet type.

    Returns:
        The jets in canonical form (constituents ordered by decreasing pT, padding zeroed).

    Raises:
        JetDataError: The path is missing, not HDF5 or unreadable, has an unknown layout,
            wrong shapes, NaN or infinite values, no jets of the requested type, or fewer
            than :data:`MIN_JETS` jets.
    """
    path = Path(path)
    jet_type = _check_jet_type(jet_type, path)
    layout, files = _resolve_files(path, jet_type)

    if layout == "hls4ml":
        constituents, mask, metadata = _read_hls4ml_files(files, jet_type)
        source_path = path
    else:
        source_path = files[0]
        reader = _read_jethpo if layout == "jethpo" else _read_jetnet
        with _reading(source_path) as file:
            constituents, mask, metadata = reader(file, source_path, jet_type)

    constituents, mask = _canonical_order(constituents, mask)
    n_jets = len(constituents)
    if n_jets < MIN_JETS:
        type_name = f" {jet_type}" if layout == "hls4ml" else ""
        raise JetDataError(
            f"{source_path}: contains {n_jets}{type_name} jets, but at least {MIN_JETS} are needed "
            f"so that the train, validation and test splits each get at least one jet. "
            f"Use a larger file, for example from `jethpo data generate --jets 1000`."
        )

    empty_jets = np.flatnonzero(~mask.any(axis=1))
    if len(empty_jets):
        raise JetDataError(
            f"{source_path}: {len(empty_jets)} of {n_jets} jets have no constituents "
            f"(first at row {empty_jets[0]}). Remove the empty jets or regenerate the file."
        )

    metadata = {
        "path": str(source_path),
        "layout": layout,
        "files": [str(file) for file in files],
        "jet_type": jet_type,
        "n_jets": n_jets,
        **metadata,
    }
    logger.info("Read %d jets from %s (%s layout)", n_jets, source_path, layout)
    return JetData(constituents, mask, path=str(source_path), source=layout, metadata=metadata)


# file discovery and layout detection


def _check_jet_type(jet_type: str, path: Path) -> str:
    normalized = str(jet_type).lower()
    if normalized not in JET_TYPES:
        raise JetDataError(
            f"{path}: jet type {jet_type!r} is invalid. Request one of {', '.join(JET_TYPES)}."
        )
    return normalized


@contextlib.contextmanager
def _reading(path: Path) -> Iterator[h5py.File]:
    """Open an HDF5 file for reading, and turn h5py's OSError on a file that is not HDF5,
    unreadable or damaged into a JetDataError."""
    try:
        is_hdf5 = h5py.is_hdf5(path)
    except OSError as error:
        raise JetDataError(f"{path}: file could not be read ({error}). Check its permissions.") from error
    if not is_hdf5:
        raise JetDataError(
            f"{path}: not an HDF5 file. Pass a JetNet .hdf5 file, an HLS4ML .h5 file or a "
            f"file written by `jethpo data generate`, and check that its download completed."
        )

    try:
        file = h5py.File(path, "r")
    except OSError as error:
        raise JetDataError(
            f"{path}: HDF5 file could not be opened ({error}). The file may be truncated or "
            f"damaged. Download or generate it again."
        ) from error

    with file:
        try:
            yield file
        except OSError as error:
            raise JetDataError(
                f"{path}: reading failed ({error}). The file may be truncated or damaged. "
                f"Download or generate it again."
            ) from error


def _detect_layout(file: h5py.File) -> str | None:
    for layout, names in _LAYOUT_DATASETS.items():
        if all(isinstance(file.get(name), h5py.Dataset) for name in names):
            return layout
    return None


def _layout_of(path: Path) -> str:
    with _reading(path) as file:
        layout = _detect_layout(file)
        found = sorted(file.keys())
    if layout is None:
        raise JetDataError(
            f"{path}: unknown file layout, with datasets {found or 'none'}. Expected the "
            f"datasets of one of these layouts: {_EXPECTED_DATASETS}."
        )
    return layout


def _resolve_files(path: Path, jet_type: str) -> tuple[str, list[Path]]:
    """Find the layout and the files to read for a file or directory path."""
    if not path.exists():
        raise JetDataError(
            f"{path}: file or directory not found. Pass a JetNet g.hdf5, an HLS4ML .h5 file "
            f"or directory, or the output of `jethpo data generate --out DIR`."
        )
    if not path.is_dir():
        return _layout_of(path), [path]

    candidates = sorted(
        child for child in path.iterdir() if child.is_file() and child.suffix.lower() in _HDF5_SUFFIXES
    )
    if not candidates:
        raise JetDataError(
            f"{path}: directory contains no HDF5 file ({', '.join(_HDF5_SUFFIXES)}). Pass the "
            f"directory that `jethpo data generate --out` wrote, or a JetNet or HLS4ML file."
        )
    if len(candidates) == 1:
        return _layout_of(candidates[0]), candidates

    # several candidates: skip the unreadable ones, then group the rest by layout
    layouts: dict[Path, str] = {}
    skipped = []
    for candidate in candidates:
        try:
            layouts[candidate] = _layout_of(candidate)
        except JetDataError as error:
            logger.warning("Skipping %s in %s: %s", candidate.name, path, error)
            skipped.append(candidate.name)
    by_layout: dict[str, list[Path]] = {}
    for candidate, layout in layouts.items():
        by_layout.setdefault(layout, []).append(candidate)

    if set(by_layout) == {"hls4ml"}:
        return "hls4ml", by_layout["hls4ml"]
    if by_layout and "hls4ml" not in by_layout:
        files = list(layouts)
        if len(files) == 1:
            return layouts[files[0]], files
        named_for_type = [file for file in files if file.stem.lower() == jet_type]
        if len(named_for_type) == 1:
            return layouts[named_for_type[0]], named_for_type

    if not by_layout:
        raise JetDataError(
            f"{path}: none of the HDF5 files {skipped} has a known layout (expected "
            f"{_EXPECTED_DATASETS}). Pass a file with one of these layouts."
        )
    listing = "; ".join(
        f"{layout}: {[file.name for file in files]}" for layout, files in by_layout.items()
    )
    raise JetDataError(
        f"{path}: directory contains several jet files and jethpo cannot tell which to read "
        f"({listing}). Pass one file instead of the directory, or keep only HLS4ML files in it."
    )


# readers, one per layout, each returning float64 constituents, the mask and metadata


def _dataset(file: h5py.File, path: Path, name: str) -> h5py.Dataset:
    dataset = file.get(name)
    if not isinstance(dataset, h5py.Dataset):
        raise JetDataError(
            f"{path}: dataset {name!r} is missing (found {sorted(file.keys())}). The file is "
            f"incomplete. Download or generate it again."
        )
    return dataset


def _check_shape(
    path: Path, name: str, shape: tuple[int, ...], n_features: int | None, expected: str, remedy: str
) -> None:
    """Check that a per-particle dataset has shape ``[n_jets, 30, n_features]``, with any
    number of features where ``n_features`` is None. ``expected`` describes the shape, and
    ``remedy`` is the advice given when the particle count is wrong."""
    if len(shape) != 3:
        raise JetDataError(f"{path}: dataset {name!r} has shape {shape}, expected {expected}.")
    if shape[1] != N_PARTICLES:
        raise JetDataError(
            f"{path}: dataset {name!r} has {shape[1]} particles per jet, but jethpo models take "
            f"the {N_PARTICLES} highest-pT particles (expected {expected}). {remedy}"
        )
    if n_features is not None and shape[2] != n_features:
        raise JetDataError(
            f"{path}: dataset {name!r} has {shape[2]} features per particle, expected {expected}."
        )


def _check_rows(path: Path, first: str, first_rows: int, second: str, second_rows: int) -> None:
    if first_rows != second_rows:
        raise JetDataError(
            f"{path}: dataset {first!r} has {first_rows} jets but {second!r} has {second_rows}. "
            f"The file is inconsistent. Download or generate it again."
        )


def _check_finite(
    path: Path, description: str, values: np.ndarray, rows: np.ndarray | None = None, jets: str = "jets"
) -> None:
    """Reject jets whose ``values`` (jets along the first axis) contain NaN or inf.

    ``rows`` gives each jet's row in the file where ``values`` contains only some of its jets,
    and ``jets`` names those jets in the message.
    """
    if len(values) == 0:
        return
    bad = ~np.isfinite(values.reshape(len(values), -1)).all(axis=1)
    n_bad = int(bad.sum())
    if n_bad:
        bad_rows = np.flatnonzero(bad) if rows is None else rows[bad]
        verb = "contains" if n_bad == 1 else "contain"
        raise JetDataError(
            f"{path}: {n_bad} of {len(values)} {jets} {verb} NaN or infinite values in "
            f"{description} (first rows {bad_rows[:5].tolist()}). Remove those jets or "
            f"regenerate the file."
        )


def _read_jetnet(file: h5py.File, path: Path, jet_type: str) -> tuple[np.ndarray, np.ndarray, dict]:
    # A generated file without its constituents would otherwise pass as JetNet and get
    # momenta rebuilt at jet phi = 0 and from the truncated jet pT, silently wrong.
    if file.attrs.get("producer") == _JETHPO_PRODUCER:
        raise JetDataError(f"{path}: written by {_JETHPO_PRODUCER} but has no 'constituents' dataset. {_REGENERATE}")

    name_match = _JETNET_FILE_NAME.match(path.stem.lower())
    if name_match and name_match.group(1) != jet_type:
        file_type = name_match.group(1)
        raise JetDataError(
            f"{path}: the file name {path.name} marks JetNet {file_type} jets, but jet type "
            f"{jet_type!r} was requested. Request jet type {file_type!r}, or pass {jet_type}.hdf5."
        )

    particle_dataset = _dataset(file, path, "particle_features")
    jet_dataset = _dataset(file, path, "jet_features")
    _check_shape(
        path,
        "particle_features",
        particle_dataset.shape,
        len(_JETNET_PARTICLE_FEATURES),
        _JETNET_PARTICLE_SHAPE,
        "Use JetNet's 30-particle file (g.hdf5 rather than g150.hdf5).",
    )
    if len(jet_dataset.shape) != 2 or jet_dataset.shape[1] != len(_JETNET_JET_FEATURES):
        raise JetDataError(
            f"{path}: dataset 'jet_features' has shape {jet_dataset.shape}, expected "
            f"[n_jets, 4] with features ({', '.join(_JETNET_JET_FEATURES)})."
        )
    _check_rows(
        path, "particle_features", particle_dataset.shape[0], "jet_features", jet_dataset.shape[0]
    )

    particle_features = np.asarray(particle_dataset[()], dtype=np.float64)
    jet_features = np.asarray(jet_dataset[()], dtype=np.float64)
    _check_finite(path, "particle_features", particle_features)
    _check_finite(path, "jet_features (pt, eta)", jet_features[:, :2])

    mask = particle_features[..., 3] > 0.5
    constituents = constituents_from_relative(
        particle_features[..., :3],
        mask,
        jet_pt=jet_features[:, 0],
        jet_eta=jet_features[:, 1],
        jet_phi=0.0,
    )
    metadata = {
        "jet_phi": "JetNet stores no jet phi, so constituents are rebuilt around jet phi = 0",
        "attrs": _plain_attrs(file.attrs),
    }
    return constituents, mask, metadata


def _read_jethpo(file: h5py.File, path: Path, jet_type: str) -> tuple[np.ndarray, np.ndarray, dict]:
    dataset = _dataset(file, path, "constituents")
    _check_shape(
        path,
        "constituents",
        dataset.shape,
        len(FEATURE_NAMES),
        f"[n_jets, {N_PARTICLES}, 3] with features (px, py, pz)",
        _REGENERATE,
    )
    features = _plain(dataset.attrs.get("features", ",".join(FEATURE_NAMES)))
    unit = _plain(dataset.attrs.get("unit", "GeV"))
    if str(features).replace(" ", "") != ",".join(FEATURE_NAMES) or unit != "GeV":
        raise JetDataError(
            f"{path}: dataset 'constituents' stores features {features!r} in {unit!r}, expected "
            f"'px,py,pz' in 'GeV'. {_REGENERATE}"
        )

    constituents = np.asarray(dataset[()], dtype=np.float64)
    _check_finite(path, "constituents", constituents)

    # the mask column of particle_features, or nonzero momentum where that dataset is absent
    particle_dataset = file.get("particle_features")
    if isinstance(particle_dataset, h5py.Dataset):
        _check_shape(
            path,
            "particle_features",
            particle_dataset.shape,
            len(_JETNET_PARTICLE_FEATURES),
            _JETNET_PARTICLE_SHAPE,
            _REGENERATE,
        )
        _check_rows(
            path, "constituents", dataset.shape[0], "particle_features", particle_dataset.shape[0]
        )
        mask = np.asarray(particle_dataset[..., 3]) > 0.5
    else:
        mask = np.any(constituents != 0, axis=-1)

    attrs = _plain_attrs(file.attrs)
    metadata: dict[str, Any] = {"attrs": attrs}
    if "settings" in attrs:
        try:
            metadata["settings"] = json.loads(attrs["settings"])
        except (TypeError, ValueError):
            logger.warning("The settings attribute of %s is not valid JSON, so it is kept as text", path)
    if "n_jets" in attrs and attrs["n_jets"] != len(constituents):
        logger.warning(
            "%s: attribute n_jets is %s, but the file contains %d jets",
            path,
            attrs["n_jets"],
            len(constituents),
        )
    return constituents, mask, metadata


def _read_hls4ml_files(files: list[Path], jet_type: str) -> tuple[np.ndarray, np.ndarray, dict]:
    parts = []
    label_counts: dict[str, int] = {}
    for path in files:
        with _reading(path) as file:
            constituents, counts = _read_hls4ml(file, path, jet_type)
        parts.append(constituents)
        for label, count in counts.items():
            label_counts[label] = label_counts.get(label, 0) + count

    constituents = np.concatenate(parts)
    if len(constituents) == 0:
        where = files[0] if len(files) == 1 else files[0].parent
        present = ", ".join(
            f"{label} ({count})" for label, count in sorted(label_counts.items()) if count
        )
        raise JetDataError(
            f"{where}: no jets with label j_{jet_type} (labels present: {present or 'none'}). "
            f"Request one of the jet types present, or use files that contain {jet_type} jets."
        )
    mask = np.any(constituents != 0, axis=-1)
    return constituents, mask, {"label_counts": label_counts}


def _read_hls4ml(file: h5py.File, path: Path, jet_type: str) -> tuple[np.ndarray, dict[str, int]]:
    """Read the px, py, pz columns of one HLS4ML file's jets of ``jet_type``, and count the
    jets of every label."""
    for name in _HLS4ML_DATASETS:
        _dataset(file, path, name)
    particle_dataset = file["jetConstituentList"]
    jet_dataset = file["jets"]
    particle_names = _decode_names(file["particleFeatureNames"][()])
    jet_names = _decode_names(file["jetFeatureNames"][()])

    shape = particle_dataset.shape
    _check_shape(
        path,
        "jetConstituentList",
        shape,
        None,
        f"[n_jets, {N_PARTICLES}, n_features] with the features named in particleFeatureNames",
        "Use the 30-particle HLS4ML files.",
    )
    _check_rows(path, "jetConstituentList", shape[0], "jets", jet_dataset.shape[0])

    # particleFeatureNames may list more names than there are columns: HLS4ML's 150-particle
    # files name 17 features for 16 columns, with j1_pdgid last. A name counts only when its
    # position is a real column.
    columns = []
    for feature in FEATURE_NAMES:
        position = _find_name(particle_names, f"j1_{feature}")
        if position is None or position >= shape[2]:
            raise JetDataError(
                f"{path}: particleFeatureNames has no column j1_{feature} among the {shape[2]} "
                f"columns of jetConstituentList (names: {particle_names}). Use the HLS4ML jet "
                f"files, whose constituents carry j1_px, j1_py and j1_pz."
            )
        columns.append(position)

    label_positions = {}
    for position, name in enumerate(jet_names):
        label = name.lower().removeprefix("j_")
        if name.lower() == f"j_{label}" and label in JET_TYPES:
            label_positions[label] = position
    if jet_type not in label_positions:
        raise JetDataError(
            f"{path}: jetFeatureNames has no label column j_{jet_type} (labels found: "
            f"{sorted('j_' + label for label in label_positions) or 'none'}). Request one of "
            f"those jet types."
        )

    jets = np.asarray(jet_dataset[()], dtype=np.float64)
    if jets.ndim != 2 or max(label_positions.values()) >= jets.shape[1]:
        raise JetDataError(
            f"{path}: dataset 'jets' has shape {jets.shape}, which does not match the "
            f"{len(jet_names)} names in jetFeatureNames. The file is inconsistent. Download it "
            f"again."
        )
    counts = {label: int((jets[:, position] > 0.5).sum()) for label, position in label_positions.items()}
    selected = jets[:, label_positions[jet_type]] > 0.5

    constituents = np.asarray(particle_dataset[()], dtype=np.float64)[selected][..., columns]
    _check_finite(
        path,
        "the j1_px, j1_py and j1_pz columns of jetConstituentList",
        constituents,
        rows=np.flatnonzero(selected),
        jets=f"{jet_type} jets",
    )
    return constituents, counts


def _decode_names(values: np.ndarray) -> list[str]:
    return [
        value.decode("utf-8") if isinstance(value, bytes) else str(value) for value in np.ravel(values)
    ]


def _find_name(names: list[str], expected: str) -> int | None:
    lowered = [name.lower() for name in names]
    return lowered.index(expected) if expected in lowered else None


def _plain(value: Any) -> Any:
    """Convert an HDF5 attribute value to plain Python (str, int, float, bool, list)."""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, np.ndarray):
        return [_plain(item) for item in value.tolist()]
    if isinstance(value, np.generic):
        return _plain(value.item())
    return value


def _plain_attrs(attrs: h5py.AttributeManager) -> dict[str, Any]:
    return {key: _plain(attrs[key]) for key in attrs}


def _canonical_order(constituents: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Order each jet's constituents by decreasing pT with padding last, zero the padding
    and cast to float32."""
    pt = np.hypot(constituents[..., 0], constituents[..., 1])
    sort_key = np.where(mask, pt, -1.0)
    order = np.argsort(-sort_key, axis=1, kind="stable")
    constituents = np.take_along_axis(constituents, order[..., None], axis=1).astype(np.float32)
    mask = np.take_along_axis(mask, order, axis=1)
    constituents[~mask] = 0.0
    return constituents, mask


# writer


def write_jetnet_jets(
    path: str | os.PathLike[str],
    constituents_gev: np.ndarray,
    mask: np.ndarray | None,
    attrs: Mapping[str, Any],
) -> Path:
    """Write jets in JetNet's layout, with the absolute constituents alongside.

    The file contains these float32 datasets, each constituent ordered by decreasing pT
    and padding last, as in JetNet's files:

    - ``particle_features`` ``[n_jets, n_particles, 4]``: etarel, phirel, ptrel, mask, relative
      to the jet built from the real constituents.
    - ``jet_features`` ``[n_jets, 4]``: pt in GeV, eta, mass in GeV, num_particles.
    - ``constituents`` ``[n_jets, n_particles, 3]``: px, py, pz in GeV. JetNet's layout stores
      no jet phi, so this dataset keeps each jet's orientation. :func:`read_jets` reads it
      as the jethpo layout, while JetNet tools read the first two datasets.

    ``attrs`` become the file attributes. Strings, numbers and booleans are stored as they
    are, and dicts, lists, tuples and None as JSON text. The file is written under a
    temporary name in the same folder and then renamed, so ``path`` is either complete or
    left as it was. Parent folders are created.

    Args:
        path: The HDF5 file to write, replaced if it exists.
        constituents_gev: ``[n_jets, n_particles, 3]`` (px, py, pz) in GeV.
        mask: ``[n_jets, n_particles]``, true for real constituents, or None to take every
            constituent with nonzero pT as real (generated jets rarely contain exact zeros).
            Constituents outside the mask are written as zeros.
        attrs: File attributes, such as the model, the checkpoint and the seed.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        JetDataError: The shapes are wrong, a real constituent is NaN or infinite, or a jet
            has no real constituents. Nothing is written then.
        TypeError: An attribute key is not a non-empty string, or a value cannot be stored.
    """
    path = Path(path)
    constituents = np.asarray(constituents_gev, dtype=np.float64)
    wrong_shape = constituents.ndim != 3 or constituents.shape[-1] != len(FEATURE_NAMES)
    if wrong_shape or len(constituents) == 0:
        raise JetDataError(
            f"{path}: cannot write jets of shape {constituents.shape}, expected "
            f"[n_jets, n_particles, 3] (px, py, pz) in GeV with at least one jet"
        )
    if mask is None:
        mask = ~(np.hypot(constituents[..., 0], constituents[..., 1]) == 0)
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != constituents.shape[:2]:
        raise JetDataError(
            f"{path}: cannot write jets: mask has shape {mask.shape}, but the constituents have "
            f"shape {constituents.shape}, expected [n_jets, n_particles]"
        )
    stored_attrs = _storable_attrs(path, attrs)

    # checks on the real constituents only, because padding is written as zeros
    constituents = np.where(mask[..., None], constituents, 0.0)
    bad_jets = np.flatnonzero(~np.isfinite(constituents).all(axis=(1, 2)))
    if len(bad_jets):
        raise JetDataError(
            f"{path}: {len(bad_jets)} of {len(constituents)} jets contain NaN or infinite "
            f"constituents (first rows {bad_jets[:5].tolist()}), so the file was not written. "
            f"The model that produced them has diverged. Use another checkpoint."
        )
    empty_jets = np.flatnonzero(~mask.any(axis=1))
    if len(empty_jets):
        raise JetDataError(
            f"{path}: {len(empty_jets)} of {len(constituents)} jets have no real constituents "
            f"(first rows {empty_jets[:5].tolist()}), so the file was not written. Pass a mask "
            f"with at least one real constituent per jet."
        )

    # JetNet's features from the ordered float32 jets, so that they match what is stored
    constituents, mask = _canonical_order(constituents, mask)
    relative = relative_coordinates(constituents, mask)
    kinematics = jet_kinematics_numpy(constituents)
    particle_features = np.concatenate([relative, mask[..., None]], axis=-1).astype(np.float32)
    jet_features = np.stack(
        [kinematics["pt"], kinematics["eta"], kinematics["mass"], mask.sum(axis=1)], axis=-1
    ).astype(np.float32)

    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with h5py.File(temporary, "w") as file:
            dataset = file.create_dataset("particle_features", data=particle_features)
            dataset.attrs["features"] = ",".join(_JETNET_PARTICLE_FEATURES)
            dataset = file.create_dataset("jet_features", data=jet_features)
            dataset.attrs["features"] = ",".join(_JETNET_JET_FEATURES)
            dataset.attrs["unit"] = "GeV for pt and mass"
            dataset = file.create_dataset("constituents", data=constituents)
            dataset.attrs["features"] = ",".join(FEATURE_NAMES)
            dataset.attrs["unit"] = "GeV"
            for key, value in stored_attrs.items():
                file.attrs[key] = value
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)

    logger.info("Wrote %d jets to %s", len(constituents), path)
    return path


def _storable_attrs(path: Path, attrs: Mapping[str, Any]) -> dict[str, Any]:
    """Convert attribute values to what HDF5 stores: scalars as they are, containers and
    None as JSON text."""
    stored = {}
    for key, value in attrs.items():
        if not isinstance(key, str) or not key:
            raise TypeError(
                f"{path}: attribute key {key!r} is invalid, expected a non-empty string"
            )
        if isinstance(value, (str, bool, int, float, np.integer, np.floating, np.bool_)):
            stored[key] = value
            continue
        if isinstance(value, np.ndarray):
            value = value.tolist()
        try:
            stored[key] = json.dumps(value, sort_keys=True)
        except (TypeError, ValueError) as error:
            raise TypeError(
                f"{path}: attribute {key!r} has a value of type {type(value).__name__} that "
                f"cannot be stored ({error}). Pass a string, number, bool, or a JSON-serialisable "
                f"dict or list."
            ) from error
    return stored


# split


@dataclass
class Splits:
    """Disjoint train, validation and test subsets of one :class:`JetData`."""

    train: JetData
    validation: JetData
    test: JetData


def split_jets(data: JetData, seed: int, fractions: Sequence[float] = (0.7, 0.15, 0.15)) -> Splits:
    """Split jets at random into disjoint train, validation and test subsets.

    The split is a permutation drawn from ``numpy.random.default_rng(seed)``, so the same
    data and seed give the same split. Sizes are ``floor(fraction * n_jets)``, and the jets
    left over go one each to the splits with the largest remainders, so the sizes sum to
    ``n_jets``. Each subset keeps the jets in their original order.

    Args:
        data: The jets to split.
        seed: Non-negative integer seed of the permutation.
        fractions: (train, validation, test) fractions, each positive, summing to 1.

    Returns:
        The three subsets. Each subset's metadata records ``split`` and ``split_seed``.

    Raises:
        ValueError: ``fractions`` or ``seed`` is invalid.
        JetDataError: A split would contain no jets.
    """
    fractions = _check_fractions(fractions)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"split seed must be a non-negative integer, got {seed!r}")

    n_jets = len(data)
    sizes = _split_sizes(n_jets, fractions)
    names = ("train", "validation", "test")
    if min(sizes) == 0:
        described = ", ".join(f"{name} {size}" for name, size in zip(names, sizes))
        raise JetDataError(
            f"{data.path}: {n_jets} jets give split sizes {described}, but every split needs at "
            f"least one jet. Use more jets, or fractions that give each split at least one jet."
        )

    permutation = np.random.default_rng(seed).permutation(n_jets)
    boundaries = np.cumsum(sizes)[:-1]
    subsets = {}
    for name, indices in zip(names, np.split(permutation, boundaries)):
        subset = data.subset(np.sort(indices))
        subset.metadata["split"] = name
        subset.metadata["split_seed"] = int(seed)
        subsets[name] = subset
    return Splits(**subsets)


def _check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    values = tuple(float(value) for value in fractions)
    if len(values) != 3:
        raise ValueError(
            f"split fractions must be three values (train, validation, test), got {fractions!r}"
        )
    if not all(math.isfinite(value) and value > 0 for value in values):
        raise ValueError(f"split fractions must all be positive, got {fractions!r}")
    if not math.isclose(sum(values), 1.0, abs_tol=1e-6):
        raise ValueError(f"split fractions must sum to 1, got {fractions!r} (sum {sum(values)})")
    return values


def _split_sizes(n_jets: int, fractions: tuple[float, ...]) -> list[int]:
    """Largest-remainder sizes: floor of each share, then one more jet to the largest
    remainders (ties to the earlier split) until the sizes sum to ``n_jets``."""
    shares = [fraction * n_jets for fraction in fractions]
    # the tolerance keeps 0.29 * 100 = 28.999999999999996 from becoming 28
    sizes = [math.floor(share + 1e-9) for share in shares]
    remainders = [share - size for share, size in zip(shares, sizes)]
    for position in sorted(range(len(sizes)), key=lambda i: -remainders[i])[: n_jets - sum(sizes)]:
        sizes[position] += 1
    return sizes


# scaler


class MinMaxScaler:
    """Per-feature min-max scaling of (px, py, pz) between GeV and the network's [0, 1].

    :meth:`fit` takes the minimum and maximum of each feature over the real (unpadded)
    training constituents, so real training constituents map into [0, 1]. Padding zeros are
    transformed like any other value, so every padded constituent lands on the same point,
    ``-minimum / (maximum - minimum)`` per feature, which can lie outside [0, 1].

    Arguments:
        minimum: Per-feature minimum in GeV, three values (px, py, pz), or None for an
            unfitted scaler.
        maximum: Per-feature maximum in GeV, each greater than its minimum.

    Example:
        >>> scaler = MinMaxScaler().fit(train.constituents, train.mask)
        >>> scaled = scaler.transform(torch.as_tensor(train.constituents))
        >>> gev = scaler.inverse_transform(scaled)
    """

    def __init__(self, minimum: Sequence[float] | None = None, maximum: Sequence[float] | None = None):
        self._minimum: np.ndarray | None = None
        self._maximum: np.ndarray | None = None
        if minimum is not None or maximum is not None:
            self._set(minimum, maximum)

    def __repr__(self) -> str:
        if self._minimum is None:
            return "MinMaxScaler(unfitted)"
        return f"MinMaxScaler(minimum={self._minimum.tolist()}, maximum={self._maximum.tolist()})"

    @property
    def minimum(self) -> np.ndarray:
        """Per-feature minimum in GeV, float64 ``[3]`` (px, py, pz)."""
        return self._fitted()[0].copy()

    @property
    def maximum(self) -> np.ndarray:
        """Per-feature maximum in GeV, float64 ``[3]`` (px, py, pz)."""
        return self._fitted()[1].copy()

    def fit(self, constituents: np.ndarray | Tensor, mask: np.ndarray | Tensor) -> MinMaxScaler:
        """Fit the per-feature minimum and maximum on real constituents.

        Args:
            constituents: ``[..., n_particles, 3]`` (px, py, pz) in GeV, normally the
                training split.
            mask: ``[..., n_particles]``, true for real constituents. Padded ones are ignored.

        Returns:
            This scaler.

        Raises:
            ValueError: The shapes do not match, there are no real constituents, a value is
                NaN or infinite, or a feature has the same value on every real constituent.
        """
        constituents = _to_numpy(constituents).astype(np.float64)
        mask = _to_numpy(mask).astype(bool)
        if constituents.shape[-1:] != (len(FEATURE_NAMES),) or mask.shape != constituents.shape[:-1]:
            raise ValueError(
                f"cannot fit scaler: constituents have shape {constituents.shape} and mask "
                f"{mask.shape}, expected [..., n_particles, 3] and [..., n_particles]"
            )
        particles = constituents[mask]
        if len(particles) == 0:
            raise ValueError("cannot fit scaler: the mask marks no real constituents")
        if not np.isfinite(particles).all():
            raise ValueError("cannot fit scaler: the real constituents contain NaN or infinite values")
        self._set(particles.min(axis=0), particles.max(axis=0))
        return self

    def transform(self, x: np.ndarray | Tensor) -> np.ndarray | Tensor:
        """Map (px, py, pz) in GeV to network space.

        Args:
            x: ``[..., 3]`` numpy array or torch tensor.

        Returns:
            ``(x - minimum) / (maximum - minimum)``, of the same type, floating dtype and
            device as ``x``. For a tensor the result is differentiable with respect to ``x``.
        """
        minimum, maximum, x = self._parameters_like(x)
        return (x - minimum) / (maximum - minimum)

    def inverse_transform(self, x: np.ndarray | Tensor) -> np.ndarray | Tensor:
        """Map network space back to (px, py, pz) in GeV, the inverse of :meth:`transform`."""
        minimum, maximum, x = self._parameters_like(x)
        return x * (maximum - minimum) + minimum

    def state_dict(self) -> dict[str, Any]:
        """Return the fitted parameters as plain Python values (lists of floats and strings),
        which ``torch.load(weights_only=True)`` accepts."""
        minimum, maximum = self._fitted()
        return {
            "feature_names": list(FEATURE_NAMES),
            "unit": "GeV",
            "minimum": [float(value) for value in minimum],
            "maximum": [float(value) for value in maximum],
        }

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> MinMaxScaler:
        """Rebuild a scaler from :meth:`state_dict` output.

        Raises:
            ValueError: A key is missing, or the features or values are invalid.
        """
        missing = [key for key in ("minimum", "maximum") if key not in state]
        if missing:
            raise ValueError(f"scaler state is missing {missing} (found keys {sorted(state)})")
        feature_names = list(state.get("feature_names", FEATURE_NAMES))
        if feature_names != list(FEATURE_NAMES):
            raise ValueError(f"scaler state has features {feature_names}, expected {list(FEATURE_NAMES)}")
        return cls(state["minimum"], state["maximum"])

    def _set(self, minimum: Sequence[float] | None, maximum: Sequence[float] | None) -> None:
        minimum = np.asarray(minimum, dtype=np.float64)
        maximum = np.asarray(maximum, dtype=np.float64)
        expected = (len(FEATURE_NAMES),)
        if minimum.shape != expected or maximum.shape != expected:
            raise ValueError(
                f"scaler minimum and maximum need one value per feature {FEATURE_NAMES}, got "
                f"{minimum.tolist()} and {maximum.tolist()}"
            )
        if not (np.isfinite(minimum).all() and np.isfinite(maximum).all()):
            raise ValueError(
                f"scaler minimum {minimum.tolist()} and maximum {maximum.tolist()} must be finite"
            )
        constant = [name for name, low, high in zip(FEATURE_NAMES, minimum, maximum) if not high > low]
        if constant:
            raise ValueError(
                f"scaler maximum must exceed minimum for every feature, but not for {constant} "
                f"(minimum {minimum.tolist()}, maximum {maximum.tolist()} GeV). The training "
                f"constituents need more than one distinct value of each feature."
            )
        self._minimum, self._maximum = minimum, maximum

    def _fitted(self) -> tuple[np.ndarray, np.ndarray]:
        if self._minimum is None or self._maximum is None:
            raise RuntimeError("MinMaxScaler is not fitted. Call fit() or from_state_dict() first")
        return self._minimum, self._maximum

    def _parameters_like(self, x: np.ndarray | Tensor) -> tuple[Any, Any, np.ndarray | Tensor]:
        """Return minimum and maximum as the type, dtype and device of ``x``, and ``x``
        itself (a numpy array where it was another array-like)."""
        minimum, maximum = self._fitted()
        if isinstance(x, Tensor):
            dtype = x.dtype if x.is_floating_point() else torch.get_default_dtype()
            parameters = [
                torch.as_tensor(value, dtype=dtype, device=x.device) for value in (minimum, maximum)
            ]
        else:
            x = np.asarray(x)
            dtype = x.dtype if np.issubdtype(x.dtype, np.floating) else np.float64
            parameters = [value.astype(dtype) for value in (minimum, maximum)]
        if x.shape[-1:] != (len(FEATURE_NAMES),):
            raise ValueError(
                f"scaler input has shape {tuple(x.shape)}, expected [..., 3] with features (px, py, pz)"
            )
        return parameters[0], parameters[1], x


def _to_numpy(values: np.ndarray | Tensor) -> np.ndarray:
    if isinstance(values, Tensor):
        return values.detach().cpu().numpy()
    return np.asarray(values)
