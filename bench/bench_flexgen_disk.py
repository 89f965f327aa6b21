"""FlexGen with and without a disk: the LP's placement and throughput, and the simulator's, for one block.

FlexGen's own benchmark setting (prompt 512, 32 generated tokens, every request at once): for each system,
model and CPU memory, the LP search runs on the hardware as catalogued (with its `[disk]`) and with the
disk removed; the chosen block of requests is then simulated (`pie_sim.simulate`, as `pie-sim run`).

    python3 -m bench.bench_flexgen_disk
"""
from __future__ import annotations

import dataclasses

import pandas as pd

from hwmodels import CapacityError, CostModel, GiB, load_hardware, load_model
from pie_policy.sizing import build_policy
from pie_sim.simulate import simulate

PROMPT, OUTPUT = 512, 32
CASES = [("gh200-96g", "opt-175b", 480), ("gh200-96g", "opt-175b", 240),
         ("h100-sxm-pcie5", "opt-175b", 1024), ("h100-sxm-pcie5", "opt-175b", 240), ("h100-sxm-pcie5", "opt-66b", 1024)]


def shares(g: float, d: float) -> str:
    """GPU/CPU/disk percentages, FlexGen's notation."""
    return f"{g:.0%}/{max(0.0, 1 - g - d):.0%}/{d:.0%}"


def row(hw_name: str, model: str, cpu_gib: int, disk: bool) -> list[str]:
    hw = load_hardware(hw_name)
    cm = CostModel(hw if disk else dataclasses.replace(hw, disk=None), load_model(model))
    where = [hw_name, model, str(cpu_gib), "yes" if disk else "no"]
    try:
        policy = build_policy("flexgen", cm, cpu_mem_bytes=cpu_gib * GiB, mean_prompt=PROMPT, mean_output=OUTPUT)
    except CapacityError as refusal:
        return where + ["refused: " + str(refusal).split(": ", 1)[1].split(",")[0]] + [""] * 5
    p = policy.placement
    block = p.block_size
    workload = pd.DataFrame(dict(request_id=range(block), arrival_s=0.0, prompt_tokens=PROMPT, output_tokens=OUTPUT))
    result = simulate(policy, cm, workload)
    simulated = block * OUTPUT / max(r.finish_s for r in result.requests)
    placement = f"w {shares(p.wg, p.wd)}, c {shares(p.cg, p.cd)}, h {shares(p.hg, p.hd)}"
    return where + [f"{p.gpu_batch_size} x {p.num_gpu_batches}", placement, p.decode_bound,
                    f"{p.throughput:,.2f}", f"{simulated:,.2f}", f"{simulated / p.throughput:.3f}"]


def main() -> None:
    header = ["system", "model", "CPU GiB", "disk", "block (gbs x n)", "placement GPU/CPU/disk", "decode bound",
              "LP tok/s", "sim tok/s", "sim / LP"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for hw, model, cpu in CASES:
        for disk in (False, True):
            print("| " + " | ".join(row(hw, model, cpu, disk)) + " |", flush=True)


if __name__ == "__main__":
    main()
