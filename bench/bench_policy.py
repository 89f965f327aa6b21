"""How fast pie_policy itself plans, driven by a closed-form backend (each iteration takes the cost
model's time, no copies, no SimPy): the ceiling any simulator built on it can reach.

    python3 bench/bench_policy.py [--requests 4000] [--trace azure-conv] [--hw gh200-96g] [--model opt-13b]
"""
from __future__ import annotations

import argparse
import time

from hwmodels import CostModel, GiB, load_hardware, load_model
from pie_policy import IterationStats
from pie_policy.sizing import SINGLE_GPU_POLICIES, build_policy
from pie_serving import Serving, drive
from pie_sim.simulate import workload_rows
from traces import load_workload


class ClosedForm:
    """A backend in which every plan takes the cost model's iteration time: no copies, no stall."""

    def __init__(self, cost_model: CostModel):
        self.cost_model, self.now, self.iterations = cost_model, 0.0, 0

    def run(self, plan, start_s: float) -> IterationStats:
        took = self.cost_model.iteration_time(plan.shape)
        self.now, self.iterations = start_s + took, self.iterations + 1
        return IterationStats.of(plan, start_s, self.now, took, 0.0)

    def wait_until(self, t: float) -> None:
        self.now = t


def serve(policy, cost_model, workload) -> tuple[int, float]:
    """Run the workload through the policy on the serving loop; returns (iterations, simulated seconds)."""
    backend = ClosedForm(cost_model)
    drive(Serving(policy, workload_rows(workload)), backend, lambda: backend.now, backend.wait_until)
    return backend.iterations, backend.now


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
    for name in SINGLE_GPU_POLICIES:
        policy = build_policy(name, cm, cpu_mem_bytes=200 * GiB, mean_prompt=int(workload.prompt_tokens.mean()),
                              mean_output=int(workload.output_tokens.mean()))
        start = time.perf_counter()
        iterations, simulated = serve(policy, cm, workload)
        wall = time.perf_counter() - start
        print(f"  {name:14s} {iterations:7d} iterations, {simulated:7.1f} s simulated, wall {wall:5.2f} s: "
              f"{iterations / wall:8.0f} iterations/s, {args.requests / wall:6.0f} requests/s")


if __name__ == "__main__":
    main()
