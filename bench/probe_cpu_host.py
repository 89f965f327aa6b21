"""Measure the figures hwmodels/catalog/hardware/cpu-host.toml cites: FP32 matmul rate, large-copy
bandwidth and small-copy cost with torch on this machine. Run: python3 bench/probe_cpu_host.py"""
import time

import torch


def seconds_per_call(fn, repeat: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


def main() -> None:
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    n = 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    print(f"FP32 {n}^3 matmul: {2 * n**3 / seconds_per_call(lambda: a @ b, 10) / 1e9:.0f} GFLOP/s")
    src = torch.empty(256 * 2**20 // 4)
    dst = torch.empty_like(src)
    print(f"256 MiB copy: {src.numel() * 4 / seconds_per_call(lambda: dst.copy_(src), 10) / 1e9:.1f} GB/s")
    small, small_dst = torch.empty(16 * 1024), torch.empty(16 * 1024)
    print(f"64 KiB copy: {seconds_per_call(lambda: small_dst.copy_(small), 10000) * 1e6:.1f} us")


if __name__ == "__main__":
    main()
