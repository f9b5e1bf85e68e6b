"""Training loops on real Pythia 8 jets: EMD_sum falls, the best state is kept, NaN stops."""

import dataclasses
import math

import numpy as np
import pytest
import torch

import models.training as training
from models.convae import ConVAE, ConVAEConfig
from models.data import MinMaxScaler, split_jets
from models.losses import LossWeights, gamma_m_range
from models.realnvp import RealNVP
from models.training import (
    NonFiniteLossError,
    evaluate_convae,
    flatten_jets,
    train_convae,
    train_realnvp,
    unflatten_jets,
)

SMALL_CONVAE = ConVAEConfig(
    latent_dim=8, n_filters=4, kernel_size=3, linear_nodes=64, n_conv_layers=2, activation="ReLU"
)


@pytest.fixture(scope="module")
def prepared(pythia_jets):
    splits = split_jets(pythia_jets, seed=3)
    scaler = MinMaxScaler().fit(splits.train.constituents, splits.train.mask)
    train = torch.as_tensor(scaler.transform(splits.train.constituents), dtype=torch.float32)
    validation = torch.as_tensor(scaler.transform(splits.validation.constituents), dtype=torch.float32)
    low, high = gamma_m_range(splits.train.constituents, splits.train.mask)
    weights = LossWeights(alpha=1.0, beta=0.95, gamma=0.5, gamma_pt=1.0, gamma_m=(low + high) / 2)
    return splits, scaler, train, validation, weights


def test_flatten_orders_px_then_py_then_pz():
    jets = torch.arange(2 * 30 * 3, dtype=torch.float32).reshape(2, 30, 3)
    flat = flatten_jets(jets)

    torch.testing.assert_close(flat[0, :30], jets[0, :, 0])
    torch.testing.assert_close(flat[0, 30:60], jets[0, :, 1])
    torch.testing.assert_close(flat[0, 60:], jets[0, :, 2])
    torch.testing.assert_close(unflatten_jets(flat), jets)


@pytest.mark.slow
def test_convae_generation_training_lowers_validation_emd(prepared):
    splits, scaler, train, validation, weights = prepared
    torch.manual_seed(0)
    model = ConVAE(SMALL_CONVAE)
    before = evaluate_convae(
        model, "generation", validation, splits.validation.constituents, scaler, torch.Generator().manual_seed(5)
    )
    reported = []

    result = train_convae(
        model,
        train,
        validation,
        scaler,
        weights,
        objective="generation",
        epochs=30,
        batch_size=32,
        lr=3e-3,
        seed=1,
        data_fingerprint=splits.train.fingerprint,
        eval_every=5,
        callback=lambda epoch, value: reported.append((epoch, value)),
    )

    assert [epoch for epoch, _ in reported] == [5, 10, 15, 20, 25, 30]
    assert reported == result.history
    assert result.best_emd_sum == min(value for _, value in reported)
    assert result.best_emd_sum < 0.5 * before, (before, result.history)


@pytest.mark.slow
def test_convae_checkpoint_restores_best_state(prepared, tmp_path):
    splits, scaler, train, validation, weights = prepared
    model = ConVAE(SMALL_CONVAE)
    result = train_convae(
        model,
        train,
        validation,
        scaler,
        weights,
        objective="reconstruction",
        epochs=4,
        batch_size=64,
        lr=1e-3,
        seed=2,
        data_fingerprint=splits.train.fingerprint,
        eval_every=2,
    )
    path = tmp_path / "best.pt"
    torch.save(result.checkpoint, path)
    checkpoint = torch.load(path, weights_only=True)

    restored = ConVAE(ConVAEConfig(**checkpoint["hyperparameters"]))
    restored.load_state_dict(checkpoint["state_dict"])
    value = evaluate_convae(
        restored,
        "reconstruction",
        validation,
        splits.validation.constituents,
        MinMaxScaler.from_state_dict(checkpoint["scaler"]),
        torch.Generator(),
    )

    assert checkpoint["epoch"] == result.best_epoch
    assert checkpoint["data_fingerprint"] == splits.train.fingerprint
    assert checkpoint["seed"] == 2
    assert checkpoint["loss_weights"]["gamma_m"] == weights.gamma_m
    assert value == pytest.approx(result.best_emd_sum, rel=1e-6)


