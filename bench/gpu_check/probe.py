"""Facts about this machine that the check decides on before it writes anything: the GPU (name, memory
free), the host's memory, the software. For a GPU, run in a process of its own (`python -m
bench.gpu_check.probe cuda`, printing JSON), so that the command itself never holds a CUDA context the
steps would lose memory to; for the CPU, without importing torch at all."""
from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import platform
import sys


def host_memory() -> tuple[int, int]:
    """(total, available) bytes of host memory: /proc/meminfo where there is one."""
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
        return info["MemTotal"], info.get("MemAvailable", info["MemFree"])
    except (OSError, KeyError, ValueError, IndexError):
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        return pages, pages


def version(package: str) -> str | None:
    """The package's version; None when it cannot be imported (carried as source: "importable")."""
    if importlib.util.find_spec(package) is None:
        return None
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "importable"


def facts(device: str) -> dict:
    """What the check needs to know; torch is imported, and CUDA queried, only for `device` "cuda"."""
    total, available = host_memory()
    out = {"python": platform.python_version(), "machine": platform.machine(), "torch": version("torch"),
           "torch_cuda": None, "cuda_available": False,
           "host_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
           "host_memory_bytes": total, "host_available_bytes": available, "page_size_bytes": os.sysconf("SC_PAGE_SIZE"),
           "simpy": version("simpy"), "transformers": version("transformers")}
    if device != "cuda":
        return out
    import torch

    out.update(torch=torch.__version__, torch_cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
    if out["cuda_available"]:
        props = torch.cuda.get_device_properties(0)
        free, device_total = torch.cuda.mem_get_info(0)
        out.update(gpu_name=props.name, gpu_count=torch.cuda.device_count(), gpu_memory_bytes=device_total,
                   gpu_free_bytes=free, gpu_capability=f"{props.major}.{props.minor}",
                   gpu_multiprocessors=props.multi_processor_count)
    return out


if __name__ == "__main__":
    print(json.dumps(facts(sys.argv[1])))
