"""Trial objectives on real Pythia 8 jets and PostgreSQL: the four models complete, pruned and
failed trials end in the right state with their user attributes, and the worker survives."""

import dataclasses
import datetime
import logging
import math
import pickle
import secrets
import time

import numpy as np
import optuna
import pytest
import sqlalchemy
import torch
from optuna.trial import TrialState

import hpo.objectives
from hpo.objectives import (
    FAIL_REASONS,
    TrialFailure,
    encode_latents,
    prepare_data,
    run_trial,
    train_params,
    trial_seed,
)
from hpo.spaces import Resources, SearchBudget, SpaceError, parse_space
from models.convae import ConVAE, ConVAEConfig
from models.data import JetDataError
from models.losses import gamma_m_range
from models.training import flatten_jets
from storage.rdb import open_storage

BUDGET = SearchBudget(n_trials=1, epochs=2, batch_size=64, eval_every=1, resources=Resources(cpus=1, gpus=0))

# A fixed architecture small enough that a trial of BUDGET takes about a second, as
# measured on a 2-core CPU.
SMALL_CONVAE = """
      latent_dim: 8
      n_filters: 4
      kernel_size: 3
      linear_nodes: 64
      n_conv_layers: 2
      activation: ReLU
"""

CONVAE_SPACE = """
name: tiny-convae-{objective}
model: convae
objective: {objective}
sampler: {{type: random, seed: 0}}
pruner: {{type: none}}
stages:
  - name: loss
    params:
      lr: {{type: float, low: 1.0e-3, high: 3.0e-3, log: true}}
      gamma_m: {{type: float, from_data: pt_over_mass, spread: 0.2}}
    fixed:
      alpha: 1.0
      beta: 0.95
      gamma: 0.5
      gamma_pt: 1.0
{architecture}
  - name: arch
    inherits: loss
    params:
      activation: {{type: categorical, choices: [ReLU, GELU]}}
    fixed:
      alpha: 1.0
      beta: 0.95
      gamma: 0.5
      gamma_pt: 1.0
      latent_dim: 8
      n_filters: 4
      kernel_size: 3
      linear_nodes: 64
      n_conv_layers: 2
"""

FLOW_SPACE = """
name: tiny-{name}
model: {model}
objective: generation
{latents_from}
sampler: {{type: random, seed: 0}}
pruner: {{type: none}}
stages:
  - name: search
    params:
      lr: {{type: float, low: 1.0e-3, high: 3.0e-3, log: true}}
    fixed: {{n_flows: 4, n_mlp_layers: 2, nodes_1: 32, nodes_2: 16}}
"""


def convae_space(objective="generation", architecture=SMALL_CONVAE):
    text = CONVAE_SPACE.format(objective=objective, architecture=architecture)
    return parse_space(text, f"test convae {objective} space")


def flow_space(model):
    if model == "realnvp-latent":
        text = FLOW_SPACE.format(name="latent-nf", model=model, latents_from="latents_from: tiny-convae-rec")
    else:
        text = FLOW_SPACE.format(name="nf", model=model, latents_from="")
    return parse_space(text, f"test {model} space")


def small_convae(latent_dim=8, seed=0):
    torch.manual_seed(seed)
    config = ConVAEConfig(
        latent_dim=latent_dim, n_filters=4, kernel_size=3, linear_nodes=64, n_conv_layers=2
    )
    return ConVAE(config)


def unique(label):
    return f"test-objectives-{label}-{secrets.token_hex(4)}"


@pytest.fixture(scope="module")
def data(pythia_jets):
    return prepare_data(pythia_jets.path, seed=0)


@pytest.fixture(scope="module")
def storage(postgres_url):
    storage = open_storage(postgres_url)
    yield storage
    storage.engine.dispose()


def new_study(storage, label, **kwargs):
    return optuna.create_study(storage=storage, study_name=unique(label), **kwargs)