def test_convae_nan_loss_raises_with_epoch(prepared):
    splits, scaler, train, validation, weights = prepared
    poisoned = train.clone()
    poisoned[0, 0, 0] = math.nan

    with pytest.raises(NonFiniteLossError, match="epoch 1"):
        train_convae(
            ConVAE(SMALL_CONVAE),
            poisoned,
            validation,
            scaler,
            weights,
            objective="generation",
            epochs=2,
            batch_size=len(poisoned),
            lr=1e-3,
            seed=0,
            data_fingerprint="x",
        )


def test_callback_exception_stops_training(prepared):
    splits, scaler, train, validation, weights = prepared

    class Stop(Exception):
        pass

    def stop_at_first(epoch, value):
        raise Stop(epoch)

    with pytest.raises(Stop) as raised:
        train_convae(
            ConVAE(SMALL_CONVAE),
            train,
            validation,
            scaler,
            weights,
            objective="generation",
            epochs=10,
            batch_size=128,
            lr=1e-3,
            seed=0,
            data_fingerprint="x",
            eval_every=1,
            callback=stop_at_first,
        )
    assert raised.value.args == (1,)


@pytest.mark.slow
def test_standalone_flow_training_keeps_best_checkpoint(prepared):
    splits, scaler, train, validation, weights = prepared
    flow = RealNVP(dim=90, n_flows=4, hidden_sizes=[64])
    result = train_realnvp(
        flow,
        flatten_jets(train),
        unflatten_jets,
        splits.validation.constituents,
        scaler,
        epochs=4,
        batch_size=64,
        lr=1e-3,
        seed=4,
        data_fingerprint=splits.train.fingerprint,
        eval_every=2,
    )

    assert [epoch for epoch, _ in result.history] == [2, 4]
    assert np.isfinite(result.best_emd_sum)
    assert result.checkpoint["hyperparameters"] == {"dim": 90, "n_flows": 4, "hidden_sizes": [64]}
    assert result.checkpoint["epoch"] == result.best_epoch


# resuming


@pytest.fixture(scope="module")
def few_jets(prepared):
    """64 training and 24 validation jets of ``prepared``, enough for quick resume checks."""
    splits, scaler, train, validation, weights = prepared
    return {
        "scaler": scaler,
        "weights": weights,
        "train": train[:64],
        "validation": validation[:24],
        "validation_gev": splits.validation.constituents[:24],
        "fingerprint": splits.train.fingerprint,
    }


def _convae_run(few_jets, epochs, *, resume=None, on_state=None, callback=None, model_seed=0, **changes):
    torch.manual_seed(model_seed)
    model = ConVAE(changes.pop("config", SMALL_CONVAE))
    settings = {
        "objective": "generation",
        "epochs": epochs,
        "batch_size": 16,
        "lr": 3e-3,
        "seed": 7,
        "data_fingerprint": few_jets["fingerprint"],
        "eval_every": 1,
    } | changes
    result = train_convae(
        model,
        few_jets["train"],
        few_jets["validation"],
        few_jets["scaler"],
        few_jets["weights"],
        resume=resume,
        on_state=on_state,
        callback=callback,
        **settings,
    )
    return model, result


def _flow_run(few_jets, epochs, *, resume=None, on_state=None, model_seed=0, **changes):
    torch.manual_seed(model_seed)
    flow = RealNVP(dim=90, n_flows=changes.pop("n_flows", 4), hidden_sizes=[32])
    settings = {
        "epochs": epochs,
        "batch_size": 16,
        "lr": 1e-3,
        "lr_decay": 0.8,
        "seed": 9,
        "data_fingerprint": few_jets["fingerprint"],
        "eval_every": 2,
    } | changes
    result = train_realnvp(
        flow,
        flatten_jets(few_jets["train"]),
        unflatten_jets,
        few_jets["validation_gev"],
        few_jets["scaler"],
        resume=resume,
        on_state=on_state,
        **settings,
    )
    return flow, result


