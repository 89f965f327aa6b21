"""Pipeline parallelism over processes: the model's layers split into stages, one process (rank) each,
talking through torch.distributed (gloo on the CPU, NCCL between GPUs, one GPU a rank); generated tokens
are those of the single-process executor.

Rank r runs stage r (`stage_layers`): an `Executor` over its slice of the layers with the KV pools of
those layers only; rank 0 also embeds the tokens, the last rank also runs the final norm and the LM head.
The pools' block counts are the policy's, so the KV pool the policy is sized for is the pipeline's: each
GPU holds its layers' part of every block, and a whole staging area (a slot is one layer's worth).
Rank 0 runs the policy, driving a `PipelineHead` with `pie_exec.run.run` as it would drive an Executor.
Per plan:

    rank 0        broadcast the plan → its layers → send hidden states to rank 1 → receive the sampled tokens
    rank r > 0    receive the plan → receive hidden states → its layers → send them on (the last rank: the
                  sampled tokens, to rank 0)
    every rank    add its times to the iteration's stats at rank 0

Every stage runs the whole plan's copies for its own layers (see engine.py for how their order is kept),
so a later stage's prefetches for its first layers overlap the stages before it. Only one plan is in
flight: the next one needs this one's tokens (the policies here plan one batch at a time), so while a
stage computes the others wait; micro-batches in flight would need a planner that forms them.

The ranks meet through a file in a temporary folder (no network beyond this machine). Plans and stats go
on a gloo group that waits as long as arrivals take (`PLAN_TIMEOUT`); hidden states and tokens on the
default group, where a rank waits at most `STAGE_TIMEOUT`. A rank that fails exits, and
torch.multiprocessing's spawn then ends the others at once; the ranks die with the process that started
them (pie_serving.processes), which kills them when it is interrupted.
"""
from __future__ import annotations

import os
import pickle
import tempfile
import time
from dataclasses import dataclass
from datetime import timedelta
from itertools import accumulate
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pie_policy import IterationStats, Plan, Policy
from pie_policy.pipeline_layout import split_layers
from pie_serving.processes import die_with_parent, kill_children

from .engine import Executor, StageTimes
from .model import Transformer
from .run import InputError, Prompt, check_fits, run

STAGE_TIMEOUT = timedelta(minutes=10)  # the longest a rank waits for another's hidden states or tokens
PLAN_TIMEOUT = timedelta(days=1)      # the longest the other ranks wait for rank 0's next plan (arrivals)


def stage_layers(num_layers: int, stages: int) -> list[range]:
    """Each stage's contiguous slice of the layers, split as the simulator's pipelines split them (vLLM's
    rule: `pipeline_layout.split_layers`)."""
    if not 1 <= stages <= num_layers:
        raise InputError(f"--pipeline-stages {stages}: need 1 to {num_layers} stages (at least one of the "
                         f"model's {num_layers} layers each)")
    bounds = list(accumulate(split_layers(num_layers, stages), initial=0))
    return [range(a, b) for a, b in zip(bounds, bounds[1:])]


def place_stage(model: Transformer, layers: range, device: torch.device) -> Transformer:
    """Move to `device` what a stage computes with: its layers, the embeddings on the first, the final
    norm and the LM head on the last. The rest stays where it is (shared CPU memory) and is never used."""
    parts = [model.layers[layer] for layer in layers]
    if layers.start == 0:
        parts += [model.tok_embeddings, model.pos_embeddings]
    if layers.stop == len(model.layers):
        parts += [model.norm, model.tok_embeddings if model.output is None else model.output]
    for part in parts:
        if part is not None:
            part.to(device)
    return model


class Stage:
    """One rank's part of every plan: its executor, and the messages to the ranks beside it."""

    def __init__(self, executor: Executor, rank: int, stages: int, control: dist.ProcessGroup):
        self.executor, self.rank, self.stages, self.control = executor, rank, stages, control
        self.device = executor.device

    def send_plan(self, plan: Plan | None) -> None:
        """Rank 0: the next plan to every rank (None: the run is over)."""
        dist.broadcast_object_list([plan], src=0, group=self.control)

    def receive_plan(self) -> Plan | None:
        message = [None]
        dist.broadcast_object_list(message, src=0, group=self.control)
        return message[0]

    def run(self, plan: Plan, take_input):
        """Run `plan` over this stage's layers and pass its output on: hidden states to the next rank, the
        sampled tokens from the last one to rank 0. Returns (output, times)."""
        executor = self.executor
        output, _, times = executor.run_stage(plan, executor.kv.bind(plan), take_input)
        if not executor.last:
            dist.send(output, self.rank + 1)
        elif self.rank != 0 and output:
            dist.send(torch.tensor(output, device=self.device), 0)
        return output, times

    def receive_hidden(self, plan: Plan) -> torch.Tensor:
        spec = self.executor.model.spec
        hidden = torch.empty((sum(s.new_tokens for s in plan.seqs), spec.hidden_size),
                             dtype=self.executor.model.dtype, device=self.device)
        dist.recv(hidden, self.rank - 1)
        return hidden

    def receive_tokens(self, plan: Plan) -> list[int]:
        """Rank 0: the last stage's sampled tokens."""
        tokens = torch.empty(sum(s.samples for s in plan.seqs), dtype=torch.long, device=self.device)
        if tokens.numel():
            dist.recv(tokens, self.stages - 1)
        return tokens.tolist()

    def report(self, times: StageTimes) -> torch.Tensor:
        """Add this stage's times and copier busy to every other's at rank 0: per layer compute, per layer
        stall, then compute, stall, host→device and device→host busy (seconds; each stage's own layers)."""
        layers, num_layers = self.executor.layers, self.executor.config.num_layers
        busy = self.executor.copier.take_busy()
        total = torch.zeros(2 * num_layers + 4, dtype=torch.float64)
        total[layers.start:layers.stop] = torch.tensor(times.layer_compute_s, dtype=torch.float64)
        total[num_layers + layers.start:num_layers + layers.stop] = torch.tensor(times.layer_stall_s,
                                                                                 dtype=torch.float64)
        total[2 * num_layers:] = torch.tensor([times.compute_s, times.stall_s, busy["h2d"], busy["d2h"]],
                                              dtype=torch.float64)
        dist.reduce(total, dst=0, group=self.control)
        return total


