"""Gluon jets at particle level from Pythia 8 and FastJet, written as a jethpo jets file.

Each run is split into fixed-size chunks. Chunk k is seeded from the user seed and k alone,
so the jets of a chunk do not depend on the number of workers or on the order in which the
chunks finish. Every finished chunk is saved under ``<out>/chunks/``, so an interrupted run
resumes where it stopped, and the final file concatenates the chunks in order.

Physics choices (all of them are also stored in the ``settings`` attribute of the file):

- Process: pp at sqrt(s) = 13 TeV with the two Pythia 8 hard-QCD processes that have two
  gluons in the final state, ``HardQCD:gg2gg`` and ``HardQCD:qqbar2gg``. Default Monash tune
  (``Tune:pp = 14``), with multiparton interactions and hadronization on.
- pT-hat window 900 to 1300 GeV, which centres the jet pT spectrum near 1 TeV. The lower
  edge lies 100 GeV above the jet pT cut. Jets between 800 and 900 GeV therefore come from
  partons that lost pT to radiation outside the cone or to recoil against initial-state
  radiation, and the window, not the cut, sets the spectrum there. The upper edge lies 300 GeV
  below the jet pT maximum, which multiparton interactions and initial-state radiation
  rarely bridge. In 600 events (seed 4242) 12% of the two leading jets fell below 800 GeV
  (115 of those 140 were the second jet), 0.2% rose above 1600 GeV
  and none had |eta| > 2.5. Of the kept jets, 16% lie between 800 and 900 GeV.
- Particles: final-state particles except neutrinos (PDG ids 12, 14, 16), which are the only
  invisible particles in these Standard Model events. They are clustered with anti-kT, R = 0.8,
  E-scheme, using their true masses.
- Jets: the two highest-pT jets of each event, each kept if 800 < pT < 1600 GeV and
  |eta| < 2.5 (pseudorapidity of the anti-kT jet). At leading order both come from a hard
  gluon. The eta cut keeps the jet axis inside the |eta| < 2.5 tracker acceptance of ATLAS
  and CMS, and so the cone inside |eta| < 3.3.
- Constituents: the 30 highest-pT constituents of each kept jet, ordered by decreasing pT and
  zero-padded, stored as massless (px, py, pz) in GeV. ``jet_features`` and the relative
  coordinates are computed from these 30 massless constituents with :mod:`models.jets`, as
  in JetNet. They carry on average 86% of the anti-kT jet pT (1000 jets, seed 1), so
  ``jet_features`` pT and mass are lower than those of the anti-kT jet with all its
  constituents, which is stored in ``clustered_jet_features``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.metadata
import json
import logging
import math
import multiprocessing
import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import awkward as ak
import fastjet
import fastjet._swig
import h5py
import numpy as np
import pythia8mc
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

__all__ = [
    "CHUNK_DIRECTORY",
    "DEFAULT_CHUNK_SIZE",
    "MAX_PYTHIA_SEED",
    "OUTPUT_NAME",
    "PRODUCER",
    "GenerationError",
    "GenerationSettings",
    "generate_jets",
    "pythia_seed",
]

logger = logging.getLogger(__name__)

#: Name of the jets file written into the output directory.
OUTPUT_NAME = "jets.hdf5"

#: Subdirectory of the output directory that contains one file per finished chunk.
CHUNK_DIRECTORY = "chunks"

#: Jets per chunk. A chunk is the unit of work that an interruption loses. On one x86 core a
#: chunk of 1000 jets took 10 to 20 s, of which about 1 s is the Pythia initialization that
#: every chunk repeats.
DEFAULT_CHUNK_SIZE = 1000

#: Largest ``Random:seed`` that Pythia 8.317 accepts (manual page RandomNumberSeed). A negative
#: value selects the default seed and 0 a time-based one, so chunk seeds lie in
#: 1..MAX_PYTHIA_SEED.
MAX_PYTHIA_SEED = 900_000_000

#: Value of the ``producer`` attribute of the jets file.
PRODUCER = "jethpo data generate"

# Events per call to Pythia's nextBatch. A batch takes about 1 s, which is also the interval
# between progress updates from a worker.
_MAX_BATCH_EVENTS = 64

# Version of the chunk file layout, part of the run identity so that a changed layout is
# reported instead of misread.
_CHUNK_FORMAT = 1

# A chunk whose first this many events give no jet stops with an error, because the
# settings cannot produce jets (for example a pT-hat window far below the jet pT cut).
_MAX_EVENTS_WITHOUT_JET = 2000


class GenerationError(ValueError):
    """Invalid request for jet generation, or an output directory that cannot be used."""


@dataclass(frozen=True)
class GenerationSettings:
    """Event generation and jet selection settings.

    Arguments:
        sqrt_s_gev: Centre-of-mass energy of the pp collisions in GeV.
        processes: Pythia 8 process switches that are turned on.
        pthat_min_gev: Lower edge of the hard-process pT window (``PhaseSpace:pTHatMin``).
        pthat_max_gev: Upper edge of the hard-process pT window (``PhaseSpace:pTHatMax``).
        tune: Value of ``Tune:pp``. 14 is the Monash 2013 tune, the default of Pythia 8.317.
        jet_radius: Anti-kT distance parameter R.
        jet_pt_min_gev: A kept jet has pT above this value.
        jet_pt_max_gev: A kept jet has pT below this value.
        jet_abs_eta_max: A kept jet has a pseudorapidity |eta| below this value.
        jets_per_event: Number of highest-pT jets of an event that are tested against the cuts.
        n_particles: Constituents kept per jet.

    Example:
        >>> GenerationSettings(pthat_min_gev=1000.0).pythia_settings(seed=7)[-1]
        'Random:seed = 7'
    """

    sqrt_s_gev: float = 13000.0
    processes: tuple[str, ...] = ("HardQCD:gg2gg", "HardQCD:qqbar2gg")
    pthat_min_gev: float = 900.0
    pthat_max_gev: float = 1300.0
    tune: int = 14
    jet_radius: float = 0.8
    jet_pt_min_gev: float = 800.0
    jet_pt_max_gev: float = 1600.0
    jet_abs_eta_max: float = 2.5
    jets_per_event: int = 2
    n_particles: int = 30

    def __post_init__(self) -> None:
        if not 0 < self.pthat_min_gev < self.pthat_max_gev:
            raise GenerationError(
                f"invalid pT-hat window [{self.pthat_min_gev}, {self.pthat_max_gev}] GeV: "
                "the minimum must be positive and below the maximum"
            )
        if not 0 < self.jet_pt_min_gev < self.jet_pt_max_gev:
            raise GenerationError(
                f"invalid jet pT window ({self.jet_pt_min_gev}, {self.jet_pt_max_gev}) GeV: "
                "the minimum must be positive and below the maximum"
            )
        if self.jet_radius <= 0 or self.jet_abs_eta_max <= 0:
            raise GenerationError(
                f"jet_radius ({self.jet_radius}) and jet_abs_eta_max ({self.jet_abs_eta_max}) must be positive"
            )
        if self.jets_per_event < 1 or self.n_particles < 1:
            raise GenerationError(
                f"jets_per_event ({self.jets_per_event}) and n_particles ({self.n_particles}) must be at least 1"
            )
        if not self.processes:
            raise GenerationError("processes is empty. Turn on at least one Pythia process.")

    def pythia_settings(self, seed: int) -> list[str]:
        """Build every Pythia setting string for one chunk, ending with its ``Random:seed``."""
        return [
            f"Beams:eCM = {self.sqrt_s_gev}",
            *(f"{process} = on" for process in self.processes),
            f"PhaseSpace:pTHatMin = {self.pthat_min_gev}",
            f"PhaseSpace:pTHatMax = {self.pthat_max_gev}",
            f"Tune:pp = {self.tune}",
            "PartonLevel:MPI = on",
            "HadronLevel:all = on",
            "Print:quiet = on",
            "Next:numberCount = 0",
            "Random:setSeed = on",
            f"Random:seed = {seed}",
        ]

    def to_dict(self) -> dict:
        """Describe the settings, the selection and the Pythia strings as JSON-ready values."""
        description = asdict(self)
        description["processes"] = list(self.processes)
        description["pythia_settings"] = self.pythia_settings(seed=0)[:-1] + [
            "Random:seed = <chunk seed, see random_seed_rule>"
        ]
        description["random_seed_rule"] = (
            f"1 + (first 8 bytes of sha256('<seed>:<chunk index>') as a big-endian integer) mod {MAX_PYTHIA_SEED}"
        )
        description["particle_selection"] = "final state, neutrinos (|PDG id| 12, 14, 16) excluded"
        description["jet_algorithm"] = "anti-kt, E-scheme, FastJet"
        description["jet_selection"] = (
            f"the {self.jets_per_event} highest-pT jets of each event, each kept if "
            f"{self.jet_pt_min_gev} < pT < {self.jet_pt_max_gev} GeV and |eta| < {self.jet_abs_eta_max}"
        )
        description["constituents"] = (
            f"the {self.n_particles} highest-pT constituents of each jet, by decreasing pT, zero-padded, "
            "stored as massless (px, py, pz) in GeV"
        )
        return description


def pythia_seed(seed: int, chunk_index: int) -> int:
    """Derive the Pythia ``Random:seed`` of one chunk from the user seed.

    Args:
        seed: The run's seed.
        chunk_index: Index of the chunk, starting at 0.

    Returns:
        An integer in 1..:data:`MAX_PYTHIA_SEED`, taken from a SHA-256 hash, so two chunks
        get the same seed with probability 1 / MAX_PYTHIA_SEED per pair.
    """
    digest = hashlib.sha256(f"{seed}:{chunk_index}".encode()).digest()
    return 1 + int.from_bytes(digest[:8], "big") % MAX_PYTHIA_SEED


# ---------------------------------------------------------------------------
# One chunk: Pythia events -> anti-kT jets -> selected jets
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _ChunkTask:
    settings: GenerationSettings
    seed: int
    chunk_index: int
    n_jets: int


@dataclass
class _Chunk:
    """Jets of one chunk, in the order in which they were generated.

    Attributes:
        constituents: float32 ``[n_jets, n_particles, 3]`` (px, py, pz) in GeV.
        mask: bool ``[n_jets, n_particles]``, true for real constituents.
        clustered: float32 ``[n_jets, 4]`` (pt GeV, eta, phi, mass GeV) of the anti-kT jet
            with all its constituents.
        event_index: int64 ``[n_jets]``, position of each jet's event among the events of
            the chunk, starting at 0.
    """

    chunk_index: int
    pythia_seed: int
    constituents: np.ndarray
    mask: np.ndarray
    clustered: np.ndarray
    event_index: np.ndarray


def _silence_fastjet_banner() -> None:
    # FastJet prints its banner to stdout on the first clustering, which would mix with the
    # command's output. The scikit-hep bindings (fastjet 3.5.2) expose the switch only on
    # the SWIG class.
    fastjet._swig.ClusterSequence.set_fastjet_banner_stream(None)


def _make_pythia(settings: GenerationSettings, seed: int) -> pythia8mc.Pythia:
    pythia = pythia8mc.Pythia("", False)
    for setting in settings.pythia_settings(seed):
        if not pythia.readString(setting):
            raise RuntimeError(f"Pythia rejected the setting {setting!r}")
    if not pythia.init():
        raise RuntimeError(f"Pythia initialization failed with Random:seed = {seed}")
    return pythia


def _select_jets(
    events: ak.Array, settings: GenerationSettings, jet_definition: fastjet.JetDefinition
) -> Iterator[tuple[int, np.ndarray, int, np.ndarray]]:
    """Cluster a batch of Pythia events and yield the jets that pass the cuts.

    Yields:
        One tuple per kept jet, in event order and by decreasing pT within an event:

        - index of the event in the batch,
        - constituents, float64 ``[n_particles, 3]`` (px, py, pz) in GeV, zero-padded,
        - number of real constituents,
        - the anti-kT jet's (pt GeV, eta, phi, mass GeV) as a float64 ``[4]`` array.
    """
    # visible final-state particles
    particles = events.prt
    absolute_id = abs(particles.id)
    is_neutrino = (absolute_id == 12) | (absolute_id == 14) | (absolute_id == 16)
    visible = particles[(particles.status > 0) & ~is_neutrino]
    momenta = ak.zip(
        {"px": visible.p.px, "py": visible.p.py, "pz": visible.p.pz, "E": visible.p.e},
        with_name="Momentum4D",
    )

    # anti-kT jets above the pT cut and the particle indices of their constituents
    sequence = fastjet.ClusterSequence(momenta, jet_definition)
    jets = sequence.inclusive_jets(settings.jet_pt_min_gev)
    members = sequence.constituent_index(settings.jet_pt_min_gev)

    # flat numpy views, so the loops below do no awkward indexing
    particle_momenta = np.stack([ak.to_numpy(ak.flatten(momenta[name])) for name in ("px", "py", "pz")], axis=-1)
    particle_offsets = np.concatenate([[0], np.cumsum(ak.to_numpy(ak.num(momenta)))])
    jet_momenta = np.stack([ak.to_numpy(ak.flatten(jets[name])) for name in ("px", "py", "pz", "E")], axis=-1)
    jet_offsets = np.concatenate([[0], np.cumsum(ak.to_numpy(ak.num(jets)))])
    member_indices = ak.to_numpy(ak.flatten(members, axis=None))
    member_offsets = np.concatenate([[0], np.cumsum(ak.to_numpy(ak.flatten(ak.num(members, axis=2))))])

    jet_px, jet_py, jet_pz, jet_energy = jet_momenta.T
    jet_pt = np.hypot(jet_px, jet_py)
    jet_eta = np.arcsinh(np.divide(jet_pz, jet_pt, out=np.zeros_like(jet_pz), where=jet_pt > 0))
    jet_phi = np.arctan2(jet_py, jet_px)
    jet_mass = np.sqrt(np.maximum(jet_energy**2 - jet_px**2 - jet_py**2 - jet_pz**2, 0.0))

    for event in range(len(events)):
        first_jet, end_jet = jet_offsets[event], jet_offsets[event + 1]
        leading = first_jet + np.argsort(-jet_pt[first_jet:end_jet], kind="stable")[: settings.jets_per_event]
        for jet in leading:
            passes = (
                settings.jet_pt_min_gev < jet_pt[jet] < settings.jet_pt_max_gev
                and abs(jet_eta[jet]) < settings.jet_abs_eta_max
            )
            if not passes:
                continue

            # the n_particles highest-pT constituents, zero-padded
            indices = particle_offsets[event] + member_indices[member_offsets[jet] : member_offsets[jet + 1]]
            constituent_momenta = particle_momenta[indices]
            constituent_pt = np.hypot(constituent_momenta[:, 0], constituent_momenta[:, 1])
            order = np.argsort(-constituent_pt, kind="stable")[: settings.n_particles]
            padded = np.zeros((settings.n_particles, 3))
            padded[: len(order)] = constituent_momenta[order]

            clustered = np.array([jet_pt[jet], jet_eta[jet], jet_phi[jet], jet_mass[jet]])
            yield event, padded, len(order), clustered


def _generate_chunk(task: _ChunkTask, report: Callable[[int], None]) -> _Chunk:
    """Generate the first ``task.n_jets`` jets of one chunk, calling ``report`` with each
    batch's number of new jets."""
    _silence_fastjet_banner()
    seed = pythia_seed(task.seed, task.chunk_index)
    pythia = _make_pythia(task.settings, seed)
    jet_definition = fastjet.JetDefinition(fastjet.antikt_algorithm, task.settings.jet_radius)

    constituents, counts, clustered, event_index = [], [], [], []
    n_events = 0
    while len(constituents) < task.n_jets:
        # The jets of a chunk form one sequence, so the batch size changes only how many
        # surplus events are generated after the last kept jet, never which jets are kept.
        missing = task.n_jets - len(constituents)
        events = pythia.nextBatch(min(_MAX_BATCH_EVENTS, missing), "skip")
        new_jets = 0
        for event, jet_constituents, count, jet in _select_jets(events, task.settings, jet_definition):
            if len(constituents) == task.n_jets:
                break
            constituents.append(jet_constituents)
            counts.append(count)
            clustered.append(jet)
            event_index.append(n_events + event)
            new_jets += 1
        n_events += len(events)
        report(new_jets)

        if not constituents and n_events >= _MAX_EVENTS_WITHOUT_JET:
            raise RuntimeError(
                f"no jet passed the cuts in the first {n_events} events of chunk {task.chunk_index}. "
                f"Check that the pT-hat window [{task.settings.pthat_min_gev}, {task.settings.pthat_max_gev}] GeV "
                f"can produce jets with {task.settings.jet_pt_min_gev} < pT < {task.settings.jet_pt_max_gev} GeV "
                f"and |eta| < {task.settings.jet_abs_eta_max}."
            )

    counts = np.asarray(counts)
    return _Chunk(
        chunk_index=task.chunk_index,
        pythia_seed=seed,
        constituents=np.asarray(constituents, dtype=np.float32),
        mask=np.arange(task.settings.n_particles)[None, :] < counts[:, None],
        clustered=np.asarray(clustered, dtype=np.float32),
        event_index=np.asarray(event_index, dtype=np.int64),
    )


