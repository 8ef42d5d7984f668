import math
import re

import pytest
import torch

from divdr.config import BudgetConfig, ClusteringConfig, ConfigError
from divdr.losses import budget_loss, budget_schedule, clustering_loss, clustering_schedule, total_loss


def test_budget_schedule_official():
    cfg = BudgetConfig(weight=0.8, mu=0.1)  # on at 40%, linear warm-up over 2%
    assert budget_schedule(0.0, cfg) == 0.0
    assert budget_schedule(0.399, cfg) == 0.0
    assert budget_schedule(0.41, cfg) == pytest.approx(0.5)
    assert budget_schedule(0.42, cfg) == pytest.approx(1.0)
    assert budget_schedule(0.9, cfg) == 1.0
    assert budget_schedule(0.5, BudgetConfig(start_fraction=0.5, warmup_fraction=0.0)) == 1.0


def test_budget_that_ends_is_off_from_its_end_fraction_also_on_the_device():
    cfg = BudgetConfig(start_fraction=0.2, warmup_fraction=0.1, end_fraction=0.6)
    for progress, expected in ((0.1, 0.0), (0.25, 0.5), (0.59, 1.0), (0.6, 0.0), (0.9, 0.0)):
        assert budget_schedule(progress, cfg) == pytest.approx(expected)
        # a captured step reads progress from a 0-d tensor: the same schedule
        assert float(budget_schedule(torch.tensor(progress), cfg)) == pytest.approx(expected)
    with pytest.raises(ConfigError, match=r"budget\.end_fraction"):
        BudgetConfig(start_fraction=0.4, end_fraction=0.4)
    with pytest.raises(ConfigError, match=r"budget\.end_fraction"):
        BudgetConfig(end_fraction=1.5)


def test_budget_loss_by_hand():
    # batch mean of the ratios (0.2 + 0.4) / 2 = 0.3; (0.3 - 0.1)^2 = 0.04
    assert float(budget_loss(torch.tensor([0.2, 0.4]), mu=0.1)) == pytest.approx(0.04)
    # per image: ((0.2 - 0.1)^2 + (0.4 - 0.1)^2) / 2 = (0.01 + 0.09) / 2
    assert float(budget_loss(torch.tensor([0.2, 0.4]), mu=0.1, per_image=True)) == pytest.approx(0.05)


def test_one_sided_budget_leaves_routes_under_mu_alone():
    ratios = torch.tensor([0.2, 0.4], requires_grad=True)
    # per image: only the 0.4 image is over mu = 0.3: (0.1^2 + 0) / 2
    loss = budget_loss(ratios, mu=0.3, per_image=True, one_sided=True)
    assert float(loss) == pytest.approx(0.005)
    loss.backward()
    assert ratios.grad.tolist() == pytest.approx([0.0, 0.1])  # the cheap image is not pushed to spend more
    # the two-sided square pushes it up: d/dc (c - mu)^2 / 2 = (0.2 - 0.3) = -0.1
    ratios.grad = None
    budget_loss(ratios, mu=0.3, per_image=True).backward()
    assert ratios.grad.tolist() == pytest.approx([-0.1, 0.1])
    # batch mean 0.3 meets a ceiling of 0.35: no loss; over it, the paper's square of the excess
    assert float(budget_loss(ratios, mu=0.35, one_sided=True)) == 0.0
    assert float(budget_loss(ratios, mu=0.1, one_sided=True)) == pytest.approx(0.04)


def test_clustering_loss_by_hand_l2_and_squared():
    a = torch.tensor([[0.0, 0.0]])
    centres = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    # sigma2 = 0.5 -> 2 sigma^2 = 1; own distance 0; other distance 5 (l2) or 25 (squared)
    # L = max(0, alpha + 0 + log(exp(-5))) = max(0, alpha - 5)
    assert float(clustering_loss(a, centres, 0.5, alpha=6.0)) == pytest.approx(1.0, abs=1e-5)
    assert float(clustering_loss(a, centres, 0.5, alpha=4.0)) == 0.0
    assert float(clustering_loss(a, centres, 0.5, alpha=26.0, distance="squared_l2")) == pytest.approx(1.0, abs=1e-5)


