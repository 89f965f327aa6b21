"""Hardware catalog: one TOML file per system in `catalog/hardware/`, sources cited in its comments."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .profile import ComputeFit
from .spec import names, parse, quantity, read_toml, resolve, section, text

HARDWARE_DIR = Path(__file__).parent / "catalog" / "hardware"


@dataclass(frozen=True)
class GpuSpec:
    """One accelerator. For `cpu-host` it is the CPU itself computing out of DRAM."""
    hbm_bytes: int = quantity("hbm_gib", "GiB")
    hbm_bandwidth: float = quantity("hbm_bandwidth_gb_s", "GB/s")
    peak_flops: float = quantity("peak_dense_tflops", "TFLOP/s")
    flops_efficiency: float = quantity("flops_efficiency", at_most=1)
    hbm_efficiency: float = quantity("hbm_efficiency", at_most=1)
    layer_overhead: float = quantity("layer_overhead_us", "us", positive=False)


@dataclass(frozen=True)
class HostSpec:
    memory_bytes: int = quantity("memory_gib", "GiB")
    bandwidth: float = quantity("bandwidth_gb_s", "GB/s")


@dataclass(frozen=True)
class LinkSpec:
    """The host↔GPU link of one GPU. Each direction has its own copy engine(s) and bandwidth."""
    kind: str = text("kind")
    h2d_bandwidth: float = quantity("h2d_gb_s", "GB/s")
    d2h_bandwidth: float = quantity("d2h_gb_s", "GB/s")
    bidirectional_bandwidth: float = quantity("bidirectional_gb_s", "GB/s")
    transfer_latency: float = quantity("transfer_latency_us", "us", positive=False)
    copy_engines: int = quantity("copy_engines", whole=True)
    # Fraction of copy traffic charged against the HBM bandwidth left to compute (0 = none).
    compute_contention: float = quantity("compute_contention", positive=False, at_most=1)


@dataclass(frozen=True)
class DiskSpec:
    """Optional `[disk]`: a local SSD reached through CPU memory (FlexGen's third tier). Reads and writes
    queue separately, each at its own bandwidth, and take none of the host↔GPU link's."""
    capacity_bytes: int = quantity("capacity_gib", "GiB")
    read_bandwidth: float = quantity("read_gb_s", "GB/s")
    write_bandwidth: float = quantity("write_gb_s", "GB/s")
    transfer_latency: float = quantity("transfer_latency_us", "us", positive=False)


@dataclass(frozen=True)
class ServerSpec:
    """The GPUs of one server and the PCIe tree between them and host memory."""
    num_gpus: int = quantity("num_gpus", whole=True)
    gpus_per_switch: int = quantity("gpus_per_switch", whole=True)
    # Per direction, the uplink from one PCIe switch to the CPU, shared by its `gpus_per_switch` GPUs;
    # None (no `switch_uplink_gb_s`): each GPU's link reaches the CPU alone.
    switch_uplink_bandwidth: float | None = quantity("switch_uplink_gb_s", "GB/s", default=None)


@dataclass(frozen=True)
class HardwareSpec:
    name: str
    description: str = text("description")
    gpu: GpuSpec = section("gpu", GpuSpec)
    host: HostSpec = section("host", HostSpec)
    link: LinkSpec = section("link", LinkSpec)
    server: ServerSpec = section("server", ServerSpec)
    fit: ComputeFit | None = None  # optional `[fit]`: measured compute times (a `pie-exec calibrate` profile)
    disk: DiskSpec | None = None   # optional `[disk]`: an SSD behind CPU memory (None: no disk tier)


def load_hardware(name_or_path: str | Path) -> HardwareSpec:
    """A built-in system by name (see `hardware_names()`) or a user's TOML file of the same shape."""
    path = resolve(name_or_path, HARDWARE_DIR, "hardware")
    table = read_toml(path)
    fit, disk = table.pop("fit", None), table.pop("disk", None)
    if fit is not None:
        fit = parse(ComputeFit, fit, path, "fit")
    if disk is not None:
        disk = parse(DiskSpec, disk, path, "disk")
    return parse(HardwareSpec, table, path, name=path.stem, fit=fit, disk=disk)


def hardware_names() -> list[str]:
    return names(HARDWARE_DIR)
