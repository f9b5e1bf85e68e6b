"""Tests for hpo.evaluate: reference halves, metric rows, the results table and the plots.

The jets are the session's Pythia 8 gluon jets. The samplers are stand-ins with the
interface of ``models.checkpoint.JetSampler``: one replays real jets and one decodes
z ~ N(0, I) with a small untrained ConVAE.
"""

from __future__ import annotations

import json
import logging
import math
import time

import numpy as np
import pytest
import torch
from matplotlib import pyplot
from matplotlib.image import imread

from hpo.evaluate import (
    METRIC_KEYS,
    MIN_REFERENCE_JETS,
    MODEL_LABELS,
    PUBLISHED_ROWS,
    ROW_KEYS,
    TRUTH_LABEL,
    _best_point,
    _RATIO_ABOVE_GID,
    _RATIO_BAND_LABEL,
    _RATIO_BELOW_GID,
    _density_ratio,
    _draw_comparison,
    _format_jet_share,
    _histogram,
    evaluate_sampler,
    markdown_table,
    metric_settings,
    plot_efps,
    plot_jet_distributions,
    plot_training_history,
    reference_halves,
    results_document,
    truth_row,
)
from models.convae import ConVAE, ConVAEConfig
from models.data import MinMaxScaler, split_jets
from models.metrics import MetricInputError, evaluate_generated

METRIC_SEED = 2
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class ReplaySampler:
    """Returns the first n of the given real jets, after sleeping ``seconds_per_jet`` per jet."""

    def __init__(
        self, constituents: np.ndarray, seconds_per_jet: float = 0.0, name: str = "replay"
    ):
        self.name = name
        self.device = torch.device("cpu")
        self.constituents = np.asarray(constituents, dtype=np.float64)
        self.seconds_per_jet = seconds_per_jet
        self.calls: list[tuple[int, int | None]] = []

    def sample_gev(
        self, n: int, generator: torch.Generator, batch_size: int | None = None
    ) -> np.ndarray:
        self.calls.append((n, batch_size))
        time.sleep(self.seconds_per_jet * n)
        return self.constituents[:n].copy()


class UntrainedConVAESampler:
    """Decodes z ~ N(0, I) with a small untrained ConVAE and maps the output to GeV."""

    name = "convae"

    def __init__(self, scaler: MinMaxScaler):
        self.device = torch.device("cpu")
        self.scaler = scaler
        with torch.random.fork_rng():
            torch.manual_seed(0)
            config = ConVAEConfig(
                latent_dim=4, n_filters=2, kernel_size=3, linear_nodes=16, n_conv_layers=2
            )
            self.model = ConVAE(config).eval()

    def sample_gev(
        self, n: int, generator: torch.Generator, batch_size: int | None = None
    ) -> np.ndarray:
        step = batch_size or n
        sizes = [min(step, n - start) for start in range(0, n, step)]
        with torch.no_grad():
            scaled = torch.cat([self.model.sample(size, generator) for size in sizes])
        return self.scaler.inverse_transform(scaled).double().numpy()


@pytest.fixture(scope="module")
def splits(pythia_jets):
    return split_jets(pythia_jets, seed=0)


@pytest.fixture(scope="module")
def halves(splits):
    return reference_halves(splits.test.constituents, splits.test.mask, seed=1)


@pytest.fixture(scope="module")
def truth(halves):
    return truth_row(*halves, seed=METRIC_SEED)


@pytest.fixture(scope="module")
def convae_sampler(splits):
    scaler = MinMaxScaler().fit(splits.train.constituents, splits.train.mask)
    return UntrainedConVAESampler(scaler)


@pytest.fixture(scope="module")
def convae_evaluation(convae_sampler, halves):
    return evaluate_sampler(convae_sampler, halves[1], seed=METRIC_SEED, batch_size=16)


def diverged_row(halves) -> dict:
    nan_jets = np.full_like(halves[1][0], np.nan, dtype=np.float64)
    sampler = ReplaySampler(nan_jets, name="nf")
    row, _ = evaluate_sampler(sampler, halves[1], seed=METRIC_SEED, batch_size=8)
    return row