def test_clustering_loss_three_centres_by_hand():
    a = torch.tensor([[1.0, 0.0]])
    centres = torch.tensor([[0.0, 0.0], [4.0, 0.0], [0.0, 3.0]])
    # sigma2 = 1 -> 2 sigma^2 = 2; l2 distances 1, 3, sqrt(10); nearest is centre 0
    expected = 0.5 + 1 / 2 + math.log(math.exp(-3 / 2) + math.exp(-math.sqrt(10) / 2))
    got = clustering_loss(a, centres, 1.0, alpha=0.5)
    assert float(got) == pytest.approx(expected, rel=1e-6)


def test_clustering_loss_per_image_and_gradient_only_into_activations():
    a = torch.tensor([[0.1, 0.0], [2.9, 4.1], [1.5, 2.0]], requires_grad=True)
    centres = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    per_image = clustering_loss(a, centres, 0.5, alpha=5.0)  # alpha large enough that all are active
    assert per_image.shape == (3,)
    # the image half-way between the centres has the highest loss
    assert per_image.argmax() == 2
    per_image.sum().backward()
    assert a.grad is not None and a.grad.abs().sum() > 0
    # descending the gradient moves the first image towards its own centre
    assert a.grad[0, 0] > 0


def test_clustering_loss_with_kmeans_membership_pulls_a_crossed_image_back():
    """clustering.membership: kmeans: the own centre is the image's K-means cluster, not the nearest; an
    image that crossed the midpoint is pulled back towards it instead of on into the other cluster."""
    centres = torch.tensor([[0.0, 0.0], [4.0, 0.0]])
    a = torch.tensor([[3.0, 0.0], [3.0, 0.0], [1.0, 0.0]], requires_grad=True)
    members = torch.tensor([0, -1, -1])  # the first was in cluster 0 at the last K-means; the others unseen
    per_image = clustering_loss(a, centres, 0.5, alpha=1.0, members=members)
    # 2 sigma^2 = 1. Own = centre 0 at distance 3, the other at 1: max(0, 1 + 3 - 1) = 3
    assert float(per_image[0]) == pytest.approx(3.0, abs=1e-5)
    # unseen (-1): the nearest, as the paper's mu(x): max(0, 1 + 1 - 3) = 0
    assert float(per_image[1]) == 0.0
    assert torch.equal(per_image[1:], clustering_loss(a[1:], centres, 0.5, alpha=1.0))
    per_image.sum().backward()
    assert a.grad[0, 0] > 0  # descending moves it back towards centre 0 (smaller x)
    assert a.grad[1].abs().sum() == 0


def test_total_loss_passes_the_membership_on():
    clustering = ClusteringConfig(weight=1.0, k=2, alpha=1.0, membership="kmeans")
    a = torch.tensor([[3.0, 0.0]])
    centres = torch.tensor([[0.0, 0.0], [4.0, 0.0]])
    terms = total_loss(torch.tensor(0.0), cost_ratio=torch.tensor([0.3]), progress=1.0, budget=BudgetConfig(weight=0.0),
                       clustering=clustering, activations=a, centres=centres, sigma2=0.5, members=torch.tensor([0]))
    assert float(terms.clustering) == pytest.approx(3.0, abs=1e-5)
    with pytest.raises(ConfigError, match=re.escape("clustering.membership must be 'nearest' or 'kmeans', got 'own'")):
        ClusteringConfig(membership="own")


def test_clustering_loss_single_centre_and_bad_sigma():
    a = torch.randn(4, 3, requires_grad=True)
    assert torch.equal(clustering_loss(a, torch.zeros(1, 3), 1.0, 1.0), torch.zeros(4))
    with pytest.raises(ValueError, match="sigma2"):
        clustering_loss(a, torch.zeros(2, 3), 0.0, 1.0)


def test_total_loss_eq3():
    task = torch.tensor(2.0)
    ratio = torch.tensor([0.3, 0.3])
    budget = BudgetConfig(weight=0.5, mu=0.1)
    clustering = ClusteringConfig(weight=0.25, alpha=6.0)
    a = torch.tensor([[0.0, 0.0]])
    centres = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    terms = total_loss(task, cost_ratio=ratio, progress=1.0, budget=budget, clustering=clustering,
                       activations=a, centres=centres, sigma2=0.5)
    # 2 + 0.5 * (0.3 - 0.1)^2 + 0.25 * 1.0
    assert float(terms.total) == pytest.approx(2 + 0.5 * 0.04 + 0.25, abs=1e-5)
    # before the budget starts and before the first centres exist, only the task loss remains
    early = total_loss(task, cost_ratio=ratio, progress=0.1, budget=budget, clustering=clustering)
    assert float(early.total) == 2.0 and early.clustering_per_image is None
    # a ceiling the routes meet: the budget term is 0 (the paper's square would push them up to mu)
    ceiling = total_loss(task, cost_ratio=ratio, progress=1.0, clustering=clustering,
                         budget=BudgetConfig(weight=0.5, mu=0.4, per_image=True, one_sided=True))
    assert float(ceiling.budget) == 0.0


