"""Every input path attacked with bad input: what each command does with it, as a table.

Each case runs one command line in a fresh process (`python -m pie_sim|pie_exec|pie_validate`) in an empty
scratch folder, with the files it names written there first. A bad input must be *refused*: exit status 2,
one line that names the option, file, field or line (`fragment`, case-insensitive), no Python traceback,
no output folder left behind (or left as it was). A few inputs are valid but were once mishandled: those
must *work*: exit 0 and a check on what was written. A case that runs past `--timeout` seconds hung.

    python3 -m bench.bad_inputs [--only NAME,...] [--timeout 120]      # prints the markdown table

Exit status 1 if any case failed its expectation.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

HW = """description = "test system"
[gpu]
hbm_gib = 80
hbm_bandwidth_gb_s = {hbm}
peak_dense_tflops = 989
flops_efficiency = 0.6
hbm_efficiency = 0.8
layer_overhead_us = {overhead}
[host]
memory_gib = 1024
bandwidth_gb_s = 300
[link]
kind = "pcie"
h2d_gb_s = 53
d2h_gb_s = 50
bidirectional_gb_s = {both}
transfer_latency_us = 10
copy_engines = 2
compute_contention = 1.0
[server]
num_gpus = 1
gpus_per_switch = 1
"""


def hardware(hbm="3350", overhead="10", both="80") -> str:
    return HW.format(hbm=hbm, overhead=overhead, both=both)


@dataclass(frozen=True)
class Case:
    name: str
    argv: list[str]                 # after `python -m`; "{d}" is the scratch folder
    refused: str | None = None      # the fragment the one-line refusal must contain; None: must work
    files: dict[str, str | bytes] = field(default_factory=dict)
    check: Callable[[Path], str] | None = None   # for a case that must work: "" if what it wrote is right


def _json_strict(d: Path) -> str:
    text = (d / "out" / "summary.json").read_text()
    try:
        json.loads(text, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))
    except ValueError as e:
        return f"summary.json is not strict JSON ({e})"
    return ""


def _bom_arrivals(d: Path) -> str:
    import csv
    with open(d / "out" / "requests.csv") as f:
        arrivals = [float(r["arrival_s"]) for r in csv.DictReader(f)]
    return "" if arrivals == [0.0, 1.5, 3.0] else f"arrivals read as {arrivals}"


SIM_RUN = ["pie_sim", "run", "--num-requests", "3", "--out", "{d}/out"]
EXEC_RUN = ["pie_exec", "run", "--num-requests", "2", "--out", "{d}/out"]
TRACE = "arrival_s,prompt_tokens,output_tokens\n0,10,5\n1.5,20,5\n3,30,5\n"

CASES = [
    # --- pie-sim options
    Case("sim --prefetch-depth beyond the layers", [*SIM_RUN, "--prefetch-depth", "100000"], "prefetch"),
    Case("sim --block-size 0", [*SIM_RUN, "--block-size", "0"], "block-size"),
    Case("sim --block-size -16", [*SIM_RUN, "--block-size", "-16"], "block-size"),
    Case("sim --max-num-seqs 0 (flexgen)", [*SIM_RUN, "--policy", "flexgen", "--max-num-seqs", "0"], "max-num-seqs"),
    Case("sim --cpu-mem-gb -5 (vllm)", [*SIM_RUN, "--policy", "vllm", "--cpu-mem-gb", "-5"], "cpu-mem-gb"),
    Case("sim --cpu-mem-gb inf", [*SIM_RUN, "--cpu-mem-gb", "inf"], "cpu-mem-gb"),
    Case("sim --gpu-mem-util nan", [*SIM_RUN, "--gpu-mem-util", "nan"], "gpu-mem-util"),
    Case("sim --trace-iterations -1", [*SIM_RUN, "--trace-iterations", "-1"], "trace-iterations"),
    Case("sim --cv without --rate", [*SIM_RUN, "--cv", "2"], "--cv"),
    Case("sim --micro-batches with a single-engine policy", [*SIM_RUN, "--micro-batches", "4"], "micro-batches"),
    Case("sim --seed -1", [*SIM_RUN, "--seed", "-1"], "seed"),
    Case("sim compare --policies ''", ["pie_sim", "compare", "--policies", "", "--num-requests", "3", "--out", "{d}/out"],
         "policies"),
    Case("sim preview --max-num-seqs 0", ["pie_sim", "preview", "--max-num-seqs", "0", "--out", "{d}/out"],
         "max-num-seqs"),
    Case("sim --out names a file", ["pie_sim", "run", "--num-requests", "3", "--out", "{d}/afile"], "afile",
         files={"afile": "x"}),
    Case("sim --out in an unwritable place", ["pie_sim", "run", "--num-requests", "3", "--out", "/proc/pie-out"],
         "/proc/pie-out"),
    Case("sim --out holds an earlier run", [*SIM_RUN], "--force", files={"out/summary.json": "{}"}),
    Case("sim --rate inf writes strict JSON", [*SIM_RUN, "--rate", "inf"], None, check=_json_strict),
    Case("sim flexgen on azure-code with opt-13b", [*SIM_RUN, "--policy", "flexgen", "--trace", "azure-code"], None),
    # --- traces
    Case("trace CSV with a UTF-8 byte-order mark", [*SIM_RUN, "--trace", "{d}/bom.csv"], None,
         files={"bom.csv": "\ufeff" + TRACE}, check=_bom_arrivals),
    Case("trace CSV with arrival_s misspelt", [*SIM_RUN, "--trace", "{d}/t.csv"], "arival_s",
         files={"t.csv": "arival_s,prompt_tokens,output_tokens\n0,10,5\n"}),
    Case("trace CSV with a duplicated column", [*SIM_RUN, "--trace", "{d}/t.csv"], "prompt_tokens",
         files={"t.csv": "arrival_s,prompt_tokens,prompt_tokens,output_tokens\n0,10,10,5\n"}),
    Case("trace CSV with a latin-1 byte", [*SIM_RUN, "--trace", "{d}/t.csv"], "t.csv",
         files={"t.csv": b"arrival_s,prompt_tokens,output_tokens\n0,10,5 \xe9\n"}),
    Case("trace JSONL length true", [*SIM_RUN, "--trace", "{d}/t.jsonl"], "line 1",
         files={"t.jsonl": '{"prompt_tokens": true, "output_tokens": 5}\n'}),
    Case("trace length 1e23", [*SIM_RUN, "--trace", "{d}/t.csv"], "line 2",
         files={"t.csv": "prompt_tokens,output_tokens\n1e23,5\n"}),
    Case("trace arrival 1e300", [*SIM_RUN, "--trace", "{d}/t.csv"], "line 2",
         files={"t.csv": "arrival_s,prompt_tokens,output_tokens\n1e300,10,5\n"}),
    # --- hardware files
    Case("hardware layer_overhead_us = inf", [*SIM_RUN, "--hw", "{d}/hw.toml"], "layer_overhead_us",
         files={"hw.toml": hardware(overhead="inf")}),
    Case("hardware hbm_bandwidth_gb_s = inf", [*SIM_RUN, "--hw", "{d}/hw.toml"], "hbm_bandwidth_gb_s",
         files={"hw.toml": hardware(hbm="inf")}),
    Case("hardware hbm_bandwidth_gb_s = 1e30", [*SIM_RUN, "--hw", "{d}/hw.toml"], "hbm_bandwidth_gb_s",
         files={"hw.toml": hardware(hbm="1e30")}),
    Case("hardware bidirectional below a direction", [*SIM_RUN, "--hw", "{d}/hw.toml"], "bidirectional_gb_s",
         files={"hw.toml": hardware(both="40")}),
    # --- pie-exec
    Case("exec --cpu-kv-gb -1 (vllm)", [*EXEC_RUN, "--policy", "vllm", "--cpu-kv-gb", "-1"], "cpu-kv-gb"),
    Case("exec --gpu-kv-gb -1", [*EXEC_RUN, "--gpu-kv-gb", "-1"], "gpu-kv-gb"),
    Case("exec --gpu-kv-gb nan", [*EXEC_RUN, "--gpu-kv-gb", "nan"], "gpu-kv-gb"),
    Case("exec --gpu-kv-gb 1e6 (more than the machine)", [*EXEC_RUN, "--gpu-kv-gb", "1e6"], "gpu-kv-gb"),
    Case("exec --cpu-kv-gb 1000 (more than the machine)", [*EXEC_RUN, "--cpu-kv-gb", "1000"], "cpu-kv-gb"),
    Case("exec --rate 0", [*EXEC_RUN, "--rate", "0"], "rate"),
    Case("exec --seed -1", [*EXEC_RUN, "--seed", "-1"], "seed"),
    Case("exec --prefetch-depth at the layer count", [*EXEC_RUN, "--prefetch-depth", "12"], "prefetch"),
    Case("exec --model opt-13b (weights larger than memory)", [*EXEC_RUN, "--model", "opt-13b"], "opt-13b"),
    Case("exec --prompts with a latin-1 byte", [*EXEC_RUN[:2], "--prompts", "{d}/p.jsonl", "--out", "{d}/out"],
         "p.jsonl", files={"p.jsonl": b'{"prompt_token_ids": [1, 2], "max_new_tokens": 2, "id": "\xe9"}\n'}),
    Case("exec --prompts with duplicate ids", [*EXEC_RUN[:2], "--prompts", "{d}/p.jsonl", "--out", "{d}/out"],
         "line 2", files={"p.jsonl": '{"id": "a", "prompt_token_ids": [1, 2], "max_new_tokens": 2}\n'
                                     '{"id": "a", "prompt_token_ids": [3, 4], "max_new_tokens": 2}\n'}),
    Case("exec --out holds an earlier run", [*EXEC_RUN], "--force", files={"out/summary.json": "{}"}),
    # --- every other option of every command (argparse's rules and those that span options)
    Case("sim --num-requests -1", [*SIM_RUN, "--num-requests", "-1"], "num-requests"),
    Case("sim --rate -1", [*SIM_RUN, "--rate", "-1"], "--rate"),
    Case("sim --rate nan", [*SIM_RUN, "--rate", "nan"], "--rate"),
    Case("sim --cv 0", [*SIM_RUN, "--rate", "2", "--cv", "0"], "--cv"),
    Case("sim --share 1.5", [*SIM_RUN, "--share", "1.5"], "--share"),
    Case("sim --share with vllm", [*SIM_RUN, "--policy", "vllm", "--share", "0.3"], "--share"),
    Case("sim --micro-batches 0", [*SIM_RUN, "--micro-batches", "0"], "micro-batches"),
    Case("sim --prefetch-depth 0", [*SIM_RUN, "--prefetch-depth", "0"], "prefetch-depth"),
    Case("sim --max-num-seqs 1e3", [*SIM_RUN, "--max-num-seqs", "1e3"], "max-num-seqs"),
    Case("sim --hw unknown", [*SIM_RUN, "--hw", "gh300"], "gh300"),
    Case("sim --model unknown", [*SIM_RUN, "--model", "opt-7b"], "opt-7b"),
    Case("sim --trace unknown", [*SIM_RUN, "--trace", "sharegtp"], "sharegtp"),
    Case("sim --policy unknown", [*SIM_RUN, "--policy", "pi"], "'pi'"),
    Case("sim --layer-events with pp-vllm", [*SIM_RUN, "--policy", "pp-vllm", "--hw", "pcie-8x-l40s", "--layer-events"],
         "--layer-events"),
    Case("sim compare --policies repeated", ["pie_sim", "compare", "--policies", "vllm,vllm", "--out", "{d}/out"],
         "--policies"),
    Case("sim compare --out holds another comparison", ["pie_sim", "compare", "--out", "{d}/out"], "--force",
         files={"out/flexgen/summary.json": "{}"}),
    Case("sim preview --gpu-mem-util 0", ["pie_sim", "preview", "--gpu-mem-util", "0", "--out", "{d}/out"],
         "gpu-mem-util"),
    Case("sim preview --hw ''", ["pie_sim", "preview", "--hw", "", "--out", "{d}/out"], "--hw"),
    Case("sim capacity --tolerance 0", ["pie_sim", "capacity", "--tolerance", "0", "--out", "{d}/out"], "tolerance"),
    Case("sim capacity --slo-normalized-latency -1", ["pie_sim", "capacity", "--slo-normalized-latency", "-1",
                                                      "--out", "{d}/out"], "slo-normalized-latency"),
    Case("sim capacity --min-hbm without --rate", ["pie_sim", "capacity", "--min-hbm", "--out", "{d}/out"], "--rate"),
    Case("sim capacity --workers 0", ["pie_sim", "capacity", "--workers", "0", "--out", "{d}/out"], "workers"),
    Case("sim capacity --policy ''", ["pie_sim", "capacity", "--policy", "", "--out", "{d}/out"], "--policy"),
    Case("sim reproduce --hw unknown", ["pie_sim", "reproduce", "--quick", "--hw", "gh300", "--out", "{d}/out"],
         "gh300"),
    Case("sim reproduce --out names a file", ["pie_sim", "reproduce", "--quick", "--out", "{d}/afile"], "afile",
         files={"afile": "x"}),
    # --- grid files (pie-sim sweep)
    Case("sweep grid missing", ["pie_sim", "sweep", "{d}/nowhere.toml", "--out", "{d}/out"], "nowhere.toml"),
    Case("sweep grid not TOML", ["pie_sim", "sweep", "{d}/g.toml", "--out", "{d}/out"], "g.toml",
         files={"g.toml": "policy = [vllm\n"}),
    Case("sweep grid unknown option", ["pie_sim", "sweep", "{d}/g.toml", "--out", "{d}/out"], "block_szie",
         files={"g.toml": "block_szie = [8, 16]\n"}),
    Case("sweep grid block_size 0", ["pie_sim", "sweep", "{d}/g.toml", "--out", "{d}/out"], "block_size[1]",
         files={"g.toml": "block_size = [16, 0]\n"}),
    Case("sweep grid rate -1", ["pie_sim", "sweep", "{d}/g.toml", "--out", "{d}/out"], "rate",
         files={"g.toml": "rate = -1.0\n"}),
    Case("sweep grid micro_batches with vllm", ["pie_sim", "sweep", "{d}/g.toml", "--out", "{d}/out"],
         "micro_batches", files={"g.toml": 'policy = ["vllm"]\nmicro_batches = 4\n'}),
    Case("sweep grid cv without rate", ["pie_sim", "sweep", "{d}/g.toml", "--out", "{d}/out"], "cv",
         files={"g.toml": "cv = 2.0\n"}),
    Case("sweep grid string for a number", ["pie_sim", "sweep", "{d}/g.toml", "--out", "{d}/out"], "gpu_mem_util",
         files={"g.toml": 'gpu_mem_util = "0.9"\n'}),
    Case("sweep --out names a file", ["pie_sim", "sweep", "{d}/g.toml", "--out", "{d}/afile"], "afile",
         files={"g.toml": "num_requests = 3\n", "afile": "x"}),
    Case("sweep --workers 0", ["pie_sim", "sweep", "{d}/g.toml", "--out", "{d}/out", "--workers", "0"], "workers",
         files={"g.toml": "num_requests = 3\n"}),
    Case("sweep --address without ray", ["pie_sim", "sweep", "{d}/g.toml", "--out", "{d}/out", "--address", "x:1"],
         "--address", files={"g.toml": "num_requests = 3\n"}),
    # --- pie-exec and pie-validate options
    Case("exec --num-requests 0", [*EXEC_RUN, "--num-requests", "0"], "num-requests"),
    Case("exec --threads 0", [*EXEC_RUN, "--threads", "0"], "threads"),
    Case("exec --pipeline-stages 0", [*EXEC_RUN, "--pipeline-stages", "0"], "pipeline-stages"),
    Case("exec --pipeline-stages beyond the layers", [*EXEC_RUN, "--pipeline-stages", "99"], "pipeline-stages"),
    Case("exec --block-size 0", [*EXEC_RUN, "--block-size", "0"], "block-size"),
    Case("exec --gpu-kv-gb too small for a block", [*EXEC_RUN, "--gpu-kv-gb", "1e-6"], "gpu-kv-gb"),
    Case("exec --cv without --rate", [*EXEC_RUN, "--cv", "2"], "--cv"),
    Case("exec --prompts with --rate", [*EXEC_RUN[:2], "--prompts", "{d}/p.jsonl", "--rate", "2", "--out", "{d}/out"],
         "--rate", files={"p.jsonl": '{"prompt_token_ids": [1, 2], "max_new_tokens": 2}\n'}),
    Case("exec --prompts missing", [*EXEC_RUN[:2], "--prompts", "{d}/nowhere.jsonl", "--out", "{d}/out"],
         "nowhere.jsonl"),
    Case("exec --model-path missing", [*EXEC_RUN[:2], "--model-path", "{d}/nowhere", "--out", "{d}/out"], "nowhere"),
    Case("exec --policy flexgen", [*EXEC_RUN, "--policy", "flexgen"], "--policy"),
    Case("exec --device cuda without a GPU", [*EXEC_RUN, "--device", "cuda"], "cuda"),
    Case("exec --out names a file", [*EXEC_RUN[:-1], "{d}/afile"], "afile", files={"afile": "x"}),
    Case("exec calibrate --repeats 0", ["pie_exec", "calibrate", "--repeats", "0", "--out", "{d}/p.toml"], "repeats"),
    Case("exec calibrate --out not .toml", ["pie_exec", "calibrate", "--out", "{d}/p.txt"], ".toml"),
    Case("exec calibrate --out exists", ["pie_exec", "calibrate", "--out", "{d}/p.toml"], "--force",
         files={"p.toml": "x"}),
    Case("exec calibrate --contexts beyond the model", ["pie_exec", "calibrate", "--contexts", "4096", "--out",
                                                        "{d}/p.toml"], "--contexts"),
    Case("validate --profile missing", ["pie_validate", "--profile", "{d}/nowhere.toml", "--out", "{d}/out"],
         "nowhere.toml"),
    Case("validate --rounds 0", ["pie_validate", "--profile", "cpu-host", "--rounds", "0", "--out", "{d}/out"],
         "rounds"),
    Case("validate --policies with flexgen", ["pie_validate", "--profile", "cpu-host", "--policies", "vllm,flexgen",
                                              "--out", "{d}/out"], "flexgen"),
    Case("validate --out holds an earlier run", ["pie_validate", "--profile", "cpu-host", "--out", "{d}/out"],
         "--force", files={"out/validate.csv": "x"}),
]


def run_case(case: Case, timeout: float) -> tuple[bool, str]:
    """(met its expectation, what happened in a few words)."""
    with tempfile.TemporaryDirectory() as scratch:
        d = Path(scratch)
        for name, content in case.files.items():
            (d / name).parent.mkdir(parents=True, exist_ok=True)
            (d / name).write_bytes(content if isinstance(content, bytes) else content.encode())
        before = {p for p in d.rglob("*")}
        argv = [sys.executable, "-m", *(a.replace("{d}", scratch) for a in case.argv)]
        env = dict(os.environ, COLUMNS="200")
        try:
            result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env,
                                    cwd=Path(__file__).resolve().parent.parent)
        except subprocess.TimeoutExpired:
            return False, f"hung (> {timeout:.0f} s)"
        said = (result.stdout + result.stderr).strip()
        last = said.splitlines()[-1] if said else ""
        if "Traceback" in said:
            return False, f"traceback: {last[:100]}"
        left = {p for p in d.rglob("*")} - before
        if case.refused is None:
            if result.returncode:
                return False, f"exit {result.returncode}: {last[:100]}"
            problem = case.check(d) if case.check else ""
            return not problem, problem or "works"
        if result.returncode != 2:
            return False, f"exit {result.returncode} (accepted): {last[:80]}"
        if case.refused.lower() not in said.lower():
            return False, f"refused without naming '{case.refused}': {last[:100]}"
        if left:
            return False, f"refused but wrote {sorted(str(p.relative_to(d)) for p in left)[:3]}"
        return True, f"refused: {last[:100]}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated case names (substrings)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds before a case counts as hung")
    args = parser.parse_args()
    cases = [c for c in CASES if not args.only or any(o in c.name for o in args.only.split(","))]
    print("| input | expected | what happens | ok |")
    print("|---|---|---|---|")
    failed = 0
    for case in cases:
        start = time.perf_counter()
        ok, what = run_case(case, args.timeout)
        failed += not ok
        expected = f"refused, naming `{case.refused}`" if case.refused else "works"
        what = what.replace("|", "\\|")
        print(f"| {case.name} | {expected} | {what} ({time.perf_counter() - start:.0f} s) | {'yes' if ok else 'NO'} |",
              flush=True)
    print(f"\n{len(cases) - failed} of {len(cases)} as expected")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