def assert_common_attrs(trial, study, data):
    attrs = trial.user_attrs
    assert attrs["seed"] == trial_seed(study.study_name, trial.number)
    assert attrs["data_fingerprint"] == data.fingerprint
    assert attrs["device"] == "cpu"
    assert isinstance(attrs["wall_time_s"], float)
    assert attrs["wall_time_s"] > 0
    # run_trial builds the trial it returns instead of reading it back
    stored = study.get_trials()[trial.number]
    fields = ("state", "values", "params", "distributions", "user_attrs", "system_attrs", "intermediate_values")
    assert {name: getattr(trial, name) for name in fields} == {name: getattr(stored, name) for name in fields}
    assert trial.datetime_start == stored.datetime_start
    assert abs(trial.datetime_complete - stored.datetime_complete) < datetime.timedelta(seconds=1)


# data


def test_prepare_data_splits_and_scales(data, pythia_jets):
    assert data.train.shape == (420, 30, 3)
    assert data.validation.shape == (90, 30, 3)
    assert len(data.splits.test) == 90
    assert data.train.dtype == torch.float32
    assert data.train.device.type == "cpu"
    assert data.device == "cpu"
    np.testing.assert_array_equal(data.validation_gev, data.splits.validation.constituents)

    # the scaler maps real training constituents into [0, 1]
    real = data.train[torch.as_tensor(data.splits.train.mask)]
    assert real.min().item() == pytest.approx(0.0, abs=1e-6)
    assert real.max().item() == pytest.approx(1.0, abs=1e-6)


def test_pt_over_mass_is_gamma_m_centre(data):
    train = data.splits.train
    low, high = gamma_m_range(train.constituents, train.mask, spread=0.2)
    ratio = data.statistics["pt_over_mass"]

    assert ratio == pytest.approx((low + high) / 2, rel=1e-12)
    # a gluon jet near 1 TeV has a mass near 100 GeV
    assert 3 < ratio < 50

    # the space's from_data rule gives the same range as gamma_m_range
    stage = convae_space().stage("loss")
    distribution = stage.distributions(data.statistics)["gamma_m"]
    assert distribution.low == pytest.approx(low, rel=1e-12)
    assert distribution.high == pytest.approx(high, rel=1e-12)


def test_prepare_data_takes_first_jets(pythia_jets):
    prepared = prepare_data(pythia_jets.path, seed=0, n_jets=100)
    first = {jet.tobytes() for jet in pythia_jets.constituents[:100]}
    splits = (prepared.splits.train, prepared.splits.validation, prepared.splits.test)
    used = [jet.tobytes() for split in splits for jet in split.constituents]

    assert len(used) == 100
    assert set(used) == first


def test_fingerprint_names_jets_and_split(pythia_jets, data):
    same = prepare_data(pythia_jets.path, seed=0)
    fewer = prepare_data(pythia_jets.path, seed=0, n_jets=300)
    other_split = prepare_data(pythia_jets.path, seed=1)

    assert same.fingerprint == data.fingerprint
    assert fewer.fingerprint != data.fingerprint
    assert other_split.fingerprint != data.fingerprint
    assert data.fingerprint != pythia_jets.fingerprint


def test_prepare_data_rejects_bad_requests(pythia_jets):
    with pytest.raises(JetDataError, match="contains 600 jets, but n_jets=601"):
        prepare_data(pythia_jets.path, n_jets=601)
    with pytest.raises(JetDataError, match="n_jets=5 is invalid"):
        prepare_data(pythia_jets.path, n_jets=5)
    with pytest.raises(ValueError, match="invalid device 'gpu7'"):
        prepare_data(pythia_jets.path, device="gpu7")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            prepare_data(pythia_jets.path, device="cuda")


def test_encode_latents_returns_means(data):
    model = small_convae()
    model.train()

    latents = encode_latents(model, data.validation, batch_size=32)

    expected, _ = model.encode(data.validation)
    torch.testing.assert_close(latents, expected.detach())
    assert not latents.requires_grad
    assert model.training


# seeds


def test_trial_seed_is_stable():
    assert trial_seed("convae-gen.loss", 3) == trial_seed("convae-gen.loss", 3)
    assert trial_seed("convae-gen.loss", 3) != trial_seed("convae-gen.loss", 4)
    assert trial_seed("convae-gen.loss", 3) != trial_seed("convae-rec.loss", 3)
    seeds = [trial_seed("nf.search", number) for number in range(100)]
    assert all(0 <= seed < 2**31 for seed in seeds)
    # sha256(b"nf.search/0") starts with 850e45a8, and the seed clears its top bit. The
    # value is pinned, because a change would break the seeds stored with earlier trials.
    assert seeds[0] == 0x050E45A8


