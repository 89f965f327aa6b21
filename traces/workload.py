"""Built-in traces and the one call that turns a trace into the requests of a run."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .arrivals import gamma_arrivals
from .tables import TraceError, read_table

DATA_DIR = Path(__file__).parent / "data"


@dataclass(frozen=True)
class TraceSource:
    file: str
    description: str
    timestamped: bool  # real arrival times (kept unless re-timed) vs lengths only (all at 0)


BUILTIN = {
    "sharegpt": TraceSource(
        "sharegpt_v3_lengths.csv",
        "ShareGPT V3 first human/model turns, cl100k_base token counts, vLLM's length filter "
        "(15,454 requests; see traces/data/SOURCES.md)", timestamped=False),
    "alpaca": TraceSource(
        "alpaca_synthetic_lengths.csv",
        "SYNTHETIC lengths fitted to Alpaca's published means (input 19.31, output 58.45 tokens)",
        timestamped=False),
    "azure-conv": TraceSource(
        "azure_llm_2023/AzureLLMInferenceTrace_conv.csv",
        "Azure LLM inference trace 2023, conversation (19,366 requests, real arrivals; CC-BY 4.0, "
        "Patel et al., Splitwise, ISCA 2024)", timestamped=True),
    "azure-code": TraceSource(
        "azure_llm_2023/AzureLLMInferenceTrace_code.csv",
        "Azure LLM inference trace 2023, code (8,819 requests, real arrivals; CC-BY 4.0, "
        "Patel et al., Splitwise, ISCA 2024)", timestamped=True),
}


def trace_path(name_or_path: str | Path) -> Path:
    if str(name_or_path) in BUILTIN:
        return DATA_DIR / BUILTIN[str(name_or_path)].file
    path = Path(name_or_path)
    if not path.exists() and path.suffix not in (".csv", ".jsonl", ".json"):
        raise TraceError(f"unknown trace '{name_or_path}' (known: {', '.join(BUILTIN)}; or give a file: CSV or "
                         f"JSONL with columns arrival_s, prompt_tokens, output_tokens, an Azure or Vidur trace "
                         f"CSV, or ShareGPT-format JSON)")
    return path


def load_trace(name_or_path: str | Path, trace_format: str = "auto") -> pd.DataFrame:
    """The whole trace as a tidy table: arrival_s, prompt_tokens, output_tokens. `trace_format` (one of
    "auto", FORMATS) is for a file: a built-in trace has its own."""
    if str(name_or_path) in BUILTIN and trace_format != "auto":
        raise TraceError(f"trace '{name_or_path}' is built in: a trace format ({trace_format}) is for a file")
    return read_table(trace_path(name_or_path), trace_format)


def load_workload(trace: str | Path, num_requests: int | None = None, *, rate: float | None = None,
                  cv: float = 1.0, seed: int = 0, max_prompt_tokens: int | None = None,
                  max_total_tokens: int | None = None, trace_format: str = "auto") -> pd.DataFrame:
    """The requests of one run, with `request_id` 0..N-1 in arrival order.

    `trace_format` as in `load_trace`. Filters first (prompt ≤ `max_prompt_tokens`, prompt + output ≤
    `max_total_tokens`), then picks `num_requests`: the first N of a timestamped trace (its real arrival
    pattern), a seeded random sample of a lengths-only one. Arrivals: the trace's own times re-based to 0 when `rate` is None
    (all at 0 for a lengths-only trace), otherwise a Gamma process at `rate` with `cv` (Poisson at
    cv = 1; `rate=inf` puts every request at 0).
    """
    table = load_trace(trace, trace_format)
    keep = np.ones(len(table), dtype=bool)
    if max_prompt_tokens is not None:
        keep &= table.prompt_tokens.to_numpy() <= max_prompt_tokens
    if max_total_tokens is not None:
        keep &= (table.prompt_tokens + table.output_tokens).to_numpy() <= max_total_tokens
    table = table[keep].reset_index(drop=True)
    n = len(table) if num_requests is None else num_requests
    if not 0 < n <= len(table):
        raise TraceError(f"trace '{trace}' has {len(table)} requests within the length limits; "
                         f"cannot take {num_requests}")
    # Independent streams for sampling and arrivals: one seed must not correlate the two.
    sample_rng, arrival_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    timestamped = BUILTIN[str(trace)].timestamped if str(trace) in BUILTIN else bool(table.arrival_s.any())
    if timestamped:
        table = table.iloc[:n].copy()
    else:
        table = table.iloc[sample_rng.permutation(len(table))[:n]].copy()
    if rate is None:
        table["arrival_s"] -= table.arrival_s.iloc[0]
    else:
        table["arrival_s"] = gamma_arrivals(n, rate, cv, arrival_rng)
    table.insert(0, "request_id", np.arange(n))
    return table.reset_index(drop=True)
