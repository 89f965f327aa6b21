"""Hardware catalog: one TOML file per system in `catalog/hardware/`, sources cited in its comments.

An entry may name another as its `base` (a catalog name, or a path relative to the entry's file): the
base's tables, updated field by field with the entry's own. A Vidur-format folder given instead of a
file is the catalog's server of the GPU it profiles (VIDUR_BASES) with that folder as its `[profile]`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from .profile import ComputeFit
from .spec import CatalogError, GiB, names, parse, quantity, read_toml, resolve, section, text
from .vidur import ProfileSpec

HARDWARE_DIR = Path(__file__).parent / "catalog" / "hardware"
# The servers Vidur's published profiles were measured on (DGX A100 and DGX H100), by Vidur's device name.
VIDUR_BASES = {"a100": "a100-80g-sxm-8x-nvlink", "h100": "h100-sxm-8x-nvlink"}
MAX_BASES = 8


@dataclass(frozen=True)
class GpuSpec:
    """One accelerator. For `cpu-host` it is the CPU itself computing out of DRAM. The efficiencies and
    overheads price compute on the roofline (roofline.py); the optional ones default to what an entry
    without them means: no element-wise work, attention at the GEMMs' shares, no per-iteration host time."""
    # at most 16 TiB: the simulator keeps a block table entry per KV block of the HBM (a petabyte would be
    # billions of them), and no GPU has a hundredth of that
    hbm_bytes: int = quantity("hbm_gib", "GiB", at_most=16384)
    hbm_bandwidth: float = quantity("hbm_bandwidth_gb_s", "GB/s")
    peak_flops: float = quantity("peak_dense_tflops", "TFLOP/s")
    flops_efficiency: float = quantity("flops_efficiency", at_most=1)
    hbm_efficiency: float = quantity("hbm_efficiency", at_most=1)
    layer_overhead: float = quantity("layer_overhead_us", "us", positive=False)
    gemm_ridge_tokens: float = quantity("gemm_ridge_tokens", positive=False, default=0.0)
    elementwise_efficiency: float | None = quantity("elementwise_efficiency", at_most=1, default=None)
    decode_attention_efficiency: float | None = quantity("decode_attention_efficiency", at_most=1, default=None)
    prefill_attention_efficiency: float | None = quantity("prefill_attention_efficiency", at_most=1, default=None)
    iteration_overhead: float = quantity("iteration_overhead_us", "us", positive=False, default=0.0)
    iteration_overhead_per_sequence: float = quantity("iteration_overhead_us_per_sequence", "us", positive=False,
                                                      default=0.0)


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
    # Tensor parallelism's all-reduce over the GPUs' interconnect: latency + 2(n-1)/n · bytes / bandwidth
    # (a ring's bus bandwidth); None: the server has no figures for it, and refuses tensor parallelism.
    all_reduce_bandwidth: float | None = quantity("all_reduce_gb_s", "GB/s", default=None)
    all_reduce_latency: float = quantity("all_reduce_latency_us", "us", positive=False, default=0.0)


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
    profile: ProfileSpec | None = None  # optional `[profile]`: a Vidur-format folder of measured operator times


def load_hardware(name_or_path: str | Path) -> HardwareSpec:
    """A built-in system by name (see `hardware_names()`), a user's TOML file of the same shape, or a
    Vidur-format folder."""
    if Path(name_or_path).is_dir():
        path, table = Path(name_or_path), vidur_folder_table(Path(name_or_path))
    else:
        path = resolve(name_or_path, HARDWARE_DIR, "hardware")
        table = based_table(path)
    fit, disk, profile = table.pop("fit", None), table.pop("disk", None), table.pop("profile", None)
    if fit is not None:
        fit = parse(ComputeFit, fit, path, "fit")
    if disk is not None:
        disk = parse(DiskSpec, disk, path, "disk")
    if profile is not None:
        if fit is not None:
            raise CatalogError(f"{path}: a profile has either measured times '[profile]' or a fit '[fit]', not both")
        profile = checked_profile(parse(ProfileSpec, profile, path, "profile"), path)
    spec = parse(HardwareSpec, table, path, name=path.stem, fit=fit, disk=disk, profile=profile)
    check_link(spec.link, path)
    return spec


