"""What a run reports, written identically by the simulator and the executor so that their files compare
line by line: requests.csv, iterations.csv and summary.json (times in seconds, sizes in bytes)."""
from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .plan import IterationStats, Plan
from .request import Request, State

REQUEST_COLUMNS = ("request_id", "arrival_s", "prompt_tokens", "output_tokens", "first_token_s", "finish_s",
                   "ttft_s", "tpot_s", "e2e_s", "preemptions", "status", "reason")


@dataclass(frozen=True)
class IterationRecord:
    start_s: float
    end_s: float
    batch_sequences: int
    prefill_tokens: int
    decode_tokens: int
    compute_s: float
    stall_s: float
    bytes_h2d: int
    bytes_d2h: int
    gpu_kv_bytes: int
    cpu_kv_bytes: int
    cpu_share: float


def request_row(r: Request) -> dict:
    done = r.state is State.FINISHED
    return dict(request_id=r.request_id, arrival_s=r.arrival_s, prompt_tokens=r.prompt_tokens,
                output_tokens=r.output_tokens, first_token_s=r.first_token_s, finish_s=r.finish_s,
                ttft_s=r.first_token_s - r.arrival_s if done else None,
                tpot_s=(r.finish_s - r.first_token_s) / (r.output_tokens - 1) if done and r.output_tokens > 1 else None,
                e2e_s=r.finish_s - r.arrival_s if done else None,
                preemptions=r.preemptions, status=r.state.value, reason=r.reason)


class RunRecorder:
    """Collects one record per iteration and the requests; writes the three files."""

    def __init__(self):
        self.iterations: list[IterationRecord] = []

    def iteration(self, plan: Plan, stats: IterationStats, policy) -> None:
        """Record an executed plan with the policy's KV holdings after it."""
        gpu_kv, cpu_kv = policy.kv_bytes
        self.iterations.append(IterationRecord(
            stats.start_s, stats.end_s, len(plan.seqs), plan.shape.prefill_tokens, plan.shape.decode_tokens,
            stats.compute_s, stats.stall_s, stats.bytes_h2d, stats.bytes_d2h, gpu_kv, cpu_kv, policy.cpu_share))

    def summary(self, requests: list[Request], wall_s: float, **context) -> dict:
        done = [r for r in requests if r.state is State.FINISHED]
        rows = [request_row(r) for r in done]
        end = max((r.finish_s for r in done), default=0.0)
        start = min((r.arrival_s for r in requests), default=0.0)
        span = max(end - start, 1e-12)
        its = self.iterations
        summary = dict(context, requests=len(requests), finished=len(done),
                       rejected=sum(r.state is State.REJECTED for r in requests),
                       throughput_req_s=len(done) / span,
                       throughput_tok_s=sum(r.output_tokens for r in done) / span,
                       normalized_latency_s=float(np.mean([row["e2e_s"] / r.output_tokens for row, r in zip(rows, done)]))
                       if done else None,
                       peak_gpu_kv_bytes=max((i.gpu_kv_bytes for i in its), default=0),
                       peak_cpu_kv_bytes=max((i.cpu_kv_bytes for i in its), default=0),
                       total_bytes_h2d=sum(i.bytes_h2d for i in its), total_bytes_d2h=sum(i.bytes_d2h for i in its),
                       total_stall_s=sum(i.stall_s for i in its), iterations=len(its),
                       run_s=span, wall_s=wall_s)
        for metric in ("ttft_s", "tpot_s", "e2e_s"):
            values = np.array([row[metric] for row in rows if row[metric] is not None])
            for name, value in (("mean", values.mean() if values.size else None),
                                *((f"p{q}", np.percentile(values, q) if values.size else None) for q in (50, 90, 99))):
                summary[f"{metric[:-2]}_{name}_s"] = None if value is None else float(value)
        return summary

    def write(self, out: Path, requests: list[Request], summary: dict) -> None:
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "requests.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, REQUEST_COLUMNS)
            writer.writeheader()
            writer.writerows(request_row(r) for r in sorted(requests, key=lambda r: r.request_id))
        with open(out / "iterations.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, list(IterationRecord.__dataclass_fields__))
            writer.writeheader()
            writer.writerows(asdict(i) for i in self.iterations)
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
