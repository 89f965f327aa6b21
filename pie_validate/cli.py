"""`pie-validate`: the executor and the simulator on the same requests, compared (validate.py)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console

from hwmodels import CostModel, GiB, load_hardware
from pie_exec.cli import USER_ERRORS
from pie_exec.memory import check_memory, check_pool_options, pool_needs, weights_need
from pie_exec.options import (
    DEFAULT_REQUESTS,
    MODEL_HELP,
    add_device_arguments,
    add_threads_argument,
    add_workload_arguments,
    catalog_model,
    catalog_spec,
    device_dtype,
    gpu_pool_bytes,
    set_threads,
)
from pie_exec.run import InputError, trace_prompts
from pie_policy.registry import EXEC, entry, names
from pie_serving.options import Parser, add_force_argument, check_cv, engine_settings, name_list, positive_int, run_cli
from pie_serving.outputs import check_folder, output_folder
from traces import load_workload

from .validate import policy_maker, report, validate

OUTPUTS = ("validate.png", "validate.csv")


def cmd_validate(args: argparse.Namespace, console: Console) -> None:
    device, dtype = device_dtype(args)
    hw = load_hardware(args.profile)
    calibrated = hw.fit.threads if hw.fit else None  # a catalog entry has no thread count
    if None not in (args.threads, calibrated) and args.threads != calibrated:
        raise InputError(f"--threads {args.threads}: the profile was calibrated with {calibrated} threads, and "
                         f"times depend on it; validate with its count (the default) or calibrate again")
    set_threads(calibrated if args.threads is None else args.threads)
    for name in args.policies:
        entry(name, EXEC)
    check_folder(Path(args.out), args.force)
    cv = check_cv(args)
    spec = catalog_spec(args.model, dtype)
    cost_model = CostModel(hw, spec)  # refuses a profile calibrated for another model before anything runs
    weights = weights_need(spec, str(dtype).removeprefix("torch."), "--model", device.type)
    check_pool_options(args.gpu_kv_gb, args.cpu_kv_gb, device)
    workload = load_workload(args.trace, args.num_requests or DEFAULT_REQUESTS, rate=args.rate, cv=cv, seed=args.seed,
                             max_total_tokens=spec.max_context + 1)
    prompts = trace_prompts(workload, spec.vocab_size, args.seed)
    kv_pool_bytes, cpu_mem_bytes = gpu_pool_bytes(spec, args), int(args.cpu_kv_gb * GiB)
    for name in args.policies:  # one policy's pools at a time, each beside the weights
        policy = policy_maker(name, cost_model, prompts, kv_pool_bytes, cpu_mem_bytes, args.share,
                              engine_settings(args))()
        check_memory([weights, *pool_needs(policy, device.type)], device)
    model, _ = catalog_model(args.model, args.seed, dtype, device)
    with output_folder(args.out, OUTPUTS, args.force, last=OUTPUTS[-1]) as out:
        comparisons = validate(args.policies, model.eval(), spec, device, hw, prompts, kv_pool_bytes, cpu_mem_bytes,
                               args.share, engine_settings(args), args.rounds, console.is_terminal)
        report(comparisons, out, console)
    console.print(f"wrote {args.out}/validate.csv and validate.png")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="pie-validate", description="Run the executor and the simulator on the same requests and "
                                                "compare them.")
    p.add_argument("--profile", required=True, help="hardware profile from `pie-exec calibrate` on this machine")
    p.add_argument("--model", default="opt-125m", help=f"{MODEL_HELP}: the profile's (default opt-125m)")
    add_device_arguments(p)
    p.add_argument("--trace", default="azure-conv", help="trace name or file, as pie-sim reads it (random prompt ids)")
    p.add_argument("--policies", type=name_list, default="vllm,static,pie",
                   help="comma-separated: " + ", ".join(names(backend=EXEC)))
    p.add_argument("--rounds", type=positive_int, default=1, help="serve every policy this many times, in turn, and "
                   "compare the medians (a machine whose speed drifts then moves every policy alike)")
    add_workload_arguments(p)
    add_threads_argument(p, "the profile's; another count is refused")
    p.add_argument("--out", required=True, help="folder for validate.csv and validate.png")
    add_force_argument(p)
    return p


def main(argv: list[str] | None = None) -> int:
    return run_cli(build_parser(), argv, USER_ERRORS, cmd_validate)


if __name__ == "__main__":
    sys.exit(main())
