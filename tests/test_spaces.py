"""Search space and profile files: schema validation, the shipped paper spaces, and suggestions."""

import inspect
import math
import pickle
import subprocess
import sys
from dataclasses import fields

import optuna
import pytest
import yaml

from hpo.spaces import (
    CONVAE_ACTIVATIONS,
    MODEL_KINDS,
    Profile,
    ProfileError,
    SpaceError,
    builtin_profile_names,
    builtin_profiles,
    builtin_spaces,
    check_space_references,
    load_profile,
    load_space,
    parse_profile,
    parse_space,
    realnvp_hidden_sizes,
    study_name,
)

optuna.logging.set_verbosity(optuna.logging.WARNING)

SOURCE = "bad-space.yaml"
PT_OVER_MASS = {"pt_over_mass": 12.48}
ARCHITECTURE = ("latent_dim", "n_filters", "kernel_size", "linear_nodes", "n_conv_layers", "activation")
LOSS_WEIGHTS = ("alpha", "beta", "gamma", "gamma_pt", "gamma_m")


def convae_document():
    """A small valid two-stage ConVAE space as a Python structure."""
    return {
        "name": "tiny-convae",
        "model": "convae",
        "objective": "generation",
        "sampler": {"type": "tpe", "seed": 3},
        "pruner": {"type": "median", "n_startup_trials": 2},
        "stages": [
            {
                "name": "loss",
                "params": {
                    "lr": {"type": "float", "low": 1.0e-4, "high": 1.0e-2, "log": True},
                    "alpha": {"type": "float", "low": 0.1, "high": 1.0},
                    "beta": {"type": "float", "low": 0.9, "high": 1.0, "log": True},
                    "gamma": {"type": "float", "low": 0.1, "high": 1.0, "step": 0.1},
                    "gamma_pt": {"type": "float", "low": 0.8, "high": 1.2},
                    "gamma_m": {"type": "float", "from_data": "pt_over_mass", "spread": 0.2},
                },
                "fixed": {
                    "latent_dim": 30,
                    "n_filters": 50,
                    "kernel_size": 5,
                    "linear_nodes": 1500,
                    "n_conv_layers": 3,
                    "activation": "ReLU",
                },
            },
            {
                "name": "arch",
                "inherits": "loss",
                "params": {
                    "latent_dim": {"type": "int", "low": 10, "high": 300, "step": 10},
                    "n_filters": {"type": "int", "low": 5, "high": 100, "step": 5},
                    "kernel_size": {"type": "int", "low": 1, "high": 8},
                    "linear_nodes": {"type": "int", "low": 100, "high": 3000, "step": 100},
                    "n_conv_layers": {"type": "int", "low": 1, "high": 4},
                    "activation": {"type": "categorical", "choices": ["ReLU", "GELU"]},
                },
            },
        ],
    }


def flow_document():
    """A small valid RealNVP space with conditional layer widths."""
    return {
        "name": "tiny-flow",
        "model": "realnvp-flat",
        "objective": "generation",
        "stages": [
            {
                "name": "search",
                "params": {
                    "lr": {"type": "float", "low": 1.0e-4, "high": 1.0e-2, "log": True},
                    "n_flows": {"type": "int", "low": 5, "high": 20, "step": 5},
                    "n_mlp_layers": {"type": "int", "low": 1, "high": 3},
                    "nodes_1": {"type": "int", "low": 50, "high": 400, "step": 50},
                    "nodes_2": {
                        "type": "int",
                        "low": 50,
                        "high": 400,
                        "step": 50,
                        "when": {"param": "n_mlp_layers", "at_least": 2},
                    },
                    "nodes_3": {
                        "type": "int",
                        "low": 50,
                        "high": 400,
                        "step": 50,
                        "when": {"param": "n_mlp_layers", "at_least": 3},
                    },
                },
            }
        ],
    }


def parse(document):
    return parse_space(yaml.safe_dump(document, sort_keys=False), SOURCE)


# builtin spaces


def test_builtin_spaces_parse():
    spaces = builtin_spaces()

    assert set(spaces) == {"convae-gen", "convae-rec", "latent-nf", "nf"}
    assert spaces["convae-gen"].study_names == ("convae-gen.loss", "convae-gen.arch")
    assert spaces["latent-nf"].latents_from == "convae-rec"
    assert spaces["latent-nf"].model == "realnvp-latent"
    assert spaces["nf"].model == "realnvp-flat"
    assert spaces["convae-rec"].objective == "reconstruction"


def assert_float(spec, low, high, log):
    assert spec.type == "float"
    assert spec.low == pytest.approx(low, rel=1e-12)
    assert spec.high == pytest.approx(high, rel=1e-12)
    assert spec.log is log
    assert spec.step is None


def assert_int(spec, low, high, step):
    assert spec.type == "int"
    assert (spec.low, spec.high, spec.step, spec.log) == (low, high, step, False)


