"""The simulator's speed side by side with another tree's (say main, exported with `git archive`): whole
`pie-sim` processes (start-up, loading, simulating, writing every file), the trees alternating, each case
`--repeats` times per tree. For each case: requests per wall second of the fastest run, the CPU seconds of
the child (user + system, with the plot process it waits for) of its fastest run, and peak memory. On a
machine shared with other work the wall times are noisy: the fastest of several runs and the CPU seconds
are the figures to read.

    git archive main | tar -x -C /tmp/main-tree
    python3 -m bench.bench_speed --before /tmp/main-tree [--cases kv-limited,...] [--repeats 3]
    python3 -m bench.bench_speed --memory 200000     # peak memory of one long KV-limited run, this tree only

The cases are the regimes the simulator serves: KV-limited loads where the copying policies move data every
iteration (GH200 and a PCIe host), vLLM's swapping, the pipeline policies on an 8-GPU PCIe server, and the
Azure conversation trace at its own times (not KV-limited: decode runs cover most iterations).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from .same_results import Child, run_pie_sim

KV_LIMITED = ["--model", "opt-13b", "--trace", "sharegpt", "--rate", "20", "--gpu-mem-util", "0.5"]
GH200, PCIE = ["--hw", "gh200-96g", *KV_LIMITED], ["--hw", "h100-pcie5", *KV_LIMITED]
SERVER = ["--hw", "pcie-8x-l40s", "--model", "opt-66b", "--trace", "sharegpt", "--rate", "4"]
# name → (requests, pie-sim arguments without --out)
CASES = {
    "gh200-pie-600": (600, ["run", *GH200, "--num-requests", "600", "--policy", "pie"]),
    "gh200-static-600": (600, ["run", *GH200, "--num-requests", "600", "--policy", "static"]),
    "gh200-pie-4000": (4000, ["run", *GH200, "--num-requests", "4000", "--policy", "pie"]),
    "gh200-static-4000": (4000, ["run", *GH200, "--num-requests", "4000", "--policy", "static"]),
    "gh200-vllm-swap-600": (600, ["run", *GH200, "--num-requests", "600", "--policy", "vllm-swap"]),
    "pcie-pie-600": (600, ["run", *PCIE, "--num-requests", "600", "--policy", "pie"]),
    "pcie-static-600": (600, ["run", *PCIE, "--num-requests", "600", "--policy", "static"]),
    "pcie-vllm-swap-600": (600, ["run", *PCIE, "--num-requests", "600", "--policy", "vllm-swap"]),
    "server-pp-vllm-300": (300, ["run", *SERVER, "--num-requests", "300", "--policy", "pp-vllm"]),
    "server-pipemax-300": (300, ["run", *SERVER, "--num-requests", "300", "--policy", "pipemax"]),
    "azure-conv-pie": (19366, ["run", "--trace", "azure-conv", "--num-requests", "0", "--policy", "pie"]),
}
GROUPS = {
    "kv-limited": [n for n in CASES if n.startswith(("gh200", "pcie"))],
    "pipeline": [n for n in CASES if n.startswith("server")],
    "azure": ["azure-conv-pie"],
    "all": list(CASES),
}


def fastest(runs: list[Child]) -> tuple[float, float, float]:
    """(least wall seconds, least CPU seconds, most peak MiB) of a case's runs in one tree."""
    return min(r.wall_s for r in runs), min(r.cpu_s for r in runs), max(r.peak_mib for r in runs)


def compare(before: Path, names: list[str], repeats: int) -> int:
    after = Path(__file__).resolve().parent.parent
    print("| case | requests | before wall s | after wall s | before req/s | after req/s | wall speed-up | "
          "before CPU s | after CPU s | CPU speed-up | before MiB | after MiB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    failed = 0
    with tempfile.TemporaryDirectory() as scratch:
        for name in names:
            requests, args = CASES[name]
            runs: dict[str, list[Child]] = {"before": [], "after": []}
            for repeat in range(repeats):
                for side, tree in (("before", before.resolve()), ("after", after)):
                    runs[side].append(run_pie_sim(tree, args, Path(scratch) / f"{name}-{side}-{repeat}"))
            errors = [f"{side}: {r.error}" for side, rs in runs.items() for r in rs if r.returncode]
            if errors:
                failed += 1
                print(f"| {name} | {requests} | failed: {errors[0]} |", flush=True)
                continue
            (bw, bc, bm), (aw, ac, am) = fastest(runs["before"]), fastest(runs["after"])
            print(f"| {name} | {requests:,} | {bw:.2f} | {aw:.2f} | {requests / bw:,.0f} | {requests / aw:,.0f} | "
                  f"{bw / aw:.1f}x | {bc:.2f} | {ac:.2f} | {bc / ac:.1f}x | {bm:,.0f} | {am:,.0f} |", flush=True)
    return 1 if failed else 0


def memory(requests: int) -> int:
    """Peak memory of one KV-limited GH200 pie run of `requests` requests in this tree."""
    tree = Path(__file__).resolve().parent.parent
    with tempfile.TemporaryDirectory() as scratch:
        child = run_pie_sim(tree, ["run", *GH200, "--num-requests", str(requests), "--policy", "pie"],
                            Path(scratch) / "out")
    if child.returncode:
        print(f"failed: {child.error}")
        return 1
    print(f"pie, {requests:,} ShareGPT requests at 20/s, OPT-13B on gh200-96g at gpu_mem_util 0.5: peak memory "
          f"{child.peak_mib:,.0f} MiB; wall {child.wall_s:.1f} s ({requests / child.wall_s:,.0f} requests/s), "
          f"CPU {child.cpu_s:.1f} s")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, help="the other tree (the 'before' times)")
    parser.add_argument("--cases", default="all",
                        help=f"comma-separated cases or groups ({', '.join(GROUPS)}; cases: {', '.join(CASES)})")
    parser.add_argument("--repeats", type=int, default=3, help="runs per tree and case (default 3)")
    parser.add_argument("--memory", type=int, metavar="REQUESTS",
                        help="instead: peak memory of one KV-limited pie run of this many requests (this tree)")
    args = parser.parse_args()
    if args.memory is not None:
        return memory(args.memory)
    if args.before is None:
        parser.error("--before is required (unless --memory)")
    names = [n for part in args.cases.split(",") for n in GROUPS.get(part, [part])]
    unknown = [n for n in names if n not in CASES]
    if unknown:
        parser.error(f"unknown case {unknown[0]} (known: {', '.join(CASES)}; groups: {', '.join(GROUPS)})")
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    return compare(args.before, names, args.repeats)


if __name__ == "__main__":
    sys.exit(main())
