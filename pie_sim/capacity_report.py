"""Capacity answers as rows: a table for the console and CSV files for a spreadsheet."""
from __future__ import annotations

import csv
import math
from pathlib import Path

from rich.table import Table

from hwmodels import GiB, load_hardware

from .capacity import Answer, Job
from .steady_state import SHORT_WINDOW

BASELINE = "vllm"  # what the other policies are compared with, when it is among them


def _note(answer: Answer, job: Job) -> str:
    at = answer.at
    if at is not None and at.judgement is not None and at.judgement.short:
        return (f"the window at the answer is shorter than {SHORT_WINDOW} median e2e latencies: raise "
                f"--num-requests (now {job.scenario.num_requests}) for a steadier answer")
    if answer.bound == "none":
        return ("not sustainable within the SLOs even with all the HBM asked for" if job.min_hbm else
                "not sustainable within the SLOs even at the lowest rate probed")
    if answer.bound == "limit":
        return ("meets the SLOs with the least memory that runs at all" if job.min_hbm else
                "sustainable within the SLOs up to the offline throughput: no SLO binds")
    return ""


def capacity_row(job: Job, answer: Answer) -> dict:
    """One system x policy: the answer, its window's figures, what binds next to it, how the search ended."""
    s = job.scenario
    row = dict(hw=s.hw, policy=s.policy)
    if job.min_hbm:
        hbm = load_hardware(s.hw).gpu.hbm_bytes
        row |= dict(rate_req_s=s.rate, gpu_mem_util=answer.value,
                    hbm_gib=None if answer.value is None else answer.value * hbm / GiB)
    else:
        row |= dict(max_rate_req_s=answer.value, offline_req_s=answer.upper, gpu_mem_util=s.gpu_mem_util)
    judged = answer.at.judgement if answer.at is not None else None
    figures = judged.row() if judged is not None else {}
    row |= {f"{slo.name}_s": figures.get(f"{slo.name}_s") for slo in job.slos}
    return row | dict(served=figures.get("served"), goodput_req_s=figures.get("goodput_req_s"), bound=answer.bound,
                      binding=answer.binding, probes=len(answer.probes), note=_note(answer, job))


def probe_rows(job: Job, answer: Answer) -> list[dict]:
    """Every probe of a search with its window's figures."""
    name = "gpu_mem_util" if job.min_hbm else "rate_req_s"
    return [dict(hw=job.scenario.hw, policy=job.scenario.policy, **{name: p.value}, requests=p.requests, error=p.error,
                 **(p.judgement.row() if p.judgement is not None else {}), misses=p.misses())
            for p in answer.probes]


def _cell(value, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def capacity_table(rows: list[dict], slo_names: list[str], title: str) -> Table:
    """The rows, with each policy's answer relative to vLLM's on the same system where vLLM is among them
    (a rate: higher is better; HBM: lower is better, shown as vLLM's over the policy's), and what binds."""
    min_hbm = "hbm_gib" in rows[0]
    key = "hbm_gib" if min_hbm else "max_rate_req_s"
    baseline = {r["hw"]: r[key] for r in rows if r["policy"] == BASELINE}
    view = Table(title=title)
    headers = (["hardware", "policy"] + (["least HBM GiB", "gpu_mem_util"] if min_hbm else
                                         ["max rate req/s", "offline req/s"])
               + ["vs vllm", "goodput req/s", *(f"{n} s" for n in slo_names), "served", "bound"])
    for header in headers:
        view.add_column(header, justify="left" if header in ("hardware", "policy", "bound") else "right")
    for r in rows:
        base, value = baseline.get(r["hw"]), r[key]
        ratio = None
        if base and value and math.isfinite(base) and math.isfinite(value) and r["policy"] != BASELINE:
            ratio = base / value if min_hbm else value / base
        sizes = ([_cell(value, "{:.1f}"), _cell(r["gpu_mem_util"], "{:.3f}")] if min_hbm else
                 [_cell(value, "{:.2f}"), _cell(r["offline_req_s"], "{:.2f}")])
        view.add_row(r["hw"], r["policy"], *sizes, _cell(ratio, "{:.2f}x"), _cell(r["goodput_req_s"], "{:.2f}"),
                     *(_cell(r[f"{n}_s"], "{:.4g}") for n in slo_names), _cell(r["served"], "{:.3f}"), r["bound"])
    return view


def binding_lines(rows: list[dict], min_hbm: bool) -> list[str]:
    """What decided each answer: what fails at the probe next to it."""
    where = "the next probe below (less HBM)" if min_hbm else "the next probe up"
    return [f"{r['hw']} {r['policy']}: " + (f"at {where}: {r['binding']}" if r["bound"] == "found" else r["binding"])
            for r in rows]


def write_rows(path: Path, rows: list[dict]) -> None:
    """The rows as CSV, with every key any row has (in order of first appearance; empty where a row lacks it)."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, list(dict.fromkeys(key for row in rows for key in row)))
        writer.writeheader()
        writer.writerows(rows)
