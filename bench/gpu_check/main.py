"""`python -m bench.gpu_check`: refuses what cannot run (before writing anything), then runs the steps one
process each within the time budget, and writes summary.md."""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from hwmodels import CatalogError, GiB, hardware_names, load_hardware, matching_entry

from .context import ERROR, OK, SKIPPED, TIMEOUT, Context, Result
from .probe import facts
from .serving import pool_bytes
from .sizing import DEFAULT_MODELS, DEPTHS, background_blocks, decode_batch, model_at, overlap_needs, serving_needs
from .steps import BY_NAME, STEPS
from .summary import Ran, render, started_now

PROG = "python -m bench.gpu_check"
REPO = Path(__file__).resolve().parents[2]
NOT_RUN = "NOT RUN"  # a step the budget left no time for
LIMIT_FACTOR = 3     # a step may take this many times its estimate on a GPU (within the budget)


class Refusal(Exception):
    """Input the check cannot run with: one line, exit status 2, nothing written."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Pie's GPU check: tokens, link, overlap, calibrate and "
                                "validate on one GPU, in one summary (bench/gpu_check/README.md).")
    p.add_argument("--out", required=True, help="folder for summary.md and the step files; must not exist or be empty")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                   help="cuda: the check; cpu: a dry run on tiny sizes (default cuda)")
    p.add_argument("--quick", action="store_true", help="fewer dtypes, sizes, shares, rounds and requests")
    p.add_argument("--model", help="the overlap step's model (default opt-6.7b on cuda, a tiny OPT on cpu)")
    p.add_argument("--serving-model", help="calibrate's and validate's model (default opt-1.3b on cuda, the tiny "
                   "OPT on cpu)")
    p.add_argument("--hw", help="hardware entry the figures are compared with (default: the one the GPU's name "
                   "matches; cpu-host on cpu)")
    p.add_argument("--steps", default=",".join(s.name for s in STEPS),
                   help="the steps to run, always in this order (default all: %(default)s)")
    p.add_argument("--budget-s", type=float, default=480.0, help="time for all the steps, seconds (default 480)")
    return p


def check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise Refusal(f"--out {out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        raise Refusal(f"--out {out}: exists and is not empty (the check writes a fresh folder)")


def probe(device: str) -> dict:
    """probe.py's facts: for a GPU from a process of its own."""
    if device == "cpu":
        return facts("cpu")
    done = subprocess.run([sys.executable, "-m", f"{__package__}.probe", device], cwd=REPO, capture_output=True,
                          text=True, env=child_env())
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise Refusal(f"cannot start Python with torch here: {last}")
    return json.loads(done.stdout)


def child_env(device: str = "cuda") -> dict:
    """The environment of the steps' processes: this tree first on the path; on the CPU one torch thread
    (tiny work: one thread beats two waiting on each other; calibrate records it, validate keeps it)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    if device == "cpu":
        env["OMP_NUM_THREADS"] = "1"
    return env


def resolve(args: argparse.Namespace, machine: dict) -> Context:
    """The context the steps run in, or a Refusal naming the option."""
    if args.device == "cuda" and not machine["cuda_available"]:
        raise Refusal(f"--device cuda: no CUDA device here (torch {machine['torch']}, built for CUDA "
                      f"{machine['torch_cuda']}); --device cpu runs the dry run")
    model, serving = (given or default for given, default in zip((args.model, args.serving_model),
                                                                  DEFAULT_MODELS[args.device]))
    hw = args.hw or matching_entry(args.device, machine.get("gpu_name", ""), machine.get("gpu_memory_bytes", 0))
    if hw is None:
        raise Refusal(f"--hw: no hardware entry matches the GPU '{machine.get('gpu_name')}'; name one "
                      f"({', '.join(hardware_names())}) or a hardware TOML")
    for option, load in (("--hw", lambda: load_hardware(hw)), ("--model", lambda: model_at(model, args.device)),
                         ("--serving-model", lambda: model_at(serving, args.device))):
        try:
            load()
        except CatalogError as e:
            raise Refusal(f"{option}: {e}") from None
    return Context(str(args.out), args.device, args.quick, model, serving, hw, machine)


def check_fits(ctx: Context, steps: list[str]) -> None:
    """Refuse a model that cannot fit, from the catalogs' sizes, before anything is allocated."""
    m = ctx.machine
    device_free = m["gpu_free_bytes"] if ctx.cuda else m["host_available_bytes"]
    where = f"{m['gpu_name']} has {device_free / GiB:.1f} GiB free" if ctx.cuda else \
        f"this host has {device_free / GiB:.1f} GiB available"
    wanted = []
    if "overlap" in steps:
        spec, shape = model_at(ctx.model, ctx.device), decode_batch(ctx.device)
        if spec.num_layers <= max(DEPTHS) or shape.context >= spec.max_context:
            raise Refusal(f"--model {ctx.model}: the overlap step prefetches up to {max(DEPTHS)} layers ahead over "
                          f"{shape.context}-token contexts; it has {spec.num_layers} layers and a context of "
                          f"{spec.max_context}")
        wanted.append(("--model", ctx.model, "the overlap step",
                       overlap_needs(spec, shape, background_blocks(spec, shape, ctx.device))))
    if {"calibrate", "validate"} & set(steps):
        wanted.append(("--serving-model", ctx.serving_model, "calibrate and validate",
                       serving_needs(model_at(ctx.serving_model, ctx.device), *pool_bytes(ctx))))
    for option, name, what, needs in wanted:
        on_device = needs.device if ctx.cuda else needs.device + needs.pinned
        if on_device > device_free:
            raise Refusal(f"{option} {name}: {what} would take {on_device / GiB:.1f} GiB ({needs.describe()} GiB"
                          f"{'' if ctx.cuda else ', CPU pool ' + format(needs.pinned / GiB, '.1f')}); {where}")
        if ctx.cuda and needs.pinned > m["host_available_bytes"]:
            raise Refusal(f"{option} {name}: {what} would pin {needs.pinned / GiB:.1f} GiB of host memory; this "
                          f"host has {m['host_available_bytes'] / GiB:.1f} GiB available")


