"""Final evaluation of the retrained models: the metric table with its truth and published rows,
and the plots of generated against real jets.

Every model is compared with the same reference sample, one half of the test split. The truth
row compares the other half with it, so it shows how close two real samples of that size get.
Jets are ``[n_jets, 30, 3]`` arrays of (px, py, pz) in GeV with an optional bool mask
``[n_jets, 30]`` that is true for real constituents.

Plots are drawn with matplotlib's object API and the Agg canvas, in mplhep's CMS style, and
never touch pyplot's global figures or backend.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import math
import os
import platform
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from models.checkpoint import jethpo_version
from models.jets import KINEMATIC_NAMES, N_PARTICLES, jet_kinematics_numpy, relative_coordinates
from models.metrics import JetNetMetricSettings, MetricInputError, evaluate_generated

__all__ = [
    "METRIC_KEYS",
    "MIN_REFERENCE_JETS",
    "MODEL_LABELS",
    "PUBLISHED_ROWS",
    "ROW_KEYS",
    "TRUTH_LABEL",
    "Sampler",
    "describe_device",
    "describe_hardware",
    "evaluate_sampler",
    "markdown_table",
    "metric_settings",
    "plot_efps",
    "plot_jet_distributions",
    "plot_training_history",
    "reference_halves",
    "results_document",
    "truth_row",
]

logger = logging.getLogger(__name__)

#: Table labels of the three generative models, keyed by sampler name.
MODEL_LABELS = {"convae": "ConVAE (generation-tuned)", "convae-nf": "ConVAE+NF", "nf": "NF"}

#: Minimum number of jets in a reference sample. FPD extrapolates from batches of at least 2
#: jets up to the whole sample, and jetnet 0.2.5's FPD raised a ValueError on 3 jets when tried
#: with :func:`metric_settings`.
MIN_REFERENCE_JETS = 4

#: Table label of the row that compares two disjoint real samples.
TRUTH_LABEL = "Truth (two disjoint real samples)"

#: Metric keys of a row, as :func:`models.metrics.evaluate_generated` returns them. W1M, W1P
#: and W1EFP are dimensionless (relative coordinates). The ``emd_*`` terms of jet mass,
#: energy and pT are in GeV, those of eta and phi are in units of eta and radians.
METRIC_KEYS = (
    "w1m", "w1m_err", "w1p", "w1p_err", "w1p_etarel", "w1p_phirel", "w1p_ptrel",
    "w1efp", "w1efp_err", "fpnd", "cov", "mmd", "fpd", "fpd_err", "kpd", "kpd_err",
    "emd_sum", "emd_mass", "emd_energy", "emd_pt", "emd_eta", "emd_phi",
)  # fmt: skip

#: Keys of every row, model rows, the truth row and published rows alike. Values that do
#: not apply to a row are None: timing for the truth row, EMD_sum for the published rows.
ROW_KEYS = (
    "model",
    "label",
    "published",
    *METRIC_KEYS,
    "time_us_per_jet",
    "batch_size",
    "device",
    "n_jets",
    "seed",
    "source",
)

_PUBLISHED_SOURCE = (
    "Orzari et al. (2023), LHC hadronic jet generation using convolutional variational "
    "autoencoders with normalizing flows, Mach. Learn.: Sci. Technol., "
    "doi:10.1088/2632-2153/ad04ea, arXiv:2310.13138"
)


def _row(**values: Any) -> dict[str, Any]:
    unknown = set(values) - set(ROW_KEYS)
    if unknown:
        raise ValueError(f"unknown row keys {sorted(unknown)}. A row has the keys {ROW_KEYS}")
    return {key: values.get(key) for key in ROW_KEYS}


#: The published gluon-jet results on JetNet that the table quotes next to this project's own.
#: Their timings are per jet on an NVIDIA T4 GPU, and no batch size is given.
#: NOTE: of these numbers only the ConVAE+NF time (18.30 +- 0.04 us/jet) was checked, against
#: the abstract of arXiv:2310.13138, which does not name the GPU. The T4 and the other values
#: were not checked against that paper's tables.
PUBLISHED_ROWS: tuple[dict[str, Any], ...] = (
    _row(
        model="convae-nf",
        label="ConVAE+NF (published, JetNet gluon jets)",
        published=True,
        w1m=4.5e-3,
        w1p=5.3e-3,
        w1efp=197e-5,
        fpnd=34.3,
        cov=0.38,
        mmd=0.034,
        time_us_per_jet=18.3,
        device="NVIDIA T4",
        source=_PUBLISHED_SOURCE,
    ),
    _row(
        model="mpgan",
        label="MPGAN (published, JetNet gluon jets)",
        published=True,
        w1m=0.7e-3,
        w1p=0.9e-3,
        w1efp=0.7e-5,
        fpnd=0.12,
        cov=0.56,
        mmd=0.037,
        time_us_per_jet=35.7,
        device="NVIDIA T4",
        source=f"as quoted by {_PUBLISHED_SOURCE}",
    ),
)


class Sampler(Protocol):
    """Interface of a jet generator that the evaluation calls, implemented by
    ``models.checkpoint.JetSampler``."""

    name: str
    device: torch.device | str

    def sample_gev(
        self, n: int, generator: torch.Generator, batch_size: int | None = None
    ) -> np.ndarray:
        """Generate ``[n, 30, 3]`` (px, py, pz) in GeV, in batches of ``batch_size`` jets."""


# --------------------------------------------------------------------------------------------
# metric settings, reference samples and rows


def metric_settings(n_reference: int, *, device: str = "cpu", efp_jobs: int | None = 1) -> JetNetMetricSettings:
    """Choose jetnet metric settings for a reference sample of ``n_reference`` jets.

    jetnet's recommended sizes assume 50,000 jets. Each batch size here is capped at the
    sample size, because jetnet draws its batches with replacement and a larger batch only
    repeats jets. FPD's extrapolation runs from half the sample to all of it. Halves of the
    test split of 600 jets (45 jets), of 3,000 jets (225) and of JetNet's 177,252 gluon jets
    (about 13,300) thus all give settings that jetnet accepts. The batch counts keep jetnet's
    defaults.

    Args:
        n_reference: Number of reference jets, at least :data:`MIN_REFERENCE_JETS`.
        device: Torch device for FPND's ParticleNet.
        efp_jobs: Processes for energyflow's EFPs. The default 1 computes them in this
            process: energyflow forks a pool otherwise, and a fork of a Ray worker, which
            runs many threads, can deadlock in a lock that another thread held.

    Returns:
        The settings, with FPND enabled.

    Raises:
        MetricInputError: ``n_reference`` is not an integer of at least
            :data:`MIN_REFERENCE_JETS`.
    """
    if (
        isinstance(n_reference, bool)
        or not isinstance(n_reference, (int, np.integer))
        or n_reference < MIN_REFERENCE_JETS
    ):
        raise MetricInputError(
            f"the jetnet metrics need a reference sample of at least {MIN_REFERENCE_JETS} jets, "
            f"got {n_reference!r}. Use more test jets."
        )
    n_reference = int(n_reference)
    defaults = JetNetMetricSettings()
    fpd_max = min(defaults.fpd_max_samples, n_reference)
    fpd_min = max(2, min(defaults.fpd_min_samples, fpd_max // 2))
    return JetNetMetricSettings(
        num_eval_samples=min(defaults.num_eval_samples, n_reference),
        cov_mmd_samples=min(defaults.cov_mmd_samples, n_reference),
        fpd_min_samples=fpd_min,
        fpd_max_samples=fpd_max,
        kpd_batch_size=min(defaults.kpd_batch_size, n_reference),
        fpnd_max_jets=min(defaults.fpnd_max_jets, n_reference),
        device=str(device),
        efp_jobs=efp_jobs,
    )


def reference_halves(
    test_constituents: np.ndarray, test_mask: np.ndarray, seed: int
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """Split the test jets at random into two disjoint halves of equal size.

    The permutation comes from ``numpy.random.default_rng(seed)``. For an odd number of jets
    one jet is left out. Each half keeps the jets in their original order.

    Args:
        test_constituents: ``[n_jets, 30, 3]`` (px, py, pz) in GeV.
        test_mask: ``[n_jets, 30]``, true for real constituents.
        seed: Seed of the permutation.

    Returns:
        ``((constituents_a, mask_a), (constituents_b, mask_b))``. Models are compared with
        half b, and the truth row compares half a with half b.

    Raises:
        MetricInputError: The shapes are wrong or there are fewer than
            ``2 * MIN_REFERENCE_JETS`` jets.
    """
    constituents, mask = _check_sample((test_constituents, test_mask), "test jets", min_jets=0)
    if len(constituents) < 2 * MIN_REFERENCE_JETS:
        raise MetricInputError(
            f"the test split has {len(constituents)} jets, but two halves of at least "
            f"{MIN_REFERENCE_JETS} jets each need {2 * MIN_REFERENCE_JETS}. Use more jets."
        )
    half = len(constituents) // 2
    order = np.random.default_rng(seed).permutation(len(constituents))
    first = np.sort(order[:half])
    second = np.sort(order[half : 2 * half])
    return (constituents[first], mask[first]), (constituents[second], mask[second])


def evaluate_sampler(
    sampler: Sampler,
    reference: tuple[np.ndarray, np.ndarray],
    *,
    seed: int,
    batch_size: int,
    settings: JetNetMetricSettings | None = None,
) -> tuple[dict[str, Any], np.ndarray]:
    """Generate as many jets as the reference sample, time the generation and score the jets.

    Generation uses ``torch.Generator().manual_seed(seed)``, so the same sampler and seed
    give the same jets. One batch is generated first to warm up the device. Then the whole
    sample is timed: the wall time of ``sample_gev`` over all jets, divided by the number of
    jets. It includes the inverse scaling and the copy to host memory. Every generated
    constituent counts as real in the metrics (no mask).

    Args:
        sampler: A ``models.checkpoint.JetSampler`` or another :class:`Sampler`.
        reference: ``(constituents [n, 30, 3] GeV, mask [n, 30])``, normally half b of
            :func:`reference_halves`.
        seed: Seed of the generated jets and of the metrics' bootstrap batches.
        batch_size: Jets per generation batch, at least 1.
        settings: jetnet metric settings, by default ``metric_settings(n, device=...)`` on
            the sampler's device.

    Returns:
        The row, with the keys :data:`ROW_KEYS`, and the generated jets, float64
        ``[n, 30, 3]`` (px, py, pz) in GeV.

    Raises:
        MetricInputError: The reference jets have a wrong shape or fewer than
            :data:`MIN_REFERENCE_JETS` jets.
        ValueError: ``batch_size`` is below 1, or the sampler returned jets of the wrong shape.
    """
    reference_constituents, reference_mask = _check_sample(reference, "reference")
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive number of jets, got {batch_size!r}")
    n_jets = len(reference_constituents)
    if settings is None:
        settings = metric_settings(n_jets, device=str(_torch_device(sampler.device)))

    # warm-up, then the timed sample
    warm_up_generator = torch.Generator().manual_seed(seed)
    sampler.sample_gev(min(batch_size, n_jets), warm_up_generator, batch_size=batch_size)
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    generated = sampler.sample_gev(n_jets, generator, batch_size=batch_size)
    elapsed_s = time.perf_counter() - start

    generated = np.asarray(generated, dtype=np.float64)
    expected_shape = (n_jets, *reference_constituents.shape[1:])
    if generated.shape != expected_shape:
        raise ValueError(
            f"sampler {sampler.name!r} returned jets of shape {generated.shape} for "
            f"{n_jets} jets, expected {expected_shape}"
        )

    metrics = evaluate_generated(
        generated, None, reference_constituents, reference_mask, seed, settings=settings
    )
    row = _row(
        model=sampler.name,
        label=MODEL_LABELS.get(sampler.name, sampler.name),
        published=False,
        **_metric_values(metrics),
        time_us_per_jet=elapsed_s / n_jets * 1e6,
        batch_size=int(batch_size),
        device=describe_device(sampler.device),
        n_jets=n_jets,
        seed=int(seed),
    )
    logger.info(
        "Evaluated %s on %d jets: EMD_sum %.4g, W1M %.3g, FPND %.3g, %.3g us/jet at batch size %d",
        sampler.name,
        n_jets,
        row["emd_sum"],
        row["w1m"],
        row["fpnd"],
        row["time_us_per_jet"],
        batch_size,
    )
    return row, generated


def truth_row(
    half_a: tuple[np.ndarray, np.ndarray],
    half_b: tuple[np.ndarray, np.ndarray],
    *,
    seed: int,
    settings: JetNetMetricSettings | None = None,
) -> dict[str, Any]:
    """Score half a of the real jets against half b, the floor that no model can beat.

    Args:
        half_a: ``(constituents [n, 30, 3] GeV, mask [n, 30])``, in the place of generated jets.
        half_b: The reference jets that the models are compared with.
        seed: Seed of the metrics' bootstrap batches, the one the model rows use.
        settings: jetnet metric settings, by default ``metric_settings(len(half_b))``.

    Returns:
        A row with the keys :data:`ROW_KEYS` and no timing.

    Raises:
        MetricInputError: A half has a wrong shape or fewer than :data:`MIN_REFERENCE_JETS`
            jets.
    """
    constituents_a, mask_a = _check_sample(half_a, "half a")
    constituents_b, mask_b = _check_sample(half_b, "half b")
    if settings is None:
        settings = metric_settings(len(constituents_b))
    metrics = evaluate_generated(
        constituents_a, mask_a, constituents_b, mask_b, seed, settings=settings
    )
    return _row(
        model="truth",
        label=TRUTH_LABEL,
        published=False,
        **_metric_values(metrics),
        n_jets=len(constituents_a),
        seed=int(seed),
    )


def _metric_values(metrics: Mapping[str, float]) -> dict[str, float | None]:
    return {key: (None if metrics.get(key) is None else float(metrics[key])) for key in METRIC_KEYS}


def _check_sample(
    sample: Sequence[np.ndarray], name: str, min_jets: int = MIN_REFERENCE_JETS
) -> tuple[np.ndarray, np.ndarray]:
    """Check a ``(constituents, mask)`` pair and return it as numpy arrays."""
    if not isinstance(sample, (tuple, list)) or len(sample) != 2:
        raise MetricInputError(
            f"{name} must be a pair (constituents, mask), got {type(sample).__name__}"
        )
    constituents = np.asarray(sample[0])
    mask = np.asarray(sample[1], dtype=bool)
    if constituents.ndim != 3 or constituents.shape[-1] != 3:
        raise MetricInputError(
            f"{name} constituents must have shape [n_jets, n_particles, 3], got {constituents.shape}"
        )
    if mask.shape != constituents.shape[:2]:
        raise MetricInputError(
            f"{name} mask has shape {mask.shape}, expected {constituents.shape[:2]} to match "
            f"the constituents"
        )
    if len(constituents) < min_jets:
        raise MetricInputError(
            f"{name} must contain at least {min_jets} jets, got {len(constituents)}. "
            f"Use more test jets."
        )
    return constituents, mask


# --------------------------------------------------------------------------------------------
# hardware


def _torch_device(device: torch.device | str) -> torch.device:
    return device if isinstance(device, torch.device) else torch.device(device)


def _cpu_model() -> str:
    """Read the CPU model name from /proc/cpuinfo on Linux, or ask ``platform`` elsewhere."""
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown CPU"


def describe_device(device: torch.device | str) -> str:
    """Name the hardware behind a torch device, for the timing column.

    Returns:
        The GPU name for a CUDA device (``"NVIDIA H200"``), or the CPU model and the number
        of torch threads for the CPU (``"AMD EPYC 7B13 CPU, 2 threads"``).
    """
    device = _torch_device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        threads = torch.get_num_threads()
        return f"{_cpu_model()} CPU, {threads} thread{'s' if threads != 1 else ''}"
    return str(device)


def describe_hardware() -> dict[str, Any]:
    """Describe this machine for the results document: CPU model and count, torch version
    and threads, and the name of every visible CUDA GPU."""
    gpus = []
    if torch.cuda.is_available():
        gpus = [torch.cuda.get_device_name(index) for index in range(torch.cuda.device_count())]
    return {
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "gpus": gpus,
        "platform": platform.platform(),
    }


# --------------------------------------------------------------------------------------------
# results document and Markdown table

#: Keys that :func:`results_document` requires of each row, because the table shows them.
_TABLE_KEYS = (
    "model", "label", "published", "w1m", "w1p", "w1efp", "fpnd", "cov", "mmd", "emd_sum",
    "time_us_per_jet", "batch_size", "device",
)  # fmt: skip

#: Table columns: header, row key, error key, scale factor.
_COLUMNS = (
    ("W1M ↓ (×10⁻³)", "w1m", "w1m_err", 1e3),
    ("W1P ↓ (×10⁻³)", "w1p", "w1p_err", 1e3),
    ("W1EFP ↓ (×10⁻⁵)", "w1efp", "w1efp_err", 1e5),
    ("FPND ↓", "fpnd", None, 1.0),
    ("COV ↑", "cov", None, 1.0),
    ("MMD ↓", "mmd", None, 1.0),
    ("EMD_sum ↓", "emd_sum", None, 1.0),
    ("Time (µs/jet)", "time_us_per_jet", None, 1.0),
)


def _plain_json(value: Any) -> Any:
    """Convert numpy values, paths and tuples to JSON types. Non-finite floats become None."""
    if isinstance(value, Mapping):
        return {str(key): _plain_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain_json(item) for item in value]
    if isinstance(value, np.ndarray):
        return _plain_json(value.tolist())
    if isinstance(value, np.generic):
        return _plain_json(value.item())
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _document_row(row: Mapping[str, Any], index: int) -> dict[str, Any]:
    """Copy a row for the document, with non-finite values moved to ``non_finite``."""
    missing = [key for key in _TABLE_KEYS if key not in row]
    if missing:
        name = row.get("label", row.get("model", f"number {index}"))
        raise ValueError(
            f"row {name!r} is missing the keys {missing}. Build rows with evaluate_sampler, "
            f"truth_row or PUBLISHED_ROWS."
        )
    plain = {}
    non_finite = {}
    for key, value in row.items():
        if isinstance(value, (float, np.floating)) and not math.isfinite(value):
            non_finite[key] = str(float(value))
            plain[key] = None
        else:
            plain[key] = _plain_json(value)
    plain["non_finite"] = non_finite
    return plain


def results_document(
    rows: Sequence[Mapping[str, Any]],
    *,
    pipeline: Mapping[str, Any],
    data: Mapping[str, Any],
    hardware: Mapping[str, Any],
) -> dict[str, Any]:
    """Assemble the final results as one JSON-ready document.

    Args:
        rows: Rows in table order, from :func:`truth_row`, :func:`evaluate_sampler` and
            :data:`PUBLISHED_ROWS`.
        pipeline: What produced the models, such as the profile, the studies and the
            checkpoints.
        data: What the models were tested on, such as the jets file, its fingerprint and the
            number of test jets.
        hardware: The machine, for example :func:`describe_hardware`.

    Returns:
        ``{"format", "format_version", "jethpo_version", "created_utc", "pipeline", "data",
        "hardware", "rows"}``. Each row is a copy with plain JSON values. A NaN or infinite
        value, the metric of a diverged model, is stored as None, and its text (``"inf"``,
        ``"nan"``) is kept under the row's ``non_finite`` key, so the document passes
        ``json.dumps(..., allow_nan=False)``.

    Raises:
        ValueError: A row lacks a key that the table shows.
    """
    document = {
        "format": "jethpo-results",
        "format_version": 1,
        "jethpo_version": jethpo_version(),
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "pipeline": _plain_json(dict(pipeline)),
        "data": _plain_json(dict(data)),
        "hardware": _plain_json(dict(hardware)),
        "rows": [_document_row(row, index) for index, row in enumerate(rows)],
    }
    json.dumps(document, allow_nan=False)
    return document


def _format_number(value: float) -> str:
    if value == 0 or 1e-2 <= abs(value) < 1e4:
        return f"{value:.3g}"
    return f"{value:.2e}"


def _cell(row: Mapping[str, Any], key: str, error_key: str | None, scale: float) -> str:
    value = row.get(key)
    if value is None:
        return str(row.get("non_finite", {}).get(key, "—"))
    text = _format_number(value * scale)
    error = row.get(error_key) if error_key else None
    if error is not None:
        text += f" ± {_format_number(error * scale)}"
    return text


def _timing_cell(row: Mapping[str, Any]) -> str:
    if row.get("time_us_per_jet") is None:
        return "—"
    batch = row.get("batch_size")
    batch_text = f"batch size {batch}" if batch is not None else "batch size not published"
    return f"{row.get('device') or 'unknown device'}, {batch_text}"


def _describe_mapping(name: str, values: Mapping[str, Any]) -> str:
    if not values:
        return f"{name}: not recorded."
    items = ", ".join(f"{key} `{value}`" for key, value in values.items())
    return f"{name}: {items}."


def markdown_table(document: Mapping[str, Any]) -> str:
    """Render a results document as a Markdown table with its notes.

    Columns are W1M, W1P, W1EFP, FPND, COV, MMD, EMD_sum, time per jet, and the device and
    batch size of each timing. W1M and W1P are shown ×10³ and W1EFP ×10⁵, with ± the
    standard deviation over jetnet's bootstrap batches.

    Args:
        document: Output of :func:`results_document`.

    Returns:
        Markdown text ending in a newline.
    """
    header = ["Model", *(column[0] for column in _COLUMNS), "Timed on"]
    lines = [
        "| " + " | ".join(header) + " |",
        "|:--" + "|--:" * len(_COLUMNS) + "|:--|",
    ]
    for row in document["rows"]:
        cells = [str(row["label"])]
        cells += [_cell(row, key, error_key, scale) for _, key, error_key, scale in _COLUMNS]
        cells.append(_timing_cell(row))
        lines.append("| " + " | ".join(cells) + " |")

    reference_sizes = sorted({row["n_jets"] for row in document["rows"] if row.get("n_jets")})
    size_text = ", ".join(str(size) for size in reference_sizes) or "unknown"
    notes = [
        "",
        f"Each model generated as many jets as its reference sample, one half of the test split "
        f"({size_text} jets). The truth row compares the other half with the same reference, the "
        f"floor that no model can beat at this sample size. Arrows show which direction is better.",
        "",
        "W1M, W1P, W1EFP, COV and MMD are jetnet's metrics on relative coordinates (etarel, "
        "phirel, ptrel), and ± is the standard deviation over jetnet's bootstrap batches. FPND is the Frechet distance of ParticleNet activations to jetnet's "
        "stored statistics of JetNet gluon jets. Jets from another generator, such as Pythia 8 "
        "jets, therefore have an FPND above 0 even when real, as the truth row shows. EMD_sum "
        "is the sum of the 1-Wasserstein distances of jet mass, energy and pT (GeV), eta and "
        "phi (rad).",
        "",
        "Published rows are quoted, not recomputed: they were measured on JetNet gluon jets, "
        "and their EMD_sum was not published. Source: " + _PUBLISHED_SOURCE + ".",
        "",
        _describe_mapping("Data", document.get("data", {})),
        "",
        _describe_mapping("Pipeline", document.get("pipeline", {})),
        "",
        _describe_mapping("Hardware", document.get("hardware", {})),
    ]
    return "\n".join(lines + notes) + "\n"


# --------------------------------------------------------------------------------------------
# plots

_QUANTITY_LABELS = {
    "mass": ("Jet mass $m$ [GeV]", "GeV"),
    "energy": ("Jet energy $E$ [GeV]", "GeV"),
    "pt": ("Jet $p_{\\mathrm{T}}$ [GeV]", "GeV"),
    "eta": ("Jet $\\eta$", None),
    "phi": ("Jet $\\phi$ [rad]", "rad"),
}

_REAL_LABEL = "Real jets"

#: Legend notes on the normalisation and the jets outside a panel's range.
_OUTSIDE_RANGE_NOTES = (
    "Histograms normalised to all jets of each sample",
    "Underflow / overflow: jets below / above the range",
)


#: y range of the ratio panels. A ratio outside it is drawn as a triangle at the panel's
#: edge, with its value when the panel has few such ratios, far enough apart. Ratios are
#: never negative, so with a lower limit of 0 only the top-edge triangles occur.
_RATIO_RANGE = (0.0, 2.0)
_MAX_RATIO_VALUE_LABELS = 4
_MIN_RATIO_LABEL_BIN_GAP = 3
#: gid of the edge markers, for the legend and for tests that look for them.
_RATIO_ABOVE_GID = "ratio above range"
_RATIO_BELOW_GID = "ratio below range"
_RATIO_BAND_LABEL = "Ratio band: real jets' stat. error, $1 \\pm N_\\mathrm{real}^{-1/2}$ per bin"


#: Font sizes in points, smaller than the CMS style's so that six panels fit one figure.
_FONT_SIZES = {
    "font.size": 16,
    "axes.labelsize": 16,
    "legend.fontsize": 14,
    "xtick.labelsize": 13,
    "ytick.labelsize": 13,
}


@contextlib.contextmanager
def _hep_style() -> Iterator[None]:
    """Apply mplhep's CMS style, with smaller fonts for multi-panel figures."""
    import matplotlib.style
    import mplhep

    with matplotlib.style.context(mplhep.style.CMS):
        with matplotlib.rc_context(_FONT_SIZES):
            yield


