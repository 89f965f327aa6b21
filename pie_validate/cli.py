"""`pie-validate`: the executor and the simulator on the same requests, compared (validate.py)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console

from hwmodels import CostModel, GiB, load_hardware
from pie_exec.cli import USER_ERRORS
from pie_exec.options import (MODEL_HELP, add_device_arguments, add_threads_argument, add_workload_arguments, catalog_model,
                              device_dtype, set_threads)
from pie_exec.run import InputError, trace_prompts
from pie_policy import POLICIES
from pie_serving.options import engine_settings, run_command
from traces import load_workload

from .validate import report, validate


def cmd_validate(args: argparse.Namespace, console: Console) -> None:
    device, dtype = device_dtype(args)
    hw = load_hardware(args.profile)
    calibrated = hw.fit.threads if hw.fit else None  # a catalog entry has no thread count
    if None not in (args.threads, calibrated) and args.threads != calibrated:
        raise InputError(f"--threads {args.threads}: the profile was calibrated with {calibrated} threads, and "
                         f"times depend on it; validate with its count (the default) or calibrate again")
    set_threads(calibrated if args.threads is None else args.threads)
    names = [n.strip() for n in args.policies.split(",") if n.strip()]
    unknown = [n for n in names if n not in POLICIES]
    if unknown or not names:
        raise InputError(f"--policies: unknown policy '{unknown[0] if unknown else ''}' (known: {', '.join(POLICIES)})")
    if args.rounds < 1:
        raise InputError(f"--rounds must be at least 1, got {args.rounds}")
    model, spec = catalog_model(args.model, args.seed, dtype, device)
    CostModel(hw, spec)  # refuses a profile calibrated for another model before anything runs
    workload = load_workload(args.trace, args.num_requests, rate=args.rate, cv=args.cv, seed=args.seed,
                             max_total_tokens=spec.max_context + 1)
    prompts = trace_prompts(workload, spec.vocab_size, args.seed)
    comparisons = validate(names, model.eval(), spec, device, hw, prompts, int(args.gpu_kv_gb * GiB),
                           int(args.cpu_kv_gb * GiB), args.share, engine_settings(args), args.rounds,
                           console.is_terminal)
    report(comparisons, Path(args.out), console)
    console.print(f"wrote {args.out}/validate.csv and validate.png")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pie-validate", description="Run the executor and the simulator on the same "
                                "requests and compare them.")
    p.add_argument("--profile", required=True, help="hardware profile from `pie-exec calibrate` on this machine")
    p.add_argument("--model", default="opt-125m", help=f"{MODEL_HELP}: the profile's (default opt-125m)")
    add_device_arguments(p)
    p.add_argument("--trace", default="azure-conv", help="trace name or file, as pie-sim reads it (random prompt ids)")
    p.add_argument("--policies", default="vllm,static,pie", help=", ".join(POLICIES))
    p.add_argument("--rounds", type=int, default=1, help="serve every policy this many times, in turn, and "
                   "compare the medians (a machine whose speed drifts then moves every policy alike)")
    add_workload_arguments(p)
    add_threads_argument(p, "the profile's; another count is refused")
    p.add_argument("--out", required=True, help="folder for validate.csv and validate.png")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command("pie-validate", lambda console: cmd_validate(args, console), USER_ERRORS)


if __name__ == "__main__":
    sys.exit(main())
