"""Llama-2-70B over 2, 4 and 8 H100s (tensor parallelism): memory per GPU, iteration times and the
all-reduces' share of them, from the roofline (h100-sxm-8x-nvlink) and from Vidur's measured H100 layers
and DGX H100 all-reduces (h100-sxm-8x-nvlink-vidur); then the same requests served by vLLM at each degree.

    python -m bench.bench_tp [--num-requests 300] [--rate 4]

Iterations: decode batches of 1, 32 and 128 sequences at 1,024 tokens of context, and a 2,048-token
prefill. The all-reduce share is the two all-reduces of every layer over the whole iteration (LM head and
host time included). Serving: ShareGPT requests at --rate (Poisson), vLLM, 90% of each GPU's HBM.
"""
from __future__ import annotations

import argparse

from hwmodels import BatchShape, CostModel, GiB, load_hardware, load_model
from pie_sim.scenario import Scenario, summarize

MODEL = "llama-2-70b"
SYSTEMS = {"roofline": "h100-sxm-8x-nvlink", "measured": "h100-sxm-8x-nvlink-vidur"}
DEGREES = (2, 4, 8)
BATCHES = {"decode 1 x 1024": BatchShape.of(decodes=[1024]), "decode 32 x 1024": BatchShape.of(decodes=[1024] * 32),
           "decode 128 x 1024": BatchShape.of(decodes=[1024] * 128), "prefill 2048": BatchShape.of(prefills=[(2048, 0)])}


def memory_table(model) -> None:
    print("Memory per GPU (gpu_mem_util 0.9, vLLM's defaults: 256 sequences, 4,096 batched tokens)\n")
    print("| GPUs | weights GiB | activations GiB | KV pool GiB | KV tokens (engine) |\n|---|---:|---:|---:|---:|")
    for tp in DEGREES:
        budget = CostModel(load_hardware(SYSTEMS["roofline"]), model, tp).memory_budget()
        one = budget.per_gpu()
        print(f"| {tp} | {one.weight_bytes / GiB:.1f} | {one.activation_bytes / GiB:.2f} | {one.kv_pool_bytes / GiB:.1f} | "
              f"{budget.kv_pool_bytes // model.kv_bytes_per_token:,} |")


def iteration_table(model) -> None:
    print("\nIteration time ms (all-reduce share) by GPUs\n")
    print("| batch | source | " + " | ".join(f"{tp} GPUs" for tp in DEGREES) + " |\n|---|---|" + "---:|" * len(DEGREES))
    for label, batch in BATCHES.items():
        for source, hw in SYSTEMS.items():
            cells = []
            for tp in DEGREES:
                cm = CostModel(load_hardware(hw), model, tp)
                seconds = cm.iteration_time(batch)
                share = 2 * model.num_layers * cm.all_reduce_time(batch.tokens) / seconds
                cells.append(f"{seconds * 1e3:.2f} ({share:.0%})")
            print(f"| {label} | {source} | " + " | ".join(cells) + " |")


def serving_table(num_requests: int, rate: float) -> None:
    print(f"\nServing {num_requests} ShareGPT requests at {rate:g}/s with vLLM\n")
    print("| GPUs | source | output tok/s | TPOT mean ms | TTFT p99 s | preemptions |\n|---|---|---:|---:|---:|---:|")
    for tp in DEGREES:
        for source, hw in SYSTEMS.items():
            s = summarize(Scenario(hw=hw, model=MODEL, num_requests=num_requests, rate=rate, policy="vllm", tp=tp))
            print(f"| {tp} | {source} | {s['throughput_tok_s']:,.0f} | {s['tpot_mean_s'] * 1e3:.1f} | "
                  f"{s['ttft_p99_s']:.2f} | {s['preemptions']} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-requests", type=int, default=300, help="requests served at each degree (default 300)")
    parser.add_argument("--rate", type=float, default=4.0, help="Poisson arrival rate, req/s (default 4)")
    args = parser.parse_args()
    model = load_model(MODEL)
    memory_table(model)
    iteration_table(model)
    serving_table(args.num_requests, args.rate)


if __name__ == "__main__":
    main()