@pytest.mark.parametrize("family, beta_low, beta_high", [("convae-gen", 0.9, 1.0), ("convae-rec", 1.0e-4, 0.1)])
def test_convae_loss_stage_paper_ranges(family, beta_low, beta_high):
    stage = builtin_spaces()[family].stage("loss")

    assert list(stage.params) == ["lr", "alpha", "beta", "gamma", "gamma_pt", "gamma_m"]
    assert_float(stage.params["lr"], 1.0e-5, 1.0e-1, log=True)
    assert_float(stage.params["alpha"], 0.1, 1.0, log=False)
    assert_float(stage.params["beta"], beta_low, beta_high, log=True)
    assert_float(stage.params["gamma"], 0.1, 1.0, log=False)
    assert_float(stage.params["gamma_pt"], 0.8, 1.2, log=False)
    assert stage.params["gamma_m"].from_data == "pt_over_mass"
    assert stage.params["gamma_m"].spread == 0.2
    assert stage.fixed == {
        "latent_dim": 30,
        "n_filters": 50,
        "kernel_size": 5,
        "linear_nodes": 1500,
        "n_conv_layers": 3,
        "activation": "ReLU",
    }
    assert stage.inherits == ()


@pytest.mark.parametrize("family", ["convae-gen", "convae-rec"])
def test_convae_arch_stage_paper_ranges(family):
    space = builtin_spaces()[family]
    stage = space.stage("arch")

    assert stage.inherits == ("loss",)
    assert set(stage.inherited) == set(space.stage("loss").params)
    assert stage.fixed == {}
    assert list(stage.params) == list(ARCHITECTURE)
    assert_int(stage.params["latent_dim"], 10, 300, 10)
    assert_int(stage.params["n_filters"], 5, 100, 5)
    assert_int(stage.params["kernel_size"], 1, 8, 1)
    assert_int(stage.params["linear_nodes"], 100, 3000, 100)
    assert_int(stage.params["n_conv_layers"], 1, 4, 1)
    assert stage.params["activation"].type == "categorical"
    assert stage.params["activation"].choices == ("ReLU", "GELU", "LeakyReLU", "SELU", "ELU")


@pytest.mark.parametrize("family", ["latent-nf", "nf"])
def test_flow_paper_ranges(family):
    (stage,) = builtin_spaces()[family].stages

    assert list(stage.params) == ["lr", "n_flows", "n_mlp_layers", "nodes_1", "nodes_2", "nodes_3", "nodes_4"]
    assert_float(stage.params["lr"], 1.0e-5, 1.0e-1, log=True)
    assert_int(stage.params["n_flows"], 5, 100, 5)
    assert_int(stage.params["n_mlp_layers"], 1, 4, 1)
    for layer in range(1, 5):
        spec = stage.params[f"nodes_{layer}"]
        assert_int(spec, 50, 400, 50)
        if layer == 1:
            assert spec.when is None
        else:
            assert (spec.when.param, spec.when.at_least) == ("n_mlp_layers", layer)


def test_activation_names_match_convae():
    from models.convae import ACTIVATIONS

    assert tuple(ACTIVATIONS) == CONVAE_ACTIVATIONS


def test_parameter_names_match_model_code():
    from models.convae import ConVAEConfig
    from models.losses import LossWeights
    from models.realnvp import RealNVP

    space = builtin_spaces()["convae-gen"]
    names = set(space.stage("arch").params) | set(space.stage("arch").inherited)
    assert set(ARCHITECTURE) <= {field.name for field in fields(ConVAEConfig)}
    assert {field.name for field in fields(LossWeights)} == set(LOSS_WEIGHTS)
    assert names == set(ARCHITECTURE) | set(LOSS_WEIGHTS) | {"lr"}
    assert {"n_flows", "hidden_sizes"} <= set(inspect.signature(RealNVP).parameters)


def test_import_skips_torch_ray_and_databases():
    code = "import sys, hpo.spaces; print(sorted({'torch', 'ray', 'sqlalchemy'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)

    assert result.stdout.strip() == "[]"


# suggestions


def ask_many(stage, n_trials, inherited=None, seed=0):
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    for _ in range(n_trials):
        trial = study.ask()
        values = stage.suggest(trial, PT_OVER_MASS, inherited)
        yield trial, values
        study.tell(trial, 0.0)


def test_gamma_m_range_from_pt_over_mass():
    space = builtin_spaces()["convae-gen"]
    distribution = space.stage("loss").distributions(PT_OVER_MASS)["gamma_m"]

    assert space.data_statistics == ("pt_over_mass",)
    assert space.stage("arch").data_statistics == ("pt_over_mass",)

    # 12.48 * 0.8 and 12.48 * 1.2
    assert distribution.low == pytest.approx(9.984)
    assert distribution.high == pytest.approx(14.976)


@pytest.mark.parametrize("family", ["convae-gen", "convae-rec"])
def test_convae_loss_suggestions_in_range(family):
    stage = builtin_spaces()[family].stage("loss")

    for trial, values in ask_many(stage, 40):
        for name, spec in stage.params.items():
            low, high = spec.bounds(PT_OVER_MASS)
            assert low <= values[name] <= high, name
            assert trial.distributions[name].log is spec.log
        assert values["gamma_m"] == trial.params["gamma_m"]
        assert 9.984 - 1e-9 <= values["gamma_m"] <= 14.976 + 1e-9
        assert {name: values[name] for name in stage.fixed} == stage.fixed
        assert set(trial.params) == set(stage.params)