def _saved_and_loaded(state, path):
    torch.save(state, path)
    return torch.load(path, weights_only=True)


def _assert_same_tensors(actual: dict, expected: dict):
    assert actual.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(actual[name], tensor), name


def _assert_same_checkpoint(actual: dict, expected: dict):
    assert actual.keys() == expected.keys()
    _assert_same_tensors(actual["state_dict"], expected["state_dict"])
    for key in expected.keys() - {"state_dict"}:
        assert actual[key] == expected[key], key


def _assert_same_adam_state(actual: dict, expected: dict):
    assert actual["param_groups"] == expected["param_groups"]
    assert actual["state"].keys() == expected["state"].keys()
    for index, moments in expected["state"].items():
        _assert_same_tensors(actual["state"][index], moments)


def test_convae_resume_matches_uninterrupted_run(few_jets, tmp_path):
    whole_states = []
    whole_model, whole = _convae_run(few_jets, 4, on_state=whole_states.append)
    first_states = []
    _convae_run(few_jets, 2, on_state=first_states.append)
    state = _saved_and_loaded(first_states[-1], tmp_path / "state.pt")

    # other initial weights and another global RNG state, which the resume must overwrite
    torch.manual_seed(12345)
    resumed_states = []
    resumed_model, resumed = _convae_run(
        few_jets, 4, resume=state, on_state=resumed_states.append, model_seed=99
    )

    assert state["epoch"] == 2
    assert [epoch for epoch, _ in resumed.history] == [1, 2, 3, 4]
    assert resumed.history == whole.history
    assert resumed.best_epoch == whole.best_epoch
    assert resumed.best_emd_sum == whole.best_emd_sum
    _assert_same_tensors(resumed_model.state_dict(), whole_model.state_dict())
    _assert_same_checkpoint(resumed.checkpoint, whole.checkpoint)
    _assert_same_adam_state(resumed_states[-1]["optimizer"], whole_states[-1]["optimizer"])
    assert [saved["epoch"] for saved in resumed_states] == [3, 4]


def test_realnvp_resume_matches_uninterrupted_run(few_jets, tmp_path):
    whole_states = []
    whole_flow, whole = _flow_run(few_jets, 4, on_state=whole_states.append)
    first_states = []
    _flow_run(few_jets, 2, on_state=first_states.append)
    state = _saved_and_loaded(first_states[-1], tmp_path / "state.pt")

    torch.manual_seed(12345)
    resumed_states = []
    resumed_flow, resumed = _flow_run(
        few_jets, 4, resume=state, on_state=resumed_states.append, model_seed=99
    )

    assert [epoch for epoch, _ in resumed.history] == [2, 4]
    assert resumed.history == whole.history
    assert resumed.best_epoch == whole.best_epoch
    _assert_same_tensors(resumed_flow.state_dict(), whole_flow.state_dict())
    _assert_same_checkpoint(resumed.checkpoint, whole.checkpoint)
    _assert_same_adam_state(resumed_states[-1]["optimizer"], whole_states[-1]["optimizer"])
    # lr 1e-3 decayed by 0.8 after each of the 4 epochs
    assert resumed_states[-1]["lr_scheduler"]["_last_lr"] == pytest.approx([1e-3 * 0.8**4])
    assert resumed_states[-1]["lr_scheduler"] == whole_states[-1]["lr_scheduler"]


def test_resume_leaves_state_unchanged(few_jets):
    states = []
    _convae_run(few_jets, 1, on_state=states.append)
    state = states[-1]
    adam_moments = state["optimizer"]["state"]
    moments_before = {index: moments["exp_avg"].clone() for index, moments in adam_moments.items()}

    _convae_run(few_jets, 2, resume=state)

    for index, moments in state["optimizer"]["state"].items():
        assert torch.equal(moments["exp_avg"], moments_before[index]), index