def check_link(link: LinkSpec, path: Path) -> None:
    """Refuse a bidirectional bandwidth below a direction's where each direction has its own copy engine:
    both at once then move at least what the faster moves alone (the links' model would otherwise slow a
    copy down when one starts the other way). With one engine the directions take turns, and a measured
    figure (`pie-exec calibrate` on a CPU) lies between the two."""
    faster = max(link.h2d_bandwidth, link.d2h_bandwidth)
    if link.copy_engines >= 2 and link.bidirectional_bandwidth < faster:
        raise CatalogError(f"{path}: field 'link.bidirectional_gb_s' = {link.bidirectional_bandwidth / 1e9:g} must be "
                           f"at least the faster direction's {faster / 1e9:g} (h2d_gb_s, d2h_gb_s) with "
                           f"{link.copy_engines} copy engines: both directions at once move at least what one "
                           f"moves alone")


def based_table(path: Path, depth: int = 0) -> dict:
    """The file's table over its `base`'s (see the module's docstring); a profile's folder made absolute."""
    table = read_toml(path)
    profile = table.get("profile")
    if isinstance(profile, dict) and isinstance(profile.get("vidur"), str):
        profile["vidur"] = str((path.parent / profile["vidur"]).resolve())
    base = table.pop("base", None)
    if base is None:
        return table
    if not isinstance(base, str) or depth >= MAX_BASES:
        raise CatalogError(f"{path}: field 'base' must name a catalog entry or a .toml file "
                           f"({'a chain of more than ' + str(MAX_BASES) if depth >= MAX_BASES else repr(base)})")
    relative = path.parent / base
    merged = based_table(relative if relative.suffix == ".toml" else resolve(base, HARDWARE_DIR, "hardware"), depth + 1)
    for key, value in table.items():
        merged[key] = merged[key] | value if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
    return merged


def checked_profile(profile: ProfileSpec, path: Path) -> ProfileSpec:
    """`profile` with its folder as a Path, refused (naming the field) where a folder it names is absent."""
    profile = dataclasses.replace(profile, folder=Path(profile.folder))
    if not profile.compute_dir().is_dir():
        raise CatalogError(f"{path}: field 'profile.device': no folder {profile.compute_dir()}")
    if profile.network is not None and not (profile.folder / "network" / profile.network).is_dir():
        raise CatalogError(f"{path}: field 'profile.network': no folder {profile.folder / 'network' / profile.network}")
    return profile


def vidur_folder_table(folder: Path) -> dict:
    """A Vidur-format folder as a hardware table: the catalog's server of its one device, which it profiles."""
    compute = folder / "compute"
    devices = sorted(p.name for p in compute.iterdir() if p.is_dir()) if compute.is_dir() else []
    if len(devices) != 1 or devices[0] not in VIDUR_BASES:
        raise CatalogError(f"{folder}: a Vidur-format folder given as hardware needs one device under compute/ "
                           f"among {', '.join(VIDUR_BASES)} (it has: {', '.join(devices) or 'none'}); to pick one or another GPU, "
                           f"write a hardware TOML with base = \"<catalog entry>\" and a [profile] of vidur = "
                           f"\"{folder}\", device = \"<name>\", network = \"<name>\"")
    device = devices[0]
    profile = {"vidur": str(folder.resolve()), "device": device}
    if (folder / "network" / f"{device}_dgx").is_dir():
        profile["network"] = f"{device}_dgx"
    table = based_table(resolve(VIDUR_BASES[device], HARDWARE_DIR, "hardware"))
    return table | {"description": f"{table['description']}, measured operator times from {folder}",
                    "profile": profile}


def hardware_names() -> list[str]:
    return names(HARDWARE_DIR)


def matching_entry(device: str, gpu_name: str = "", gpu_bytes: int = 0) -> str | None:
    """The hardware entry that models a machine's device, found in the catalog by the GPU's name (as CUDA
    reports it): a GH200 by its HBM; another GPU by the entries naming it, one GPU on a PCIe host first (an
    SXM module in an 8-GPU server reaches the host over PCIe too); cpu-host for the CPU; None: no match."""
    if device == "cpu":
        return "cpu-host"
    name, known = gpu_name.upper(), hardware_names()
    if "GH200" in name:
        entry = "gh200-144g" if gpu_bytes / GiB > 110 else "gh200-96g"
        return entry if entry in known else None
    for model in ("H200", "H100", "A100", "L40S"):
        if model in name:
            found = [n for n in known if model.lower() in n and not n.startswith("gh")]
            return next(iter([n for n in found if "pcie" in n and "8x" not in n] + found), None)
    return None
