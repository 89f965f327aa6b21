"""The executor's command-line options and what they make (device, dtype, a random model, torch threads),
shared by `pie-exec` and `pie-validate`."""
from __future__ import annotations

import argparse
import dataclasses

import torch

from hwmodels import GiB, ModelSpec, matching_entry
from pie_serving.options import CV_HELP, add_engine_arguments, non_negative_float, positive_float, positive_int, rate

from .run import InputError
from .weights import model_shape, random_transformer

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
MODEL_HELP = "catalog model, model TOML, Hugging Face config.json or model folder"
DEFAULT_REQUESTS = 16


def device_dtype(args: argparse.Namespace) -> tuple[torch.device, torch.dtype]:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA device here (see `pie-exec env`)")
    return device, DTYPES[args.dtype or ("float32" if device.type == "cpu" else "float16")]


def _at_dtype(spec: ModelSpec, dtype: torch.dtype) -> ModelSpec:
    return dataclasses.replace(spec, dtype_bytes=torch.finfo(dtype).bits // 8)


def catalog_spec(name: str, dtype: torch.dtype) -> ModelSpec:
    """A model named as pie-sim names one (catalog name, TOML, config.json, model folder) at `dtype`, read
    without building it."""
    return _at_dtype(model_shape(name)[0], dtype)


def catalog_model(name: str, seed: int, dtype: torch.dtype, device: torch.device):
    """A model named as pie-sim names one at `dtype`, randomly initialised: (model, spec)."""
    spec, details = model_shape(name)
    spec = _at_dtype(spec, dtype)
    return random_transformer(spec, seed, details=details, dtype=dtype, device=device), spec


def device_hardware(device: torch.device) -> str | None:
    """The catalog entry that models `device` (cpu-host for the CPU), or None for a GPU it has none for."""
    if device.type != "cuda":
        return matching_entry("cpu")
    props = torch.cuda.get_device_properties(device)
    return matching_entry("cuda", props.name, props.total_memory)


def gpu_pool_bytes(spec: ModelSpec, args: argparse.Namespace) -> int:
    """The GPU KV pool `--gpu-kv-gb` asks for, refused when it holds no block."""
    pool, block = int(args.gpu_kv_gb * GiB), args.block_size * spec.kv_bytes_per_token
    if pool < block:
        raise InputError(f"--gpu-kv-gb {args.gpu_kv_gb:g} holds no KV block ({block:,} bytes: {args.block_size} "
                         f"tokens of {spec.name}'s {spec.num_layers} layers); raise --gpu-kv-gb")
    return pool


def set_threads(threads: int | None) -> None:
    """torch's intra-op threads (default: torch's own choice). CPU timings depend on it, so a profile
    records it and validate runs with it."""
    if threads is not None:
        torch.set_num_threads(threads)


def add_workload_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--num-requests", type=positive_int, help=f"requests to take from the trace (default "
                                                             f"{DEFAULT_REQUESTS})")
    p.add_argument("--rate", type=rate, help="re-time the trace's arrivals as Poisson at this rate (req/s; inf: "
                                             "all at once; default: the trace's own times)")
    p.add_argument("--cv", type=positive_float, help=CV_HELP + "; needs --rate (default 1)")
    p.add_argument("--gpu-kv-gb", type=positive_float, default=0.25,
                   help="GPU KV pool (with the staging area), GiB")
    p.add_argument("--cpu-kv-gb", type=non_negative_float, default=1.0, help="CPU KV pool, GiB")
    add_engine_arguments(p)


def add_threads_argument(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument("--threads", type=positive_int, help=f"torch CPU threads (default {default})")


def add_device_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the model computes")
    p.add_argument("--dtype", choices=list(DTYPES), help="weights and KV (default float32 on cpu, float16 on cuda)")