def run_step(name: str, ctx: Context, limit_s: float, log: Path, results: Path) -> Result:
    """One step in a process of its own (its output appended to `log`), stopped after `limit_s`."""
    result_file = results / f"{name}.json"
    with open(log, "a") as f:
        f.write(f"\n===== {name} (limit {limit_s:.0f} s) =====\n")
        f.flush()
        child = subprocess.Popen([sys.executable, "-m", f"{__package__}.steps", name, str(result_file),
                                  ctx.to_json()], cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=child_env(ctx.device),
                                 start_new_session=True)
        try:
            code = child.wait(timeout=limit_s)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)  # the step's own children too (pytest, pipeline ranks)
            child.wait()
            return Result(TIMEOUT, f"stopped after {limit_s:.0f} s")
    if not result_file.is_file():
        return Result(ERROR, f"its process exited with {code} and no result (killed? see log.txt)")
    return Result(**json.loads(result_file.read_text()))


def step_limit(estimate: float, left: float, later: float) -> float:
    """A step's time limit on a GPU: up to LIMIT_FACTOR times its estimate while that leaves the later
    steps their estimates, never less than its estimate, never more than the budget left."""
    return min(left, max(estimate, min(LIMIT_FACTOR * estimate, left - later)))


def run_all(ctx: Context, steps: list[str], budget_s: float) -> tuple[list[Ran], float]:
    out, log = ctx.folder, ctx.folder / "log.txt"
    started, ran = time.perf_counter(), []
    with tempfile.TemporaryDirectory(prefix="pie-gpu-check-") as results:
        for i, name in enumerate(steps):
            step = BY_NAME[name]
            left = budget_s - (time.perf_counter() - started)
            limit = step_limit(step.estimate_s, left, sum(BY_NAME[n].estimate_s for n in steps[i + 1:])) \
                if ctx.cuda else left
            need = next((r for r in ran if r.step.name == step.needs), None)
            begin = time.perf_counter()
            if need is not None and need.result.status != OK:
                result = Result(SKIPPED, f"needs {step.needs}, which did not succeed")
            elif left < (step.estimate_s if ctx.cuda else 1):
                result = Result(NOT_RUN, f"{left:.0f} s of the budget left, expected {step.estimate_s} s")
            else:
                print(f"{name} ...", flush=True)
                result = run_step(name, ctx, limit, log, Path(results))
            ran.append(Ran(step, result, time.perf_counter() - begin, max(0.0, limit)))
            print(f"{name}: {result.status} {result.note}", flush=True)
    (out / "log.txt").touch()
    return ran, time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command = " ".join([PROG, *(sys.argv[1:] if argv is None else argv)])
    try:
        out = Path(args.out)
        check_out(out)
        steps = [s.strip() for s in args.steps.split(",") if s.strip()]
        unknown = [s for s in steps if s not in BY_NAME]
        if unknown or not steps:
            raise Refusal(f"--steps: unknown step '{unknown[0] if unknown else ''}' (steps: "
                          f"{', '.join(BY_NAME)})")
        if not args.budget_s > 0:
            raise Refusal(f"--budget-s must be positive, got {args.budget_s}")
        ctx = resolve(args, probe(args.device))
        check_fits(ctx, steps)
    except Refusal as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    started = started_now()
    out.mkdir(parents=True, exist_ok=True)
    ran, total = run_all(ctx, [s.name for s in STEPS if s.name in steps], args.budget_s)
    (out / "summary.md").write_text(render(ctx, command, ran, total, args.budget_s, started))
    print(f"wrote {out / 'summary.md'} ({total:.0f} s)")
    return 0 if all(r.result.status in (OK, SKIPPED) for r in ran) else 1