def test_arch_suggestions_step_and_inherited():
    space = builtin_spaces()["convae-gen"]
    inherited = {"lr": 3.0e-4, "alpha": 0.5, "beta": 0.95, "gamma": 0.25, "gamma_pt": 1.1, "gamma_m": 12.0}
    stage = space.stage("arch")

    for trial, values in ask_many(stage, 40, inherited=inherited):
        assert {name: values[name] for name in inherited} == inherited
        assert set(trial.params) == set(ARCHITECTURE)
        for name in ("latent_dim", "n_filters", "kernel_size", "linear_nodes", "n_conv_layers"):
            spec = stage.params[name]
            assert spec.low <= values[name] <= spec.high, name
            assert (values[name] - spec.low) % spec.step == 0, name
        assert values["activation"] in CONVAE_ACTIVATIONS


def test_flow_suggestions_conditional_nodes():
    stage = builtin_spaces()["latent-nf"].stage("search")
    seen_layers = set()

    for trial, values in ask_many(stage, 60):
        layers = values["n_mlp_layers"]
        seen_layers.add(layers)
        for layer in range(1, 5):
            assert (f"nodes_{layer}" in trial.params) is (layer <= layers)
        hidden = realnvp_hidden_sizes(values)
        assert len(hidden) == layers
        for width in hidden:
            assert 50 <= width <= 400
            assert width % 50 == 0
        assert values["n_flows"] % 5 == 0
        assert trial.distributions["lr"].log

    assert seen_layers == {1, 2, 3, 4}


def test_tpe_runs_conditional_space():
    space = builtin_spaces()["nf"]
    stage = space.stage("search")
    study = optuna.create_study(sampler=space.create_sampler(), pruner=space.create_pruner())

    study.optimize(lambda trial: sum(realnvp_hidden_sizes(stage.suggest(trial))), n_trials=15)

    assert len(study.trials) == 15
    assert all(trial.state == optuna.trial.TrialState.COMPLETE for trial in study.trials)


def test_enqueued_params_are_used():
    stage = builtin_spaces()["latent-nf"].stage("search")
    params = stage.validate_params({"lr": 0.001, "n_flows": 10, "n_mlp_layers": 2, "nodes_1": 100, "nodes_2": 200})
    study = optuna.create_study()
    study.enqueue_trial(params)

    values = stage.suggest(study.ask(), {})

    assert realnvp_hidden_sizes(values) == [100, 200]
    assert values["lr"] == 0.001
    assert "nodes_3" not in values


def test_suggest_needs_data_statistic():
    stage = builtin_spaces()["convae-gen"].stage("loss")
    trial = optuna.create_study().ask()

    with pytest.raises(SpaceError, match="pt_over_mass"):
        stage.suggest(trial, {})


def test_suggest_rejects_bad_inherited():
    stage = builtin_spaces()["convae-gen"].stage("arch")
    good = {"lr": 3.0e-4, "alpha": 0.5, "beta": 0.95, "gamma": 0.25, "gamma_pt": 1.1, "gamma_m": 12.0}
    study = optuna.create_study()

    with pytest.raises(SpaceError, match="missing inherited parameters beta"):
        stage.suggest(study.ask(), PT_OVER_MASS, {k: v for k, v in good.items() if k != "beta"})
    with pytest.raises(SpaceError, match="latent_dim"):
        stage.suggest(study.ask(), PT_OVER_MASS, {**good, "latent_dim": 30})
    with pytest.raises(SpaceError, match=r"beta = 0\.5"):
        stage.suggest(study.ask(), PT_OVER_MASS, {**good, "beta": 0.5})


# validate_params


def test_validate_params_accepts_valid_dict():
    stage = builtin_spaces()["convae-gen"].stage("loss")
    params = {"lr": 1.0e-3, "alpha": 1, "beta": 0.95, "gamma": 0.5, "gamma_pt": 1.0, "gamma_m": 12.0}

    normalized = stage.validate_params(params, PT_OVER_MASS)

    assert normalized == params
    assert isinstance(normalized["alpha"], float)
    assert list(normalized) == list(stage.params)


def test_validate_params_accepts_partial_dict():
    stage = builtin_spaces()["convae-gen"].stage("arch")

    assert stage.validate_params({"kernel_size": 3, "activation": "GELU"}) == {"kernel_size": 3, "activation": "GELU"}


def test_validate_params_checks_float_step():
    stage = parse(convae_document()).stage("loss")

    assert stage.validate_params({"gamma": 0.3}) == {"gamma": 0.3}
    with pytest.raises(SpaceError, match="off the step"):
        stage.validate_params({"gamma": 0.35})


BAD_PARAMS = [
    ("convae-gen", "loss", {"dropout": 0.1}, "dropout", "0.1", "unknown parameter"),
    ("convae-gen", "loss", {"latent_dim": 40}, "latent_dim", "40", "fixed at 30"),
    ("convae-gen", "arch", {"beta": 0.95}, "beta", "0.95", "inherited"),
    ("convae-gen", "loss", {"beta": 0.5}, "beta", "0.5", "out of range"),
    ("convae-gen", "loss", {"lr": "fast"}, "lr", "'fast'", "wrong type"),
    ("convae-gen", "arch", {"latent_dim": 30.0}, "latent_dim", "30.0", "wrong type"),
    ("convae-gen", "arch", {"n_conv_layers": True}, "n_conv_layers", "True", "wrong type"),
    ("convae-gen", "arch", {"latent_dim": 15}, "latent_dim", "15", "off the step"),
    ("convae-gen", "arch", {"activation": "Tanh"}, "activation", "'Tanh'", "not one of the choices"),
    ("convae-gen", "loss", {"gamma_m": 20.0}, "gamma_m", "20.0", "out of range"),
    ("nf", "search", {"n_mlp_layers": 2, "nodes_3": 100}, "nodes_3", "100", "inactive"),
]