# ---------------------------------------------------------------------------
# Chunk files
# ---------------------------------------------------------------------------


def _versions() -> dict[str, str]:
    def version(distribution: str) -> str:
        try:
            return importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            return "unknown"

    # jethpo's version is read from the installed distribution rather than from hpo, because
    # models must not import hpo.
    return {
        "jethpo_version": version("jethpo"),
        "pythia_version": version("pythia8mc"),
        "fastjet_version": version("fastjet"),
    }


def _run_identity(settings: GenerationSettings, seed: int, chunk_size: int) -> dict:
    """Values that must match for a chunk file to be reused: anything that changes its jets."""
    versions = _versions()
    identity = {
        "chunk_format": _CHUNK_FORMAT,
        "seed": seed,
        "chunk_size": chunk_size,
        "settings": settings.to_dict(),
        "pythia_version": versions["pythia_version"],
        "fastjet_version": versions["fastjet_version"],
    }
    # in the form it has after reading it back from a chunk file
    return json.loads(json.dumps(identity))


def _chunk_path(chunk_directory: Path, chunk_index: int) -> Path:
    return chunk_directory / f"chunk-{chunk_index:06d}.hdf5"


def _write_atomically(path: Path, write: Callable[[h5py.File], None]) -> None:
    """Write an HDF5 file under a temporary name and rename it, so ``path`` is either
    missing or complete, even if the process is killed."""
    temporary = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with h5py.File(temporary, "w") as file:
            write(file)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _write_chunk(path: Path, chunk: _Chunk, identity: dict) -> None:
    def write(file: h5py.File) -> None:
        file.create_dataset("constituents", data=chunk.constituents)
        file.create_dataset("mask", data=chunk.mask)
        file.create_dataset("clustered_jet_features", data=chunk.clustered)
        file.create_dataset("event_index", data=chunk.event_index)
        file.attrs["identity"] = json.dumps(identity, sort_keys=True)
        file.attrs["chunk_index"] = chunk.chunk_index
        file.attrs["pythia_seed"] = chunk.pythia_seed

    _write_atomically(path, write)


