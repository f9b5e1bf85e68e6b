"""Training loops on real Pythia 8 jets: EMD_sum falls, the best state is kept, NaN stops."""

import math

import numpy as np
import pytest
import torch

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
