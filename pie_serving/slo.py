"""Service-level objectives as serving users state them: a percentile (or the mean) of a latency, with a
target in seconds, e.g. `ttft_p99=2` (99% of requests see their first token within 2 s).

Metrics, as vLLM's benchmark_serving defines them: `ttft` (arrival to first token), `tpot` (time per output
token after the first: (e2e - ttft) / (output tokens - 1), requests of more than one token), `itl` (the
gap between consecutive tokens, over all tokens), `e2e` (arrival to last token), and the vLLM paper's
`normalized` (e2e / output tokens). Goodput is the rate of requests that meet every per-request target
(DistServe's definition, vLLM's `--goodput`): ttft, tpot (0 for a one-token request, as vLLM counts it),
e2e and normalized; `itl` is a property of tokens, not of a request, and stays out of it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

METRICS = ("ttft", "tpot", "itl", "e2e", "normalized")
PER_REQUEST = ("ttft", "tpot", "e2e", "normalized")


class SloError(ValueError):
    """An SLO or a percentile list as given on a command line cannot be used."""


def percentile_word(p: float) -> str:
    """vLLM's spelling of a percentile in a key: 99 → '99', 99.9 → '99.9'."""
    return str(int(p)) if int(p) == p else str(p)


def check_percentile(p: float, option: str) -> float:
    if not 0 < p <= 100:
        raise SloError(f"{option}: percentile {p:g} is outside (0, 100]")
    return p


@dataclass(frozen=True)
class Slo:
    """One objective: `metric`'s `percentile` (None: its mean) at most `target_s` seconds."""
    metric: str
    percentile: float | None
    target_s: float

    @property
    def name(self) -> str:
        return f"{self.metric}_{'mean' if self.percentile is None else 'p' + percentile_word(self.percentile)}"

    def __str__(self) -> str:
        return f"{self.name}={self.target_s:g}"

    def meets(self, value: float | None) -> bool:
        return value is not None and value <= self.target_s


def parse_slo(text: str, option: str = "--slo") -> Slo:
    """`METRIC_STAT=SECONDS` with STAT `pNN` (0 < NN <= 100) or `mean`: `ttft_p99=2`, `tpot_p50=0.05`."""
    name, sep, value = text.partition("=")
    metric, _, stat = name.strip().rpartition("_")
    if not sep or not metric:
        raise SloError(f"{option} {text}: write METRIC_STAT=SECONDS, e.g. ttft_p99=2 "
                       f"(metrics: {', '.join(METRICS)}; STAT: pNN or mean)")
    if metric not in METRICS:
        raise SloError(f"{option} {text}: unknown metric '{metric}' (known: {', '.join(METRICS)})")
    percentile = _number(stat[1:]) if stat.startswith("p") else None
    if stat != "mean" and percentile is None:
        raise SloError(f"{option} {text}: '{stat}' is not a percentile (pNN, e.g. p99) or mean")
    if percentile is not None:
        check_percentile(percentile, f"{option} {text}")
    target = _number(value)
    if target is None:
        raise SloError(f"{option} {text}: target '{value.strip()}' is not a number of seconds")
    if not (target > 0 and math.isfinite(target)):
        raise SloError(f"{option} {text}: the target must be a positive number of seconds")
    return Slo(metric, percentile, target)


def parse_slos(texts: list[str] | None, option: str = "--slo") -> tuple[Slo, ...]:
    """Several objectives (`none` alone: no objective); a metric and statistic given twice is refused."""
    if texts and "none" in [t.strip() for t in texts]:
        if len(texts) > 1:
            raise SloError(f"{option} none: no SLO, so no other {option} beside it")
        return ()
    slos = tuple(parse_slo(t, option) for t in texts or ())
    names = [s.name for s in slos]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise SloError(f"{option}: {', '.join(repeated)} given more than once")
    return slos


def parse_percentiles(text: str, option: str = "--percentiles") -> tuple[float, ...]:
    """Comma-separated percentiles, each in (0, 100]."""
    values = []
    for part in text.split(","):
        value = _number(part)
        if value is None:
            raise SloError(f"{option} {text}: '{part.strip()}' is not a number")
        values.append(check_percentile(value, f"{option} {text}"))
    return tuple(values)


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def request_values(table: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per request of a request table (records.REQUEST_COLUMNS), each per-request metric in seconds:
    NaN where a request has none (not finished; tpot of a one-token request)."""
    return dict(ttft=table["ttft_s"], tpot=table["tpot_s"], e2e=table["e2e_s"],
                normalized=table["e2e_s"] / table["output_tokens"])


def good(values: dict[str, np.ndarray], slos: tuple[Slo, ...]) -> np.ndarray:
    """Which requests meet every per-request target (finished ones only; vLLM counts a one-token
    request's tpot as 0)."""
    finished = np.isfinite(values["e2e"])
    ok = finished.copy()
    for slo in slos:
        if slo.metric in PER_REQUEST:
            value = np.where(finished & np.isnan(values[slo.metric]), 0.0, values[slo.metric])
            ok &= np.nan_to_num(value, nan=np.inf) <= slo.target_s
    return ok
