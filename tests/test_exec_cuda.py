"""The executor's CUDA code paths, where a CUDA device is present: marked `cuda` and skipped elsewhere (the
GPU check, `python -m bench.gpu_check`, runs them). The pinned CPU pool, the clock, what each copy
ordering makes a copy wait for (copier.py), the compute waiting for copies, the copiers' busy times, and
the executor's tokens on the device (FP32) against the CPU's under both orderings; with two GPUs, a
pipeline over NCCL.

Orders are read off CUDA events: `a.elapsed_time(b)` is the milliseconds from event a to event b on the
device's one clock, whatever streams recorded them. The compute stream is held up with
`torch.cuda._sleep` (a kernel that spins for a number of GPU clock cycles, as PyTorch's own tests do).
"""
import time
from dataclasses import replace

import pytest
import torch

from bench.gpu_check.tokens import prompts_for
from pie_exec.copier import EVENTS, ORDERINGS, STREAM, CudaCopier
from pie_exec.engine import Executor, _CudaClock, device_clock
from pie_exec.kvcache import PagedKV
from pie_exec.pipeline import serve
from pie_exec.run import run
from pie_exec.weights import random_transformer
from pie_policy import EngineConfig, Policy
from pie_policy.plan import D2H, H2D, LAYER_KV, Copy

from .test_exec_engine import SPECS, config, pie

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

DEVICE = torch.device("cuda", 0)
SLEEP_CYCLES = 200_000_000  # ~0.1 s at the 1.5-2 GHz of a data-centre GPU
SLACK_MS = 0.05             # what two events recorded back to back on two streams may differ by


def sleep_ms(cycles: int = SLEEP_CYCLES) -> float:
    """Spin the current stream for `cycles`; returns how long that took on the device, in ms."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(cycles)
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def recorded() -> torch.cuda.Event:
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event


def layer_copy(op: int, direction: str, layer: int, staging: int, after: tuple[int, ...] = ()) -> Copy:
    return Copy(op, direction, LAYER_KV, layer, ((0, 0),), 4 << 20, 1, after, staging)


@pytest.fixture
def buffers():
    """A pinned host buffer of ones and a device buffer of zeros, 4 MiB each."""
    return torch.ones(1 << 20, pin_memory=True), torch.zeros(1 << 20, device=DEVICE)


def test_the_cpu_pool_is_pinned_and_the_device_pools_are_one_tensor():
    cfg = EngineConfig(num_layers=2, block_bytes_layer=1024, num_gpu_blocks=4, num_cpu_blocks=3, block_size=4)
    kv = PagedKV(cfg, 2, 8, torch.float16, DEVICE, staging_slots=2)
    assert kv.cpu.device.type == "cpu" and kv.cpu.is_pinned()
    assert kv.device_rows.device.type == "cuda" and kv.gpu.shape[:2] == (2, 4) and kv.staging.shape[:2] == (2, 3)
    storage = kv.device_rows.untyped_storage().data_ptr()
    assert kv.gpu.untyped_storage().data_ptr() == kv.staging.untyped_storage().data_ptr() == storage


def test_the_clock_times_the_device_not_the_host():
    """The host issues a spinning kernel in microseconds; the clock's marks around it see the spin."""
    clock = device_clock(DEVICE)
    assert isinstance(clock, _CudaClock)
    sleep_ms(1000)  # the kernel's first launch loads it: not what is timed here
    began = time.perf_counter()
    first = clock.mark()
    torch.cuda._sleep(SLEEP_CYCLES)
    second = clock.mark()
    issued = time.perf_counter() - began
    torch.cuda.synchronize()
    waited = time.perf_counter() - began
    seconds = clock.seconds(first, second)
    assert issued * 10 < seconds <= waited + 1e-3, (issued, seconds, waited)


def test_stream_ordering_starts_a_copy_after_all_compute_issued_before_it(buffers):
    src, dst = buffers
    copier = CudaCopier(DEVICE, STREAM)
    torch.cuda._sleep(SLEEP_CYCLES)
    compute_end = recorded()
    copier.issue(layer_copy(1, H2D, 0, staging=5), lambda: dst.copy_(src, non_blocking=True))
    torch.cuda.synchronize()
    start, _ = copier._done[1]
    assert compute_end.elapsed_time(start) > -SLACK_MS  # a slot no layer used: it waited all the same


