"""What the executor's allocations need against the memory this machine has, checked before anything is
allocated: the weights before the model is built, then the KV pools before the policy's block tables are
made (a pool of 10^9 blocks would take minutes to list before its tensor failed). A refusal names the
option to change."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from hwmodels import GiB, ModelSpec
from pie_policy import Policy

from .run import InputError


def host_available() -> int:
    """Bytes of host memory a new allocation can take without swapping (Linux's MemAvailable)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def available(device: torch.device) -> int:
    """Free bytes where `device`'s tensors live: the GPU's free memory, or the host's."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return host_available()


@dataclass(frozen=True)
class Need:
    what: str     # "the weights of opt-13b at float32"
    advice: str   # what to change: "lower --gpu-kv-gb"
    nbytes: int
    device: str   # "cpu" or "cuda"


def check_memory(needs: list[Need], device: torch.device) -> None:
    """`check_fits` against what the host and `device` have free now."""
    kinds = {n.device for n in needs}
    check_fits(needs, {kind: available(device if kind == device.type else torch.device(kind)) for kind in kinds})


def check_fits(needs: list[Need], free: dict[str, int]) -> None:
    """Refuse when the needs placed on a device exceed its free bytes (`free`, by device type), naming the
    largest need's option first."""
    for device, free_bytes in free.items():
        here = sorted((n for n in needs if n.device == device), key=lambda n: -n.nbytes)
        total = sum(n.nbytes for n in here)
        if total > free_bytes:
            parts = " + ".join(f"{n.what} ({n.nbytes / GiB:.2f} GiB)" for n in here)
            where = "host memory" if device == "cpu" else "free GPU memory"
            advice = "; or ".join(dict.fromkeys(n.advice for n in here if n.nbytes))
            together = f" = {total / GiB:.2f} GiB" if len(here) > 1 else ""
            raise InputError(f"{parts}{together}: more than the {free_bytes / GiB:.2f} GiB of {where} available "
                             f"now; {advice}")


def weights_need(spec: ModelSpec, dtype_name: str, option: str, device: str) -> Need:
    return Need(f"the weights of {spec.name} at {dtype_name}", f"choose a smaller {option} or a narrower --dtype",
                spec.weight_bytes, device)


def pool_needs(policy: Policy, device: str) -> list[Need]:
    """`policy`'s GPU pool with its staging slots (on `device`) and its CPU pool (on the host)."""
    config, block_layer = policy.config, policy.config.block_bytes_layer
    gpu = (config.num_layers * config.num_gpu_blocks + policy.staging_slots * config.num_cpu_blocks) * block_layer
    return [Need("the GPU KV pool", "lower --gpu-kv-gb", gpu, device),
            Need("the CPU KV pool", "lower --cpu-kv-gb", config.num_layers * config.num_cpu_blocks * block_layer,
                 "cpu")]


def check_pool_options(gpu_kv_gb: float, cpu_kv_gb: float, device: torch.device) -> None:
    """Each pool option alone within the memory its pool lives in: a policy may use less of a pool than
    asked (pie and static take the CPU blocks their share needs) but never more, and pie-sim likewise
    refuses more CPU memory than the host has."""
    check_memory([Need(f"--gpu-kv-gb {gpu_kv_gb:g}", "lower --gpu-kv-gb", int(gpu_kv_gb * GiB), device.type)], device)
    check_memory([Need(f"--cpu-kv-gb {cpu_kv_gb:g}", "lower --cpu-kv-gb", int(cpu_kv_gb * GiB), "cpu")], device)