def table_cells(table: str, label: str) -> list[str]:
    for line in table.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if cells[0] == label:
            return cells
    raise AssertionError(f"no table row labelled {label!r} in:\n{table}")


def assert_png(path, width: int, height: int) -> None:
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = imread(path)
    assert image.shape[:2] == (height, width)
    assert image[..., :3].std() > 0.05
    assert pyplot.get_fignums() == []


# metric settings


@pytest.mark.parametrize("n_reference", [45, 225, 13_296])
def test_settings_fit_profile_sample_sizes(n_reference):
    settings = metric_settings(n_reference)

    assert settings.num_eval_samples == min(50_000, n_reference)
    assert settings.cov_mmd_samples == min(100, n_reference)
    assert 2 <= settings.fpd_min_samples < settings.fpd_max_samples <= n_reference
    assert settings.fpd_max_samples == n_reference
    assert settings.kpd_batch_size <= n_reference
    assert settings.fpnd


# FPD's covariances of 36 EFPs from 2 to 4 jets are singular, which jetnet and scipy warn about
@pytest.mark.filterwarnings("ignore:Matrix is singular")
@pytest.mark.filterwarnings("ignore:invalid value encountered in scalar divide")
def test_settings_smallest_sample_runs(halves):
    (constituents_a, mask_a), (constituents_b, mask_b) = halves
    n = MIN_REFERENCE_JETS

    metrics = evaluate_generated(
        constituents_a[:n], mask_a[:n], constituents_b[:n], mask_b[:n], 0, settings=metric_settings(n)
    )

    for key in ("w1m", "w1p", "w1efp", "cov", "mmd", "fpd", "kpd", "fpnd", "emd_sum"):
        assert math.isfinite(metrics[key]), key


def test_settings_reject_too_few_jets():
    with pytest.raises(MetricInputError, match=f"at least {MIN_REFERENCE_JETS} jets, got 3"):
        metric_settings(MIN_REFERENCE_JETS - 1)


def test_settings_use_device_for_fpnd():
    assert metric_settings(45, device="cuda:1").device == "cuda:1"


# reference halves


def jet_keys(constituents: np.ndarray) -> set[bytes]:
    return {jet.tobytes() for jet in np.ascontiguousarray(constituents)}


def test_halves_are_disjoint_test_jets(splits, halves):
    (constituents_a, mask_a), (constituents_b, mask_b) = halves
    test_keys = jet_keys(splits.test.constituents)

    assert len(constituents_a) == len(constituents_b) == len(splits.test) // 2
    assert mask_a.shape == (len(constituents_a), 30)
    assert not jet_keys(constituents_a) & jet_keys(constituents_b)
    assert jet_keys(constituents_a) | jet_keys(constituents_b) <= test_keys


def test_halves_keep_masks(halves):
    for constituents, mask in halves:
        assert not constituents[~mask].any()
        assert (np.hypot(constituents[..., 0], constituents[..., 1])[mask] > 0).all()


def test_halves_seeded(splits, halves):
    again = reference_halves(splits.test.constituents, splits.test.mask, seed=1)
    other = reference_halves(splits.test.constituents, splits.test.mask, seed=5)

    np.testing.assert_array_equal(again[0][0], halves[0][0])
    np.testing.assert_array_equal(again[1][0], halves[1][0])
    assert jet_keys(other[0][0]) != jet_keys(halves[0][0])


def test_halves_odd_count_leaves_one_out(splits):
    constituents, mask = splits.test.constituents[:11], splits.test.mask[:11]

    (constituents_a, _), (constituents_b, _) = reference_halves(constituents, mask, seed=0)

    assert len(constituents_a) == len(constituents_b) == 5


def test_halves_reject_too_few_jets(splits):
    with pytest.raises(MetricInputError, match="has 7 jets"):
        reference_halves(splits.test.constituents[:7], splits.test.mask[:7], seed=0)


# truth row and model rows


