"""What a run reports, written identically by the simulator and the executor so that their files compare
line by line: requests.csv, iterations.csv, summary.json and benchmark.json (vLLM's benchmark keys:
benchmark.py) (times in seconds, sizes in bytes). JSON is strict: a value that is not a finite number
(an infinite rate, a latency with no request) is null.

A simulated run has as many iteration rows as iterations (a million in a long run), so the recorder keeps
them in typed columns (8 bytes a value) and, past `CHUNK` rows, moves them to a temporary file: its memory
follows what is in flight, not the run's length. The summary, iterations.csv and the plot's envelope are
made from the rows chunk by chunk."""
from __future__ import annotations

import tempfile
from array import array
from itertools import repeat
from pathlib import Path
from typing import Callable, Iterator

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
FLOATS = frozenset(name for name in ITERATION_COLUMNS if name.endswith("_s") or name == "cpu_share")
CHUNK = 1 << 16  # iteration rows kept in memory; more go to a temporary file
POINTS = 2000    # per line of a plot: a long run has 10^5+ iterations, which Agg would take seconds to draw


def envelope_slices(n: int, points: int) -> tuple[np.ndarray, np.ndarray]:
    """(first row of each slice, the row whose time stands for it) when `n` rows are cut into `points`
    consecutive equal slices (n > points): a plot's envelope keeps each slice's maximum."""
    edges = np.linspace(0, n, points + 1).astype(int)[:-1]
    return edges, np.r_[edges[1:] - 1, n - 1]


