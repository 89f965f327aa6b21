"""How fast pie_policy itself plans, driven by a closed-form backend (each iteration takes the cost
model's time, no copies, no SimPy): the ceiling any simulator built on it can reach.

    python3 bench/bench_policy.py [--requests 4000] [--trace azure-conv] [--hw gh200-96g] [--model opt-13b]
"""
from __future__ import annotations

import argparse
import time

from hwmodels import CostModel, load_hardware, load_model
from pie_policy import IterationStats
from pie_policy.sizing import ALL_POLICIES, build_policy
from traces import load_workload


def drive(policy, cost_model, workload) -> tuple[int, float]:
    """Run the workload through the policy; returns (iterations, simulated seconds)."""
    arrivals = workload.arrival_s.tolist()
    prompts, outputs = workload.prompt_tokens.tolist(), workload.output_tokens.tolist()
    now, i, iterations = 0.0, 0, 0
    while i < len(arrivals) or policy.has_work:
        while i < len(arrivals) and arrivals[i] <= now:
            policy.add_request(i, arrivals[i], prompts[i], outputs[i])
            i += 1
        plan = policy.next_iteration()
        if plan is None:
            now = arrivals[i]
            continue
        took = cost_model.iteration_time(plan.shape)
        policy.observe(plan, IterationStats(plan.iteration, now, now + took, took, 0.0, 0, 0, 0, 0))
        now += took
        iterations += 1
    return iterations, now


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--trace", default="azure-conv")
    parser.add_argument("--hw", default="gh200-96g")
    parser.add_argument("--model", default="opt-13b")
    args = parser.parse_args()
    cm = CostModel(load_hardware(args.hw), load_model(args.model))
    workload = load_workload(args.trace, args.requests)
    print(f"{args.requests} {args.trace} requests, {args.model} on {args.hw}")
    for name in ALL_POLICIES:
        policy = build_policy(name, cm, cpu_mem_bytes=200 * 1024**3, mean_prompt=int(workload.prompt_tokens.mean()),
                              mean_output=int(workload.output_tokens.mean()))
        start = time.perf_counter()
        iterations, simulated = drive(policy, cm, workload)
        wall = time.perf_counter() - start
        print(f"  {name:9s} {iterations:7d} iterations, {simulated:7.1f} s simulated, wall {wall:5.2f} s: "
              f"{iterations / wall:8.0f} iterations/s, {args.requests / wall:6.0f} requests/s")


if __name__ == "__main__":
    main()
