"""Arrival processes that re-time a workload: Poisson, or Gamma for burstier (cv > 1) or smoother
(cv < 1) traffic at the same mean rate. Drawn from the caller's seeded generator, so the same seed
gives the same times bit for bit."""
from __future__ import annotations

import math

import numpy as np


def gamma_arrivals(n: int, rate: float, cv: float, rng: np.random.Generator) -> np.ndarray:
    """Arrival times (s) of `n` requests at mean `rate` per second; the first arrives at 0.

    Inter-arrival gaps are Gamma(shape=1/cv², scale=cv²/rate): mean 1/rate, coefficient of variation
    `cv`; cv = 1 is a Poisson process. `rate = inf` sends every request at time 0 (offline).
    """
    if not rate > 0:
        raise ValueError(f"arrival rate must be positive (requests/s), got {rate}")
    if not (cv > 0 and math.isfinite(cv)):
        raise ValueError(f"coefficient of variation must be positive, got {cv}")
    if math.isinf(rate) or n == 0:
        return np.zeros(n)
    gaps = rng.gamma(1.0 / cv**2, cv**2 / rate, size=n - 1)
    return np.concatenate([[0.0], np.cumsum(gaps)])
