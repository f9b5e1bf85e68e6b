"""Studies of the search spaces on real PostgreSQL databases and SQLite files.

Trials are written with ``optuna.trial.create_trial`` and carry the user attributes that
``hpo.objectives.run_trial`` records, so these tests do not train networks, except
``test_smoke_loss_then_arch``.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from hpo.spaces import ProfileError, SpaceError, builtin_spaces, load_profile, parse_space, study_name
from hpo.studies import (
    StudyError,
    add_space,
    best_trial_summary,
    enqueue,
    find_stage,
    inherited_params,
    load_spaces,
    load_study,
    open_study,
    study_summaries,
)
from storage import open_storage
from storage import pipeline

pytestmark = [
    pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning"),
    pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used"),
]

optuna.logging.set_verbosity(optuna.logging.WARNING)

#: Mean jet pT over mean jet mass of made-up training jets, the centre of the gamma_m range.
PT_OVER_MASS = 12.0

#: A two-stage ConVAE space in the shape of convae-gen, with its name left open.
TINY_SPACE = """\
name: {name}
model: convae
objective: generation
sampler: {{type: tpe, seed: 3, n_startup_trials: 2}}
pruner: {{type: median, n_startup_trials: 1}}
stages:
  - name: loss
    params:
      lr: {{type: float, low: 1.0e-4, high: 1.0e-2, log: true}}
      alpha: {{type: float, low: 0.1, high: 1.0}}
      beta: {{type: float, low: 0.9, high: 1.0, log: true}}
      gamma: {{type: float, low: 0.1, high: 1.0, step: 0.1}}
      gamma_pt: {{type: float, low: 0.8, high: 1.2}}
      gamma_m: {{type: float, from_data: pt_over_mass, spread: 0.2}}
    fixed: {{latent_dim: 10, n_filters: 5, kernel_size: 3, linear_nodes: 50, n_conv_layers: 1, activation: ReLU}}
  - name: arch
    inherits: loss
    params:
      latent_dim: {{type: int, low: 5, high: 20, step: 5}}
      n_filters: {{type: int, low: 5, high: 10, step: 5}}
      kernel_size: {{type: int, low: 1, high: 3}}
      linear_nodes: {{type: int, low: 50, high: 100, step: 50}}
      n_conv_layers: {{type: int, low: 1, high: 2}}
      activation: {{type: categorical, choices: [ReLU, GELU]}}
