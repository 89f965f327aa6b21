"""Simulator wall time on PCIe hosts (issue 7), this tree against another one (say main, exported with
`git archive`), on the same machine under the same load, and whether both give the same results.

Each case is run `--repeats` times in each tree, alternating, each time in a fresh process (the tree on
PYTHONPATH); the time is `simulate_scenario`'s alone (the workload is loaded before the clock starts). The
results compared are the summary (less wall_s), the iterations table and the requests table, bit for bit.

    git archive main | tar -x -C /tmp/main-tree
    python3 -m bench.bench_pcie_speed --before /tmp/main-tree [--repeats 3] [--all]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

PCIE_13B = dict(hw="h100-sxm-pcie5", model="opt-13b", num_requests=100, rate=15, gpu_mem_util=0.322)
TIMED = [dict(PCIE_13B, policy="pie"), dict(PCIE_13B, policy="static")]
# FlexGen plans every decode step of a block with its copies (thousands of iterations for 20 requests,
# minutes before): 5 requests each.
FLEXGEN = dict(num_requests=5, rate=15, policy="flexgen")
CHECKED = [dict(PCIE_13B, policy="vllm-swap"),
           dict(hw="gh200-96g", model="opt-13b", num_requests=100, rate=15, policy="pie", gpu_mem_util=0.322),
           dict(FLEXGEN, hw="h100-sxm-pcie5", model="opt-13b", gpu_mem_util=0.322),
           dict(FLEXGEN, hw="gh200-96g", model="opt-13b", gpu_mem_util=0.322),
           # the weights and KV cache mostly on disk (RESULTS.md: FlexGen with disk)
           dict(FLEXGEN, hw="h100-sxm-pcie5", model="opt-175b", cpu_mem_gb=240)]

# Run in the tree under test: only what both trees have (pie_sim.scenario, pie_policy.records).
CHILD = """
import hashlib, json, sys, time
from pie_policy.records import request_table
from pie_sim.scenario import Scenario, simulate_scenario, workload_of
s = Scenario(**json.loads(sys.argv[1]))
workload_of(s)
start = time.perf_counter()
summary, result = simulate_scenario(s)
seconds = time.perf_counter() - start
summary.pop("wall_s")
tables = [sorted(summary.items())] + [sorted((k, v.tolist()) for k, v in table.items())
                                      for table in (result.recorder.iterations, request_table(result.requests))]
busy = dict(result.timeline.links.busy) if result.timeline else {}
print(json.dumps(dict(seconds=seconds, digest=hashlib.sha256(repr(tables).encode()).hexdigest(), busy=busy)))
"""


def run(tree: Path, case: dict, timeout: float | None = None) -> dict | None:
    """The case's seconds, results digest and busy seconds in `tree`; None if it runs past `timeout`."""
    env = dict(os.environ, PYTHONPATH=str(tree))
    try:
        out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(case)], cwd=tree, env=env,
                             capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None
    if out.returncode:
        raise RuntimeError(f"{case} in {tree}:\n{out.stderr}")
    return json.loads(out.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, required=True, help="the other tree (the 'before' times)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--all", action="store_true", help="also check (once each) the other policies and systems")
    parser.add_argument("--timeout", type=float, default=300, help="seconds a run may take in the other tree")
    args = parser.parse_args()
    after = Path(__file__).resolve().parent.parent
    print("| system | model | policy | before s | after s | speed-up | identical | disk busy s (read/write) |")
    print("|---|---|---|---:|---:|---:|---|---:|")
    for case, repeats in [(c, args.repeats) for c in TIMED] + [(c, 1) for c in CHECKED if args.all]:
        before, mine = [], []
        for _ in range(repeats):
            before.append(run(args.before, case, args.timeout))
            mine.append(run(after, case))
        if None in before:   # main's FluidLinks can step forever (RESULTS.md: Simulator speed on PCIe hosts)
            print(f"| {case['hw']} | {case['model']} | {case['policy']} | did not end in {args.timeout:.0f} s | "
                  f"{mine[0]['seconds']:.2f} | | | |", flush=True)
            continue
        b, a = min(r["seconds"] for r in before), min(r["seconds"] for r in mine)
        same = all(r["digest"] == before[0]["digest"] for r in before + mine) and mine[0]["busy"] == before[0]["busy"]
        disk = "/".join(f"{mine[0]['busy'].get(d, 0.0):.1f}" for d in ("disk-read", "disk-write"))
        print(f"| {case['hw']} | {case['model']} | {case['policy']} | {b:.2f} | {a:.2f} | {b / a:.1f}x | "
              f"{'yes' if same else 'NO'} | {disk} |", flush=True)


if __name__ == "__main__":
    main()