@pytest.mark.parametrize("family, stage_name, params, key, value, problem", BAD_PARAMS)
def test_validate_params_rejects(family, stage_name, params, key, value, problem):
    stage = builtin_spaces()[family].stage(stage_name)

    with pytest.raises(SpaceError) as info:
        stage.validate_params(params, PT_OVER_MASS)

    message = str(info.value)
    assert f"parameters for {family}.{stage_name}" in message
    assert f"{key} = {value}" in message
    assert problem in message


def test_validate_params_rejects_non_mapping():
    stage = builtin_spaces()["nf"].stage("search")

    with pytest.raises(SpaceError, match="expected a mapping"):
        stage.validate_params([0.1, 10])


# invalid search spaces


def set_key(*path_and_value):
    *path, value = path_and_value

    def change(document):
        target = document
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return change


def delete_key(*path):
    def change(document):
        target = document
        for key in path[:-1]:
            target = target[key]
        del target[path[-1]]

    return change


def use_flow(change):
    """Mark a change as one that applies to flow_document instead of convae_document."""
    change.flow = True
    return change


def condition_on_activation(document):
    params = document["stages"][1]["params"]
    document["stages"][1]["params"] = {"activation": params.pop("activation"), **params}
    document["stages"][1]["params"]["latent_dim"]["when"] = {"param": "activation", "at_least": 2}


LR = ("stages", 0, "params", "lr")
ARCH = ("stages", 1, "params")

