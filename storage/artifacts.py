"""Artifact store for checkpoints, latents, plots and result tables, linked from the studies.

Artifacts live in Optuna's ``FileSystemArtifactStore`` under one directory that every Ray
node and optuna-dashboard read at the same path (a shared volume in ``docker compose``).
Each upload is recorded on a study, so optuna-dashboard lists it on that study's page.
"""

from __future__ import annotations

import logging
import os
import tempfile
import uuid
from pathlib import Path

import optuna
from optuna.artifacts import FileSystemArtifactStore, download_artifact, upload_artifact
from optuna.artifacts.exceptions import ArtifactNotFound

__all__ = [
    "ARTIFACTS_ENV_VAR",
    "DEFAULT_ARTIFACTS_FOLDER",
    "ArtifactError",
    "download_file",
    "open_artifact_store",
    "resolve_artifact_dir",
    "upload_file",
]

logger = logging.getLogger(__name__)

ARTIFACTS_ENV_VAR = "JETHPO_ARTIFACTS"
"""Environment variable read when no ``--artifacts`` directory is given."""

DEFAULT_ARTIFACTS_FOLDER = "artifacts"
"""Artifact directory under the data directory, used when none is configured."""


class ArtifactError(OSError):
    """Artifact directory that cannot be used, or an artifact that cannot be read.

    The message names the directory or artifact id and what to do.
    """


def resolve_artifact_dir(path: str | os.PathLike[str] | None, data_dir: str | os.PathLike[str]) -> Path:
    """Pick the artifact directory: the explicit value, else ``JETHPO_ARTIFACTS``, else the default.

    Args:
        path: Value of ``--artifacts``, or None when the option was not given.
        data_dir: Data directory whose ``artifacts`` folder is the default.

    Returns:
        The absolute directory. It is not created here.
    """
    chosen = path or os.environ.get(ARTIFACTS_ENV_VAR) or Path(data_dir) / DEFAULT_ARTIFACTS_FOLDER
    return Path(chosen).expanduser().resolve()


def open_artifact_store(path: str | os.PathLike[str]) -> FileSystemArtifactStore:
    """Create the artifact directory if needed and return Optuna's file-system store on it.

    Args:
        path: The artifact directory.

    Raises:
        ArtifactError: The directory cannot be created or written.
    """
    directory = Path(path)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".write-check-"):
            pass
    except OSError as error:
        raise ArtifactError(
            f"Artifact directory {str(directory)!r} is not writable: {error.strerror or error}. "
            f"Pass a writable directory with --artifacts or {ARTIFACTS_ENV_VAR}."
        ) from None
    return FileSystemArtifactStore(str(directory))


def upload_file(
    store: FileSystemArtifactStore,
    storage: optuna.storages.BaseStorage,
    study_name: str,
    path: str | os.PathLike[str],
) -> str:
    """Copy a file into the artifact store and link it from a study.

    Args:
        store: Store from :func:`open_artifact_store`.
        storage: Storage of the study.
        study_name: Study that lists the artifact in optuna-dashboard.
        path: The file. Its name is the artifact's file name.

    Returns:
        The artifact id.
    """
    study = optuna.load_study(study_name=study_name, storage=storage)
    artifact_id = upload_artifact(artifact_store=store, file_path=str(path), study_or_trial=study)
    logger.debug("Uploaded %s to study %s as artifact %s", path, study_name, artifact_id)
    return artifact_id


def download_file(store: FileSystemArtifactStore, artifact_id: str, destination: str | os.PathLike[str]) -> Path:
    """Copy an artifact out of the store.

    Args:
        store: Store from :func:`open_artifact_store`.
        artifact_id: Id returned by :func:`upload_file`.
        destination: File to write. Its folder is created.

    Raises:
        ArtifactError: The artifact is not in the store, for example because this node
            mounts another artifact directory than the node that wrote it.
    """
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    # a name of its own, because several workers may fetch the same artifact at once
    partial = destination.with_name(f"{destination.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.partial")
    try:
        download_artifact(artifact_store=store, file_path=str(partial), artifact_id=artifact_id)
    except (FileNotFoundError, ArtifactNotFound):
        partial.unlink(missing_ok=True)
        # NOTE: FileSystemArtifactStore has no public accessor for its directory
        base = Path(store._base_path)
        empty_note = ", which is empty" if not base.is_dir() or not any(base.iterdir()) else ""
        raise ArtifactError(
            f"Artifact {artifact_id} is not in the artifact directory {str(base)!r}{empty_note}. Pass the folder "
            f"that holds the pipeline's artifacts with --artifacts, and give every node and the dashboard the same one."
        ) from None
    os.replace(partial, destination)
    return destination