def test_events_ordering_starts_each_copy_once_its_data_is_ready(buffers):
    """Layer 0 (reading staging slot 1) then layer 1 (slot 0), each spinning ~0.1 s. A prefetch into a slot
    no layer used starts at once, one into slot 1 once layer 0 has ended, layer 1's write-back once
    layer 1 has ended."""
    src, dst = buffers
    back = torch.empty(1 << 20, pin_memory=True)
    spin = sleep_ms()
    copier = CudaCopier(DEVICE, EVENTS)
    began = recorded()
    torch.cuda._sleep(SLEEP_CYCLES)
    layer0 = recorded()
    copier.computed(0, 1, layer0)
    torch.cuda._sleep(SLEEP_CYCLES)
    layer1 = recorded()
    copier.computed(1, 0, layer1)
    half = dst[: len(dst) // 2]
    copier.issue(layer_copy(1, H2D, 2, staging=2), lambda: half.copy_(src[: len(half)], non_blocking=True))
    copier.issue(layer_copy(2, H2D, 3, staging=1), lambda: dst.copy_(src, non_blocking=True))
    copier.issue(layer_copy(3, D2H, 1, staging=0, after=(2,)), lambda: back.copy_(dst, non_blocking=True))
    torch.cuda.synchronize()
    (free, _), (slot1, _), (write_back, _) = (copier._done[op] for op in (1, 2, 3))
    assert free.elapsed_time(layer0) > spin / 2 and began.elapsed_time(free) > -SLACK_MS
    assert layer0.elapsed_time(slot1) > -SLACK_MS and slot1.elapsed_time(layer1) > spin / 2
    assert layer1.elapsed_time(write_back) > -SLACK_MS
    assert torch.equal(back, torch.ones_like(back))  # it read what the prefetch it is ordered after wrote


def test_compute_waits_for_a_copy_it_needs(buffers):
    """The copy's stream spins first; without the wait, the sum would read the zeros."""
    src, dst = buffers
    copier = CudaCopier(DEVICE)
    with torch.cuda.stream(copier.streams[H2D]):
        torch.cuda._sleep(SLEEP_CYCLES)
    copier.issue(layer_copy(1, H2D, 0, staging=0), lambda: dst.copy_(src, non_blocking=True))
    copier.wait([1])
    total = dst.sum()
    resumed = recorded()
    torch.cuda.synchronize()
    assert total.item() == len(src)
    assert copier._done[1][1].elapsed_time(resumed) > -SLACK_MS


def test_busy_times_count_each_finished_copy_once(buffers):
    src, dst = buffers
    back = torch.empty_like(src).pin_memory()
    copier = CudaCopier(DEVICE)
    copier.issue(layer_copy(1, H2D, 0, staging=0), lambda: dst.copy_(src, non_blocking=True))
    copier.issue(layer_copy(2, D2H, 0, staging=0), lambda: back.copy_(dst, non_blocking=True))
    copier.close()  # synchronises the device
    busy = copier.take_busy()
    assert busy[H2D] > 0 and busy[D2H] > 0
    assert copier.take_busy() == {H2D: 0.0, D2H: 0.0}


SPEC = replace(SPECS["llama"], name="tiny-llama-5", num_layers=5)  # deeper than any prefetch depth here
CASES = {
    "static, most KV on CPU, prefetch 2 ahead": lambda s: Policy("static", config(s, 12, 40, prefetch_depth=2),
                                                                 cpu_share=0.75),
    "pie, chunked prefill, CPU": lambda s: pie(s, config(s, 14, 14, chunked_prefill=True)),
    "vllm-swap, preempting": lambda s: Policy("vllm-swap", config(s, 15, 60)),
}


def generate(model, policy, prompts, device, ordering=STREAM):
    executor = Executor(model, policy.config, device, policy.staging_slots, copy_ordering=ordering)
    try:
        return run(executor, policy, prompts, progress=False)[1]
    finally:
        executor.close()


@pytest.mark.parametrize("ordering", ORDERINGS)
@pytest.mark.parametrize("case", list(CASES))
def test_the_device_generates_the_cpus_tokens(case, ordering):
    """FP32 (TF32 off, torch's default for matmuls): the closest two logits of these prompts differ by
    2e-3 on the CPU, far above the rounding that separates the devices."""
    model = random_transformer(SPEC, seed=1).eval()
    prompts = prompts_for(SPEC)
    expected = generate(model, CASES[case](SPEC), prompts, torch.device("cpu"))
    assert generate(model.to(DEVICE), CASES[case](SPEC), prompts, DEVICE, ordering) == expected


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_two_stages_over_nccl_generate_the_single_process_tokens():
    model = random_transformer(SPEC, seed=1).eval()
    prompts = prompts_for(SPEC)
    case = "static, most KV on CPU, prefetch 2 ahead"
    expected = generate(model, CASES[case](SPEC), prompts, torch.device("cpu"))
    _, generated, recorder, _ = serve(model, CASES[case](SPEC), prompts, 2, "cuda", threads=1)
    assert generated == expected and recorder.iterations["bytes_h2d"].sum() > 0
