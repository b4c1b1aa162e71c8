"""How far an evaluation's success rate can be trusted: the 95% Wilson interval of a count.

An evaluation runs one episode per env on goals and starts drawn independently from the eval
seed, with deterministic actions: its successes are a binomial count over those draws. The
interval covers that sampling only, not the spread between training runs (other seeds), which
is often the larger (Agarwal et al. 2021, "Deep RL at the Edge of the Statistical Precipice").
"""

from __future__ import annotations

import math

from crl_fast.checks import is_integer, positive_int

Z95 = 1.959963984540054  # the standard normal's 0.975 quantile: a two-sided 95% interval


def wilson_interval(successes: int, trials: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval (Wilson 1927) of ``successes`` out of ``trials``, 95% by default:
    unlike the normal approximation p +- z sqrt(p (1 - p) / n) it stays within [0, 1] and does
    not shrink to a point at 0 of n or n of n (0 of 64 is 0-0.057)."""
    n = positive_int("trials", trials)
    if not is_integer(successes):
        raise ValueError(f"successes must be an int, got {successes!r}")
    if not 0 <= successes <= n:
        raise ValueError(f"successes must lie in [0, trials={n}], got {successes}")
    p, z2 = successes / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    # at 0 of n and n of n the bound is exactly 0 or 1: centre -+ half only rounds to it
    low = 0.0 if successes == 0 else centre - half
    high = 1.0 if successes == n else centre + half
    return low, high


def success_summary(success: float, episodes: int) -> str:
    """``success`` (a fraction of ``episodes``) with its episodes and 95% Wilson interval, for
    the progress and closing lines: "0.94 of 64 episodes (95% CI 0.85-0.98)"."""
    low, high = wilson_interval(round(success * episodes), episodes)
    return f"{success:.2f} of {episodes} episodes (95% CI {low:.2f}-{high:.2f})"