def test_truth_row_scores_two_real_halves(truth, halves):
    assert tuple(truth) == ROW_KEYS
    assert truth["model"] == "truth"
    assert truth["label"] == TRUTH_LABEL
    assert truth["published"] is False
    assert truth["n_jets"] == len(halves[0][0])
    assert truth["seed"] == METRIC_SEED
    assert truth["time_us_per_jet"] is None
    assert truth["batch_size"] is None
    for key in METRIC_KEYS:
        assert math.isfinite(truth[key]), key
    terms = [truth[f"emd_{name}"] for name in ("mass", "energy", "pt", "eta", "phi")]
    assert truth["emd_sum"] == pytest.approx(sum(terms))
    assert 0 < truth["cov"] <= 1
    # Pythia 8 jets are not JetNet's jets, so their FPND to JetNet's statistics is above 0
    assert truth["fpnd"] > 0


@pytest.fixture(scope="module")
def replay_evaluation(halves):
    sampler = ReplaySampler(halves[0][0], seconds_per_jet=1e-3)
    row, generated = evaluate_sampler(sampler, halves[1], seed=METRIC_SEED, batch_size=16)
    return sampler, row, generated


def test_replayed_half_matches_truth(truth, halves, replay_evaluation):
    _, row, generated = replay_evaluation

    np.testing.assert_array_equal(generated, halves[0][0])
    for key in METRIC_KEYS:
        assert row[key] == pytest.approx(truth[key], rel=1e-9), key


def test_sampler_timing_covers_whole_sample(halves, replay_evaluation):
    sampler, row, _ = replay_evaluation
    n_jets = len(halves[1][0])

    # one warm-up batch, then the whole sample in batches of 16, sleeping 1 ms per jet
    assert sampler.calls == [(16, 16), (n_jets, 16)]
    assert row["time_us_per_jet"] >= 1000.0
    assert row["batch_size"] == 16
    assert row["n_jets"] == n_jets
    assert "CPU" in row["device"]
    assert "threads" in row["device"]


def test_untrained_convae_worse_than_truth(convae_evaluation, truth):
    row, _ = convae_evaluation

    assert tuple(row) == ROW_KEYS
    assert row["model"] == "convae"
    assert row["label"] == MODEL_LABELS["convae"]
    assert row["published"] is False
    assert row["emd_sum"] > 2 * truth["emd_sum"]
    assert row["w1m"] > truth["w1m"]
    assert row["fpnd"] > truth["fpnd"]


def test_generated_jets_follow_seed(convae_evaluation, convae_sampler, halves):
    _, generated = convae_evaluation
    n_jets = len(halves[1][0])

    same_seed = torch.Generator().manual_seed(METRIC_SEED)
    other_seed = torch.Generator().manual_seed(METRIC_SEED + 1)
    expected = convae_sampler.sample_gev(n_jets, same_seed, batch_size=16)
    other = convae_sampler.sample_gev(n_jets, other_seed, batch_size=16)

    assert generated.shape == (n_jets, 30, 3)
    assert generated.dtype == np.float64
    np.testing.assert_array_equal(generated, expected)
    assert not np.array_equal(generated, other)


def test_diverged_model_row_is_inf(halves):
    row = diverged_row(halves)

    assert row["emd_sum"] == math.inf
    assert row["w1m"] == math.inf
    assert row["fpnd"] == math.inf
    assert math.isnan(row["cov"])
    assert row["label"] == MODEL_LABELS["nf"]


def test_sampler_wrong_shape_rejected(halves):
    sampler = ReplaySampler(np.zeros((60, 30, 4)), name="nf")

    with pytest.raises(ValueError, match=r"sampler 'nf' returned jets of shape \(45, 30, 4\)"):
        evaluate_sampler(sampler, halves[1], seed=0, batch_size=8)


@pytest.mark.parametrize("batch_size", [0, -5, 2.5, True])
def test_sampler_bad_batch_size_rejected(halves, batch_size):
    with pytest.raises(ValueError, match="batch_size must be a positive number"):
        evaluate_sampler(ReplaySampler(halves[0][0]), halves[1], seed=0, batch_size=batch_size)