def test_same_trial_number_repeats_value(storage, data):
    space = convae_space()
    stage = space.stage("loss")
    name = unique("repeat")
    values = []
    for _ in range(2):
        sampler = optuna.samplers.RandomSampler(seed=0)
        study = optuna.create_study(storage=storage, study_name=name, sampler=sampler)
        trial = run_trial(study, space, stage, BUDGET, data, inherited={})
        values.append(trial.value)
        assert trial.user_attrs["seed"] == trial_seed(name, 0)
        optuna.delete_study(study_name=name, storage=storage)

    assert values[0] == values[1]


# the four objectives


@pytest.mark.parametrize("objective", ["generation", "reconstruction"])
def test_convae_trial_completes(storage, data, objective):
    space = convae_space(objective)
    stage = space.stage("loss")
    study = new_study(storage, f"convae-{objective}")

    trial = run_trial(study, space, stage, BUDGET, data, inherited={})

    assert trial.state == TrialState.COMPLETE
    assert math.isfinite(trial.value)
    assert trial.value > 0
    assert trial.value == min(trial.intermediate_values.values())
    assert sorted(trial.intermediate_values) == [1, 2]
    assert trial.user_attrs["best_epoch"] in (1, 2)
    assert_common_attrs(trial, study, data)

    params = trial.user_attrs["params"]
    assert params["lr"] == trial.params["lr"]
    assert params["gamma_m"] == trial.params["gamma_m"]
    assert params["latent_dim"] == 8
    assert params["beta"] == 0.95


def test_convae_arch_stage_uses_inherited(storage, data):
    space = convae_space()
    stage = space.stage("arch")
    study = new_study(storage, "convae-arch")
    inherited = {"lr": 2e-3, "gamma_m": data.statistics["pt_over_mass"]}

    trial = run_trial(study, space, stage, BUDGET, data, inherited=inherited)

    assert trial.state == TrialState.COMPLETE
    assert set(trial.params) == {"activation"}
    assert trial.user_attrs["params"]["lr"] == 2e-3
    assert trial.user_attrs["params"]["activation"] == trial.params["activation"]


def test_latent_flow_trial_completes(storage, data):
    space = flow_space("realnvp-latent")
    study = new_study(storage, "latent-nf")

    trial = run_trial(
        study, space, space.stage("search"), BUDGET, data, inherited={}, latent_model=small_convae()
    )

    assert trial.state == TrialState.COMPLETE
    assert math.isfinite(trial.value)
    assert sorted(trial.intermediate_values) == [1, 2]
    assert trial.user_attrs["params"]["n_flows"] == 4
    assert_common_attrs(trial, study, data)


@pytest.mark.parametrize("model", ["realnvp-latent", "realnvp-flat"])
def test_flow_training_inputs(data, monkeypatch, model):
    latent_model = small_convae()
    if model == "realnvp-latent":
        # encoder means of the training jets, then of the validation jets
        train_latents = encode_latents(latent_model, data.train)
        expected = torch.cat([train_latents, encode_latents(latent_model, data.validation)])
    else:
        expected = flatten_jets(data.train)

    captured = {}
    original = hpo.objectives.train_realnvp

    def spy(flow, inputs, *args, **kwargs):
        captured["inputs"] = inputs
        return original(flow, inputs, *args, **kwargs)

    monkeypatch.setattr(hpo.objectives, "train_realnvp", spy)
    params = {"lr": 1e-3, "n_flows": 4, "n_mlp_layers": 2, "nodes_1": 32, "nodes_2": 16}
    result = train_params(flow_space(model), params, BUDGET, data, seed=1, latent_model=latent_model)

    torch.testing.assert_close(captured["inputs"], expected)
    assert result.checkpoint["hyperparameters"]["dim"] == expected.shape[1]
    assert result.checkpoint["data_fingerprint"] == data.fingerprint
    if model == "realnvp-latent":
        assert expected.shape == (420 + 90, 8)
        assert result.checkpoint["latent_model"]["hyperparameters"]["latent_dim"] == 8
    else:
        assert expected.shape == (420, 90)