def test_on_state_follows_callback_and_keeps_best(few_jets):
    events = []
    states = []

    def keep(state):
        events.append(("state", state["epoch"]))
        states.append(state)

    _, result = _convae_run(
        few_jets, 2, on_state=keep, callback=lambda epoch, value: events.append(("callback", epoch))
    )

    assert events == [("callback", 1), ("state", 1), ("callback", 2), ("state", 2)]
    assert states[-1]["best"] is result.checkpoint
    assert states[-1]["best_epoch"] == result.best_epoch
    assert states[-1]["history"] == [[epoch, value] for epoch, value in result.history]
    assert states[-1]["emd_sum"] == result.history[-1][1]


def test_resume_at_last_epoch_trains_nothing(few_jets):
    states = []
    _, finished = _convae_run(few_jets, 2, on_state=states.append)

    model, result = _convae_run(few_jets, 2, resume=states[-1], model_seed=99)

    assert result.history == finished.history
    assert result.best_epoch == finished.best_epoch
    _assert_same_tensors(model.state_dict(), states[-1]["state_dict"])


def test_resume_past_requested_epochs_raises(few_jets):
    states = []
    _convae_run(few_jets, 2, on_state=states.append)

    with pytest.raises(ValueError, match="at epoch 2, past the 1 epochs"):
        _convae_run(few_jets, 1, resume=states[-1])


@pytest.fixture(scope="module")
def convae_state(few_jets):
    states = []
    _convae_run(few_jets, 1, on_state=states.append)
    return states[-1]


@pytest.mark.parametrize(
    ("changes", "key"),
    [
        ({"seed": 8}, "'seed'"),
        ({"data_fingerprint": "0" * 64}, "'data_fingerprint'"),
        ({"config": dataclasses.replace(SMALL_CONVAE, latent_dim=6)}, "'hyperparameters'"),
        ({"objective": "reconstruction"}, "'objective'"),
        ({"lr": 1e-3}, "'lr'"),
        ({"batch_size": 32}, "'batch_size'"),
    ],
    ids=["seed", "data", "hyperparameters", "objective", "lr", "batch size"],
)
def test_convae_resume_rejects_other_run(few_jets, convae_state, changes, key):
    with pytest.raises(ValueError, match=f"resume state does not match this ConVAE training run: {key}"):
        _convae_run(few_jets, 2, resume=convae_state, **changes)


def test_realnvp_resume_rejects_convae_state(few_jets, convae_state):
    with pytest.raises(ValueError, match="'kind' is 'convae' in the state but 'realnvp' here"):
        _flow_run(few_jets, 2, resume=convae_state)


def test_realnvp_resume_rejects_other_flow_size(few_jets):
    states = []
    _flow_run(few_jets, 2, on_state=states.append)

    with pytest.raises(ValueError, match="'hyperparameters'"):
        _flow_run(few_jets, 4, resume=states[-1], n_flows=6)


def test_latent_flow_resume_rejects_other_convae(few_jets):
    def latent_run(convae_seed, epochs, resume=None, on_state=None):
        torch.manual_seed(convae_seed)
        convae = ConVAE(SMALL_CONVAE)
        with torch.no_grad():
            latents = convae.encode(few_jets["train"])[0]
        torch.manual_seed(0)
        flow = RealNVP(dim=SMALL_CONVAE.latent_dim, n_flows=2, hidden_sizes=[16])
        latent_model = {
            "hyperparameters": dataclasses.asdict(convae.config),
            "state_dict": convae.state_dict(),
        }
        return train_realnvp(
            flow,
            latents,
            convae.decode,
            few_jets["validation_gev"],
            few_jets["scaler"],
            epochs=epochs,
            batch_size=16,
            lr=1e-3,
            seed=3,
            data_fingerprint=few_jets["fingerprint"],
            eval_every=1,
            extra_checkpoint={"latent_model": latent_model},
            resume=resume,
            on_state=on_state,
        )

    states = []
    latent_run(convae_seed=1, epochs=1, on_state=states.append)

    resumed = latent_run(convae_seed=1, epochs=2, resume=states[-1])
    assert [epoch for epoch, _ in resumed.history] == [1, 2]
    with pytest.raises(ValueError, match="'latent_model'"):
        latent_run(convae_seed=2, epochs=2, resume=states[-1])


