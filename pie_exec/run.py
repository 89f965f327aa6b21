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

from pie_policy import IterationStats, Plan, Policy, State
from pie_policy.records import RunRecorder

from .engine import Executor


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
    prompts = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
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
        prompts.append(Prompt(record.get("id", len(prompts)), 0.0, tuple(ids), new))
    if not prompts:
        raise InputError(f"{path}: no prompts in the file")
    return prompts


def trace_prompts(workload, vocab_size: int, seed: int) -> list[Prompt]:
    """Random prompt token ids (seeded) for a trace's lengths and arrival times."""
    rng = np.random.default_rng(seed)
    return [Prompt(int(r.request_id), float(r.arrival_s),
                   tuple(rng.integers(0, vocab_size, int(r.prompt_tokens)).tolist()), int(r.output_tokens))
            for r in workload.itertuples()]


def check_fits(policy: Policy, prompts: list[Prompt]) -> None:
    """Refuse up front a workload with a request the pools can never hold, rather than run part of it."""
    for p in prompts:
        why = policy.scheduler.refusal(len(p.token_ids) + p.max_new_tokens - 1)
        if why:
            c = policy.config
            raise InputError(f"request {p.key!r} {why} (GPU pool {c.num_gpu_blocks} blocks, CPU pool "
                             f"{c.num_cpu_blocks} blocks of {c.block_size} tokens): raise --gpu-kv-gb")


def run(executor: Executor, policy: Policy, prompts: list[Prompt], progress: bool = True,
        on_iteration: Callable[[Plan, IterationStats], None] | None = None):
    """Serve `prompts` to the end; returns (requests, generated token ids per request, recorder, wall s).
    `on_iteration` sees every executed plan with its stats."""
    check_fits(policy, prompts)
    recorder = RunRecorder()
    tokens = {i: list(p.token_ids) for i, p in enumerate(prompts)}
    requests, waiting = [], list(enumerate(prompts))
    start = time.perf_counter()
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("serving", total=len(prompts))
        while waiting or policy.has_work:
            now = time.perf_counter() - start
            while waiting and waiting[0][1].arrival_s <= now:
                i, p = waiting.pop(0)
                requests.append(policy.add_request(i, p.arrival_s, len(p.token_ids), p.max_new_tokens))
            plan = policy.next_iteration()
            if plan is None:
                time.sleep(max(0.0, waiting[0][1].arrival_s - now))
                continue
            inputs = [tokens[s.request_id][s.cached_tokens:s.cached_tokens + s.new_tokens] for s in plan.seqs]
            stats, sampled, _ = executor.execute(plan, inputs, start)
            for seq, token in zip([s for s in plan.seqs if s.samples], sampled):
                tokens[seq.request_id].append(token)
            finished = policy.observe(plan, stats)
            recorder.iteration(plan, stats, policy)
            if on_iteration:
                on_iteration(plan, stats)
            bar.advance(task, len(finished))
    wall = time.perf_counter() - start
    assert all(r.state is State.FINISHED for r in requests)
    generated = {i: tokens[i][len(p.token_ids):] for i, p in enumerate(prompts)}
    return requests, generated, recorder, wall


def write_outputs(out: Path, prompts: list[Prompt], requests, generated, recorder: RunRecorder, summary: dict):
    recorder.write(out, requests, summary)
    with open(out / "tokens.jsonl", "w") as f:
        for i, p in enumerate(prompts):
            f.write(json.dumps({"id": p.key, "prompt_token_ids": list(p.token_ids),
                                "output_token_ids": generated[i]}) + "\n")
