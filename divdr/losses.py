"""Losses as functions: DR's budget constraint (eq. 9), DivDR's clustering loss (eq. 2), DRNets'
resource regulariser (eq. 8), and the total (DivDR eq. 3, plus eq. 8's term when it is on).

Per-image values are returned wherever the paper's loss is a mean over images, so the pipeline
can log them and the centroid store can use them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from divdr.config import BudgetConfig, ClusterDistance, ClusteringConfig, ResourceConfig
from divdr.data.labels import IGNORE_INDEX

# sqrt has an infinite derivative at 0: distances are taken of (squared distance + eps).
DISTANCE_EPS = 1e-12
# log E[R] of a route that computes nothing (possible with soft gates) would be -inf.
RESOURCE_EPS = 1e-6


Progress = float | torch.Tensor


def ramp(progress: Progress, start: float, warmup: float) -> Progress:
    """0 before ``start``, then linear from 0 to 1 over ``warmup``, then 1. ``progress`` may be a 0-d
    tensor on the training device (``train.cuda_graph``: a captured step reads the schedule from a
    buffer, not from a Python float baked in at capture); the result is then a tensor too."""
    if isinstance(progress, torch.Tensor):
        if warmup <= 0:
            return (progress >= start).to(progress.dtype)
        return ((progress - start) / warmup).clamp(0.0, 1.0)
    if progress < start:
        return 0.0
    if warmup <= 0:
        return 1.0
    return min(1.0, (progress - start) / warmup)


def budget_schedule(progress: Progress, config: BudgetConfig) -> Progress:
    """Multiplier of the budget loss at ``progress`` = step / total steps (official dynamic4seg.py):
    0 before ``start_fraction``, then linear from 0 to 1 over ``warmup_fraction``, then 1, and 0
    again from ``end_fraction`` on (1.0, the default, the official code: never)."""
    on = ramp(progress, config.start_fraction, config.warmup_fraction)
    if config.end_fraction >= 1.0:
        return on
    if isinstance(progress, torch.Tensor):
        return on * (progress < config.end_fraction).to(progress.dtype)
    return on if progress < config.end_fraction else 0.0


def clustering_schedule(progress: Progress, config: ClusteringConfig) -> Progress:
    """Multiplier of the clustering loss at ``progress``: 0 before ``start_fraction``, then linear
    from 0 to 1 over ``warmup_fraction``, then 1 (with the defaults: 1 from the start, the paper's)."""
    return ramp(progress, config.start_fraction, config.warmup_fraction)


def budget_loss(cost_ratio: torch.Tensor, mu: float, per_image: bool = False,
                one_sided: bool = False) -> torch.Tensor:
    """DR eq. 9 without its weight: ``(C(Space)/C_max - mu)^2``.

    By default (the paper, and the official code) the square is of the batch-mean ratio,
    so individual images may use more or less than mu as long as the batch meets the budget.
    ``per_image`` squares each image's deviation and averages those instead: every image has to
    fit in mu, so each must find the cheapest route that serves it. ``one_sided`` makes mu a
    ceiling: only the excess over it is squared, a route under budget is left alone.
    """
    cost = cost_ratio if per_image else cost_ratio.mean()
    excess = cost - mu
    if one_sided:
        excess = excess.clamp(min=0.0)
    return (excess ** 2).mean()


def pairwise_distance(a: torch.Tensor, centres: torch.Tensor, distance: ClusterDistance) -> torch.Tensor:
    """[B, D] x [K, D] -> [B, K]: L2 distance (``l2``) or squared L2 distance (``squared_l2``)."""
    squared = (a.unsqueeze(1) - centres.unsqueeze(0)).pow(2).sum(-1)
    return squared if distance == "squared_l2" else (squared + DISTANCE_EPS).sqrt()


def clustering_loss(a: torch.Tensor, centres: torch.Tensor, sigma2: float | torch.Tensor, alpha: float,
                    distance: ClusterDistance = "l2", members: torch.Tensor | None = None) -> torch.Tensor:
    """DivDR eq. 2 per image, [B]:

    ``max(0, alpha + d(x, mu(x)) / (2 sigma^2) + log sum_{k != c(x)} exp(-d(x, mu_k) / (2 sigma^2)))``

    with mu(x) the nearest centre (the paper's), or, where ``members`` [B] gives one (>= 0), the
    cluster K-means put the image in at its last update (magnet loss's membership,
    ``clustering.membership: kmeans``; -1 falls back to the nearest). ``sigma2`` and ``centres`` come
    from the last K-means (the centroid store), not from the batch. With a single centre there is no
    other cluster to push away from and the loss is 0. ``sigma2`` may be a 0-d tensor (a captured step's buffer), whose
    positivity its writer checks.
    """
    if not isinstance(sigma2, torch.Tensor) and sigma2 <= 0:
        raise ValueError(f"sigma2 must be > 0, got {sigma2}")
    a = a.to(torch.promote_types(a.dtype, torch.float32))  # A(x) from a bf16 / fp16 forward: eq. 2 in float32
    centres = centres.to(a)
    if centres.shape[0] < 2:
        return a.sum(dim=1) * 0.0
    scaled = pairwise_distance(a, centres, distance) / (2.0 * sigma2)
    own = scaled.argmin(dim=1)
    if members is not None:
        members = members.to(device=own.device, dtype=own.dtype)
        own = torch.where(members >= 0, members, own)
    own_term = scaled.gather(1, own.unsqueeze(1)).squeeze(1)
    others = scaled.scatter(1, own.unsqueeze(1), float("inf"))
    return torch.relu(alpha + own_term + torch.logsumexp(-others, dim=1))


def resource_schedule(progress: Progress, config: ResourceConfig) -> Progress:
    """Multiplier of the resource regulariser: DRNets add it in the fine-tuning stage, i.e. from
    ``start_fraction`` of training on (0 before, 1 after)."""
    return ramp(progress, config.start_fraction, 0.0)


def correctness(logits: torch.Tensor, labels: torch.Tensor, config: ResourceConfig,
                ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """DRNets' 1[y_hat = y] adapted to segmentation, per image [B] in [0, 1], no gradient.

    ``pixels``: the image's pixel accuracy over labelled pixels (eq. 8 applied per pixel and
    averaged over the image); ``image``: 1 if that accuracy is >= ``image_accuracy``, else 0.
    An image without a labelled pixel counts as not correct (0).
    """
    with torch.no_grad():
        valid = labels != ignore_index
        hits = ((logits.argmax(dim=1) == labels) & valid).flatten(1).sum(1)
        accuracy = hits.to(logits.dtype) / valid.flatten(1).sum(1).clamp_min(1).to(logits.dtype)
        if config.correct == "image":
            return (accuracy >= config.image_accuracy).to(logits.dtype)
        return accuracy


def resource_loss(cost_ratio: torch.Tensor, correct: torch.Tensor) -> torch.Tensor:
    """DRNets eq. 8 without its weight, per image [B]: ``1[correct] * log E[R]``.

    ``cost_ratio`` is the expected routing cost relative to everything open (``budget_ratio``);
    the term is <= 0 and falls with the cost. Normalising by C_max only shifts log E[R], so the
    gradient is the paper's: ``1[correct] * R(branch) / E[R]`` per branch weight.
    """
    return correct.detach().to(cost_ratio) * cost_ratio.clamp_min(RESOURCE_EPS).log()


@dataclass
class LossTerms:
    """DivDR eq. 3 with DRNets' eq. 8 beside the budget term:
    ``total = task + lambda1 * budget + lambda2 * clustering + lambda * resource``, with each term."""

    total: torch.Tensor
    task: torch.Tensor
    budget: torch.Tensor
    clustering: torch.Tensor
    clustering_per_image: torch.Tensor | None
    resource: torch.Tensor


def total_loss(task: torch.Tensor, *, cost_ratio: torch.Tensor, progress: Progress, budget: BudgetConfig,
               clustering: ClusteringConfig, activations: torch.Tensor | None = None,
               centres: torch.Tensor | None = None, sigma2: float | torch.Tensor | None = None,
               clustering_on: float | torch.Tensor = 1.0, resource: ResourceConfig | None = None,
               correct: torch.Tensor | None = None, members: torch.Tensor | None = None) -> LossTerms:
    """Eq. 3. The clustering term is 0 until centres exist (before the first K-means). The
    resource term (eq. 8, batch mean) needs ``correct`` (from ``correctness``) when its weight is > 0.
    ``progress`` and ``sigma2`` may be 0-d tensors on the device (``ramp``), with the same result;
    ``clustering_on`` multiplies the clustering term: a captured step computes eq. 2 at every step and
    turns it off with a 0 where there are no centres for it yet (or the store paused it). ``members``
    (``clustering.membership: kmeans``): each image's cluster at the last K-means, -1 where it has none."""
    zero = task.new_zeros(())
    budget_term = zero
    if budget.weight:
        budget_term = (budget_loss(cost_ratio, budget.mu, budget.per_image, budget.one_sided)
                       * budget_schedule(progress, budget))
    per_image = None
    clustering_term = zero
    if clustering.weight and centres is not None and activations is not None and sigma2 is not None:
        floored = (sigma2.clamp_min(clustering.sigma2_min) if isinstance(sigma2, torch.Tensor)
                   else max(sigma2, clustering.sigma2_min))
        per_image = clustering_loss(activations, centres, floored, clustering.alpha, clustering.distance,
                                    members)
        clustering_term = per_image.mean() * clustering_schedule(progress, clustering)
        if isinstance(clustering_on, torch.Tensor) or clustering_on != 1.0:
            clustering_term = clustering_term * clustering_on
    resource_term = zero
    resource_weight = resource.weight if resource is not None else 0.0
    if resource_weight:
        if correct is None:
            raise ValueError("resource.weight > 0 needs correct= (divdr.losses.correctness of the logits)")
        resource_term = resource_loss(cost_ratio, correct).mean() * resource_schedule(progress, resource)
    total = task + budget.weight * budget_term + clustering.weight * clustering_term + resource_weight * resource_term
    return LossTerms(total=total, task=task, budget=budget_term, clustering=clustering_term,
                     clustering_per_image=per_image, resource=resource_term)
