"""A workload through a policy on the executor, in real time, written as the simulator writes it.

Requests arrive on the wall clock (a trace's own times, or re-timed); each carries prompt token ids
(given in a prompts file, or drawn at random with the seed for a trace's prompt lengths) and a number of
tokens to generate greedily. Nothing is written until the whole run has finished.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from rich.progress import Progress

from pie_policy import IterationStats, Plan, Policy
from pie_serving import RunRecorder, Serving, drive
from pie_serving.outputs import json_text
from pie_serving.records import request_table, write_csv


class InputError(ValueError):
    """A prompts file, workload or pool size the executor cannot run, named with the offending line."""


@dataclass(frozen=True)
class Prompt:
    key: object             # the id the user gave (or the request index)
    arrival_s: float
    token_ids: tuple[int, ...]
    max_new_tokens: int


def read_prompts(path: Path, vocab_size: int, max_context: int) -> list[Prompt]:
    """One JSON object a line: {"id": ..., "prompt_token_ids": [...], "max_new_tokens": n}; all arrive at 0."""
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    try:
        text = path.read_text(encoding="utf-8-sig")  # JSON is UTF-8; a byte-order mark is allowed
    except UnicodeDecodeError as e:
        line = path.read_bytes()[:e.start].count(b"\n") + 1
        raise InputError(f"{path}, line {line}: not UTF-8 (byte {e.object[e.start]:#x})") from None
    prompts, lines = [], {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}, line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(record, dict) or not {"prompt_token_ids", "max_new_tokens"} <= record.keys():
            raise InputError(f"{where}: need an object with prompt_token_ids and max_new_tokens")
        ids, new = record["prompt_token_ids"], record["max_new_tokens"]
        if not (isinstance(ids, list) and ids and all(type(t) is int and 0 <= t < vocab_size for t in ids)):
            raise InputError(f"{where}: prompt_token_ids must be a non-empty list of token ids in [0, {vocab_size})")
        if type(new) is not int or new < 1:
            raise InputError(f"{where}: max_new_tokens must be a positive integer, got {new!r}")
        if len(ids) + new - 1 > max_context:
            raise InputError(f"{where}: prompt of {len(ids)} tokens + {new} new tokens exceeds the model's "
                             f"context of {max_context}")
        key = record.get("id", len(prompts))
        if not isinstance(key, (str, int)) or isinstance(key, bool):
            raise InputError(f"{where}: id must be a string or an integer, got {key!r}")
        if str(key) in lines:  # as requests.csv writes it
            raise InputError(f"{where}: id {key!r} repeats line {lines[str(key)]}'s (each request needs its own)")
        lines[str(key)] = number
        prompts.append(Prompt(key, 0.0, tuple(ids), new))
    if not prompts:
        raise InputError(f"{path}: no prompts in the file")
    return prompts


def trace_prompts(workload, vocab_size: int, seed: int) -> list[Prompt]:
    """Random prompt token ids (seeded) for a trace's lengths and arrival times."""
    rng = np.random.default_rng(seed)
    return [Prompt(int(r.request_id), float(r.arrival_s),
                   tuple(rng.integers(0, vocab_size, int(r.prompt_tokens)).tolist()), int(r.output_tokens))
            for r in workload.itertuples()]


def mean_context(prompts: list[Prompt]) -> int:
    """The mean tokens a request holds when it finishes: what pie's largest share is sized for."""
    return round(sum(len(p.token_ids) + p.max_new_tokens for p in prompts) / len(prompts))


def check_fits(policy: Policy, prompts: list[Prompt]) -> None:
    """Refuse up front a workload with a request the pools can never hold, rather than run part of it."""
    for p in prompts:
        why = policy.refusal(len(p.token_ids) + p.max_new_tokens - 1)
        if why:
            c = policy.config
            raise InputError(f"request {p.key!r} {why} (GPU pool {c.num_gpu_blocks} blocks, CPU pool "
                             f"{c.num_cpu_blocks} blocks of {c.block_size} tokens): raise --gpu-kv-gb")


class TokenServer:
    """The executor as the serving loop's `Backend`: keeps every request's token ids (its prompt, then what
    it generates), gives each plan's new tokens to the executor (an `Executor` or a pipeline's head) and
    appends the tokens it samples."""

    def __init__(self, executor, prompts: list[Prompt], run_start: float,
                 on_iteration: Callable[[Plan, IterationStats], None] | None = None):
        self.executor, self.run_start, self.on_iteration = executor, run_start, on_iteration
        self.tokens = {i: list(p.token_ids) for i, p in enumerate(prompts)}

    def run(self, plan: Plan, start_s: float) -> IterationStats:
        """Execute `plan` now (the executor measures its own start)."""
        inputs = [self.tokens[s.request_id][s.cached_tokens:s.cached_tokens + s.new_tokens] for s in plan.seqs]
        stats, sampled, _ = self.executor.execute(plan, inputs, self.run_start)
        for seq, token in zip([s for s in plan.seqs if s.samples], sampled):
            self.tokens[seq.request_id].append(token)
        if self.on_iteration:
            self.on_iteration(plan, stats)
        return stats


def run(executor, policy: Policy, prompts: list[Prompt], progress: bool = True,
        on_iteration: Callable[[Plan, IterationStats], None] | None = None):
    """Serve `prompts` to the end on the serving loop with the wall clock; returns (requests, generated
    token ids per request, recorder, wall s). `on_iteration` sees every executed plan with its stats."""
    check_fits(policy, prompts)
    arrivals = [(i, p.arrival_s, len(p.token_ids), p.max_new_tokens) for i, p in enumerate(prompts)]
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("serving", total=len(prompts))
        serving = Serving(policy, arrivals, on_finish=lambda n: bar.advance(task, n), token_gaps=True)
        start = time.perf_counter()
        server = TokenServer(executor, prompts, start, on_iteration)

        def now() -> float:
            return time.perf_counter() - start

        requests = drive(serving, server, now, lambda t: time.sleep(max(0.0, t - now())))
    wall = time.perf_counter() - start
    generated = {i: server.tokens[i][len(p.token_ids):] for i, p in enumerate(prompts)}
    return requests, generated, serving.recorder, wall


def write_outputs(out: Path, prompts: list[Prompt], requests, generated, recorder: RunRecorder, summary: dict,
                  benchmark: dict | None = None):
    """The simulator's files, requests.csv with each prompt's `id` added, and tokens.jsonl."""
    recorder.write(out, requests, summary, benchmark)
    write_csv(out / "requests.csv", request_table(requests) | {"id": np.array([str(p.key) for p in prompts])})
    with open(out / "tokens.jsonl", "w") as f:
        for i, p in enumerate(prompts):
            f.write(json_text({"id": p.key, "prompt_token_ids": list(p.token_ids),
                                "output_token_ids": generated[i]}) + "\n")