def _read_chunk(path: Path) -> _Chunk:
    with h5py.File(path, "r") as file:
        return _Chunk(
            chunk_index=int(file.attrs["chunk_index"]),
            pythia_seed=int(file.attrs["pythia_seed"]),
            constituents=file["constituents"][()],
            mask=file["mask"][()],
            clustered=file["clustered_jet_features"][()],
            event_index=file["event_index"][()],
        )


def _finished_jets(path: Path, identity: dict) -> int:
    """Count the jets in an existing chunk file, or return 0 when there is none or it is
    unreadable.

    Raises:
        GenerationError: The chunk was made by a run with another seed, chunk size, settings
            or generator version, so reusing it would mix two different samples.
    """
    if not path.exists():
        return 0
    try:
        with h5py.File(path, "r") as file:
            recorded = json.loads(file.attrs["identity"])
            n_jets = len(file["constituents"])
    except (OSError, KeyError, ValueError) as error:
        logger.warning("chunk file %s is unreadable (%s), so it is generated again", path, error)
        return 0

    if recorded != identity:
        differences = ", ".join(
            f"{key} {recorded.get(key)!r} instead of {identity[key]!r}"
            for key in identity
            if recorded.get(key) != identity[key]
        )
        raise GenerationError(
            f"chunk file {path} belongs to another run ({differences}). "
            f"Use another --out directory, or delete {path.parent} to start over."
        )
    return n_jets


