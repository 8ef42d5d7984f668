"""divdr.ops: BatchNorm statistics estimated again (``recalibrate_batchnorm``)."""

import torch
from torch import nn

from divdr.ops import drop_batch_counters, recalibrate_batchnorm


def test_recalibrate_batchnorm_averages_over_batches_and_keeps_the_rest():
    """The network drops BatchNorm's counter (drop_batch_counters); torch's update_bn needs it for its
    equal-weight average: the counter is back for the while, then gone again, and momentum, mode and
    weights are what they were."""
    torch.manual_seed(0)
    net = drop_batch_counters(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)))
    norm = net[1]
    norm.running_mean.fill_(9.0)
    weight = net[0].weight.clone()
    net.eval()
    batches = [torch.randn(2, 3, 5, 5), 3 + torch.randn(4, 3, 5, 5)]
    recalibrate_batchnorm(net, batches)
    with torch.no_grad():
        means = [net[0](b).mean(dim=(0, 2, 3)) for b in batches]
        variances = [net[0](b).var(dim=(0, 2, 3)) for b in batches]
    assert torch.allclose(norm.running_mean, (means[0] + means[1]) / 2, atol=1e-5)  # per batch, not per image
    assert torch.allclose(norm.running_var, (variances[0] + variances[1]) / 2, atol=1e-4)
    assert norm.num_batches_tracked is None and norm.momentum == 0.1 and not net.training
    assert torch.equal(net[0].weight, weight) and "num_batches_tracked" not in dict(net.state_dict())