def test_latent_flow_needs_latent_model(storage, data):
    space = flow_space("realnvp-latent")
    study = new_study(storage, "latent-nf-missing")

    with pytest.raises(ValueError, match="no latent_model was passed"):
        run_trial(study, space, space.stage("search"), BUDGET, data, inherited={})
    assert study.get_trials() == []


def test_flat_flow_trial_completes(storage, data):
    space = flow_space("realnvp-flat")
    study = new_study(storage, "nf")

    trial = run_trial(study, space, space.stage("search"), BUDGET, data, inherited={})

    assert trial.state == TrialState.COMPLETE
    assert math.isfinite(trial.value)
    assert sorted(trial.intermediate_values) == [1, 2]
    assert trial.user_attrs["params"]["nodes_2"] == 16
    assert_common_attrs(trial, study, data)


# pruning and failures


def test_pruner_ends_trial_pruned(storage, data):
    space = convae_space()
    study = new_study(storage, "pruned", pruner=optuna.pruners.ThresholdPruner(upper=0.0))

    trial = run_trial(study, space, space.stage("loss"), BUDGET, data, inherited={})

    assert trial.state == TrialState.PRUNED
    assert list(trial.intermediate_values) == [1]
    assert trial.value == trial.intermediate_values[1]
    assert "fail_reason" not in trial.user_attrs
    assert_common_attrs(trial, study, data)


def test_nan_loss_fails_trial(storage, data, caplog):
    poisoned = data.train.clone()
    poisoned[0, 0, 0] = math.nan
    poisoned_data = dataclasses.replace(data, train=poisoned)
    space = convae_space()
    study = new_study(storage, "nan")

    with caplog.at_level(logging.WARNING, logger="hpo.objectives"):
        trial = run_trial(study, space, space.stage("loss"), BUDGET, poisoned_data, inherited={})

    assert trial.state == TrialState.FAIL
    assert trial.user_attrs["fail_reason"] == "nan_loss"
    assert "epoch 1" in trial.user_attrs["fail_message"]
    assert_common_attrs(trial, study, data)
    assert f"Trial 0 of study {study.study_name} failed (nan_loss)" in caplog.text


def test_nan_flow_loss_is_trial_failure(data):
    poisoned = data.train.clone()
    poisoned[3, 2, 1] = math.inf
    params = {"lr": 1e-3, "n_flows": 4, "n_mlp_layers": 1, "nodes_1": 32}

    with pytest.raises(TrialFailure) as raised:
        poisoned_data = dataclasses.replace(data, train=poisoned)
        train_params(flow_space("realnvp-flat"), params, BUDGET, poisoned_data, seed=0)
    assert raised.value.reason == "nan_loss"


def test_nan_jets_at_every_evaluation_fail(storage, data):
    # The flow trains on finite latents, but the decoder turns every sample into NaN.
    latent_model = small_convae()
    with torch.no_grad():
        latent_model.decoder[0].bias.fill_(math.nan)
    space = flow_space("realnvp-latent")
    study = new_study(storage, "nan-jets")

    trial = run_trial(
        study, space, space.stage("search"), BUDGET, data, inherited={}, latent_model=latent_model
    )

    assert trial.state == TrialState.FAIL
    assert trial.user_attrs["fail_reason"] == "nan_loss"
    assert "NaN or infinite jets at every evaluation" in trial.user_attrs["fail_message"]
    assert trial.intermediate_values == {1: math.inf, 2: math.inf}


def test_kernel_wider_than_jet_is_invalid(data):
    params = {
        "lr": 1e-3,
        "alpha": 1.0,
        "beta": 0.95,
        "gamma": 0.5,
        "gamma_pt": 1.0,
        "gamma_m": 10.0,
        "latent_dim": 8,
        "n_filters": 4,
        "kernel_size": 11,
        "linear_nodes": 64,
        "n_conv_layers": 3,
        "activation": "ReLU",
    }

    with pytest.raises(TrialFailure, match="kernel_size=11 with n_conv_layers=3") as raised:
        train_params(convae_space(), params, BUDGET, data, seed=0)
    assert raised.value.reason == "invalid_architecture"