def test_two_centres_without_margin_leave_the_loss_identically_zero_and_are_refused():
    torch.manual_seed(0)
    a, centres = torch.rand(16, 6), torch.rand(2, 6)
    assert float(clustering_loss(a, centres, sigma2=0.1, alpha=0.0).abs().max()) == 0.0
    assert float(clustering_loss(a, centres, sigma2=0.1, alpha=1.0).max()) > 0.0
    with pytest.raises(ConfigError, match="identically 0"):
        ClusteringConfig(weight=0.5, k=2, alpha=0.0)
    ClusteringConfig(weight=0.0, k=2, alpha=0.0)  # DR: the store still clusters, no loss


def test_clustering_schedule_starts_late_and_ramps():
    paper = ClusteringConfig(weight=0.5, k=3)
    assert clustering_schedule(0.0, paper) == 1.0  # the paper's: on from the first centres
    late = ClusteringConfig(weight=0.5, k=3, alpha=1.0, start_fraction=0.5, warmup_fraction=0.2)
    assert clustering_schedule(0.49, late) == 0.0
    assert clustering_schedule(0.6, late) == pytest.approx(0.5)
    assert clustering_schedule(0.8, late) == 1.0
    a = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    centres = torch.tensor([[0.0, 0.0], [1.0, 1.0], [5.0, 5.0]])
    kwargs = dict(cost_ratio=torch.tensor([0.5, 0.5]), budget=BudgetConfig(), activations=a, centres=centres,
                  sigma2=1.0)
    full = total_loss(torch.tensor(0.0), progress=0.9, clustering=late, **kwargs).clustering
    half = total_loss(torch.tensor(0.0), progress=0.6, clustering=late, **kwargs).clustering
    before = total_loss(torch.tensor(0.0), progress=0.3, clustering=late, **kwargs).clustering
    assert float(full) > 0 and float(half) == pytest.approx(0.5 * float(full)) and float(before) == 0.0


@pytest.mark.parametrize(("field", "value"), [("start_fraction", 1.5), ("warmup_fraction", -0.1),
                                              ("kmeans_start", "cold"), ("sigma2_min", -0.1),
                                              ("stable_max_change", 1.0), ("stable_max_change", -0.1)])
def test_clustering_schedule_options_are_validated(field, value):
    with pytest.raises(ConfigError, match=rf"clustering\.{field}"):
        ClusteringConfig(**{field: value})


def test_sigma2_floor_bounds_the_pull_of_collapsed_clusters():
    """With sigma^2 shrunk by the loss itself, the floor is what eq. 2 divides by; above it, nothing changes.
    Points near the boundary between two clusters (margin below 2 * alpha * sigma^2) are the ones pulled."""
    a = torch.tensor([[0.495, 0.495], [0.51, 0.5]], requires_grad=True)
    centres = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    kwargs = dict(cost_ratio=torch.tensor([0.5, 0.5]), progress=1.0, budget=BudgetConfig(), activations=a,
                  centres=centres)
    plain, floored = (ClusteringConfig(weight=1.0, k=2, alpha=1.0, sigma2_min=m) for m in (0.0, 0.25))
    collapsed = total_loss(torch.tensor(0.0), clustering=plain, sigma2=0.01, **kwargs).clustering
    bounded = total_loss(torch.tensor(0.0), clustering=floored, sigma2=0.01, **kwargs).clustering
    at_floor = total_loss(torch.tensor(0.0), clustering=plain, sigma2=0.25, **kwargs).clustering
    assert float(bounded) == pytest.approx(float(at_floor)) and float(collapsed) > 0
    grad_collapsed, = torch.autograd.grad(collapsed, a, retain_graph=True)
    grad_bounded, = torch.autograd.grad(bounded, a)
    assert float(grad_bounded.norm()) < float(grad_collapsed.norm()) / 10
    wide = total_loss(torch.tensor(0.0), clustering=floored, sigma2=1.0, **kwargs).clustering
    assert float(wide) == pytest.approx(float(total_loss(torch.tensor(0.0), clustering=plain, sigma2=1.0,
                                                         **kwargs).clustering))