def _new_figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _save(figure, path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=120)
    figure.clear()
    logger.info("Wrote plot %s", path)
    return path


def _sample_mask(constituents: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """Return the given mask, or else mark every constituent with pT not <= 0 as real (NaN
    included), as the metrics do."""
    if mask is not None:
        return np.asarray(mask, dtype=bool)
    return ~(np.hypot(constituents[..., 0], constituents[..., 1]) <= 0)


def _display_label(name: str) -> str:
    return MODEL_LABELS.get(name, name)


def _jet_quantities(sample: tuple[np.ndarray, np.ndarray | None], name: str) -> dict[str, np.ndarray]:
    """Compute jet mass, energy, pT, eta and phi of a sample, leaving out jets that contain
    NaN or inf."""
    constituents = np.asarray(sample[0], dtype=np.float64)
    if constituents.ndim != 3 or constituents.shape[-1] != 3:
        raise ValueError(
            f"{name} jets must have shape [n_jets, n_particles, 3], got {constituents.shape}"
        )
    mask = _sample_mask(constituents, sample[1])
    constituents = np.where(mask[..., None], constituents, 0.0)
    finite = np.isfinite(constituents).all(axis=(1, 2))
    if not finite.all():
        logger.warning(
            "Plotting %s: left out %d of %d jets that contain NaN or infinite constituents",
            name,
            int((~finite).sum()),
            len(finite),
        )
    with np.errstate(over="ignore", invalid="ignore"):
        quantities = jet_kinematics_numpy(constituents[finite])
    return {key: values[np.isfinite(values)] for key, values in quantities.items()}


def _n_bins(n_values: int) -> int:
    """Rice's rule, 2 n^(1/3), kept between 10 and 50 bins."""
    return int(np.clip(round(2 * n_values ** (1 / 3)), 10, 50))


def _linear_edges(real: np.ndarray, quantity: str) -> np.ndarray:
    n_bins = _n_bins(len(real))
    if quantity == "phi":
        return np.linspace(-math.pi, math.pi, n_bins + 1)
    low, high = np.quantile(real, [0.005, 0.995])
    if not high > low:
        low, high = low - 0.5, high + 0.5
    margin = 0.1 * (high - low)
    # a quantity that is never negative (mass, energy, pT) gets no bins below 0
    bottom = low - margin if real.min() < 0 else max(low - margin, 0.0)
    return np.linspace(bottom, high + margin, n_bins + 1)


def _log_edges(real: np.ndarray) -> np.ndarray | None:
    """Build logarithmic bins over the positive real values, or return None when there are
    too few."""
    positive = real[real > 0]
    if len(positive) < 2:
        return None
    low, high = np.quantile(positive, [0.005, 0.995])
    if not high > low:
        return None
    return np.geomspace(low / 1.5, high * 1.5, _n_bins(len(real)) + 1)


def _histogram(values: np.ndarray, edges: np.ndarray) -> tuple[np.ndarray, int, int]:
    """Histogram values and count those outside the edges.

    Returns:
        ``(counts, underflow, overflow)``: the counts per bin, as floats, of the values
        inside ``[edges[0], edges[-1]]``, and the numbers of values below and above it.
    """
    counts = np.histogram(values, bins=edges)[0].astype(np.float64)
    return counts, int((values < edges[0]).sum()), int((values > edges[-1]).sum())


def _density_ratio(
    generated_counts: np.ndarray,
    real_counts: np.ndarray,
    generated_total: float | None = None,
    real_total: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Divide two histograms, each normalised to its sample size, and estimate the
    statistical error from the generated counts alone. The real jets' error is drawn as a
    band instead.

    Args:
        generated_counts: Generated jets per bin.
        real_counts: Real jets per bin.
        generated_total: Generated jets in the sample, outside the bins included; by
            default the sum of ``generated_counts``.
        real_total: The same for the real jets.

    Returns:
        ``(ratio, error)``, NaN in bins without real jets.
    """
    generated_counts = np.asarray(generated_counts, dtype=np.float64)
    real_counts = np.asarray(real_counts, dtype=np.float64)
    generated_total = generated_counts.sum() if generated_total is None else generated_total
    real_total = real_counts.sum() if real_total is None else real_total
    with np.errstate(divide="ignore", invalid="ignore"):
        generated_fraction = generated_counts / max(generated_total, 1.0)
        real_fraction = real_counts / max(real_total, 1.0)
        ratio = np.where(real_counts > 0, generated_fraction / real_fraction, np.nan)
        error = np.where(generated_counts > 0, ratio / np.sqrt(generated_counts), 0.0)
    error = np.where(real_counts > 0, error, np.nan)
    return ratio, error


def _draw_comparison(
    main_axis,
    ratio_axis,
    real: np.ndarray,
    generated: Mapping[str, np.ndarray],
    edges: np.ndarray,
    *,
    xlabel: str,
    unit: str | None,
    real_label: str,
    log_x: bool = False,
) -> None:
    """Draw normalised histograms of real and generated values with a generated / real
    ratio panel below. On a logarithmic x axis each bin shows its fraction of the jets,
    elsewhere the fraction per unit of x.

    Each histogram is normalised to all jets of its sample, so values outside the edges
    are in no bin and the area inside is the fraction of jets in the range. Their numbers
    are written in the panel's upper corners (:func:`_draw_outside_range`)."""
    import mplhep

    widths = np.ones(len(edges) - 1) if log_x else np.diff(edges)
    centres = np.sqrt(edges[:-1] * edges[1:]) if log_x else 0.5 * (edges[:-1] + edges[1:])
    real_counts, real_below, real_above = _histogram(real, edges)
    real_density = real_counts / max(len(real), 1) / widths
    outside = [("0.3", len(real), real_below, real_above)]

    # main panel
    mplhep.histplot(real_density, edges, ax=main_axis, histtype="fill", color="0.85", label=real_label)
    mplhep.histplot(real_density, edges, ax=main_axis, histtype="step", color="0.3", linewidth=1.2)
    colours = iter(["#5790fc", "#f89c20", "#e42536", "#964a8b", "#9c9ca1", "#7a21dd"])
    drawn = []
    for name, values in generated.items():
        colour = next(colours, None)
        counts, below, above = _histogram(values, edges)
        outside.append((colour, len(values), below, above))
        density = counts / max(len(values), 1) / widths
        density_error = np.sqrt(counts) / max(len(values), 1) / widths
        mplhep.histplot(
            density,
            edges,
            ax=main_axis,
            histtype="step",
            yerr=density_error,
            color=colour,
            linewidth=2,
            label=_display_label(name),
        )
        drawn.append((counts, len(values), colour))
    if log_x:
        main_axis.set_ylabel("Fraction of jets per bin")
    else:
        main_axis.set_ylabel(f"Normalised jets / {unit}" if unit else "Normalised jets")
    main_axis.set_ylim(bottom=0)
    main_axis.tick_params(labelbottom=False)
    _draw_outside_range(main_axis, outside)

    # ratio panel: markers for each model, a band for the real jets' statistical error. Bins
    # without real jets have an undefined ratio and get neither band nor marker.
    with np.errstate(divide="ignore", invalid="ignore"):
        real_error = np.where(real_counts > 0, 1 / np.sqrt(real_counts), np.nan)
    ratio_axis.stairs(
        1 + real_error, edges, baseline=1 - real_error, fill=True, color="0.85", label=_RATIO_BAND_LABEL
    )
    ratio_axis.axhline(1.0, color="0.3", linestyle="--", linewidth=1)
    ratios = []
    for counts, total, colour in drawn:
        ratio, error = _density_ratio(counts, real_counts, total, len(real))
        ratio_axis.errorbar(
            centres, ratio, yerr=error, fmt="o", markersize=4, color=colour, linewidth=1.2
        )
        ratios.append((ratio, colour))
    ratio_axis.set_ylim(*_RATIO_RANGE)
    _mark_ratios_outside_range(ratio_axis, centres, ratios)
    ratio_axis.set_ylabel("Gen. / real")
    ratio_axis.set_xlabel(xlabel)
    if log_x:
        main_axis.set_xscale("log")
        ratio_axis.set_xscale("log")
    ratio_axis.set_xlim(edges[0], edges[-1])


def _format_ratio(value: float) -> str:
    return f"{value:.0f}" if value >= 10 else f"{value:.2g}"


def _mark_ratios_outside_range(
    ratio_axis, centres: np.ndarray, ratios: Sequence[tuple[np.ndarray, Any]]
) -> None:
    """Draw each ratio outside :data:`_RATIO_RANGE` as a triangle at the panel's top or
    bottom edge, in its sample's colour, so that no ratio is hidden by the y range.

    The triangles get their values written below (top edge) or above (bottom edge) them
    only when the panel has at most :data:`_MAX_RATIO_VALUE_LABELS` of them, at least
    :data:`_MIN_RATIO_LABEL_BIN_GAP` bins apart, so that the labels of neighbouring bins
    do not overlap. Labels of several samples in one bin are stacked. NaN ratios (bins
    without real jets) are not marked.

    Args:
        centres: x position of each bin.
        ratios: ``(ratio per bin, colour)`` per sample.
    """
    low, high = _RATIO_RANGE
    outside_any = np.zeros(len(centres), dtype=bool)
    n_outside = 0
    for ratio, _ in ratios:
        outside = (ratio > high) | (ratio < low)
        outside_any |= outside
        n_outside += int(outside.sum())
    marked_bins = np.flatnonzero(outside_any)
    write_values = n_outside <= _MAX_RATIO_VALUE_LABELS and bool(
        np.all(np.diff(marked_bins) >= _MIN_RATIO_LABEL_BIN_GAP)
    )

    edge_transform = ratio_axis.get_xaxis_transform()
    labels_per_bin: dict[tuple[int, bool], int] = {}
    # (above the range, marker, height in axes coordinates, gid)
    edges = ((True, "^", 0.92, _RATIO_ABOVE_GID), (False, "v", 0.08, _RATIO_BELOW_GID))
    for ratio, colour in ratios:
        for above, marker, edge, gid in edges:
            outside = ratio > high if above else ratio < low
            if not outside.any():
                continue
            x = centres[outside]
            ratio_axis.plot(
                x,
                np.full(len(x), edge),
                linestyle="none",
                marker=marker,
                markersize=7,
                color=colour,
                transform=edge_transform,
                clip_on=False,
                gid=gid,
            )
            if not write_values:
                continue
            for index in np.flatnonzero(outside):
                stacked = labels_per_bin.get((index, above), 0)
                labels_per_bin[(index, above)] = stacked + 1
                # 10 points per line, from the marker towards the panel's middle
                offset = 10 * (stacked + 1)
                ratio_axis.annotate(
                    _format_ratio(ratio[index]),
                    (centres[index], edge),
                    xycoords=edge_transform,
                    xytext=(0, -offset if above else offset),
                    textcoords="offset points",
                    ha="center",
                    va="center",
                    fontsize=10,
                    color=colour,
                    # a pale background keeps the value readable over error bars
                    bbox={"boxstyle": "square,pad=0.1", "facecolor": "white", "edgecolor": "none", "alpha": 0.8},
                )


def _format_jet_share(count: int, total: int) -> str:
    """Format a number of jets with its share of the sample, such as ``40 jets (8.9 %)``."""
    percent = 100.0 * count / max(total, 1)
    share = f"{percent:.0f}" if percent >= 10 else f"{percent:.2g}"
    return f"{count} jet{'' if count == 1 else 's'} ({share} %)"


def _draw_outside_range(main_axis, samples: Sequence[tuple[Any, int, int, int]]) -> None:
    """Write the jets below and above a panel's range in its upper left and right corners.

    Each corner has a heading, "Underflow" or "Overflow", and one line per sample with jets
    there, in the sample's colour. A corner without such jets stays empty. The y axis
    grows to leave room for the lines above the histograms.

    Args:
        samples: ``(colour, jets in the sample, underflow, overflow)`` per sample.
    """
    from matplotlib.offsetbox import AnchoredOffsetbox, TextArea, VPacker

    n_lines = 0
    for index, heading, corner in ((2, "Underflow", "upper left"), (3, "Overflow", "upper right")):
        lines = [
            TextArea(_format_jet_share(sample[index], sample[1]), textprops={"color": sample[0], "fontsize": 11})
            for sample in samples
            if sample[index]
        ]
        if not lines:
            continue
        lines.insert(0, TextArea(f"{heading}:", textprops={"color": "black", "fontsize": 11}))
        align = "left" if corner == "upper left" else "right"
        box = VPacker(children=lines, align=align, pad=0, sep=2)
        main_axis.add_artist(AnchoredOffsetbox(loc=corner, child=box, frameon=False, pad=0.2, borderpad=0.4))
        n_lines = max(n_lines, len(lines))
    if n_lines:
        # a line of 11-point text takes about a twentieth of a main panel's height
        bottom, top = main_axis.get_ylim()
        main_axis.set_ylim(bottom, top * (1 + 0.1 * n_lines))


def _comparison_grid(figure, n_panels: int):
    """Lay out a 2 x 3 grid of (main, ratio) axis pairs for ``n_panels`` plots, and return
    them with the axis of the last cell, which is left for the legend."""
    grid = figure.add_gridspec(2, 3)
    pairs = []
    for index in range(n_panels):
        cell = grid[index // 3, index % 3].subgridspec(2, 1, height_ratios=(3, 1), hspace=0.0)
        main_axis = figure.add_subplot(cell[0])
        ratio_axis = figure.add_subplot(cell[1], sharex=main_axis)
        pairs.append((main_axis, ratio_axis))
    legend_axis = figure.add_subplot(grid[1, 2])
    legend_axis.axis("off")
    return pairs, legend_axis


def _draw_legend(legend_axis, pairs, title: str | None, notes: Sequence[str]) -> None:
    """Draw the legend of the first (main, ratio) pair's artists, with an entry for the
    ratio edge markers when any ratio panel has them, and the notes below it."""
    from matplotlib.lines import Line2D

    main_axis, ratio_axis = pairs[0]
    handles, labels = main_axis.get_legend_handles_labels()
    ratio_handles, ratio_labels = ratio_axis.get_legend_handles_labels()
    handles += ratio_handles
    labels += ratio_labels
    gids = {line.get_gid() for _, axis in pairs for line in axis.lines}
    low, high = _RATIO_RANGE
    if _RATIO_ABOVE_GID in gids:
        handles.append(Line2D([], [], linestyle="none", marker="^", markersize=7, color="0.3"))
        labels.append(f"Ratio above {high:g}, drawn at the panel's top edge")
    if _RATIO_BELOW_GID in gids:
        handles.append(Line2D([], [], linestyle="none", marker="v", markersize=7, color="0.3"))
        labels.append(f"Ratio below {low:g}, drawn at the panel's bottom edge")
    legend = legend_axis.legend(handles, labels, loc="upper left", frameon=False, title=title)
    if title:
        legend.get_title().set_ha("left")
    legend_axis.text(
        0.0, 0.02, "\n".join(notes), transform=legend_axis.transAxes, va="bottom", fontsize=12
    )


def plot_jet_distributions(
    real: tuple[np.ndarray, np.ndarray | None],
    generated: Mapping[str, tuple[np.ndarray, np.ndarray | None]],
    path: str | os.PathLike[str],
    *,
    title: str | None = None,
    real_label: str = _REAL_LABEL,
) -> Path:
    """Plot jet mass, energy, pT, eta and phi of real and generated jets, with ratio panels.

    Each histogram is normalised to the number of jets in its sample. The bins span the
    central 99 % of the real jets plus a 10 % margin on each side, and phi spans [-pi, pi].
    Jets outside the range are in no bin: each panel lists, per sample in its colour, the
    jets below the range (underflow, upper left) and above it (overflow, upper right), so
    the area under a histogram is the fraction of its jets inside the range. Jets with NaN
    or infinite constituents are left out, with a logged warning.

    Args:
        real: ``(constituents [n, 30, 3] GeV, mask [n, 30] or None)``.
        generated: ``{name: (constituents, mask or None)}``. Names found in
            :data:`MODEL_LABELS` are shown by their label.
        path: PNG file to write, parent folders created.
        title: Optional heading of the legend, such as the data set.
        real_label: Legend entry of the real jets.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: A sample has a wrong shape, or the real jets have no finite values.
    """
    real_quantities = _jet_quantities(real, "real")
    generated_quantities = {name: _jet_quantities(sample, name) for name, sample in generated.items()}
    if any(len(values) == 0 for values in real_quantities.values()):
        raise ValueError("the real jets have no finite jet kinematics to plot")

    with _hep_style():
        figure = _new_figure(18, 11)
        pairs, legend_axis = _comparison_grid(figure, len(KINEMATIC_NAMES))
        for (main_axis, ratio_axis), quantity in zip(pairs, KINEMATIC_NAMES):
            xlabel, unit = _QUANTITY_LABELS[quantity]
            _draw_comparison(
                main_axis,
                ratio_axis,
                real_quantities[quantity],
                {name: values[quantity] for name, values in generated_quantities.items()},
                _linear_edges(real_quantities[quantity], quantity),
                xlabel=xlabel,
                unit=unit,
                real_label=real_label,
            )
        counts = [f"{real_label}: {len(real_quantities['mass'])} jets"]
        for name, values in generated_quantities.items():
            counts.append(f"{_display_label(name)}: {len(values['mass'])} jets")
        _draw_legend(legend_axis, pairs, title, counts + list(_OUTSIDE_RANGE_NOTES))
        return _save(figure, path)


def _efp_graph_label(edges: np.ndarray) -> str:
    """Describe an EFP multigraph by its edges, vertices numbered from 1: (1,2)(1,3)²(1,4)."""
    multiplicities: dict[tuple[int, int], int] = {}
    for first, second in np.asarray(edges).tolist():
        key = (min(first, second) + 1, max(first, second) + 1)
        multiplicities[key] = multiplicities.get(key, 0) + 1
    parts = []
    for (first, second), count in sorted(multiplicities.items()):
        parts.append(f"({first},{second})" + (f"$^{count}$" if count > 1 else ""))
    return "".join(parts)


def _jetnet_efps(
    sample: tuple[np.ndarray, np.ndarray | None], name: str, efp_jobs: int | None
) -> np.ndarray:
    """Compute the five EFPs that W1EFP uses per finite jet, ``[n_jets, 5]``, with jetnet
    0.2.5's default set (n=4, d=4, prime graphs) on relative coordinates."""
    from jetnet.utils import efps

    constituents = np.asarray(sample[0], dtype=np.float64)
    if constituents.ndim != 3 or constituents.shape[-1] != 3:
        raise ValueError(
            f"{name} jets must have shape [n_jets, n_particles, 3], got {constituents.shape}"
        )
    mask = _sample_mask(constituents, sample[1])
    finite = np.isfinite(np.where(mask[..., None], constituents, 0.0)).all(axis=(1, 2))
    if not finite.all():
        logger.warning(
            "EFP plot of %s: left out %d of %d jets that contain NaN or infinite constituents",
            name,
            int((~finite).sum()),
            len(finite),
        )
    relative = relative_coordinates(constituents[finite], mask[finite])
    return np.asarray(efps(relative, efp_jobs=efp_jobs), dtype=np.float64)


def _efp_graphs() -> np.ndarray:
    from energyflow import EFPSet

    efp_set = EFPSet(
        ("n==", 4), ("d==", 4), ("p==", 1), measure="hadr", beta=1, normed=None, coords="ptyphim"
    )
    return efp_set.graphs()


def plot_efps(
    real: tuple[np.ndarray, np.ndarray | None],
    generated: Mapping[str, tuple[np.ndarray, np.ndarray | None]],
    path: str | os.PathLike[str],
    *,
    title: str | None = None,
    real_label: str = _REAL_LABEL,
    efp_jobs: int | None = 1,
) -> Path:
    """Plot the five energy flow polynomials that W1EFP compares, with ratio panels.

    These are jetnet 0.2.5's default EFPs: all prime multigraphs with 4 vertices and 4 edges,
    measure "hadr" with beta = 1 on (ptrel, etarel, phirel), computed by ``jetnet.utils.efps``.
    Each panel names its graph by its edges. EFPs span orders of magnitude, so the bins are
    logarithmic over the central 99 % of the real jets' positive values. As in
    :func:`plot_jet_distributions`, each histogram is normalised to the number of jets in
    its sample, and the jets outside the range, zeros included, are listed in the panel's
    corners as underflow and overflow.

    Args:
        real: ``(constituents [n, 30, 3] GeV, mask [n, 30] or None)``.
        generated: ``{name: (constituents, mask or None)}``.
        path: PNG file to write, parent folders created.
        title: Optional heading of the legend.
        real_label: Legend entry of the real jets.
        efp_jobs: Processes for energyflow; None uses every CPU. The default 1 avoids
            forking, which can deadlock in a Ray worker (see :func:`metric_settings`).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: A sample has a wrong shape.
    """
    real_efps = _jetnet_efps(real, "real", efp_jobs)
    generated_efps = {name: _jetnet_efps(sample, name, efp_jobs) for name, sample in generated.items()}
    graphs = _efp_graphs()

    with _hep_style():
        figure = _new_figure(18, 11)
        pairs, legend_axis = _comparison_grid(figure, len(graphs))
        for index, ((main_axis, ratio_axis), graph) in enumerate(zip(pairs, graphs)):
            real_values = real_efps[:, index]
            edges = _log_edges(real_values)
            log_x = edges is not None
            if edges is None:
                edges = _linear_edges(real_values, "efp")
            _draw_comparison(
                main_axis,
                ratio_axis,
                real_values,
                {name: values[:, index] for name, values in generated_efps.items()},
                edges,
                xlabel=f"EFP {index + 1}: {_efp_graph_label(graph)}",
                unit=None,
                real_label=real_label,
                log_x=log_x,
            )
        notes = [
            "EFPs: n = 4 vertices, d = 4 edges, prime graphs",
            "measure hadr, $\\beta$ = 1 (jetnet 0.2.5)",
            *_OUTSIDE_RANGE_NOTES,
        ]
        _draw_legend(legend_axis, pairs, title, notes)
        return _save(figure, path)


def _best_point(history: Sequence[tuple[int, float]]) -> tuple[int, float] | None:
    """Find the (epoch, EMD_sum) with the lowest finite EMD_sum, the earliest on ties, or
    return None."""
    finite = [(int(epoch), float(value)) for epoch, value in history if math.isfinite(value)]
    if not finite:
        return None
    return min(finite, key=lambda point: (point[1], point[0]))


def plot_training_history(
    history: Sequence[tuple[int, float]], title: str, path: str | os.PathLike[str]
) -> Path:
    """Plot the validation EMD_sum against epoch for one retraining, with the best epoch marked.

    The best epoch, the lowest finite EMD_sum and the earliest on ties, is the one whose
    checkpoint the retraining keeps. Non-finite values (a diverged model) are drawn as
    crosses on the top edge. The y axis is logarithmic when the finite values span more
    than a factor of 20.

    Args:
        history: ``(epoch, validation EMD_sum)`` pairs, as ``TrainingResult.history`` stores them.
        title: Plot title, such as the study name.
        path: PNG file to write, parent folders created.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: ``history`` is empty or not a sequence of (epoch, value) pairs.
    """
    try:
        points = [(int(epoch), float(value)) for epoch, value in history]
    except (TypeError, ValueError) as error:
        raise ValueError(f"history must be a sequence of (epoch, EMD_sum) pairs: {error}") from error
    if not points:
        raise ValueError(f"history of {title!r} is empty, so there is nothing to plot")
    epochs = np.array([epoch for epoch, _ in points])
    values = np.array([value for _, value in points])
    finite = np.isfinite(values)
    best = _best_point(points)

    import matplotlib.ticker

    with _hep_style():
        figure = _new_figure(9, 6.5)
        axis = figure.add_subplot()
        axis.plot(
            epochs[finite],
            values[finite],
            marker="o",
            markersize=5,
            color="#5790fc",
            label="Validation EMD$_{\\mathrm{sum}}$",
        )
        if not finite.all():
            axis.plot(
                epochs[~finite],
                np.full((~finite).sum(), 0.97),
                linestyle="none",
                marker="x",
                markersize=9,
                color="#e42536",
                transform=axis.get_xaxis_transform(),
                label="Non-finite (diverged)",
            )
        if best is not None:
            axis.axvline(best[0], color="0.4", linestyle="--", linewidth=1)
            axis.plot(
                [best[0]],
                [best[1]],
                linestyle="none",
                marker="*",
                markersize=18,
                color="#f89c20",
                markeredgecolor="k",
                label=f"Best: epoch {best[0]}, {_format_number(best[1])}",
            )
            positive = values[finite & (values > 0)]
            if len(positive) == finite.sum() and positive.max() > 20 * positive.min():
                axis.set_yscale("log")
        # epochs are whole numbers, which a short retraining's ticks (1.2, 1.4, ...) would hide
        axis.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        axis.set_xlabel("Epoch")
        axis.set_ylabel("Validation EMD$_{\\mathrm{sum}}$")
        axis.set_title(title, loc="left", fontsize=16)
        axis.legend(loc="best")
        return _save(figure, path)
