"""`pie-exec`: the executor's command line."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

try:
    import torch
except ModuleNotFoundError:  # the simulator installs without it
    raise SystemExit("pie-exec: error: the executor needs PyTorch: bash scripts/install.sh exec "
                     "(or pip install 'pie[exec]')") from None
from rich.console import Console

from hwmodels import CatalogError, CostModel, GiB, ModelSpec, hardware_names, load_hardware, load_model
from pie_policy import ConfigError
from pie_policy.registry import EXEC, entry, names
from pie_policy.sizing import engine_policy
from pie_serving.benchmark import request_rate
from pie_serving.options import (
    Parser,
    add_force_argument,
    add_metric_arguments,
    check_cv,
    engine_settings,
    metric_settings,
    positive_int,
    run_cli,
)
from pie_serving.outputs import OutputError, check_folder, output_folder
from pie_serving.slo import SloError
from traces import TraceError, load_workload

from .calibrate import add_grid_arguments, calibrate, grid_from
from .engine import Executor
from .memory import check_memory, check_pool_options, pool_needs, weights_need
from .options import (
    DEFAULT_REQUESTS,
    MODEL_HELP,
    add_device_arguments,
    add_threads_argument,
    add_workload_arguments,
    catalog_model,
    catalog_spec,
    device_dtype,
    device_hardware,
    gpu_pool_bytes,
    set_threads,
)
from .pipeline import serve
from .run import InputError, mean_context, read_prompts, run, trace_prompts, write_outputs
from .weights import ModelFolderError, load_hf_folder, read_hf_spec


def cmd_env(args: argparse.Namespace, console: Console) -> None:
    """What this machine offers the executor, and the catalog entry to simulate it with."""
    console.print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        console.print(f"cuda {torch.version.cuda}: {torch.cuda.device_count()} x {props.name}, "
                      f"{props.total_memory / GiB:.1f} GiB, pinned host memory available")
        modelled = device_hardware(torch.device("cuda", 0))
        console.print(f"simulate with: {modelled} (`pie-exec run --device cuda`'s default --hw; or a profile from "
                      f"`pie-exec calibrate`)" if modelled else "simulate with: no catalog entry models this GPU; "
                      "one of " + ", ".join(n for n in hardware_names() if n != "cpu-host") + " or a profile "
                      "from `pie-exec calibrate` (pass it as --hw)")
    else:
        hw = load_hardware("cpu-host")
        console.print("cuda: not available; the executor runs on the CPU (copy thread instead of copy engines)")
        console.print(f"simulate with: cpu-host ({hw.description})")


EXEC_FILES = ("requests.csv", "iterations.csv", "tokens.jsonl", "benchmark.json", "summary.json")  # summary.json last: the run is whole


def _model_spec(args: argparse.Namespace, dtype: torch.dtype) -> ModelSpec:
    """The model to run, read without building it (the weights are checked against memory first)."""
    if args.model_path:
        return read_hf_spec(Path(args.model_path), dtype)
    return catalog_spec(args.model, dtype)


def _check_workload_options(args: argparse.Namespace) -> None:
    """The rules that span options: --prompts arrive at once, so the trace's options would be ignored."""
    if args.prompts:
        given = [o for o, v in (("--num-requests", args.num_requests), ("--rate", args.rate), ("--cv", args.cv))
                 if v is not None]
        if given:
            raise InputError(f"{given[0]} shapes a trace's requests; --prompts arrive at once as the file gives them")
    args.cv = check_cv(args)
    args.num_requests = args.num_requests or DEFAULT_REQUESTS


def cmd_run(args: argparse.Namespace, console: Console) -> None:
    _check_workload_options(args)
    entry(args.policy, EXEC)
    check_folder(Path(args.out), args.force)
    set_threads(args.threads)
    percentiles, slos = metric_settings(args)
    device, dtype = device_dtype(args)
    dtype_name = str(dtype).removeprefix("torch.")
    stages = args.pipeline_stages
    build_on = device if stages == 1 else torch.device("cpu")  # a pipeline's ranks move their parts to their GPUs
    spec = _model_spec(args, dtype)
    weights = weights_need(spec, dtype_name, "--model-path" if args.model_path else "--model", build_on.type)
    check_memory([weights], build_on)
    check_pool_options(args.gpu_kv_gb, args.cpu_kv_gb, device)
    if args.prompts:
        prompts = read_prompts(Path(args.prompts), spec.vocab_size, spec.max_context)
    else:
        workload = load_workload(args.trace, args.num_requests, rate=args.rate, cv=args.cv, seed=args.seed,
                                 max_total_tokens=spec.max_context + 1)
        prompts = trace_prompts(workload, spec.vocab_size, args.seed)
    hw = args.hw or device_hardware(device)
    if hw is None:
        raise InputError(f"--hw: no catalog entry models {torch.cuda.get_device_name(device)}; name one or a "
                         f"profile from `pie-exec calibrate` (see `pie-exec env`)")
    policy = engine_policy(args.policy, CostModel(load_hardware(hw), spec), gpu_pool_bytes(spec, args),
                           context=mean_context(prompts), cpu_mem_bytes=int(args.cpu_kv_gb * GiB), share=args.share,
                           **engine_settings(args))
    check_memory([weights, *pool_needs(policy, device.type)], device)
    with output_folder(args.out, EXEC_FILES, args.force, last=EXEC_FILES[-1]) as out:
        if args.model_path:
            model, _, _ = load_hf_folder(Path(args.model_path), dtype=dtype, device=build_on)
        else:
            model, _ = catalog_model(args.model, args.seed, dtype, build_on)
        model.eval()
        if stages == 1:
            executor = Executor(model, policy.config, device, policy.staging_slots)
            try:
                requests, generated, recorder, wall = run(executor, policy, prompts, progress=console.is_terminal)
            finally:
                executor.close()
        else:
            requests, generated, recorder, wall = serve(model, policy, prompts, stages, device.type, args.threads,
                                                        progress=console.is_terminal)
        summary = recorder.summary(requests, wall, backend="exec", policy=args.policy, hw=hw,
                                   model=spec.name, trace=args.prompts or args.trace,
                                   rate=None if args.prompts else args.rate, seed=args.seed, device=str(device),
                                   dtype=dtype_name, pipeline_stages=stages)
        benchmark = recorder.benchmark(requests, percentiles, slos, backend="pie-exec", model_id=spec.name,
                                       policy=args.policy, num_prompts=len(requests),
                                       request_rate=None if args.prompts else request_rate(args.rate),
                                       burstiness=1 / args.cv**2, seed=args.seed)
        write_outputs(out, prompts, requests, generated, recorder, summary, benchmark)
    console.print(f"{len(requests)} requests, {summary['throughput_tok_s']:.1f} output tok/s, "
                  f"mean e2e {summary['e2e_mean_s']:.3f} s, stall {summary['total_stall_s']:.3f} s; wrote {args.out}")