BAD_SPACES = [
    # (id, change, key path in the message, value in the message)
    ("unknown top-level key", set_key("sampelr", {"type": "tpe"}), "sampelr", "{'type': 'tpe'}"),
    ("unknown stage key", set_key("stages", 0, "parms", {}), "stages[0].parms", "{}"),
    ("unknown param key", set_key(*LR, "lo", 0.1), "stages[0].params.lr.lo", "0.1"),
    ("unknown param type", set_key(*LR, "type", "double"), "stages[0].params.lr.type", "'double'"),
    ("low above high", set_key("stages", 0, "params", "alpha", "low", 2.0), "stages[0].params.alpha.low", "2.0"),
    ("log with zero low", set_key(*LR, "low", 0.0), "stages[0].params.lr.low", "0.0"),
    ("log with negative low", set_key(*LR, "low", -1.0), "stages[0].params.lr.low", "-1.0"),
    ("step not dividing", set_key(*ARCH, "latent_dim", "step", 7), "stages[1].params.latent_dim.step", "7"),
    (
        "float step not dividing",
        set_key("stages", 0, "params", "gamma", "step", 0.4),
        "stages[0].params.gamma.step",
        "0.4",
    ),
    ("step with log", set_key(*LR, "step", 1.0e-4), "stages[0].params.lr.step", "0.0001"),
    ("int step with log", set_key(*ARCH, "latent_dim", "log", True), "stages[1].params.latent_dim.step", "10"),
    ("param also fixed", set_key("stages", 0, "fixed", "lr", 1.0e-3), "stages[0].fixed.lr", "0.001"),
    (
        "param also inherited",
        set_key(*ARCH, "beta", {"type": "float", "low": 0.9, "high": 1.0}),
        "stages[1].params.beta",
        "'high': 1.0",
    ),
    ("fixed also inherited", set_key("stages", 1, "fixed", {"alpha": 0.5}), "stages[1].fixed.alpha", "0.5"),
    ("unknown model", set_key("model", "gan"), "model", "'gan'"),
    ("unknown objective", set_key("objective", "classification"), "objective", "'classification'"),
    ("unknown sampler", set_key("sampler", "type", "grid"), "sampler.type", "'grid'"),
    ("unknown pruner", set_key("pruner", "type", "wilcoxon"), "pruner.type", "'wilcoxon'"),
    (
        "unknown sampler option",
        set_key("sampler", {"type": "random", "n_startup_trials": 3}),
        "sampler.n_startup_trials",
        "3",
    ),
    ("bad pruner option", set_key("pruner", "n_warmup_steps", -1), "pruner.n_warmup_steps", "-1"),
    ("percentile missing", set_key("pruner", {"type": "percentile"}), "pruner", "percentile"),
    ("percentile above 100", set_key("pruner", {"type": "percentile", "percentile": 150}), "pruner.percentile", "150"),
    (
        "hyperband resources reversed",
        set_key("pruner", {"type": "hyperband", "min_resource": 10, "max_resource": 5}),
        "pruner.max_resource",
        "5",
    ),
    (
        "tpe group without multivariate",
        set_key("sampler", {"group": True, "multivariate": False}),
        "sampler.group",
        "True",
    ),
    ("sampler seed negative", set_key("sampler", "seed", -1), "sampler.seed", "-1"),
    ("inherits unknown stage", set_key("stages", 1, "inherits", "losss"), "stages[1].inherits", "'losss'"),
    ("inherits later stage", set_key("stages", 0, "inherits", "arch"), "stages[0].inherits", "'arch'"),
    ("inherits itself", set_key("stages", 1, "inherits", ["arch"]), "stages[1].inherits[0]", "'arch'"),
    ("empty choices", set_key(*ARCH, "activation", "choices", []), "stages[1].params.activation.choices", "[]"),
    (
        "duplicate choice",
        set_key(*ARCH, "activation", "choices", ["ReLU", "ReLU"]),
        "stages[1].params.activation.choices[1]",
        "'ReLU'",
    ),
    (
        "unknown activation",
        set_key(*ARCH, "activation", "choices", ["ReLU", "Tanh"]),
        "stages[1].params.activation.choices[1]",
        "'Tanh'",
    ),
    (
        "unknown model parameter",
        set_key("stages", 0, "params", "dropout", {"type": "float", "low": 0.0, "high": 0.5}),
        "stages[0].params.dropout",
        "stages[0].params.dropout: unknown parameter for model convae",
    ),
    ("missing model parameter", delete_key("stages", 0, "fixed", "latent_dim"), "stages[0]", "'loss'"),
    ("beta above one", set_key("stages", 0, "params", "beta", "high", 1.5), "stages[0].params.beta.high", "1.5"),
    (
        "int param as float type",
        set_key(*ARCH, "n_filters", {"type": "float", "low": 5.0, "high": 100.0}),
        "stages[1].params.n_filters.type",
        "'float'",
    ),
    ("int bound with dot", set_key(*ARCH, "n_filters", "low", 5.0), "stages[1].params.n_filters.low", "5.0"),
    ("float written without dot", set_key(*LR, "low", "1e-5"), "stages[0].params.lr.low", "'1e-5'"),
    ("kernel too wide", set_key(*ARCH, "kernel_size", "high", 15), "stages[1]", "'kernel_size': 15"),
    (
        "unknown data statistic",
        set_key("stages", 0, "params", "gamma_m", "from_data", "mass"),
        "stages[0].params.gamma_m.from_data",
        "'mass'",
    ),
    (
        "spread out of range",
        set_key("stages", 0, "params", "gamma_m", "spread", 1.5),
        "stages[0].params.gamma_m.spread",
        "1.5",
    ),
    ("empty stages", set_key("stages", []), "stages", "[]"),
    ("empty params", set_key("stages", 0, "params", {}), "stages[0].params", "{}"),
    ("duplicate stage name", set_key("stages", 1, "name", "loss"), "stages[1].name", "'loss'"),
    ("invalid space name", set_key("name", "Tiny Space"), "name", "'Tiny Space'"),
    ("latents_from on convae", set_key("latents_from", "convae-rec"), "latents_from", "'convae-rec'"),
    ("flow reconstruction", use_flow(set_key("objective", "reconstruction")), "objective", "'reconstruction'"),
    (
        "nodes without condition",
        use_flow(delete_key("stages", 0, "params", "nodes_3", "when")),
        "stages[0].params.nodes_3.when",
        "None",
    ),
    (
        "nodes beyond layers",
        use_flow(set_key("stages", 0, "params", "nodes_4", {"type": "int", "low": 50, "high": 400, "step": 50})),
        "stages[0].params.nodes_4",
        "'nodes_4'",
    ),
    (
        "condition on later param",
        use_flow(set_key("stages", 0, "params", "lr", "when", {"param": "n_flows", "at_least": 10})),
        "stages[0].params.lr.when.param",
        "'n_flows'",
    ),
    (
        "condition never met",
        use_flow(set_key("stages", 0, "params", "nodes_3", "when", "at_least", 5)),
        "stages[0].params.nodes_3.when.at_least",
        "5",
    ),
    ("flow missing nodes", use_flow(delete_key("stages", 0, "params", "nodes_2")), "stages[0]", "'search'"),
    (
        "condition on needed param",
        use_flow(set_key("stages", 0, "params", "n_flows", "when", {"param": "lr", "at_least": 1.0e-3})),
        "stages[0].params.n_flows.when",
        "'at_least': 0.001",
    ),
    (
        "condition on first width",
        use_flow(set_key("stages", 0, "params", "nodes_1", "when", {"param": "n_mlp_layers", "at_least": 1})),
        "stages[0].params.nodes_1.when",
        "'at_least': 1",
    ),
    (
        "condition with wrong threshold",
        use_flow(set_key("stages", 0, "params", "nodes_3", "when", "at_least", 2)),
        "stages[0].params.nodes_3.when",
        "'at_least': 2",
    ),
    ("condition on text parameter", condition_on_activation, "stages[1].params.latent_dim.when.param", "'activation'"),
    (
        "flow with one flow",
        use_flow(set_key("stages", 0, "params", "n_flows", "low", 0)),
        "stages[0].params.n_flows.low",
        "0",
    ),
    ("latent flow without source", use_flow(set_key("model", "realnvp-latent")), "", "latents_from"),
]


@pytest.mark.parametrize(
    "change, key, value",
    [case[1:] for case in BAD_SPACES],
    ids=[case[0] for case in BAD_SPACES],
)
def test_invalid_space_rejected(change, key, value):
    document = flow_document() if getattr(change, "flow", False) else convae_document()
    change(document)

    with pytest.raises(SpaceError) as info:
        parse(document)

    message = str(info.value)
    assert message.startswith(f"{SOURCE}, line ")
    if key:
        assert f": {key}" in message
    assert value in message


