"""Capacity answers as rows: a table for the console and CSV files for a spreadsheet."""
from __future__ import annotations

import csv
import math
from pathlib import Path

from rich.table import Table

from hwmodels import GiB, load_hardware

from .capacity import Answer
from .scenario import Scenario

BASELINE = "vllm"  # what the other policies are compared with, when it is among them


def _note(answer: Answer, scenario: Scenario, min_hbm: bool) -> str:
    if answer.bound == "found":
        return ""
    if min_hbm:
        return ("meets the SLO with the least memory that runs at all" if answer.bound == "limit" else
                "misses the SLO even with all of HBM")
    if answer.bound == "limit":
        return (f"meets the SLO even with all {scenario.num_requests} requests at once: the SLO does not bind "
                f"over this many requests (raise --num-requests)")
    return "misses the SLO even at the lowest rate probed (one request at a time is already too slow)"


def capacity_row(scenario: Scenario, answer: Answer, min_hbm: bool) -> dict:
    """One system x policy: the answer, the run at it, how the search ended."""
    at = next((p for p in answer.probes if p.value == answer.value), None)
    row = dict(hw=scenario.hw, policy=scenario.policy)
    if min_hbm:
        hbm = load_hardware(scenario.hw).gpu.hbm_bytes
        row |= dict(rate_req_s=scenario.rate, gpu_mem_util=answer.value,
                    hbm_gib=None if answer.value is None else answer.value * hbm / GiB)
    else:
        row |= dict(max_rate_req_s=answer.value, gpu_mem_util=scenario.gpu_mem_util)
    return row | dict(normalized_latency_s=at and at.normalized_latency_s, throughput_tok_s=at and at.throughput_tok_s,
                      bound=answer.bound, probes=len(answer.probes), note=_note(answer, scenario, min_hbm))


def _cell(value, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def capacity_table(rows: list[dict], title: str) -> Table:
    """The rows, with each policy's answer relative to vLLM's on the same system where vLLM is among them
    (a rate: higher is better; HBM: lower is better, shown as vLLM's over the policy's)."""
    min_hbm = "hbm_gib" in rows[0]
    key = "hbm_gib" if min_hbm else "max_rate_req_s"
    baseline = {r["hw"]: r[key] for r in rows if r["policy"] == BASELINE}
    view = Table(title=title)
    headers = ["hardware", "policy", "least HBM GiB" if min_hbm else "max rate req/s",
               "gpu_mem_util", "output tok/s", "norm. latency s/tok", "vs vllm", "probes"]
    for header in headers:
        view.add_column(header, justify="left" if header in ("hardware", "policy") else "right")
    for r in rows:
        base, value = baseline.get(r["hw"]), r[key]
        ratio = None
        if base and value and math.isfinite(base) and math.isfinite(value) and r["policy"] != BASELINE:
            ratio = base / value if min_hbm else value / base
        view.add_row(r["hw"], r["policy"], _cell(value, "{:.2f}"), _cell(r["gpu_mem_util"], "{:.3f}"),
                     _cell(r["throughput_tok_s"], "{:,.0f}"), _cell(r["normalized_latency_s"], "{:.4f}"),
                     _cell(ratio, "{:.2f}x"), str(r["probes"]))
    return view


def write_rows(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, list(rows[0]) if rows else [])
        writer.writeheader()
        writer.writerows(rows)