def cmd_calibrate(args: argparse.Namespace, console: Console) -> None:
    set_threads(args.threads)
    device, dtype = device_dtype(args)
    base = args.base or ("cpu-host" if device.type == "cpu" else None)
    if base is None:
        raise InputError("--device cuda: name the catalog entry whose memory and roofline the profile keeps, "
                         f"--base (one of {', '.join(hardware_names())})")
    load_hardware(base)  # refused here, before minutes of timing
    out = Path(args.out)
    if out.suffix != ".toml":
        raise InputError(f"--out {out}: a profile is a .toml file")
    grid = grid_from(args)
    try:
        grid.batches_of(load_model(args.model).max_context)
    except ValueError as e:
        raise InputError(str(e)) from None
    dtype_name = str(dtype).removeprefix("torch.")
    check_memory([weights_need(catalog_spec(args.model, dtype), dtype_name, "--model", device.type)], device)
    model, spec = catalog_model(args.model, 0, dtype, device)
    calibrate(model.eval(), spec, device, grid, base, out, dtype_name, console, args.force)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="pie-exec", description="Pie's PyTorch executor.")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("env", help="show the devices the executor can use").set_defaults(run=cmd_env)
    p = commands.add_parser("run", help="serve a workload through a policy and measure it")
    model = p.add_mutually_exclusive_group()
    model.add_argument("--model", default="opt-125m", help=f"{MODEL_HELP}, randomly initialised with --seed "
                       f"(default opt-125m)")
    model.add_argument("--model-path", help="a local Hugging Face folder (config.json + *.safetensors): its weights")
    add_device_arguments(p)
    p.add_argument("--policy", default="pie", choices=names(backend=EXEC), help="the serving policy")
    work = p.add_mutually_exclusive_group()
    work.add_argument("--trace", default="azure-conv", help="trace name or file, as pie-sim reads it (random prompt ids)")
    work.add_argument("--prompts", help="JSONL: {\"id\", \"prompt_token_ids\", \"max_new_tokens\"} per line, "
                                        "every one arriving at 0; ids must differ")
    add_workload_arguments(p)
    add_threads_argument(p, "torch's; with --pipeline-stages, a stage's, default the cores shared out")
    p.add_argument("--hw", help="hardware entry or profile TOML whose link and compute figures size pie and static "
                                "as pie-sim does (default: the entry that models --device, see `pie-exec env`: "
                                "cpu-host on cpu)")
    p.add_argument("--pipeline-stages", type=positive_int, default=1,
                   help="split the layers over this many processes (one GPU each on cuda; gloo on cpu)")
    add_metric_arguments(p)
    p.add_argument("--out", required=True, help="folder for requests.csv, iterations.csv, summary.json, "
                                                "benchmark.json, tokens.jsonl")
    add_force_argument(p)
    p.set_defaults(run=cmd_run)
    p = commands.add_parser("calibrate", help="time this machine and write a hardware profile for pie-sim --hw")
    add_device_arguments(p)
    p.add_argument("--model", default="opt-125m", help=f"{MODEL_HELP} (default opt-125m)")
    p.add_argument("--base", help="hardware entry whose memory and roofline figures the profile keeps "
                                  "(default cpu-host on cpu)")
    add_grid_arguments(p)
    add_threads_argument(p, "torch's; recorded in the profile")
    p.add_argument("--out", required=True, help="the profile (.toml); its points go to the same name .csv, the "
                                                "model TOML beside them")
    add_force_argument(p)
    p.set_defaults(run=cmd_calibrate)
    return parser


USER_ERRORS = (CatalogError, TraceError, ConfigError, ModelFolderError, InputError, OutputError, SloError)


def main(argv: list[str] | None = None) -> int:
    return run_cli(build_parser(), argv, USER_ERRORS)


if __name__ == "__main__":
    sys.exit(main())
