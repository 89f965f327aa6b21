"""FlexGen's placement LP: capacities respected, sensible extremes, and a time worked out by hand."""
import re

import pytest

from hwmodels import BatchShape, CostModel, GiB, load_hardware, load_model
from hwmodels.hardware import HARDWARE_DIR
from pie_policy.flexgen_lp import evaluate, search, solve

from .conftest import DATA

MiB = 2**20


def cost_model(hw, model):
    return CostModel(load_hardware(hw), load_model(model))


@pytest.mark.parametrize("hw", ["gh200-96g", "a100-80g-sxm-pcie4", "h100-sxm-pcie5"])
@pytest.mark.parametrize("model", ["opt-13b", "opt-30b", "opt-66b"])
@pytest.mark.parametrize("util", [0.9, 0.6])
def test_placement_never_exceeds_a_tier(hw, model, util):
    """Three tiers where the system has a disk (gh200-96g, h100-sxm-pcie5), two where it has none (a100)."""
    cm = cost_model(hw, model)
    plan = search(cm, prompt_len=512, gen_len=32, gpu_mem_util=util)
    assert plan.gpu_bytes <= int(cm.hw.gpu.hbm_bytes * util)
    assert plan.cpu_bytes <= cm.hw.host.memory_bytes
    assert plan.disk_bytes <= (cm.hw.disk.capacity_bytes if cm.hw.disk else 0)
    on_gpu, on_disk = (plan.wg, plan.cg, plan.hg), (plan.wd, plan.cd, plan.hd)
    assert all(0 <= g and 0 <= d and g + d <= 1 for g, d in zip(on_gpu, on_disk))
    # Every weight and every KV byte of the block lives somewhere.
    kv = cm.model.kv_bytes_per_token * plan.block_size * (512 + 32)
    assert plan.gpu_bytes + plan.cpu_bytes + plan.disk_bytes >= cm.model.weight_bytes + kv
    assert plan.block_size == plan.gpu_batch_size * plan.num_gpu_batches
    assert plan.throughput == pytest.approx(plan.block_size * 32 / plan.total_time)


def test_a_model_that_fits_stays_in_hbm():
    plan = search(cost_model("gh200-96g", "opt-1.3b"), prompt_len=512, gen_len=32)
    assert (plan.wg, plan.cg, plan.hg, plan.cpu_bytes) == (1, 1, 1, 0)
    assert plan.decode_bound == "compute"


def test_a_model_bigger_than_hbm_streams_weights():
    plan = search(cost_model("a100-80g-sxm-pcie4", "opt-66b"), prompt_len=512, gen_len=32)
    assert plan.wg < 1
    assert plan.cpu_bytes > 0 and plan.decode_bound == "h2d"


@pytest.fixture
def hand(write):
    """tiny-opt with 4 layers on a 1 MiB GPU with a slow link (1 GB/s in, 0.5 GB/s out, 1.2 GB/s both).
    Layer weights W = 99,968 B; embeddings and head 144,896 B; KV 256 B per token and layer."""
    hw = (DATA / "tiny-hw.toml").read_text()
    for old, new in [("hbm_gib = 1", "hbm_gib = 0.0009765625"), ("h2d_gb_s = 10", "h2d_gb_s = 1"),
                     ("d2h_gb_s = 5", "d2h_gb_s = 0.5"),
                     ("bidirectional_gb_s = 12", "bidirectional_gb_s = 1.2")]:
        hw = hw.replace(old, new)
    model = (DATA / "tiny-opt.toml").read_text().replace("num_layers = 2", "num_layers = 4")
    cm = CostModel(load_hardware(write("slow-hw.toml", hw)), load_model(write("tiny4.toml", model)))
    assert cm.hw.gpu.hbm_bytes == MiB and cm.model.layer_weight_bytes == 99968
    return cm


# Prompt 32, 8 generated tokens, 2 GPU batches of 2: block B = 4, decode context c = 32 + 8 // 2 = 36.
# HBM floor with everything offloaded: embeddings 144,896 + working activations of one GPU batch
# (64 tokens x 448 x 2 B + 2 x 1000 x 4 B = 65,344) + double buffers 2 x (W + 2 x 40 x 256) = 240,896.
FLOOR = 144896 + 65344 + 240896