@contextlib.contextmanager
def _locked(chunk_directory: Path) -> Iterator[None]:
    """Hold an exclusive lock on the chunk directory, so two runs never write to it at once."""
    with open(chunk_directory / ".lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise GenerationError(
                f"another jethpo data generate process is writing to {chunk_directory}. "
                "Wait for it to finish or use another --out directory."
            ) from None
        yield


# ---------------------------------------------------------------------------
# The jets file
# ---------------------------------------------------------------------------


def _write_jets_file(path: Path, chunk_paths: Sequence[Path], n_jets: int, seed: int, identity: dict) -> None:
    """Concatenate the first ``n_jets`` jets of the chunks, in order, into the jets file."""
    # Imported here so that the worker processes, which never write this file, do not load
    # torch (about 2 s per process).
    from models.jets import jet_kinematics_numpy, relative_coordinates

    settings = identity["settings"]
    n_particles = settings["n_particles"]

    def write(file: h5py.File) -> None:
        particle_features = file.create_dataset("particle_features", (n_jets, n_particles, 4), dtype=np.float32)
        particle_features.attrs["features"] = "etarel,phirel,ptrel,mask"
        jet_features = file.create_dataset("jet_features", (n_jets, 4), dtype=np.float32)
        jet_features.attrs["features"] = "pt,eta,mass,num_particles"
        jet_features.attrs["unit"] = "GeV for pt and mass"
        constituents = file.create_dataset("constituents", (n_jets, n_particles, 3), dtype=np.float32)
        constituents.attrs["features"] = "px,py,pz"
        constituents.attrs["unit"] = "GeV"
        clustered = file.create_dataset("clustered_jet_features", (n_jets, 4), dtype=np.float32)
        clustered.attrs["features"] = "pt,eta,phi,mass"
        clustered.attrs["unit"] = "GeV for pt and mass"
        clustered.attrs["description"] = "anti-kT jet with all its constituents, before keeping 30"

        start = 0
        chunk_seeds, n_events = [], 0
        for chunk_path in chunk_paths:
            chunk = _read_chunk(chunk_path)
            count = min(len(chunk.constituents), n_jets - start)
            block = slice(start, start + count)
            jets, mask = chunk.constituents[:count], chunk.mask[:count]

            # jet quantities from the kept, massless constituents, as the readers compute them
            kinematics = jet_kinematics_numpy(jets)
            relative = relative_coordinates(jets, mask)
            particle_features[block] = np.concatenate([relative, mask[..., None]], axis=-1)
            jet_features[block] = np.stack(
                [kinematics["pt"], kinematics["eta"], kinematics["mass"], mask.sum(axis=1)], axis=-1
            )
            constituents[block] = jets
            clustered[block] = chunk.clustered[:count]

            chunk_seeds.append(chunk.pythia_seed)
            n_events += int(chunk.event_index[count - 1]) + 1
            start += count

        file.attrs["producer"] = PRODUCER
        for key, value in _versions().items():
            file.attrs[key] = value
        file.attrs["seed"] = seed
        file.attrs["n_jets"] = n_jets
        file.attrs["settings"] = json.dumps(
            {
                **settings,
                "chunk_size": identity["chunk_size"],
                "chunk_pythia_seeds": chunk_seeds,
                "n_events": n_events,
            },
            sort_keys=True,
        )

    _write_atomically(path, write)