"""


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def tiny_space(name: str | None = None, text: str = TINY_SPACE):
    name = name or unique("tiny")
    return parse_space(text.format(name=name), f"{name}.yaml")


def write_space(folder: Path, name: str, text: str = TINY_SPACE) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(text.format(name=name), encoding="utf-8")
    return path


def latent_space_text(name: str, latents_from: str) -> str:
    """The shipped latent-nf space under another name, with another latents_from."""
    text = builtin_spaces()["latent-nf"].text
    return text.replace("name: latent-nf", f"name: {name}").replace("latents_from: convae-rec", f"latents_from: {latents_from}")


@pytest.fixture(params=["sqlite", "postgresql"])
def any_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A new SQLite file, or the PostgreSQL database shared by the session's tests."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'jethpo.db'}"
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def storage(any_url: str):
    """Storage for tests that use studies and search spaces of unique names only."""
    return open_storage(any_url)


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_storage(request: pytest.FixtureRequest, tmp_path: Path):
    """Storage without studies or stored search spaces, for tests of the shipped studies."""
    if request.param == "sqlite":
        return open_storage(f"sqlite:///{tmp_path / 'jethpo.db'}")
    return open_storage(request.getfixturevalue("fresh_postgres_url"))


def loss_params(lr: float) -> dict:
    """Tuned values of a convae loss stage, inside TINY_SPACE and convae-gen."""
    return {"lr": lr, "alpha": 0.5, "beta": 0.95, "gamma": 0.5, "gamma_pt": 1.0, "gamma_m": PT_OVER_MASS}


def add_trial(study, stage, tuned: dict, *, value=None, state=TrialState.COMPLETE, inherited=None, fail_reason=None):
    """Add a finished trial with the user attributes that run_trial records."""
    distributions = stage.distributions({"pt_over_mass": PT_OVER_MASS})
    user_attrs = {
        "params": {**(inherited or {}), **stage.fixed, **tuned},
        "seed": 1234,
        "data_fingerprint": "f" * 64,
        "device": "cpu",
        "wall_time_s": 1.5,
    }
    if fail_reason is not None:
        user_attrs.update(fail_reason=fail_reason, fail_message=f"made-up {fail_reason}")
    trial = optuna.trial.create_trial(
        params=tuned,
        distributions={name: distributions[name] for name in tuned},
        value=value,
        state=state,
        user_attrs=user_attrs,
    )
    study.add_trial(trial)


# open_study


def test_open_study_records_attrs(storage):
    space = tiny_space()
    profile = load_profile("smoke")

    study = open_study(storage, space, "loss", profile=profile)

    assert study.study_name == study_name(space, "loss")
    assert study.direction == optuna.study.StudyDirection.MINIMIZE
    assert isinstance(study.sampler, optuna.samplers.TPESampler)
    assert isinstance(study.pruner, optuna.pruners.MedianPruner)
    attrs = study.user_attrs
    assert attrs["family"] == space.name
    assert attrs["stage"] == "loss"
    assert attrs["model"] == "convae"
    assert attrs["objective"] == "generation"
    assert attrs["space_fingerprint"] == space.fingerprint
    assert attrs["profile"] == "smoke"
    assert attrs["n_trials"] == profile.search_budget(space, "loss").n_trials
    assert attrs["epochs"] == profile.search_budget(space, "loss").epochs


def test_open_study_twice_loads_same_study(storage):
    space = tiny_space()
    first = open_study(storage, space, "loss", profile=load_profile("smoke"))
    add_trial(first, space.stage("loss"), loss_params(1e-3), value=0.5)

    second = open_study(storage, space, space.stage("loss"), sampler_index=1)

    assert second._study_id == first._study_id
    assert len(second.trials) == 1
    assert second.user_attrs["profile"] == "smoke"
    assert optuna.get_all_study_names(storage).count(second.study_name) == 1


def test_open_study_without_profile_has_no_budget(storage):
    study = open_study(storage, tiny_space(), "arch")

    assert "n_trials" not in study.user_attrs
    assert "profile" not in study.user_attrs


def test_open_study_rejects_changed_space(storage):
    name = unique("tiny")
    open_study(storage, tiny_space(name), "loss")
    changed = tiny_space(name, TINY_SPACE.replace("low: 0.1, high: 1.0}}", "low: 0.2, high: 1.0}}", 1))

    with pytest.raises(SpaceError) as raised:
        open_study(storage, changed, "loss")

    message = str(raised.value)
    assert f"{name}.loss" in message
    assert "different search space" in message
    assert "Rename the family" in message


def test_open_study_rejects_maximize_study(storage):
    space = tiny_space()
    optuna.create_study(storage=storage, study_name=study_name(space, "loss"), direction="maximize")

    with pytest.raises(StudyError, match="MAXIMIZE"):
        open_study(storage, space, "loss")


def test_open_study_unknown_stage(storage):
    with pytest.raises(SpaceError, match="no stage named 'retrain'"):
        open_study(storage, tiny_space(), "retrain")


def test_open_study_profile_unknown_stage(storage):
    space = tiny_space()
    profile = load_profile("smoke")
    broken = type(profile)(
        name="broken",
        n_jets=600,
        models=profile.models,
        families={space.name: {"stages": {"tune": {"n_trials": 1}}}},
        source="broken.yaml",
    )

    with pytest.raises(ProfileError, match="tune"):
        open_study(storage, space, "loss", profile=broken)


# search spaces in the storage


def test_load_spaces_without_stored_spaces(empty_storage):
    spaces = load_spaces(empty_storage)

    assert list(spaces) == ["convae-gen", "convae-rec", "latent-nf", "nf"]


def test_add_space_visible_to_new_storage(any_url, tmp_path):
    name = unique("added")
    path = write_space(tmp_path, name)

    space, created = add_space(open_storage(any_url), path)

    assert created is True
    assert space.name == name
    spaces = load_spaces(open_storage(any_url))
    assert name in spaces
    assert spaces[name].fingerprint == space.fingerprint
    assert spaces[name].study_names == (f"{name}.loss", f"{name}.arch")


def test_add_space_twice_stores_once(storage, tmp_path):
    name = unique("added")
    path = write_space(tmp_path, name)
    add_space(storage, path)

    space, created = add_space(storage, path)

    assert created is False
    assert pipeline.load_spaces(storage.engine)[name] == path.read_text(encoding="utf-8")


def test_add_space_same_content_new_comment(storage, tmp_path):
    name = unique("added")
    add_space(storage, write_space(tmp_path, name))
    commented = tmp_path / "commented.yaml"
    commented.write_text("# a comment changes the text but not the fingerprint\n" + TINY_SPACE.format(name=name))

    space, created = add_space(storage, commented)

    assert created is False
    assert "# a comment" not in pipeline.load_spaces(storage.engine)[name]


def test_add_space_conflict_writes_nothing(storage, tmp_path):
    name = unique("added")
    add_space(storage, write_space(tmp_path, name))
    stored_before = pipeline.load_spaces(storage.engine)
    other = tmp_path / "other"
    other.mkdir()
    changed = write_space(other, name, TINY_SPACE.replace("high: 1.2}}", "high: 1.5}}"))

    with pytest.raises(SpaceError) as raised:
        add_space(storage, changed)

    assert str(changed) in str(raised.value)
    assert f"name = '{name}'" in str(raised.value)
    assert "Rename the family" in str(raised.value)
    assert pipeline.load_spaces(storage.engine) == stored_before


def test_add_space_builtin_name_rejected(storage, tmp_path):
    path = write_space(tmp_path, "convae-gen")

    with pytest.raises(SpaceError, match="shipped search space"):
        add_space(storage, path)

    assert "convae-gen" not in pipeline.load_spaces(storage.engine)


def test_add_space_builtin_copy_is_known(storage, tmp_path):
    path = tmp_path / "copy.yaml"
    path.write_text(builtin_spaces()["nf"].text, encoding="utf-8")

    space, created = add_space(storage, path)

    assert created is False
    assert space.source == "hpo/spaces/nf.yaml"
    assert "nf" not in pipeline.load_spaces(storage.engine)


def test_add_space_invalid_file_writes_nothing(storage, tmp_path):
    name = unique("bad")
    path = write_space(tmp_path, name, TINY_SPACE.replace("low: 0.9, high: 1.0", "low: 1.9, high: 1.0"))

    with pytest.raises(SpaceError, match="low is above high"):
        add_space(storage, path)

    assert name not in pipeline.load_spaces(storage.engine)


def test_add_space_latents_from_unknown(storage, tmp_path):
    name = unique("latent")
    path = tmp_path / "latent.yaml"
    path.write_text(latent_space_text(name, "nowhere"), encoding="utf-8")

    with pytest.raises(SpaceError, match="latents_from = 'nowhere'"):
        add_space(storage, path)

    assert name not in pipeline.load_spaces(storage.engine)


def test_add_space_latents_from_added_convae(storage, tmp_path):
    convae_name = unique("added")
    add_space(storage, write_space(tmp_path, convae_name))
    path = tmp_path / "latent.yaml"
    path.write_text(latent_space_text(unique("latent"), convae_name), encoding="utf-8")

    space, created = add_space(storage, path)

    assert created is True
    assert space.latents_from == convae_name


def test_add_space_study_name_taken(storage, tmp_path):
    name = unique("added")
    open_study(storage, tiny_space(name, TINY_SPACE.replace("high: 1.2}}", "high: 1.5}}")), "loss")

    with pytest.raises(SpaceError, match=f"study '{name}.loss' already exists"):
        add_space(storage, write_space(tmp_path, name))

    assert name not in pipeline.load_spaces(storage.engine)


def test_load_spaces_skips_invalid_stored_space(storage, caplog):
    name = unique("broken")
    pipeline.save_space(storage.engine, name, f"name: {name}\nmodel: transformer\n")

    spaces = load_spaces(storage)

    assert name not in spaces
    assert f"Skipping stored search space '{name}'" in caplog.text


def test_find_stage_unknown_lists_known():
    with pytest.raises(StudyError) as raised:
        find_stage(builtin_spaces(), "convae-gen.retrain")

    message = str(raised.value)
    assert "'convae-gen.retrain' not found" in message
    assert "convae-gen.loss" in message
    assert "nf.search" in message


# inherited parameters


def test_inherited_params_from_best_loss_trial(storage):
    space = tiny_space()
    loss = space.stage("loss")
    study = open_study(storage, space, loss)
    add_trial(study, loss, loss_params(1e-3), value=0.30)
    add_trial(study, loss, loss_params(2e-3), value=0.10)
    add_trial(study, loss, loss_params(4e-3), value=0.20)
    add_trial(study, loss, loss_params(5e-3), state=TrialState.PRUNED)

    inherited = inherited_params(storage, space, "arch")

    assert inherited == loss_params(2e-3)


def test_inherited_params_ignore_fixed_values(storage):
    space = tiny_space()
    loss = space.stage("loss")
    add_trial(open_study(storage, space, loss), loss, loss_params(1e-3), value=0.3)

    inherited = inherited_params(storage, space, "arch")

    assert "latent_dim" not in inherited
    assert set(inherited) == set(loss.params)


def test_inherited_params_first_stage_empty(storage):
    assert inherited_params(storage, tiny_space(), "loss") == {}


def test_inherited_params_without_study(storage):
    space = tiny_space()

    with pytest.raises(StudyError, match=f"'{space.name}.loss', which does not exist yet"):
        inherited_params(storage, space, "arch")


def test_inherited_params_without_complete_trial(storage):
    space = tiny_space()
    loss = space.stage("loss")
    study = open_study(storage, space, loss)
    add_trial(study, loss, loss_params(1e-3), state=TrialState.FAIL, fail_reason="nan_loss")
    add_trial(study, loss, loss_params(2e-3), state=TrialState.PRUNED)

    with pytest.raises(StudyError) as raised:
        inherited_params(storage, space, "arch")

    message = str(raised.value)
    assert f"'{space.name}.loss'" in message
    assert "no COMPLETE trial yet (1 PRUNED, 1 FAIL)" in message


def test_inherited_params_without_params_attr(storage):
    space = tiny_space()
    loss = space.stage("loss")
    study = open_study(storage, space, loss)
    distributions = loss.distributions({"pt_over_mass": PT_OVER_MASS})
    study.add_trial(optuna.trial.create_trial(params=loss_params(3e-3), distributions=distributions, value=0.2))

    assert inherited_params(storage, space, "arch") == loss_params(3e-3)


# summaries


def test_study_summaries_counts(storage):
    space = tiny_space()
    loss = space.stage("loss")
    study = open_study(storage, space, loss, profile=load_profile("smoke"))
    add_trial(study, loss, loss_params(1e-3), value=0.30)
    add_trial(study, loss, loss_params(2e-3), value=0.10)
    add_trial(study, loss, loss_params(3e-3), state=TrialState.PRUNED)
    add_trial(study, loss, loss_params(4e-3), state=TrialState.FAIL, fail_reason="nan_loss")
    add_trial(study, loss, loss_params(5e-3), state=TrialState.FAIL, fail_reason="nan_loss")
    add_trial(study, loss, loss_params(6e-3), state=TrialState.FAIL, fail_reason="out_of_memory")
    study.enqueue_trial({"lr": 7e-3})
    other = optuna.create_study(storage=storage, study_name=unique("not-jethpo"))

    summaries = {summary["study"]: summary for summary in study_summaries(storage)}

    assert other.study_name not in summaries
    summary = summaries[f"{space.name}.loss"]
    assert summary["family"] == space.name
    assert summary["stage"] == "loss"
    assert summary["model"] == "convae"
    assert summary["n_trials"] == 7
    assert summary["states"] == {"COMPLETE": 2, "PRUNED": 1, "FAIL": 3, "RUNNING": 0, "WAITING": 1}
    assert summary["best_value"] == pytest.approx(0.10)
    assert summary["best_trial"] == 1
    assert summary["budget"]["n_trials"] == load_profile("smoke").search_budget(space, loss).n_trials
    assert summary["fail_reasons"] == {"nan_loss": 2, "out_of_memory": 1}
    assert summary["space_fingerprint"] == space.fingerprint


def test_study_summaries_study_without_attrs(empty_storage):
    optuna.create_study(storage=empty_storage, study_name="nf.search")

    summaries = study_summaries(empty_storage)

    assert [(summary["family"], summary["stage"]) for summary in summaries] == [("nf", "search")]
    assert summaries[0]["best_value"] is None
    assert summaries[0]["budget"] == {}


def test_best_trial_summary_arch_stage(storage):
    space = tiny_space()
    loss, arch = space.stage("loss"), space.stage("arch")
    add_trial(open_study(storage, space, loss), loss, loss_params(2e-3), value=0.1)
    inherited = inherited_params(storage, space, arch)
    arch_study = open_study(storage, space, arch)
    architecture = {"latent_dim": 15, "n_filters": 10, "kernel_size": 2, "linear_nodes": 100, "n_conv_layers": 2, "activation": "GELU"}
    add_trial(arch_study, arch, architecture, value=0.05, inherited=inherited)
    add_trial(arch_study, arch, {**architecture, "latent_dim": 5}, value=0.07, inherited=inherited)

    summary = best_trial_summary(arch_study, space, "arch")

    assert summary["number"] == 0
    assert summary["value"] == pytest.approx(0.05)
    assert summary["params"] == {**loss_params(2e-3), **architecture}
    assert summary["tuned"] == architecture
    assert summary["inherited"] == loss_params(2e-3)
    assert summary["fixed"] == {}
    assert summary["user_attrs"]["seed"] == 1234
    assert summary["duration_s"] is not None


def test_best_trial_summary_loss_stage_fixed(storage):
    space = tiny_space()
    loss = space.stage("loss")
    study = open_study(storage, space, loss)
    add_trial(study, loss, loss_params(2e-3), value=0.1)

    summary = best_trial_summary(study, space, loss)

    assert summary["fixed"] == loss.fixed
    assert summary["params"]["latent_dim"] == 10
    assert summary["inherited"] == {}


def test_best_trial_summary_without_complete_trial(storage):
    space = tiny_space()
    study = open_study(storage, space, "loss")
    study.enqueue_trial({"lr": 1e-3})

    with pytest.raises(StudyError, match=r"no COMPLETE trial yet \(1 WAITING\)"):
        best_trial_summary(study, space, "loss")


def test_load_study_missing(storage):
    space = tiny_space()

    with pytest.raises(StudyError, match="not found in the storage"):
        load_study(storage, space, "loss")
    assert space.stage("loss").study_name not in optuna.get_all_study_names(storage)


# enqueue


def test_enqueue_adds_waiting_trial(empty_storage):
    added = enqueue(empty_storage, "convae-gen.arch", {"latent_dim": 40, "activation": "GELU"})

    assert added is True
    study = optuna.load_study(study_name="convae-gen.arch", storage=empty_storage)
    trials = study.get_trials(states=(TrialState.WAITING,))
    assert len(trials) == 1
    assert trials[0].system_attrs["fixed_params"] == {"latent_dim": 40, "activation": "GELU"}
    assert study.user_attrs["family"] == "convae-gen"


def test_enqueue_duplicate_skipped(empty_storage):
    enqueue(empty_storage, "nf.search", {"lr": 1e-3, "n_flows": 10})

    added = enqueue(empty_storage, "nf.search", {"n_flows": 10, "lr": 1e-3})

    assert added is False
    study = optuna.load_study(study_name="nf.search", storage=empty_storage)
    assert len(study.get_trials(states=(TrialState.WAITING,))) == 1


def test_enqueue_out_of_range_rejected(empty_storage):
    with pytest.raises(SpaceError) as raised:
        enqueue(empty_storage, "convae-gen.arch", {"latent_dim": 400})

    message = str(raised.value)
    assert "latent_dim = 400" in message
    assert "out of range [10, 300]" in message
    assert "convae-gen.arch" not in optuna.get_all_study_names(empty_storage)


def test_enqueue_off_step_rejected(storage):
    with pytest.raises(SpaceError, match=r"n_flows = 12: off the step 5 from 5"):
        enqueue(storage, "nf.search", {"n_flows": 12})


def test_enqueue_inherited_param_rejected(storage):
    with pytest.raises(SpaceError, match="lr = 0.001: inherited from the best trial of stage 'loss'"):
        enqueue(storage, "convae-gen.arch", {"lr": 1e-3})


def test_enqueue_fixed_param_rejected(storage):
    with pytest.raises(SpaceError, match="latent_dim = 20: fixed at 30 in this stage"):
        enqueue(storage, "convae-gen.loss", {"latent_dim": 20})


def test_enqueue_unknown_study(storage):
    with pytest.raises(StudyError, match="Known studies: convae-gen.loss"):
        enqueue(storage, "convae.loss", {"lr": 1e-3})


def test_enqueue_from_data_needs_recorded_range(empty_storage):
    with pytest.raises(SpaceError, match="gamma_m = 12.0: the range of gamma_m is 20% around the pt_over_mass"):
        enqueue(empty_storage, "convae-gen.loss", {"gamma_m": 12.0})


def test_enqueue_from_data_uses_recorded_range(empty_storage):
    space = builtin_spaces()["convae-gen"]
    loss = space.stage("loss")
    add_trial(open_study(empty_storage, space, loss), loss, loss_params(1e-3), value=0.2)

    assert enqueue(empty_storage, "convae-gen.loss", {"gamma_m": 13.0}) is True
    with pytest.raises(SpaceError, match=r"gamma_m = 15.0: out of range \[9.6"):
        enqueue(empty_storage, "convae-gen.loss", {"gamma_m": 15.0})


def test_enqueue_from_data_with_given_stats(empty_storage):
    added = enqueue(empty_storage, "convae-gen.loss", {"gamma_m": 5.0}, data_stats={"pt_over_mass": 5.5})

    assert added is True



# a real search on Pythia jets


@pytest.mark.slow
def test_smoke_loss_then_arch(fresh_postgres_url, pythia_jets):
    from hpo.objectives import prepare_data, run_trial

    profile = load_profile("smoke")
    space = builtin_spaces()["convae-gen"]
    loss, arch = space.stage("loss"), space.stage("arch")
    storage = open_storage(fresh_postgres_url)
    data = prepare_data(pythia_jets.path, seed=0, n_jets=profile.n_jets)

    # loss stage with the fixed paper architecture
    loss_budget = profile.search_budget(space, loss)
    loss_study = open_study(storage, space, loss, profile=profile)
    loss_trials = [
        run_trial(loss_study, space, loss, loss_budget, data, inherited={}, storage=storage)
        for _ in range(loss_budget.n_trials)
    ]
    complete = [trial for trial in loss_trials if trial.state == TrialState.COMPLETE]
    assert complete, [trial.user_attrs.get("fail_message") for trial in loss_trials]
    best = min(complete, key=lambda trial: trial.value)
    expected = {name: best.user_attrs["params"][name] for name in loss.params}

    # arch stage with the best loss parameters
    inherited = inherited_params(storage, space, arch)
    assert inherited == expected
    arch_budget = profile.search_budget(space, arch)
    arch_study = open_study(storage, space, arch, profile=profile)
    arch_trials = [
        run_trial(arch_study, space, arch, arch_budget, data, inherited=inherited, storage=storage)
        for _ in range(arch_budget.n_trials)
    ]

    assert len(arch_trials) == arch_budget.n_trials
    for trial in arch_trials:
        params = trial.user_attrs["params"]
        assert {name: params[name] for name in loss.params} == expected, trial.number
        assert set(trial.params) == set(arch.params), trial.number
    summaries = {summary["study"]: summary for summary in study_summaries(storage)}
    assert summaries["convae-gen.loss"]["n_trials"] == loss_budget.n_trials
    assert summaries["convae-gen.arch"]["n_trials"] == arch_budget.n_trials
    wall_times = [round(trial.user_attrs["wall_time_s"], 1) for trial in loss_trials + arch_trials]
    states = [trial.state.name for trial in loss_trials + arch_trials]
    print(f"wall time per trial (s), loss then arch: {wall_times}, states {states}")