def test_lp_time_equals_the_closed_form_when_only_buffers_fit(hand):
    plan = solve(hand, prompt_len=32, gen_len=8, gpu_batch_size=2, num_gpu_batches=2,
                 gpu_mem_util=FLOOR / MiB)
    assert (plan.wg, plan.cg, plan.hg) == pytest.approx((0, 0, 0), abs=1e-9)
    # Decode in: W + B·c·256 + B·64·2 = 99,968 + 36,864 + 512 = 137,344 B at 1 GB/s = 137.344 µs;
    # out: 4 x 256 + 512 = 1,536 B at 0.5 GB/s = 3.072 µs; both: 138,880 B at 1.2 GB/s = 115.73 µs;
    # compute: 2 x 12.48064 µs (see test_costmodel's decode, here at context 36) = 24.96 µs.
    assert plan.decode_layer_time == pytest.approx(137.344e-6, rel=1e-9)
    assert plan.decode_bound == "h2d"
    # Prefill in: W + 4·32·128 = 116,352 B = 116.352 µs; out: 4·32·256 + 16,384 = 49,152 B = 98.304 µs;
    # both: 165,504 B at 1.2 GB/s = 137.92 µs; compute 2 x 23.565952 = 47.13 µs.
    assert plan.prefill_layer_time == pytest.approx(137.92e-6, rel=1e-9)
    head = hand.head_time(BatchShape(sampled_tokens=2))
    assert plan.total_time == pytest.approx(4 * (137.92e-6 + 7 * 137.344e-6) + 8 * 2 * head, rel=1e-9)
    # HBM holds only the floor; CPU all 4 layers' weights, the KV (4·4·40·256) and activations (4·32·128).
    assert plan.gpu_bytes == FLOOR
    assert plan.cpu_bytes == 4 * 99968 + 163840 + 16384


def test_everything_in_hbm_is_compute_bound_by_hand(hand):
    plan = solve(hand, prompt_len=32, gen_len=8, gpu_batch_size=2, num_gpu_batches=2, gpu_mem_util=1)
    assert (plan.wg, plan.cg, plan.hg, plan.cpu_bytes) == (1, 1, 1, 0)
    # Decode GEMMs: 104,064 B at 50 GB/s; attention: 19,968 B at 50 GB/s; 10 µs overhead; two GPU batches.
    assert plan.decode_layer_time == pytest.approx(2 * (2.08128e-6 + 0.39936e-6 + 10e-6), rel=1e-9)
    # Prefill GEMMs compute bound: 6,291,456 FLOP at 0.5 TFLOP/s; attention 49,152 B at 50 GB/s.
    assert plan.prefill_layer_time == pytest.approx(2 * (12.582912e-6 + 0.98304e-6 + 10e-6), rel=1e-9)
    assert plan.decode_bound == "compute"


def test_hbm_below_its_floor_is_refused(hand):
    refused = (r"tiny4 on slow-hw cannot hold a block of 2 x 2 sequences of 32 \+ 8 tokens: "
               r"HBM is the binding constraint")
    with pytest.raises(ValueError, match=refused):
        solve(hand, prompt_len=32, gen_len=8, gpu_batch_size=2, num_gpu_batches=2,
              gpu_mem_util=(FLOOR - 1) / MiB)


def test_a_model_bigger_than_gpu_and_cpu_memory_is_refused(write):
    hw = (HARDWARE_DIR / "a100-80g-sxm-pcie4.toml").read_text()
    small_host = write("a100-16g-host.toml", hw.replace("memory_gib = 1024", "memory_gib = 16"))
    cm = CostModel(load_hardware(small_host), load_model("opt-66b"))
    refused = (r"opt-66b on a100-16g-host cannot hold a block of 1 x 1 sequences of 512 \+ 32 tokens: "
               r"GPU \+ CPU memory is the binding constraint, weights 122.4 GiB \+ KV cache 1.195 GiB .* "
               r"\+ 16 GiB host memory")
    with pytest.raises(ValueError, match=refused):
        search(cm, prompt_len=512, gen_len=32)


def test_lengths_beyond_the_context_are_refused():
    with pytest.raises(ValueError, match="context 2048"):
        search(cost_model("gh200-96g", "opt-13b"), prompt_len=2000, gen_len=100)



@pytest.fixture
def disk_hand(write):
    """tiny4 (as in `hand`) on tiny-disk-hw: slow-hw's 1 MiB GPU and link, no per-copy latency, and a disk
    read at 0.5 GB/s and written at 0.25 GB/s."""
    model = (DATA / "tiny-opt.toml").read_text().replace("num_layers = 2", "num_layers = 4")
    cm = CostModel(load_hardware(DATA / "tiny-disk-hw.toml"), load_model(write("tiny4.toml", model)))
    assert cm.hw.gpu.hbm_bytes == MiB and cm.model.layer_weight_bytes == 99968
    return cm


# With HBM at FLOOR everything is off the GPU; CPU memory of exactly the disk's staging buffers
# 2 x (W + 2 x 40 x 256) leaves no room for anything to live there: all of it is on disk.
STAGING = 2 * (99968 + 2 * 40 * 256)


