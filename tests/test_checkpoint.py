"""Checkpoint files and jet samplers, on small networks trained for an epoch on Pythia 8 jets."""

import importlib.metadata

import numpy as np
import pytest
import torch

from models.checkpoint import (
    CheckpointError,
    convae_from_checkpoint,
    load_checkpoint,
    sampler_from_checkpoint,
    save_checkpoint,
)
from models.convae import ConVAE, ConVAEConfig
from models.data import MinMaxScaler, split_jets
from models.losses import LossWeights, gamma_m_range
from models.metrics import emd_sum
from models.realnvp import RealNVP
from models.training import flatten_jets, train_convae, train_realnvp, unflatten_jets

SMALL_CONVAE = ConVAEConfig(
    latent_dim=6, n_filters=4, kernel_size=3, linear_nodes=32, n_conv_layers=2, activation="ReLU"
)
SEED = 5


@pytest.fixture(scope="module")
def jets(pythia_jets):
    """120 Pythia 8 jets split 84/18/18, scaled, and the loss weights of a generation-tuned ConVAE."""
    splits = split_jets(pythia_jets.subset(np.arange(120)), seed=3)
    scaler = MinMaxScaler().fit(splits.train.constituents, splits.train.mask)
    train = torch.as_tensor(scaler.transform(splits.train.constituents), dtype=torch.float32)
    validation = torch.as_tensor(scaler.transform(splits.validation.constituents), dtype=torch.float32)
    low, high = gamma_m_range(splits.train.constituents, splits.train.mask)
    weights = LossWeights(alpha=1.0, beta=0.95, gamma=0.5, gamma_pt=1.0, gamma_m=(low + high) / 2)
    return {
        "scaler": scaler,
        "train": train,
        "validation": validation,
        "validation_gev": splits.validation.constituents,
        "fingerprint": splits.train.fingerprint,
        "weights": weights,
    }


def _train_convae(jets, epochs=1, **resuming):
    torch.manual_seed(0)
    model = ConVAE(SMALL_CONVAE)
    result = train_convae(
        model,
        jets["train"],
        jets["validation"],
        jets["scaler"],
        jets["weights"],
        objective="generation",
        epochs=epochs,
        batch_size=21,
        lr=3e-3,
        seed=SEED,
        data_fingerprint=jets["fingerprint"],
        **resuming,
    )
    return model, result


def _train_flow(jets, inputs, decode, extra_checkpoint=None):
    torch.manual_seed(0)
    flow = RealNVP(dim=inputs.shape[1], n_flows=2, hidden_sizes=[16])
    result = train_realnvp(
        flow,
        inputs,
        decode,
        jets["validation_gev"],
        jets["scaler"],
        epochs=1,
        batch_size=21,
        lr=1e-3,
        seed=SEED,
        data_fingerprint=jets["fingerprint"],
        extra_checkpoint=extra_checkpoint,
    )
    return flow, result


@pytest.fixture(scope="module")
def trained(jets):
    """One-epoch checkpoints of the three generators, keyed by sampler name."""
    convae, convae_result = _train_convae(jets)

    with torch.no_grad():
        latents = convae.encode(jets["train"])[0]
    latent_model = {
        "hyperparameters": convae_result.checkpoint["hyperparameters"],
        "state_dict": convae_result.checkpoint["state_dict"],
    }
    _, latent_result = _train_flow(jets, latents, convae.decode, {"latent_model": latent_model})
    _, flat_result = _train_flow(jets, flatten_jets(jets["train"]), unflatten_jets)

    return {
        "convae": (convae, convae_result.checkpoint),
        "convae-nf": (convae, latent_result.checkpoint),
        "nf": (None, flat_result.checkpoint),
    }


# files