def test_valid_documents_parse():
    assert parse(convae_document()).stage("arch").inherits == ("loss",)
    assert parse(flow_document()).stage("search").params["nodes_3"].when.at_least == 3


def single_param_stages():
    """Three ConVAE stages that each tune one parameter and fix all others."""
    fixed = {
        "lr": 1.0e-3,
        "alpha": 0.5,
        "beta": 0.95,
        "gamma": 0.5,
        "gamma_pt": 1.0,
        "gamma_m": 12.0,
        "latent_dim": 30,
        "n_filters": 50,
        "kernel_size": 5,
        "linear_nodes": 1500,
        "n_conv_layers": 3,
        "activation": "ReLU",
    }

    def stage(name, tuned):
        constants = {key: value for key, value in fixed.items() if key != tuned}
        return {"name": name, "params": {tuned: {"type": "float", "low": 0.1, "high": 1.0}}, "fixed": constants}

    document = convae_document()
    document["stages"] = [stage("first", "alpha"), stage("second", "gamma"), stage("third", "beta")]
    return document


def test_shared_ancestor_inheritance_allowed():
    document = single_param_stages()
    second, third = document["stages"][1], document["stages"][2]
    second["inherits"] = "first"
    del second["fixed"]["alpha"]
    third["inherits"] = ["first", "second"]
    del third["fixed"]["alpha"], third["fixed"]["gamma"]

    stage = parse(document).stage("third")

    assert stage.inherits == ("first", "second")
    assert {name: spec.stage for name, spec in stage.inherited.items()} == {"alpha": "first", "gamma": "second"}


def test_conflicting_inheritance_rejected():
    document = single_param_stages()
    document["stages"][1]["params"] = {"alpha": {"type": "float", "low": 0.2, "high": 0.9}}
    document["stages"][1]["fixed"]["gamma"] = 0.5
    del document["stages"][1]["fixed"]["alpha"]
    third = document["stages"][2]
    third["inherits"] = ["first", "second"]
    del third["fixed"]["alpha"]

    with pytest.raises(SpaceError) as info:
        parse(document)

    assert "stages[2].inherits = ['first', 'second']" in str(info.value)
    assert "alpha would be inherited from both stage 'first' and stage 'second'" in str(info.value)


def test_error_names_line_of_entry():
    text = yaml.safe_dump(convae_document(), sort_keys=False).replace("low: 0.9", "low: 1.9")
    line = next(number for number, content in enumerate(text.splitlines(), 1) if "low: 1.9" in content)

    with pytest.raises(SpaceError) as info:
        parse_space(text, SOURCE)

    assert info.value.line == line
    assert info.value.path == "stages[0].params.beta.low"
    assert info.value.value == 1.9


VALID_TEXT = yaml.safe_dump(convae_document(), sort_keys=False)


def test_duplicate_param_key_rejected():
    duplicate = "    alpha: {type: float, low: 0.2, high: 0.3}\n"
    text = VALID_TEXT.replace("  params:\n    lr:", "  params:\n" + duplicate + "    lr:", 1)
    lines = text.splitlines()
    first_line = lines.index("    alpha: {type: float, low: 0.2, high: 0.3}") + 1
    second_line = lines.index("    alpha:") + 1

    with pytest.raises(SpaceError) as info:
        parse_space(text, SOURCE)

    message = str(info.value)
    assert message.startswith(f"{SOURCE}, line {second_line}: stages[0].params.alpha: ")
    assert f"duplicate key 'alpha', first defined on line {first_line}" in message


def test_duplicate_top_level_key_rejected():
    with pytest.raises(SpaceError) as info:
        parse_space(VALID_TEXT + "model: realnvp-flat\n", SOURCE)

    assert f"{SOURCE}, line {len(VALID_TEXT.splitlines()) + 1}: model" in str(info.value)
    assert "duplicate key 'model'" in str(info.value)


def test_yaml_syntax_error_line_column():
    text = "name: tiny\nmodel: convae\nstages: [\n  {name: loss\n"

    with pytest.raises(SpaceError) as info:
        parse_space(text, SOURCE)

    message = str(info.value)
    assert message.startswith(f"{SOURCE}, line ")
    assert ", column " in message
    assert "YAML syntax error" in message
    assert info.value.line is not None


def test_undefined_alias_named():
    text = "name: tiny\nmodel: &kind convae\nstages: *stagez\n"

    with pytest.raises(SpaceError) as info:
        parse_space(text, SOURCE)

    assert f"{SOURCE}, line 3, column 9: YAML syntax error: found undefined alias 'stagez'" in str(info.value)


@pytest.mark.parametrize("text", ["", "\n", "# only a comment\n", "---\n"])
def test_empty_file_rejected(text):
    with pytest.raises(SpaceError, match=f"^{SOURCE}: the search space is empty"):
        parse_space(text, SOURCE)


@pytest.mark.parametrize("text, value", [("- name: loss\n", "[{'name': 'loss'}]"), ("just text\n", "'just text'")])
def test_non_mapping_top_level_rejected(text, value):
    with pytest.raises(SpaceError) as info:
        parse_space(text, SOURCE)

    assert str(info.value).startswith(f"{SOURCE}, line 1: {value}: expected a mapping")


