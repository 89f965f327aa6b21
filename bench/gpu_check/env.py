"""Step env: the machine (GPU, link, host, software), the catalog entry the measured figures are compared
with, and how pinning host memory behaves (time, and the size torch's caching host allocator takes for a
request: rounded up to a power of two). Writes env.csv (key, value)."""
from __future__ import annotations

import shutil
import subprocess
import time

from hwmodels import GiB, load_hardware

from .context import OK, Context, Result, table, write_rows

NVIDIA_SMI_FIELDS = ("driver_version", "pcie.link.gen.current", "pcie.link.gen.max", "pcie.link.width.current",
                     "clocks.max.sm", "clocks.max.memory", "power.limit")
PIN_REQUEST = 3 * GiB // 2  # a size that is not a power of two


def nvidia_smi() -> dict:
    """The driver's view of GPU 0 (fields NVIDIA_SMI_FIELDS), {} where nvidia-smi is not installed."""
    if shutil.which("nvidia-smi") is None:
        return {}
    try:
        out = subprocess.run(["nvidia-smi", "-i", "0", f"--query-gpu={','.join(NVIDIA_SMI_FIELDS)}",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as e:
        return {"nvidia-smi": f"failed: {e}"}
    values = [v.strip() for v in out.stdout.strip().split(",")]
    return dict(zip(NVIDIA_SMI_FIELDS, values)) if out.returncode == 0 and len(values) == len(NVIDIA_SMI_FIELDS) \
        else {"nvidia-smi": f"exit {out.returncode}: {out.stderr.strip()[:200]}"}


def pinning() -> dict:
    """Pin PIN_REQUEST bytes: seconds it takes and bytes the caching host allocator takes for it."""
    import torch

    stats = getattr(torch.cuda, "host_memory_stats", None)  # torch 2.5 on

    def allocated():
        return stats().get("allocated_bytes.current") if stats else None
    before, start = allocated(), time.perf_counter()
    pinned = torch.empty(PIN_REQUEST, dtype=torch.uint8, pin_memory=True)
    seconds, after = time.perf_counter() - start, allocated()
    taken = after - before if None not in (before, after) else None
    del pinned
    return {"pin_request_bytes": PIN_REQUEST, "pin_seconds": seconds,
            "pin_allocated_bytes": taken if taken is not None else "no torch.cuda.host_memory_stats"}


def step(ctx: Context) -> Result:
    facts = dict(ctx.machine)
    hw = load_hardware(ctx.hw)
    facts.update({"hardware_entry": ctx.hw, "hardware_description": hw.description,
                  "entry_h2d_gb_s": hw.link.h2d_bandwidth / 1e9, "entry_d2h_gb_s": hw.link.d2h_bandwidth / 1e9,
                  "entry_bidirectional_gb_s": hw.link.bidirectional_bandwidth / 1e9,
                  "entry_latency_us": hw.link.transfer_latency * 1e6, "entry_hbm_gb_s": hw.gpu.hbm_bandwidth / 1e9})
    if ctx.cuda:
        facts.update(nvidia_smi())
        facts.update(pinning())
    files = [write_rows(ctx.folder / "env.csv", [{"key": k, "value": v} for k, v in facts.items()])]
    rows = [[k, _shown(k, v)] for k, v in facts.items()]
    notes = []
    if "GH200" in str(facts.get("gpu_name", "")):
        notes.append("Grace Hopper: the link is NVLink-C2C; see the GH200 notes in bench/gpu_check/README.md.")
    if not facts.get("simpy"):
        notes.append("SimPy is not importable: validate cannot simulate (carry it: bench/gpu_check/README.md).")
    return Result(OK, "; ".join(notes), table(["fact", "value"], rows) + ([""] + notes if notes else []), files)


def _shown(key: str, value) -> str:
    if isinstance(value, int) and key.endswith("_bytes") and value >= GiB:
        return f"{value / GiB:.2f} GiB"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
