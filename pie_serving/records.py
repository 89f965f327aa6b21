"""What a run reports, written identically by the simulator and the executor so that their files compare
line by line: requests.csv, iterations.csv, summary.json and benchmark.json (vLLM's benchmark keys:
benchmark.py) (times in seconds, sizes in bytes). JSON is strict: a value that is not a finite number
(an infinite rate, a latency with no request) is null."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pie_policy.plan import DecodeRun, IterationStats, Plan
from pie_policy.request import Request, State

from .benchmark import benchmark_metrics
from .outputs import json_text
from .token_gaps import TokenGaps

REQUEST_COLUMNS = ("request_id", "arrival_s", "prompt_tokens", "output_tokens", "first_token_s", "finish_s",
                   "ttft_s", "tpot_s", "e2e_s", "preemptions", "status", "reason")
ITERATION_COLUMNS = ("start_s", "end_s", "batch_sequences", "prefill_tokens", "decode_tokens", "compute_s",
                     "stall_s", "bytes_h2d", "bytes_d2h", "gpu_kv_bytes", "cpu_kv_bytes", "cpu_share")


def request_table(requests: list[Request]) -> dict[str, np.ndarray]:
    """REQUEST_COLUMNS over `requests` by id, one array a column; NaN where a request has no such time
    (rejected, or a single-token request's TPOT)."""
    ordered = sorted(requests, key=lambda r: r.request_id)
    column = {name: np.array([getattr(r, name) for r in ordered], dtype=float if name.endswith("_s") else None)
              for name in ("request_id", "arrival_s", "prompt_tokens", "output_tokens", "first_token_s", "finish_s",
                           "preemptions", "reason")}
    column["status"] = np.array([r.state.value for r in ordered], dtype=object)
    done = column["status"] == State.FINISHED.value
    arrival, first, finish, output = column["arrival_s"], column["first_token_s"], column["finish_s"], column["output_tokens"]
    column["ttft_s"] = np.where(done, first - arrival, np.nan)
    column["tpot_s"] = np.divide(finish - first, output - 1, out=np.full(len(ordered), np.nan), where=done & (output > 1))
    column["e2e_s"] = np.where(done, finish - arrival, np.nan)
    return {name: column[name] for name in REQUEST_COLUMNS}


class RunRecorder:
    """Collects one row per iteration, the gaps between tokens (`gaps`, when asked for: else None) and the
    requests; writes the files. A simulated run has hundreds of thousands of iterations, most in decode
    runs: those are kept as arrays and the columns built once, when first asked for."""

    def __init__(self, token_gaps: bool = False):
        self.gaps = TokenGaps() if token_gaps else None
        self._count = 0
        self._rows: list[tuple] = []          # single iterations, in ITERATION_COLUMNS order
        self._row_at: list[int] = []          # the iteration number of each
        self._runs: list[tuple] = []          # (first iteration number, start, seconds, ends, sequences, gpu kv)
        self._table: dict[str, np.ndarray] | None = None

    def iteration(self, plan: Plan, stats: IterationStats, policy) -> None:
        """Record an executed plan with the policy's KV holdings after it."""
        gpu_kv, cpu_kv = policy.kv_bytes
        self._rows.append((stats.start_s, stats.end_s, len(plan.seqs), plan.shape.prefill_tokens,
                           plan.shape.decode_tokens, stats.compute_s, stats.stall_s, stats.bytes_h2d, stats.bytes_d2h,
                           gpu_kv, cpu_kv, policy.cpu_share))
        self._row_at.append(self._count)
        self._count, self._table = self._count + 1, None

    def decode_run(self, run: DecodeRun, start: float, seconds: list, ends: list, sequences: list, blocks: list) -> None:
        """Record the iterations of a committed decode run (each starts when the one before ends; no copies,
        no stall, no CPU block), with each one's batch size and GPU blocks held after it."""
        self._runs.append((self._count, start, seconds, ends, sequences, np.multiply(blocks, run.block_bytes)))
        self._count, self._table = self._count + len(ends), None

    @property
    def iterations(self) -> dict[str, np.ndarray]:
        """The iteration rows so far, one array a column (ITERATION_COLUMNS)."""
        if self._table is None:
            self._table = self._build()
        return self._table

    def _build(self) -> dict[str, np.ndarray]:
        table = {name: np.zeros(self._count, np.float64 if name.endswith("_s") or name == "cpu_share" else np.int64)
                 for name in ITERATION_COLUMNS}
        if self._rows:
            for name, values in zip(ITERATION_COLUMNS, zip(*self._rows)):
                table[name][self._row_at] = values
        if self._runs:
            firsts, starts, seconds, ends, sequences, gpu_kv = zip(*self._runs)
            lengths = np.array([len(e) for e in ends])
            offsets = np.cumsum(lengths) - lengths         # where each run begins in the flattened arrays
            at = np.arange(lengths.sum()) + np.repeat(np.array(firsts) - offsets, lengths)
            ends = np.concatenate(ends)
            begins = np.concatenate(([0.0], ends[:-1]))
            begins[offsets] = starts
            for name, values in (("start_s", begins), ("end_s", ends), ("compute_s", np.concatenate(seconds)),
                                 ("gpu_kv_bytes", np.concatenate(gpu_kv))):
                table[name][at] = values
            table["batch_sequences"][at] = table["decode_tokens"][at] = np.concatenate(sequences)
        return table

    def summary(self, requests: list[Request], wall_s: float, **context) -> dict:
        table = request_table(requests)
        done = table["status"] == State.FINISHED.value
        end = float(table["finish_s"][done].max()) if done.any() else 0.0
        span = max(end - float(table["arrival_s"].min(initial=0.0)), 1e-12)
        its = self.iterations
        summary = dict(context, requests=len(requests), finished=int(done.sum()),
                       rejected=int((table["status"] == State.REJECTED.value).sum()),
                       preemptions=int(table["preemptions"].sum()),
                       throughput_req_s=int(done.sum()) / span,
                       throughput_tok_s=int(table["output_tokens"][done].sum()) / span,
                       normalized_latency_s=float(np.mean(table["e2e_s"][done] / table["output_tokens"][done]))
                       if done.any() else None,
                       peak_gpu_kv_bytes=int(its["gpu_kv_bytes"].max(initial=0)),
                       peak_cpu_kv_bytes=int(its["cpu_kv_bytes"].max(initial=0)),
                       total_bytes_h2d=int(its["bytes_h2d"].sum()), total_bytes_d2h=int(its["bytes_d2h"].sum()),
                       total_stall_s=float(its["stall_s"].sum()), iterations=len(its["end_s"]),
                       run_s=span, wall_s=wall_s)
        for metric in ("ttft_s", "tpot_s", "e2e_s"):
            values = table[metric][np.isfinite(table[metric])]
            for name, value in (("mean", values.mean() if values.size else None),
                                *((f"p{q}", np.percentile(values, q) if values.size else None) for q in (50, 90, 99))):
                summary[f"{metric[:-2]}_{name}_s"] = None if value is None else float(value)
        return summary

    def benchmark(self, requests: list[Request], percentiles, slos, **context) -> dict:
        """benchmark.json's metrics (vLLM's keys: benchmark.py), `context` first."""
        return benchmark_metrics(request_table(requests), self.gaps, percentiles, slos, **context)

    def write(self, out: Path, requests: list[Request], summary: dict, benchmark: dict | None = None) -> None:
        out.mkdir(parents=True, exist_ok=True)
        write_csv(out / "requests.csv", request_table(requests))
        write_csv(out / "iterations.csv", self.iterations)
        write_json(out / "summary.json", summary)
        if benchmark is not None:
            write_json(out / "benchmark.json", benchmark)


def write_json(path: Path, value) -> None:
    """Strict JSON (no NaN or Infinity: null), indented."""
    path.write_text(json_text(value, indent=2) + "\n")


def write_csv(path: Path, columns: dict[str, np.ndarray]) -> None:
    """Columns to CSV (NaN → empty cell) with Arrow's writer: Python's csv module needs seconds for the
    hundreds of thousands of rows of a long simulated run."""
    import pyarrow as pa  # here: only writing needs it
    from pyarrow import csv as arrow_csv

    table = pa.table({name: pa.array(values, from_pandas=True) for name, values in columns.items()})
    arrow_csv.write_csv(table, path, arrow_csv.WriteOptions(quoting_style="needed"))
