"""Whether this tree's commands write the same files as another tree's (say main, exported with
`git archive`), and how long each took in each tree: the check behind a change that must leave every
simulated figure unchanged (a refactor, a faster simulator).

Each case is a `pie-sim` command line run in a fresh process in each tree (the tree on PYTHONPATH, its
own `--out`), the trees alternating, each case once per tree (`--repeats` for more timings). Every file the
command writes is compared byte for byte, except the figures of the implementation rather than of the
simulated system (`WALL_CLOCK`: wall time and SimPy events, in summary.json and in every CSV of summaries)
and the table the command prints. A case that fails in one tree only is a difference.

    git archive main | tar -x -C /tmp/main-tree
    python3 -m bench.same_results --before /tmp/main-tree [--cases quick|all] [--repeats 1]
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

PCIE = ["--hw", "h100-sxm-pcie5", "--model", "opt-13b", "--num-requests", "100", "--rate", "15", "--gpu-mem-util", "0.322"]
GH200 = ["--hw", "gh200-96g", "--model", "opt-13b", "--num-requests", "200", "--rate", "20", "--gpu-mem-util", "0.5"]
SERVER = ["--hw", "pcie-8x-l40s", "--model", "opt-66b", "--num-requests", "100", "--rate", "4"]
# The README's KV-limited load (compare's default: 20/s, half the HBM), where the copying policies live.
KV_LIMITED = ["--model", "opt-13b", "--rate", "20", "--gpu-mem-util", "0.5"]
# name → pie-sim arguments (the folder is added); "quick" runs in about a minute a tree on 2 cores.
QUICK = {
    "compare-default": ["compare"],
    "gh200-pie-depth2": ["run", *GH200, "--policy", "pie", "--prefetch-depth", "2"],
    "gh200-static-chunked": ["run", *GH200, "--policy", "static", "--chunked-prefill"],
    "gh200-pie-layer-events": ["run", *GH200, "--num-requests", "40", "--policy", "pie", "--layer-events"],
    "pcie-pie": ["run", *PCIE, "--policy", "pie"],
    "pcie-static": ["run", *PCIE, "--policy", "static"],
    "pcie-vllm-swap": ["run", *PCIE, "--policy", "vllm-swap"],
    "pcie-flexgen": ["run", *PCIE, "--num-requests", "5", "--policy", "flexgen"],
    "server-pp-vllm": ["run", *SERVER, "--policy", "pp-vllm"],
    "server-pipemax": ["run", *SERVER, "--policy", "pipemax"],
    "azure-conv-own-times": ["run", "--trace", "azure-conv", "--num-requests", "2000", "--policy", "pie"],
    "preview": ["preview"],
}
ALL = QUICK | {
    "capacity-small": ["capacity", "--hw", "gh200-96g", "--model", "opt-13b", "--num-requests", "200",
                       "--policy", "pie,vllm", "--tolerance", "0.1"],
    "disk-flexgen": ["run", "--hw", "h100-sxm-pcie5", "--model", "opt-175b", "--cpu-mem-gb", "240",
                     "--num-requests", "5", "--rate", "15", "--policy", "flexgen"],
    "reproduce-quick": ["reproduce", "--quick"],
    "pcie-kv-limited": ["compare", "--hw", "h100-sxm-pcie5", *KV_LIMITED, "--num-requests", "600",
                        "--policies", "pie,static,vllm-swap"],
    "gh200-kv-limited-2000": ["compare", "--hw", "gh200-96g", *KV_LIMITED, "--num-requests", "2000",
                              "--policies", "pie,static"],
    # every request at once: engines with queues, pipemax streaming (its copies over the PCIe tree)
    "server-pipemax-streaming": ["run", "--hw", "pcie-8x-l40s", "--model", "opt-66b", "--num-requests", "500",
                                 "--rate", "inf", "--policy", "pipemax"],
}
# Figures of the implementation, not of the simulated system: wall time, and SimPy events scheduled (a
# faster simulator schedules fewer).
WALL_CLOCK = ("wall_s", "events")


def normalized(path: Path) -> bytes:
    """A file's bytes with its wall-clock figures blanked (summary.json, and every CSV of summaries:
    compare.csv, reproduce's curves.csv and offline.csv); others as they are."""
    data = path.read_bytes()
    if path.suffix == ".json" and path.name == "summary.json":
        summary = json.loads(data)
        for key in WALL_CLOCK:
            summary.pop(key, None)
        return json.dumps(summary, sort_keys=True).encode()
    if path.suffix == ".csv":
        rows = list(csv.DictReader(io.StringIO(data.decode())))
        if rows and any(key in rows[0] for key in WALL_CLOCK):
            for row in rows:
                for key in WALL_CLOCK:
                    row.pop(key, None)
            return json.dumps(rows, sort_keys=True).encode()
    return data