def follow(stage: Stage) -> None:
    """A rank other than 0: run each plan rank 0 sends until it sends None."""
    while (plan := stage.receive_plan()) is not None:
        _, times = stage.run(plan, lambda: stage.receive_hidden(plan))
        stage.report(times)


class PipelineHead:
    """Rank 0: runs stage 0 and gathers the pipeline's result, with an Executor's `execute`, for `run`."""

    def __init__(self, stage: Stage):
        self.stage = stage

    def execute(self, plan: Plan, token_ids: list[list[int]], run_start: float):
        """As Executor.execute, but no logits (None). Compute and stall are the stages' sums (one plan in
        flight: they run in turn), copier busy times are summed over the stages' links."""
        start_s = time.perf_counter() - run_start
        stage = self.stage
        stage.send_plan(plan)
        ids = torch.tensor([t for seq in token_ids for t in seq], device=stage.device)
        output, times = stage.run(plan, lambda: ids)
        sampled = output if stage.executor.last else stage.receive_tokens(plan)
        total = stage.report(times).tolist()
        layers = stage.executor.config.num_layers
        compute, stall, h2d, d2h = total[2 * layers:]
        stats = IterationStats(plan.iteration, start_s, time.perf_counter() - run_start, compute, stall,
                               *plan.bytes_moved(), h2d, d2h, tuple(total[:layers]), tuple(total[layers:2 * layers]))
        return stats, sampled, None

    def close(self) -> None:
        self.stage.send_plan(None)


@dataclass(frozen=True)
class _Job:
    """What every rank is given (rank 0 alone uses the policy and the prompts)."""
    model: Transformer
    policy: Policy
    prompts: list[Prompt]
    stages: int
    device_type: str
    threads: int
    progress: bool


JOB_FILE = "job.pt"


def _rank_main(rank: int, folder: str, parent: int) -> None:
    """One rank, from joining the group to leaving it. On an error the rank exits without leaving it (a
    peer that is gone could hold the teardown up); spawn ends the others. It dies with `parent`, and reads
    its job from `folder` (memory-mapped: the ranks share the weights' pages)."""
    die_with_parent(parent)
    job: _Job = torch.load(Path(folder) / JOB_FILE, mmap=True, weights_only=False)
    torch.set_num_threads(job.threads)
    cuda = job.device_type == "cuda"
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"file://{folder}/store", rank=rank,
                            world_size=job.stages, timeout=STAGE_TIMEOUT)
    control = dist.new_group(backend="gloo", timeout=PLAN_TIMEOUT)
    config = job.policy.config
    layers = stage_layers(config.num_layers, job.stages)[rank]
    executor = Executor(place_stage(job.model, layers, device), config, device, job.policy.staging_slots, layers)
    stage = Stage(executor, rank, job.stages, control)
    if rank == 0:
        head = PipelineHead(stage)
        result = run(head, job.policy, job.prompts, progress=job.progress)
        head.close()
        (Path(folder) / "result.pkl").write_bytes(pickle.dumps(result))
    else:
        follow(stage)
    executor.close()
    dist.destroy_process_group()


def default_threads(stages: int) -> int:
    """torch threads a rank: the CPU cores this process may use, shared out among the stages."""
    return max(1, len(os.sched_getaffinity(0)) // stages)


def serve(model: Transformer, policy: Policy, prompts: list[Prompt], stages: int, device_type: str = "cpu",
          threads: int | None = None, progress: bool = False):
    """`run` over `stages` processes; returns what `run` returns. `model` is on the CPU (each rank moves
    its part to its GPU); `threads`: torch threads a rank (default `default_threads`)."""
    stage_layers(policy.config.num_layers, stages)
    if device_type == "cuda" and torch.cuda.device_count() < stages:
        raise InputError(f"--pipeline-stages {stages} on cuda needs a GPU a stage; "
                         f"{torch.cuda.device_count()} here")
    check_fits(policy, prompts)
    job = _Job(model, policy, prompts, stages, device_type, threads or default_threads(stages), progress)
    with tempfile.TemporaryDirectory(prefix="pie-pipeline-") as folder:
        # The job goes through a file, not spawn's start-up arguments: the parent writes those down a pipe
        # to each rank, blocking until the rank (importing torch) has read them, and a parent interrupted
        # while it writes leaves a rank printing a traceback; a folder's name is written at once.
        torch.save(job, Path(folder) / JOB_FILE)
        try:
            mp.spawn(_rank_main, args=(folder, os.getpid()), nprocs=stages, join=True)
        except BaseException:  # Ctrl-C, SIGTERM, a rank's error: no rank outlives the run
            kill_children()
            raise
        return pickle.loads((Path(folder) / "result.pkl").read_bytes())