def test_reference_too_small_rejected(halves):
    constituents, mask = halves[1]

    with pytest.raises(MetricInputError, match="reference must contain at least 4 jets, got 3"):
        evaluate_sampler(ReplaySampler(halves[0][0]), (constituents[:3], mask[:3]), seed=0, batch_size=8)


# published rows, results document and table


def test_published_rows_have_row_keys():
    labels = [row["label"] for row in PUBLISHED_ROWS]

    assert labels == ["ConVAE+NF (published, JetNet gluon jets)", "MPGAN (published, JetNet gluon jets)"]
    for row in PUBLISHED_ROWS:
        assert tuple(row) == ROW_KEYS
        assert row["published"] is True
        assert row["emd_sum"] is None
        assert row["device"] == "NVIDIA T4"
        assert "10.1088/2632-2153/ad04ea" in row["source"]


def test_published_convae_nf_values():
    row = PUBLISHED_ROWS[0]

    assert (row["w1m"], row["w1p"], row["w1efp"]) == (4.5e-3, 5.3e-3, 197e-5)
    assert (row["fpnd"], row["cov"], row["mmd"]) == (34.3, 0.38, 0.034)
    assert row["time_us_per_jet"] == 18.3


@pytest.fixture(scope="module")
def document(truth, convae_evaluation, halves):
    rows = [truth, convae_evaluation[0], diverged_row(halves), *PUBLISHED_ROWS]
    return results_document(
        rows,
        pipeline={"profile": "smoke", "seed": np.int64(0)},
        data={"path": "/data/jets.hdf5", "fingerprint": "1a2b3c4d5e6f", "test_jets": 90},
        hardware={"cpu": "test CPU", "gpus": []},
    )


def test_document_is_strict_json(document):
    text = json.dumps(document, allow_nan=False)
    restored = json.loads(text)

    assert restored["format"] == "jethpo-results"
    assert restored["pipeline"] == {"profile": "smoke", "seed": 0}
    assert [row["model"] for row in restored["rows"]] == ["truth", "convae", "nf", "convae-nf", "mpgan"]


def test_document_keeps_non_finite_as_text(document):
    diverged = document["rows"][2]

    assert diverged["emd_sum"] is None
    assert diverged["non_finite"]["emd_sum"] == "inf"
    assert diverged["non_finite"]["cov"] == "nan"
    assert document["rows"][0]["non_finite"] == {}


def test_document_rejects_row_without_key(truth):
    row = dict(truth)
    del row["fpnd"]

    expected = r"row 'Truth \(two disjoint real samples\)' is missing the keys \['fpnd'\]"
    with pytest.raises(ValueError, match=expected):
        results_document([row], pipeline={}, data={}, hardware={})


def test_table_columns_and_rows(document):
    table = markdown_table(document)
    lines = table.splitlines()

    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    assert header == [
        "Model", "W1M ↓ (×10⁻³)", "W1P ↓ (×10⁻³)", "W1EFP ↓ (×10⁻⁵)", "FPND ↓", "COV ↑",
        "MMD ↓", "EMD_sum ↓", "Time (µs/jet)", "Timed on",
    ]  # fmt: skip
    table_lines = [line for line in lines if line.startswith("|")]
    assert len(table_lines) == 2 + len(document["rows"])


def test_table_published_row_scaled(document):
    cells = table_cells(markdown_table(document), "ConVAE+NF (published, JetNet gluon jets)")

    assert cells[1:9] == ["4.5", "5.3", "197", "34.3", "0.38", "0.034", "—", "18.3"]
    assert cells[9] == "NVIDIA T4, batch size not published"


def test_table_model_row_names_timing(document):
    row = document["rows"][1]
    cells = table_cells(markdown_table(document), MODEL_LABELS["convae"])

    assert cells[1].startswith(f"{row['w1m'] * 1e3:.3g} ± ")
    assert cells[9] == f"{row['device']}, batch size 16"