def test_save_adds_version_and_round_trips(trained, tmp_path):
    _, checkpoint = trained["convae"]
    path = save_checkpoint(checkpoint, tmp_path / "studies" / "convae-gen" / "best.pt")

    loaded = load_checkpoint(path)

    assert path == tmp_path / "studies" / "convae-gen" / "best.pt"
    assert loaded["jethpo_version"] == importlib.metadata.version("jethpo")
    assert "jethpo_version" not in checkpoint
    assert loaded["kind"] == "convae"
    assert loaded["epoch"] == checkpoint["epoch"]
    assert loaded["emd_sum"] == checkpoint["emd_sum"]
    assert loaded["state_dict"].keys() == checkpoint["state_dict"].keys()
    for name, tensor in checkpoint["state_dict"].items():
        assert torch.equal(loaded["state_dict"][name], tensor), name


def test_save_keeps_existing_version(trained, tmp_path):
    _, checkpoint = trained["nf"]
    path = save_checkpoint(checkpoint | {"jethpo_version": "0.0.1"}, tmp_path / "nf.pt")

    assert load_checkpoint(path)["jethpo_version"] == "0.0.1"


def test_save_leaves_only_the_target_file(trained, tmp_path):
    _, checkpoint = trained["nf"]
    save_checkpoint(checkpoint, tmp_path / "nf.pt")
    save_checkpoint(checkpoint, tmp_path / "nf.pt")

    assert [path.name for path in tmp_path.iterdir()] == ["nf.pt"]


def test_failed_save_keeps_previous_file(trained, tmp_path):
    _, checkpoint = trained["convae"]
    path = save_checkpoint(checkpoint, tmp_path / "best.pt")

    # a local function cannot be pickled, so torch.save fails halfway through
    def unpicklable():
        pass

    with pytest.raises(Exception):
        save_checkpoint(checkpoint | {"epoch": 99, "note": unpicklable}, path)

    assert load_checkpoint(path)["epoch"] == checkpoint["epoch"]
    assert [entry.name for entry in tmp_path.iterdir()] == ["best.pt"]


def test_load_missing_file_names_path(tmp_path):
    path = tmp_path / "missing.pt"

    with pytest.raises(CheckpointError, match="missing.pt: checkpoint file not found"):
        load_checkpoint(path)


@pytest.mark.parametrize(
    "contents", [b"", b"px,py,pz\n1.0,2.0,3.0\n"], ids=["empty file", "csv file"]
)
def test_load_unreadable_file_names_path(tmp_path, contents):
    path = tmp_path / "jets.pt"
    path.write_bytes(contents)

    with pytest.raises(CheckpointError, match="jets.pt: not a readable PyTorch checkpoint"):
        load_checkpoint(path)


def test_load_truncated_file_names_path(trained, tmp_path):
    _, checkpoint = trained["convae"]
    path = save_checkpoint(checkpoint, tmp_path / "best.pt")
    path.write_bytes(path.read_bytes()[:1000])

    with pytest.raises(CheckpointError, match="best.pt: not a readable PyTorch checkpoint"):
        load_checkpoint(path)


def test_load_rejects_pickled_scaler_object(trained, tmp_path):
    _, checkpoint = trained["convae"]
    path = tmp_path / "unsafe.pt"
    # the scaler object instead of its state dict: unpickling it would run jethpo code
    scaler = MinMaxScaler.from_state_dict(checkpoint["scaler"])
    torch.save(checkpoint | {"scaler": scaler}, path)

    expected = "unsafe.pt: cannot be loaded with weights_only=True"
    with pytest.raises(CheckpointError, match=expected) as raised:
        load_checkpoint(path)
    assert "MinMaxScaler" in str(raised.value)


def test_load_rejects_dict_without_weights(trained, tmp_path):
    _, checkpoint = trained["convae"]
    path = tmp_path / "partial.pt"
    torch.save({key: value for key, value in checkpoint.items() if key not in ("state_dict", "scaler")}, path)

    expected = "partial.pt: not a jethpo checkpoint, because it lacks state_dict, scaler"
    with pytest.raises(CheckpointError, match=expected):
        load_checkpoint(path)


def test_load_rejects_list(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(3)], path)

    with pytest.raises(CheckpointError, match="list.pt: contains a list"):
        load_checkpoint(path)


