"""Steps calibrate and validate, through the commands themselves: `pie-exec calibrate` on a short grid
(the serving model, FP16 on a GPU, the hardware entry as its base), then `pie-validate` with the profile
it wrote: vllm, static and pie serve a few dozen azure-conv requests, all arriving at once on a device
pool small enough that vllm preempts and the others keep KV in CPU memory, and the simulator serves the
same requests. Their files go to calibrate/ and validate/, their printed tables to log.txt."""
from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

from hwmodels import GiB, load_hardware
from hwmodels.spec import read_toml

from .context import ERROR, OK, SKIPPED, Context, Result, ratio, table

# calibrate's grid: contexts below the model's 2048 (128 on the dry run's tiny model)
GRIDS = {"cuda": ["--batches", "1,8,32", "--contexts", "128,512,1536", "--prefills", "64,256,1024,2048",
                  "--copy-blocks", "1,16,64,256", "--repeats", "3"],
         "quick": ["--batches", "1,16", "--contexts", "128,1024", "--prefills", "128,1024",
                   "--copy-blocks", "1,64,256", "--repeats", "2"],
         "cpu": ["--batches", "1,4", "--contexts", "16,96", "--prefills", "16,64", "--copy-blocks", "1,8",
                 "--tokens", "1,2,4,8,16,32,64,128", "--sampled", "1,2,4,8,16", "--repeats", "2"]}
# validate's workload: (requests, device pool GiB, CPU pool GiB)
WORKLOADS = {"cuda": (32, 1.0, 4.0), "quick": (16, 1.0, 4.0), "cpu": (6, 0.002, 0.01)}
POLICIES = "vllm,static,pie"
SHOWN = (("throughput_tok_s", "throughput tok/s"), ("e2e_mean_s", "e2e mean s"), ("tpot_mean_s", "TPOT mean s"),
         ("iteration_mean_s", "iteration mean s"), ("total_bytes_h2d", "bytes h2d"))


def setting(ctx: Context, settings: dict):
    return settings["cpu" if not ctx.cuda else "quick" if ctx.quick else "cuda"]


def pool_bytes(ctx: Context) -> tuple[int, int]:
    """validate's device and CPU pools, bytes."""
    _, gpu, cpu = setting(ctx, WORKLOADS)
    return int(gpu * GiB), int(cpu * GiB)


def calibrate(ctx: Context) -> Result:
    from pie_exec.cli import main as pie_exec

    folder = ctx.folder / "calibrate"
    profile = folder / "profile.toml"
    code = pie_exec(["calibrate", "--device", ctx.device, "--model", ctx.serving_model, "--base", ctx.hw,
                     *setting(ctx, GRIDS), "--out", str(profile)])
    if code != 0:
        return Result(ERROR, f"pie-exec calibrate exited with {code} (its message is in log.txt)")
    files = [str(p.relative_to(ctx.folder)) for p in sorted(folder.iterdir())]
    header = [line[1:].strip() for line in profile.read_text().splitlines() if line.startswith("#")]
    link, entry = read_toml(profile)["link"], load_hardware(ctx.hw).link
    rows = [[name, f"{link[key]:.3g}", f"{reference:.3g}", ratio(link[key], reference)]
            for name, key, reference in (("h2d GB/s", "h2d_gb_s", entry.h2d_bandwidth / 1e9),
                                         ("d2h GB/s", "d2h_gb_s", entry.d2h_bandwidth / 1e9),
                                         ("both at once GB/s", "bidirectional_gb_s", entry.bidirectional_bandwidth / 1e9),
                                         ("latency µs", "transfer_latency_us", entry.transfer_latency * 1e6))]
    lines = [f"Profile of {Path(ctx.serving_model).name} on the executor's copier and layers; fit residuals:", ""]
    lines += [f"- {line}" for line in header if line.startswith(("layer:", "head:", "copy:", "bidirectional:",
                                                                   "issue:", "contended:"))]
    lines += ["", *table(["link (the executor's copier)", "measured", ctx.hw, "measured / entry"], rows)]
    return Result(OK, "", lines, files)


def validate(ctx: Context) -> Result:
    if importlib.util.find_spec("simpy") is None:
        return Result(ERROR, "SimPy is not importable: the simulator cannot run (carry it: "
                             "bench/gpu_check/README.md)")
    folder = ctx.folder / "calibrate"
    profile = folder / "profile.toml"
    models = [p for p in folder.glob("*.toml") if p != profile] if folder.is_dir() else []
    if not profile.is_file() or len(models) != 1:
        return Result(SKIPPED, "needs the profile and model calibrate writes")
    from pie_validate.cli import main as pie_validate

    requests, gpu, cpu = setting(ctx, WORKLOADS)
    out = ctx.folder / "validate"
    code = pie_validate(["--profile", str(profile), "--model", str(models[0]), "--device", ctx.device,
                         "--num-requests", str(requests), "--rate", "inf", "--policies", POLICIES,
                         "--gpu-kv-gb", str(gpu), "--cpu-kv-gb", str(cpu), "--out", str(out)])
    if code != 0:
        return Result(ERROR, f"pie-validate exited with {code} (its message is in log.txt)")
    return Result(OK, "", report(out / "validate.csv", requests, gpu, cpu),
                  [str(p.relative_to(ctx.folder)) for p in sorted(out.iterdir())])


def report(path: Path, requests: int, gpu: float, cpu: float) -> list[str]:
    with open(path) as f:
        rows = {(r["policy"], r["metric"]): r for r in csv.DictReader(f)}
    policies = list(dict.fromkeys(policy for policy, _ in rows))
    lines = [f"{requests} azure-conv requests at once, device pool {gpu:g} GiB, CPU pool {cpu:g} GiB; measured "
             "(executor) / predicted (simulator on calibrate's profile) / error:", ""]
    cells = []
    for key, label in SHOWN:
        cells.append([label] + [f"{_number(rows[p, key]['measured'])} / {_number(rows[p, key]['predicted'])} / "
                                f"{_error(rows[p, key]['relative_error'])}" for p in policies])
    return lines + table(["metric", *policies], cells)


def _number(text: str) -> str:
    value = float(text) if text else float("nan")
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.4g}"


def _error(text: str) -> str:
    return f"{float(text):+.1%}" if text else "-"

