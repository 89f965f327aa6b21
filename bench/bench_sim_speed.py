"""Speed of the whole `pie-sim run` process (start-up, loading, simulating, writing outputs) on the whole
Azure conversation trace with pie on GH200 / OPT-13B: requests per wall second, SimPy events per second,
peak memory. Target: at least 6,000 requests/s on this kind of machine.

    python3 bench/bench_sim_speed.py [--policy pie] [--trace azure-conv]
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", default="pie")
    parser.add_argument("--trace", default="azure-conv")
    parser.add_argument("--hw", default="gh200-96g")
    parser.add_argument("--model", default="opt-13b")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, "-m", "pie_sim", "run", "--policy", args.policy, "--trace", args.trace,
                   "--hw", args.hw, "--model", args.model, "--num-requests", "0", "--out", out]
        start = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True)
        wall = time.perf_counter() - start
        summary = json.loads((Path(out) / "summary.json").read_text())
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    requests = summary["requests"]
    print(f"{requests} {args.trace} requests ({summary['rejected']} rejected), {args.policy}, {args.model} on "
          f"{args.hw}: process wall {wall:.1f} s -> {requests / wall:,.0f} requests/s; "
          f"{summary['events']:,} SimPy events -> {summary['events'] / wall:,.0f} events/s; "
          f"{summary['iterations']:,} iterations; peak memory {peak:,.0f} MiB")


if __name__ == "__main__":
    main()