def test_load_rejects_other_data_fingerprint(trained, tmp_path):
    _, checkpoint = trained["convae"]
    path = save_checkpoint(checkpoint, tmp_path / "best.pt")
    current = "f" * 64

    with pytest.raises(CheckpointError) as raised:
        load_checkpoint(path, data_fingerprint=current)

    message = str(raised.value)
    assert str(path) in message
    assert checkpoint["data_fingerprint"][:12] in message
    assert "ffffffffffff" in message
    assert "jethpo retrain STUDY" in message


def test_load_accepts_same_data_fingerprint(trained, tmp_path):
    _, checkpoint = trained["convae"]
    path = save_checkpoint(checkpoint, tmp_path / "best.pt")

    loaded = load_checkpoint(path, data_fingerprint=checkpoint["data_fingerprint"])

    assert loaded["data_fingerprint"] == checkpoint["data_fingerprint"]


def test_saved_training_state_resumes_training(jets, tmp_path):
    states = []
    _train_convae(jets, epochs=1, eval_every=1, on_state=states.append)
    path = save_checkpoint(states[-1], tmp_path / "state.pt")

    state = load_checkpoint(path, data_fingerprint=jets["fingerprint"])
    resumed_model, resumed = _train_convae(jets, epochs=2, eval_every=1, resume=state)
    whole_model, whole = _train_convae(jets, epochs=2, eval_every=1)

    assert state["epoch"] == 1
    assert resumed.history == whole.history
    for name, tensor in whole_model.state_dict().items():
        assert torch.equal(resumed_model.state_dict()[name], tensor), name


# samplers


@pytest.mark.parametrize("name", ["convae", "convae-nf", "nf"])
def test_sampler_reproduces_validation_emd(trained, jets, tmp_path, name):
    # After one epoch, the training's only evaluation drew its jets from a fresh generator
    # seeded with seed + 1. A sampler with that generator makes the same jets, so the
    # EMD_sum stored in the checkpoint comes back exactly.
    _, checkpoint = trained[name]
    loaded = load_checkpoint(save_checkpoint(checkpoint, tmp_path / f"{name}.pt"))
    sampler = sampler_from_checkpoint(loaded)
    # train_convae compares with the scaled float32 validation jets mapped back to GeV,
    # train_realnvp with the GeV jets it is given
    if name == "convae":
        reference = jets["scaler"].inverse_transform(jets["validation"].double()).numpy()
    else:
        reference = jets["validation_gev"]

    generated = sampler.sample_gev(len(reference), torch.Generator().manual_seed(SEED + 1))

    assert sampler.name == name
    assert generated.dtype == np.float64
    assert generated.shape == (len(reference), 30, 3)
    assert emd_sum(generated, reference).total == checkpoint["emd_sum"]


def test_convae_jets_stay_inside_scaler_range(trained, jets):
    # the decoder ends in a sigmoid, so every generated momentum component lies between
    # the smallest and the largest value of that component among the training constituents
    _, checkpoint = trained["convae"]
    sampler = sampler_from_checkpoint(checkpoint)

    generated = sampler.sample_gev(50, torch.Generator().manual_seed(0), batch_size=16)

    assert generated.shape == (50, 30, 3)
    assert (generated >= jets["scaler"].minimum).all()
    assert (generated <= jets["scaler"].maximum).all()


@pytest.mark.parametrize("name", ["convae", "convae-nf", "nf"])
def test_batches_draw_from_generator_in_turn(trained, name):
    _, checkpoint = trained[name]
    sampler = sampler_from_checkpoint(checkpoint)

    batched = sampler.sample_gev(20, torch.Generator().manual_seed(8), batch_size=8)
    again = sampler.sample_gev(20, torch.Generator().manual_seed(8), batch_size=8)
    generator = torch.Generator().manual_seed(8)
    first = sampler.sample_scaled(8, generator)
    second = sampler.sample_scaled(8, generator)

    np.testing.assert_array_equal(batched, again)
    np.testing.assert_array_equal(batched[:8], sampler.scaler.inverse_transform(first.double()).numpy())
    np.testing.assert_array_equal(batched[8:16], sampler.scaler.inverse_transform(second.double()).numpy())