def test_one_dimensional_latent_flow_is_invalid(storage, data):
    space = flow_space("realnvp-latent")
    study = new_study(storage, "latent-dim-1")

    trial = run_trial(
        study,
        space,
        space.stage("search"),
        BUDGET,
        data,
        inherited={},
        latent_model=small_convae(latent_dim=1),
    )

    assert trial.state == TrialState.FAIL
    assert trial.user_attrs["fail_reason"] == "invalid_architecture"
    assert "dim=1" in trial.user_attrs["fail_message"]
    assert_common_attrs(trial, study, data)


def test_failed_cpu_allocation_is_out_of_memory(storage, data):
    # 2**50 linear nodes need about 0.9 EB of weights, more than a 64-bit Linux process
    # can address, so the allocation fails at once without touching memory.
    architecture = SMALL_CONVAE.replace("linear_nodes: 64", "linear_nodes: 1125899906842624")
    space = convae_space(architecture=architecture)
    study = new_study(storage, "oom")

    trial = run_trial(study, space, space.stage("loss"), BUDGET, data, inherited={})

    assert trial.state == TrialState.FAIL
    assert trial.user_attrs["fail_reason"] == "out_of_memory"
    assert "ran out of memory on cpu" in trial.user_attrs["fail_message"]
    assert_common_attrs(trial, study, data)


