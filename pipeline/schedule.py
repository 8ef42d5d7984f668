"""When the centroid store clusters, and when the workers switch to the new centres.

Both sides compute the same schedule from the config, so no message is needed to agree on it:
version v is clustered from the activations of steps < ``trigger[v]`` and every rank switches
to it at step ``trigger[v] + switch_lag`` (K-means runs while the workers keep training).
"""

from __future__ import annotations


def kmeans_trigger_steps(total_steps: int, every: int, every_final: int = 0) -> list[int]:
    """Steps s_1 < s_2 < ... at which K-means versions 1, 2, ... are taken.

    With ``every_final`` > 0 the period is annealed linearly from ``every`` (start of training)
    to ``every_final`` (end), e.g. frequent updates early while routes move fast.
    """
    steps: list[int] = []
    step = every
    while step < total_steps:
        steps.append(step)
        period = every
        if every_final:
            period = round(every + (every_final - every) * step / total_steps)
        step += max(1, period)
    return steps


def switch_step(trigger_step: int, switch_lag: int) -> int:
    return trigger_step + switch_lag