def test_resume_rejects_state_without_optimizer(few_jets, convae_state):
    incomplete = {key: value for key, value in convae_state.items() if key != "optimizer"}

    with pytest.raises(ValueError, match="missing 'optimizer'"):
        _convae_run(few_jets, 2, resume=incomplete)


# evaluation in batches


def _recording(decode, batches: list):
    """Wrap ``decode`` so that each call appends its output to ``batches``."""

    def record(z):
        jets = decode(z)
        batches.append(jets)
        return jets

    return record


@pytest.mark.parametrize("objective", ["generation", "reconstruction"])
def test_batched_evaluation_matches_unbatched(prepared, objective):
    splits, scaler, train, validation, weights = prepared
    torch.manual_seed(0)
    model = ConVAE(SMALL_CONVAE)
    decode = model.decode
    runs = {}
    for batch_size in (len(validation), 16):
        batches = []
        model.decode = _recording(decode, batches)
        generator = torch.Generator().manual_seed(5)
        value = evaluate_convae(
            model, objective, validation, splits.validation.constituents, scaler, generator, batch_size=batch_size
        )
        runs[batch_size] = (value, batches, generator.get_state())
    del model.decode

    unbatched_value, unbatched_batches, unbatched_generator_state = runs[len(validation)]
    value, batches, generator_state = runs[16]
    n_full, rest = divmod(len(validation), 16)
    assert [len(batch) for batch in unbatched_batches] == [len(validation)]
    assert [len(batch) for batch in batches] == [16] * n_full + [rest]
    torch.testing.assert_close(torch.cat(batches), unbatched_batches[0])
    assert value == pytest.approx(unbatched_value, rel=1e-6)
    assert torch.equal(generator_state, unbatched_generator_state)


def test_evaluation_rejects_zero_batch_size(prepared):
    splits, scaler, train, validation, weights = prepared

    with pytest.raises(ValueError, match="batch_size must be a positive integer, got 0"):
        evaluate_convae(
            ConVAE(SMALL_CONVAE),
            "generation",
            validation,
            splits.validation.constituents,
            scaler,
            torch.Generator(),
            batch_size=0,
        )


def test_latent_flow_batched_evaluation_matches_unbatched(few_jets, monkeypatch):
    torch.manual_seed(1)
    convae = ConVAE(SMALL_CONVAE)
    with torch.no_grad():
        latents = convae.encode(few_jets["train"])[0]

    def run(eval_batch_size):
        monkeypatch.setattr(training, "EVAL_BATCH_SIZE", eval_batch_size)
        batches = []
        torch.manual_seed(0)
        flow = RealNVP(dim=SMALL_CONVAE.latent_dim, n_flows=2, hidden_sizes=[16])
        result = train_realnvp(
            flow,
            latents,
            _recording(convae.decode, batches),
            few_jets["validation_gev"],
            few_jets["scaler"],
            epochs=2,
            batch_size=16,
            lr=1e-3,
            seed=3,
            data_fingerprint=few_jets["fingerprint"],
            eval_every=1,
        )
        return result, batches

    unbatched, unbatched_batches = run(10_000)
    batched, batches = run(10)

    # 24 validation jets, decoded after each of the 2 epochs
    assert [len(batch) for batch in unbatched_batches] == [24, 24]
    assert [len(batch) for batch in batches] == [10, 10, 4, 10, 10, 4]
    torch.testing.assert_close(torch.cat(batches[:3]), unbatched_batches[0])
    torch.testing.assert_close(torch.cat(batches[3:]), unbatched_batches[1])
    assert [epoch for epoch, _ in batched.history] == [1, 2]
    for (_, value), (_, unbatched_value) in zip(batched.history, unbatched.history):
        assert value == pytest.approx(unbatched_value, rel=1e-6)
    _assert_same_tensors(batched.checkpoint["state_dict"], unbatched.checkpoint["state_dict"])