def test_table_truth_and_diverged_rows(document):
    table = markdown_table(document)
    truth_cells = table_cells(table, TRUTH_LABEL)
    diverged_cells = table_cells(table, MODEL_LABELS["nf"])

    assert truth_cells[8:] == ["—", "—"]
    assert diverged_cells[7] == "inf"
    assert diverged_cells[5] == "nan"


def test_table_notes_name_data_and_sources(document):
    table = markdown_table(document)

    assert "fingerprint `1a2b3c4d5e6f`" in table
    assert "profile `smoke`" in table
    assert "(45 jets)" in table
    assert "arXiv:2310.13138" in table


# plots


def test_density_ratio_by_hand():
    ratio, error = _density_ratio(np.array([20.0, 80.0, 4.0]), np.array([10.0, 40.0, 0.0]))

    np.testing.assert_allclose(ratio[:2], [20 / 104 / (10 / 50), 80 / 104 / (40 / 50)])
    np.testing.assert_allclose(error[:2], ratio[:2] / np.sqrt([20.0, 80.0]))
    assert math.isnan(ratio[2])


def test_density_ratio_empty_generated_bin():
    ratio, error = _density_ratio(np.array([0.0, 10.0]), np.array([5.0, 5.0]))

    np.testing.assert_allclose(ratio, [0.0, 2.0])
    assert error[0] == 0.0


def test_density_ratio_normalised_to_sample_size():
    # 10 of 20 generated and 10 of 40 real jets in the bin; the rest are outside the range
    ratio, error = _density_ratio(np.array([10.0]), np.array([10.0]), 20, 40)

    np.testing.assert_allclose(ratio, [(10 / 20) / (10 / 40)])
    np.testing.assert_allclose(error, ratio / np.sqrt(10.0))


def test_histogram_counts_outside_range():
    values = np.array([-1.0, 0.0, 0.5, 1.0, 2.0, 3.0, 4.0])

    counts, underflow, overflow = _histogram(values, np.array([0.0, 1.0, 2.0]))

    # the last bin includes its upper edge, as in numpy.histogram
    np.testing.assert_array_equal(counts, [2.0, 2.0])
    assert underflow == 1
    assert overflow == 2


@pytest.mark.parametrize(
    ("count", "total", "text"),
    [(5, 45, "5 jets (11 %)"), (1, 22, "1 jet (4.5 %)"), (3, 10_000, "3 jets (0.03 %)"), (45, 45, "45 jets (100 %)")],
)
def test_format_jet_share(count, total, text):
    assert _format_jet_share(count, total) == text


def figure_texts(monkeypatch) -> list[str]:
    """Collect the text of every figure that hpo.evaluate saves from now on."""
    import matplotlib.text

    import hpo.evaluate

    texts: list[str] = []
    save = hpo.evaluate._save

    def save_and_record(figure, path):
        texts.extend(text.get_text() for text in figure.findobj(matplotlib.text.Text))
        return save(figure, path)

    monkeypatch.setattr(hpo.evaluate, "_save", save_and_record)
    return texts


def test_jet_plot_lists_overflow(tmp_path, halves, monkeypatch):
    # the real jets with 5 of them scaled up 1000 times: their mass, energy and pT overflow
    texts = figure_texts(monkeypatch)
    scaled = halves[1][0].astype(np.float64)
    scaled[:5] *= 1000.0
    n_jets = len(scaled)

    plot_jet_distributions(halves[1], {"nf": (scaled, halves[1][1])}, tmp_path / "jets.png")

    share = _format_jet_share(5, n_jets)
    assert texts.count("Overflow:") == 3
    assert texts.count(share) == 3
    assert "Underflow:" not in texts
    assert "Underflow / overflow: jets below / above the range" in " ".join(texts)


def test_jet_plot_lists_underflow(tmp_path, halves, monkeypatch):
    # every constituent of 4 jets gets pz = -50 pT, so the jets' eta is about -4.6
    texts = figure_texts(monkeypatch)
    forward = halves[1][0].astype(np.float64)
    forward[:4, :, 2] = -50.0 * np.hypot(forward[:4, :, 0], forward[:4, :, 1])

    plot_jet_distributions(halves[1], {"nf": (forward, halves[1][1])}, tmp_path / "jets.png")

    assert "Underflow:" in texts
    assert _format_jet_share(4, len(forward)) in texts


