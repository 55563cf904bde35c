"""Figures of a generative model's samples, on feature vectors of any kind and any data.

The functions take feature vectors (a classifier's penultimate activations, flattened pixels,
...) as float tensors of shape (N, D) and return plain Python numbers:

- :func:`frechet_distance`: the Fréchet distance between Gaussians fitted to two sets (FID when
  the features are an Inception network's; here any fixed network's).
- :func:`precision_recall`: the k-nearest-neighbour manifold estimate of Kynkäänniemi et al.
  (2019): how much of the samples lies on the data's manifold (precision) and how much of the
  data's manifold the samples cover (recall).
- :func:`memorised`: how often samples sit as close to a training point as only few new data
  points do (copies of the training set).
- :func:`label_figures`: what a classifier's probabilities say of a set of samples: confidence,
  the spread over classes, and agreement with the classes asked for.

Statistics and distances are computed in float64: the trace of a matrix square root and the
difference of large squared norms lose digits in float32. Pairwise distances are taken a block
of rows at a time, so sets of 10,000 points each need tens of megabytes, not gigabytes.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "COPY_RATIO",
    "MEMORISED_QUANTILE",
    "frechet_distance",
    "frechet_distance_from_stats",
    "gaussian_stats",
    "label_figures",
    "memorised",
    "nearest",
    "precision_recall",
]

#: The held-out quantile of nearest-training distances under which :func:`memorised` calls a sample
#: close to the training set: 5% of new data points are that close by chance.
MEMORISED_QUANTILE = 0.05

#: :func:`memorised` calls a sample a lone copy when its nearest training point is nearer than this
#: fraction of the distance to the second nearest (the ratio test of Gu et al. 2023 on memorisation in
#: diffusion models).
COPY_RATIO = 1 / 3

#: Rows of the first set per block of pairwise distances: 1,024 x 10,000 float64 is 82 MB.
_BLOCK = 1024


def _as_points(x: Tensor, name: str) -> Tensor:
    """float64 (N, D) on the CPU from any real (N, D) tensor; refuses other shapes and empty sets."""
    if x.dim() != 2:
        raise ValueError(f"{name}: expected feature vectors (N, D), got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{name}: no points")
    return x.detach().to("cpu", torch.float64)


# --------------------------------------------------------------------------- Fréchet distance


def gaussian_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """float (N, D) -> mean (D,) and covariance (D, D), float64; the covariance divides by N - 1."""
    x = _as_points(x, "x")
    if x.shape[0] < 2:
        raise ValueError("x: a covariance needs at least 2 points")
    mean = x.mean(0)
    centred = x - mean
    return mean, centred.T @ centred / (x.shape[0] - 1)


def _psd_sqrt(matrix: Tensor) -> Tensor:
    """Symmetric positive semi-definite (D, D) -> its symmetric square root (D, D).

    Through the eigen-decomposition of the symmetrised matrix; eigenvalues that rounding made
    slightly negative are taken as zero.
    """
    values, vectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * values.clamp(min=0).sqrt()) @ vectors.T


def frechet_distance_from_stats(mean_a: Tensor, cov_a: Tensor, mean_b: Tensor, cov_b: Tensor) -> float:
    """Fréchet (2-Wasserstein squared) distance between N(mean_a (D,), cov_a (D, D)) and N(mean_b, cov_b).

    ``|mean_a - mean_b|^2 + tr(cov_a) + tr(cov_b) - 2 tr((cov_a cov_b)^(1/2))``. The last trace is
    taken as ``tr((S_a cov_b S_a)^(1/2))`` with ``S_a = cov_a^(1/2)``: the same eigenvalues as
    ``cov_a cov_b`` but of a symmetric positive semi-definite matrix, so a symmetric eigen-solver
    gives them real and stable, where the square root of the non-symmetric product needs complex
    arithmetic and can return spurious imaginary parts. The result is clamped at zero (rounding
    can make the distance of a set to itself about -1e-12).
    """
    mean_a, mean_b = mean_a.to(torch.float64), mean_b.to(torch.float64)
    cov_a, cov_b = cov_a.to(torch.float64), cov_b.to(torch.float64)
    if mean_a.shape != mean_b.shape or cov_a.shape != cov_b.shape or cov_a.shape != (*mean_a.shape, *mean_a.shape):
        raise ValueError(
            f"statistics of different dimensions: means {tuple(mean_a.shape)} and {tuple(mean_b.shape)}, "
            f"covariances {tuple(cov_a.shape)} and {tuple(cov_b.shape)}"
        )
    root_a = _psd_sqrt(cov_a)
    middle = root_a @ cov_b @ root_a
    eigen = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0)
    distance = (mean_a - mean_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * eigen.sqrt().sum()
    return max(0.0, float(distance))


def frechet_distance(a: Tensor, b: Tensor) -> float:
    """Fréchet distance between Gaussians fitted to feature sets a (N, D) and b (M, D) (FID's formula).

    Lower is closer; 0 for sets with equal means and covariances. It grows as N and M shrink even
    between two samples of one distribution (the covariances' estimation noise), so compare
    figures only at equal N and M, beside the distance between two real sets of those sizes.
    """
    mean_a, cov_a = gaussian_stats(a)
    mean_b, cov_b = gaussian_stats(b)
    return frechet_distance_from_stats(mean_a, cov_a, mean_b, cov_b)


# --------------------------------------------------------------------------- nearest neighbours


def _squared_distances(a: Tensor, b: Tensor, b_norms: Tensor) -> Tensor:
    """float64 a (n, D), b (M, D) and |b|^2 (M,) -> squared distances (n, M), clamped at zero."""
    return ((a.square().sum(1, keepdim=True) + b_norms[None]) - 2 * a @ b.T).clamp_(min=0)


def _knn_radii(x: Tensor, k: int) -> Tensor:
    """float64 (N, D) -> (N,) squared distance from each point to its k-th nearest other point."""
    if not 1 <= k < x.shape[0]:
        raise ValueError(f"k = {k}: need 1 <= k < the number of points ({x.shape[0]})")
    norms = x.square().sum(1)
    radii = []
    for start in range(0, len(x), _BLOCK):
        d2 = _squared_distances(x[start : start + _BLOCK], x, norms)
        # the k + 1 smallest include the point itself, at distance 0
        radii.append(d2.topk(k + 1, dim=1, largest=False).values[:, -1])
    return torch.cat(radii)


def _inside(points: Tensor, centres: Tensor, radii: Tensor) -> Tensor:
    """(M,) bool: whether each of ``points`` (M, D) lies in a ball around ``centres`` (N, D), squared ``radii`` (N,)."""
    norms = centres.square().sum(1)
    hits = [
        (_squared_distances(points[start : start + _BLOCK], centres, norms) <= radii[None]).any(1)
        for start in range(0, len(points), _BLOCK)
    ]
    return torch.cat(hits)


def precision_recall(real: Tensor, fake: Tensor, k: int = 3) -> tuple[float, float]:
    """(precision, recall) of ``fake`` (M, D) against ``real`` (N, D): the k-NN manifold estimate.

    Each set's manifold is the union of balls around its points, each reaching the point's
    ``k``-th nearest neighbour within its own set (Kynkäänniemi et al. 2019). Precision is the
    share of fake points inside the real manifold (are samples realistic?), recall the share of
    real points inside the fake manifold (do samples cover the data's variety?). Both lie in
    [0, 1]; identical sets score 1 and 1. Compare figures at equal N, M and k: larger sets make
    smaller balls.
    """
    real, fake = _as_points(real, "real"), _as_points(fake, "fake")
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"real and fake have different dimensions: {real.shape[1]} and {fake.shape[1]}")
    precision = _inside(fake, real, _knn_radii(real, k)).double().mean()
    recall = _inside(real, fake, _knn_radii(fake, k)).double().mean()
    return float(precision), float(recall)


def nearest(points: Tensor, reference: Tensor, k: int = 1) -> tuple[Tensor, Tensor]:
    """For each of ``points`` (M, D): its ``k`` nearest points of ``reference`` (N, D), nearest first.

    Returns distances (M, k) float64 and indices (M, k) int64. The neighbours are found from
    squared norms and dot products, block by block; their distances are then taken again from
    the differences of the vectors, so an exact copy reads exactly 0.
    """
    points, reference = _as_points(points, "points"), _as_points(reference, "reference")
    if points.shape[1] != reference.shape[1]:
        raise ValueError(f"points and reference have different dimensions: {points.shape[1]} and {reference.shape[1]}")
    if not 1 <= k <= reference.shape[0]:
        raise ValueError(f"k = {k}: need 1 <= k <= the number of reference points ({reference.shape[0]})")
    norms = reference.square().sum(1)
    index = torch.cat(
        [
            _squared_distances(points[start : start + _BLOCK], reference, norms).topk(k, dim=1, largest=False).indices
            for start in range(0, len(points), _BLOCK)
        ]
    )
    distances = (points[:, None] - reference[index]).norm(dim=2)
    # the exact distances may swap two neighbours that the expansion ranked the other way round
    distances, order = distances.sort(1)
    return distances, index.gather(1, order)


# --------------------------------------------------------------------------- memorisation


def memorised(samples: Tensor, train: Tensor, heldout: Tensor, quantile: float = MEMORISED_QUANTILE) -> dict[str, Any]:
    """How often ``samples`` (M, D) sit closer to ``train`` (N, D) than new data, ``heldout`` (K, D), does.

    Each sample's distance to its nearest training point is compared with a threshold: the
    ``quantile`` (default :data:`MEMORISED_QUANTILE`, 5%) of the held-out points' distances to
    their nearest training points. By construction that share of new data falls under it.

    How to read it: ``share_under`` beside ``share_expected`` (= ``quantile``). About equal: the
    samples are no closer to the training set than unseen data from the same source, no sign of
    copying. Well above it (a ``ratio`` of several): the model reproduces training points, or
    near-copies of them. Below it: samples lie further from the training set than new data
    does, which says they are unlike the data (see precision), not that they are original.

    Two figures tell copies from mere closeness. In pixels a sample with little in it (a blank
    image, one small shape) is near many training images and can fall under the threshold
    without copying any; ``share_lone_copies`` counts the samples whose nearest training point
    is nearer than :data:`COPY_RATIO` of the distance to the second nearest, as a copy's is and a
    blank image's is not (``heldout_share_lone_copies``: the same for new data, the level to
    expect). ``exact_copies`` counts samples equal to a training point (exact only where features
    are exact, e.g. pixels). Other keys: ``quantile``, ``threshold``, and the median
    nearest-training distance of the samples and of the held-out points.
    """
    if not 0 < quantile < 1:
        raise ValueError(f"quantile must be in (0, 1), got {quantile}")
    train = _as_points(train, "train")
    if len(train) < 2:
        raise ValueError("train: need at least 2 points (the copy test uses the second nearest)")
    sample_d, _ = nearest(samples, train, k=2)
    heldout_d, _ = nearest(heldout, train, k=2)
    threshold = float(torch.quantile(heldout_d[:, 0], quantile))
    share = float((sample_d[:, 0] <= threshold).double().mean())

    def lone(d: Tensor) -> float:
        return float((d[:, 0] < COPY_RATIO * d[:, 1]).double().mean())

    return {
        "quantile": quantile,
        "threshold": threshold,
        "share_under": share,
        "share_expected": quantile,
        "ratio": share / quantile,
        "share_lone_copies": lone(sample_d),
        "heldout_share_lone_copies": lone(heldout_d),
        "exact_copies": float((sample_d[:, 0] == 0).double().mean()),
        "median_distance": float(sample_d[:, 0].median()),
        "heldout_median_distance": float(heldout_d[:, 0].median()),
    }


# --------------------------------------------------------------------------- classifier figures


def label_figures(probs: Tensor, asked: Tensor | None = None, confident: float = 0.9) -> dict[str, Any]:
    """Figures of a classifier's class probabilities ``probs`` (N, C) for N images.

    ``mean_confidence``: the mean of each image's largest probability; ``share_confident``: the
    share of images whose largest probability is at least ``confident``; ``label_entropy_bits``:
    the entropy, in bits, of the histogram of predicted labels (argmax), at most
    ``max_entropy_bits`` = log2 C when every class is predicted equally often, 0 when all images
    get one class; ``histogram``: the counts per class. With ``asked`` (N,) int64, the classes the
    images were drawn for, ``share_as_asked`` is the share classified as asked.
    """
    if probs.dim() != 2 or probs.shape[0] == 0:
        raise ValueError(f"probs: expected (N, C) probabilities of N >= 1 images, got shape {tuple(probs.shape)}")
    probs = probs.detach().to("cpu", torch.float64)
    confidence, predicted = probs.max(1)
    classes = probs.shape[1]
    counts = torch.bincount(predicted, minlength=classes)
    share = counts.double() / counts.sum()
    nonzero = share[share > 0]
    figures: dict[str, Any] = {
        "mean_confidence": float(confidence.mean()),
        "share_confident": float((confidence >= confident).double().mean()),
        "confident": confident,
        "label_entropy_bits": float(-(nonzero * nonzero.log2()).sum()) + 0.0,  # + 0.0: no -0.0 for one class
        "max_entropy_bits": math.log2(classes),
        "histogram": counts.tolist(),
    }
    if asked is not None:
        if asked.shape != predicted.shape:
            raise ValueError(f"asked: expected ({len(predicted)},) classes, got shape {tuple(asked.shape)}")
        figures["share_as_asked"] = float((predicted == asked.to("cpu")).double().mean())
    return figures
