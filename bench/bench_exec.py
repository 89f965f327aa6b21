"""Executor figures, side by side in one run, on whatever device it is given:

1. decode iteration time with a share of the KV cache in the CPU pool (static policy) vs all of it in the
   device pool, same batch and context;
2. achieved host→device bandwidth of the executor's copier (pinned CPU pool → device staging, in blocks)
   vs a plain large copy on the same link;
3. pie vs vllm-swap throughput on the same trace with a device pool too small for the load.

    python3 bench/bench_exec.py                      # CPU: OPT-125M (FP32)
    python3 bench/bench_exec.py --device cuda --model opt-1.3b
"""
from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np
import torch

from hwmodels import CostModel, GiB, load_hardware, load_model
from pie_exec.engine import Executor
from pie_exec.options import device_hardware
from pie_exec.run import Prompt, mean_context, run, trace_prompts
from pie_exec.weights import random_transformer
from pie_policy import Copy
from pie_policy.plan import H2D, LAYER_KV
from pie_policy.sizing import engine_config, engine_policy
from traces import load_workload


def serve(model, spec, device, policy_name, prompts, gpu_kv_bytes, cpu_kv_bytes, share=None):
    """`prompts` served by the policy `pie-exec run` builds (sized on the device's catalog entry)."""
    cost_model = CostModel(load_hardware(device_hardware(device)), spec)
    policy = engine_policy(policy_name, cost_model, gpu_kv_bytes, context=mean_context(prompts),
                           cpu_mem_bytes=cpu_kv_bytes, share=share)
    executor = Executor(model, policy.config, device, policy.staging_slots)
    try:
        return run(executor, policy, prompts, progress=False)
    finally:
        executor.close()


def decode_time(model, spec, device, share, batch, context, new_tokens):
    """Mean seconds of the decode iterations of `batch` sequences of `context` tokens, and their stall."""
    prompts = [Prompt(i, 0.0, tuple(range(1, context + 1)), new_tokens) for i in range(batch)]
    kv_bytes = 2 * batch * (context + new_tokens) * spec.kv_bytes_per_token
    name = "static" if share else "vllm"
    _, _, recorder, _ = serve(model, spec, device, name, prompts, kv_bytes, kv_bytes, share or None)
    its = recorder.iterations
    decodes = np.flatnonzero(its["decode_tokens"] == batch)[2:]  # skip warm-up
    held = decodes[0]  # every sequence still running: the KV split of the whole batch
    return (float(np.mean(its["end_s"][decodes] - its["start_s"][decodes])), float(np.mean(its["stall_s"][decodes])),
            its["cpu_kv_bytes"][held] / (its["cpu_kv_bytes"][held] + its["gpu_kv_bytes"][held]))


def copy_bandwidth(model, spec, device, total_bytes):
    """Bytes/s of the copier moving CPU-pool blocks to staging in one run, and of one plain copy."""
    block_layer = 16 * spec.kv_bytes_per_token_layer
    blocks = max(1, total_bytes // block_layer)
    config = engine_config(spec, "static", (2 * blocks + 64) * block_layer * spec.num_layers,
                           cpu_mem_bytes=blocks * block_layer * spec.num_layers, share=0.5)
    executor = Executor(model, config, device, 2)
    blocks = min(blocks, config.num_cpu_blocks)
    copy = Copy(0, H2D, LAYER_KV, 0, tuple((b, b) for b in range(blocks)), blocks * block_layer, 1, (), 0)
    executor.copier.issue(copy, executor._work(copy))  # warm-up
    executor.copier.wait([0])
    start = time.perf_counter()
    copy = dataclasses.replace(copy, op_id=1)
    executor.copier.issue(copy, executor._work(copy))
    executor.copier.wait([1])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    copier_rate = copy.nbytes / (time.perf_counter() - start)
    executor.close()
    source = torch.empty(copy.nbytes // 4, dtype=torch.float32, pin_memory=device.type == "cuda")
    target = torch.empty_like(source, device=device)
    target.copy_(source)
    start = time.perf_counter()
    target.copy_(source, non_blocking=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return copier_rate, copy.nbytes / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="opt-125m")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--requests", type=int, default=16)
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("float32" if device.type == "cpu" else "float16"))
    spec = dataclasses.replace(load_model(args.model), dtype_bytes=torch.finfo(dtype).bits // 8)
    model = random_transformer(spec, 0, dtype=dtype, device=device).eval()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device {name}, {spec.name} {dtype}, torch {torch.__version__}")

    print(f"\n1. decode of {args.batch} sequences at context {args.context}")
    base = None
    for share in (0.0, 0.25, 0.5):
        seconds, stall, measured = decode_time(model, spec, device, share, args.batch, args.context, 24)
        base = base or seconds
        print(f"   CPU share {share:.2f} (measured {measured:.2f}): {seconds * 1e3:8.2f} ms/iteration "
              f"({seconds / base:.2f}x), stall {stall * 1e3:.2f} ms")

    copier, plain = copy_bandwidth(model, spec, device, 256 * 2**20)
    print(f"\n2. host->device: copier {copier / 1e9:.1f} GB/s, plain copy {plain / 1e9:.1f} GB/s "
          f"({copier / plain:.0%} of it)")

    workload = load_workload("azure-conv", args.requests, rate=float("inf"), max_total_tokens=spec.max_context + 1)
    prompts = trace_prompts(workload, spec.vocab_size, 0)
    need = int((workload.prompt_tokens + workload.output_tokens).max() * spec.kv_bytes_per_token * 1.2)
    print(f"\n3. {args.requests} azure-conv requests at once, device KV pool {need / 2**20:.0f} MiB (about one "
          f"longest request), CPU pool 4x that")
    for policy in ("vllm-swap", "pie"):
        requests, generated, recorder, wall = serve(model, spec, device, policy, prompts, need, 4 * need)
        s = recorder.summary(requests, wall)
        print(f"   {policy:9s}: {s['throughput_tok_s']:7.1f} output tok/s, mean e2e {s['e2e_mean_s']:.2f} s, "
              f"preemptions {sum(r.preemptions for r in requests)}, stall {s['total_stall_s']:.2f} s, "
              f"h2d {s['total_bytes_h2d'] / GiB:.2f} GiB")


if __name__ == "__main__":
    main()