def test_efp_plot_lists_outside_range(tmp_path, halves, monkeypatch):
    # only the leading constituent of each jet is kept, and a one-particle jet has EFPs of 0,
    # below the logarithmic bins
    texts = figure_texts(monkeypatch)
    mask = halves[1][1].copy()
    mask[:, 1:] = False

    plot_efps(halves[1], {"nf": (halves[1][0], mask)}, tmp_path / "efps.png", efp_jobs=1)

    assert texts.count("Underflow:") == 5
    assert texts.count(_format_jet_share(len(mask), len(mask))) == 5


def draw_ratio_panel(real: np.ndarray, generated: np.ndarray, edges: np.ndarray):
    """Draw one comparison of real and generated values, and return its ratio axis."""
    from matplotlib.figure import Figure

    figure = Figure()
    main_axis, ratio_axis = figure.subplots(2, 1)
    _draw_comparison(
        main_axis,
        ratio_axis,
        real,
        {"nf": generated},
        edges,
        xlabel="x",
        unit=None,
        real_label="Real jets",
    )
    return ratio_axis


def edge_markers(ratio_axis, gid: str) -> np.ndarray:
    """Return the x positions of the ratio axis's edge markers with this gid."""
    positions = [line.get_xdata() for line in ratio_axis.lines if line.get_gid() == gid]
    return np.concatenate(positions) if positions else np.array([])


def test_ratio_above_range_marked_at_edge():
    # Bin [0, 1) has 10 % of the real and 50 % of the generated values, a ratio of 5.
    # Bin [1, 2) has 90 % and 40 %, a ratio of 0.44. Bin [2, 3) has no real values.
    real = np.concatenate([np.full(10, 0.5), np.full(90, 1.5)])
    generated = np.concatenate([np.full(50, 0.5), np.full(40, 1.5), np.full(10, 2.5)])

    ratio_axis = draw_ratio_panel(real, generated, np.array([0.0, 1.0, 2.0, 3.0]))

    np.testing.assert_array_equal(edge_markers(ratio_axis, _RATIO_ABOVE_GID), [0.5])
    assert len(edge_markers(ratio_axis, _RATIO_BELOW_GID)) == 0
    marker = next(line for line in ratio_axis.lines if line.get_gid() == _RATIO_ABOVE_GID)
    assert marker.get_marker() == "^"
    assert marker.get_color() == "#5790fc"
    assert [text.get_text() for text in ratio_axis.texts] == ["5"]
    assert ratio_axis.get_ylim() == (0.0, 2.0)


def test_ratio_zero_and_undefined_unmarked():
    # Bin [0, 1) has no generated values, so its ratio of 0 lies on the bottom edge, inside
    # the range. Bin [2, 3) has no real values, so its ratio is undefined.
    real = np.concatenate([np.full(50, 0.5), np.full(50, 1.5)])
    generated = np.concatenate([np.full(50, 1.5), np.full(50, 2.5)])

    ratio_axis = draw_ratio_panel(real, generated, np.array([0.0, 1.0, 2.0, 3.0]))

    assert len(edge_markers(ratio_axis, _RATIO_ABOVE_GID)) == 0
    assert len(edge_markers(ratio_axis, _RATIO_BELOW_GID)) == 0
    assert len(ratio_axis.texts) == 0


def test_ratio_values_unwritten_when_many():
    # 6 bins with 1 of 100 real and 10 of 60 generated values each give six ratios of
    # about 17, too many to write each value
    real = np.concatenate([np.arange(6) + 0.5, np.full(94, 6.5)])
    generated = np.repeat(np.arange(6) + 0.5, 10)
    edges = np.arange(8, dtype=np.float64)

    ratio_axis = draw_ratio_panel(real, generated, edges)

    np.testing.assert_array_equal(edge_markers(ratio_axis, _RATIO_ABOVE_GID), np.arange(6) + 0.5)
    assert len(ratio_axis.texts) == 0


