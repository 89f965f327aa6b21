"""The simulator's speed side by side with another tree's (say main, exported with `git archive`): whole
`pie-sim` processes (start-up, loading, simulating, writing every file), the trees alternating, each case
`--repeats` times per tree. For each case: requests per wall second of the fastest run, the CPU seconds of
the child (user + system, with the plot process it waits for) of its fastest run, and peak memory. On a
machine shared with other work the wall times are noisy: the fastest of several runs and the CPU seconds
are the figures to read.

    git archive main | tar -x -C /tmp/main-tree
    python3 -m bench.bench_speed --before /tmp/main-tree [--cases kv-limited,...] [--repeats 3]
    python3 -m bench.bench_speed --memory 200000 [--before TREE]   # peak memory of one long KV-limited run

The cases are the regimes the simulator serves: KV-limited loads where the copying policies move data every
iteration (GH200 and a PCIe host), vLLM's swapping, the pipeline policies on an 8-GPU PCIe server, and the
Azure conversation trace at its own times (not KV-limited: decode runs cover most iterations).
"""
from __future__ import annotations

import argparse
import csv
import sys
import tempfile
from pathlib import Path

from .same_results import Child, run_pie_sim

KV_LIMITED = ["--model", "opt-13b", "--trace", "sharegpt", "--rate", "20", "--gpu-mem-util", "0.5"]
GH200, PCIE = ["--hw", "gh200-96g", *KV_LIMITED], ["--hw", "h100-sxm-pcie5", *KV_LIMITED]
# bench_pipemax's workload: 800 requests at once, every engine queued, pipemax streaming
SERVER = ["--hw", "pcie-8x-l40s", "--model", "opt-66b", "--trace", "sharegpt", "--rate", "inf"]
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
    "server-pp-vllm-800": (800, ["run", *SERVER, "--num-requests", "800", "--policy", "pp-vllm"]),
    "server-pipemax-800": (800, ["run", *SERVER, "--num-requests", "800", "--policy", "pipemax"]),
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


def long_trace(path: Path, requests: int) -> None:
    """`requests` ShareGPT request lengths, the trace's usable ones over and over (it has ~15,000): a trace
    file as long as wanted, re-timed by --rate like the trace itself."""
    from traces import load_workload

    lengths = load_workload("sharegpt")
    rows = list(zip(lengths.prompt_tokens.tolist(), lengths.output_tokens.tolist()))
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(("arrival_s", "prompt_tokens", "output_tokens"))
        writer.writerows((0.0, *rows[i % len(rows)]) for i in range(requests))


def memory(requests: int, before: Path | None) -> int:
    """Peak memory of one KV-limited GH200 pie run of `requests` requests, in this tree (and `before`)."""
    after = Path(__file__).resolve().parent.parent
    with tempfile.TemporaryDirectory() as scratch:
        trace = Path(scratch) / "sharegpt-long.csv"
        long_trace(trace, requests)
        args = ["run", "--hw", "gh200-96g", "--model", "opt-13b", "--trace", str(trace), "--rate", "20",
                "--gpu-mem-util", "0.5", "--num-requests", str(requests), "--policy", "pie"]
        for side, tree in (("before", before), ("after", after)):
            if tree is None:
                continue
            child = run_pie_sim(tree.resolve(), args, Path(scratch) / side)
            if child.returncode:
                print(f"{side}: failed: {child.error}")
                return 1
            print(f"{side}: pie, {requests:,} ShareGPT-length requests at 20/s, OPT-13B on gh200-96g at gpu_mem_util "
                  f"0.5: peak memory {child.peak_mib:,.0f} MiB; wall {child.wall_s:.1f} s "
                  f"({requests / child.wall_s:,.0f} requests/s), CPU {child.cpu_s:.1f} s", flush=True)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, help="the other tree (the 'before' times)")
    parser.add_argument("--cases", default="all",
                        help=f"comma-separated cases or groups ({', '.join(GROUPS)}; cases: {', '.join(CASES)})")
    parser.add_argument("--repeats", type=int, default=3, help="runs per tree and case (default 3)")
    parser.add_argument("--memory", type=int, metavar="REQUESTS",
                        help="instead: peak memory of one KV-limited pie run of this many requests (this tree, "
                             "and --before's if given)")
    args = parser.parse_args()
    if args.memory is not None:
        return memory(args.memory, args.before)
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