def cpu_percent(iterations: dict) -> np.ndarray:
    """Per iteration, the share of the KV held that sits in CPU memory (%): live KV streamed in, or the
    blocks of preempted sequences swapped out (vllm-swap), alike."""
    gpu, cpu = iterations["gpu_kv_bytes"].astype(float), iterations["cpu_kv_bytes"].astype(float)
    held = gpu + cpu
    return np.divide(100 * cpu, held, out=np.zeros_like(held), where=held > 0)


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
    requests; writes the files. Rows come one by one (an executed plan) or a decode run at a time, into
    typed columns; full chunks go to a temporary file."""

    def __init__(self, token_gaps: bool = False, chunk: int = CHUNK):
        self.gaps = TokenGaps() if token_gaps else None
        self._chunk = chunk
        self._open = {name: array("d" if name in FLOATS else "q") for name in ITERATION_COLUMNS}
        self._columns = tuple(self._open.values())
        self._spill: tempfile.TemporaryDirectory | None = None
        self._spilled = 0  # rows in the temporary file
        self._table: dict[str, np.ndarray] | None = None

    @property
    def count(self) -> int:
        """Iteration rows recorded."""
        return self._spilled + len(self._open["end_s"])

    def iteration(self, plan: Plan, stats: IterationStats, policy) -> None:
        """Record an executed plan with the policy's KV holdings after it."""
        gpu_kv, cpu_kv = policy.kv_bytes
        for column, value in zip(self._columns, (
                stats.start_s, stats.end_s, len(plan.seqs), plan.shape.prefill_tokens, plan.shape.decode_tokens,
                stats.compute_s, stats.stall_s, stats.bytes_h2d, stats.bytes_d2h, gpu_kv, cpu_kv, policy.cpu_share)):
            column.append(value)
        self._added()

    def decode_run(self, run: DecodeRun, result) -> None:
        """Record the iterations of a committed decode run (a pie_serving RunResult): each one's end, compute
        seconds, batch size and GPU blocks held after it; without copies each starts when the one before
        ends, with no stall and no CPU block, else `result.columns` has the rest."""
        n, block = len(result.ends), run.block_bytes
        given = result.columns or {}
        values = {"start_s": [result.start, *result.ends[:-1]], "end_s": result.ends, "batch_sequences": result.sequences,
                  "decode_tokens": result.sequences, "compute_s": result.seconds,
                  "gpu_kv_bytes": [blocks * block for blocks in result.blocks]} | given
        for name, column in self._open.items():
            column.extend(values[name] if name in values else repeat(0, n))
        self._added()

    def _added(self) -> None:
        self._table = None
        if len(self._open["end_s"]) >= self._chunk:
            if self._spill is None:
                self._spill = tempfile.TemporaryDirectory(prefix="pie-iterations-")
            for name, column in self._open.items():
                with open(Path(self._spill.name) / name, "ab") as f:
                    column.tofile(f)
                del column[:]
            self._spilled = self._spill_rows()

    def _spill_rows(self) -> int:
        return (Path(self._spill.name) / "end_s").stat().st_size // 8 if self._spill else 0

    def chunks(self, names: tuple[str, ...] = ITERATION_COLUMNS) -> Iterator[dict[str, np.ndarray]]:
        """The rows of `names`, a chunk at a time, in order."""
        dtype = {name: np.float64 if name in FLOATS else np.int64 for name in names}
        for first in range(0, self._spilled, self._chunk):
            assert self._spill is not None  # rows were spilled, into it
            yield {name: np.fromfile(Path(self._spill.name) / name, dtype[name], min(self._chunk, self._spilled - first),
                                     offset=8 * first) for name in names}
        if len(self._open["end_s"]) or not self._spilled:
            yield {name: np.frombuffer(self._open[name], dtype[name]).copy() for name in names}

    def column(self, name: str) -> np.ndarray:
        """One column whole."""
        return np.concatenate([chunk[name] for chunk in self.chunks((name,))])

    @property
    def iterations(self) -> dict[str, np.ndarray]:
        """The iteration rows so far, one array a column (ITERATION_COLUMNS), whole."""
        if self._table is None:
            self._table = {name: self.column(name) for name in ITERATION_COLUMNS}
        return self._table

    def envelope(self, names: tuple[str, ...], points: int = POINTS,
                 derived: dict[str, Callable[[dict], np.ndarray]] | None = None) -> dict[str, np.ndarray]:
        """end_s, `names` and `derived` (name → a column made from the rows of `names`, row by row), each cut
        to at most `points` rows as `envelope_slices` cuts them (each slice's maximum, at its last row's
        end), chunk by chunk."""
        derived = derived or {}
        n = self.count
        if n <= points:
            whole = {name: self.column(name) for name in ("end_s", *names)}
            return whole | {name: make(whole) for name, make in derived.items()}
        edges, picks = envelope_slices(n, points)
        out = {"end_s": np.empty(points)}
        for name in (*names, *derived):
            floats = name in FLOATS or name in derived
            out[name] = np.full(points, -np.inf if floats else np.iinfo(np.int64).min, np.float64 if floats else np.int64)
        first = 0
        for chunk in self.chunks(("end_s", *names)):
            chunk |= {name: make(chunk) for name, make in derived.items()}
            size = len(chunk["end_s"])
            inside = (picks >= first) & (picks < first + size)
            out["end_s"][inside] = chunk["end_s"][picks[inside] - first]
            low = int(np.searchsorted(edges, first, side="right")) - 1       # the slice row `first` is in
            high = int(np.searchsorted(edges, first + size, side="left"))    # the first slice after the chunk
            starts = np.r_[0, edges[low + 1:high] - first]
            for name in (*names, *derived):
                out[name][low:high] = np.maximum(out[name][low:high], np.maximum.reduceat(chunk[name], starts))
            first += size
        return out

    def summary(self, requests: list[Request], wall_s: float, **context) -> dict:
        table = request_table(requests)
        done = table["status"] == State.FINISHED.value
        end = float(table["finish_s"][done].max()) if done.any() else 0.0
        span = max(end - float(table["arrival_s"].min(initial=0.0)), 1e-12)
        totals = dict(peak_gpu=0, peak_cpu=0, h2d=0, d2h=0)
        for chunk in self.chunks(("gpu_kv_bytes", "cpu_kv_bytes", "bytes_h2d", "bytes_d2h")):
            totals["peak_gpu"] = max(totals["peak_gpu"], int(chunk["gpu_kv_bytes"].max(initial=0)))
            totals["peak_cpu"] = max(totals["peak_cpu"], int(chunk["cpu_kv_bytes"].max(initial=0)))
            totals["h2d"] += int(chunk["bytes_h2d"].sum())
            totals["d2h"] += int(chunk["bytes_d2h"].sum())
        summary = dict(context, requests=len(requests), finished=int(done.sum()),
                       rejected=int((table["status"] == State.REJECTED.value).sum()),
                       preemptions=int(table["preemptions"].sum()),
                       throughput_req_s=int(done.sum()) / span,
                       throughput_tok_s=int(table["output_tokens"][done].sum()) / span,
                       normalized_latency_s=float(np.mean(table["e2e_s"][done] / table["output_tokens"][done]))
                       if done.any() else None,
                       peak_gpu_kv_bytes=totals["peak_gpu"], peak_cpu_kv_bytes=totals["peak_cpu"],
                       total_bytes_h2d=totals["h2d"], total_bytes_d2h=totals["d2h"],
                       total_stall_s=float(self.column("stall_s").sum()),  # whole: numpy's pairwise sum
                       iterations=self.count, run_s=span, wall_s=wall_s)
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
        write_csv(out / "iterations.csv", self.chunks())
        write_json(out / "summary.json", summary)
        if benchmark is not None:
            write_json(out / "benchmark.json", benchmark)


def write_json(path: Path, value) -> None:
    """Strict JSON (no NaN or Infinity: null), indented."""
    path.write_text(json_text(value, indent=2) + "\n")


def write_csv(path: Path, columns: dict[str, np.ndarray] | Iterator[dict[str, np.ndarray]]) -> None:
    """Columns (or chunks of them, written one after another) to CSV (NaN → empty cell) with Arrow's writer:
    Python's csv module needs seconds for the hundreds of thousands of rows of a long simulated run."""
    import pyarrow as pa  # here: only writing needs it
    from pyarrow import csv as arrow_csv

    writer = None
    for chunk in [columns] if isinstance(columns, dict) else columns:
        table = pa.table({name: pa.array(values, from_pandas=True) for name, values in chunk.items()})
        if writer is None:
            writer = arrow_csv.CSVWriter(path, table.schema, write_options=arrow_csv.WriteOptions(quoting_style="needed"))
        writer.write_table(table)
    assert writer is not None  # every table comes as one chunk at least
    writer.close()
