"""Generation metrics: EMD_sum, jetnet's W1M/W1P/W1EFP/COV/MMD/FPD/KPD, FPND and the truth floor.

EMD_sum is the search metric: the sum of 1-Wasserstein distances between generated and reference
distributions of jet mass, energy, pT, eta and phi, computed on absolute constituents
``[n_jets, 30, 3]`` (px, py, pz) in GeV. The jetnet metrics and FPND work on JetNet's relative
coordinates ``[n_jets, 30, 3]`` (etarel, phirel, ptrel) and fill the final table.

Every random choice (jetnet's bootstrap batches, the truth-floor split) follows one explicit
``seed`` argument.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from scipy.stats import wasserstein_distance

from models.jets import KINEMATIC_NAMES, N_PARTICLES, jet_kinematics_numpy, relative_coordinates
from models.particlenet import FPND_JET_TYPES, load_fpnd_particlenet, load_fpnd_statistics

__all__ = [
    "EMDSum",
    "JetNetMetricSettings",
    "MetricInputError",
    "emd_sum",
    "evaluate_generated",
    "fpnd",
    "jetnet_metrics",
    "truth_floor",
]

logger = logging.getLogger(__name__)

#: Relative particle features, in the order jetnet expects them.
RELATIVE_FEATURE_NAMES = ("etarel", "phirel", "ptrel")

#: Keys of :func:`jetnet_metrics` whose value is a distance (lower is better).
_DISTANCE_KEYS = (
    "w1m", "w1p", "w1p_etarel", "w1p_phirel", "w1p_ptrel", "w1efp", "mmd", "fpd", "kpd", "fpnd",
)  # fmt: skip

#: Keys of :func:`jetnet_metrics` that are NaN for diverged generated jets.
_UNDEFINED_KEYS = ("cov", "w1m_err", "w1p_err", "w1efp_err", "fpd_err", "kpd_err")

# jetnet draws W1M, W1P, W1EFP and COV/MMD batches from one unseeded module-level
# generator, which `_seeded_jetnet_rng` swaps for a seeded one. The lock orders those swaps
# between threads of this process. It does not cover code that calls jetnet directly.
_JETNET_RNG_LOCK = threading.Lock()


class MetricInputError(ValueError):
    """Invalid jets or settings for a metric: wrong shape, too few jets, non-finite reference."""


# --------------------------------------------------------------------------------------------
# EMD_sum


@dataclass(frozen=True)
class EMDSum:
    """EMD_sum and its terms.

    Attributes:
        total: sum of the five 1-Wasserstein distances, ``inf`` when the generated jets
            contain NaN or infinite values.
        per_quantity: W1 per jet quantity, keyed by ``KINEMATIC_NAMES``: mass, energy and pt
            in GeV, eta, and phi in radians.
    """

    total: float
    per_quantity: dict[str, float]


def emd_sum(
    generated: np.ndarray,
    reference: np.ndarray,
    *,
    generated_mask: np.ndarray | None = None,
    reference_mask: np.ndarray | None = None,
    bins: int | None = None,
) -> EMDSum:
    """Compute EMD_sum between generated and reference jets.

    W1 is computed on the jet samples themselves with ``scipy.stats.wasserstein_distance``.
    With ``bins``, each quantity is histogrammed instead, over the range that both samples
    span, and W1 is computed between the histograms with the bin centres as values and the
    counts as weights. That is faster for large samples and differs from the exact value by
    at most one bin width. Jet phi is treated as a value on a line, not on a circle.

    Args:
        generated: ``[n_jets, n_particles, 3]`` (px, py, pz) in GeV.
        reference: ``[m_jets, n_particles, 3]`` (px, py, pz) in GeV.
        generated_mask: optional ``[n_jets, n_particles]``, true for real constituents. Masked
            constituents are set to zero before the jet sums. Without it, every constituent
            counts, zero-padded ones contributing nothing.
        reference_mask: the same for ``reference``.
        bins: number of histogram bins per quantity, or None for the exact sample W1.

    Returns:
        The total and the five terms. If the generated jets or their kinematics contain NaN
        or infinite values (a diverged model), every term is ``inf`` and a warning is logged.

    Raises:
        MetricInputError: for wrong shapes, empty inputs, ``bins < 1`` or non-finite
            reference jets.
    """
    generated = _check_jets(generated, "generated", generated_mask)
    reference = _check_jets(reference, "reference", reference_mask)
    if bins is not None and bins < 1:
        raise MetricInputError(f"bins must be a positive number of bins or None, got {bins}")
    if not np.isfinite(reference).all():
        raise MetricInputError(
            "reference jets contain NaN or infinite values; check the jets file they were read from"
        )

    # diverged model
    generated_quantities = None
    if np.isfinite(generated).all():
        generated_quantities = jet_kinematics_numpy(generated)
    if generated_quantities is None or not all(
        np.isfinite(values).all() for values in generated_quantities.values()
    ):
        bad_jets = int((~np.isfinite(generated).all(axis=(1, 2))).sum())
        logger.warning(
            "EMD_sum is inf: %d of %d generated jets contain NaN or infinite values, "
            "or their jet kinematics overflow",
            bad_jets,
            len(generated),
        )
        return EMDSum(total=math.inf, per_quantity={name: math.inf for name in KINEMATIC_NAMES})

    # one W1 per jet quantity
    reference_quantities = jet_kinematics_numpy(reference)
    per_quantity = {}
    for name in KINEMATIC_NAMES:
        if bins is None:
            distance = wasserstein_distance(generated_quantities[name], reference_quantities[name])
        else:
            distance = _histogram_w1(generated_quantities[name], reference_quantities[name], bins)
        per_quantity[name] = float(distance)

    return EMDSum(total=float(sum(per_quantity.values())), per_quantity=per_quantity)


def _histogram_w1(u_values: np.ndarray, v_values: np.ndarray, bins: int) -> float:
    """W1 between two samples after histogramming both on common bins spanning both."""
    low = min(u_values.min(), v_values.min())
    high = max(u_values.max(), v_values.max())
    if low == high:
        return 0.0

    edges = np.linspace(low, high, bins + 1)
    centres = 0.5 * (edges[:-1] + edges[1:])
    u_counts, _ = np.histogram(u_values, bins=edges)
    v_counts, _ = np.histogram(v_values, bins=edges)
    return float(wasserstein_distance(centres, centres, u_counts, v_counts))


# --------------------------------------------------------------------------------------------
# jetnet metrics


@dataclass(frozen=True)
class JetNetMetricSettings:
    """Sample sizes and batch counts for the jetnet metrics and FPND.

    The defaults are jetnet 0.2.5's recommended values. Every batch size is capped at the
    number of jets available, because jetnet draws its batches with replacement and a larger
    batch would only repeat jets. FPD's smallest batch is also capped at half its largest,
    so that the extrapolation in 1/N spans a range.

    Attributes:
        num_eval_samples: jets per bootstrap batch for W1M, W1P and W1EFP.
        num_batches: bootstrap batches for W1M, W1P and W1EFP; their errors are the standard
            deviation over these batches.
        cov_mmd_samples: jets per batch for COV and MMD (each batch needs
            ``cov_mmd_samples**2`` jet-pair EMDs).
        cov_mmd_batches: batches that COV and MMD are averaged over.
        fpd_min_samples: smallest batch size in FPD's extrapolation to infinite sample size.
        fpd_max_samples: largest batch size in that extrapolation.
        fpd_batches: batches per batch size for FPD.
        fpd_points: number of batch sizes for FPD.
        kpd_batches: batches for KPD.
        kpd_batch_size: jets per KPD batch.
        efp_jobs: processes for energyflow's EFP computation; None uses every CPU.
        fpnd: whether to compute FPND (the slowest metric on a CPU).
        fpnd_max_jets: jets passed through ParticleNet for FPND (jetnet uses the first 50,000).
        fpnd_batch_size: jets per ParticleNet forward pass.
        fpnd_jet_type: JetNet jet type whose stored statistics FPND compares against.
        device: torch device for ParticleNet.
    """

    num_eval_samples: int = 50_000
    num_batches: int = 5
    cov_mmd_samples: int = 100
    cov_mmd_batches: int = 10
    fpd_min_samples: int = 20_000
    fpd_max_samples: int = 50_000
    fpd_batches: int = 20
    fpd_points: int = 10
    kpd_batches: int = 10
    kpd_batch_size: int = 5_000
    efp_jobs: int | None = None
    fpnd: bool = True
    fpnd_max_jets: int = 50_000
    fpnd_batch_size: int = 64
    fpnd_jet_type: str = "g"
    device: str = "cpu"

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, int) and not isinstance(value, bool) and value < 1:
                raise MetricInputError(
                    f"JetNetMetricSettings.{field.name} must be at least 1, got {value}"
                )
        if self.fpd_min_samples >= self.fpd_max_samples:
            raise MetricInputError(
                f"JetNetMetricSettings.fpd_min_samples ({self.fpd_min_samples}) must be below "
                f"fpd_max_samples ({self.fpd_max_samples}) for FPD's extrapolation"
            )


@contextlib.contextmanager
def _seeded_jetnet_rng(seed: int) -> Iterator[None]:
    """Replace jetnet's module-level generator with a seeded one for the duration of a call.

    jetnet 0.2.5 draws the batches of ``w1m``, ``w1p``, ``w1efp`` and ``cov_mmd`` from
    ``jetnet.evaluation.gen_metrics.rng``, created unseeded at import, and those functions take
    no seed. The original generator is restored afterwards.
    """
    from jetnet.evaluation import gen_metrics

    with _JETNET_RNG_LOCK:
        original = gen_metrics.rng
        gen_metrics.rng = np.random.default_rng(seed)
        try:
            yield
        finally:
            gen_metrics.rng = original


@contextlib.contextmanager
def _quiet_jetnet() -> Iterator[None]:
    """Silence jetnet's known warnings that do not apply to the caller.

    jetnet warns about every sample below 50,000 jets (the capped sizes are logged here
    instead), and its Frechet distance passes ``disp=False`` to ``scipy.linalg.sqrtm``, which
    scipy 1.17 deprecates.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="Recommended number of", category=RuntimeWarning
        )
        warnings.filterwarnings(
            "ignore", message="The `disp` argument is deprecated", category=DeprecationWarning
        )
        yield


