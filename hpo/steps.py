"""Pipeline steps that run once each: retraining, latent extraction, evaluation and the results.

A worker that finds a step whose inputs are done claims it in ``jethpo_stages``
(``storage.pipeline.claim_stage``), so two workers or controllers never run the same step.
While it runs, the claimer touches the step's row every heartbeat interval. A running step
whose row was not touched for the grace period belongs to a dead process: the next worker
that looks takes it over (``storage.pipeline.reclaim_stage``), and a retraining resumes from
the training state it saved after its last evaluation.

What a step produces goes to the artifact store (``storage.artifacts``), linked from the
family's last study so that optuna-dashboard lists it, and its artifact ids and numbers go
to ``jethpo_outputs`` (``storage.pipeline.set_output``). Files are also written under
``<artifact dir>/results/<pipeline>/`` for people who read them without the dashboard.

- ``retrain:<family>``: retrains the best trial of the family's last search stage with the
  profile's retraining budget and keeps the checkpoint with the lowest validation EMD_sum.
- ``latents:<family>``: the encoder means of the training and validation jets under the
  retrained ConVAE, for the latent flows.
- ``evaluate:<family>``: the metrics of the retrained model on the test split, its
  generation time per jet, and plots of its jets against real jets.
- ``results:<pipeline>``: the truth row and the published rows next to the models, as JSON
  and Markdown, and plots of every model against real jets.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import os
import shutil
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.trial import TrialState

from hpo import pipeline as stages
from hpo.pipeline import StageRecord
from storage import pipeline as stage_table
from storage.artifacts import download_file, open_artifact_store, upload_file
from storage.pipeline import StageState

__all__ = [
    "EVALUATION_BATCH_SIZE",
    "EVALUATION_SEED",
    "StepError",
    "StepRunner",
    "claimable_steps",
    "load_retrained",
    "results_path",
    "step_is_stale",
]

logger = logging.getLogger(__name__)

EVALUATION_SEED = 0
"""Seed of the test-split halves, the generated jets and the metrics of the final evaluation."""

EVALUATION_BATCH_SIZE = 10_000
"""Jets per generator call when the final evaluation times the generation."""

RESULTS_FOLDER = "results"
"""Folder under the artifact directory with one folder of tables and plots per pipeline."""

WORK_FOLDER = "work"
"""Folder under the artifact directory with the checkpoints and training states of running steps."""


_SHIPPED_EVALUATED = ("convae-gen", "latent-nf", "nf")
"""Shipped search spaces whose models the table labels by model name alone."""


class StepError(Exception):
    """A step cannot run with the inputs it finds. The message names the input and the fix."""


def results_path(artifact_dir: str | os.PathLike[str], pipeline: str) -> Path:
    """Return the folder of a pipeline's tables and plots: ``<artifact dir>/results/<pipeline>``."""
    return Path(artifact_dir) / RESULTS_FOLDER / pipeline


def step_is_stale(record: StageRecord, grace_period_s: float, now: datetime.datetime | None = None) -> bool:
    """Return whether a running step's claimer stopped touching it for longer than the grace period."""
    if record.state != StageState.RUNNING or record.updated_at is None:
        return False
    now = now or datetime.datetime.now(datetime.timezone.utc)
    updated = record.updated_at if record.updated_at.tzinfo else record.updated_at.replace(tzinfo=datetime.timezone.utc)
    return (now - updated).total_seconds() > grace_period_s


def claimable_steps(records: Sequence[StageRecord], grace_period_s: float) -> list[StageRecord]:
    """Return the steps that a worker may claim now, most urgent first.

    A step may be claimed when it is pending and every stage it depends on is done, or when
    it is running but its claimer stopped touching it for longer than the grace period.
    """
    states = {record.name: record.state for record in records}
    steps = []
    for record in records:
        if not record.is_step or record.problem is not None:
            continue
        if record.state == StageState.PENDING:
            if all(states.get(parent) == StageState.DONE for parent in record.depends_on):
                steps.append(record)
        elif step_is_stale(record, grace_period_s):
            steps.append(record)
    return sorted(steps, key=lambda record: record.order)