def test_sample_scaled_is_eval_mode_without_grad(trained):
    _, checkpoint = trained["convae-nf"]
    sampler = sampler_from_checkpoint(checkpoint, device="cpu")

    jets = sampler.sample_scaled(4, torch.Generator().manual_seed(0))

    assert jets.shape == (4, 30, 3)
    assert not jets.requires_grad
    assert jets.device == torch.device("cpu")
    assert sampler.device == torch.device("cpu")
    assert not sampler.convae.training
    assert not sampler.flow.training


def test_n_parameters_counts_decoder_and_flow(trained):
    convae, checkpoint = trained["convae-nf"]
    sampler = sampler_from_checkpoint(checkpoint)
    flow = RealNVP(**checkpoint["hyperparameters"])

    decoder_parameters = sum(parameter.numel() for parameter in convae.decoder.parameters())
    flow_parameters = sum(parameter.numel() for parameter in flow.parameters())

    assert sampler.n_parameters == decoder_parameters + flow_parameters


@pytest.mark.parametrize("n", [0, -3, 2.5])
def test_sampler_rejects_invalid_jet_count(trained, n):
    sampler = sampler_from_checkpoint(trained["convae"][1])

    with pytest.raises(ValueError, match="n must be a positive integer"):
        sampler.sample_gev(n, torch.Generator())


def test_sampler_rejects_invalid_batch_size(trained):
    sampler = sampler_from_checkpoint(trained["nf"][1])

    with pytest.raises(ValueError, match="batch_size must be a positive integer, got 0"):
        sampler.sample_gev(10, torch.Generator(), batch_size=0)


def test_sampler_rejects_weights_of_other_architecture(trained):
    _, checkpoint = trained["convae"]
    wider = checkpoint["hyperparameters"] | {"latent_dim": 7}

    with pytest.raises(CheckpointError, match="weights do not fit the ConVAE"):
        sampler_from_checkpoint(checkpoint | {"hyperparameters": wider})


def test_sampler_rejects_flow_of_other_latent_dim(trained):
    _, checkpoint = trained["convae-nf"]
    latent_model = dict(checkpoint["latent_model"])
    convae = ConVAE(ConVAEConfig(**(latent_model["hyperparameters"] | {"latent_dim": 4})))
    latent_model["hyperparameters"] = latent_model["hyperparameters"] | {"latent_dim": 4}
    latent_model["state_dict"] = convae.state_dict()

    expected = "the flow has dimension 6, but its ConVAE has a latent dimension of 4"
    with pytest.raises(CheckpointError, match=expected):
        sampler_from_checkpoint(checkpoint | {"latent_model": latent_model})


def test_sampler_rejects_unknown_kind(trained):
    _, checkpoint = trained["convae"]

    with pytest.raises(CheckpointError, match="checkpoint kind 'gan' is invalid"):
        sampler_from_checkpoint(checkpoint | {"kind": "gan"})


def test_convae_from_checkpoint_encodes_like_trained_model(trained, jets):
    convae, checkpoint = trained["convae"]

    restored = convae_from_checkpoint(checkpoint)

    assert not restored.training
    with torch.no_grad():
        torch.testing.assert_close(restored.encode(jets["validation"]), convae.encode(jets["validation"]))


def test_convae_from_latent_flow_checkpoint_returns_its_convae(trained, jets):
    convae, checkpoint = trained["convae-nf"]

    restored = convae_from_checkpoint(checkpoint)

    assert restored.config == convae.config
    with torch.no_grad():
        torch.testing.assert_close(restored.encode(jets["validation"]), convae.encode(jets["validation"]))


def test_convae_from_standalone_flow_checkpoint_raises(trained):
    with pytest.raises(CheckpointError, match="a standalone NF checkpoint contains no ConVAE"):
        convae_from_checkpoint(trained["nf"][1])