def test_load_space_names_missing_file(tmp_path):
    path = tmp_path / "missing.yaml"

    with pytest.raises(SpaceError, match="missing.yaml: file not found"):
        load_space(path)


def test_load_space_reads_new_family(tmp_path):
    document = convae_document()
    document["name"] = "my-convae"
    path = tmp_path / "my-convae.yaml"
    path.write_text(yaml.safe_dump(document))

    space = load_space(path)

    assert space.source == str(path)
    assert study_name(space, "arch") == "my-convae.arch"
    assert study_name(space, space.stage("loss")) == "my-convae.loss"


def test_study_name_rejects_unknown_stage():
    with pytest.raises(SpaceError, match="no stage named 'search'"):
        study_name(builtin_spaces()["convae-gen"], "search")


def test_latents_from_must_name_convae_space():
    spaces = builtin_spaces()
    del spaces["convae-rec"]

    with pytest.raises(SpaceError, match="latents_from = 'convae-rec': no search space"):
        check_space_references(spaces)


def test_space_error_survives_pickle():
    with pytest.raises(SpaceError) as info:
        parse({**convae_document(), "model": "gan"})

    copy_of_error = pickle.loads(pickle.dumps(info.value))

    assert str(copy_of_error) == str(info.value)
    assert copy_of_error.path == "model"
    assert copy_of_error.value == "gan"


# fingerprint and text


def test_fingerprint_ignores_format_and_descriptions():
    space = builtin_spaces()["convae-gen"]
    document = space.to_dict()
    document["description"] = "another description"
    document["stages"][1]["description"] = "architecture"

    again = parse_space(yaml.safe_dump(document, sort_keys=True), "dump.yaml")

    assert again.fingerprint == space.fingerprint
    assert len(space.fingerprint) == 64


def test_fingerprint_changes_with_range():
    document = convae_document()
    before = parse(document).fingerprint
    document["stages"][0]["params"]["alpha"]["high"] = 0.9

    assert parse(document).fingerprint != before


def test_fingerprint_differs_between_families():
    spaces = builtin_spaces()

    assert spaces["convae-gen"].fingerprint != spaces["convae-rec"].fingerprint


def test_to_yaml_keeps_text():
    text = "# comment kept\n" + VALID_TEXT

    assert parse_space(text, SOURCE).to_yaml() == text


# samplers and pruners


@pytest.mark.parametrize(
    "sampler, expected",
    [
        ({"type": "tpe", "seed": 1, "n_startup_trials": 4}, optuna.samplers.TPESampler),
        ({"type": "random", "seed": 1}, optuna.samplers.RandomSampler),
        ({"type": "qmc", "seed": 1, "qmc_type": "halton"}, optuna.samplers.QMCSampler),
    ],
)
@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_sampler_types(sampler, expected):
    space = parse({**convae_document(), "sampler": sampler})

    assert isinstance(space.create_sampler(), expected)
    assert space.sampler.seed == 1


def test_default_sampler_and_pruner():
    document = convae_document()
    del document["sampler"], document["pruner"]
    space = parse(document)

    assert space.sampler.to_dict() == {"type": "tpe", "seed": 0}
    assert isinstance(space.create_pruner(), optuna.pruners.MedianPruner)


def test_random_samplers_differ_between_workers():
    space = parse({**convae_document(), "sampler": {"type": "random", "seed": 5}})
    stage = space.stage("loss")

    def first_lr(worker_index):
        study = optuna.create_study(sampler=space.create_sampler(worker_index))
        return stage.suggest(study.ask(), PT_OVER_MASS)["lr"]

    assert first_lr(0) == first_lr(0)
    assert first_lr(0) != first_lr(1)


@pytest.mark.parametrize(
    "pruner, expected",
    [
        ({"type": "median", "n_warmup_steps": 10}, optuna.pruners.MedianPruner),
        ({"type": "percentile", "percentile": 25.0}, optuna.pruners.PercentilePruner),
        ({"type": "hyperband", "min_resource": 5, "max_resource": "auto"}, optuna.pruners.HyperbandPruner),
        ({"type": "successive_halving", "min_resource": "auto"}, optuna.pruners.SuccessiveHalvingPruner),
        ({"type": "none"}, optuna.pruners.NopPruner),
    ],
)
def test_pruner_types(pruner, expected):
    assert isinstance(parse({**convae_document(), "pruner": pruner}).create_pruner(), expected)


# profiles


def test_builtin_profiles_load():
    assert builtin_profile_names() == ["paper", "quick", "smoke"]
    for name in builtin_profile_names():
        profile = load_profile(name)
        assert isinstance(profile, Profile)
        assert profile.name == name


def test_paper_profile_budgets():
    profile = load_profile("paper")
    spaces = builtin_spaces()

    for family in ("convae-gen", "convae-rec"):
        for stage in spaces[family].stages:
            budget = profile.search_budget(spaces[family], stage)
            assert (budget.n_trials, budget.epochs, budget.batch_size, budget.eval_every) == (300, 300, 100, 5)
        retrain = profile.retrain_budget(spaces[family])
        assert (retrain.epochs, retrain.eval_every) == (1500, 5)

    for family in ("latent-nf", "nf"):
        budget = profile.search_budget(spaces[family], "search")
        assert (budget.n_trials, budget.epochs, budget.eval_every) == (300, 20, 4)
        retrain = profile.retrain_budget(spaces[family])
        assert (retrain.epochs, retrain.eval_every) == (100, 1)

    assert profile.n_jets is None


