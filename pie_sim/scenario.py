"""One simulated point named by plain options: what `run`, `compare`, `capacity`, `sweep` and `reproduce`
share, so that a point of a sweep or a step of a bisection is exactly the run `pie-sim run` would make."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

from hwmodels import CostModel, GiB, load_hardware, load_model
from pie_policy import ConfigError
from pie_policy.pipeline import PIPELINE_POLICIES
from pie_policy.registry import LIVE_KV, REGISTRY, SIM, entry
from pie_policy.sizing import build_policy
from pie_serving.options import (
    fraction,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    rate,
    seed,
    share,
)
from pie_serving.records import request_table
from traces import load_workload

from .pipeline_sim import simulate_pipeline
from .simulate import SimResult, simulate
from .steady_state import sustainable


@dataclass(frozen=True)
class Scenario:
    """Everything that decides a simulated run's results (with `seed`, bit for bit)."""
    hw: str = "gh200-96g"
    model: str = "opt-13b"
    trace: str = "sharegpt"
    trace_format: str = "auto"       # a trace file's format (traces.FORMATS); auto: told by the file
    num_requests: int = 500          # 0: the whole trace
    rate: float | None = None        # Poisson (Gamma with cv) re-timing, req/s; inf: all at 0; None: the trace's
    cv: float = 1.0
    policy: str = "pie"
    share: float | None = None       # static's CPU share / pie's largest (None: the policy's default)
    gpu_mem_util: float = 0.9
    cpu_mem_gb: float | None = None  # None: 240 GiB or the host's memory
    block_size: int = 16
    max_num_seqs: int = 256
    chunked_prefill: bool = False
    prefetch_depth: int = 1
    micro_batches: int | None = None  # pp-vllm, pipemax: None for the policy's default
    tp: int = 1                      # tensor parallelism: GPUs of the server splitting every layer
    seed: int = 0

    @classmethod
    def options(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_options(cls, options: dict) -> "Scenario":
        """A scenario from a mapping (a sweep's grid point, a command line's options); names it does not
        know are refused with the ones it does."""
        unknown = sorted(set(options) - set(cls.options()))
        if unknown:
            raise ConfigError(f"unknown option{'s' * (len(unknown) > 1)} {', '.join(unknown)} "
                              f"(known: {', '.join(cls.options())})")
        return cls(**options)

    def replace(self, **changes) -> "Scenario":
        return dataclasses.replace(self, **changes)


# What each option's value must be: the command line's types and a grid's checks are these.
RULES = {"num_requests": non_negative_int, "rate": rate, "cv": positive_float, "share": share,
         "gpu_mem_util": fraction, "cpu_mem_gb": non_negative_float, "block_size": positive_int,
         "max_num_seqs": positive_int, "prefetch_depth": positive_int, "micro_batches": positive_int, "seed": seed}


def cli_name(option: str) -> str:
    return "--" + option.replace("_", "-")


def check_policy_options(policies: list[str], micro_batches: int | None, share: float | None,
                         spell: Callable[[str], str] = cli_name) -> None:
    """The rules that span options: every policy known to the simulator, `micro_batches` and `share` set
    only where one of the policies uses them (`spell` names an option as the user wrote it)."""
    for name in policies:
        entry(name, SIM)
    if micro_batches is not None and not set(policies) & set(PIPELINE_POLICIES):
        raise ConfigError(f"{spell('micro_batches')} applies to {' and '.join(PIPELINE_POLICIES)} only, not "
                          f"{', '.join(policies)}")
    if share is not None and not any(REGISTRY[name].cpu_blocks == LIVE_KV for name in policies):
        raise ConfigError(f"{spell('share')} applies to the policies that keep live KV in CPU memory "
                          f"({', '.join(n for n, e in REGISTRY.items() if e.cpu_blocks == LIVE_KV)}), not "
                          f"{', '.join(policies)}")


@lru_cache(maxsize=8)
def _workload(trace: str, trace_format: str, num_requests: int, rate: float | None, cv: float, seed: int):
    """Kept between the runs of a bisection or a comparison, which re-use the same requests."""
    return load_workload(trace, num_requests or None, rate=rate, cv=cv, seed=seed, trace_format=trace_format)


def workload_of(s: Scenario):
    return _workload(s.trace, s.trace_format, s.num_requests, s.rate, s.cv, s.seed)


def served_requests(workload, max_context: int):
    """The requests whose context fits the model (the others are rejected): the mean request a policy is
    sized for (FlexGen's block, pie's share) is theirs. All of them when none fits."""
    fits = (workload.prompt_tokens + workload.output_tokens - 1 <= max_context).to_numpy()
    return workload[fits] if fits.any() else workload


def policy_of(s: Scenario):
    """(the policy `s` runs, its cost model), built as every run builds it (`sizing.build_policy`)."""
    hw, model = load_hardware(s.hw), load_model(s.model)
    cm = CostModel(hw, model, s.tp)
    workload = workload_of(s)
    cpu_bytes = int(s.cpu_mem_gb * GiB) if s.cpu_mem_gb is not None else min(240 * GiB, hw.host.memory_bytes)
    served = served_requests(workload, model.max_context)
    policy = build_policy(s.policy, cm, share=s.share, gpu_mem_util=s.gpu_mem_util, cpu_mem_bytes=cpu_bytes,
                          mean_prompt=int(served.prompt_tokens.mean()),
                          mean_output=int(served.output_tokens.mean()), block_size=s.block_size,
                          max_num_seqs=s.max_num_seqs, chunked_prefill=s.chunked_prefill,
                          prefetch_depth=s.prefetch_depth, micro_batches=s.micro_batches)
    return policy, cm


def simulate_scenario(s: Scenario, *, layer_events: bool = False, traced_iterations: int = 0,
                      on_finish: Callable[[int], None] | None = None,
                      token_gaps: bool = False) -> tuple[dict, SimResult]:
    """Run `s`: (its summary, the whole result). Requests too long for the model stay in: the policy
    rejects them, with the reason, in requests.csv. `token_gaps`: fold the gaps between tokens (ITL)."""
    policy, cm = policy_of(s)
    model, workload = cm.model, workload_of(s)
    if s.policy in PIPELINE_POLICIES:
        if layer_events:
            raise ConfigError("--layer-events checks the single-GPU recurrence; the pipeline simulator is "
                              "SimPy throughout")
        result = simulate_pipeline(policy, cm, workload, on_finish=on_finish, token_gaps=token_gaps)
    else:
        result = simulate(policy, cm, workload, layer_events=layer_events, traced_iterations=traced_iterations,
                          on_finish=on_finish, token_gaps=token_gaps)
    summary = result.recorder.summary(result.requests, result.wall_s, backend="sim", policy=s.policy, hw=cm.hw.name,
                                      model=model.name, trace=str(s.trace), rate=s.rate, seed=s.seed,
                                      events=result.events)
    return summary, result


def summarize(s: Scenario) -> dict:
    """`s`'s summary alone (small and picklable: what a worker process sends back)."""
    return simulate_scenario(s)[0]


def summarize_steady(s: Scenario) -> dict:
    """`s`'s summary and whether its rate is sustainable (`sustainable`: steady_state.sustainable)."""
    summary, result = simulate_scenario(s)
    return summary | {"sustainable": sustainable(request_table(result.requests))}