def test_lp_time_equals_the_closed_form_when_everything_is_on_disk(disk_hand):
    plan = solve(disk_hand, prompt_len=32, gen_len=8, gpu_batch_size=2, num_gpu_batches=2,
                 gpu_mem_util=FLOOR / MiB, cpu_mem_bytes=STAGING)
    shares = (plan.wg, plan.cg, plan.hg, plan.wd, plan.cd, plan.hd)
    assert shares == pytest.approx((0, 0, 0, 1, 1, 1), abs=1e-9)
    assert (plan.gpu_bytes, plan.cpu_bytes, plan.disk_bytes) == (FLOOR, STAGING, 4 * 99968 + 163840 + 16384)
    # Per layer, prefill reads W + 4·32·128 = 116,352 B from disk at 0.5 GB/s, 232.704 µs, and writes
    # 49,152 B at 0.25 GB/s, 196.608 µs; decode reads what `..._when_only_buffers_fit` copies in, 137,344 B,
    # in 274.688 µs (the link takes 137.344 µs of it; the writes, 1,536 B, 6.144 µs).
    prefill, decode, head = 232.704e-6, 274.688e-6, disk_hand.head_time(BatchShape(sampled_tokens=2))
    assert (plan.decode_bound, plan.prefill_layer_time, plan.decode_layer_time, plan.total_time) == (
        "disk-read", pytest.approx(prefill, rel=1e-9), pytest.approx(decode, rel=1e-9),
        pytest.approx(4 * (prefill + 7 * decode) + 8 * 2 * head, rel=1e-9))


def test_cpu_memory_beyond_the_staging_buffers_takes_weights_off_the_disk(disk_hand):
    """Per byte of CPU memory, a layer's weights (read every step, 2 x W of staging less) save more disk
    reads than the KV cache does; 50,000 B more take 1 - wd = 50,000 / (2 W) of the weights off the disk."""
    plan = solve(disk_hand, prompt_len=32, gen_len=8, gpu_batch_size=2, num_gpu_batches=2,
                 gpu_mem_util=FLOOR / MiB, cpu_mem_bytes=STAGING + 50_000)
    assert 1 - plan.wd == pytest.approx(50_000 / (2 * 99968), rel=1e-6)
    assert (plan.cd, plan.hd) == pytest.approx((1, 1), abs=1e-9)
    assert plan.decode_layer_time == pytest.approx((137344 - 25_000) / 0.5e9, rel=1e-6)


def test_too_big_for_gpu_and_cpu_memory_is_placed_with_a_disk_and_refused_without(write):
    """OPT-66B (122 GiB) on an H100 with 16 GiB of CPU memory: 72 + 16 GiB cannot hold it, the disk can."""
    with_disk = CostModel(load_hardware("h100-sxm-pcie5"), load_model("opt-66b"))
    plan = search(with_disk, prompt_len=512, gen_len=32, cpu_mem_bytes=16 * GiB)
    assert plan.wd > 0 and plan.disk_bytes <= with_disk.hw.disk.capacity_bytes
    assert plan.gpu_bytes <= 0.9 * 80 * GiB and plan.cpu_bytes <= 16 * GiB
    assert plan.decode_bound == "disk-read"
    no_disk = re.sub(r"\[disk\].*?\n\n", "", (HARDWARE_DIR / "h100-sxm-pcie5.toml").read_text(), flags=re.S)
    cm = CostModel(load_hardware(write("h100-no-disk.toml", no_disk)), load_model("opt-66b"))
    with pytest.raises(ValueError, match=r"GPU \+ CPU memory is the binding constraint, .* \+ 16 GiB host memory$"):
        search(cm, prompt_len=512, gen_len=32, cpu_mem_bytes=16 * GiB)


def test_a_full_disk_is_named_among_the_tiers(write):
    hw = (HARDWARE_DIR / "h100-sxm-pcie5.toml").read_text().replace("capacity_gib = 7152", "capacity_gib = 8")
    cm = CostModel(load_hardware(write("h100-small-disk.toml", hw)), load_model("opt-66b"))
    with pytest.raises(ValueError, match=r"GPU \+ CPU \+ disk memory is the binding constraint, .* \+ 16 GiB host "
                                         r"memory \+ 8 GiB disk"):
        search(cm, prompt_len=512, gen_len=32, cpu_mem_bytes=16 * GiB)


def test_a_placement_given_by_hand_is_priced_and_checked_against_every_tier(disk_hand):
    everything_on_disk = dict(wg=0, cg=0, hg=0, wd=1, cd=1, hd=1, gpu_mem_util=FLOOR / MiB)
    given = evaluate(disk_hand, 32, 8, 2, 2, cpu_mem_bytes=STAGING, **everything_on_disk)
    assert given == solve(disk_hand, 32, 8, 2, 2, gpu_mem_util=FLOOR / MiB, cpu_mem_bytes=STAGING)
    with pytest.raises(ValueError, match=r"needs 0.0002244 GiB of CPU memory, more than its 0.0002244 GiB"):
        evaluate(disk_hand, 32, 8, 2, 2, cpu_mem_bytes=STAGING - 1, **everything_on_disk)
    with pytest.raises(ValueError, match=r"HBM \+ disk <= 1"):
        evaluate(disk_hand, 32, 8, 2, 2, wg=0.5, cg=1, hg=1, wd=0.6)