def test_profiles_grow_from_smoke_to_paper():
    profiles = builtin_profiles()
    spaces = builtin_spaces()

    def jets(profile):
        return math.inf if profile.n_jets is None else profile.n_jets

    assert jets(profiles["smoke"]) < jets(profiles["quick"]) < jets(profiles["paper"])
    for space in spaces.values():
        for stage in space.stages:
            smoke, quick, paper = (profiles[name].search_budget(space, stage) for name in ("smoke", "quick", "paper"))
            assert smoke.n_trials < quick.n_trials < paper.n_trials, stage.study_name
            assert smoke.epochs < quick.epochs < paper.epochs, stage.study_name
        smoke, quick, paper = (profiles[name].retrain_budget(space) for name in ("smoke", "quick", "paper"))
        assert smoke.epochs < quick.epochs < paper.epochs, space.name


def profile_document():
    budget = {"n_trials": 4, "epochs": 6, "batch_size": 50, "eval_every": 2, "resources": {"cpus": 1, "gpus": 0}}
    retrain = {"epochs": 10, "batch_size": 50, "eval_every": 5, "resources": {"cpus": 1, "gpus": 0.5}}
    return {
        "name": "mine",
        "n_jets": 1000,
        "models": {model: {"search": dict(budget), "retrain": dict(retrain)} for model in MODEL_KINDS},
        "families": {
            "convae-gen": {
                "search": {"epochs": 8},
                "stages": {"arch": {"n_trials": 9, "resources": {"cpus": 2}}},
            }
        },
    }


def test_profile_family_overrides():
    profile = parse_profile(yaml.safe_dump(profile_document()), "mine.yaml")
    space = builtin_spaces()["convae-gen"]

    loss = profile.search_budget(space, "loss")
    arch = profile.search_budget(space, "arch")
    other = profile.search_budget(builtin_spaces()["convae-rec"], "arch")

    assert (loss.n_trials, loss.epochs, loss.resources.cpus) == (4, 8, 1)
    assert (arch.n_trials, arch.epochs, arch.resources.cpus, arch.resources.gpus) == (9, 8, 2, 0)
    assert (other.n_trials, other.epochs) == (4, 6)
    assert profile.retrain_budget(space).resources.gpus == 0.5


def test_load_profile_by_path(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(profile_document()))

    assert load_profile(path).n_jets == 1000
    assert load_profile(str(path)).source == str(path)


def test_unknown_profile_name_rejected():
    with pytest.raises(ProfileError, match="profile 'fast': not found. Use one of paper, quick, smoke"):
        load_profile("fast")


BAD_PROFILES = [
    ("missing model kind", delete_key("models", "realnvp-flat"), "models", "realnvp-flat"),
    ("unknown budget key", set_key("models", "convae", "search", "trials", 5), "models.convae.search.trials", "5"),
    ("zero trials", set_key("models", "convae", "search", "n_trials", 0), "models.convae.search.n_trials", "0"),
    (
        "eval after last epoch",
        set_key("models", "convae", "retrain", "eval_every", 20),
        "models.convae.retrain.eval_every",
        "20",
    ),
    (
        "negative gpus",
        set_key("models", "convae", "search", "resources", "gpus", -1),
        "models.convae.search.resources.gpus",
        "-1",
    ),
    (
        "zero cpus",
        set_key("models", "convae", "search", "resources", "cpus", 0),
        "models.convae.search.resources.cpus",
        "0",
    ),
    ("n_jets text", set_key("n_jets", "all"), "n_jets", "'all'"),
    ("unknown override key", set_key("families", "convae-gen", "trials", 3), "families.convae-gen.trials", "3"),
]


@pytest.mark.parametrize(
    "change, key, value",
    [case[1:] for case in BAD_PROFILES],
    ids=[case[0] for case in BAD_PROFILES],
)
def test_invalid_profile_rejected(change, key, value):
    document = profile_document()
    change(document)

    with pytest.raises(ProfileError) as info:
        parse_profile(yaml.safe_dump(document), "mine.yaml")

    message = str(info.value)
    assert message.startswith("mine.yaml, line ")
    assert key in message
    assert value in message


def test_profile_override_of_unknown_stage_rejected():
    document = profile_document()
    document["families"]["convae-gen"]["stages"]["search"] = {"n_trials": 2}
    profile = parse_profile(yaml.safe_dump(document), "mine.yaml")

    with pytest.raises(ProfileError, match="families.convae-gen.stages.search = 'search'"):
        profile.search_budget(builtin_spaces()["convae-gen"], "loss")


def test_override_eval_after_last_epoch():
    document = profile_document()
    document["families"]["convae-gen"]["search"] = {"epochs": 1}
    profile = parse_profile(yaml.safe_dump(document), "mine.yaml")

    with pytest.raises(ProfileError, match="eval_every = 2: eval_every is above epochs = 1"):
        profile.search_budget(builtin_spaces()["convae-gen"], "loss")


def test_profile_duplicate_key_rejected():
    text = yaml.safe_dump(profile_document()) + "n_jets: 5\n"

    with pytest.raises(ProfileError, match="duplicate key 'n_jets'"):
        parse_profile(text, "mine.yaml")