@pytest.mark.parametrize(
    "error",
    [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"), MemoryError()],
    ids=["cuda", "python"],
)
def test_raised_oom_errors_are_out_of_memory(data, monkeypatch, error):
    # Simulated: no test machine can be relied on to have a GPU to exhaust.
    def exhaust(*args, **kwargs):
        raise error

    monkeypatch.setattr(hpo.objectives, "train_convae", exhaust)
    params = {"lr": 1e-3, "alpha": 1.0, "beta": 0.95, "gamma": 0.5, "gamma_pt": 1.0, "gamma_m": 10.0}
    params |= {"latent_dim": 8, "n_filters": 4, "kernel_size": 3, "linear_nodes": 64, "n_conv_layers": 2}
    params |= {"activation": "ReLU"}

    with pytest.raises(TrialFailure) as raised:
        train_params(convae_space(), params, BUDGET, data, seed=0)
    assert raised.value.reason == "out_of_memory"


def test_missing_params_name_the_parameter(data):
    with pytest.raises(SpaceError, match="missing parameters nodes_2"):
        params = {"lr": 1e-3, "n_flows": 4, "n_mlp_layers": 2, "nodes_1": 8}
        train_params(flow_space("realnvp-flat"), params, BUDGET, data, seed=0)


def test_unexpected_error_fails_trial_and_logs(storage, data, caplog):
    space = convae_space()
    study = new_study(storage, "error")

    # the arch stage needs lr and gamma_m from the loss stage
    with caplog.at_level(logging.WARNING, logger="hpo.objectives"):
        trial = run_trial(study, space, space.stage("arch"), BUDGET, data, inherited={})

    assert trial.state == TrialState.FAIL
    assert trial.user_attrs["fail_reason"] == "error"
    assert trial.user_attrs["fail_message"].startswith("SpaceError: ")
    assert "missing inherited parameters lr, gamma_m" in trial.user_attrs["fail_message"]
    assert_common_attrs(trial, study, data)
    assert f"Trial 0 of study {study.study_name} failed (error)" in caplog.text
    assert "Traceback" in caplog.text


def test_worker_survives_failures(storage, data):
    space = convae_space()
    stage = space.stage("loss")
    study = new_study(storage, "survives")
    poisoned = dataclasses.replace(data, train=torch.full_like(data.train, math.nan))

    first = run_trial(study, space, space.stage("arch"), BUDGET, data, inherited={})
    second = run_trial(study, space, stage, BUDGET, poisoned, inherited={})
    third = run_trial(study, space, stage, BUDGET, data, inherited={})

    assert [first.state, second.state, third.state] == [TrialState.FAIL, TrialState.FAIL, TrialState.COMPLETE]
    assert [t.user_attrs.get("fail_reason") for t in study.get_trials()] == ["error", "nan_loss", None]
    assert all(t.user_attrs["fail_reason"] in FAIL_REASONS for t in study.get_trials()[:2])


def test_keyboard_interrupt_fails_trial_and_propagates(storage, data, monkeypatch):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(hpo.objectives, "train_convae", interrupt)
    space = convae_space()
    study = new_study(storage, "interrupt")

    with pytest.raises(KeyboardInterrupt):
        run_trial(study, space, space.stage("loss"), BUDGET, data, inherited={})

    [trial] = study.get_trials()
    assert trial.state == TrialState.FAIL
    assert trial.user_attrs["fail_reason"] == "error"
    assert "KeyboardInterrupt" in trial.user_attrs["fail_message"]


def test_trial_failed_elsewhere_keeps_state(storage, data, monkeypatch, caplog):
    space = convae_space()
    study = new_study(storage, "failed-elsewhere")
    original = hpo.objectives.train_convae

    def train_then_lose_trial(*args, **kwargs):
        result = original(*args, **kwargs)
        # what fail_stale_trials in another worker does to a trial whose heartbeat is stale
        [running] = study.get_trials(states=[TrialState.RUNNING])
        storage.set_trial_state_values(running._trial_id, TrialState.FAIL)
        return result

    monkeypatch.setattr(hpo.objectives, "train_convae", train_then_lose_trial)
    with caplog.at_level(logging.WARNING, logger="hpo.objectives"):
        trial = run_trial(study, space, space.stage("loss"), BUDGET, data, inherited={})

    assert trial.state == TrialState.FAIL
    assert "fail_reason" not in trial.user_attrs
    assert f"Trial 0 of study {study.study_name} was already FAIL" in caplog.text


def test_public_tell_when_internal_one_missing(storage, data, monkeypatch):
    # what run_trial does with an Optuna that no longer has the function Study.optimize calls
    monkeypatch.setattr(hpo.objectives, "_tell_with_warning", None)
    space = convae_space()
    study = new_study(storage, "public-tell")

    trial = run_trial(study, space, space.stage("loss"), BUDGET, data, inherited={})

    assert trial.state == TrialState.COMPLETE
    assert_common_attrs(trial, study, data)


def test_trial_failure_pickles_with_reason():
    failure = pickle.loads(pickle.dumps(TrialFailure("out_of_memory", "CUDA out of memory")))

    assert failure.reason == "out_of_memory"
    assert str(failure) == "CUDA out of memory"


def test_trial_failure_rejects_unknown_reason():
    with pytest.raises(ValueError, match="invalid trial failure reason 'timeout'"):
        TrialFailure("timeout", "took too long")
    assert str(TrialFailure("nan_loss", "loss is nan")) == "loss is nan"


# heartbeats


def test_heartbeats_recorded_without_warning(postgres_url, data, recwarn):
    storage = open_storage(postgres_url, heartbeat_interval=1)
    space = convae_space()
    study = new_study(storage, "heartbeat")

    trial = run_trial(study, space, space.stage("loss"), BUDGET, data, inherited={}, storage=storage)

    assert trial.state == TrialState.COMPLETE
    with storage.engine.connect() as connection:
        beats = connection.execute(
            sqlalchemy.text("SELECT COUNT(*) FROM trial_heartbeats WHERE trial_id = :id"),
            {"id": trial._trial_id},
        ).scalar_one()
    assert beats == 1
    assert not [w for w in recwarn if "Heartbeat of storage" in str(w.message)]


def test_stale_trial_is_retried_first(postgres_url, data):
    storage = open_storage(postgres_url, heartbeat_interval=1, grace_period=1)
    space = convae_space()
    stage = space.stage("loss")
    study = new_study(storage, "stale", sampler=optuna.samplers.RandomSampler(seed=0))

    # a worker that suggested parameters, beat once and died
    with pytest.warns(UserWarning, match="Heartbeat of storage"):
        dead = study.ask()
    dead_params = stage.suggest(dead, data.statistics, {})
    dead.set_user_attr("seed", trial_seed(study.study_name, dead.number))
    storage.record_heartbeat(dead._trial_id)
    time.sleep(1.5)

    trial = run_trial(study, space, stage, BUDGET, data, inherited={})

    assert study.get_trials()[dead.number].state == TrialState.FAIL
    assert trial.state == TrialState.COMPLETE
    assert trial.system_attrs["failed_trial"] == dead.number
    assert trial.params == {"lr": dead_params["lr"], "gamma_m": dead_params["gamma_m"]}
    # the retry repeats the training of the trial it retries
    assert trial.user_attrs["seed"] == trial_seed(study.study_name, dead.number)