# ---------------------------------------------------------------------------
# Running the chunks in worker processes
# ---------------------------------------------------------------------------

_progress_queue: multiprocessing.Queue | None = None


@contextlib.contextmanager
def _sigint_ignored() -> Iterator[None]:
    """Ignore Ctrl-C while starting worker processes. They inherit the ignored SIGINT, so a
    Ctrl-C reaches only the parent, which then stops the workers itself."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _initialize_worker(progress_queue: multiprocessing.Queue) -> None:
    # Repeated here in case the start method did not pass on the ignored SIGINT.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    global _progress_queue
    _progress_queue = progress_queue


def _run_in_worker(task: _ChunkTask) -> _Chunk:
    return _generate_chunk(task, report=_progress_queue.put)


def _drain(progress_queue: multiprocessing.Queue, report: Callable[[int], None], timeout_s: float) -> None:
    try:
        report(progress_queue.get(timeout=timeout_s))
        while True:
            report(progress_queue.get_nowait())
    except queue.Empty:
        pass


def _run_tasks(
    tasks: Sequence[_ChunkTask], workers: int, report: Callable[[int], None], save: Callable[[_Chunk], None]
) -> None:
    """Generate every chunk and pass each to ``save`` as soon as it is done, in any order."""
    if workers == 1:
        for task in tasks:
            save(_generate_chunk(task, report))
        return

    # Each worker builds its own Pythia, because Pythia objects cannot be pickled. Spawn
    # rather than fork, because a forked child can deadlock on locks held by threads of the
    # parent, and torch starts such threads.
    context = multiprocessing.get_context("spawn")
    progress_queue = context.Queue()
    with _sigint_ignored():
        pool = context.Pool(workers, initializer=_initialize_worker, initargs=(progress_queue,))
    try:
        pending = [pool.apply_async(_run_in_worker, (task,)) for task in tasks]
        while pending:
            _drain(progress_queue, report, timeout_s=0.2)
            unfinished = []
            for result in pending:
                if result.ready():
                    save(result.get())
                else:
                    unfinished.append(result)
            pending = unfinished
        pool.close()
    except BaseException:
        pool.terminate()
        raise
    finally:
        pool.join()
        _drain(progress_queue, report, timeout_s=0.0)


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Treat SIGTERM like Ctrl-C while generating, so ``kill`` also stops the workers and
    keeps the finished chunks. Only the main thread can install signal handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _progress_bar(enabled: bool, total: int, completed: int) -> Iterator[Callable[[int], None]]:
    if not enabled:
        yield lambda n_jets: None
        return

    columns = (
        TextColumn("generating jets"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=Console(stderr=True), transient=True) as progress:
        bar = progress.add_task("jets", total=total, completed=completed)
        yield lambda n_jets: progress.advance(bar, n_jets)


def _default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _warn_replaced(output: Path, n_jets: int) -> None:
    """Warn when ``output`` contains another number of jets, because the new file replaces it."""
    try:
        with h5py.File(output, "r") as file:
            previous = int(file.attrs["n_jets"])
    except (OSError, KeyError, TypeError, ValueError):
        return
    if previous != n_jets:
        logger.warning(
            "replacing %s, which held %d jets, with %d jets. A pipeline registered on the old file "
            "rejects the new one. Run again with --jets %d to write the old file back from the kept chunks.",
            output, previous, n_jets, previous,
        )


def generate_jets(
    n_jets: int,
    out_dir: str | os.PathLike,
    seed: int = 0,
    workers: int | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    settings: GenerationSettings | None = None,
    progress: bool | None = None,
) -> Path:
    """Generate gluon jets with Pythia 8 and FastJet and write them to ``out_dir/jets.hdf5``.

    The file contains these float32 datasets:

    - ``particle_features`` ``[n_jets, 30, 4]``: etarel, phirel, ptrel, mask.
    - ``jet_features`` ``[n_jets, 4]``: pt GeV, eta, mass GeV, num_particles, computed from
      the 30 kept massless constituents.
    - ``constituents`` ``[n_jets, 30, 3]``: px, py, pz in GeV.
    - ``clustered_jet_features`` ``[n_jets, 4]``: pt GeV, eta, phi, mass GeV of the anti-kT
      jet with all its constituents.

    Its attributes are ``producer``, ``jethpo_version``, ``pythia_version``,
    ``fastjet_version``, ``seed``, ``n_jets`` and ``settings`` (JSON with every Pythia
    setting and every cut).

    Chunk files under ``out_dir/chunks/`` that an earlier run with the same seed, chunk
    size, settings and generator versions left there are reused, so an interrupted run
    resumes. The same ``n_jets``, ``seed`` and ``chunk_size`` give identical arrays for any
    number of workers, and a smaller ``n_jets`` gives a prefix of a larger one.

    Args:
        n_jets: Number of jets to write, at least 1.
        out_dir: Output directory, created if missing.
        seed: Seed of the run. Chunk k runs Pythia with ``Random:seed = pythia_seed(seed, k)``.
        workers: Worker processes, at least 1. Defaults to the number of usable CPU cores.
        chunk_size: Jets per chunk. It changes which jets a seed gives.
        settings: Generation settings; defaults to :class:`GenerationSettings`.
        progress: Show a progress bar on stderr. Defaults to whether stderr is a terminal.

    Returns:
        Path of the jets file.

    Raises:
        GenerationError: An argument is invalid, ``out_dir`` is a file, another run is writing
            to it, or it contains chunks of another run.
        KeyboardInterrupt: Ctrl-C or SIGTERM. The finished chunks are kept.
    """
    # input validation
    if n_jets < 1:
        raise GenerationError(f"the number of jets must be at least 1, got {n_jets}")
    if workers is not None and workers < 1:
        raise GenerationError(f"the number of workers must be at least 1, got {workers}")
    if chunk_size < 1:
        raise GenerationError(f"the chunk size must be at least 1, got {chunk_size}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise GenerationError(f"output directory {out_dir} is a file. Pass a directory.")
    settings = settings or GenerationSettings()
    workers = workers or _default_workers()
    progress = sys.stderr.isatty() if progress is None else progress

    chunk_directory = out_dir / CHUNK_DIRECTORY
    try:
        chunk_directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise GenerationError(f"failed to create output directory {chunk_directory}: {error.strerror}") from error

    identity = _run_identity(settings, seed, chunk_size)
    n_chunks = math.ceil(n_jets / chunk_size)
    chunk_paths = [_chunk_path(chunk_directory, index) for index in range(n_chunks)]
    jets_in_chunk = [min(chunk_size, n_jets - index * chunk_size) for index in range(n_chunks)]

    with _locked(chunk_directory), _sigterm_as_interrupt():
        # temporary files left by a killed run
        for temporary in chunk_directory.glob("*.tmp-*"):
            temporary.unlink()

        # Chunks still to make. A chunk file with fewer jets than now needed is made again
        # from the start, which reproduces its first jets.
        tasks = []
        for index, (path, needed) in enumerate(zip(chunk_paths, jets_in_chunk)):
            if _finished_jets(path, identity) < needed:
                tasks.append(_ChunkTask(settings, seed, index, needed))
        n_missing = sum(task.n_jets for task in tasks)
        workers = min(workers, max(len(tasks), 1))
        logger.info(
            "generating %d jets (seed %d) in %s: %d of %d chunks of up to %d jets to make, %d workers",
            n_jets, seed, out_dir, len(tasks), n_chunks, chunk_size, workers,
        )

        def save(chunk: _Chunk) -> None:
            _write_chunk(chunk_paths[chunk.chunk_index], chunk, identity)
            logger.debug(
                "chunk %d done: %d jets from %d events",
                chunk.chunk_index, len(chunk.constituents), chunk.event_index[-1] + 1,
            )

        start = time.perf_counter()
        with _progress_bar(progress, total=n_jets, completed=n_jets - n_missing) as report:
            try:
                _run_tasks(tasks, workers, report, save)
            except KeyboardInterrupt:
                n_finished = sum(path.exists() for path in chunk_paths)
                logger.warning(
                    "interrupted with %d of %d chunks finished in %s. Run the same command again to resume.",
                    n_finished, n_chunks, chunk_directory,
                )
                raise
        elapsed = time.perf_counter() - start

        output = out_dir / OUTPUT_NAME
        _warn_replaced(output, n_jets)
        _write_jets_file(output, chunk_paths, n_jets, seed, identity)

    if n_missing:
        logger.info(
            "wrote %d jets to %s after generating %d jets in %.1f s (%.1f jets/s)",
            n_jets, output, n_missing, elapsed, n_missing / elapsed,
        )
    else:
        logger.info("wrote %d jets to %s from finished chunks", n_jets, output)
    return output