def _atomic_torch_save(value: Any, path: Path) -> None:
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    torch.save(value, partial)
    os.replace(partial, path)


@dataclass
class StepRunner:
    """Runs the steps of one pipeline in this process.

    Attributes:
        storage: Storage of the pipeline.
        owner: Name of this process in ``jethpo_stages.claimed_by``, such as ``host:pid``.
        heartbeat_interval_s: Seconds between touches of a running step's row.
        grace_period_s: Seconds without a touch after which a running step is taken over.
        artifact_dir: Artifact directory to use instead of the one the pipeline registered,
            for a node that mounts it at another path.
        device: Torch device of the models.
        data_loader: Returns the prepared jets (``hpo.objectives.TrialData``) of a stage,
            such as a worker's cache.
    """

    storage: optuna.storages.RDBStorage
    owner: str
    heartbeat_interval_s: float
    grace_period_s: float
    data_loader: Callable[[StageRecord], Any]
    artifact_dir: str | None = None
    device: str = "cpu"

    # claiming

    def claim(self, record: StageRecord) -> bool:
        """Claim a pending step, or take over a stale running one. Return whether it is ours."""
        engine = self.storage.engine
        if record.state == StageState.PENDING:
            return stage_table.claim_stage(engine, record.pipeline, record.name, self.owner)
        if record.state == StageState.RUNNING:
            cutoff = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(seconds=self.grace_period_s)
            return stage_table.reclaim_stage(engine, record.pipeline, record.name, self.owner, cutoff)
        return False

    def run(self, record: StageRecord, records: Sequence[StageRecord]) -> StageState:
        """Run a claimed step, store its output and finish it as done or failed.

        A database outage propagates, leaving the step running: once the outage is over and
        the grace period has passed, a worker takes it over.

        Args:
            record: The claimed step.
            records: Every stage of the step's pipeline, for the outputs of its inputs.

        Returns:
            The step's final state.
        """
        logger.info("Step %s of pipeline %s started by %s", record.name, record.pipeline, self.owner)
        runner = {
            stages.RETRAIN: self._retrain,
            stages.LATENTS: self._latents,
            stages.EVALUATE: self._evaluate,
            stages.RESULTS: self._results,
        }[record.kind]
        engine = self.storage.engine
        try:
            with self._touching(record):
                output = runner(record, records)
        except Exception as error:
            if _is_storage_outage(error):
                raise
            message = f"{type(error).__name__}: {error}"
            logger.warning(
                "Step %s of pipeline %s failed: %s",
                record.name,
                record.pipeline,
                message,
                exc_info=not isinstance(error, StepError),
            )
            stage_table.set_output(engine, record.pipeline, record.name, {"error": message})
            stage_table.finish_stage(engine, record.pipeline, record.name, StageState.FAILED, owner=self.owner)
            return StageState.FAILED

        stage_table.set_output(engine, record.pipeline, record.name, output)
        # everything in the work folder is in the artifact store now, or was a download
        shutil.rmtree(self._work_dir(record), ignore_errors=True)
        main = output.get("checkpoint") or output.get("latents") or output.get("generated") or output.get("document_id")
        stage_table.finish_stage(engine, record.pipeline, record.name, StageState.DONE, checkpoint=main, owner=self.owner)
        logger.info("Step %s of pipeline %s is done", record.name, record.pipeline)
        return StageState.DONE

    @contextmanager
    def _touching(self, record: StageRecord) -> Iterator[None]:
        """Touch the step's row every heartbeat interval while the block runs."""
        stop = threading.Event()

        def touch() -> None:
            while not stop.wait(self.heartbeat_interval_s):
                try:
                    if not stage_table.touch_stage(self.storage.engine, record.pipeline, record.name, self.owner):
                        logger.warning("Step %s of pipeline %s was taken over by another process", record.name, record.pipeline)
                        return
                except Exception as error:  # an outage, after which the next touch may succeed
                    logger.warning("Failed to touch step %s of pipeline %s: %s", record.name, record.pipeline, error)

        thread = threading.Thread(target=touch, name=f"touch {record.name}", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()

    # shared inputs

    def _artifact_dir(self, record: StageRecord) -> Path:
        directory = self.artifact_dir or record.run.get("artifact_dir")
        if not directory:
            raise StepError(
                f"Pipeline {record.pipeline} registered no artifact directory. Run 'jethpo run' again to register it."
            )
        return Path(directory)

    def _work_dir(self, record: StageRecord) -> Path:
        return self._artifact_dir(record) / WORK_FOLDER / record.pipeline / record.name.replace(":", "-")

    def _outputs(self, record: StageRecord) -> dict[str, dict]:
        return stage_table.get_outputs(self.storage.engine, record.pipeline)

    def _upload(self, record: StageRecord, path: Path, study_names: Sequence[str] | None = None) -> str:
        store = open_artifact_store(self._artifact_dir(record))
        ids = [upload_file(store, self.storage, name, path) for name in (study_names or [record.study_name])]
        return ids[0]

    def _download(self, record: StageRecord, artifact_id: str, name: str) -> Path:
        store = open_artifact_store(self._artifact_dir(record))
        return download_file(store, artifact_id, self._work_dir(record) / "inputs" / name)

    def _retrained_checkpoint(self, record: StageRecord, family: str, data: Any) -> dict:
        output = self._outputs(record).get(stages.step_name(stages.RETRAIN, family), {})
        if "checkpoint" not in output:
            raise StepError(
                f"Step {record.name} needs the retrained model of {family}, but retrain:{family} stored none. "
                f"Run 'jethpo retrain {record.study_name}' or 'jethpo run' again."
            )
        from models.checkpoint import load_checkpoint

        path = self._download(record, output["checkpoint"], f"{family}-retrained.pt")
        return load_checkpoint(path, data_fingerprint=data.fingerprint)

    # steps

    def _retrain(self, record: StageRecord, records: Sequence[StageRecord]) -> dict[str, Any]:
        from hpo.evaluate import plot_training_history
        from hpo.objectives import train_params
        from models.checkpoint import save_checkpoint

        data = self.data_loader(record)
        study = optuna.load_study(study_name=record.study_name, storage=self.storage)

        # the best COMPLETE trial of all the family's search stages: an arch stage's best
        # can be worse than the loss stage's best with its fixed architecture
        candidates = []
        for study_name in record.depends_on:
            searched = optuna.load_study(study_name=study_name, storage=self.storage)
            for trial in searched.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
                if trial.value is not None and math.isfinite(trial.value):
                    candidates.append((trial.value, study_name, trial.number, trial))
        if not candidates:
            raise StepError(f"Studies {', '.join(record.depends_on)} have no COMPLETE trial to retrain.")
        _, best_study, _, best = min(candidates, key=lambda item: item[:3])
        params = best.user_attrs.get("params")
        if not params:
            raise StepError(
                f"Best trial {best.number} of study {best_study} has no 'params' user attribute. "
                f"Enqueue its parameters again with 'jethpo enqueue' and rerun."
            )
        seed = int(best.user_attrs.get("seed", 0))
        latent_model, latents = self.latent_inputs(record, data)

        # resume from the training state of an interrupted retraining of the same trial
        work = self._work_dir(record)
        state_path = work / "training-state.pt"
        resume = None
        if state_path.exists():
            import torch

            saved = torch.load(state_path, map_location="cpu", weights_only=True)
            same_trial = saved.get("trial") == best.number and saved.get("study", best_study) == best_study
            if same_trial and saved.get("data_fingerprint") == data.fingerprint:
                resume = saved["training"]
                logger.info(
                    "Resuming the retraining of trial %d of study %s after epoch %s",
                    best.number,
                    best_study,
                    resume.get("epoch"),
                )

        budget = record.retrain
        resumed_after = int(resume.get("epoch") or 0) if resume is not None else 0

        def report_epoch(epoch: int) -> None:
            # the controller's progress view reads it (hpo.progress.read_progress), and the
            # claimer distinguishes it from the progress of an earlier, interrupted claim
            progress = {"epoch": epoch, "epochs": budget.epochs, "resumed_after": resumed_after, "claimed_by": self.owner}
            stage_table.set_output(self.storage.engine, record.pipeline, record.name, {"progress": progress})

        def save_state(state: dict) -> None:
            _atomic_torch_save(
                {"trial": best.number, "study": best_study, "data_fingerprint": data.fingerprint, "training": state},
                state_path,
            )
            report_epoch(int(state.get("epoch") or 0))

        report_epoch(resumed_after)
        logger.info(
            "Retraining trial %d of study %s (validation EMD_sum %.6g) for %d epochs, evaluated every %d",
            best.number,
            best_study,
            best.value,
            budget.epochs,
            budget.eval_every,
        )
        result = train_params(
            record.space,
            params,
            budget,
            data,
            seed=seed,
            latent_model=latent_model,
            latents=latents,
            resume=resume,
            on_state=save_state,
        )
        history = [[int(epoch), float(value)] for epoch, value in result.history]

        # checkpoint
        checkpoint = dict(result.checkpoint)
        checkpoint.update(
            {"params": dict(params), "study": best_study, "trial": best.number, "history": history}
        )
        checkpoint_path = save_checkpoint(checkpoint, work / f"{record.family}-retrained.pt")
        checkpoint_id = self._upload(record, checkpoint_path)

        # EMD_sum against epoch
        plot = results_path(self._artifact_dir(record), record.pipeline) / "plots" / f"emd-sum-{record.family}.png"
        plot_training_history(
            [tuple(item) for item in history], f"Retraining of {best_study} trial {best.number}", plot
        )
        plot_id = self._upload(record, plot)

        study.set_user_attr(
            "retrained",
            {
                "checkpoint": checkpoint_id,
                "study": best_study,
                "trial": best.number,
                "best_epoch": result.best_epoch,
                "emd_sum": result.best_emd_sum,
                "epochs": budget.epochs,
            },
        )
        state_path.unlink(missing_ok=True)
        logger.info(
            "Retrained trial %d of study %s: validation EMD_sum %.6g at epoch %d of %d",
            best.number,
            best_study,
            result.best_emd_sum,
            result.best_epoch,
            budget.epochs,
        )
        return {
            "checkpoint": checkpoint_id,
            "study": best_study,
            "trial": best.number,
            "params": dict(params),
            "seed": seed,
            "best_epoch": result.best_epoch,
            "emd_sum": result.best_emd_sum,
            "epochs": budget.epochs,
            "history": history,
            "seconds": result.seconds,
            "plots": {"history": plot_id},
        }

    def latent_inputs(self, record: StageRecord, data: Any) -> tuple[Any, Any]:
        """Return the retrained ConVAE and the latents a ``realnvp-latent`` space trains on, or Nones."""
        space = record.space
        if space is None or space.model != "realnvp-latent":
            return None, None
        import torch

        from models.checkpoint import convae_from_checkpoint

        source = space.latents_from
        output = self._outputs(record).get(stages.step_name(stages.LATENTS, source), {})
        if "latents" not in output:
            raise StepError(
                f"Search space {space.name} trains on the latents of {source}, but latents:{source} stored none. "
                f"Run 'jethpo run' to finish the retraining of {source} first."
            )
        checkpoint = self._retrained_checkpoint(record, source, data)
        path = self._download(record, output["latents"], f"{source}-latents.pt")
        stored = torch.load(path, map_location="cpu", weights_only=True)
        if stored.get("data_fingerprint") != data.fingerprint:
            raise StepError(
                f"Latents in {path} were made from data fingerprint {str(stored.get('data_fingerprint'))[:12]}, "
                f"but the current data has {data.fingerprint[:12]}. Run 'jethpo run' on the data they came from."
            )
        latents = torch.cat([stored["train"], stored["validation"]]).to(data.device)
        return convae_from_checkpoint(checkpoint).to(data.device), latents

    def _latents(self, record: StageRecord, records: Sequence[StageRecord]) -> dict[str, Any]:
        from hpo.objectives import encode_latents
        from models.checkpoint import convae_from_checkpoint

        data = self.data_loader(record)
        checkpoint = self._retrained_checkpoint(record, record.family, data)
        model = convae_from_checkpoint(checkpoint).to(data.device)
        train = encode_latents(model, data.train).cpu()
        validation = encode_latents(model, data.validation).cpu()
        path = self._work_dir(record) / f"{record.family}-latents.pt"
        retrain_output = self._outputs(record)[stages.step_name(stages.RETRAIN, record.family)]
        _atomic_torch_save(
            {
                "train": train,
                "validation": validation,
                "data_fingerprint": data.fingerprint,
                "checkpoint": retrain_output["checkpoint"],
            },
            path,
        )
        latents_id = self._upload(record, path)
        logger.info(
            "Encoded %d training and %d validation jets into %d latent dimensions with the retrained %s",
            len(train),
            len(validation),
            train.shape[1],
            record.family,
        )
        return {
            "latents": latents_id,
            "checkpoint": retrain_output["checkpoint"],
            "latent_dim": int(train.shape[1]),
            "n_train": len(train),
            "n_validation": len(validation),
        }

    def _evaluate(self, record: StageRecord, records: Sequence[StageRecord]) -> dict[str, Any]:
        from hpo.evaluate import evaluate_sampler, plot_efps, plot_jet_distributions, reference_halves
        from models.checkpoint import sampler_from_checkpoint

        data = self.data_loader(record)
        checkpoint = self._retrained_checkpoint(record, record.family, data)
        sampler = sampler_from_checkpoint(checkpoint, device=data.device)
        test = data.splits.test
        _, reference = reference_halves(test.constituents, test.mask, seed=EVALUATION_SEED)
        # a batch larger than the sample would be reported but never used
        batch_size = min(EVALUATION_BATCH_SIZE, len(reference[0]))
        row, generated = evaluate_sampler(sampler, reference, seed=EVALUATION_SEED, batch_size=batch_size)
        row["family"] = record.family
        row["study"] = record.study_name
        if record.family not in _SHIPPED_EVALUATED:
            # a user's search space gets its own label next to the shipped one of its model
            row["label"] = f"{row['label']}, space {record.family}"

        # generated jets, for the combined plots of the results step
        work = self._work_dir(record)
        jets_path = work / f"{record.family}-generated.npz"
        jets_path.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(jets_path, constituents=generated)
        generated_id = self._upload(record, jets_path)

        # plots of this model against the real test jets
        folder = results_path(self._artifact_dir(record), record.pipeline) / "plots"
        label = row.get("label", row.get("model", record.family))
        plots = {
            "jets": plot_jet_distributions(reference, {label: (generated, None)}, folder / f"jets-{record.family}.png"),
            "efps": plot_efps(reference, {label: (generated, None)}, folder / f"efps-{record.family}.png"),
        }
        plot_ids = {name: self._upload(record, path) for name, path in plots.items()}
        logger.info(
            "Evaluated %s on %d test jets: %s",
            label,
            len(reference[0]),
            ", ".join(f"{key} {row[key]:.4g}" for key in ("w1m", "w1p", "fpnd", "emd_sum") if isinstance(row.get(key), float)),
        )
        return {"row": _json_ready(row), "generated": generated_id, "plots": plot_ids}

    def _results(self, record: StageRecord, records: Sequence[StageRecord]) -> dict[str, Any]:
        from hpo.evaluate import (
            PUBLISHED_ROWS,
            describe_hardware,
            markdown_table,
            plot_efps,
            plot_jet_distributions,
            reference_halves,
            results_document,
            truth_row,
        )

        data = self.data_loader(record)
        outputs = self._outputs(record)
        evaluations = [parent for parent in record.depends_on if parent in outputs and "row" in outputs[parent]]
        rows = [outputs[name]["row"] for name in evaluations]
        test = data.splits.test
        half_a, half_b = reference_halves(test.constituents, test.mask, seed=EVALUATION_SEED)
        rows.append(truth_row(half_a, half_b, seed=EVALUATION_SEED))
        rows.extend(dict(row) for row in PUBLISHED_ROWS)

        # one line per retrained model: which trial, which epoch was kept, which checkpoint
        retrained = {
            name.split(":", 1)[1]: (
                f"trial {output['trial']} of {output['study']}, epoch {output['best_epoch']} of "
                f"{output['epochs']} kept (validation EMD_sum {output['emd_sum']:.4g}), checkpoint {output['checkpoint']}"
            )
            for name, output in sorted(outputs.items())
            if name.startswith(f"{stages.RETRAIN}:") and "checkpoint" in output
        }
        document = results_document(
            [_json_ready(row) for row in rows],
            pipeline={"name": record.pipeline, **retrained},
            data={
                "path": record.run.get("data_path"),
                "n_jets": record.run.get("n_jets"),
                "split_seed": record.run.get("split_seed"),
                "data_fingerprint": data.fingerprint,
                "n_test": len(test),
                "n_reference": len(half_b[0]),
            },
            hardware={**describe_hardware(), "device": data.device},
        )

        folder = results_path(self._artifact_dir(record), record.pipeline)
        folder.mkdir(parents=True, exist_ok=True)
        json_path = folder / "results.json"
        json_path.write_text(json.dumps(document, indent=2, allow_nan=False) + "\n")
        markdown_path = folder / "results.md"
        markdown_path.write_text(markdown_table(document))

        # every model against real jets on one figure
        generated = {}
        for name in evaluations:
            output = outputs[name]
            path = self._download(record, output["generated"], f"{name.replace(':', '-')}.npz")
            with np.load(path) as stored:
                generated[output["row"].get("label", name)] = (stored["constituents"], None)
        plots = {
            "jets": plot_jet_distributions(half_b, generated, folder / "plots" / "jets-all-models.png"),
            "efps": plot_efps(half_b, generated, folder / "plots" / "efps-all-models.png"),
        }

        # link the table and plots from every evaluated study
        study_names = list(dict.fromkeys(outputs[name]["row"].get("study", record.study_name) for name in evaluations))
        study_names = study_names or [record.study_name]
        artifacts = {
            "results.json": self._upload(record, json_path, study_names),
            "results.md": self._upload(record, markdown_path, study_names),
        }
        artifacts.update({name: self._upload(record, path, study_names) for name, path in plots.items()})
        logger.info("Results of pipeline %s written to %s", record.pipeline, folder)
        return {"document": document, "document_id": artifacts["results.json"], "folder": str(folder), "artifacts": artifacts}


def load_retrained(
    storage: optuna.storages.RDBStorage,
    pipeline: str,
    family: str,
) -> str | None:
    """Return the checkpoint artifact id of a family's retrained model in a pipeline, or None."""
    output = stage_table.get_outputs(storage.engine, pipeline).get(stages.step_name(stages.RETRAIN, family), {})
    return output.get("checkpoint")


def _json_ready(value: Any) -> Any:
    """Turn numpy scalars into Python numbers and non-finite floats into None."""
    if isinstance(value, Mapping):
        return {str(key): _json_ready(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(item) for item in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def _is_storage_outage(error: BaseException) -> bool:
    from hpo.workers import _is_outage

    return _is_outage(error)
