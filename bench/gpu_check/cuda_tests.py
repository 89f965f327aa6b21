"""Step cuda-tests: the test suite's CUDA-only tests (marked `cuda`: the pinned pool, the clock, each copy
ordering's waits, compute waiting for copies, the copiers' busy times, the device's tokens against the
CPU's, a pipeline over NCCL with two GPUs) run by pytest in a process of its own. Writes cuda_tests.csv
(test, outcome, seconds, message). Without a CUDA device (and on a dry run, which hides any) they are
collected and skipped."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ElementTree
from pathlib import Path

from .context import FAILED, OK, SKIPPED, Context, Result, table, write_rows

REPO = Path(__file__).resolve().parents[2]
TESTS = "tests/test_exec_cuda.py"


def outcomes(report: Path) -> list[dict]:
    """Every test case of a JUnit XML report: (test, outcome, seconds, message)."""
    rows = []
    for case in ElementTree.parse(report).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            found = case.find(tag)
            if found is not None:
                text = found.get("message") or ""
                outcome, message = tag, text.splitlines()[0][:200] if text else ""
                break
        rows.append({"test": case.get("name"), "outcome": outcome, "seconds": float(case.get("time") or 0),
                     "message": message})
    return rows


def step(ctx: Context) -> Result:
    with tempfile.TemporaryDirectory(prefix="pie-gpu-check-") as folder:
        report = Path(folder) / "junit.xml"
        env = dict(os.environ, **({} if ctx.cuda else {"CUDA_VISIBLE_DEVICES": ""}))  # a dry run hides any GPU
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "cuda", TESTS,
                               f"--junitxml={report}"], cwd=REPO, capture_output=True, text=True, env=env)
        print(done.stdout[-20000:], done.stderr[-5000:], sep="\n")  # to log.txt
        if not report.is_file():
            return Result(FAILED, f"pytest exited with {done.returncode} and wrote no report (log.txt)")
        rows = outcomes(report)
    counts = {k: sum(r["outcome"] == k for r in rows) for k in ("passed", "failure", "error", "skipped")}
    lines = table(["test", "outcome", "seconds", "message"],
                  [[r["test"], r["outcome"], f"{r['seconds']:.2f}", r["message"]] for r in rows])
    files = [write_rows(ctx.folder / "cuda_tests.csv", rows)]
    note = ", ".join(f"{n} {k}" for k, n in counts.items() if n)
    if counts["failure"] or counts["error"] or not rows:
        return Result(FAILED, note or "no test collected", lines, files)
    if not counts["passed"]:
        return Result(SKIPPED, f"{note}: no CUDA device" if not ctx.cuda else note, lines, files)
    return Result(OK, note, lines, files)