def _metric_seeds(seed: int) -> dict[str, int]:
    """Independent seeds for each randomised metric, all derived from ``seed``."""
    names = ("w1m", "w1p", "w1efp", "cov_mmd", "fpd", "kpd")
    children = np.random.SeedSequence(seed).spawn(len(names))
    return {name: int(child.generate_state(1)[0]) for name, child in zip(names, children)}


def jetnet_metrics(
    generated_relative: np.ndarray,
    reference_relative: np.ndarray,
    seed: int,
    *,
    generated_mask: np.ndarray | None = None,
    reference_mask: np.ndarray | None = None,
    settings: JetNetMetricSettings | None = None,
) -> dict[str, float]:
    """Compute jetnet's generation metrics and FPND between generated and reference jets.

    Args:
        generated_relative: ``[n_jets, 30, 3]`` (etarel, phirel, ptrel), padded constituents
            all zero.
        reference_relative: ``[m_jets, 30, 3]`` in the same format.
        seed: seed of every bootstrap batch (jetnet's own generator is swapped for a seeded one
            around each call that takes no seed).
        generated_mask: optional ``[n_jets, 30]``, true for real constituents, used by W1P.
            Without it, W1P drops the constituents whose three features are all zero.
        reference_mask: the same for ``reference_relative``.
        settings: sample sizes, by default ``JetNetMetricSettings()``.

    Returns:
        Plain floats. Means over bootstrap batches: ``w1m``, ``w1p`` (average of the three
        features), ``w1p_etarel``, ``w1p_phirel``, ``w1p_ptrel``, ``w1efp`` (average of jetnet's
        five default EFPs: n=4, d=4, prime), ``cov`` and ``mmd`` (jetnet returns no error for
        these two). ``w1m_err``, ``w1p_err`` and ``w1efp_err`` are jetnet's standard deviations
        over the ``num_batches`` batches. For the averaged W1P and W1EFP, the error is the
        average standard deviation, because all features share the same batches. ``fpd`` and
        ``fpd_err`` are the intercept of the 1/N extrapolation and its fit error, ``kpd`` and
        ``kpd_err`` the median and half the 16-84 % interquantile range over batches.
        ``fpnd`` (see :func:`fpnd`) is only present when ``settings.fpnd`` is true. W1M
        compares jet mass over jet pT, because the relative coordinates carry no absolute
        scale. If the generated jets contain NaN or infinite values, every distance is
        ``inf``, ``cov`` and every error are NaN, and a warning is logged.

    Raises:
        MetricInputError: for wrong shapes, fewer than 2 jets or non-finite reference jets.
    """
    settings = settings or JetNetMetricSettings()
    generated_relative = _check_jets(generated_relative, "generated_relative", generated_mask)
    reference_relative = _check_jets(reference_relative, "reference_relative", reference_mask)
    for name, jets in (
        ("generated_relative", generated_relative),
        ("reference_relative", reference_relative),
    ):
        if len(jets) < 2:
            raise MetricInputError(
                f"{name} must contain at least 2 jets for the jetnet metrics, got {len(jets)}"
            )
    if not np.isfinite(reference_relative).all():
        raise MetricInputError(
            "reference_relative contains NaN or infinite values; "
            "check the jets file it was read from"
        )
    if not np.isfinite(generated_relative).all():
        bad_jets = int((~np.isfinite(generated_relative).all(axis=(1, 2))).sum())
        logger.warning(
            "jetnet metrics are inf: %d of %d generated jets contain NaN or infinite values",
            bad_jets,
            len(generated_relative),
        )
        return _diverged_metrics(settings)

    from jetnet.evaluation import gen_metrics

    # batch sizes capped at the smaller sample
    n_jets = min(len(generated_relative), len(reference_relative))
    num_eval_samples = min(settings.num_eval_samples, n_jets)
    cov_mmd_samples = min(settings.cov_mmd_samples, n_jets)
    fpd_max = min(settings.fpd_max_samples, n_jets)
    fpd_min = min(settings.fpd_min_samples, max(fpd_max // 2, 2))
    kpd_batch_size = min(settings.kpd_batch_size, n_jets)

    seeds = _metric_seeds(seed)
    results: dict[str, float] = {}

    with _quiet_jetnet():
        # W1M: jetnet's w1m returns a (mean, std) tuple even with return_std=False, so
        # request both
        with _seeded_jetnet_rng(seeds["w1m"]):
            mean, std = gen_metrics.w1m(
                generated_relative,
                reference_relative,
                num_eval_samples=num_eval_samples,
                num_batches=settings.num_batches,
                return_std=True,
            )
        results["w1m"], results["w1m_err"] = float(mean), float(std)

        # W1P
        with _seeded_jetnet_rng(seeds["w1p"]):
            means, stds = gen_metrics.w1p(
                generated_relative,
                reference_relative,
                mask1=None if generated_mask is None else np.asarray(generated_mask, dtype=bool),
                mask2=None if reference_mask is None else np.asarray(reference_mask, dtype=bool),
                exclude_zeros=True,
                num_eval_samples=num_eval_samples,
                num_batches=settings.num_batches,
                return_std=True,
            )
        results["w1p"], results["w1p_err"] = float(np.mean(means)), float(np.mean(stds))
        for name, value in zip(RELATIVE_FEATURE_NAMES, means):
            results[f"w1p_{name}"] = float(value)

        # W1EFP
        with _seeded_jetnet_rng(seeds["w1efp"]):
            means, stds = gen_metrics.w1efp(
                generated_relative,
                reference_relative,
                num_eval_samples=num_eval_samples,
                num_batches=settings.num_batches,
                return_std=True,
                efp_jobs=settings.efp_jobs,
            )
        results["w1efp"], results["w1efp_err"] = float(np.mean(means)), float(np.mean(stds))

        # COV and MMD: jetnet takes the real jets first
        with _seeded_jetnet_rng(seeds["cov_mmd"]):
            cov, mmd = gen_metrics.cov_mmd(
                reference_relative,
                generated_relative,
                num_eval_samples=cov_mmd_samples,
                num_batches=settings.cov_mmd_batches,
                use_tqdm=False,
            )
        results["cov"], results["mmd"] = float(cov), float(mmd)

        # FPD and KPD on 36 EFPs. Both take the real features first and a seed of their own.
        reference_features = gen_metrics.get_fpd_kpd_jet_features(
            reference_relative, efp_jobs=settings.efp_jobs
        )
        generated_features = gen_metrics.get_fpd_kpd_jet_features(
            generated_relative, efp_jobs=settings.efp_jobs
        )
        fpd_value, fpd_error = gen_metrics.fpd(
            reference_features,
            generated_features,
            min_samples=fpd_min,
            max_samples=fpd_max,
            num_batches=settings.fpd_batches,
            num_points=settings.fpd_points,
            seed=seeds["fpd"],
        )
        results["fpd"], results["fpd_err"] = _checked_fpd(float(fpd_value), float(fpd_error))

        kpd_value, kpd_error = gen_metrics.kpd(
            reference_features,
            generated_features,
            num_batches=settings.kpd_batches,
            batch_size=kpd_batch_size,
            seed=seeds["kpd"],
        )
        results["kpd"], results["kpd_err"] = float(kpd_value), float(kpd_error)

    if settings.fpnd:
        results["fpnd"] = fpnd(
            generated_relative,
            jet_type=settings.fpnd_jet_type,
            batch_size=settings.fpnd_batch_size,
            device=settings.device,
            max_jets=settings.fpnd_max_jets,
        )

    logger.info(
        "jetnet metrics on %d generated and %d reference jets: %d jets per W1 batch, "
        "%d per COV/MMD batch, FPD batch sizes %d-%d, %d per KPD batch",
        len(generated_relative),
        len(reference_relative),
        num_eval_samples,
        cov_mmd_samples,
        fpd_min,
        fpd_max,
        kpd_batch_size,
    )
    return results


def _checked_fpd(value: float, error: float) -> tuple[float, float]:
    """Return jetnet's FPD, or NaN when its extrapolation fit did not run.

    jetnet fits a line to the Frechet distances of several batch sizes with scipy's
    ``curve_fit``, whose starting point is 1.0. When those distances are not finite, as
    for the EFPs of jets far outside the jet cone, the fit returns that starting point with
    a zero error, which would read as a good FPD of 1.0 +- 0.
    """
    if value == 1.0 and error == 0.0:
        logger.warning("jetnet's FPD fit returned its starting point 1.0 with no error, so FPD is reported as NaN")
        return math.nan, math.nan
    return value, error


def _diverged_metrics(settings: JetNetMetricSettings) -> dict[str, float]:
    """Build the metric dict for generated jets with NaN or infinite values."""
    results = {key: math.inf for key in _DISTANCE_KEYS}
    results.update({key: math.nan for key in _UNDEFINED_KEYS})
    if not settings.fpnd:
        del results["fpnd"]
    return results


# --------------------------------------------------------------------------------------------
# FPND


@functools.lru_cache(maxsize=4)
def _cached_particlenet(device: str) -> torch.nn.Module:
    return load_fpnd_particlenet(device)


@functools.lru_cache(maxsize=len(FPND_JET_TYPES))
def _cached_fpnd_statistics(jet_type: str) -> tuple[np.ndarray, np.ndarray]:
    return load_fpnd_statistics(jet_type)


def fpnd(
    relative: np.ndarray,
    *,
    jet_type: str = "g",
    batch_size: int = 64,
    device: str = "cpu",
    max_jets: int = 50_000,
) -> float:
    """Compute the Frechet ParticleNet Distance of jets to JetNet's real jets, offline.

    The jets pass through jetnet's pretrained ParticleNet (rebuilt in
    :mod:`models.particlenet`) after jetnet's FPND normalisation ``JetNet.fpnd_norm``, which
    divides etarel, phirel and ptrel by fixed maxima and shifts ptrel by -0.5 (padded
    constituents included, as in jetnet). The mean and covariance of the 256 ``fc1``
    activations are compared with the statistics that jetnet ships for real JetNet jets of
    ``jet_type``, and nothing is downloaded. The value is therefore a distance to JetNet's
    data, not to the reference jets of this project. For jets from another generator it has
    a floor above 0, which :func:`truth_floor` measures.

    Args:
        relative: ``[n_jets, 30, 3]`` (etarel, phirel, ptrel), padded constituents all zero.
        jet_type: JetNet jet type of the stored statistics: "g", "q" or "t".
        batch_size: jets per ParticleNet forward pass.
        device: torch device for ParticleNet, e.g. "cpu" or "cuda".
        max_jets: use only the first ``max_jets`` jets (jetnet uses at most 50,000).

    Returns:
        FPND, ``inf`` (with a logged warning) if the jets contain NaN or infinite values.

    Raises:
        MetricInputError: for a wrong shape, fewer than two jets, an unknown ``jet_type`` or
            ``batch_size`` or ``max_jets`` below 1.
    """
    relative = _check_jets(relative, "relative", None)
    if relative.shape[1] != N_PARTICLES:
        raise MetricInputError(
            f"jetnet's FPND network takes {N_PARTICLES} particles per jet, "
            f"got {relative.shape[1]}"
        )
    if batch_size < 1 or max_jets < 1:
        raise MetricInputError(
            f"batch_size and max_jets must be at least 1, got {batch_size} and {max_jets}"
        )
    if len(relative) < 2:
        raise MetricInputError(f"FPND needs at least 2 jets for a covariance, got {len(relative)}")
    if not np.isfinite(relative).all():
        logger.warning("FPND is inf: the jets contain NaN or infinite values")
        return math.inf
    try:
        mu_real, sigma_real = _cached_fpnd_statistics(jet_type)
    except ValueError as error:
        raise MetricInputError(str(error)) from error

    from jetnet.datasets import JetNet
    from jetnet.evaluation.gen_metrics import _calculate_frechet_distance

    # jetnet's FPND normalisation (fixed constants, no data access)
    jets = torch.as_tensor(relative[:max_jets], dtype=torch.float32)
    jets = JetNet.fpnd_norm(jets, inplace=False)

    # ParticleNet activations, written into one array allocated before the first batch.
    # Keeping each batch's output as an array of its own made the resident memory grow with
    # every batch in some runs (a peak of 4,723 MiB for 10,000 jets on the CPU). With glibc's
    # dynamic mmap threshold turned off it did not grow, so the kept outputs most likely
    # fragmented the heap to which each batch frees its large temporaries.
    network = _cached_particlenet(str(device))
    activations = np.empty((len(jets), network.fc_size), dtype=np.float64)
    with torch.inference_mode():
        for start in range(0, len(jets), batch_size):
            batch = jets[start : start + batch_size].to(device)
            activations[start : start + len(batch)] = network.activations(batch).cpu().numpy()

    # Frechet distance between the two Gaussians
    mu = activations.mean(axis=0)
    sigma = np.cov(activations, rowvar=False)
    with _quiet_jetnet():
        return float(_calculate_frechet_distance(mu_real, sigma_real, mu, sigma))


# --------------------------------------------------------------------------------------------
# evaluation of generated jets and the truth floor


def evaluate_generated(
    generated_constituents: np.ndarray,
    generated_mask: np.ndarray | None,
    reference_constituents: np.ndarray,
    reference_mask: np.ndarray,
    seed: int,
    *,
    settings: JetNetMetricSettings | None = None,
    jetnet: bool = True,
) -> dict[str, float]:
    """Compute every metric of the final table between generated and reference jets.

    Args:
        generated_constituents: ``[n_jets, 30, 3]`` (px, py, pz) in GeV.
        generated_mask: ``[n_jets, 30]``, true for real constituents, or None to take every
            constituent with pT > 0 (or NaN) as real. Decoded jets rarely contain exact zeros,
            so with None every constituent of a decoded jet counts. Pass a mask to drop
            padding.
        reference_constituents: ``[m_jets, 30, 3]`` (px, py, pz) in GeV.
        reference_mask: ``[m_jets, 30]``, true for real constituents.
        seed: seed of every random choice in the jetnet metrics.
        settings: sample sizes for the jetnet metrics and FPND.
        jetnet: False computes EMD_sum only.

    Returns:
        ``emd_sum`` and its terms ``emd_mass``, ``emd_energy``, ``emd_pt``, ``emd_eta``,
        ``emd_phi``, then the keys of :func:`jetnet_metrics` on relative coordinates.

    Raises:
        MetricInputError: for wrong shapes, empty inputs or non-finite reference jets.
    """
    generated_constituents = _check_jets(
        generated_constituents, "generated_constituents", generated_mask
    )
    if generated_mask is None:
        # written as "not pT <= 0" so that NaN constituents count as real and a diverged
        # model scores inf instead of being masked away
        pt = np.hypot(generated_constituents[..., 0], generated_constituents[..., 1])
        generated_mask = ~(pt <= 0)
    generated_mask = np.asarray(generated_mask, dtype=bool)
    reference_mask = np.asarray(reference_mask, dtype=bool)

    emd = emd_sum(
        generated_constituents,
        reference_constituents,
        generated_mask=generated_mask,
        reference_mask=reference_mask,
    )
    results = {"emd_sum": emd.total}
    results.update({f"emd_{name}": value for name, value in emd.per_quantity.items()})
    if not jetnet:
        return results

    # relative coordinates of diverged jets are NaN, which jetnet_metrics turns into inf
    with np.errstate(invalid="ignore", over="ignore"):
        generated_relative = relative_coordinates(generated_constituents, generated_mask)
    reference_relative = relative_coordinates(reference_constituents, reference_mask)
    results.update(
        jetnet_metrics(
            generated_relative,
            reference_relative,
            seed,
            generated_mask=generated_mask,
            reference_mask=reference_mask,
            settings=settings,
        )
    )
    return results


def truth_floor(
    constituents: np.ndarray,
    mask: np.ndarray,
    seed: int,
    *,
    settings: JetNetMetricSettings | None = None,
    jetnet: bool = True,
) -> dict[str, float]:
    """Compute every metric between two disjoint halves of real jets: the floor no model can beat.

    A permutation seeded by ``seed`` splits the jets into two halves of equal size (one jet
    is left out for an odd count). The first half plays the generated jets and the second
    the reference jets, so the result has the keys of :func:`evaluate_generated`. Its FPND
    is the first half's distance to JetNet's stored statistics.

    Args:
        constituents: ``[n_jets, 30, 3]`` (px, py, pz) in GeV, real jets.
        mask: ``[n_jets, 30]``, true for real constituents.
        seed: seed of the split and of the metrics' random batches.
        settings: sample sizes for the jetnet metrics and FPND, applied to each half.
        jetnet: False computes EMD_sum only.

    Returns:
        The metric dict, as :func:`evaluate_generated` returns it.

    Raises:
        MetricInputError: for wrong shapes or fewer than 4 jets.
    """
    constituents = _check_jets(constituents, "constituents", mask)
    if len(constituents) < 4:
        raise MetricInputError(
            f"the truth floor needs at least 4 real jets, got {len(constituents)}"
        )
    mask = np.asarray(mask, dtype=bool)

    half = len(constituents) // 2
    order = np.random.default_rng(seed).permutation(len(constituents))
    first, second = order[:half], order[half : 2 * half]

    return evaluate_generated(
        constituents[first],
        mask[first],
        constituents[second],
        mask[second],
        seed,
        settings=settings,
        jetnet=jetnet,
    )


# --------------------------------------------------------------------------------------------
# input checks


def _check_jets(jets: np.ndarray, name: str, mask: np.ndarray | None) -> np.ndarray:
    """Check the shapes of ``jets`` and ``mask``, and zero the constituents that ``mask`` drops.

    Returns:
        ``jets`` as a numpy array, a copy when ``mask`` is given.
    """
    jets = np.asarray(jets)
    if jets.ndim != 3 or jets.shape[-1] != 3:
        raise MetricInputError(f"{name} must have shape [n_jets, n_particles, 3], got {jets.shape}")
    if len(jets) == 0:
        raise MetricInputError(f"{name} contains no jets")
    if mask is not None and np.shape(mask) != jets.shape[:2]:
        raise MetricInputError(
            f"the mask of {name} must have shape {jets.shape[:2]}, got {np.shape(mask)}"
        )
    if mask is not None:
        jets = np.where(np.asarray(mask, dtype=bool)[..., None], jets, 0.0).astype(jets.dtype)
    return jets
