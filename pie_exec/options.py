"""The executor's command-line options and what they make (device, dtype, a random model, torch threads),
shared by `pie-exec` and `pie-validate`."""
from __future__ import annotations

import argparse
import dataclasses

import torch

from hwmodels import matching_entry
from pie_serving.options import add_engine_arguments

from .run import InputError
from .weights import model_shape, random_transformer

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
MODEL_HELP = "catalog model, model TOML, Hugging Face config.json or model folder"


def device_dtype(args: argparse.Namespace) -> tuple[torch.device, torch.dtype]:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA device here (see `pie-exec env`)")
    return device, DTYPES[args.dtype or ("float32" if device.type == "cpu" else "float16")]


def catalog_model(name: str, seed: int, dtype: torch.dtype, device: torch.device):
    """A model named as pie-sim names one (catalog name, TOML, config.json, model folder) at `dtype`,
    randomly initialised: (model, spec)."""
    spec, details = model_shape(name)
    spec = dataclasses.replace(spec, dtype_bytes=torch.finfo(dtype).bits // 8)
    return random_transformer(spec, seed, details=details, dtype=dtype, device=device), spec


def device_hardware(device: torch.device) -> str | None:
    """The catalog entry that models `device` (cpu-host for the CPU), or None for a GPU it has none for."""
    if device.type != "cuda":
        return matching_entry("cpu")
    props = torch.cuda.get_device_properties(device)
    return matching_entry("cuda", props.name, props.total_memory)


def set_threads(threads: int | None) -> None:
    """torch's intra-op threads (default: torch's own choice). CPU timings depend on it, so a profile
    records it and validate runs with it."""
    if threads is not None:
        if threads < 1:
            raise InputError(f"--threads must be at least 1, got {threads}")
        torch.set_num_threads(threads)


def add_workload_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--num-requests", type=int, default=16)
    p.add_argument("--rate", type=float, help="re-time arrivals at this rate (req/s; inf: all at once)")
    p.add_argument("--cv", type=float, default=1.0, help="coefficient of variation of re-timed gaps")
    p.add_argument("--gpu-kv-gb", type=float, default=0.25, help="GPU KV pool (with the staging area), GiB")
    p.add_argument("--cpu-kv-gb", type=float, default=1.0, help="CPU KV pool, GiB")
    add_engine_arguments(p)


def add_threads_argument(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument("--threads", type=int, help=f"torch CPU threads (default {default})")




def add_device_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", choices=list(DTYPES), help="default float32 on cpu, float16 on cuda")
