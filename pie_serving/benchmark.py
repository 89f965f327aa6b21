"""A run's serving metrics in vLLM's benchmark_serving shape (benchmark.json), so that a simulated or
executed run can be put beside a real vLLM benchmark of the same workload: the same keys, the same
definitions (vllm-project/vllm, benchmarks/benchmark_serving.py, `calculate_metrics` and the saved result).

- `duration` (s): first arrival to last finish (vLLM: first request sent to last response);
  `completed`, `total_input_tokens`, `total_output_tokens` (of the completed requests);
- `request_throughput` (req/s), `output_throughput` and `total_token_throughput` (tok/s), over `duration`;
- `request_goodput` (req/s): completed requests meeting every per-request SLO target (pie_serving.slo),
  over `duration`; null without a target (vLLM's key without its stray colon);
- per metric `ttft`, `tpot`, `itl`, `e2el`: `mean_*_ms`, `median_*_ms`, `std_*_ms` and `pNN_*_ms` for each
  chosen percentile (vLLM's `--metric-percentiles`, default 99), in milliseconds; null where there is no
  value (vLLM writes 0). TPOT is over requests of more than one token; ITL over every token but each
  request's first (pie_serving.token_gaps), as vLLM's streamed chunks of one token each; null when the
  run did not fold them.
"""
from __future__ import annotations

import math

import numpy as np

from pie_policy.request import State

from .slo import PER_REQUEST, Slo, good, percentile_word, request_values
from .token_gaps import TokenGaps, mean_std, percentile

DEFAULT_PERCENTILES = (99.0,)
METRICS = (("ttft", "ttft"), ("tpot", "tpot"), ("itl", "itl"), ("e2el", "e2e"))  # vLLM's key, our metric


def request_rate(rate: float | None) -> float | str | None:
    """vLLM's `request_rate`: the number, "inf" for every request at once; null for a trace's own times."""
    return "inf" if rate is not None and math.isinf(rate) else rate


def benchmark_metrics(table: dict[str, np.ndarray], gaps: TokenGaps | None, percentiles=DEFAULT_PERCENTILES,
                      slos: tuple[Slo, ...] = (), **context) -> dict:
    """The metrics of a run from its request table (records.request_table) and token gaps; `context`
    (backend, model_id, request_rate, ...) leads the dict as in vLLM's saved result."""
    done = table["status"] == State.FINISHED.value
    completed = int(done.sum())
    start = float(table["arrival_s"].min(initial=0.0))
    duration = float(table["finish_s"][done].max()) - start if completed else 0.0

    def rate(count: int) -> float | None:
        return count / duration if duration > 0 else None

    inputs, outputs = int(table["prompt_tokens"][done].sum()), int(table["output_tokens"][done].sum())
    values = request_values(table)
    goodput_slos = tuple(s for s in slos if s.metric in PER_REQUEST)
    result = dict(context, duration=duration, completed=completed, total_input_tokens=inputs,
                  total_output_tokens=outputs, request_throughput=rate(completed),
                  request_goodput=rate(int(good(values, goodput_slos).sum())) if goodput_slos else None,
                  output_throughput=rate(outputs), total_token_throughput=rate(inputs + outputs))
    for key, metric in METRICS:
        if metric == "itl":
            sample, counts = gaps.arrays() if gaps is not None else (np.zeros(0), np.zeros(0, dtype=np.int64))
        else:
            sample = values[metric][np.isfinite(values[metric])]
            counts = np.ones(sample.size, dtype=np.int64)
        mean, std = mean_std(sample, counts)
        stats = dict(mean=mean, median=percentile(sample, counts, 50), std=std)
        result |= {f"{name}_{key}_ms": _ms(value) for name, value in stats.items()}
        result |= {f"p{percentile_word(p)}_{key}_ms": _ms(percentile(sample, counts, p)) for p in percentiles}
    return result


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000