@dataclass(frozen=True)
class Child:
    """What one `pie-sim` process took: wall seconds, CPU seconds (user + system, its own and its waited-for
    children's, as the kernel reports them at its exit) and peak resident memory (MiB, of its largest
    process), its exit status and the last line it wrote to stderr (or, if none, stdout)."""
    wall_s: float
    cpu_s: float
    peak_mib: float
    returncode: int
    error: str


def run_pie_sim(tree: Path, args: list[str], out: Path) -> Child:
    """`python -m pie_sim ARGS --out OUT` in `tree` (on PYTHONPATH), in a fresh process."""
    env = dict(os.environ, PYTHONPATH=str(tree), MPLBACKEND="Agg")
    with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
        start = time.perf_counter()
        child = subprocess.Popen([sys.executable, "-m", "pie_sim", *args, "--out", str(out)], cwd=tree, env=env,
                                 stdout=stdout, stderr=stderr)
        _, status, usage = os.wait4(child.pid, 0)
        wall = time.perf_counter() - start
        child.returncode = os.waitstatus_to_exitcode(status)
        last = []
        for stream in (stderr, stdout):
            stream.seek(0)
            last = last or [line for line in stream.read().splitlines() if line.strip()][-1:]
    return Child(wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024, child.returncode,
                 last[0].strip() if last else "")


def run_case(tree: Path, args: list[str], out: Path) -> tuple[float, dict[str, bytes] | str]:
    """(seconds, {relative path: normalized bytes}) of one command in `tree`, or (seconds, its error)."""
    child = run_pie_sim(tree, args, out)
    if child.returncode:
        return child.wall_s, f"exit {child.returncode}: {child.error}"
    return child.wall_s, {str(p.relative_to(out)): normalized(p) for p in sorted(out.rglob("*")) if p.is_file()}


def differences(before: dict[str, bytes] | str, after: dict[str, bytes] | str) -> list[str]:
    """What differs between two cases' outputs: files missing on one side, files whose bytes differ."""
    if isinstance(before, str) or isinstance(after, str):
        return [] if before == after else [f"before: {before if isinstance(before, str) else 'ok'}; "
                                           f"after: {after if isinstance(after, str) else 'ok'}"]
    names = sorted(set(before) | set(after))
    return [f"{name}: {'missing after' if name not in after else 'missing before' if name not in before else 'differs'}"
            for name in names if before.get(name) != after.get(name)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, required=True, help="the other tree (the 'before' files and times)")
    parser.add_argument("--cases", choices=("quick", "all"), default="quick")
    parser.add_argument("--only", help="comma-separated case names (default: every case of --cases)")
    parser.add_argument("--repeats", type=int, default=1, help="runs per tree and case; the fastest is reported")
    args = parser.parse_args()
    after = Path(__file__).resolve().parent.parent
    cases = QUICK if args.cases == "quick" else ALL
    names = args.only.split(",") if args.only else list(cases)
    unknown = [n for n in names if n not in ALL]
    if unknown:
        parser.error(f"unknown case {unknown[0]} (known: {', '.join(ALL)})")
    print("| case | before s | after s | speed-up | same files |")
    print("|---|---:|---:|---:|---|")
    differing = 0
    with tempfile.TemporaryDirectory() as scratch:
        for name in names:
            times = {"before": [], "after": []}
            outputs = {}
            for repeat in range(args.repeats):
                for side, tree in (("before", args.before.resolve()), ("after", after)):
                    out = Path(scratch) / f"{name}-{side}-{repeat}"
                    seconds, files = run_case(tree, ALL[name], out)
                    times[side].append(seconds)
                    outputs.setdefault(side, files)
            diff = differences(outputs["before"], outputs["after"])
            differing += bool(diff)
            b, a = min(times["before"]), min(times["after"])
            print(f"| {name} | {b:.1f} | {a:.1f} | {b / a:.2f}x | {'yes' if not diff else 'NO: ' + '; '.join(diff[:4])} |",
                  flush=True)
    return 1 if differing else 0


if __name__ == "__main__":
    sys.exit(main())