def test_ratio_values_unwritten_in_neighbouring_bins():
    # bins [0, 1) and [1, 2) both have a ratio of 5, and their labels would overlap
    real = np.concatenate([np.full(5, 0.5), np.full(5, 1.5), np.full(90, 2.5)])
    generated = np.concatenate([np.full(25, 0.5), np.full(25, 1.5), np.full(50, 2.5)])

    ratio_axis = draw_ratio_panel(real, generated, np.array([0.0, 1.0, 2.0, 3.0]))

    np.testing.assert_array_equal(edge_markers(ratio_axis, _RATIO_ABOVE_GID), [0.5, 1.5])
    assert len(ratio_axis.texts) == 0


def test_jet_plot_legend_explains_ratio_panel(tmp_path, halves, monkeypatch):
    # the first 20 generated jets are copies of real jet 0, so jet 0's bin in each panel
    # gets about 20 more generated than real jets, a ratio above 2 in some panel
    texts = figure_texts(monkeypatch)
    generated = halves[1][0].astype(np.float64)
    generated[:20] = generated[0]
    mask = halves[1][1].copy()
    mask[:20] = mask[0]

    plot_jet_distributions(halves[1], {"nf": (generated, mask)}, tmp_path / "jets.png")

    assert _RATIO_BAND_LABEL in texts
    assert "Ratio above 2, drawn at the panel's top edge" in texts


def test_jet_distribution_plot_written(tmp_path, halves, convae_evaluation):
    generated = {"convae": (convae_evaluation[1], None), "other half": halves[0]}

    path = plot_jet_distributions(
        halves[1], generated, tmp_path / "plots" / "jets.png", title="Pythia 8 gluon jets"
    )

    assert path == tmp_path / "plots" / "jets.png"
    assert_png(path, width=2160, height=1320)


def test_jet_distribution_plot_skips_nan_jets(tmp_path, halves, caplog):
    nan_jets = halves[0][0].astype(np.float64)
    nan_jets[:5, 0, 0] = np.nan

    with caplog.at_level(logging.WARNING, logger="hpo.evaluate"):
        path = plot_jet_distributions(halves[1], {"nf": (nan_jets, None)}, tmp_path / "jets.png")

    assert path.exists()
    assert "left out 5 of 45 jets" in caplog.text


def test_efp_plot_written(tmp_path, halves, convae_evaluation):
    generated = {"convae": (convae_evaluation[1], None)}

    path = plot_efps(halves[1], generated, tmp_path / "efps.png", efp_jobs=1)

    assert_png(path, width=2160, height=1320)


def test_history_plot_written(tmp_path):
    history = [(epoch, 40.0 / epoch + 2.0) for epoch in range(1, 21)] + [(21, math.inf)]

    path = plot_training_history(history, "convae-gen retraining", tmp_path / "history.png")

    assert_png(path, width=1080, height=780)


def test_history_plot_ticks_whole_epochs(tmp_path, monkeypatch):
    import hpo.evaluate

    ticks = []
    save = hpo.evaluate._save

    def keep_ticks(figure, path):
        figure.canvas.draw()
        ticks.extend(figure.axes[0].get_xticks())
        return save(figure, path)

    monkeypatch.setattr(hpo.evaluate, "_save", keep_ticks)
    plot_training_history([(1, 3.0), (2, 2.0)], "smoke retraining", tmp_path / "history.png")

    assert ticks
    assert all(float(tick).is_integer() for tick in ticks)


def test_best_point_skips_non_finite():
    history = [(1, 5.0), (2, math.inf), (3, 2.0), (4, 2.0), (5, math.nan)]

    assert _best_point(history) == (3, 2.0)
    assert _best_point([(1, math.inf)]) is None


def test_history_plot_rejects_empty(tmp_path):
    with pytest.raises(ValueError, match="'nf retraining' is empty"):
        plot_training_history([], "nf retraining", tmp_path / "history.png")
